"""The mixture-of-experts families (Qwen3-MoE, Mixtral) against transformers' PyTorch models on tiny random
configs: logits and gradients, checkpoints both ways, the load-balancing loss, LoRA on the routed experts
against the real peft (target_parameters) both ways, and a tiny qwen3moe GGUF file against transformers'
GGUF reader."""

from __future__ import annotations

import dataclasses
import functools
import json
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import require

torch = require("torch")
transformers = require("transformers")

import lora_jax as lora  # noqa: E402
from lora_jax import peft as lpeft  # noqa: E402
from lora_jax import stacking, tree  # noqa: E402
from lora_jax.models import from_hf_weights, mixtral, moe, qwen3_moe, to_hf_weights  # noqa: E402
from lora_jax.models.hf import open_weights  # noqa: E402

V, SEQ = 64, 10
SMALL = dict(
    vocab_size=V,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    num_experts_per_tok=2,
)
CONFIGS = {
    # 3 layers, the middle one dense (mlp_only_layers); top-k weights not renormalised (Qwen3-MoE's default)
    "qwen3_moe": lambda: (
        qwen3_moe,
        transformers.Qwen3MoeConfig(
            **SMALL,
            intermediate_size=48,
            moe_intermediate_size=16,
            num_hidden_layers=3,
            num_experts=8,
            norm_topk_prob=False,
            mlp_only_layers=[1],
            router_aux_loss_coef=0.02,
        ),
    ),
    "qwen3_moe-norm": lambda: (
        qwen3_moe,
        transformers.Qwen3MoeConfig(
            **SMALL,
            intermediate_size=48,
            moe_intermediate_size=16,
            num_hidden_layers=2,
            num_experts=4,
            norm_topk_prob=True,
        ),
    ),
    "mixtral": lambda: (
        mixtral,
        transformers.MixtralConfig(
            **SMALL, intermediate_size=16, num_hidden_layers=2, num_local_experts=8, sliding_window=6
        ),
    ),
}


def randomize(module, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=gen))
    return module.eval()


@dataclasses.dataclass
class Case:
    name: str
    family: object
    hf_config: object
    torch_model: object
    config: object
    params: dict
    folder: Path


_TMP = tempfile.TemporaryDirectory()  # removed when the test process ends


@functools.cache
def make_case(name: str) -> Case:
    family, hf_config = CONFIGS[name]()
    torch.manual_seed(0)
    torch_model = randomize(transformers.AutoModelForCausalLM.from_config(hf_config))
    folder = Path(_TMP.name) / name
    torch_model.save_pretrained(folder)  # the checkpoint layout: one tensor per expert and projection
    config = family.Config.from_hf(hf_config)
    params = from_hf_weights(config, open_weights(folder), str(folder))
    return Case(name, family, hf_config, torch_model, config, params, folder)


# qwen3_moe-norm (a second Qwen3-MoE: renormalised top-k, no dense layer) runs with -m slow; the default run
# covers renormalised routing with Mixtral and route() against transformers' router (tests/test_moe.py).
SLOW = pytest.mark.slow


@pytest.fixture(scope="module", params=["qwen3_moe", pytest.param("qwen3_moe-norm", marks=SLOW), "mixtral"])
def case(request):
    return make_case(request.param)


def batch(seed: int = 0, pad: int = 3):
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, V, (2, SEQ))
    mask = np.ones_like(ids)
    mask[1, :pad] = 0
    ids[mask == 0] = 0
    return ids, mask


def logits(case, params, ids, mask=None, config=None):
    out, _ = case.family.build(config or case.config).apply(
        {"params": params}, jnp.asarray(ids), attention_mask=None if mask is None else jnp.asarray(mask)
    )
    return np.asarray(out)


def torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def _to_runtime(path: tuple[str, ...], x: np.ndarray) -> np.ndarray:
    """Our leaf in the layout of transformers' run-time parameter (what its gradients have)."""
    if path[-1] in ("gate_up_proj", "down_proj"):
        return x.transpose(0, 2, 1)
    return x.T if path[-1] == "kernel" else x


def test_config_round_trip(case):
    assert case.family.Config.from_hf(case.config.to_hf()) == case.config
    assert case.config.num_experts == (4 if case.name == "qwen3_moe-norm" else 8)


