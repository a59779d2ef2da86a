"""Batches that do not pay for padding: length-bucketed classification batches (a few fixed widths) and packed
causal-LM rows. Each is a pure function of (data, seed, index), covers every example once per epoch, and gives
each example the logits / loss it gets padded to the full width."""

from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest
from test_arch import TINY

from lora_jax.models import arch as arch_lib
from train import data as data_lib
from train.tasks import causal_lm_loss, classification_loss


def _classification(n=200, width=32, seed=0, vocab=64) -> data_lib.Tokenized:
    rng = np.random.default_rng(seed)
    lengths = np.minimum(rng.geometric(0.12, n) + 2, width)
    ids = np.zeros((n, width), np.int32)
    mask = np.zeros((n, width), np.int32)
    for i, n_i in enumerate(lengths):
        ids[i, :n_i] = rng.integers(1, vocab, n_i)
        mask[i, :n_i] = 1
    return data_lib.Tokenized(ids, mask, labels=rng.integers(0, 3, n).astype(np.int32))


def _causal(n=60, width=24, seed=0, vocab=64) -> data_lib.Tokenized:
    """Prompt + completion examples as ``data.tokenize`` lays them out (loss on the completion's tokens)."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((n, width), np.int32)
    mask = np.zeros((n, width), np.int32)
    loss = np.zeros((n, width), np.int32)
    for i in range(n):
        p, c = int(rng.integers(2, 6)), int(rng.integers(2, width - 6))
        ids[i, : p + c] = rng.integers(1, vocab, p + c)
        mask[i, : p + c] = 1
        loss[i, p - 1 : p + c - 1] = 1
    return data_lib.Tokenized(ids, mask, loss_mask=loss)


def _cost(needed, widths):
    return sum(min(w for w in widths if w >= x) for x in needed)


def test_bucket_widths_are_the_fewest_padded_tokens():
    rng = np.random.default_rng(0)
    needed = rng.integers(3, 64, 40)
    for k in (1, 2, 3, 4):
        widths = data_lib.bucket_widths(needed, 64, k)
        assert len(widths) <= k and widths[-1] == 64 and all(w % 8 == 0 for w in widths)
        cands = range(8, 65, 8)
        best = min(_cost(needed, set(c) | {64}) for r in range(k) for c in itertools.combinations(cands, r))
        assert _cost(needed, widths) == best
    assert data_lib.bucket_widths([5, 7], 64, 4) == (8, 64)
    with pytest.raises(data_lib.DataError, match="more than the largest width"):
        data_lib.bucket_widths([70], 64)


def test_bucketed_batches_cover_each_example_once_and_resume_exactly():
    data = _classification(n=192)
    batches = data_lib.BucketedBatches(data, 16, seed=3, n_shapes=3)
    assert len(batches.widths) <= 3 and batches.widths[-1] >= data_lib.example_lengths(data).max()
    lengths = data_lib.example_lengths(data)
    epoch = np.concatenate([batches.indices(i) for i in range(12)])
    assert sorted(epoch.tolist()) == list(range(192))
    seen_widths = set()
    for i in range(14):
        b = batches(i)
        idx = batches.indices(i)
        w = b["input_ids"].shape[1]
        seen_widths.add(w)
        assert w in batches.widths and w >= lengths[idx].max()
        assert w == min(x for x in batches.widths if x >= lengths[idx].max())
        full = data.take(idx)
        np.testing.assert_array_equal(b["input_ids"], full["input_ids"][:, :w])
        np.testing.assert_array_equal(b["labels"], full["labels"])
        assert full["attention_mask"][:, w:].sum() == 0  # only padding was cut
    assert len(seen_widths) > 1
    # padding shrinks: batches of similar lengths
    computed = sum(batches(i)["input_ids"].size for i in range(12))
    assert computed < 0.6 * 192 * 32
    # a fresh instance (a resumed run) gives the same batches, another seed others
    again = data_lib.BucketedBatches(data, 16, seed=3, n_shapes=3)
    for i in (0, 5, 13, 40):
        np.testing.assert_array_equal(again(i)["input_ids"], batches(i)["input_ids"])
    assert not np.array_equal(data_lib.BucketedBatches(data, 16, seed=4, n_shapes=3).indices(0), batches.indices(0))


def test_a_bucketed_batch_gives_bert_the_logits_of_the_full_width():
    arch = arch_lib.for_model_type("bert")
    config = arch.config.from_hf(TINY["bert"]())
    model = arch.build(config, task="sequence-classification")
    params = arch.init_params(config, jax.random.key(0), "sequence-classification")
    data = _classification(n=64, width=32)
    batches = data_lib.BucketedBatches(data, 16, seed=0, n_shapes=3)
    loss = jax.jit(lambda b: classification_loss(model, params, b, train=False, rng=None))
    checked = set()
    for i in range(8):
        b = batches(i)
        if b["input_ids"].shape[1] in checked:
            continue
        full = data.take(batches.indices(i))
        (l_cut, aux_cut), (l_full, aux_full) = loss(b), loss(full)
        np.testing.assert_allclose(aux_cut["logits"], aux_full["logits"], atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(l_cut, l_full, rtol=1e-5)
        checked.add(b["input_ids"].shape[1])
    assert len(checked) > 1 and min(checked) < 32


def test_packed_rows_hold_each_example_once_per_epoch_and_resume_exactly():
    data = _causal(n=60, width=24)
    lengths = data_lib.example_lengths(data)
    batches = data_lib.PackedBatches(data, rows=4, seed=1, width=48)
    rows0 = data_lib.pack_order(lengths, 48, 1, 0)
    assert sorted(int(i) for r in rows0 for i in r) == list(range(60))
    assert all(lengths[r].sum() <= 48 for r in rows0)
    used = lengths.sum() / (len(rows0) * 48)
    assert used > 0.9, used  # best-fit decreasing leaves little padding
    assert not all(np.array_equal(a, b) for a, b in zip(rows0, data_lib.pack_order(lengths, 48, 1, 1)))
    b = batches(3)
    assert set(b) == {"input_ids", "attention_mask", "loss_mask", "segment_ids", "positions"}
    for r, row in enumerate(batches.row_indices(3)):
        at = 0
        for k, i in enumerate(row):
            n = lengths[i]
            np.testing.assert_array_equal(b["input_ids"][r, at : at + n], data.input_ids[i, :n])
            np.testing.assert_array_equal(b["loss_mask"][r, at : at + n], data.loss_mask[i, :n])
            np.testing.assert_array_equal(b["positions"][r, at : at + n], np.arange(n))
            assert (b["segment_ids"][r, at : at + n] == k + 1).all()
            at += n
        assert b["attention_mask"][r].sum() == at and (b["segment_ids"][r, at:] == 0).all()
    # a fresh instance (a resumed run) at any index, across epochs
    again = data_lib.PackedBatches(data, rows=4, seed=1, width=48)
    for i in (0, 9, 17, 30):
        for k in b:
            np.testing.assert_array_equal(again(i)[k], batches(i)[k])


def test_a_packed_batch_gives_the_loss_of_its_examples_alone():
    """The summed completion loss and token count of a packed batch (positions passed in) equal those of its
    examples run padded one per row; gradients too (Llama; every family's logits: tests/test_packing.py)."""
    family = "llama"
    arch = arch_lib.for_model_type(TINY[family]().model_type)
    config = arch.config.from_hf(TINY[family]())
    model = arch.build(config, task="causal-lm")
    params = arch.init_params(config, jax.random.key(2), "causal-lm")
    data = _causal(n=24, width=24)
    batches = data_lib.PackedBatches(data, rows=3, seed=0, width=48)
    packed = batches(0)
    idx = np.concatenate(batches.row_indices(0))
    alone = data.take(idx)
    fn = jax.jit(jax.value_and_grad(lambda p, b: causal_lm_loss(model, p, b, train=True, rng=None), has_aux=True))
    (l_packed, aux_packed), g_packed = fn(params, packed)
    (l_alone, aux_alone), g_alone = fn(params, alone)
    assert float(aux_packed["count"]) == float(aux_alone["count"]) == data.loss_mask[idx].sum()
    np.testing.assert_allclose(l_packed, l_alone, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_packed), jax.tree.leaves(g_alone)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
    assert packed["input_ids"].size < 0.7 * alone["input_ids"].size
