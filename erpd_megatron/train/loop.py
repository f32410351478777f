"""The one training loop shared by Stage 1 and Stage 2.

A stage supplies a :class:`StageSpec`: the sample table, the per-token arrays each
micro-batch carries, a loss builder, the metric keys, and optional hooks (epoch start,
after-step stop condition). The loop owns everything else: deterministic epochs and global
batches, DP sharding and micro-batching, the optimizer step, the NaN/Inf guard, metrics,
checkpoints (periodic, epoch snapshots, final), resume, and SIGTERM/SIGUSR1 handling.

Checkpoint layout under ``checkpoint.save``::

    iter_0000012/      model + optimizer + scheduler + loop state (for resume)
    latest             name of the newest complete iter_ directory (moved atomically)
    epoch_0002/        model-only snapshot after epoch 2 (stage1.save_epochs)
    final/             model-only output of the stage (what conversion and the cache read)
    manifest.json      written last: status, steps, where the output is

Exit codes: 0 done; ``checkpoint.exit_code_on_signal`` (17) after a signal checkpoint
(the launcher requeues); 3 aborted after too many non-finite steps.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from erpd_megatron.config.loader import to_dict
from erpd_megatron.config.schema import Config
from erpd_megatron.data.batching import (
    MicroBatch,
    SampleTable,
    build_micro_batches,
    epoch_order,
    global_batches,
)
from erpd_megatron.models.router_replay import finalize_moe_metrics
from erpd_megatron.runtime import comm
from erpd_megatron.train.engine import Engine, LossFn, reduce_metrics
from erpd_megatron.train.metrics import MetricsLogger, truncate_jsonl
from erpd_megatron.utils.files import atomic_write_json, read_json
from erpd_megatron.utils.log import get_logger
from erpd_megatron.utils.progress import progress_bar

log = get_logger(__name__)

EXIT_NONFINITE = 3


class NonFiniteAbort(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclass
class StageSpec:
    """What a stage plugs into the loop."""

    name: str
    """Metric namespace: ``stage1`` or ``stage2``."""
    table: SampleTable
    """The fixed data."""
    epochs: int
    """Passes over the data."""
    make_loss: Callable[[np.ndarray], LossFn]
    """Given the global batch's rows, the loss function of its micro-batches (it knows the
    global normaliser from those rows)."""
    metric_keys: list[str]
    """Sum-metrics the loss function returns (reduced over ranks each step)."""
    finalize_metrics: Callable[[dict[str, float]], dict[str, float]]
    """Turn reduced sums into the logged values (means, fractions)."""
    token_arrays: Callable[[int], dict[str, list[np.ndarray]]] = lambda epoch: {}
    """Per-response-token arrays for epoch ``epoch`` (e.g. anchors), aligned with table rows."""
    on_epoch_start: Callable[[int], None] = lambda epoch: None
    """Called on every rank before the first step of each epoch (also after resume)."""
    should_stop: Callable[[dict[str, float], int], bool] = lambda metrics, step: False
    """After each step's metrics: stop training early (e.g. the Stage-2 KL budget)."""
    snapshot_epochs: list[int] = field(default_factory=list)
    """Epochs after which a model-only snapshot ``epoch_XXXX`` is written."""
    choose_final: Callable[[Path], Path | None] | None = None
    """When training stopped early: the checkpoint directory to publish as ``final``."""
    heldout_every: int = 0
    """Held-out accuracy before training, every N epochs, and of ``final``; 0 = never
    (see :mod:`erpd_megatron.train.heldout`)."""


