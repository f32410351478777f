"""Up-front input checks of each command: every missing or inconsistent input is named in
ONE :class:`ConfigError` before any engine is built or any process group starts.

``erpd`` (and the module entry points) print a ConfigError as one line and exit with code 2,
so a user sees the whole list of what to fix at once instead of one traceback per attempt.
The Stage-1 signal check (:func:`check_stage1_signal`) runs once the rollout table is loaded
(cheap: no model yet).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from erpd_megatron.config.loader import ConfigError
from erpd_megatron.config.schema import Config

ROLLOUT_HINT = "the rollout directory written by `erpd rollout` (rollout.output_dir)"
PI_R_HINT = "the Megatron checkpoint of pi_r (tools/convert_checkpoint.py hf-to-mcore)"


def raise_problems(problems: list[str], what: str) -> None:
    """Raise one ConfigError listing every problem (nothing when the list is empty)."""
    if problems:
        n = len(problems)
        raise ConfigError(f"{what}: {n} problem{'s' if n > 1 else ''}: " + "; ".join(problems))


def print_config_error(command: str, err: ConfigError) -> int:
    """Print a ConfigError as one line on rank 0 (every rank refuses alike); returns 2."""
    from erpd_megatron.utils.log import _rank

    if _rank() == 0:
        print(f"erpd {command}: config error: {err}", file=sys.stderr)
    return 2


def _need_dir(
    problems: list[str], key: str, value: str | None, hint: str, marker: str | None = None
) -> None:
    """``key`` must name an existing directory (holding ``marker`` when given)."""
    if not value:
        problems.append(f"{key} is not set: {hint}")
    elif not Path(value).is_dir():
        problems.append(f"{key}={value}: no such directory ({hint})")
    elif marker and not (Path(value) / marker).exists():
        problems.append(
            f"{key}={value}: no {marker} there, not a complete output of its step ({hint})"
        )


def stage_input_problems(cfg: Config, stage: str) -> list[str]:
    """What Stage 1 (``stage1``) or Stage 2 (``stage2``) reads: pi_r, the rollouts, (the cache)."""
    problems: list[str] = []
    _need_dir(problems, "checkpoint.load", cfg.checkpoint.load, PI_R_HINT, "model_config.yaml")
    _need_dir(problems, "data.rollout_dir", cfg.data.rollout_dir, ROLLOUT_HINT, "manifest.json")
    if stage == "stage2":
        _need_dir(
            problems,
            "stage2.cache_dir",
            cfg.stage2.cache_dir,
            "the teacher cache written by tools/cache_teacher_logprobs.py (cache.dir)",
            "manifest.json",
        )
        if not cfg.stage2.teachers:
            problems.append("stage2.teachers is empty: name at least one cached teacher")
    return problems


def check_stage_inputs(cfg: Config, stage: str) -> None:
    """Raise one ConfigError naming every missing input of a training stage."""
    raise_problems(stage_input_problems(cfg, stage), f"{stage} inputs")


def cache_input_problems(cfg: Config) -> list[str]:
    """What the cache tool reads: the rollouts, pi_r (cached as ``base``), every cached model."""
    problems: list[str] = []
    if not cfg.cache.dir:
        problems.append("cache.dir is not set: where the teacher cache is written")
    _need_dir(problems, "data.rollout_dir", cfg.data.rollout_dir, ROLLOUT_HINT, "manifest.json")
    _need_dir(
        problems,
        "checkpoint.load (pi_r, cached as 'base')",
        cfg.checkpoint.load,
        PI_R_HINT,
        "model_config.yaml",
    )
    if not cfg.cache.models:
        problems.append(
            "cache.models is empty: list the teacher checkpoints, "
            "e.g. cache.models=[{name: teacher0, checkpoint: DIR}]"
        )
    for i, m in enumerate(cfg.cache.models):
        if m.name == "base":
            problems.append(
                f"cache.models.{i}: the name 'base' is reserved for pi_r (checkpoint.load)"
            )
        _need_dir(
            problems,
            f"cache.models.{i}.checkpoint ({m.name})",
            m.checkpoint,
            "a Stage-1 checkpoint, e.g. <output_dir>/stage1/checkpoints/final",
            "model_config.yaml",
        )
    return problems


def check_cache_inputs(cfg: Config) -> None:
    """Raise one ConfigError naming every missing input of the cache tool."""
    raise_problems(cache_input_problems(cfg), "cache inputs")


def hf_max_positions(path: str | Path) -> int | None:
    """``max_position_embeddings`` of an HF checkpoint's config.json (None when unknown)."""
    f = Path(path) / "config.json"
    try:
        value = json.loads(f.read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        return None
    return int(value) if isinstance(value, int) else None


def eval_length_problems(cfg: Config) -> list[str]:
    """``eval.max_new_tokens`` must fit in every evaluated model's positions (prompt excluded:
    prompts are at most rollout.max_prompt_tokens long, checked by the prompt loader)."""
    problems = []
    new = cfg.eval.max_new_tokens
    limits = [("model.max_position_embeddings", cfg.model.max_position_embeddings)]
    limits += [
        (f"{m.name} ({m.path}/config.json)", hf_max_positions(m.path))
        for m in cfg.eval.models
        if m.path
    ]
    for where, limit in limits:
        if limit and new > limit:
            problems.append(
                f"eval.max_new_tokens={new} is more than the {limit} positions of {where}: "
                f"lower eval.max_new_tokens"
            )
    return problems


# ---- Stage-1 signal -------------------------------------------------------------------------

ADVANTAGE_LOSSES = ("pg", "sapo", "mse")


def stage1_signal(
    cfg: Config, rewards: np.ndarray, advantages: np.ndarray, group_ids: np.ndarray
) -> tuple[float, str]:
    """Fraction of the rollout groups that give the configured Stage-1 loss a gradient, and
    what that loss needs.

    ``pg``, ``sapo`` and ``mse`` (and ``unlearned`` on them) are driven by the group advantage
    only: at the first step the policy IS pi_r, so every ratio is 1, every drift 0, and a
    group whose rewards are all equal (advantages 0) contributes no gradient; a ``kl_coef``
    penalty is 0 with 0 gradient there too. ``ce`` imitates the reward-1 samples (an all-1
    group is signal); unlearned ``ce`` imitates the reward-0 samples."""
    s = cfg.stage1
    kind = s.unlearned_base if s.loss == "unlearned" else s.loss
    if kind == "ce":
        negate = s.loss == "unlearned"
        useful = (rewards == 0) if negate else (rewards != 0)
        need = (
            "reward-0 samples (unlearned ce imitates them)"
            if negate
            else "reward-1 samples (ce imitates them)"
        )
    else:
        useful = advantages != 0
        need = "groups with different rewards (non-zero advantages)"
    uniq, inv = np.unique(group_ids, return_inverse=True)
    if len(uniq) == 0:
        return 0.0, need
    hit = np.zeros(len(uniq), bool)
    np.logical_or.at(hit, inv, useful)
    return float(hit.mean()), need


def check_stage1_signal(cfg: Config, table) -> float:
    """Refuse a Stage-1 run on data that gives its loss no gradient at all (every advantage 0
    for pg/sapo/mse, no reward-1 sample for ce), unless ``stage1.force``; returns the fraction
    of groups with signal."""
    from erpd_megatron.utils.log import get_logger

    frac, need = stage1_signal(cfg, table.rewards, table.advantages, table.group_ids)
    n = len(np.unique(table.group_ids))
    msg = (
        f"data.rollout_dir={cfg.data.rollout_dir}: {frac:.1%} of {n} groups have signal for "
        f"stage1.loss={cfg.stage1.loss} (it needs {need}; mean reward "
        f"{float(np.mean(table.rewards)):.3f})"
    )
    if frac > 0:
        get_logger(__name__).info("%s", msg)
        return frac
    if cfg.stage1.force:
        get_logger(__name__).warning("%s: training anyway (stage1.force=true)", msg)
        return frac
    raise ConfigError(
        f"{msg}: every gradient would be 0. Use rollouts with reward variance (more samples "
        "per prompt, a prompt set of the right difficulty), or pass --force / stage1.force=true"
    )
