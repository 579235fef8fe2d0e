"""Fault injection: the process SIGKILLed inside a checkpoint write and
inside the tracker's send. Each time the previous checkpoint is intact, the
resumed run's losses equal an uninterrupted run's, and no metric up to the
last checkpoint is lost. (A hung tracking server: test_tracking_faults.py;
a full disk: test_failures.py and test_reliability.py.)"""

import pytest
from test_resume import COMMON, cli_env, finish, history, train_here

from lingmao.train import checkpoint

ARGS = [*COMMON, "trainer.max_steps=8", "checkpoint.every_steps=2", "hydra.run.dir=cut", "tracking.run_name=cut"]

# Dies in the middle of writing the checkpoint of step 4: half a file on disk.
KILLED_IN_CHECKPOINT_WRITE = """
import os, signal, torch
from lingmao import run
real, calls = torch.save, [0]
def save(obj, f, *args, **kwargs):
    calls[0] += 1
    if calls[0] == 2:
        f.write(b"the first bytes of a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real(obj, f, *args, **kwargs)
torch.save = save
run.main()
"""

# Dies while the tracker's thread sends the metrics of step 3 (at the flush
# before step 4's checkpoint).
KILLED_IN_TRACKER_SEND = """
import os, signal
from lingmao import run
from lingmao.tracking import sender
real = sender.apply
def apply(client, run_id, rec):
    if rec["op"] == "metrics" and any(step == 3 for _, _, _, step in rec["metrics"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(client, run_id, rec)
sender.apply = apply
run.main()
"""


def start(tmp_path, cache, code, name):
    import subprocess
    import sys

    out, err = open(tmp_path / f"{name}.out", "w"), open(tmp_path / f"{name}.err", "w")
    return subprocess.Popen(
        [sys.executable, "-c", code, *ARGS], cwd=tmp_path, env=cli_env(cache), stdout=out, stderr=err
    )


def resume_and_compare(tmp_path, mlflow_db, shared_cache, kept_step: int) -> None:
    """The same command again continues from step `kept_step`; every step's
    loss then equals the uninterrupted run's."""
    rc, out, err = finish(
        start(tmp_path, shared_cache, "from lingmao import run; run.main()", "resumed"), tmp_path, "resumed"
    )
    assert rc == 0, err[-2000:]
    assert f"at step {kept_step}" in out
    train_here(tmp_path, tmp_path / "full", *ARGS[:-2], "tracking.run_name=full")
    reference = dict(history(mlflow_db, "full"))
    cut = history(mlflow_db, "cut")
    assert sorted({s for s, _ in cut}) == list(range(1, 9))
    assert all(v == reference[s] for s, v in cut)  # a step logged twice (before the kill, after the resume) agrees


@pytest.mark.slow
def test_sigkill_inside_a_checkpoint_write_keeps_the_previous_one(tmp_path, mlflow_db, shared_cache):
    import signal

    rc, _, err = finish(start(tmp_path, shared_cache, KILLED_IN_CHECKPOINT_WRITE, "cut"), tmp_path, "cut")
    assert rc == -signal.SIGKILL, err[-2000:]
    folder = tmp_path / "cut" / "checkpoints"
    assert sorted(f.name for f in folder.glob("*.pt")) == ["best.pt", "last.pt", "step00000002.pt"]
    assert checkpoint.load(folder / "last.pt")["progress"]["step"] == 2  # intact, readable
    assert list(folder.glob(".*.tmp*"))  # the half-written file is a temporary one, never last.pt
    assert [s for s, _ in history(mlflow_db, "cut")] == [1, 2, 3, 4]  # flushed before the write began
    resume_and_compare(tmp_path, mlflow_db, shared_cache, kept_step=2)
    assert not list(folder.glob(".*.tmp*"))  # the next process swept it


@pytest.mark.slow
def test_sigkill_inside_the_trackers_send_loses_nothing_up_to_the_last_checkpoint(tmp_path, mlflow_db, shared_cache):
    import signal

    rc, _, err = finish(start(tmp_path, shared_cache, KILLED_IN_TRACKER_SEND, "cut"), tmp_path, "cut")
    assert rc == -signal.SIGKILL, err[-2000:]
    folder = tmp_path / "cut" / "checkpoints"
    assert checkpoint.load(folder / "last.pt")["progress"]["step"] == 2  # step 4's save waited on the send
    assert [s for s, _ in history(mlflow_db, "cut")][:2] == [1, 2]  # everything up to the checkpoint is stored
    resume_and_compare(tmp_path, mlflow_db, shared_cache, kept_step=2)
