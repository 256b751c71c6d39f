"""Parallelism: ParallelDims topology and the pure `apply_*` transforms of a model."""

from llmtrain.parallel.dims import ParallelDims

__all__ = ["ParallelDims"]
