"""Run as a script by the runtime tests: init_distributed from the environment, exercise the
CPU harness, build + run the tiny model, print one JSON line, tear down."""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import torch

    from erpd_megatron.config import ConfigError, load_config
    from erpd_megatron.models.builder import build_model, forward_logits
    from erpd_megatron.runtime import cpu_harness
    from erpd_megatron.runtime.distributed import destroy_distributed, init_distributed

    tp = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    cfg = load_config(
        Path(__file__).resolve().parents[2] / "configs/recipes/tiny-cpu.yaml",
        [f"parallel.tensor_model_parallel_size={tp}", "parallel.distributed_timeout_minutes=7"],
        validate=False,
    )
    env = init_distributed(cfg)
    out: dict = {
        k: getattr(env, k)
        for k in (
            "rank",
            "world_size",
            "local_rank",
            "backend",
            "tp_rank",
            "tp_size",
            "pp_size",
            "dp_size",
            "launcher",
            "cpu_harness",
        )
    }
    out["device"] = str(env.device)
    out["harness_installed"] = cpu_harness.is_installed()
    out["cuda_available"] = torch.cuda.is_available()
    if env.backend == "gloo":  # the collective timeout the config asked for (7 minutes)
        import torch.distributed as dist

        out["pg_timeout_s"] = dist.group.WORLD._get_backend(
            torch.device("cpu")
        ).options._timeout.total_seconds()
    if env.cpu_harness:
        t = torch.zeros(3, device="cuda")
        cpu_harness.install_cpu_harness()  # idempotent
        out["harness"] = {
            "zeros_device": str(t.device),
            "cuda_noop": t.cuda() is t,
            "to_cuda": str(t.to("cuda").device),
            "type": t.type(),
            "current_device": str(torch.cuda.current_device()),
            "rng_len": int(torch.cuda.get_rng_state().numel()),
            "int_device": str(torch.ones(1, device=0).device),
        }
    model = build_model(cfg)
    logits = forward_logits(model, torch.randint(0, cfg.model.vocab_size, (2, 8)))
    out["logits_shape"] = list(logits.shape)
    try:
        bad = load_config(
            Path(__file__).resolve().parents[2] / "configs/recipes/tiny-cpu.yaml",
            [f"parallel.tensor_model_parallel_size={2 * env.world_size}"],
            validate=False,
        )
        init_distributed(bad)
    except ConfigError as e:
        out["layout_error"] = str(e)
    destroy_distributed()
    import torch.distributed as dist

    out["pg_destroyed"] = not dist.is_initialized()
    print("RESULT " + json.dumps(out), flush=True)
