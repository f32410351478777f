"""Config schema, loader and validation: every shipped YAML, and the error messages."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest

from erpd_megatron.config import ConfigError, load_config, load_model_config, padded_vocab_size
from erpd_megatron.config.dryrun import estimate
from erpd_megatron.config.dryrun import main as dryrun_main
from erpd_megatron.config.loader import field_docs
from erpd_megatron.config.schema import Config
from erpd_megatron.config.validate import validate_config

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(glob.glob(str(ROOT / "configs/recipes/*.yaml")))
MODELS = sorted(glob.glob(str(ROOT / "configs/models/*.yaml")))


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_every_recipe_loads_and_validates_for_its_cluster(path):
    cfg = load_config(path)
    validate_config(cfg, world_size=cfg.parallel.num_nodes * cfg.parallel.gpus_per_node)
    assert cfg.name == Path(path).stem


@pytest.mark.parametrize("path", MODELS, ids=os.path.basename)
def test_every_model_yaml_is_architecture_only(path):
    m = load_model_config(path)
    assert m.num_attention_heads % m.num_query_groups == 0
    # architecture only: nothing but ModelConfig keys (load_model_config is strict)
    assert m.vocab_size > 0


def test_each_family_has_a_tiny_size():
    stems = {Path(p).stem for p in MODELS}
    for fam in ("llama3", "qwen2.5", "qwen3"):
        assert f"{fam}-tiny" in stems


def test_every_field_has_a_docstring():
    import dataclasses

    def walk(cls):
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name, "").strip(), f"{cls.__name__}.{f.name} has no docstring"
            tp = f.type if not isinstance(f.type, str) else None
            del tp
        for f in dataclasses.fields(cls):
            default = (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            )
            if dataclasses.is_dataclass(default):
                walk(type(default))
            if isinstance(default, list) and default and dataclasses.is_dataclass(default[0]):
                walk(type(default[0]))

    walk(Config)


def test_overrides_are_typed():
    cfg = load_config(
        None,
        [
            "model.num_layers=6",
            "optimizer.lr=3e-4",
            "stage1.eps_high=null",
            "data.advantage_std_normalize=true",
            "stage1.save_epochs=[1,2]",
            "stage2.teachers.0.alpha=1.5",
            "name=x",
        ],
    )
    assert cfg.model.num_layers == 6 and isinstance(cfg.model.num_layers, int)
    assert cfg.optimizer.lr == 3e-4
    assert cfg.stage1.eps_high is None
    assert cfg.data.advantage_std_normalize is True
    assert cfg.stage1.save_epochs == [1, 2]
    assert cfg.stage2.teachers[0].alpha == 1.5


def test_inheritance_and_own_keys_win(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "optimizer: {lr: 1.0e-3, clip_grad: 0.5}\nstage1: {epochs: 3}\n"
    )
    (tmp_path / "child.yaml").write_text(
        "defaults: [base, {model: llama3-tiny}]\noptimizer: {lr: 2.0e-3}\n"
    )
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.optimizer.lr == 2e-3 and cfg.optimizer.clip_grad == 0.5 and cfg.stage1.epochs == 3
    assert cfg.model.family == "llama" and cfg.model.num_layers == 4


def test_unknown_key_in_file_names_file_and_closest_key(tmp_path):
    p = tmp_path / "typo.yaml"
    p.write_text("optimizer: {learning_rate: 1.0e-3}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "optimizer.learning_rate" in str(e.value)


def test_unknown_key_in_inherited_file_names_that_file(tmp_path):
    (tmp_path / "base.yaml").write_text("stage1: {epoks: 3}\n")
    (tmp_path / "child.yaml").write_text("defaults: [base]\n")
    with pytest.raises(ConfigError, match=r"base\.yaml.*stage1\.epoks.*did you mean 'epochs'"):
        load_config(tmp_path / "child.yaml")


def test_unknown_override_names_override_and_closest_key():
    with pytest.raises(
        ConfigError, match=r"override 'stage2\.kl_budjet=1'.*did you mean 'kl_budget'"
    ):
        load_config(None, ["stage2.kl_budjet=1"])


def test_bad_literal_and_type_errors():
    with pytest.raises(ConfigError, match=r"stage1.loss = 'sappo'.*did you mean 'sapo'"):
        load_config(None, ["stage1.loss=sappo"])
    with pytest.raises(ConfigError, match="model.num_layers must be an integer"):
        load_config(None, ["model.num_layers=two"])
    with pytest.raises(ConfigError, match="a.b=value"):
        load_config(None, ["model.num_layers"])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["parallel.tensor_model_parallel_size=3", "model.num_attention_heads=4"],
            "must divide model.num_attention_heads=4",
        ),
        (
            ["parallel.tensor_model_parallel_size=4", "model.num_query_groups=2"],
            "must divide model.num_query_groups=2",
        ),
        (
            ["parallel.pipeline_model_parallel_size=3", "model.num_layers=4"],
            "must divide model.num_layers=4",
        ),
        (["model.make_vocab_size_divisible_by=0"], "make_vocab_size_divisible_by must be >= 1"),
        (["model.num_query_groups=3"], "num_query_groups=3 must divide"),
        (
            ["precision.fp8=hybrid", "precision.transformer_impl=local"],
            "needs precision.transformer_impl",
        ),
    ],
)
def test_impossible_layouts_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(None, overrides)


def test_fp8_without_transformer_engine_is_an_error(monkeypatch):
    import erpd_megatron.config.validate as v

    monkeypatch.setattr(v, "transformer_engine_available", lambda: False)
    cfg = load_config(None, ["precision.fp8=hybrid"])
    with pytest.raises(ConfigError, match="needs Transformer Engine"):
        validate_config(cfg, check_runtime=True)


def test_padded_vocab():
    m = load_model_config(ROOT / "configs/models/qwen3-4b.yaml")
    assert padded_vocab_size(m, 1) == 151936 and padded_vocab_size(m, 8) == 152576
    assert padded_vocab_size(m, 8) % 8 == 0


def test_world_not_divisible_by_layout():
    cfg = load_config(ROOT / "configs/recipes/qwen3-32b-4node.yaml")
    with pytest.raises(ConfigError, match="not divisible by TP\\*PP"):
        validate_config(cfg, world_size=12)


def test_dryrun_estimates_and_flags(capsys):
    cfg = load_config(ROOT / "configs/recipes/llama3-70b-8node.yaml")
    est = estimate(cfg)
    assert 69e9 < est.params_total < 72e9  # Llama-3.1-70B has 70.6 B parameters
    assert est.dp == 2
    code = dryrun_main(
        [
            "--config",
            str(ROOT / "configs/recipes/llama3-70b-8node.yaml"),
            "parallel.tensor_model_parallel_size=1",
            "parallel.pipeline_model_parallel_size=1",
        ]
    )
    out = capsys.readouterr().out
    assert code == 3 and "DOES NOT FIT" in out


def test_dryrun_8b_param_count():
    cfg = load_config(ROOT / "configs/recipes/llama3-8b-2node.yaml")
    assert 7.9e9 < estimate(cfg).params_total < 8.1e9  # Llama-3.1-8B: 8.03 B
