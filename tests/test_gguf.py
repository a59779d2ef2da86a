"""GGUF loading: a tiny GGUF written the way llama.cpp's converter writes one (Q/K rows permuted, a Q8_0 tensor)
loads to the logits of the PyTorch model it came from; the real SmolLM2-135M-Instruct Q4_1 file answers
"Paris" and its tokenizer encodes like transformers' own GGUF conversion."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import lora_jax as lora
from conftest import require
from lora_jax.errors import CheckpointError
from lora_jax.models import generate as gen
from lora_jax.models import gguf as lgguf

gguf = require("gguf")

# A byte-level BPE vocabulary: three special tokens, the 256 byte symbols, five merges.
MERGES = ["h e", "l l", "he ll", "Ġ w", "o r"]


def tiny_vocab():
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = ["<unk>", "<s>", "</s>"] + sorted(ByteLevel.alphabet()) + [m.replace(" ", "") for m in MERGES]
    return tokens, [2, 3, 3] + [1] * (len(tokens) - 3)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to the rows of q_proj / k_proj (LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(path of a tiny Llama GGUF, the PyTorch model holding the same (dequantised) weights)."""
    tokens, types = tiny_vocab()
    hf_config = transformers.LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=1000.0,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + 0.2 * torch.randn(p.shape))
    sd = {k: v.numpy() for k, v in model.state_dict().items()}

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(64)
    w.add_embedding_length(64)
    w.add_feed_forward_length(96)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(1000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(16)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_chat_template("{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}")
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(2):
        for hf_name, name in GGUF_NAMES.items():
            x = sd[f"model.layers.{i}.{hf_name}.weight"]
            if name in ("attn_q", "attn_k"):
                x = llama_cpp_permute(x, 4 if name == "attn_q" else 2)
            if name == "ffn_up":  # one quantised tensor; the reference model gets its dequantised values
                q = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
                w.add_tensor(f"blk.{i}.{name}.weight", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                with torch.no_grad():
                    model.model.layers[i].mlp.up_proj.weight.copy_(
                        torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0))
                    )
            else:
                w.add_tensor(f"blk.{i}.{name}.weight", x)
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, model


def test_tiny_gguf_logits_match_the_source_model(tiny):
    path, torch_model = tiny
    model, params, tokenizer, config = lgguf.load_gguf(path)
    assert (config.num_key_value_heads, config.head_dim, config.rope_theta) == (2, 16, 1000.0)
    assert not config.tie_word_embeddings  # output.weight is present
    ids = np.random.RandomState(0).randint(0, config.vocab_size, (2, 10))
    with torch.no_grad():
        ref = torch_model(torch.tensor(ids)).logits.numpy()
    ours, _ = model.apply({"params": params}, jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=1e-4)
    # transformers' own GGUF loader agrees (a check on the permutation this test applied)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        np.testing.assert_allclose(hf(torch.tensor(ids)).logits.numpy(), ref, atol=1e-5)
    # bfloat16 loading casts the dequantised weights
    _, params16, _, _ = lgguf.load_gguf(path, dtype=jnp.bfloat16, tokenizer=False)
    assert {x.dtype for x in jax.tree_util.tree_leaves(params16)} == {jnp.dtype(jnp.bfloat16)}


def test_tiny_gguf_tokenizer(tiny):
    path, _ = tiny
    _, _, tok, _ = lgguf.load_gguf(path)
    assert isinstance(tok, transformers.PreTrainedTokenizerFast)
    ids = tok("hello world")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "hell", "o", "Ġw", "or", "l", "d"]  # add_bos_token, merges
    assert tok.decode(ids, skip_special_tokens=True) == "hello world"
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<s>hi</s>"
    reference = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in ["hello world", "well, hello there!", "  spaces\tand\nlines", "ünïcödé 🤗"]:
        assert tok(text)["input_ids"] == reference(text)["input_ids"]


def test_gguf_saved_as_a_hugging_face_folder(tiny, tmp_path):
    """GGUF -> save_pretrained -> transformers' from_pretrained and our load give the source model back."""
    from lora_jax.models import load, save_pretrained

    path, torch_model = tiny
    model, params, tok, config = lgguf.load_gguf(path)
    save_pretrained(params, config, tmp_path / "hf", tokenizer=tok)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = np.random.RandomState(1).randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        np.testing.assert_allclose(
            reloaded(torch.tensor(ids)).logits.numpy(), torch_model(torch.tensor(ids)).logits.numpy(), atol=1e-5
        )
    _, params2, tok2, config2 = load(tmp_path / "hf")
    assert config2 == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)
    assert tok2("hello world")["input_ids"] == tok("hello world")["input_ids"]


def test_damaged_files_are_clear_errors(tiny, tmp_path):
    path, _ = tiny
    data = path.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.gguf"):
        lgguf.load_gguf(truncated)
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="header.gguf: cannot read this GGUF file"):
        lgguf.load_gguf(header_only)
    foreign = tmp_path / "model.gguf"
    foreign.write_bytes(b"PK\x03\x04" + data[4:200])
    with pytest.raises(CheckpointError, match=r"model.gguf: not a GGUF file \(starts with b'PK"):
        lgguf.load_gguf(foreign)
    with pytest.raises(CheckpointError, match="missing.gguf: GGUF file not found"):
        lgguf.load_gguf(tmp_path / "missing.gguf")


