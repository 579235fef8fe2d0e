"""Checkpoints and resume: what a checkpoint holds, which ones are kept,
resume=auto past an unreadable file, a bit-exact continuation after SIGKILL,
SIGTERM, early stopping, and the refusal of a checkpoint that does not fit."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import LINES, _write_jsonl
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from lingmao import run
from lingmao.config.compose import CONF_DIR
from lingmao.data.tokenizer import load_tokenizer, tokenizer_hash
from lingmao.train import checkpoint, validation
from lingmao.train import recovery as checkpointer
from lingmao.train.signals import Stopper

COMMON = [
    "hardware=cpu",
    "hardware.precision=fp32",
    "hardware.threads=1",
    "hardware.batch=4",
    "hardware.accumulation=2",
    "model=tiny",
    "model.context_length=32",
    "model.dropout=0.1",  # dropout draws from torch's RNG: an exact resume must restore it
    "optim.lr=3e-3",
    "trainer.log_every=1",
    "trainer.eval_every=4",
    "trainer.eval_batches=2",
    "trainer.sample_tokens=4",
    "trainer.progress=false",
]


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """In-process runs set torch's thread count from the plan; give it back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def configure(*overrides):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[*COMMON, *overrides])


def train_here(tmp_path: Path, run_dir: Path, *overrides) -> dict:
    """One run in this process: run.execute validates, plans, opens the tracker, trains."""
    return run.execute(configure(*overrides), tmp_path, run_dir)


def cli(argv: list[str], tmp_path: Path, monkeypatch) -> int:
    """`python -m lingmao.run ARGV` in this process; its exit code (Hydra
    changes into the run directory, so come back)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lingmao", *argv])
    try:
        run.main()
        return 0
    except SystemExit as e:
        return e.code
    finally:
        os.chdir(tmp_path)


def cli_env(cache: Path, **extra) -> dict:
    return {**os.environ, "LINGMAO_CACHE": str(cache), "PYTHONPATH": str(Path(__file__).parents[1]), **extra}


# The CLI in a process that SIGKILLs itself right after writing the checkpoint of step {step}.
KILLED_AFTER_CHECKPOINT = """
import os, signal, sys
from lingmao import run
from lingmao.train import recovery as checkpointer
save = checkpointer.Checkpointer.save
def save_then_die(self, s, *args, **kwargs):
    path = save(self, s, *args, **kwargs)
    if s.step == {step}:
        os.kill(os.getpid(), signal.SIGKILL)
    return path
checkpointer.Checkpointer.save = save_then_die
run.main()
"""


def start_cli(argv: list[str], tmp_path: Path, env: dict, name: str, kill_after: int | None = None) -> subprocess.Popen:
    """The CLI in a real process; output to files (a full pipe would block it)."""
    out, err = open(tmp_path / f"{name}.out", "w"), open(tmp_path / f"{name}.err", "w")
    program = ["-m", "lingmao.run"] if kill_after is None else ["-c", KILLED_AFTER_CHECKPOINT.format(step=kill_after)]
    return subprocess.Popen([sys.executable, *program, *argv], cwd=tmp_path, env=env, stdout=out, stderr=err)


def finish(proc: subprocess.Popen, tmp_path: Path, name: str) -> tuple[int, str, str]:
    rc = proc.wait(timeout=300)
    return rc, (tmp_path / f"{name}.out").read_text(), (tmp_path / f"{name}.err").read_text()


def mlflow_runs(store: Path, name: str):
    client = MlflowClient(f"sqlite:///{store}")
    exp = client.get_experiment_by_name("lingmao")
    return client, client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'")


def optimizer_tensors(state, path: str = "") -> dict:
    """Every tensor of an optimizer's state_dict by its path: AdamW's, or Muon + AdamW's nested pair."""
    if isinstance(state, torch.Tensor):
        return {path: state}
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, list) else ()
    return {k: v for key, value in items for k, v in optimizer_tensors(value, f"{path}/{key}").items()}


