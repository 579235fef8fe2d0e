"""What a run prints: a copy of it in the run folder (run.log), and a
progress bar only where a person watches a terminal; piped to a file the
output is plain lines."""

from __future__ import annotations

import sys
from pathlib import Path


def interactive() -> bool:
    return sys.stderr.isatty()


class _Tee:
    """A stream that also appends what it is given to a file, leaving out
    progress-bar frames (text with a carriage return)."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        if "\r" not in text:
            self.log.write(text)
            self.log.flush()
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


class RunLog:
    """`with RunLog(run_dir):` copies stdout and stderr into run_dir/run.log
    (appended: a resumed run adds to it)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "run.log"

    def __enter__(self) -> RunLog:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.path, "a", encoding="utf-8")
        self._old = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(sys.stdout, self._log), _Tee(sys.stderr, self._log)
        return self

    def __exit__(self, *exc) -> None:
        sys.stdout, sys.stderr = self._old
        self._log.close()
