"""Routing of an MoE model per engine: per-layer metrics, pi_r's recorded routing, its replay.

:class:`MoeRouting` puts a forward hook on every ``TopKRouter`` of the engine's model chunks
(megatron-core 0.16.1 ``transformer/moe/router.py``: ``forward`` returns ``(probs,
routing_map)``, the map ``[tokens, experts]`` bool after capacity dropping) and, around each
micro-batch's forward (:meth:`before_forward` / :meth:`after_forward`, called by
``train/engine.py``):

* **Metrics.** Per MoE layer, summed over the step's micro-batches: tokens routed to each
  expert (the expert load), routed slots kept (dropped = ``tokens * topk`` minus kept, with a
  capacity), the router's aux loss from megatron's own tracker
  (``moe_utils.save_to_aux_losses_tracker`` fills ``get_moe_layer_wise_logging_tracker()``
  per layer with ``aux_loss / coeff``; megatron's ``track_moe_metrics`` only writes it to
  TensorBoard/W&B, so its per-layer values are read here and cleared each step like
  ``clear_aux_losses_tracker``), and the tokens whose top-k set differs from pi_r's on the
  same sequence (when pi_r's routing was recorded). :func:`finalize_moe_metrics` turns the
  sums into ``moe/l<i>/imbalance`` (max / mean expert load), ``load_min`` / ``load_max``
  (shares of the routed slots), ``aux_loss``, ``dropped_frac`` and ``routing_diff``.
* **Record.** During a scoring pass (:meth:`recording`) the top-k experts of every token of
  every sequence are kept per table row; :meth:`save_recording` writes them beside the scores
  (one file per DP rank and pipeline stage, TP rank 0: TP ranks route the same tokens) and
  :meth:`load_pi_r` reads every DP rank's files, since the epoch shuffle moves samples
  between DP ranks. With ``model.moe_router_replay: pi_r`` the routers record through
  megatron's ``RouterReplay`` (``RouterReplayAction.RECORD``: the indices in the order
  ``torch.topk`` returned them, so a replay is bit-identical); otherwise from the map.
* **Replay.** With ``moe_router_replay: pi_r`` and pi_r loaded, each router gets its
  micro-batch's indices (``RouterReplay.set_target_indices``) and
  ``RouterReplayAction.REPLAY_FORWARD``: megatron gathers the router's own scores at pi_r's
  experts (``moe_utils.topk_routing_with_score_function``), so gradients still reach the
  router. The per-instance methods are used, not megatron's static ones, whose class-wide
  list of routers spans every model built in the process. A full recompute (run inside
  the backward) replays ``REPLAY_BACKWARD``: megatron pops the oldest indices set and not
  yet recomputed, since the backwards run in the forwards' order (PP=1, and 1F1B at PP > 1,
  where stage 0 recomputes micro-batch k after the forward of k+1; measured: with the
  latest indices instead, the PP=2 step-1 gradient norm moved 7e-4 relative).

Token order: the router flattens its ``[s, b, h]`` input, so token ``t = pos * b + row``;
a padded row ``j`` is sequence ``j`` over ``position_ids`` 0..span-1, a packed row holds
sequence ``j`` where ``segments == j``. Sequence parallelism and CP give a rank a slice of
the positions: the config refuses replay with them and the routing difference is not
measured there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from erpd_megatron.runtime import comm
from erpd_megatron.utils.files import atomic_write_bytes
from erpd_megatron.utils.log import get_logger

log = get_logger(__name__)

_PER_LAYER = 6  # calls, slots, kept, diff tokens, compared tokens, aux-loss sum


def _unwrap(m: torch.nn.Module) -> torch.nn.Module:
    while hasattr(m, "module"):
        m = m.module
    return m


def _in_backward() -> bool:
    """True inside an autograd backward (a full recompute's forward runs there)."""
    return torch._C._current_graph_task_id() != -1


def _replay_pre_hook(router: Any, args: Any) -> None:
    """Replay the forward's indices (REPLAY_FORWARD) or, in a recompute, the oldest micro-batch's
    not yet recomputed (REPLAY_BACKWARD pops ``replay_backward_list``: core_v0.16.1
    ``transformer/moe/router_replay.py``, which nothing in megatron sets itself)."""
    from megatron.core.transformer.moe.router_replay import RouterReplayAction as A

    rr = router.router_replay
    if rr.router_replay_action in (A.REPLAY_FORWARD, A.REPLAY_BACKWARD):
        rr.set_router_replay_action(A.REPLAY_BACKWARD if _in_backward() else A.REPLAY_FORWARD)


def sequence_tokens(mb: Any) -> list[torch.Tensor]:
    """Router token indices of each sequence of ``mb`` (see the module doc)."""
    b, s = mb.input_ids.shape
    pos = mb.position_ids.cpu()
    out = []
    for j in range(mb.num_sequences):
        if mb.segments is None:
            span = int(pos[j].max()) + 1
            out.append(torch.arange(span) * b + j)
        else:
            out.append(torch.nonzero(mb.segments[0].cpu() == j).flatten())
    return out


class MoeRouting:
    """Hooks, metric sums, recorded pi_r routing and replay of one engine's MoE routers."""

    def __init__(self, cfg: Any, model: list[torch.nn.Module]) -> None:
        from megatron.core.transformer.moe.router import TopKRouter

        self.cfg = cfg
        m, par = cfg.model, cfg.parallel
        self.routers = [
            r for chunk in model for r in _unwrap(chunk).modules() if isinstance(r, TopKRouter)
        ]
        self.layers = [int(r.layer_number) for r in self.routers]  # global, 1-based
        self.num_layers = m.num_layers
        self.experts, self.topk = int(m.num_experts), int(m.moe_router_topk)
        self.capacity = m.moe_expert_capacity_factor is not None
        self.replay = m.moe_router_replay == "pi_r"
        self.whole_rows = not par.sequence_parallel and par.context_parallel_size == 1
        # full recompute runs a layer's forward again in the backward (the router's too)
        self.recompute = par.recompute_granularity == "full"
        self._maps: list[Optional[torch.Tensor]] = [None] * len(self.routers)
        for i, r in enumerate(self.routers):
            r.register_forward_hook(self._hook(i))
            if self.replay and getattr(r, "router_replay", None) is not None:
                r.register_forward_pre_hook(_replay_pre_hook)
        self.pi_r: Optional[dict[int, np.ndarray]] = None
        self._rec: Optional[dict[int, np.ndarray]] = None
        self._load = np.zeros((self.num_layers, self.experts))
        self._stats = np.zeros((self.num_layers, _PER_LAYER))
        # on the routers' device until the step's sums: no host sync per layer and micro-batch
        self._dev: dict[int, torch.Tensor] = {}  # layer -> [experts + 1] load, diff tokens

    def _hook(self, i: int) -> Any:
        def hook(module: Any, args: Any, out: Any) -> None:
            if not _in_backward():  # a recompute's routing: counted at its forward already
                self._maps[i] = out[1].detach()

        return hook

    # ---- per micro-batch (train/engine.py) ---------------------------------------------
    def before_forward(self, mb: Any) -> None:
        """Set each router's replayed indices for ``mb`` (replay on and pi_r loaded)."""
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        # (also while scoring once pi_r is loaded: stage1.anchor=epoch re-scores the policy
        # with the routing its training forwards use)
        if not (self.replay and self.pi_r is not None):
            return
        b, s = mb.input_ids.shape
        toks = sequence_tokens(mb)
        for i, r in enumerate(self.routers):
            target = torch.arange(self.topk).repeat(b * s, 1)  # padding: any k experts
            for j, idx in enumerate(toks):
                target[idx] = torch.from_numpy(self._pi_r_of(mb.rows[j], i, len(idx))).long()
            if not (self.recompute and torch.is_grad_enabled()):
                r.router_replay.clear_indices()  # no recompute: no backward list to keep
            # appends to the backward list too, popped in order by the recomputes
            r.router_replay.set_target_indices(target.to(mb.input_ids.device))
            r.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)

    def after_forward(self, mb: Any) -> None:
        """Add ``mb``'s routing to the step's sums (and to the recording, while recording)."""
        toks = sequence_tokens(mb) if self.whole_rows else []
        for i, (layer, rmap) in enumerate(zip(self.layers, self._maps)):
            if rmap is None:
                continue
            self._maps[i] = None
            st = self._stats[layer - 1]
            acc = self._dev.get(layer)
            if acc is None:
                acc = self._dev[layer] = torch.zeros(
                    self.experts + 1, dtype=torch.float64, device=rmap.device
                )
            acc[: self.experts] += rmap.sum(0)
            st[0] += 1
            st[1] += rmap.shape[0] * self.topk
            if self._rec is not None and self.whole_rows:
                top = self._recorded(i, rmap.cpu())
                for j, idx in enumerate(toks):
                    row = int(mb.rows[j])
                    if row not in self._rec:
                        self._rec[row] = np.zeros((len(self.routers), len(idx), self.topk), "i2")
                    self._rec[row][i] = top[idx].numpy().astype(np.int16)
            elif self.pi_r is not None and self.whole_rows and toks:
                ref = torch.zeros(rmap.shape[0], self.topk, dtype=torch.long)
                valid = torch.zeros(rmap.shape[0], dtype=torch.bool)
                for j, idx in enumerate(toks):
                    ref[idx] = torch.from_numpy(self._pi_r_of(mb.rows[j], i, len(idx))).long()
                    valid[idx] = True
                ref_map = torch.zeros_like(rmap, dtype=torch.bool)
                ref_map.scatter_(1, ref.to(rmap.device), True)
                acc[self.experts] += ((rmap != ref_map).any(1) & valid.to(rmap.device)).sum()
                st[4] += float(valid.sum())

    def _recorded(self, i: int, rmap: torch.Tensor) -> torch.Tensor:
        rr = getattr(self.routers[i], "router_replay", None)
        if rr is not None and rr.recorded_topk_idx is not None:
            return rr.recorded_topk_idx.detach().cpu()
        # without RouterReplay: the set of experts, from the map (capacity may drop some:
        # they are recorded as the map's next-highest False entries, i.e. arbitrary ones)
        return torch.topk(rmap.float(), self.topk, dim=1).indices

    def _pi_r_of(self, row: Any, i: int, n: int) -> np.ndarray:
        assert self.pi_r is not None
        rec = self.pi_r.get(int(row))
        if rec is None or rec.shape[1] != n:
            raise RuntimeError(
                f"pi_r's recorded routing has no entry of {n} tokens for table row {int(row)} "
                "(delete the stage's anchors/ directory to score pi_r again)"
            )
        return rec[i]

    # ---- recording (train/scoring.py) ---------------------------------------------------
    def start_recording(self) -> None:
        """Record every scored sequence's routing until :meth:`save_recording`."""
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        self._rec = {}
        for r in self.routers:
            if getattr(r, "router_replay", None) is not None:
                r.router_replay.clear_indices()
                r.router_replay.set_router_replay_action(RouterReplayAction.RECORD)

    def save_recording(self, out_dir: str | os.PathLike, dp_rank: int, owner: bool) -> None:
        """Write what was recorded to ``out_dir/routing_dp<d>_pp<p>.npz`` (TP rank 0)."""
        from megatron.core import parallel_state as ps

        rec, self._rec = self._rec or {}, None
        for r in self.routers:
            if getattr(r, "router_replay", None) is not None:
                r.router_replay.clear_indices()
                r.router_replay.clear_router_replay_action()
        self.reset()
        if not (owner and self.whole_rows):
            return
        rows = np.array(sorted(rec), np.int64)
        lens = np.array([rec[int(r)].shape[1] for r in rows], np.int64)
        vals = [rec[int(r)].transpose(1, 0, 2) for r in rows]  # [tokens, layers, k]
        import io

        bio = io.BytesIO()
        np.savez(
            bio,
            rows=rows,
            offsets=np.concatenate([[0], np.cumsum(lens)]),
            layers=np.array(self.layers, np.int64),
            values=np.concatenate(vals) if vals else np.zeros((0, len(self.layers), self.topk)),
        )
        pp = ps.get_pipeline_model_parallel_rank()
        atomic_write_bytes(
            Path(out_dir) / f"routing_dp{dp_rank:05d}_pp{pp:03d}.npz", bio.getvalue()
        )

    def load_pi_r(self, out_dir: str | os.PathLike) -> bool:
        """Read pi_r's recorded routing of this pipeline stage's layers; False if none."""
        from megatron.core import parallel_state as ps

        pp = ps.get_pipeline_model_parallel_rank()
        files = sorted(Path(out_dir).glob(f"routing_dp*_pp{pp:03d}.npz"))
        if not files or not self.whole_rows:
            if self.replay:
                raise RuntimeError(
                    f"{out_dir}: no recorded pi_r routing (scored before routing was recorded?); "
                    "delete the directory to score pi_r again"
                )
            return False
        out: dict[int, np.ndarray] = {}
        for f in files:
            with np.load(f) as z:
                rows, offs, vals = z["rows"], z["offsets"], z["values"]
                assert list(z["layers"]) == self.layers, (f, list(z["layers"]), self.layers)
            for k, r in enumerate(rows):
                out[int(r)] = np.ascontiguousarray(vals[offs[k] : offs[k + 1]].transpose(1, 0, 2))
        self.pi_r = out
        log.info("pi_r routing of %d sequences loaded from %s", len(out), out_dir)
        return True

    # ---- step sums (train/loop.py) ------------------------------------------------------
    def reset(self) -> None:
        """Drop the sums so far (and megatron's aux-loss tracker values)."""
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        self._load[:] = 0
        self._stats[:] = 0
        for r in self.routers:  # the step's backwards are done: nothing left to recompute
            rr = getattr(r, "router_replay", None)
            if rr is not None and rr.router_replay_action is not RouterReplayAction.RECORD:
                rr.replay_backward_list = []
        self._dev.clear()
        clear_aux_losses_tracker()

    def step_sums(self) -> dict[str, float]:
        """This step's sums over every rank (a collective: every rank calls it)."""
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        for name, entry in get_moe_layer_wise_logging_tracker().items():
            if name == "load_balancing_loss":
                vals = entry["values"].detach().double().cpu().numpy()
                for layer in self.layers:
                    self._stats[layer - 1, 5] += vals[layer - 1]
        for layer, acc in self._dev.items():
            a = acc.cpu().numpy()
            self._load[layer - 1] += a[: self.experts]
            self._stats[layer - 1, 2] += a[: self.experts].sum()  # kept slots
            self._stats[layer - 1, 3] += a[self.experts]  # tokens routed unlike pi_r
        vec = torch.from_numpy(np.concatenate([self._load, self._stats], axis=1).ravel())
        tot = comm.all_reduce(vec.clone()).numpy().reshape(self.num_layers, -1)
        self.reset()
        out: dict[str, float] = {}
        for layer in range(1, self.num_layers + 1):
            load, st = tot[layer - 1, : self.experts], tot[layer - 1, self.experts :]
            if st[0] == 0:
                continue  # a dense layer
            p = f"moe_l{layer}_"
            out.update({f"{p}e{e}": float(v) for e, v in enumerate(load)})
            keys = ("calls", "slots", "kept", "diff", "compared", "aux")
            out.update({p + k: float(v) for k, v in zip(keys, st)})
        return out


