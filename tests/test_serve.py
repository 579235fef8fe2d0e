"""`lingmao serve`: the page in headless Chromium, as a person uses it (type a
prompt, press the button, read the Chinese that appears), for one model and
for two side by side; the stream is the continuation `generate` samples;
bad requests are refused naming what is wrong.

Chromium is driven over the DevTools protocol on a pipe
(--remote-debugging-pipe: JSON messages on fds 3 and 4), standard library
only. LINGMAO_SCREENSHOTS=DIR keeps a screenshot of each page."""

import base64
import fcntl
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from trained_run import trained_run

from lingmao import serve
from lingmao.data.prepare import normalizer
from lingmao.model.decoding import complete
from lingmao.model.incremental import pieces
from lingmao.report.tryout import Entry, make_server
from lingmao.train.checkpoint import load_model

REPO = Path(__file__).resolve().parents[1]
CJK = re.compile(r"[\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, _mlflow_template) -> Path:
    return trained_run(tmp_path_factory.getbasetemp() / "trained-run", _mlflow_template)


def test_the_stream_is_the_continuation_generate_samples(trained):
    """Token by token, past the 32-token context (the window slides), with
    sampling, top-k, top-p and the repetition penalty: what complete() returns."""
    model, tok, _ = load_model(trained / "run" / "checkpoints" / "last.pt", torch.device("cpu"))
    decoding = {"temperature": 0.9, "top_k": 20, "top_p": 0.9, "repetition_penalty": 1.2, "stop_at_eos": False}
    streamed = "".join(pieces(model, tok, "床前明月光，", 45, generator=torch.Generator().manual_seed(7), **decoding))
    (whole,) = complete(model, tok, "床前明月光，", 1, 45, generator=torch.Generator().manual_seed(7), **decoding)
    assert streamed == whole["text"] and len(streamed) > 32


@pytest.fixture(scope="module")
def server(trained):
    """The page's server in this process, on a free port."""
    model, tok, state = load_model(trained / "run" / "checkpoints" / "last.pt", torch.device("cpu"))
    httpd = make_server([Entry("last", model, tok, normalizer("simplified"))], "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _post(url: str, body) -> tuple[int, str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data), timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.parametrize(
    "body, message",
    [
        ({"prompt": ""}, "error: prompt: give the text to continue"),
        ({"prompt": "床前", "model": 2}, "error: model=2: choose 0 to 0"),
        ({"prompt": "床前", "top_p": 2}, "error: top_p=2.0: must be in [0.01, 1.0]"),
        ({"prompt": "床前", "max_new_tokens": "many"}, "error: max_new_tokens='many': expected a number"),
        (b"not json", "error: the body is not JSON"),
    ],
)
def test_a_bad_request_is_refused_naming_what_is_wrong(server, body, message):
    status, text = _post(server + "/generate", body)
    assert status == 400 and text.startswith(message), text


def test_a_traditional_prompt_is_continued_in_the_corpus_script(server):
    status, text = _post(server + "/generate", {"prompt": "牀前明月光，", "temperature": 0, "max_new_tokens": 10})
    greedy = _post(server + "/generate", {"prompt": "床前明月光，", "temperature": 0, "max_new_tokens": 10})
    assert status == 200 and CJK.search(text) and (status, text) == greedy


def test_the_command_refuses_in_one_line(trained, capsys):
    assert serve.main([]) == 2
    assert capsys.readouterr().err.startswith("error: give checkpoint=A for one model or run=A,B")
    assert serve.main([f"checkpoint={trained / 'run'}", "run=a,b"]) == 2
    assert "(one of the two)" in capsys.readouterr().err
    assert serve.main([f"run={trained / 'run'},"]) == 2
    assert "an empty item" in capsys.readouterr().err


# -- the page in the browser ---------------------------------------------------------


class Browser:
    """Headless Chromium over the DevTools protocol on a pipe: one page."""

    def __init__(self, profile: Path):
        chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
        if not chromium:
            pytest.fail("headless Chromium is needed for the serve page test: apt-get install chromium")
        to_browser, self._out = os.pipe()
        self._in, from_browser = os.pipe()
        # fds 3 and 4 are the protocol's; copies at >= 10 first, so dup2 cannot overwrite one with the other
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser, from_browser)]

        def fds():
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        args = ["--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--window-size=1280,900"]
        self.proc = subprocess.Popen(
            [chromium, *args, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(3, 4),
            preexec_fn=fds,
            start_new_session=True,
        )
        for fd in (to_browser, from_browser, *high):
            os.close(fd)
        self._id, self._buffer, self.session = 0, b"", None

    def call(self, method: str, timeout: float = 30, **params) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._in], [], [], left)[0]:
                pytest.fail(f"Chromium did not answer {method} within {timeout:.0f}s")
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                pytest.fail(f"Chromium closed the pipe during {method}")
            self._buffer += chunk

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", url=url)["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.wait_for("document.readyState === 'complete' && !!document.getElementById('go')", 30)

    def js(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, seconds: float):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if value := self.js(expression):
                return value
            time.sleep(0.2)
        pytest.fail(f"the page never had {expression} within {seconds:.0f}s")

    def click(self, selector: str) -> None:
        """A real mouse click at the element's centre."""
        box = self.js(
            f"(() => {{ const r = document.querySelector({selector!r}).getBoundingClientRect(); "
            f"return [r.x + r.width / 2, r.y + r.height / 2]; }})()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def type(self, selector: str, text: str) -> None:
        self.click(selector)
        self.call("Input.insertText", text=text)  # as the keyboard's text input (IME) delivers it

    def screenshot(self, name: str) -> None:
        keep = os.environ.get("LINGMAO_SCREENSHOTS")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            png = self.call("Page.captureScreenshot", format="png")["data"]
            (Path(keep) / name).write_bytes(base64.b64decode(png))

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for fd in (self._in, self._out):
            os.close(fd)


def _serve(args: list[str], cwd: Path):
    """`lingmao serve ARGS port=0` as a user starts it; (process, the URL it printed)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lingmao.cli", "serve", *args, "port=0"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if not select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
            break
        line = proc.stdout.readline()
        if found := re.search(r"lingmao serve: (http://\S+/)", line):
            return proc, found.group(1)
        if not line and proc.poll() is not None:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"lingmao serve printed no URL within 90s: {proc.stdout.read()[-2000:]}")


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)


@pytest.mark.slow
@pytest.mark.parametrize(
    "models",
    [["checkpoints/last.pt"], ["checkpoints/last.pt", "checkpoints/step00000020.pt"]],
    ids=["one run", "two runs"],
)
def test_a_prompt_typed_into_the_page_is_continued_in_chinese_by_each_model(trained, tmp_path, models):
    args = [f"checkpoint={models[0]}"] if len(models) == 1 else [f"run={','.join(models)}"]
    proc, url = _serve(args, trained / "run")
    browser = Browser(tmp_path / "profile")
    try:
        browser.open(url)
        assert browser.js("document.querySelectorAll('.col').length") == len(models)
        assert browser.js("[...document.querySelectorAll('.example')].map(b => b.textContent[0]).join('')") == "诗词曲"
        browser.type("#prompt", "举头望明月，")
        browser.js("document.getElementById('seed').value = 1")  # a seed where the two models part
        browser.click("#go")
        browser.wait_for("document.body.dataset.state === 'done'", 60)
        outputs = browser.js("[...document.querySelectorAll('.out')].map(o => o.textContent)")
        names = browser.js("[...document.querySelectorAll('.col h2')].map(h => h.textContent)")
        browser.screenshot(f"serve-{len(models)}.png")
    finally:
        browser.close()
        _stop(proc)
    assert len(outputs) == len(models)
    for out in outputs:
        assert out.startswith("举头望明月，") and CJK.search(out[len("举头望明月，") :]), outputs
    assert [name.split(" (step")[0] for name in names] == models  # each column says which model it is
    if len(models) == 2:  # two models side by side: each its own continuation of the same prompt
        assert "(step 30," in names[0] and "(step 20," in names[1] and outputs[0] != outputs[1]
