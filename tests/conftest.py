"""Shared fixtures: a tiny tokenized corpus, a config factory, and CPU-friendly torch settings."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("LLMTRAIN_DATA_CACHE", str(ROOT / "data_cache"))
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def shakespeare_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled corpus tokenized byte-level once per session (train split + val split)."""
    from llmtrain.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("data") / "shakespeare-byte"
    prepare_dataset("builtin:shakespeare", out, "byte", shard_tokens=1 << 20, val_fraction=0.05)
    return out


@pytest.fixture
def make_config(shakespeare_dir: Path, tmp_path: Path):
    """Build a validated Config from the real conf/ tree plus overrides (Hydra compose API)."""
    from llmtrain.testing import compose_config

    def make(*overrides: str):
        base = [f"data.sources.0.path={shakespeare_dir}", f"run.root={tmp_path / 'runs'}", "tracking=none"]
        return compose_config([*base, *overrides])

    return make


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
    """A Trainer built in the test process installs its graceful-stop handlers (SIGTERM only sets a
    flag); left in place they would make this pytest process, and processes it forks, ignore the
    SIGTERM of a timeout or of a pool ending its workers. Each test gets the handlers back."""
    import signal

    names = ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "SIGUSR2")
    saved = {n: signal.getsignal(getattr(signal, n)) for n in names}
    yield
    for n, handler in saved.items():
        signal.signal(getattr(signal, n), handler)
