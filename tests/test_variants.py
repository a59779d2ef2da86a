"""LoRA variants: DoRA (magnitude + direction), PiSSA (SVD init of adapters and residual base), rsLoRA and
LoRA+ details, checked against the real PEFT where PEFT has the feature."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import lora_jax as lora
from conftest import require
from lora_jax import ops
from lora_jax.checkpoint import load_adapters, save_adapters

peft = require("peft")


def _w(shape, seed=0, std=0.1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * std)


def _perturb(adapters, seed=1, b_scale=0.1, m_scale=0.2):
    """Adapters as after some training: random B and a magnitude moved away from its initial norms."""

    def fill(path, ad):
        k1, k2 = jax.random.split(jax.random.fold_in(jax.random.key(seed), len(lora.targets.path_str(path))))
        m = None if ad.magnitude is None else ad.magnitude * (1 + m_scale * jax.random.normal(k2, ad.magnitude.shape))
        return lora.LoraAdapter(
            ad.a,
            b_scale * jax.random.normal(k1, ad.b.shape),
            alpha=ad.alpha,
            scale=ad.scale,
            in_shape=ad.in_shape,
            out_shape=ad.out_shape,
            dropout=ad.dropout,
            magnitude=m,
        )

    return jax.tree_util.tree_map_with_path(fill, adapters, is_leaf=lora.is_adapter)


def _params():
    return {
        "attn": {"query": {"kernel": _w((24, 4, 8), 1)}, "out": {"kernel": _w((4, 8, 24), 2)}},
        "mlp": {"kernel": _w((24, 40), 3)},
    }


# ------------------------------------------------------------------------------------------------ DoRA


def test_dora_init_magnitude_is_column_norms_and_model_equals_base():
    params = _params()
    ad = lora.init(params, r=4, alpha=8, targets="all-linear", use_dora=True)
    m = ad["mlp"]["kernel"].magnitude
    np.testing.assert_allclose(m, jnp.linalg.norm(params["mlp"]["kernel"], axis=0), rtol=1e-6)
    # DenseGeneral kernels: the norm is over the input axes, one magnitude per (flattened) output feature
    q = params["attn"]["query"]["kernel"]
    np.testing.assert_allclose(
        ad["attn"]["query"]["kernel"].magnitude, jnp.linalg.norm(q.reshape(24, 32), axis=0), rtol=1e-6
    )
    np.testing.assert_allclose(
        ad["attn"]["out"]["kernel"].magnitude,
        jnp.linalg.norm(params["attn"]["out"]["kernel"].reshape(32, 24), axis=0),
        rtol=1e-6,
    )
    assert "dora magnitude=float32[40]" in repr(ad["mlp"]["kernel"])
    x = jax.random.normal(jax.random.key(0), (5, 24))
    w = lora.wrap(params, ad)
    np.testing.assert_allclose(ops.dot(x, w["mlp"]["kernel"]), x @ params["mlp"]["kernel"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lora.merge(params, ad)["mlp"]["kernel"], params["mlp"]["kernel"], rtol=1e-6, atol=1e-7)


def test_dora_factored_equals_merged_after_updates():
    params = _params()
    ad = _perturb(lora.init(params, r=4, alpha=8, targets="all-linear", use_dora=True))
    merged = lora.merge(params, ad)
    w = lora.wrap(params, ad)
    x = jax.random.normal(jax.random.key(0), (2, 5, 24))
    np.testing.assert_allclose(jax.jit(ops.dot)(x, w["mlp"]["kernel"]), x @ merged["mlp"]["kernel"], atol=1e-5)
    h = ops.einsum("bsd,dnh->bsnh", x, w["attn"]["query"]["kernel"])
    np.testing.assert_allclose(h, jnp.einsum("bsd,dnh->bsnh", x, merged["attn"]["query"]["kernel"]), atol=1e-5)
    # output axes in another order than the kernel's, and an ellipsis
    np.testing.assert_allclose(
        ops.einsum("...d,dnh->...hn", x, w["attn"]["query"]["kernel"]),
        jnp.einsum("...d,dnh->...hn", x, merged["attn"]["query"]["kernel"]),
        atol=1e-5,
    )
    np.testing.assert_allclose(
        ops.dot(h, w["attn"]["out"]["kernel"], axes=2), jnp.tensordot(h, merged["attn"]["out"]["kernel"], 2), atol=1e-5
    )
    # the merged kernel has exactly the magnitudes m as column norms
    np.testing.assert_allclose(
        jnp.linalg.norm(merged["mlp"]["kernel"], axis=0), ad["mlp"]["kernel"].magnitude, rtol=1e-5
    )
    np.testing.assert_allclose(w["mlp"]["kernel"].materialize(), merged["mlp"]["kernel"], atol=1e-6)


def test_dora_unmerge_is_the_inverse_of_merge():
    params = _params()
    ad = _perturb(lora.init(params, r=4, targets="all-linear", use_dora=True))
    merged = lora.merge(params, ad)
    back = dict(lora.targets.leaf_paths(lora.unmerge(merged, ad)))
    for p, leaf in lora.targets.leaf_paths(params):
        np.testing.assert_allclose(back[p], leaf, atol=1e-6)
    # the merged kernel alone does not determine ||W0 + s*A@B||: a copy, or a merge under jit, cannot unmerge
    with pytest.raises(ValueError, match="DoRA adapter, whose unmerge needs the column norms"):
        lora.unmerge(jax.tree.map(jnp.copy, merged), ad)
    with pytest.raises(ValueError, match="DoRA"):
        lora.unmerge(jax.jit(lora.merge)(params, ad), ad)


def test_dora_gradients_reach_m_a_and_b_and_not_the_norm():
    params = {"mlp": {"kernel": _w((24, 40), 3)}}
    ad = _perturb(lora.init(params, r=4, targets="all-linear", use_dora=True))
    x = jax.random.normal(jax.random.key(0), (8, 24))

    def loss(a):
        return jnp.sum(jnp.tanh(ops.dot(x, lora.wrap(params, a)["mlp"]["kernel"])) ** 2)

    g = jax.grad(loss)(ad)["mlp"]["kernel"]
    for name in ("a", "b", "magnitude"):
        assert float(jnp.abs(getattr(g, name)).max()) > 1e-4, name
    # the norm is a constant for the gradient: d loss / d m = sum over rows of dL/dy * (y / m)
    y = ops.dot(x, lora.wrap(params, ad)["mlp"]["kernel"])
    dy = 2 * jnp.tanh(y) * (1 - jnp.tanh(y) ** 2)
    np.testing.assert_allclose(g.magnitude, jnp.sum(dy * y, axis=0) / ad["mlp"]["kernel"].magnitude, rtol=1e-4)


def test_dora_with_dropout_follows_peft():
    # PEFT with dropout: x @ W0 + (m/n - 1) * (x' @ W0) + m/n * s * (x' @ A) @ B, where x' is the dropped input.
    # With m = n that is plain LoRA with dropout: the base product sees the undropped input.
    params = {"mlp": {"kernel": _w((24, 40), 3)}}
    ad = _perturb(lora.init(params, r=4, targets="all-linear", use_dora=True, dropout=0.5))
    k = ad["mlp"]["kernel"]
    norm = lora.core.dora_norm(params["mlp"]["kernel"], k)
    unit = {
        "mlp": {
            "kernel": lora.LoraAdapter(
                k.a,
                k.b,
                alpha=k.alpha,
                scale=k.scale,
                in_shape=k.in_shape,
                out_shape=k.out_shape,
                dropout=0.5,
                magnitude=norm,
            )
        }
    }
    plain = {
        "mlp": {
            "kernel": lora.LoraAdapter(
                k.a, k.b, alpha=k.alpha, scale=k.scale, in_shape=k.in_shape, out_shape=k.out_shape, dropout=0.5
            )
        }
    }
    x = jax.random.normal(jax.random.key(0), (64, 24))
    key = jax.random.key(5)
    y_unit = ops.dot(x, lora.wrap(params, unit, dropout_key=key)["mlp"]["kernel"])
    y_plain = ops.dot(x, lora.wrap(params, plain, dropout_key=key)["mlp"]["kernel"])
    np.testing.assert_allclose(y_unit, y_plain, rtol=1e-5, atol=1e-5)
    # and with m != n, in expectation over masks dropout changes nothing
    big = jnp.tile(x[:1], (20000, 1))
    y = ops.dot(big, lora.wrap(params, ad, dropout_key=key)["mlp"]["kernel"])
    y0 = ops.dot(x[:1], lora.wrap(params, ad)["mlp"]["kernel"])
    np.testing.assert_allclose(y.mean(0), y0[0], atol=0.03)


def test_dora_over_a_quantized_base():
    params = {"mlp": {"kernel": _w((128, 64), 3)}}
    qp = lora.quantize(params, compute_dtype=jnp.float32)
    ad = lora.init(qp, r=4, targets="all-linear", use_dora=True)
    dense = qp["mlp"]["kernel"].dequantize()
    np.testing.assert_allclose(ad["mlp"]["kernel"].magnitude, jnp.linalg.norm(dense, axis=0), rtol=1e-5)
    ad = _perturb(ad)
    x = jax.random.normal(jax.random.key(0), (8, 128))
    merged = lora.merge(qp, ad)["mlp"]["kernel"]
    np.testing.assert_allclose(jax.jit(ops.dot)(x, lora.wrap(qp, ad)["mlp"]["kernel"]), x @ merged, atol=1e-5)
    g = jax.grad(lambda a: jnp.sum(ops.dot(x, lora.wrap(qp, a)["mlp"]["kernel"]) ** 2))(ad)
    assert float(jnp.abs(g["mlp"]["kernel"].magnitude).max()) > 0


def test_dora_optimizers_and_checkpoints(tmp_path):
    params = {"mlp": {"kernel": _w((24, 40), 3)}}
    ad = lora.init(params, r=4, targets="all-linear", use_dora=True)
    # LoRA+: the magnitude joins B's (faster) group, as PEFT's create_loraplus_optimizer puts 1-D params there
    tx = lora.lora_plus(optax.sgd, 0.1, ratio=16.0)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, ad), tx.init(ad), ad)
    np.testing.assert_allclose(updates["mlp"]["kernel"].magnitude, -1.6)
    np.testing.assert_allclose(updates["mlp"]["kernel"].a, -0.1)
    wrapped = lora.wrap(params, ad)
    assert lora.trainable_labels(wrapped)["mlp"]["kernel"].adapter.magnitude == "trainable"
    save_adapters(tmp_path / "dora", ad)
    back = load_adapters(tmp_path / "dora")
    np.testing.assert_array_equal(back["mlp"]["kernel"].magnitude, ad["mlp"]["kernel"].magnitude)
    assert lora.summary(params, ad).trainable == 24 * 4 + 4 * 40 + 40


def test_dora_errors():
    params = {"embed": {"embedding": _w((50, 8))}, "mlp": {"kernel": _w((8, 8))}}
    with pytest.raises(NotImplementedError, match="embedding"):
        lora.init(params, r=2, targets="embed/embedding", allow_embeddings=True, use_dora=True)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    with pytest.raises(ValueError, match="needs the real parameters"):
        lora.init(abstract, r=2, targets="mlp/kernel", use_dora=True)


class _Tiny(torch.nn.Module):
    def __init__(self, d_in=16, d_out=12):
        super().__init__()
        self.lin = torch.nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.lin(x)


def _torch_model(seed=0):
    torch.manual_seed(seed)
    return _Tiny()


def test_dora_matches_peft_outputs_gradients_and_merge():
    model = _torch_model()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lin"], use_dora=True, lora_dropout=0.0)
    pm = peft.get_peft_model(model, cfg)
    layer = pm.base_model.model.lin
    W = layer.base_layer.weight.detach().numpy()  # (out, in)
    bias = layer.base_layer.bias.detach().numpy()
    params = {"lin": {"kernel": jnp.asarray(W.T)}}
    ad = lora.init(params, r=4, alpha=8, targets="lin/kernel", use_dora=True)
    # PEFT initialises the magnitude to the same norms
    np.testing.assert_allclose(
        ad["lin"]["kernel"].magnitude, layer.lora_magnitude_vector["default"].weight.detach().numpy(), rtol=1e-6
    )
    assert ad["lin"]["kernel"].scale == layer.scaling["default"]
    # give both the same trained-looking weights
    ad = _perturb(ad, b_scale=0.3, m_scale=0.3)
    k = ad["lin"]["kernel"]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.from_numpy(np.asarray(k.a).T.copy()))
        layer.lora_B["default"].weight.copy_(torch.from_numpy(np.asarray(k.b).T.copy()))
        layer.lora_magnitude_vector["default"].weight.copy_(torch.from_numpy(np.asarray(k.magnitude).copy()))
    x = np.random.default_rng(1).standard_normal((6, 16)).astype(np.float32)
    xt = torch.from_numpy(x)
    pm.train()
    yt = pm(xt)
    (yt**2).sum().backward()

    def forward(a):
        return ops.dense(jnp.asarray(x), lora.wrap(params, a)["lin"]["kernel"], jnp.asarray(bias))

    y, vjp = jax.vjp(forward, ad)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-5, atol=1e-5)
    (g,) = vjp(2 * y)
    g = g["lin"]["kernel"]
    np.testing.assert_allclose(g.a, layer.lora_A["default"].weight.grad.numpy().T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g.b, layer.lora_B["default"].weight.grad.numpy().T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        g.magnitude, layer.lora_magnitude_vector["default"].weight.grad.numpy(), rtol=1e-4, atol=1e-5
    )
    merged = pm.merge_and_unload().lin.weight.detach().numpy()
    np.testing.assert_allclose(lora.merge(params, ad)["lin"]["kernel"], merged.T, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------- PiSSA


def test_pissa_adapted_model_equals_original_and_residual_spectrum():
    params = {
        "attn": {"query": {"kernel": _w((32, 24), 5)}, "out": {"kernel": _w((4, 6, 32), 6)}},
        "bias": jnp.ones(24),
    }
    r, alpha = 4, 16
    res, ad = lora.init_pissa(params, r, alpha=alpha, targets="all-linear")
    assert res["bias"] is params["bias"]
    for path, a in lora.adapter_items(ad):
        w0 = dict(lora.targets.leaf_paths(params))[path]
        w_res = dict(lora.targets.leaf_paths(res))[path]
        assert a.scale == alpha / r and a.a.shape[1] == r and w_res.shape == w0.shape
        np.testing.assert_allclose(w_res + a.delta(), w0, atol=1e-6)  # adapted == original at step 0
        s0 = np.linalg.svd(np.asarray(w0).reshape(a.a.shape[0], -1), compute_uv=False)
        s_res = np.linalg.svd(np.asarray(w_res).reshape(a.a.shape[0], -1), compute_uv=False)
        assert s_res[0] == pytest.approx(s0[r], rel=1e-5)  # the top-r directions moved into the adapter
        np.testing.assert_allclose(
            np.linalg.svd(np.asarray(a.delta()).reshape(a.a.shape[0], -1), compute_uv=False)[:r], s0[:r], rtol=1e-5
        )
        # A and B share the singular values evenly: A^T A = B B^T = S_r / s
        np.testing.assert_allclose(a.a.T @ a.a, a.b @ a.b.T, atol=1e-5)
    x = jax.random.normal(jax.random.key(0), (3, 32))
    wrapped = lora.wrap(res, ad)
    np.testing.assert_allclose(
        ops.dot(x, wrapped["attn"]["query"]["kernel"]), x @ params["attn"]["query"]["kernel"], atol=1e-5
    )


def test_pissa_matches_peft():
    model = _torch_model(3)
    W = model.lin.weight.detach().numpy().copy()
    pm = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lin"], init_lora_weights="pissa")
    )
    layer = pm.base_model.model.lin
    s = layer.scaling["default"]
    product_t = s * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach().numpy()
    res, ad = lora.init_pissa({"lin": {"kernel": jnp.asarray(W.T)}}, 4, alpha=8, targets="lin/kernel")
    # singular vectors are defined up to sign: compare the products and the residual
    np.testing.assert_allclose(ad["lin"]["kernel"].delta(), product_t.T, atol=1e-5)
    np.testing.assert_allclose(res["lin"]["kernel"], layer.base_layer.weight.detach().numpy().T, atol=1e-5)
    np.testing.assert_allclose(
        np.abs(ad["lin"]["kernel"].a), np.abs(layer.lora_A["default"].weight.detach().numpy().T), atol=1e-5
    )


def test_pissa_randomised_svd_and_quantized_base():
    rng = np.random.default_rng(7)
    # a kernel with a strong rank-4 part: what PiSSA moves into the adapter, and what NF4 quantises worst
    low = rng.standard_normal((256, 4)) @ rng.standard_normal((4, 128))
    w = jnp.asarray((low + 0.05 * rng.standard_normal((256, 128))).astype(np.float32))
    exact_res, exact = lora.init_pissa({"k": {"kernel": w}}, 4, targets="k/kernel")
    fast_res, fast = lora.init_pissa({"k": {"kernel": w}}, 4, targets="k/kernel", niter=4)
    np.testing.assert_allclose(fast["k"]["kernel"].delta(), exact["k"]["kernel"].delta(), atol=1e-3)
    np.testing.assert_allclose(fast_res["k"]["kernel"] + fast["k"]["kernel"].delta(), w, atol=1e-5)
    # QPiSSA: PiSSA in full precision, then the residual quantised: less error than quantising W (QLoRA)
    qres = lora.quantize(exact_res, compute_dtype=jnp.float32)
    err_qlora = float(jnp.linalg.norm(lora.quantize({"k": {"kernel": w}})["k"]["kernel"].dequantize(jnp.float32) - w))
    err_qpissa = float(jnp.linalg.norm(qres["k"]["kernel"].dequantize() + exact["k"]["kernel"].delta() - w))
    assert err_qpissa < 0.2 * err_qlora, (err_qpissa, err_qlora)
    with pytest.raises(ValueError, match="already quantised"):
        lora.init_pissa(qres, 4, targets="k/kernel")


def test_pissa_with_dora_and_errors():
    params = {"mlp": {"kernel": _w((24, 40), 3)}}
    res, ad = lora.init_pissa(params, 4, targets="all-linear", use_dora=True)
    np.testing.assert_allclose(
        ad["mlp"]["kernel"].magnitude, jnp.linalg.norm(params["mlp"]["kernel"], axis=0), rtol=1e-6
    )
    x = jax.random.normal(jax.random.key(0), (3, 24))
    np.testing.assert_allclose(ops.dot(x, lora.wrap(res, ad)["mlp"]["kernel"]), x @ params["mlp"]["kernel"], atol=1e-5)
    with pytest.raises(ValueError, match="init_pissa"):
        lora.init(params, r=4, targets="all-linear", init="pissa")
    with pytest.raises(ValueError, match="do not pass init"):
        lora.init_pissa(params, 4, init="gaussian")


@pytest.mark.parametrize("use_rslora", [False, True])
def test_pissa_to_lora_states_the_trained_adapters_against_the_original_base(use_rslora):
    """Trained PiSSA adapters over the residual, converted: rank 2r, same scale, and the original kernel plus the
    converted update equals the residual plus the trained update. An adapter without its initial one is refused."""
    params = {"attn": {"query": {"kernel": _w((32, 24), 5)}}, "mlp": {"kernel": _w((24, 40), 3)}}
    res, initial = lora.init_pissa(params, 4, alpha=16, targets="all-linear", use_rslora=use_rslora)
    trained = _perturb(initial)
    plain = lora.pissa_to_lora(trained, initial)
    for (path, t), (path2, c) in zip(lora.adapter_items(trained), lora.adapter_items(plain)):
        assert path == path2 and c.r == 8 and c.a.shape == (t.a.shape[0], 8) and c.scale == pytest.approx(t.scale)
        w0 = dict(lora.targets.leaf_paths(params))[path]
        w_res = dict(lora.targets.leaf_paths(res))[path]
        np.testing.assert_allclose(w0 + c.delta(), w_res + t.delta(), atol=1e-5)
    with pytest.raises(lora.TargetError, match="mlp/kernel .*no initial adapter"):
        lora.pissa_to_lora(trained, {"attn": initial["attn"]})


# ------------------------------------------------------------------------------------ rsLoRA and LoRA+


def test_scaling_with_rslora_and_patterns_matches_peft():
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Linear(16, 16)
            self.v = torch.nn.Linear(16, 16)

    cfg = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q", "v"], use_rslora=True, rank_pattern={"v": 2}, alpha_pattern={"v": 5}
    )
    pm = peft.get_peft_model(Two(), cfg)
    params = {"q": {"kernel": jnp.zeros((16, 16))}, "v": {"kernel": jnp.zeros((16, 16))}}
    ad = lora.init(
        params, r=8, alpha=16, targets=".*/kernel", use_rslora=True, rank_pattern={"v/.*": 2}, alpha_pattern={"v/.*": 5}
    )
    for name in ("q", "v"):
        layer = getattr(pm.base_model.model, name)
        assert ad[name]["kernel"].scale == pytest.approx(layer.scaling["default"])
        assert ad[name]["kernel"].r == layer.r["default"]


def test_lora_plus_with_a_schedule():
    params = {"attn": {"kernel": jnp.zeros((8, 8))}}
    ad = lora.init(params, r=2, targets="attn/kernel")
    schedule = optax.linear_schedule(0.1, 0.0, 10)
    tx = lora.lora_plus(optax.sgd, schedule, ratio=4.0)
    state = tx.init(ad)
    ones = jax.tree.map(jnp.ones_like, ad)
    for step in range(3):
        updates, state = tx.update(ones, state, ad)
        u = updates["attn"]["kernel"]
        np.testing.assert_allclose(u.a, -schedule(step), rtol=1e-6)
        np.testing.assert_allclose(u.b, -4.0 * schedule(step), rtol=1e-6)


def test_transform_applies_the_dora_magnitude():
    """transform runs DoRA (it used to refuse it rather than ignore the magnitude): equal to the merged kernel."""
    params = {"w": _w((8, 8))}
    ad = lora.init(params, r=2, targets="w", use_dora=True)
    ad = {"w": dataclasses.replace(ad["w"], b=ad["w"].b + 0.3, magnitude=ad["w"].magnitude * 1.5)}
    x = jnp.ones((2, 8))
    got = lora.transform(lambda p, x: x @ p["w"])(lora.wrap(params, ad), x)
    np.testing.assert_allclose(got, x @ lora.merge(params, ad)["w"], rtol=1e-5, atol=1e-5)
