"""Runs that meet trouble: a non-finite loss or gradient (trainer.on_nan
stop | skip | rollback), a full disk during a checkpoint, bad input and bad
settings. Each ends in one clear error, or gets past it, and loses nothing
already done."""

import errno
import gzip
import math

import pytest
import torch
from test_resume import _keep_torch_threads, cli, configure, history, mlflow_runs, train_here, write_poems  # noqa: F401

from lingmao.plan.machine import detect
from lingmao.plan.make import make_plan
from lingmao.train import checkpoint
from lingmao.train.nan_policy import NonFiniteError
from lingmao.train.optim import Schedule


def poison_gradient(monkeypatch, attempt: int) -> None:
    """Make the first gradient (tok_emb.weight's) NaN in the `attempt`-th
    optimizer step the engine tries, once."""
    real, calls = torch.nn.utils.get_total_norm, [0]

    def get_total_norm(tensors, *args, **kwargs):
        tensors = list(tensors)
        calls[0] += 1
        if calls[0] == attempt:
            tensors[0].fill_(math.nan)
        return real(tensors, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "get_total_norm", get_total_norm)


def test_nan_stop_reports_step_lr_group_and_advice_and_keeps_the_last_checkpoint(
    tmp_path, mlflow_db, shared_cache, monkeypatch
):
    poison_gradient(monkeypatch, 3)
    with pytest.raises(NonFiniteError) as e:
        train_here(
            tmp_path, tmp_path / "run", "trainer.max_steps=8", "checkpoint.every_steps=2", "tracking.run_name=nan"
        )
    msg = str(e.value)
    assert msg.startswith("step 3: non-finite gradient norm (loss ")
    assert "lr " in msg and "loss scale 1 (no GradScaler)" in msg
    assert "param group 1 (weight_decay 0): grad of tok_emb.weight" in msg and "group 0" not in msg
    folder = tmp_path / "run" / "checkpoints"
    assert (
        f"trainer.on_nan=stop: stopped before this step changed the weights; the last checkpoint, "
        f"{folder / 'step00000002.pt'}, holds step 2" in msg
    )
    assert "lower optim.lr, lower hardware.batch, raise hardware.accumulation" in msg
    assert "hardware.precision=fp32" in msg
    state = checkpoint.load(folder / "last.pt")
    assert state["progress"]["step"] == 2 and all(torch.isfinite(t).all() for t in state["model"].values())
    _, runs = mlflow_runs(mlflow_db, "nan")
    assert runs[0].info.status == "FAILED"
    assert [s for s, _ in history(mlflow_db, "nan")] == [1, 2]


def test_a_run_that_must_stop_ends_in_one_error_line_through_the_cli(tmp_path, shared_cache, monkeypatch, capsys):
    poison_gradient(monkeypatch, 3)
    rc = cli(
        [
            "hardware=cpu",
            "model=tiny",
            "model.context_length=32",
            "hardware.batch=4",
            "trainer.max_steps=6",
            "trainer.progress=false",
            "tracking.enabled=false",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
        monkeypatch,
    )
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert "error: step 3: non-finite gradient norm" in err and "trainer.on_nan=stop" in err


def test_nan_skip_drops_the_step_and_goes_on(tmp_path, shared_cache, monkeypatch, capsys):
    poison_gradient(monkeypatch, 3)
    final = train_here(
        tmp_path, tmp_path / "run", "trainer.max_steps=6", "trainer.on_nan=skip", "tracking.enabled=false"
    )
    assert final["status"] == "FINISHED" and final["step"] == 6
    assert final["train/skipped_steps"] == 1 and math.isfinite(final["train/loss"])
    assert "step 3: non-finite gradient norm" in capsys.readouterr().err


def test_nan_skip_gives_up_when_every_step_is_non_finite(tmp_path, shared_cache):
    with pytest.raises(NonFiniteError, match="on_nan=skip: gave up after 10 non-finite steps in a row"):
        train_here(
            tmp_path,
            tmp_path / "run",
            "trainer.max_steps=30",
            "trainer.on_nan=skip",
            "optim.lr=1e30",
            "tracking.enabled=false",
        )


def test_nan_rollback_reloads_the_last_checkpoint_with_a_lower_lr(tmp_path, shared_cache, monkeypatch, capsys):
    poison_gradient(monkeypatch, 5)
    args = [
        "trainer.max_steps=6",
        "checkpoint.every_steps=2",
        "trainer.on_nan=rollback",
        "trainer.nan_lr_factor=0.25",
        "tracking.enabled=false",
    ]
    final = train_here(tmp_path, tmp_path / "run", *args)
    assert final["status"] == "FINISHED" and final["step"] == 6
    assert "on_nan=rollback: back to step 4" in capsys.readouterr().err
    plan = make_plan(configure(*args), detect())
    assert final["lr"] == pytest.approx(0.25 * Schedule.for_run(plan.lr, 0.1, 6, 0.1).lr(5))
    assert checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")["progress"]["lr_scale"] == 0.25

    poison_gradient(monkeypatch, 1)  # before any checkpoint
    with pytest.raises(NonFiniteError, match="on_nan=rollback: nothing to roll back to; no checkpoint"):
        train_here(tmp_path, tmp_path / "fresh", *args)


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, mlflow_db, shared_cache, monkeypatch):
    real, calls = torch.save, [0]

    def save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            f.write(b"the first bytes of a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(checkpoint.CheckpointWriteError) as e:
        train_here(
            tmp_path, tmp_path / "run", "trainer.max_steps=8", "checkpoint.every_steps=2", "tracking.run_name=disk"
        )
    folder = tmp_path / "run" / "checkpoints"
    assert str(e.value).startswith(
        f"could not write checkpoint {folder / 'step00000004.pt'}: No space left on device."
        f" Nothing partial was left behind and the previous checkpoint "
        f"{folder / 'last.pt'} is intact"
    )
    assert sorted(f.name for f in folder.iterdir()) == ["best.pt", "last.pt", "step00000002.pt"]
    assert checkpoint.load(folder / "last.pt")["progress"]["step"] == 2
    _, runs = mlflow_runs(mlflow_db, "disk")
    assert runs[0].info.status == "FAILED"
    assert [s for s, _ in history(mlflow_db, "disk")] == [1, 2, 3, 4]  # flushed before the failed save


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", b'{"text": "a"}\n{"text": \n', "bad.jsonl:2: malformed JSON"),
        ("empty.jsonl", b"", "empty.jsonl: file is empty"),
        ("notext.jsonl", b'{"body": "a"}\n', "notext.jsonl:1: text field 'text' is missing; keys are ['body']"),
        ("latin1.jsonl", '{"text": "café"}\n'.encode("latin-1"), "latin1.jsonl:1: not UTF-8"),
        ("cut.jsonl.gz", gzip.compress(b'{"text": "a"}\n' * 100)[:30], "cut.jsonl.gz: truncated or corrupt gzip file"),
        (
            "small.jsonl",
            b'{"text": "a"}\n{"text": "b"}\n',
            "the training split has 2 tokens; context length 32 needs at least 33",
        ),
        (
            "few.jsonl",
            "".join(f'{{"text": "{c * 60}"}}\n' for c in "春夏").encode(),
            "fewer than one effective batch (8); lower hardware.batch / hardware.accumulation or add data",
        ),
    ],
)
def test_bad_input_is_one_error_line_with_exit_2(tmp_path, monkeypatch, capsys, name, content, message):
    (tmp_path / name).write_bytes(content)
    monkeypatch.setenv("LINGMAO_CACHE", str(tmp_path / "cache"))
    rc = cli(
        [
            "hardware=cpu",
            "model=tiny",
            "model.context_length=32",
            "data=jsonl",
            f"data.paths=[{tmp_path / name}]",
            "trainer.progress=false",
            "tracking.enabled=false",
        ],
        tmp_path,
        monkeypatch,
    )
    err = capsys.readouterr().err
    assert (rc, err.count("\n")) == (2, 1), err
    assert err.startswith("error: ") and message in err


