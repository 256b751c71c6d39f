"""Launch plumbing: rank discovery, process groups, signals, and the local/torchrun/SLURM launchers."""
