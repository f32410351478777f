"""Sharded evaluation scoring (``eval.scoring_backend=megatron``): the teacher-forced passes of
`erpd evaluate` (entropy, drift, KL to the base) through megatron-core at the recipe's layout.

No process ever holds a whole model: each model is the forward-only
:class:`~erpd_megatron.train.engine.Engine` of the cache tool (``Engine(cfg, train=False)``
plus :func:`~erpd_megatron.models.checkpoint.load_checkpoint`, which reshards any saved
layout to ``parallel.tensor_model_parallel_size`` / ``pipeline_model_parallel_size``), built
from the model's Megatron checkpoint (``eval.models[].checkpoint``) and dropped before the
next one is built. The micro-batches are the trainer's
(:func:`~erpd_megatron.data.batching.build_micro_batches`): the data-parallel ranks split the
samples (balanced by tokens) and pad with zero-weight dummy micro-batches, so every rank runs
the same number of forwards; with ``data.packing`` each is one packed row (block-diagonal
mask on the local spec, THD on Transformer Engine) and the scores are taken per sequence
(``seq_index``). The last pipeline stage scores its vocabulary shard with the chunked
vocab-parallel ops (:func:`erpd_megatron.eval.scoring.token_scores`: no full-vocabulary
float32 tensor) and returns them per position, which the engine gathers over context-parallel
ranks; the owners (last stage, TP rank 0) place their values in one flat float64 buffer that
a single SUM all-reduce (:mod:`erpd_megatron.runtime.comm`, on the group's device) hands to
every rank, so every rank builds the same table.

Generation stays one process: global rank 0 samples every model (the rollout engine; vLLM
with ``rollout.vllm_tensor_parallel_size`` GPUs of its node, one worker process per model,
shut down before the next) and rewards the samples, before any model is built for scoring.
The other ranks wait for its file ``<eval dir>/samples/<token>.pkl`` by polling, not in a
collective, so that hours of generation do not run into ``parallel.distributed_timeout_minutes``
(no collective is in flight while they wait). Multi-node evaluation needs the eval directory
on a shared filesystem (as the checkpoints are). A generation error on rank 0 is written to
``<token>.failed`` and re-raised on every rank.

GPU notes (this path has run on CPU/gloo only). The gathered scores are one float64 tensor:
NCCL reduces doubles (torch ``ProcessGroupNCCL.cpp`` maps ``at::kDouble`` to ``ncclDouble``)
and :func:`erpd_megatron.runtime.comm.all_reduce` moves it to the group's device. When rank 0
starts vLLM, every rank already holds a CUDA context and the NCCL communicator of the token
broadcast (no model yet): ``rollout.vllm_gpu_memory_utilization`` (0.85) leaves room for them.
The srun tasks are not bound to one GPU each (``scripts/slurm/common.sh``), so rank 0's vLLM
worker sees every GPU of its node for ``rollout.vllm_tensor_parallel_size``.
"""

from __future__ import annotations

import dataclasses
import gc
import pickle
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from erpd_megatron.config.loader import ConfigError
from erpd_megatron.config.schema import Config, EvalModelConfig
from erpd_megatron.eval.scoring import TokenScores, response_table, token_scores
from erpd_megatron.runtime import comm
from erpd_megatron.utils.files import atomic_write_bytes
from erpd_megatron.utils.log import get_logger

log = get_logger(__name__)

POLL_SECONDS = 2.0
"""How often the waiting ranks look for rank 0's samples file."""
WAIT_LOG_SECONDS = 300.0
"""How often they say that they are still waiting."""


def launch_world() -> int:
    """The number of processes of this job: the process group's, else what
    :func:`~erpd_megatron.runtime.distributed.parse_launch_env` reads from torchrun / srun
    (the world that ``init_distributed`` would start)."""
    if comm.is_distributed():
        import torch.distributed as dist

        return dist.get_world_size()
    from erpd_megatron.runtime.distributed import parse_launch_env

    return parse_launch_env().world_size


def resolve_backend(cfg: Config, world: int | None = None) -> str:
    """``eval.scoring_backend`` resolved: "megatron" for ``auto`` when more than one process
    runs or every model has a Megatron checkpoint, else "hf"."""
    backend = cfg.eval.scoring_backend
    if backend != "auto":
        return backend
    world = launch_world() if world is None else world
    models = cfg.eval.models
    return "megatron" if world > 1 or (models and all(m.checkpoint for m in models)) else "hf"


