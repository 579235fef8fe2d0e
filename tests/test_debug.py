"""The debug config group: a fast pipeline check, overfitting one batch,
and a profile of a few steps."""

from mlflow.tracking import MlflowClient
from test_resume import _keep_torch_threads, cli  # noqa: F401

TINY = [
    "hardware=cpu",
    "model=tiny",
    "model.context_length=32",
    "hardware.batch=4",
    "hardware.accumulation=1",
    "optim.lr=3e-3",
]


def test_debug_fast_runs_five_steps_into_its_own_experiment(tmp_path, mlflow_db, shared_cache, monkeypatch, capsys):
    assert cli([*TINY, "debug=fast", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, monkeypatch) == 0
    assert "done: step 5" in capsys.readouterr().out
    client = MlflowClient(f"sqlite:///{mlflow_db}")
    assert client.get_experiment_by_name("lingmao-debug") is not None
    assert client.get_experiment_by_name("lingmao") is None  # the real runs' experiment stays clean


def test_debug_overfit_learns_one_batch_by_heart(tmp_path, shared_cache, monkeypatch, capsys):
    assert (
        cli(
            [
                *TINY,
                "debug=overfit",
                "trainer.max_steps=60",
                "trainer.log_every=1",
                "tracking.enabled=false",
                f"hydra.run.dir={tmp_path / 'run'}",
            ],
            tmp_path,
            monkeypatch,
        )
        == 0
    )
    losses = [
        float(line.split("train/loss ")[1].split()[0])
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("step ") and "train/loss" in line
    ]
    assert len(losses) == 60 and losses[-1] < 0.3 * losses[0]  # one batch: far below where it started


def test_debug_profile_writes_a_trace_and_names_the_costliest_ops(tmp_path, shared_cache, monkeypatch, capsys):
    assert (
        cli(
            [*TINY, "debug=profile", "tracking.enabled=false", f"hydra.run.dir={tmp_path / 'run'}"],
            tmp_path,
            monkeypatch,
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (tmp_path / "run" / "profile_trace.json").stat().st_size > 0
    assert "Self CPU" in out and "profile_trace.json" in out
