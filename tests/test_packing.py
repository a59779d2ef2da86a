"""Packed rows: several examples in one row with segment ids give each example exactly what it gets alone, in
every registered decoder family (the mask and positions live in the shared layers, so a new family is covered by
its tiny config in tests/test_arch.py); the KV-cache path is unchanged."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_arch import TINY

from lora_jax.models import arch as arch_lib
from lora_jax.models.generate import begin_step, init_cache, segment_positions

CAUSAL = sorted(a.name for a in arch_lib.families() if "causal-lm" in a.tasks and a.name in TINY)


def _family(name: str):
    hf_config = TINY[name]()
    arch = arch_lib.for_model_type(hf_config.model_type)
    config = arch.config.from_hf(hf_config)
    return arch, config


def _pack(examples: list[np.ndarray], width: int, pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One row: the examples one after the other, segment ids 1, 2, ..., padding (segment 0) to ``width``."""
    ids = np.full((width,), pad, np.int32)
    seg = np.zeros((width,), np.int32)
    at = 0
    for i, ex in enumerate(examples):
        ids[at : at + len(ex)] = ex
        seg[at : at + len(ex)] = i + 1
        at += len(ex)
    return ids, seg


def test_segment_positions_restart_per_example():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 0, 0], [3, 3, 3, 3, 3, 3, 3], [1, 2, 3, 4, 0, 0, 0]])
    np.testing.assert_array_equal(
        segment_positions(seg), [[0, 1, 2, 0, 1, 0, 1], [0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 0, 1, 2]]
    )


def test_segment_mask_never_crosses_examples():
    seg = jnp.asarray([[1, 1, 2, 2, 2, 0]])
    step = begin_step(1, 6, None, None, sliding_window=2, segment_ids=seg)
    causal = np.asarray(step.causal[0])
    want = np.zeros((6, 6), bool)
    for q in range(6):
        for k in range(q + 1):
            want[q, k] = seg[0, q] == seg[0, k] != 0
    np.testing.assert_array_equal(causal, want)
    # the window counts slots, which inside one example are its positions
    np.testing.assert_array_equal(np.asarray(step.sliding[0]), want & (np.subtract.outer(range(6), range(6)) < 2))
    np.testing.assert_array_equal(np.asarray(step.key_valid[0]), [1, 1, 1, 1, 1, 0])


def test_segment_ids_refuse_a_cache():
    _, config = _family("llama")
    with pytest.raises(ValueError, match="segment_ids .* without a KV cache"):
        begin_step(1, 4, None, init_cache(config, 1, 8), segment_ids=jnp.ones((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids must have shape"):
        begin_step(1, 4, None, None, segment_ids=jnp.ones((1, 5), jnp.int32))


@pytest.mark.parametrize("family", CAUSAL)
def test_a_packed_row_gives_each_example_its_logits_alone(family):
    """Three packed rows (the examples in three orders, one longer than a sliding window where the family has
    one) against each example alone (its own row, right-padded: a causal model's tokens never see what comes
    after them): logits equal to float32 rounding, with the default positions (restarting at each segment;
    positions passed in: tests/test_batching.py)."""
    arch, config = _family(family)
    model = arch.build(config, task="causal-lm")
    params = arch.init_params(config, jax.random.key(1), "causal-lm")
    rng = np.random.default_rng(0)
    lengths = (5, 11, 3)
    examples = [rng.integers(1, config.vocab_size, n).astype(np.int32) for n in lengths]
    width = sum(lengths) + 4
    orders = ([0, 1, 2], [2, 1, 0], [1, 2, 0])
    rows = [_pack([examples[i] for i in order], width) for order in orders]
    ids = jnp.asarray(np.stack([r[0] for r in rows]))
    seg = jnp.asarray(np.stack([r[1] for r in rows]))

    def logits(ids, **kwargs):
        return model.apply({"params": params}, ids, **kwargs)[0]

    packed = np.asarray(jax.jit(lambda ids, seg: logits(ids, segment_ids=seg))(ids, seg))
    padded = jax.jit(lambda ids, mask: logits(ids, attention_mask=mask))
    alone_ids = np.stack([_pack([ex], width)[0] for ex in examples])
    alone = np.asarray(padded(jnp.asarray(alone_ids), jnp.asarray(alone_ids != 0, jnp.int32)))
    for row, order in enumerate(orders):
        at = 0
        for i in order:
            n = lengths[i]
            np.testing.assert_allclose(
                packed[row, at : at + n],
                alone[i, :n],
                atol=2e-5,
                rtol=1e-5,
                err_msg=f"{family}: example {i} in row {row}",
            )
            at += n
    # without segment ids the second example of row 0 attends to the first: its logits differ from alone
    unpacked = np.asarray(padded(ids, jnp.ones_like(ids)))
    assert not np.allclose(unpacked[0, 5:16], alone[1, :11], atol=1e-3)
