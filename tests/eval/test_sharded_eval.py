"""Sharded evaluation (``eval.scoring_backend=megatron``) on two gloo processes: the table at
TP=2 equals the table at TP=1 (DP=2: the ranks split the samples, padded with dummies) to
1e-5, and both equal the single-process transformers backend (the converted checkpoints hold
the same weights). Generation runs once per evaluation on rank 0 with the same seed, so the
accuracy columns match exactly. With ``data.packing`` both backends give the same table to
1e-6. Also: the chunked token scores equal a full fp32 log-softmax, and a missing checkpoint
is a ConfigError naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from erpd_megatron.config import ConfigError, load_config
from erpd_megatron.config.schema import EvalModelConfig
from erpd_megatron.eval.mcore_scoring import (
    check_megatron_models,
    check_model_paths,
    resolve_backend,
)
from erpd_megatron.eval.scoring import token_scores
from tests.dist import run_gloo

from .test_evaluate import eval_overrides

COLUMNS = (
    "accuracy",
    "accuracy_se",
    "pass@1",
    "pass@2",
    "kl_to_base",
    "kl_to_base_se",
    "kl_to_base_per_token",
    "entropy",
    "drift",
    "drift_pos",
    "drift_neg",
    "logprob_mismatch",
)


def _models(a: Path, b: Path, a_mc: Path | None, b_mc: Path | None) -> str:
    def one(name: str, hf: Path, mc: Path | None) -> str:
        return f"{{name: {name}, path: {hf}" + (f", checkpoint: {mc}}}" if mc else "}")

    rows = [one("base", a, a_mc), one("same", a, a_mc), one("other", b, b_mc)]
    return "[" + ", ".join(rows) + "]"


def _worker(rank: int, world: int, a: Path, b: Path, heldout: Path, tmp: Path) -> dict:
    from erpd_megatron.eval.evaluate import evaluate_models
    from erpd_megatron.models.convert import hf_to_mcore

    torch.set_num_threads(1)
    share = _share(rank, tmp / "share")
    a_mc = hf_to_mcore(a, tmp / "a_mc", tp=2)  # both ranks: each writes its TP shard
    b_mc = hf_to_mcore(b, tmp / "b_mc", tp=2)
    out: dict[str, list] = {}
    runs = (("tp2", 2, "megatron", False), ("tp1", 1, "auto", False))
    runs += (("tp2_packed", 2, "megatron", True),)  # data.packing: one packed row per forward
    for key, tp, backend, packing in runs:
        ov = _overrides(a, b, a_mc, b_mc, heldout, tmp / key, backend)
        ov += [f"parallel.tensor_model_parallel_size={tp}", f"parallel.gpus_per_node={world}"]
        ov += [f"data.packing={str(packing).lower()}"]
        out[key] = evaluate_models(load_config(None, ov))
    try:  # the transformers backend is one process: refused in a world of 2
        evaluate_models(load_config(None, _overrides(a, b, None, None, heldout, tmp / "x", "hf")))
    except ConfigError as e:
        out["hf_error"] = str(e)
    return {**out, "share": share}


def _overrides(
    a: Path, b: Path, a_mc: Path | None, b_mc: Path | None, heldout: Path, out: Path, backend: str
) -> list[str]:
    return eval_overrides(
        {},
        [heldout],
        out,
        **{
            "eval.models": _models(a, b, a_mc, b_mc),
            "eval.scoring_backend": backend,
            "eval.num_prompts": 6,
            "eval.score_max_tokens": 96,
            "eval.temperature": 0.9,
            "eval.kl_logprobs": "teacher_forced",
            "precision.transformer_impl": "local",
            "precision.params_dtype": "fp32",
        },
    )


def _share(rank: int, tmp: Path) -> tuple:
    from erpd_megatron.eval.mcore_scoring import rank0_shares

    got = rank0_shares(tmp, lambda: {"rank": rank, "data": list(range(5))})
    left = sorted(p.name for p in (tmp / "samples").iterdir())

    def fail() -> None:
        raise ValueError("no GPU for vLLM")

    try:
        rank0_shares(tmp, fail)
    except (ValueError, RuntimeError) as e:
        return got, left, f"{type(e).__name__}: {e}"
    return got, left, None


@pytest.fixture(scope="module")
def tables(tiny_pair, heldout_file, tmp_path_factory):
    from erpd_megatron.eval.evaluate import evaluate_models

    a, b = tiny_pair
    tmp = tmp_path_factory.mktemp("sharded-eval")
    r0, r1 = run_gloo(_worker, 2, a, b, heldout_file, tmp, timeout=900)
    ov = _overrides(a, b, None, None, heldout_file, tmp / "hf", "hf")
    hf = evaluate_models(load_config(None, ov))  # one process: the transformers backend
    ov = _overrides(a, b, None, None, heldout_file, tmp / "hf_packed", "hf")
    r0["hf_packed"] = evaluate_models(load_config(None, ov + ["data.packing=true"]))
    return r0, r1, hf


@pytest.mark.slow  # two gloo processes with megatron
def test_tp2_table_equals_tp1_and_hf(tables):
    r0, r1, hf = tables
    r0["hf"] = hf
    assert "eval.scoring_backend=hf runs in one process, but 2 were launched" in r0["hf_error"]
    assert [r["model"] for r in r0["tp2"]] == ["base", "same", "other"]
    for key in ("tp2", "tp1"):  # every rank builds the same rows

        def cols(rows: list[dict]) -> list[dict]:
            return [{c: r[c] for c in COLUMNS} for r in rows]

        assert cols(r0[key]) == cols(r1[key])
    other = r0["tp2"][2]
    assert other["kl_to_base"] > 0.05 and other["entropy"] > 0.1  # something to compare
    assert abs(r0["tp2"][1]["kl_to_base"]) < 1e-5  # the same weights
    for ref in ("tp1", "hf"):
        for x, y in zip(r0["tp2"], r0[ref]):
            assert (x["model"], x["dataset"]) == (y["model"], y["dataset"])
            for c in COLUMNS:
                assert (x[c] is None) == (y[c] is None), (ref, x["model"], c)
                if x[c] is not None:
                    assert x[c] == pytest.approx(y[c], abs=1e-5, rel=1e-5), (
                        ref,
                        x["model"],
                        c,
                        x[c],
                        y[c],
                    )


@pytest.mark.slow  # two gloo processes with megatron
def test_packed_scoring_gives_the_same_table(tables):
    """data.packing (packed rows, block-diagonal mask) gives the padded rows' table to 1e-6,
    with the megatron backend at TP=2 x DP=2 and with the transformers backend."""
    r0, _, hf = tables
    for padded, packed in ((r0["tp2"], r0["tp2_packed"]), (hf, r0["hf_packed"])):
        assert [r["model"] for r in packed] == ["base", "same", "other"]
        for x, y in zip(padded, packed):
            for c in COLUMNS:
                assert (x[c] is None) == (y[c] is None), (x["model"], c)
                if x[c] is not None:
                    assert y[c] == pytest.approx(x[c], abs=1e-6, rel=1e-6), (x["model"], c)


@pytest.mark.slow  # two gloo processes with megatron
def test_rank0_shares_by_file_and_reraises_its_failure(tables):
    """Rank 0's result reaches every rank through a file that is removed afterwards; an
    exception on rank 0 is raised there and reported on the waiting rank."""
    (got0, left0, err0), (got1, _, err1) = tables[0]["share"], tables[1]["share"]
    assert got0 == got1 == {"rank": 0, "data": [0, 1, 2, 3, 4]}
    assert left0 == []  # rank 0 removed the file once every rank had read it
    assert err0 == "ValueError: no GPU for vLLM"
    assert err1.startswith("RuntimeError: rank 0 failed") and "ValueError: no GPU for vLLM" in err1


def test_token_scores_chunked_equal_full_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(37, 301, dtype=torch.float64) * 4
    targets = torch.randint(0, 301, (37,))
    pos = torch.tensor([0, 3, 4, 20, 36])
    lp, ent = token_scores(logits, targets, pos, temperature=0.7, chunk_elements=2 * 301)
    ref = torch.log_softmax(logits[pos] / 0.7, dim=-1)
    assert torch.allclose(lp, ref.gather(1, targets[pos, None])[:, 0], atol=1e-12)
    assert torch.allclose(ent, -(ref.exp() * ref).sum(-1), atol=1e-12)
    lp2, none = token_scores(logits, targets, pos[:0], entropy=False)
    assert lp2.numel() == 0 and none is None


def test_backend_choice_and_missing_checkpoint(tmp_path):
    cfg = load_config(None, [])
    cfg.eval.models = [EvalModelConfig(name="base", path="x"), EvalModelConfig(name="s", path="y")]
    assert resolve_backend(cfg, world=1) == "hf" and resolve_backend(cfg, world=4) == "megatron"
    cfg.eval.models[1].checkpoint = str(tmp_path)
    assert resolve_backend(cfg, world=1) == "hf"
    cfg.eval.models[0].checkpoint = str(tmp_path / "nope")
    assert resolve_backend(cfg, world=1) == "megatron"
    missing = r"eval.models.0 \(base\).checkpoint: .*does not exist"
    with pytest.raises(ConfigError, match=missing) as e:
        check_megatron_models(cfg.eval.models)
    assert "eval.models.1 (s).checkpoint" in str(e.value)  # not a dist checkpoint either
    cfg.eval.models[1].checkpoint = None
    unset = r"eval.models.1 \(s\).checkpoint is not set.*hf-to-mcore"
    with pytest.raises(ConfigError, match=unset):
        check_megatron_models(cfg.eval.models)
    (tmp_path / "metadata.json").write_text("{}")  # a Megatron dir given as the HF path
    cfg.eval.models[1].path = str(tmp_path)
    megatron_path = r"eval.models.1 \(s\).path .* is a Megatron checkpoint.*mcore-to-hf"
    with pytest.raises(ConfigError, match=megatron_path):
        check_model_paths(cfg.eval.models)