def history(store: Path, name: str, key: str = "train/loss") -> list[tuple[int, float]]:
    """(step, value) of `key` over every run called `name`, by step."""
    client, runs = mlflow_runs(store, name)
    return sorted((m.step, m.value) for r in runs for m in client.get_metric_history(r.info.run_id, key))


def write_poems(path: Path, n: int = 200, extra: str = "") -> Path:
    """Quatrains of real lines: distinct enough that deduplication keeps most."""
    rng = random.Random(0)
    return _write_jsonl(path, [{"text": "，".join(rng.sample(LINES, 4)) + "。" + extra} for _ in range(n)])


def scripted_val_losses(monkeypatch, values: list[float]) -> None:
    """The val loss of each eval, one per call, in order."""
    it = iter(values)
    monkeypatch.setattr(validation, "evaluate", lambda *a, **k: next(it))


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_resume_is_bit_exact(tmp_path, mlflow_db, shared_cache):
    args = [*COMMON, "trainer.max_steps=8", "checkpoint.every_steps=2", "hydra.run.dir=cut", "tracking.run_name=cut"]
    rc, _, err = finish(start_cli(args, tmp_path, cli_env(shared_cache), "cut", kill_after=4), tmp_path, "cut")
    assert rc == -signal.SIGKILL, err[-2000:]
    folder = tmp_path / "cut" / "checkpoints"
    assert checkpoint.load(folder / "last.pt")["progress"]["step"] == 4
    _, killed = mlflow_runs(mlflow_db, "cut")
    # The checkpoint waited for the tracker: every metric before it reached the store.
    assert [s for s, _ in history(mlflow_db, "cut")] == [1, 2, 3, 4]
    assert [s for s, _ in history(mlflow_db, "cut", "val/loss")] == [2, 4]  # each checkpoint brings an eval
    # run.py reopens this run on resume: the checkpoint names it
    assert checkpoint.find_resume("auto", checkpoint.Folder(folder, 1))[1]["mlflow_run_id"] == killed[0].info.run_id

    rc, out, err = finish(start_cli(args, tmp_path, cli_env(shared_cache), "resumed"), tmp_path, "resumed")
    assert rc == 0, err[-2000:]
    assert f"resuming from {folder / 'step00000004.pt'} at step 4" in out
    _, runs = mlflow_runs(mlflow_db, "cut")
    assert [r.info.run_id for r in runs] == [killed[0].info.run_id]  # the resumed process logged into it
    assert runs[0].info.status == "FINISHED"

    # The uninterrupted run, in this process (same plan, one thread: the same arithmetic).
    train_here(tmp_path, tmp_path / "full", *args[:-2], "tracking.run_name=full")
    reference = history(mlflow_db, "full")
    assert [s for s, _ in reference] == list(range(1, 9))
    # From step 5 on, each step once and the very same floats.
    assert [(s, v) for s, v in history(mlflow_db, "cut") if s > 4] == reference[4:]
    assert history(mlflow_db, "cut", "val/loss")[-1] == history(mlflow_db, "full", "val/loss")[-1]
    a, b = checkpoint.load(tmp_path / "full" / "checkpoints" / "last.pt"), checkpoint.load(folder / "last.pt")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    moments_a, moments_b = optimizer_tensors(a["optimizer"]), optimizer_tensors(b["optimizer"])
    assert moments_a.keys() == moments_b.keys() and any("momentum_buffer" in k for k in moments_a)  # Muon's too
    assert all(torch.equal(moments_a[k], moments_b[k]) for k in moments_a)


