"""LoRA on mixtures of experts: per-expert adapters on stacked expert kernels, the grouped (ragged) product,
merge / unmerge, QLoRA experts, target presets that tell routed experts, shared experts and routers apart,
lora.transform on ragged_dot, PEFT's target_parameters layout, and the MoE layers against transformers."""

from __future__ import annotations

import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lora
from conftest import require
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
        adapters,
        is_leaf=lora.is_adapter,
    )


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
    sel = {
        name: adapted(lora.init(params, r=2, targets=name))
        for name in ("experts", "shared-experts", "router", "all-linear", "all-linear+experts", "attention")
    }
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


@pytest.mark.parametrize(
    "rule, message",
    [
        (".*experts/.*", "selects routed experts .* and shared experts"),  # also matches shared_experts/...
        (".*gate.*", "selects the router mlp/gate/kernel and also"),  # gate_up_proj and the router gate
        (".*mlp/.*kernel", "selects the router mlp/gate/kernel"),  # router + shared experts
        (".*mlp/gate/kernel", "also non-MoE kernel.* dense_mlp/gate/kernel"),  # the router and a dense MLP's gate
    ],
)
def test_rules_that_mix_experts_and_router_are_errors(rule, message):
    with pytest.raises(TargetError, match=message):
        lora.init(moe_params(), r=2, targets=rule)


def test_rules_that_name_one_role_are_fine():
    params = moe_params()
    assert adapted(lora.init(params, r=2, targets="(.*/)?mlp/experts/.*")) == {
        "mlp/experts/gate_up_proj",
        "mlp/experts/down_proj",
    }
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
    np.testing.assert_allclose(
        block(merged, jax.numpy.ones((2, D))), block(lora.wrap(params, ads), jax.numpy.ones((2, D))), atol=2e-5
    )


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_qlora_on_quantised_experts(setup, method):
    params, ads, x = setup
    qp = lora.quantize(params, method, targets="experts", compute_dtype=jnp.float32)
    q = qp["mlp"]["experts"]["gate_up_proj"]
    assert isinstance(q, lora.QuantizedWeight) and q.shape == (E, D, 2 * F)
    if method == "int8":  # one scale per expert and output channel
        assert q.stack_ndim == 1 and q.absmax.shape == (E, 2 * F)
    w0 = params["mlp"]["experts"]["gate_up_proj"]
    err = float(jnp.sqrt(jnp.mean((q.dequantize() - w0) ** 2) / jnp.mean(w0**2)))  # relative RMS error
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
        ops.ragged_dot(
            jnp.ones((T, F)),
            lora.LoraWeight(params["mlp"]["experts"]["down_proj"], dora),
            jnp.array([T, 0, 0, 0], jnp.int32),
        )


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
        return jnp.sum(jnp.tanh(y1)) + jnp.sum(y2**2)

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
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=32,
        hidden_size=D,
        intermediate_size=24,
        moe_intermediate_size=F,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_experts=E,
        num_experts_per_tok=K,
        norm_topk_prob=True,
    )
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
    config = peft.LoraConfig(
        r=R,
        lora_alpha=6,
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        init_lora_weights=False,
    )
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
    experts = {
        "gate_up_proj": jnp.asarray(mlp.experts.gate_up_proj.detach().numpy().transpose(0, 2, 1)),
        "down_proj": jnp.asarray(mlp.experts.down_proj.detach().numpy().transpose(0, 2, 1)),
    }
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
        got = moe.load_balancing_loss(
            [jnp.asarray(t.numpy()) for t in logits], E, K, None if m is None else jnp.asarray(m.numpy())
        )
        assert float(got) == pytest.approx(want, rel=1e-5)


# ------------------------------------------------------------------------------------ expert parallelism
#
# Tokens dispatched to their experts' devices and back (moe.experts_glu_sharded). The algorithm (capacity
# buffers, slots, drops) runs here on a one-device mesh whose expert axis has size 1 (the all-to-alls are then
# the identity); the 8-device checks (compiled HLO, equality with one device, a training step) run in a child
# process whose JAX starts with 8 CPU devices (test_expert_parallel_on_8_cpu_devices).

CHILD = os.environ.get("LORA_JAX_8DEV") == "1"
child_only = pytest.mark.skipif(not CHILD, reason="runs in the 8-device child of test_expert_parallel_on_8_cpu_devices")


def _mesh(expert: int):
    from jax.sharding import Mesh

    devices = np.asarray(jax.devices()[:expert]).reshape(1, 1, expert)
    return Mesh(devices, ("data", "fsdp", "expert"))


