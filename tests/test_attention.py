"""The attention entry point (lora_jax.models.attention): every implementation this backend can run gives the dense
attention's outputs and gradients (lora_jax.models.layers.attend, what the models ran before) on packed rows with
padding, sliding windows, grouped heads and soft-capping; the blockwise backward keeps nothing quadratic; the
shared decoder's logits and LoRA gradients do not depend on the implementation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import lora_jax as lora
from lora_jax.models import attention, llama
from lora_jax.models.generate import begin_step
from lora_jax.models.layers import attend as dense_attend


def _inputs(b=2, s=50, h=4, kv=2, d=8, seed=0, dtype=jnp.float32):
    rng = np.random.RandomState(seed)
    q, k, v = (jnp.asarray(rng.randn(b, s, n, d), dtype) for n in (h, kv, kv))
    seg = np.zeros((b, s), np.int32)  # row 0: three examples then padding; row 1: one example then padding
    seg[0, :17], seg[0, 17:40], seg[0, 40 : s - 3] = 1, 2, 3
    seg[1:, : s - 11] = 5
    return q, k, v, jnp.asarray(seg)


def _loss(fn, valid, d):
    """A scalar of the outputs at real tokens (padding rows are garbage in every implementation)."""
    weights = jnp.arange(1, d + 1, dtype=jnp.float32)
    return lambda q, k, v: (jnp.where(valid[..., None, None], fn(q, k, v), 0).astype(jnp.float32) ** 2 * weights).sum()


def _compare(fn, window, softcap, atol, inputs=None, grads=True):
    q, k, v, seg = inputs or _inputs()
    d = q.shape[-1]
    step = begin_step(q.shape[0], q.shape[1], None, None, window, seg)
    dense = step.sliding if window else step.causal
    valid = np.asarray(seg != 0)
    mask = step.mask(window is not None)
    want = jax.jit(lambda q, k, v: dense_attend(q, k, v, dense, None, softcap))(q, k, v)
    got = jax.jit(lambda q, k, v: fn(q, k, v, mask, 1 / np.sqrt(d), softcap))(q, k, v)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(
        np.where(valid[..., None, None], got, 0), np.where(valid[..., None, None], want, 0), atol=atol, rtol=atol
    )
    if grads:
        g_want = jax.jit(
            jax.grad(_loss(lambda q, k, v: dense_attend(q, k, v, dense, None, softcap), valid, d), argnums=(0, 1, 2))
        )(q, k, v)
        g_got = jax.jit(
            jax.grad(_loss(lambda q, k, v: fn(q, k, v, mask, 1 / np.sqrt(d), softcap), valid, d), argnums=(0, 1, 2))
        )(q, k, v)
        for name, a, b in zip("qkv", g_got, g_want):
            scale = float(jnp.abs(b).max())
            np.testing.assert_allclose(a, b, atol=atol * scale, rtol=atol, err_msg=f"d{name}")


@pytest.mark.parametrize(
    "window,softcap,blocks",
    [
        (7, 3.0, (8, 16)),
        pytest.param(None, None, (16, 8), marks=pytest.mark.slow),
        pytest.param(7, None, (512, 512), marks=pytest.mark.slow),
        pytest.param(None, 3.0, (16, 16), marks=pytest.mark.slow),
    ],
)
def test_blockwise_equals_dense_attention(window, softcap, blocks):
    """Outputs and q/k/v gradients on packed rows with padding, grouped heads (4 query heads on 2), a window, a
    soft-cap; uneven blocks (50 tokens in blocks of 8 / 16: padded last blocks, skipped future blocks) and one block."""
    bq, bk = blocks
    _compare(
        lambda q, k, v, m, sc, cap: attention.blockwise(q, k, v, m, sc, cap, block_q=bq, block_k=bk),
        window,
        softcap,
        2e-5,
    )


@pytest.mark.slow
def test_blockwise_bfloat16_follows_the_dense_path():
    """In bfloat16 both cast the probabilities to bfloat16 before multiplying the values: close, not equal."""
    _compare(
        lambda q, k, v, m, sc, cap: attention.blockwise(q, k, v, m, sc, cap, block_q=16, block_k=16),
        5,
        None,
        3e-2,
        _inputs(dtype=jnp.bfloat16),
        grads=False,
    )


def test_blockwise_with_a_kv_cache_offset():
    """Decoding-shaped calls (queries at slots start.., keys a partly filled cache) mask as the dense path."""
    rng = np.random.RandomState(1)
    b, s, t, h, kv, d = 2, 5, 24, 4, 1, 8
    q = jnp.asarray(rng.randn(b, s, h, d), jnp.float32)
    k, v = (jnp.asarray(rng.randn(b, t, kv, d), jnp.float32) for _ in range(2))
    key_valid = jnp.asarray(np.arange(t)[None] >= np.array([[3], [0]])) & (jnp.arange(t) < 14)
    for window in (None, 4):
        mask = attention.Mask(
            key_valid, None, jnp.asarray(9, jnp.int32), window, cached=True, implementation="blockwise"
        )
        want = jax.jit(lambda q, k, v: dense_attend(q, k, v, mask.dense(s, t)))(q, k, v)
        assert attention.choose(mask, q, None) == "blockwise"  # said explicitly: a cache does not change it
        got = jax.jit(lambda q, k, v: attention.blockwise(q, k, v, mask, 1 / np.sqrt(d), block_q=2, block_k=8))(q, k, v)
        np.testing.assert_allclose(got, want, atol=2e-6)


def test_blockwise_backward_keeps_nothing_quadratic():
    """Compiled forward + backward temporaries grow linearly with the sequence: 4x the tokens, at most ~4.5x the
    bytes (the dense path grows ~16x: its scores are T x T)."""

    def temp(fn, s):
        q = jax.ShapeDtypeStruct((1, s, 4, 32), jnp.float32)
        k = jax.ShapeDtypeStruct((1, s, 2, 32), jnp.float32)

        def loss(q, k, v):
            step = begin_step(1, s, None, None)
            return (fn(q, k, v, step) ** 2).sum()

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, k).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    blockwise = lambda q, k, v, step: attention.blockwise(
        q,
        k,
        v,
        step.mask(False),
        0.2,  # noqa: E731
        block_q=128,
        block_k=128,
    )
    dense = lambda q, k, v, step: dense_attend(q, k, v, step.causal)  # noqa: E731
    small, large = temp(blockwise, 512), temp(blockwise, 2048)
    assert large <= 4.5 * small, (small, large)
    assert temp(dense, 2048) >= 12 * temp(dense, 512)  # the check can tell quadratic from linear


def test_splash_forward_in_interpret_mode():
    """The Pallas TPU splash kernel, run by Pallas' interpreter on this backend: the dense outputs on packed rows
    with padding, a window, grouped heads and a soft-cap."""
    inputs = _inputs(b=1, s=128, h=2, kv=1, d=32)
    splash = lambda q, k, v, m, sc, cap: attention.splash(
        q,
        k,
        v,
        m,
        sc,
        cap,
        interpret=True,  # noqa: E731
        block=128,
    )
    _compare(splash, 40, 5.0, 2e-5, inputs, grads=False)


@pytest.mark.slow
@pytest.mark.parametrize("window,softcap", [(None, None), (40, 5.0)])
def test_splash_gradients_in_interpret_mode(window, softcap):
    """The splash kernel's forward and backward (two blocks of 128) against the dense path."""
    inputs = _inputs(b=1, s=256, h=4, kv=2, d=32)
    splash = lambda q, k, v, m, sc, cap: attention.splash(
        q,
        k,
        v,
        m,
        sc,
        cap,
        interpret=True,  # noqa: E731
        block=128,
    )
    _compare(splash, window, softcap, 2e-5, inputs)