@pytest.mark.slow
def test_sigterm_finishes_the_step_checkpoints_and_marks_the_run_killed(tmp_path, mlflow_db, shared_cache):
    proc = start_cli(
        [
            *COMMON,
            "trainer.max_steps=100000",
            "checkpoint.every_steps=3",
            "hydra.run.dir=run",
            "tracking.run_name=term",
        ],
        tmp_path,
        cli_env(shared_cache),
        "term",
    )
    folder = tmp_path / "run" / "checkpoints"
    deadline = time.monotonic() + 240
    while not list(folder.glob("step*.pt")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    rc, out, err = finish(proc, tmp_path, "term")
    assert rc == 130, err[-2000:]
    assert "SIGTERM: stopping after this step" in err
    state = checkpoint.load(folder / "last.pt")
    step = state["progress"]["step"]
    assert step >= 3 and (folder / f"step{step:08d}.pt").samefile(folder / "last.pt")
    assert f"stopped: step {step}" in out
    client, runs = mlflow_runs(mlflow_db, "term")
    assert runs[0].info.status == "KILLED"
    assert history(mlflow_db, "term")[-1][0] == step  # every step's metrics reached the store


def test_second_signal_stops_at_once():
    with Stopper() as stopper:
        signal.raise_signal(signal.SIGINT)
        assert stopper.requested
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)
            time.sleep(0.01)  # the handler runs at the next bytecode boundary
    assert signal.getsignal(signal.SIGTERM) is not stopper._handle


def test_checkpoints_hold_the_whole_state_and_keep_the_last_and_the_best(
    tmp_path, mlflow_db, shared_cache, monkeypatch
):
    # val/loss at the checkpoints of steps 2, 4, 6: the best one is the oldest, and pruned
    scripted_val_losses(monkeypatch, [1.0, 2.0, 3.0])
    train_here(
        tmp_path,
        tmp_path / "run",
        "trainer.max_steps=6",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=2",
        "tracking.run_name=contents",
    )
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(f.name for f in folder.iterdir()) == ["best.pt", "last.pt", "step00000004.pt", "step00000006.pt"]
    assert (folder / "last.pt").samefile(folder / "step00000006.pt")
    best = torch.load(folder / "best.pt", weights_only=True)
    assert (best["progress"]["step"], best["val_loss"]) == (2, 1.0)

    state = torch.load(folder / "last.pt", weights_only=True)  # nothing in it needs more than weights_only
    assert state["format"] == checkpoint.FORMAT and state["val_loss"] == 3.0
    assert not [k for k in state["model"] if k.startswith(("_orig_mod.", "module."))]
    assert "tok_emb.weight" in state["model"] and optimizer_tensors(state["optimizer"])
    assert state["progress"]["step"] == 6 and state["progress"]["lr_scale"] == 1.0
    assert (state["progress"]["epoch"], state["progress"]["epoch_windows"]) == (0, 6 * 2 * 4)  # steps x accum x batch
    assert state["schedule"]["total_steps"] == 6 and state["schedule"]["peak_lr"] > 0
    assert state["scaler"] == {}  # fp32: no GradScaler
    assert set(state["rng"]) == {"python", "numpy", "torch"} and state["rng"]["torch"].dtype == torch.uint8
    assert state["config"]["model"]["context_length"] == 32 and state["plan"]["precision"] == "fp32"
    prepared = next((shared_cache / "prepared").glob("*/tokenizer.json"))  # the corpus trained on
    assert state["tokenizer_hash"] == tokenizer_hash(load_tokenizer(prepared))
    assert state["tokenizer"] == load_tokenizer(prepared).to_str()
    _, runs = mlflow_runs(mlflow_db, "contents")
    assert state["mlflow_run_id"] == runs[0].info.run_id


def test_every_minutes_checkpoints_each_carry_an_eval(tmp_path, shared_cache, monkeypatch):
    now = iter(range(0, 10**6, 61))  # every reading of the clock is 61 s after the last
    monkeypatch.setattr(checkpointer, "clock", lambda: next(now))
    train_here(
        tmp_path,
        tmp_path / "run",
        "trainer.max_steps=4",
        "checkpoint.every_minutes=1",
        "checkpoint.keep_last=9",
        "tracking.enabled=false",
    )
    files = sorted((tmp_path / "run" / "checkpoints").glob("step*.pt"))
    assert [f.name for f in files] == [f"step{s:08d}.pt" for s in (1, 2, 3, 4)]
    assert all(checkpoint.load(f)["val_loss"] is not None for f in files)


