"""Training objective schema: what the model learns from a batch (causal LM, masked LM, SFT, distillation)."""

from dataclasses import dataclass, field

OBJECTIVES = ("causal_lm", "masked_lm", "sft", "distill")
CHAT_TEMPLATES = ("chatml", "plain")
OVERLONG = ("truncate", "drop")


@dataclass(kw_only=True)
class MaskedLMConfig:
    """BERT-style masking: bidirectional attention, loss on the selected positions only."""

    mask_prob: float = 0.15
    """Share of tokens selected for prediction."""
    mask_token_prob: float = 0.8
    """Of the selected tokens, the share replaced by the mask token."""
    random_token_prob: float = 0.1
    """Of the selected tokens, the share replaced by a random token (the rest stay unchanged)."""
    mask_token_id: int | None = None
    """Id of the mask token; None = the tokenizer's mask token, else the first id after its vocabulary."""


@dataclass(kw_only=True)
class SFTConfig:
    """Prompt/response (or chat) examples in jsonl, packed with loss on response tokens only."""

    train_path: str = ""
    """jsonl file of training examples (required for objective=sft)."""
    val_path: str | None = None
    """Optional jsonl file of held-out examples for validation loss."""
    prompt_field: str = "prompt"
    """Field holding the prompt text (records without `messages_field`)."""
    response_field: str = "response"
    """Field holding the response text; it and the EOS after it carry the loss."""
    messages_field: str = "messages"
    """Field holding a chat: a list of {role, content}; rendered with `chat_template`."""
    chat_template: str = "chatml"
    """How chat messages are rendered: chatml (<|im_start|>role ... <|im_end|>) or plain (role: ...)."""
    train_roles: list[str] = field(default_factory=lambda: ["assistant"])
    """Chat roles whose message content (and end marker) carries the loss."""
    overlong: str = "truncate"
    """Examples longer than data.seq_len + 1 tokens: truncate (keep the start) or drop."""


@dataclass(kw_only=True)
class DistillConfig:
    """Knowledge distillation from a frozen teacher checkpoint that shares the tokenizer."""

    teacher: str = ""
    """Teacher checkpoint: a step_<N> folder, or a run folder / checkpoints folder (newest is used)."""
    temperature: float = 2.0
    """Softmax temperature T applied to both teacher and student logits in the KL term."""
    alpha: float = 0.5
    """Loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy."""


@dataclass(kw_only=True)
class ObjectiveConfig:
    """Which objective the run trains; the sub-sections configure the non-default ones."""

    name: str = "causal_lm"
    """causal_lm, masked_lm, sft or distill."""
    seed: int = 0
    """Seed of the objective's own randomness (masking); combined with the step and sample index."""
    masked_lm: MaskedLMConfig = field(default_factory=MaskedLMConfig)
    """Masked-LM settings (objective=masked_lm)."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Supervised fine-tuning data (objective=sft)."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Distillation settings (objective=distill)."""
