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


def test_gpu_check_sh_rehearses_a_run_that_imports_no_mlflow_datasets_opencc(tmp_path, corpus):
    """gpu_check.sh's smoke step on the CPU: `python -m lingmao.run` with
    hardware=auto, tracking off and the carried corpus finishes, and the step
    fails if mlflow, datasets or opencc were imported."""
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OUT": str(out),
        "GPU_CHECK_PARTS": "smoke",
        "GPU_CHECK_CARRY": str(corpus.parent),
        "PYTHON": sys.executable,
        "PYTHONPATH": str(REPO),
    }
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    smoke = next(r for r in rows if r["check"].startswith("smoke"))
    assert smoke["result"] == "passed" and smoke["numbers"]["imported"] == "none of mlflow/datasets/opencc"
    assert "done: step 3" in (out / "smoke.log").read_text()
    table = (out / "table.txt").read_text()
    assert "step smoke" in table and "checks passed or skipped" in table


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