def check_model_paths(models: list[EvalModelConfig]) -> None:
    """``path`` is what generation loads (an HF directory); a Megatron checkpoint given there
    is a ConfigError that says how to give both references."""
    problems = []
    for i, m in enumerate(models):
        p = Path(m.path)
        if (p / "metadata.json").exists() and not (p / "config.json").exists():
            problems.append(
                f"eval.models.{i} ({m.name}).path {m.path} is a Megatron checkpoint; generation "
                f"needs its HF export: `erpd convert mcore-to-hf --ckpt {m.path} --out HF_DIR`, "
                f"then give {{name: {m.name}, path: HF_DIR, checkpoint: {m.path}}}"
            )
    if problems:
        raise ConfigError("; ".join(problems))


def check_megatron_models(models: list[EvalModelConfig]) -> None:
    """Every model has a Megatron checkpoint directory; a ConfigError naming each field."""
    from erpd_megatron.models.checkpoint import check_checkpoint_dir

    problems = []
    for i, m in enumerate(models):
        if not m.checkpoint:
            problems.append(
                f"eval.models.{i} ({m.name}).checkpoint is not set: eval.scoring_backend="
                f"megatron scores with a Megatron checkpoint of {m.path} (a stage's checkpoints "
                f"dir, or `erpd convert hf-to-mcore --hf-dir {m.path} --out DIR`), or set "
                "eval.scoring_backend=hf"
            )
            continue
        try:
            check_checkpoint_dir(m.checkpoint)
        except FileNotFoundError as e:
            problems.append(f"eval.models.{i} ({m.name}).checkpoint: {e}")
    if problems:
        raise ConfigError("; ".join(problems))


def scoring_config(cfg: Config, checkpoint: str) -> Config:
    """``cfg`` with the architecture of ``checkpoint`` (its ``model_config.yaml``); the layout
    (``parallel``) and precision stay the recipe's."""
    from erpd_megatron.models.checkpoint import read_model_config

    return dataclasses.replace(cfg, model=read_model_config(checkpoint))


def load_engine(cfg: Config, checkpoint: str) -> Any:
    """A forward-only Engine of ``checkpoint`` at ``cfg.parallel``'s TP/PP (the cache tool's)."""
    from erpd_megatron.models.checkpoint import load_checkpoint
    from erpd_megatron.train.engine import Engine

    mcfg = scoring_config(cfg, checkpoint)
    engine = Engine(mcfg, train=False)
    load_checkpoint(checkpoint, engine.model, model_cfg=mcfg.model)
    for m in engine.model:
        m.eval()
    return engine


