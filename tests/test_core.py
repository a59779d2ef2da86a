"""The adapter tree: init, merge, unmerge, wrap, split/combine, summary."""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.extend import core as jex_core

import lora_jax as lora
from lora_jax.models.layers import Dense


class Block(nn.Module):
    """A small transformer-ish block written with the project's Dense (so LoRA runs factored)."""

    d: int = 32

    @nn.compact
    def __call__(self, x):
        q = Dense(self.d, name="query")(x)
        v = Dense(self.d, name="value")(x)
        h = x + Dense(self.d, name="out")(jax.nn.tanh(q) * v)
        return Dense(self.d, name="mlp")(jax.nn.gelu(h))


class Net(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(50, 32, name="embed")(ids)
        for i in range(2):
            x = Block(name=f"layer_{i}")(x)
        return Dense(3, name="classifier")(x.mean(axis=1))


@pytest.fixture(scope="module")
def net():
    model = Net()
    ids = jax.random.randint(jax.random.key(1), (4, 7), 0, 50)
    params = model.init(jax.random.key(0), ids)["params"]
    return model, params, ids


def _random_b(adapters, key=None, scale=0.1):
    """Adapters with non-zero B, so that merge/wrap actually change the model."""
    items = lora.adapter_items(adapters)
    key = jax.random.key(7) if key is None else key
    keys = dict(zip([p for p, _ in items], jax.random.split(key, len(items))))

    def fill(path, ad):
        p = "/".join(lora.targets.path_tuple(path))
        return lora.LoraAdapter(
            ad.a,
            scale * jax.random.normal(keys[p], ad.b.shape),
            alpha=ad.alpha,
            scale=ad.scale,
            in_shape=ad.in_shape,
            out_shape=ad.out_shape,
            dropout=ad.dropout,
        )

    return jax.tree_util.tree_map_with_path(fill, adapters, is_leaf=lora.is_adapter)


# ------------------------------------------------------------------------------------------------ init


def test_default_targets_attention_kernels(net):
    _, params, _ = net
    # Net names no scope "attention"/"attn": the default preset finds nothing, and says so.
    with pytest.raises(ValueError, match="preset 'attention' matches no kernel"):
        lora.init(params, r=4)
    wrapped = {"encoder": {"attention": params["layer_0"]}}
    ad = lora.init(wrapped, r=4)
    assert [p for p, _ in lora.adapter_items(ad)] == [  # (not encoder/attention/mlp: an MLP inside the block)
        "encoder/attention/out/kernel",
        "encoder/attention/query/kernel",
        "encoder/attention/value/kernel",
    ]


def test_init_shapes_scale_and_determinism(net):
    _, params, _ = net
    ad = lora.init(params, r=4, alpha=16, targets=".*/(query|value)/kernel")
    items = dict(lora.adapter_items(ad))
    assert sorted(items) == [f"layer_{i}/{n}/kernel" for i in range(2) for n in ("query", "value")]
    a = items["layer_0/query/kernel"]
    assert a.a.shape == (32, 4) and a.b.shape == (4, 32) and a.r == 4
    assert a.scale == 4.0 and a.alpha == 16.0
    np.testing.assert_array_equal(a.b, 0.0)
    bound = 1 / math.sqrt(32)
    assert float(jnp.abs(a.a).max()) <= bound and float(jnp.abs(a.a).max()) > 0.5 * bound
    again = lora.init(params, r=4, alpha=16, targets=".*/(query|value)/kernel")
    chex.assert_trees_all_equal(ad, again)  # key=None is deterministic
    other = lora.init(params, r=4, alpha=16, targets=".*/(query|value)/kernel", key=jax.random.key(3))
    assert not np.allclose(lora.adapter_items(other)[0][1].a, a.a)


def test_rslora_gaussian_and_patterns(net):
    _, params, _ = net
    ad = lora.init(
        params,
        r=4,
        alpha=8,
        targets="all-linear",
        use_rslora=True,
        init="gaussian",
        rank_pattern={".*/mlp/kernel": 2},
        alpha_pattern={"layer_1/.*": 2.0},
        dtype=jnp.bfloat16,
    )
    items = dict(lora.adapter_items(ad))
    assert "classifier/kernel" not in items and "embed/embedding" not in items  # head and embedding excluded
    assert items["layer_0/mlp/kernel"].r == 2 and items["layer_0/query/kernel"].r == 4
    assert items["layer_0/query/kernel"].scale == pytest.approx(8 / 2)  # alpha / sqrt(r)
    assert items["layer_1/query/kernel"].scale == pytest.approx(2 / 2)
    assert items["layer_0/mlp/kernel"].scale == pytest.approx(8 / math.sqrt(2))
    assert items["layer_0/query/kernel"].a.dtype == jnp.bfloat16
    std = float(jnp.std(items["layer_0/query/kernel"].a.astype(jnp.float32)))
    assert 0.1 < std < 0.5  # N(0, 1/r^2) with r=4 -> std 0.25


def test_exclude(net):
    _, params, _ = net
    ad = lora.init(params, r=2, targets="all-linear", exclude=["layer_1/.*", ".*/mlp/kernel"])
    assert sorted(p for p, _ in lora.adapter_items(ad)) == [
        "layer_0/out/kernel",
        "layer_0/query/kernel",
        "layer_0/value/kernel",
    ]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(targets=".*/nope/kernel"), "matches no leaf"),
        (dict(targets="qkv"), "neither a preset"),
        (dict(targets=".*/query/bias"), "at least two axes"),
        (dict(targets="embed/embedding"), "embedding"),
        (dict(targets="all-linear", exclude="zzz"), "exclude rule"),
        (dict(targets="all-linear", rank_pattern={"nothing": 2}), "rank_pattern"),
        (dict(r=0), "positive"),
        (dict(r=64, targets=".*/query/kernel"), "exceeds min"),
        (dict(init="xavier"), "init must be"),
        (dict(targets="[unclosed"), "not a valid pattern"),
    ],
)
def test_bad_targets_are_errors(net, kwargs, message):
    _, params, _ = net
    with pytest.raises(ValueError, match=message):
        lora.init(params, **kwargs)