def _np_keep(experts: np.ndarray, num_experts: int, capacity: int) -> np.ndarray:
    """The drop rule by hand: each expert takes the first ``capacity`` of one device's pairs, in token order."""
    seen = np.zeros(num_experts, int)
    keep = []
    for e in np.asarray(experts).reshape(-1):
        keep.append(seen[e] < capacity)
        seen[e] += 1
    return np.asarray(keep).reshape(np.shape(experts))


def _routed(params, x):
    return moe.route(x @ params["mlp"]["gate"]["kernel"], K)


def test_expert_capacity():
    assert moe.expert_capacity(64, 2, 8, None) == 64  # never drops: a token picks an expert at most once
    assert moe.expert_capacity(64, 2, 8, 1.0) == 16  # the balanced share t * k / E
    assert moe.expert_capacity(64, 2, 8, 1.25) == 20
    assert moe.expert_capacity(64, 2, 8, 100.0) == 64  # never more than the tokens
    assert moe.expert_capacity(3, 1, 64, 0.01) == 1
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        moe.expert_capacity(64, 2, 8, 0.0)
    from lora_jax.models import qwen3_moe

    with pytest.raises(ValueError, match="moe_capacity_factor must be a number > 0 or None"):
        qwen3_moe.Config(moe_capacity_factor=-1.0)


def test_dispatch_slots_follow_the_drop_rule():
    experts = jax.random.randint(jax.random.key(2), (40, 3), 0, 5)
    experts = jnp.sort(experts, axis=1) + jnp.arange(3)  # distinct per token, as top_k gives: 0..6
    for capacity in (1, 4, 9, 40):
        slot, keep = jax.jit(moe.dispatch_slots, static_argnums=(1, 2))(experts, 7, capacity)
        want = _np_keep(np.asarray(experts), 7, capacity).reshape(-1)
        np.testing.assert_array_equal(keep, want)
        flat = np.asarray(experts).reshape(-1)
        kept = np.asarray(slot)[want]
        assert len(set(kept.tolist())) == len(kept)  # one row per kept pair
        np.testing.assert_array_equal(kept // capacity, flat[want])  # in its expert's rows
        assert (np.asarray(slot)[~want] == 7 * capacity).all()  # dropped: one past the buffer


@pytest.mark.parametrize("capacity_factor", [None, 0.6])
def test_sharded_dispatch_on_one_device_equals_grouped_experts(setup, capacity_factor):
    """On a one-device expert mesh the dispatch is the capacity buffers and slots alone: the same outputs and
    adapter gradients as experts_glu, with each dropped pair (by the hand-written rule) contributing nothing."""
    params, ads, x = setup
    mesh = _mesh(1)
    routing = _routed(params, x)
    cap = moe.expert_capacity(T, K, E, capacity_factor)
    keep = _np_keep(np.asarray(routing.experts), E, cap)
    ref_routing = routing._replace(weights=routing.weights * keep)
    if capacity_factor is not None:
        assert 0 < (~keep).sum() < keep.size  # some pairs dropped, not all

    def loss(a, sharded):
        e = lora.wrap(params, a)["mlp"]["experts"]
        if sharded:
            out = moe.experts_glu_sharded(
                x, routing, mesh=mesh, gate_up=e["gate_up_proj"], down=e["down_proj"], capacity_factor=capacity_factor
            )
            return jnp.sum(jnp.tanh(out.y) ** 2), out
        y = moe.experts_glu(x, ref_routing, gate_up=e["gate_up_proj"], down=e["down_proj"])
        return jnp.sum(jnp.tanh(y) ** 2), None

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (got, out), g_got = grad(ads, True)
    (want, _), g_want = grad(ads, False)
    assert int(out.dropped) == int((~keep).sum()) and out.capacity == cap
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want), strict=True):
        assert float(jnp.max(jnp.abs(b))) > 1e-3
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_expert_parallel_needs_an_expert_mesh_and_says_what_blocks_it(setup):
    from lora_jax import sharding

    params, ads, x = setup
    assert sharding.expert_mesh() is None  # no mesh in context: the single-device path
    with jax.set_mesh(_mesh(1)):
        assert sharding.expert_mesh() is None  # an expert axis of one device is no expert parallelism
    with sharding.activation_mesh(_mesh(1)):
        assert sharding.expert_mesh() is None
    e = params["mlp"]["experts"]
    routing = _routed(params, x)
    mesh = _mesh(1)
    q = lora.quantize(params, "int8", targets="experts")["mlp"]["experts"]
    with pytest.raises(ValueError, match="down is a quantised stack"):
        moe.experts_glu_sharded(x, routing, mesh=mesh, gate_up=e["gate_up_proj"], down=q["down_proj"])
    with pytest.raises(ValueError, match="pass either gate_up"):
        moe.experts_glu_sharded(x, routing, mesh=mesh, gate=e["gate_up_proj"], down=e["down_proj"])
    flat = lora.init(params, r=2, targets=".*experts/down_proj", expert_axes={".*": 0})
    w = lora.wrap(params, flat)["mlp"]["experts"]["down_proj"]
    assert "down's adapter is not one adapter per expert" in moe.expert_parallel_blocker(mesh, T, {"down": w})


