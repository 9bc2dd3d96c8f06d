"""Typed configs: frozen dataclasses built from YAML mappings and dotted `key=value` overrides, checked once.

The one mechanism behind the model (`ModelConfig`), training (`TrainConfig`) and sweep configs. A config class is a
frozen dataclass; each field's annotation is its type (int, float, bool, str, `Literal[...]` choices, `tuple[X, ...]`,
`dict[K, V]`, `X | None`, nested config dataclasses, `Any`) and its doc is one line of data: `doc=` in the field's
metadata (`field(default, doc=...)`) or the comment that ends the field's line. So a new field needs no loader code:
its annotation, default and comment are the whole declaration.

`build(cls, mapping, where)` checks every key and value against the types and raises a one-line `ConfigError`
naming the dotted key (with the nearest valid key for typos); the class's `__post_init__` checks what spans fields.
A class may define `__config_resolve__(value, where) -> mapping` to accept other spellings (ModelConfig: a preset
name, or `{base: PRESET, ...keys}`). `describe(cls)` lists every key with its type, default and doc.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import io
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad configuration; the message is one line naming the key and the problem."""


def nearest(key, options) -> str:
    """" (did you mean 'x'?)" for the closest option, or ""."""
    match = difflib.get_close_matches(str(key), [str(o) for o in options], n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def field(default=dataclasses.MISSING, *, doc: str = "", default_factory=dataclasses.MISSING):
    """A dataclass field with its one-line doc as metadata (a trailing comment does the same for simple fields)."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"doc": doc})


# ---------------------------------------------------------------------------------------------------------------
# Reading: YAML files, named files under configs/, overrides


def read_yaml_mapping(path, what: str) -> dict:
    """A YAML file (local or gs://) that must hold a mapping (an empty file is {}); bad YAML or another type is a
    one-line error."""
    from qwen35_jax import paths

    try:
        data = yaml.safe_load(paths.path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of {what}, got {type(data).__name__}")
    return data


def resolve_file(name_or_path: str, folder: Path, what: str):
    """A YAML path (local or gs://), or a NAME of `folder/NAME.yaml` (unknown names suggest the nearest)."""
    from qwen35_jax import paths

    path = paths.path(str(name_or_path))
    if path.suffix not in (".yaml", ".yml"):
        candidate = folder / f"{name_or_path}.yaml"
        if candidate.exists():
            return candidate
        names = sorted(p.stem for p in folder.glob("*.yaml"))
        raise ConfigError(f"unknown {what} {name_or_path!r}{nearest(name_or_path, names)}; "
                          f"{folder.parent.name}/{folder.name} has: {', '.join(names)}")
    if not path.exists():
        raise ConfigError(f"{what} file {str(path)!r} does not exist")
    return path


def parse_overrides(items) -> dict[str, Any]:
    """["a=1", "b.c=x"] -> {"a": 1, "b.c": "x"}, values read as YAML scalars/flow mappings; dicts pass through."""
    if isinstance(items, dict):
        return dict(items)
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v) if v.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: not a valid YAML value ({str(e).splitlines()[0]})") from None
    return out


def set_dotted(data: dict, key: str, value) -> None:
    """data["a"]["b"] = value for key "a.b". A string on the way (a preset name) becomes {base: name}."""
    parts = key.split(".")
    node = data
    for i, p in enumerate(parts[:-1]):
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        elif isinstance(child, str):
            child = node[p] = {"base": child}
        elif not isinstance(child, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[:i + 1])!r} is {child!r}, not a mapping")
        node = child
    node[parts[-1]] = value


def apply_overrides(data: dict, overrides) -> dict:
    for k, v in parse_overrides(overrides if isinstance(overrides, dict) else list(overrides)).items():
        set_dotted(data, k, v)
    return data


# ---------------------------------------------------------------------------------------------------------------
# Building: types checked against annotations


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def type_text(tp) -> str:
    """A short name of a field type for listings: int, float, 'a'|'b', list[int], ModelConfig|null."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    if _is_union(tp):
        return "|".join(type_text(a) for a in args)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (tuple, list):
        return f"list[{type_text(args[0])}]" if args else "list"
    if origin in (dict, typing.Mapping) or tp is dict:
        return f"map[{type_text(args[0])}: {type_text(args[1])}]" if args else "mapping"
    return getattr(tp, "__name__", str(tp))


def _expected(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        return "true/false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is type(None):
        return "null"
    if origin is Literal:
        return f"one of {', '.join(str(a) for a in args)}"
    if _is_union(tp):
        return " or ".join(_expected(a) for a in args)
    if origin in (tuple, list):
        return "a list"
    if dataclasses.is_dataclass(tp) or origin in (dict, typing.Mapping) or tp is dict:
        return "a mapping"
    return type_text(tp)


class _Mismatch(Exception):
    """A value that does not have the type (the caller words the message)."""


def coerce(value, tp, key: str, where: str):
    """`value` as type `tp`, or ConfigError "{where}: key 'k' must be ..., got ..."."""
    try:
        return _coerce(value, tp, key, where)
    except _Mismatch:
        extra = ""
        if typing.get_origin(tp) is Literal and isinstance(value, str):
            extra = nearest(value, typing.get_args(tp))
        raise ConfigError(f"{where}: key {key!r} must be {_expected(tp)}, got {value!r}{extra}") from None


def _number(value):
    if isinstance(value, str):  # YAML 1.1 reads 3e-3 as a string
        try:
            return float(value)
        except ValueError:
            raise _Mismatch from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Mismatch
    return value


def _coerce(value, tp, key, where):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if _is_union(tp):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, where)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):  # True is not 1
            return value
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        value = _number(value)
        if float(value) != int(value):
            raise ConfigError(f"{where}: key {key!r} must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        return float(_number(value))
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if len(args) == 2 and args[1] is Ellipsis:
            items = [coerce(v, args[0], f"{key}[{i}]", where) for i, v in enumerate(value)]
        elif args and origin is tuple:
            if len(value) != len(args):
                raise ConfigError(f"{where}: key {key!r} must be a list of {len(args)} items, got {value!r}")
            items = [coerce(v, a, f"{key}[{i}]", where) for i, (v, a) in enumerate(zip(value, args))]
        else:
            items = [coerce(v, args[0], f"{key}[{i}]", where) for i, v in enumerate(value)] if args else list(value)
        return tuple(items) if origin is tuple else items
    if origin in (dict, typing.Mapping) or tp is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        if not args:
            return dict(value)
        return {coerce(k, args[0], f"{key} key", where): coerce(v, args[1], f"{key}.{k}", where)
                for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        resolve = getattr(tp, "__config_resolve__", None)
        if resolve is not None:
            try:
                value = resolve(value, f"{where}: {key}")
            except ConfigError as e:
                raise ConfigError(f"{where}: key {key!r}: {e}") from None
        if not isinstance(value, dict):
            raise _Mismatch
        return build(tp, value, where, prefix=f"{key}.")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _Mismatch


def build(cls, data: dict, where: str = "config", *, prefix: str = ""):
    """An instance of the config dataclass `cls` from a mapping of its keys (missing keys take the defaults)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {prefix[:-1] or 'config'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _hints(cls)
    kwargs = {}
    for k, v in data.items():
        if k not in fields:
            options = [f"{prefix}{f}" for f in fields]
            raise ConfigError(f"{where}: unknown key {prefix + str(k)!r}{nearest(prefix + str(k), options)}")
        kwargs[k] = coerce(v, hints[k], prefix + k, where)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if str(e).startswith(where):
            raise
        raise ConfigError(f"{where}: {e}") from None


def to_dict(cfg) -> dict:
    """A config as plain data (nested configs as mappings, tuples as lists): what `build` reads back."""
    def plain(x):
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return plain(cfg)


# ---------------------------------------------------------------------------------------------------------------
# Docs: one line per key


@functools.lru_cache(maxsize=None)
def field_docs(cls) -> dict[str, str]:
    """{field: doc} from `doc=` metadata, else the comment ending the field's line in the class source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        docs_here: dict[str, str] = {}
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        own = {f.name for f in dataclasses.fields(klass)}
        body_indent, current, line_start, depth = None, None, True, 0
        for tok in tokenize.generate_tokens(io.StringIO(_dedent(source)).readline):
            if tok.type == tokenize.OP and tok.string in "([{":
                depth += 1
            elif tok.type == tokenize.OP and tok.string in ")]}":
                depth -= 1
            if tok.type == tokenize.COMMENT:
                text = tok.string.lstrip("#").strip()
                text = text.split("noqa")[0].rstrip(" (") if "noqa" in text else text
                if current and text and current not in docs_here:  # the first comment of the field's statement
                    docs_here[current] = text
            elif tok.type == tokenize.NAME and line_start and depth == 0 and tok.start[1] > 0:
                body_indent = tok.start[1] if body_indent is None else body_indent
                current = tok.string if tok.start[1] == body_indent and tok.string in own else None
            if tok.type == tokenize.NEWLINE:
                current = None
            line_start = tok.type in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.NL) or (
                line_start and tok.type == tokenize.COMMENT)
        docs.update(docs_here)
        for f in dataclasses.fields(klass):
            if f.metadata.get("doc"):
                docs[f.name] = f.metadata["doc"]
    return docs


def _dedent(source: str) -> str:
    lines = source.splitlines(keepends=True)
    indent = len(lines[0]) - len(lines[0].lstrip())
    return "".join(line[indent:] if line[:indent].strip() == "" else line for line in lines)


def describe(cls, instance=None, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, value, doc) for every key, nested configs expanded; values from `instance` (default:
    the class defaults)."""
    if instance is None:
        instance = cls()
    rows = []
    hints, docs = _hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, value = hints[f.name], getattr(instance, f.name)
        nested = [a for a in ((tp,) + typing.get_args(tp)) if dataclasses.is_dataclass(a)]
        if nested:
            sub = nested[0]
            shown = value if value is None else f"({sub.__name__})"
            rows.append((prefix + f.name, type_text(tp), shown, docs.get(f.name, "")))
            rows += describe(sub, value if value is not None else sub(), prefix=f"{prefix}{f.name}.")
        else:
            rows.append((prefix + f.name, type_text(tp), value, docs.get(f.name, "")))
    return rows


def format_keys(rows) -> str:
    def text(v):
        if v is None:
            return "null"
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, (tuple, list, dict)):
            return yaml.safe_dump(to_dict(v) if isinstance(v, dict) else list(v), default_flow_style=True,
                                  width=10 ** 6).strip()
        return str(v)

    cells = [(k, t, text(v), d) for k, t, v, d in rows]
    wk = max(len(c[0]) for c in cells)
    wt = min(max(len(c[1]) for c in cells), 28)
    wv = min(max(len(c[2]) for c in cells), 24)
    out = [f"{'key':<{wk}}  {'type':<{wt}}  {'default':<{wv}}  doc"]
    for k, t, v, d in cells:
        out.append(f"{k:<{wk}}  {t:<{wt}}  {v:<{wv}}  {d}".rstrip())
    return "\n".join(out)


__all__ = ["ConfigError", "nearest", "field", "read_yaml_mapping", "resolve_file", "parse_overrides", "set_dotted",
           "apply_overrides", "coerce", "build", "to_dict", "field_docs", "describe", "format_keys", "type_text"]