def test_resume_auto_skips_an_unreadable_checkpoint(tmp_path, capsys):
    folder = checkpoint.Folder(tmp_path, keep_last=5)
    folder.write({"format": checkpoint.FORMAT, "mlflow_run_id": "r2"}, 2, best=False)
    newest = folder.write({"format": checkpoint.FORMAT, "mlflow_run_id": "r4"}, 4, best=False)
    newest.write_bytes(newest.read_bytes()[:200])  # truncated, as by a disk gone bad or a partial copy
    (tmp_path / ".step00000006.pt.tmp999").write_bytes(b"half a save")  # left by a process killed mid-save
    path, state = checkpoint.find_resume("auto", folder)
    assert path.name == "step00000002.pt" and state["mlflow_run_id"] == "r2"
    assert "resume=auto skips" in capsys.readouterr().err
    assert checkpoint.find_resume("never", folder) is None
    with pytest.raises(checkpoint.ResumeError, match="resume=.*nope.pt: no such file; valid values are auto, never"):
        checkpoint.find_resume(str(tmp_path / "nope.pt"), folder)
    with pytest.raises(checkpoint.ResumeError, match="step00000004.pt: not a readable checkpoint"):
        checkpoint.find_resume(str(newest), folder)
    checkpoint.Folder(tmp_path, keep_last=5).write({"format": checkpoint.FORMAT}, 8, best=False)
    assert not list(tmp_path.glob(".*tmp*"))  # the next process's first save sweeps stale temp files


def test_early_stop_after_patience_evals_without_improvement(tmp_path, shared_cache, monkeypatch, capsys):
    scripted_val_losses(monkeypatch, [3.0, 2.0, 2.5, 2.0, 9.0, 9.0])
    final = train_here(
        tmp_path,
        tmp_path / "run",
        "trainer.max_steps=50",
        "trainer.eval_every=1",
        "trainer.early_stop_patience=2",
        "tracking.enabled=false",
    )
    assert final["status"] == "FINISHED" and final["step"] == 4
    assert "early stop: val/loss has not improved on 2.0000 for 2 evals" in capsys.readouterr().out
    progress = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")["progress"]
    assert (progress["best_val"], progress["evals_since_best"]) == (2.0, 2)


def without_warnings(err: str) -> str:
    """stderr less the plan's warning lines (COMMON's small batch is not the preset's target)."""
    return "".join(line for line in err.splitlines(keepends=True) if not line.startswith("warning:"))