def test_no_match_lists_candidates(net):
    _, params, _ = net
    with pytest.raises(ValueError) as e:
        lora.init(params, targets=".*/key/kernel")
    assert "layer_0/query/kernel" in str(e.value) and "embed/embedding" not in str(e.value)


def test_integer_leaf_rejected():
    params = {"attn": {"kernel": jnp.ones((4, 4), jnp.int32)}}
    with pytest.raises(ValueError, match="floating-point"):
        lora.init(params, targets="attn/kernel")


def test_dense_general_kernels_flatten_in_and_out_axes():
    class Attn(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=16, name="attention")(x)

    x = jnp.ones((2, 5, 8))
    params = Attn().init(jax.random.key(0), x)["params"]
    ad = dict(lora.adapter_items(lora.init(params, r=2)))
    q, o = ad["attention/query/kernel"], ad["attention/out/kernel"]
    assert (q.in_shape, q.out_shape, q.a.shape, q.b.shape) == ((8,), (4, 4), (8, 2), (2, 16))
    assert (o.in_shape, o.out_shape, o.a.shape, o.b.shape) == ((4, 4), (8,), (16, 2), (2, 8))
    assert q.delta().shape == (8, 4, 4)


# ------------------------------------------------------------------------------------------- merge


def test_merge_of_fresh_init_is_bit_identical(net):
    _, params, _ = net
    merged = lora.merge(params, lora.init(params, r=4, targets="all-linear"))
    chex.assert_trees_all_equal(dict(merged), params)  # dict(): a MergedParams' record is part of its structure


def test_merge_unmerge_roundtrip_and_untouched_leaves(net):
    _, params, _ = net
    ad = _random_b(lora.init(params, r=4, targets="all-linear"))
    merged = lora.merge(params, ad)
    assert merged["embed"]["embedding"] is params["embed"]["embedding"]  # untouched leaves pass through
    dw = merged["layer_0"]["query"]["kernel"] - params["layer_0"]["query"]["kernel"]
    a = ad["layer_0"]["query"]["kernel"]
    np.testing.assert_allclose(dw, a.scale * a.a @ a.b, atol=1e-6)
    back = lora.unmerge(merged, ad)
    chex.assert_trees_all_close(back, params, atol=1e-6)


