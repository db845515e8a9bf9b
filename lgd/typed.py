"""Config sections validated by pydantic, every problem reported at once with its key path.

Shared by the trial config (``lgd.config``) and the grid files (``orchestration.grid``): a section is a
``pydantic.dataclasses.dataclass(config=STRICT)`` deriving from :class:`Section`; :func:`build` turns pydantic's
``ValidationError`` into a :class:`ConfigError` of ``key.path: message`` lines.
"""
from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import ConfigDict, TypeAdapter, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError, core_schema

# Unknown keys are errors; a bool is no number and a string no number (an int is taken for a float).
STRICT = ConfigDict(extra="forbid", strict=True)
# Problems that leave the values well-typed: the cross-field rules of the enclosing sections still run.
_NON_BLOCKING = ("unexpected_keyword_argument", "extra_forbidden", "config_check")


class ConfigError(ValueError):
    """One or more configuration problems, each prefixed by its key path."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))


class Section:
    """Base of the config sections: built from a mapping; ``check()`` yields ``(key, message)`` for each broken
    cross-field rule (``key`` relative to the section, ``""`` for the section itself). The rules run whenever the
    section's values are well-typed: beside type errors elsewhere, unknown keys and broken rules within it."""

    def check(self):
        return ()

    @classmethod
    def __get_pydantic_core_schema__(cls, source, handler):
        return _section_schema(source, handler)


def _section_schema(tp: type, handler) -> core_schema.CoreSchema:
    """The dataclass schema of ``tp``, built from a mapping, with YAML 1.1 switches and the ``check()`` rules."""
    schema = handler(tp)
    resolved = handler.resolve_ref_schema(schema)
    if resolved.get("metadata", {}).get("lgd_section"):  # a nested section: its class's own schema, already done
        return schema
    resolved["strict"] = False  # a mapping builds it (its fields stay strict)
    names = {f.name for f in dataclasses.fields(tp)}
    hints = typing.get_type_hints(tp)
    switches = {n: args for n in names if "off" in (args := _literal_args(hints[n])) or "on" in args}

    def validate(data, inner, info):
        if data is None:  # a YAML section with nothing under it: all defaults
            data = {}
        if isinstance(data, dict) and switches:  # YAML 1.1 reads a bare off/on as a boolean
            data = {k: ("on" if v else "off") if isinstance(v, bool) and ("on" if v else "off") in switches.get(k, ())
                    else v for k, v in data.items()}
        ctx = info.context
        if ctx is None:  # direct construction (dataclasses.replace, tests): every problem raises
            obj = inner(data)
            errors = []
        elif ctx.get("lenient"):  # a re-run for an enclosing section's rules: problems already recorded
            return inner({k: v for k, v in data.items() if k in names} if isinstance(data, dict) else data)
        else:
            try:
                obj, errors = inner(data), []
            except ValidationError as e:
                errors = e.errors(include_url=False)
                if any(err["type"] not in _NON_BLOCKING for err in errors):
                    raise
                ctx["lenient"] = True  # only unknown keys and broken rules below: the values are well-typed
                try:
                    obj = inner({k: v for k, v in data.items() if k in names})
                finally:
                    ctx["lenient"] = False
        errors = [_error(err["type"], err["loc"], err["input"], err.get("ctx")) for err in errors]
        errors += [_error("config_check", (key,) if key else (), None, {"message": msg}) for key, msg in obj.check()]
        if errors:
            raise ValidationError.from_exception_data(tp.__name__, errors)
        return obj

    return core_schema.with_info_wrap_validator_function(validate, schema, metadata={"lgd_section": True})


def _error(kind: str, loc: tuple, value: Any, ctx: dict | None) -> InitErrorDetails:
    if kind == "config_check":
        return InitErrorDetails(type=PydanticCustomError("config_check", "{message}", ctx), loc=loc, input=value)
    return InitErrorDetails(type=kind, loc=loc, input=value)  # an unknown key: no context


def _literal_args(tp: Any) -> tuple:
    tp = _strip_optional(tp)
    return get_args(tp) if get_origin(tp) is Literal else ()


def _strip_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def annotation_at(cls: type, loc: tuple) -> Any:
    """The annotation (``Optional`` stripped) of the value at key path ``loc`` under dataclass ``cls``; None
    where ``loc`` leads to no declared key."""
    tp = cls
    for part in loc:
        if dataclasses.is_dataclass(tp) and isinstance(part, str):
            hints = typing.get_type_hints(tp)
            if part not in hints:
                return None
            tp = hints[part]
        elif get_origin(tp) in (list, tuple) and isinstance(part, int) or get_origin(tp) is dict:
            tp = get_args(tp)[-1]
        else:
            return None
        tp = _strip_optional(tp)
    return tp


_EXPECTED = {"int_type": "an integer", "float_type": "a number", "bool_type": "true/false", "string_type": "a string",
             "list_type": "a list", "dict_type": "a mapping", "dataclass_type": "a mapping",
             "dataclass_exact_type": "a mapping"}


def _message(cls: type, err: dict) -> str:
    kind, loc, value = err["type"], err["loc"], err.get("input")
    if kind == "config_check":
        return err["ctx"]["message"]
    if kind == "missing":
        return "required key is missing"
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        section = annotation_at(cls, loc[:-1])
        allowed = [f.name for f in dataclasses.fields(section)] if dataclasses.is_dataclass(section) else []
        close = [f for f in allowed if f.startswith(str(loc[-1])[:3])]
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown key{hint}; allowed: {', '.join(allowed)}"
    if kind == "literal_error":
        args = _literal_args(annotation_at(cls, loc))
        return f"{value!r} is not one of {', '.join(map(repr, args))}" if args else err["msg"]
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {value!r}"
    return f"{err['msg']}, got {value!r}"


def _key_path(path: str, loc: tuple) -> str:
    for part in loc:
        path = f"{path}[{part}]" if isinstance(part, int) else (f"{path}.{part}" if path else str(part))
    return path or "<root>"


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    if not issubclass(cls, Section):
        raise TypeError(f"{cls.__name__} is not a config Section (pydantic dataclass deriving from Section)")
    return TypeAdapter(cls)


def build(cls: type, data: Any, path: str = "", problems: list[str] | None = None):
    """Build dataclass ``cls`` from ``data``: wrong types, unknown and missing keys, and the ``check()`` rules
    are problems, each prefixed by its key path under ``path``.

    With ``problems=None`` a :class:`ConfigError` is raised when anything is wrong; otherwise problems are
    appended and the instance (``None`` when anything is wrong) is returned.
    """
    own = problems is None
    problems = [] if own else problems
    try:
        obj = _adapter(cls).validate_python({} if data is None else data, context={})
    except ValidationError as e:
        problems.extend(f"{_key_path(path, err['loc'])}: {_message(cls, err)}" for err in e.errors(include_url=False))
        obj = None
    if own and problems:
        raise ConfigError(problems)
    return obj


def json_schema(cls: type) -> dict:
    """The JSON Schema (draft 2020-12) of the mapping that builds ``cls``."""
    return _adapter(cls).json_schema()


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
