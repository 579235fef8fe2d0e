"""Failures that used to lose work or mislead: a refused resume that damaged
a finished MLflow run, two processes in one run folder, a sweep resuming
another job's checkpoint, a resume with another LR logged under the old one,
a full disk reported by torch as RuntimeError, a second signal, a short
validation split, a bad corpus leaving empty MLflow runs, a rerun of a
finished run, night mode and fp16 divergence."""

import datetime as dt
import signal
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient
from test_failures import poison_gradient
from test_resume import (
    cli,
    configure,
    history,
    mlflow_runs,  # noqa: F401
    train_here,
    write_poems,
)

from lingmao.train import checkpoint, clock, engine
from lingmao.train.recovery import RunLock, job_differences


def run_info(store, name):
    _, runs = mlflow_runs(store, name)
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def test_a_refused_resume_leaves_the_finished_run_untouched(tmp_path, mlflow_db, shared_cache, monkeypatch):
    args = [
        "hardware=cpu",
        "model=tiny",
        "model.context_length=32",
        "hardware.batch=4",
        "trainer.max_steps=2",
        "trainer.progress=false",
        f"hydra.run.dir={tmp_path / 'run'}",
        "tracking.run_name=done",
    ]
    assert cli(args, tmp_path, monkeypatch) == 0
    before = run_info(mlflow_db, "done")
    assert cli(args + ["model.d_model=64"], tmp_path, monkeypatch) == 2  # another shape: refused
    after = run_info(mlflow_db, "done")
    assert after.info.status == "FINISHED" and after.data.tags == before.data.tags


def test_resume_auto_refuses_a_checkpoint_of_another_job_before_mlflow(
    tmp_path, mlflow_db, shared_cache, monkeypatch, capsys
):
    # A sweep whose jobs share an absolute checkpoint.dir: the second job must not "resume" the first.
    shared = tmp_path / "shared-checkpoints"
    args = [
        "hardware=cpu",
        "model=tiny",
        "model.context_length=32",
        "hardware.batch=4",
        "trainer.max_steps=2",
        "trainer.progress=false",
        f"checkpoint.dir={shared}",
    ]
    assert (
        cli(args + ["optim.lr=1e-3", "tracking.run_name=lr1", f"hydra.run.dir={tmp_path / 'a'}"], tmp_path, monkeypatch)
        == 0
    )
    capsys.readouterr()
    assert (
        cli(args + ["optim.lr=3e-3", "tracking.run_name=lr3", f"hydra.run.dir={tmp_path / 'b'}"], tmp_path, monkeypatch)
        == 2
    )
    err = capsys.readouterr().err
    assert (
        "resume=auto:" in err
        and "checkpoint of another job" in err
        and "optim.lr: checkpoint 0.001 vs now 0.003" in err
    )
    assert mlflow_runs(mlflow_db, "lr3")[1] == []  # no MLflow run was made for the refused job
    assert run_info(mlflow_db, "lr1").info.status == "FINISHED"


def test_job_differences_ignore_what_a_resume_may_change():
    a = {
        "seed": 1,
        "optim": {"lr": 1e-3},
        "trainer": {"max_steps": 10, "eval_every": 5},
        "hardware": {"batch": 4},
        "tracking": {"uri": "x"},
    }
    b = {
        "seed": 1,
        "optim": {"lr": 1e-3},
        "trainer": {"max_steps": 99, "eval_every": 7},
        "hardware": {"batch": 8},
        "tracking": {"uri": "y"},
    }
    assert job_differences(a, b) == []
    assert job_differences(a, {**b, "seed": 2, "optim": {"lr": 2e-3}}) == [
        "optim.lr: checkpoint 0.001 vs now 0.002",
        "seed: checkpoint 1 vs now 2",
    ]


def test_an_explicit_resume_with_another_lr_is_a_new_run_that_logs_it(tmp_path, mlflow_db, shared_cache):
    base = ["trainer.max_steps=2", "tracking.run_name=first", "optim.lr=3e-3"]
    train_here(tmp_path, tmp_path / "a", *base)
    last = tmp_path / "a" / "checkpoints" / "last.pt"
    train_here(
        tmp_path, tmp_path / "b", "trainer.max_steps=4", "optim.lr=1e-3", f"resume={last}", "tracking.run_name=second"
    )
    first, second = run_info(mlflow_db, "first"), run_info(mlflow_db, "second")
    assert first.info.run_id != second.info.run_id
    assert second.data.params["config.optim.lr"] == "0.001" and first.data.params["config.optim.lr"] == "0.003"
    assert second.data.tags["resumed_from"] == str(last)
    assert [s for s, _ in history(mlflow_db, "second")] == [3, 4]


