"""Tracking: records reach the store in order from a sender thread, sqlite
locks are retried, an unreachable store spools to JSONL that imports later."""

import json
import socket
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from lingmao.tracking import store as tracking_store
from lingmao.tracking.provenance import sweep_id
from lingmao.tracking.record import compact
from lingmao.tracking.spool import SPOOL_NAME, import_spool, main, read_spool
from lingmao.tracking.store import TrackingError
from lingmao.tracking.tracker import Tracker


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


@pytest.fixture
def fast_http(monkeypatch):
    """MLflow's HTTP client gives up on an unreachable server at once."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")


def history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_compact_numbers_in_run_names():
    assert [compact(x) for x in (3e-4, 0.0003, 1.5e-3, 2.345e-5, 1e-2, 0.1, 16, 1e5)] == [
        "3e-4",
        "3e-4",
        "1.5e-3",
        "2.35e-5",
        "0.01",
        "0.1",
        "16",
        "1e5",
    ]


def test_sweep_id_is_readable_and_per_folder(tmp_path):
    a = sweep_id(tmp_path / "multirun" / "2025-06-01" / "12-00-00")
    assert a.startswith("2025-06-01_12-00-00-") and a == sweep_id(tmp_path / "multirun/2025-06-01/12-00-00")
    assert a != sweep_id(tmp_path / "elsewhere" / "2025-06-01" / "12-00-00")


def test_everything_reaches_the_store_in_order(tmp_path, mlflow_db, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    uri = f"sqlite:///{mlflow_db}"
    tr = Tracker(uri, "lingmao", "cpu-tiny-lr3e-4", spool=tmp_path / SPOOL_NAME, system_metrics=True)
    tr.start_sending()  # as the engine does after its first step
    tr.log_params({"config": {"optim": {"lr": 3e-4}}, "note": "x" * 7000})
    tr.set_tags({"hardware": "cpu", "sweep.job": 3})
    for step in range(1, 1001):  # more than one log_batch's worth before the flush
        tr.log_metrics({"train/loss": 1 / step}, step)
    tr.flush()
    (tmp_path / "samples.jsonl").write_text('{"text": "床前明月光"}\n', encoding="utf-8")
    tr.log_artifact(tmp_path / "samples.jsonl")
    tr.log_dict({"preset": "cpu"}, "plan.json")
    time.sleep(0.7)  # a few system-metric samples
    tr.end()
    client = MlflowClient(uri)
    run = client.get_run(tr.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "cpu-tiny-lr3e-4"
    assert run.data.params["config.optim.lr"] == "0.0003" and len(run.data.params["note"]) == 6000
    assert run.data.tags["hardware"] == "cpu" and run.data.tags["sweep.job"] == "3"
    assert history(client, tr.run_id, "train/loss") == [(s, 1 / s) for s in range(1, 1001)]
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    assert {a.path for a in client.list_artifacts(tr.run_id)} == {"samples.jsonl", "plan.json"}
    # artifacts live beside the store, not in whatever folder the first run started in
    assert (tmp_path / "mlartifacts" / "lingmao").is_dir()
    assert tr.offline is None and not (tmp_path / SPOOL_NAME).exists()


def test_unreachable_store_spools_and_the_import_replays_it(tmp_path, mlflow_db, fast_http, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dead = f"http://127.0.0.1:{closed_port()}"
    spool = tmp_path / "run" / SPOOL_NAME
    tr = Tracker(dead, "lingmao", "offline-run", spool=spool)
    assert tr.run_id is None  # waits for the sender thread's attempt to open the run
    assert "refused" in tr.offline.lower()
    assert not hasattr(tr, "client")  # told by one /health probe, not by minutes of MLflow's HTTP retries
    assert "not reachable" in capsys.readouterr().err
    tr.log_params({"a": 1})
    tr.set_tags({"hardware": "cpu"})
    for step in range(1, 31):
        tr.log_metrics({"train/loss": 10 - step / 10, "lr": 1e-3}, step)
    (tmp_path / "tok.json").write_text("{}")
    tr.log_artifact(tmp_path / "tok.json")
    tr.end("FINISHED")
    err = capsys.readouterr().err
    assert f"python -m lingmao.tracking import {spool} --tracking-uri {dead}" in err
    ops = [r["op"] for r in read_spool(spool)]
    assert ops == ["start", "params", "tags", "artifact", "metrics", "end"]

    store = f"sqlite:///{mlflow_db}"
    assert main(["import", str(spool), "--tracking-uri", store]) == 0
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("lingmao").experiment_id])
    assert run.info.run_name == "offline-run" and run.info.status == "FINISHED"
    assert run.data.params == {"a": "1"} and run.data.tags["hardware"] == "cpu"
    assert history(client, run.info.run_id, "train/loss") == [(s, 10 - s / 10) for s in range(1, 31)]
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["tok.json"]
    assert main(["import", str(spool), "--tracking-uri", store]) == 2  # once only
    assert "already imported" in capsys.readouterr().err


def test_store_lost_mid_run_continues_the_same_run_on_import(tmp_path, mlflow_db, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{mlflow_db}"
    tr = Tracker(uri, "lingmao", "flaky", spool=tmp_path / SPOOL_NAME)
    for step in range(1, 11):
        tr.log_metrics({"train/loss": float(step)}, step)
    tr.flush()
    assert tr.run_id  # waits for the sender thread to open the run
    real = tr.client.log_batch

    def failing(run_id, metrics=(), **kw):  # the store goes away after step 10
        if any(m.step > 10 for m in metrics):
            raise ConnectionError("server gone")
        return real(run_id, metrics=metrics, **kw)

    tr.client.log_batch = failing
    for step in range(11, 21):
        tr.log_metrics({"train/loss": float(step)}, step)
    tr.flush()
    tr.end()
    assert "server gone" in tr.offline
    assert read_spool(tr.spool)[0]["run_id"] == tr.run_id
    client = MlflowClient(uri)
    assert [s for s, _ in history(client, tr.run_id, "train/loss")] == list(range(1, 11))
    import_spool(tr.spool)  # into the store the spool names
    assert [s for s, _ in history(client, tr.run_id, "train/loss")] == list(range(1, 21))
    assert client.get_run(tr.run_id).info.status == "FINISHED"


def test_locked_sqlite_is_retried_other_errors_are_not(monkeypatch):
    monkeypatch.setattr(tracking_store.time, "sleep", lambda s: None)
    calls = []

    def locked_twice():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert tracking_store._retry_locked(locked_twice) == "ok" and len(calls) == 3

    def always_locked():
        calls.append(1)
        raise RuntimeError("database is locked")

    calls.clear()
    with pytest.raises(RuntimeError, match="locked"):
        tracking_store._retry_locked(always_locked)
    assert len(calls) == tracking_store._LOCKED_RETRIES + 1

    def other():
        calls.append(1)
        raise ValueError("bad param")

    calls.clear()
    with pytest.raises(ValueError):
        tracking_store._retry_locked(other)
    assert len(calls) == 1


def test_parallel_writers_into_one_sqlite_lose_nothing(tmp_path, mlflow_db, monkeypatch):
    """Four trackers flushing at once into one sqlite file (its own connections
    each), as parallel sweep jobs do."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{mlflow_db}"
    trackers = [Tracker(uri, "lingmao", f"w{i}") for i in range(4)]
    for flush in range(10):
        for tr in trackers:
            for step in range(flush * 50, flush * 50 + 50):
                tr.log_metrics({"a": step, "b": -step}, step)
            tr.flush()
    for tr in trackers:
        tr.end()
    client = MlflowClient(uri)
    for tr in trackers:
        assert not tr.offline and not tr.errors
        assert [s for s, _ in history(client, tr.run_id, "b")] == list(range(500))


