"""End to end: the CLI trains on CPU, logs to a real MLflow store, sweeps."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

TINY = [
    "hardware=cpu",
    "model=tiny",
    "model.context_length=32",
    "trainer.max_steps=30",
    "trainer.eval_every=10",
    "trainer.log_every=5",
    "trainer.eval_batches=4",
    "trainer.progress=false",
    "optim.lr=3e-3",
    "hardware.batch=4",
    "hardware.accumulation=2",
]


def run_cli(args, cwd: Path, cache: Path, check=True) -> subprocess.CompletedProcess:
    env = {**os.environ, "LINGMAO_CACHE": str(cache), "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "lingmao.run", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def runs_in(store: Path):
    client = MlflowClient(f"sqlite:///{store}")
    exp = client.get_experiment_by_name("lingmao")
    return client, client.search_runs([exp.experiment_id])


@pytest.mark.slow
def test_tiny_run_learns_and_is_recorded(tmp_path, training_cache):
    proc = run_cli(TINY, tmp_path, training_cache)
    assert "compareRunsMode=CHART" in proc.stdout
    client, runs = runs_in(tmp_path / "mlflow.db")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["hardware"] == "cpu" and run.data.tags["model"] == "tiny"
    assert run.data.params["config.model.context_length"] == "32"
    assert int(run.data.params["model.params"]) > 0
    for key in (
        "train/loss",
        "val/loss",
        "val/perplexity",
        "val/bpc",
        "lr",
        "samples_per_sec",
        "tokens_per_sec",
        "mfu",
        "peak_memory_gb",
    ):
        assert key in run.data.metrics, key
    val = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val/loss"), key=lambda m: m.step)]
    assert len(val) == 3 and val[-1] < val[0] - 0.5
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"plan.json", "corpus.json", "tokenizer.json", "samples.jsonl"} <= artifacts
    ckpts = list(tmp_path.glob("outputs/*/*/checkpoints/last.pt"))
    assert len(ckpts) == 1


@pytest.mark.slow
def test_multirun_gives_one_run_per_job_in_one_experiment(tmp_path, training_cache):
    run_cli(["-m", *TINY, "trainer.max_steps=10", "optim.lr=1e-3,3e-3", "optim.warmup=2"], tmp_path, training_cache)
    client, runs = runs_in(tmp_path / "mlflow.db")
    assert sorted(r.data.params["config.optim.lr"] for r in runs) == ["0.001", "0.003"]
    # the name says what the sweep varies: here the LR, which the name always holds
    assert sorted(r.info.run_name for r in runs) == ["cpu-tiny-lr1e-3", "cpu-tiny-lr3e-3"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.data.tags["sweep.dir"] for r in runs}) == 1
    assert sorted(r.data.tags["sweep.job"] for r in runs) == ["0", "1"]


def test_plan_prints_without_data_or_tracking(tmp_path, training_cache):
    proc = run_cli(["hardware=t4x2", "model=medium", "plan=true"], tmp_path, training_cache)
    assert "fp16" in proc.stdout and "effective_batch" in proc.stdout
    assert not (tmp_path / "mlflow.db").exists()


def test_user_error_is_one_clear_line(tmp_path, training_cache):
    proc = run_cli(["hardware=t4x2"], tmp_path, training_cache, check=False)
    assert proc.returncode == 2
    assert "error: hardware=t4x2 needs 2 cuda device(s)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_sweep_job_is_named_by_what_its_sweep_varies():
    from lingmao.sweep import swept_values

    multirun = ["experiment=repeater", "optim.lr=1e-3", "model=tiny,small", "trainer.eval_every=range(10,30,10)"]
    preset = ["optim.warmup=0,2000"]  # a preset's hydra.sweeper.params
    job = ["optim.warmup=0", "model=small", "trainer.eval_every=20", "experiment=repeater", "optim.lr=0.001"]
    assert swept_values(job, multirun + preset) == "optim.warmup=0 model=small trainer.eval_every=20"
    assert swept_values(job, ["optim.lr=1e-3,3e-3"]) == ""  # the LR is in the name already
    assert swept_values(["optim.lr=0.0042"], ["optim.lr=tag(log, interval(1e-4, 1e-2))"]) == ""
    assert swept_values(job, ["optim.warmup=0,2000", "broken=[1,"]) == ""  # unparseable: no suffix, no error
