"""Strict YAML loading into the typed config.

* ``defaults:`` inheritance: a list whose entries are either a path (relative to the file,
  ``.yaml`` optional) merged at the top level, or a one-key mapping ``{model: qwen3-tiny}``
  that loads ``configs/models/qwen3-tiny.yaml`` under the key ``model`` (any component works:
  the folder is ``configs/<component>s/`` or ``configs/<component>/``). Later entries win,
  the file's own keys win over all its defaults.
* ``a.b=c`` overrides, typed with YAML scalars (``1``, ``1e-5``, ``true``, ``null``, ``[1,2]``).
  ``stage2.teachers.0.alpha=2`` indexes lists.
* An unknown key anywhere is a :class:`ConfigError` naming the file or override and the
  closest valid key; a wrong type names the field and the expected type.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from erpd_megatron.config.schema import Config

CONFIGS_ROOT = Path(__file__).resolve().parents[2] / "configs"


class ConfigError(ValueError):
    """A config file or override is wrong; the message says where and what to do."""


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.4)
    return (
        f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(sorted(options))}"
    )


def _read_yaml(path: Path) -> dict:
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _resolve_default(entry: Any, base: Path) -> tuple[str | None, Path]:
    """Map one ``defaults:`` entry to (key to nest under or None, file path)."""
    if isinstance(entry, str):
        p = (base / entry) if not os.path.isabs(entry) else Path(entry)
        if p.suffix not in (".yaml", ".yml"):
            p = p.with_suffix(".yaml")
        return None, p
    if isinstance(entry, dict) and len(entry) == 1:
        ((key, name),) = entry.items()
        for folder in (
            CONFIGS_ROOT / f"{key}s",
            CONFIGS_ROOT / key,
            base / f"{key}s",
            base.parent / f"{key}s",
        ):
            p = folder / f"{name}.yaml"
            if p.exists():
                return key, p
        return key, CONFIGS_ROOT / f"{key}s" / f"{name}.yaml"
    raise ConfigError(
        f"{base}: a `defaults:` entry must be a path or a one-key mapping, got {entry!r}"
    )


def deep_merge(base: dict, over: dict) -> dict:
    """Recursively merge ``over`` into a copy of ``base`` (mappings merge, everything else
    replaces)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_yaml_tree(
    path: str | os.PathLike, _seen: tuple[Path, ...] = ()
) -> tuple[dict, dict[str, str]]:
    """Load a YAML file with its ``defaults:`` resolved.

    Returns the merged mapping and, for error messages, a map from dotted key to the file
    that last set it.
    """
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: `defaults:` cycle through {' -> '.join(map(str, _seen))}")
    raw = _read_yaml(path)
    defaults = raw.pop("defaults", []) or []
    if not isinstance(defaults, list):
        raise ConfigError(f"{path}: `defaults:` must be a list")
    merged: dict = {}
    origin: dict[str, str] = {}
    for entry in defaults:
        key, p = _resolve_default(entry, path.parent)
        sub, sub_origin = load_yaml_tree(p, _seen + (path,))
        if key is not None:
            sub = {key: sub}
            sub_origin = {f"{key}.{k}": v for k, v in sub_origin.items()}
        merged = deep_merge(merged, sub)
        origin.update(sub_origin)
    merged = deep_merge(merged, raw)
    for k in _dotted_keys(raw):
        origin[k] = str(path)
    return merged, origin


def _dotted_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.append(key)
        if isinstance(v, dict):
            out.extend(_dotted_keys(v, key + "."))
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=c`` into (["a", "b"], typed value)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected the form a.b=value")
    key, _, value = text.partition("=")
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override '{text}': empty key")
    try:
        parsed = yaml.safe_load(value) if value.strip() != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': cannot parse value: {e}") from e
    return key.split("."), parsed


def apply_overrides(tree: dict, overrides: list[str], origin: dict[str, str]) -> dict:
    """Apply ``a.b=c`` overrides to a raw mapping (validated later against the schema)."""
    tree = copy.deepcopy(tree)
    for text in overrides:
        keys, value = parse_override(text)
        node: Any = tree
        for k in keys[:-1]:
            if isinstance(node, list):
                node = _list_item(node, k, text)
                continue
            if not isinstance(node.get(k), (dict, list)):
                node[k] = {}
            node = node[k]
        last = keys[-1]
        if isinstance(node, list):
            idx = int(last) if last.isdigit() else None
            if idx is None or idx >= len(node):
                raise ConfigError(f"override '{text}': list index '{last}' out of range")
            node[idx] = value
        else:
            node[last] = value
        origin[".".join(keys)] = f"override '{text}'"
    return tree


