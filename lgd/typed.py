"""Strict dataclass construction from plain dicts: every problem reported with its key path.

Shared by the trial config (``lgd.config``) and the grid files (``orchestration.grid``).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin


class _Invalid:
    """Marks a value that failed conversion (its problem is already recorded)."""

    def __repr__(self):
        return "<invalid>"


INVALID = _Invalid()


def _valid(value: Any) -> bool:
    if value is INVALID:
        return False
    if isinstance(value, list):
        return all(_valid(v) for v in value)
    if isinstance(value, dict):
        return all(_valid(v) for v in value.values())
    return True


class ConfigError(ValueError):
    """One or more configuration problems, each prefixed by its key path."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def convert(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    """Check ``value`` against the annotation ``tp``; append problems, return the converted value."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return convert(non_none[0], value, path, problems)
        for arg in non_none:  # first alternative that accepts the value
            trial: list[str] = []
            out = convert(arg, value, path, trial)
            if not trial:
                return out
        problems.append(f"{path}: expected {' or '.join(_type_name(a) for a in non_none)}, got {value!r}")
        return INVALID
    if origin is Literal:
        if isinstance(value, bool) and ("off" if not value else "on") in get_args(tp):
            value = "off" if not value else "on"  # YAML 1.1 reads a bare off/on as a boolean
        if value not in get_args(tp):
            problems.append(f"{path}: {value!r} is not {_type_name(tp)}")
            return INVALID
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            problems.append(f"{path}: expected a list, got {value!r}")
            return INVALID
        (item_tp, *_rest) = get_args(tp) or (Any,)
        return [convert(item_tp, v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {value!r}")
            return INVALID
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {k: convert(val_tp, v, _join(path, str(k)), problems) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path, problems)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{path}: expected true/false, got {value!r}")
            return INVALID
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{path}: expected an integer, got {value!r}")
            return INVALID
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{path}: expected a number, got {value!r}")
            return INVALID
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{path}: expected a string, got {value!r}")
            return INVALID
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {path}")


def build(cls: type, data: Any, path: str = "", problems: list[str] | None = None):
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types are problems.

    With ``problems=None`` a :class:`ConfigError` is raised when anything is wrong; otherwise
    problems are appended and the instance (or ``INVALID`` when it cannot be built) is returned.
    """
    own = problems is None
    problems = [] if own else problems
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{path or '<root>'}: expected a mapping, got {data!r}")
        if own:
            raise ConfigError(problems)
        return INVALID
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = [f for f in fields if f.startswith(str(key)[:3])]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{_join(path, str(key))}: unknown key{hint}; allowed: {', '.join(fields)}")
    kwargs = {}
    complete = True
    for name, f in fields.items():
        if name in data:
            kwargs[name] = convert(hints[name], data[name], _join(path, name), problems)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{_join(path, name)}: required key is missing")
            complete = False
    obj = INVALID
    if complete and _valid(kwargs):  # cross-field checks run whenever the values themselves are well-typed
        obj = cls(**kwargs)
        check = getattr(obj, "check", None)
        if check is not None:
            problems.extend(f"{_join(path, k)}: {msg}" if k else f"{path or '<root>'}: {msg}" for k, msg in check())
    if own and problems:
        raise ConfigError(problems)
    return obj


def load_yaml(path) -> Any:
    """``yaml.safe_load`` of a file; a missing file or bad YAML is a ConfigError naming the file."""
    from pathlib import Path

    import yaml

    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: not valid YAML: {e}"]) from None


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """``set_dotted(d, "a.b.c", 1)`` creates intermediate mappings as needed."""
    keys = dotted.split(".")
    cur = data
    for k in keys[:-1]:
        nxt = cur.get(k)
        if nxt is None:
            nxt = cur[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError([f"{dotted}: {k!r} is not a mapping"])
        cur = nxt
    cur[keys[-1]] = value


def deep_merge(base: dict, update: dict) -> dict:
    """A new dict: ``update`` merged into ``base`` recursively (mappings merge, the rest replaces)."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out
