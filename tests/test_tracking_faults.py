"""Tracking under faults: a server that answers /health and hangs on its API,
a store that hangs mid-run, SIGKILL after a flush, two SIGTERMs during a wait.
No wait on the tracker may outlast its timeout, and no metric is lost: what
the store did not take is in the spool, and imports into a sqlite store."""

import http.server
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from lingmao.tracking.spool import SPOOL_NAME, import_spool, main, read_spool
from lingmao.tracking.tracker import Tracker

REPO = Path(__file__).resolve().parents[1]
HANG = 60.0  # seconds a hung request waits before the server lets it go: longer than any bound tested


@pytest.fixture
def hung_server(monkeypatch):
    """http://127.0.0.1:PORT: /health answers 200, /api/* hangs (up to HANG s)."""
    release = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def _reply(self):
            if self.path.startswith("/health"):
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"OK")
            else:
                release.wait(HANG)

        do_GET = do_POST = _reply

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    # A request let go at teardown fails at once instead of being retried for minutes.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(HANG) + 30))
    yield f"http://127.0.0.1:{server.server_address[1]}"
    release.set()
    server.shutdown()
    server.server_close()


def steps_in(records, key="train/loss"):
    return sorted(m[3] for r in records if r["op"] == "metrics" for m in r["metrics"] if m[0] == key)


def history(client, run_id, key="train/loss"):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_a_hung_server_never_blocks_flush_or_end_and_the_spool_imports(tmp_path, mlflow_db, hung_server, capsys):
    spool = tmp_path / "run" / SPOOL_NAME
    tr = Tracker(hung_server, "lingmao", "hung", spool=spool, timeout=1.0)
    tr.start_sending()
    tr.log_params({"optim": {"lr": 3e-4}})
    for step in range(1, 21):
        tr.log_metrics({"train/loss": 1 / step}, step)
    t = time.monotonic()
    tr.flush(wait=True)  # as before a checkpoint save
    assert time.monotonic() - t < 1.0 + 4.0  # the bound, plus the /health probe and thread switches
    assert "no answer within 1 s" in tr.offline and tr.run_id is None
    warned = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(warned) == 1 and warned[0].startswith(f"warning: MLflow store {hung_server} not reachable")
    assert f"python -m lingmao.tracking import {spool}" in warned[0]

    for step in range(21, 31):  # the run goes on: straight to the spool, no more waits
        tr.log_metrics({"train/loss": 1 / step}, step)
    t = time.monotonic()
    tr.flush(wait=True)
    tr.end("FINISHED")
    assert time.monotonic() - t < 1.0
    records = read_spool(spool)
    assert steps_in(records) == list(range(1, 31))
    assert [r["op"] for r in records][:2] == ["start", "params"] and records[-1]["op"] == "end"

    store = f"sqlite:///{mlflow_db}"
    assert main(["import", str(spool), "--tracking-uri", store]) == 0
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("lingmao").experiment_id])
    assert run.info.run_name == "hung" and run.info.status == "FINISHED"
    assert run.data.params == {"optim.lr": "0.0003"} and run.data.tags["mlflow.source.type"] == "LOCAL"
    assert history(client, run.info.run_id) == list(range(1, 31))


def test_a_store_that_hangs_mid_run_spools_the_send_in_flight(tmp_path, mlflow_db):
    """The store takes steps 1-10, then hangs inside a send: the wait gives
    up, the record in flight and those queued behind it are spooled, and the
    import continues the same run with every step once."""
    uri = f"sqlite:///{mlflow_db}"
    tr = Tracker(uri, "lingmao", "stalls", spool=tmp_path / SPOOL_NAME, timeout=1.0)
    for step in range(1, 11):
        tr.log_metrics({"train/loss": float(step)}, step)
    tr.flush(wait=True)
    assert tr.offline is None and tr.run_id
    release, real = threading.Event(), tr.client.log_batch

    def hangs(*args, **kwargs):
        release.wait(HANG)
        return real(*args, **kwargs)  # lands late: the import must not duplicate it

    tr.client.log_batch = hangs
    for step in range(11, 21):
        tr.log_metrics({"train/loss": float(step)}, step)
        tr.flush()  # one record per step: one in flight, the rest queued
    t = time.monotonic()
    tr.flush(wait=True)
    tr.end()
    assert time.monotonic() - t < 1.0 + 2.0 and "no answer within 1 s" in tr.offline
    records = read_spool(tr.spool)
    assert records[0]["run_id"] == tr.run_id and steps_in(records) == list(range(11, 21))
    release.set()  # the hung send returns and stores step 11 after all
    deadline = time.monotonic() + 10
    while 11 not in history(MlflowClient(uri), tr.run_id) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert read_spool(tr.spool) == records  # the late send wrote nothing more
    import_spool(tr.spool)
    client = MlflowClient(uri)
    assert [m.step for m in client.get_metric_history(tr.run_id, "train/loss")].count(11) == 1
    assert history(client, tr.run_id) == list(range(1, 21))
    assert client.get_run(tr.run_id).info.status == "FINISHED"