def test_resume_refuses_a_checkpoint_of_another_shape_or_tokenizer(tmp_path, shared_cache, monkeypatch, capsys):
    corpus = write_poems(tmp_path / "poems.jsonl")
    args = [
        *COMMON,
        "data=jsonl",
        f"data.paths=[{corpus}]",
        "data.val_fraction=0.1",
        "trainer.max_steps=2",
        "tracking.enabled=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    assert cli(args, tmp_path, monkeypatch) == 0
    saved = tmp_path / "run" / "checkpoints" / "last.pt"
    before = saved.read_bytes()
    capsys.readouterr()

    assert cli(args + ["model.d_model=64", "model.context_length=64"], tmp_path, monkeypatch) == 2
    err = without_warnings(capsys.readouterr().err)
    assert err.startswith(f"error: cannot resume from {tmp_path / 'run' / 'checkpoints' / 'step00000002.pt'}")
    assert "model.context_length: checkpoint 32 vs config 64" in err
    assert "model.d_model: checkpoint 128 vs config 64" in err
    assert "resume=never" in err and "Traceback" not in err

    write_poems(corpus, extra="龘")  # the same file name, another vocabulary
    assert cli(args, tmp_path, monkeypatch) == 2
    err = without_warnings(capsys.readouterr().err)
    assert "tokenizer (sha256): checkpoint" in err and "model." not in err

    assert cli(args + [f"resume={tmp_path / 'gone.pt'}"], tmp_path, monkeypatch) == 2
    assert "gone.pt: no such file" in without_warnings(capsys.readouterr().err)
    assert saved.read_bytes() == before  # a refused resume leaves the checkpoint alone


def test_keep_last_never_deletes_the_last_readable_checkpoint_for_an_unreadable_one(tmp_path, capsys):
    folder = checkpoint.Folder(tmp_path, keep_last=2)
    folder.write({"format": checkpoint.FORMAT, "progress": {"step": 3}}, 3, best=False)
    corrupt = folder.write({"format": checkpoint.FORMAT, "progress": {"step": 6}}, 6, best=False)
    corrupt.write_bytes(corrupt.read_bytes()[:100])
    path, _ = checkpoint.find_resume("auto", folder)  # past the corrupt newest one, as a resumed run does
    assert path.name == "step00000003.pt" and "skips" in capsys.readouterr().err
    folder.write({"format": checkpoint.FORMAT, "progress": {"step": 4}}, 4, best=False)  # the resumed run's first save
    kept = {p.name for p in tmp_path.glob("step*.pt")}
    assert {"step00000004.pt", "step00000003.pt"} <= kept  # keep_last=2 readable ones
    folder.write({"format": checkpoint.FORMAT, "progress": {"step": 5}}, 5, best=False)
    assert {p.name for p in tmp_path.glob("step*.pt")} >= {"step00000005.pt", "step00000004.pt"}
    assert not (tmp_path / "step00000003.pt").exists()  # the older readable one goes in its turn


def test_a_fresh_folder_object_also_leaves_an_unreadable_file_out_of_keep_last(tmp_path):
    """The process that writes need not be the one that found the file unreadable."""
    first = checkpoint.Folder(tmp_path, keep_last=2)
    good = first.write({"format": checkpoint.FORMAT}, 3, best=False)
    corrupt = first.write({"format": checkpoint.FORMAT}, 6, best=False)
    corrupt.write_bytes(b"not a checkpoint")
    checkpoint.Folder(tmp_path, keep_last=2).write({"format": checkpoint.FORMAT}, 4, best=False)
    assert good.exists() and (tmp_path / "step00000004.pt").exists()
    assert checkpoint.find_resume("auto", checkpoint.Folder(tmp_path, 2))[0].name == "step00000004.pt"


def _long_step(stopper, seconds: float) -> None:
    """A training step in Python (signals are handled between bytecodes, as between torch ops)."""
    with stopper.step():
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(0.01)


def test_a_first_signal_abandons_a_step_the_plan_says_is_far_from_done(capfd):
    from lingmao.train.signals import StepAbandoned

    with Stopper(step_estimate=3000.0, grace=20.0) as stopper:
        threading_kill_after(0.3)
        t = time.monotonic()
        with pytest.raises(StepAbandoned) as e:
            _long_step(stopper, 60)
        assert time.monotonic() - t < 30  # measured ~0.3 s: at once, not after the step
    assert stopper.requested and "without finishing the step" in str(e.value)
    assert "SIGTERM: the step in progress needs ~50 min more" in capfd.readouterr().err


def test_a_first_signal_abandons_a_step_that_outlasts_the_grace(capfd):
    from lingmao.train.signals import StepAbandoned

    with Stopper(step_estimate=None, grace=1.0) as stopper:
        threading_kill_after(0.3)
        t = time.monotonic()
        with pytest.raises(StepAbandoned):
            _long_step(stopper, 60)
        waited = time.monotonic() - t
    assert 1.0 <= waited < 30  # measured ~1.3 s: the grace, then at once
    err = capfd.readouterr().err
    assert "SIGTERM: stopping after this step" in err and "did not end within 1 s" in err


def test_a_first_signal_never_abandons_a_step_when_finished_steps_would_be_lost(capfd):
    """Steps done since the last checkpoint: the step ends and a checkpoint keeps them, however long it takes."""
    with Stopper(step_estimate=2.0, grace=0.5, nothing_to_lose=lambda: False) as stopper:
        threading_kill_after(0.2)
        _long_step(stopper, 1.5)  # past the grace, and the estimate says it would be: still not abandoned
        assert stopper.requested
    err = capfd.readouterr().err
    assert "SIGTERM: stopping after this step with a checkpoint; it needs ~" in err
    assert "again to stop at once, losing the steps since the last checkpoint" in err


def test_a_first_signal_lets_a_step_that_ends_in_time_finish():
    with Stopper(step_estimate=0.5, grace=20.0) as stopper:
        threading_kill_after(0.1)
        _long_step(stopper, 0.6)
        time.sleep(0.3)  # after the step: a checkpoint would be written here, no abandoning
        assert stopper.requested
        _long_step(stopper, 0.1)  # a step after the request is not abandoned either: the loop stops at its end


def threading_kill_after(seconds: float) -> None:
    import threading

    threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGTERM)).start()


