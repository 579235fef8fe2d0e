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


def run_name(cfg, preset: str, swept: str = "") -> str:
    """`t4x2-medium-lr3e-4`: preset, model and the LR the user set (before
    scaling); in a sweep, then what this job's sweep varies (`swept`)."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    return f"{preset}-{cfg.model.name}-lr{compact(cfg.optim.lr)}" + (f" {swept}" if swept else "")


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
            "experiment": cfg.experiment or "",
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
    tracker.log_dict(facts["params"]["plan"], "plan.json")
    tracker.log_dict(meta, "corpus.json")
    tracker.log_artifact(Path(corpus["dir"]) / "tokenizer.json")
    # A corpus that repeats itself teaches a model to repeat: a property of
    # the corpus, so a tag of the run, not a metric that changes with the step.
    tracker.set_tags({f"data.duplicates.{k}": v for k, v in facts["duplicates"].items()})
