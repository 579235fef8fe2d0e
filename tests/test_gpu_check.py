"""The CPU-runnable parts of scripts/gpu_check.sh: the carried corpus, the
`prepared` data source, a run that imports neither MLflow nor `datasets` nor
opencc, and the table the check ends with."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


carry = _script("make_gpu_carry")
check = _script("gpu_check")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A carried corpus as make_gpu_carry builds it, at the real vocabulary, small."""
    from lingmao.plan.make import DEFAULT_VOCAB

    return carry.build_corpus(tmp_path_factory.mktemp("carry") / "corpus", tokens=40_000, vocab_size=DEFAULT_VOCAB)


def data_config(*overrides: str):
    from hydra import compose, initialize_config_dir

    from lingmao.config.compose import CONF_DIR, register

    register()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides)).data


def test_carried_corpus_has_the_plans_vocabulary_and_loads_as_data_prepared(corpus):
    from lingmao.data import load_prepared
    from lingmao.plan.make import DEFAULT_VOCAB

    d = data_config("data=prepared", f"data.prepared_dir={corpus}")
    assert (d.source, d.prepared_dir) == ("prepared", str(corpus))
    loaded = load_prepared(d.prepared_dir)  # what load_corpus returns for data=prepared (the smoke run below)
    assert loaded.dir == corpus and loaded.vocab_size == DEFAULT_VOCAB == 13563
    assert loaded.tokenizer().get_vocab_size() == DEFAULT_VOCAB
    train, val = loaded.tokens("train"), loaded.tokens("val")
    assert 35_000 < len(train) + len(val) < 45_000 and len(val) > 0
    assert int(train.max()) < DEFAULT_VOCAB
    assert carry.folder_bytes(corpus) < 2**20  # 40k uint16 tokens and the tokenizer


def test_carried_corpus_is_the_same_for_the_same_seed():
    a, b = carry.documents(5_000, 600, seed=3), carry.documents(5_000, 600, seed=3)
    assert a == b and a != carry.documents(5_000, 600, seed=4)
    assert len(set("".join(a))) == 600 - 4  # every character but the 4 special tokens


def test_prepared_source_needs_a_folder_and_names_what_is_missing(tmp_path, corpus):
    from lingmao.data import load_prepared
    from lingmao.data.corpus import CorpusError

    assert data_config("data=prepared").prepared_dir is None
    with pytest.raises(CorpusError, match=r"data=prepared needs data.prepared_dir=PATH"):
        load_prepared(None)
    empty = tmp_path / "not_a_corpus"
    empty.mkdir()
    (empty / "train.bin").write_bytes(b"")
    with pytest.raises(CorpusError) as e:
        load_prepared(str(empty))
    message = str(e.value)
    assert f"data.prepared_dir={empty}" in message and "meta.json" in message and "\n" not in message
    assert "train.bin," not in message.split("there;")[0]  # present: not named as missing


def test_forbidden_imports_are_seen(monkeypatch):
    assert check.imported(("lingmao_no_such",)) == []
    monkeypatch.setitem(sys.modules, "datasets.arrow_dataset", types.ModuleType("datasets.arrow_dataset"))
    assert "datasets" in check.imported()


@pytest.fixture(scope="module")
def carried(tmp_path_factory) -> Path:
    """.gpu_carry as make_gpu_carry builds it (the wheels from PyPI, for this
    Python), with a small corpus: the set the GPU machine gets."""
    out = tmp_path_factory.mktemp("gpu_carry")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    args = ["--out", str(out), "--python-version", version, "--tokens", "200000"]
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_gpu_carry.py"), *args], check=True, timeout=300)
    return out


def guarded(site: Path, code: str) -> subprocess.CompletedProcess:
    """`python -c code` as the rehearsal runs Python: the GPU machine's packages, and the carried ones from `site`."""
    env = {**os.environ, "GPU_CHECK_SITE": str(site), "PYTHONPATH": os.pathsep.join([str(site), str(GUARD)])}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


GUARD = REPO / "scripts" / "gpu_machine"


def test_the_rehearsals_python_has_only_the_gpu_machines_packages_and_the_carried_ones(tmp_path, carried):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert guarded(empty, "import torch, numpy, tokenizers, lingmao.model.gpt").returncode == 0
    gone = guarded(empty, "import mlflow")
    assert gone.returncode != 0 and "No module named 'mlflow' on the GPU machine" in gone.stderr
    assert "hydra-core" in guarded(empty, "import hydra").stderr  # not carried: not there either
    site = tmp_path / "site"
    wheels = sorted(str(w) for w in (carried / "wheels").glob("*.whl"))
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site)]
    subprocess.run([*pip, *wheels], check=True, timeout=120)
    found = guarded(site, "import hydra, omegaconf; print(hydra.__file__)")
    assert found.returncode == 0 and found.stdout.startswith(str(site))  # the carried copy, not this venv's


