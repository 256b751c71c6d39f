"""The shipped experiment overlays compose, validate, and fit the hardware they name (per tools/plan.py)."""

import pytest

from llmtrain.models import model_args
from llmtrain.parallel.layout import build_dims
from llmtrain.plan.fit import Cluster, layout_from_config, plan_layout
from llmtrain.testing import compose_config


@pytest.mark.parametrize(
    ("experiment", "nodes", "gpus", "world"),
    [("llama_1b_8gpu", 1, 8, 8), ("llama_8b_slurm", 2, 8, 16)],
)
def test_experiment_composes_and_fits_an_80gb_gpu(experiment, nodes, gpus, world):
    cfg = compose_config([f"experiment={experiment}"])
    launcher_world = (
        cfg.launcher.nodes * cfg.launcher.gpus_per_node
        if cfg.launcher.name == "slurm"
        else cfg.launcher.nproc
    )
    assert launcher_world == world
    build_dims(cfg, world)  # the same layout rules the ranks (and the launchers) apply
    plan = plan_layout(
        model_args(cfg.model),
        cfg.data.seq_len,
        cfg.trainer.global_batch_size,
        layout_from_config(cfg, world),
        Cluster(nodes=nodes, gpus_per_node=gpus, gpu_mem_gib=80.0),
        cfg.trainer.precision,
    )
    assert plan.fits, f"{experiment}: {plan.memory.total / 2**30:.1f} GiB per GPU does not fit"