def test_bad_record_skip_reports_the_count(tmp_path, monkeypatch, capsys):
    corpus = write_poems(tmp_path / "poems.jsonl")
    with open(corpus, "a") as f:
        f.write('{"text": \n{"txt": "x"}\n')
    monkeypatch.setenv("LINGMAO_CACHE", str(tmp_path / "cache"))
    train_here(
        tmp_path,
        tmp_path / "run",
        "data=jsonl",
        f"data.paths=[{corpus}]",
        "data.on_bad_record=skip",
        "data.val_fraction=0.1",
        "trainer.max_steps=1",
        "tracking.enabled=false",
    )
    assert "warning: the corpus skipped 2 empty or bad record(s) (data.on_bad_record=skip)" in capsys.readouterr().err


def test_bad_data_on_resume_leaves_the_checkpoint_alone(tmp_path, monkeypatch, capsys):
    corpus = write_poems(tmp_path / "poems.jsonl")
    monkeypatch.setenv("LINGMAO_CACHE", str(tmp_path / "cache"))
    args = [
        "hardware=cpu",
        "hardware.threads=1",
        "model=tiny",
        "model.context_length=32",
        "trainer.max_steps=2",
        "trainer.progress=false",
        "data=jsonl",
        f"data.paths=[{corpus}]",
        "data.val_fraction=0.1",
        "tracking.enabled=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    assert cli(args, tmp_path, monkeypatch) == 0
    saved = tmp_path / "run" / "checkpoints" / "last.pt"
    before = saved.read_bytes()
    with open(corpus, "a") as f:
        f.write("not json\n")
    capsys.readouterr()
    assert cli(args + ["trainer.max_steps=4"], tmp_path, monkeypatch) == 2
    assert "poems.jsonl:201: malformed JSON" in capsys.readouterr().err
    assert saved.read_bytes() == before


@pytest.mark.parametrize(
    "override, rc, message",
    [
        ("model=huge", 2, "error: model=huge: Could not find 'model/huge'; choose one of: large, medium, small, tiny"),
        ("trainer.bogus=1", 2, "error: trainer.bogus: no such key; valid keys of trainer: max_steps"),
        ("+trainer.bogus=1", 2, "error: unknown key(s): trainer.bogus"),
        ("hardware.batch=0", 2, "error: hardware.batch=0 must be a positive integer or 'auto'"),
        ("hardware.batch=-4", 2, "error: hardware.batch=-4 must be a positive integer or 'auto'"),
        ("optim.lr=-1", 2, "error: optim.lr=-1.0 must be > 0"),
        ("trainer.max_steps=0", 2, "error: trainer.max_steps=0 must be > 0"),
        ("data.stride=0", 2, "error: data.stride=0 must be in 1..model.context_length (32)"),
        ("data.stride=33", 2, "error: data.stride=33 must be in 1..model.context_length (32)"),
        (
            "trainer.on_nan=explode",
            2,
            "error: trainer.on_nan='explode' is not valid; choose one of: stop, skip, rollback",
        ),
        ("checkpoint.every_minutes=0", 2, "error: checkpoint.every_minutes=0.0 must be > 0"),
    ],
)
def test_bad_settings_are_named_through_the_cli(tmp_path, shared_cache, monkeypatch, capsys, override, rc, message):
    assert (
        cli(
            ["hardware=cpu", "model=tiny", "model.context_length=32", "tracking.enabled=false", override],
            tmp_path,
            monkeypatch,
        )
        == rc
    )
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
