"""Worker for the activation-recompute test: the project's builder with and without recompute."""

from __future__ import annotations

from typing import Any

import torch

SETTINGS: list[dict[str, Any]] = [
    {},
    {"parallel.recompute_granularity": "selective"},
    {
        "parallel.recompute_granularity": "full",
        "parallel.recompute_method": "uniform",
        "parallel.recompute_num_layers": 1,
    },
    {
        "parallel.recompute_granularity": "full",
        "parallel.recompute_method": "block",
        "parallel.recompute_num_layers": 1,
    },
]


def grads_by_setting(rank: int, world: int, recipe: str) -> list[dict[str, torch.Tensor]]:
    """Gradients of one forward+backward of the tiny recipe's model for each setting, from the
    same initial weights and batch."""
    from erpd_megatron.config.loader import load_config
    from erpd_megatron.models.builder import build_model, unwrap_model
    from erpd_megatron.runtime.distributed import destroy_distributed, init_distributed

    out = []
    state = None
    for setting in SETTINGS:
        cfg = load_config(recipe, [f"{k}={v}" for k, v in setting.items()])
        init_distributed(cfg)
        model = unwrap_model(build_model(cfg)[0])
        if state is None:
            state = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
        model.load_state_dict(state, strict=False)
        g = torch.Generator().manual_seed(11)
        ids = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=g)
        pos = torch.arange(24).expand(2, 24)
        logits = model(ids, pos, None)
        (logits.float().logsumexp(-1).mean()).backward()
        out.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        destroy_distributed(destroy_process_group=False)
    return out
