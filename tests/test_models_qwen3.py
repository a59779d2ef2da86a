"""Qwen3 (the family added as one module + one registration line) against transformers' PyTorch Qwen3 on tiny
random models: logits, gradients of a LoRA adapter, the KV cache, greedy generation, the saved folder, a GGUF
file as llama.cpp names it, and PEFT adapters both ways."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from peft_parity import assert_lora_gradients_match_peft

import lora_jax as lora
from conftest import require
from lora_jax import models, stacking
from lora_jax.models import generate as gen
from lora_jax.models import qwen3

V, SEQ = 96, 12
# head_dim 16 != hidden 48 / 6 heads; 6 query heads share 2 key/value heads
SMALL = dict(
    vocab_size=V,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
    rope_theta=1000.0,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
CONFIGS = {
    "untied": lambda: transformers.Qwen3Config(**SMALL, tie_word_embeddings=False),
    # tied head; the second layer slides over 5 tokens; biases on q, k, v, o
    "tied-window-bias": lambda: transformers.Qwen3Config(
        **SMALL,
        tie_word_embeddings=True,
        attention_bias=True,
        use_sliding_window=True,
        sliding_window=5,
        max_window_layers=1,
    ),
}


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight random, norms around 1 (HF initialises norms to 1 and biases to 0, which would hide a
    mis-mapped q/k norm or bias)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
    return module.eval()


@dataclasses.dataclass
class Case:
    name: str
    folder: str
    torch_model: object
    model: object
    params: dict
    config: qwen3.Config


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory) -> Case:
    torch.manual_seed(0)
    torch_model = randomize(transformers.Qwen3ForCausalLM(CONFIGS[request.param]()))
    folder = str(tmp_path_factory.mktemp(request.param))
    torch_model.save_pretrained(folder)
    model, params, _, config = models.load(folder)  # the whole path: config.json -> family -> converter
    return Case(request.param, folder, torch_model, model, params, config)


def batch(seed: int = 0, pad: int = 3):
    """(2, SEQ) ids; row 1 left-padded with ``pad`` tokens."""
    ids = np.random.RandomState(seed).randint(3, V, (2, SEQ))
    mask = np.ones_like(ids)
    mask[1, :pad] = 0
    ids[mask == 0] = 0
    return ids, mask


def torch_logits(model, ids, mask=None):
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return model(torch.tensor(ids), **kw).logits.numpy()


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, ids, mask):
    return model.apply({"params": params}, ids, attention_mask=mask)[0]


def jax_logits(model, params, ids, mask=None):
    return np.asarray(_apply(model, params, jnp.asarray(ids), None if mask is None else jnp.asarray(mask)))


def test_config_and_parameters(case):
    c = case.config
    assert isinstance(c, qwen3.Config) and c.qk_norm and (c.head_dim, c.num_key_value_heads) == (16, 2)
    assert qwen3.Config.from_hf(c.to_hf()) == c
    attn = stacking.unstack(case.params)["model"]["layers_0"]["self_attn"]
    assert attn["q_norm"]["scale"].shape == attn["k_norm"]["scale"].shape == (16,)
    assert attn["q_proj"]["kernel"].shape == (48, 6 * 16)
    assert ("bias" in attn["q_proj"]) == ("bias" in attn["o_proj"]) == (case.name == "tied-window-bias")
    assert ("lm_head" in case.params) == (case.name == "untied")
    if case.name == "tied-window-bias":
        assert (c.sliding_window, c.sliding_layers) == (5, (False, True))


def test_logits_match_transformers(case):
    ids, mask = batch()
    ours, ref = jax_logits(case.model, case.params, ids, mask), torch_logits(case.torch_model, ids, mask)
    valid = mask.astype(bool)  # padded query rows are garbage in both
    assert np.abs(ref).max() > 1.0  # random weights big enough that a wrong mapping shows
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=1e-4)


def test_lora_gradients_match_peft(case):
    """The same A, B in PEFT and here: equal loss, and equal gradients of a cross-entropy w.r.t. A and B."""
    if case.name != "untied":
        pytest.skip("one gradient case")
    assert_lora_gradients_match_peft(
        case.model, case.params, case.config, case.torch_model, batch(5)[0], ["q_proj", "k_proj", "o_proj", "down_proj"]
    )


def test_cache_and_greedy_generation_match_transformers(case):
    ids, mask = batch(2)
    model, full = case.model, jax_logits(case.model, case.params, ids, mask)
    apply = jax.jit(lambda p, x, m, c: model.apply({"params": p}, x, attention_mask=m, cache=c))
    out, cache = apply(case.params, ids[:, :7], mask[:, :7], gen.init_cache(case.config, 2, SEQ))
    steps = [out]
    for t in range(7, SEQ):
        out, cache = apply(case.params, ids[:, t : t + 1], mask[:, t : t + 1], cache)
        steps.append(out)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.concatenate(steps, axis=1)[valid], full[valid], atol=1e-4, rtol=1e-4)
    if case.name != "untied":
        return  # one generation case (the compile dominates)
    prompt = ids[:1, :6]
    ours = np.asarray(gen.generate(model, case.params, prompt, max_new_tokens=8, eos_token_id=()))
    with torch.no_grad():
        ref = case.torch_model.generate(
            torch.tensor(prompt), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0
        ).numpy()
    np.testing.assert_array_equal(ours, ref)


def test_saved_folder_loads_in_transformers(case, tmp_path):
    models.save_pretrained(case.params, case.config, tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded).__name__ == "Qwen3ForCausalLM"
    ids, _ = batch(3)
    np.testing.assert_allclose(torch_logits(reloaded, ids), torch_logits(case.torch_model, ids), atol=1e-6)


def test_gguf_as_llama_cpp_names_it(case, tmp_path):
    """A Qwen3 GGUF (llama.cpp's names, q/k norms included, no row permutation) loads to the source logits
    (tests/test_arch.py checks the names against gguf-py's own table)."""
    gguf = require("gguf")
    if case.name != "untied":
        pytest.skip("one GGUF case")
    c = case.config
    path = tmp_path / "tiny-qwen3.gguf"
    w = gguf.GGUFWriter(str(path), "qwen3")
    for add, value in [
        (w.add_block_count, c.num_hidden_layers),
        (w.add_context_length, c.max_position_embeddings),
        (w.add_embedding_length, c.hidden_size),
        (w.add_feed_forward_length, c.intermediate_size),
        (w.add_head_count, c.num_attention_heads),
        (w.add_head_count_kv, c.num_key_value_heads),
        (w.add_key_length, c.head_dim),
        (w.add_value_length, c.head_dim),
        (w.add_rope_freq_base, c.rope_theta),
        (w.add_layer_norm_rms_eps, c.rms_norm_eps),
        (w.add_vocab_size, c.vocab_size),
    ]:
        add(value)
    spec = models.for_config(c).gguf
    for name, x in models.to_hf_weights(case.params, c).items():
        w.add_tensor(spec.name(name), np.asarray(x, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    model, params, tok, config = models.load(path)
    assert tok is None and config.rms_norm_eps == pytest.approx(c.rms_norm_eps)  # stored as float32
    assert config == dataclasses.replace(
        c, bos_token_id=None, eos_token_id=None, pad_token_id=None, rms_norm_eps=config.rms_norm_eps
    )
    ids, _ = batch(4)
    ref = torch_logits(case.torch_model, ids)
    np.testing.assert_allclose(jax_logits(model, params, ids), ref, atol=1e-4, rtol=1e-4)


def test_peft_adapters_both_ways(case, tmp_path):
    """An adapter trained with real PEFT loads here with PEFT's logits; ours (mixed ranks) loads in PEFT with ours."""
    if case.name != "untied":
        pytest.skip("one PEFT case")
    torch.manual_seed(1)
    model = peft.get_peft_model(
        transformers.AutoModelForCausalLM.from_pretrained(case.folder),
        peft.LoraConfig(
            task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "gate_proj"]
        ),
    )
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    ids = torch.tensor(batch(7)[0])
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(str(tmp_path / "theirs"))
    loaded = lora.load_peft(tmp_path / "theirs", case.params, config=case.config)
    assert len(lora.adapter_items(stacking.unstack(loaded.adapters))) == 3 * case.config.num_hidden_layers
    test_ids, _ = batch(8)
    np.testing.assert_allclose(
        jax_logits(case.model, lora.wrap(case.params, loaded.adapters), test_ids),
        torch_logits(model, test_ids),
        atol=1e-4,
        rtol=1e-4,
    )

    ours = lora.init(
        case.params, r=4, alpha=16, targets="all-linear", rank_pattern={".*mlp.*": 2}, key=jax.random.key(3)
    )
    ours = jax.tree_util.tree_map(
        lambda ad: dataclasses.replace(ad, b=0.1 * jnp.ones_like(ad.b)), ours, is_leaf=lora.is_adapter
    )
    lora.save_peft(ours, tmp_path / "ours", config=case.config)
    theirs = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(case.folder), str(tmp_path / "ours")
    ).eval()
    np.testing.assert_allclose(
        torch_logits(theirs, test_ids),
        jax_logits(case.model, lora.wrap(case.params, ours), test_ids),
        atol=1e-4,
        rtol=1e-4,
    )
