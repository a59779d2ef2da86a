"""lora.transform on every weight kind the library has, on stock Flax models it did not write.

- QLoRA: a quantised base (``lora.quantize``) trains through ``lora.transform`` and matches the same model
  with its kernels dequantised, step for step; the compiled step does not hold the dense base.
- Mixed-adapter batches: ``lora.wrap_mixed`` with 4 adapters equals running each row with its own adapter.
- DoRA: equals the merged DoRA kernel, and its gradients equal those of DoRA's definition (norm detached).
- What transform cannot do raises :class:`lora.UnsupportedError` naming the leaf.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lora


@pytest.fixture(autouse=True, scope="module")
def fast_compiles():
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


class Block(nn.Module):
    """Stock Flax layers only: multi-head attention, layer norm, an MLP, a vocabulary head."""

    d: int = 32
    heads: int = 4
    vocab: int = 11

    @nn.compact
    def __call__(self, x):
        h = nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(x)
        x = nn.LayerNorm()(x + h)
        x = x + nn.Dense(self.d, name="proj")(nn.gelu(nn.Dense(2 * self.d, name="fc")(x)))
        return nn.Dense(self.vocab, name="head")(x)


MODEL = Block()
X = jax.random.normal(jax.random.key(1), (4, 6, 32))
PARAMS = MODEL.init(jax.random.key(0), X)["params"]
FWD = lora.transform(lambda p, x: MODEL.apply({"params": p}, x))


def bump(adapters, seed=3, std=0.1):
    """Non-zero ``B`` (and a DoRA magnitude off the column norms), so the adapters change the output."""
    leaves, treedef = jax.tree_util.tree_flatten(adapters, is_leaf=lora.is_adapter)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = []
    for ad, k in zip(leaves, keys):
        b = std * jax.random.normal(k, ad.b.shape, ad.b.dtype)
        m = None if ad.magnitude is None else ad.magnitude * (1 + 0.2 * jax.random.normal(k, ad.magnitude.shape))
        out.append(type(ad)(ad.a, b, ad.alpha, ad.scale, ad.in_shape, ad.out_shape, ad.dropout, m))
    return jax.tree_util.tree_unflatten(treedef, out)


def max_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ------------------------------------------------------------------------------------------------ QLoRA


def train(base, adapters, steps=4):
    """A few AdamW steps of the adapters through transform; returns the losses and the adapters."""
    tx = optax.adam(1e-2)
    y = jax.random.randint(jax.random.key(5), X.shape[:2], 0, MODEL.vocab)

    @jax.jit
    def step(ad, state, base):
        def loss(ad):
            logits = FWD(lora.wrap(base, ad), X)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        value, g = jax.value_and_grad(loss)(ad)
        updates, state = tx.update(g, state, ad)
        return optax.apply_updates(ad, updates), state, value

    state, losses = tx.init(adapters), []
    for _ in range(steps):
        adapters, state, value = step(adapters, state, base)
        losses.append(float(value))
    return losses, adapters


def test_qlora_trains_through_transform_like_the_dequantised_model():
    """Fails before this issue: transform refused a QuantizedWeight base (NotImplementedError)."""
    q = lora.quantize(PARAMS, "nf4", block_size=64)
    assert any(
        isinstance(x, lora.QuantizedWeight)
        for x in jax.tree.leaves(q, is_leaf=lambda z: isinstance(z, lora.QuantizedWeight))
    )
    dense = lora.dequantize(q)
    adapters = bump(lora.init(PARAMS, r=4, targets="qv"))
    np.testing.assert_allclose(FWD(lora.wrap(q, adapters), X), FWD(lora.wrap(dense, adapters), X), atol=1e-5)
    losses_q, ad_q = train(q, adapters)
    losses_d, ad_d = train(dense, adapters)
    np.testing.assert_allclose(losses_q, losses_d, rtol=1e-5)
    assert losses_q[-1] < losses_q[0]
    assert max_diff(ad_q, ad_d) < 1e-4


def test_qlora_step_does_not_hold_the_dense_base():
    """The compiled step's temporaries over a quantised base stay below those of dequantising the base first,
    by at least most of the dense kernels' bytes (XLA's memory analysis, nothing runs)."""
    model = Block(d=256, heads=4, vocab=256)
    x = jax.ShapeDtypeStruct((2, 4, 256), jnp.float32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape))["params"])
    q = jax.tree_util.tree_map_with_path(
        lambda p, a: (
            jax.eval_shape(lambda w: lora.quant.quantize_array(w, "nf4"), a)
            if lora.targets.path_str(p).endswith("kernel")
            else a
        ),
        params,
    )
    adapters = jax.eval_shape(lambda p: lora.init(p, r=4, targets="qv"), params)
    fwd = lora.transform(lambda p, x: model.apply({"params": p}, x))

    def temp(first):
        def loss(ad, base, x):
            base = lora.dequantize(base) if first else base
            return jnp.mean(fwd(lora.wrap(base, ad), x) ** 2)

        return jax.jit(jax.grad(loss)).lower(adapters, q, x).compile().memory_analysis().temp_size_in_bytes

    dense_bytes = sum(4 * a.size for p, a in lora.targets.leaf_paths(params) if p.endswith("kernel"))
    assert temp(True) - temp(False) > 0.5 * dense_bytes


# --------------------------------------------------------------------------------------- mixed batches


def test_mixed_batch_of_four_adapters_on_a_stock_linen_model():
    """Fails before this issue: TypeError 'float() argument must be ... not MultiLoraWeight' inside Flax."""
    ads = [
        bump(lora.init(PARAMS, r=2 + i, alpha=3.0, targets="all-linear", key=jax.random.key(i)), seed=i)
        for i in range(4)
    ]
    ids = jnp.array([2, 0, 3, 1])
    mixed = jax.jit(lambda p, s, ids, x: FWD(lora.wrap_mixed(p, s, ids), x))(PARAMS, lora.stack_adapters(ads), ids, X)
    base = MODEL.apply({"params": PARAMS}, X)
    for row, k in enumerate(ids.tolist()):
        alone = FWD(lora.wrap(PARAMS, ads[k]), X[row : row + 1])[0]
        np.testing.assert_allclose(mixed[row], alone, atol=2e-5)
        assert float(jnp.abs(alone - base[row]).max()) > 1e-2  # each adapter really changes its row
    # -1: the base model alone; and the same compiled step over a quantised base
    q = lora.quantize(PARAMS, "nf4")
    out = FWD(lora.wrap_mixed(q, lora.stack_adapters(ads), jnp.array([-1, 1, -1, 0])), X)
    ref = MODEL.apply({"params": lora.dequantize(q)}, X)
    np.testing.assert_allclose(out[0], ref[0], atol=2e-5)
    np.testing.assert_allclose(out[1], FWD(lora.wrap(lora.dequantize(q), ads[1]), X[1:2])[0], atol=2e-5)


def test_mixed_batch_errors_name_the_leaf():
    class Embedder(nn.Module):
        @nn.compact
        def __call__(self, ids):
            return nn.Dense(3)(nn.Embed(10, 8, name="embed")(ids))

    model = Embedder()
    ids = jnp.zeros((2, 3), jnp.int32)
    params = model.init(jax.random.key(0), ids)["params"]
    ad = lora.init(params, r=2, targets="embed/embedding", allow_embeddings=True)
    fwd = lora.transform(lambda p, x: model.apply({"params": p}, x))
    with pytest.raises(lora.UnsupportedError, match="embed/embedding"):
        fwd(lora.wrap_mixed(params, lora.stack_adapters([ad, ad]), jnp.array([0, 1])), ids)
    # rows that are not the activations' first axis
    ad2 = lora.init(PARAMS, r=2, targets="fc/kernel")
    with pytest.raises(lora.UnsupportedError, match="fc/kernel.*rows"):
        FWD(lora.wrap_mixed(PARAMS, lora.stack_adapters([ad2, ad2]), jnp.array([0, 1, 0])), X)


# ------------------------------------------------------------------------------------------------- DoRA


def dora_reference(wrapped):
    """DoRA's definition: m * (W0 + s*A@B) / ||W0 + s*A@B||, the norm detached (Liu et al. 2024, sec. 4.3)."""

    def kernel(w):
        if not lora.is_lora_weight(w):
            return w
        ad = w.adapter
        v = (w.base + ad.delta()).reshape(math.prod(ad.in_shape), -1)
        norm = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(v * v, axis=0)))
        return (v * ad.magnitude / norm).reshape(w.base.shape)

    return jax.tree.map(kernel, wrapped, is_leaf=lora.is_lora_weight)


