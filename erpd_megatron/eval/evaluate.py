"""`erpd evaluate` / `tools/evaluate.py`: the accuracy / KL / entropy table of a round, and plots.

    erpd evaluate --config RECIPE [a.b=c ...] [--curves-only] [--no-progress]

For every held-out set in ``eval.datasets`` (selected with the rollout prompt loader and the
``rollout`` template / format fields, ``eval.num_prompts`` prompts) and every checkpoint in
``eval.models`` (base first):

1. sample ``eval.n`` responses per prompt through the rollout engine (``rollout.engine``: hf
   on CPU, vllm on GPU) at ``eval.temperature`` and ``eval.max_new_tokens``, seeded by
   ``eval.seed`` (the same seed for every model);
2. score them with ``rollout.reward_fn`` in the reward pool -> avg@n, pass@k;
3. one teacher-forced pass of pi over its own samples -> exact full-distribution token
   entropy (and the engine-vs-teacher-forced log-prob mismatch); one over the base's samples
   -> log-prob drift ``sum_t (log pi - log pi_base)`` on base samples (split by reward);
4. one teacher-forced pass of pi_base over pi's samples -> per-sequence
   ``KL = sum_t (log pi(y_t) - log pi_base(y_t))`` (``eval.kl_logprobs`` chooses where
   ``log pi`` comes from), mean and standard error over sequences. The base's own KL and drift
   are 0 by construction and are not estimated.

Steps 1-4 for one model are :mod:`erpd_megatron.eval.sampling`; this module checks the
configuration, runs them for every set and model, and builds and writes the table.

Scoring backends (``eval.scoring_backend``). ``hf``: steps 3-4 with transformers, the whole
model in this one process (:mod:`erpd_megatron.eval.scoring`). ``megatron``: sharded, for models
that fit no single device (:mod:`erpd_megatron.eval.mcore_scoring`): run it under torchrun /
srun with ``parallel.*`` TP/PP (``WORLD_SIZE`` = TP x PP x DP); global rank 0 generates and
rewards every model (vLLM tensor parallel over ``rollout.vllm_tensor_parallel_size`` GPUs),
then every rank scores with megatron-core from each model's Megatron checkpoint
(``eval.models[].checkpoint``; ``path`` stays the HF directory that generation needs).
``auto`` (default) picks megatron with more than one process or when every model has a
checkpoint. Both take log-prob and entropy from the chunked vocab-parallel ops: no
full-vocabulary float32 log-softmax is materialised.

GPU memory between models: with ``rollout.engine=vllm`` each model's engine is a vLLM worker
process (:mod:`erpd_megatron.rollout.vllm_engine`) that is shut down explicitly and exits when
its samples are drawn (the ``with make_engine(...)`` block), before the next model's engine
starts; ``del llm`` alone does not free vLLM's memory (vLLM issues 21073, 6544). The hf
models used for scoring are dropped and the CUDA cache emptied after each model.

Results go to ``eval.output_dir`` (default ``<output_dir>/eval``): ``results.md``,
``results.csv``, ``results.json``, ``accuracy_vs_kl.png`` and the training-curve figures of
the metrics files (``eval.metrics_files``, else discovered under ``output_dir``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from erpd_megatron.config.checks import eval_length_problems
from erpd_megatron.config.compute import eval_compute
from erpd_megatron.config.loader import ConfigError, load_config, to_dict
from erpd_megatron.config.schema import Config, EvalModelConfig
from erpd_megatron.data.prompts import PromptDataError
from erpd_megatron.eval import stats
from erpd_megatron.eval.report import write_report
from erpd_megatron.eval.sampling import ModelSamples, sample_model, score_kl, select_heldout
from erpd_megatron.rollout.engines import (
    CheckpointError,
    EngineError,
    check_hf_checkpoint,
    derive_seed,
    load_tokenizer,
)
from erpd_megatron.rollout.reward_pool import RewardPool, RewardPoolError
from erpd_megatron.rollout.verifier import RewardFnError
from erpd_megatron.utils.log import get_logger

log = get_logger(__name__)

USER_ERRORS = (
    ConfigError,
    PromptDataError,
    CheckpointError,
    EngineError,
    RewardFnError,
    RewardPoolError,
    ImportError,
)
ENTROPY_METHOD = (
    "exact: mean over response tokens of the full next-token distribution's entropy "
    "(teacher-forced pi)"
)
BASE_KL_NOTE = "0 by construction (the base is the reference)"


def eval_output_dir(cfg: Config) -> Path:
    """``eval.output_dir``, else ``<output_dir>/eval``."""
    return Path(cfg.eval.output_dir or Path(cfg.output_dir) / "eval")


def check_eval_config(cfg: Config) -> tuple[list[EvalModelConfig], EvalModelConfig]:
    """Check the ``eval`` section; returns the models (base first) and the base.

    Raises :class:`ConfigError` naming every problem."""
    ec = cfg.eval
    problems = []
    if not ec.models:
        problems.append(
            "eval.models is empty: give [{name, path}, ...] (base first, or set eval.base_name)"
        )
    if not ec.datasets:
        problems.append("eval.datasets is empty: give held-out prompt sets (files or hub names)")
    for name in ("num_prompts", "n", "max_new_tokens", "score_max_tokens"):
        if getattr(ec, name) <= 0:
            problems.append(f"eval.{name} must be positive (got {getattr(ec, name)})")
    if ec.temperature < 0:
        problems.append(f"eval.temperature must be >= 0 (got {ec.temperature})")
    if any(k <= 0 for k in ec.pass_k):
        problems.append(f"eval.pass_k values must be positive (got {ec.pass_k})")
    names = [m.name for m in ec.models]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        problems.append(f"eval.models: duplicate names {dup}")
    for i, m in enumerate(ec.models):
        if not m.path:
            problems.append(f"eval.models.{i} ({m.name}): path is empty")
    base_name = ec.base_name or (names[0] if names else None)
    if names and base_name not in names:
        problems.append(f"eval.base_name '{base_name}' is not one of the models {names}")
    problems += eval_length_problems(cfg)  # eval.max_new_tokens within the models' positions
    if problems:
        raise ConfigError("; ".join(problems))
    for k in ec.pass_k:
        if k > ec.n:
            log.warning(
                "eval.pass_k: k=%d > n=%d samples per prompt; pass@%d is not reported", k, ec.n, k
            )
    base = next(m for m in ec.models if m.name == base_name)
    return [base] + [m for m in ec.models if m is not base], base


def dataset_names(datasets: list[str]) -> list[str]:
    """Short names of the held-out sets (file stem, or the hub name); duplicates keep the full
    string."""
    short = [Path(d).stem if Path(d).suffix else d for d in datasets]
    return [s if short.count(s) == 1 else d for s, d in zip(short, datasets)]


def build_row(cfg: Config, s: ModelSamples, base: ModelSamples, dataset: str) -> dict[str, Any]:
    """The report row of one model on one held-out set (see :mod:`erpd_megatron.eval.stats`)."""
    ec = cfg.eval
    comps = s.completions
    ntok = sum(len(c.token_ids) for c in comps)
    finish = stats.finish_counts([c.finish_reason for c in comps])
    row: dict[str, Any] = {
        "model": s.model.name,
        "dataset": dataset,
        "is_base": s.is_base,
        "prompts": int(s.rewards.shape[0]),
        "n": ec.n,
        **stats.accuracy_stats(s.rewards, ec.pass_k),
        # per prompt, in prompt order (the same prompts for every model): paired comparisons
        "prompt_accuracy": [round(float(x), 6) for x in s.rewards.mean(axis=1)],
    }
    if s.is_base:
        row.update(
            {
                "kl_to_base": 0.0,
                "kl_to_base_se": 0.0,
                "kl_to_base_per_token": 0.0,
                "kl_note": BASE_KL_NOTE,
            }
        )
    elif s.kl is not None:
        row.update(stats.kl_stats(s.kl, ntok))
        row["kl_note"] = f"estimated on {len(s.kl)} samples of pi ({s.kl_source} log pi)"
    else:
        row.update(
            {
                "kl_to_base": None,
                "kl_to_base_se": None,
                "kl_to_base_per_token": None,
                "kl_note": "not estimated at temperature 0 (greedy samples are not draws from pi)",
            }
        )
    row["acc_gain_per_nat"] = stats.accuracy_per_nat(
        row["accuracy"], base.rewards.mean(), row["kl_to_base"], is_base=s.is_base
    )
    row["entropy"] = stats.token_mean(s.entropy) if s.entropy is not None else None
    if s.is_base:
        row.update({"drift": 0.0, "drift_pos": 0.0, "drift_neg": 0.0})
    elif s.drift is not None:
        row.update(stats.drift_stats(s.drift, base.rewards.reshape(-1)))
    else:
        row.update({"drift": None, "drift_pos": None, "drift_neg": None})
    row.update(
        {
            "response_tokens_mean": ntok / max(len(comps), 1),
            "finish_stop": finish.get("stop", 0),
            "finish_length": finish.get("length", 0),
            "truncated_frac": finish.get("length", 0) / max(len(comps), 1),
            "logprob_mismatch": stats.mean_abs_diff(
                [np.asarray(c.logprobs) for c in comps], s.tf_logprobs
            )
            if s.tf_logprobs is not None
            else None,
            "entropy_method": ENTROPY_METHOD if s.entropy is not None else None,
            "temperature": ec.temperature,
            "max_new_tokens": ec.max_new_tokens,
            "path": s.model.path,
            "seconds": {k: round(v, 3) for k, v in s.seconds.items()},
        }
    )
    return row


def evaluate_dataset(
    cfg: Config,
    dataset: str,
    name: str,
    seed: int,
    models: list[EvalModelConfig],
    tokenizer: Any,
    pool: RewardPool,
    *,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Rows of every model on one held-out set (``models[0]`` is the base)."""
    from erpd_megatron.eval.scoring import load_causal_lm

    prompts = select_heldout(cfg, dataset, tokenizer)
    log.info(
        "eval %s: %d prompts x %d samples, %d models", name, len(prompts), cfg.eval.n, len(models)
    )
    samples: list[ModelSamples] = []
    base_model = None
    parallel = cfg.eval.cpu_workers > 1 and len(models) > 2 and _runs_on_cpu(cfg)
    for i, m in enumerate(models[:1] if parallel else models):
        s, kept = sample_model(
            cfg,
            m,
            is_base=i == 0,
            prompts=prompts,
            tokenizer=tokenizer,
            pool=pool,
            seed=seed,
            base=samples[0] if samples else None,
            keep_model=i == 0 and len(models) > 1 and not parallel,  # workers load their own
            progress=progress,
        )
        if i == 0:
            base_model = kept
        samples.append(s)
        _log_model(name, cfg, s)
    if parallel:
        from erpd_megatron.eval.sampling_workers import sample_in_workers

        samples += sample_in_workers(
            cfg,
            models[1:],
            prompts=prompts,
            tokenizer=tokenizer,
            pool=pool,
            seed=seed,
            base=samples[0],
            progress=progress,
        )
        for s in samples[1:]:
            _log_model(name, cfg, s)
    if len(models) > 1 and cfg.eval.temperature > 0 and not parallel:  # (workers score theirs)
        if base_model is None:
            rc = cfg.rollout
            base_model = load_causal_lm(models[0].path, device=rc.hf_device, dtype=rc.hf_dtype)
        score_kl(cfg, samples, base_model, prompts, int(tokenizer.pad_token_id))
    del base_model
    return [build_row(cfg, s, samples[0], name) for s in samples]


