"""Config files: gin syntax bound to typed dataclasses, one per section.

A run's config file binds `section.key = value` (`model.hidden_size = 7168`, `lora.rank = 16`);
`include "other.gin"` pulls in another file (looked up beside the including file, then from the
working directory, then among the packaged configs, k2jax/configs), and macros (`RANK = 16`, then
`lora.rank = %RANK`) are expanded:

    sections = load_config(["configs/lora_sft.gin"], {"lora": LoraConfig, ...},
                           overrides=["lora.rank=32"])
    sections["lora"]  # LoraConfig(rank=32, ...)

`load_config` is two public steps, each usable alone: `read_bindings` (the files' bindings in
order, then the `--set` overrides, as (section, key, value, "file:line") tuples) and
`bind_sections` (one dataclass per section, later bindings win, every key checked against the
dataclass fields and every value against its type). `to_gin` is the way back, for the operative
config a run writes. Every mistake names the file, line and key, before any compute. A `--set`
value that is not a literal (`data.path=chats.jsonl`) is taken as a string.

We use gin-config's parser but not its global registry. Rejected alternative: decorating the
dataclasses with `@gin.configurable`. Gin then injects bindings into *every* later construction of
the class (a notebook that loads a checkpoint after parsing a preset would silently get the
preset's values), and gin does no type checking. Scopes, `@configurable` references and imports
are refused for the same reason: a file binds plain values.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gin import config_parser

from k2jax.config.checks import ConfigError


class _Macro(typing.NamedTuple):
    name: str


class _Delegate(config_parser.ParserDelegate):
    def configurable_reference(self, scoped_configurable_name, evaluate):
        raise ConfigError(
            f"configurable references (@{scoped_configurable_name}) are not supported; "
            "bind plain values"
        )

    def macro(self, macro_name):
        return _Macro(macro_name)


def _config_dir() -> Path:
    from k2jax.configs import CONFIG_DIR as d

    return d


CONFIG_DIR = _config_dir()


def find_config_file(name: str | os.PathLike) -> Path:
    """A config file by path, or by name among the packaged configs (k2jax/configs)."""
    path = Path(name)
    return path if path.is_file() else _resolve_include(str(name), None)


def _resolve_include(name: str, including: Path | None) -> Path:
    candidates = []
    if including is not None:
        candidates.append(including.parent / name)
    candidates += [Path(name), CONFIG_DIR / name, CONFIG_DIR / Path(name).name]
    for c in candidates:
        if c.is_file():
            return c
    where = f" (included from {including})" if including else ""
    raise ConfigError(f"config file {name!r} not found{where}")


def parse_bindings(
    text: str, *, filename: str | None = None, _seen: tuple[Path, ...] = ()
) -> list[tuple[str, str, Any, str]]:
    """Parses gin-syntax text into (section, key, value, where) bindings, includes expanded.

    Macros (`NAME = value`, used as `%NAME`) are resolved; scopes and configurable references are
    rejected. `where` is "file:line" for error messages.
    """
    path = Path(filename) if filename else None
    out: list[tuple[str, str, Any, str]] = []
    macros: dict[str, Any] = {}
    try:
        statements = list(config_parser.ConfigParser(text, _Delegate()))
    except ConfigError:
        raise
    except (SyntaxError, ValueError) as e:
        raise ConfigError(f"{filename or '<config>'}: cannot parse: {e}") from None
    except Exception as e:  # tokenize errors and the like
        raise ConfigError(f"{filename or '<config>'}: cannot parse: {e}") from None
    for st in statements:
        where = f"{filename or '<config>'}:{st.location.line_num}"
        if isinstance(st, config_parser.IncludeStatement):
            inc = _resolve_include(st.filename, path)
            if inc.resolve() in _seen:
                raise ConfigError(f"{where}: include cycle through {inc}")
            out += parse_bindings(inc.read_text(), filename=str(inc), _seen=(*_seen, inc.resolve()))
        elif isinstance(st, config_parser.ImportStatement):
            raise ConfigError(f"{where}: import statements are not supported in k2jax configs")
        elif isinstance(st, config_parser.BindingStatement):
            if st.scope:
                raise ConfigError(f"{where}: scoped bindings ({st.scope}/...) are not supported")
            if not st.arg_name:  # a macro definition
                macros[st.selector] = st.value
                continue
            out.append((st.selector, st.arg_name, st.value, where))
        else:
            raise ConfigError(f"{where}: unsupported statement {type(st).__name__}")

    def resolve(v, where):
        if isinstance(v, _Macro):
            if v.name not in macros:
                raise ConfigError(f"{where}: undefined macro %{v.name}")
            return resolve(macros[v.name], where)
        if isinstance(v, (list, tuple)):
            return type(v)(resolve(x, where) for x in v)
        if isinstance(v, dict):
            return {k: resolve(x, where) for k, x in v.items()}
        return v

    return [(s, k, resolve(v, w), w) for s, k, v, w in out]


def parse_override(text: str) -> tuple[str, str, Any, str]:
    """Parses one `--set section.key=value`; a value that is not a literal is taken as a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    key, raw = key.strip(), raw.strip()
    if key.count(".") != 1 or not all(p.isidentifier() for p in key.split(".")):
        raise ConfigError(f"--set {text!r}: the key must look like section.key (e.g. lora.rank)")
    try:
        [(section, name, value, _)] = parse_bindings(f"{key} = {raw}")
    except ConfigError:
        section, name = key.split(".")
        value = raw
    return section, name, value, f"--set {text}"