def test_plan_takes_fp16_on_cpu_when_asked_so_the_rehearsal_runs_the_gradscaler():
    from test_config import make

    from lingmao.plan.machine import Machine
    from lingmao.plan.make import make_plan

    plan = make_plan(make("hardware=cpu", "model=tiny", "hardware.precision=fp16"), Machine(cores=2, ram_gb=16.0))
    assert (plan.precision, plan.grad_scaler) == ("fp16", True) and "GradScaler" in plan.precision_reason


# What the rehearsal must have run and passed: every step, and each test of tests/test_gpu.py.
REHEARSED = (
    "step install", "step device", "smoke:", "step smoke", "10 steps bf16-eager", "10 steps bf16-compile",
    "10 steps fp16-eager", "compile = eager, bf16", "fp16 = bf16 at step 1", "memory cpu small", "MFU",
    "resume after SIGKILL", "DDP 2 x gloo = 1 process", "step pytest", "bench:", "step bench",
)  # fmt: skip


def test_the_gpu_check_rehearses_on_cpu(tmp_path, carried):
    """scripts/gpu_check.sh end to end without a GPU (GPU_CHECK_REHEARSAL=1):
    the carried set as make_gpu_carry builds it, the same steps, tests,
    metrics and results file as on the GPU, the CPU in the GPU's place."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_CARRY": str(carried), "PYTHON": sys.executable}
    env["GPU_CHECK_REHEARSAL"] = "1"
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=600
    )
    table = (out / "table.txt").read_text() if (out / "table.txt").exists() else done.stdout[-3000:]
    assert done.returncode == 0, table + done.stderr[-2000:]
    rows = check.rows(out / "results.jsonl")
    assert all(result.startswith("passed") for _, result, _ in rows), table
    for name in REHEARSED:
        assert any(c.startswith(name) for c, _, _ in rows), f"{name}: not in the table\n{table}"
    smoke = next(numbers for c, _, numbers in rows if c.startswith("smoke:"))
    assert "imported none of mlflow/datasets/opencc" in smoke and "plan cpu" in smoke
    assert "done: step 3" in (out / "check.log").read_text() and (out / "runs.tar.gz").stat().st_size > 0


def test_pytest_plugin_writes_each_outcome_as_it_ends(tmp_path):
    (tmp_path / "test_some.py").write_text(
        "import pytest\n"
        "def test_ok():\n    assert True\n"
        "def test_bad():\n    assert 1 == 2, 'one is not two'\n"
        "@pytest.mark.skip(reason='not here')\ndef test_skipped():\n    pass\n"
    )
    results = tmp_path / "results.jsonl"
    env = {
        **os.environ,
        "GPU_CHECK_RESULTS": str(results),
        "PYTHONPATH": os.pathsep.join([str(REPO / "scripts"), os.environ.get("PYTHONPATH", "")]),
    }
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "gpu_pytest_plugin",
            str(tmp_path / "test_some.py"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    verdicts = check.outcomes([json.loads(line) for line in results.read_text().splitlines()])
    assert verdicts["test_ok"] == "passed"
    assert verdicts["test_bad"].startswith("FAILED: AssertionError: one is not two")
    assert verdicts["test_skipped"] == "skipped: not here"


def rows_of(*rows: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_table_joins_the_tests_numbers_with_their_outcomes(tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    check.add_row(results, "step install", "passed", seconds=3)
    with open(results, "a") as f:
        f.write(
            rows_of(
                {"check": "memory a", "test": "test_a[x]", "numbers": {"ratio": 0.91234, "gb": None}},
                {"test": "test_a[x]", "outcome": "passed", "when": "call", "message": ""},
                {"check": "mfu b", "test": "test_b", "numbers": {"mfu": 0.4}},
                {"test": "test_b", "outcome": "FAILED", "when": "call", "message": "assert 0.4 < 0.3"},
                {"test": "test_b", "outcome": "passed", "when": "teardown", "message": ""},
                {"test": "test_c", "outcome": "skipped", "when": "setup", "message": "needs a CUDA device"},
            )
        )
    assert check.table(results) == 1  # test_b failed
    lines = capsys.readouterr().out.splitlines()
    row = {" ".join(line.split()[:2]): line for line in lines[2:-1]}
    assert "passed" in row["step install"] and "seconds 3" in row["step install"]
    assert "passed" in row["memory a"] and "ratio 0.9123" in row["memory a"] and "gb" not in row["memory a"]
    assert "FAILED: assert 0.4 < 0.3" in row["mfu b"] and "mfu 0.4" in row["mfu b"]
    assert any(line.startswith("test_c") and "skipped: needs a CUDA device" in line for line in lines)
    assert lines[-1] == "3 of 4 checks passed or skipped; not: mfu b"


def test_table_of_a_test_stopped_before_it_ended_says_so(tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    results.write_text(rows_of({"check": "memory a", "test": "test_a", "numbers": {"ratio": 1.0}}))
    assert check.table(results) == 1
    assert "no outcome (stopped before it ended)" in capsys.readouterr().out
