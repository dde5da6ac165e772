"""Parsing of the tuning config: plain data (a nested dict, command-line values) -> typed sections,
and the one-line :class:`ConfigError` for every key, type or value that does not fit.

The schema it fills (the dataclasses) is :mod:`marglik.tuning.config`; the value-range checks are
:mod:`marglik.tuning.config_checks`. Everything here works on any config dataclass it is handed, so
it imports nothing of the schema. Messages have one shape::

    <key>=<value>: <problem>; allowed: <what is allowed>

e.g. ``trainer.epochs=abc: wrong type; allowed: an integer``.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import typing
from dataclasses import fields
from typing import Any, Dict, List, Mapping, Optional, Tuple, Type

from ..errors import UserError
from .choices import ModelName


# --------------------------------------------------------------------------- errors and types
class ConfigError(UserError, ValueError):
    """A bad configuration value, type or key; ``str(err)`` is one line
    ``<key>=<value>: <problem>; allowed: <allowed>``."""

    kind = "config error"

    def __init__(self, key: str, value: Any, problem: str, allowed: str) -> None:
        self.key, self.value, self.problem, self.allowed = key, value, problem, allowed
        super().__init__(f"{key}={show_value(value)}: {problem}; allowed: {allowed}")


def show_value(value: Any) -> str:
    """A value as it would be written on the command line.

    Args:
        value: a config value.

    Returns:
        Its command-line spelling (``null``, ``true``, ``[a, b]``, an enum's value).
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def describe_type(tp: Any) -> str:
    """What a field accepts, in words (for error messages and ``--help``).

    Args:
        tp: the field's type annotation.

    Returns:
        e.g. ``"an integer or null"``, ``"one of expand, reduce"``.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return describe_type(inner[0]) + " or null"
    if origin in (list, List):
        item = args[0]
        if isinstance(item, type) and issubclass(item, enum.Enum):
            return "a list of values from " + ", ".join(m.value for m in item)
        return "a list of " + {bool: "booleans", int: "integers", float: "numbers", str: "strings"}.get(item, str(item))
    if origin in (dict, Dict) and isinstance(args[1], type) and issubclass(args[1], enum.Enum):
        return "a mapping {name: value} with values from " + ", ".join(m.value for m in args[1])
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(m.value for m in tp)
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def type_problem(tp: Any) -> str:
    """The problem of a value that does not fit a field.

    Args:
        tp: the field's type annotation.

    Returns:
        ``"not a boolean"``, ``"not a valid choice"`` or ``"wrong type"``.
    """
    text = describe_type(tp)
    if text.startswith("true or false"):
        return "not a boolean"
    return "not a valid choice" if text.startswith("one of") else "wrong type"


def resolved_types(klass: Type[Any]) -> Dict[str, Any]:
    """The resolved field types of a config dataclass.

    Args:
        klass: the dataclass.

    Returns:
        ``{field name: type annotation}`` with forward references resolved.
    """
    return typing.get_type_hints(klass)


def field_type(klass: Type[Any], key: str) -> Any:
    """The resolved type of a field of a config section.

    Args:
        klass: the section's dataclass.
        key: the field name.

    Returns:
        Its type annotation (forward references resolved).
    """
    return resolved_types(klass)[key]


def strict_types(klass: Type[Any], raw: Dict[str, Any], prefix: str) -> None:
    """Checks OmegaConf would let through: booleans are ``true``/``false`` only (not ``off``,
    ``yes``, ``1``), integers and numbers are not booleans.

    Args:
        klass: the section's dataclass.
        raw: ``{field name: value}`` given for it.
        prefix: the section's dotted prefix for messages (e.g. ``"trainer."``).

    Raises:
        ConfigError: the first value of the wrong kind.
    """
    hints = resolved_types(klass)
    for key, value in raw.items():
        tp = hints.get(key)
        if tp is None or value is None or is_interpolation(value):
            continue
        if typing.get_origin(tp) is typing.Union:
            tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
        if tp is bool and not isinstance(value, bool):
            raise ConfigError(prefix + key, value, "not a boolean", "true or false")
        if tp in (int, float) and isinstance(value, bool):
            raise ConfigError(prefix + key, value, "wrong type", describe_type(tp))


def is_interpolation(value: Any) -> bool:
    """Whether a value is an OmegaConf interpolation (``${...}``), typed only once resolved.

    Args:
        value: a config value.

    Returns:
        True for a string containing ``${``.
    """
    return isinstance(value, str) and "${" in value


def unknown_key_error(key: str, value: Any, known: List[str], where: str) -> ConfigError:
    """The error for an unknown key, suggesting the closest known one.

    Args:
        key: the dotted key given.
        value: its value.
        known: the keys allowed there.
        where: what holds them, for the message (e.g. ``"HyperConfig"``).

    Returns:
        The :class:`ConfigError` to raise.
    """
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f" (did you mean {key.rsplit('.', 1)[0]}.{close[0]}?)" if close and "." in key else ""
    return ConfigError(key, value, f"unknown key{hint}", f"the keys of {where}: " + ", ".join(sorted(known)))


# --------------------------------------------------------------------------- plain data -> typed
def typed_section(klass: Type[Any], raw: Dict[str, Any], prefix: str, where: str) -> Any:
    """``raw`` merged onto the dataclass ``klass`` by OmegaConf.

    Args:
        klass: the section's dataclass.
        raw: ``{field name: value}`` given for it (missing fields keep their defaults).
        prefix: the section's dotted prefix for messages (e.g. ``"trainer."``).
        where: what holds the fields, for the message (e.g. ``"trainer"``).

    Returns:
        A ``klass`` instance.

    Raises:
        ConfigError: an unknown key or a value of the wrong type.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    known = [f.name for f in fields(klass)]
    for key, value in raw.items():
        if key not in known:
            raise unknown_key_error(prefix + key, value, known, where)
    strict_types(klass, raw, prefix)
    try:
        node = OmegaConf.merge(OmegaConf.structured(klass), raw)
        return OmegaConf.to_object(node)
    except OmegaConfBaseException as err:
        key = str(getattr(err, "full_key", None) or getattr(err, "key", "") or "").split(".")[0].split("[")[0]
        if key in known:
            value = raw.get(key, getattr(err, "value", None))
            tp = field_type(klass, key)
            raise ConfigError(prefix + key, value, type_problem(tp), describe_type(tp)) from None
        problem = str(err).splitlines()[0]
        raise ConfigError(prefix.rstrip(".") or "config", raw, problem, f"the fields of {where}") from None


def model_kwargs(name: Any, kwargs: Dict[str, Any], schemas: Mapping[str, Type[Any]]) -> Tuple[ModelName, Dict[str, Any]]:
    """A model's constructor kwargs checked against its schema and completed with its defaults.

    Args:
        name: the model's name (a :class:`~marglik.tuning.choices.ModelName` or its string).
        kwargs: the options given for it.
        schemas: model name -> the dataclass of its options (``MODEL_SCHEMAS``).

    Returns:
        ``(name, kwargs)``: the name as a ``ModelName`` and every option as plain data.

    Raises:
        ConfigError: an unknown model, an option of another model, or a value of the wrong type.
    """
    if str(name) not in schemas:
        raise ConfigError("model.name", name, "unknown model", "one of " + ", ".join(schemas))
    schema = schemas[str(name)]
    known = [f.name for f in fields(schema) if f.name != "name"]
    for key, value in kwargs.items():
        if key not in known:
            raise ConfigError(
                f"model.{key}", value, f"not an option of model {name} (select a model with model={name}, "
                f"which brings its own options, not with model.name={name})",
                f"the options of model {name}: " + ", ".join(known))
    typed = typed_section(schema, {**kwargs, "name": str(name)}, "model.", f"model {name}")
    out = plain(typed)
    out.pop("name")
    return ModelName(str(name)), out


def sections_from_dict(d: Optional[Dict[str, Any]], overrides: Dict[str, Dict[str, Any]],
                       sections: Mapping[str, Type[Any]], model_config: Type[Any]) -> Dict[str, Any]:
    """The typed sections of a run config, from a nested dict and per-section overrides.

    Keys of ``d`` other than the sections and ``model`` are ignored (Hydra adds its own). ``model``
    accepts either ``{"name": ..., "kwargs": {...}}`` or a flat dict whose keys other than ``name``
    are constructor kwargs.

    Args:
        d: the nested dict (``None``: all defaults).
        overrides: ``{section: {field: value}}`` merged over ``d``'s sections.
        sections: section name -> its dataclass (every section but ``model``).
        model_config: the ``model`` section's class, called as ``model_config(name, kwargs)``.

    Returns:
        ``{section name: typed section}``, ``model`` included (values not range-checked yet).

    Raises:
        ConfigError: an unknown key or a value of the wrong type.
    """
    d = dict(d or {})
    for key, val in overrides.items():
        if key not in sections and key != "model":
            raise unknown_key_error(key, val, ["model", *sections], "the config")
        d[key] = {**dict(d.get(key) or {}), **val}
    out: Dict[str, Any] = {}
    for key, klass in sections.items():
        raw = d.get(key) or {}
        if not isinstance(raw, dict):
            raise ConfigError(key, raw, "not a section", "a mapping of " + ", ".join(f.name for f in fields(klass)))
        out[key] = typed_section(klass, dict(raw), key + ".", key)
    raw = dict(d.get("model") or {})
    if "kwargs" in raw:
        extra = sorted(set(raw) - {"name", "kwargs"})
        if extra:
            raise ConfigError(f"model.{extra[0]}", raw[extra[0]], "unknown key", "name and kwargs (or flat kwargs)")
        out["model"] = model_config(raw.get("name", "cnn"), dict(raw["kwargs"] or {}))
    else:
        name = raw.pop("name", "cnn")
        out["model"] = model_config(name, raw)
    return out


# --------------------------------------------------------------------------- typed -> plain data
def plain(value: Any) -> Any:
    """Plain data for JSON and checkpoints.

    Args:
        value: enums, dataclasses, dicts, lists and tuples, nested.

    Returns:
        The same with enums as their string values, dataclasses as dicts and tuples as lists.
    """
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """A nested config dict as dotted keys.

    Args:
        d: nested dicts (e.g. :meth:`Config.to_dict`).
        prefix: prepended to every key.

    Returns:
        ``{"section.key": value}``; an empty dict stays a value.
    """
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
