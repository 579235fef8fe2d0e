"""`lingmao eval checkpoint=RUN_FOLDER [data=x.jsonl] [log=true]`: how well a
checkpoint predicts text.

Val loss (nats per token), perplexity, bits per character and the loss of
each genre, measured as training measures them (the val split in
non-overlapping context windows; each val document on its own for the genres),
on the val split of the corpus the checkpoint was trained on (prepared from
the data settings its config stores, or read from the cache) or on every
document of a JSONL file, normalised like that corpus and tokenised with the
checkpoint's tokenizer. `log=true` adds the numbers to the checkpoint's MLflow
run as eval/... metrics at the checkpoint's step.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from lingmao.config import ConfigError
from lingmao.config.options import OptionError, asked_for_help, choice, doc, parse
from lingmao.data.prepare import normalizer
from lingmao.data.tokenizer import EOS_ID, UNK_ID, tokenizer_hash
from lingmao.tracking.locate import WHICH, checkpoint_path
from lingmao.tracking.record import MIN_GENRE_TOKENS, genre_docs
from lingmao.train.backend import DEVICES, pick_device
from lingmao.train.checkpoint import load_model, script_of
from lingmao.train.validation import genre_metric_names


@dataclass
class Options:
    checkpoint: str = field(default="", metadata=doc("a run folder, a .pt file or an MLflow run id (required)"))
    which: str = field(default="last", metadata=doc("of a run folder or run id: last | best"))
    data: str = field(
        default="",
        metadata=doc("a JSONL file to score; empty: the val split of the corpus the checkpoint was trained on"),
    )
    text_field: str = field(
        default="", metadata=doc("data=: the JSON field with the text; empty: the checkpoint's data.text_field")
    )
    batch_size: int = field(default=16, metadata=doc("windows (or documents) per forward pass"))
    max_batches: int = field(
        default=0,
        metadata=doc(
            "score only the first N batches of windows; 0: all (trainer.eval_batches reproduces training's val/loss)"
        ),
    )
    genre_docs: int = field(default=256, metadata=doc("documents per genre for the per-genre loss; 0: all"))
    device: str = field(default="auto", metadata=doc("auto | cpu | cuda | mps"))
    tokenizer: str = field(default="", metadata=doc("tokenizer.json, for a checkpoint that does not embed one"))
    log: bool = field(default=False, metadata=doc("add the results to the checkpoint's MLflow run (eval/...)"))
    tracking_uri: str = field(default="", metadata=doc("MLflow store; default: the one the run logged to"))


SUMMARY = (
    "Val loss, perplexity, bits per character and per-genre loss of a checkpoint, on its own corpus' val "
    "split or on a JSONL file; printed, and with log=true added to its MLflow run."
)
EXAMPLES = [
    "lingmao eval checkpoint=outputs/2026-01-01/12-00-00",
    "lingmao eval checkpoint=outputs/myrun which=best data=held_out.jsonl",
    "lingmao eval checkpoint=0123456789abcdef0123456789abcdef log=true   # an MLflow run id",
]


@dataclass
class Scored:
    """Token ids to score and where each document starts."""

    name: str  # "corpus" or the JSONL file's stem: the metric prefix eval/ or eval/<stem>/
    tokens: np.ndarray  # every document followed by <eos>
    docs: np.ndarray  # (n_docs, 2): start offset, genre index
    genres: list[str]
    tokens_per_char: float


def corpus_split(state: dict, tok_hash: str) -> Scored:
    """The val split of the corpus the checkpoint was trained on."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from lingmao.config.schema import DataConfig, RunConfig
    from lingmao.data import load_corpus

    config = state["config"]
    try:  # onto the schema: a checkpoint from before a data key existed gets its default
        settings = OmegaConf.merge(OmegaConf.structured(DataConfig), config.get("data", {}))
    except OmegaConfBaseException as e:
        raise OptionError(f"the checkpoint's data settings do not fit this version of lingmao: {e}") from None
    if "split_seed" not in config.get("data", {}):  # before data.split_seed the run's seed chose the split
        settings.split_seed = config.get("seed", RunConfig.seed)
    data = load_corpus(settings)
    if data.meta["tokenizer_sha256"] != tok_hash:
        raise OptionError(
            f"the prepared corpus {data.dir} has another vocabulary than the checkpoint (its "
            f"tokenizer hash differs): its source changed since training; score a file with data="
        )
    return Scored(
        "corpus",
        np.asarray(data.tokens("val")),
        np.load(data.dir / "val_docs.npy"),
        list(data.meta["genres"]),
        data.meta["val_tokens_per_char"],
    )


