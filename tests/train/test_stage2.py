"""Stage 2 on megatron-core, for real on CPU: signals, layouts, KL budget, resume, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.train.fixtures import (
    VOCAB,
    assert_same_run,
    checkpoint_tensors,
    make_tiny_round,
    read_jsonl,
    run_and_sigterm,
    run_module,
    write_random_rollouts,
)

SIGNALS = {
    "topk_kl": "[{model: teacher0, signal: topk_kl}]",
    "logratio": "[{model: teacher0, signal: logratio, lam: 2.0, clip: 1.0}]",
    "contrast": (
        "[{model: teacher0, signal: contrast, contrast_model: unlearned, lam: 1.0, clip: 1.0}]"
    ),
    "gated": "[{model: teacher0, signal: gated, gate_mode: add, alpha: 1.0, clip: 2.0}]",
}


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """pi_r, a teacher (ce), an unlearned U, and the teacher cache over the tiny data."""
    root = tmp_path_factory.mktemp("s2")
    cfg, ov = make_tiny_round(root)
    for name, loss in (("teacher", "ce"), ("unlearned", "unlearned")):
        run_module(
            "erpd_megatron.stage1",
            cfg,
            ov
            + [
                f"output_dir={root / name}",
                f"stage1.loss={loss}",
                "stage1.epochs=3",
                "optimizer.lr=3e-3",
            ],
        )
    models = (
        f"[{{name: teacher0, checkpoint: {root}/teacher/stage1/checkpoints/final}}, "
        f"{{name: unlearned, checkpoint: {root}/unlearned/stage1/checkpoints/final, topk: false}}]"
    )
    cache = root / "cache"
    run_module(
        "erpd_megatron.train.cache_pass", cfg, ov + [f"cache.dir={cache}", f"cache.models={models}"]
    )
    ov = ov + [
        f"stage2.cache_dir={cache}",
        f"cache.models={models}",
        "data.global_batch_size=16",
        "stage2.epochs=2",
    ]
    return cfg, ov, root


def _epoch_losses(path):
    return [r["stage2/epoch/loss"] for r in read_jsonl(path) if "stage2/epoch/loss" in r]


def _loss_at_pi_r(cfg, ov, teachers: str) -> float:
    """The epoch loss of a no-op run (lr = 0): every token's Stage-2 loss at pi_r, from the
    cache alone, through the loss composition training uses (``stage2_loss``). At pi_r the
    ratio is 1, the surrogate is ``-adv``; the top-k KL is that from the target to pi_r's
    buckets (pi_r's tail derived from its cached log-probs at the teacher's ids)."""
    from erpd_megatron.cache.reader import TeacherCache
    from erpd_megatron.ops.signals import TeacherTerm, stage2_loss, teacher_signal
    from erpd_megatron.ops.vocab_parallel_topk import topk_target_logprobs

    c, table, _ = _table(cfg, ov + [f"stage2.teachers={teachers}"], None)
    terms = []
    with TeacherCache.open(c.stage2.cache_dir) as cache:
        recs = [cache.get(int(sid)) for sid in table.sample_ids]
        cat = lambda xs: torch.from_numpy(np.concatenate(xs).astype(np.float64))  # noqa: E731
        lp_r = cat([r.sampled["base"] for r in recs])
        adv = cat([np.full(r.num_tokens, a) for r, a in zip(recs, table.advantages)])
        for t in c.stage2.teachers:
            if t.signal == "topk_kl":
                tl = cat([r.topk_logprobs[t.model].reshape(-1) for r in recs]).reshape(
                    len(lp_r), -1
                )
                rl = cat([r.ref_topk_logprobs[t.model].reshape(-1) for r in recs]).reshape(
                    len(lp_r), -1
                )
                target = topk_target_logprobs(
                    tl, alpha=t.alpha, ref_logprobs=rl, vocab_size=c.model.vocab_size
                )
                ref = topk_target_logprobs(rl, vocab_size=c.model.vocab_size)
                p = target.exp()
                kl = torch.where(p > 0, p * (target - ref), 0.0).sum(-1)
                terms.append(TeacherTerm("topk_kl", weight=t.weight, kl=kl))
            else:
                lp_t = cat([r.sampled[t.model] for r in recs])
                lp_u = (
                    cat([r.sampled[t.contrast_model] for r in recs])
                    if t.signal == "contrast"
                    else None
                )
                raw = teacher_signal(
                    t.signal,
                    lp_t,
                    lp_r=lp_r,
                    lp_unlearned=lp_u,
                    adv=adv,
                    gate_mode=t.gate_mode,
                    gate_alpha=t.alpha,
                )
                terms.append(
                    TeacherTerm(t.signal, weight=t.weight, raw=raw, lam=t.lam, clip=t.clip)
                )
    loss, _ = stage2_loss(
        lp_r,
        lp_r,
        None,
        terms,
        normalizer=len(lp_r),
        eps=c.stage2.eps,
        c_out=c.stage2.c_out,
        kl_coef=c.stage2.kl_coef,
    )
    return float(loss)


@pytest.mark.parametrize("name", list(SIGNALS))
def test_each_signal_lowers_its_loss(cached, tmp_path, name):
    cfg, ov, _ = cached
    # Adam's step is ~lr whatever the gradient's size: KL losses, small near pi_r, need a smaller lr
    lr = "3e-4" if name.startswith("topk") else "3e-3"
    run_module(
        "erpd_megatron.stage2",
        cfg,
        ov
        + [
            f"output_dir={tmp_path}",
            f"stage2.teachers={SIGNALS[name]}",
            f"optimizer.lr={lr}",
            "stage2.epochs=3",
        ],
    )
    losses = _epoch_losses(tmp_path / "stage2/stage2_metrics.jsonl")
    rec = read_jsonl(tmp_path / "stage2/stage2_metrics.jsonl")[0]
    assert rec["stage2/kl_to_base"] == 0.0  # step 1 is at pi_r
    # against the no-op baseline (the loss of an lr=0 run, i.e. at pi_r, over the same data),
    # by a margin: a tenth of the baseline's size
    noop = _loss_at_pi_r(cfg, ov, SIGNALS[name])
    print(f"{name}: no-op {noop:.5f}, epochs {losses}")
    assert losses[-1] < noop - 0.1 * abs(noop), (noop, losses)
    assert (tmp_path / "stage2/checkpoints/final/model_config.yaml").exists()


MIXED = (
    "[{model: teacher0, signal: topk_kl, alpha: 0.5}, "
    "{model: teacher0, signal: logratio, weight: 0.5}]"
)
MIXED_KEYS = ("stage2/teacher0/topk_kl", "stage2/teacher1/signal_mean", "stage2/clip_frac")
KL_ONLY = (
    "[{model: teacher0, signal: topk_kl, alpha: 0.5}]"  # the KL writes its gradient into the logits
)


@pytest.fixture(scope="module")
def single_stage2(cached, tmp_path_factory):
    """Single-process Stage-2 runs (4 optimizer steps) by teacher list, run once each."""
    cfg, ov, _ = cached
    runs: dict[str, object] = {}

    def get(teachers: str):
        if teachers not in runs:
            out = tmp_path_factory.mktemp("s2single")
            run_module(
                "erpd_megatron.stage2",
                cfg,
                ov + [f"stage2.teachers={teachers}", f"output_dir={out}"],
            )
            runs[teachers] = out
        return runs[teachers]

    return get


@pytest.mark.parametrize(
    "layout,teachers,keys",
    [
        ("parallel.tensor_model_parallel_size=2", KL_ONLY, ("stage2/teacher0/topk_kl",)),
        ("parallel.tensor_model_parallel_size=2", MIXED, MIXED_KEYS),
        ("parallel.pipeline_model_parallel_size=2", MIXED, MIXED_KEYS),
        ("parallel.use_distributed_optimizer=true", MIXED, MIXED_KEYS),
    ],
    ids=["tp2-kl-inplace", "tp2-mixed", "pp2-mixed", "dp2-mixed"],
)
def test_two_process_layouts_match_single_process_after_four_steps(
    cached, single_stage2, tmp_path, layout, teachers, keys
):
    """Every step's metrics (4 optimizer steps, 2 epochs) and the final weights equal the
    single-process run's; vocab 250 of 256 rows, so with TP=2 the last shard has dead rows."""
    cfg, ov, _ = cached
    one = single_stage2(teachers)
    run_module(
        "erpd_megatron.stage2",
        cfg,
        ov + [f"stage2.teachers={teachers}", f"output_dir={tmp_path}", layout],
        nproc=2,
    )
    common = ["stage2/loss", "stage2/grad_norm", "stage2/entropy", "stage2/kl_to_base"]
    got = assert_same_run(one, tmp_path, "stage2", common + list(keys), 4)
    assert got[-1]["stage2/kl_to_base"] > 0  # the weights moved