def test_checkpoint_names_both_ways(case):
    """Our params come from transformers' saved checkpoint (per-expert tensors) and go back to exactly it."""
    saved = open_weights(case.folder)
    ours = to_hf_weights(case.params, case.config)
    assert set(ours) == set(saved.keys())
    for name in ours:
        np.testing.assert_array_equal(ours[name], saved[name])
    assert case.config.scanned == (case.name != "qwen3_moe")  # the dense layer of qwen3_moe keeps its layers unrolled
    per_layer = stacking.unstack(case.params)["model"]
    layer = per_layer["layers_0"]["mlp"]
    e, width = case.config.num_experts, case.config.moe_intermediate_size
    assert layer["experts"]["gate_up_proj"].shape == (e, 32, 2 * width)
    if case.name == "qwen3_moe":  # the dense layer has no experts
        assert set(per_layer["layers_1"]["mlp"]) == {"gate_proj", "up_proj", "down_proj"}


def test_logits_match_transformers(case):
    ids, mask = batch()
    ours = logits(case, case.params, ids, mask)
    ref = torch_logits(case.torch_model, ids, mask)
    valid = mask.astype(bool)
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=1e-4)
    dense = logits(case, case.params, ids, mask, dataclasses.replace(case.config, moe_dispatch="dense"))
    np.testing.assert_allclose(dense, ours, atol=2e-5, rtol=1e-5)  # one-hot dispatch: the same numbers


def test_gradients_match_transformers(case):
    """d(loss)/d(every parameter), including the router and each expert's slice of the stacks."""
    ids, _ = batch(1, pad=0)
    targets = np.roll(ids, -1, axis=1)

    def loss(params):
        out = case.family.build(case.config).apply({"params": params}, jnp.asarray(ids))[0]
        return optax.softmax_cross_entropy_with_integer_labels(out, jnp.asarray(targets)).mean()

    grads = tree.flatten(stacking.unstack(jax.grad(loss)(case.params)))  # per layer, as the runtime names them
    model = case.torch_model
    model.zero_grad()
    out = model(torch.tensor(ids)).logits
    torch.nn.functional.cross_entropy(out.reshape(-1, V), torch.tensor(targets).reshape(-1)).backward()
    runtime = dict(model.named_parameters())
    names = lpeft.naming(case.config)
    assert len(grads) == len(runtime)
    for path, g in grads.items():
        ref = runtime[names.tensor_name(path)].grad.numpy()
        np.testing.assert_allclose(_to_runtime(path, np.asarray(g)), ref, atol=2e-5, rtol=1e-3, err_msg=str(path))
    model.zero_grad()


def test_aux_loss_matches_transformers(case):
    ids, mask = batch(2)
    hf_config = case.config.to_hf()
    hf_config.output_router_logits = True
    model = randomize(transformers.AutoModelForCausalLM.from_config(hf_config))
    model.load_state_dict(case.torch_model.state_dict())
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(ids))
    (_, _), state = case.family.build(case.config).apply(
        {"params": case.params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask), mutable=["intermediates"]
    )
    sparse = sum(case.config.is_sparse(i) for i in range(case.config.num_hidden_layers))
    assert len(moe.collect_router_logits(state["intermediates"])) == sparse
    aux = moe.aux_loss(state["intermediates"], case.config, jnp.asarray(mask))
    assert float(aux) == pytest.approx(case.config.router_aux_loss_coef * float(out.aux_loss), rel=1e-5)


