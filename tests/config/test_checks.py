"""Each command checks every input it needs before any compute and names all the problems in
one line (no traceback, exit 2); Stage 1 refuses data without signal for its loss."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from erpd_megatron.cli import main as erpd
from erpd_megatron.config.checks import check_stage1_signal, stage1_signal
from erpd_megatron.config.loader import ConfigError, load_config
from tests.train.fixtures import RECIPE


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def _rollouts(out: Path, rewards: list[list[float]]) -> Path:
    from erpd_megatron.data.rollouts import RolloutRecord, write_rollout_set

    recs = [
        RolloutRecord(
            sample_id=g * len(rs) + s,
            prompt_id=g,
            group_index=g,
            sample_index=s,
            prompt_token_ids=[1, 2, 3],
            response_token_ids=[4, 5],
            reward=r,
            finish_reason="stop",
            engine_logprobs=[-1.0, -1.0],
        )
        for g, rs in enumerate(rewards)
        for s, r in enumerate(rs)
    ]
    write_rollout_set(out, recs)
    return out


def test_cache_tool_names_every_missing_input(capsys, tmp_path):
    # today: TypeError ... not NoneType, and a model 'base' with checkpoint None
    code = erpd(
        [
            "cache",
            "--config",
            str(RECIPE),
            f"cache.dir={tmp_path / 'c'}",
            f"cache.models=[{{name: teacher0, checkpoint: {tmp_path / 'nope'}}}]",
        ]
    )
    err = _one_line(capsys)
    assert code == 2, err
    for needle in (
        "data.rollout_dir is not set",
        "checkpoint.load (pi_r, cached as 'base') is not set",
        f"cache.models.0.checkpoint (teacher0)={tmp_path / 'nope'}: no such directory",
    ):
        assert needle in err, (needle, err)
    assert not (tmp_path / "c").exists()


def test_cache_help_is_a_whole_sentence(capsys):
    with pytest.raises(SystemExit):
        erpd(["cache", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "on the fixed rollout data and write the teacher cache." in out, out


def test_stages_name_every_missing_input_and_stage1_refuses_no_signal(capsys, tmp_path):
    assert erpd(["stage2", "--config", str(RECIPE), f"output_dir={tmp_path}"]) == 2
    err = _one_line(capsys)
    for needle in (
        "checkpoint.load is not set",
        "data.rollout_dir is not set",
        "stage2.cache_dir is not set",
    ):
        assert needle in err, (needle, err)
    # Stage 1 on a rollout set whose groups are all-0 or all-1: every pg advantage is 0
    ckpt = tmp_path / "pi_r"
    ckpt.mkdir()
    (ckpt / "model_config.yaml").write_text("{}\n")  # the load itself would come after the check
    flat = _rollouts(tmp_path / "flat", [[0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    ov = [f"output_dir={tmp_path}", f"checkpoint.load={ckpt}", f"data.rollout_dir={flat}"]
    assert erpd(["stage1", "--config", str(RECIPE), *ov]) == 2
    err = _one_line(capsys)
    assert "0.0% of 3 groups have signal for stage1.loss=pg" in err and "--force" in err, err
    assert not (tmp_path / "stage1").exists()


def test_signal_depends_on_the_loss(tmp_path):
    groups = np.repeat(np.arange(4), 2)
    rewards = np.array([0, 0, 1, 1, 1, 0, 0, 0], np.float32)  # all-0, all-1, mixed, all-0
    adv = rewards - np.repeat(rewards.reshape(4, 2).mean(1), 2)
    cfg = load_config(RECIPE, validate=False)
    assert stage1_signal(cfg, rewards, adv, groups)[0] == 0.25  # pg: only the mixed group
    cfg = load_config(RECIPE, ["stage1.loss=ce"])
    assert (
        stage1_signal(cfg, rewards, adv, groups)[0] == 0.5
    )  # ce: every group with a reward-1 sample
    cfg = load_config(RECIPE, ["stage1.loss=unlearned", "stage1.unlearned_base=mse"])
    assert stage1_signal(cfg, rewards, adv, groups)[0] == 0.25

    class Table:
        def __init__(self, r):
            self.rewards, self.group_ids = np.asarray(r, np.float32), groups
            self.advantages = self.rewards - np.repeat(self.rewards.reshape(4, 2).mean(1), 2)

    ones = Table([1] * 8)
    with pytest.raises(ConfigError, match="0.0% of 4 groups"):
        check_stage1_signal(load_config(RECIPE), ones)
    assert check_stage1_signal(load_config(RECIPE, ["stage1.force=true"]), ones) == 0.0
    assert (
        check_stage1_signal(load_config(RECIPE, ["stage1.loss=ce"]), ones) == 1.0
    )  # all-1: ce has signal
    with pytest.raises(ConfigError):
        check_stage1_signal(load_config(RECIPE, ["stage1.loss=ce"]), Table([0] * 8))


def test_eval_max_new_tokens_above_the_model_positions(tmp_path):
    from erpd_megatron.eval.evaluate import check_eval_config, parse_args

    hf = tmp_path / "m"
    hf.mkdir()
    (hf / "config.json").write_text('{"max_position_embeddings": 64}')
    ov = [
        f"eval.models=[{{name: base, path: {hf}}}]",
        "eval.datasets=[x.jsonl]",
        "eval.max_new_tokens=100",
    ]
    with pytest.raises(
        ConfigError, match=r"eval.max_new_tokens=100 is more than the 64 positions of base"
    ):
        check_eval_config(load_config(RECIPE, ov))
    check_eval_config(load_config(RECIPE, ov[:2] + ["eval.max_new_tokens=64"]))
    # the output path is explicit: --out sets eval.output_dir
    args = parse_args(["--config", str(RECIPE), "--out", str(tmp_path / "ev")])
    assert load_config(args.config, args.overrides).eval.output_dir == str(tmp_path / "ev")
