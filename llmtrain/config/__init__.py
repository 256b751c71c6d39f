"""Typed configuration: dataclass schemas (one per component), Hydra registration, validation."""

from llmtrain.config.errors import ConfigError
from llmtrain.config.io import load_config, save_config, to_config
from llmtrain.config.schema import Config, RunConfig, register_configs
from llmtrain.config.validate import batch_geometry, validate_config

__all__ = [
    "Config",
    "ConfigError",
    "RunConfig",
    "batch_geometry",
    "load_config",
    "register_configs",
    "save_config",
    "to_config",
    "validate_config",
]
