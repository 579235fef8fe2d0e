"""The page of `lingmao serve`: a prompt box, genre-typical example prompts,
the sampling settings, and each model's continuation of the same prompt
side by side, shown as it is generated.

The standard library's ThreadingHTTPServer, one thread per request: the
page (tryout.html) asks each model for its continuation in its own request
and reads the response body as it arrives, a character at a time
(HTTP/1.0: the body ends when the connection closes, so no chunking is
needed). One generation per model at a time; torch releases the GIL, so two
models generate at once.
"""

from __future__ import annotations

import json
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from lingmao.model.card import PROMPTS
from lingmao.model.incremental import pieces

PAGE = Path(__file__).with_name("tryout.html")
MAX_BODY = 64 * 1024  # bytes of a request: a prompt and six numbers
MAX_PROMPT = 2000  # characters
# name -> (default, type, lowest, highest): what the page's settings may be
SETTINGS = {
    "max_new_tokens": (64, int, 1, 1024),
    "temperature": (1.0, float, 0.0, 10.0),
    "top_k": (50, int, 0, 100000),
    "top_p": (0.95, float, 0.01, 1.0),
    "repetition_penalty": (1.2, float, 0.01, 10.0),
    "seed": (1337, int, 0, 2**63 - 1),
}


@dataclass
class Entry:
    """One model on the page: its name and what generates with it."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    normalise: object  # the corpus' script conversion of a prompt
    lock: threading.Lock = field(default_factory=threading.Lock)


def settings(body: dict) -> dict:
    """The request's sampling settings, each checked; ValueError names the key and what is valid."""
    out = {}
    for name, (default, kind, low, high) in SETTINGS.items():
        value = body.get(name, default)
        try:
            value = kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}={value!r}: expected a number") from None
        if not low <= value <= high:
            raise ValueError(f"{name}={value}: must be in [{low}, {high}]")
        out[name] = value
    return out


def page(entries: list[Entry]) -> bytes:
    """tryout.html with the models, example prompts and default settings filled in."""
    config = {
        "models": [e.name for e in entries],
        "prompts": {g: PROMPTS[g] for g in ("诗", "词", "曲")},
        "settings": {name: spec[0] for name, spec in SETTINGS.items()},
    }
    data = json.dumps(config, ensure_ascii=False).replace("</", "<\\/")  # cannot close the script element
    return PAGE.read_text(encoding="utf-8").replace("/*CONFIG*/null", data).encode("utf-8")


class Handler(BaseHTTPRequestHandler):
    entries: list[Entry] = []  # set on the subclass make_server builds
    server_version = "lingmao-serve"

    def log_message(self, fmt: str, *args) -> None:  # one line per request on stderr, not the default's
        if not str(args[1] if len(args) > 1 else "").startswith("2"):
            sys.stderr.write(f"serve: {self.command} {self.path}: {fmt % args}\n")

    def _reply(self, status: int, body: bytes, kind: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path in ("/", "/index.html"):
            self._reply(200, page(self.entries), "text/html; charset=utf-8")
        elif self.path == "/health":
            self._reply(200, b"ok")
        else:
            self._reply(404, b"not found: the page is at /")

    def do_POST(self) -> None:
        if self.path != "/generate":
            return self._reply(404, b"not found: POST /generate")
        try:
            entry, prompt, decoding = self._request()
        except ValueError as e:
            return self._reply(400, f"error: {e}".encode())
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")  # a browser shows the text as it comes
        self.end_headers()
        self._stream(entry, prompt, decoding)

    def _request(self) -> tuple[Entry, str, dict]:
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_BODY:
            raise ValueError(f"a JSON body of 1 to {MAX_BODY} bytes is expected")
        try:
            body = json.loads(self.rfile.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError("the body is not JSON") from None
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
        index = body.get("model", 0)
        if not isinstance(index, int) or not 0 <= index < len(self.entries):
            raise ValueError(f"model={index!r}: choose 0 to {len(self.entries) - 1}")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > MAX_PROMPT:
            raise ValueError(f"prompt: give the text to continue (1 to {MAX_PROMPT} characters)")
        return self.entries[index], prompt, settings(body)

    def _stream(self, entry: Entry, prompt: str, decoding: dict) -> None:
        generator = torch.Generator().manual_seed(decoding.pop("seed"))
        budget = decoding.pop("max_new_tokens")
        with entry.lock:
            try:
                prompt = entry.normalise(prompt)
                for piece in pieces(entry.model, entry.tokenizer, prompt, budget, generator=generator, **decoding):
                    self.wfile.write(piece.encode("utf-8"))
                    self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):  # the page was closed or reloaded mid-way
                pass


def make_server(entries: list[Entry], host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """The server (not yet serving); port 0: a free one, `server.server_address[1]`."""
    handler = type("TryoutHandler", (Handler,), {"entries": list(entries)})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True  # a request still streaming does not keep the process alive at Ctrl-C
    return server