def test_merging_twice_is_detected(net):
    _, params, _ = net
    ad = _random_b(lora.init(params, r=4, targets="qv"))
    merged = lora.merge(params, ad)
    with pytest.raises(ValueError, match="already hold a merged adapter"):
        lora.merge(merged, ad)
    lora.merge(lora.unmerge(merged, ad), ad)  # after unmerge it is allowed again


def test_merge_preserves_dtype_and_computes_in_f32():
    w = jnp.asarray(np.random.default_rng(0).normal(size=(64, 32)), jnp.bfloat16)
    params = {"attn": {"kernel": w}}
    ad = _random_b(lora.init(params, r=8, targets="attn/kernel"), scale=1e-2)
    merged = lora.merge(params, ad)
    assert merged["attn"]["kernel"].dtype == jnp.bfloat16
    a = ad["attn"]["kernel"]
    expected = (w.astype(jnp.float32) + a.scale * (a.a @ a.b)).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(merged["attn"]["kernel"], np.float32), np.asarray(expected, np.float32))


def test_merge_jit_with_donation(net):
    _, params, _ = net
    ad = _random_b(lora.init(params, r=4, targets="all-linear"))
    expected = lora.merge(params, ad)
    donated = jax.tree.map(jnp.copy, params)
    merged = jax.jit(lora.merge, donate_argnums=0)(donated, ad)
    chex.assert_trees_all_close(merged, expected, atol=1e-6)
    assert donated["layer_0"]["query"]["kernel"].is_deleted() or jax.default_backend() == "cpu"


def test_adapter_for_another_base_is_an_error(net):
    _, params, _ = net
    ad = lora.init(params, r=4, targets=".*/query/kernel")
    bigger = jax.tree.map(lambda x: x, params)
    bigger["layer_0"] = dict(bigger["layer_0"], query={"kernel": jnp.zeros((32, 48)), "bias": jnp.zeros(48)})
    with pytest.raises(ValueError, match=r"expects a kernel of shape \(32, 32\).*\(32, 48\)"):
        lora.merge(bigger, ad)
    missing = {k: v for k, v in params.items() if k != "layer_1"}
    with pytest.raises(ValueError, match="no matching leaf"):
        lora.wrap(missing, ad)


# -------------------------------------------------------------------------------- factored forward


def test_factored_equals_merged_f32_and_bf16(net):
    model, params, ids = net
    ad = _random_b(lora.init(params, r=4, targets="all-linear"), scale=2.0)
    factored = model.apply({"params": lora.wrap(params, ad)}, ids)
    merged = model.apply({"params": lora.merge(params, ad)}, ids)
    base = model.apply({"params": params}, ids)
    scale = float(jnp.abs(merged).max())
    assert float(jnp.abs(merged - base).max()) > 0.5 * scale  # the adapter changes the output
    np.testing.assert_allclose(factored, merged, atol=1e-5 * scale, rtol=1e-5)

    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    f16 = model.apply({"params": lora.wrap(p16, ad)}, ids)
    m16 = model.apply({"params": lora.merge(p16, ad)}, ids)
    assert f16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(f16, np.float32), np.asarray(merged), atol=0.05 * scale, rtol=0.05)
    np.testing.assert_allclose(np.asarray(f16, np.float32), np.asarray(m16, np.float32), atol=0.05 * scale, rtol=0.05)


def test_gradients_factored_equal_merged(net):
    model, params, ids = net
    ad = _random_b(lora.init(params, r=4, targets="all-linear"))

    def loss_factored(ad):
        return jnp.sum(model.apply({"params": lora.wrap(params, ad)}, ids) ** 2)

    def loss_merged(ad):
        return jnp.sum(model.apply({"params": lora.merge(params, ad)}, ids) ** 2)

    chex.assert_trees_all_close(jax.grad(loss_factored)(ad), jax.grad(loss_merged)(ad), atol=1e-5, rtol=1e-4)


