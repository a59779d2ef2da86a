"""Llama-family decoders checked against transformers' PyTorch Llama / Qwen2 / Mistral on tiny random models,
and LoRA on them checked against PEFT."""

import dataclasses
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

import lora_jax as lora
from lora_jax import stacking
from lora_jax.errors import CheckpointError
from lora_jax.models import from_hf_weights, llama, to_hf_weights
from lora_jax.models.generate import init_cache

SMALL = dict(
    vocab_size=96,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
CONFIGS = {
    # grouped-query attention (6 query heads share 2 key/value heads), untied head
    "llama-gqa": lambda: transformers.LlamaConfig(**SMALL, rope_theta=1000.0),
    # Llama 3.1 RoPE scaling, tied embeddings, biases everywhere
    "llama3-tied-bias": lambda: transformers.LlamaConfig(
        **SMALL,
        tie_word_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
            "rope_theta": 5000.0,
        },
    ),
    # q/k/v biases, no o bias
    "qwen2": lambda: transformers.Qwen2Config(**SMALL),
    # sliding window shorter than the test sequences; linear RoPE scaling
    "mistral-window": lambda: transformers.MistralConfig(
        **SMALL, sliding_window=5, head_dim=8, rope_scaling={"rope_type": "linear", "factor": 2.0}
    ),
}
SEQ = 12


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight and bias random (HF zero-initialises biases, which would hide a mis-mapped bias)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return module.eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request):
    hf_config = CONFIGS[request.param]()
    torch.manual_seed(0)
    torch_model = randomize(transformers.AutoModelForCausalLM.from_config(hf_config))
    config = llama.Config.from_hf(hf_config)
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    params = from_hf_weights(config, state, "state_dict")
    return dataclasses.make_dataclass("Case", ["name", "hf_config", "torch_model", "config", "params"])(
        request.param, hf_config, torch_model, config, params
    )