def test_auto_and_refusals():
    q, k, v, seg = _inputs()
    step = begin_step(2, 50, None, None, 7, seg)
    if jax.default_backend() == "cpu":
        assert attention.choose(step.mask(True), q, None) == "blockwise"
    assert attention.choose(attention.Mask(None, None, jnp.zeros((), jnp.int32), cached=True), q, None) == "xla"
    with pytest.raises(ValueError, match=r"attention implementation must be one of .*'blockwise'.* got 'flash'"):
        step.mask(False, "flash")
    with pytest.raises(ValueError, match="cudnn attention has no logit soft-capping"):
        attention.attend(q, k, v, step.mask(False, "cudnn"), softcap=5.0)
    with pytest.raises(ValueError, match="splash attention needs .* a multiple of 128, got 50"):
        attention.attend(q, k, v, step.mask(False, "splash"))
    with pytest.raises(ValueError, match="query heads must be a multiple of the 3 key/value heads"):
        attention.attend(q, jnp.zeros((2, 50, 3, 8)), jnp.zeros((2, 50, 3, 8)), step.mask(False))


# ------------------------------------------------------------------------------------------- the decoder


def _tiny_llama(window=None):
    hf = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    config = llama.Config.from_hf(hf)
    if window is not None:
        import dataclasses

        config = dataclasses.replace(config, sliding_window=window, sliding_layers=(True, False))
    return config, llama.build(config), llama.init_params(config, jax.random.key(0))


