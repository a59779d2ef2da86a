"""GPT-2 checked against transformers' PyTorch GPT2LMHeadModel on tiny random models, and LoRA on it."""

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
from lora_jax.errors import CheckpointError
from lora_jax.models import from_hf_weights, gpt2, to_hf_weights
from lora_jax.models.generate import init_cache

SMALL = dict(
    vocab_size=80, n_embd=32, n_layer=2, n_head=4, n_positions=40, bos_token_id=1, eos_token_id=2, pad_token_id=0
)
CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(**SMALL),
    # an untied head, a custom inner size, the per-layer attention scaling and exact gelu
    "gpt2-variant": lambda: transformers.GPT2Config(
        **SMALL, tie_word_embeddings=False, n_inner=48, scale_attn_by_inverse_layer_idx=True, activation_function="gelu"
    ),
}
SEQ = 12


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if ".ln_" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return module.eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request):
    hf_config = CONFIGS[request.param]()
    torch_model = randomize(transformers.GPT2LMHeadModel(hf_config))
    config = gpt2.Config.from_hf(hf_config)
    params = from_hf_weights(config, {k: v.numpy() for k, v in torch_model.state_dict().items()}, "sd")
    return dataclasses.make_dataclass("Case", ["hf_config", "torch_model", "config", "params"])(
        hf_config, torch_model, config, params
    )


def batch(seed: int = 0, pad: int = 3):
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
    logits, _ = gpt2.build(config).apply(
        {"params": params}, jnp.asarray(ids), attention_mask=None if mask is None else jnp.asarray(mask), **kw
    )
    return np.asarray(logits)


def test_config_round_trip(case):
    assert gpt2.Config.from_hf(case.config.to_hf()) == case.config


def test_conv1d_kernels_are_not_transposed(case):
    c_attn = case.torch_model.transformer.h[0].attn.c_attn.weight.detach().numpy()
    np.testing.assert_array_equal(case.params["transformer"]["h_0"]["attn"]["c_attn"]["kernel"], c_attn)
    assert c_attn.shape == (32, 96)


def test_logits_match_transformers(case):
    ids, mask = batch()
    valid = mask.astype(bool)
    ref = torch_logits(case.torch_model, ids, mask)
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(jax_logits(case.config, case.params, ids, mask)[valid], ref[valid], atol=1e-4, rtol=1e-4)


def test_to_hf_weights_load_into_transformers(case):
    tensors = to_hf_weights(case.params, case.config)
    with tempfile.TemporaryDirectory() as tmp:
        case.torch_model.save_pretrained(tmp)
        from safetensors import safe_open

        with safe_open(f"{tmp}/model.safetensors", "np") as f:
            assert set(f.keys()) == set(tensors)
    fresh = transformers.GPT2LMHeadModel(case.config.to_hf()).eval()
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


def test_unprefixed_checkpoint_with_mask_buffers_loads():
    """The original gpt2 weights are saved from GPT2Model: no 'transformer.' prefix, plus attn.bias buffers."""
    hf_config = CONFIGS["gpt2"]()
    torch_model = randomize(transformers.GPT2LMHeadModel(hf_config))
    state = {
        k.removeprefix("transformer."): v.numpy() for k, v in torch_model.state_dict().items() if k != "lm_head.weight"
    }
    state.update({f"h.{i}.attn.bias": np.tril(np.ones((1, 1, 40, 40), bool)) for i in range(2)})
    config = gpt2.Config.from_hf(hf_config)
    params = from_hf_weights(config, state, "model.safetensors")
    ids, mask = batch(2)
    valid = mask.astype(bool)
    np.testing.assert_allclose(
        jax_logits(config, params, ids, mask)[valid], torch_logits(torch_model, ids, mask)[valid], atol=1e-4, rtol=1e-4
    )
    del state["h.1.mlp.c_fc.weight"]
    with pytest.raises(CheckpointError, match=r"model.safetensors: missing tensor 'h\.1\.mlp\.c_fc\.weight'"):
        from_hf_weights(config, state, "model.safetensors")