def jsonl_docs(path: Path, text_field: str, script: str, tokenizer) -> Scored:
    """Every document of a JSONL file, normalised like the corpus and tokenised."""
    from lingmao.data.corpus import CorpusError, jsonl_records

    try:
        records = list(jsonl_records([path], text_field=text_field))
    except CorpusError as e:
        raise OptionError(f"data={path}: {e}") from None
    kept = [r for r in records if r["text"].strip()]
    if not kept:
        raise OptionError(f"data={path}: no document with text in field {text_field!r}")
    normalise = normalizer(script)
    texts = [normalise(r["text"]) for r in kept]
    genres = sorted({r["genre"] for r in kept})
    index = {g: i for i, g in enumerate(genres)}
    ids = [e.ids + [EOS_ID] for e in tokenizer.encode_batch(texts)]
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    kinds = np.array([index[r["genre"]] for r in kept], dtype=np.int64)
    return Scored(
        path.stem,
        np.concatenate([np.array(x, dtype=np.int64) for x in ids]),
        np.stack([starts, kinds], axis=1),
        genres,
        float(lengths.sum() / sum(map(len, texts))),
    )


def run_windows(state: dict, device, n_genres: int) -> dict | None:
    """The val windows the run's own val/loss scored, as eval can score them
    again: {"windows": the first eval_batches micro-batches of windows of each
    process, which together are the split's first windows; "precision": the
    run's, where this device can run it; "logged": the checkpoint's val/loss}.
    None for a checkpoint without its plan."""
    plan = state.get("plan")
    if not plan:
        return None
    batches = state["config"].get("trainer", {}).get("eval_batches", 20)
    same = plan["device"] == device.type and (plan["precision"] != "fp16" or device.type == "cuda")
    return {
        "windows": batches * plan["micro_batch"] * plan["world_size"],
        "batches": batches,
        "micro_batch": plan["micro_batch"],
        "world_size": plan["world_size"],
        "precision": plan["precision"] if same else "fp32",
        "run_precision": plan["precision"],
        "logged": state.get("val_loss"),
        "step": state["progress"]["step"],
        "genre_docs": genre_docs(batches, plan["micro_batch"], n_genres),  # behind its val/loss_<genre>
    }


def score(model, s: Scored, context: int, device, o: Options, run: dict | None = None) -> dict:
    """{"loss", "perplexity", "bpc", "unk_rate", "windows", "tokens", "genres": {genre: {loss, tokens, docs}}},
    and "run": `run` with the loss of this checkpoint on the run's own windows."""
    from lingmao.data.windows import TokenWindows, make_loader
    from lingmao.train.distributed import Dist
    from lingmao.train.validation import evaluate, per_genre_loss

    windows = TokenWindows(s.tokens, context, context)
    loader = make_loader(windows, o.batch_size, shuffle=False, seed=0, drop_last=False)
    batches = o.max_batches or math.ceil(len(windows) / o.batch_size)
    fp32 = SimpleNamespace(device=device.type, precision="fp32")  # all evaluate reads of a plan
    loss = evaluate(model, loader, fp32, device, batches, Dist(), len(windows))
    if run is not None:
        # The first run["windows"] windows (evaluate leaves out those past n_windows), in the run's precision.
        n = run["windows"] = min(run["windows"], len(windows))
        precision = SimpleNamespace(device=device.type, precision=run["precision"])
        run["loss"] = evaluate(model, loader, precision, device, math.ceil(n / o.batch_size), Dist(), n)
    genres = per_genre_loss(
        model,
        s.tokens,
        s.docs,
        s.genres,
        context,
        device=device,
        batch_size=o.batch_size,
        max_docs_per_genre=o.genre_docs or None,
    )
    model.eval()
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50)),
        "bpc": loss / math.log(2) * s.tokens_per_char,
        "unk_rate": float(np.mean(s.tokens == UNK_ID)),
        "windows": min(len(windows), batches * o.batch_size),
        "all_windows": len(windows),
        "tokens": int(len(s.tokens)),
        "genres": genres,
        **({"run": run} if run is not None else {}),
    }


def metrics(result: dict, name: str) -> dict[str, float]:
    """MLflow names: eval/loss ... for the training corpus, eval/<file>/loss ... for a JSONL file."""
    prefix = "eval/" if name == "corpus" else f"eval/{name}/"
    m = {prefix + k: result[k] for k in ("loss", "perplexity", "bpc", "unk_rate")}
    names = genre_metric_names(list(result["genres"]))
    m.update({f"{prefix}loss_{names[g]}": r["loss"] for g, r in result["genres"].items()})
    return m


def same_windows_line(result: dict) -> str:
    """Why this loss and the run's val/loss differ, or that they agree: the windows each scores."""
    r = result["run"]
    which = (
        f"the first {r['windows']} windows (trainer.eval_batches {r['batches']} x micro-batch {r['micro_batch']}"
        f" x {r['world_size']} process(es))"
    )
    logged = f"{r['logged']:.4f}" if r["logged"] is not None else "not logged at this step"
    other = (
        f", not the run's {r['run_precision']}: this device lacks it" if r["precision"] != r["run_precision"] else ""
    )
    here = f"{r['loss']:.4f} ({r['precision']}{other})"
    scope = "all" if result["windows"] == result["all_windows"] else "the first"
    return (
        f"  the run's val/loss at step {r['step']} ({logged}) scored {which} in {r['run_precision']}; "
        f"this checkpoint on them: {here}. The loss above is over {scope} {result['windows']} of "
        f"{result['all_windows']} windows."
    )