def test_a_second_process_in_the_same_run_folder_is_refused(tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    held = RunLock(folder).acquire()
    code = f"from lingmao.train.recovery import RunLock; RunLock({str(folder)!r}).acquire()"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert other.returncode != 0 and f"{folder} is in use by process" in other.stderr
    assert f"process {__import__('os').getpid()} on " in other.stderr  # names the holder
    held.release()
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path):
    folder = tmp_path / "checkpoints"
    code = (
        f"from lingmao.train.recovery import RunLock; import time; lock = RunLock({str(folder)!r}).acquire(); "
        f"print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(checkpoint.ResumeError, match="is in use by process"):
        RunLock(folder).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    RunLock(folder).acquire().release()  # the dead process's lock is gone


def test_a_full_disk_reported_as_runtimeerror_is_a_checkpoint_write_error(tmp_path, shared_cache, monkeypatch):
    real, calls = torch.save, [0]

    def save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:  # what torch's zip writer raises when the disk fills up
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1024 vs 512")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(checkpoint.CheckpointWriteError, match="could not write checkpoint .*unexpected pos.*MiB free"):
        train_here(
            tmp_path, tmp_path / "run", "trainer.max_steps=4", "checkpoint.every_steps=2", "tracking.enabled=false"
        )
    assert checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")["progress"]["step"] == 2


def test_a_second_signal_stops_at_once_marked_killed_in_one_line(
    tmp_path, mlflow_db, shared_cache, monkeypatch, capsys
):
    from lingmao.train import recovery as checkpointer

    save = checkpointer.Checkpointer.save

    def save_then_second_signal(self, s, *args, **kwargs):
        path = save(self, s, *args, **kwargs)
        if s.step == 4:
            raise KeyboardInterrupt  # what signals.Stopper raises on a second SIGINT/SIGTERM
        return path

    monkeypatch.setattr(checkpointer.Checkpointer, "save", save_then_second_signal)
    rc = cli(
        [
            "hardware=cpu",
            "model=tiny",
            "model.context_length=32",
            "hardware.batch=4",
            "trainer.max_steps=50",
            "checkpoint.every_steps=2",
            "trainer.log_every=1",
            "trainer.progress=false",
            f"hydra.run.dir={tmp_path / 'run'}",
            "tracking.run_name=twice",
        ],
        tmp_path,
        monkeypatch,
    )
    err = capsys.readouterr().err
    assert rc == 130
    assert "stopped at once by a second signal; the last checkpoint is" in err and "Traceback" not in err
    assert run_info(mlflow_db, "twice").info.status == "KILLED"
    assert [s for s, _ in history(mlflow_db, "twice")][-1] >= 4


def test_a_short_validation_split_is_named(tmp_path, monkeypatch, capsys):
    corpus = write_poems(tmp_path / "poems.jsonl", n=60)
    monkeypatch.setenv("LINGMAO_CACHE", str(tmp_path / "cache"))
    assert (
        cli(
            [
                "hardware=cpu",
                "model=tiny",
                "model.context_length=256",
                "hardware.batch=1",
                "data=jsonl",
                f"data.paths=[{corpus}]",
                "data.val_fraction=0.01",
                "tracking.enabled=false",
            ],
            tmp_path,
            monkeypatch,
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "error: the validation split has " in err and "raise data.val_fraction" in err


def test_a_bad_corpus_makes_no_mlflow_run(tmp_path, mlflow_db, monkeypatch, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "a"}\n{"text": \n')
    monkeypatch.setenv("LINGMAO_CACHE", str(tmp_path / "cache"))
    for _ in range(2):
        assert (
            cli(
                ["hardware=cpu", "model=tiny", "data=jsonl", f"data.paths=[{bad}]", "tracking.run_name=bad"],
                tmp_path,
                monkeypatch,
            )
            == 2
        )
    exp = MlflowClient(f"sqlite:///{mlflow_db}").get_experiment_by_name("lingmao")
    assert exp is None or mlflow_runs(mlflow_db, "bad")[1] == []


def test_a_rerun_of_a_finished_run_adds_no_second_final_eval(tmp_path, mlflow_db, shared_cache, capsys):
    args = ["trainer.max_steps=2", "tracking.run_name=again", "trainer.eval_every=2"]
    train_here(tmp_path, tmp_path / "run", *args)
    final = train_here(tmp_path, tmp_path / "run", *args)
    assert [s for s, _ in history(mlflow_db, "again", "val/loss")] == [2]
    assert final["val/loss"] == history(mlflow_db, "again", "val/loss")[0][1]
    assert "night mode" not in capsys.readouterr().out
    assert (
        "night_mode"
        not in MlflowClient(f"sqlite:///{mlflow_db}").get_run(run_info(mlflow_db, "again").info.run_id).data.metrics
    )


def test_night_mode_started_at_night_applies_at_once(tmp_path, shared_cache, monkeypatch, capsys):
    monkeypatch.setattr(engine, "wall_clock", lambda: dt.datetime(2026, 1, 1, 23, 0))
    train_here(
        tmp_path,
        tmp_path / "run",
        "trainer.max_steps=2",
        "tracking.enabled=false",
        "night_mode=true",
        "hardware.threads=2",
    )
    assert torch.get_num_threads() == 1
    assert "night mode on at step 0: micro-batch 2, threads 1" in capsys.readouterr().out


def test_night_mode_splits_keep_the_moe_aux_loss_weight(tmp_path, shared_cache, monkeypatch):
    """At night a micro-batch of 4 runs as two pieces of 2: the same
    arithmetic as micro-batch 2 with twice the accumulation, MoE auxiliary
    loss included (it was added once per piece at full weight)."""
    moe = [
        "trainer.max_steps=3",
        "tracking.enabled=false",
        "model.dropout=0.0",
        "model.moe.experts=2",
        "model.moe.top_k=1",
        "model.moe.aux_loss_weight=1.0",
        "model.moe.capacity_factor=4.0",
    ]
    halves = train_here(tmp_path, tmp_path / "halves", *moe, "hardware.batch=2", "hardware.accumulation=4")
    monkeypatch.setattr(engine, "wall_clock", lambda: dt.datetime(2026, 1, 1, 23, 0))
    night = train_here(tmp_path, tmp_path / "night", *moe, "night_mode=true")  # batch 4, accumulation 2
    a = checkpoint.load(tmp_path / "halves" / "checkpoints" / "last.pt")["model"]
    b = checkpoint.load(tmp_path / "night" / "checkpoints" / "last.pt")["model"]
    assert night["train/loss"] == pytest.approx(halves["train/loss"], rel=1e-5)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_fp16_divergence_reaches_on_nan_instead_of_skipping_forever(tmp_path, shared_cache, monkeypatch):
    """With a GradScaler every overflowing step is skipped and the scale
    halves; gradients that stay non-finite must end in on_nan, not spin."""
    real = torch.amp.GradScaler.unscale_

    def overflowing(self, optimizer):  # every step's scaled gradients overflow, as in a diverged fp16 run
        next(p for g in optimizer.param_groups for p in g["params"]).grad.fill_(float("inf"))
        return real(self, optimizer)

    monkeypatch.setattr(torch.amp.GradScaler, "unscale_", overflowing)
    from lingmao.plan import make as plan_module

    real_plan = plan_module.make_plan

    def fp16_plan(*a, **k):  # a CPU stand-in for a T4: fp16 with a GradScaler
        p = real_plan(*a, **k)
        p.precision, p.grad_scaler = "fp32", True
        return p

    monkeypatch.setattr(plan_module, "make_plan", fp16_plan)
    from lingmao.train.nan_policy import NonFiniteError

    with pytest.raises(NonFiniteError, match="loss scale 0.5"):
        train_here(tmp_path, tmp_path / "run", "trainer.max_steps=40", "tracking.enabled=false")


def test_poisoned_step_still_reported_after_the_split(tmp_path, shared_cache, monkeypatch):
    poison_gradient(monkeypatch, 1)
    from lingmao.train.nan_policy import NonFiniteError

    with pytest.raises(NonFiniteError, match="grad of tok_emb.weight"):
        train_here(tmp_path, tmp_path / "run", "trainer.max_steps=3", "tracking.enabled=false")


def test_a_run_bounded_only_by_time_ends_at_the_lr_floor(tmp_path, shared_cache):
    from lingmao.plan import make as plan_module
    from lingmao.plan.machine import detect

    args = [
        "trainer.max_steps=null",
        "trainer.max_time=20",
        "optim.min_lr_ratio=0.1",
        "tracking.enabled=false",
        "trainer.eval_every=100000",
    ]
    final = train_here(tmp_path, tmp_path / "run", *args)
    peak = plan_module.make_plan(configure(*args), detect()).lr
    assert final["step"] > 5
    assert final["lr"] < 0.2 * peak  # cosine by time: near the floor (0.1 x peak) when the time is up
    state = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    # max_time is the run's wall: training stopped early enough for what the end needs,
    # and the cosine reached its floor there (not at 20 s of training)
    assert state["schedule"]["max_time"] == 20.0
    assert state["progress"]["seconds"] <= 20.0 - clock.END_SECONDS


def test_the_validation_split_is_fixed_by_data_split_seed_not_the_run_seed(tmp_path, shared_cache):
    from lingmao.data import load_corpus

    a, b = configure("seed=1"), configure("seed=2")
    assert load_corpus(a.data).dir == load_corpus(b.data).dir  # a seed sweep shares one val set
    other = load_corpus(configure("data.split_seed=7").data)
    assert other.dir != load_corpus(a.data).dir and other.meta["seed"] == 7
    # a checkpoint from before data.split_seed: its run seed chose the split
    state = {"config": {"seed": 42, "model": {}, "data": {"source": "poetry"}}, "tokenizer_hash": "h"}
    with pytest.raises(checkpoint.ResumeError, match="data.split_seed: checkpoint 42 vs config 1337"):
        checkpoint.check_compatible(
            state, {"seed": 42, "model": {}, "data": {"source": "poetry", "split_seed": 1337}}, "h", tmp_path / "old.pt"
        )
