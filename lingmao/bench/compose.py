"""Compose lingmao's config as `python -m lingmao.run` does, with Hydra's Compose API.

The suites run variants of the user's command line (model=small, a shorter
context, another precision): a variant that picks a group replaces the user's
choice of that group (the user's `model.*` values still apply to it), and plain
values are set after composing, through the typed schema, so they are checked
like command-line values and win over the user's.
"""

from __future__ import annotations

import copy

from omegaconf import OmegaConf

from ..config import CONF_DIR, register, validate


def override_key(override: str) -> str:
    """`model.d_model=256` -> `model.d_model`; `+x=1`, `++x=1`, `~x` -> `x`."""
    return override.lstrip("+~").split("=", 1)[0]


class Composer:
    def __init__(self, overrides: list[str]):
        register()
        self.overrides = list(overrides)

    def with_groups(self, groups: dict[str, str]) -> list[str]:
        """The user's overrides with these group choices in place of theirs."""
        kept = [o for o in self.overrides if override_key(o) not in groups]
        return kept + [f"{g}={v}" for g, v in groups.items()]

    def compose(self, groups: dict[str, str] | None = None, values: dict | None = None):
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="lingmao_bench"):
            cfg = compose("config", overrides=self.with_groups(groups or {}))
        cfg = with_values(cfg, values or {})
        validate(cfg)
        return cfg


def with_values(cfg, values: dict):
    """A copy of `cfg` with dotted keys set (type-checked by the schema)."""
    c = copy.deepcopy(cfg)
    for key, value in values.items():
        OmegaConf.update(c, key, value, merge=False)
    return c
