"""Stage 1 on megatron-core, for real on CPU: layouts, resume, losses, bad input."""

from __future__ import annotations

import re

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

KEYS = [
    "stage1/loss",
    "stage1/entropy",
    "stage1/grad_norm",
    "stage1/kl_k3",
    "stage1/clip_frac",
    "stage1/drift_pos",
    "stage1/drift_neg",
    "stage1/tokens",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_round(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def single_run(tiny, tmp_path_factory):
    cfg, ov = tiny
    out = tmp_path_factory.mktemp("single")
    run_module("erpd_megatron.stage1", cfg, ov + [f"output_dir={out}"])
    return out


def test_single_process_trains_and_writes_teacher(single_run):
    st = single_run / "stage1"
    recs = [r for r in read_jsonl(st / "stage1_metrics.jsonl") if "stage1/loss" in r]
    assert len(recs) == 4  # 32 samples / 16 per step x 2 epochs
    assert all(r["stage1/update_applied"] == 1 for r in recs)
    # step 1 is at pi_r: no drift, no KL, ratio 1
    assert recs[0]["stage1/kl_k3"] == 0 and recs[0]["stage1/ratio_mean"] == 1.0
    assert recs[-1]["stage1/kl_k3"] > 0
    assert (st / "checkpoints/final/model_config.yaml").exists()
    man = (st / "checkpoints/manifest.json").read_text()
    assert '"status": "complete"' in man
    epochs = [r for r in read_jsonl(st / "stage1_metrics.jsonl") if "stage1/epoch/loss" in r]
    assert len(epochs) == 2


@pytest.mark.parametrize(
    "layout",
    [
        "parallel.tensor_model_parallel_size=2",
        "parallel.pipeline_model_parallel_size=2",
        "parallel.use_distributed_optimizer=true",
    ],
    ids=["tp2", "pp2", "dp2"],
)
def test_two_process_layouts_match_single_process_after_four_steps(
    tiny, single_run, tmp_path, layout
):
    """Every step's metrics (4 optimizer steps) and the final weights equal the single-process
    run's; with TP=2 the last vocab shard holds padding rows (vocab 250 of 256)."""
    cfg, ov = tiny
    run_module("erpd_megatron.stage1", cfg, ov + [f"output_dir={tmp_path}", layout], nproc=2)
    got = assert_same_run(single_run, tmp_path, "stage1", KEYS, 4)
    assert got[-1]["stage1/kl_k3"] > 0  # the weights moved


def test_stale_anchor_scores_are_recomputed(tiny, single_run, tmp_path):
    """Scores cached by a run from other weights are not reused: here the anchors of
    ``single_run`` (pi_r) sit in the output dir of a run that starts from its final weights."""
    import shutil

    cfg, ov = tiny
    shutil.copytree(single_run / "stage1/anchors", tmp_path / "stage1/anchors")
    start = single_run / "stage1/checkpoints/final"
    p = run_module(
        "erpd_megatron.stage1",
        cfg,
        ov + [f"output_dir={tmp_path}", f"checkpoint.load={start}", "stage1.epochs=1"],
    )
    rec = read_jsonl(tmp_path / "stage1/stage1_metrics.jsonl")[0]
    # step 1 is at the run's own starting weights: ratio 1 and no drift, as the anchor is theirs
    assert rec["stage1/ratio_mean"] == 1.0 and rec["stage1/kl_k3"] == 0, rec
    assert "are not reused" in p.stdout + p.stderr
    assert len(list((tmp_path / "stage1/anchors/data").iterdir())) == 1  # the stale scores are gone


def test_sigterm_then_resume_reproduces_uninterrupted_run(tiny, tmp_path):
    cfg, ov = tiny
    ov = ov + ["data.global_batch_size=4", "stage1.epochs=3", "checkpoint.save_interval=2"]
    full = tmp_path / "full"
    run_module("erpd_megatron.stage1", cfg, ov + [f"output_dir={full}"])
    part = tmp_path / "part"
    metrics = part / "stage1/stage1_metrics.jsonl"
    run_and_sigterm("erpd_megatron.stage1", cfg, ov + [f"output_dir={part}"], metrics)
    assert (part / "stage1/checkpoints/latest").exists()
    stopped_at = len(read_jsonl(metrics))
    run_module("erpd_megatron.stage1", cfg, ov + [f"output_dir={part}"])
    assert read_jsonl(metrics) == read_jsonl(full / "stage1/stage1_metrics.jsonl")
    assert stopped_at < len(read_jsonl(metrics))
    a = checkpoint_tensors(full / "stage1/checkpoints/final")
    b = checkpoint_tensors(part / "stage1/checkpoints/final")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("loss,sign", [("ce", 1), ("unlearned", -1)])
def test_loss_moves_its_metric(tiny, tmp_path, loss, sign):
    """ce raises the log-prob of reward-1 responses; unlearned (negated pg) lowers it."""
    cfg, ov = tiny
    run_module(
        "erpd_megatron.stage1",
        cfg,
        ov
        + [f"output_dir={tmp_path}", f"stage1.loss={loss}", "stage1.epochs=3", "optimizer.lr=3e-3"],
    )
    recs = [
        r for r in read_jsonl(tmp_path / "stage1/stage1_metrics.jsonl") if "stage1/drift_pos" in r
    ]
    # the no-op baseline: at pi_r (step 1, before any update) the drift is exactly 0
    assert recs[0]["stage1/drift_pos"] == 0.0
    assert sign * recs[-1]["stage1/drift_pos"] > 0.5, recs[-1]  # moved past it by a margin


def test_token_ids_outside_vocab_are_a_clear_error(tiny, tmp_path):
    from erpd_megatron.config import load_config
    from erpd_megatron.data.rollouts import RolloutDataError
    from erpd_megatron.data.table import load_sample_table

    cfg, ov = tiny
    bad = write_random_rollouts(tmp_path / "bad", vocab=300)
    with pytest.raises(
        RolloutDataError,
        match=rf"sample \d+ has token id \d+ outside the model vocabulary \[0, {VOCAB}\)",
    ):
        load_sample_table(load_config(cfg, ov + [f"data.rollout_dir={bad}"]))


def test_missing_checkpoint_is_a_clear_error(tiny, tmp_path, capsys):
    from erpd_megatron.train.stage1 import main

    cfg, ov = tiny
    rc = main(
        ["--config", str(cfg), *ov, f"output_dir={tmp_path}", f"checkpoint.load={tmp_path}/nope"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and re.search(
        r"config error: .*checkpoint\.load=\S*nope: no such directory", err
    ), err


def test_config_typo_is_a_clear_error(tiny, capsys):
    from erpd_megatron.train.stage1 import main

    cfg, ov = tiny
    rc = main(["--config", str(cfg), *ov, "stage1.epoks=2"])
    err = capsys.readouterr().err
    assert rc == 2 and "did you mean 'epochs'" in err, err


def test_grad_accumulation_equals_one_big_batch(tiny, single_run, tmp_path):
    cfg, ov = tiny
    run_module(
        "erpd_megatron.stage1",
        cfg,
        ov + [f"output_dir={tmp_path}", "data.max_tokens_per_microbatch=4096", "stage1.epochs=1"],
    )
    ref = read_jsonl(single_run / "stage1/stage1_metrics.jsonl")[0]
    got = read_jsonl(tmp_path / "stage1/stage1_metrics.jsonl")[0]
    for k in KEYS:
        assert got[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-6), k