def _log_model(dataset: str, cfg: Config, s: ModelSamples) -> None:
    log.info(
        "eval %s / %s: avg@%d %.4f, %s",
        dataset,
        s.model.name,
        cfg.eval.n,
        float(s.rewards.mean()),
        ", ".join(f"{k} {v:.1f}s" for k, v in s.seconds.items()),
    )


def _runs_on_cpu(cfg: Config) -> bool:
    """Whether generation and scoring run on the CPU (hf engine on a CPU device)."""
    from erpd_megatron.eval.scoring import resolve_device_dtype

    rc = cfg.rollout
    return rc.engine == "hf" and resolve_device_dtype(rc.hf_device, rc.hf_dtype)[0].type == "cpu"


@contextmanager
def eval_threads(cfg: Config) -> Iterator[None]:
    """torch CPU threads for generation and scoring (``eval.cpu_threads``; 0 = 1 thread when
    they run on the CPU, which is faster for these small batches), restored on exit."""
    import torch

    threads = torch.get_num_threads()
    want = cfg.eval.cpu_threads or (1 if _runs_on_cpu(cfg) else 0)
    if want > 0:
        torch.set_num_threads(want)
        log.info("torch CPU threads: %d (eval.cpu_threads=%d)", want, cfg.eval.cpu_threads)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def evaluate_models(cfg: Config, *, progress: bool | None = None) -> list[dict[str, Any]]:
    """Evaluate ``cfg.eval.models`` on ``cfg.eval.datasets``: one row per (model, set), base
    first (see the module doc for what each row holds). Writes nothing."""
    from erpd_megatron.eval.mcore_scoring import check_model_paths

    models, base = check_eval_config(cfg)
    check_model_paths(models)  # a Megatron dir as `path`: say how to give both references
    for m in models:
        check_hf_checkpoint(m.path)
    ec, rc = cfg.eval, cfg.rollout
    progress = cfg.logging.progress_bar if progress is None else progress
    tokenizer = load_tokenizer(rc.tokenizer_path or base.path)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    from erpd_megatron.eval.mcore_scoring import evaluate_megatron, launch_world, resolve_backend

    backend = resolve_backend(cfg)
    if backend == "hf" and launch_world() > 1:
        raise ConfigError(
            f"eval.scoring_backend=hf runs in one process, but {launch_world()} were "
            "launched: start one process, or score sharded with eval.scoring_backend="
            "megatron (or auto) and eval.models[].checkpoint"
        )
    log.info("eval scoring backend: %s (eval.scoring_backend=%s)", backend, ec.scoring_backend)
    if backend == "megatron":
        with eval_threads(cfg):
            rows = evaluate_megatron(cfg, models, tokenizer, progress=progress)
        log.info(
            "evaluated %d models on %d sets in %.1fs",
            len(models),
            len(ec.datasets),
            time.perf_counter() - t0,
        )
        return rows
    with (
        eval_threads(cfg),
        RewardPool.from_config(rc) as pool,
    ):
        for d, (dataset, name) in enumerate(zip(ec.datasets, dataset_names(ec.datasets))):
            rows += evaluate_dataset(
                cfg,
                dataset,
                name,
                derive_seed(ec.seed, "eval", d),
                models,
                tokenizer,
                pool,
                progress=progress,
            )
    log.info(
        "evaluated %d models on %d sets in %.1fs",
        len(models),
        len(ec.datasets),
        time.perf_counter() - t0,
    )
    return rows


