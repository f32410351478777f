"""The study file of `erpd study`: a base recipe and a grid of rounds over it.

A study YAML::

    name: demo-grid                      # wandb group, default output folder
    recipe: ../recipes/demo-cpu.yaml     # relative to the study file (or the working dir)
    output_dir: runs/studies/demo-grid   # default runs/studies/<name>; a point per folder
    overrides: [eval.n=4]                # applied to every point (before the axes')
    axes:                                # the grid: the product of the axes
      - name: epochs                     # values of one key ...
        key: stage1.epochs
        values: [4, 8]
      - name: model                      # ... or labelled override lists
        values:
          small: [model.num_layers=2]
          large: [model.num_layers=4, optimizer.lr=5e-5]
    zip: [[model, lr]]                   # axes that vary together (equal lengths)
    seeds: [1234, 1235]                  # an axis `seed` (keys: seed_keys, default [seed])
    seed_keys: [seed]
    wandb_project: null                  # a wandb run per point (axes as config), group = name
    prepare: null                        # demo: bases of the embedded task (pipeline/demo.py)

Each grid point is one `erpd round` of the recipe with the study's overrides, the point's
axis overrides and ``output_dir=<output_dir>/<point name>``; the point's name is
``<axis>-<label>`` joined by ``__`` in axis order (labels: the value, or the override list's
key), so it is the same on every run of the study.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from erpd_megatron.config.loader import ConfigError

KEYS = (
    "name",
    "recipe",
    "output_dir",
    "overrides",
    "axes",
    "zip",
    "seeds",
    "seed_keys",
    "wandb_project",
    "rounds",
    "prepare",
)
AXIS_KEYS = ("name", "key", "values")
RECIPE_KEY = "\0recipe="  # an axis with ``key: recipe`` picks the point's base recipe


@dataclass
class Axis:
    """One named axis: labels and the overrides each label stands for."""

    name: str
    labels: list[str]
    overrides: list[list[str]]
    values: list[Any]
    """What the report shows in the axis's column (the value, or the label)."""


@dataclass
class Point:
    """One grid point: a round of the base recipe."""

    name: str
    axes: dict[str, Any]
    overrides: list[str]
    output_dir: Path
    recipe: Path


@dataclass
class Study:
    """A parsed study file."""

    path: Path
    name: str
    recipe: Path
    output_dir: Path
    overrides: list[str]
    axes: list[Axis]
    zips: list[list[str]] = field(default_factory=list)
    wandb_project: str | None = None
    rounds: int | None = None
    prepare: str | None = None
    """``demo``: each point's base is the embedded task's (pipeline/demo.py), trained once per
    distinct model and demo settings under ``<output_dir>/bases/``."""

    def points(self) -> list[Point]:
        """Every grid point, in a fixed order (the product over axis groups; zipped axes move
        together)."""
        by_name = {a.name: a for a in self.axes}
        zipped = {n for z in self.zips for n in z}
        groups: list[list[Axis]] = []
        for a in self.axes:
            if a.name not in zipped:
                groups.append([a])
            elif any(z[0] == a.name for z in self.zips):
                groups.append([by_name[n] for n in next(z for z in self.zips if z[0] == a.name)])
        choices = [list(range(len(g[0].labels))) for g in groups]
        out = []
        for combo in itertools.product(*choices):
            picked = {a.name: i for g, i in zip(groups, combo) for a in g}
            parts, ov, axes, recipe = [], list(self.overrides), {}, self.recipe
            for a in self.axes:  # names and overrides in the file's axis order
                i = picked[a.name]
                parts.append(f"{a.name}-{a.labels[i]}")
                for o in a.overrides[i]:
                    if o.startswith(RECIPE_KEY):
                        recipe = Path(o[len(RECIPE_KEY) :])
                    else:
                        ov.append(o)
                axes[a.name] = a.values[i]
            name = "__".join(parts) or "point"
            d = self.output_dir / name
            ov += [
                f"output_dir={d}",
                f"logging.wandb_group={self.name}",
                f"logging.run_name={self.name}-{name}",
            ]
            if self.wandb_project:
                ov.append(f"logging.wandb_project={self.wandb_project}")
            out.append(Point(name, axes, ov, d, recipe))
        return out


