"""The options of the `hardware` and `model` groups as data.

Hydra composes one option of each group into a run's config. A few decisions
need the others too: `hardware=auto` takes the preset closest to the detected
machine, the plan compares a run's batch with its preset's to say when the
split was changed, and a model that does not fit names a smaller size that
would. This module is the one place that reads those options, each over its
schema as Hydra would compose it; the plan takes what it needs from here.
"""

from __future__ import annotations

import functools

from omegaconf import OmegaConf

from lingmao.config import ConfigError
from lingmao.config.compose import CONF_DIR, option_names
from lingmao.config.schema import HardwareConfig, ModelConfig

HARDWARE = tuple(n for n in option_names(CONF_DIR / "hardware") if n != "auto")  # auto: one of these, detected
MODELS = option_names(CONF_DIR / "model")


@functools.cache
def _hardware(name: str) -> dict:
    if name not in HARDWARE:
        raise ConfigError(f"hardware={name!r} is not a preset; choose one of: auto, {', '.join(HARDWARE)}")
    node = OmegaConf.merge(OmegaConf.structured(HardwareConfig), OmegaConf.load(CONF_DIR / "hardware" / f"{name}.yaml"))
    return OmegaConf.to_container(node)


def hardware_preset(name: str) -> dict:
    """conf/hardware/NAME.yaml as a plain dict (a copy: callers may change it)."""
    return dict(_hardware(name))


@functools.cache
def model_presets() -> tuple[tuple[str, ModelConfig], ...]:
    """conf/model's sizes, each its yaml over the schema's defaults."""
    return tuple(
        (name, OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")))
        for name in MODELS
    )
