"""Time and peak memory of the vocab-parallel token ops against megatron-core's cross entropy.

    python benchmarks/bench_token_ops.py [--quick] [--shapes 4096x151936,16384x32000] [--reps 3]

For each logits shape (tokens, vocab), fp32, on one process (TP=1), forward + backward of
  (a) megatron.core.tensor_parallel.vocab_parallel_cross_entropy (the baseline),
  (b) our vp_logprob,
  (c) our vp_topk_kl with a k=64 teacher,
plus, for information, (b) and (c) with ``inplace_backward=True`` (the gradient written into
the logits' memory, as Megatron's op does: no fresh logits-sized gradient, whose page faults
dominate on a CPU), our vp_entropy (fwd+bwd) and vp_topk (forward only, k=64).

How it measures. Every (shape, op) runs in a FRESH child process, so that memory of one
op cannot hide in the allocator of another. The child allocates the logits (and targets,
teacher ids/log-probs), touches them, and reads its resident set size (RSS, psutil) as the
baseline. It then runs forward+backward once and reads the kernel's high-water mark of the
RSS (``getrusage().ru_maxrss``), which sees every allocation, torch's internal temporaries
included; a 1 ms RSS-sampling thread runs alongside as a cross-check. Peak extra memory =
high-water - baseline - the gradient's bytes when the op allocates a separate gradient
(ours do; Megatron's writes the gradient into the logits in place, so for it nothing is
subtracted). Time: in one process per shape, each op runs once to warm up and then
``--reps`` times back to back (the steady state of a training loop, where each step frees
the previous gradient before allocating the next); reported: the minimum wall time
(time.perf_counter) and the minimum CPU time (time.process_time, user + sys, which other
jobs on a shared machine disturb less). The logits are refilled with fresh values outside
the timer (Megatron's op overwrites them). Torch runs with one thread by default
(``--threads``): on a loaded 2-core machine that gives the least noisy ratios. Megatron needs a process group: the child initialises
gloo with world size 1 and ``parallel_state.initialize_model_parallel(1, 1)``; no CUDA
patch was needed for this op on CPU.

The last line is machine-readable:
``RESULT topk_kl_time_ratio=... logprob_time_ratio=... peak_extra_mem_ratio=...``
(time ratios: ours / Megatron, worst over shapes; memory: peak extra / logits bytes, worst
over our ops and shapes).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

OPS = ["megatron_ce", "vp_logprob", "vp_topk_kl", "vp_logprob_inpl", "vp_topk_kl_inpl", "vp_entropy",
       "vp_topk_fwd"]
DEFAULT_SHAPES = "4096x151936,16384x32000"
QUICK_SHAPES = "1024x32000,2048x8192"
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


def _init_megatron() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)


def _setup(n: int, v: int, ops: list[str], chunk_elements: int | None, threads: int | None) -> dict:
    """Import, initialise and allocate everything one child needs; return the runners."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from erpd_megatron.ops import vocab_parallel as vp

    if threads:
        torch.set_num_threads(threads)
    if chunk_elements:
        vp.DEFAULT_CHUNK_ELEMENTS["cpu"] = chunk_elements
    if "megatron_ce" in ops:
        _init_megatron()
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    torch.manual_seed(0)
    logits = torch.empty(n, v, dtype=torch.float32).normal_().requires_grad_()
    target = torch.randint(0, v, (n,))
    # k distinct teacher ids per token (start + j * prime, mod v), masses summing to 0.9
    ids = (torch.randint(0, v, (n, 1)) + torch.arange(K)[None, :] * 7919) % v
    t_lp = torch.log(0.9 * torch.softmax(torch.randn(n, K) * 2, dim=-1))
    runners = {
        "megatron_ce": lambda: vocab_parallel_cross_entropy(logits.view(n, 1, v), target.view(n, 1)).sum().backward(),
        "vp_logprob": lambda: vp.vp_logprob(logits, target).sum().backward(),
        "vp_topk_kl": lambda: vp.vp_topk_kl(logits, ids, t_lp).sum().backward(),
        "vp_logprob_inpl": lambda: vp.vp_logprob(logits, target, inplace_backward=True).sum().backward(),
        "vp_topk_kl_inpl": lambda: vp.vp_topk_kl(logits, ids, t_lp, inplace_backward=True).sum().backward(),
        "vp_entropy": lambda: vp.vp_entropy(logits).sum().backward(),
        "vp_topk_fwd": lambda: vp.vp_topk(logits.detach(), K),
    }
    return {"torch": torch, "logits": logits, "runners": runners}


