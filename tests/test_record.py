"""What a run leaves for its reader: run.log in the run folder, plain lines
when not on a terminal, ASCII metric names, corpus statistics as tags,
the composed Hydra config as artifacts."""

import json

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
    assert "experiment" not in run.data.tags  # no preset, no sweep: no empty tag for the UI's Group by
    assert_genre_sample_tags(run.data.tags, shared_cache, micro_batch=4, eval_batches=20)
    assert not [k for k in run.data.metrics if k.startswith("data/")]  # corpus counts are tags
    assert int(run.data.tags["data.duplicates.windows"]) > 0
    client = MlflowClient(f"sqlite:///{mlflow_db}")
    assert {a.path for a in client.list_artifacts(run.info.run_id, "hydra")} >= {
        "hydra/config.yaml",
        "hydra/overrides.yaml",
    }
    assert "run.log" in {a.path for a in client.list_artifacts(run.info.run_id)}


def assert_genre_sample_tags(tags: dict, cache, micro_batch: int, eval_batches: int) -> None:
    """The tags genre_tokens.<g> / genre_docs.<g> count what val/loss_<g> averages: per_genre_loss's own counts."""
    import json

    import numpy as np
    import torch

    from lingmao.train.validation import genre_metric_names, per_genre_loss

    (docs_file,) = cache.glob("prepared/**/val_docs.npy")
    meta = json.loads((docs_file.parent / "meta.json").read_text(encoding="utf-8"))
    tokens = np.fromfile(docs_file.parent / "val.bin", dtype=meta["dtype"]).astype(np.int64)

    class Zeros(torch.nn.Module):  # the counts do not depend on the model
        def forward(self, x):
            return torch.zeros(*x.shape, meta["vocab_size"])

    per_genre = max(16, eval_batches * micro_batch // len(meta["genres"]))
    counted = per_genre_loss(Zeros(), tokens, np.load(docs_file), meta["genres"], 32, max_docs_per_genre=per_genre)
    names = genre_metric_names(meta["genres"])
    assert counted
    assert {names[g]: (str(r["tokens"]), str(r["docs"])) for g, r in counted.items()} == {
        k.split(".", 1)[1]: (v, tags[f"genre_docs.{k.split('.', 1)[1]}"])
        for k, v in tags.items()
        if k.startswith("genre_tokens.")
    }


def test_the_per_genre_document_rule_is_the_evaluators():
    """record.genre_docs copies train/validation.py's Evaluator rule (tracking sits below train)."""
    from types import SimpleNamespace as NS

    from lingmao.tracking.record import genre_docs
    from lingmao.train.validation import Evaluator

    for eval_batches, micro, n in [(20, 4, 5), (20, 64, 3), (2, 4, 5), (100, 32, 1), (20, 8, 0)]:
        cfg = NS(trainer=NS(eval_batches=eval_batches), seed=0, model=NS(context_length=32))
        val = NS(genres=[f"g{i}" for i in range(n)])
        evaluator = Evaluator(None, NS(micro_batch=micro), "cpu", None, val, cfg, None, None, None)
        assert genre_docs(eval_batches, micro, n) == evaluator.genre_docs, (eval_batches, micro, n)


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
    (compare,) = [line for line in out.splitlines() if line.startswith("  compare: ")]
    assert "viewStateShareKey=lingmao-" in compare and "compareRunsMode=TABLE" in compare
    assert "LINGMAO_UI_URL" in compare  # how to point the link at a UI on another port
    client = MlflowClient(f"sqlite:///{mlflow_db}")
    (view,) = [v for k, v in client.get_experiment(runs[0].info.experiment_id).tags.items() if "sharedViewState" in k]
    state = json.loads(json.loads(view)["state"])
    assert state["orderByKey"] == "metrics.`val/loss`" and state["orderByAsc"] is True
    assert {"tags.`hardware`", "tags.`model`", "metrics.`val/loss`"} <= set(state["selectedColumns"])


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
