"""Typed configuration sections from YAML mappings: dataclasses, light type checks, unknown keys named.

Shared by the pretraining config (:mod:`dinov3geo.ssl.config`), the task configs (canopy, change) and the
pipeline runner, so every config in dinov3geo reports a bad key the same way.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ConfigError", "apply_overrides", "check_type", "from_dict", "load_yaml", "set_dotted", "yaml_error_text"]


class ConfigError(ValueError):
    """A configuration key is unknown, mistyped or inconsistent (the message names the key)."""


def _is_dataclass_type(t: Any) -> bool:
    return isinstance(t, type) and dataclasses.is_dataclass(t)


def check_type(value: Any, tp: Any, key: str) -> Any:
    """Light type check/coercion of YAML scalars (ints for floats, etc.); errors name ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return check_type(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key {key!r}: value {value!r} does not match {tp}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp) or (Any,)
        return [check_type(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, d: dict[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys raise :class:`ConfigError` naming the key."""
    d = d or {}
    if not isinstance(d, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'!r} must be a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; valid keys here: {sorted(names)}"
        )
    kwargs = {}
    for k, v in d.items():
        tp = hints[k]
        kwargs[k] = from_dict(tp, v, f"{prefix}{k}.") if _is_dataclass_type(tp) else check_type(v, tp, prefix + k)
    return cls(**kwargs)


def yaml_error_text(err: yaml.YAMLError, where: str) -> str:
    """One line for a YAML syntax error: ``where line L, column C: not valid YAML: problem (context started at
    line L2, column C2)``.

    PyYAML's own text spans several lines and names ``<unicode string>`` when parsing text; this names the
    file and the 1-based line and column of the problem.
    """
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    cmark = getattr(err, "context_mark", None)
    text = f"{where}"
    if mark is not None:
        text += f" line {mark.line + 1}, column {mark.column + 1}"
    text += f": not valid YAML: {problem}"
    if context:
        text += f" ({context}" + (f" started at line {cmark.line + 1}, column {cmark.column + 1}" if cmark else "") + ")"
    return " ".join(text.split())


def load_yaml(path: str | os.PathLike[str], what: str = "config") -> Any:
    """Read a YAML file safely; every failure is a :class:`ConfigError` naming the file (and line).

    Args:
        path: the YAML file.
        what: what the file is, for messages (``"canopy config"``, ``"pipeline"``...).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} {os.fspath(path)!r} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {os.fspath(path)!r} is a folder, not a YAML file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {os.fspath(path)!r} is not a text (UTF-8) file: byte {e.start} cannot be "
                          "decoded") from None
    except OSError as e:
        raise ConfigError(f"{what} {os.fspath(path)!r} cannot be read: {e.strerror or e}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(yaml_error_text(e, os.fspath(path))) from None


def set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``d["a"]["b"] = value`` for ``dotted = "a.b"``, creating sections; a non-section on the way errors."""
    parts = dotted.split(".")
    cur = d
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
        if not isinstance(cur, dict):
            raise ConfigError(f"cannot set {dotted!r}: {p!r} is not a section")
    cur[parts[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``["section.key=value", ...]`` to ``raw`` in place (values parsed as YAML scalars); returns it."""
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like section.key=value")
        key, value = ov.split("=", 1)
        set_dotted(raw, key.strip(), yaml.safe_load(value))
    return raw