def run_script(code: str, tmp_path: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=tmp_path,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **env, "PYTHONPATH": str(REPO)},
    )


@pytest.mark.parametrize("store", ["sqlite", "hung"])
def test_sigkill_after_a_flush_loses_no_metric(tmp_path, mlflow_db, hung_server, store):
    uri = f"sqlite:///{mlflow_db}" if store == "sqlite" else hung_server
    bound = 60.0 if store == "sqlite" else 1.0  # a healthy store on a loaded machine takes seconds to open
    proc = run_script(
        f"""
        import os, signal
        from lingmao.tracking.tracker import Tracker
        tr = Tracker({uri!r}, "lingmao", "killed", spool={str(tmp_path / SPOOL_NAME)!r}, timeout={bound})
        tr.start_sending()
        for step in range(1, 41):
            tr.log_metrics({{"train/loss": 1 / step}}, step)
        tr.flush(wait=True)
        print(tr.run_id, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """,
        tmp_path,
        {},
    )
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err
    if store == "sqlite":
        assert "warning" not in err and history(MlflowClient(uri), out.split()[0]) == list(range(1, 41))
    else:
        assert steps_in(read_spool(tmp_path / SPOOL_NAME)) == list(range(1, 41))


def test_two_sigterms_stop_a_wait_on_a_hung_store(tmp_path, hung_server):
    """The engine's handler: the first SIGTERM asks for a stop after the step,
    the second raises at once, also inside a wait on the tracker."""
    proc = run_script(
        f"""
        import sys
        from lingmao.train.signals import Stopper
        from lingmao.tracking.tracker import Tracker
        tr = Tracker({hung_server!r}, "lingmao", "term", spool={str(tmp_path / SPOOL_NAME)!r}, timeout={HANG})
        tr.log_metrics({{"train/loss": 1.0}}, 1)
        with Stopper():
            print("waiting", flush=True)
            try:
                tr.flush(wait=True)
            except KeyboardInterrupt:
                print("interrupted", flush=True)
                sys.exit(3)
        print("returned", flush=True)
    """,
        tmp_path,
        {},
    )
    assert proc.stdout.readline().strip() == "waiting"
    time.sleep(2.0)  # inside flush's wait by now
    for _ in range(2):
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 3 and out.strip() == "interrupted", err


def test_training_against_a_hung_server_checkpoints_and_spools_every_step(
    tmp_path, shared_cache, hung_server, monkeypatch
):
    """End to end in-process: the checkpoints are written on time and the
    spool holds every step's metrics."""
    from hydra import compose, initialize_config_dir

    from lingmao.config.compose import CONF_DIR
    from lingmao.run import execute
    from lingmao.tracking import record

    class Bounded(Tracker):  # the run's tracker, with a short bound
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "timeout": 2.0})

    monkeypatch.setattr(record, "Tracker", Bounded)  # where the run opens its tracker
    monkeypatch.chdir(tmp_path)
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
                "checkpoint.every_steps=3",
                "trainer.progress=false",
                f"tracking.uri={hung_server}",
                "tracking.system_metrics=false",
            ],
        )
    t = time.monotonic()
    final = execute(cfg, tmp_path, tmp_path)
    assert final["step"] == 6 and time.monotonic() - t < 120
    assert {p.name for p in (tmp_path / "checkpoints").glob("step*.pt")} >= {"step00000003.pt", "step00000006.pt"}
    records = read_spool(tmp_path / SPOOL_NAME)
    assert steps_in(records) == list(range(1, 7))
    assert (records[-1]["op"], records[-1]["status"]) == ("end", "FINISHED")


# -- issue 28 ----------------------------------------------------------------------


