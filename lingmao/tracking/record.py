"""What a training run records in MLflow besides its metrics, in one place:
the run opened with its name and tags and the composed config, what it
trains on (params, the dataset input, the corpus' facts) once training
starts, and its files at the end. The engine gathers the facts; this module
decides where each goes."""

from __future__ import annotations

from pathlib import Path

from lingmao.tracking.provenance import git_state, launch_host
from lingmao.tracking.spool import SPOOL_NAME
from lingmao.tracking.store import resolve_uri
from lingmao.tracking.tracker import Tracker


def compact(x: float) -> str:
    """A number as a person writes it in a run name: 3e-4 (not 0.0003), 1.5e-3, 0.01, 16."""
    if x and not 1e-2 <= abs(x) < 1e4:
        mantissa, exponent = f"{x:.2e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{x:g}"


def name_suffix(swept: str) -> str:
    """Of a sweep job's varied overrides (`optim.lr=0.001 optim.warmup=0`),
    those a run name adds: the LR is in every name already."""
    return " ".join(kv for kv in swept.split() if not kv.startswith("optim.lr="))


def run_name(cfg, preset: str, swept: str = "") -> str:
    """`t4x2-medium-lr3e-4`: preset, model and the LR the user set (before
    scaling); in a sweep, then what else this job's sweep varies (`swept`,
    the tag sweep.values)."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    suffix = name_suffix(swept)
    return f"{preset}-{cfg.model.name}-lr{compact(cfg.optim.lr)}" + (f" {suffix}" if suffix else "")


def open_run(cfg, preset: str, run_dir: Path, launch_dir: Path, tags: dict, run_id: str | None, main: bool) -> Tracker:
    """The run's tracker (disabled on every process but rank 0), its tags
    and the composed config as Hydra wrote it. `run_id`: the MLflow run a
    resumed checkpoint continues."""
    t = cfg.tracking
    enabled = t.enabled and main
    tracker = Tracker(
        resolve_uri(t.uri, launch_dir),
        t.experiment_name,
        run_name(cfg, preset, tags.get("sweep.values", "")),
        enabled=enabled,
        spool=run_dir / SPOOL_NAME,
        system_metrics=t.system_metrics,
        run_id=run_id if enabled else None,
        timeout=t.timeout,
    )
    tracker.set_tags(
        {
            "hardware": preset,
            "model": cfg.model.name,
            "data": cfg.data.source,
            # The preset's name; a sweep's tags name what it varies instead. An
            # empty tag would read as a value in the UI's Group by.
            **({"experiment": cfg.experiment} if cfg.experiment else {}),
            "host": launch_host(),
            "run_dir": str(run_dir.resolve()),
            **git_state(launch_dir),
            **tags,
            **t.tags,
        }
    )
    for f in sorted((run_dir / ".hydra").glob("*.yaml")):
        tracker.log_artifact(f, "hydra")
    return tracker


# A per-genre loss from fewer tokens than this is flagged wherever it is
# shown (compare's table, page and genre plot; `lingmao eval`). Per-token
# losses spread with a standard deviation of 2.7-2.8 nats (tiny after 40
# steps on the default corpus, val loss 6.44, in each genre), so a mean over
# n tokens has a standard error of about 2.8 / sqrt(n): 0.09 nats at 1000
# tokens, the size of the differences runs are compared by (0.1-0.3 nats
# between LRs and optimizers in the README). Tokens of one poem are not
# independent (by document the error came out up to 1.35x that), so this is
# a floor: below it a genre's figure is noise.
MIN_GENRE_TOKENS = 1000


def genre_docs(eval_batches: int, micro_batch: int, n_genres: int) -> int:
    """Documents of each genre that a run's val/loss_<genre> averages over:
    train/validation.py's Evaluator rule (its eval_batches micro-batches of
    documents shared among the genres, at least 16), copied because tracking
    sits below train; tests/test_record.py holds the two together."""
    return max(16, eval_batches * micro_batch // max(1, n_genres))


def genre_sample(corpus_dir: str, meta: dict, per_genre: int) -> dict[str, tuple[int, int]]:
    """{genre: (tokens, documents)} that the per-genre val loss scores: the
    first `per_genre` val documents of each genre, each with its <eos>."""
    import numpy as np

    docs = np.load(Path(corpus_dir) / "val_docs.npy")
    if not len(docs):
        return {}
    lengths = np.diff(np.append(docs[:, 0], meta["tokens"]["val"]))
    out = {}
    for i, genre in enumerate(meta["genres"]):
        taken = lengths[docs[:, 1] == i][:per_genre]
        if len(taken):
            out[genre] = (int(taken.sum()), len(taken))
    return out


def dataset_source(d) -> str:
    """Where the data config `d` reads its corpus from, as MLflow's dataset source."""
    return {"poetry": "npm:chinese-poetry", "hf": f"hf://{d.hf_name}", "prepared": str(d.prepared_dir)}.get(
        d.source, ",".join(d.paths)
    )


def record_start(tracker: Tracker, cfg, facts: dict) -> None:
    """What the run trains on, once its parts are built. `facts`: params
    (nested: config, plan, model, data), step, corpus (its folder and
    meta.json), duplicates (the corpus' repeated windows), genres (ASCII
    name -> genre) and resumed_from (a checkpoint, or None)."""
    # On resume the settings that changed are kept beside the first ones (resumed.<step>.<key>).
    tracker.log_params(facts["params"], step=facts["step"])
    corpus, meta = facts["corpus"], facts["corpus"]["meta"]
    tracker.log_input_dataset(
        cfg.data.source,
        Path(corpus["dir"]).name,
        dataset_source(cfg.data),
        n_records=meta["records"],
        profile={"train_tokens": meta["tokens"]["train"], "val_tokens": meta["tokens"]["val"]},
    )
    if facts["resumed_from"]:
        tracker.set_tags({"resumed_from": str(facts["resumed_from"]), "resumed_at_step": facts["step"]})
    tracker.set_tags({f"genre.{ascii_name}": g for g, ascii_name in facts["genres"].items()})
    micro = facts["params"]["plan"]["micro_batch"]
    scored = genre_sample(corpus["dir"], meta, genre_docs(cfg.trainer.eval_batches, micro, len(meta["genres"])))
    # How many tokens each val/loss_<genre> averages: the report flags a
    # genre's figure measured on too few of them.
    names = facts["genres"]
    tracker.set_tags(
        {
            **{f"genre_tokens.{names[g]}": tokens for g, (tokens, _) in scored.items()},
            **{f"genre_docs.{names[g]}": docs for g, (_, docs) in scored.items()},
        }
    )
    tracker.log_dict(facts["params"]["plan"], "plan.json")
    tracker.log_dict(meta, "corpus.json")
    tracker.log_artifact(Path(corpus["dir"]) / "tokenizer.json")
    # A corpus that repeats itself teaches a model to repeat: a property of
    # the corpus, so a tag of the run, not a metric that changes with the step.
    tracker.set_tags({f"data.duplicates.{k}": v for k, v in facts["duplicates"].items()})
