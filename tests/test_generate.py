"""Generation with the KV cache: equal to recomputing the full forward, and token for token equal to
transformers' ``generate`` (greedy, beam search with length penalty / no_repeat_ngram / early stopping) on tiny
random Llama and GPT-2 models; sampling warpers equal to transformers' logits processors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.generation import logits_process as hf_process

import lora_jax as lora
from lora_jax.models import from_hf_weights, gpt2, llama
from lora_jax.models import generate as gen

VOCAB, PAD = 64, 1


def randomize(module, seed=0):
    gen_ = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            is_norm = name.endswith("norm.weight") or (".ln_" in name and name.endswith("weight"))
            p.copy_((1.0 if is_norm else 0.0) + 0.25 * torch.randn(p.shape, generator=gen_))
    return module.eval()


def make(arch: str):
    if arch == "llama":
        hf_config = transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=PAD,
        )
        torch_model = randomize(transformers.LlamaForCausalLM(hf_config))
        config = llama.Config.from_hf(hf_config)
        params = from_hf_weights(config, {k: v.numpy() for k, v in torch_model.state_dict().items()}, "sd")
        return torch_model, llama.build(config), params
    hf_config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=PAD,
    )
    torch_model = randomize(transformers.GPT2LMHeadModel(hf_config))
    config = gpt2.Config.from_hf(hf_config)
    params = from_hf_weights(config, {k: v.numpy() for k, v in torch_model.state_dict().items()}, "sd")
    return torch_model, gpt2.build(config), params


_MODELS = {}


def models(arch: str):
    """(torch model, our model, params) of one architecture, built once per test session."""
    if arch not in _MODELS:
        _MODELS[arch] = make(arch)
    return _MODELS[arch]


@pytest.fixture
def tiny_llama():
    return models("llama")


def prompts(seed=0):
    """Three left-padded prompts of 7, 4 and 6 tokens."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, VOCAB, (3, 7))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :1] = 0
    ids[mask == 0] = PAD
    return ids, mask


def hf_generate(torch_model, ids, mask, **kw):
    with torch.no_grad():
        return torch_model.generate(
            torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False, pad_token_id=PAD, **kw
        ).numpy()


def assert_same_tokens(ours, ref):
    """transformers stops when every row ended: compare its length, the rest of ours is padding."""
    ours = np.asarray(ours)
    np.testing.assert_array_equal(ours[:, : ref.shape[1]], ref)
    assert (ours[:, ref.shape[1] :] == PAD).all()


def greedy_eos(torch_model, ids, mask):
    """A token that greedy decoding emits in row 0 after a few steps: as eos it ends that row early."""
    return int(hf_generate(torch_model, ids, mask, max_new_tokens=4, eos_token_id=None)[0, -1])


# ------------------------------------------------------------------------------------------------ greedy


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cached_greedy_equals_recomputing_the_full_forward(arch):
    _, model, params = models(arch)
    ids, mask = prompts(1)
    n = 8
    ours = np.asarray(gen.generate(model, params, ids, mask, max_new_tokens=n, eos_token_id=()))

    # No cache: run the whole (fixed-size) buffer every step; causal attention makes the unfilled tail inert.
    buf = np.concatenate([ids, np.full((3, n), PAD)], axis=1)
    buf_mask = np.concatenate([mask, np.zeros((3, n), int)], axis=1)
    full = jax.jit(
        lambda p, x, m: model.apply({"params": p}, x, positions=gen.prompt_positions(m), attention_mask=m)[0]
    )
    for t in range(ids.shape[1], ids.shape[1] + n):
        logits = full(params, buf, buf_mask)
        buf[:, t] = np.argmax(np.asarray(logits[:, t - 1]), axis=-1)
        buf_mask[:, t] = 1
    np.testing.assert_array_equal(ours, buf)


