"""`lingmao eval` on a checkpoint of a tiny training run tracked in MLflow."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import LINES
from hydra import compose, initialize_config_dir

from lingmao import cli
from lingmao import eval as evaluation
from lingmao.config.compose import CONF_DIR, register
from lingmao.train.validation import genre_metric_names

register()

STEPS = 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory, _shared_cache, _mlflow_template):
    """(run folder, final metrics of the training, MLflow store URI)."""
    from lingmao.run import execute

    root = tmp_path_factory.mktemp("eval")
    db = shutil.copyfile(_mlflow_template, root / "mlflow.db")
    uri = f"sqlite:///{db}"
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "hardware=cpu",
                "hardware.precision=fp32",
                "model=tiny",
                "model.context_length=32",
                "model.d_model=32",
                "model.n_heads=2",
                f"trainer.max_steps={STEPS}",
                "trainer.eval_every=2",
                "checkpoint.every_steps=2",
                "trainer.progress=false",
                "hardware.batch=2",
                "hardware.accumulation=1",
                f"tracking.uri={uri}",
                "tracking.system_metrics=false",
                f"data.cache_dir={_shared_cache}",
            ],
        )
    final = execute(cfg, root, root / "run")
    return root / "run", final, uri


def options(run_dir, **kw):
    return evaluation.Options(checkpoint=str(run_dir), device="cpu", **kw)


def test_eval_reproduces_the_val_metrics_training_logged(trained, capsys):
    run_dir, final, _ = trained
    logged = {k.removeprefix("val/loss_") for k in final if k.startswith("val/loss_")}
    assert logged
    # The engine's eval: eval_batches (20) micro-batches of 2 windows, and its share of documents per genre.
    result = evaluation.run(options(run_dir, batch_size=2, max_batches=20, genre_docs=max(16, 20 * 2 // len(logged))))
    assert result["loss"] == pytest.approx(final["val/loss"], rel=1e-5)
    assert result["perplexity"] == pytest.approx(final["val/perplexity"], rel=1e-5)
    assert result["bpc"] == pytest.approx(final["val/bpc"], rel=1e-5)
    names = genre_metric_names(list(result["genres"]))  # the metrics' ASCII names
    assert set(names.values()) == logged
    for g, name in names.items():
        assert result["genres"][g]["loss"] == pytest.approx(final[f"val/loss_{name}"], rel=1e-5)
    assert result["unk_rate"] == 0.0
    out = capsys.readouterr().out
    assert f"last.pt (step {STEPS})" in out and f"loss {result['loss']:.4f}" in out


def test_by_default_eval_says_which_windows_the_runs_val_loss_scored_and_agrees_on_them(trained, capsys):
    """Eval's loss is over every val window; the run's val/loss over its
    first trainer.eval_batches micro-batches: 6.490 against 6.439 before
    eval said so. It scores those windows too, and agrees on them."""
    run_dir, final, _ = trained
    result = evaluation.run(options(run_dir))  # batch 16, all windows, as a user runs it
    run = result["run"]
    assert run["windows"] == min(20 * 2, result["all_windows"])  # eval_batches x micro-batch x 1 process
    assert run["loss"] == pytest.approx(final["val/loss"], rel=1e-5)
    assert run["logged"] == pytest.approx(final["val/loss"], rel=1e-6)  # the checkpoint's own eval
    out = capsys.readouterr().out
    assert (
        f"the run's val/loss at step {STEPS} ({final['val/loss']:.4f}) scored the first {run['windows']} windows" in out
    )
    assert "(trainer.eval_batches 20 x micro-batch 2 x 1 process(es)) in fp32" in out
    assert f"this checkpoint on them: {run['loss']:.4f} (fp32)" in out
    assert f"The loss above is over all {result['windows']} of {result['all_windows']} windows" in out


def test_a_genre_scored_on_few_tokens_is_flagged(trained, capsys):
    from lingmao.tracking.record import MIN_GENRE_TOKENS

    run_dir, _, _ = trained
    result = evaluation.run(options(run_dir))
    out = capsys.readouterr().out
    few = [g for g, r in result["genres"].items() if r["tokens"] < MIN_GENRE_TOKENS]
    assert few  # the test corpus is small
    for g in few:
        (row,) = [line for line in out.splitlines() if line.lstrip().startswith(g + " ")]
        assert row.rstrip().endswith("† few tokens"), row
    assert f"† fewer than {MIN_GENRE_TOKENS} tokens: a standard error of 0.1 nats or more" in out


def test_all_windows_by_default_and_fewer_with_max_batches(trained, capsys):
    run_dir, _, _ = trained
    everything = evaluation.run(options(run_dir, batch_size=2))
    first = evaluation.run(options(run_dir, batch_size=2, max_batches=1))
    assert first["windows"] == 2 < everything["windows"]
    assert everything["windows"] == (everything["tokens"] - 33) // 32 + 1  # every window of 33 tokens
    capsys.readouterr()


def test_log_true_adds_eval_metrics_to_the_checkpoints_run(trained, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    run_dir, _, uri = trained
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    client = MlflowClient(uri)
    before = client.get_run(state["mlflow_run_id"]).info
    assert cli.main(["eval", f"checkpoint={run_dir}", "device=cpu", "log=true"]) == 0
    out = capsys.readouterr().out
    assert f"run {state['mlflow_run_id']}" in out
    run = client.get_run(state["mlflow_run_id"])
    history = client.get_metric_history(run.info.run_id, "eval/loss")
    assert [m.step for m in history] == [STEPS]
    assert f"loss {history[0].value:.4f}" in out
    assert any(k.startswith("eval/loss_") for k in run.data.metrics)
    assert (run.info.status, run.info.end_time) == (before.status, before.end_time)  # the run's record stays
    logged = json.loads(Path(client.download_artifacts(run.info.run_id, "eval/corpus.json", str(tmp_path))).read_text())
    assert logged["step"] == STEPS and logged["loss"] == pytest.approx(history[0].value)


def test_a_jsonl_file_is_converted_to_the_corpus_script_and_scored_per_genre(trained, tmp_path, capsys):
    from opencc import OpenCC

    run_dir, _, _ = trained
    docs = [{"text": f"{LINES[i]}，{LINES[i + 1]}。" * 3, "genre": "诗" if i % 2 else "词"} for i in range(12)]
    simplified, traditional = tmp_path / "s.jsonl", tmp_path / "t.jsonl"
    to_traditional = OpenCC("s2t").convert
    simplified.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    traditional.write_text(
        "".join(json.dumps({**d, "text": to_traditional(d["text"])}, ensure_ascii=False) + "\n" for d in docs),
        encoding="utf-8",
    )
    assert to_traditional(docs[0]["text"]) != docs[0]["text"]  # the file really is in the other script
    a = evaluation.run(options(run_dir, data=str(simplified)))
    b = evaluation.run(options(run_dir, data=str(traditional)))
    assert a == b and a["unk_rate"] == 0.0
    assert set(a["genres"]) == {"诗", "词"} and a["genres"]["诗"]["docs"] == 6
    assert a["tokens"] == sum(len(d["text"]) + 1 for d in docs)  # each document and its <eos>
    assert "s.jsonl" in capsys.readouterr().out


def test_bad_input_is_one_line_naming_the_key(trained, tmp_path, capsys):
    run_dir, _, _ = trained
    assert evaluation.main([f"checkpoint={run_dir}", "batch=4"]) == 2
    assert "unknown key 'batch'; valid keys: checkpoint" in capsys.readouterr().err
    assert evaluation.main([f"checkpoint={run_dir}", f"data={tmp_path / 'absent.jsonl'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "absent.jsonl" in err and "not found" in err
    assert evaluation.main([f"checkpoint={run_dir}", "max_batches=-1"]) == 2
    assert "max_batches" in capsys.readouterr().err
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    torch.save({**state, "mlflow_run_id": ""}, tmp_path / "untracked.pt")
    assert evaluation.main([f"checkpoint={tmp_path / 'untracked.pt'}", "device=cpu", "log=true"]) == 2
    assert "has no MLflow run (trained with tracking.enabled=false)" in capsys.readouterr().err


def test_the_launch_folder_comes_from_the_run_folders_hydra_record(tmp_path):
    from lingmao.tracking.locate import launch_dir

    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    (tmp_path / "run" / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  runtime:\n    cwd: {tmp_path / 'here'}\n")
    assert launch_dir(tmp_path / "run" / "checkpoints" / "last.pt") == tmp_path / "here"
    assert launch_dir(tmp_path / "elsewhere" / "checkpoints" / "last.pt") is None