def test_kl_budget_stops_and_keeps_a_checkpoint_inside(cached, tmp_path):
    cfg, ov, _ = cached
    budget = 0.1
    run_module(
        "erpd_megatron.stage2",
        cfg,
        ov
        + [
            f"output_dir={tmp_path}",
            f"stage2.teachers={SIGNALS['logratio']}",
            "optimizer.lr=1e-3",
            f"stage2.kl_budget={budget}",
            "checkpoint.save_interval=1",
            "checkpoint.keep_last=3",
            "stage2.epochs=8",
            "data.global_batch_size=8",
        ],
    )
    root = tmp_path / "stage2/checkpoints"
    man = json.loads((root / "manifest.json").read_text())
    assert man["stopped_early"] is True and man["steps"] < 32
    kl = json.loads((root / "kl_by_step.json").read_text())
    assert max(kl.values()) > budget
    chosen = man["published_from"]
    step = int(chosen.rsplit("_", 1)[1])
    assert kl[str(step)] <= budget
    a, b = checkpoint_tensors(root / "final"), checkpoint_tensors(chosen)
    assert not any(k.startswith("optimizer") for k in a)  # final is model-only
    for k in a:  # the model weights of the chosen in-budget checkpoint
        assert torch.equal(a[k], b[k]), k


