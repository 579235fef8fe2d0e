"""Hydra's and OmegaConf's composition errors as one line: what was wrong,
why, and what is valid (the keys of that section, a group's presets).

Hydra prints these with its config search path, a traceback, or the advice
to append the key with `+key=`, which lingmao refuses (config.validate).
"""

from __future__ import annotations

import types
import typing
from dataclasses import fields, is_dataclass
from types import CodeType, TracebackType

from lingmao.config.compose import CONF_DIR, EXPERIMENTS_DIR
from lingmao.config.keys import schema_at, valid_keys

GRAMMAR = "https://hydra.cc/docs/advanced/override_grammar/basic/"


def _first_line(e: BaseException | None) -> str:
    return str(e).strip().splitlines()[0].strip() if e is not None and str(e).strip() else ""


def groups() -> dict[str, list[str]]:
    """Each config group's presets: conf/<group>/*.yaml, and experiments/."""
    out = {"experiment": sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))}
    for folder in sorted(
        p
        for p in CONF_DIR.rglob("*")
        if p.is_dir() and p.name != "hydra" and "hydra" not in p.relative_to(CONF_DIR).parts
    ):
        names = sorted(p.stem for p in folder.glob("*.yaml"))
        if names:
            out[folder.relative_to(CONF_DIR).as_posix()] = names
    return out


def unknown_key(full_key: str, parent) -> str:
    top = "" if "." in full_key else f"; or a preset group: {', '.join(g for g in groups() if '/' not in g)}"
    keys = list(parent.keys()) if hasattr(parent, "keys") else []
    return f"{full_key}: no such key; {valid_keys(full_key, keys)}{top}"


def _type_words(full_key: str) -> str:
    section, _, leaf = full_key.rpartition(".")
    schema = schema_at(section)
    hint = typing.get_type_hints(schema).get(leaf) if schema is not None else None
    if hint is None:
        return ""
    if is_dataclass(hint):
        return f"; {full_key} is a section: set its keys ({', '.join(f.name for f in fields(hint))})"
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args and typing.get_origin(hint) in (typing.Union, types.UnionType) else hint
    words = {int: "an integer", float: "a number", bool: "true or false", str: "text"}.get(base)
    if typing.get_origin(base) is list:
        words = f"a list, e.g. {full_key}=[a,b]"
    if words is None:
        return ""
    return f"; {full_key} takes {words}{' or null' if type(None) in typing.get_args(hint) else ''}"


def _group_value(argv: list[str]) -> str:
    """For Hydra's 'Config group override must be a string' (hardware=4090):
    which override, and the presets of its group."""
    found = groups()
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if sep and key in found and value not in found[key] and not value.startswith("["):
            return f"{key}={value}: not a preset of {key}; choose one of: {', '.join(found[key])}"
    return ""


def _raised_in(tb: TracebackType | None, code: CodeType) -> bool:
    while tb is not None:
        if tb.tb_frame.f_code is code:
            return True
        tb = tb.tb_next
    return False


# Sweepers and launchers that come as Hydra plugins, and what installs each.
PLUGINS = {
    "hydra/sweeper/optuna": "'lingmao[optuna]' (hydra-optuna-sweeper)",
    "hydra/launcher/joblib": "hydra-joblib-launcher",
    "hydra/launcher/submitit_slurm": "hydra-submitit-launcher",
    "hydra/launcher/submitit_local": "hydra-submitit-launcher",
}


def explain(e: BaseException, argv: list[str], task: CodeType) -> str | None:
    """One line for an error Hydra or OmegaConf raised while parsing the
    command line or composing the config; None for anything else (an error
    raised inside the task function `task`, or not a config error)."""
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    if _raised_in(e.__traceback__, task):
        return None
    if isinstance(e, MissingConfigException):
        group, _, name = (e.missing_cfg_file or "").rpartition("/")
        plugin = PLUGINS.get(f"{group}/{name}")
        if plugin:
            return f"{group}={name} needs a Hydra plugin that is not installed: pip install {plugin}"
        if e.options:
            return f"{group}={name}: {_first_line(e).split(': ', 1)[-1]}; choose one of: {', '.join(e.options)}"
        return _first_line(e).split(": ", 1)[-1]
    if isinstance(e, OverrideParseException):
        return f"cannot parse the command line: {_first_line(e)} (override grammar: {GRAMMAR})"
    cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else e
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        key = cause.full_key
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and "not in" in _first_line(cause):
            return unknown_key(key, cause.parent_node)
        return f"{key}: {_first_line(cause)}{_type_words(key)}"
    if isinstance(e, ValueError) and "Config group override" in str(e):
        return _group_value(argv) or _first_line(e)
    if isinstance(e, (HydraException, OmegaConfBaseException)):
        lines = [_first_line(e)] + ([_first_line(e.__cause__)] if e.__cause__ else [])
        return "; ".join(line for line in lines if line and "To append" not in line)
    return None
