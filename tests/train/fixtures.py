"""A tiny, runnable ERPD round for trainer tests: a random rollout set and a random pi_r.

``make_tiny_round(tmp_path)`` returns ``(config_path, overrides)`` such that
``python -m erpd_megatron.stage1 --config config_path *overrides`` trains for real on CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs/recipes/tiny-cpu.yaml"


def write_random_rollouts(
    out: Path,
    *,
    prompts: int = 8,
    group: int = 4,
    vocab: int = 256,
    seed: int = 0,
    prompt_len: tuple[int, int] = (3, 6),
    response_len: tuple[int, int] = (2, 9),
) -> Path:
    """The trainer tests' random rollout set (erpd_megatron.data.synthetic): by default prompts
    of 3-6 and responses of 2-9 random tokens; reward 1 for an even first response token."""
    from erpd_megatron.data.synthetic import write_synthetic_rollouts

    write_synthetic_rollouts(
        out,
        prompts=prompts,
        group=group,
        vocab=vocab,
        prompt_len=prompt_len,
        response_len=response_len,
        seed=seed,
    )
    return out


def env() -> dict[str, str]:
    """Environment for child processes: quiet warnings, the repo on the path."""
    e = dict(os.environ)
    e["PYTHONWARNINGS"] = "ignore"
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def make_base_checkpoint(out: Path, overrides: list[str] | None = None) -> Path:
    """A random-init pi_r Megatron checkpoint of the tiny recipe's model."""
    cmd = [
        sys.executable,
        "-m",
        "erpd_megatron.pipeline.init_checkpoint",
        "--config",
        str(RECIPE),
        "--out",
        str(out),
        *(overrides or []),
    ]
    subprocess.run(cmd, check=True, env=env(), cwd=ROOT, capture_output=True, timeout=300)
    return out


VOCAB = 250
"""The trainer tests' vocabulary: padded to 256 rows, so with TP=2 the last shard holds 6
dead rows (ids 250-255) that every vocab-parallel op must ignore."""
SEED = 0
"""Seed of the random rollouts (the model's init seed is the recipe's ``seed``)."""


def make_tiny_round(tmp_path: Path) -> tuple[Path, list[str]]:
    """(recipe, overrides) for a runnable Stage 1 on the tiny model (cached per directory),
    with the padded vocabulary :data:`VOCAB` and fixed seeds (printed)."""
    tmp_path = Path(tmp_path)
    print(f"tiny round: rollout seed {SEED}, vocab {VOCAB} (padded to 256)")
    rollouts = tmp_path / "rollouts"
    if not (rollouts / "manifest.json").exists():
        write_random_rollouts(rollouts, vocab=VOCAB, seed=SEED)
    base = tmp_path / "base"
    if not base.exists():
        make_base_checkpoint(base, [f"model.vocab_size={VOCAB}"])
    overrides = [
        f"data.rollout_dir={rollouts}",
        f"checkpoint.load={base}",
        f"output_dir={tmp_path / 'run'}",
        f"model.vocab_size={VOCAB}",
        "data.global_batch_size=16",
        "data.max_tokens_per_microbatch=64",
        "stage1.epochs=2",
        "logging.progress_bar=false",
    ]
    return RECIPE, overrides


def assert_same_weights(a: Path, b: Path, *, rtol: float, atol: float) -> int:
    """The model tensors of two Megatron checkpoints agree (the real vocabulary rows of
    vocab-sized tensors: padding rows may differ by layout); returns how many compared."""
    import torch

    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    keys = sorted(k for k in ta if not k.startswith("optimizer"))
    assert keys == sorted(k for k in tb if not k.startswith("optimizer")), (a, b)
    for k in keys:
        x, y = ta[k], tb[k]
        if ("word_embeddings" in k or "output_layer" in k) and x.shape[0] > VOCAB:  # padded rows
            x, y = x[:VOCAB], y[:VOCAB]
        assert x.shape == y.shape, k
        assert torch.allclose(x.double(), y.double(), rtol=rtol, atol=atol), (
            k,
            float((x.double() - y.double()).abs().max()),
        )
    return len(keys)


def assert_same_run(
    ref: Path,
    got: Path,
    stage: str,
    keys: list[str],
    steps: int,
    *,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    weights_tol: float = 1e-4,
) -> list[dict]:
    """Two runs of ``stage`` (output dirs ``ref`` and ``got``) agree: ``steps`` optimizer
    steps each, every step's ``keys`` to ``rtol``/``atol``, and the final checkpoints'
    weights to ``weights_tol``. Returns ``got``'s step records (for further checks)."""
    import pytest

    def records(out: Path) -> list[dict]:
        path = out / f"{stage}/{stage}_metrics.jsonl"
        return [r for r in read_jsonl(path) if f"{stage}/loss" in r]

    want, have = records(ref), records(got)
    assert len(have) == len(want) == steps, (len(have), len(want), steps)
    for step, (g, r) in enumerate(zip(have, want), 1):
        for k in keys:
            assert g[k] == pytest.approx(r[k], rel=rtol, abs=atol), (stage, step, k, g[k], r[k])
    final = f"{stage}/checkpoints/final"
    assert assert_same_weights(ref / final, got / final, rtol=weights_tol, atol=weights_tol) > 0
    return have


def run_module(
    module: str,
    config: Path,
    overrides: list[str],
    *,
    nproc: int = 1,
    timeout: int = 600,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run ``python -m module --config config overrides`` on ``nproc`` processes (torchrun)."""
    from erpd_megatron.pipeline.runner import python_command

    cmd = python_command(nproc) + ["-m", module, "--config", str(config), *overrides]
    p = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-8000:]}"
        )
    return p


def read_jsonl(path: Path) -> list[dict]:
    """Records of a metrics JSONL file."""
    import json

    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _load_tensors(ckpt: str) -> dict:
    import os as _os
    import tempfile

    import torch.distributed as dist

    store = _os.path.join(tempfile.mkdtemp(prefix="erpd-load-"), "store")  # no port to race for
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        from megatron.core import dist_checkpointing

        sd = dist_checkpointing.load_plain_tensors(ckpt)
        return {k: v.clone() for k, v in sd.items() if hasattr(v, "shape")}
    finally:
        dist.destroy_process_group()


def checkpoint_tensors(ckpt: Path) -> dict:
    """The full (unsharded) tensors of a Megatron checkpoint, read in a child process."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_load_tensors, (str(ckpt),))


def run_and_sigterm(
    module: str,
    config: Path,
    overrides: list[str],
    metrics: Path,
    *,
    after_records: int = 3,
    timeout: int = 300,
) -> int:
    """Start ``module``, send SIGTERM once ``metrics`` holds ``after_records`` records, wait;
    returns the exit code (17 when the trainer checkpointed on the signal)."""
    import signal
    import time

    cmd = [sys.executable, "-m", module, "--config", str(config), *overrides]
    proc = subprocess.Popen(
        cmd, env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= after_records:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 17, (
        f"expected the signal exit code 17, got {proc.returncode}\n{out[-3000:]}"
    )
    return proc.returncode
