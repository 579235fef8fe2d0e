"""`lingmao serve checkpoint=RUN_FOLDER` (or `run=A,B`): a local page to try
a model, or two side by side on the same prompt (lingmao.report.tryout).

Standard library only (http.server): the page is a prompt box, example
buttons, six settings and one column per model, which a few dozen lines
of HTML and a streamed response cover; Gradio (6.31) would add a 31 MB wheel and
15 more packages (pillow, orjson, httpx, ...) for the same page.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from lingmao.config import ConfigError
from lingmao.config.options import OptionError, asked_for_help, choice, doc, parse
from lingmao.data.prepare import normalizer
from lingmao.tracking.locate import WHICH, checkpoint_path
from lingmao.train.backend import DEVICES, pick_device
from lingmao.train.checkpoint import load_model, script_of


@dataclass
class Options:
    checkpoint: str = field(default="", metadata=doc("a run folder, a .pt file or an MLflow run id"))
    run: str = field(default="", metadata=doc("several side by side, comma-separated: run=A,B (not with checkpoint=)"))
    which: str = field(default="last", metadata=doc("of a run folder or run id: last | best (lowest val loss)"))
    host: str = field(default="127.0.0.1", metadata=doc("address to listen on (127.0.0.1: this machine only)"))
    port: int = field(default=8000, metadata=doc("port; 0: a free one"))
    device: str = field(default="auto", metadata=doc("auto | cpu | cuda | mps"))
    tracking_uri: str = field(
        default="", metadata=doc("MLflow store of a run id; default $MLFLOW_TRACKING_URI, else ./mlflow.db")
    )


SUMMARY = (
    "Open a local web page to try a model: a prompt, example 诗/词/曲 openings, the sampling settings, and "
    "the continuation as it is generated; with run=A,B the models continue the same prompt side by side."
)
EXAMPLES = [
    "lingmao serve checkpoint=outputs/2026-01-01/12-00-00        # then open http://127.0.0.1:8000/",
    "lingmao serve run=outputs/2026-01-01/12-00-00,outputs/2026-01-02/09-30-00 port=8001",
    "lingmao serve run=0123456789abcdef0123456789abcdef,multirun/2026-01-01/12-00-00/1 which=best",
]


def specs(o: Options) -> list[str]:
    if bool(o.checkpoint) == bool(o.run):
        raise OptionError("give checkpoint=A for one model or run=A,B for several side by side (one of the two)")
    found = [s.strip() for s in (o.run.split(",") if o.run else [o.checkpoint])]
    if any(not s for s in found):
        raise OptionError(f"run={o.run}: an empty item; write run=A,B")
    return found


def load_entries(o: Options) -> list:
    from lingmao.report.tryout import Entry

    device = pick_device(o.device)
    entries = []
    for spec in specs(o):
        path = checkpoint_path(spec, o.which, o.tracking_uri)
        model, tok, state = load_model(path, device)
        name = f"{spec} (step {state['progress']['step']}, {model.num_params() / 1e6:.2f}M params)"
        entries.append(Entry(name, model, tok, normalizer(script_of(state))))
    return entries


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if asked_for_help(argv, Options, "serve", SUMMARY, EXAMPLES):
        return 0
    from lingmao.report.tryout import make_server

    try:
        o = parse(Options, argv)
        choice("which", o.which, WHICH)
        choice("device", o.device, DEVICES)
        if not 0 <= o.port <= 65535:
            raise OptionError(f"port={o.port}: must be in [0, 65535]")
        entries = load_entries(o)
        server = make_server(entries, o.host, o.port)
    except (OptionError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the port is taken, or the address is not this machine's
        print(f"error: cannot listen on {o.host}:{o.port}: {e.strerror or e}; choose another port=", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(f"lingmao serve: http://{host}:{port}/ ({len(entries)} model(s); Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