def test_cache_matches_full_forward(case):
    ids, mask = batch(3)
    model = gpt2.build(case.config)
    full = jax_logits(case.config, case.params, ids, mask)
    apply = jax.jit(lambda p, x, m, c: model.apply({"params": p}, x, attention_mask=m, cache=c))
    cache = init_cache(case.config, 2, SEQ)
    out, cache = apply(case.params, ids[:, :5], mask[:, :5], cache)
    steps = [out]
    for t in range(5, SEQ):
        out, cache = apply(case.params, ids[:, t : t + 1], mask[:, t : t + 1], cache)
        steps.append(out)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.concatenate(steps, axis=1)[valid], full[valid], atol=1e-5, rtol=1e-5)


def test_unsupported_settings_are_clear_errors():
    with pytest.raises(ValueError, match="add_cross_attention"):
        gpt2.Config.from_hf(transformers.GPT2Config(**SMALL, add_cross_attention=True))
    with pytest.raises(ValueError, match="activation_function 'quick_gelu'"):
        gpt2.Config.from_hf(transformers.GPT2Config(**SMALL, activation_function="quick_gelu"))


# ---------------------------------------------------------------------------------------------- LoRA


def test_presets_select_hf_module_names():
    params = gpt2.init_params(gpt2.Config.from_hf(CONFIGS["gpt2-variant"]()), jax.random.key(0))
    qv = [p for p, _ in lora.adapter_items(lora.init(params, r=2, targets="qv"))]
    assert qv == ["transformer/h_0/attn/c_attn/kernel", "transformer/h_1/attn/c_attn/kernel"]
    everything = {p for p, _ in lora.adapter_items(lora.init(params, r=2, targets="all-linear"))}
    assert everything == {
        f"transformer/h_{i}/{m}/kernel"
        for i in range(2)
        for m in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")
    }  # no wte/wpe/lm_head


def test_factored_forward_equals_merged_and_matches_peft():
    import peft

    hf_config = CONFIGS["gpt2"]()
    torch_model = randomize(transformers.GPT2LMHeadModel(hf_config))
    config = gpt2.Config.from_hf(hf_config)
    params = from_hf_weights(config, {k: v.numpy() for k, v in torch_model.state_dict().items()}, "sd")
    peft_model = peft.get_peft_model(
        torch_model,
        peft.LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False),
    )
    peft_model.eval()
    adapters = lora.init(params, r=4, alpha=16, targets="qv")
    for i in range(2):
        module = peft_model.base_model.model.transformer.h[i].attn.c_attn
        ad = adapters["transformer"][f"h_{i}"]["attn"]["c_attn"]["kernel"]
        adapters["transformer"][f"h_{i}"]["attn"]["c_attn"]["kernel"] = dataclasses.replace(
            ad,
            a=jnp.asarray(module.lora_A["default"].weight.detach().numpy().T),
            b=jnp.asarray(module.lora_B["default"].weight.detach().numpy().T),
        )
    ids, mask = batch(4)
    valid = mask.astype(bool)
    factored = jax_logits(config, lora.wrap(params, adapters), ids, mask)
    merged = jax_logits(config, lora.merge(params, adapters), ids, mask)
    np.testing.assert_allclose(factored, merged, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(factored[valid], torch_logits(peft_model, ids, mask)[valid], atol=1e-4, rtol=1e-4)
    assert np.abs(factored - jax_logits(config, params, ids, mask)).max() > 1e-2


def test_a_few_steps_train_only_the_adapters():
    config = gpt2.Config.from_hf(CONFIGS["gpt2"]())
    params = gpt2.init_params(config, jax.random.key(0))
    model = gpt2.build(config)
    frozen, trainable = lora.split(params, lora.init(params, r=4, targets="qv", key=jax.random.key(1)))
    ids = jax.random.randint(jax.random.key(2), (4, 16), 3, config.vocab_size)

    def loss_fn(trainable):
        p, ad = lora.combine(frozen, trainable)
        logits, _ = model.apply({"params": lora.wrap(p, ad)}, ids[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    tx = optax.adam(3e-2)
    state = tx.init(trainable)

    @jax.jit
    def step(trainable, state):
        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, state = tx.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state, loss

    losses = []
    for _ in range(8):
        trainable, state, loss = step(trainable, state)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.1, losses
    assert not trainable["params"]
