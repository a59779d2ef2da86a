"""lora.transform: factored LoRA for functions written without lora_jax (Flax Linen / NNX layers, jnp code).

Every parity test compares the transformed function on ``lora.wrap(params, adapters)`` with the original
function on ``lora.merge(params, adapters)``: outputs, and gradients with respect to the adapters, to 1e-5
in float32. ``B`` is randomised so that both factors receive gradient.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import lora_jax as lora
from lora_jax.transform import init_stacked, transform, transform_report

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True, scope="module")
def fast_compiles():
    """Each test compiles a few tiny programs once: XLA's optimisation passes cost more than they save
    (about 40% of this file's CPU time)."""
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


def randomise_b(adapters, seed=1, std=0.2):
    """Adapters fresh from ``lora.init`` have B = 0; give B values so that dW and dL/dA are non-zero."""
    leaves, treedef = jax.tree_util.tree_flatten(adapters, is_leaf=lora.is_adapter)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef,
        [
            ad
            if not lora.is_adapter(ad)
            else type(ad)(
                ad.a,
                std * jax.random.normal(k, ad.b.shape, ad.b.dtype),
                ad.alpha,
                ad.scale,
                ad.in_shape,
                ad.out_shape,
                ad.dropout,
            )
            for ad, k in zip(leaves, keys)
        ],
    )


def assert_parity(fn, params, adapters, *args, expect_materialized=0, forward_mode=False):
    """``transform(fn)(wrap(params, adapters), *args)`` equals ``fn(merge(params, adapters), *args)`` in value
    and in gradient w.r.t. the adapters (a directional derivative with ``forward_mode``, for ``while_loop``,
    which has no reverse mode); returns the transform's report."""
    factored_fn = lambda ad: transform(fn)(lora.wrap(params, ad), *args)  # noqa: E731
    merged_fn = lambda ad: fn(lora.merge(params, ad), *args)  # noqa: E731
    if forward_mode:
        tangent = randomise_b(jax.tree_util.tree_map(jnp.ones_like, adapters), seed=3)
        got, want = jax.jit(lambda ad, t: (jax.jvp(factored_fn, (ad,), (t,)), jax.jvp(merged_fn, (ad,), (t,))))(
            adapters, tangent
        )
        assert float(jnp.abs(jax.tree_util.tree_leaves(got[1])[0]).max()) > 0
        names = ["output", "directional derivative"]
    else:
        shapes = jax.tree_util.tree_leaves(jax.eval_shape(merged_fn, adapters))
        keys = jax.random.split(jax.random.key(7), len(shapes))
        probes = [jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, shapes)]

        def loss(out):
            return sum(jnp.vdot(o, p) for o, p in zip(jax.tree_util.tree_leaves(out), probes))

        def value_and_grad(f, ad):
            return jax.value_and_grad(lambda ad: (loss(out := f(ad)), out), has_aux=True)(ad)[::-1]

        got, want = jax.jit(lambda ad: (value_and_grad(factored_fn, ad), value_and_grad(merged_fn, ad)))(adapters)
        for path, g in jax.tree_util.tree_leaves_with_path(got[1]):
            assert float(jnp.abs(g).max()) > 0, f"no gradient reached {jax.tree_util.keystr(path)}"
        names = ["output", "gradient"]
    for name, a, b in zip(names, got, want):
        jax.tree_util.tree_map_with_path(
            lambda path, x, y: np.testing.assert_allclose(x, y, **TOL, err_msg=name + jax.tree_util.keystr(path)), a, b
        )
    report = transform_report(fn, lora.wrap(params, adapters), *args)
    assert report.n_materialized == expect_materialized, str(report)
    return report


# ------------------------------------------------------------------------------------------ Flax Linen


