"""The dry run's activation figure against measured memory of real CPU forward passes.

For two or three wide-but-shallow models (fp32, the local spec: attention scores are
materialised, GQA K/V are expanded), one process, the megatron-core ``GPTModel`` built
through ``erpd_megatron.models.builder.build_model`` under the CPU harness runs a training
forward on one micro-batch and keeps the graph. Measured, for the same micro-batch:

* ``saved``: the bytes of the distinct storages autograd saves for the backward
  (``torch.autograd.graph.saved_tensors_hooks``), plus the logits the model returns;
* ``rss``: the growth of the process's resident memory from just before the forward to just
  after it (glibc is told to serve every allocation above 64 KiB with ``mmap``, so freed
  temporaries go back to the system and the growth is what stays alive: the saved
  activations and the logits); the forward's transient peak (``VmHWM`` after
  ``clear_refs``) is printed too.

The estimate is :func:`erpd_megatron.config.memory.activation_bytes` for the exact setting
(fp32, no flash attention, TP=1, PP=1) plus the ``[b, s, V]`` fp32 logits tensor. A
backward then runs, so the step is a real one.

    python benchmarks/bench_dryrun_memory.py [--sizes 512x256,768x384,1024x512] [--batch 2]

Last line: ``RESULT ratio_saved=<min>..<max> ratio_rss=<min>..<max>`` (estimate / measured).
"""

from __future__ import annotations

import os
import sys

if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":  # must be set before the process starts
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.execv(sys.executable, [sys.executable, *sys.argv])

import argparse  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(hidden: int, seq: int, batch: int, vocab: int = 512) -> dict:
    """Estimate and measurements of one model size (see the module docstring)."""
    import torch

    from erpd_megatron.config.loader import load_config
    from erpd_megatron.config.memory import activation_bytes, layout_of
    from erpd_megatron.models.builder import build_model
    from erpd_megatron.runtime.distributed import init_distributed

    heads = hidden // 64
    cfg = load_config(
        ROOT / "configs/recipes/tiny-cpu.yaml",
        [
            "model.num_layers=2",
            f"model.hidden_size={hidden}",
            f"model.ffn_hidden_size={hidden * 11 // 4}",
            f"model.num_attention_heads={heads}",
            f"model.num_query_groups={heads // 4}",
            "model.kv_channels=64",
            f"model.vocab_size={vocab}",
            f"model.max_position_embeddings={seq}",
            "model.tie_word_embeddings=false",
            f"data.max_seq_length={seq}",
            f"data.max_tokens_per_microbatch={seq * batch}",
        ],
    )
    init_distributed(cfg)
    model = build_model(cfg)[0]
    model.train()
    tokens = seq * batch
    lay = layout_of(cfg, 1, on_gpu=False)
    logits_bytes = tokens * model.output_layer.weight.shape[0] * 4
    est = activation_bytes(cfg, lay, tokens, seq, "only") + logits_bytes

    ids = torch.randint(0, vocab, (batch, seq))
    pos = torch.arange(seq).expand(batch, seq).contiguous()
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter) and t.device.type == "cpu":
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    for _ in range(2):  # the first pass allocates lazily created buffers (RoPE caches, ...)
        seen.clear()
        params = {p.data_ptr() for p in model.parameters()}
        base = _rss_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError:  # not allowed here: the peak column is then the process's lifetime peak
            pass
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model(ids, pos, None)
        after = _rss_kib("VmRSS")
        peak = _rss_kib("VmHWM")
        saved = sum(n for p, n in seen.items() if p not in params and p != ids.data_ptr())
        out = logits.untyped_storage()
        saved += 0 if out.data_ptr() in seen else out.nbytes()
        logits.float().square().mean().backward()
        del logits
        model.zero_grad(set_to_none=True)
    return {
        "hidden": hidden,
        "seq": seq,
        "batch": batch,
        "estimate_mib": est / 2**20,
        "saved_mib": saved / 2**20,
        "rss_mib": (after - base) / 1024,
        "peak_mib": (peak - base) / 1024,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--sizes", default="512x256,768x384,1024x512", help="hidden x seq, comma-separated"
    )
    p.add_argument("--batch", type=int, default=2)
    args = p.parse_args()
    rs, rr = [], []
    print(
        f"{'hidden':>6} {'seq':>5} {'est MiB':>9} {'saved MiB':>10} {'RSS MiB':>9}"
        f" {'peak MiB':>9}"
        f" {'est/saved':>9} {'est/RSS':>8}"
    )
    for item in args.sizes.split(","):
        h, s = (int(x) for x in item.split("x"))
        r = measure(h, s, args.batch)
        rs.append(r["estimate_mib"] / r["saved_mib"])
        rr.append(r["estimate_mib"] / r["rss_mib"])
        print(
            f"{h:6d} {s:5d} {r['estimate_mib']:9.1f} {r['saved_mib']:10.1f} {r['rss_mib']:9.1f}"
            f" {r['peak_mib']:9.1f} {rs[-1]:9.3f} {rr[-1]:8.3f}",
            flush=True,
        )
    print(f"RESULT ratio_saved={min(rs):.3f}..{max(rs):.3f} ratio_rss={min(rr):.3f}..{max(rr):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