def _run_8dev_child(select: str) -> None:
    """Run this file's 8-device tests that ``select`` (a ``-k`` expression) picks in a child process whose JAX
    starts with 8 CPU devices (XLA reads the device count once, when JAX starts)."""
    if CHILD:
        pytest.skip("already the 8-device child")
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu", LORA_JAX_8DEV="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", "-k", select, __file__],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


def test_expert_parallel_on_8_cpu_devices():
    """The compiled dispatch on 8 CPU devices (test_8dev_expert_dispatch_*)."""
    _run_8dev_child("8dev and dispatch and not benchmark")


@pytest.mark.slow
def test_expert_parallel_training_on_8_cpu_devices():
    """A Qwen3-MoE's loss, gradients and train.loop steps on 8 CPU devices (test_8dev_*_training_*), and
    ``benchmarks.moe_dispatch --quick``."""
    _run_8dev_child("8dev and (training or benchmark)")


def _collectives(hlo: str) -> dict[str, list[int]]:
    """Each collective of a compiled module's HLO text -> the element counts of the arrays it moves."""
    found: dict[str, list[int]] = {}
    for line in hlo.splitlines():
        m = re.search(r"= (.*?) (all-gather|all-reduce|all-to-all|reduce-scatter|collective-permute)(-start)?\(", line)
        if m:
            sizes = [
                int(np.prod([int(d) for d in dims.split(",") if d]))
                for dims in re.findall(r"[a-z]+\d*\[([\d,]*)\]", m.group(1))
            ]
            found.setdefault(m.group(2), []).extend(sizes)
    return found