def _label(v: Any) -> str:
    s = re.sub(r"[^A-Za-z0-9.+-]+", "_", str(v)).strip("_")
    return s or "x"


def _flow_yaml(v: Any) -> str:
    """``v`` as one line of flow-style YAML (an override's value)."""
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def _str_list(v: Any, where: str, src: Path) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ConfigError(f"{src}: {where} must be a list of a.b=c override strings, got {v!r}")
    for x in v:
        if "=" not in x:
            raise ConfigError(f"{src}: {where}: '{x}' is not an a.b=c override")
    return list(v)


def _axis(raw: Any, i: int, src: Path) -> Axis:
    where = f"axes.{i}"
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{src}: {where} must be a mapping with name, values (and key), got {raw!r}"
        )
    unknown = sorted(set(raw) - set(AXIS_KEYS))
    if unknown:
        raise ConfigError(
            f"{src}: {where}: unknown key(s) {unknown} (an axis has {list(AXIS_KEYS)})"
        )
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
        raise ConfigError(
            f"{src}: {where}.name must be an identifier (letters, digits, _), got {name!r}"
        )
    where = f"axes.{i} ('{name}')"
    vals, key = raw.get("values"), raw.get("key")
    if isinstance(vals, dict):
        if key is not None:
            raise ConfigError(
                f"{src}: {where}: key is for a list of values; labelled override lists take none"
            )
        labels = [_label(k) for k in vals]
        ovs = [_str_list(v, f"{where}.values.{k}", src) for k, v in vals.items()]
        values: list[Any] = [str(k) for k in vals]
    elif isinstance(vals, list) and vals:
        if all(isinstance(v, list) for v in vals):
            if key is not None:
                raise ConfigError(
                    f"{src}: {where}: key is for a list of values, not of override lists"
                )
            ovs = [_str_list(v, f"{where}.values.{j}", src) for j, v in enumerate(vals)]
            labels, values = [str(j) for j in range(len(vals))], [str(j) for j in range(len(vals))]
        else:
            if not isinstance(key, str) or not key:
                raise ConfigError(
                    f"{src}: {where}: a list of values needs key: the dotted config key they set"
                )
            if any(isinstance(v, (list, dict)) for v in vals):
                raise ConfigError(
                    f"{src}: {where}.values: mix of scalars and lists; use override lists"
                )
            if key == "recipe":
                paths = [_recipe_path(str(v), src, f"{where}.values") for v in vals]
                return Axis(
                    name,
                    [_label(Path(str(v)).stem) for v in vals],
                    [[RECIPE_KEY + str(x)] for x in paths],
                    [Path(str(v)).stem for v in vals],
                )
            ovs = [[f"{key}={_flow_yaml(v)}"] for v in vals]
            labels, values = [_label(v) for v in vals], list(vals)
    else:
        raise ConfigError(
            f"{src}: {where}.values must be a non-empty list or a mapping label -> overrides, "
            f"got {vals!r}"
        )
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ConfigError(
            f"{src}: {where}: values give the same point name {dup}: make their labels differ"
        )
    return Axis(name, labels, ovs, values)


def _recipe_path(rec: str, src: Path, where: str) -> Path:
    """A recipe path relative to the study file, else to the working directory."""
    p = (src.parent / rec) if (src.parent / rec).exists() else Path(rec)
    if not p.exists():
        raise ConfigError(
            f"{src}: {where}: recipe {rec}: no such file (relative to {src.parent} or "
            "the working dir)"
        )
    return p


