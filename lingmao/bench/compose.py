"""Compose lingmao's config as `python -m lingmao.run` does, with Hydra's Compose API.

The suites run variants of the user's command line (model=small, a shorter
context, another precision). A variant is the user's overrides followed by
its own: Hydra applies overrides in order, so a group choice replaces the
user's (their `model.*` values still apply to it) and a value wins over
theirs, checked by the schema like any command-line value.
"""

from __future__ import annotations

from lingmao.config.compose import CONF_DIR, register
from lingmao.config.rules import validate


def override(key: str, value) -> str:
    """`key=value` in Hydra's override syntax; strings quoted, so `null` or `1` stay strings."""
    if value is None:
        return f"{key}=null"
    if isinstance(value, bool):
        return f"{key}={str(value).lower()}"
    if isinstance(value, str):
        return f"{key}='{value}'"
    return f"{key}={value}"


class Composer:
    def __init__(self, overrides: list[str]):
        register()
        self.overrides = list(overrides)

    def with_groups(self, groups: dict[str, str], values: dict | None = None) -> list[str]:
        """The user's overrides, then these group choices and values."""
        return [
            *self.overrides,
            *(f"{g}={v}" for g, v in groups.items()),
            *(override(k, v) for k, v in (values or {}).items()),
        ]

    def compose(self, groups: dict[str, str] | None = None, values: dict | None = None):
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="lingmao_bench"):
            cfg = compose("config", overrides=self.with_groups(groups or {}, values))
        validate(cfg)
        return cfg