@pytest.mark.parametrize("arch, ngram", [("llama", 0), ("llama", 2), ("gpt2", 0)])
def test_greedy_matches_transformers(arch, ngram):
    torch_model, model, params = models(arch)
    ids, mask = prompts()
    kw = dict(eos_token_id=greedy_eos(torch_model, ids, mask), no_repeat_ngram_size=ngram, max_new_tokens=10)
    ref = hf_generate(torch_model, ids, mask, **kw)
    assert_same_tokens(gen.generate(model, params, ids, mask, **kw), ref)
    if not ngram:
        assert (ref[0, 7:] == kw["eos_token_id"]).any()  # row 0 ended at its eos


# ------------------------------------------------------------------------------------------- beam search


@pytest.mark.parametrize(
    "arch, kw",
    [
        ("llama", dict(num_beams=4, length_penalty=0.9, no_repeat_ngram_size=3)),
        ("llama", dict(num_beams=3, length_penalty=1.5, early_stopping=True)),
        ("gpt2", dict(num_beams=2, length_penalty=0.5, early_stopping="never", no_repeat_ngram_size=2)),
    ],
)
def test_beam_search_matches_transformers(arch, kw):
    torch_model, model, params = models(arch)
    ids, mask = prompts(2)
    eos = greedy_eos(torch_model, ids, mask)
    ref = hf_generate(torch_model, ids, mask, max_new_tokens=10, eos_token_id=eos, **kw)
    assert_same_tokens(gen.generate(model, params, ids, mask, max_new_tokens=10, eos_token_id=eos, **kw), ref)


def test_e2e_decoding_settings_match_transformers(tiny_llama):
    """The LoRA paper's E2E decoding: beam 10, length penalty 0.9, no_repeat_ngram_size 4; two eos tokens."""
    torch_model, model, params = tiny_llama
    ids, mask = prompts(3)
    eos = [greedy_eos(torch_model, ids, mask), 2]
    kw = dict(num_beams=10, length_penalty=0.9, no_repeat_ngram_size=4, eos_token_id=eos, max_new_tokens=12)
    assert_same_tokens(gen.generate(model, params, ids, mask, **kw), hf_generate(torch_model, ids, mask, **kw))


# ------------------------------------------------------------------------------------ logits processing


def test_warpers_match_transformers():
    rng = np.random.RandomState(0)
    logits = rng.randn(6, 50).astype(np.float32) * 3
    seqs = rng.randint(0, 4, (6, 20))  # a small alphabet: many repeated n-grams
    for temperature, top_k, top_p, ngram in [(0.7, 5, 1.0, 0), (1.0, 0, 0.8, 0), (1.3, 10, 0.6, 3), (1.0, 0, 1.0, 2)]:
        g = gen.GenerationConfig(
            do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, no_repeat_ngram_size=ngram
        )
        processors = transformers.LogitsProcessorList()
        if ngram:
            processors.append(hf_process.NoRepeatNGramLogitsProcessor(ngram))
        if temperature != 1.0:
            processors.append(hf_process.TemperatureLogitsWarper(temperature))
        if top_k:
            processors.append(hf_process.TopKLogitsWarper(top_k))
        if top_p < 1.0:
            processors.append(hf_process.TopPLogitsWarper(top_p))
        ref = processors(torch.tensor(seqs[:, :15]), torch.tensor(logits)).numpy()
        ours = np.asarray(gen.process_logits(jnp.asarray(logits), jnp.asarray(seqs), jnp.asarray(15), g))
        np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
        np.testing.assert_allclose(ours[~np.isinf(ours)], ref[~np.isinf(ref)], rtol=1e-6)
        assert np.isinf(ours).any()