# A step that never ends (a Python loop: signals get in between, as between
# torch ops), in a run whose plan says a step takes 50 minutes.
ENDLESS_STEP = """
import sys, time
from pathlib import Path
from lingmao import run
from lingmao.plan import make
from lingmao.train import step
planned = make.runnable_plan
def slow_plan(*args, **kwargs):
    plan = planned(*args, **kwargs)
    plan.est_step_seconds = 3000.0
    return plan
make.runnable_plan = slow_plan
def endless(self, *args, **kwargs):
    Path("in_step").touch()
    while True:
        time.sleep(0.01)
step.TrainStep.step = endless
run.main()
"""


@pytest.mark.slow
def test_sigterm_in_a_step_that_cannot_end_soon_stops_within_seconds_and_marks_the_run(
    tmp_path, mlflow_db, shared_cache
):
    from lingmao.tracking.spool import SPOOL_NAME, read_spool

    argv = [*COMMON, "hardware.compile=false", "trainer.max_steps=10", "hydra.run.dir=run", "tracking.run_name=endless"]
    out, err = open(tmp_path / "endless.out", "w"), open(tmp_path / "endless.err", "w")
    proc = subprocess.Popen(
        [sys.executable, "-c", ENDLESS_STEP, *argv], cwd=tmp_path, env=cli_env(shared_cache), stdout=out, stderr=err
    )
    deadline = time.monotonic() + 240
    while not (tmp_path / "run" / "in_step").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=120)
    finally:
        proc.kill()  # one that did not stop must not outlive the test
    took = time.monotonic() - t
    rc, out, err = finish(proc, tmp_path, "endless")
    print(f"SIGTERM to exit: {took:.1f} s")
    assert rc == 130 and took < 30, err[-2000:]  # measured: ~5 s on the loaded 2-core CPU
    assert "SIGTERM: the step in progress needs ~50 min more (plan estimate)" in err
    assert "stopped without finishing the step in progress; no checkpoint was written" in err
    _, runs = mlflow_runs(mlflow_db, "endless")
    spooled = read_spool(tmp_path / "run" / SPOOL_NAME) if (tmp_path / "run" / SPOOL_NAME).exists() else []
    ends = [r["status"] for r in spooled if r["op"] == "end"]
    assert [r.info.status for r in runs] == ["KILLED"] or ends == ["KILLED"]  # the store, or the spool to import


# A step stuck in one long C call (sqlite's, standing in for a huge torch op):
# Python's handler cannot run until it returns.
STUCK_IN_ONE_CALL = """
import sqlite3, sys
from lingmao.train import signals
signals.when_stuck(lambda: print("the run is marked KILLED", flush=True))
with signals.Stopper(step_estimate=3000.0, grace=20.0) as stopper:
    with stopper.step():
        print("in the step", flush=True)
        count = (
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 2000000000) "
            "SELECT count(*) FROM c"
        )
        sqlite3.connect(":memory:").execute(count).fetchone()
print("the call returned", flush=True)
"""


@pytest.mark.slow
def test_sigterm_ends_a_step_stuck_in_one_long_call_within_seconds(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", STUCK_IN_ONE_CALL],
        cwd=tmp_path,
        env=cli_env(tmp_path / "cache"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "in the step"
        time.sleep(1.0)  # inside the call by now
        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    took = time.monotonic() - t
    print(f"SIGTERM to exit, stuck in one call: {took:.1f} s")
    assert proc.returncode == 130 and took < 30, err  # measured: ~10 s (the handler's wait, then out)
    assert out.strip() == "the run is marked KILLED" and "inside one long operation" in err
