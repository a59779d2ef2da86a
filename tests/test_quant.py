"""QLoRA: NF4 + double quantisation and int8 kernels, the ops that dequantise them, and LoRA over them."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lora
from conftest import require
from lora_jax import ops, quant
from lora_jax.models.layers import Dense

HALF_GAP = float(np.max(np.diff(quant.NF4))) / 2  # 0.1519: the worst rounding of a value in [-1, 1]


def _unpack(codes: np.ndarray) -> np.ndarray:
    """Packed uint8 -> 4-bit indices, high nibble first."""
    codes = np.asarray(codes)
    return np.stack([codes >> 4, codes & 0xF], axis=-1).reshape(-1)


def _blocks(w: np.ndarray, block: int) -> np.ndarray:
    flat = np.asarray(w, np.float32).reshape(-1)
    return np.pad(flat, (0, -flat.size % block)).reshape(-1, block)


def _weights(shape, seed=0, std=0.02):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * std


# --------------------------------------------------------------------------------------- the data types


def test_nf4_table_and_dynamic_map_shapes():
    assert quant.NF4.shape == (16,) and quant.NF4[0] == -1.0 and quant.NF4[7] == 0.0 and quant.NF4[-1] == 1.0
    assert np.all(np.diff(quant.NF4) > 0)
    assert HALF_GAP == pytest.approx((1.0 - 0.6961928009986877) / 2)
    code = quant.DYNAMIC
    assert code.shape == (256,) and np.all(np.diff(code) >= 0) and code[-1] == 1.0 and 0.0 in code
    assert code.min() == pytest.approx(-0.99297, abs=1e-5)  # the signed code's most negative value
    assert np.abs(code).min() == 0.0 and np.sort(np.abs(code[code != 0]))[0] == pytest.approx(5.5e-7, rel=1e-2)


def test_nf4_codes_equal_nearest_value_reference():
    # 3 * 70 = 210 values: 3 whole blocks of 64 and a partial one; one all-zero block.
    w = _weights((3, 70), seed=1)
    w[1, :] = 0.0
    w[1, 60:] = _weights((10,), seed=2)
    q = quant.quantize_array(jnp.asarray(w), "nf4", block_size=64, double_quant=False)
    blocks = _blocks(w, 64)
    absmax = np.abs(blocks).max(axis=1)
    np.testing.assert_array_equal(np.asarray(q.absmax), absmax)
    scaled = blocks / np.where(absmax == 0, 1, absmax)[:, None]
    reference = np.argmin(np.abs(scaled[..., None] - quant.NF4), axis=-1).reshape(-1)
    np.testing.assert_array_equal(_unpack(q.codes), reference)
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (4 * 64 // 2,)
    np.testing.assert_array_equal(
        np.asarray(q.dequantize(jnp.float32)).reshape(-1),
        (quant.NF4[reference].reshape(-1, 64) * absmax[:, None]).reshape(-1)[:210],
    )


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_blockwise_error_bound(double_quant):
    w = _weights((192, 320), seed=3) * np.random.default_rng(4).uniform(0.1, 10, (192, 1)).astype(np.float32)
    q = quant.quantize_array(jnp.asarray(w), "nf4", double_quant=double_quant)
    err = np.abs(_blocks(np.asarray(q.dequantize(jnp.float32)), 64) - _blocks(w, 64)).max(axis=1)
    absmax = np.abs(_blocks(w, 64)).max(axis=1)
    bound = HALF_GAP * absmax
    if double_quant:
        # the block's scale is itself rounded: to the nearest dynamic-code value of its 256-block
        absmax_hat = np.asarray(quant._absmax_f32(q))
        dyn_half_gap = float(np.max(np.diff(quant.DYNAMIC))) / 2
        scale2 = np.repeat(np.asarray(q.absmax_scale), 256)[: absmax.size]
        assert np.all(np.abs(absmax_hat - absmax) <= dyn_half_gap * scale2 * (1 + 1e-5) + 1e-9)
        bound = bound + np.abs(absmax_hat - absmax)
    assert np.all(err <= bound * (1 + 1e-5) + 1e-9)
    assert np.max(err / bound) > 0.8  # and tight: some block comes close to it


def test_round_trip():
    w = jnp.asarray(_weights((128, 256), seed=5))
    q = quant.quantize_array(w, "nf4", double_quant=False)
    once = q.dequantize(jnp.float32)
    # quantising an NF4 grid again is exact: the same codes, the same scales, the same values
    again = quant.quantize_array(once, "nf4", double_quant=False)
    np.testing.assert_array_equal(np.asarray(again.codes), np.asarray(q.codes))
    np.testing.assert_array_equal(np.asarray(again.dequantize(jnp.float32)), np.asarray(once))
    # Gaussian weights lose about 9% of their RMS to NF4, double quantisation adds next to nothing
    rel = lambda d: float(jnp.sqrt(jnp.mean((d - w) ** 2) / jnp.mean(w**2)))  # noqa: E731
    assert 0.05 < rel(once) < 0.11
    assert rel(quant.quantize_array(w, "nf4").dequantize(jnp.float32)) < rel(once) * 1.02
    # the compute dtype is what dequantize returns by default
    assert quant.quantize_array(w, "nf4", compute_dtype=jnp.bfloat16).dequantize().dtype == jnp.bfloat16
    assert lora.dequantize(q, jnp.bfloat16).dtype == jnp.bfloat16


def test_int8_per_channel_error_bound():
    w = _weights((96, 40), seed=6) * np.linspace(0.1, 5, 40, dtype=np.float32)  # very different columns
    q = quant.quantize_array(jnp.asarray(w), "int8")
    assert q.codes.dtype == jnp.int8 and q.codes.shape == w.shape and q.absmax.shape == (40,)
    absmax = np.abs(w).max(axis=0)
    np.testing.assert_array_equal(np.asarray(q.absmax), absmax)
    err = np.abs(np.asarray(q.dequantize(jnp.float32)) - w)
    assert np.all(err <= absmax / 254 * (1 + 1e-5))
    # a (heads, head_dim, d) output projection has one channel per output feature: in_ndim = 2
    qp = lora.quantize({"attn": {"out": {"kernel": jnp.asarray(_weights((4, 8, 16)))}}}, "int8")
    assert qp["attn"]["out"]["kernel"].absmax.shape == (16,)


# ----------------------------------------------------------------------------------------------- bytes


def test_stored_bytes_exact():
    w = jnp.asarray(_weights((768, 768)))
    q = quant.quantize_array(w, "nf4")
    # 768*768/2 bytes of codes, 9216 uint8 absmax codes, 36 float32 second-level scales, one float32 mean
    assert q.nbytes == 294_912 + 9_216 + 36 * 4 + 4 == quant.expected_nbytes((768, 768)) == 304_276
    assert q.bits_per_weight == pytest.approx(4.127, abs=1e-3)
    assert quant.quantize_array(w, "nf4", double_quant=False).nbytes == 294_912 + 9_216 * 4
    assert quant.quantize_array(w, "int8").nbytes == 768 * 768 + 768 * 4
    # partial blocks are stored whole
    assert quant.quantize_array(jnp.ones((7, 10)), "nf4").nbytes == quant.expected_nbytes((7, 10)) == 64 + 2 + 4 + 4
    params = {"dense": {"kernel": w, "bias": jnp.zeros(768)}, "embed": {"embedding": jnp.zeros((100, 768))}}
    qp = lora.quantize(params)
    assert quant.nbytes(qp) == 304_276 + 768 * 4 + 100 * 768 * 4
    assert quant.nbytes(params) == 768 * 768 * 4 + 768 * 4 + 100 * 768 * 4


# ----------------------------------------------------------------------------------------------- trees


def test_quantize_tree_targets_and_errors():
    params = {
        "embed": {"embedding": jnp.ones((50, 64))},
        "layer_0": {
            "attention": {"query": {"kernel": jnp.ones((64, 64)), "bias": jnp.zeros(64)}},
            "mlp": {"kernel": jnp.ones((64, 128))},
            "norm": {"scale": jnp.ones(64)},
        },
        "lm_head": {"kernel": jnp.ones((64, 50))},
    }
    qp = lora.quantize(params)
    quantized = sorted(p for p, leaf in lora.targets.leaf_paths(qp) if quant.is_quantized(leaf))
    assert quantized == ["layer_0/attention/query/kernel", "layer_0/mlp/kernel"]
    assert (
        qp["embed"]["embedding"] is params["embed"]["embedding"]
        and qp["lm_head"]["kernel"] is params["lm_head"]["kernel"]
    )
    assert qp["layer_0/attention/query/kernel".split("/")[0]]["attention"]["query"]["kernel"].dtype == jnp.bfloat16
    q = lora.quantize(params, targets=".*mlp/kernel", compute_dtype=None)["layer_0"]["mlp"]["kernel"]
    assert q.dtype == jnp.float32 and q.shape == (64, 128) and q.ndim == 2
    with pytest.raises(ValueError, match="already quantised"):
        lora.quantize(qp)
    with pytest.raises(ValueError, match="method must be one of"):
        lora.quantize(params, "fp3")
    with pytest.raises(ValueError, match="block_size must be one of"):
        lora.quantize(params, block_size=60)
    with pytest.raises(ValueError, match="matches no leaf"):
        lora.quantize(params, targets=".*nothing/kernel")
    with pytest.raises(ValueError, match="not an array with values"):
        lora.quantize(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))
    # dequantize a whole tree; pass it through jit (arrays are children, the format is static)
    back = jax.jit(lambda t: lora.dequantize(t, jnp.float32))(qp)
    assert back["layer_0"]["mlp"]["kernel"].shape == (64, 128) and back["embed"]["embedding"].dtype == jnp.float32
    leaves, treedef = jax.tree_util.tree_flatten(qp)
    assert jax.tree_util.tree_unflatten(treedef, leaves)["layer_0"]["mlp"]["kernel"].block_size == 64


def test_ops_on_quantized_kernels():
    w = jnp.asarray(_weights((64, 48), seed=7))
    q = quant.quantize_array(w, "nf4", compute_dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(0), (5, 64))
    dense = q.dequantize(jnp.float32)
    np.testing.assert_allclose(jax.jit(ops.dot)(x, q), x @ dense, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ops.einsum("bd,dk->bk", x, q), x @ dense, rtol=1e-5, atol=1e-6)
    # astype only records the compute dtype; the product then runs in bf16
    qb = ops.astype(q, jnp.bfloat16)
    assert quant.is_quantized(qb) and qb.codes is q.codes
    y = jax.jit(lambda x, q: ops.dot(x.astype(jnp.bfloat16), q))(x, qb)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), x @ dense, rtol=0.05, atol=0.05)
    np.testing.assert_array_equal(ops.materialize(q), dense)
    # multi-axis kernels: (d, heads, head_dim) and the output projection (heads, head_dim, d)
    w3 = quant.quantize_array(jnp.asarray(_weights((64, 4, 8))), "nf4", compute_dtype=jnp.float32)
    np.testing.assert_allclose(
        ops.einsum("bd,dnh->bnh", x, w3), jnp.einsum("bd,dnh->bnh", x, w3.dequantize()), rtol=1e-5, atol=1e-6
    )
    table = quant.quantize_array(jnp.asarray(_weights((20, 64))), "int8", compute_dtype=jnp.float32)
    np.testing.assert_array_equal(ops.embed(jnp.array([3, 7]), table), table.dequantize()[jnp.array([3, 7])])


# --------------------------------------------------------------------------------------- LoRA over them


def _random_b(adapters, scale=0.05):
    def fill(path, ad):
        k = jax.random.fold_in(jax.random.key(11), hash("/".join(lora.targets.path_tuple(path))) % 2**31)
        return lora.LoraAdapter(
            ad.a,
            scale * jax.random.normal(k, ad.b.shape),
            alpha=ad.alpha,
            scale=ad.scale,
            in_shape=ad.in_shape,
            out_shape=ad.out_shape,
            dropout=ad.dropout,
            magnitude=ad.magnitude,
        )

    return jax.tree_util.tree_map_with_path(fill, adapters, is_leaf=lora.is_adapter)


def test_lora_over_nf4_factored_equals_dequantized_merge_and_grads_only_reach_adapters():
    params = {"attn": {"kernel": jnp.asarray(_weights((64, 32), seed=8))}}
    qp = lora.quantize(params, compute_dtype=jnp.float32)
    ad = _random_b(lora.init(qp, r=4, alpha=8, targets="all-linear"))
    assert lora.adapter_items(ad)[0][1].kernel_shape == (64, 32)  # init read the logical shape
    x = jax.random.normal(jax.random.key(1), (6, 64))
    wrapped = lora.wrap(qp, ad)
    assert wrapped["attn"]["kernel"].shape == (64, 32) and wrapped["attn"]["kernel"].dtype == jnp.float32
    merged = lora.merge(qp, ad)["attn"]["kernel"]
    dense = qp["attn"]["kernel"].dequantize(jnp.float32)
    np.testing.assert_allclose(merged, dense + ad["attn"]["kernel"].delta(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ops.dot(x, wrapped["attn"]["kernel"]), x @ merged, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(wrapped["attn"]["kernel"].materialize(), merged, rtol=1e-6, atol=1e-7)

    def loss(adapters, base):
        return jnp.sum(jnp.tanh(ops.dot(x, lora.wrap(base, adapters)["attn"]["kernel"])))

    g = jax.jit(jax.grad(loss))(ad, qp)
    g_dense = jax.grad(loss)(ad, {"attn": {"kernel": dense}})  # the same loss with the dense base
    np.testing.assert_allclose(g["attn"]["kernel"].a, g_dense["attn"]["kernel"].a, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g["attn"]["kernel"].b, g_dense["attn"]["kernel"].b, rtol=1e-4, atol=1e-6)
    # unmerge of the dense merge gives back the dequantised base
    np.testing.assert_allclose(
        lora.unmerge({"attn": {"kernel": merged}}, ad, assume_merged=True)["attn"]["kernel"], dense, atol=1e-6
    )


def test_backward_recomputes_the_dequantised_kernel_instead_of_storing_it():
    # 8 layers of 512x512: the dense bf16 kernels would take 4 MiB; saved for the backward pass they would all be
    # alive at once. With the checkpointed dequantisation the step's temporaries stay well below that.
    layers = 8
    params = {f"l{i}": {"kernel": jnp.asarray(_weights((512, 512), seed=i))} for i in range(layers)}
    qp = lora.quantize(params)
    ad = lora.init(qp, r=8, targets="all-linear")
    x = jnp.ones((16, 512), jnp.bfloat16)

    def loss(adapters, base):
        h = x
        wrapped = lora.wrap(base, adapters)
        for i in range(layers):
            h = jnp.tanh(ops.dot(h, ops.astype(wrapped[f"l{i}"]["kernel"], jnp.bfloat16)))
        return jnp.sum(h.astype(jnp.float32))

    temp = jax.jit(jax.grad(loss)).lower(ad, qp).compile().memory_analysis().temp_size_in_bytes
    dense_bytes = layers * 512 * 512 * 2
    assert temp < dense_bytes / 2, (temp, dense_bytes)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jax.nn.gelu(Dense(64, name="fc1")(x))
        h = h + Dense(64, name="fc2")(h)
        return Dense(3, name="classifier")(h)


def test_qlora_on_a_flax_model_trains_and_merges():
    model = Net()
    x = jax.random.normal(jax.random.key(0), (64, 32))
    labels = jnp.argmax(x[:, :3], axis=-1)
    params = model.init(jax.random.key(1), x)["params"]
    qp = lora.quantize(params, compute_dtype=jnp.float32)
    assert not quant.is_quantized(qp["classifier"]["kernel"])  # heads stay in high precision
    ad = lora.init(qp, r=8, targets="all-linear")
    frozen, trainable = lora.split(qp, ad, train="classifier/.*")
    tx = optax.adam(3e-2)

    def loss(trainable, frozen):
        p, a = lora.combine(frozen, trainable)
        logits = model.apply({"params": lora.wrap(p, a)}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def step(trainable, opt_state):
        value, g = jax.value_and_grad(loss)(trainable, frozen)
        updates, opt_state = tx.update(g, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    state = tx.init(trainable)
    assert all(not quant.is_quantized(leaf) for leaf in jax.tree.leaves(trainable, is_leaf=quant.is_quantized))
    first = None
    for _ in range(30):
        trainable, state, value = step(trainable, state)
        first = value if first is None else first
    assert float(value) < 0.5 * float(first)
    p, a = lora.combine(frozen, trainable)
    merged = lora.merge(p, a)
    assert not any(quant.is_quantized(leaf) for leaf in jax.tree.leaves(merged, is_leaf=quant.is_quantized))
    np.testing.assert_allclose(
        model.apply({"params": merged}, x), model.apply({"params": lora.wrap(p, a)}, x), rtol=1e-4, atol=1e-4
    )
    s = lora.summary(p, a)
    n_dense = sum(x.size for x in jax.tree.leaves(params))
    assert s.total == n_dense + sum(int(v.a.size + v.b.size) for _, v in lora.adapter_items(a))
    assert s.total_bytes < n_dense * 4 / 2  # stored bytes, not logical float32 bytes


def test_optimizer_labels_see_a_quantized_base_as_frozen():
    params = {"attn": {"kernel": jnp.asarray(_weights((64, 32)))}, "head": {"kernel": jnp.ones((32, 2))}}
    qp = lora.quantize(params, targets="attn/kernel")
    wrapped = lora.wrap(qp, lora.init(qp, r=2, targets="attn/kernel"))
    labels = lora.trainable_labels(wrapped)
    assert jax.tree.structure(labels) == jax.tree.structure(jax.tree.map(lambda _: 0, wrapped))
    flat = {lora.targets.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(labels)[0]}
    assert flat["attn/kernel/adapter/a"] == "trainable" and flat["attn/kernel/base/codes"] == "frozen"


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_merge_quantized_requantizes_and_reports_the_error(method):
    params = {"attn": {"kernel": jnp.asarray(_weights((128, 64), seed=9))}, "other": {"kernel": jnp.ones((64, 64))}}
    qp = lora.quantize(params, method, targets="attn/kernel", compute_dtype=jnp.float32)
    for b_scale, expect_kept in [(0.05, True), (1e-6, False)]:
        ad = _random_b(lora.init(qp, r=4, targets="attn/kernel"), scale=b_scale)
        out, errors = lora.merge_quantized(qp, ad)
        q_new = out["attn"]["kernel"]
        assert quant.is_quantized(q_new) and q_new.method == method and q_new.shape == (128, 64)
        assert q_new.block_size == qp["attn"]["kernel"].block_size and q_new.dtype == jnp.float32
        assert out["other"]["kernel"] is qp["other"]["kernel"]
        exact = lora.merge(qp, ad)["attn"]["kernel"]
        err = errors["attn/kernel"]
        actual = np.abs(np.asarray(q_new.dequantize(jnp.float32) - exact))
        assert err.max_abs == pytest.approx(float(actual.max()), rel=1e-5)
        assert err.rms == pytest.approx(float(np.sqrt(np.mean(actual**2))), rel=1e-4)
        # a large update survives re-quantisation; a tiny one is below the grid and the report says so
        assert (err.relative < 1.0) == expect_kept, err
    dense, none = lora.merge_quantized(qp, ad, requantize=False)
    assert none == {} and not quant.is_quantized(dense["attn"]["kernel"])


def test_matches_bitsandbytes():
    import torch

    require("bitsandbytes")
    import bitsandbytes.functional as bnb

    assert np.array_equal(bnb.get_4bit_type("nf4", device="cpu").numpy(), quant.NF4)
    assert np.array_equal(bnb.create_dynamic_map().numpy(), quant.DYNAMIC)
    for seed in range(3):
        w = _weights((256, 320), seed=seed, std=0.05)
        packed, state = bnb.quantize_4bit(torch.from_numpy(w), blocksize=64, compress_statistics=True, quant_type="nf4")
        q = quant.quantize_array(jnp.asarray(w), "nf4")
        np.testing.assert_array_equal(np.asarray(q.codes), packed.numpy().reshape(-1))  # codes bit for bit
        assert float(q.absmax_mean) == pytest.approx(state.offset.item(), rel=1e-6)
        np.testing.assert_allclose(np.asarray(q.absmax_scale), state.state2.absmax.numpy(), rtol=1e-6)
        # bitsandbytes' 8-bit search is not always the nearest value: the absmax codes agree to one step
        ours, theirs = np.asarray(q.absmax).astype(int), state.absmax.numpy().astype(int)
        assert np.mean(ours == theirs) > 0.98 and np.abs(ours - theirs).max() <= 1
        ref = bnb.dequantize_4bit(packed, state).numpy()
        # where they differ, a block scale is one dynamic-code step apart: the values by at most that step
        step = float(np.max(np.diff(quant.DYNAMIC))) * float(np.max(q.absmax_scale))
        np.testing.assert_allclose(np.asarray(q.dequantize(jnp.float32)), ref, rtol=0, atol=step * 1.001)
        same = np.repeat(ours == theirs, 64)  # blocks whose scale codes agree: the same values up to rounding
        np.testing.assert_allclose(
            np.asarray(q.dequantize(jnp.float32)).reshape(-1)[same], ref.reshape(-1)[same], rtol=1e-6, atol=1e-9
        )
        _, plain = bnb.quantize_4bit(torch.from_numpy(w), blocksize=64, compress_statistics=False, quant_type="nf4")
        np.testing.assert_array_equal(
            np.asarray(quant.quantize_array(jnp.asarray(w), "nf4", double_quant=False).absmax), plain.absmax.numpy()
        )


def test_bits_per_weight_matches_the_paper():
    # QLoRA sec. 3: 32/64 = 0.5 bits per parameter of absmax become 8/64 + 32/(64*256) = 0.127 (+ one float32 mean)
    n = 1024 * 1024
    w = jnp.ones((1024, 1024))
    assert quant.quantize_array(w, "nf4").bits_per_weight == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / n)
    assert quant.quantize_array(w, "nf4", double_quant=False).bits_per_weight == 4.5
    assert math.isclose(quant.quantize_array(w, "int8").bits_per_weight, 8 + 32 / 1024)


def test_transform_takes_a_quantised_base():
    """lora.transform dequantises a quantised base at the product (it used to ask for a dense base)."""
    qp = lora.quantize({"w": jnp.asarray(_weights((64, 64)))}, targets="w")
    ad = lora.init(qp, r=2, targets="w")
    f = lora.transform(lambda p, x: x @ p["w"])
    x = jnp.ones((2, 64))
    np.testing.assert_allclose(f(lora.wrap(qp, ad), x), f(lora.wrap(lora.dequantize(qp), ad), x), rtol=1e-6)


def test_real_minilm_in_nf4_keeps_its_sentence_embeddings(minilm_path):
    from lora_jax.models import bert, load

    model, params, tokenizer, _ = load(str(minilm_path))
    qp = lora.quantize(params, compute_dtype=jnp.float32)
    quantized = [p for p, leaf in lora.targets.leaf_paths(qp) if quant.is_quantized(leaf)]
    # q, k, v, attention output, intermediate, output in 6 layers, and the pooler; never the embeddings
    assert len(quantized) == 6 * 6 + 1 and "pooler/dense/kernel" in quantized
    assert not any("embeddings" in p for p in quantized)
    shapes = [leaf.shape for p, leaf in lora.targets.leaf_paths(params) if p in quantized]
    assert quant.nbytes(qp) == quant.nbytes(params) - sum(4 * math.prod(s) for s in shapes) + sum(
        quant.expected_nbytes(s) for s in shapes
    )  # exactly: the embeddings (half of MiniLM) stay float32
    sentences = [
        "A man is playing a guitar.",
        "A person plays the guitar.",
        "The central bank raised interest rates by half a percentage point.",
    ]
    enc = tokenizer(sentences, padding=True, return_tensors="np")

    def embed(p):
        out = jax.jit(model.apply)({"params": p}, enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
        return np.asarray(bert.sentence_embedding(out.last_hidden_state, enc["attention_mask"]))

    full, nf4 = embed(params), embed(qp)
    assert np.all(np.sum(full * nf4, axis=-1) > 0.95), np.sum(full * nf4, axis=-1)  # cosine to full precision: 0.97
    cos = nf4 @ nf4.T
    assert cos[0, 1] > 0.6 and abs(cos[0, 2]) < 0.2  # still tells a paraphrase from an unrelated sentence
    # and QLoRA adapters on it start at the quantised model
    adapters = lora.init(qp, r=4, targets="qv")
    np.testing.assert_allclose(embed(lora.wrap(qp, adapters)), nf4, atol=1e-6)


@pytest.mark.parametrize("method,double_quant", [("int8", False), ("nf4", False), ("nf4", True)])
def test_split_combine_round_trips_a_quantized_base_with_a_trained_head(method, double_quant):
    # An int8 or single-quantised kernel has empty (None) second-level scale fields; combine must not take them
    # for trained leaves that went missing.
    params = {"layer": {"kernel": jnp.asarray(_weights((64, 32)))}, "head": {"kernel": jnp.zeros((32, 2))}}
    q = lora.quantize(params, method, double_quant=double_quant, targets="layer/kernel", block_size=64)
    adapters = lora.init(q, r=4, targets="layer/kernel")
    frozen, trainable = lora.split(q, adapters, train="head/.*")
    assert frozen["head"]["kernel"] is None and set(trainable["params"]) == {"head"}
    params2, adapters2 = lora.combine(frozen, trainable)
    assert jax.tree.structure(params2) == jax.tree.structure(q)
    for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(q)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert adapters2 is adapters