def test_training_loss_is_transformers_loss_with_the_aux_loss():
    """train.tasks.causal_lm_loss on a MoE whose config sets output_router_logits: (summed CE + coef * aux *
    count) / count is transformers' training loss; without the flag, or at evaluation, it is the plain CE."""
    from train.tasks import causal_lm_loss

    case = make_case("mixtral")
    ids, mask = batch(5)
    pairs = mask[:, :-1] * mask[:, 1:]  # token t+1 is a target of a real (not padding) position t
    loss_mask = np.concatenate([pairs, np.zeros((2, 1), mask.dtype)], axis=1)
    b = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "loss_mask": jnp.asarray(loss_mask)}
    on = dataclasses.replace(case.config, output_router_logits=True, router_aux_loss_coef=0.05)
    total, extra = causal_lm_loss(mixtral.build(on), case.params, b, train=True, rng=None)
    plain, _ = causal_lm_loss(mixtral.build(case.config), case.params, b, train=True, rng=None)
    at_eval, _ = causal_lm_loss(mixtral.build(on), case.params, b, train=False, rng=None)
    assert float(at_eval) == pytest.approx(float(plain), rel=1e-6) and float(extra["aux_loss"]) > 0
    hf_config = on.to_hf()
    model = randomize(transformers.AutoModelForCausalLM.from_config(hf_config))
    model.load_state_dict(case.torch_model.state_dict())
    labels = np.concatenate([np.full((2, 1), -100), np.where(pairs == 1, ids[:, 1:], -100)], axis=1)
    with torch.no_grad():
        ref = model(torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels)).loss
    assert float(total / extra["count"]) == pytest.approx(float(ref), rel=1e-5)
    assert float(plain / extra["count"]) != pytest.approx(float(ref), rel=1e-5)  # the aux term is what closes it


def test_lora_presets_on_the_model(case):
    paths = lambda ads: {p for p, _ in lora.adapter_items(stacking.unstack(ads))}  # noqa: E731  (per layer)
    experts = paths(lora.init(case.params, r=2, targets="experts"))
    sparse = [i for i in range(case.config.num_hidden_layers) if case.config.is_sparse(i)]
    assert experts == {f"model/layers_{i}/mlp/experts/{k}" for i in sparse for k in ("gate_up_proj", "down_proj")}
    assert paths(lora.init(case.params, r=2, targets="router")) == {f"model/layers_{i}/mlp/gate/kernel" for i in sparse}
    everything = paths(lora.init(case.params, r=2, targets="all-linear+experts"))
    assert experts <= everything and not any("mlp/gate/kernel" in p for p in everything)


def _out_shapes(jaxpr):
    """The shapes of every value an equation of ``jaxpr`` makes, in nested jaxprs (a scan's body) too."""
    for eqn in jaxpr.eqns:
        yield from (tuple(v.aval.shape) for v in eqn.outvars)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _out_shapes(inner)


def _random_b(adapters, seed=0, scale=0.3):
    leaves, treedef = jax.tree_util.tree_flatten(adapters, is_leaf=lora.is_adapter)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [dataclasses.replace(ad, b=scale * jax.random.normal(k, ad.b.shape)) for ad, k in zip(leaves, keys)]
    )


@pytest.mark.parametrize(
    "name", [pytest.param("qwen3_moe", marks=SLOW), pytest.param("qwen3_moe-norm", marks=SLOW), "mixtral"]
)
def test_lora_on_experts_trains_and_merges(name):
    """A few steps on the routed experts + attention q/v: the loss falls, no (E, d_in, d_out) gradient is
    formed, and the merged model gives the factored model's logits."""
    case = make_case(name)
    ids = jax.random.randint(jax.random.key(2), (4, 12), 3, V)
    adapters = lora.init(
        case.params, r=4, targets=["(.*/)?mlp/experts/.*", ".*self_attn/(q|v)_proj/kernel"], key=jax.random.key(1)
    )
    model = case.family.build(case.config)

    def loss_fn(ad):
        out = model.apply({"params": lora.wrap(case.params, ad)}, ids[:, :-1])[0]
        return optax.softmax_cross_entropy_with_integer_labels(out, ids[:, 1:]).mean()

    tx = optax.adam(3e-2)
    state = tx.init(adapters)

    @jax.jit
    def step(ad, state):
        loss, g = jax.value_and_grad(loss_fn)(ad)
        updates, state = tx.update(g, state, ad)
        return optax.apply_updates(ad, updates), state, loss

    losses = []
    for _ in range(8):
        adapters, state, loss = step(adapters, state)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.1, losses
    stack = stacking.unstack(case.params)["model"]["layers_0"]["mlp"]["experts"]["gate_up_proj"].shape
    shapes = set(_out_shapes(jax.make_jaxpr(jax.grad(loss_fn))(adapters).jaxpr))  # inside a layer scan's body too
    assert stack not in shapes and (case.config.num_hidden_layers, *stack) not in shapes
    factored = logits(case, lora.wrap(case.params, adapters), np.asarray(ids))
    merged = logits(case, lora.merge(case.params, adapters), np.asarray(ids))
    np.testing.assert_allclose(factored, merged, atol=1e-4, rtol=1e-4)


