"""Model definitions (parallelism-agnostic) and their construction from config."""

from llmtrain.models.build import build_model, model_args
from llmtrain.models.llama import Transformer, TransformerArgs

__all__ = ["Transformer", "TransformerArgs", "build_model", "model_args"]
