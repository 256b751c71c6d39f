"""Inputs of an objective checked in the launching process, before any rank (or SLURM job) starts.

A missing or malformed SFT file or distillation teacher used to surface on every rank as a traceback
plus torchrun's failure dump; here it is one line and exit code 2, like a config error. The ranks read
the same inputs again with the same code, so a check here cannot pass what a rank would refuse.
"""

from llmtrain.config import Config
from llmtrain.data.tokenizer import load_tokenizer


def check_objective_inputs(cfg: Config) -> None:
    """Raise DataError / ConfigError / CheckpointError naming the file and key when an objective's own
    inputs (beyond data.sources, which data preparation checks) cannot be used."""
    name = cfg.objective.name
    if name == "sft":
        from llmtrain.objectives.sft_data import load_examples

        s, d = cfg.objective.sft, cfg.data
        tok = load_tokenizer(d.tokenizer)
        for path in (s.train_path, s.val_path):
            if path:
                load_examples(path, s, tok, d.seq_len)
    elif name == "distill":
        from llmtrain.objectives.distill import teacher_checkpoint

        teacher_checkpoint(cfg)