def test_metadata_that_does_not_fit_is_a_clear_error(tiny):
    path, _ = tiny
    reader = lgguf.open_gguf(path)
    meta = lgguf.metadata(reader)
    names = {t.name for t in reader.tensors}
    config = lgguf.config_from_metadata({**meta, "llama.feed_forward_length": 128}, names, "x.gguf")
    with pytest.raises(
        CheckpointError,
        match=r"x.gguf: tensor 'blk.0.ffn_down.weight' has shape \(64, 96\), "
        r"expected \(64, 128\)",
    ):
        lgguf.params_from_reader(reader, config, "llama", jnp.float32, "x.gguf")
    with pytest.raises(CheckpointError, match="GGUF architecture 'mamba' is not supported"):
        lgguf.config_from_metadata({**meta, "general.architecture": "mamba"}, names, "x.gguf")
    with pytest.raises(ValueError, match="tokenizer model 't5' is not supported"):
        lgguf.tokenizer_from_metadata({**meta, "tokenizer.ggml.model": "t5"}, "x.gguf")


# ------------------------------------------------------------------------------------ SmolLM2 (real)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf_path):
    """The default job's model, loaded the way ``train.run`` loads it (the offline alias)."""
    from lora_jax.models import load, resolve

    assert resolve("SmolLM2-135M-Instruct-Q4_1") == Path(smollm2_gguf_path)
    return load("SmolLM2-135M-Instruct-Q4_1")


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_gguf_path):
    """The same file through transformers' own GGUF conversion (PyTorch): tokenizer and model."""
    path = Path(smollm2_gguf_path)
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    return tok, model


def test_default_job_model_matches_transformers_gguf_loader(smollm2, smollm2_reference):
    """The fast suite's check of the default job's real model: one 5-token prompt, tokens and every logit."""
    model, params, tok, _ = smollm2
    ref_tok, ref = smollm2_reference
    text = "The capital of France is"
    ids = tok(text)["input_ids"]
    assert ids == ref_tok(text)["input_ids"] == [504, 3575, 282, 4649, 314]
    ours, _ = model.apply({"params": params}, jnp.asarray([ids]))
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits.numpy()
    assert ours.shape == theirs.shape == (1, 5, 49152)
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=2e-3, rtol=1e-4)
    assert np.array_equal(np.argmax(np.asarray(ours), -1), np.argmax(theirs, -1))


@pytest.mark.slow  # long; the default suite keeps a cheaper test of the same path
def test_smollm2_knows_the_capital_of_france(smollm2):
    model, params, tok, config = smollm2
    assert (
        config.num_hidden_layers,
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.tie_word_embeddings,
    ) == (30, 576, 9, 3, True)
    ids = jnp.asarray([tok("The capital of France is")["input_ids"]])
    out = gen.generate(model, params, ids, max_new_tokens=6)
    assert "Paris" in tok.decode(np.asarray(out[0, ids.shape[1] :]))


def test_smollm2_tokenizer(smollm2, smollm2_gguf_path):
    tok = smollm2[2]
    meta = lgguf.metadata(lgguf.open_gguf(smollm2_gguf_path))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == tuple(
        meta[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "padding", "unknown")
    )
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert len(tok) == 49152
    for text in [
        "The capital of France is",
        "Hello world! It's 2024.",
        "  leading spaces\n\ttabs",
        "émoji 🤗 ünïcödé",
        "def f(x):\n    return x ** 2",
    ]:
        assert tok.decode(tok(text)["input_ids"]) == text
    assert tok("The capital of France is")["input_ids"] == [504, 3575, 282, 4649, 314]
    assert tok.convert_ids_to_tokens(tok("in 2024")["input_ids"]) == ["in", "Ġ", "2", "0", "2", "4"]  # \p{N}
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    chat = chat["input_ids"] if isinstance(chat, dict) or hasattr(chat, "keys") else chat
    assert tok.convert_ids_to_tokens(chat).count("<|im_start|>") == 3  # system, user, assistant
    assert tok("<|im_end|>")["input_ids"] == [2]  # special tokens are never split


@pytest.mark.slow
def test_smollm2_matches_transformers_gguf_loader(smollm2, smollm2_reference):
    """Same file through transformers' own GGUF conversion: the same tokens and logits, padded batch."""
    model, params, tok, _ = smollm2
    ref_tok, ref = smollm2_reference
    texts = ["The capital of France is", "Hello, my dog is cute and"]
    for text in texts:
        assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    batch = tok(texts, padding=True, return_tensors="np")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ours, _ = model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    with torch.no_grad():
        theirs = ref(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[valid], theirs[valid], atol=2e-3, rtol=1e-4)


@pytest.mark.slow
def test_smollm2_lora_factored_equals_merged(smollm2):
    model, params, tok, _ = smollm2
    adapters = lora.init(params, r=8, targets="qv")
    adapters = jax.tree_util.tree_map(
        lambda ad: type(ad)(
            ad.a, jnp.full(ad.b.shape, 0.01), ad.alpha, ad.scale, ad.in_shape, ad.out_shape, ad.dropout
        ),
        adapters,
        is_leaf=lora.is_adapter,
    )
    assert len(lora.adapter_items(adapters)) == 2  # q_proj and v_proj, each stacked over the 30 scanned layers
    assert len(lora.adapter_items(lora.stacking.unstack(adapters))) == 60
    ids = jnp.asarray([tok("LoRA on a real model")["input_ids"]])
    factored, _ = model.apply({"params": lora.wrap(params, adapters)}, ids)
    merged, _ = model.apply({"params": lora.merge(params, adapters)}, ids)
    np.testing.assert_allclose(np.asarray(factored), np.asarray(merged), atol=1e-3, rtol=1e-4)
