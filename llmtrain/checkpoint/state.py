"""`TrainerState`: the typed content of a checkpoint's trainer_state.json, and the only code that knows
its keys.

Written by the checkpoint manager at every save (rank 0's global fields plus every rank's
`RankState`), by weights-only writers (HF import, engine conversion, LoRA merge) with just a step and a
config, and read back once per resume. Plain JSON: loading a checkpoint never unpickles anything.
"""

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from llmtrain.checkpoint.folder import FORMAT, STATE_FILE, CheckpointError, verify_manifest
from llmtrain.checkpoint.pin import InitPin
from llmtrain.config.errors import ConfigError
from llmtrain.config.model import ModelConfig

if TYPE_CHECKING:
    from llmtrain.config.schema import Config


@dataclass
class LRPosition:
    """Where the LR schedule stood at the save: announced on resume when the horizon changes."""

    step: int
    max_steps: int
    next_lr: float


@dataclass
class RankState:
    """What each rank saves beside the sharded engine state: its data-loader position and host RNG."""

    data: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] | None = None


@dataclass
class TrainerState:
    """Counters, identity and per-rank state of one checkpoint."""

    step: int = 0
    tokens_seen: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    """The resolved run config (as a plain dict) the checkpoint was trained with."""
    ranks: list[RankState] = field(default_factory=list)
    lr_schedule: LRPosition | None = None
    mlflow_run_id: str | None = None
    run_dir: str | None = None
    world_size: int | None = None
    layout: str | None = None
    engine: str = "native"
    init_from: InitPin | None = None
    """checkpoint.init_from resolved once (the exact base checkpoint; see checkpoint/pin.py)."""
    resume_origin: str | None = None
    """The checkpoint.resume path this run's lineage branched from (see checkpoint/policy.py)."""
    source: str | None = None
    """Weights-only checkpoints: what they were converted from (an HF folder, another engine's checkpoint)."""
    saved_at: float | None = None

    def state_dict(self) -> dict[str, Any]:
        """The JSON object of trainer_state.json (with its format marker)."""
        out = {k: v for k, v in asdict(self).items() if v is not None}
        return {"format": FORMAT, **out}

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> "TrainerState":
        """Parse trainer_state.json content; unknown keys (written by a newer llmtrain) are ignored."""
        lr = d.get("lr_schedule")
        return cls(
            step=int(d.get("step", 0)),
            tokens_seen=int(d.get("tokens_seen", 0)),
            config=d.get("config") or {},
            ranks=[RankState(r.get("data") or {}, r.get("rng")) for r in d.get("ranks") or []],
            lr_schedule=LRPosition(int(lr["step"]), int(lr["max_steps"]), float(lr["next_lr"]))
            if lr
            else None,
            mlflow_run_id=d.get("mlflow_run_id"),
            run_dir=d.get("run_dir"),
            world_size=d.get("world_size"),
            layout=d.get("layout"),
            engine=d.get("engine") or "native",
            init_from=InitPin.from_dict(d["init_from"]) if d.get("init_from") else None,
            resume_origin=d.get("resume_origin"),
            source=d.get("source"),
            saved_at=d.get("saved_at"),
        )

    def rank(self, rank: int) -> RankState:
        """This rank's saved state; a rank beyond the saved world (resharding up) reads rank 0's,
        whose data state the loader re-splits for the new data-parallel size."""
        return self.ranks[rank] if rank < len(self.ranks) else self.ranks[0]

    @property
    def model_config(self) -> dict[str, Any]:
        return self.config.get("model") or {}

    def write(self, folder: Path) -> None:
        """Write trainer_state.json into `folder` (stamping the save time)."""
        self.saved_at = self.saved_at or time.time()
        (folder / STATE_FILE).write_text(json.dumps(self.state_dict()))

    @classmethod
    def read(cls, path: Path) -> "TrainerState":
        """trainer_state.json of a verified checkpoint folder (manifest and format checked)."""
        verify_manifest(path)
        f = path / STATE_FILE
        try:
            d = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{f}: unreadable trainer state ({e})") from e
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise CheckpointError(f"{f}: not an llmtrain trainer state (format {FORMAT!r} expected)")
        try:
            return cls.from_state_dict(d)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{f}: malformed trainer state ({type(e).__name__}: {e})") from e

    def run_config(self) -> "Config":
        """The typed, validated config the checkpoint was trained with."""
        from llmtrain.config.io import to_config

        return to_config(self.config)

    def model_and_tokenizer(self, path: Path) -> tuple[ModelConfig, str | None]:
        """(model config, tokenizer or None); also for weights-only checkpoints (e.g. imported from
        Hugging Face) that record no more than their model."""
        if not self.model_config:
            raise ConfigError(f"{path}: the checkpoint records no model config")
        model = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), self.model_config))
        assert isinstance(model, ModelConfig)
        return model, (self.config.get("data") or {}).get("tokenizer")

    def require_model(self, path: Path) -> dict[str, Any]:
        """The recorded model config, or an error naming the file."""
        if not self.model_config:
            raise CheckpointError(f"{path / STATE_FILE}: no model config recorded")
        return self.model_config