class LinenBlock(nn.Module):
    """Self-attention + MLP with plain ``nn.Dense`` (Flax's own dot_general on the kernel)."""

    d: int = 16
    heads: int = 2

    @nn.compact
    def __call__(self, x):
        b, s, d = x.shape
        q, k, v = (nn.Dense(d, name=n)(x).reshape(b, s, self.heads, -1) for n in ("query", "key", "value"))
        att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // self.heads), axis=-1)
        h = x + nn.Dense(d, name="out")(jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, s, d))
        return h + nn.Dense(d, name="fc2")(jax.nn.gelu(nn.Dense(2 * d, name="fc1")(nn.LayerNorm()(h))))


def test_linen_dense_attention_mlp():
    model = LinenBlock()
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    params = jax.jit(model.init)(jax.random.key(1), x)["params"]
    adapters = randomise_b(lora.init(params, r=4, targets="all-linear"))
    report = assert_parity(lambda p, x: model.apply({"params": p}, x), params, adapters, x)
    assert dict(report.factored) == {"dot_general": 6}
    assert len(report.weights) == 6


class ScanLayer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dense(12, name="fc2")(jnp.tanh(nn.Dense(20, name="fc1")(x))), None


class ScanNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        layers = nn.scan(ScanLayer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        x, _ = layers(name="layers")(x, None)
        return nn.Dense(4, name="head")(x)


def test_linen_scan_over_stacked_layers():
    model = ScanNet()
    x = jax.random.normal(jax.random.key(0), (3, 12))
    params = jax.jit(model.init)(jax.random.key(1), x)["params"]
    assert params["layers"]["fc1"]["kernel"].shape == (3, 12, 20)
    stacked = init_stacked(params["layers"], r=2, targets="all-linear", key=jax.random.key(3))
    ad = stacked["fc1"]["kernel"]
    assert ad.a.shape == (3, 12, 2) and ad.b.shape == (3, 2, 20) and ad.kernel_shape == (3, 12, 20)
    assert not np.allclose(ad.a[0], ad.a[1])  # layers are initialised independently
    adapters = randomise_b({"layers": stacked, **lora.init(params, r=2, targets="head/kernel")})
    report = assert_parity(lambda p, x: model.apply({"params": p}, x), params, adapters, x)
    assert dict(report.factored) == {"dot_general": 3}  # fc1 and fc2 once inside the scan body, head once


def test_dense_general_attention_with_3d_kernels():
    model = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, out_features=6)
    x = jax.random.normal(jax.random.key(0), (2, 5, 6))
    params = jax.jit(model.init)(jax.random.key(1), x)["params"]
    adapters = randomise_b(lora.init(params, r=2, targets=".*(query|key|value|out)/kernel"))
    assert adapters["query"]["kernel"].in_shape == (6,) and adapters["query"]["kernel"].out_shape == (2, 4)
    assert adapters["out"]["kernel"].in_shape == (2, 4) and adapters["out"]["kernel"].out_shape == (6,)
    report = assert_parity(lambda p, x: model.apply({"params": p}, x), params, adapters, x)
    assert dict(report.factored) == {"dot_general": 4}


def test_tied_embedding_head():
    class TiedLM(nn.Module):
        @nn.compact
        def __call__(self, ids):
            embed = nn.Embed(30, 8, name="embed")
            h = jnp.tanh(nn.Dense(8, name="mlp")(embed(ids)))
            return embed.attend(h)  # h @ E.T: the transpose swaps the roles of A and B

    model = TiedLM()
    ids = jnp.array([[1, 4, 29], [0, 7, 7]])
    params = jax.jit(model.init)(jax.random.key(1), ids)["params"]
    adapters = randomise_b(lora.init(params, r=3, targets=["embed/embedding", "mlp/kernel"], allow_embeddings=True))
    report = assert_parity(lambda p, ids: model.apply({"params": p}, ids), params, adapters, ids)
    assert dict(report.factored) == {"dot_general": 2, "gather": 1}


