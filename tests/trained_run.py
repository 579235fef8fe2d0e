"""One tiny model trained once per test session, shared by test_export.py and
test_serve.py: the chinese-poetry fixture corpus (conftest), 30 steps,
a checkpoint and an eval every 10 steps, tracked in MLflow, its model
registered as `poet` at the end of the run (tracking.register)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from conftest import build_training_cache
from hydra import compose, initialize_config_dir

from lingmao import run
from lingmao.config.compose import CONF_DIR

REGISTERED = "poet"
OVERRIDES = [
    "hardware=cpu",
    "hardware.precision=fp32",
    "hardware.threads=1",
    "hardware.batch=4",
    "hardware.accumulation=1",
    "model=tiny",
    "model.context_length=32",
    "optim.lr=3e-3",
    "trainer.max_steps=30",
    "trainer.eval_every=10",
    "checkpoint.every_steps=10",
    "trainer.eval_batches=2",
    "trainer.sample_tokens=4",
    "trainer.progress=false",
    "tracking.system_metrics=false",
    "tracking.run_name=hf-export",
    f"tracking.register={REGISTERED}",
]


def trained_run(base: Path, store_template: Path) -> Path:
    """`base` holding cache/ (LINGMAO_CACHE), mlflow.db and run/ (the run
    folder: checkpoints/step00000020.pt, last.pt = step 30, model.pt);
    trained on the first call, reused after."""
    done = base / "trained"
    if done.exists():
        return base
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    cache = build_training_cache(base / "cache")
    shutil.copyfile(store_template, base / "mlflow.db")  # a migrated store: creating one costs seconds
    before, threads = os.environ.get("LINGMAO_CACHE"), torch.get_num_threads()
    os.environ["LINGMAO_CACHE"] = str(cache)
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=OVERRIDES)
        final = run.execute(cfg, base, base / "run")
    finally:
        torch.set_num_threads(threads)  # the plan set the run's
        if before is None:
            os.environ.pop("LINGMAO_CACHE", None)
        else:
            os.environ["LINGMAO_CACHE"] = before
    assert final["status"] == "FINISHED", final
    done.touch()
    return base


def val_folder(base: Path) -> Path:
    """The prepared corpus the run trained on (val.bin, tokenizer.json, ...)."""
    (meta,) = (base / "cache").rglob("val.bin")
    return meta.parent