@dataclass
class LoopState:
    """Position of the loop; saved with every checkpoint."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0
    stopped_early: bool = False
    epoch_sums: dict = field(default_factory=dict)
    """Metric sums of the current epoch so far (so epoch metrics survive a resume)."""


class _Signals:
    """Records SIGTERM/SIGUSR1; the loop checkpoints and exits at the next step boundary."""

    def __init__(self) -> None:
        self.received: int | None = None
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.received = signum

    def agreed(self) -> bool:
        """Whether any rank received a signal (a MAX all-reduce on the group's device)."""
        return comm.any_rank(self.received is not None)


def _rank() -> int:
    return dist.get_rank() if comm.is_distributed() else 0


def _barrier() -> None:
    comm.barrier()


def add_epoch_sums(epoch_sums: dict[str, float], sums: dict[str, float], applied: bool) -> None:
    """Add one step's metric sums to the epoch's, in place, only if its update was applied:
    a skipped step (non-finite loss or gradient, or an optimizer that refused the step) is
    counted in ``skipped_steps`` but its (possibly non-finite) sums are not averaged in."""
    if not applied:
        return
    for k, v in sums.items():
        epoch_sums[k] = epoch_sums.get(k, 0.0) + v


class TrainLoop:
    """Runs a :class:`StageSpec` on an :class:`Engine`."""

    def __init__(
        self, cfg: Config, engine: Engine, spec: StageSpec, out_dir: str | os.PathLike
    ) -> None:
        self.cfg, self.engine, self.spec = cfg, engine, spec
        self.out_dir = Path(out_dir)
        self.save_root = Path(cfg.checkpoint.save or self.out_dir / "checkpoints")
        self.state = LoopState()
        self.lengths = spec.table.lengths
        self.metrics = MetricsLogger(
            self.out_dir / f"{spec.name}_metrics.jsonl",
            enabled=_rank() == 0,
            wandb_cfg=cfg.logging,
            run_name=cfg.logging.run_name or f"{cfg.name}-{spec.name}",
            config=to_dict(cfg),
        )
        self.timing_path = self.out_dir / f"{spec.name}_timing.jsonl"
        self.signals = _Signals()
        self._pending_eval: tuple[Any, int, int, Path | None] | None = None
        """An asynchronous held-out evaluation still running (``stage1.eval_async``): the
        child, the epoch and step it evaluates, and its temporary checkpoint."""
        self.kl_by_step: dict[int, float] = {}
        self.t_start = time.time()  # compute accounting (manifest "compute")

    # ---- plan -----------------------------------------------------------------------------
    def batches(self, epoch: int) -> list[np.ndarray]:
        """The global batches of ``epoch`` (identical on every rank)."""
        order = epoch_order(len(self.spec.table), self.cfg.data.shuffle_seed, epoch)
        return global_batches(order, self.cfg.data.global_batch_size)

    def total_steps(self) -> int:
        """Optimizer steps of the whole stage."""
        return sum(len(self.batches(e)) for e in range(self.spec.epochs))

    def micro_batches(
        self, rows: np.ndarray, arrays: dict[str, list[np.ndarray]]
    ) -> list[MicroBatch]:
        """This rank's micro-batches of one global batch, padded with zero-loss dummies to the
        count of the DP rank with the most (computed from the global picture, no collective),
        so that every DP rank runs the same schedule (see :mod:`erpd_megatron.train.engine`)."""
        e = self.engine
        return build_micro_batches(self.cfg, self.spec.table, rows, e.dp_rank, e.dp_size, arrays)

    # ---- main -----------------------------------------------------------------------------
    def run(self) -> int:
        """Train to the end (or a stop); returns the process exit code."""
        self._resume()
        total = self.total_steps()
        bar = progress_bar(
            total,
            enabled=_rank() == 0 and self.cfg.logging.progress_bar,
            desc=self.spec.name,
            initial=self.state.global_step,
        )
        try:
            if self.spec.heldout_every and self.state.global_step == 0:
                self._heldout()  # pi_r, the curve's starting point
            while self.state.epoch < self.spec.epochs and not self.state.stopped_early:
                code = self._run_epoch(bar)
                if code is not None:
                    self._collect_heldout()  # a stop (signal) keeps the curve point it started
                    return code
        except BaseException:
            if self._pending_eval is not None:  # an error ends the run: drop its evaluation
                self._pending_eval[0].kill()
                self._pending_eval = None
            raise
        finally:
            bar.close()
        self._finish()  # (its final evaluation waits for a running one first)
        return 0

    def _run_epoch(self, bar: Any) -> int | None:
        st, spec = self.state, self.spec
        spec.on_epoch_start(st.epoch)
        arrays = spec.token_arrays(st.epoch)
        batches = self.batches(st.epoch)
        epoch_sums = st.epoch_sums
        while st.step_in_epoch < len(batches):
            rows = batches[st.step_in_epoch]
            t0 = time.perf_counter()
            sums, grad_norm, applied = self._step(rows, arrays)
            dt = time.perf_counter() - t0
            st.step_in_epoch += 1
            st.global_step += 1
            add_epoch_sums(epoch_sums, sums, applied)
            values = spec.finalize_metrics(sums) | finalize_moe_metrics(sums)
            record = {f"{spec.name}/{k}": v for k, v in values.items()}
            record.update(
                {
                    f"{spec.name}/grad_norm": grad_norm,
                    f"{spec.name}/lr": self.engine.current_lr(),
                    f"{spec.name}/skipped_steps": st.skipped_steps,
                    "epoch": st.epoch,
                    f"{spec.name}/update_applied": int(applied),
                }
            )
            self.metrics.log(record, st.global_step)
            tokens = sums.get("pm_tokens", sums.get("tokens", 0.0))  # pm_: counted by every stage
            self._log_timing(dt, tokens)
            bar.update(1)
            bar.set_postfix(
                loss=f"{values.get('loss', float('nan')):.4f}",
                tok_s=f"{tokens / max(dt, 1e-9):.0f}",
            )
            if spec.should_stop(values, st.global_step):
                st.stopped_early = True
                log.info("%s: stop condition met at step %d", spec.name, st.global_step)
                return None
            if self.signals.agreed():
                self._save_iter()
                log.warning(
                    "signal received: checkpointed at step %d, exiting with code %d",
                    st.global_step,
                    self.cfg.checkpoint.exit_code_on_signal,
                )
                return self.cfg.checkpoint.exit_code_on_signal
            interval = self.cfg.checkpoint.save_interval
            if interval and st.global_step % interval == 0:
                self._save_iter()
        values = spec.finalize_metrics(epoch_sums) | finalize_moe_metrics(epoch_sums)
        self.metrics.log(
            {f"{spec.name}/epoch/{k}": v for k, v in values.items()} | {"epoch": st.epoch},
            st.global_step,
        )
        st.epoch += 1
        st.step_in_epoch = 0
        st.epoch_sums = {}
        if st.epoch in spec.snapshot_epochs:
            self._save_model_only(self.save_root / f"epoch_{st.epoch:04d}")
        every = spec.heldout_every
        if (
            every and st.epoch % every == 0 and st.epoch < spec.epochs
        ):  # the last: on `final` (_finish)
            self._heldout()
        return None

    def _heldout(self, saved: Path | None = None) -> None:
        """Held-out accuracy of the current weights, logged at the current step. ``saved``: a
        model-only checkpoint of these weights already on disk (else the epoch's snapshot, or a
        temporary save)."""
        from erpd_megatron.train.heldout import start_heldout_child

        self._collect_heldout()  # at most one child at a time (and one temporary checkpoint)
        st = self.state
        snapshot = self.save_root / f"epoch_{st.epoch:04d}"
        temporary = saved is None and st.epoch not in self.spec.snapshot_epochs
        ckpt = saved or (self.save_root / ".heldout_model" if temporary else snapshot)
        if temporary:
            self._save_model_only(ckpt)
        if _rank() == 0:
            child = start_heldout_child(
                self.cfg, ckpt, self.out_dir / "heldout" / f"epoch_{st.epoch:04d}"
            )
            self._pending_eval = (child, st.epoch, st.global_step, ckpt if temporary else None)
        if not self.cfg.stage1.eval_async or saved is not None:  # `final`: before the manifest
            self._collect_heldout()
            _barrier()

    def _collect_heldout(self) -> None:
        """Wait for the running held-out evaluation (rank 0), log its result at the step it
        evaluated, and delete its temporary checkpoint."""
        if self._pending_eval is None:
            return
        child, epoch, step, temporary = self._pending_eval
        self._pending_eval = None
        metrics = child.wait()
        self.metrics.log(
            {f"{self.spec.name}/eval/{k}": v for k, v in metrics.items()} | {"epoch": epoch},
            step,
            wandb_step=self.state.global_step,
        )
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)

    def _step(
        self, rows: np.ndarray, arrays: dict[str, list[np.ndarray]]
    ) -> tuple[dict[str, float], float, bool]:
        e, st = self.engine, self.state
        mbs = self.micro_batches(rows, arrays)
        outs = e.run(mbs, self.spec.make_loss(rows), forward_only=False)
        owner = e.is_last_stage and e.ps.get_tensor_model_parallel_rank() == 0
        sums = reduce_metrics(outs, self.spec.metric_keys, src_is_owner=owner)
        if e.moe is not None:  # per-layer expert load, aux loss, routing vs pi_r (all ranks)
            sums.update(e.moe.step_sums())
        finite = all(math.isfinite(v) for v in sums.values()) and e.grads_finite()
        if not finite:
            st.skipped_steps += 1
            st.consecutive_nonfinite += 1
            e.optimizer.zero_grad()
            log.warning(
                "step %d: non-finite loss or gradient, update skipped (%d in a row)",
                st.global_step + 1,
                st.consecutive_nonfinite,
            )
            if st.consecutive_nonfinite >= self.cfg.optimizer.max_nonfinite_steps:
                raise NonFiniteAbort(
                    f"{self.spec.name}: {st.consecutive_nonfinite} consecutive steps with a "
                    f"non-finite loss or gradient (last at step {st.global_step + 1}); no "
                    "checkpoint of non-finite weights was written. Lower optimizer.lr, check the "
                    "data (rollout log-probs, rewards) or the stage's clip settings, then resume "
                    "from the last checkpoint."
                )
            return sums, float("nan"), False
        st.consecutive_nonfinite = 0
        ok, grad_norm = e.step()
        if not ok:
            st.skipped_steps += 1
        return sums, grad_norm, ok

    def _log_timing(self, dt: float, tokens: float) -> None:
        if _rank() != 0:
            return
        import json

        with open(self.timing_path, "a") as f:
            f.write(
                json.dumps(
                    {
                        "step": self.state.global_step,
                        "seconds": dt,
                        "tokens": tokens,
                        "tokens_per_s": tokens / max(dt, 1e-9),
                    }
                )
                + "\n"
            )

    # ---- checkpoints ----------------------------------------------------------------------
    def _state_dict(self) -> dict:
        d = dict(vars(self.state))
        d["epoch_sums"] = dict(self.state.epoch_sums)
        return d

    def _save_iter(self) -> None:
        from erpd_megatron.models.checkpoint import iter_dir, save_checkpoint, write_latest

        self._collect_heldout()  # a resumed run must not lose a started evaluation's result

        step = self.state.global_step
        path = iter_dir(self.save_root, step)
        extra = {"loop": self._state_dict(), "stage": self.spec.name}
        save_checkpoint(
            path,
            self.engine.model,
            optimizer=self.engine.optimizer,
            opt_param_scheduler=self.engine.scheduler,
            extra=extra,
            model_cfg=self.cfg.model,
            optimizer_sharding=self.cfg.checkpoint.optimizer_sharding,
        )
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}
        torch.save(rng, path / f"rng_rank{_rank():05d}.pt")
        _barrier()
        if _rank() == 0:
            write_latest(self.save_root, step)
            self._prune()
        _barrier()

    def _prune(self) -> None:
        keep = self.cfg.checkpoint.keep_last
        iters = sorted(p for p in self.save_root.glob("iter_*") if p.is_dir())
        for p in iters[: max(0, len(iters) - keep)]:
            shutil.rmtree(p, ignore_errors=True)

    def _save_model_only(self, path: Path) -> None:
        from erpd_megatron.models.checkpoint import save_checkpoint

        if path.exists():
            _barrier()
            if _rank() == 0:
                shutil.rmtree(path)
            _barrier()
        load = Path(self.cfg.checkpoint.load) if self.cfg.checkpoint.load else None
        hf_config = (
            read_json(load / "hf_config.json")
            if load and (load / "hf_config.json").exists()
            else None
        )
        # the tokenizer files and the original HF config travel with every model the stage outputs
        save_checkpoint(
            path,
            self.engine.model,
            extra={"stage": self.spec.name, "loop": self._state_dict()},
            model_cfg=self.cfg.model,
            tokenizer_dir=load if load and load.exists() else None,
            hf_config=hf_config,
        )

    def _resume(self) -> None:
        from erpd_megatron.models.checkpoint import iter_dir, load_checkpoint, read_latest

        mode = self.cfg.checkpoint.resume
        latest = read_latest(self.save_root) if mode != "never" else None
        if latest is None:
            if mode == "must":
                raise FileNotFoundError(
                    f"checkpoint.resume=must but {self.save_root} has no checkpoint"
                )
            self.metrics.truncate_after(0)
            truncate_jsonl(self.timing_path, 0) if _rank() == 0 else None
            return
        path = iter_dir(self.save_root, latest)
        extra = load_checkpoint(
            path,
            self.engine.model,
            optimizer=self.engine.optimizer,
            opt_param_scheduler=self.engine.scheduler,
        )
        self.state = LoopState(**extra["loop"])
        rng_file = path / f"rng_rank{_rank():05d}.pt"
        if rng_file.exists():
            rng = torch.load(rng_file, weights_only=False)
            torch.set_rng_state(rng["torch"])
            np.random.set_state(rng["numpy"])
        self.metrics.truncate_after(self.state.global_step)
        truncate_jsonl(self.timing_path, self.state.global_step) if _rank() == 0 else None
        log.info(
            "%s: resumed from %s (epoch %d, step %d)",
            self.spec.name,
            path,
            self.state.epoch,
            self.state.global_step,
        )

    def _compute(self) -> dict:
        return _loop_compute(self)

    def _finish(self) -> None:
        final = self.save_root / "final"
        chosen = (
            self.spec.choose_final(self.save_root)
            if (self.state.stopped_early and self.spec.choose_final)
            else None
        )
        if chosen is not None:
            # publish the chosen checkpoint's weights, model-only like every other final
            from erpd_megatron.models.checkpoint import load_checkpoint

            load_checkpoint(chosen, self.engine.model)
        self._save_model_only(final)
        if self.spec.heldout_every:
            self._heldout(final)  # before the manifest: a rerun after a kill evaluates again
        if _rank() == 0:
            atomic_write_json(
                self.save_root / "manifest.json",
                {
                    "status": "complete",
                    "stage": self.spec.name,
                    "steps": self.state.global_step,
                    "epochs_done": self.state.epoch,
                    "stopped_early": self.state.stopped_early,
                    "skipped_steps": self.state.skipped_steps,
                    "final": str(final),
                    "snapshots": sorted(str(p) for p in self.save_root.glob("epoch_*")),
                    "published_from": str(chosen) if chosen else None,
                    "compute": self._compute(),
                },
            )
        self.metrics.close()
        _barrier()


