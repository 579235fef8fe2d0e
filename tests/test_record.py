"""What a run leaves for its reader: run.log in the run folder, plain lines
when not on a terminal, ASCII metric names, corpus statistics as tags,
the composed Hydra config as artifacts."""

from mlflow.tracking import MlflowClient
from test_resume import _keep_torch_threads, cli, mlflow_runs  # noqa: F401


def test_a_cli_run_leaves_a_log_plain_progress_lines_and_a_readable_record(
    tmp_path, mlflow_db, shared_cache, monkeypatch, capsys
):
    args = [
        "hardware=cpu",
        "model=tiny",
        "model.context_length=32",
        "hardware.batch=4",
        "trainer.max_steps=4",
        "trainer.log_every=2",
        "trainer.eval_every=4",
        f"hydra.run.dir={tmp_path / 'run'}",
        "tracking.run_name=record",
    ]
    assert cli(args, tmp_path, monkeypatch) == 0
    out = capsys.readouterr().out
    assert "step 2/4 | train/loss " in out and "\r" not in out  # pytest's stderr is no terminal: no bar frames
    log = (tmp_path / "run" / "run.log").read_text(encoding="utf-8")
    assert "step 4/4 | train/loss " in log and "done: step 4" in log
    _, runs = mlflow_runs(mlflow_db, "record")
    run = runs[0]
    assert "val/loss_shi" in run.data.metrics and not [k for k in run.data.metrics if not k.isascii()]
    assert run.data.tags["genre.shi"] == "诗"
    assert not [k for k in run.data.metrics if k.startswith("data/")]  # corpus counts are tags
    assert int(run.data.tags["data.duplicates.windows"]) > 0
    client = MlflowClient(f"sqlite:///{mlflow_db}")
    assert {a.path for a in client.list_artifacts(run.info.run_id, "hydra")} >= {
        "hydra/config.yaml",
        "hydra/overrides.yaml",
    }
    assert "run.log" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_the_corpus_is_a_dataset_input_and_a_resume_records_what_changed(tmp_path, mlflow_db, shared_cache):
    from test_resume import train_here

    train_here(tmp_path, tmp_path / "run", "trainer.max_steps=2", "tracking.run_name=resumed")
    train_here(tmp_path, tmp_path / "run", "trainer.max_steps=4", "tracking.run_name=resumed")
    _, runs = mlflow_runs(mlflow_db, "resumed")
    run = MlflowClient(f"sqlite:///{mlflow_db}").get_run(runs[0].info.run_id)
    assert run.data.params["config.trainer.max_steps"] == "2"
    assert run.data.params["resumed.2.config.trainer.max_steps"] == "4"
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["poetry"]


def test_the_banner_says_what_the_run_will_do_before_it_starts(tmp_path, mlflow_db, shared_cache, monkeypatch, capsys):
    args = [
        "hardware=cpu",
        "model=tiny",
        "model.context_length=32",
        "hardware.batch=4",
        "hardware.accumulation=2",
        "optim.lr=1e-3",
        "optim.lr_scaling=sqrt",
        "optim.base_batch=16",
        "trainer.max_steps=2",
        "hardware.precision=fp32",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    assert cli(args, tmp_path, monkeypatch) == 0
    out = capsys.readouterr().out
    head = out[: out.index("corpus:")]  # printed before the run's own lines
    assert "batch 4 x accumulation 2 x 1 process(es) = 8 windows of 32 tokens per step" in head
    assert (
        "lr Muon 2e-2 (optim.muon_lr) for the blocks' matrices, AdamW 1e-3 (optim.lr) x sqrt(8/16) = 7.1e-4" in head
        and "2 steps" in head
    )
    assert f"run folder {tmp_path / 'run'}" in head and "MLflow: sqlite:///" in head


def test_plan_true_writes_nothing(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "lingmao.run", "hardware=rtx4090", "model=small", "plan=true"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "micro_batch" in proc.stdout or "micro-batch" in proc.stdout, proc.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []  # no outputs/ folder, no .hydra copy


def test_a_plan_that_does_not_fit_says_so_first_and_exits_non_zero(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}

    def run(*a):
        return subprocess.run(
            [sys.executable, "-m", "lingmao.run", *a, "plan=true"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    no = run("hardware=rtx3060", "hardware.memory_gb=0.05", "model=small")
    assert no.returncode == 3 and no.stdout.lstrip().startswith("DOES NOT FIT"), no.stdout[:500] + no.stderr[-500:]
    yes = run("hardware=t4x2", "model=medium")
    assert yes.returncode == 0 and yes.stdout.lstrip().startswith("FITS")


def test_user_tags_and_the_best_weights_go_into_the_run(tmp_path, mlflow_db, shared_cache):
    import torch
    from test_resume import train_here

    from lingmao import generate

    train_here(
        tmp_path, tmp_path / "run", "trainer.max_steps=2", "tracking.run_name=tagged", "+tracking.tags={team: poetry}"
    )
    _, runs = mlflow_runs(mlflow_db, "tagged")
    run = runs[0]
    assert run.data.tags["team"] == "poetry"
    client = MlflowClient(f"sqlite:///{mlflow_db}")
    assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/model.pt"]
    exported = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert "optimizer" not in exported and exported["model"] and exported["tokenizer"]
    assert generate.main([f"checkpoint={tmp_path / 'run' / 'model.pt'}", "prompt=床前", "max_new_tokens=4"]) == 0


def test_the_runs_link_is_printed_once_the_run_is_open(tmp_path, mlflow_db, shared_cache, monkeypatch, capsys):
    args = [
        "hardware=cpu",
        "model=tiny",
        "model.context_length=32",
        "hardware.batch=4",
        "trainer.max_steps=40",
        "trainer.log_every=1",
        "trainer.eval_every=40",
        f"hydra.run.dir={tmp_path / 'run'}",
        "tracking.run_name=linked",
    ]
    assert cli(args, tmp_path, monkeypatch) == 0
    out = capsys.readouterr().out
    _, runs = mlflow_runs(mlflow_db, "linked")
    lines = [line for line in out.splitlines() if line.startswith("MLflow run: ")]
    assert len(lines) == 1 and "compareRunsMode=CHART" in lines[0] and runs[0].info.run_id in lines[0]
    assert out.index("MLflow run: ") < out.index("done: step 40")  # printed by the run, before its end line


def test_a_run_bounded_by_time_shows_its_clock_beside_the_steps(tmp_path, mlflow_db, shared_cache, monkeypatch, capsys):
    args = [
        "hardware=cpu",
        "model=tiny",
        "model.context_length=32",
        "hardware.batch=4",
        "trainer.max_steps=4",
        "trainer.max_time=900",
        "trainer.log_every=2",
        "trainer.eval_every=4",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    assert cli(args, tmp_path, monkeypatch) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step 2/4 | ")]
    assert lines and lines[0].split(" | ")[1].endswith("/900 s"), lines