def test_conv_kernel():
    model = nn.Conv(6, (3, 3), padding="SAME")
    x = jax.random.normal(jax.random.key(0), (2, 7, 7, 4))
    params = jax.jit(model.init)(jax.random.key(1), x)["params"]
    adapters = randomise_b(lora.init(params, r=2, targets="kernel", in_axes={"kernel": 3}))
    report = assert_parity(lambda p, x: model.apply({"params": p}, x), params, adapters, x)
    assert dict(report.factored) == {"conv_general_dilated": 1}


# ---------------------------------------------------------------------------------------------- NNX


def test_nnx_model_through_split_and_merge():
    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.fc1 = nnx.Linear(6, 10, rngs=rngs)
            self.fc2 = nnx.Linear(10, 3, rngs=rngs)

        def __call__(self, x):
            return self.fc2(nnx.relu(self.fc1(x)))

    graphdef, state = nnx.split(MLP(nnx.Rngs(0)))
    adapters = randomise_b(lora.init(state, r=2, targets="all-linear"))
    assert set(adapters) == {"fc1", "fc2"}  # nnx paths without the trailing "value"
    x = jax.random.normal(jax.random.key(0), (4, 6))
    assert_parity(lambda s, x: nnx.merge(graphdef, s)(x), state, adapters, x)


# ------------------------------------------------------------------------- transforms inside the function


def mlp_params(d_in=6, d_hidden=10, d_out=4, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "w1": jax.random.normal(k1, (d_in, d_hidden)) / np.sqrt(d_in),
        "w2": jax.random.normal(k2, (d_hidden, d_out)) / np.sqrt(d_hidden),
    }


def test_checkpointed_layers():
    params = mlp_params(d_out=6)
    adapters = randomise_b(lora.init(params, r=2, targets="w.*"))
    x = jax.random.normal(jax.random.key(0), (3, 6))

    def fn(p, x):
        layer = jax.checkpoint(
            lambda h, w1, w2: h + jnp.tanh(h @ w1) @ w2, policy=jax.checkpoint_policies.nothing_saveable
        )
        for _ in range(2):
            x = layer(x, p["w1"], p["w2"])
        return x

    report = assert_parity(fn, params, adapters, x)
    assert dict(report.factored) == {"dot_general": 4}
    hlo = jax.make_jaxpr(jax.grad(lambda ad: transform(fn)(lora.wrap(params, ad), x).sum()))(adapters)
    assert "remat" in str(hlo) or "checkpoint" in str(hlo)  # the checkpoint survives the transform


def test_custom_jvp_activation_and_custom_rule_on_the_weight():
    @jax.custom_jvp
    def softplus(z):
        return jnp.logaddexp(z, 0.0)

    softplus.defjvp(lambda primals, tangents: (softplus(primals[0]), jax.nn.sigmoid(primals[0]) * tangents[0]))

    @jax.custom_vjp
    def scaled(w):  # a custom rule that receives the weight itself: it gets the dense kernel
        return 2.0 * w

    scaled.defvjp(lambda w: (2.0 * w, None), lambda _, g: (2.0 * g,))
    params = mlp_params()
    adapters = randomise_b(lora.init(params, r=2, targets="w.*"))
    x = jax.random.normal(jax.random.key(0), (3, 6))
    assert_parity(lambda p, x: softplus(x @ p["w1"]) @ p["w2"], params, adapters, x)
    report = assert_parity(
        lambda p, x: softplus(x @ p["w1"]) @ scaled(p["w2"]), params, adapters, x, expect_materialized=1
    )
    assert report.details == (("custom_vjp_call (its custom derivative rule takes the dense kernel)", "0/w2"),)