def _loop_compute(loop: TrainLoop) -> dict:
    """The manifest's ``compute`` block (config/compute.py): every token of the sequences
    trained on (prompt and response, all epochs, resumes included), step seconds summed over
    resumes from the timing file (``wall_s``), this process's wall time, the world size."""
    import json

    from erpd_megatron.config.compute import compute_record

    st, lengths = loop.state, np.asarray(loop.lengths, dtype=np.int64)
    per_epoch = int(lengths.sum())
    tokens = per_epoch * min(st.epoch, loop.spec.epochs)
    if st.stopped_early and st.epoch < loop.spec.epochs:
        tokens += sum(int(lengths[b].sum()) for b in loop.batches(st.epoch)[: st.step_in_epoch])
    step_s = 0.0
    if loop.timing_path.exists():
        for line in loop.timing_path.read_text().splitlines():
            try:
                step_s += float(json.loads(line).get("seconds", 0.0))
            except ValueError:
                continue
    world = dist.get_world_size() if dist.is_initialized() else 1
    return compute_record(
        loop.cfg,
        trained_tokens=tokens,
        wall_s=step_s,
        gpus=world,
        process_wall_s=round(time.time() - loop.t_start, 3),
    )


def stage_complete(save_root: str | os.PathLike) -> bool:
    """Whether a stage's output directory has a complete manifest (for skipping in a round)."""
    p = Path(save_root) / "manifest.json"
    return p.exists() and read_json(p).get("status") == "complete"