def free_engine(engine: Any) -> None:
    """Drop an engine's weights (and the CUDA cache) before the next model is built."""
    engine.model = []
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def score_responses_mcore(
    engine: Any,
    prompts: list[list[int]],
    responses: list[list[int]],
    *,
    temperature: float = 1.0,
    entropy: bool = True,
    max_tokens: int = 4096,
) -> TokenScores:
    """Teacher-forced log-probs (and entropies) of ``responses[i]`` after ``prompts[i]`` under
    ``engine`` (call on every rank with the same arguments); the same on every rank.

    The scores are of ``softmax(logits / temperature)`` over the real vocabulary (padded
    embedding rows excluded), as :func:`erpd_megatron.eval.scoring.score_responses`."""
    from erpd_megatron.data.batching import build_micro_batches, sequence_values
    from erpd_megatron.train.engine import token_rows

    table = response_table(prompts, responses)
    if temperature <= 0:
        raise ValueError(f"teacher-forced scores need a positive temperature, got {temperature}")
    n = len(prompts)
    resp_len = table.response_lengths
    rows = np.flatnonzero(resp_len > 0).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(resp_len)]).astype(np.int64)
    shard = engine.vocab_shard()
    # the trainer's micro-batches: packed rows with data.packing, padded to pad_multiple, and
    # zero-weight dummies up to the DP-wide count (every DP rank runs as many forwards)
    mbs = build_micro_batches(
        engine.cfg, table, rows, engine.dp_rank, engine.dp_size, max_tokens=max_tokens
    )

    def fn(logits: torch.Tensor, mb: Any) -> tuple[torch.Tensor, dict]:
        flat, order = token_rows(logits)  # [b*s, V/tp] rows of the logits view, no copy
        pos = order.flat(mb.loss_mask).nonzero().flatten()
        lp, ent = token_scores(
            flat,
            order.flat(mb.targets),
            pos,
            temperature=temperature,
            entropy=entropy,
            group=shard.group,
            vocab_start=shard.start,
            vocab_size=shard.vocab_size,
        )
        # per position [b, s] (0 elsewhere): under context parallelism the engine gathers
        # such tensors over the CP group back to whole rows (Engine._cp_gather)
        out = {"lp": order.unflat(_at_positions(lp.detach(), pos, flat.shape[0]))}
        if ent is not None:
            out["ent"] = order.unflat(_at_positions(ent.detach(), pos, flat.shape[0]))
        return logits.new_zeros(()), out

    with torch.no_grad():
        outs = engine.run(mbs, fn, forward_only=True) if mbs else []
    width = 2 if entropy else 1
    buf = torch.zeros(int(offsets[-1]), width, dtype=torch.float64)
    owner = engine.is_last_stage and engine.ps.get_tensor_model_parallel_rank() == 0
    if owner:
        for mb, o in zip(mbs, outs):
            # per sequence through seq_index: a packed row holds several sequences
            cols = [o["lp"]] + ([o["ent"]] if entropy else [])
            for c, values in enumerate(cols):
                for r, v in zip(mb.rows.tolist(), sequence_values(mb, values)):
                    buf[int(offsets[r]) : int(offsets[r + 1]), c] = v.double()
    buf = comm.all_reduce(buf, "sum").numpy()  # one owner per row: the sum is a gather
    lps = [buf[offsets[i] : offsets[i + 1], 0].copy() for i in range(n)]
    ents = [buf[offsets[i] : offsets[i + 1], 1].copy() for i in range(n)] if entropy else None
    return TokenScores(logprobs=lps, entropy=ents)


def _at_positions(values: torch.Tensor, pos: torch.Tensor, n: int) -> torch.Tensor:
    """``values`` [P] of the flat positions ``pos`` as an [n] tensor, 0 elsewhere."""
    out = torch.zeros(n, dtype=values.dtype, device=values.device)
    return out.index_copy_(0, pos.to(values.device), values)


def rank0_shares(out_dir: Path, produce: Callable[[], Any]) -> Any:
    """``produce()`` run on global rank 0 only, its (picklable) result on every rank.

    Rank 0 writes it to ``out_dir/samples/<token>.pkl`` (a fresh token per call, broadcast
    first, so a stale file is never read); the other ranks poll for that file instead of
    waiting in a collective (see the module doc). A failure on rank 0 is written beside it
    and raised on every rank. The file is removed once every rank has read it."""
    import torch.distributed as dist

    rank = dist.get_rank() if comm.is_distributed() else 0
    world = dist.get_world_size() if comm.is_distributed() else 1
    if world == 1:
        return produce()
    token = comm.broadcast_object(uuid.uuid4().hex if rank == 0 else None, src=0)
    box = Path(out_dir) / "samples"
    data, failed = box / f"{token}.pkl", box / f"{token}.failed"
    if rank == 0:
        box.mkdir(parents=True, exist_ok=True)
        try:
            obj = produce()
        except BaseException as e:
            atomic_write_bytes(failed, f"{type(e).__name__}: {e}".encode())
            raise
        atomic_write_bytes(data, pickle.dumps(obj, protocol=4))
    else:
        t0 = last = time.monotonic()
        while not data.exists():
            if failed.exists():
                raise RuntimeError(
                    f"rank 0 failed to generate the evaluation samples ({failed}): "
                    f"{failed.read_text()}"
                )
            if time.monotonic() - last > WAIT_LOG_SECONDS:
                last = time.monotonic()
                log.info(
                    "rank %d: waiting for rank 0's samples (%s) for %.0fs", rank, data, last - t0
                )
            time.sleep(POLL_SECONDS)
        with open(data, "rb") as f:
            obj = pickle.load(f)
    comm.barrier()
    if rank == 0:
        data.unlink()
    return obj