@child_only
def test_8dev_expert_dispatch_moves_tokens_not_activations_and_equals_one_device():
    """mesh expert=8, 8 experts, one per device: the compiled forward + backward of a block (gradients of the
    per-expert adapters and of the tokens) all-to-alls tokens to their experts and back, and has no all-gather and
    no all-reduce of anything as large as one device's tokens; losses and gradients equal one device's; with a
    capacity, the dropped pairs are those of the rule applied to each device's own tokens."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from lora_jax import sharding

    n_exp, d, f, t = 8, 32, 16, 256
    ks = jax.random.split(jax.random.key(0), 4)
    params = {
        "mlp": {
            "gate": {"kernel": jax.random.normal(ks[0], (d, n_exp))},
            "experts": {
                "gate_up_proj": jax.random.normal(ks[1], (n_exp, d, 2 * f)) * 0.2,
                "down_proj": jax.random.normal(ks[2], (n_exp, f, d)) * 0.2,
            },
        }
    }
    ads = randomise_b(lora.init(params, r=R, targets="experts", key=ks[3]))
    x = jax.random.normal(jax.random.key(9), (t, d))

    def loss(a, x, params, cf=None, keep=None):
        e = lora.wrap(params, a)["mlp"]["experts"]
        mesh = sharding.expert_mesh()
        routing = moe.route_sharded(x @ params["mlp"]["gate"]["kernel"], K, mesh=mesh)
        if mesh is None:
            if keep is not None:
                routing = routing._replace(weights=routing.weights * keep)
            y, dropped = moe.experts_glu(x, routing, gate_up=e["gate_up_proj"], down=e["down_proj"]), 0
        else:
            y, dropped, _ = moe.experts_glu_sharded(
                x, routing, mesh=mesh, gate_up=e["gate_up_proj"], down=e["down_proj"], capacity_factor=cf
            )
        return jnp.mean(jnp.tanh(y) ** 2), dropped

    grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    (l1, _), g1 = jax.jit(grad)(ads, x, params)
    mesh = sharding.make_mesh(1, 1, expert=8)
    p8 = jax.device_put(params, sharding.tree_shardings(params, mesh))
    a8 = jax.device_put(ads, sharding.tree_shardings(ads, mesh))
    assert a8["mlp"]["experts"]["down_proj"].a.sharding.spec[0] == "expert"
    x8 = jax.device_put(x, NamedSharding(mesh, P(sharding.batch_axes(mesh))))
    placed = _collectives(jax.jit(grad).lower(a8, x8, p8).compile().as_text())  # today: parameter placement
    assert max(placed["all-reduce"]) >= t * K * d  # the check can fail: (tokens x k, D) all-reduced
    with jax.set_mesh(mesh):
        step = jax.jit(grad, static_argnums=3)
        hlo = _collectives(step.lower(a8, x8, p8, None).compile().as_text())
        (l8, dropped), g8 = step(a8, x8, p8, None)
    with sharding.activation_mesh(mesh):  # the training loop's context (train.loop.on_mesh) selects it too
        assert dict(sharding.expert_mesh().shape) == dict(mesh.shape)
    assert hlo["all-to-all"] and "all-gather" not in hlo and "reduce-scatter" not in hlo
    assert max(hlo.get("all-reduce", [0])) < (t // 8) * d, hlo  # never one device's tokens x D, let alone all
    assert int(dropped) == 0
    np.testing.assert_allclose(l8, l1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g1), strict=True):
        assert float(jnp.max(jnp.abs(b))) > 1e-5
        np.testing.assert_allclose(a, b, atol=1e-7, rtol=1e-5)
    # a capacity of the balanced share: some pairs dropped, each device applying the rule to its own 32 tokens
    routing = moe.route(x @ params["mlp"]["gate"]["kernel"], K)
    cap = moe.expert_capacity(t // 8, K, n_exp, 1.0)
    keep = np.concatenate([_np_keep(c, n_exp, cap) for c in np.split(np.asarray(routing.experts), 8)])
    with jax.set_mesh(mesh):
        (l8, dropped), _ = step(a8, x8, p8, 1.0)
    assert int(dropped) == int((~keep).sum()) > 0
    (want, _), _ = jax.jit(grad, static_argnums=3)(ads, x, params, None, jnp.asarray(keep))
    np.testing.assert_allclose(l8, want, rtol=1e-6)


@child_only
def test_8dev_qwen3_moe_training_equals_one_device():
    """A tiny Qwen3-MoE (8 experts, top-2, aux loss on) on a mesh with expert=8 (and on data=2 x expert=4):
    its causal-LM loss and adapter gradients, and three train.loop steps, equal one device's; the traced step
    dispatches with all-to-alls and the blocks sow no dropped pair."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from lora_jax import sharding
    from lora_jax import tree as ltree
    from lora_jax.models import qwen3_moe
    from train import loop
    from train.config import load_config

    config = qwen3_moe.Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        max_position_embeddings=32,
        output_router_logits=True,
        router_aux_loss_coef=0.05,
    )
    model = qwen3_moe.build(config)
    cfg = load_config(
        None,
        [
            "data.task=causal-lm",
            "lora.targets=['(.*/)?mlp/experts/.*', '.*self_attn/(q|v)_proj/kernel']",
            "lora.r=4",
            "train.steps=3",
            "optim.warmup_steps=0",
            "optim.schedule=constant",
            "optim.lr=1e-2",
        ],
    )
    params = qwen3_moe.init_params(config, jax.random.key(0))
    frozen0, trainable0 = loop.choose_trainable(cfg, params, jax.random.key(1))
    trainable0 = jax.tree_util.tree_map(
        lambda ad: dataclasses.replace(ad, b=ad.b + 0.1), trainable0, is_leaf=lora.is_adapter
    )
    ids = np.random.default_rng(0).integers(1, 128, (1, 8, 16)).astype(np.int32)
    host = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}

    def lm_loss(trainable, frozen, ids):
        p, a = lora.combine(frozen, trainable)
        (logits, _), state = model.apply({"params": lora.wrap(p, a)}, ids, mutable=["intermediates"])
        ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), ids[:, 1:, None], -1))
        dropped = sum(sum(v) for path, v in ltree.flatten(state["intermediates"]).items() if "dropped_pairs" in path)
        return ce + moe.aux_loss(state["intermediates"], config), dropped

    def run(mesh, steps):
        frozen = sharding.put_tree(frozen0, sharding.tree_shardings(frozen0, mesh))
        trainable = sharding.put_tree(trainable0, sharding.tree_shardings(trainable0, mesh))
        rows = sharding.batch_sharding(mesh, ndim=3, leading=1)
        batch = {k: sharding.host_to_global(v, rows) for k, v in host.items()}
        flat = jax.device_put(ids[0], NamedSharding(mesh, P(sharding.batch_axes(mesh))))
        tx = loop.make_optimizer(cfg)
        with jax.set_mesh(mesh):
            grad = jax.value_and_grad(lm_loss, has_aux=True)
            jaxpr = str(jax.make_jaxpr(grad)(trainable, frozen, flat))
            (loss, dropped), grads = jax.jit(grad)(trainable, frozen, flat)
            step = jax.jit(loop.make_train_step(model, cfg, tx))
            opt_state, losses = sharding.init_opt_state(tx, trainable), []
            for i in range(steps):
                trainable, opt_state, m = step(trainable, opt_state, frozen, batch, jax.random.key(i))
                losses.append(float(m["loss"]))
        return float(loss), int(dropped), jax.device_get(grads), losses, jax.device_get(trainable), jaxpr

    one = run(sharding.make_mesh(1, 1, devices=jax.devices()[:1]), 3)
    assert "all_to_all" not in one[5]
    for mesh, steps in ((sharding.make_mesh(1, 1, expert=8), 3), (sharding.make_mesh(2, 1, expert=4), 0)):
        loss, dropped, grads, losses, final, jaxpr = run(mesh, steps)
        assert jaxpr.count("all_to_all") >= 2 * config.num_hidden_layers and dropped == 0
        assert loss == pytest.approx(one[0], rel=1e-5)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(one[2]), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
        if not steps:
            continue
        np.testing.assert_allclose(losses, one[3], rtol=2e-5)
        assert losses[-1] < losses[0]
        for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(one[4]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5)


