"""Bad input, third round (issue 28): what a careful user still broke. Each
refusal is one line, exit 2, names the key or file and what is valid, comes
before any work and leaves nothing behind; what is accepted does what was typed."""

import os
from pathlib import Path

import pytest
from test_resume import _keep_torch_threads, cli, write_poems  # noqa: F401

from lingmao.config import ConfigError
from lingmao.plan.machine import Gpu, Machine
from lingmao.plan.make import runnable_plan

TINY = [
    "hardware=cpu",
    "model=tiny",
    "model.context_length=32",
    "hardware.batch=4",
    "hardware.accumulation=2",  # the cpu preset's effective batch 8: no warning beside the refusals
    "trainer.max_steps=1",
    "trainer.progress=false",
    "tracking.enabled=false",
]


def refused(argv, tmp_path, monkeypatch, capsys) -> str:
    """The one error line of a run that must be refused with exit 2."""
    monkeypatch.setenv("LINGMAO_CACHE", str(tmp_path / "cache"))
    rc = cli(argv, tmp_path, monkeypatch)
    err = capsys.readouterr().err
    assert (rc, err.count("\n"), err[:7]) == (2, 1, "error: "), err
    assert "Traceback" not in err
    return err


def no_work_done(tmp_path: Path) -> None:
    """Nothing prepared, nothing left behind: no corpus, no run folder."""
    assert not (tmp_path / "cache" / "prepared").exists()
    assert not (tmp_path / "outputs").exists()


# -- 1: more threads than cores ------------------------------------------------------


def test_more_threads_than_the_usable_cores_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    cores = len(os.sched_getaffinity(0))
    err = refused([*TINY, f"hardware.threads={cores * 500}"], tmp_path, monkeypatch, capsys)
    assert f"hardware.threads={cores * 500}" in err and f"{cores} core(s)" in err
    assert f"1..{cores}" in err and "0 for one per core" in err
    no_work_done(tmp_path)


# -- 3: a step longer than the whole budget ------------------------------------------


def test_a_step_estimated_longer_than_trainer_max_time_is_refused(tmp_path, monkeypatch, capsys):
    err = refused(
        [*TINY, "model.context_length=100000", "hardware.batch=1", "trainer.max_time=60"], tmp_path, monkeypatch, capsys
    )
    assert "one step is estimated at ~" in err and "longer than the whole budget, trainer.max_time=60" in err
    assert "model.context_length" in err and "hardware.batch" in err and "plan=true" in err
    no_work_done(tmp_path)


# -- 4: hardware.fallback keeps what was typed ---------------------------------------


def test_fallback_keeps_the_hardware_keys_the_user_typed_and_names_what_it_drops():
    from test_config import make

    cfg = make("hardware=rtx4090", "hardware.fallback=true", "hardware.precision=bf16", "hardware.batch=2")
    typed = ("hardware.fallback", "hardware.precision", "hardware.batch")
    plan = runnable_plan(cfg, Machine(cores=2, ram_gb=16.0), typed=typed)
    assert (plan.device, plan.precision, plan.micro_batch) == ("cpu", "bf16", 2)
    (warning,) = [w for w in plan.warnings if w.startswith("fallback:")]
    assert "kept as given: hardware.batch=2, hardware.precision=bf16" in warning
    cfg = make("hardware=rtx4090", "hardware.fallback=true", "hardware.memory_gb=48", "hardware.threads=1")
    plan = runnable_plan(cfg, Machine(cores=2, ram_gb=16.0), typed=("hardware.memory_gb", "hardware.threads"))
    (warning,) = [w for w in plan.warnings if w.startswith("fallback:")]
    assert plan.threads == 1 and plan.memory_gb == 16.0
    assert "dropped: hardware.memory_gb=48 (it describes the missing device)" in warning
    # Without a fallback the refusal is unchanged; with the device there, nothing falls back.
    with pytest.raises(ConfigError, match="needs 1 cuda device"):
        runnable_plan(make("hardware=rtx4090"), Machine(cores=2, ram_gb=16.0))
    gpu = Machine(cores=2, ram_gb=16.0, gpus=(Gpu("RTX 4090", 24.0, 8.9),))
    assert runnable_plan(cfg, gpu, typed=("hardware.memory_gb",)).device == "cuda"