def test_factored_grad_forms_no_dense_weight_gradient():
    """In the factored path no (d_in, d_out) array appears in the backward pass except the frozen base itself."""
    d_in, d_out, r = 96, 80, 4
    w = jax.random.normal(jax.random.key(0), (d_in, d_out))
    params = {"attn": {"kernel": w}}
    ad = _random_b(lora.init(params, r=r, targets="attn/kernel"))
    x = jax.random.normal(jax.random.key(1), (16, d_in))

    def shapes_in(jaxpr):
        """Output shapes of every equation, descending into the sub-jaxprs of jit, remat, scan, cond, ..."""
        out = []
        for eqn in jaxpr.eqns:
            out += [tuple(v.aval.shape) for v in eqn.outvars]
            for sub in jex_core.jaxprs_in_params(eqn.params):
                out += shapes_in(sub)
        return out

    def factored_loss(a):
        return jnp.sum(lora.dot(x, lora.wrap(params, a)["attn"]["kernel"]) ** 2)

    def merged_loss(a):
        return jnp.sum((x @ lora.merge(params, a)["attn"]["kernel"]) ** 2)

    for wrap in (lambda f: f, jax.jit, jax.checkpoint):  # top level, then inside a sub-jaxpr
        factored = jax.make_jaxpr(jax.grad(wrap(factored_loss)))(ad)
        merged = jax.make_jaxpr(jax.grad(wrap(merged_loss)))(ad)
        assert (d_in, d_out) not in shapes_in(factored.jaxpr)
        assert (d_in, d_out) in shapes_in(merged.jaxpr)  # the check can fail: the merged path does form it
    # under jit the products live only in the sub-jaxpr: the walk must descend to find them
    top = [
        tuple(v.aval.shape) for e in jax.make_jaxpr(jax.jit(jax.grad(merged_loss)))(ad).jaxpr.eqns for v in e.outvars
    ]
    assert (d_in, d_out) not in top


@pytest.mark.slow
def test_einsum_and_dot_multi_axis():
    x = jax.random.normal(jax.random.key(0), (2, 3, 8))
    w = jax.random.normal(jax.random.key(1), (8, 4, 5))
    params = {"attention": {"query": {"kernel": w}}, "o": {"kernel": jnp.transpose(w, (1, 2, 0))}}
    ad = _random_b(lora.init(params, r=3, targets=".*kernel"))
    wrapped, merged = lora.wrap(params, ad), lora.merge(params, ad)
    np.testing.assert_allclose(
        lora.einsum("bsd,dnh->bsnh", x, wrapped["attention"]["query"]["kernel"]),
        jnp.einsum("bsd,dnh->bsnh", x, merged["attention"]["query"]["kernel"]),
        atol=1e-5,
    )
    np.testing.assert_allclose(
        lora.einsum("...d,dnh->...nh", x, wrapped["attention"]["query"]["kernel"]),
        jnp.einsum("...d,dnh->...nh", x, merged["attention"]["query"]["kernel"]),
        atol=1e-5,
    )
    np.testing.assert_allclose(
        lora.dot(x, wrapped["attention"]["query"]["kernel"]),
        jnp.tensordot(x, merged["attention"]["query"]["kernel"], 1),
        atol=1e-5,
    )
    h = jax.random.normal(jax.random.key(2), (2, 3, 4, 5))
    np.testing.assert_allclose(
        lora.dot(h, wrapped["o"]["kernel"], axes=2), jnp.tensordot(h, merged["o"]["kernel"], 2), atol=1e-5
    )
    with pytest.raises(ValueError, match="does not fit"):
        lora.dot(h, wrapped["attention"]["query"]["kernel"])
    with pytest.raises(ValueError, match="must be contracted"):
        lora.einsum("bsd,dnh->bsd", x, wrapped["attention"]["query"]["kernel"])


def test_embed():
    table = jax.random.normal(jax.random.key(0), (20, 6))
    params = {"embed": {"embedding": table}}
    with pytest.raises(ValueError, match="allow_embeddings"):
        lora.init(params, r=2, targets="embed/embedding")
    ad = _random_b(lora.init(params, r=2, targets="embed/embedding", allow_embeddings=True))
    ids = jnp.array([[1, 5, 19]])
    np.testing.assert_allclose(
        lora.embed(ids, lora.wrap(params, ad)["embed"]["embedding"]),
        lora.merge(params, ad)["embed"]["embedding"][ids],
        atol=1e-6,
    )


