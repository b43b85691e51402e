"""Typed configs: dataclasses filled from a YAML file, then from ``key=value`` overrides.

Values are coerced to the field's declared type (YAML reads ``1e-4`` as a string), nested
dataclasses are addressed with dots (``loader.batch_size=32``), and an unknown key is an error
that names the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ltdist.entry import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A config file or override that does not fit the config's dataclass, or a value its
    checks refuse."""


class _Override(str):
    """An override's value as typed: YAML for most fields, taken verbatim by a ``str`` field
    (so ``name=no`` stays "no" and ``tag=007`` stays "007")."""


def _parse(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Build ``cls`` from an optional YAML file, then apply ``key=value`` overrides in order."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:  # the file and line, not a parser traceback
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            what = " ".join(
                x for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x
            ) or str(e)
            raise ConfigError(f"{where}: not valid YAML: {what}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        data = loaded or {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        _set_dotted(data, key.strip(), _Override(value))
    return from_dict(cls, data, where=source)


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from a plain mapping, checking keys and coercing types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r} for {cls.__name__}{hint}")
        kwargs[key] = _coerce(hints[key], value, f"{where}: {key}")
    try:
        obj = cls(**kwargs)
        check = getattr(obj, "validate", None)
        if callable(check):
            check()
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # a field's own check: a config mistake, said where
        raise ConfigError(f"{where}: {e}") from None
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    """The config as plain YAML-able data (what checkpoints and reports record)."""
    return dataclasses.asdict(obj)


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


def resolve_path(ref: str) -> str:
    """A config's path, with ``pkg:<module>/<sub/path>`` naming a folder inside an installed
    package (the small real models that ship on PyPI); other values are returned unchanged."""
    if not ref.startswith("pkg:"):
        return ref
    import importlib.util

    module, _, sub = ref[len("pkg:") :].partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{ref}: package {module!r} is not installed")
    path = Path(spec.submodule_search_locations[0]) / sub
    if not path.exists():
        raise ConfigError(f"{ref}: {path} does not exist")
    return str(path)


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if isinstance(child, _Override):
            child = _parse(child)
        if child is None:  # absent, or an empty YAML section ("loader:")
            child = {}
        node[part] = child
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if isinstance(value, _Override):
        if tp is str or (origin is typing.Literal and str(value) in args):
            return str(value)
        if origin not in (typing.Union, types.UnionType):
            value = _parse(value)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or _is_null(value)):
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be {value!r}")
    if origin is typing.Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value or {}, where=where)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(item_tp, v, where) for v in value]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_tp, val_tp = args if len(args) == 2 else (Any, Any)
        return {
            _coerce(key_tp, k, where): _coerce(val_tp, v, f"{where}.{k}") for k, v in value.items()
        }
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        try:
            number = float(value) if isinstance(value, str) else value
            if tp is int:
                if float(number) != int(number):
                    raise ValueError
                return int(number)
            return float(number)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _is_null(value: Any) -> bool:
    return isinstance(value, _Override) and _parse(value) is None