def batch(seed: int = 0, pad: int = 3):
    """(2, SEQ) ids; row 1 left-padded with ``pad`` tokens."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, SMALL["vocab_size"], (2, SEQ))
    mask = np.ones_like(ids)
    mask[1, :pad] = 0
    ids[mask == 0] = 0
    return ids, mask


def torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def jax_logits(config, params, ids, mask=None, **kw):
    logits, _ = llama.build(config).apply(
        {"params": params}, jnp.asarray(ids), attention_mask=None if mask is None else jnp.asarray(mask), **kw
    )
    return np.asarray(logits)


def test_config_round_trip(case):
    assert llama.Config.from_hf(case.config.to_hf()) == case.config
    assert case.config.num_key_value_heads == 2 and case.config.num_attention_heads == 6


def test_logits_match_transformers(case):
    ids, mask = batch()
    ours = jax_logits(case.config, case.params, ids, mask)
    ref = torch_logits(case.torch_model, ids, mask)
    valid = mask.astype(bool)  # padded query rows are garbage in both
    assert np.abs(ref).max() > 1.0  # random weights big enough that a wrong mapping shows
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # long; the default suite keeps a cheaper test of the same path
def test_sliding_window_is_applied():
    config = llama.Config.from_hf(CONFIGS["mistral-window"]())
    params = llama.init_params(config, jax.random.key(0))
    params = jax.tree_util.tree_map(lambda x: x * 8.0 if x.ndim == 2 else x, params)  # sharper attention
    ids, _ = batch()
    windowed = jax_logits(config, params, ids)
    full = jax_logits(dataclasses.replace(config, sliding_window=None), params, ids)
    np.testing.assert_allclose(windowed[:, :5], full[:, :5], atol=1e-5)  # inside the window: identical
    assert np.abs(windowed[:, 5:] - full[:, 5:]).max() > 1e-3


def test_to_hf_weights_load_into_transformers(case):
    tensors = to_hf_weights(case.params, case.config)
    with tempfile.TemporaryDirectory() as tmp:  # the names transformers itself saves
        case.torch_model.save_pretrained(tmp)
        from safetensors import safe_open

        with safe_open(f"{tmp}/model.safetensors", "np") as f:
            assert set(f.keys()) == set(tensors)
    fresh = transformers.AutoModelForCausalLM.from_config(case.config.to_hf()).eval()
    missing, unexpected = fresh.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, strict=False
    )
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if case.config.tie_word_embeddings else set())
    ids, mask = batch(1)
    valid = mask.astype(bool)
    np.testing.assert_allclose(
        torch_logits(fresh, ids, mask)[valid],
        jax_logits(case.config, case.params, ids, mask)[valid],
        atol=1e-4,
        rtol=1e-4,
    )


def test_cache_matches_full_forward(case):
    """Prefill 7 tokens into a cache, then feed the rest one by one: the same logits as one full forward."""
    ids, mask = batch(2)
    model = llama.build(case.config)
    full = jax_logits(case.config, case.params, ids, mask)
    apply = jax.jit(lambda p, x, m, c: model.apply({"params": p}, x, attention_mask=m, cache=c))
    cache = init_cache(case.config, 2, SEQ + 4)
    out, cache = apply(case.params, ids[:, :7], mask[:, :7], cache)
    steps = [out]
    for t in range(7, SEQ):
        out, cache = apply(case.params, ids[:, t : t + 1], mask[:, t : t + 1], cache)
        steps.append(out)
    assert int(cache.index) == SEQ
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.concatenate(steps, axis=1)[valid], full[valid], atol=1e-5, rtol=1e-5)


def test_cache_overflow_is_an_error(case):
    model = llama.build(case.config)
    _, cache = model.apply({"params": case.params}, jnp.ones((1, 3), jnp.int32), cache=init_cache(case.config, 1, 4))
    with pytest.raises(ValueError, match="cache is full: 3 of 4 slots used, 2 more"):
        model.apply({"params": case.params}, jnp.ones((1, 2), jnp.int32), cache=cache)


# ------------------------------------------------------------------------------------------- weights


def test_missing_wrong_shape_and_extra_tensors_raise():
    hf_config = CONFIGS["llama-gqa"]()
    config = llama.Config.from_hf(hf_config)
    state = {k: v.numpy() for k, v in transformers.LlamaForCausalLM(hf_config).state_dict().items()}
    broken = dict(state)
    del broken["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"ckpt.safetensors.*'model\.layers\.1\.mlp\.up_proj\.weight'"):
        from_hf_weights(config, broken, "ckpt.safetensors")
    broken = dict(state, **{"model.layers.0.self_attn.k_proj.weight": np.zeros((48, 48), np.float32)})
    with pytest.raises(CheckpointError, match=r"k_proj\.weight' has shape \(48, 48\), expected \(16, 48\)"):
        from_hf_weights(config, broken, "ckpt.safetensors")
    with pytest.raises(CheckpointError, match="model.layers.2.mlp.up_proj.weight"):
        from_hf_weights(
            config,
            dict(state, **{"model.layers.2.mlp.up_proj.weight": state["model.layers.1.mlp.up_proj.weight"]}),
            "ckpt.safetensors",
        )
    # rotary buffers of older checkpoints are harmless
    from_hf_weights(config, dict(state, **{"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4)}), "x")
    # the base model reads the model.* tensors
    base = from_hf_weights(config, state, "x", task="base")
    assert set(base) == {"embed_tokens", "layers", "norm"}  # scanned by default: one stack of the two layers
    assert set(stacking.unstack(base)) == {"embed_tokens", "layers_0", "layers_1", "norm"}


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32},
        {"rope_type": "dynamic", "factor": 2.0},
    ],
)
def test_unsupported_rope_scaling_is_a_clear_error(rope):
    with pytest.raises(ValueError, match=f"rope scaling '{rope['rope_type']}' is not supported"):
        llama.Config.from_hf(transformers.LlamaConfig(**SMALL, rope_scaling=rope))


# ---------------------------------------------------------------------------------------------- LoRA


def test_presets_select_hf_module_names():
    config = llama.Config.from_hf(CONFIGS["llama-gqa"]())
    params = llama.init_params(config, jax.random.key(0))
    names = lambda adapters: [p for p, _ in lora.adapter_items(stacking.unstack(adapters))]  # noqa: E731  (per layer)
    qv = names(lora.init(params, r=2, targets="qv"))
    assert qv == [f"model/layers_{i}/self_attn/{m}/kernel" for i in range(2) for m in ("q_proj", "v_proj")]
    everything = set(names(lora.init(params, r=2, targets="all-linear")))
    assert everything == {
        f"model/layers_{i}/{m}/kernel"
        for i in range(2)
        for m in (
            "self_attn/q_proj",
            "self_attn/k_proj",
            "self_attn/v_proj",
            "self_attn/o_proj",
            "mlp/gate_proj",
            "mlp/up_proj",
            "mlp/down_proj",
        )
    }  # no embed_tokens, no lm_head
    attention = set(names(lora.init(params, r=2, targets="attention")))
    assert attention == {p for p in everything if "self_attn" in p}


def random_b(adapters, seed: int = 1):
    """Adapters with a nonzero B (at init B = 0 and LoRA is a no-op)."""
    leaves, treedef = jax.tree_util.tree_flatten(adapters, is_leaf=lora.is_adapter)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [dataclasses.replace(ad, b=0.1 * jax.random.normal(k, ad.b.shape)) for ad, k in zip(leaves, keys)]
    )


def test_factored_forward_equals_merged(case):
    adapters = random_b(lora.init(case.params, r=4, alpha=8, targets="all-linear"))
    ids, mask = batch(3)
    factored = jax_logits(case.config, lora.wrap(case.params, adapters), ids, mask)
    merged = jax_logits(case.config, lora.merge(case.params, adapters), ids, mask)
    base = jax_logits(case.config, case.params, ids, mask)
    assert np.abs(factored - base).max() > 1e-2  # the adapters do something
    np.testing.assert_allclose(factored, merged, atol=1e-5, rtol=1e-5)


def test_lora_matches_peft():
    """The same A, B in PEFT's LoraModel and in our factored forward give the same logits."""
    import peft

    hf_config = CONFIGS["llama-gqa"]()
    torch.manual_seed(0)
    torch_model = randomize(transformers.LlamaForCausalLM(hf_config))
    config = dataclasses.replace(llama.Config.from_hf(hf_config), scan_layers=False)  # PEFT's modules, layer by layer
    params = from_hf_weights(config, {k: v.numpy() for k, v in torch_model.state_dict().items()}, "sd")
    peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = peft.get_peft_model(torch_model, peft_config).eval()
    adapters = lora.init(params, r=4, alpha=8, targets="qv")
    modules = dict(peft_model.named_modules())

    def from_peft(path, ad):
        module = modules[
            "base_model.model." + path.removesuffix("/kernel").replace("/", ".").replace("layers_", "layers.")
        ]
        return dataclasses.replace(
            ad,
            a=jnp.asarray(module.lora_A["default"].weight.detach().numpy().T),
            b=jnp.asarray(module.lora_B["default"].weight.detach().numpy().T),
        )

    adapters = jax.tree_util.tree_map_with_path(
        lambda p, ad: from_peft(lora.targets.path_str(p), ad), adapters, is_leaf=lora.is_adapter
    )
    ids, mask = batch(4)
    valid = mask.astype(bool)
    ref = torch_logits(peft_model, ids, mask)
    ours = jax_logits(config, lora.wrap(params, adapters), ids, mask)
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # long; the default suite keeps a cheaper test of the same path
def test_a_few_steps_train_only_the_adapters():
    config = llama.Config.from_hf(CONFIGS["qwen2"]())
    params = llama.init_params(config, jax.random.key(0))
    model = llama.build(config)
    adapters = lora.init(params, r=4, targets="all-linear", key=jax.random.key(1))
    frozen, trainable = lora.split(params, adapters)
    ids = jax.random.randint(jax.random.key(2), (4, 16), 3, config.vocab_size)

    def loss_fn(trainable, frozen):
        p, ad = lora.combine(frozen, trainable)
        logits, _ = model.apply({"params": lora.wrap(p, ad)}, ids[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    tx = optax.adam(1e-2)
    state = tx.init(trainable)

    @jax.jit
    def step(trainable, state):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen)
        updates, state = tx.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state, loss

    losses = []
    for _ in range(8):
        trainable, state, loss = step(trainable, state)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.1, losses
    assert not trainable["params"]  # nothing of the base is trained
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool((a == b).all()), frozen, params))