def test_dora_through_transform():
    """Fails before this issue: transform refused DoRA adapters (NotImplementedError)."""
    ad = bump(lora.init(PARAMS, r=4, targets="all-linear", use_dora=True))
    out, report = lora.transform(lambda p, x: MODEL.apply({"params": p}, x), report=True)(lora.wrap(PARAMS, ad), X)
    assert report.n_materialized == 0 and report.n_factored == 6
    merged = MODEL.apply({"params": lora.merge(PARAMS, ad)}, X)
    np.testing.assert_allclose(out, merged, atol=2e-5)
    assert float(jnp.abs(merged - MODEL.apply({"params": PARAMS}, X)).max()) > 1e-2

    def loss(fwd):
        return lambda a: jnp.mean(jnp.sin(fwd(a)))

    g = jax.grad(loss(lambda a: FWD(lora.wrap(PARAMS, a), X)))(ad)
    want = jax.grad(loss(lambda a: MODEL.apply({"params": dora_reference(lora.wrap(PARAMS, a))}, X)))(ad)
    for got, ref in zip(jax.tree.leaves(g), jax.tree.leaves(want)):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)


def test_dora_kernel_used_densely_is_materialised_and_reported():
    """A transposed DoRA kernel (its output axes contracted) has no factored form here: it is materialised
    (correctly) and the report says why."""
    params = {"w": jax.random.normal(jax.random.key(0), (8, 5))}
    ad = bump(lora.init(params, r=2, targets="w", use_dora=True))
    x = jax.random.normal(jax.random.key(1), (3, 5))
    f = lambda p, x: x @ p["w"].T  # noqa: E731
    out, report = lora.transform(f, report=True)(lora.wrap(params, ad), x)
    np.testing.assert_allclose(out, f(lora.merge(params, ad), x), atol=1e-5)
    assert report.n_materialized == 1 and "DoRA" in str(report)
