"""Every experiment preset composes (each cell of its sweep too) and trains
on the tiny model in-process."""

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ValueType
from omegaconf import OmegaConf

from lingmao.config.compose import CONF_DIR, EXPERIMENTS_DIR, register
from lingmao.config.rules import validate
from lingmao.model.gpt import GPTConfig
from lingmao.run import execute
from lingmao.train import checkpoint

register()
PRESETS = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))
# Small enough for a few steps in a second or two, whatever the preset sets.
TINY = [
    "model=tiny",
    "model.d_model=32",
    "model.n_heads=2",
    "model.n_layers=1",
    "model.context_length=32",
    "data.stride=16",
    "trainer.max_steps=2",
    "trainer.max_epochs=null",
    "trainer.max_time=null",
    "trainer.eval_every=2",
    "trainer.log_every=1",
    "trainer.eval_batches=2",
    "trainer.sample_tokens=8",
    "trainer.progress=false",
    "tracking.enabled=false",
    "checkpoint.every_steps=null",
    "hardware.batch=2",
    "hardware.accumulation=1",
    "hardware.fallback=true",
    "hardware.compile=false",
]


@pytest.fixture(scope="module", autouse=True)
def hydra_context():
    """One Hydra initialisation for the module: compose() alone is cheap."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        yield


def make(*overrides, hydra=False):
    return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def sweep(name: str) -> list[list[tuple[str, str, object]]]:
    """(key, value as typed, value as parsed) of each job `-m experiment=NAME`
    launches: Hydra's basic sweeper takes the cartesian product. Of a search
    (Optuna), the listed choices; an interval is left to the search."""
    params = make(f"experiment={name}", hydra=True).hydra.sweeper.params or {}
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    choices = [
        [(o.get_key_element(), text, value) for text, value in zip(o.sweep_string_iterator(), o.sweep_iterator())]
        for o in parsed
        if o.value_type != ValueType.INTERVAL_SWEEP
    ]
    return [list(cell) for cell in itertools.product(*choices)]


def sweep_cells(name: str) -> list[list[str]]:
    return [[f"{key}={text}" for key, text, _ in cell] for cell in sweep(name)]


def test_presets_are_the_planned_set():
    assert {
        "repeater",
        "batch_lr",
        "context_stride",
        "genre_balance",
        "hardware_matrix",
        "night",
        "speed",
        "minimind_t4x2",
    } <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_and_sweep_cell_composes(name):
    header = (EXPERIMENTS_DIR / f"{name}.yaml").read_text(encoding="utf-8").splitlines()[:4]
    assert all(line.startswith("#") for line in header), "a preset starts with a comment saying what it asks"
    for cell in sweep(name):
        cfg = make(f"experiment={name}", *(f"{key}={text}" for key, text, _ in cell))
        validate(cfg)
        assert cfg.experiment == name
        for key, _, value in cell:  # the job gets the value its sweep names
            if "." in key:
                assert OmegaConf.select(cfg, key) == value
            elif key in ("hardware", "model"):  # a group choice: its option's name
                assert cfg[key].name == value


def test_sweeps_have_the_planned_grids():
    assert len(sweep_cells("batch_lr")) == 12  # effective batch 8/16/32 x 4 LRs
    assert sweep_cells("repeater") == [["optim.warmup=0"], ["optim.warmup=2000"]]
    assert len(sweep_cells("context_stride")) == 6
    balanced = [make("experiment=genre_balance", *cell).data.genre_caps for cell in sweep_cells("genre_balance")]
    assert [dict(caps) for caps in balanced] == [{}, {"诗": 50000, "词": 30000, "文": 20000, "赋": 10000}]
    assert len(sweep_cells("hardware_matrix")) == 24


def test_minimind_preset_is_seed_004s_run():
    cfg = make("experiment=minimind_t4x2")
    hw = cfg.hardware
    assert (hw.name, hw.batch, hw.accumulation, hw.devices) == ("t4x2", 32, 4, 2)
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.context_length) == (512, 8, 512)
    assert (cfg.optim.lr, cfg.optim.base_batch, cfg.optim.warmup, cfg.optim.grad_clip) == (2e-4, 256, 2000, 1.0)
    moe = GPTConfig.from_model_config(cfg.model, vocab_size=100)
    assert (moe.moe_experts, moe.moe_top_k) == (4, 2)


@pytest.mark.parametrize("name", [p for p in PRESETS if p != "hardware_matrix"])
def test_every_preset_trains_a_few_steps(name, shared_cache, tmp_path):
    cfg = make(f"experiment={name}", *TINY)
    final = execute(cfg, tmp_path, tmp_path / "run")
    assert final["step"] == 2 and math.isfinite(final["val/loss"])
    state = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["config"]["experiment"] == name
    experts = cfg.model.moe.experts
    assert ("blocks.0.mlp.experts.0.fc.weight" in state["model"]) == (experts > 0)  # the preset's model was built
    rows = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    decodings = ["sampled", "greedy"] if name == "repeater" else ["sampled"]
    per_prompt = {"sampled": cfg.trainer.sample.per_prompt, "greedy": 1}
    assert [r["decoding"] for r in rows] == [
        d for d in decodings for _ in cfg.trainer.sample.prompts for _ in range(per_prompt[d])
    ]


@pytest.mark.slow
def test_hardware_matrix_is_one_multirun(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "lingmao.run", "-m", "experiment=hardware_matrix"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Launching 24 jobs" in proc.stdout + proc.stderr
    assert proc.stdout.count("effective_batch") == 24
    assert not (tmp_path / "mlflow.db").exists()