def test_peft_adapters_both_ways(case, tmp_path):
    """An adapter made by the real peft (target_parameters on the experts, target_modules on attention) loads
    here with PEFT's logits and adapter gradients; ours saves and loads in PEFT with our logits."""
    peft = require("peft")
    ids, mask = batch(4)
    valid = mask.astype(bool)
    targets = [f"mlp.experts.{k}" for k in ("gate_up_proj", "down_proj")]
    pc = peft.LoraConfig(
        r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"], target_parameters=targets, init_lora_weights=False
    )
    base = randomize(transformers.AutoModelForCausalLM.from_config(case.hf_config))
    base.load_state_dict(case.torch_model.state_dict())
    pm = peft.get_peft_model(base, pc).eval()
    pm.save_pretrained(tmp_path / "theirs")
    loaded = lora.load_peft(tmp_path / "theirs", case.params, config=case.config)
    n_sparse = sum(case.config.is_sparse(i) for i in range(case.config.num_hidden_layers))
    assert len(lora.adapter_items(stacking.unstack(loaded.adapters))) == 4 * n_sparse + 2 * (
        case.config.num_hidden_layers - n_sparse
    )
    ref = torch_logits(pm, ids, mask)
    np.testing.assert_allclose(
        logits(case, lora.wrap(case.params, loaded.adapters), ids, mask)[valid], ref[valid], atol=1e-4, rtol=1e-4
    )
    # the adapters' gradients: PEFT's lora_A / lora_B grads mapped with the same layout
    targets_np = np.roll(ids, -1, axis=1)
    pm.zero_grad()
    out = pm(torch.tensor(ids)).logits
    torch.nn.functional.cross_entropy(out.reshape(-1, V), torch.tensor(targets_np).reshape(-1)).backward()

    def loss(ad):
        out = case.family.build(case.config).apply({"params": lora.wrap(case.params, ad)}, jnp.asarray(ids))[0]
        return optax.softmax_cross_entropy_with_integer_labels(out, jnp.asarray(targets_np)).mean()

    grads = dict(lora.adapter_items(stacking.unstack(jax.grad(loss)(loaded.adapters))))
    layer = pm.base_model.model.model.layers[0]
    outer, inner = layer.mlp.experts, layer.mlp.experts.base_layer  # down_proj wraps gate_up_proj
    for wrapper, key in ((inner, "gate_up_proj"), (outer, "down_proj")):
        ga, gb = lpeft.expert_factors_from_peft(
            wrapper.lora_A["default"].weight.grad.numpy(),
            wrapper.lora_B["default"].weight.grad.numpy(),
            case.config.num_experts,
        )
        got = grads[f"model/layers_0/mlp/experts/{key}"]
        np.testing.assert_allclose(got.a, ga, atol=1e-5, rtol=1e-3)
        np.testing.assert_allclose(got.b, gb, atol=1e-5, rtol=1e-3)

    ours = _random_b(
        lora.init(
            case.params,
            r=3,
            alpha=5,
            key=jax.random.key(7),
            targets=["(.*/)?mlp/experts/.*", ".*self_attn/o_proj/kernel"],
        )
    )
    lora.save_peft(ours, tmp_path / "ours", config=case.config)
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert sorted(cfg["target_parameters"]) == ["down_proj", "gate_up_proj"] and cfg["target_modules"] == ["o_proj"]
    fresh = randomize(transformers.AutoModelForCausalLM.from_config(case.hf_config))
    fresh.load_state_dict(case.torch_model.state_dict())
    theirs = peft.PeftModel.from_pretrained(fresh, tmp_path / "ours").eval()
    np.testing.assert_allclose(
        torch_logits(theirs, ids, mask)[valid],
        logits(case, lora.wrap(case.params, ours), ids, mask)[valid],
        atol=1e-4,
        rtol=1e-4,
    )
    back = lora.load_peft(tmp_path / "ours", case.params, config=case.config)  # and our own files round-trip
    for (p, a), (q, b) in zip(lora.adapter_items(ours), lora.adapter_items(back.adapters), strict=True):
        assert p == q and a.scale == pytest.approx(b.scale)
        np.testing.assert_allclose(a.a, b.a, atol=1e-7)
        np.testing.assert_allclose(a.b, b.b, atol=1e-7)