def child_memory(op: str, n: int, v: int, chunk_elements: int | None, threads: int | None) -> dict:
    """In a fresh process: peak extra memory of one forward+backward of ``op``."""
    env = _setup(n, v, [op], chunk_elements, threads)
    logits = env["logits"]
    base = _rss_bytes()
    hw_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sampler = _Sampler()
    sampler.start()
    env["runners"][op]()
    sampled = sampler.stop()
    hw_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    grad = logits.grad
    separate_grad = grad is not None and grad.data_ptr() != logits.data_ptr()
    grad_bytes = grad.numel() * grad.element_size() if separate_grad else 0
    peak = hw_after if hw_after > hw_before else sampled
    return {
        "op": op, "logits_bytes": logits.numel() * logits.element_size(), "grad_bytes": grad_bytes,
        "extra_bytes": peak - base - grad_bytes, "extra_sampled_bytes": sampled - base - grad_bytes,
        "hw_reliable": hw_after > hw_before,
    }


def child_time(n: int, v: int, reps: int, chunk_elements: int | None, threads: int | None) -> dict:
    """In one process: each op once to warm up, then ``reps`` timed runs back to back (the
    steady state of training: each run frees the previous gradient and allocates the next)."""
    env = _setup(n, v, OPS, chunk_elements, threads)
    torch, logits = env["torch"], env["logits"]
    times: dict[str, list[float]] = {op: [] for op in OPS}
    cpu: dict[str, list[float]] = {op: [] for op in OPS}
    for op in OPS:
        for _ in range(reps + 1):  # the first run warms up and is dropped
            logits.grad = None
            with torch.no_grad():
                logits.normal_()  # Megatron's op overwrites the logits; refill for everyone
            t0, c0 = time.perf_counter(), time.process_time()
            env["runners"][op]()
            times[op].append(time.perf_counter() - t0)
            cpu[op].append(time.process_time() - c0)
    logits.grad = None
    return {"times": {op: t[1:] for op, t in times.items()}, "cpu": {op: t[1:] for op, t in cpu.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"small shapes ({QUICK_SHAPES}), 2 reps")
    ap.add_argument("--shapes", default=None, help=f"comma list NxV (default {DEFAULT_SHAPES})")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per op (default 3)")
    ap.add_argument("--chunk-elements", type=int, default=None,
                    help="override DEFAULT_CHUNK_ELEMENTS['cpu'] (logits per chunk)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in the children (default 1: on a shared, loaded "
                         "2-core machine one thread gives the least noisy ratios; 0 = torch default)")
    ap.add_argument("--thp", action="store_true",
                    help="set THP_MEM_ALLOC_ENABLE=1 in the children (torch's CPU allocator asks "
                         "for transparent huge pages: fewer page faults on the fresh gradient)")
    ap.add_argument("--child-mem", nargs=3, metavar=("OP", "N", "V"), help=argparse.SUPPRESS)
    ap.add_argument("--child-time", nargs=2, metavar=("N", "V"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    reps = args.reps or (2 if args.quick else 3)
    threads = args.threads or None
    if args.child_mem:
        op, n, v = args.child_mem
        print("CHILD " + json.dumps(child_memory(op, int(n), int(v), args.chunk_elements, threads)))
        return
    if args.child_time:
        n, v = args.child_time
        print("CHILD " + json.dumps(child_time(int(n), int(v), reps, args.chunk_elements, threads)))
        return

    spec = args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    shapes = [tuple(int(d) for d in s.split("x")) for s in spec.split(",")]
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if args.thp:
        env["THP_MEM_ALLOC_ENABLE"] = "1"
    common = ["--reps", str(reps), "--threads", str(args.threads)]
    if args.chunk_elements:
        common += ["--chunk-elements", str(args.chunk_elements)]

    def run_child(flag: str, *params: object) -> dict:
        cmd = [sys.executable, str(Path(__file__).resolve()), flag, *map(str, params), *common]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("CHILD ")]
        if out.returncode or not line:
            sys.stderr.write(out.stdout + out.stderr)
            raise SystemExit(f"benchmark child {flag} {params} failed")
        return json.loads(line[0][6:])

    print(f"# bench_token_ops: fp32, TP=1, k={K}, reps={reps} (back to back, after 1 warm-up), "
          f"torch threads={args.threads or 'default'}, cpus={os.cpu_count()}, "
          f"THP_MEM_ALLOC_ENABLE={env.get('THP_MEM_ALLOC_ENABLE', 'unset')}, "
          f"load avg={os.getloadavg()[0]:.1f}")
    print(f"{'tokens x vocab':>16} {'op':>15} {'wall s':>8} {'x meg':>6} {'cpu s':>7} {'x meg':>6} "
          f"{'extra MiB':>10} {'extra/logits':>12}")
    ratio = {(op, kind): 0.0 for op in OPS[1:5] for kind in ("wall", "cpu")}
    mem_ratio = 0.0
    for n, v in shapes:
        timing = run_child("--child-time", n, v)
        wall = {op: min(t) for op, t in timing["times"].items()}
        cpu = {op: min(t) for op, t in timing["cpu"].items()}
        for op in OPS:
            mem = run_child("--child-mem", op, n, v)
            mr = mem["extra_bytes"] / mem["logits_bytes"]
            rw, rc = wall[op] / wall["megatron_ce"], cpu[op] / cpu["megatron_ce"]
            print(f"{f'{n}x{v}':>16} {op:>15} {wall[op]:8.3f} {rw:6.2f} {cpu[op]:7.3f} {rc:6.2f} "
                  f"{mem['extra_bytes'] / 2**20:10.1f} {mr:12.3f}"
                  + ("" if mem["hw_reliable"] else "  (memory from RSS sampling)"))
            if (op, "wall") in ratio:
                ratio[op, "wall"] = max(ratio[op, "wall"], rw)
                ratio[op, "cpu"] = max(ratio[op, "cpu"], rc)
            if op != "megatron_ce":
                mem_ratio = max(mem_ratio, mr)
    print("# wall: min perf_counter time of forward+backward over the reps (vp_topk_fwd: forward "
          "only); cpu: min process_time (user+sys, less sensitive to other load on the machine); "
          "extra: peak RSS beyond the logits and a separately allocated gradient")
    print("# RESULT: time ratios = ours / megatron_ce (wall; cpu_ variants: process time), worst "
          "over shapes; memory = worst extra/logits over our ops and shapes")
    print(f"RESULT topk_kl_time_ratio={ratio['vp_topk_kl', 'wall']:.3f} "
          f"logprob_time_ratio={ratio['vp_logprob', 'wall']:.3f} peak_extra_mem_ratio={mem_ratio:.3f} "
          f"topk_kl_cpu_time_ratio={ratio['vp_topk_kl', 'cpu']:.3f} "
          f"logprob_cpu_time_ratio={ratio['vp_logprob', 'cpu']:.3f} "
          f"topk_kl_inplace_time_ratio={ratio['vp_topk_kl_inpl', 'wall']:.3f} "
          f"logprob_inplace_time_ratio={ratio['vp_logprob_inpl', 'wall']:.3f}")

if __name__ == "__main__":
    main()