def did_you_mean(word: str, known: Iterable[str], section: str | None = None) -> str:
    """ "; did you mean a, b?" naming the closest of `known` (difflib), or "" when none is close.
    With `section`, the names are shown as section.name."""
    close = difflib.get_close_matches(word, list(known), n=3, cutoff=0.6)
    if not close:
        return ""
    return "; did you mean " + ", ".join(f"{section}.{c}" if section else c for c in close) + "?"


def bind_sections(
    bindings: Iterable[tuple[str, str, Any, str]],
    sections: Mapping[str, type],
    *,
    base: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Builds one dataclass per section from bindings; later bindings win.

    `base` may give starting values per section (a dataclass instance or a dict). Unknown sections
    or keys and values of the wrong type raise ConfigError naming the place they came from.
    """
    values: dict[str, dict[str, Any]] = {}
    places: dict[tuple[str, str], str] = {}
    for section, key, value, where in bindings:
        if section not in sections:
            raise ConfigError(
                f"{where}: unknown section {section!r} (in {section}.{key}){did_you_mean(section, sections)}; "
                f"known sections: {', '.join(sorted(sections))}"
            )
        names = [f.name for f in dataclasses.fields(sections[section])]
        if key not in names:
            raise ConfigError(
                f"{where}: {section!r} has no key {key!r}{did_you_mean(key, names, section)}"
            )
        values.setdefault(section, {})[key] = value
        places[(section, key)] = where
    out = {}
    for section, cls in sections.items():
        start = (base or {}).get(section)
        if dataclasses.is_dataclass(start):
            start = {f.name: getattr(start, f.name) for f in dataclasses.fields(start)}
        kwargs = {**(start or {}), **values.get(section, {})}
        try:
            out[section] = cls(**kwargs)
        except ConfigError as e:
            key = str(e).split(":")[0].split(".")[-1]
            where = places.get((section, key))
            raise ConfigError(f"{where}: {e}" if where else str(e)) from None
        except TypeError as e:
            missing = [
                f.name
                for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING
                and f.name not in kwargs
            ]
            if missing:
                raise ConfigError(
                    f"section {section!r} is missing required keys: "
                    + ", ".join(f"{section}.{m}" for m in missing)
                ) from None
            raise ConfigError(f"section {section!r}: {e}") from None
    return out


def read_bindings(
    files: str | os.PathLike | Sequence[str | os.PathLike], overrides: Sequence[str] = ()
) -> list[tuple[str, str, Any, str]]:
    """Every binding of the config files, in order, then the `--set` overrides (later ones win
    in `bind_sections`). A file is a path or the name of a packaged config (find_config_file)."""
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    bindings = []
    for f in files:
        path = find_config_file(f)
        bindings += parse_bindings(path.read_text(), filename=str(path))
    return bindings + [parse_override(o) for o in overrides]


def load_config(
    files: str | os.PathLike | Sequence[str | os.PathLike],
    sections: Mapping[str, type],
    overrides: Sequence[str] = (),
    *,
    base: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Parses config files (gin syntax) and `--set` overrides into one dataclass per section."""
    return bind_sections(read_bindings(files, overrides), sections, base=base)


def to_gin(section: str, obj: Any) -> str:
    """Writes a config dataclass back as gin bindings (the operative config of a run)."""
    lines = []
    for f in dataclasses.fields(obj):
        lines.append(f"{section}.{f.name} = {_gin_literal(getattr(obj, f.name))}")
    return "\n".join(lines) + "\n"


def _gin_literal(v: Any) -> str:
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, tuple):
        inner = ", ".join(_gin_literal(x) for x in v)
        return f"({inner},)" if len(v) == 1 else f"({inner})"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_gin_literal(k)}: {_gin_literal(x)}" for k, x in v.items()) + "}"
    return repr(v)
