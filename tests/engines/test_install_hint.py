"""Selecting an engine whose package is missing names the install command (simulated ImportError)."""

import sys

import pytest
import torch

from llmtrain.config.validate import ConfigError
from llmtrain.parallel.build import build_engine
from llmtrain.parallel.dims import ParallelDims
from tests.engines.common import OVERRIDES


@pytest.mark.parametrize(
    ("backend", "package", "extra"),
    [
        ("deepspeed", "deepspeed", "llmtrain[deepspeed]"),
        ("megatron", "megatron", "llmtrain[megatron]"),
    ],
)
def test_missing_engine_package_gives_install_command(
    make_config, monkeypatch, backend, package, extra
) -> None:
    # None in sys.modules makes `import deepspeed` raise ImportError, exactly as when it is not installed
    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, package, None)
    monkeypatch.delitem(sys.modules, f"llmtrain.parallel.backends.{backend}", raising=False)
    cfg = make_config(*OVERRIDES, f"parallel.backend={backend}")
    with pytest.raises(ConfigError) as err:
        build_engine(cfg, ParallelDims(1, 1, 1, 1, 1), None, torch.device("cpu"))
    msg = str(err.value)
    assert f"parallel.backend={backend}" in msg and f"pip install '{extra}'" in msg and package in msg