@child_only
def test_8dev_dispatch_benchmark_quick(tmp_path):
    """benchmarks.moe_dispatch --quick: each device's program is about 1/8 of the whole batch's at the same
    capacity, the dispatch gathers nothing while the placement-only program gathers and reduces activations, and
    the record keeps its provenance."""
    import json

    from benchmarks import moe_dispatch

    result = moe_dispatch.main(["--quick", "--out", str(tmp_path / "moe_dispatch_quick.json")])
    rows = {(r["variant"], str(r["capacity_factor"])): r for r in result["rows"]}
    for cf in ("none (dropless)", "1.25"):
        ep = rows[("8 devices, all-to-all", cf)]
        assert 0.1 < ep["to_1dev_capacity"] < 0.15 and ep["collectives"]["all-to-all"]["count"] >= 2
        assert "all-gather" not in ep["collectives"]
    assert rows[("8 devices, all-to-all", "none (dropless)")]["dropped_pairs"] == 0
    placed = rows[("8 devices, placement", "-")]["collectives"]
    assert placed["all-reduce"]["largest_elements"] >= 256 * 2 * 32  # tokens x k x D
    losses = result["models"]["E=8"]["losses"]
    assert losses["8 devices, all-to-all, capacity factor None"] == pytest.approx(losses["1 device, grouped"], rel=1e-5)
    assert losses["8 devices, all-to-all, capacity factor 1.25"] != losses["1 device, grouped"]  # pairs dropped
    saved = json.loads((tmp_path / "moe_dispatch_quick.json").read_text())
    assert saved["provenance"]["benchmark"] == "moe_dispatch" and saved["provenance"]["git"]


def test_sharded_dispatch_applies_adapter_dropout(setup):
    """LoRA dropout inside the dispatch: each device folds its index into the key; with a rate the output moves
    off the dropout-free one, without a key it is that one."""
    params, ads, x = setup
    mesh = _mesh(1)
    routing = _routed(params, x)
    ads = jax.tree_util.tree_map(lambda ad: dataclasses.replace(ad, dropout=0.5), ads, is_leaf=lora.is_adapter)

    @jax.jit
    def run(key):
        e = lora.wrap(params, ads, dropout_key=key)["mlp"]["experts"]
        return moe.experts_glu_sharded(x, routing, mesh=mesh, gate_up=e["gate_up_proj"], down=e["down_proj"]).y

    e = lora.wrap(params, ads)["mlp"]["experts"]
    plain = moe.experts_glu(x, routing, gate_up=e["gate_up_proj"], down=e["down_proj"])
    dropped = run(jax.random.key(0))
    assert bool(jnp.all(jnp.isfinite(dropped))) and float(jnp.max(jnp.abs(dropped - plain))) > 1e-3
    np.testing.assert_allclose(run(None), plain, atol=1e-5, rtol=1e-5)
