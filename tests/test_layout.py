"""The package's shape: the import graph, which the folders are meant to show."""

import graphlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[1]


def import_graph(package: str = "lingmao") -> dict[str, set[str]]:
    """Each module of `package` -> the modules of it that it imports, lazy
    imports inside functions included (they close a circle all the same);
    imports only a type checker reads are left out."""
    g = grimp.build_graph(package, exclude_type_checking_imports=True)
    return {m: g.find_modules_directly_imported_by(m) for m in g.modules}


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert "lingmao.plan.batch" in graph["lingmao.plan.make"]  # the premise: imports are read
    list(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError on a circle


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter's contracts (pyproject.toml) over the package at `root`."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "from importlinter.cli import lint_imports; raise SystemExit(lint_imports(no_cache=True))",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_imports_follow_the_layers():
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 kept, 0 broken" in done.stdout


def test_a_planted_back_edge_breaks_the_layers(tmp_path):
    """The contract is checked, not hoped for: the config layer importing
    the engine (a lower layer reaching up) fails it, and says where."""
    shutil.copytree(REPO / "lingmao", tmp_path / "lingmao", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    schema = tmp_path / "lingmao" / "config" / "schema.py"
    schema.write_text(schema.read_text() + "\nimport lingmao.train.engine  # planted\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0
    assert "lingmao.config.schema -> lingmao.train.engine" in done.stdout
