"""Peak memory of the streaming HF <-> megatron conversion on a synthetic checkpoint.

Writes a random Llama-shaped HF checkpoint (bf16, several safetensors files, about 2.4 GB by
default) under a temporary directory, converts it with ``tools/convert_checkpoint.py
hf-to-mcore`` and back with ``mcore-to-hf``, each in its own process under ``/usr/bin/time -v``
(``resource.getrusage(RUSAGE_CHILDREN)`` where that is absent), checks that the round trip is
bit-exact, and deletes everything. The baseline is a process that only imports what the
converter imports. The target: peak RSS below ``0.5 x checkpoint + baseline`` (ratio < 0.5).

    python benchmarks/bench_convert_memory.py [--layers 24] [--in-memory]

The last line: ``RESULT peak_rss_gib=... checkpoint_gib=... baseline_gib=... ratio=...
gb_per_s=...`` (ratio = (peak - baseline) / checkpoint; gb_per_s: hf-to-mcore's streaming rate).
``--in-memory`` also measures the pre-streaming path (about 2x the model) for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASELINE = (
    "import torch, megatron.core, megatron.core.models.gpt; "
    "import erpd_megatron.models.convert, erpd_megatron.models.convert_stream, "
    "erpd_megatron.models.builder, erpd_megatron.runtime.distributed"
)


def make_checkpoint(out: Path, *, layers: int, hidden: int, ffn: int, vocab: int) -> int:
    """A random Llama HF directory (config.json, safetensors files of ~400 MB, index);
    returns the bytes of tensor data. Tensors are made and written one at a time."""
    import torch
    from transformers import LlamaConfig

    from erpd_megatron.models.convert_stream import write_safetensors_stream

    heads, kv = hidden // 128, max(1, hidden // 512)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    )
    d = cfg.to_dict()
    d["torch_dtype"] = d["dtype"] = "bfloat16"
    d["architectures"] = ["LlamaForCausalLM"]
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(d, indent=2))
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv * 128, hidden)),
            (p + "self_attn.v_proj.weight", (kv * 128, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (ffn, hidden)),
            (p + "mlp.up_proj.weight", (ffn, hidden)),
            (p + "mlp.down_proj.weight", (hidden, ffn)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    files: list[list] = [[]]
    size = 0
    for k, s in shapes:
        n = 2 * s[0] * (s[1] if len(s) > 1 else 1)
        if files[-1] and size + n > 400 * 2**20:
            files.append([])
            size = 0
        files[-1].append((k, tuple(s), k))
        size += n
    gen = torch.Generator().manual_seed(0)

    def produce(name: str, k: str) -> torch.Tensor:
        shape = dict(shapes)[k]
        return torch.empty(shape, dtype=torch.bfloat16).uniform_(-0.05, 0.05, generator=gen)

    names = [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    total = 0
    for name, entries in zip(names, files):
        total += write_safetensors_stream(out / name, entries, torch.bfloat16, produce)
    weight_map = {k: names[i] for i, f in enumerate(files) for k, _, _ in f}
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return total


def measure(cmd: list[str]) -> tuple[float, float, str]:
    """(peak RSS GiB, wall seconds, stderr) of ``cmd`` in a child process."""
    time_bin = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ERPD_PROGRESS_INTERVAL": "30"}
    t0 = time.perf_counter()
    if time_bin:
        r = subprocess.run([time_bin, "-v", *cmd], capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)
        peak = int(m.group(1)) / 2**20 if m else float("nan")
    else:  # the largest child so far; children run one at a time, growing is what we need
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return peak, wall, r.stderr


def _rate(stderr: str, what: str) -> float:
    m = re.search(rf"{what} streamed ([\d.]+) GB in ([\d.]+) s: ([\d.]+) GB/s", stderr)
    return float(m.group(3)) if m else float("nan")


def round_trip_exact(a: Path, b: Path) -> bool:
    """Every tensor of HF dir ``a`` equals ``b``'s (same names, dtypes, bits)."""
    import torch

    from erpd_megatron.models.convert import LazySafetensors

    x, y = LazySafetensors(a), LazySafetensors(b)
    return sorted(x) == sorted(y) and all(torch.equal(x[k], y[k]) for k in x)


def main() -> int:
    """Generate, convert both ways, measure, check, clean up; print the RESULT line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--tp", type=int, default=2, help="target TP of hf-to-mcore")
    p.add_argument("--in-memory", action="store_true", help="also measure the in-memory path")
    args = p.parse_args()
    tool = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py")]
    work = Path(tempfile.mkdtemp(prefix="erpd_bench_convert_", dir="/tmp"))
    try:
        t0 = time.perf_counter()
        nbytes = make_checkpoint(
            work / "hf", layers=args.layers, hidden=args.hidden, ffn=args.ffn, vocab=args.vocab
        )
        files = len(list((work / "hf").glob("*.safetensors")))
        ckpt_gib = nbytes / 2**30
        print(f"checkpoint: {ckpt_gib:.2f} GiB in {files} files ({time.perf_counter() - t0:.0f} s)")
        base, _, _ = measure([sys.executable, "-c", BASELINE])
        print(f"baseline (imports only): {base:.3f} GiB")
        peak_in, wall_in, err = measure(
            [*tool, "hf-to-mcore", "--hf-dir", str(work / "hf"), "--out", str(work / "mc")]
            + ["--tp", str(args.tp)]
        )
        rate_in = _rate(err, "hf-to-mcore")
        print(f"hf-to-mcore: peak {peak_in:.3f} GiB, {wall_in:.0f} s, {rate_in:.3f} GB/s")
        peak_out, wall_out, err = measure(
            [*tool, "mcore-to-hf", "--ckpt", str(work / "mc"), "--out", str(work / "back")]
            + ["--max-shard-gb", "0.5"]
        )
        rate_out = _rate(err, "mcore-to-hf")
        print(f"mcore-to-hf: peak {peak_out:.3f} GiB, {wall_out:.0f} s, {rate_out:.3f} GB/s")
        exact = round_trip_exact(work / "hf", work / "back")
        print(f"round trip bit-exact: {exact}")
        if args.in_memory:
            shutil.rmtree(work / "back")
            peak_old, wall_old, _ = measure(
                [*tool, "hf-to-mcore", "--hf-dir", str(work / "hf"), "--out", str(work / "mc_old")]
                + ["--tp", str(args.tp), "--in-memory"]
            )
            print(f"in-memory hf-to-mcore: peak {peak_old:.3f} GiB, {wall_old:.0f} s")
        peak = max(peak_in, peak_out)
        ratio = (peak - base) / ckpt_gib
        print(
            f"RESULT peak_rss_gib={peak:.3f} checkpoint_gib={ckpt_gib:.3f} baseline_gib={base:.3f} "
            f"ratio={ratio:.3f} gb_per_s={rate_in:.3f}"
        )
        return 0 if exact and ratio < 0.5 else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
