"""`erpd rollout` end to end on the CPU: a tiny random model and a jsonl prompt file ->
sharded Parquet + manifest; resume, fleet slots, finalize and the bad-input errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from erpd_megatron.config import load_config
from erpd_megatron.data.rollouts import SCHEMA, RolloutDataError, RolloutSet, inspect_rollouts
from erpd_megatron.rollout.engines import CheckpointError
from erpd_megatron.rollout.generate import fleet_slot, main, run_rollouts

from .conftest import GSM_ROWS, make_tiny_model, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
P, G = 6, 4


def overrides(model: Path, prompts: Path, out: Path, **extra: object) -> list[str]:
    base = {
        "rollout.model_path": str(model),
        "rollout.dataset": str(prompts),
        "rollout.output_dir": str(out),
        "rollout.num_prompts": P,
        "rollout.samples_per_prompt": G,
        "rollout.prompts_per_shard": 2,
        "rollout.max_new_tokens": 16,
        "rollout.max_prompt_tokens": 64,
        "rollout.batch_size": 8,
        "rollout.verifier_workers": 1,
        "rollout.seed": 7,
        "logging.progress_bar": False,
        "rollout.prompt_template": "'{question} Answer in \\boxed{}.'",  # YAML single quotes
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def shard_stats(directory: Path) -> dict[str, tuple[int, int]]:
    return {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted(directory.glob("shard-*.parquet"))
    }


def test_end_to_end_then_resume_regenerates_only_the_deleted_shard(tiny_model, gsm_file, tmp_path):
    out = tmp_path / "rollouts"
    assert main(overrides(tiny_model, gsm_file, out)) == 0
    rs = RolloutSet.open(out)
    assert rs.num_samples == P * G and rs.num_prompts == P and rs.samples_per_prompt == G
    assert len(rs.shard_paths) == 3
    assert pq.read_schema(rs.shard_paths[0]).remove_metadata().equals(SCHEMA)
    cols = rs.load()
    assert sorted(cols["sample_id"].tolist()) == list(range(P * G))
    assert (cols["sample_id"] == cols["group_index"] * G + cols["sample_index"]).all()
    assert set(np.unique(cols["reward"]).tolist()) <= {0.0, 1.0}
    assert set(cols["finish_reason"].tolist()) <= {"stop", "length"}
    for ids, lps, reason in zip(
        cols["response_token_ids"], cols["engine_logprobs"], cols["finish_reason"]
    ):
        assert len(ids) == len(lps) and np.isfinite(lps).all() and (lps <= 0).all()
        assert len(ids) <= 16 and (reason == "stop") == (len(ids) and ids[-1] == 2)
    for text, ref in zip(cols["prompt_text"], cols["reference"]):
        row = next(r for r in GSM_ROWS if text.startswith(r["question"]))
        assert ref == row["answer"].split("#### ")[1] and text.endswith("Answer in \\boxed{}.")
    m = rs.manifest
    assert m["engine"] == "hf" and m["engine_logprobs_mode"] == "processed"
    assert m["model_path"] == str(tiny_model) and len(m["model_fingerprint"]) == 64
    assert m["tokenizer_vocab_size"] == 90 and m["sampling"] == {
        "temperature": 1.0,
        "top_p": 1.0,
        "max_new_tokens": 16,
        "n": G,
    }
    assert (
        m["prompts"]["selected"] == P and m["prompts"]["filtered_too_long"] == 0 and m["seed"] == 7
    )
    assert m["reward_mean"] == pytest.approx(float(cols["reward"].mean()))
    assert m["shard_stats"]["generated_tokens"] == sum(len(x) for x in cols["response_token_ids"])
    text = inspect_rollouts(out)
    assert "pass@k" in text and "k=4" in text and f"samples {P * G}" in text

    # resume: delete one shard -> only it is regenerated, bit-identical (seeded per shard)
    before = shard_stats(out)
    original = rs.shard_paths[1].read_bytes()
    rs.shard_paths[1].unlink()
    with pytest.raises(
        RolloutDataError, match="shard-00001.parquet: listed in the manifest but missing"
    ):
        RolloutSet.open(out)
    assert main(overrides(tiny_model, gsm_file, out)) == 0
    after = shard_stats(out)
    assert after["shard-00000.parquet"] == before["shard-00000.parquet"]
    assert after["shard-00002.parquet"] == before["shard-00002.parquet"]
    assert after["shard-00001.parquet"] != before["shard-00001.parquet"]
    assert rs.shard_paths[1].read_bytes() == original
    assert RolloutSet.open(out).fingerprint == rs.fingerprint
    # a stale manifest (a shard deleted) is removed by a rerun of a slot that has nothing to do
    rs.shard_paths[1].unlink()  # owned by slot 1 of 2
    assert (
        main(overrides(tiny_model, gsm_file, out) + ["--shard-index", "0", "--num-shards", "2"])
        == 0
    )
    assert not (out / "manifest.json").exists()
    assert main(overrides(tiny_model, gsm_file, out)) == 0
    assert RolloutSet.open(out).fingerprint == rs.fingerprint
    after = shard_stats(out)
    # a complete set: nothing to do
    assert main(overrides(tiny_model, gsm_file, out)) == 0
    assert shard_stats(out) == after
    # another configuration into the same directory is refused, naming what differs
    with pytest.raises(RolloutDataError, match="another plan \\(differs in: .*sampling"):
        run_rollouts(
            load_config(None, overrides(tiny_model, gsm_file, out, **{"rollout.max_new_tokens": 8}))
        )


def test_fleet_slots_and_finalize(tiny_model, gsm_file, tmp_path):
    out = tmp_path / "fleet"
    args = overrides(
        tiny_model, gsm_file, out, **{"rollout.reward_fn": "tests.rollout.rewards:has_digit"}
    )
    assert main(args + ["--shard-index", "1", "--num-shards", "2"]) == 0
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00001.parquet"]
    assert not (out / "manifest.json").exists()
    assert main(args + ["--finalize"]) == 1  # shards of slot 0 missing: a clear error, exit code 1
    env = {
        "SLURM_ARRAY_TASK_ID": "1",
        "SLURM_ARRAY_TASK_MIN": "1",
        "SLURM_ARRAY_TASK_MAX": "1",
        "SLURM_ARRAY_TASK_COUNT": "1",
        "ERPD_FLEET_SIZE": "2",
    }
    assert fleet_slot(env=env) == (1, 2)  # a rerun of slot 1 alone stays slot 1 of 2
    cfg = load_config(None, args)
    assert run_rollouts(cfg, slot=0, num_slots=2) is not None  # the last slot writes the manifest
    rs = RolloutSet.open(out)
    assert rs.num_samples == P * G
    rewards = rs.load(["reward"])["reward"]
    assert set(rewards.tolist()) == {0.0, 1.0}  # the pluggable reward was used
    (out / "manifest.json").unlink()
    assert main(args + ["--finalize"]) == 0
    assert RolloutSet.open(out).fingerprint == rs.fingerprint


def test_fleet_slot_from_slurm_environment():
    assert fleet_slot(env={}) == (0, 1)
    assert fleet_slot(2, 4, env={"SLURM_PROCID": "1", "SLURM_NTASKS": "3"}) == (2, 4)
    assert fleet_slot(env={"SLURM_PROCID": "1", "SLURM_NTASKS": "3"}) == (1, 3)
    env = {
        "SLURM_ARRAY_TASK_ID": "2",
        "SLURM_ARRAY_TASK_MIN": "0",
        "SLURM_ARRAY_TASK_MAX": "3",
        "SLURM_ARRAY_TASK_COUNT": "4",
        "SLURM_PROCID": "1",
        "SLURM_NTASKS": "2",
    }
    assert fleet_slot(env=env) == (5, 8)
    # `--array=1,3` reruns slots 1 and 3 of a 4-slot fleet: the slot is the task id and the
    # fleet size the array's maximum + 1, not SLURM_ARRAY_TASK_COUNT (task 3 was "slot 2 of 2")
    rerun = {
        "SLURM_ARRAY_TASK_MIN": "1",
        "SLURM_ARRAY_TASK_MAX": "3",
        "SLURM_ARRAY_TASK_COUNT": "2",
        "SLURM_ARRAY_TASK_STEP": "2",
    }
    assert [fleet_slot(env={**rerun, "SLURM_ARRAY_TASK_ID": t}) for t in ("1", "3")] == [
        (1, 4),
        (3, 4),
    ]
    # an explicit fleet size wins over the array's maximum; a task outside it is an error
    assert fleet_slot(env={**rerun, "SLURM_ARRAY_TASK_ID": "3", "ERPD_FLEET_SIZE": "8"}) == (3, 8)
    with pytest.raises(ValueError, match="outside the fleet of 2 slots .*ERPD_FLEET_SIZE=2"):
        fleet_slot(env={**rerun, "SLURM_ARRAY_TASK_ID": "3", "ERPD_FLEET_SIZE": "2"})
    with pytest.raises(ValueError, match="go together"):
        fleet_slot(1, None)
    with pytest.raises(ValueError, match="must be in"):
        fleet_slot(2, 2)


def test_bad_inputs_are_clear_errors(tiny_model, gsm_file, tmp_path, capsys):
    def run(model=tiny_model, prompts=gsm_file, **extra):
        return run_rollouts(load_config(None, overrides(model, prompts, tmp_path / "o", **extra)))

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "final": "1"}])
    with pytest.raises(
        ValueError, match="cannot detect the prompt format from columns \\['question', 'final'\\]"
    ):
        run(prompts=bad)
    with pytest.raises(ValueError, match="question column 'problem' \\(format math\\) not found"):
        run(**{"rollout.prompt_format": "math"})
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty.jsonl"):
        run(prompts=tmp_path / "empty.jsonl")
    with pytest.raises(
        ValueError, match="all 10 prompts were filtered out \\(longer than max_prompt_tokens=4"
    ):
        run(**{"rollout.max_prompt_tokens": 4, "rollout.num_prompts": 6})
    no_tok = make_tiny_model(tmp_path / "no_tok", with_tokenizer=False)
    with pytest.raises(CheckpointError, match="no_tok: no tokenizer files"):
        run(model=no_tok)
    with pytest.raises(CheckpointError, match="no such directory"):
        run(model=tmp_path / "missing_model")
    os.makedirs(tmp_path / "not_hf")
    with pytest.raises(CheckpointError, match="no config.json"):
        run(model=tmp_path / "not_hf")
    with pytest.raises(ValueError, match="reward_fn 'nope:f'"):
        run(**{"rollout.reward_fn": "nope:f"})
    with pytest.raises(ValueError, match="rollout.top_p must be in"):
        run(**{"rollout.top_p": 0})
    # the command line prints one clear line and exits 1
    assert main(overrides(no_tok, gsm_file, tmp_path / "o")) == 1
    assert "no tokenizer files" in capsys.readouterr().err


def test_partially_filtered_prompts_are_counted(tiny_model, tmp_path):
    rows = GSM_ROWS[:3] + [{"question": "long " * 30, "answer": "#### 1"}]
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "o"
    run_rollouts(
        load_config(
            None,
            overrides(
                tiny_model,
                prompts,
                out,
                **{
                    "rollout.num_prompts": 10,
                    "rollout.samples_per_prompt": 2,
                    "rollout.max_new_tokens": 4,
                },
            ),
        )
    )
    m = RolloutSet.open(out).manifest
    assert (
        m["num_prompts"] == 3 and m["prompts"]["filtered_too_long"] == 1 and m["num_samples"] == 6
    )


def test_tools_script_is_a_thin_wrapper():
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools/generate_rollouts.py"), "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 0 and "--shard-index" in r.stdout and "--finalize" in r.stdout
