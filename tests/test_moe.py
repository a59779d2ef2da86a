"""LoRA on mixtures of experts: per-expert adapters on stacked expert kernels, the grouped (ragged) product,
merge / unmerge, QLoRA experts, target presets that tell routed experts, shared experts and routers apart,
lora.transform on ragged_dot, PEFT's target_parameters layout, and the MoE layers against transformers."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require

import lora_jax as lora
from lora_jax import ops
from lora_jax import peft as lpeft
from lora_jax import targets as targets_lib
from lora_jax.errors import TargetError
from lora_jax.models import moe

E, D, F, R, T, K = 4, 16, 8, 3, 12, 2


def moe_params(seed: int = 0) -> dict:
    """One MoE block the way the MoE families lay it out: attention, a router ``gate`` beside ``experts``
    (stacked ``(E, d_in, d_out)``), a shared expert, and a dense MLP elsewhere whose projection is called ``gate``."""
    ks = jax.random.split(jax.random.key(seed), 8)
    n = lambda k, shape, s=0.3: jax.random.normal(k, shape) * s  # noqa: E731
    return {
        "self_attn": {"q_proj": {"kernel": n(ks[0], (D, D))}, "o_proj": {"kernel": n(ks[1], (D, D))}},
        "mlp": {
            "gate": {"kernel": n(ks[2], (D, E))},
            "experts": {"gate_up_proj": n(ks[3], (E, D, 2 * F)), "down_proj": n(ks[4], (E, F, D))},
            "shared_experts": {"gate_proj": {"kernel": n(ks[5], (D, F))}, "down_proj": {"kernel": n(ks[6], (F, D))}},
        },
        "dense_mlp": {"gate": {"kernel": n(ks[7], (D, F))}},
    }


def randomise_b(adapters, seed: int = 7):
    """Adapters with a random B (at init B = 0 and every comparison would be trivial)."""
    leaves = lora.adapter_items(adapters)
    keys = dict(zip([p for p, _ in leaves], jax.random.split(jax.random.key(seed), len(leaves))))
    return jax.tree_util.tree_map_with_path(
        lambda p, ad: dataclasses.replace(ad, b=jax.random.normal(keys[targets_lib.path_str(p)], ad.b.shape) * 0.5),
        adapters, is_leaf=lora.is_adapter)


def block(p, x, dispatch="ragged", norm_topk_prob=True):
    """The routed experts of one MoE block on ``x (T, D)``."""
    routing = moe.route(x @ ops.materialize(p["mlp"]["gate"]["kernel"]), K, norm_topk_prob=norm_topk_prob)
    e = p["mlp"]["experts"]
    return moe.experts_glu(x, routing, gate_up=e["gate_up_proj"], down=e["down_proj"], dispatch=dispatch)


def adapted(paths):
    return {p for p, _ in lora.adapter_items(paths)}


# -------------------------------------------------------------------------------------------- targets


def test_expert_adapters_are_per_expert_stacks():
    params = moe_params()
    ads = lora.init(params, r=R, targets="experts", key=jax.random.key(1))
    assert adapted(ads) == {"mlp/experts/gate_up_proj", "mlp/experts/down_proj"}
    gu = ads["mlp"]["experts"]["gate_up_proj"]
    assert gu.a.shape == (E, D, R) and gu.b.shape == (E, R, 2 * F) and gu.stack_shape == (E,)
    assert gu.in_shape == (E, D) and gu.out_shape == (2 * F,) and gu.kernel_shape == (E, D, 2 * F)
    assert not np.any(np.asarray(gu.b))
    a = np.asarray(gu.a)
    assert np.abs(a).max() <= 1 / np.sqrt(D) and not np.allclose(a[0], a[1])  # each expert initialised on its own
    s = lora.summary(params, ads)
    assert s.trainable == E * R * (D + 2 * F) + E * R * (F + D)
    # expert_axes overrides the default: 0 takes the stack as one kernel with E inputs (what init did before)
    flat = lora.init(params, r=R, targets=".*experts/gate_up_proj", expert_axes={".*": 0})
    assert flat["mlp"]["experts"]["gate_up_proj"].a.shape == (E, R)
    with pytest.raises(ValueError, match="expert_axes for mlp/experts/gate_up_proj must be in"):
        lora.init(params, r=R, targets=".*experts/gate_up_proj", expert_axes={".*": 2})


def test_presets_tell_routed_shared_experts_and_router_apart():
    params = moe_params()
    roles = targets_lib.moe_roles([p for p, _ in targets_lib.leaf_paths(params)])
    assert roles["mlp/gate/kernel"] == targets_lib.ROUTER
    assert roles["dense_mlp/gate/kernel"] is None  # a "gate" without experts beside it is no router
    assert roles["mlp/experts/down_proj"] == targets_lib.ROUTED
    assert roles["mlp/shared_experts/down_proj/kernel"] == targets_lib.SHARED
    sel = {name: adapted(lora.init(params, r=2, targets=name)) for name in
           ("experts", "shared-experts", "router", "all-linear", "all-linear+experts", "attention")}
    routed = {"mlp/experts/gate_up_proj", "mlp/experts/down_proj"}
    shared = {"mlp/shared_experts/gate_proj/kernel", "mlp/shared_experts/down_proj/kernel"}
    attention = {"self_attn/q_proj/kernel", "self_attn/o_proj/kernel"}
    assert sel["experts"] == routed
    assert sel["shared-experts"] == shared
    assert sel["router"] == {"mlp/gate/kernel"}
    assert sel["all-linear"] == attention | shared | {"dense_mlp/gate/kernel"}  # PEFT's all-linear: no experts
    assert sel["all-linear+experts"] == sel["all-linear"] | routed  # ... and never the router
    assert sel["attention"] == attention
    with pytest.raises(TargetError, match="matches no kernel"):
        lora.init({"mlp": {"gate": {"kernel": jnp.ones((4, 4))}}}, r=1, targets="router")


@pytest.mark.parametrize("rule, message", [
    (".*experts/.*", "selects routed experts .* and shared experts"),     # also matches shared_experts/...
    (".*gate.*", "selects the router mlp/gate/kernel and also"),           # gate_up_proj and the router gate
    (".*mlp/.*kernel", "selects the router mlp/gate/kernel"),             # router + shared experts
    (".*mlp/gate/kernel", "also non-MoE kernel.* dense_mlp/gate/kernel"),  # the router and a dense MLP's gate
])
def test_rules_that_mix_experts_and_router_are_errors(rule, message):
    with pytest.raises(TargetError, match=message):
        lora.init(moe_params(), r=2, targets=rule)


def test_rules_that_name_one_role_are_fine():
    params = moe_params()
    assert adapted(lora.init(params, r=2, targets="(.*/)?mlp/experts/.*")) == {"mlp/experts/gate_up_proj",
                                                                              "mlp/experts/down_proj"}
    assert adapted(lora.init(params, r=2, targets="mlp/gate/kernel")) == {"mlp/gate/kernel"}
    got = adapted(lora.init(params, r=2, targets=".*mlp/.*kernel", exclude=".*mlp/gate/kernel"))
    assert got == {"mlp/shared_experts/gate_proj/kernel", "mlp/shared_experts/down_proj/kernel"}
    # two rules, one per role, adapt both kinds of experts
    got = adapted(lora.init(params, r=2, targets=["(.*/)?mlp/experts/.*", ".*shared_experts/.*"]))
    assert len(got) == 4


# --------------------------------------------------------------------------------------- grouped products


@pytest.fixture(scope="module")
def setup():
    params = moe_params()
    ads = randomise_b(lora.init(params, r=R, targets="experts", alpha=6.0, key=jax.random.key(3)))
    x = jax.random.normal(jax.random.key(5), (T, D))
    return params, ads, x


def test_grouped_product_equals_merged_and_dense_dispatch(setup):
    params, ads, x = setup
    factored = block(lora.wrap(params, ads), x)
    merged = block(lora.merge(params, ads), x)
    assert float(jnp.max(jnp.abs(factored - block(params, x)))) > 1e-2  # the adapters do change the output
    np.testing.assert_allclose(factored, merged, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(block(lora.wrap(params, ads), x, "dense"), merged, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(block(lora.merge(params, ads), x, "dense"), merged, atol=2e-5, rtol=1e-5)
    # and each sorted row went through its own expert: one expert's product by hand
    gs = jnp.array([3, 0, 5, 4], jnp.int32)
    w = lora.wrap(params, ads)["mlp"]["experts"]["down_proj"]
    h = jax.random.normal(jax.random.key(8), (T, F))
    y = ops.ragged_dot(h, w, gs)
    ad = ads["mlp"]["experts"]["down_proj"]
    want = h[3:8] @ (params["mlp"]["experts"]["down_proj"][2] + ad.scale * ad.a[2] @ ad.b[2])
    np.testing.assert_allclose(y[3:8], want, atol=2e-5, rtol=1e-5)


def test_grouped_gradients_equal_merged_dense(setup):
    params, ads, x = setup

    def loss(a, x, path):
        p = lora.wrap(params, a) if path == "factored" else lora.merge(params, a)
        return jnp.sum(jnp.tanh(block(p, x, "ragged" if path == "factored" else "dense")) ** 2)

    g_fact = jax.grad(loss, argnums=(0, 1))(ads, x, "factored")
    g_ref = jax.grad(loss, argnums=(0, 1))(ads, x, "merged")
    for got, want in zip(jax.tree.leaves(g_fact), jax.tree.leaves(g_ref), strict=True):
        assert float(jnp.max(jnp.abs(want))) > 1e-3
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def _shapes(jaxpr) -> list[tuple[int, ...]]:
    out = []
    for eqn in jaxpr.eqns:
        out += [tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")]
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else [param]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    out += _shapes(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    out += _shapes(sub)
    return out


def test_grouped_backward_forms_no_expert_stack_gradient(setup):
    """Backpropagation through the factored grouped products forms (E, d_in, r) and (E, r, d_out) gradients,
    never an (E, d_in, d_out) one: no equation of the gradient's jaxpr outputs a stack-shaped array."""
    params, ads, x = setup
    stacks = {(E, D, 2 * F), (E, F, D)}

    def loss(a, p_fn):
        return jnp.sum(block(p_fn(params, a), x) ** 2)

    factored = _shapes(jax.make_jaxpr(jax.grad(lambda a: loss(a, lora.wrap)))(ads).jaxpr)
    merged = _shapes(jax.make_jaxpr(jax.grad(lambda a: loss(a, lora.merge)))(ads).jaxpr)
    assert not stacks & set(factored)
    assert stacks <= set(merged)  # the check can fail: the merge-then-forward path forms them
    assert {(E, D, R), (E, R, 2 * F), (E, F, R), (E, R, D)} <= set(factored)  # the adapters' gradients


