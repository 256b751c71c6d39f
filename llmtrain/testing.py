"""Helpers for tests and tools that need a config without going through the CLI."""

from llmtrain.config import Config, register_configs, to_config


def compose_config(overrides: list[str] | None = None, config_name: str = "config") -> Config:
    """Compose conf/ with Hydra's compose API (same defaults and validation as the CLI)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from llmtrain.cli import config_dir

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        dcfg = compose(config_name=config_name, overrides=list(overrides or []))
    return to_config(dcfg)
