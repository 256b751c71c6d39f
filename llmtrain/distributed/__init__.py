"""Where a process sits in the job and how ranks agree on small values.

- `env`: rank/world discovery (torchrun, SLURM), device choice, process-group setup and teardown;
- `collectives`: every reduction, broadcast and gather of *bookkeeping* values (token counts, loss
  sums, norms, stop/save flags, small objects). They are correct on gloo and NCCL groups alike; the
  rest of llmtrain calls these instead of `torch.distributed` (tests/test_architecture.py checks it).
"""