def report(result: dict, title: str, per_genre: int) -> None:
    """The numbers, how they relate to the run's val/loss, then one row per
    genre (rich pads CJK names by their display width), a genre measured on
    fewer than MIN_GENRE_TOKENS tokens marked."""
    from rich.console import Console
    from rich.table import Table

    print(
        f"{title}\n  loss {result['loss']:.4f} nats/token | perplexity {result['perplexity']:.2f} | "
        f"bpc {result['bpc']:.4f} | <unk> {result['unk_rate']:.2%} | "
        f"{result['windows']} windows of {result['tokens']} tokens"
    )
    if "run" in result:
        print(same_windows_line(result))
    if not result["genres"]:
        return
    table = Table("genre", "loss", "perplexity", "tokens", "docs", "", box=None, padding=(0, 2))
    few = False
    for g, r in sorted(result["genres"].items(), key=lambda kv: kv[1]["loss"]):
        flag = "† few tokens" if r["tokens"] < MIN_GENRE_TOKENS else ""
        few = few or bool(flag)
        ppl = f"{math.exp(min(r['loss'], 50)):.2f}"
        table.add_row(g, f"{r['loss']:.4f}", ppl, str(r["tokens"]), str(r["docs"]), flag)
    console = Console()
    (console if console.is_terminal else Console(width=120)).print(table)
    docs = f"the first {per_genre} documents of each genre" if per_genre else "every document of each genre"
    run = f"; the run's val/loss_<genre>: the first {result['run']['genre_docs']}" if "run" in result else ""
    print(f"  per genre: {docs}, each scored on its own (genre_docs=){run}")
    if few:
        print(
            f"  † fewer than {MIN_GENRE_TOKENS} tokens: a standard error of 0.1 nats or more, as large as the "
            f"differences between runs; read it as a rough figure"
        )


def log_to_run(state: dict, path: Path, result: dict, name: str, tracking_uri: str) -> str:
    """Add the metrics (at the checkpoint's step) and eval/<name>.json to the
    checkpoint's MLflow run; the run keeps its status and end time."""
    from lingmao.tracking.locate import launch_dir, mlflow_run
    from lingmao.tracking.store import resolve_uri, store_uri
    from lingmao.tracking.tracker import Tracker

    run_id = state.get("mlflow_run_id")
    if not run_id:
        raise OptionError(f"log=true: {path} has no MLflow run (trained with tracking.enabled=false)")
    cfg_uri = state["config"].get("tracking", {}).get("uri")
    launched = launch_dir(path)
    uri = (
        store_uri(tracking_uri)
        if tracking_uri
        else (resolve_uri(cfg_uri, launched) if launched else store_uri(cfg_uri))
    )
    run, uri = mlflow_run(run_id, uri)
    experiment = state["config"].get("tracking", {}).get("experiment_name", "lingmao")
    tracker = Tracker(uri, experiment, run.info.run_name, run_id=run_id, spool=path.parent / "eval_mlflow_spool.jsonl")
    tracker.log_metrics(metrics(result, name), state["progress"]["step"])
    tracker.log_dict(
        {"checkpoint": str(path.resolve()), "step": state["progress"]["step"], **result}, f"eval/{name}.json"
    )
    tracker.end(run.info.status)
    # Reopening ended the run anew: give it back the end time training gave it.
    if run.info.end_time and not tracker.offline:
        tracker.client.set_terminated(run_id, run.info.status, run.info.end_time)
    return f"{uri} run {run_id}"


def run(o: Options) -> dict:
    path = checkpoint_path(o.checkpoint, o.which, o.tracking_uri)
    device = pick_device(o.device)
    model, tok, state = load_model(path, device, o.tokenizer)
    cfg = state["config"]
    if o.data:
        text_field = o.text_field or cfg.get("data", {}).get("text_field", "text")
        scored = jsonl_docs(Path(o.data), text_field, script_of(state), tok)
    else:
        scored = corpus_split(state, tokenizer_hash(tok))
    context = cfg["model"]["context_length"]
    if len(scored.tokens) < context + 1:
        raise OptionError(
            f"data={o.data or 'corpus'}: {len(scored.tokens)} tokens, fewer than one context window ({context + 1})"
        )
    same = None if o.data else run_windows(state, device, len(scored.genres))  # a file is not the run's windows
    with torch.no_grad():
        result = score(model, scored, context, device, o, same)
    source = o.data or f"the val split of the {cfg['data']['source']} corpus"
    report(result, f"{path} (step {state['progress']['step']}) on {source}", o.genre_docs)
    if o.log:
        print(f"logged to MLflow {log_to_run(state, path, result, scored.name, o.tracking_uri)}")
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if asked_for_help(argv, Options, "eval", SUMMARY, EXAMPLES):
        return 0
    from lingmao.data.corpus import CorpusError

    try:
        o = parse(Options, argv)
        choice("which", o.which, WHICH)
        choice("device", o.device, DEVICES)
        if o.batch_size < 1 or o.max_batches < 0 or o.genre_docs < 0:
            raise OptionError("batch_size must be >= 1, max_batches and genre_docs >= 0")
        run(o)
    except (OptionError, ConfigError, CorpusError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