def test_spool_reader_names_the_bad_line(tmp_path):
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"op": "params"}\n')
    with pytest.raises(TrackingError, match=r"x.jsonl:1: not a lingmao MLflow spool"):
        read_spool(bad)
    spool = tmp_path / SPOOL_NAME
    spool.write_text('{"op": "start"}\nnot json\n{"op": "end"}\n')
    with pytest.raises(TrackingError, match=rf"{SPOOL_NAME}:2: not JSON"):
        read_spool(spool)
    spool.write_text('{"op": "start"}\n{"op": "metrics", "metrics": []}\n{"op": "me')  # cut by a kill
    assert [r["op"] for r in read_spool(spool)] == ["start", "metrics"]
    with pytest.raises(TrackingError, match="no spool at"):
        read_spool(tmp_path / "missing.jsonl")


def test_training_runs_against_an_unreachable_store(tmp_path, shared_cache, fast_http, capsys, monkeypatch):
    """End to end in-process: the run trains, the spool holds its metrics."""
    from hydra import compose, initialize_config_dir

    from lingmao.config.compose import CONF_DIR
    from lingmao.run import execute

    monkeypatch.chdir(tmp_path)
    dead = f"http://127.0.0.1:{closed_port()}"
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "hardware=cpu",
                "model=tiny",
                "model.context_length=32",
                "hardware.batch=4",
                "hardware.accumulation=1",
                "trainer.max_steps=6",
                "trainer.eval_every=3",
                "trainer.log_every=1",
                "trainer.eval_batches=2",
                "trainer.progress=false",
                f"tracking.uri={dead}",
                "tracking.system_metrics=false",
            ],
        )
    final = execute(cfg, tmp_path, tmp_path)
    assert final["step"] == 6
    err = capsys.readouterr().err
    assert err.count(f"python -m lingmao.tracking import {tmp_path / SPOOL_NAME}") == 2  # at start and at end
    records = read_spool(tmp_path / SPOOL_NAME)
    steps = {m[3] for r in records if r["op"] == "metrics" for m in r["metrics"] if m[0] == "train/loss"}
    assert steps == set(range(1, 7))
    assert any(r["op"] == "params" and r["params"]["config.model.name"] == "tiny" for r in records)
    assert (records[-1]["op"], records[-1]["status"]) == ("end", "FINISHED")
    assert json.loads((tmp_path / SPOOL_NAME).read_text().splitlines()[0])["uri"] == dead


