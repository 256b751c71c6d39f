"""Converting between OmegaConf/Hydra objects, typed Config instances and the resolved YAML file."""

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from llmtrain.config.schema import Config
from llmtrain.config.validate import validate_config


def to_config(cfg: DictConfig | dict[str, Any]) -> Config:
    """Merge a composed config onto the schema, resolve interpolations, validate, return a dataclass."""
    schema = OmegaConf.structured(Config)
    merged = OmegaConf.merge(schema, OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg)
    OmegaConf.resolve(merged)
    obj = OmegaConf.to_object(merged)
    assert isinstance(obj, Config)
    return validate_config(obj)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (the run's single source of truth: resolved once, recorded once)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    tmp.replace(path)


def load_config(path: str | Path) -> Config:
    """Read a resolved config YAML written by save_config."""
    return to_config(OmegaConf.load(path))


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict of a Config (for checkpoints and tracking params)."""
    out = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert isinstance(out, dict)
    return out  # type: ignore[return-value]
