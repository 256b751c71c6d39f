"""llmtrain: distributed LLM training with Hydra configs, TP/PP/ZeRO, Arrow streaming, exact resume,
MLflow tracking and SLURM launching."""

__version__ = "0.1.0"
