"""Activation recomputation (parallel.recompute_*) reaches megatron and changes no gradient."""

from __future__ import annotations

import pytest

from erpd_megatron.config.loader import ConfigError, load_config
from tests.dist import run_gloo
from tests.models.recompute_workers import SETTINGS, grads_by_setting
from tests.train.fixtures import RECIPE


def test_recompute_gives_identical_gradients():
    (res,) = run_gloo(grads_by_setting, 1, str(RECIPE), timeout=600)
    ref = res[0]
    for setting, grads in zip(SETTINGS[1:], res[1:]):
        for name, g in grads.items():
            assert float((g - ref[name]).abs().max()) == 0.0, (setting, name)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["parallel.recompute_granularity=full"], "recompute_method"),
        (
            ["parallel.recompute_granularity=selective", "parallel.recompute_num_layers=1"],
            "recompute_num_layers",
        ),
        (["parallel.recompute_method=uniform"], "recompute_granularity"),
        (
            [
                "parallel.recompute_granularity=full",
                "parallel.recompute_method=block",
                "parallel.recompute_num_layers=99",
            ],
            "recompute_num_layers",
        ),
    ],
)
def test_recompute_fields_are_validated(overrides, field):
    with pytest.raises(ConfigError, match=field):
        load_config(RECIPE, overrides)
