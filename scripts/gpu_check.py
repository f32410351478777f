"""The steps of `make gpu-check` (scripts/gpu_check.sh): one Hopper GPU, under 8 minutes.

    python scripts/gpu_check.py [--cpu-dry] [--out DIR] [--keep]

Every step runs the project's real entry points (``erpd convert``, the init checkpoint,
``python -m erpd_megatron.stage1`` / ``stage2``, the cache tool, the vLLM engine) in child
processes on tiny or random inputs made here, prints ``PASS``/``FAIL``/``SKIP`` with its figure,
and the run ends with one ``SUMMARY {json}`` line (also written to ``DIR/summary.json``).
The exit code is 0 when no step failed.

``--bench`` adds the benchmarks on the GPU (``--device cuda``), outside the 8-minute budget.
``--cpu-dry`` runs what a CPU can: the imports (TE and vLLM reported, absent is SKIP), the
local-spec vs transformers logits (fp32), one Stage-1 run of the tiny model, the tiny MoE's
Stage 1 with router replay, and the summary. The steps' helpers live in
``scripts/gpu_check_steps/`` (common pieces, the child modes, the MoE step).

Child modes (used by the steps, not by hand): ``_logits``, ``_reload``, ``_vllm``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check_steps.children import _child_logits, _child_reload, _child_vllm  # noqa: E402
from gpu_check_steps.common import (  # noqa: E402
    H100_BF16_DENSE_FLOPS,
    ROOT,
    TINY,
    Check,
    StepFailed,
    _env,
    child_result,
    read_jsonl,
    run,
    save_random_qwen3,
    write_random_rollouts,
)
from gpu_check_steps.moe import step_moe  # noqa: E402


def step_imports(ck: Check) -> tuple[str, dict[str, Any]]:
    """TE, megatron's HAVE_TE and vLLM (in the interpreter the vLLM engine uses)."""
    from erpd_megatron.models.builder import transformer_engine_status
    from erpd_megatron.rollout.vllm_engine import vllm_python

    st = transformer_engine_status()
    py = vllm_python()
    p = subprocess.run(
        [py, "-c", "import vllm; print(vllm.__version__)"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    vllm_version = (
        p.stdout.strip().splitlines()[-1] if p.returncode == 0 and p.stdout.strip() else None
    )
    data = {
        "te_version": st.version,
        "te_imports": st.imports,
        "megatron_have_te": st.megatron_have_te,
        "te_error": st.error,
        "vllm_version": vllm_version,
        "vllm_python": py,
    }
    figure = (
        f"TE {st.version or 'absent'} (HAVE_TE={st.megatron_have_te}), "
        f"vLLM {vllm_version or 'absent'}"
    )
    if st.installed and not st.usable:
        raise StepFailed(f"{figure}: {st.error}")
    if not ck.cpu_dry and (not st.usable or vllm_version is None):
        raise StepFailed(f"{figure}: a GPU node needs both (make install)")
    return figure, data


def step_logits(ck: Check, hf: Path, mc: Path) -> tuple[str, dict[str, Any]]:
    """Local spec (and TE spec on GPU) vs transformers, bf16 on GPU, fp32 on CPU."""
    impls = ["local"] if ck.cpu_dry else ["local", "transformer_engine"]
    dtype = "fp32" if ck.cpu_dry else "bf16"
    tol = 1e-4 if dtype == "fp32" else 0.15  # max |log p diff| over 2x48 tokens x 512 ids
    data, figs = {}, []
    for impl in impls:
        r = child_result(
            run(
                [
                    sys.executable,
                    __file__,
                    "_logits",
                    "--mc",
                    str(mc),
                    "--hf",
                    str(hf),
                    "--impl",
                    impl,
                    "--dtype",
                    dtype,
                ],
                ck.out / f"logs/logits_{impl}.log",
                600,
            )
        )
        data[impl] = r
        figs.append(
            f"{impl}: max|dlogp| {r['max_abs_logprob_diff']:.2e}, "
            f"argmax agree {r['argmax_agree']:.3f}"
        )
        if not (
            r["max_abs_logprob_diff"] < tol
            and r["argmax_agree"] >= (1.0 if dtype == "fp32" else 0.9)
        ):
            raise StepFailed("; ".join(figs) + f" (tolerance {tol})")
        if dtype == "bf16" and r["logits_dtype"] != "torch.bfloat16":
            raise StepFailed(f"{impl}: logits came out as {r['logits_dtype']}, expected bf16")
    return "; ".join(figs) + f" ({dtype})", data


def stage1_recipe(ck: Check) -> tuple[Path, list[str], dict[str, Any]]:
    """(recipe, overrides, model facts) of the Stage-1 runs: the tiny model on CPU, a random
    Llama-3.2-1B cut to 8 layers (~0.75 B parameters) on the GPU."""
    work = ck.out / "stage1"
    if ck.cpu_dry:
        rollouts = write_random_rollouts(
            work / "rollouts", vocab=256, prompts=8, group=4, max_len=24
        )
        ov = [
            "precision.params_dtype=fp32",
            "precision.transformer_impl=local",
            "data.global_batch_size=16",
            "data.max_tokens_per_microbatch=128",
        ]
        return TINY, ov + [f"data.rollout_dir={rollouts}"], {"params": None}
    rollouts = write_random_rollouts(
        work / "rollouts", vocab=128256, prompts=16, group=4, max_len=512
    )
    recipe = ck.out / "gpu-check.yaml"
    recipe.write_text(
        f"defaults:\n  - {ROOT / 'configs/algorithms/erpd.yaml'}\n  - model: llama3-1b\n"
        "name: gpu-check\nparallel: {num_nodes: 1, gpus_per_node: 1}\n"
    )
    ov = [
        "model.num_layers=8",
        "model.max_position_embeddings=4096",
        "precision.params_dtype=bf16",
        "precision.transformer_impl=transformer_engine",
        "data.global_batch_size=32",
        "data.max_tokens_per_microbatch=8192",
        "data.max_seq_length=1024",
        "optimizer.lr=1e-5",
        f"data.rollout_dir={rollouts}",
    ]
    return recipe, ov, {"params": None}


def step_stage1(
    ck: Check, recipe: Path, ov: list[str], name: str, extra: list[str], *, nproc: int = 1
) -> tuple[str, dict[str, Any]]:
    """One Stage-1 run (1 epoch, on ``nproc`` GPUs): finite losses, a final checkpoint, tokens/s."""
    base = ck.out / "stage1/base"
    if not base.exists():
        run(
            [
                sys.executable,
                "-m",
                "erpd_megatron.pipeline.init_checkpoint",
                "--config",
                str(recipe),
                "--out",
                str(base),
                *ov,
            ],
            ck.out / "logs/init_checkpoint.log",
            600,
        )
    out = ck.out / f"stage1/{name}"
    run(
        [
            sys.executable,
            "-m",
            "erpd_megatron.stage1",
            "--config",
            str(recipe),
            *ov,
            *extra,
            f"checkpoint.load={base}",
            f"output_dir={out}",
            "stage1.epochs=1",
            "stage1.eval_every_epochs=0",
            "logging.progress_bar=false",
            "checkpoint.save_interval=100000",
        ],
        ck.out / f"logs/stage1_{name}.log",
        900,
        nproc=nproc,
    )
    metrics = [
        r
        for r in read_jsonl(out / "stage1/stage1_metrics.jsonl")
        if "stage1/loss" in r or "loss" in r
    ]
    losses = [r.get("stage1/loss", r.get("loss")) for r in metrics]
    timing = read_jsonl(out / "stage1/stage1_timing.jsonl")
    final = out / "stage1/checkpoints/final"
    if not losses or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in losses):
        raise StepFailed(f"losses {losses}")
    if not final.exists():
        raise StepFailed(f"no final checkpoint at {final}")
    tps = [t["tokens_per_s"] for t in timing[1:]] or [t["tokens_per_s"] for t in timing]
    tok_s = sorted(tps)[len(tps) // 2] if tps else float("nan")
    return (
        f"{len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}, {tok_s:,.0f} tokens/s",
        {"losses": losses, "tokens_per_s": tok_s, "final": str(final)},
    )


def mfu_figure(ck: Check, recipe: Path, ov: list[str], tok_s: float) -> tuple[str, dict[str, Any]]:
    """MFU of the bf16 Stage-1 step: 6 * N * tokens/s / peak (N: parameters; attention FLOPs
    at these lengths are left out, so this is a lower bound)."""
    from erpd_megatron.config import load_config
    from erpd_megatron.config.dryrun import estimate

    est = estimate(load_config(recipe, ov, validate=False))
    n = est.params_total
    mfu = 6 * n * tok_s / H100_BF16_DENSE_FLOPS
    if not mfu > 0:
        raise StepFailed(f"tokens/s {tok_s}")
    return f"{n / 1e9:.2f} B params, {tok_s:,.0f} tokens/s, MFU {mfu:.1%} (6N, 989 TFLOP/s peak)", {
        "mfu": mfu
    }


def main(argv: list[str] | None = None) -> int:
    """Run the steps (see the module doc); returns 0 when no step failed."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode")
    for mode in ("_logits", "_vllm"):
        c = sub.add_parser(mode)
        c.add_argument("--mc", required=True)
        c.add_argument("--hf", required=True)
        c.add_argument("--impl", default="local")
        c.add_argument("--dtype", default="fp32")
        c.add_argument("--export", default=None)
    c = sub.add_parser("_reload")
    c.add_argument("--config", required=True)
    c.add_argument("--ckpt", nargs="+", required=True)
    c.add_argument("overrides", nargs="*")
    p.add_argument("--cpu-dry", action="store_true", help="only the CPU-runnable steps")
    p.add_argument("--out", default=None, help="work directory (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument(
        "--budget",
        type=float,
        default=1e9,
        help="seconds after which the remaining steps are reported as SKIP "
        "(the summary still prints)",
    )
    p.add_argument(
        "--bench",
        action="store_true",
        help="also run the benchmarks with --device cuda (a few minutes more than the 8)",
    )
    args = p.parse_args(argv)
    if args.mode:
        fn = {"_logits": _child_logits, "_reload": _child_reload, "_vllm": _child_vllm}[args.mode]
        print("RESULT " + json.dumps(fn(args)), flush=True)
        return 0
    out = Path(args.out or tempfile.mkdtemp(prefix="erpd-gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    ck = Check(out, args.cpu_dry, args.budget)
    import torch

    if not args.cpu_dry and not torch.cuda.is_available():
        print("FAIL cuda: torch sees no GPU (run with --cpu-dry on a CPU machine)", flush=True)
        return 1
    ck.step("imports", lambda: step_imports(ck))
    hf, mc = out / "qwen3-hf", out / "qwen3-mc"

    def convert() -> tuple[str, dict[str, Any]]:
        save_random_qwen3(hf)
        run(
            [
                sys.executable,
                str(ROOT / "tools/convert_checkpoint.py"),
                "hf-to-mcore",
                "--hf-dir",
                str(hf),
                "--out",
                str(mc),
            ],
            out / "logs/convert.log",
            300,
        )
        if not (mc / "model_config.yaml").exists():
            raise StepFailed(f"hf-to-mcore wrote no checkpoint at {mc}")
        return f"random Qwen3 {hf.name} -> {mc.name}", {}

    converted = ck.step("convert_hf_to_mcore", convert)
    ck.step(
        "logits_vs_transformers",
        lambda: step_logits(ck, hf, mc),
        skip=None if converted else "no checkpoint",
    )
    recipe, ov, _ = stage1_recipe(ck)
    runs = (
        [("fp32_cpu", [])]
        if args.cpu_dry
        else [
            ("bf16", []),
            ("fp8_delayed", ["precision.fp8=hybrid", "precision.fp8_recipe=delayed"]),
            ("fp8_tensorwise", ["precision.fp8=hybrid", "precision.fp8_recipe=tensorwise"]),
        ]
    )
    figures: dict[str, dict[str, Any]] = {}
    for name, extra in runs:

        def one(name: str = name, extra: list[str] = extra) -> tuple[str, dict[str, Any]]:
            fig, data = step_stage1(ck, recipe, ov, name, extra)
            figures[name] = data
            return fig, data

        ck.step(f"stage1_{name}", one)
    # context parallel (TE attention over the CP group) with packed THD rows, on 2 GPUs
    cp_skip = (
        "CPU dry run"
        if args.cpu_dry
        else None
        if torch.cuda.device_count() >= 2
        else "needs 2 GPUs"
    )
    ck.step(
        "stage1_cp2_packed",
        lambda: step_stage1(
            ck,
            recipe,
            ov,
            "cp2_packed",
            [
                "parallel.context_parallel_size=2",
                "data.packing=true",
                "parallel.num_nodes=1",
                "parallel.gpus_per_node=2",
            ],
            nproc=2,
        ),
        skip=cp_skip,
    )
    finals = [figures[n]["final"] for n, _ in runs if n in figures]
    ck.step(
        "checkpoint_reload",
        lambda: _reload_step(ck, recipe, ov, finals),
        skip=None if finals else "no final",
    )
    # MoE: TE grouped GEMM + alltoall, pi_r router replay (EP=2 on 2 GPUs); tiny on CPU
    ck.step("stage1_moe_replay", lambda: step_moe(ck))
    if "bf16" in figures:
        ck.step("stage1_mfu", lambda: mfu_figure(ck, recipe, ov, figures["bf16"]["tokens_per_s"]))
    ck.step(
        "cache_and_stage2",
        lambda: _cache_stage2(ck, recipe, ov, figures["bf16"]["final"]),
        skip="CPU dry run" if args.cpu_dry else (None if "bf16" in figures else "no Stage-1 final"),
    )
    ck.step(
        "vllm_rollouts_and_export",
        lambda: _vllm_step(ck, hf, mc),
        skip="CPU dry run" if args.cpu_dry else (None if converted else "no checkpoint"),
    )
    ck.step(
        "benchmarks_cuda",
        lambda: _bench_step(ck),
        skip="CPU dry run" if args.cpu_dry else (None if args.bench else "not asked (--bench)"),
    )
    s = ck.summary()
    print(
        "SUMMARY "
        + json.dumps(
            {k: v for k, v in s.items() if k != "steps"}
            | {"steps": {r["step"]: r["status"] for r in s["steps"]}}
        ),
        flush=True,
    )
    if not args.keep and args.out is None:
        shutil.rmtree(out, ignore_errors=True)
    return 0 if s["ok"] else 1


def _reload_step(
    ck: Check, recipe: Path, ov: list[str], finals: list[str]
) -> tuple[str, dict[str, Any]]:
    r = child_result(
        run(
            [
                sys.executable,
                __file__,
                "_reload",
                "--config",
                str(recipe),
                "--ckpt",
                *finals,
                "--",
                *ov,
            ],
            ck.out / "logs/reload.log",
            600,
        )
    )
    if not all(r.values()):
        raise StepFailed(f"non-finite logits after reload: {r}")
    return f"{len(r)} final checkpoints reloaded, finite logits", {"reloaded": r}


def _cache_stage2(ck: Check, recipe: Path, ov: list[str], final: str) -> tuple[str, dict[str, Any]]:
    cache = ck.out / "cache"
    base = ck.out / "stage1/base"
    models = f"cache.models=[{{name: teacher0, checkpoint: {final}}}]"
    t0 = time.perf_counter()
    run(
        [
            sys.executable,
            "-m",
            "erpd_megatron.train.cache_pass",
            "--config",
            str(recipe),
            *ov,
            models,
            "cache.topk=16",
            f"cache.dir={cache}",
            f"checkpoint.load={base}",
        ],
        ck.out / "logs/cache.log",
        900,
    )
    t_cache = time.perf_counter() - t0
    out = ck.out / "stage2"
    teachers = "stage2.teachers=[{model: teacher0, signal: topk_kl, weight: 1.0}]"
    run(
        [
            sys.executable,
            "-m",
            "erpd_megatron.stage2",
            "--config",
            str(recipe),
            *ov,
            models,
            teachers,
            f"stage2.cache_dir={cache}",
            f"checkpoint.load={base}",
            f"output_dir={out}",
            "stage2.epochs=1",
            "logging.progress_bar=false",
            "checkpoint.save_interval=100000",
        ],
        ck.out / "logs/stage2.log",
        900,
    )
    recs = read_jsonl(out / "stage2/stage2_metrics.jsonl")
    losses = [r["stage2/loss"] for r in recs if "stage2/loss" in r]
    if not losses or not all(math.isfinite(x) for x in losses):
        raise StepFailed(f"stage2 losses {losses}")
    return (
        f"cache {t_cache:.0f}s; stage2 {len(losses)} steps, "
        f"loss {losses[0]:.4f} -> {losses[-1]:.4f}",
        {"stage2_losses": losses},
    )


def _bench_step(ck: Check) -> tuple[str, dict[str, Any]]:
    """The benchmarks that take ``--device cuda`` (their quick mode where they have one), each
    reported by its ``RESULT k=v ...`` line."""
    figs, data = [], {}
    for name in ("bench_token_ops.py", "bench_cache.py", "bench_train_step.py"):
        script = ROOT / "benchmarks" / name
        if not script.exists():
            continue
        helptext = subprocess.run(
            [sys.executable, str(script), "--help"],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=120,
        ).stdout
        if "--device" not in helptext:
            figs.append(f"{name}: no --device option")
            continue
        cmd = [
            sys.executable,
            str(script),
            "--device",
            "cuda",
            *(["--quick"] if "--quick" in helptext else []),
        ]
        text = run(cmd, ck.out / f"logs/{name}.log", 240)
        result = [x for x in text.splitlines() if x.startswith("RESULT ")]
        data[name] = result[-1] if result else None
        figs.append(f"{name}: {result[-1][len('RESULT ') :] if result else 'no RESULT line'}")
    return "; ".join(figs) or "no benchmarks", data


def _vllm_step(ck: Check, hf: Path, mc: Path) -> tuple[str, dict[str, Any]]:
    export = ck.out / "qwen3-export"
    run(
        [
            sys.executable,
            str(ROOT / "tools/convert_checkpoint.py"),
            "mcore-to-hf",
            "--ckpt",
            str(mc),
            "--out",
            str(export),
        ],
        ck.out / "logs/export.log",
        300,
    )
    if not (export / "config.json").exists():
        raise StepFailed(f"mcore-to-hf wrote no HF checkpoint at {export}")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (hf / f).exists() and not (export / f).exists():
            shutil.copy(hf / f, export / f)
    r = child_result(
        run(
            [
                sys.executable,
                __file__,
                "_vllm",
                "--mc",
                str(mc),
                "--hf",
                str(hf),
                "--export",
                str(export),
            ],
            ck.out / "logs/vllm.log",
            900,
        )
    )
    if not (r["max_abs_logprob_diff"] < 1e-3 and r.get("export_greedy_agree", 0.0) == 1.0):
        raise StepFailed(
            f"vLLM vs trainer max|dlogp| {r['max_abs_logprob_diff']:.2e} (tolerance 1e-3), "
            f"export greedy agreement {r.get('export_greedy_agree')}"
        )
    return (
        f"{r['samples']} samples, "
        f"vLLM vs trainer max|dlogp| {r['max_abs_logprob_diff']:.1e} (fp32); "
        f"mcore-to-hf export greedy agreement {r['export_greedy_agree']:.2f}",
        r,
    )


if __name__ == "__main__":
    sys.exit(main())