def evaluate_megatron(
    cfg: Config, models: list[EvalModelConfig], tokenizer: Any, *, progress: bool = True
) -> list[dict[str, Any]]:
    """The rows of :func:`erpd_megatron.eval.evaluate.evaluate_models` with sharded scoring,
    on every rank (call on every rank). ``models[0]`` is the base. Rank 0 alone generates
    and runs the reward pool; each model's engine is built once for all held-out sets."""
    from erpd_megatron.eval import evaluate as ev
    from erpd_megatron.eval import sampling, stats
    from erpd_megatron.rollout.engines import derive_seed
    from erpd_megatron.rollout.reward_pool import RewardPool
    from erpd_megatron.runtime.distributed import destroy_distributed, init_distributed

    ec = cfg.eval
    check_megatron_models(models)
    init_distributed(scoring_config(cfg, str(models[0].checkpoint)))
    try:

        def generate_set(d: int, dataset: str, name: str, pool: Any) -> tuple[str, list, list]:
            prompts = sampling.select_heldout(cfg, dataset, tokenizer)
            seed = derive_seed(ec.seed, "eval", d)
            log.info(
                "eval %s: %d prompts x %d samples, %d models", name, len(prompts), ec.n, len(models)
            )
            samples = []
            for i, m in enumerate(models):
                s, _ = sampling.generate_and_reward(
                    cfg,
                    m,
                    prompts=prompts,
                    tokenizer=tokenizer,
                    pool=pool,
                    seed=seed,
                    progress=progress,
                )
                s.is_base = i == 0
                samples.append(s)
                log.info("eval %s / %s: avg@%d %.4f", name, m.name, ec.n, float(s.rewards.mean()))
            return name, prompts, samples

        def generate() -> list[tuple[str, list, list]]:
            rc = cfg.rollout
            names = ev.dataset_names(ec.datasets)
            with RewardPool.from_config(rc) as pool:
                return [
                    generate_set(d, dataset, name, pool)
                    for d, (dataset, name) in enumerate(zip(ec.datasets, names))
                ]

        sets = rank0_shares(ev.eval_output_dir(cfg), generate)
        if ec.temperature > 0:
            _score_all(cfg, models, sets, stats)
    finally:
        destroy_distributed()
    rows = []
    for name, _, samples in sets:
        rows += [ev.build_row(cfg, s, samples[0], name) for s in samples]
    return rows


def _score_all(
    cfg: Config, models: list[EvalModelConfig], sets: list[tuple[str, list, list]], stats: Any
) -> None:
    """Steps 3-4 of :mod:`erpd_megatron.eval.evaluate`, one engine per model (base first)."""
    from erpd_megatron.eval.sampling import apply_kl

    ec = cfg.eval
    kw = dict(temperature=ec.temperature, max_tokens=ec.score_max_tokens)
    base_lp: dict[tuple[str, str], list[np.ndarray]] = {}
    for j, m in enumerate(models):
        t0 = time.perf_counter()
        engine = load_engine(cfg, str(m.checkpoint))
        log.info(
            "scoring with %s (%s): TP=%d DP=%d, loaded in %.1fs",
            m.name,
            m.checkpoint,
            engine.tp_size,
            engine.dp_size,
            time.perf_counter() - t0,
        )
        for name, prompts, samples in sets:
            flat = [p.token_ids for p in prompts for _ in range(ec.n)]
            s = samples[j]
            t0 = time.perf_counter()
            own = score_responses_mcore(engine, flat, _ids(s), entropy=True, **kw)
            s.tf_logprobs, s.entropy = own.logprobs, own.entropy
            if j == 0:
                for other in samples[1:]:
                    t1 = time.perf_counter()
                    base_lp[(name, other.model.name)] = score_responses_mcore(
                        engine, flat, _ids(other), entropy=False, **kw
                    ).logprobs
                    other.seconds["score_base"] = time.perf_counter() - t1
            else:
                on_base = score_responses_mcore(engine, flat, _ids(samples[0]), entropy=False, **kw)
                s.drift = stats.sequence_kl(on_base.logprobs, samples[0].tf_logprobs)
            s.seconds["score_self"] = time.perf_counter() - t0
        free_engine(engine)
        del engine
    for name, _, samples in sets:
        for s in samples[1:]:
            apply_kl(cfg, s, base_lp[(name, s.model.name)])


def _ids(s: Any) -> list[list[int]]:
    return [c.token_ids for c in s.completions]


__all__ = [
    "check_megatron_models",
    "check_model_paths",
    "evaluate_megatron",
    "launch_world",
    "load_engine",
    "rank0_shares",
    "resolve_backend",
    "score_responses_mcore",
]
