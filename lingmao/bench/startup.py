"""Start-up time: from process start to the end of the first optimizer step.

Two launchers, each timed from just before the parent starts the process:

    run   `python -m lingmao.run ... trainer.max_steps=1`: Hydra, plan, MLflow,
          prepared corpus, model, first step
    bare  a script that imports torch, maps the token file, builds the same
          model and takes one step of the same batch at the same precision

The child is this module (`python -m lingmao.bench.startup run|bare MARKS ARGS`):
it notes wall-clock marks (time.time(), comparable across processes) at the
phase boundaries, writes them when the first optimizer step ends and exits at
once (no eval, no checkpoint). For `run` the marks come from wrapping the
functions the engine calls and from torch's global forward and optimizer
hooks, so lingmao.run itself runs unchanged. Top-level imports are stdlib
only: the bare launcher pays for nothing it does not use.
"""

from __future__ import annotations

import json
import os
import sys
import time
from statistics import median

# Phase boundaries in the order they happen, and what the span ending there is.
# A mark missing from a launch (the engine no longer calls that function)
# merges its span into the next one.
RUN_PHASES = (
    ("probe", "interpreter start"),
    ("imports", "imports (hydra, omegaconf, torch, lingmao)"),
    ("data:start", "compose, validate, detect, plan"),
    ("data", "prepared corpus lookup"),
    ("tracking:start", "windows, schedule, resume lookup"),
    ("tracking", "MLflow tracker start (the store and run open on its thread)"),
    ("model:start", "tags, git state, runtime, tokenizer, seed"),
    ("model", "model build"),
    ("optimizer:start", "model to the device"),
    ("optimizer", "optimizer (AdamW's first build imports torch._dynamo)"),
    ("scan:start", "checkpointer, compile and DDP wrappers, evaluator, MLflow params and artifacts"),
    ("scan", "duplicate-window counts (scanned once per corpus and context)"),
    ("forward", "data stream, progress bar"),
    ("step", "first step (forward, backward, optimizer)"),
)
BARE_PHASES = (
    ("probe", "interpreter start"),
    ("imports", "imports (numpy, torch, lingmao.model.gpt)"),
    ("data", "map the token file, first batch"),
    ("model", "model build, optimizer"),
    ("step", "first step (forward, backward, optimizer)"),
)


def phases(marks: dict[str, float], order) -> list[tuple[str, str, float]]:
    """(mark, label, seconds) of each span between consecutive marks, from `launch` on."""
    out, last, pending = [], marks["launch"], []
    for key, label in order:
        pending.append(label)
        if key in marks:
            out.append((key, " + ".join(pending), marks[key] - last))
            last, pending = marks[key], []
    return out


def median_phases(runs: list[dict[str, float]], order) -> list[tuple[str, str, float]]:
    """Per phase, the median over launches (which all hit the same marks)."""
    spans = [phases(m, order) for m in runs]
    return [(key, label, median(sp[i][2] for sp in spans)) for i, (key, label, _) in enumerate(spans[0])]


# --- child side ---


def _finish(marks: dict, path: str) -> None:
    marks["step"] = time.time()
    with open(path, "w") as f:
        json.dump(marks, f)
    os._exit(0)  # the first step is all we time: skip eval, checkpoint, MLflow shutdown


def _mark_call(owner, name: str, marks: dict, label: str) -> None:
    """Wrap owner.name so its first call marks `label:start` and `label`."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        if label in marks:
            return original(*args, **kwargs)
        marks[label + ":start"] = time.time()
        result = original(*args, **kwargs)
        marks[label] = time.time()
        return result

    setattr(owner, name, wrapper)


def _probe_run(marks: dict, path: str, overrides: list[str]) -> None:
    import runpy

    import hydra  # noqa: F401 (imported here so that the imports mark covers what the run command imports)
    import omegaconf  # noqa: F401
    from torch.nn.modules.module import register_module_forward_pre_hook
    from torch.optim.optimizer import register_optimizer_step_post_hook

    import lingmao.data
    import lingmao.tracking.tracker
    import lingmao.train.engine
    import lingmao.train.step

    marks["imports"] = time.time()
    for owner, name, label in (
        (lingmao.tracking.tracker.Tracker, "__init__", "tracking"),
        (lingmao.train.engine, "load_corpus", "data"),
        (lingmao.train.step, "GPT", "model"),
        (lingmao.train.step, "make_optimizer", "optimizer"),
        (lingmao.data.Prepared, "duplicate_windows", "scan"),
    ):
        if hasattr(owner, name):
            _mark_call(owner, name, marks, label)

    def first_forward(module, args):
        marks["forward"] = time.time()
        handle.remove()  # a global hook slows every module call: keep it for one

    handle = register_module_forward_pre_hook(first_forward)
    register_optimizer_step_post_hook(lambda optimizer, args, kwargs: _finish(marks, path))
    sys.argv = ["lingmao.run", *overrides]
    runpy.run_module("lingmao.run", run_name="__main__")  # the run command as a program, as `python -m` runs it
    raise SystemExit("lingmao.run returned without an optimizer step")


def _probe_bare(marks: dict, path: str, spec: dict) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from lingmao.model.gpt import GPT, GPTConfig

    marks["imports"] = time.time()
    ctx, micro = spec["context_length"], spec["micro_batch"]
    tokens = np.memmap(spec["tokens"], dtype=spec["dtype"], mode="r")
    rows = np.arange(micro)[:, None] * ctx + np.arange(ctx + 1)
    chunk = torch.from_numpy(tokens[rows].astype(np.int64))
    x, y = chunk[:, :-1], chunk[:, 1:]
    marks["data"] = time.time()
    torch.manual_seed(spec["seed"])
    model = GPT(GPTConfig(**spec["model"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    marks["model"] = time.time()
    bf16 = spec["precision"] == "bf16"
    for _ in range(spec["accumulation"]):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        (F.cross_entropy(logits.float().flatten(0, 1), y.flatten()) / spec["accumulation"]).backward()
    optimizer.step()
    _finish(marks, path)


def _child(argv: list[str]) -> None:
    marks = {"probe": time.time()}
    mode, path, payload = argv
    if mode == "run":
        _probe_run(marks, path, json.loads(payload))
    else:
        _probe_bare(marks, path, json.loads(payload))


# --- parent side ---


def bare_spec(cfg, plan, data) -> dict:
    """What the bare launcher needs: the token file, the batch, the precision
    and the run's very model config."""
    from dataclasses import asdict

    from lingmao.model.gpt import GPTConfig

    return {
        "tokens": str(data.dir / "train.bin"),
        "dtype": data.dtype,
        "seed": cfg.seed,
        "context_length": cfg.model.context_length,
        "micro_batch": plan.micro_batch,
        "accumulation": plan.accumulation,
        "precision": plan.precision,
        "model": asdict(GPTConfig.from_model_config(cfg.model, data.vocab_size)),
    }


def launch(mode: str, payload, cwd, env: dict, scratch) -> dict[str, float]:
    """Start one child and return its marks, `launch` included."""
    import subprocess
    from pathlib import Path

    path = Path(scratch) / f"marks-{mode}.json"
    path.unlink(missing_ok=True)
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "lingmao.bench.startup", mode, str(path), json.dumps(payload)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0 or not path.exists():
        raise RuntimeError(
            f"start-up probe '{mode}' failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
        )
    return {"launch": start, **json.loads(path.read_text())}


if __name__ == "__main__":
    _child(sys.argv[1:])
