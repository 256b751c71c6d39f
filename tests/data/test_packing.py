"""Packing: whole-document sequences with masked padding, and document masks the model honours."""

import numpy as np
import torch

from llmtrain.data import IGNORE_INDEX, DataLoader, TokenDataset
from llmtrain.data.dataset import pack_layout
from llmtrain.models.llama import Transformer, TransformerArgs
from tests.data.conftest import EOS, PAD, random_lengths

SEQ = 24


def test_pack_layout_never_splits_a_document_that_fits() -> None:
    lengths = np.array([5, 10, 10, 3, 40, 7, 1, 25])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    lay = pack_layout(offsets, 25)
    # ends: 5 15 25 28 68 75 76 101; the 40-token document [28, 68) is cut at 53, and its remainder
    # is packed with the documents that follow it
    assert lay.tolist() == [[0, 25], [25, 28], [28, 53], [53, 76], [76, 101]]
    assert pack_layout(np.array([0, 25, 26, 30]), 25).tolist() == [[0, 25], [25, 30]]
    assert pack_layout(np.array([0, 26]), 25).tolist() == [[0, 25]]  # a 1-token tail has no target: dropped


def test_whole_documents_pads_and_masks_the_rest(synth) -> None:
    lengths = random_lengths(150, 3, 20, seed=9)
    ds = TokenDataset(synth("d", lengths, docs_per_shard=30), SEQ, packing="whole_documents")
    s = ds.read(np.arange(ds.num_samples), doc_ids=True)
    assert s.valid.sum() == lengths.sum()  # every token of every document is in exactly one sample
    for row, n in zip(s.tokens, s.valid):
        assert row[n - 1] == EOS and (row[n:] == PAD).all()  # ends with a whole document, then padding
        assert (row[0] - 2) % 1000 == 0  # starts at a document start
    dl = DataLoader(ds, micro_batch_size=4, grad_accum=1, seed=0)
    b = dl.next_step()[0]
    valid = torch.from_numpy(dl.datasets[0].read(dl._sample_ids(0, np.arange(4))).valid)
    for r in range(4):
        assert (b.targets[r, : valid[r] - 1] != IGNORE_INDEX).all()
        assert (b.targets[r, valid[r] - 1 :] == IGNORE_INDEX).all()
    assert b.num_tokens == int((valid - 1).sum())


def test_document_mask_restarts_positions_and_blocks_other_documents(synth) -> None:
    ds = TokenDataset(synth("d", [5, 9, 30, 4], docs_per_shard=10), SEQ)
    b = DataLoader(ds, micro_batch_size=1, grad_accum=1, shuffle=False, document_mask=True).next_step()[0]
    # sample 0 = tokens 0..24: doc0 [0,5), doc1 [5,14), doc2 [14,..)
    assert b.positions[0].tolist() == list(range(5)) + list(range(9)) + list(range(10))
    m = b.attn_mask[0, 0]
    assert m[6, 5] and m[6, 6] and not m[6, 4] and not m[6, 7]  # own doc, causal
    assert not m[14, 13] and m[20, 14]


def test_model_sees_each_packed_document_as_if_alone(synth) -> None:
    """The strongest check of the mask: logits of a packed document equal those of the document run alone."""
    torch.manual_seed(0)
    ds = TokenDataset(synth("d", [7, 11, 30], docs_per_shard=10), SEQ)
    b = DataLoader(ds, micro_batch_size=1, grad_accum=1, shuffle=False, document_mask=True).next_step()[0]
    args = TransformerArgs(dim=32, n_layers=2, n_heads=4, vocab_size=64, max_seq_len=64, multiple_of=16)
    model = Transformer(args)
    model.init_weights(seed=0)
    ids = b.inputs % 64
    with torch.no_grad():
        packed = model(ids, positions=b.positions, attn_mask=b.attn_mask)
        alone = model(ids[:, 7:18])  # doc 1 by itself, plain causal attention from position 0
        unmasked = model(ids)
    torch.testing.assert_close(packed[:, 7:18], alone, rtol=1e-5, atol=1e-5)
    assert (unmasked[:, 7:18] - alone).abs().max() > 1e-3  # without the mask the documents interact
