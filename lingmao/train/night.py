"""Night mode: between 21:00 and 08:00 the run goes easier on the
machine — half the micro-batch (more accumulation, same effective batch), half
the CUDA memory, half the CPU threads — and logs when it switches.

The micro-batch is halved by splitting each loaded batch into chunks, so the
data order and the effective batch, hence the maths, stay the same. The clock
is injected so tests can cross the boundary during a run.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass


def parse_hhmm(text: str, key: str) -> dt.time:
    try:
        return dt.datetime.strptime(text, "%H:%M").time()
    except ValueError:
        raise ValueError(f"{key}={text!r}: expected a time as HH:MM, e.g. 21:00") from None


def in_window(now: dt.time, start: dt.time, end: dt.time) -> bool:
    """True inside [start, end); the window may wrap past midnight."""
    if start <= end:
        return start <= now < end
    return now >= start or now < end


@dataclass(frozen=True)
class NightSettings:
    chunks: int  # each micro-batch is processed in this many pieces
    threads: int  # CPU intra-op threads
    memory_fraction: float  # CUDA per-process memory cap (1.0: none)


class NightMode:
    """Decides, at each optimizer step, the settings for the time of day."""

    def __init__(
        self,
        enabled: bool,
        start: str,
        end: str,
        micro_batch: int,
        threads: int,
        clock: Callable[[], dt.datetime] = dt.datetime.now,
    ):
        self.enabled = enabled
        self.start, self.end = parse_hhmm(start, "night.start"), parse_hhmm(end, "night.end")
        self.clock = clock
        # Halve the micro-batch where it divides; a micro-batch of 1 cannot shrink.
        self.day = NightSettings(1, threads, 1.0)
        self.night = NightSettings(2 if micro_batch % 2 == 0 else 1, max(1, threads // 2), 0.5)
        self.active: bool | None = None

    def settings(self) -> tuple[NightSettings, bool]:
        """The settings now, and whether they changed since the last call."""
        night = self.enabled and in_window(self.clock().time(), self.start, self.end)
        changed = night != self.active
        self.active = night
        return (self.night if night else self.day), changed
