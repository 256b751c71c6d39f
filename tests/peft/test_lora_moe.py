"""LoRA on the attention of an MoE model: only the adapters move (experts, router, shared expert and
the selection bias stay as the base had them), the loss falls, and merging the adapters gives the
adapted model's logits."""

from pathlib import Path

import torch

from llmtrain.models.lora import LoRALinear, is_adapter, merge_lora
from tests.parallel.common import make_cfg
from tests.parallel.test_moe_parity import MOE

STEPS = 12


def test_lora_on_moe_attention_trains_adapters_only_and_learns(shakespeare_dir: Path, tmp_path: Path) -> None:
    from llmtrain.config import batch_geometry
    from llmtrain.data import build_train_loader
    from llmtrain.parallel import ParallelDims
    from llmtrain.parallel.build import build_engine
    from llmtrain.peft import build_peft

    torch.set_num_threads(1)
    lora = [
        "peft.method=lora",
        "peft.adapters_only_checkpoint=false",
        "peft.target_modules=[wq,wk,wv,wo]",
        "peft.rank=4",
        "optim.lr=3e-3",
    ]
    cfg = make_cfg(str(shakespeare_dir), str(tmp_path), [*MOE, *lora])  # bias balancing and aux loss on
    engine = build_engine(cfg, ParallelDims(1, 1, 1, 1, 1), None, torch.device("cpu"), build_peft(cfg))
    before = {k: v.detach().clone() for k, v in engine.model.state_dict().items()}
    loader = build_train_loader(
        cfg.data,
        micro_batch_size=cfg.trainer.micro_batch_size,
        grad_accum=batch_geometry(cfg, 1),
        dp_rank=0,
        dp_size=1,
    )
    losses = [engine.train_step(loader.next_step(), cfg.optim.lr).loss for _ in range(STEPS)]
    after = engine.model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(is_adapter(k) for k in moved), sorted(moved - {k for k in moved if is_adapter(k)})
    assert any(k.endswith("feed_forward.router.expert_bias") for k in before)  # the frozen bias is there
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.08, losses  # 5.75 -> 5.62 (random frozen base)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    model = engine.model.eval()
    with torch.no_grad():
        adapted = model(tokens)
        merged = merge_lora(model)(tokens)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