def finalize_moe_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Logged MoE values of (step or epoch) sums of :meth:`MoeRouting.step_sums`."""
    out: dict[str, float] = {}
    layers = sorted({int(k.split("_")[1][1:]) for k in sums if k.startswith("moe_l")})
    imb, aux, diff, compared = [], [], 0.0, 0.0
    for layer in layers:
        p = f"moe_l{layer}_"
        load = np.array([v for k, v in sums.items() if k.startswith(p + "e")])
        routed = load.sum()
        if routed > 0:
            q = f"moe/l{layer}/"
            out[q + "imbalance"] = float(load.max() / load.mean())
            out[q + "load_max"] = float(load.max() / routed)
            out[q + "load_min"] = float(load.min() / routed)
            imb.append(out[q + "imbalance"])
            slots = sums.get(p + "slots", 0.0)
            out[q + "dropped_frac"] = 1.0 - sums.get(p + "kept", 0.0) / slots if slots else 0.0
            if sums.get(p + "aux", 0.0) and sums.get(p + "calls"):
                out[q + "aux_loss"] = sums[p + "aux"] / sums[p + "calls"]
                aux.append(out[q + "aux_loss"])
            if sums.get(p + "compared"):
                out[q + "routing_diff"] = sums[p + "diff"] / sums[p + "compared"]
                diff += sums[p + "diff"]
                compared += sums[p + "compared"]
    if imb:
        out["moe/imbalance"] = float(np.mean(imb))
    if aux:
        out["moe/aux_loss"] = float(np.mean(aux))
    if compared:
        out["moe/routing_diff"] = diff / compared
    return out


def attach(cfg: Any, model: list[torch.nn.Module]) -> Optional[MoeRouting]:
    """A :class:`MoeRouting` for an MoE ``cfg.model``; None for a dense one."""
    return MoeRouting(cfg, model) if cfg.model.num_experts is not None else None


def load_pi_r_routing(run: Any, tag: str = "anchors/data") -> None:
    """Load the routing recorded by ``run.score(tag)`` (pi_r's scoring) into the engine."""
    moe = getattr(run.engine, "moe", None)
    if moe is not None:
        moe.load_pi_r(run.out_dir / tag / run.scores_key()[:24])
