"""Checkpoint I/O: optimizer + scheduler state saved and reloaded (same layout, and TP/DP
resharded), latest pointer, clear errors."""

from __future__ import annotations

import pytest

from tests.dist import run_gloo
from tests.models.workers import optimizer_worker


@pytest.mark.slow
def test_optimizer_state_save_and_reload(tmp_path):
    res = run_gloo(optimizer_worker, 2, str(tmp_path))
    for r in res:
        for name in ("dp", "full"):
            assert r[f"{name}/extra"] == {"step": 3}
            assert r[f"{name}/params_equal"], name
            assert r[f"{name}/next_step_equal"], name  # Adam moments, step count and LR restored
            assert r[f"{name}/lr_equal"], name
        assert "dp_reshardable" in r["tp2/dp_reshardable_error"]
        assert r["tp2/params_equal"]
        # Resharded to TP=2/DP=1 the next step matches up to float reduction order.
        assert r["tp2/next_step_max_diff"] < 1e-5 * max(1.0, r["tp2/step_size"]) + 1e-6, r


def test_latest_pointer(tmp_path):
    from erpd_megatron.models.checkpoint import iter_dir, read_latest, write_latest

    assert read_latest(tmp_path) is None
    assert iter_dir(tmp_path, 42).name == "iter_0000042"
    iter_dir(tmp_path, 42).mkdir()
    write_latest(tmp_path, 42)
    assert read_latest(tmp_path) == 42
    write_latest(tmp_path, 43)  # its directory does not exist: no usable checkpoint
    assert read_latest(tmp_path) is None
    (tmp_path / "latest").write_text("garbage")
    with pytest.raises(ValueError, match="step number"):
        read_latest(tmp_path)


def test_clear_errors(tmp_path):
    from erpd_megatron.models.checkpoint import check_checkpoint_dir, read_model_config

    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_checkpoint_dir(tmp_path / "nope")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="HF checkpoint"):
        check_checkpoint_dir(tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="model_config.yaml is missing"):
        read_model_config(tmp_path / "hf")