def test_cond_and_while_bodies_use_the_weight():
    params = mlp_params(d_hidden=6, d_out=6)
    adapters = randomise_b(lora.init(params, r=2, targets="w.*"))
    x = jax.random.normal(jax.random.key(0), (3, 6))

    def fn(p, x):
        h = lax.cond(x.sum() > 0, lambda h: jnp.tanh(h @ p["w1"]), lambda h: jnp.sin(h @ p["w2"].T), x)
        h, _ = lax.while_loop(lambda c: c[1] < 3, lambda c: (jnp.tanh(c[0] @ p["w2"]), c[1] + 1), (h, 0))
        return h

    for sign in (1.0, -1.0):  # both branches
        report = assert_parity(fn, params, adapters, sign * x, forward_mode=True)
    assert dict(report.factored) == {"dot_general": 3}

    def cond_and_loop(p, x):  # reverse mode: cond, and fori_loop with static bounds (a scan with W as constant)
        h = lax.cond(x.sum() > 0, lambda h: h @ p["w1"], lambda h: h @ p["w2"].T, x)
        return lax.fori_loop(0, 2, lambda i, h: jnp.tanh(h @ p["w1"]), h)

    report = assert_parity(cond_and_loop, params, adapters, x)
    assert dict(report.factored) == {"dot_general": 3}


def test_structural_ops_are_pushed_through_the_factors():
    params = {
        "qkv": jax.random.normal(jax.random.key(0), (8, 12)) / 3,
        "w": jax.random.normal(jax.random.key(1), (8, 8)),
    }
    adapters = randomise_b(lora.init(params, r=2, targets=["qkv", "w"]))
    x = jax.random.normal(jax.random.key(2), (2, 3, 8))

    def fn(p, x):
        q, k, v = jnp.split(p["qkv"], 3, axis=1)  # split along the output axis
        heads = p["w"].reshape(8, 2, 4)  # split the output axis into heads
        y = jnp.einsum("bsd,dhk->bshk", x, heads).reshape(2, 3, 8)
        z = x @ (0.5 * q.astype(jnp.float32)) @ k.T[:, :4] @ v[:4]  # scalar, cast, transpose, slices
        t = jnp.dot(p["w"].T, x.reshape(-1, 8).T)  # the weight as the left operand
        return y, z, t, x @ -jnp.flip(p["w"], 0)[::-1]  # neg, rev twice

    report = assert_parity(fn, params, adapters, x)
    assert dict(report.factored) == {"dot_general": 6}


def test_low_precision_compute_casts_the_factors():
    model = nn.Dense(16, dtype=jnp.bfloat16)  # float32 params, bfloat16 compute: convert_element_type on W
    x = jax.random.normal(jax.random.key(0), (4, 8))
    params = jax.jit(model.init)(jax.random.key(1), x)["params"]
    adapters = randomise_b(lora.init(params, r=2, targets="kernel"), std=1.0)
    fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    out = jax.jit(transform(fn))(lora.wrap(params, adapters), x)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        out.astype(jnp.float32), fn(lora.merge(params, adapters), x).astype(jnp.float32), rtol=2e-2, atol=2e-2
    )
    assert transform_report(fn, lora.wrap(params, adapters), x).n_materialized == 0


def test_materialisations_are_counted_and_strict_refuses_them():
    params = mlp_params()
    adapters = randomise_b(lora.init(params, r=2, targets="w.*"))
    x = jax.random.normal(jax.random.key(0), (3, 6))

    def fn(p, x):
        masked = p["w1"] * (jnp.arange(10) % 2)  # elementwise with a tensor: needs W
        flat = p["w2"].reshape(-1)  # merges input with output axes
        return jnp.tanh(x @ masked) @ p["w2"] + flat.sum(), p["w1"].T  # the second output is a weight

    report = assert_parity(fn, params, adapters, x, expect_materialized=3)
    assert dict(report.materialized) == {
        "mul (by a non-scalar)": 1,
        "output (fn returns a LoRA value)": 1,
        "reshape ((10, 4) -> (40,) mixes axes of different factors (LR))": 1,
    }
    assert dict(report.factored) == {"dot_general": 1}
    with pytest.raises(ValueError, match=r"strict=True.*mul.*'0/w1'"):
        transform(fn, strict=True)(lora.wrap(params, adapters), x)


