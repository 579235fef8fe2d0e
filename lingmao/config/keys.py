"""The schema's keys: every leaf key with its type, the value a key takes
when a config (an older checkpoint's) lacks it, and the schema of a section."""

from __future__ import annotations

import difflib
import typing
from collections.abc import Iterator, Mapping
from dataclasses import MISSING, asdict, fields, is_dataclass
from typing import Any

from lingmao.config.schema import RunConfig


def schema_keys(schema: type = RunConfig, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(dotted key, type, dataclass field) of every leaf key of `schema`."""
    hints = typing.get_type_hints(schema)
    for f in fields(schema):
        if is_dataclass(hints[f.name]):
            yield from schema_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hints[f.name], f


def optional_type(tp: Any) -> bool:
    return tp is Any or type(None) in typing.get_args(tp)


LEAVES = {key: (tp, f) for key, tp, f in schema_keys()}


def value_when_absent(key: str) -> Any:
    """What a stored config that lacks `key` means: the value from before the
    key existed for one `added_later`, else its default."""
    f = LEAVES[key][1]
    if "absent" in f.metadata:
        return f.metadata["absent"]
    return f.default_factory() if f.default is MISSING else f.default


def fill_absent(node: Mapping, prefix: str = "") -> dict:
    """A stored config section (a checkpoint's, a plain dict or a DictConfig)
    as a dict, with the keys `added_later` than it filled with the value they
    had before they existed. `prefix` is the section's dotted key, e.g. "model"."""
    if is_dataclass(node):
        node = asdict(node)
    out = {k: (fill_absent(v, f"{prefix}.{k}".lstrip(".")) if isinstance(v, Mapping) else v) for k, v in node.items()}
    dot = f"{prefix}." if prefix else ""
    for key, (_, f) in LEAVES.items():
        rest = key[len(dot) :]
        if key.startswith(dot) and "." not in rest and "absent" in f.metadata and rest not in out:
            out[rest] = f.metadata["absent"]
    return out


def unknown_keys(node: Any, schema: type, prefix: str = "") -> list[str]:
    """Keys added with `+key=...`, which Hydra lets past the typed schema."""
    hints = typing.get_type_hints(schema)
    out = []
    for key in node.keys():
        if key not in hints:
            out.append(f"{prefix}{key}")
        elif is_dataclass(hints[key]):
            out += unknown_keys(node[key], hints[key], f"{prefix}{key}.")
    return out


def schema_at(section: str) -> type | None:
    """The schema dataclass of a dotted section ("" is the whole run), or None."""
    node: type = RunConfig
    for part in filter(None, section.split(".")):
        hint = typing.get_type_hints(node).get(part)
        if not is_dataclass(hint):
            return None
        node = hint
    return node


def valid_keys(full_key: str, keys: list[str] | None = None) -> str:
    """What to say of an unknown key: the closest valid one and the valid
    keys of its section (`keys` for a section outside the schema)."""
    section, _, leaf = full_key.rpartition(".")
    schema = schema_at(section)
    keys = [f.name for f in fields(schema)] if schema is not None else list(keys or [])
    guess = difflib.get_close_matches(leaf, keys, n=1)
    hint = f"did you mean {f'{section}.' if section else ''}{guess[0]}? " if guess else ""
    return f"{hint}valid {f'keys of {section}' if section else 'top-level keys'}: {', '.join(keys)}"
