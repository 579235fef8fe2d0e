"""Sweeps: parallel joblib jobs share one sqlite store and the machine, Optuna
searches batch x LR, SLURM composes, a remote MLflow server records a run."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from test_run import TINY, run_cli

from lingmao.config.compose import CONF_DIR, register
from lingmao.run import execute
from lingmao.sweep import lock_free_slot, parallel_jobs, slot_resources, sweep_job

JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"


def test_parallel_jobs_follow_joblib_and_ignore_other_launchers():
    assert parallel_jobs({"_target_": JOBLIB, "n_jobs": 2}, cores=16) == 2
    assert parallel_jobs({"_target_": JOBLIB, "n_jobs": -1}, cores=16) == 16  # joblib: all cores
    assert parallel_jobs({"_target_": JOBLIB, "n_jobs": -2}, cores=16) == 15
    assert parallel_jobs({"_target_": JOBLIB, "n_jobs": None}, cores=16) == 1
    assert parallel_jobs({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}, cores=16) == 1
    assert (
        parallel_jobs(
            {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher", "tasks_per_node": 1},
            cores=16,
        )
        == 1
    )


def _hydra_job(tmp_path, multirun: list[str], job: list[str], params: dict | None = None):
    """A HydraConfig of job 0 of a multirun launched in tmp_path, its multirun.yaml written."""
    from omegaconf import OmegaConf

    (tmp_path / "multirun" / "a").mkdir(parents=True)
    OmegaConf.save({"hydra": {"overrides": {"task": multirun}}}, tmp_path / "multirun" / "a" / "multirun.yaml")
    hc = OmegaConf.create(
        {
            "sweep": {"dir": "multirun/a"},
            "job": {"num": 0},
            "overrides": {"task": job},
            "sweeper": {"params": params},
            "launcher": {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"},
        }
    )
    return hc, OmegaConf.create({"experiment": None, "hardware": {"threads": 0}})


def test_a_sweep_of_the_lr_alone_records_it_and_names_the_experiment_by_it(tmp_path):
    """Its sweep.values and experiment tags were empty: the LR was left out of
    the tag as it is of the name suffix, and only presets set experiment."""
    hc, cfg = _hydra_job(tmp_path, ["model=tiny", "optim.lr=1e-3,3e-3"], ["model=tiny", "optim.lr=0.001"])
    tags = sweep_job(hc, tmp_path, cfg)
    assert tags["sweep.values"] == "optim.lr=0.001"
    assert tags["experiment"] == "sweep over optim.lr"
    hc, cfg = _hydra_job(
        tmp_path / "b", ["optim.lr=1e-3"], ["optim.lr=0.001", "optim.warmup=0"], {"optim.warmup": "0,20"}
    )
    cfg.experiment = "repeater"  # a preset names its own question
    tags = sweep_job(hc, tmp_path / "b", cfg)
    assert (tags["sweep.values"], tags["experiment"]) == ("optim.warmup=0", "repeater")


def test_a_sweep_jobs_run_name_adds_what_the_sweep_varies_but_the_lr():
    from omegaconf import OmegaConf

    from lingmao.tracking.record import run_name

    cfg = OmegaConf.create({"tracking": {"run_name": None}, "model": {"name": "tiny"}, "optim": {"lr": 0.001}})
    assert run_name(cfg, "cpu", "optim.lr=0.001") == "cpu-tiny-lr1e-3"
    assert run_name(cfg, "cpu", "optim.lr=0.001 optim.warmup=0") == "cpu-tiny-lr1e-3 optim.warmup=0"


def test_slot_resources_split_cores_and_gpus():
    assert slot_resources(0, jobs=2, cores=2, gpu_ids=[]) == (1, [])
    assert slot_resources(1, jobs=3, cores=16, gpu_ids=[]) == (5, [])
    assert slot_resources(1, jobs=1, cores=1, gpu_ids=[]) == (1, [])
    gpus = ["0", "1", "2", "3"]
    assert [slot_resources(s, 4, 32, gpus)[1] for s in range(4)] == [["0"], ["1"], ["2"], ["3"]]
    assert [slot_resources(s, 2, 32, gpus)[1] for s in range(2)] == [["0", "1"], ["2", "3"]]  # t4x2 jobs
    assert [slot_resources(s, 3, 32, ["4", "6"])[1] for s in range(3)] == [["4"], ["6"], ["4"]]  # shared


def test_slots_are_claimed_exclusively(tmp_path, capsys):
    first, f1 = lock_free_slot(tmp_path, jobs=2, preferred=1)
    second, f2 = lock_free_slot(tmp_path, jobs=2, preferred=1)  # 1 is held: the other one
    assert (first, second) == (1, 0)
    third, f3 = lock_free_slot(tmp_path, jobs=2, preferred=0, wait=0.3)  # all held: share, say so
    assert (third, f3) == (0, None) and "all 2 job slots" in capsys.readouterr().err
    f1.close()  # a finished worker process releases its slot
    again, f4 = lock_free_slot(tmp_path, jobs=2, preferred=0)
    assert again == 1
    f2.close(), f4.close()


def test_slurm_launcher_composes():
    register()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "hydra/launcher=slurm",
                "hardware=t4x2",
                "hydra.launcher.partition=gpu",
                "hydra.launcher.gpus_per_node=2",
            ],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.partition) == (1, 2, "gpu")
    assert parallel_jobs(launcher, cores=64) == 1  # SLURM gives each job its own allocation


def test_batch_lr_search_preset_composes():
    register()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=batch_lr_search", "model=tiny"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "minimize"
    assert dict(sweeper.params) == {
        "optim.lr": "tag(log, interval(1e-5, 3e-3))",
        "hardware.accumulation": "choice(1, 2, 4, 8)",
    }
    assert sweeper.storage is None  # in memory: optuna 2.x storage breaks beside SQLAlchemy 2
    assert cfg.optim.lr_scaling == "none" and cfg.trainer.max_epochs == 1 and cfg.model.name == "tiny"


def runs_of(db: Path):
    client = MlflowClient(f"sqlite:///{db}")
    return client, client.search_runs([client.get_experiment_by_name("lingmao").experiment_id])


def steps(client, run, key):
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))


@pytest.mark.slow
def test_joblib_sweep_loses_nothing_and_splits_the_machine(tmp_path, shared_cache):
    """No store yet: the two jobs race to create it (tracking.ensure_store's lock)."""
    mlflow_db = tmp_path / "mlflow.db"
    proc = run_cli(
        [
            "-m",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            *TINY,
            "model.context_length=16",
            "trainer.max_steps=15",
            "trainer.log_every=1",
            "trainer.eval_every=5",
            "trainer.eval_batches=2",
            "optim.lr=1e-3,3e-3",
        ],
        tmp_path,
        shared_cache,
    )
    out = proc.stdout + proc.stderr
    assert "database is locked" not in out
    client, runs = runs_of(mlflow_db)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(r.data.params["config.optim.lr"] for r in runs) == ["0.001", "0.003"]
    assert sorted(r.info.run_name for r in runs) == ["cpu-tiny-lr1e-3", "cpu-tiny-lr3e-3"]
    assert len({r.data.tags["sweep.id"] for r in runs}) == 1
    assert sorted(r.data.tags["sweep.slot"] for r in runs) == ["0", "1"]
    cores = len(os.sched_getaffinity(0))
    assert {r.data.params["plan.threads"] for r in runs} == {str(max(1, cores // 2))}
    for run in runs:  # every metric of every job
        for key in ("train/loss", "lr", "grad_norm", "samples_per_sec"):
            assert steps(client, run, key) == list(range(1, 16)), key
        assert steps(client, run, "val/loss") == [5, 10, 15]
    sweep = runs[0].data.tags["sweep.id"]
    assert proc.stdout.count(f"mlflow: sweep {sweep}: 2 run(s)") == 1  # the summary, once, at the end
    assert sorted(r.data.tags["sweep.values"] for r in runs) == ["optim.lr=0.001", "optim.lr=0.003"]
    assert "viewStateShareKey=" in proc.stdout  # the sweep's runs table (tracking/view.py)


@pytest.mark.slow
def test_optuna_batch_lr_search_records_the_best(tmp_path, shared_cache, mlflow_db):
    fixed = [o for o in TINY if not o.startswith(("optim.lr=", "hardware.accumulation="))]  # would pin them
    run_cli(
        [
            "-m",
            "experiment=batch_lr_search",
            "hydra.sweeper.n_trials=3",
            "hydra.sweeper.sampler.n_startup_trials=2",
            *fixed,
            "model.context_length=16",
            "trainer.max_epochs=null",
            "trainer.max_steps=4",
            "trainer.eval_every=4",
            "trainer.eval_batches=2",
            "tracking.system_metrics=false",
        ],
        tmp_path,
        shared_cache,
    )
    (results,) = tmp_path.glob("multirun/*/*/optimization_results.yaml")
    best = yaml.safe_load(results.read_text())
    assert set(best["best_params"]) == {"optim.lr", "hardware.accumulation"}
    assert 1e-5 <= best["best_params"]["optim.lr"] <= 3e-3 and best["best_params"]["hardware.accumulation"] in (
        1,
        2,
        4,
        8,
    )
    client, runs = runs_of(mlflow_db)
    assert len(runs) == 3 and len({r.data.tags["sweep.id"] for r in runs}) == 1
    assert {r.data.tags["experiment"] for r in runs} == {"batch_lr_search"}
    # the value Optuna minimised is the final val/loss each run recorded
    assert best["best_value"] == pytest.approx(min(r.data.metrics["val/loss"] for r in runs))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_remote_tracking_server_records_the_run(tmp_path, shared_cache, mlflow_db, capsys, monkeypatch):
    """A real `mlflow server` on loopback; the run logs over REST and is read back over REST."""
    port = free_port()
    # No job-execution consumers (MLflow 3 starts seven): faster to start, nothing left behind.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{mlflow_db}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )  # its own process group: stopped with its uvicorn worker
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.chdir(tmp_path)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None, server.stderr.read()[-3000:]
                assert time.monotonic() < deadline, "mlflow server did not answer /health in 120 s"
                time.sleep(0.5)
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose(
                "config",
                overrides=[
                    *TINY,
                    "model.context_length=16",
                    "trainer.max_steps=6",
                    "trainer.eval_every=3",
                    "trainer.log_every=1",
                    "trainer.eval_batches=2",
                    f"tracking.uri={uri}",
                    "tracking.system_metrics=false",
                ],
            )
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        execute(cfg, tmp_path, run_dir)
        assert f"open {uri}/#/experiments/" in capsys.readouterr().out  # the server's own UI, no `mlflow ui`
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("lingmao").experiment_id])
        assert run.info.status == "FINISHED" and run.data.tags["hardware"] == "cpu"
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == list(range(1, 7))
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/loss")) == [3, 6]
        assert {"plan.json", "samples.jsonl"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
        assert not (run_dir / "mlflow_spool.jsonl").exists()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
