"""Where a run came from: the git state of a folder, the launching host, a
sweep's id, and the source tags every run carries, spooled or not."""

from __future__ import annotations

import getpass
import hashlib
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path


def git_state(cwd: Path) -> dict[str, str]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git.commit": commit, "git.dirty": str(dirty).lower()} if commit else {}


def launch_host() -> str:
    return os.uname().nodename


def sweep_id(sweep_dir: Path) -> str:
    """One id for every job of a multirun, readable ('2025-06-01_12-00-00-3fa2c1'
    for Hydra's default dir) and the same in every process and on every node
    that sees the same sweep folder."""
    sweep_dir = Path(sweep_dir).resolve()
    digest = hashlib.sha1(str(sweep_dir).encode()).hexdigest()[:6]
    return f"{sweep_dir.parent.name}_{sweep_dir.name}-{digest}"


def source_tags() -> dict[str, str]:
    """MLflow's standard source tags, which its fluent `start_run` sets and a
    client-made run lacks, and lingmao's version. Built without importing
    MLflow so that a spooled run carries them too. The commit is that of the
    lingmao code that ran, when it runs from a git checkout."""
    tags = {
        "mlflow.user": getpass.getuser(),
        "mlflow.source.name": sys.argv[0] or "python",
        "mlflow.source.type": "LOCAL",
    }
    commit = git_state(Path(__file__).resolve().parent).get("git.commit")
    if commit:
        tags["mlflow.source.git.commit"] = commit
    try:
        tags["lingmao.version"] = importlib.metadata.version("lingmao")
    except importlib.metadata.PackageNotFoundError:
        pass  # run from a source tree that was never installed
    return tags
