"""DDP on CPU (gloo): 2 processes with micro-batch b train exactly like one
process with micro-batch 2b on the same data and seed."""

import json

import pytest
from mlflow.tracking import MlflowClient
from test_run import run_cli

COMMON = [
    "hardware=cpu",
    "hardware.precision=fp32",
    "model=tiny",
    "model.context_length=32",
    "model.dropout=0.0",
    "trainer.max_steps=6",
    "trainer.log_every=1",
    "trainer.eval_every=3",
    "trainer.eval_batches=3",
    "trainer.progress=false",
    "optim=adamw",
    "optim.lr=3e-3",
    "hardware.accumulation=2",
]


def losses(store, name):
    client = MlflowClient(f"sqlite:///{store}")
    run = client.search_runs(
        [client.get_experiment_by_name("lingmao").experiment_id], f"attributes.run_name = '{name}'"
    )[0]

    def hist(key):
        return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]

    return run, hist("train/loss"), hist("val/loss")


# AdamW in fp32 matches to rounding. Muon orthogonalises its update in bf16,
# which turns the all-reduce's last-bit differences into ~3e-5 of the loss.
@pytest.mark.slow
@pytest.mark.parametrize("optim,tolerance", [("adamw", 1e-5), ("muon", 1e-3)])
def test_two_gloo_processes_match_one_process_with_double_batch(tmp_path, training_cache, optim, tolerance):
    args = [a for a in COMMON if not a.startswith("optim=")] + [f"optim={optim}"]
    run_cli(args + ["hardware.devices=1", "hardware.batch=4", "tracking.run_name=one"], tmp_path, training_cache)
    run_cli(args + ["hardware.devices=2", "hardware.batch=2", "tracking.run_name=two"], tmp_path, training_cache)
    one, train1, val1 = losses(tmp_path / "mlflow.db", "one")
    two, train2, val2 = losses(tmp_path / "mlflow.db", "two")
    plan = json.loads(
        MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").download_artifacts(
            two.info.run_id, "plan.json", str(tmp_path)
        )
        and (tmp_path / "plan.json").read_text()
    )
    assert (plan["world_size"], plan["ddp_backend"], plan["effective_batch"]) == (2, "gloo", 8)
    assert len(train1) == len(train2) == 6 and len(val1) == len(val2) == 2
    assert train2 == pytest.approx(train1, rel=tolerance, abs=tolerance)
    assert val2 == pytest.approx(val1, rel=tolerance, abs=tolerance)
    assert train1[-1] < train1[0]


def two_nodes(args: list[str], folders: list, cache, store, stop_after=None):
    """One job as two torchrun "nodes" on this machine, one process each,
    each in its own run folder (no shared filesystem between them). With
    `stop_after` (a file), node 0's worker gets a SIGTERM once it exists;
    returns the outputs and exit codes."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    import psutil

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "LINGMAO_CACHE": str(cache), "PYTHONPATH": str(Path(__file__).parents[1])}
    procs = []
    for node, folder in enumerate(folders):
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            f"--node_rank={node}",
            "--nproc_per_node=1",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            "-m",
            "lingmao.run",
            *args,
            f"hydra.run.dir={folder}",
            f"tracking.uri=sqlite:///{store}",
        ]
        procs.append(
            subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    if stop_after is not None:
        deadline = time.monotonic() + 300
        while not stop_after.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        for child in psutil.Process(procs[0].pid).children(recursive=True):  # the worker, not torchrun
            child.send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=600)[0] for p in procs]
    return outs, [p.returncode for p in procs]


@pytest.mark.slow
def test_two_nodes_without_a_shared_disk_resume_alike_with_their_own_dropout(tmp_path, training_cache):
    import torch

    from lingmao.train import checkpoint

    base = [a for a in COMMON if not a.startswith(("model.dropout", "trainer.max_steps"))] + [
        "model.dropout=0.1",
        "hardware.batch=2",
        "hardware.threads=1",
        "checkpoint.every_steps=2",
        "trainer.max_steps=8",
    ]
    store = tmp_path / "mlflow.db"
    cut = [tmp_path / "a0", tmp_path / "a1"]
    # Stopped by a signal after its first checkpoint: both ranks stop at the same step, rank 0 saves.
    two_nodes(
        base + ["tracking.run_name=cut"],
        cut,
        training_cache,
        store,
        stop_after=cut[0] / "checkpoints" / "step00000002.pt",
    )
    assert not (cut[1] / "checkpoints").exists() or not list((cut[1] / "checkpoints").glob("*.pt"))
    outs, codes = two_nodes(base + ["tracking.run_name=cut"], cut, training_cache, store)
    assert codes == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert "resuming from" in outs[0]
    # Run once more: finished, so no step and no eval, on both ranks alike (rank 1 once evaluated alone and hung).
    outs, codes = two_nodes(base + ["tracking.run_name=cut"], cut, training_cache, store)
    assert codes == [0, 0] and "done: step 8" in outs[0], "\n".join(o[-3000:] for o in outs)
    outs, codes = two_nodes(
        base + ["tracking.run_name=full"], [tmp_path / "b0", tmp_path / "b1"], training_cache, store
    )
    assert codes == [0, 0], "\n".join(o[-3000:] for o in outs)
    client = MlflowClient(f"sqlite:///{store}")
    by_step = {
        name: {m.step: m.value for m in client.get_metric_history(losses(store, name)[0].info.run_id, "train/loss")}
        for name in ("cut", "full")
    }
    assert sorted(by_step["cut"]) == list(range(1, 9))
    # node 1 went on from node 0's checkpoint (it has none of its own), as in one unbroken run
    assert [by_step["cut"][s] for s in range(1, 9)] == pytest.approx(
        [by_step["full"][s] for s in range(1, 9)], rel=1e-6
    )
    state = checkpoint.load(tmp_path / "b0" / "checkpoints" / "last.pt")
    ranks = state["rng_ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])  # dropout masks differ