def test_expert_merge_unmerge_roundtrip(setup):
    params, ads, _ = setup
    merged = lora.merge(params, ads)
    ad = ads["mlp"]["experts"]["gate_up_proj"]
    w0 = np.asarray(params["mlp"]["experts"]["gate_up_proj"], np.float64)
    a, b = np.asarray(ad.a, np.float64), np.asarray(ad.b, np.float64)
    want = w0 + ad.scale * np.einsum("edr,erf->edf", a, b)  # each expert its own A_e @ B_e
    np.testing.assert_allclose(merged["mlp"]["experts"]["gate_up_proj"], want, atol=1e-5)
    np.testing.assert_array_equal(merged["mlp"]["gate"]["kernel"], params["mlp"]["gate"]["kernel"])
    back = lora.unmerge(merged, ads)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(got, want, atol=2e-6)
    np.testing.assert_allclose(block(merged, jax.numpy.ones((2, D))),
                               block(lora.wrap(params, ads), jax.numpy.ones((2, D))), atol=2e-5)


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_qlora_on_quantised_experts(setup, method):
    params, ads, x = setup
    qp = lora.quantize(params, method, targets="experts", compute_dtype=jnp.float32)
    q = qp["mlp"]["experts"]["gate_up_proj"]
    assert isinstance(q, lora.QuantizedWeight) and q.shape == (E, D, 2 * F)
    if method == "int8":  # one scale per expert and output channel
        assert q.stack_ndim == 1 and q.absmax.shape == (E, 2 * F)
    w0 = params["mlp"]["experts"]["gate_up_proj"]
    err = float(jnp.sqrt(jnp.mean((q.dequantize() - w0) ** 2) / jnp.mean(w0 ** 2)))  # relative RMS error
    assert err < (0.12 if method == "nf4" else 0.01)
    assert isinstance(lora.quantize(params, method)["mlp"]["experts"]["down_proj"], lora.QuantizedWeight)  # default
    factored = block(lora.wrap(qp, ads), x)
    np.testing.assert_allclose(factored, block(lora.merge(qp, ads), x), atol=2e-5, rtol=1e-5)
    g_fact = jax.grad(lambda a: jnp.sum(block(lora.wrap(qp, a), x) ** 2))(ads)
    g_ref = jax.grad(lambda a: jnp.sum(block(lora.merge(qp, a), x, "dense") ** 2))(ads)
    for got, want in zip(jax.tree.leaves(g_fact), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    requantized, errors = lora.merge_quantized(qp, ads)  # merged per expert, quantised again in the same layout
    again = requantized["mlp"]["experts"]["gate_up_proj"]
    assert (again.method, again.stack_ndim, again.shape) == (method, q.stack_ndim, q.shape)
    assert set(errors) == {"mlp/experts/gate_up_proj", "mlp/experts/down_proj"}
    assert all(e.relative < (1.0 if method == "nf4" else 0.2) for e in errors.values()), errors


def test_dora_on_experts_is_refused():
    with pytest.raises(NotImplementedError, match="DoRA is implemented for dense kernels only"):
        lora.init(moe_params(), r=2, targets="experts", use_dora=True)
    params = moe_params()
    ads = lora.init(params, r=2, targets="experts")
    ad = ads["mlp"]["experts"]["down_proj"]
    dora = dataclasses.replace(ad, magnitude=jnp.ones((D,)))
    with pytest.raises(NotImplementedError, match="DoRA adapters on expert kernels"):
        ops.ragged_dot(jnp.ones((T, F)), lora.LoraWeight(params["mlp"]["experts"]["down_proj"], dora),
                       jnp.array([T, 0, 0, 0], jnp.int32))


def test_ragged_dot_rejects_a_non_expert_adapter():
    w = jnp.ones((E, D, F))
    flat = lora.init({"w": w}, r=2, targets="w", expert_axes={"w": 0})["w"]  # one (E, D*F) adapter
    with pytest.raises(ValueError, match="not one adapter per expert"):
        ops.ragged_dot(jnp.ones((T, D)), lora.LoraWeight(w, flat), jnp.array([T, 0, 0, 0], jnp.int32))


# ------------------------------------------------------------------------------------------- transform


def test_transform_factors_ragged_dot(setup):
    params, ads, x = setup
    gs = jnp.array([3, 0, 5, 4], jnp.int32)
    h = jax.random.normal(jax.random.key(9), (T, F))

    def plain(p, x, h):  # third-party code: lax.ragged_dot on the stacks directly, one through a transpose
        e = p["mlp"]["experts"]
        y1 = jax.lax.ragged_dot(x, e["gate_up_proj"], gs)
        dn = jax.lax.RaggedDotDimensionNumbers((((1,), (2,)), ((), ())), (0,), (0,))
        y2 = jax.lax.ragged_dot_general(h, jnp.swapaxes(e["down_proj"], 1, 2), gs, dn)  # (E, D, F) contracted on F
        return jnp.sum(jnp.tanh(y1)) + jnp.sum(y2 ** 2)

    fn = lora.transform(plain, strict=True)
    out, report = lora.transform(plain, report=True)(lora.wrap(params, ads), x, h)
    assert dict(report.factored) == {"ragged_dot_general": 2} and report.n_materialized == 0
    np.testing.assert_allclose(out, plain(lora.merge(params, ads), x, h), rtol=1e-5)
    got = jax.grad(lambda a: fn(lora.wrap(params, a), x, h))(ads)
    want = jax.grad(lambda a: plain(lora.merge(params, a), x, h))(ads)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------- PEFT and transformers


def _tiny_qwen3_moe(seed=0):
    torch = require("torch")
    transformers = require("transformers")
    cfg = transformers.Qwen3MoeConfig(vocab_size=32, hidden_size=D, intermediate_size=24, moe_intermediate_size=F,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                      num_experts=E, num_experts_per_tok=K, norm_topk_prob=True)
    torch.manual_seed(seed)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return torch, cfg, model


def test_peft_target_parameters_layout():
    """Our per-expert factors map onto PEFT's ParamWrapper tensors exactly: PEFT's own delta weight of each
    expert equals scale * a[e] @ b[e] (transposed: HF stores (E, out, in)), and the nesting of two wrapped
    parameters of one module decides the tensor names."""
    torch, _, model = _tiny_qwen3_moe()
    peft = require("peft")
    config = peft.LoraConfig(r=R, lora_alpha=6, target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                             init_lora_weights=False)
    pm = peft.get_peft_model(model, config)
    outer = pm.base_model.model.model.layers[0].mlp.experts
    inner = outer.base_layer
    assert (outer.parameter_name, inner.parameter_name) == ("down_proj", "gate_up_proj")  # last registered: outermost
    for wrapper, (d_in, d_out) in ((inner, (D, 2 * F)), (outer, (F, D))):
        lora_a = wrapper.lora_A["default"].weight.detach().numpy()
        lora_b = wrapper.lora_B["default"].weight.detach().numpy()
        assert lora_a.shape == (R * E, d_in) and lora_b.shape == (d_out, R * E)
        a, b = lpeft.expert_factors_from_peft(lora_a, lora_b, E)
        assert a.shape == (E, d_in, R) and b.shape == (E, R, d_out)
        peft_delta = wrapper.get_delta_weight("default").detach().numpy()  # (E, out, in)
        ours = wrapper.scaling["default"] * np.einsum("eir,ero->eio", a, b)
        np.testing.assert_allclose(ours, peft_delta.transpose(0, 2, 1), atol=1e-6)
        back_a, back_b = lpeft.expert_factors_to_peft(a, b)
        np.testing.assert_array_equal(back_a, lora_a)
        np.testing.assert_array_equal(back_b, lora_b)
    names = set(pm.state_dict())
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.default.weight" in names  # gate_up_proj
    assert "base_model.model.model.layers.0.mlp.experts.lora_A.default.weight" in names  # down_proj


def test_moe_layers_match_transformers():
    """route (both norm_topk_prob settings), the grouped experts and the one-hot reference against
    transformers' Qwen3-MoE block, and load_balancing_loss against load_balancing_loss_func."""
    torch, cfg, model = _tiny_qwen3_moe(seed=1)
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    mlp = model.model.layers[0].mlp
    xt = torch.randn(T, D)
    gate_w = mlp.gate.weight.detach().numpy().T  # (D, E)
    experts = {"gate_up_proj": jnp.asarray(mlp.experts.gate_up_proj.detach().numpy().transpose(0, 2, 1)),
               "down_proj": jnp.asarray(mlp.experts.down_proj.detach().numpy().transpose(0, 2, 1))}
    params = {"mlp": {"gate": {"kernel": jnp.asarray(gate_w)}, "experts": experts}}
    x = jnp.asarray(xt.numpy())
    for norm in (True, False):
        mlp.gate.norm_topk_prob = norm
        with torch.no_grad():
            _, scores, idx = mlp.gate(xt)
            want = mlp(xt[None])[0].numpy()
        routing = moe.route(x @ gate_w, K, norm_topk_prob=norm)
        np.testing.assert_array_equal(routing.experts, idx.numpy())
        np.testing.assert_allclose(routing.weights, scores.numpy(), atol=1e-6)
        for dispatch in moe.DISPATCHES:
            np.testing.assert_allclose(block(params, x, dispatch, norm), want, atol=2e-5, rtol=1e-5)
    logits = [torch.randn(T, E), torch.randn(T, E)]
    mask = torch.tensor([[1] * 6, [1] * 2 + [0] * 4])  # (batch 2, sequence 6): T = 12 rows
    for m in (None, mask):
        want = float(load_balancing_loss_func(tuple(logits), E, K, m))
        got = moe.load_balancing_loss([jnp.asarray(t.numpy()) for t in logits], E, K,
                                      None if m is None else jnp.asarray(m.numpy()))
        assert float(got) == pytest.approx(want, rel=1e-5)
