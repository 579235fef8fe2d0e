"""A cross-process lock on a path that leaves no lock file behind."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an flock on `lock_path`, created for the purpose and removed at
    the end. A waiter that got the lock of a file its holder removed meanwhile
    (the path now names another file, or none) takes the lock again on what
    the path names now: only one process at a time holds the path's lock."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock, the callers' atomic renames still protect readers
        yield
        return
    lock_path = Path(lock_path)
    while True:
        f = open(lock_path, "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
            with contextlib.suppress(FileNotFoundError):
                if os.stat(lock_path).st_ino == os.fstat(f.fileno()).st_ino:
                    break
        except BaseException:
            f.close()
            raise
        f.close()
    try:
        yield
    finally:
        lock_path.unlink(missing_ok=True)  # while still held: no one can lock it in between
        f.close()