def run(cfg: Config, *, curves_only: bool = False, progress: bool | None = None) -> dict[str, Path]:
    """Evaluate, write the report and plot the training curves; returns the written files."""
    from erpd_megatron.eval.curves import discover_metrics_files, plot_training_curves

    out = eval_output_dir(cfg)
    files = [Path(f) for f in cfg.eval.metrics_files] or discover_metrics_files(cfg.output_dir)
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise ConfigError(f"eval.metrics_files: not found: {', '.join(missing)}")
    t0 = time.perf_counter()
    rows = None if curves_only else evaluate_models(cfg, progress=progress)
    wall_s = time.perf_counter() - t0
    if not _is_rank0():  # sharded scoring: every rank has the rows, rank 0 writes them
        return {}
    paths = {p.stem: p for p in plot_training_curves(files, out)}
    if rows is not None:  # results.json last: it marks a finished evaluation
        meta = {
            "eval_config": to_dict(cfg.eval),
            "rollout_engine": cfg.rollout.engine,
            "reward_fn": cfg.rollout.reward_fn,
            "prompt_template": cfg.rollout.prompt_template,
            "metrics_files": [str(f) for f in files],
            "compute": eval_compute(cfg, rows, wall_s=wall_s, gpus=_eval_gpus(cfg)),
        }
        paths.update(write_report(rows, out, meta=meta))
    for key, p in paths.items():
        log.info("wrote %s: %s", key, p)
    return paths


