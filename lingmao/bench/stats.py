"""Paired-block statistics for timing two contenders on a noisy machine.

The contenders run in alternating blocks of steps, in rounds of four blocks:
A B A B, then B A B A, and so on. Each adjacent A/B pair gives one ratio, so a
slow change of the machine (a neighbour's job, clock scaling) hits both members
of a pair alike, and the alternating order cancels any first-or-second bias.
The two blocks of the same contender inside a round form a same-vs-same
control at no extra cost: if the control's interval misses 1.0, the machine
moved more than the comparison can resolve and the verdict is "inconclusive".

Summaries are the median and its sign-test interval (order statistics, from
scipy.stats.quantile_test): distribution-free, deterministic, and robust to
the occasional block a neighbour slowed tenfold. Pure functions; the callables are the only contact
with the machine.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import median

from scipy.stats import binom, quantile_test


@dataclass(frozen=True)
class Interval:
    median: float
    low: float
    high: float
    confidence: float  # coverage [low, high] achieves for the median
    n: int

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high

    def __str__(self) -> str:
        return f"{self.median:.3f} [{self.low:.3f}, {self.high:.3f}]"


def median_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Median of `values` and scipy's quantile-test interval for it: the
    order statistics (x_(k), x_(n+1-k)) of the sign test, which cover the
    median with probability 1 - 2 P(Bin(n, 1/2) <= k-1). Below 6 values no k
    reaches 95%: the interval is then [min, max] and `confidence` reports
    the lower coverage it has."""
    xs = sorted(values)
    n = len(xs)
    if not n:
        raise ValueError("median_interval needs at least one value")
    # On the ranks 0..n-1 the interval's ends are the order statistics' indices, ties or not.
    ranks = quantile_test(range(n), q=(n - 1) / 2, p=0.5).confidence_interval(confidence)
    k = 1 if math.isnan(ranks.low) else int(ranks.low) + 1
    return Interval(median(xs), xs[k - 1], xs[n - k], float(1 - 2 * binom.cdf(k - 1, n, 0.5)), n)


@dataclass(frozen=True)
class Paired:
    """Block values in run order, and the ratios formed from them."""

    a: list[float]
    b: list[float]
    ratios: list[float]  # a / b of adjacent blocks
    control: list[float]  # earlier / later block of the same contender within a round


def block_order(pairs: int) -> str:
    """The run order of `pairs` A/B pairs (rounded up to even): "abab" + "baba" + ..."""
    if pairs < 1:
        raise ValueError(f"pairs={pairs} must be >= 1")
    return "".join("abab" if r % 2 == 0 else "baba" for r in range((pairs + 1) // 2))


def pair_up(order: str, values: Sequence[float]) -> Paired:
    """Ratios and controls from block values listed in `order` (block_order's)."""
    if len(values) != len(order):
        raise ValueError(f"{len(values)} block values for {len(order)} blocks")
    a, b, ratios, control = [], [], [], []
    for r in range(0, len(order), 4):
        v = values[r : r + 4]
        ra, rb = (v[0::2], v[1::2]) if order[r] == "a" else (v[1::2], v[0::2])
        a += ra
        b += rb
        ratios += [ra[0] / rb[0], ra[1] / rb[1]]
        control += [ra[0] / ra[1], rb[0] / rb[1]]
    return Paired(a, b, ratios, control)


def interleave(run_a: Callable[[], float], run_b: Callable[[], float], pairs: int) -> Paired:
    """Run `pairs` A/B pairs in block_order. Each callable runs one block and
    returns its value (a rate such as tokens/s, or a duration: the ratio is
    a / b either way)."""
    order = block_order(pairs)
    return pair_up(order, [run_a() if k == "a" else run_b() for k in order])


@dataclass(frozen=True)
class Comparison:
    ratio: Interval
    control: Interval

    @property
    def conclusive(self) -> bool:
        return self.control.contains(1.0)

    def describe(self, label: str) -> str:
        ci = f"{self.ratio.confidence:.0%} CI"
        if not self.conclusive:
            return (
                f"{label}: inconclusive (same-vs-same control {self.control} misses 1.0: the machine "
                f"changed more than this comparison can resolve; run it again on a quieter machine)"
            )
        return (
            f"{label} = {self.ratio.median:.3f} ({ci} {self.ratio.low:.3f}-{self.ratio.high:.3f}, "
            f"{self.ratio.n} pairs; same-vs-same control {self.control})"
        )


def compare(paired: Paired, confidence: float = 0.95) -> Comparison:
    return Comparison(median_interval(paired.ratios, confidence), median_interval(paired.control, confidence))
