"""`erpd rollout` / `tools/generate_rollouts.py`: generate the fixed rollout data of a round.

    erpd rollout --config RECIPE [a.b=c ...] [--shard-index I --num-shards N] [--finalize]

Steps: load the tokenizer of ``rollout.model_path``; load and select the prompts
(:mod:`erpd_megatron.data.prompts`); write (or check) ``plan.json``, the deterministic plan
that every member of a fleet derives identically; generate the Parquet shards this process
owns and has not finished (G samples per prompt, seeded per shard), score them in the reward
pool and write each shard atomically; when every shard exists, write ``manifest.json``.

Fleet: the shards are dealt round-robin over N slots. The slot comes from
``--shard-index/--num-shards``, else from a Slurm job array (slot ``SLURM_ARRAY_TASK_ID`` of
``ERPD_FLEET_SIZE``, else of ``SLURM_ARRAY_TASK_MAX + 1``) combined with the tasks of an
``srun`` (``SLURM_PROCID`` / ``SLURM_NTASKS``), else slot 0 of 1. Whoever finds all shards
complete writes the manifest; ``--finalize`` does only that (scripts/slurm/rollout_finalize.sh
runs it after the fleet, so that no fleet member depends on seeing the others' shards). A
rerun skips complete shards, so a crashed or preempted task is resumed by running it again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from erpd_megatron.config.loader import ConfigError, load_config, to_dict
from erpd_megatron.config.schema import Config, RolloutConfig
from erpd_megatron.data.prompts import PromptDataError, SelectedPrompt, load_prompt_set
from erpd_megatron.data.rollouts import (
    MANIFEST,
    RolloutDataError,
    RolloutRecord,
    finalize_manifest,
    read_shard_metadata,
    shard_is_complete,
    shard_name,
    write_shard,
)
from erpd_megatron.rollout.engines import (
    CheckpointError,
    EngineError,
    RolloutEngine,
    check_hf_checkpoint,
    derive_seed,
    load_tokenizer,
    make_engine,
    model_fingerprint,
)
from erpd_megatron.rollout.reward_pool import RewardPool, RewardPoolError
from erpd_megatron.rollout.verifier import RewardFnError
from erpd_megatron.utils.files import atomic_write_json, read_json
from erpd_megatron.utils.log import get_logger

log = get_logger(__name__)

PLAN = "plan.json"
TIMING_DIR = "timing"
USER_ERRORS = (
    ConfigError,
    PromptDataError,
    CheckpointError,
    EngineError,
    RolloutDataError,
    RewardFnError,
    RewardPoolError,
    ImportError,
)


def fleet_slot(
    shard_index: int | None = None,
    num_shards: int | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[int, int]:
    """(this process's slot, number of slots) from the flags, else Slurm's environment.

    In a job array the slot is the array task id itself and the fleet has ``ERPD_FLEET_SIZE``
    slots (scripts/slurm/rollout.sh sets it from ``FLEET_SIZE``), else the array's highest
    task id + 1 (``SLURM_ARRAY_TASK_MAX``): rerunning the failed slots of a 4-slot fleet with
    ``--array=1,3`` keeps them slots 1 and 3 of 4. (``SLURM_ARRAY_TASK_COUNT`` would make
    task 3 of that rerun "slot 2 of 2".) The tasks of an ``srun`` multiply it:
    slot = array_slot * SLURM_NTASKS + SLURM_PROCID.
    """
    env = os.environ if env is None else env
    if shard_index is not None or num_shards is not None:
        if shard_index is None or num_shards is None:
            raise ConfigError("--shard-index and --num-shards go together")
        if num_shards < 1 or not 0 <= shard_index < num_shards:
            raise ConfigError(
                f"--shard-index {shard_index} must be in [0, --num-shards={num_shards})"
            )
        return shard_index, num_shards
    a, na, source = 0, 1, ""
    if env.get("SLURM_ARRAY_TASK_ID"):
        a = int(env["SLURM_ARRAY_TASK_ID"])
        if env.get("ERPD_FLEET_SIZE"):
            na, source = int(env["ERPD_FLEET_SIZE"]), f"ERPD_FLEET_SIZE={env['ERPD_FLEET_SIZE']}"
        else:
            na = int(env.get("SLURM_ARRAY_TASK_MAX") or a) + 1
            source = f"SLURM_ARRAY_TASK_MAX={na - 1}"
        if not 0 <= a < na:
            raise ConfigError(
                f"array task {a} is outside the fleet of {na} slots ({source}): submit "
                f"--array within 0-{na - 1} or set FLEET_SIZE (ERPD_FLEET_SIZE) to the fleet size"
            )
    p, np_ = int(env.get("SLURM_PROCID", "0") or 0), int(env.get("SLURM_NTASKS", "1") or 1)
    slot, n = a * np_ + p, na * np_
    if not 0 <= slot < n:
        raise ConfigError(
            f"Slurm environment gives slot {slot} of {n}; check SLURM_ARRAY_TASK_* / SLURM_PROCID"
        )
    return slot, n


def output_dir(cfg: Config) -> Path:
    """``rollout.output_dir``, else ``<output_dir>/rollouts``."""
    return Path(cfg.rollout.output_dir or Path(cfg.output_dir) / "rollouts")


def _check_settings(rc: RolloutConfig) -> None:
    problems = []
    for name in (
        "num_prompts",
        "samples_per_prompt",
        "max_new_tokens",
        "max_prompt_tokens",
        "prompts_per_shard",
        "batch_size",
    ):
        if getattr(rc, name) <= 0:
            problems.append(f"rollout.{name} must be positive (got {getattr(rc, name)})")
    if rc.temperature < 0:
        problems.append(f"rollout.temperature must be >= 0 (got {rc.temperature})")
    if not 0 < rc.top_p <= 1:
        problems.append(f"rollout.top_p must be in (0, 1] (got {rc.top_p})")
    if problems:
        raise ConfigError("; ".join(problems))
    if rc.temperature != 1.0 or rc.top_p != 1.0:
        log.warning(
            "rollout.temperature=%s, top_p=%s: engine log-probs are of the sampling distribution, "
            "not of pi_r itself (ERPD assumes temperature 1, top_p 1)",
            rc.temperature,
            rc.top_p,
        )


@dataclass
class RolloutPlan:
    """The deterministic plan of a rollout set: prompts, shards, settings and their hash."""

    prompts: list[SelectedPrompt]
    """The selected prompts in group order."""
    info: dict[str, Any]
    """JSON-able facts stored in plan.json and copied into the manifest."""
    hash: str
    """SHA-256 of everything that determines the samples."""

    @property
    def num_shards(self) -> int:
        """Number of Parquet shards."""
        return int(self.info["num_shards"])

    def shard_prompts(self, s: int) -> list[SelectedPrompt]:
        """The prompts of shard ``s``."""
        pps = int(self.info["prompts_per_shard"])
        return self.prompts[s * pps : (s + 1) * pps]


def make_plan(cfg: Config, tokenizer: Any) -> RolloutPlan:
    """Select the prompts and fix everything that determines the samples."""
    rc = cfg.rollout
    sel = load_prompt_set(
        rc.dataset or "",
        tokenizer,
        split=rc.dataset_split,
        config_name=rc.dataset_config,
        num_prompts=rc.num_prompts,
        seed=rc.seed,
        max_prompt_tokens=rc.max_prompt_tokens,
        prompt_format=rc.prompt_format,
        question_key=rc.question_key,
        answer_key=rc.answer_key,
        template=rc.prompt_template,
        use_chat_template=rc.use_chat_template,
    )
    h = hashlib.sha256()
    for p in sel.prompts:
        h.update(json.dumps([p.prompt_id, p.token_ids, p.reference]).encode())
    determining = {
        "prompts_sha256": h.hexdigest(),
        "num_prompts": len(sel.prompts),
        "samples_per_prompt": rc.samples_per_prompt,
        "prompts_per_shard": rc.prompts_per_shard,
        "engine": rc.engine,
        "model_fingerprint": model_fingerprint(rc.model_path or ""),
        "sampling": {
            "temperature": rc.temperature,
            "top_p": rc.top_p,
            "max_new_tokens": rc.max_new_tokens,
            "n": rc.samples_per_prompt,
        },
        "seed": rc.seed,
        "reward_fn": rc.reward_fn,
    }
    plan_hash = hashlib.sha256(json.dumps(determining, sort_keys=True).encode()).hexdigest()
    info = {
        **determining,
        "num_shards": math.ceil(len(sel.prompts) / rc.prompts_per_shard),
        "model_path": rc.model_path,
        "tokenizer_path": rc.tokenizer_path or rc.model_path,
        "tokenizer_vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "seeds": {"prompt_selection": rc.seed, "generation": f"derive_seed({rc.seed}, 'shard', s)"},
        "prompts": {
            "dataset": rc.dataset,
            "split": rc.dataset_split,
            "config": rc.dataset_config,
            "template": rc.prompt_template,
            "use_chat_template": rc.use_chat_template,
            "max_prompt_tokens": rc.max_prompt_tokens,
            **sel.summary(),
        },
        "prompt_ids": [p.prompt_id for p in sel.prompts],
        "rollout_config": to_dict(rc),
        "plan_hash": plan_hash,
    }
    return RolloutPlan(prompts=sel.prompts, info=info, hash=plan_hash)


def write_or_check_plan(directory: Path, plan: RolloutPlan) -> None:
    """Write ``plan.json``; when one exists, it must be the same plan (else an error naming
    the settings that differ)."""
    path = directory / PLAN
    if path.exists():
        old = read_json(path)
        if old.get("plan_hash") != plan.hash:
            keys = (
                "prompts_sha256",
                "num_prompts",
                "samples_per_prompt",
                "prompts_per_shard",
                "engine",
                "model_fingerprint",
                "sampling",
                "seed",
                "reward_fn",
            )
            diff = [k for k in keys if old.get(k) != plan.info.get(k)]
            raise RolloutDataError(
                f"{directory}: holds rollouts of another plan (differs in: "
                f"{', '.join(diff) or 'unknown'}); use a new rollout.output_dir, or delete the "
                "directory to start over"
            )
        return
    atomic_write_json(path, plan.info)


def _shard_records(
    prompts: list[SelectedPrompt],
    groups: list[list[Any]],
    texts: list[str],
    rewards: list[float],
    g: int,
) -> list[RolloutRecord]:
    records, k = [], 0
    for p, comps in zip(prompts, groups):
        for j, c in enumerate(comps):
            records.append(
                RolloutRecord(
                    sample_id=p.group_index * g + j,
                    prompt_id=p.prompt_id,
                    group_index=p.group_index,
                    sample_index=j,
                    prompt_token_ids=p.token_ids,
                    response_token_ids=c.token_ids,
                    reward=rewards[k],
                    finish_reason=c.finish_reason,
                    engine_logprobs=c.logprobs,
                    prompt_text=p.text,
                    response_text=texts[k],
                    reference=p.reference,
                )
            )
            k += 1
    return records


def generate_shard(
    s: int,
    plan: RolloutPlan,
    rc: RolloutConfig,
    engine: RolloutEngine,
    pool: RewardPool,
    tokenizer: Any,
    directory: Path,
    *,
    progress: bool = True,
    gpus: int = 0,
) -> Path:
    """Generate, score and write shard ``s``; returns its path.

    ``gpus`` is the number of GPUs the engine uses; it goes into the shard's timing sidecar for
    the manifest's compute record.
    """
    prompts, g = plan.shard_prompts(s), rc.samples_per_prompt
    t0 = time.perf_counter()
    groups = engine.generate(
        [p.token_ids for p in prompts],
        g,
        temperature=rc.temperature,
        top_p=rc.top_p,
        max_new_tokens=rc.max_new_tokens,
        seed=derive_seed(rc.seed, "shard", s),
        progress=progress,
    )
    gen_s = time.perf_counter() - t0
    flat = [c for comps in groups for c in comps]
    if len(flat) != len(prompts) * g:
        raise RuntimeError(f"engine returned {len(flat)} samples for {len(prompts)} prompts x {g}")
    texts = tokenizer.batch_decode([c.token_ids for c in flat], skip_special_tokens=True)
    before = dict(pool.stats)
    t1 = time.perf_counter()
    rewards = pool.map(texts, [p.reference for p in prompts for _ in range(g)], progress=progress)
    ver_s = time.perf_counter() - t1
    tokens = sum(len(c.token_ids) for c in flat)
    # Only facts about the content go into the shard (its bytes, hence the fingerprint, must
    # not depend on timing); timings go to a sidecar that the manifest sums.
    stats = {
        "generated_tokens": tokens,
        **{f"reward_{k}": pool.stats[k] - before[k] for k in ("timeouts", "errors", "crashes")},
    }
    path = directory / shard_name(s)
    write_shard(
        path,
        _shard_records(prompts, groups, texts, rewards, g),
        {
            "shard_index": s,
            "first_group": prompts[0].group_index,
            "num_groups": len(prompts),
            "samples_per_prompt": g,
            "plan_hash": plan.hash,
            "engine": engine.name,
            "logprobs_mode": engine.logprobs_mode,
            "stats": stats,
        },
    )
    atomic_write_json(
        directory / TIMING_DIR / f"{shard_name(s)}.json",
        {
            "generation_seconds": gen_s,
            "verify_seconds": ver_s,
            "generated_tokens": tokens,
            # Prefill counted once per prompt (engines share it across the group's samples).
            "prompt_tokens": sum(len(p.token_ids) for p in prompts),
            "gpus": gpus,
        },
    )
    log.info(
        "shard %d: %d samples, %d tokens in %.1fs (%.0f tok/s), reward mean %.3f, verified in "
        "%.1fs",
        s,
        len(flat),
        tokens,
        gen_s,
        tokens / max(gen_s, 1e-9),
        sum(rewards) / max(len(rewards), 1),
        ver_s,
    )
    return path


def engine_gpus(rc: RolloutConfig) -> int:
    """GPUs one rollout engine (one fleet slot) uses: vLLM's tensor-parallel size, one for the
    hf engine on a GPU, none on a CPU."""
    if rc.engine == "vllm":
        return int(rc.vllm_tensor_parallel_size)
    import torch

    return 1 if rc.hf_device != "cpu" and torch.cuda.is_available() else 0


def rollout_compute(cfg: Config | None, timing: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The manifest's ``compute`` block from the shards' timing sidecars: tokens scored by the
    policy (prompts once, generated tokens), generation seconds summed over shards, and GPUs
    per slot. Over slots, GPU-hours = sum of (slot GPUs x its shards' seconds)."""
    if cfg is None or not timing:
        return None
    from erpd_megatron.config.compute import compute_record

    gpus = max(int(t.get("gpus", 0)) for t in timing)
    return compute_record(
        cfg,
        scored_tokens=sum(t["generated_tokens"] + t.get("prompt_tokens", 0) for t in timing),
        wall_s=sum(t["generation_seconds"] for t in timing),
        gpus=gpus,
        generated_tokens=sum(t["generated_tokens"] for t in timing),
        step="rollout",
    )


def finalize(directory: str | os.PathLike, cfg: Config | None = None) -> dict[str, Any]:
    """Write ``manifest.json`` from ``plan.json`` and the shards (all must be complete).

    With ``cfg``, the manifest also gets a ``compute`` block (tokens, GPU-seconds, model FLOPs).
    """
    directory = Path(directory)
    if not (directory / PLAN).exists():
        raise RolloutDataError(f"{directory}: no {PLAN}; nothing was generated there")
    info = read_json(directory / PLAN)
    n = int(info["num_shards"])
    missing = [
        shard_name(s)
        for s in range(n)
        if not shard_is_complete(directory / shard_name(s), info["plan_hash"])
    ]
    if missing:
        raise RolloutDataError(
            f"{directory}: {len(missing)} of {n} shards missing ({', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}); run the remaining fleet slots first"
        )
    modes = sorted(
        {read_shard_metadata(directory / shard_name(s)).get("logprobs_mode", "?") for s in range(n)}
    )
    extra = {k: v for k, v in info.items() if k not in ("num_shards",)}
    extra["engine_logprobs_mode"] = modes[0] if len(modes) == 1 else "mixed:" + ",".join(modes)
    extra["created_by"] = "erpd_megatron.rollout.generate"
    timing = [read_json(p) for p in sorted((directory / TIMING_DIR).glob("*.json"))]
    if timing:
        secs, toks = (
            sum(t["generation_seconds"] for t in timing),
            sum(t["generated_tokens"] for t in timing),
        )
        extra["timing"] = {
            "generation_seconds": round(secs, 3),
            "verify_seconds": round(sum(t["verify_seconds"] for t in timing), 3),
            "tokens_per_second": round(toks / max(secs, 1e-9), 1),
            "shards_timed": len(timing),
        }
        if (rec := rollout_compute(cfg, timing)) is not None:
            extra["compute"] = rec
    manifest = finalize_manifest(directory, n, extra)
    log.info(
        "wrote %s: %d samples, reward mean %.4f, fingerprint %s",
        directory / MANIFEST,
        manifest["num_samples"],
        manifest["reward_mean"] or 0.0,
        manifest["fingerprint"][:16],
    )
    return manifest


def run_rollouts(
    cfg: Config,
    *,
    slot: int = 0,
    num_slots: int = 1,
    finalize_only: bool = False,
    progress: bool | None = None,
) -> dict[str, Any] | None:
    """Generate this slot's shards (see module doc); returns the manifest when it was written."""
    directory = output_dir(cfg)
    if finalize_only:
        return finalize(directory, cfg)
    rc = cfg.rollout
    progress = cfg.logging.progress_bar if progress is None else progress
    _check_settings(rc)
    check_hf_checkpoint(rc.model_path)
    tokenizer = load_tokenizer(rc.tokenizer_path or rc.model_path or "")
    plan = make_plan(cfg, tokenizer)
    directory.mkdir(parents=True, exist_ok=True)
    write_or_check_plan(directory, plan)
    mine = list(range(slot, plan.num_shards, num_slots))
    todo = [s for s in mine if not shard_is_complete(directory / shard_name(s), plan.hash)]
    manifest_path = directory / MANIFEST
    if manifest_path.exists() and not all(
        (directory / shard_name(s)).exists() for s in range(plan.num_shards)
    ):
        log.warning(
            "%s lists shards that are gone; removing it until the set is complete again",
            manifest_path,
        )
        manifest_path.unlink(missing_ok=True)
    log.info(
        "rollout: %d prompts x %d samples in %d shards -> %s; slot %d/%d owns %d shards, %d to "
        "generate",
        len(plan.prompts),
        rc.samples_per_prompt,
        plan.num_shards,
        directory,
        slot,
        num_slots,
        len(mine),
        len(todo),
    )
    if todo:
        with (
            RewardPool.from_config(rc) as pool,
            make_engine(rc, tokenizer) as engine,
        ):
            for s in todo:
                generate_shard(
                    s,
                    plan,
                    rc,
                    engine,
                    pool,
                    tokenizer,
                    directory,
                    progress=progress,
                    gpus=engine_gpus(rc),
                )
    if all((directory / shard_name(s)).exists() for s in range(plan.num_shards)):
        if manifest_path.exists() and not todo:
            log.info("%s is already complete", directory)
            return read_json(manifest_path)
        return finalize(directory, cfg)
    left = sum(not (directory / shard_name(s)).exists() for s in range(plan.num_shards))
    log.info(
        "%d shards still missing (other fleet slots); the last slot to finish writes the manifest, "
        "or run with --finalize",
        left,
    )
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line of `erpd rollout`."""
    p = argparse.ArgumentParser(
        prog="erpd rollout",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="recipe YAML (defaults: the schema defaults)")
    p.add_argument("overrides", nargs="*", help="a.b=c overrides, e.g. rollout.num_prompts=64")
    p.add_argument(
        "--shard-index",
        type=int,
        help="this process's fleet slot: it generates the shards s with "
        "s %% num_shards == shard_index (default: from Slurm, else 0)",
    )
    p.add_argument(
        "--num-shards", type=int, help="number of fleet slots (default: from Slurm, else 1)"
    )
    p.add_argument(
        "--finalize", action="store_true", help="only write manifest.json (all shards must exist)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `erpd rollout` and tools/generate_rollouts.py; returns the exit code."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.overrides)
        slot, n = fleet_slot(args.shard_index, args.num_shards)
        run_rollouts(
            cfg,
            slot=slot,
            num_slots=n,
            finalize_only=args.finalize,
            progress=False if args.no_progress else None,
        )
    except USER_ERRORS as e:
        log.error("%s", e)
        print(f"erpd rollout: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
