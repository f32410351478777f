"""Time and peak memory of the vocab-parallel token ops against megatron-core's cross entropy.

    python benchmarks/bench_token_ops.py [--quick] [--shapes 4096x151936,8192x32000]
        [--dtypes fp32,bf16] [--reps 5] [--device cuda]

For each logits shape (tokens, vocab) and dtype, on one process (TP=1), forward + backward of
  (a) ``megatron.core.tensor_parallel.vocab_parallel_cross_entropy`` (the baseline; it
      writes its softmax and then the gradient into the logits' memory),
  (b) our ``vp_topk_kl`` with a k=64 teacher and (c) ``vp_logprob``, each in the default mode
      (a separately allocated gradient) and with ``inplace_backward=True`` (``_inpl``: the
      gradient written into the logits, as Megatron's op does).

Time. One child process per (shape, dtype) runs ``--warmup`` discarded rounds, then
``--reps`` rounds; in every round each op runs once, in turn (a, b, c, a, b, c, ...), so that
load from other processes hits every op alike. The logits are refilled with fresh values
outside the timer before every run (Megatron's op overwrites them). Torch and OpenMP use
``--threads`` threads (default 1) in every child alike. Reported: median wall time with the
min-max over the rounds, and ``ratio`` = median(op) / median(megatron); ``paired`` is the
min-max over rounds of the ratio within one round.

Memory. Every (shape, dtype, op) runs in a FRESH child, so that no allocator cache hides one
op's memory in another's. It allocates the inputs, touches them and reads its resident set
size (RSS); then it runs one forward+backward and reads the kernel's high-water mark
(``getrusage().ru_maxrss``; a 1 ms RSS sampler cross-checks). ``extra`` = high-water - RSS
before, everything the op allocates, its gradient included (none for in-place ops and for
Megatron's, whose gradient is the logits' own memory); reported as a fraction of the logits'
bytes. On CUDA the same with ``torch.cuda.max_memory_allocated``.

Last line: ``RESULT topk_kl_time_ratio=... peak_extra_mem_ratio_inplace=...
peak_extra_mem_ratio_default=... ...``: time ratios are the worst over the fp32 shapes
(``*_bf16``: bf16 logits); ``topk_kl_time_ratio`` is the in-place KL (which, like Megatron's
op, writes the gradient into the logits: the mode Stage 2 runs with a single top-k KL
teacher), ``topk_kl_default_time_ratio`` the KL with a fresh gradient, which also pays for
allocating and first touching a logits-sized tensor (row ``fresh_grad``). Memory ratios: the
worst over shapes and dtypes of our in-place ops, resp. our default-mode ops (which include
their logits-sized gradient: >= 1).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

OPS = ["megatron_ce", "vp_topk_kl", "vp_topk_kl_inpl", "vp_logprob", "vp_logprob_inpl"]
DEFAULT_SHAPES = "2048x151936,4096x32000"
TIME_ONLY = ["fresh_grad"]
QUICK_SHAPES = "2048x16384"
K = 64


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class _Sampler(threading.Thread):
    """Samples the RSS every millisecond and keeps the maximum."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self._halt = threading.Event()

    def run(self) -> None:
        import psutil

        proc = psutil.Process()
        while not self._halt.is_set():
            self.peak = max(self.peak, proc.memory_info().rss)
            time.sleep(0.001)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return self.peak


def _init_megatron(device: str) -> None:
    """World of one for Megatron's op: its TP all-reduces (cross_entropy.py, megatron-core
    0.16.1, ``torch.distributed.all_reduce(..., group=get_tensor_model_parallel_group())``)
    run on the logits' device, so NCCL on CUDA (it rejects CPU tensors), gloo on a CPU."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)


def _setup(n: int, v: int, dtype: str, device: str, ops: list[str], threads: int | None) -> dict:
    """Import, initialise and allocate everything one child needs; return the runners."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from erpd_megatron.ops import vocab_parallel as vp
    from erpd_megatron.ops import vocab_parallel_topk as vpt

    if threads:
        torch.set_num_threads(threads)
    if device == "cuda":
        torch.cuda.set_device(0)
    if "megatron_ce" in ops:
        _init_megatron(device)
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    dev = torch.device(device)
    torch.manual_seed(0)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    logits = torch.empty(n, v, dtype=dt, device=dev).normal_().requires_grad_()
    target = torch.randint(0, v, (n,), device=dev)
    # k distinct teacher ids per token (start + j * prime, mod v), masses summing to 0.9
    ids = (
        torch.randint(0, v, (n, 1), device=dev) + torch.arange(K, device=dev)[None, :] * 7919
    ) % v
    t_lp = torch.log(0.9 * torch.softmax(torch.randn(n, K, device=dev) * 2, dim=-1))
    runners = {
        # Megatron's op takes [s, b, V] logits and [s, b] targets (here b = 1: a view, no copy)
        "megatron_ce": lambda: (
            vocab_parallel_cross_entropy(logits.view(n, 1, v), target.view(n, 1)).sum().backward()
        ),
        "vp_topk_kl": lambda: vpt.vp_topk_kl(logits, ids, t_lp).sum().backward(),
        "vp_topk_kl_inpl": lambda: (
            vpt.vp_topk_kl(logits, ids, t_lp, inplace_backward=True).sum().backward()
        ),
        "vp_logprob": lambda: vp.vp_logprob(logits, target).sum().backward(),
        "vp_logprob_inpl": lambda: (
            vp.vp_logprob(logits, target, inplace_backward=True).sum().backward()
        ),
        # what the default mode pays and in-place ops do not: a fresh logits-sized gradient,
        # allocated as ours are (huge-page hint on Linux) and written once
        "fresh_grad": lambda: vp._new_grad(
            logits.detach(), vp._shard(logits, None, None, None, None)
        )[0].zero_(),
    }
    return {"torch": torch, "logits": logits, "runners": runners, "device": dev}


