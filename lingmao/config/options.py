"""`key=value` options of the commands that are not Hydra apps (generate,
eval, compare): a typed dataclass per command, the command line merged onto
it with OmegaConf, so a typo or a wrong type fails in one line that names
the key and what is valid, and `--help` is written from the same fields.

A field's help is its `metadata["help"]`. Values are read as Hydra reads
them (`n=4`, `top_p=0.9`, `cache=false`, `runs=[a,b]`), except that a string
field takes its text verbatim (an MLflow run id such as `1234e5678...` or a
date-named folder stays a string) and a list field may also be given once
per item (`prompt=床前 prompt=子曰`).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class OptionError(ValueError):
    """A bad argument; printed as one line with what is valid."""


def doc(text: str) -> dict:
    """A field's one line for --help: `field(default=..., metadata=doc("..."))`."""
    return {"help": text}


def _types(schema: type) -> dict[str, Any]:
    hints = typing.get_type_hints(schema)
    return {f.name: hints[f.name] for f in dataclasses.fields(schema)}


def _is_list(kind: Any) -> bool:
    return typing.get_origin(kind) is list


def _type_name(kind: Any) -> str:
    if _is_list(kind):
        return f"a list of {_type_name(typing.get_args(kind)[0])}, e.g. [a,b]"
    return "true or false" if kind is bool else getattr(kind, "__name__", str(kind))


def _unquote(raw: str) -> str:
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        return raw[1:-1]
    return raw


def parse(schema: type[T], argv: list[str], positional: str | None = None) -> T:
    """An instance of the dataclass `schema` from `key=value` arguments.
    `positional`: the list field that arguments without `=` go to."""
    kinds = _types(schema)
    valid = ", ".join(kinds)
    given: dict[str, Any] = {}
    raw_of: dict[str, str] = {}
    for arg in argv:
        key, sep, raw = arg.partition("=")
        if arg.startswith("-") or not (sep or positional):
            name = key.lstrip("-").replace("-", "_")
            hint = f"; write {name}=..." if name in kinds else ""
            raise OptionError(f"{arg!r}: options are key=value with key one of {valid}{hint} (see --help)")
        if not sep:
            key, raw = positional, arg
        if key not in kinds:
            raise OptionError(f"{key}={raw!r}: unknown key {key!r}; valid keys: {valid} (see --help)")
        kind = kinds[key]
        raw_of[key] = raw
        if kind is str:
            given[key] = _unquote(raw)
        elif _is_list(kind):
            items = OmegaConf.from_dotlist([f"v={raw}"]).v if raw.startswith("[") else [_unquote(raw)]
            given[key] = [*given.get(key, []), *items]
        else:
            given[key] = OmegaConf.from_dotlist([f"v={raw}"]).v
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(given))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = str(e.full_key).split(".")[0].split("[")[0]
        if key in kinds:
            raise OptionError(f"{key}={raw_of.get(key)!r}: expected {_type_name(kinds[key])}") from None
        raise OptionError(str(e).splitlines()[0]) from None


def choice(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise OptionError(f"{key}={value!r}: choose one of {', '.join(valid)}")


def _default(f: dataclasses.Field) -> str:
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        value = f.default
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return "''" if value == "" else str(value)


def usage(schema: type, command: str, summary: str, examples: list[str]) -> str:
    """`lingmao COMMAND --help`: what it does, every key with its default
    and one line on it, then examples."""
    rows = [(f.name, _default(f), f.metadata.get("help", "")) for f in dataclasses.fields(schema)]
    width = max(len(name) for name, _, _ in rows)
    dwidth = min(24, max(len(d) for _, d, _ in rows))
    keys = "\n".join(f"  {name:<{width}}  {d:<{dwidth}}  {text}" for name, d, text in rows)
    shown = "\n".join(f"  {e}" for e in examples)
    return (
        f"usage: lingmao {command} [key=value ...]\n\n{summary}\n\n"
        f"keys (default, then what it does):\n{keys}\n\nexamples:\n{shown}\n"
    )


def asked_for_help(argv: list[str], schema: type, command: str, summary: str, examples: list[str]) -> bool:
    """Print the command's help page if argv asks for it (-h, --help)."""
    if any(a in ("-h", "--help") for a in argv):
        print(usage(schema, command, summary, examples))
        return True
    return False
