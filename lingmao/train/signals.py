"""SIGINT/SIGTERM during training: finish the step, checkpoint, stop."""

from __future__ import annotations

import os
import signal


class Stopper:
    """Within `with Stopper() as s:` a first SIGINT or SIGTERM sets
    `s.requested`; a second one raises KeyboardInterrupt at once."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        # os.write, not print: a handler may run in the middle of a print.
        os.write(
            2,
            f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint "
            f"(again to stop at once)\n".encode(),
        )

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