@pytest.mark.parametrize("window", [6, pytest.param(None, marks=pytest.mark.slow)])
def test_decoder_logits_and_lora_gradients_do_not_depend_on_the_implementation(window, monkeypatch):
    """A 2-layer Llama with grouped heads (and a sliding window on layer 0) on packed rows: ``attention=blockwise``
    (in blocks of 8, so the rows span several) gives the ``xla`` path's logits and adapter gradients."""
    monkeypatch.setattr(attention, "BLOCK", 8)
    config, model, params = _tiny_llama(window)
    rng = np.random.RandomState(0)
    ids = jnp.asarray(rng.randint(0, config.vocab_size, (2, 30)), jnp.int32)
    seg = np.zeros((2, 30), np.int32)
    seg[0, :11], seg[0, 11:27], seg[1, :23] = 1, 2, 1
    seg = jnp.asarray(seg)
    adapters = lora.init(params, r=4, targets="all-linear", key=jax.random.key(1))
    adapters = jax.tree.map(lambda x: x + 0.05 if x.ndim == 2 else x, adapters)  # B != 0: gradients reach A

    def run(impl):
        m = model.clone(attention=impl)

        def loss(ad):
            logits, _ = m.apply({"params": lora.wrap(params, ad)}, ids, segment_ids=seg)
            return jnp.where(seg[..., None] != 0, jax.nn.log_softmax(logits), 0).sum(), logits

        return jax.jit(jax.grad(loss, has_aux=True))(adapters)

    (g_x, logits_x), (g_b, logits_b) = run("xla"), run("blockwise")
    valid = np.asarray(seg != 0)[..., None]
    np.testing.assert_allclose(np.where(valid, logits_b, 0), np.where(valid, logits_x, 0), atol=2e-5)
    for a, b in zip(jax.tree.leaves(g_b), jax.tree.leaves(g_x)):
        np.testing.assert_allclose(a, b, atol=1e-4 * float(np.abs(b).max()) + 1e-7)
    assert model.attention == "auto"


def test_cached_generation_is_unchanged_by_the_setting():
    """With a KV cache ``auto`` attends densely; prefill + one-token steps with ``blockwise`` match it."""
    from lora_jax.models.generate import init_cache

    config, model, params = _tiny_llama(5)
    ids = jnp.asarray(np.random.RandomState(2).randint(0, config.vocab_size, (1, 12)), jnp.int32)
    outs = {}
    for impl in ("auto", "blockwise"):
        apply = jax.jit(model.clone(attention=impl).apply)
        cache = init_cache(config, 1, 16)
        logits, cache = apply({"params": params}, ids[:, :8], cache=cache)
        steps = [logits]
        for t in range(8, 12):
            logits, cache = apply({"params": params}, ids[:, t : t + 1], cache=cache)
            steps.append(logits)
        outs[impl] = jnp.concatenate(steps, axis=1)
    full, _ = jax.jit(model.apply)({"params": params}, ids)
    np.testing.assert_allclose(outs["blockwise"], outs["auto"], atol=2e-5)
    np.testing.assert_allclose(outs["auto"], full, atol=2e-5)


def test_train_config_key_reaches_the_model():
    from train.config import ConfigError, load_config

    cfg = load_config(None, ["model.attention=xla"])
    assert cfg.model.attention == "xla"
    with pytest.raises(ConfigError, match="model.attention"):
        load_config(None, ["model.attention=flash"])


@pytest.mark.slow
def test_a_model_with_its_own_attention_refuses_the_key():
    from train import loop
    from train.config import ConfigError, load_config

    bert = load_config(None, ["model.name=all-MiniLM-L6-v2", "data.task=classification", "model.attention=xla"])
    with pytest.raises(ConfigError, match="model.attention=xla: all-MiniLM-L6-v2 has its own attention"):
        loop.load_model(bert)
