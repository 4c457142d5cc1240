"""The one check every config dataclass runs: its fields have their declared types.

Each typed config (`ModelConfig`, `LoraConfig`, `OptimConfig`, `ComputeConfig`, ...) calls
`check_field_types(self, "section")` first thing in `__post_init__`, then checks its own ranges.
So a wrong value fails where the dataclass is built, whether it came from a config file, a
`--set` override, a checkpoint's config.json or Python, and the message names `section.key`:

    >>> LoraConfig(rank="16")
    ConfigError: lora.rank: expected int, got '16' (str)

Two conversions are made rather than refused: an int for a float field (`lr = 1` means 1.0) and
a list for a tuple field (JSON and gin both write lists).

Rejected alternative: a validation library (pydantic, attrs validators). The types used here are
few (scalars, unions with None, Literal, tuples, dicts), and plain frozen dataclasses keep the
configs hashable, printable as gin (`k2jax.config.to_gin`) and free of a dependency.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from typing import Any


class ConfigError(ValueError):
    """A configuration value or file is wrong; the message names the key and what was expected."""


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if origin in (tuple, Sequence):
        args = typing.get_args(tp)
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_type_ok(v, args[0]) for v in value)
        if origin is Sequence:
            return all(_type_ok(v, args[0]) for v in value) if args else True
        return len(args) == len(value) and all(_type_ok(v, a) for v, a in zip(value, args))
    if origin is dict:
        kt, vt = typing.get_args(tp) or (Any, Any)
        return isinstance(value, dict) and all(
            _type_ok(k, kt) and _type_ok(v, vt) for k, v in value.items()
        )
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def check_field_types(obj: Any, section: str) -> None:
    """Raises ConfigError naming `section.field` if a dataclass field has the wrong type.

    Integers given for float fields are converted (`lr = 1` means 1.0); lists become tuples.
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        tp = hints[f.name]
        if isinstance(value, list):
            value = tuple(value)
            object.__setattr__(obj, f.name, value)
        if not _type_ok(value, tp):
            raise ConfigError(
                f"{section}.{f.name}: expected {_type_name(tp)}, got {value!r} "
                f"({type(value).__name__})"
            )
        if (
            (
                tp is float
                or (
                    typing.get_origin(tp) in (typing.Union, types.UnionType)
                    and float in typing.get_args(tp)
                    and int not in typing.get_args(tp)
                )
            )
            and isinstance(value, int)
            and not isinstance(value, bool)
        ):
            object.__setattr__(obj, f.name, float(value))