def test_dropout_only_with_key():
    w = jnp.zeros((8, 8))
    params = {"attn": {"kernel": w}}
    ad = _random_b(lora.init(params, r=8, targets="attn/kernel", dropout=0.5), scale=1.0)
    x = jnp.ones((1000, 8))
    no_key = lora.dot(x, lora.wrap(params, ad)["attn"]["kernel"])
    assert float(jnp.std(no_key[:, 0])) < 1e-5  # deterministic without a key: every row the same
    y = lora.dot(x, lora.wrap(params, ad, dropout_key=jax.random.key(0))["attn"]["kernel"])
    assert float(jnp.std(y[:, 0])) > 0.01  # rows see different masks
    np.testing.assert_allclose(y.mean(0), no_key[0], rtol=0.2, atol=0.2)  # inverted dropout keeps the mean


def test_wrap_unwrap_roundtrip(net):
    _, params, _ = net
    ad = lora.init(params, r=2, targets="qv")
    p, a = lora.unwrap(lora.wrap(params, ad))
    chex.assert_trees_all_equal(p, params)
    chex.assert_trees_all_equal(a, ad)
    with pytest.raises(ValueError, match="wrap/merge a tree once"):
        lora.wrap(lora.wrap(params, ad), ad)


# --------------------------------------------------------------------------------- training pieces


def test_split_combine_and_optimizer_state_only_for_trainable(net):
    model, params, ids = net
    ad = lora.init(params, r=4, targets="all-linear")
    frozen, trainable = lora.split(params, ad, train="classifier/.*")
    assert frozen["classifier"]["kernel"] is None and "classifier" in trainable["params"]
    p2, a2 = lora.combine(frozen, trainable)
    chex.assert_trees_all_equal(p2, params)
    tx = optax.adamw(1e-3)
    state = tx.init(trainable)
    n_state = sum(x.size for x in jax.tree.leaves(state))
    n_train = sum(x.size for x in jax.tree.leaves(trainable))
    assert n_state == 2 * n_train + 1  # mu, nu and the step count: nothing of the frozen base
    with pytest.raises(ValueError, match="train rule"):
        lora.split(params, ad, train="clasifier/.*")
    with pytest.raises(ValueError, match="has an adapter and is also trained"):
        lora.split(params, ad, train="layer_0/query/kernel")


def test_masked_optimizer_on_one_tree(net):
    _, params, _ = net
    wrapped = lora.wrap(params, lora.init(params, r=4, targets="qv"))
    tx = lora.masked(optax.adam(1e-2), wrapped)
    state = tx.init(wrapped)
    n_state = sum(x.size for x in jax.tree.leaves(state) if hasattr(x, "size") and x.ndim > 0)
    n_adapters = sum(x.size for p, x in lora.targets.leaf_paths(wrapped) if "/adapter/" in p)
    assert n_state == 2 * n_adapters
    grads = jax.tree.map(jnp.ones_like, wrapped)
    updates, _ = tx.update(grads, state, wrapped)
    assert float(jnp.abs(updates["embed"]["embedding"]).max()) == 0.0
    assert float(jnp.abs(updates["layer_0"]["query"]["kernel"].base).max()) == 0.0
    assert float(jnp.abs(updates["layer_0"]["query"]["kernel"].adapter.b).max()) > 0.0


def test_lora_plus_ratio(net):
    _, params, _ = net
    ad = lora.init(params, r=4, targets="qv")
    tx = lora.lora_plus(optax.sgd, 0.1, ratio=16.0)
    grads = jax.tree.map(jnp.ones_like, ad)
    updates, _ = tx.update(grads, tx.init(ad), ad)
    u = updates["layer_0"]["query"]["kernel"]
    np.testing.assert_allclose(u.a, -0.1)
    np.testing.assert_allclose(u.b, -1.6)