@pytest.fixture
def not_mlflow(monkeypatch):
    """http://127.0.0.1:PORT: a web server that is not MLflow: every path a 404 HTML page."""
    page = b"<!DOCTYPE html><html><body><h1>404 Not Found</h1>" + b"<p>nothing here</p>" * 50 + b"</body></html>"

    class Handler(http.server.BaseHTTPRequestHandler):
        def _reply(self):
            self.send_response(404)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        do_GET = do_POST = _reply

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_server_that_is_not_mlflow_is_named_so_without_its_html(tmp_path, not_mlflow, capfd):
    from lingmao.tracking.store import unreachable

    assert unreachable(not_mlflow) == f"answered but is not an MLflow tracking server (404 on {not_mlflow}/health)"
    tr = Tracker(not_mlflow, "lingmao", "web", spool=tmp_path / SPOOL_NAME, system_metrics=True, timeout=30.0)
    tr.start_sending()
    tr.log_metrics({"train/loss": 1.0}, 1)
    tr.flush(wait=True)
    tr.end()
    err = capfd.readouterr().err
    assert f"warning: MLflow store {not_mlflow} answered but is not an MLflow tracking server (404 on" in err
    assert "not reachable" not in err and "<html" not in err.lower() and "DOCTYPE" not in err
    assert "Skip logging GPU metrics" not in err  # MLflow's INFO lines stay quiet whatever the store
    assert steps_in(read_spool(tmp_path / SPOOL_NAME)) == [1]


def test_a_server_that_is_down_is_still_not_reachable_without_mlflows_info_lines(tmp_path, capfd):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    tr = Tracker(uri, "lingmao", "down", spool=tmp_path / SPOOL_NAME, system_metrics=True, timeout=30.0)
    tr.start_sending()
    tr.flush(wait=True)
    tr.end()
    err = capfd.readouterr().err
    assert f"warning: MLflow store {uri} not reachable (" in err and "Connection refused" in err
    assert "INFO" not in err and "Skip logging GPU metrics" not in err


KILLED_ONCE_THE_RUN_IS_OPEN = """
import os, signal
from lingmao import run
from lingmao.train import engine
record_start = engine.Run.record_start
def record_then_die(self):
    record_start(self)
    assert self.tracker.run_id  # the MLflow run is open in the store
    os.kill(os.getpid(), signal.SIGKILL)
engine.Run.record_start = record_then_die
run.main()
"""


@pytest.mark.slow
def test_the_next_start_marks_a_run_whose_process_died_killed(tmp_path, mlflow_db, shared_cache):
    from test_resume import COMMON, cli_env, finish, mlflow_runs

    args = [*COMMON, "trainer.max_steps=2", "tracking.run_name=orphan"]
    env = cli_env(shared_cache)
    out, err = open(tmp_path / "dead.out", "w"), open(tmp_path / "dead.err", "w")
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_ONCE_THE_RUN_IS_OPEN, *args, "hydra.run.dir=dead"],
        cwd=tmp_path,
        env=env,
        stdout=out,
        stderr=err,
    )
    rc, _, err_text = finish(proc, tmp_path, "dead")
    assert rc == -signal.SIGKILL, err_text[-2000:]
    _, (dead,) = mlflow_runs(mlflow_db, "orphan")
    assert dead.info.status == "RUNNING"  # as SIGKILL left it: no checkpoint names it

    # The next start, in a folder of its own (a default one), closes it.
    next_run = subprocess.run(
        [sys.executable, "-m", "lingmao.run", *args, "tracking.run_name=next", "hydra.run.dir=next"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert next_run.returncode == 0, next_run.stderr[-2000:]
    assert f"note: MLflow run {dead.info.run_id} (orphan) was left RUNNING by process" in next_run.stderr
    client, (dead,) = mlflow_runs(mlflow_db, "orphan")
    assert dead.info.status == "KILLED" and dead.info.end_time
    assert "ended without closing" in dead.data.tags["lingmao.ended"]
    _, (alive,) = mlflow_runs(mlflow_db, "next")
    assert alive.info.status == "FINISHED"


def test_a_live_runs_marker_is_left_alone(tmp_path, mlflow_db, monkeypatch):
    """Two trackers on one store at once: the second never touches the first's run."""
    monkeypatch.setenv("LINGMAO_CACHE", str(tmp_path / "cache"))
    uri = f"sqlite:///{mlflow_db}"
    first = Tracker(uri, "lingmao", "first", spool=tmp_path / "a" / SPOOL_NAME)
    assert first.run_id
    second = Tracker(uri, "lingmao", "second", spool=tmp_path / "b" / SPOOL_NAME)
    assert second.run_id
    client = MlflowClient(uri)
    assert client.get_run(first.run_id).info.status == "RUNNING"
    second.end()
    first.end()
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert not list((tmp_path / "cache").rglob("*.json"))  # each tracker cleared its own marker at its end