def test_fallback_through_the_cli_trains_at_the_typed_precision_and_batch(tmp_path, shared_cache, monkeypatch, capsys):
    args = [
        "hardware=rtx4090",
        "hardware.fallback=true",
        "hardware.precision=bf16",
        "hardware.batch=2",
        "hardware.accumulation=1",
        "hardware.compile=false",
        "model=tiny",
        "model.context_length=32",
        "trainer.max_steps=1",
        "trainer.progress=false",
        "tracking.enabled=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    assert cli(args, tmp_path, monkeypatch) == 0
    out = capsys.readouterr().out
    assert ", bf16 (asked for bf16)" in out and "batch 2 x accumulation 1" in out


# -- 6: a corpus of one document ------------------------------------------------------


def test_a_jsonl_of_one_document_names_the_file_the_count_and_the_fix(tmp_path, monkeypatch, capsys):
    one = tmp_path / "one.jsonl"
    one.write_text('{"text": "床前明月光，疑是地上霜。举头望明月，低头思故乡。"}\n', encoding="utf-8")
    err = refused([*TINY, "data=jsonl", f"data.paths=[{one}]"], tmp_path, monkeypatch, capsys)
    assert f"data.paths={one} has 1 document" in err and "split the text into several lines" in err
    assert "{'source'" not in err and "'files'" not in err


def test_preparing_a_corpus_says_where_from_in_words(tmp_path, capsys):
    from lingmao.data.corpus import jsonl_records
    from lingmao.data.prepare import prepare

    corpus = write_poems(tmp_path / "poems.jsonl")
    key = {"source": "jsonl", "text_field": "text", "on_bad_record": "error", "files": [[str(corpus), 1, 2]]}
    prepare(jsonl_records([corpus]), tmp_path / "cache", key, progress=True)
    out = capsys.readouterr().out
    assert f"preparing corpus from data.paths={corpus} (first run only) -> " in out
    assert "{'source'" not in out


# -- 7: two runs in the same second ----------------------------------------------------


def test_two_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path, shared_cache, monkeypatch, capsys):
    import datetime

    import hydra.core.utils

    class Frozen(datetime.datetime):  # every run starts at the same second
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 1, 12, 0, 0)

    monkeypatch.setattr(hydra.core.utils, "datetime", Frozen)
    args = TINY
    assert cli([*args, "seed=1"], tmp_path, monkeypatch) == 0
    assert cli([*args, "seed=2"], tmp_path, monkeypatch) == 0
    day = tmp_path / "outputs" / "2026-01-01"
    assert sorted(p.name for p in day.iterdir()) == ["12-00-00", "12-00-00-2"]
    first, second = ((day / name / "run.log").read_text() for name in ("12-00-00", "12-00-00-2"))
    assert first.count("lingmao |") == 1 and second.count("lingmao |") == 1
    assert (day / "12-00-00" / ".hydra" / "overrides.yaml").read_text().count("seed=1") == 1


def test_the_run_folder_claim_is_atomic_and_stable(tmp_path, monkeypatch):
    from lingmao.run import claim_folder

    monkeypatch.chdir(tmp_path)
    assert claim_folder("outputs/d/t") == "outputs/d/t"
    assert claim_folder("outputs/d/t") == "outputs/d/t-2"
    assert claim_folder("outputs/d/t") == "outputs/d/t-3"
    monkeypatch.setenv("RANK", "1")  # torchrun's processes share the folder their launcher named
    assert claim_folder("outputs/d/t") == "outputs/d/t"


# -- 10: nothing left behind by a refusal -----------------------------------------------


def test_a_refused_run_leaves_no_run_folder_but_keeps_an_existing_one(tmp_path, monkeypatch, capsys):
    refused([*TINY, "optim.lr=1e400"], tmp_path, monkeypatch, capsys)
    no_work_done(tmp_path)
    (tmp_path / "outputs" / "old").mkdir(parents=True)  # another run's day folder stays
    refused([*TINY, "optim.lr=-1"], tmp_path, monkeypatch, capsys)
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == ["old"]
    kept = tmp_path / "mine"
    (kept / "checkpoints").mkdir(parents=True)
    (kept / "notes.txt").write_text("mine")
    refused([*TINY, "optim.lr=-1", f"hydra.run.dir={kept}"], tmp_path, monkeypatch, capsys)
    assert (kept / "notes.txt").read_text() == "mine" and (kept / "checkpoints").is_dir()


def test_a_refused_corpus_preparation_leaves_no_partial_folder_nor_lock(tmp_path, monkeypatch, capsys):
    one = tmp_path / "one.jsonl"
    one.write_text('{"text": "春眠不觉晓"}\n', encoding="utf-8")
    refused([*TINY, "data=jsonl", f"data.paths=[{one}]"], tmp_path, monkeypatch, capsys)
    assert list((tmp_path / "cache" / "prepared").iterdir()) == []


def test_the_banner_says_how_long_a_step_takes(tmp_path):
    from types import SimpleNamespace

    from test_resume import configure

    from lingmao.plan.machine import detect
    from lingmao.plan.make import make_plan
    from lingmao.train.console import banner

    cfg = configure("trainer.max_steps=10")
    plan = make_plan(cfg, detect())
    job = SimpleNamespace(schedule=SimpleNamespace(total_steps=10), found=None)
    text = banner(cfg, plan, job, tmp_path, "off")
    assert f"tokens per step, ~{plan.est_step_seconds:.3g} s per step (plan estimate, assumed 40% MFU)" in text


def test_the_banner_points_at_a_servers_own_page():
    from lingmao.run import where_to_look

    assert where_to_look("http://mlflow.example:5000") == (
        "http://mlflow.example:5000 (open http://mlflow.example:5000; the run's link follows once it is open)"
    )
    assert "mlflow ui --backend-store-uri sqlite:////x/mlflow.db" in where_to_look("sqlite:////x/mlflow.db")


def test_an_experiment_name_with_path_parts_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    err = refused([*TINY, "tracking.experiment_name=.."], tmp_path, monkeypatch, capsys)
    assert "tracking.experiment_name='..' must be non-empty text on one line without path parts" in err
    no_work_done(tmp_path)
