"""DDP on CPU (gloo): 2 processes with micro-batch b train exactly like one
process with micro-batch 2b on the same data and seed."""

import json

import pytest
from mlflow.tracking import MlflowClient

from test_run import run_cli

COMMON = ["hardware=cpu", "hardware.precision=fp32", "model=tiny", "model.context_length=32", "model.dropout=0.0",
          "trainer.max_steps=6", "trainer.log_every=1", "trainer.eval_every=3", "trainer.eval_batches=3",
          "trainer.progress=false", "optim.lr=3e-3", "hardware.accumulation=2"]


def losses(store, name):
    client = MlflowClient(f"sqlite:///{store}")
    run = client.search_runs([client.get_experiment_by_name("lingmao").experiment_id],
                             f"attributes.run_name = '{name}'")[0]
    hist = lambda key: [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]
    return run, hist("train/loss"), hist("val/loss")


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_double_batch(tmp_path, training_cache):
    run_cli(COMMON + ["hardware.devices=1", "hardware.batch=4", "tracking.run_name=one"], tmp_path, training_cache)
    run_cli(COMMON + ["hardware.devices=2", "hardware.batch=2", "tracking.run_name=two"], tmp_path, training_cache)
    one, train1, val1 = losses(tmp_path / "mlflow.db", "one")
    two, train2, val2 = losses(tmp_path / "mlflow.db", "two")
    plan = json.loads(MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").download_artifacts(
        two.info.run_id, "plan.json", str(tmp_path)) and (tmp_path / "plan.json").read_text())
    assert (plan["world_size"], plan["ddp_backend"], plan["effective_batch"]) == (2, "gloo", 8)
    assert len(train1) == len(train2) == 6 and len(val1) == len(val2) == 2
    assert train2 == pytest.approx(train1, rel=1e-5, abs=1e-5)
    assert val2 == pytest.approx(val1, rel=1e-5, abs=1e-5)
    assert train1[-1] < train1[0]
