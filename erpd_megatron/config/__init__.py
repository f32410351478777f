"""Typed configs: schema, strict YAML loader with inheritance and overrides, validation."""

from erpd_megatron.config.loader import ConfigError, load_config, load_model_config, to_dict
from erpd_megatron.config.schema import Config, ModelConfig
from erpd_megatron.config.validate import padded_vocab_size, validate_config, validate_layout

__all__ = [
    "Config",
    "ConfigError",
    "ModelConfig",
    "load_config",
    "load_model_config",
    "padded_vocab_size",
    "to_dict",
    "validate_config",
    "validate_layout",
]
