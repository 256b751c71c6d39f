"""Model shapes, causality, GQA, tied embeddings, meta-device building and deterministic init."""

import pytest
import torch

from llmtrain.models import build_model
from llmtrain.models.build import count_params
from llmtrain.models.llama import Transformer, TransformerArgs
from llmtrain.testing import compose_config

ARGS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=64)


def _model(seed: int = 0, **kw) -> Transformer:
    with torch.device("meta"):
        m = Transformer(TransformerArgs(**{**ARGS, **kw}))
    m.to_empty(device="cpu")
    m.init_weights(seed)
    return m


def test_output_shape_and_dtype():
    m = _model()
    logits = m(torch.randint(0, 97, (3, 17)))
    assert logits.shape == (3, 17, 97) and logits.dtype == torch.float32


def test_causal_future_tokens_do_not_change_the_past():
    m = _model()
    x = torch.randint(0, 97, (2, 24))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 97, (2, 12))
    a, b = m(x), m(y)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_bidirectional_mode_sees_the_future():
    m = _model()
    x = torch.randint(0, 97, (1, 16))
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % 97
    assert not torch.allclose(m(x, causal=False)[:, 0], m(y, causal=False)[:, 0])


def test_document_mask_equals_separate_sequences():
    """Two packed documents with a block mask and restarted positions == running each alone."""
    m = _model()
    a, b = torch.randint(0, 97, (1, 10)), torch.randint(0, 97, (1, 6))
    packed = torch.cat([a, b], dim=1)
    doc = torch.tensor([0] * 10 + [1] * 6)
    mask = (doc[:, None] == doc[None, :]) & torch.ones(16, 16, dtype=torch.bool).tril()
    pos = torch.cat([torch.arange(10), torch.arange(6)]).unsqueeze(0)
    out = m(packed, positions=pos, attn_mask=mask[None, None])
    torch.testing.assert_close(out[:, :10], m(a), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 10:], m(b), rtol=1e-5, atol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_weights():
    """GQA with 2 KV heads == MHA whose K/V projections repeat those heads."""
    gqa = _model(seed=3)
    mha = _model(seed=3, n_kv_heads=4)
    sd = gqa.state_dict()
    hd = ARGS["dim"] // ARGS["n_heads"]
    for i in range(ARGS["n_layers"]):
        for w in ("wk", "wv"):
            key = f"layers.{i}.attention.{w}.weight"
            sd[key] = sd[key].view(2, hd, -1).repeat_interleave(2, dim=0).reshape(4 * hd, -1)
    mha.load_state_dict(sd)
    x = torch.randint(0, 97, (2, 12))
    torch.testing.assert_close(gqa(x), mha(x), rtol=1e-5, atol=1e-5)


def test_tied_embeddings_share_storage():
    m = _model(tie_embeddings=True)
    assert m.output.weight is m.tok_embeddings.weight
    assert count_params(m) == count_params(_model()) - 97 * 64


def test_init_is_deterministic_and_seeded():
    a, b, c = _model(1), _model(1), _model(2)
    for (n, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q), n
        if "norm" not in n:
            assert not torch.equal(p, r), n


def test_output_projections_are_scaled_down():
    m = _model()
    std_wq = m.layers["0"].attention.wq.weight.std()
    std_wo = m.layers["0"].attention.wo.weight.std()
    assert std_wo < std_wq * 0.7


@pytest.mark.parametrize(
    ("preset", "billions"),
    [("125m", 0.134), ("1b", 1.24), ("7b", 6.74), ("8b", 8.03), ("70b", 70.6), ("405b", 405.9)],
)
def test_presets_build_on_meta_with_expected_size(preset, billions):
    model = build_model(compose_config([f"model={preset}"]).model)
    assert next(model.parameters()).is_meta
    assert count_params(model) / 1e9 == pytest.approx(billions, rel=0.03)