def test_the_store_opens_only_when_the_start_up_is_over(tmp_path, mlflow_db, monkeypatch):
    from lingmao.tracking import sender

    opened = threading.Event()
    real_open = sender.Sender._open
    monkeypatch.setattr(sender.Sender, "_open", lambda self: (opened.set(), real_open(self)))
    tr = Tracker(f"sqlite:///{mlflow_db}", "lingmao", "late", spool=tmp_path / SPOOL_NAME)
    tr.log_metrics({"train/loss": 1.0}, 1)
    tr.flush()  # queued, not sent: MLflow is not even imported yet
    assert not opened.wait(0.3)
    tr.start_sending()
    assert opened.wait(10) and tr.run_id
    tr.end()
    assert history(MlflowClient(f"sqlite:///{mlflow_db}"), tr.run_id, "train/loss") == [(1, 1.0)]

    opened.clear()  # a tracker nobody starts opens on its own after _OPEN_DELAY
    monkeypatch.setattr(sender, "_OPEN_DELAY", 0.2)
    idle = Tracker(f"sqlite:///{mlflow_db}", "lingmao", "idle", spool=tmp_path / SPOOL_NAME)
    assert opened.wait(10) and idle.run_id
    idle.end()


def test_a_fresh_store_opens_quietly_and_the_run_names_its_source(tmp_path, capfd, monkeypatch):
    """MLflow's INFO lines (creating the tables of a new sqlite store) would
    land in the middle of the progress bar; the run gets MLflow's standard
    source tags and lingmao's version."""
    import importlib.metadata
    import subprocess

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    tr = Tracker(uri, "lingmao", "quiet", spool=tmp_path / SPOOL_NAME, system_metrics=True)
    assert tr.run_id
    tr.end()
    err = capfd.readouterr().err
    assert "Creating initial MLflow database tables" not in err and " INFO " not in err
    tags = MlflowClient(uri).get_run(tr.run_id).data.tags
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"] and tags["mlflow.user"]
    assert tags["lingmao.version"] == importlib.metadata.version("lingmao")
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=Path(tracking_store.__file__).parent, capture_output=True, text=True
    ).stdout.strip()
    assert tags.get("mlflow.source.git.commit") == (head or None)