def test_sigterm_then_resume_reproduces_uninterrupted_run(cached, tmp_path):
    cfg, ov, _ = cached
    ov = ov + [
        f"stage2.teachers={SIGNALS['topk_kl']}",
        "data.global_batch_size=4",
        "stage2.epochs=2",
        "checkpoint.save_interval=2",
    ]
    run_module("erpd_megatron.stage2", cfg, ov + [f"output_dir={tmp_path / 'full'}"])
    part = tmp_path / "part"
    metrics = part / "stage2/stage2_metrics.jsonl"
    run_and_sigterm("erpd_megatron.stage2", cfg, ov + [f"output_dir={part}"], metrics)
    run_module("erpd_megatron.stage2", cfg, ov + [f"output_dir={part}"])
    assert read_jsonl(metrics) == read_jsonl(tmp_path / "full/stage2/stage2_metrics.jsonl")
    a = checkpoint_tensors(tmp_path / "full/stage2/checkpoints/final")
    b = checkpoint_tensors(part / "stage2/checkpoints/final")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _table(cfg, ov, rollouts):
    from erpd_megatron.config import load_config
    from erpd_megatron.data.table import load_sample_table

    c = load_config(cfg, ov + ([f"data.rollout_dir={rollouts}"] if rollouts else []))
    return c, *load_sample_table(c)


def test_cache_of_another_rollout_set_is_refused(cached, tmp_path):
    from erpd_megatron.cache.format import CacheError
    from erpd_megatron.train.stage2 import open_cache

    cfg, ov, _ = cached
    other = write_random_rollouts(tmp_path / "other", seed=7, vocab=VOCAB)
    c, table, fp = _table(cfg, ov, other)
    with pytest.raises(CacheError, match="rollout"):
        open_cache(c, table, fp)


def test_cache_of_another_vocabulary_is_refused(cached, tmp_path):
    from erpd_megatron.cache.format import CacheError
    from erpd_megatron.cache.manifest import finalize_manifest
    from erpd_megatron.cache.writer import CacheWriter
    from erpd_megatron.train.stage2 import open_cache

    cfg, ov, root = cached
    c, table, fp = _table(cfg, ov, root / "rollouts")
    cache = tmp_path / "cache300"
    with CacheWriter(
        cache,
        rank=0,
        sample_ids=table.sample_ids.tolist(),
        vocab_size=300,
        k=4,
        sampled_models=["base", "teacher0"],
        teachers=["teacher0"],
    ) as w:
        for sid, r in zip(table.sample_ids, table.response_ids):
            t = len(r)
            w.write_sample(
                int(sid),
                sampled={"base": np.full(t, -1.0), "teacher0": np.full(t, -1.0)},
                topk={"teacher0": (np.tile(np.arange(4), (t, 1)), np.full((t, 4), -2.0))},
            )
    finalize_manifest(
        cache,
        1,
        {
            "rollout_fingerprint": fp,
            "models": {
                "base": {"path": "-", "fingerprint": "-"},
                "teacher0": {"path": "-", "fingerprint": "-"},
            },
        },
    )
    c.stage2.cache_dir = str(cache)
    with pytest.raises(CacheError, match="vocab"):
        open_cache(c, table, fp)


def test_cache_of_another_base_is_refused(cached, tmp_path):
    """The cache's pi_r must be the checkpoint Stage 2 starts from (weights fingerprint)."""
    from erpd_megatron.cache.format import CacheError
    from erpd_megatron.train.stage2 import open_cache

    cfg, ov, root = cached
    c, table, fp = _table(cfg, ov, root / "rollouts")
    open_cache(c, table, fp).close()  # the base the cache was written from passes
    other = root / "teacher/stage1/checkpoints/final"
    c.checkpoint.load = str(other)
    with pytest.raises(
        CacheError,
        match=rf"pi_r \('base'\) was scored from .*base.*checkpoint.load={other} .*"
        "Re-run the cache tool",
    ):
        open_cache(c, table, fp)