# ------------------------------------------------------------------------------------------------ GGUF


def test_qwen3_moe_gguf_matches_transformers(tmp_path):
    """A tiny qwen3moe GGUF (experts stacked per projection, one Q8_0 tensor) read here and by transformers'
    GGUF reader: the same logits as the source model. (transformers' reader ignores
    qwen3moe.expert_feed_forward_length and assumes Qwen3MoeConfig's default 768, so the experts are 768 wide.)"""
    gguf = require("gguf")
    from tokenizers.pre_tokenizers import ByteLevel

    from lora_jax.models import gguf as lgguf

    merges = ["h e", "l l", "he ll"]
    tokens = ["<unk>", "<s>", "</s>"] + sorted(ByteLevel.alphabet()) + [m.replace(" ", "") for m in merges]
    n_exp, width, d, layers = 4, 768, 32, 2
    hf_config = transformers.Qwen3MoeConfig(
        vocab_size=len(tokens),
        hidden_size=d,
        intermediate_size=48,
        moe_intermediate_size=width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=n_exp,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        max_position_embeddings=64,
        rope_theta=1000.0,
        rms_norm_eps=1e-6,
    )
    torch.manual_seed(0)
    model = randomize(transformers.Qwen3MoeForCausalLM(hf_config))
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    path = tmp_path / "tiny-moe.gguf"
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    for add, value in [
        (w.add_block_count, layers),
        (w.add_context_length, 64),
        (w.add_embedding_length, d),
        (w.add_feed_forward_length, 48),
        (w.add_head_count, 4),
        (w.add_head_count_kv, 2),
        (w.add_key_length, 8),
        (w.add_value_length, 8),
        (w.add_rope_freq_base, 1000.0),
        (w.add_layer_norm_rms_eps, 1e-6),
        (w.add_expert_count, n_exp),
        (w.add_expert_used_count, 2),
        (w.add_expert_feed_forward_length, width),
        (w.add_tokenizer_model, "gpt2"),
        (w.add_tokenizer_pre, "default"),
        (w.add_token_list, tokens),
        (w.add_token_types, [2, 3, 3] + [1] * (len(tokens) - 3)),
        (w.add_token_merges, merges),
        (w.add_bos_token_id, 1),
        (w.add_eos_token_id, 2),
        (w.add_unk_token_id, 0),
    ]:
        add(value)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate": "ffn_gate_inp",
    }
    for i in range(layers):
        for hf, g in names.items():
            w.add_tensor(f"blk.{i}.{g}.weight", sd[f"model.layers.{i}.{hf}.weight"])
        gate_up = sd[f"model.layers.{i}.mlp.experts.gate_up_proj"]  # (E, 2F, D): gate rows first
        w.add_tensor(f"blk.{i}.ffn_gate_exps.weight", np.ascontiguousarray(gate_up[:, :width]))
        up = np.ascontiguousarray(gate_up[:, width:])
        if i == 1:  # one quantised stack; the source model gets its dequantised values
            q = gguf.quants.quantize(up, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(f"blk.{i}.ffn_up_exps.weight", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            with torch.no_grad():
                model.model.layers[i].mlp.experts.gate_up_proj[:, width:] = torch.from_numpy(
                    gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
                )
        else:
            w.add_tensor(f"blk.{i}.ffn_up_exps.weight", up)
        w.add_tensor(f"blk.{i}.ffn_down_exps.weight", sd[f"model.layers.{i}.mlp.experts.down_proj"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    flax_model, params, _, config = lgguf.load_gguf(path, tokenizer=False)
    assert isinstance(config, qwen3_moe.Config)
    assert (config.num_experts, config.moe_intermediate_size) == (n_exp, width)
    assert config.norm_topk_prob  # llama.cpp's qwen3moe always renormalises
    ids = np.random.RandomState(0).randint(0, config.vocab_size, (2, 10))
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()
    ours, _ = flax_model.apply({"params": params}, jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=1e-4)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        np.testing.assert_allclose(hf(torch.tensor(ids)).logits.numpy(), ref, atol=1e-5)
