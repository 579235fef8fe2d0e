"""Text metrics: how much a generated sample loops, whether it keeps the
line lengths of verse, and how much a corpus repeats itself.

Counted over characters: in classical Chinese one character is one word-ish
unit and one token of lingmao's tokenizer. Pure functions, no torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


def ngrams(text: str, n: int) -> list[str]:
    return [text[i : i + n] for i in range(len(text) - n + 1)]


def distinct_n(text: str, n: int) -> float:
    """Distinct-n (Li et al. 2016): unique n-grams / all n-grams; 1.0 is no
    repeat at all. 0.0 for a text shorter than n."""
    grams = ngrams(text, n)
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_rate(text: str, n: int = 4) -> float:
    """Share of the text's n-grams that already occurred earlier in it: 0.0
    for a text that never repeats, towards 1.0 for one stuck in a loop."""
    grams = ngrams(text, n)
    seen: set[str] = set()
    repeated = 0
    for g in grams:
        repeated += g in seen
        seen.add(g)
    return repeated / len(grams) if grams else 0.0


def repetition(text: str) -> dict[str, float]:
    """The three numbers lingmao logs for a generated sample."""
    return {"rep4": repeated_ngram_rate(text, 4), "distinct1": distinct_n(text, 1), "distinct2": distinct_n(text, 2)}


def mean_repetition(texts: list[str]) -> dict[str, float]:
    """`repetition` averaged over samples (each sample weighs the same)."""
    per_text = [repetition(t) for t in texts]
    return {k: sum(r[k] for r in per_text) / len(per_text) for k in per_text[0]} if per_text else {}


LINE_ENDS = "。，！？；\n"
POEM_LINE_LENGTHS = (5, 7)  # 五言 and 七言: the line lengths of regulated verse


def lines(text: str) -> list[str]:
    """The text's lines, split at the punctuation that ends a line of verse."""
    for mark in LINE_ENDS[1:]:
        text = text.replace(mark, LINE_ENDS[0])
    return [line.strip() for line in text.split(LINE_ENDS[0]) if line.strip()]


def verse_form(texts: list[str]) -> float | None:
    """Share of the lines of `texts` that have 5 or 7 characters: near the
    corpus's own share for a model that writes 诗 in form, near 0 for
    prose or loops. None when there are no lines."""
    all_lines = [line for t in texts for line in lines(t)]
    if not all_lines:
        return None
    return sum(len(line) in POEM_LINE_LENGTHS for line in all_lines) / len(all_lines)


@dataclass
class DuplicateWindows:
    windows: int  # non-overlapping windows of `window` tokens
    exact: int  # windows identical to an earlier window
    near: int  # not exact, but at least `threshold` of their sampled shingles occurred earlier
    shingles: int  # sampled shingles
    repeated_shingles: int  # sampled shingles that occurred earlier in the corpus

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def duplicate_windows(
    tokens: np.ndarray,
    window: int,
    shingle: int = 32,
    threshold: float = 0.5,
    keep_one_in: int = 8,
    seed: int = 0,
    chunk_tokens: int = 1 << 22,
) -> DuplicateWindows:
    """Exact and near-duplicate windows of a token array, in a few vectorized passes.

    The corpus is cut into non-overlapping windows of `window` tokens (what the
    model sees at once). Every `shingle`-token substring inside a window gets a
    64-bit hash; the ones whose hash is 0 modulo `keep_one_in` are kept, a
    choice made by content, not by position (Manber 1994), so a passage
    repeated at any offset keeps the same shingles. A window is a near
    duplicate when at least `threshold` of its kept shingles occurred anywhere
    earlier in the corpus. Memory is bounded by `chunk_tokens` plus the kept
    shingles. Hashes can collide (~2^-64 per pair): counts, not proofs.
    """
    if not 1 <= shingle <= window:
        raise ValueError(f"shingle={shingle} must be between 1 and window={window}")
    n_windows = len(tokens) // window
    if n_windows == 0:
        return DuplicateWindows(0, 0, 0, 0, 0)
    rng = np.random.default_rng(seed)
    table = rng.integers(0, 2**63, int(np.max(tokens[: n_windows * window])) + 1, dtype=np.uint64)
    k = rng.integers(1, 2**63, dtype=np.uint64) | np.uint64(1)
    per_chunk = max(1, chunk_tokens // window)
    window_hashes, kept_hashes, kept_owner = [], [], []
    for w0 in range(0, n_windows, per_chunk):
        t = np.asarray(tokens[w0 * window : min(n_windows, w0 + per_chunk) * window], dtype=np.int64)
        w_hash, s_hash = _hashes(table[t], window, shingle, k)
        s_start = np.arange(len(s_hash))
        # inside one window (not crossing its end), and kept by content
        keep = (s_start % window <= window - shingle) & (s_hash % np.uint64(keep_one_in) == 0)
        window_hashes.append(w_hash)
        kept_hashes.append(s_hash[keep])
        kept_owner.append(w0 + s_start[keep] // window)
    _, first_window = np.unique(np.concatenate(window_hashes), return_index=True)
    exact = np.ones(n_windows, dtype=bool)
    exact[first_window] = False
    h, owner = np.concatenate(kept_hashes), np.concatenate(kept_owner)
    _, first = np.unique(h, return_index=True)
    repeated = np.ones(len(h), dtype=bool)
    repeated[first] = False  # shingles are in corpus order: `first` is each hash's earliest place
    kept = np.bincount(owner, minlength=n_windows)
    seen = np.bincount(owner, weights=repeated, minlength=n_windows)
    near = (kept > 0) & (seen >= threshold * kept) & ~exact
    return DuplicateWindows(
        windows=n_windows,
        exact=int(exact.sum()),
        near=int(near.sum()),
        shingles=len(h),
        repeated_shingles=int(repeated.sum()),
    )


def _hashes(r: np.ndarray, window: int, shingle: int, k: np.uint64) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of each window of `r` (one random 64-bit value per token) and of
    the shingle starting at each position. The hash of a span [i, i+s) is
    sum_j (k + j) * r[i+j] mod 2^64, taken from prefix sums of r and of
    position * r: it depends on the span's content and order, not on where it
    lies (uint64 arithmetic wraps, as wanted)."""
    zero = np.zeros(1, dtype=np.uint64)
    c1 = np.concatenate([zero, np.cumsum(r, dtype=np.uint64)])
    c2 = np.concatenate([zero, np.cumsum(r * np.arange(len(r), dtype=np.uint64), dtype=np.uint64)])

    def spans(c: np.ndarray, length: int, step: int) -> np.ndarray:
        return c[length::step] - c[: len(c) - length : step]  # sum over [i, i+length) for i = 0, step, ...

    def span_hash(length: int, step: int) -> np.ndarray:
        s1 = spans(c1, length, step)
        return s1 * k + spans(c2, length, step) - np.arange(0, len(s1) * step, step, dtype=np.uint64) * s1

    return span_hash(window, window), span_hash(shingle, 1)