def test_jit_takes_adapter_tree_and_static_metadata_survives(net):
    model, params, ids = net
    ad = lora.init(params, r=4, alpha=8, targets="qv")
    out = jax.jit(lambda p, a: lora.merge(p, a))(params, ad)
    chex.assert_trees_all_equal(dict(out), params)
    leaves, treedef = jax.tree_util.tree_flatten(ad)
    assert all(isinstance(x, jax.Array) for x in leaves)
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert rebuilt["layer_0"]["query"]["kernel"].scale == 2.0


def test_nnx_state_selection_and_merge():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.attention = nnx.Linear(16, 16, rngs=rngs)
            self.mlp = nnx.Linear(16, 4, rngs=rngs)

        def __call__(self, x):
            return self.mlp(jax.nn.relu(self.attention(x)))

    m = Model(nnx.Rngs(0))
    graphdef, state = nnx.split(m)
    ad = lora.init(state, r=2)
    assert [p for p, _ in lora.adapter_items(ad)] == ["attention/kernel"]
    ad = _random_b(ad)
    merged_state = lora.merge(state, ad)
    x = jnp.ones((3, 16))
    y = nnx.merge(graphdef, merged_state)(x)
    a = ad["attention"]["kernel"]
    w = state["attention"]["kernel"].value + a.scale * a.a @ a.b
    expected = (
        jax.nn.relu(x @ w + state["attention"]["bias"].value) @ state["mlp"]["kernel"].value
        + state["mlp"]["bias"].value
    )
    np.testing.assert_allclose(y, expected, atol=1e-5)


def test_full_rank_adapter_can_fit_any_delta():
    d_in, d_out = 6, 5
    params = {"attn": {"kernel": jnp.zeros((d_in, d_out))}}
    target = jax.random.normal(jax.random.key(3), (d_in, d_out))
    ad = lora.init(params, r=min(d_in, d_out), targets="attn/kernel")
    x = jax.random.normal(jax.random.key(4), (64, d_in))
    tx = optax.adam(3e-2)

    def loss(a):
        return jnp.mean((lora.dot(x, lora.wrap(params, a)["attn"]["kernel"]) - x @ target) ** 2)

    @jax.jit
    def step(a, s):
        g = jax.grad(loss)(a)
        u, s = tx.update(g, s, a)
        return optax.apply_updates(a, u), s

    state = tx.init(ad)
    for _ in range(1500):
        ad, state = step(ad, state)
    np.testing.assert_allclose(lora.merge(params, ad)["attn"]["kernel"], target, atol=2e-2)


def test_training_lowers_loss_and_merged_matches_factored(net):
    model, params, ids = net
    labels = jnp.array([0, 1, 2, 1])
    ad = lora.init(params, r=4, targets="all-linear")
    frozen, trainable = lora.split(params, ad, train="classifier/.*")
    tx = optax.adam(1e-2)

    def loss_fn(trainable):
        p, a = lora.combine(frozen, trainable)
        logits = model.apply({"params": lora.wrap(p, a)}, ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def step(trainable, opt_state):
        loss, g = jax.value_and_grad(loss_fn)(trainable)
        u, opt_state = tx.update(g, opt_state, trainable)
        return optax.apply_updates(trainable, u), opt_state, loss

    opt_state = tx.init(trainable)
    losses = []
    for _ in range(30):
        trainable, opt_state, loss = step(trainable, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    p, a = lora.combine(frozen, trainable)
    np.testing.assert_allclose(
        model.apply({"params": lora.merge(p, a)}, ids), model.apply({"params": lora.wrap(p, a)}, ids), atol=1e-5
    )
    # the frozen base did not move
    chex.assert_trees_all_equal(p["layer_0"]["query"]["kernel"], params["layer_0"]["query"]["kernel"])


def test_summary_table(net):
    _, params, _ = net
    ad = lora.init(params, r=4, targets="qv")
    s = lora.summary(params, ad)
    assert s.targeted == 4 * 32 * 32
    assert s.trainable == 4 * 4 * (32 + 32)
    assert s.total == sum(x.size for x in jax.tree.leaves(params)) + s.trainable
    assert "layer_0/query/kernel" in str(s) and "trainable" in str(s)