def test_dropout_matches_ops_dot():
    params = mlp_params()
    adapters = randomise_b(lora.init(params, r=2, targets="w.*", dropout=0.5))
    x = jax.random.normal(jax.random.key(0), (3, 6))
    wrapped = lora.wrap(params, adapters, dropout_key=jax.random.key(5))
    out = transform(lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"])(wrapped, x)
    expected = lora.dot(jnp.tanh(lora.dot(x, wrapped["w1"])), wrapped["w2"])
    np.testing.assert_allclose(out, expected, **TOL)
    no_dropout = transform(lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"])(lora.wrap(params, adapters), x)
    assert not np.allclose(out, no_dropout)


def test_jit_report_closure_and_static_args():
    params = mlp_params()
    adapters = randomise_b(lora.init(params, r=2, targets="w.*"))
    x = jax.random.normal(jax.random.key(0), (3, 6))

    def fn(p, x, *, act):
        return (jnp.tanh if act == "tanh" else jnp.sin)(x @ p["w1"]) @ p["w2"]

    out, report = jax.jit(transform(fn, report=True), static_argnames="act")(lora.wrap(params, adapters), x, act="sin")
    np.testing.assert_allclose(out, fn(lora.merge(params, adapters), x, act="sin"), **TOL)
    assert report.n_materialized == 0 and dict(report.factored) == {"dot_general": 2}
    assert report.weights == ("0/w1", "0/w2")

    @jax.jit
    def closure(ad, x):  # the wrapped weights are closed over by fn, x is the argument
        w = lora.wrap(params, ad)
        return transform(lambda w, x: fn(w, x, act="tanh"))(w, x)

    np.testing.assert_allclose(closure(adapters, x), fn(lora.merge(params, adapters), x, act="tanh"), **TOL)


def test_no_dense_weight_gradient_in_the_jaxpr():
    d_in, d_hidden, d_out = 24, 40, 8  # distinct sizes, so any (d_in, d_hidden) array is the weight's shape
    params = mlp_params(d_in, d_hidden, d_out)
    adapters = randomise_b(lora.init(params, r=2, targets="w.*"))
    x = jax.random.normal(jax.random.key(0), (5, d_in))

    def fn(p, x):
        return jax.checkpoint(lambda x: jnp.tanh(x @ p["w1"]) @ p["w2"])(x)

    def shapes(jaxpr):
        for eqn in jaxpr.eqns:
            yield from (tuple(v.aval.shape) for v in eqn.outvars)
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else [param]:
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        yield from shapes(inner)

    weight_shapes = {(d_in, d_hidden), (d_hidden, d_in), (d_hidden, d_out), (d_out, d_hidden)}
    factored = jax.make_jaxpr(jax.grad(lambda ad: transform(fn)(lora.wrap(params, ad), x).sum()))(adapters)
    merged = jax.make_jaxpr(jax.grad(lambda ad: fn(lora.merge(params, ad), x).sum()))(adapters)
    assert weight_shapes & set(shapes(merged.jaxpr))  # the check can see a dense weight gradient ...
    assert not weight_shapes & set(shapes(factored.jaxpr)), factored  # ... and the factored path has none
    report = transform_report(fn, lora.wrap(params, adapters), x)
    assert report.n_materialized == 0 and dict(report.factored) == {"dot_general": 2}


def test_mismatched_weight_is_a_clear_error():
    params = mlp_params()
    adapters = lora.init(params, r=2, targets="w1")
    bad = {"w1": lora.LoraWeight(params["w1"][:3], adapters["w1"]), "w2": params["w2"]}
    with pytest.raises(ValueError, match=r"'0/w1'.*base \(3, 10\), a \(6, 2\), b \(2, 10\)"):
        transform(lambda p, x: x @ p["w1"])(bad, jnp.ones((1, 3)))
