"""`lingmao export checkpoint=RUN_FOLDER [out=DIR] [mlflow=true]`: the trained
model in the formats other tools load.

A Hugging Face model folder (lingmao.model.hf: GPT-NeoX for a rotary model,
GPT-2 for learned positions; standard transformers code, no custom code),
with a model card written from the checkpoint and its MLflow run; and with
mlflow=true the checkpoint logged as its run's MLflow model
(lingmao.tracking.pyfunc), for a run trained before runs logged one.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lingmao.config import ConfigError
from lingmao.config.options import OptionError, asked_for_help, choice, doc, parse
from lingmao.config.rules import LABEL
from lingmao.data.prepare import normalizer
from lingmao.tracking.locate import WHICH, checkpoint_path
from lingmao.train.checkpoint import load_model, script_of

HF_MISSING = "the Hugging Face export needs transformers and safetensors: pip install 'lingmao[hf]'"


@dataclass
class Options:
    checkpoint: str = field(default="", metadata=doc("a run folder, a .pt file or an MLflow run id (required)"))
    which: str = field(default="last", metadata=doc("of a run folder or run id: last | best (lowest val loss)"))
    out: str = field(default="", metadata=doc("the model folder to write; default: hf/ in the run folder"))
    hf: bool = field(default=True, metadata=doc("write the Hugging Face folder (false: only mlflow=true's model)"))
    mlflow: bool = field(default=False, metadata=doc("also log the checkpoint as its MLflow run's model (serves)"))
    register: str = field(default="", metadata=doc("with mlflow=true: register the model under this name"))
    samples: bool = field(default=True, metadata=doc("put a continuation of a 诗, 词 and 曲 prompt in the card"))
    max_new_tokens: int = field(default=48, metadata=doc("tokens per card sample"))
    tracking_uri: str = field(
        default="", metadata=doc("MLflow store of the run; default: the one the run logged to, else ./mlflow.db")
    )


SUMMARY = (
    "Export a checkpoint as a Hugging Face model folder (config.json, model.safetensors, tokenizer, "
    "generation_config.json, README.md model card) that transformers loads with no custom code; with "
    "mlflow=true also log it as its run's MLflow model, which `mlflow models serve` serves."
)
EXAMPLES = [
    "lingmao export checkpoint=outputs/2026-01-01/12-00-00                 # -> outputs/2026-01-01/12-00-00/hf",
    "lingmao export checkpoint=outputs/myrun which=best out=poet-tiny",
    "lingmao export checkpoint=0123456789abcdef0123456789abcdef mlflow=true register=poet   # an MLflow run id",
]


def default_out(path: Path) -> Path:
    """hf/ in the run folder: beside checkpoints/ for a checkpoint in it, else beside the file."""
    folder = path.resolve().parent
    return (folder.parent if folder.name == "checkpoints" else folder) / "hf"


def card_samples(model, tok, state: dict, max_new_tokens: int) -> list[dict]:
    """One sampled continuation of the 诗, 词 and 曲 prompts, seeded, with the
    generation config's decoding."""
    from lingmao.model.card import PROMPTS
    from lingmao.model.decoding import complete

    normalise = normalizer(script_of(state))
    generator = torch.Generator().manual_seed(1337)
    out = []
    for genre in ("诗", "词", "曲"):
        prompt = normalise(PROMPTS[genre])
        settings = {"temperature": 1.0, "top_k": 50, "top_p": 0.95, "repetition_penalty": 1.2}
        (s,) = complete(model, tok, prompt, 1, max_new_tokens, generator=generator, **settings)
        out.append({"prompt": prompt, "text": s["text"]})
    return out


def run_or_none(state: dict, path: Path, tracking_uri: str) -> dict | None:
    """The run's record for the card; None (with a note) where it cannot be read."""
    from lingmao.tracking.lineage import run_record

    if not state.get("mlflow_run_id"):
        return None
    try:
        return run_record(state, path, tracking_uri)
    except OptionError as e:
        print(f"note: the model card leaves out the MLflow run's metrics: {e}", file=sys.stderr)
        return None


def write_hf(model, tok, state: dict, path: Path, o: Options) -> Path:
    try:
        from lingmao.model.card import model_card
        from lingmao.model.hf import architecture, write_folder

        arch = architecture(model.config)  # refuses a switch no standard architecture holds, before any work
        import transformers
    except ImportError:
        raise OptionError(HF_MISSING) from None
    transformers.utils.logging.disable_progress_bar()
    run = run_or_none(state, path, o.tracking_uri)
    samples = card_samples(model, tok, state, o.max_new_tokens) if o.samples else []
    out = Path(o.out) if o.out else default_out(path)
    write_folder(model, tok, out, model_card(model, arch, state, run, samples))
    print(f"{arch}: {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return out


def log_mlflow(state: dict, path: Path, o: Options) -> str:
    from lingmao.tracking.lineage import run_store
    from lingmao.tracking.pyfunc import NAME, log_pyfunc

    run_id = state.get("mlflow_run_id")
    if not run_id:
        raise OptionError(f"mlflow=true: {path} has no MLflow run (trained with tracking.enabled=false)")
    uri = run_store(state, path, o.tracking_uri)
    from lingmao.tracking.locate import mlflow_run

    mlflow_run(run_id, uri)  # a missing store or run: one line, before any logging
    model_id, version = log_pyfunc(uri, run_id, path, o.register or None)
    registered = f"; registered as models:/{o.register}/{version}" if version else ""
    print(
        f"mlflow model: runs:/{run_id}/{NAME} (model {model_id}){registered}\n"
        f"  serve: MLFLOW_TRACKING_URI={uri} mlflow models serve -m runs:/{run_id}/{NAME} --env-manager local"
    )
    return model_id


def run(o: Options) -> None:
    path = checkpoint_path(o.checkpoint, o.which, o.tracking_uri)
    model, tok, state = load_model(path, torch.device("cpu"))
    if o.hf:
        write_hf(model, tok, state, path, o)
    if o.mlflow:
        log_mlflow(state, path, o)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if asked_for_help(argv, Options, "export", SUMMARY, EXAMPLES):
        return 0
    try:
        o = parse(Options, argv)
        choice("which", o.which, WHICH)
        if not (o.hf or o.mlflow):
            raise OptionError("hf=false and mlflow=false export nothing: set one of them true")
        if o.register and not LABEL.ok(o.register, None):
            raise OptionError(f"register={o.register!r} {LABEL.valid(None)}")
        if o.register and not o.mlflow:
            raise OptionError(f"register={o.register}: registers the MLflow model; add mlflow=true")
        if o.max_new_tokens < 1:
            raise OptionError("max_new_tokens must be >= 1")
        run(o)
    except (OptionError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