def load_study(path: str | Path) -> Study:
    """Parse and check a study file; every problem is a ConfigError naming the file and field."""
    src = Path(path)
    if not src.exists():
        raise ConfigError(f"study file {src} does not exist")
    try:
        raw = yaml.safe_load(src.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{src}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: a study is a mapping with name, recipe and axes")
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        import difflib

        hints = [
            f"'{u}'"
            + (f" (did you mean '{c[0]}'?)" if (c := difflib.get_close_matches(u, KEYS, 1)) else "")
            for u in unknown
        ]
        raise ConfigError(f"{src}: unknown key(s) {', '.join(hints)}; a study has {list(KEYS)}")
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ConfigError(
            f"{src}: name must be a folder-safe string (letters, digits, . _ -), got {name!r}"
        )
    rec = raw.get("recipe")
    by_axis = any(isinstance(a, dict) and a.get("key") == "recipe" for a in raw.get("axes") or [])
    if rec is None and by_axis:
        recipe = None
    elif not isinstance(rec, str):
        raise ConfigError(
            f"{src}: recipe must be the path of the base recipe YAML (or an axis with "
            f"key: recipe), got {rec!r}"
        )
    else:
        recipe = _recipe_path(rec, src, "recipe")
    out = raw.get("output_dir") or f"runs/studies/{name}"
    if not isinstance(out, str):
        raise ConfigError(f"{src}: output_dir must be a path string, got {out!r}")
    overrides = _str_list(raw.get("overrides") or [], "overrides", src)
    axes_raw = raw.get("axes") or []
    if not isinstance(axes_raw, list):
        raise ConfigError(f"{src}: axes must be a list of axes (name, values, key)")
    axes = [_axis(a, i, src) for i, a in enumerate(axes_raw)]
    seeds = raw.get("seeds")
    if seeds is not None:
        if (
            not isinstance(seeds, list)
            or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
        ):
            raise ConfigError(f"{src}: seeds must be a non-empty list of integers, got {seeds!r}")
        keys = raw.get("seed_keys", ["seed"])
        if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
            raise ConfigError(f"{src}: seed_keys must be a list of dotted keys, got {keys!r}")
        axes.append(
            Axis(
                "seed",
                [str(s) for s in seeds],
                [[f"{k}={s}" for k in keys] for s in seeds],
                list(seeds),
            )
        )
    elif "seed_keys" in raw:
        raise ConfigError(f"{src}: seed_keys without seeds")
    names = [a.name for a in axes]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{src}: axes: duplicate names {dup} (seeds make an axis named 'seed')")
    zips = raw.get("zip") or []
    if not isinstance(zips, list) or not all(isinstance(z, list) and len(z) >= 2 for z in zips):
        raise ConfigError(
            f"{src}: zip must be a list of lists of at least two axis names, got {zips!r}"
        )
    seen: set[str] = set()
    by = {a.name: a for a in axes}
    for j, z in enumerate(zips):
        for n in z:
            if n not in by:
                raise ConfigError(f"{src}: zip.{j}: '{n}' is not an axis ({names})")
            if n in seen:
                raise ConfigError(f"{src}: zip.{j}: axis '{n}' is in two zip groups")
            seen.add(n)
        lens = {n: len(by[n].labels) for n in z}
        if len(set(lens.values())) != 1:
            raise ConfigError(f"{src}: zip.{j}: zipped axes need equal lengths, got {lens}")
    wp = raw.get("wandb_project")
    if wp is not None and not isinstance(wp, str):
        raise ConfigError(f"{src}: wandb_project must be a string or null, got {wp!r}")
    rounds = raw.get("rounds")
    if rounds is not None and (not isinstance(rounds, int) or rounds < 1):
        raise ConfigError(f"{src}: rounds must be a positive integer, got {rounds!r}")
    prep = raw.get("prepare")
    if prep not in (None, "demo"):
        raise ConfigError(
            f"{src}: prepare must be null or 'demo' (the embedded task's base), got {prep!r}"
        )
    return Study(src, name, recipe, Path(out), overrides, axes, zips, wp, rounds, prep)