@pytest.mark.slow  # long; the default suite keeps a cheaper test of the same path
def test_sampling_follows_the_filtered_distribution(tiny_llama):
    """One sampled token for 1000 copies of a prompt: only tokens the warpers keep, at their probabilities."""
    _, model, params = tiny_llama
    ids, _ = prompts(4)
    prompt = np.repeat(ids[:1], 1000, axis=0)
    kw = dict(do_sample=True, temperature=0.8, top_k=8, top_p=0.9)
    out = np.asarray(gen.generate(model, params, prompt, max_new_tokens=1, key=jax.random.key(3), **kw))[:, -1]
    logits, _ = model.apply({"params": params}, jnp.asarray(ids[:1]))
    scores = np.asarray(gen.process_logits(logits[:, -1], jnp.asarray(ids[:1]), 7, gen.GenerationConfig(**kw)))[0]
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    assert set(out) <= set(np.flatnonzero(probs > 0)) and 1 < (probs > 0).sum() <= 8
    freq = np.bincount(out, minlength=VOCAB) / len(out)
    assert 0.5 * np.abs(freq - probs).sum() < 0.08  # total variation (about 0.03 expected from 1000 draws)


@pytest.mark.slow  # long; the default suite keeps a cheaper test of the same path
def test_sampling_is_reproducible_and_top_k_1_is_greedy(tiny_llama):
    _, model, params = tiny_llama
    ids, mask = prompts(5)
    greedy = gen.generate(model, params, ids, mask, max_new_tokens=6, eos_token_id=())
    # one compilation per shape and setting: another batch of the same shape reuses it
    gen.generate(model, params, prompts(6)[0], mask, max_new_tokens=6, eos_token_id=())
    assert (
        gen._compiled(model, gen.GenerationConfig(max_new_tokens=6, eos_token_id=(), pad_token_id=PAD))._cache_size()
        == 1
    )
    top1 = gen.generate(
        model, params, ids, mask, max_new_tokens=6, eos_token_id=(), do_sample=True, top_k=1, key=jax.random.key(7)
    )
    np.testing.assert_array_equal(top1, greedy)
    a, b, c = (
        gen.generate(
            model,
            params,
            ids,
            mask,
            max_new_tokens=6,
            eos_token_id=(),
            do_sample=True,
            temperature=2.0,
            key=jax.random.key(k),
        )
        for k in (1, 1, 2)
    )  # one compilation
    np.testing.assert_array_equal(a, b)
    assert (np.asarray(a) != np.asarray(c)).any()


# ------------------------------------------------------------------------------------------------ others


def test_lora_wrapped_params_generate_like_merged(tiny_llama):
    _, model, params = tiny_llama
    adapters = lora.init(params, r=2, targets="all-linear")
    adapters = jax.tree_util.tree_map(
        lambda ad: dataclasses.replace(ad, b=jnp.full(ad.b.shape, 0.3)), adapters, is_leaf=lora.is_adapter
    )
    ids, mask = prompts(6)
    kw = dict(max_new_tokens=6, eos_token_id=())
    wrapped = gen.generate(model, lora.wrap(params, adapters), ids, mask, **kw)
    np.testing.assert_array_equal(wrapped, gen.generate(model, lora.merge(params, adapters), ids, mask, **kw))
    assert (np.asarray(wrapped) != np.asarray(gen.generate(model, params, ids, mask, **kw))).any()


def test_bad_inputs_are_clear_errors(tiny_llama):
    _, model, params = tiny_llama
    ids, mask = prompts()
    with pytest.raises(ValueError, match="left-padded"):
        gen.generate(model, params, ids, mask[:, ::-1], max_new_tokens=2)
    with pytest.raises(ValueError, match="beam search with sampling"):
        gen.generate(model, params, ids, mask, num_beams=2, do_sample=True)
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 64\)"):
        gen.generate(model, params, ids + VOCAB, mask)
    gpt = gpt2.build(
        gpt2.Config(
            vocab_size=VOCAB,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=10,
            intermediate_size=8,
        )
    )
    with pytest.raises(ValueError, match="exceeds the model's 10 learned positions"):
        gen.generate(gpt, None, ids, mask, max_new_tokens=4)
