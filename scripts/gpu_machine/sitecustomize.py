"""The GPU machine's Python on any machine, for the rehearsal of the GPU check.

scripts/gpu_check.sh puts this folder on PYTHONPATH when GPU_CHECK_REHEARSAL=1,
so every Python process of the rehearsal imports it at start-up (Python's
`sitecustomize` hook). From then on a package that the GPU machine lacks
(packages.txt beside this file) fails to import, as it would there, unless
it is one the check carries, and a carried one is found only where the
carried wheels were installed (GPU_CHECK_SITE): a new import, or a wheel left
out of the carried set, fails the rehearsal instead of the minutes a GPU is lent.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.metadata
import os
import re
import sys
from pathlib import Path


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _there() -> set[str]:
    lines = (Path(__file__).with_name("packages.txt")).read_text().splitlines()
    return {_norm(line) for line in lines if line.strip() and not line.startswith("#")}


class GpuMachineOnly(importlib.abc.MetaPathFinder):
    def __init__(self, site: str, carried: set[str]):
        self.site, self.carried, self.there = site, carried, _there()
        self.owners = importlib.metadata.packages_distributions()  # top-level module -> distributions

    def find_spec(self, name, path=None, target=None):
        if path is not None or name in sys.stdlib_module_names or name in sys.builtin_module_names:
            return None  # a submodule is found in its package, which this finder let through
        dists = {_norm(d) for d in self.owners.get(name, ())}
        if not dists or dists & self.there:
            return None  # not from a distribution (lingmao, the tests), or one the GPU machine has
        if dists & self.carried:
            spec = importlib.machinery.PathFinder.find_spec(name, [self.site])
            if spec is None:
                raise ModuleNotFoundError(f"{name}: not among the carried wheels in {self.site}", name=name)
            return spec
        raise ModuleNotFoundError(
            f"No module named {name!r} on the GPU machine ({', '.join(sorted(dists))})", name=name
        )


if os.environ.get("GPU_CHECK_SITE"):
    site = os.environ["GPU_CHECK_SITE"]
    carried = {_norm(p.name.split("-")[0]) for p in Path(site).glob("*.dist-info")}  # what pip installed there
    sys.meta_path.insert(0, GpuMachineOnly(site, carried))
