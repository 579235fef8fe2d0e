"""The package's shape: the import graph, which the folders are meant to show."""

import ast
import collections
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


def python_modules() -> list[Path]:
    return sorted((REPO / "lingmao").rglob("*.py"))


def test_no_module_over_400_lines_and_no_function_over_60():
    long = []
    for path in python_modules():
        text = path.read_text()
        if len(text.splitlines()) > 400:
            long.append(f"{path.relative_to(REPO)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([d.lineno for d in node.decorator_list] + [node.lineno])
                if node.end_lineno - first + 1 > 60:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {node.end_lineno - first + 1}")
    assert long == []


def test_no_module_name_is_another_plus_a_suffix():
    """tracking.py beside tracking_spool.py, checkpoint.py beside
    checkpointer.py: names that do not say how the two differ."""
    names = {p.stem for p in python_modules() if not p.stem.startswith("__")}
    names |= {p.parent.name for p in python_modules() if p.name == "__init__.py"} - {"lingmao"}
    clashes = sorted((a, b) for a in names for b in names if a != b and b.startswith(a))
    assert clashes == []


def module_entries(fn) -> collections.Counter:
    """How often fn() enters each lingmao module's functions from another
    module (methods of the values it passes around do not count)."""
    entries, stack = collections.Counter(), []

    def profile(frame, event, arg):
        if event == "call":
            module = frame.f_globals.get("__name__", "")
            function = "." not in frame.f_code.co_qualname
            if module.startswith("lingmao.") and function and (not stack or stack[-1] != module):
                entries[module] += 1
            stack.append(module)
        elif event == "return" and stack:
            stack.pop()

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return entries


def test_the_plan_visits_each_of_its_modules_once_or_twice():
    """make_plan in one pass: no module's functions are entered from another
    module more than twice (before, the memory estimate was entered 7 times
    for one plan, three of them for values the batch fit had already computed)."""
    from test_config import make

    from lingmao.plan.machine import Gpu, Machine
    from lingmao.plan.make import make_plan

    machines = {"cpu": Machine(cores=2, ram_gb=16.0), "rtx4090": Machine(2, 64.0, gpus=(Gpu("RTX 4090", 24.0, 8.9),))}
    for preset, model in (("cpu", "small"), ("rtx4090", "large")):
        cfg = make(f"hardware={preset}", f"model={model}")
        entries = module_entries(lambda: make_plan(cfg, machines[preset]))  # noqa: B023 (called at once)
        assert entries["lingmao.plan.memory"] >= 1  # the premise: the trace sees the plan's modules
        assert {m: n for m, n in entries.items() if n > 2} == {}, (preset, model)
