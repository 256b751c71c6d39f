"""`checkpoint.init_from`, resolved once: the exact checkpoint a fine-tuning run starts from.

`init_from=runs/base` names a run folder, which resolves to its newest checkpoint: had it been
re-resolved at every load, a LoRA run's frozen base would silently change when the base run trained on
(the same adapters exported different weights). So the first start resolves it to the step folder and a
fingerprint of that folder's manifest (which lists every file's size and checksum) and records the pair:
in `<run_dir>/init_from.json` at once, and in every checkpoint's TrainerState. Every later load (resume,
the LoRA base, export, evaluation) uses the pinned folder and refuses, naming both, when its content no
longer matches or when the configured `checkpoint.init_from` names something else.
"""

import dataclasses
import hashlib
import json
from pathlib import Path

from llmtrain.checkpoint.folder import COMPLETE, CheckpointError, resolve_checkpoint_path
from llmtrain.config.errors import ConfigError

PIN_FILE = "init_from.json"


@dataclasses.dataclass(frozen=True)
class InitPin:
    """checkpoint.init_from as configured, the step folder it resolved to, and that folder's fingerprint."""

    spec: str
    path: str
    fingerprint: str

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, str]) -> "InitPin":
        return cls(str(d["spec"]), str(d["path"]), str(d["fingerprint"]))

    def describe(self) -> str:
        return f"{self.path} (fingerprint {self.fingerprint})"


def fingerprint(path: Path) -> str:
    """sha256 of a checkpoint's COMPLETE manifest (every file's size and checksum): any rewrite shows."""
    try:
        return "sha256:" + hashlib.sha256((path / COMPLETE).read_bytes()).hexdigest()[:16]
    except OSError as e:
        raise CheckpointError(f"{path / COMPLETE}: cannot read the manifest ({e})") from e


def pin(spec: str) -> InitPin:
    """Resolve checkpoint.init_from now (a run folder -> its newest checkpoint) and fingerprint it."""
    path = resolve_checkpoint_path(spec, key="checkpoint.init_from").resolve()
    return InitPin(spec, str(path), fingerprint(path))


def verify(p: InitPin, what: str = "checkpoint.init_from") -> Path:
    """The pinned folder, after checking it still holds what was pinned."""
    path = Path(p.path)
    if not (path / COMPLETE).is_file():
        raise CheckpointError(
            f"{what}: the pinned checkpoint {p.describe()} is gone; restore it or start anew"
        )
    now = fingerprint(path)
    if now != p.fingerprint:
        raise CheckpointError(
            f"{what}: {path} changed since this run was pinned to it (fingerprint {p.fingerprint}, now {now}); "
            "the weights under this run would differ"
        )
    return path


def run_pin(spec: str | None, run_dir: Path, saved: InitPin | None) -> InitPin | None:
    """The run's pin: the one its checkpoint recorded, else the one written at its first start, else a
    new one (written to the run folder by the caller, rank 0). A configured spec that names something
    else than the pin is refused, naming both."""
    if not spec:
        return None
    recorded = saved or read_pin_file(run_dir)
    if recorded is None:
        return pin(spec)
    if recorded.spec != spec:
        raise ConfigError(
            f"checkpoint.init_from={spec} but this run was started from checkpoint.init_from={recorded.spec} "
            f"= {recorded.describe()}; use a new run.name to start from another base"
        )
    verify(recorded)
    return recorded


def read_pin_file(run_dir: Path) -> InitPin | None:
    f = run_dir / PIN_FILE
    if not f.is_file():
        return None
    try:
        return InitPin.from_dict(json.loads(f.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{f}: unreadable init_from pin ({e})") from e


def write_pin_file(run_dir: Path, p: InitPin) -> None:
    """Record the pin before the first save (a job killed before it still resumes on the same base)."""
    tmp = run_dir / (PIN_FILE + ".tmp")
    tmp.write_text(json.dumps(p.to_dict(), indent=2))
    tmp.replace(run_dir / PIN_FILE)


def base_of(recorded: InitPin | None, config: dict, where: Path) -> Path | None:
    """The checkpoint under checkpoint `where` (a LoRA checkpoint's frozen base): its pinned init_from,
    verified; for checkpoints written before pins existed, checkpoint.init_from resolved now."""
    if recorded is not None:
        return verify(recorded, f"{where}: base checkpoint")
    spec = (config.get("checkpoint") or {}).get("init_from")
    return resolve_checkpoint_path(spec) if spec else None