def test_the_corpus_is_logged_as_a_dataset_input(tmp_path, mlflow_db, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{mlflow_db}"
    tr = Tracker(uri, "lingmao", "data", spool=tmp_path / SPOOL_NAME)
    tr.log_input_dataset(
        "poems-zh", "3fa2c1d0e9b8a7f6", "hf://chinese-poetry", n_records=1200, profile={"train_tokens": 52000}
    )
    tr.log_input_dataset("val", "0123456789abcdef" * 3, str(tmp_path / "val.jsonl"), context="eval")
    tr.end()
    inputs = MlflowClient(uri).get_run(tr.run_id).inputs.dataset_inputs
    inp, val = sorted(inputs, key=lambda i: i.dataset.name)
    assert (inp.dataset.name, inp.dataset.digest, inp.dataset.source_type) == (
        "poems-zh",
        "3fa2c1d0e9b8a7f6",
        "hugging_face",
    )
    assert (val.dataset.source_type, len(val.dataset.digest), val.tags[0].value) == ("local", 36, "eval")
    assert json.loads(inp.dataset.profile) == {"num_records": 1200, "train_tokens": 52000}
    assert json.loads(inp.dataset.source) == {"uri": "hf://chinese-poetry"}
    assert [(t.key, t.value) for t in inp.tags] == [("mlflow.data.context", "training")]
    assert not tr.offline and not tr.errors


def test_params_changed_on_resume_are_kept_beside_the_first_ones(tmp_path, mlflow_db, monkeypatch):
    """MLflow refuses to change a param; a resumed run whose lr changed keeps
    the value it started with and records the new one under the resume step."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{mlflow_db}"
    first = Tracker(uri, "lingmao", "resumed", spool=tmp_path / SPOOL_NAME)
    first.log_params({"optim": {"lr": 3e-4}, "seed": 1})
    first.end()
    for lr, resumed_key in ((1e-3, "resumed.40.optim.lr"), (2e-3, "resumed.40.optim.lr.2")):
        again = Tracker(uri, "lingmao", "resumed", spool=tmp_path / SPOOL_NAME, run_id=first.run_id)
        again.log_params({"optim": {"lr": lr}, "seed": 1, "trainer": {"max_steps": 80}}, step=40)
        again.end()
        assert again.run_id == first.run_id and not again.offline and not again.errors
        params = MlflowClient(uri).get_run(first.run_id).data.params
        assert params["optim.lr"] == "0.0003" and params[resumed_key] == str(lr)
        assert params["seed"] == "1" and params["trainer.max_steps"] == "80"
    assert "resumed.40.seed" not in params  # unchanged keys are not repeated


def test_stores_with_a_scheme_or_a_profile_name_are_not_made_into_folders(tmp_path):
    from lingmao.tracking.store import resolve_uri

    for uri in ("databricks", "databricks-uc", "uc:", "file:///tmp/x", "http://h:5000", "postgresql://u@h/db"):
        assert resolve_uri(uri, tmp_path) == uri
    assert resolve_uri("mlruns", tmp_path) == str((tmp_path / "mlruns").resolve())
    assert resolve_uri("sqlite:///m.db", tmp_path) == f"sqlite:///{(tmp_path / 'm.db').resolve()}"


def test_metrics_of_slow_steps_reach_the_store_within_seconds(tmp_path, mlflow_db, monkeypatch):
    """A CPU step of the small model takes ~12 s: waiting for a full batch of
    900 values kept the UI empty for the first ten minutes of a run."""
    import lingmao.tracking.tracker as tracking

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tracking, "FLUSH_SECONDS", 0.3)
    uri = f"sqlite:///{mlflow_db}"
    tr = Tracker(uri, "lingmao", "slow", spool=tmp_path / SPOOL_NAME)
    tr.start_sending()
    tr.log_metrics({"train/loss": 9.0}, 10)
    time.sleep(0.4)
    tr.log_metrics({"train/loss": 8.0}, 20)  # the clock, not the count, sends these two
    client = MlflowClient(uri)
    deadline = time.time() + 20
    while time.time() < deadline and len(history(client, tr.run_id, "train/loss") if tr.run_id else []) < 2:
        time.sleep(0.2)
    assert history(client, tr.run_id, "train/loss") == [(10, 9.0), (20, 8.0)]
    tr.end()
