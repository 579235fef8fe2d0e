"""As a user would: train a 2-run sweep, start `mlflow ui` over its store,
open the link the sweep printed in headless Chromium and read from the
rendered page its runs table (the varied LR, hardware, model, val/loss and
samples/s as columns, sorted by val/loss) and the chart view's section
order (train and val first).

Needs the Debian package `chromium` (.ci/run installs it). Set
LINGMAO_SCREENSHOTS=DIR to keep the screenshot and the page's DOM."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SWEEP = [
    "-m",
    "hardware=cpu",
    "model=tiny",
    "model.context_length=32",
    "trainer.max_steps=10",
    "trainer.eval_every=5",
    "trainer.log_every=5",
    "trainer.eval_batches=2",
    "trainer.progress=false",
    "hardware.batch=4",
    "optim.lr=1e-3,3e-3",
]
COLUMN = re.compile(r'role="columnheader"[^>]*col-id="([^"]+)"[^>]*style="left: (\d+)px')
ROW = re.compile(r'role="row" row-index="(\d+)" row-id="([0-9a-f]{32})"')
SECTION = re.compile(r'data-testid="experiment-view-compare-runs-section-header"[^>]*>(.*?)<span', re.S)


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not found:
        pytest.fail("headless Chromium is needed for the MLflow UI test: apt-get install chromium")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow ui exited with {proc.returncode}: {proc.stdout.read()[-2000:]}")
        try:
            urllib.request.urlopen(url + "/health", timeout=2).close()
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow ui did not answer {url}/health within {seconds:.0f}s")


def _browser(
    chromium: str, profile: Path, *args: str, timeout: int = 120, width: int = 1600
) -> subprocess.CompletedProcess:
    # The virtual-time budget lets the page's requests and rendering finish
    # before the DOM or the screenshot is taken; the timeout bounds it all.
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--window-size={width},1400",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=60000",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _sections(dom: str) -> list[str]:
    """The chart view's section headers in page order, without their counts: ['train', 'val', ...]."""
    names = [re.sub(r"<[^>]+>", " ", m.group(1)) for m in SECTION.finditer(dom)]
    return [re.sub(r"\s*\(\d+\)\s*$", "", " ".join(n.split())) for n in names]


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """The link the sweep printed, rewritten to a `mlflow ui` on a free port."""
    from conftest import build_training_cache

    tmp_path = tmp_path_factory.mktemp("ui")
    cache = build_training_cache(tmp_path / "cache")
    env = {**os.environ, "LINGMAO_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "lingmao.run", *SWEEP],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    links = re.findall(r"then open (http://127\.0\.0\.1:5000/\S+)", proc.stdout)
    assert links, proc.stdout[-3000:]
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "ui",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )  # its workers share the group: stopped together
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", server, 120)
        yield links[-1].replace("127.0.0.1:5000", f"127.0.0.1:{port}"), f"sqlite:///{tmp_path / 'mlflow.db'}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=20)


def _keep(*files: Path) -> None:
    keep = os.environ.get("LINGMAO_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy(f, keep)


@pytest.mark.slow
def test_the_printed_link_opens_the_runs_table_with_the_swept_lr_sorted_by_val_loss(ui, tmp_path):
    from mlflow.tracking import MlflowClient

    chromium = _chromium()
    link, uri = ui
    assert "viewStateShareKey=" in link and "compareRunsMode=TABLE" in link
    dom = _browser(chromium, tmp_path / "profile", "--dump-dom", link).stdout
    assert "does not exist" not in dom and "share key is invalid" not in dom
    # Placed by their left offsets (the grid's DOM order need not be the visual one).
    columns = [c for c, _ in sorted(set(COLUMN.findall(dom)), key=lambda c: int(c[1]))]
    wanted = ["tags.`hardware`", "tags.`model`", "params.`config.optim.lr`", "metrics.`val/loss`"]
    wanted.append("metrics.`mean_samples_per_sec`")
    assert [c for c in columns if c in wanted] == wanted, columns  # visible, in this order
    client = MlflowClient(uri)
    runs = client.search_runs([re.search(r"experiments/(\d+)/", link).group(1)])
    by_loss = [r.info.run_id for r in sorted(runs, key=lambda r: r.data.metrics["val/loss"])]
    rows = dict(sorted({int(i): run for i, run in ROW.findall(dom)}.items()))
    assert list(rows.values()) == by_loss  # the table's rows by val/loss, lowest first
    shot = tmp_path / "runs_table.png"
    _browser(chromium, tmp_path / "profile", f"--screenshot={shot}", link)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "runs_table.html").write_text(dom, encoding="utf-8")
    _keep(shot, tmp_path / "runs_table.html")


@pytest.mark.slow
def test_the_printed_link_opens_on_the_train_and_val_charts(ui, tmp_path):
    chromium = _chromium()
    ui, _ = ui
    ui = ui.replace("compareRunsMode=TABLE", "compareRunsMode=CHART")  # the chart view, one click away
    dom = _browser(chromium, tmp_path / "profile", "--dump-dom", ui).stdout
    sections = _sections(dom)
    assert sections[:2] == ["train", "val"], sections
    # Nothing but the chart sections lingmao names sorts before MLflow's own.
    assert sections[-2:] == ["Model metrics", "System metrics"], sections
    first, second = [m.start() for m in SECTION.finditer(dom)][:2]
    assert "train/loss" in dom[first:second]  # the train section holds the training loss chart

    shot = tmp_path / "chart_view.png"
    _browser(chromium, tmp_path / "profile", f"--screenshot={shot}", ui)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000
    (tmp_path / "chart_view.html").write_text(dom, encoding="utf-8")
    _keep(shot, tmp_path / "chart_view.html")