def child_memory(op: str, n: int, v: int, dtype: str, device: str, threads: int | None) -> dict:
    """In a fresh process: peak memory of one forward+backward of ``op`` above the inputs."""
    env = _setup(n, v, dtype, device, [op], threads)
    torch, logits = env["torch"], env["logits"]
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        env["runners"][op]()
        torch.cuda.synchronize()
        peak, sampled, reliable = torch.cuda.max_memory_allocated(), 0, True
    else:
        before = _rss_bytes()
        hw_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        sampler = _Sampler()
        sampler.start()
        env["runners"][op]()
        sampled = sampler.stop()
        hw_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        reliable = hw_after > hw_before
        peak = hw_after if reliable else sampled
    grad = logits.grad
    return {
        "op": op,
        "logits_bytes": logits.numel() * logits.element_size(),
        "extra_bytes": peak - before,
        "extra_sampled_bytes": sampled - before if sampled else None,
        "grad_is_logits_memory": grad is not None and grad.data_ptr() == logits.data_ptr(),
        "hw_reliable": reliable,
    }


def child_time(
    n: int, v: int, dtype: str, device: str, reps: int, warmup: int, threads: int | None
) -> dict:
    """In one process: ``warmup`` + ``reps`` rounds, each op once per round, in turn."""
    env = _setup(n, v, dtype, device, OPS, threads)
    torch, logits = env["torch"], env["logits"]
    cuda = device == "cuda"
    times: dict[str, list[float]] = {op: [] for op in OPS + TIME_ONLY}
    cpu: dict[str, list[float]] = {op: [] for op in OPS + TIME_ONLY}
    for r in range(warmup + reps):
        for op in OPS + TIME_ONLY:
            logits.grad = None
            with torch.no_grad():
                logits.normal_()  # Megatron's op overwrites the logits; refill for everyone
            if cuda:
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            env["runners"][op]()
            if cuda:
                torch.cuda.synchronize()
            if r >= warmup:
                times[op].append(time.perf_counter() - t0)
                cpu[op].append(time.process_time() - c0)
    logits.grad = None
    return {"times": times, "cpu": cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK_SHAPES}, fp32, 3 reps")
    ap.add_argument("--shapes", default=None, help=f"comma list NxV (default {DEFAULT_SHAPES})")
    ap.add_argument(
        "--dtypes",
        default=None,
        help="comma list of logits dtypes (default fp32,bf16; --quick fp32)",
    )
    ap.add_argument("--dtype", default=None, help="a single logits dtype (overrides --dtypes)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--reps", type=int, default=None, help="timed rounds (default 5; --quick 3)")
    ap.add_argument("--warmup", type=int, default=1, help="discarded rounds")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch/OpenMP threads in the children (0: default)"
    )
    ap.add_argument("--child-mem", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--child-time", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    reps = args.reps or (3 if args.quick else 5)
    threads = args.threads or None
    if args.child_mem:
        op, n, v, dtype, device = args.child_mem
        print("CHILD " + json.dumps(child_memory(op, int(n), int(v), dtype, device, threads)))
        return
    if args.child_time:
        n, v, dtype, device = args.child_time
        print(
            "CHILD "
            + json.dumps(child_time(int(n), int(v), dtype, device, reps, args.warmup, threads))
        )
        return

    spec = args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    shapes = [tuple(int(d) for d in s.split("x")) for s in spec.split(",")]
    dtypes = (
        [args.dtype]
        if args.dtype
        else (args.dtypes or ("fp32" if args.quick else "fp32,bf16")).split(",")
    )
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    common = ["--reps", str(reps), "--warmup", str(args.warmup), "--threads", str(args.threads)]

    def run_child(flag: str, *params: object) -> dict:
        cmd = [sys.executable, str(Path(__file__).resolve()), flag, *map(str, params), *common]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("CHILD ")]
        if out.returncode or not line:
            sys.stderr.write(out.stdout + out.stderr)
            raise SystemExit(f"benchmark child {flag} {params} failed")
        return json.loads(line[0][6:])

    print(
        f"# bench_token_ops: device {args.device}, TP=1, k={K}, {reps} interleaved rounds after "
        f"{args.warmup} warm-up, threads {args.threads or 'default'} (OMP_NUM_THREADS="
        f"{env.get('OMP_NUM_THREADS', 'unset')}), cpus {os.cpu_count()}, load avg "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(
        f"{'tokens x vocab':>14} {'dtype':>5} {'op':>16} {'median s':>9} {'min-max s':>13} "
        f"{'ratio':>6} {'paired':>11} {'cpu ratio':>9} {'extra MiB':>10} {'extra/logits':>12}"
    )
    time_ratio: dict[tuple[str, str], float] = {}
    cpu_ratio: dict[tuple[str, str], float] = {}
    mem = {"inplace": 0.0, "default": 0.0, "megatron": 0.0}
    for dtype in dtypes:
        for n, v in shapes:
            tc = run_child("--child-time", n, v, dtype, args.device)
            t, c = tc["times"], tc["cpu"]
            base = statistics.median(t["megatron_ce"])
            cbase = statistics.median(c["megatron_ce"])
            for op in OPS + TIME_ONLY:
                if op in TIME_ONLY:
                    med = statistics.median(t[op])
                    print(
                        f"{f'{n}x{v}':>14} {dtype:>5} {op:>16} {med:9.3f} "
                        f"{min(t[op]):6.3f}-{max(t[op]):<6.3f} {med / base:6.2f} {'':>11} "
                        f"{statistics.median(c[op]) / cbase:9.2f}"
                    )
                    continue
                m = run_child("--child-mem", op, n, v, dtype, args.device)
                med = statistics.median(t[op])
                ratio = med / base
                paired = [a / b for a, b in zip(t[op], t["megatron_ce"])]
                mr = m["extra_bytes"] / m["logits_bytes"]
                kind = (
                    "megatron"
                    if op == "megatron_ce"
                    else ("inplace" if op.endswith("_inpl") else "default")
                )
                mem[kind] = max(mem[kind], mr)
                key = (op, dtype)
                time_ratio[key] = max(time_ratio.get(key, 0.0), ratio)
                cr = statistics.median(c[op]) / cbase
                cpu_ratio[key] = max(cpu_ratio.get(key, 0.0), cr)
                print(
                    f"{f'{n}x{v}':>14} {dtype:>5} {op:>16} {med:9.3f} "
                    f"{min(t[op]):6.3f}-{max(t[op]):<6.3f} {ratio:6.2f} "
                    f"{min(paired):5.2f}-{max(paired):<5.2f} {cr:9.2f} "
                    f"{m['extra_bytes'] / 2**20:10.1f} {mr:12.3f}"
                    + ("" if m["hw_reliable"] else "  (memory from RSS sampling)")
                )
    print(
        "# ratio: median(op) / median(megatron_ce); paired: min-max of the per-round ratio; "
        "extra: peak memory above the inputs during one forward+backward, the gradient included; "
        "cpu ratio: the same with process time (user+sys of the child, less disturbed by other "
        "load); fresh_grad: allocating and writing a logits-sized gradient once (what "
        "default-mode ops pay beyond the math)"
    )

    def tr(op: str, dtype: str) -> str:
        return f"{time_ratio[op, dtype]:.3f}" if (op, dtype) in time_ratio else "nan"

    first = "fp32" if "fp32" in dtypes else dtypes[0]
    # topk_kl_time_ratio: the in-place op, which like Megatron's writes the gradient into the
    # logits (the mode Stage 2 runs with one top-k KL teacher); the default mode beside it
    print(
        f"RESULT topk_kl_time_ratio={tr('vp_topk_kl_inpl', first)} "
        f"topk_kl_default_time_ratio={tr('vp_topk_kl', first)} "
        f"logprob_time_ratio={tr('vp_logprob', first)} "
        f"logprob_inplace_time_ratio={tr('vp_logprob_inpl', first)} "
        f"topk_kl_time_ratio_bf16={tr('vp_topk_kl_inpl', 'bf16')} "
        f"topk_kl_default_time_ratio_bf16={tr('vp_topk_kl', 'bf16')} "
        f"peak_extra_mem_ratio_inplace={mem['inplace']:.3f} "
        f"peak_extra_mem_ratio_default={mem['default']:.3f} "
        f"megatron_extra_mem_ratio={mem['megatron']:.3f} "
        f"topk_kl_cpu_time_ratio={cpu_ratio.get(('vp_topk_kl_inpl', first), float('nan')):.3f} "
        f"topk_kl_default_cpu_time_ratio={cpu_ratio.get(('vp_topk_kl', first), float('nan')):.3f} "
        f"load_avg={os.getloadavg()[0]:.2f} device={args.device} time_dtype={first}"
    )


if __name__ == "__main__":
    main()