def _list_item(node: list, k: str, text: str) -> Any:
    if not k.isdigit() or int(k) >= len(node):
        raise ConfigError(f"override '{text}': list index '{k}' out of range (length {len(node)})")
    return node[int(k)]


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str, origin: dict[str, str]) -> Any:
    """Convert a raw YAML value to ``tp``, strictly."""
    src = origin.get(where, "defaults")
    origin_t = get_origin(tp)
    if origin_t in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, where, origin)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1] if errors else f"{src}: {where}: bad value {value!r}")
    if origin_t is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            hint = (
                _closest(str(value), [str(a) for a in get_args(tp)])
                if isinstance(value, str)
                else ""
            )
            raise ConfigError(f"{src}: {where} = {value!r} is not one of {choices}{hint}")
        return value
    if origin_t is list:
        if not isinstance(value, list):
            raise ConfigError(f"{src}: {where} must be a list, got {value!r}")
        (item_t,) = get_args(tp)
        return [_convert(v, item_t, f"{where}.{i}", origin) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(
                f"{src}: {where} must be a mapping of {tp.__name__} fields, got {value!r}"
            )
        return build_dataclass(tp, value, where, origin)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{src}: {where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{src}: {where} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads "1e-5" as a string
            except ValueError:
                pass
        raise ConfigError(f"{src}: {where} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{src}: {where} must be a string, got {value!r}")
    if tp is Any:
        return value
    raise ConfigError(f"{src}: {where}: unsupported field type {_type_name(tp)}")


def build_dataclass(
    cls: type, data: dict, where: str = "", origin: dict[str, str] | None = None
) -> Any:
    """Build ``cls`` from a mapping, rejecting unknown keys with the closest valid one."""
    origin = origin or {}
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in names:
            src = origin.get(dotted, "config")
            raise ConfigError(f"{src}: unknown key '{dotted}'{_closest(str(key), names)}")
        kwargs[key] = _convert(value, hints[key], dotted, origin)
    return cls(**kwargs)


def to_dict(cfg: Any) -> Any:
    """The config as plain dicts/lists (for YAML/JSON dumps, wandb, manifests)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, list):
        return [to_dict(v) for v in cfg]
    return cfg


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    *,
    validate: bool = True,
) -> Config:
    """Load a recipe YAML (with ``defaults:``), apply ``a.b=c`` overrides, build and validate."""
    tree, origin = load_yaml_tree(path) if path else ({}, {})
    # Overrides apply on top of the schema defaults so that list items that the YAML does
    # not spell out (e.g. stage2.teachers.0.alpha) can still be addressed.
    tree = deep_merge(to_dict(Config()), tree)
    tree = apply_overrides(tree, list(overrides or []), origin)
    cfg = build_dataclass(Config, tree, "", origin)
    if validate:
        from erpd_megatron.config.validate import validate_config

        validate_config(cfg)
    return cfg


def load_model_config(path: str | os.PathLike) -> Any:
    """Load an architecture-only YAML (``configs/models/*.yaml``) into a ModelConfig."""
    from erpd_megatron.config.schema import ModelConfig

    tree, origin = load_yaml_tree(path)
    return build_dataclass(ModelConfig, tree, "model", {f"model.{k}": v for k, v in origin.items()})


def field_docs(cls: type) -> dict[str, str]:
    """Field docstrings of a schema dataclass (the string literal under each field)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for a, b in zip(body, body[1:]):
        if (
            isinstance(a, ast.AnnAssign)
            and isinstance(b, ast.Expr)
            and isinstance(b.value, ast.Constant)
        ):
            docs[a.target.id] = str(b.value.value)  # type: ignore[union-attr]
    return docs


__all__ = [
    "ConfigError",
    "apply_overrides",
    "build_dataclass",
    "deep_merge",
    "field_docs",
    "load_config",
    "load_model_config",
    "load_yaml_tree",
    "parse_override",
    "to_dict",
]

_ = typing  # typing kept for forward references resolved by get_type_hints
