"""The root config: one typed dataclass per component, registered in Hydra's ConfigStore."""

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from llmtrain.config.checkpoint import CheckpointConfig
from llmtrain.config.data import DataConfig, DataSourceConfig
from llmtrain.config.launcher import LauncherConfig
from llmtrain.config.model import ModelConfig
from llmtrain.config.objective import ObjectiveConfig
from llmtrain.config.optim import OptimConfig
from llmtrain.config.parallel import ParallelConfig
from llmtrain.config.peft import PeftConfig
from llmtrain.config.resilience import ResilienceConfig
from llmtrain.config.storage import StorageConfig
from llmtrain.config.tracking import TrackingConfig
from llmtrain.config.trainer import TrainerConfig


@dataclass(kw_only=True)
class RunConfig:
    """Run identity: the folder `<root>/<name>` is stable across requeues and holds everything."""

    name: str = "default"
    """Run name; re-using a name resumes that run."""
    root: str = "runs"
    """Folder holding all runs (and the default MLflow store)."""


@dataclass(kw_only=True)
class Config:
    """Everything a training run needs, validated before any process starts."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)


GROUP_SCHEMAS = {
    "model": ModelConfig,
    "data": DataConfig,
    "parallel": ParallelConfig,
    "optim": OptimConfig,
    "trainer": TrainerConfig,
    "checkpoint": CheckpointConfig,
    "tracking": TrackingConfig,
    "launcher": LauncherConfig,
    "objective": ObjectiveConfig,
    "peft": PeftConfig,
    "resilience": ResilienceConfig,
    "storage": StorageConfig,
}


def register_configs() -> None:
    """Register the root schema and one schema per group, so YAML options are type-checked.

    Group YAMLs list `schema` first in their defaults; Hydra merges them onto the dataclass in struct
    mode, so an unknown key or a wrong type fails at composition, naming the key.
    """
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    for group, node in GROUP_SCHEMAS.items():
        cs.store(group=group, name="schema", node=node)


__all__ = ["Config", "DataSourceConfig", "RunConfig", "register_configs"]