def _eval_gpus(cfg: Config) -> int:
    """GPUs the evaluation held: the launch's world (sharded scoring), at least the vLLM
    engine's tensor-parallel size; none on a CPU."""
    import torch

    if not torch.cuda.is_available():
        return 0
    from erpd_megatron.runtime.distributed import parse_launch_env

    tp = cfg.rollout.vllm_tensor_parallel_size if cfg.rollout.engine == "vllm" else 1
    return max(parse_launch_env().world_size, int(tp))


def _is_rank0() -> bool:
    """Global rank 0 (the process group's rank, else the launcher's: torchrun or srun)."""
    from erpd_megatron.runtime import comm

    if comm.is_distributed():
        import torch.distributed as dist

        return dist.get_rank() == 0
    from erpd_megatron.runtime.distributed import parse_launch_env

    return parse_launch_env().rank == 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line of `erpd evaluate`."""
    p = argparse.ArgumentParser(
        prog="erpd evaluate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="recipe YAML (defaults: the schema defaults)")
    p.add_argument("overrides", nargs="*", help="a.b=c overrides, e.g. eval.num_prompts=100")
    p.add_argument(
        "--curves-only", action="store_true", help="only plot the training curves (no sampling)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--out",
        help="where results.md/.csv/.json and plots go (eval.output_dir; "
        "default <output_dir>/eval)",
    )
    args = p.parse_intermixed_args(argv)  # options may follow the a.b=c overrides
    if args.out:
        args.overrides.append(f"eval.output_dir={args.out}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of `erpd evaluate` and tools/evaluate.py; returns the exit code."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.overrides)
        paths = run(cfg, curves_only=args.curves_only, progress=False if args.no_progress else None)
    except USER_ERRORS as e:
        log.error("%s", e)
        print(f"erpd evaluate: error: {e}", file=sys.stderr)
        return 1
    if "results_md" in paths:
        print(paths["results_md"].read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
