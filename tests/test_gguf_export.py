"""GGUF exports: llama.cpp LoRA adapter files and merged GGUF models.

Without llama.cpp: the adapter file has llama.cpp's metadata, names, layouts and Q/K row permutation (checked
against the permutation written independently in tests/test_gguf.py and by computing dW the way llama.cpp
does from the file), reads back to the same dW, and the merged file reads back (through the GGUF reader) to
``lora.merge``. With llama.cpp (``llama-cpp-python`` installed; ``-m llamacpp``): a tiny float32 Llama +
our adapter gives our factored model's logits, and the merged file gives the adapter path's.
The real SmolLM2 Q4_1 comparisons run in ``benchmarks/llamacpp_parity.py`` (results committed).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lora
from benchmarks import llamacpp
from conftest import require
from lora_jax import gguf_export as ge
from lora_jax import stacking, tree
from lora_jax.models import gguf as lgguf
from lora_jax.models import llama

gguf = require("gguf")

# A byte-level BPE vocabulary: three special tokens, the 256 byte symbols, five merges.
MERGES = ["h e", "l l", "he ll", "Ġ w", "o r"]


def tiny_vocab():
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = ["<unk>", "<s>", "</s>"] + sorted(ByteLevel.alphabet()) + [m.replace(" ", "") for m in MERGES]
    return tokens, [2, 3, 3] + [1] * (len(tokens) - 3)  # unknown, control, control, normal...


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute (rows of q_proj / k_proj), written out here so the
    test does not lean on the code it checks."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


TOKENS, TOKEN_TYPES = tiny_vocab()
TINY = llama.Config(
    vocab_size=len(TOKENS),
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
UNROLLED = dataclasses.replace(TINY, scan_layers=False)  # the per-layer names GGUF files use (TINY builds scanned)
# Tests of the real llama.cpp (an optional extra that builds llama.cpp from source; CI does not install it) take
# 20-60 s each here: they are marked slow and llamacpp (`pytest -m llamacpp -n 0`).


def write_tiny_gguf(params, config, path) -> Path:
    """A float32 Llama GGUF of ``params`` with a byte-level BPE vocabulary (264 tokens, as in test_gguf)."""
    tmap = ge.tensor_map(config)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_dimension_count(config.head_dim)
    w.add_vocab_size(config.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(TOKENS)
    w.add_token_types(TOKEN_TYPES)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    for p, x in tree.flatten(params).items():
        for name, arr in tmap.to_gguf(p, np.asarray(x)).items():
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def per_layer(adapters):
    """``(path, adapter)`` per layer (a scanned model's stacked adapters split), as GGUF files name them."""
    return lora.adapter_items(stacking.unstack(adapters))


def nonzero(adapters, seed=1, std=0.05):
    """The adapters with a random (nonzero) B, so that dW != 0."""
    rng = np.random.RandomState(seed)

    def fill(ad):
        return lora.LoraAdapter(
            ad.a,
            jnp.asarray(std * rng.standard_normal(ad.b.shape), jnp.float32),
            alpha=ad.alpha,
            scale=ad.scale,
            in_shape=ad.in_shape,
            out_shape=ad.out_shape,
            magnitude=ad.magnitude,
        )

    return jax.tree.map(fill, adapters, is_leaf=lora.is_adapter)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(float32 tiny Llama GGUF, its params, its model)."""
    params = jax.jit(lambda k: llama.init_params(TINY, k))(jax.random.key(0))
    params = jax.tree.map(lambda x: x * 5.0 if x.ndim == 2 else x, params)  # peaked logits: no greedy near-ties
    path = write_tiny_gguf(params, TINY, tmp_path_factory.mktemp("tiny") / "tiny-f32.gguf")
    model, loaded, _, config = lgguf.load_gguf(path, tokenizer=False)
    return path, loaded, model


@pytest.fixture(scope="module")
def adapters(tiny):
    """All-linear r=4 adapters plus an r=2 adapter with another alpha on o_proj (one file alpha cannot hold
    both scales: the ratio is folded into lora_b) and an adapter on the untied lm_head."""
    _, params, _ = tiny
    ad = lora.init(
        params,
        r=4,
        alpha=8.0,
        targets="all-linear",
        key=jax.random.key(3),
        rank_pattern={r".*o_proj.*": 2},
        alpha_pattern={r".*o_proj.*": 3.0},
    )
    head = lora.init(params, r=4, alpha=8.0, targets=[r"lm_head/kernel"], key=jax.random.key(4))
    return nonzero({**ad, **head})


def test_permutation_is_llama_cpp_converters(tiny):
    """The family mapping (read from the Llama declaration) stores Q / K as llama.cpp's converter does, and
    reads it back."""
    tmap = ge.tensor_map(UNROLLED)
    for proj, name, heads in (("q_proj", "attn_q", 4), ("k_proj", "attn_k", 2), ("v_proj", "attn_v", None)):
        path = ("model", "layers_1", "self_attn", proj, "kernel")
        kernel = np.random.RandomState(0).standard_normal(tmap.shape(path)).astype(np.float32)
        stored = tmap.to_gguf(path, kernel)
        want = llama_cpp_permute(kernel.T, heads) if heads else kernel.T
        np.testing.assert_array_equal(stored[f"blk.1.{name}.weight"], want)
        np.testing.assert_array_equal(tmap.from_gguf(path, stored), kernel)
    # the tiny base written through the family mapping reads back (through the GGUF reader) as the params
    path, params, _ = tiny
    _, again, _, config = lgguf.load_gguf(path, tokenizer=False)
    assert config == lgguf.config_from_metadata(
        lgguf.metadata(lgguf.open_gguf(path)), {t.name for t in lgguf.open_gguf(path).tensors}, str(path)
    )
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params, again))


def test_adapter_file_is_what_llama_cpp_reads(tiny, adapters, tmp_path):
    path, params, _ = tiny
    out = ge.save_gguf_adapter(adapters, tmp_path / "a.gguf", base=path, name="tiny-lora")
    reader = lgguf.open_gguf(out)
    meta = lgguf.metadata(reader)
    assert (meta["general.type"], meta["adapter.type"], meta["general.architecture"]) == ("adapter", "lora", "llama")
    assert meta["adapter.lora.alpha"] == 8.0  # the most common scale * r (2.0 * 4)
    assert reader.types["adapter.lora.alpha"] == (gguf.GGUFValueType.FLOAT32, None)
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * len(per_layer(adapters))
    base = {t.name: t for t in lgguf.open_gguf(path).tensors}
    for p, ad in per_layer(adapters):
        name = ge.tensor_map(UNROLLED).names[tuple(p.split("/"))]
        ta, tb = tensors[name + ".lora_a"], tensors[name + ".lora_b"]
        d_in, d_out = (int(d) for d in base[name].shape)  # ne of the base weight
        assert [int(d) for d in ta.shape] == [d_in, ad.r] and [int(d) for d in tb.shape] == [ad.r, d_out]
        assert ta.tensor_type == tb.tensor_type == gguf.GGMLQuantizationType.F32
        # dW as llama.cpp computes it from the file: alpha / r * B @ A, in the base tensor's GGUF layout
        a, b = lgguf.dequantize(ta), lgguf.dequantize(tb)
        dw_cpp = meta["adapter.lora.alpha"] / ad.r * (b @ a)
        dw_ours = np.asarray(ad.delta()).T  # (out, in), Hugging Face row order
        if "q_proj" in p or "k_proj" in p:
            dw_ours = llama_cpp_permute(dw_ours, 4 if "q_proj" in p else 2)
        np.testing.assert_allclose(dw_cpp, dw_ours, atol=1e-6)


def test_adapter_file_reads_back(tiny, adapters, tmp_path):
    path, params, _ = tiny
    out = ge.save_gguf_adapter(adapters, tmp_path / "a.gguf", base=path)
    for kwargs in ({}, {"params": params}):
        back = ge.load_gguf_adapter(out, path, **kwargs)
        assert stacking.is_stacked(back) == bool(kwargs)  # read into the params' (scanned) form when given them
        assert [p for p, _ in per_layer(back)] == [p for p, _ in per_layer(adapters)]
        for (p, want), (_, got) in zip(per_layer(adapters), per_layer(back)):
            assert got.r == want.r and got.scale == 8.0 / got.r
            np.testing.assert_allclose(got.delta(), want.delta(), atol=1e-6, err_msg=p)
    # a config names the layout as well as the base file; f16 factors read back to f16 precision
    half = ge.save_gguf_adapter(adapters, tmp_path / "h.gguf", base=TINY, dtype="f16")
    assert {t.tensor_type for t in lgguf.open_gguf(half).tensors} == {gguf.GGMLQuantizationType.F16}
    back = ge.load_gguf_adapter(half, TINY)
    for (p, want), (_, got) in zip(per_layer(adapters), per_layer(back)):
        np.testing.assert_allclose(got.delta(), want.delta(), atol=2e-3, err_msg=p)


def test_adapter_export_refuses_what_llama_cpp_cannot_run(tiny, adapters, tmp_path):
    path, params, _ = tiny
    dora = lora.init(stacking.unstack(params), r=2, targets="qv", use_dora=True, key=jax.random.key(0))  # unrolled
    with pytest.raises(ValueError, match="DoRA"):
        ge.save_gguf_adapter(dora, tmp_path / "d.gguf", base=path)
    # SmolLM2 ties its embeddings: llama.cpp uses token_embd as the output head too
    smol = dataclasses.replace(
        TINY, hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True
    )
    emb = {
        "model": {
            "embed_tokens": {
                "embedding": lora.LoraAdapter(
                    jnp.ones((264, 2)), jnp.ones((2, 576)), alpha=2.0, scale=1.0, in_shape=(264,), out_shape=(576,)
                )
            }
        }
    }
    with pytest.raises(ValueError, match="tied embeddings"):
        ge.save_gguf_adapter(emb, tmp_path / "e.gguf", base=smol)
    with pytest.raises(lora.CheckpointError, match="lm_head/kernel has no GGUF tensor"):  # no output.weight
        ge.save_gguf_adapter(adapters, tmp_path / "x.gguf", base=smol)
    wrong = {
        "model": {
            "layers_0": {
                "self_attn": {
                    "q_proj": {
                        "kernel": lora.LoraAdapter(  # a 64 -> 32 kernel's
                            jnp.ones((64, 2)), jnp.ones((2, 32)), alpha=2.0, scale=1.0, in_shape=(64,), out_shape=(32,)
                        )
                    }
                }
            }
        }
    }
    with pytest.raises(lora.CheckpointError, match=r"blk.0.attn_q.weight' has shape \(64, 64\)"):
        ge.save_gguf_adapter(wrong, tmp_path / "x.gguf", base=path)
    with pytest.raises(lora.CheckpointError, match="not a LoRA adapter"):
        ge.load_gguf_adapter(path, path)
    with pytest.raises(ValueError, match="must be one of"):
        ge.save_merged_gguf(adapters, tmp_path / "m.gguf", base=path, type="q4_k")


def test_embedding_adapter_layout(tiny, tmp_path):
    """token_embd's lora_a is (vocab, r) in numpy (rows gathered per token), lora_b (d, r): llm_build_inp_embd."""
    path, params, _ = tiny
    ad = nonzero(
        lora.init(params, r=3, targets=[r".*embed_tokens/embedding"], allow_embeddings=True, key=jax.random.key(5))
    )
    out = ge.save_gguf_adapter(ad, tmp_path / "emb.gguf", base=path)
    t = {x.name: lgguf.dequantize(x) for x in lgguf.open_gguf(out).tensors}
    a, b = t["token_embd.weight.lora_a"], t["token_embd.weight.lora_b"]
    assert a.shape == (264, 3) and b.shape == (64, 3)
    ids = np.array([7, 123, 263])
    got = (a[ids] @ b.T) * (3.0 / 3)  # alpha / r with alpha = scale * r = r
    np.testing.assert_allclose(got, np.asarray(ad["model"]["embed_tokens"]["embedding"].delta())[ids], atol=1e-6)
    back = ge.load_gguf_adapter(out, path, params=params)
    np.testing.assert_allclose(
        back["model"]["embed_tokens"]["embedding"].delta(), ad["model"]["embed_tokens"]["embedding"].delta(), atol=1e-6
    )


def test_merged_gguf_reads_back_as_the_merge(tiny, adapters, tmp_path):
    path, params, _ = tiny
    merged = lora.merge(params, adapters)
    rep = ge.save_merged_gguf(adapters, tmp_path / "m32.gguf", base=path, type="base")  # F32 base: exact
    assert set(rep.errors) == {p for p, _ in per_layer(adapters)}  # named per layer, as the file names them
    assert all(e.max_abs == 0.0 and e.delta_rms > 0 for e in rep.errors.values())
    _, back, _, _ = lgguf.load_gguf(rep.path, tokenizer=False)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), dict(merged), back)
    src, dst = lgguf.metadata(lgguf.open_gguf(path)), lgguf.metadata(lgguf.open_gguf(rep.path))
    assert src == dst  # tokenizer and every hyper-parameter copied

    # Q8_0 everywhere: the reported error is the error of the file; untouched vectors stay F32
    q8 = ge.save_merged_gguf(adapters, tmp_path / "m8.gguf", base=path, type="q8_0")
    assert q8.types["blk.0.attn_q.weight"] == "Q8_0" and q8.types["blk.0.attn_norm.weight"] == "F32"
    assert lgguf.metadata(lgguf.open_gguf(q8.path))["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    _, back8, _, _ = lgguf.load_gguf(q8.path, tokenizer=False)
    flat_m, flat_b = tree.flatten(stacking.unstack(merged)), tree.flatten(stacking.unstack(back8))  # per layer
    for p, err in q8.errors.items():
        diff = np.asarray(flat_b[tuple(p.split("/"))]) - np.asarray(flat_m[tuple(p.split("/"))])
        assert np.isclose(err.max_abs, np.abs(diff).max(), rtol=1e-5)
        assert np.isclose(err.rms, np.sqrt(np.mean(diff**2)), rtol=1e-4)
        assert 0 < err.rms < 0.05 * err.delta_rms * 10

    # "base" on a quantised base: untouched tensors are copied byte for byte, changed ones keep their type
    q41 = ge.save_merged_gguf({}, tmp_path / "b41.gguf", base=path, type="q4_1").path
    again = ge.save_merged_gguf(adapters, tmp_path / "m41.gguf", base=q41, type="base", allow_lossy=True)
    t0 = {t.name: t for t in lgguf.open_gguf(q41).tensors}
    t1 = {t.name: t for t in lgguf.open_gguf(again.path).tensors}
    assert {n: t.tensor_type for n, t in t0.items()} == {n: t.tensor_type for n, t in t1.items()}
    adapted = {ge.tensor_map(UNROLLED).names[tuple(p.split("/"))] for p in again.errors}
    for n in t0:
        assert np.array_equal(t0[n].data, t1[n].data) == (n not in adapted), n


def test_merged_gguf_that_loses_the_update_is_refused_unless_asked_for(tiny, adapters, tmp_path):
    """A small update merged into a 4-bit base: re-quantising costs more than MAX_REQUANT_RELATIVE of the update's
    rms. The export refuses (nothing written), naming the tensor, the base's weight type and the exports that keep
    the fine-tune; allow_lossy=True writes it, with the error in the report."""
    path, params, _ = tiny
    q41 = ge.save_merged_gguf({}, tmp_path / "b41.gguf", base=path, type="q4_1").path
    small = jax.tree.map(lambda x: x, adapters)
    small = jax.tree.map(lambda ad: dataclasses.replace(ad, b=ad.b * 1e-2), small, is_leaf=lora.is_adapter)
    with pytest.raises(ValueError) as e:
        ge.save_merged_gguf(small, tmp_path / "m.gguf", base=q41, type="base")
    msg = str(e.value)
    for part in (
        "merging into the base types (Q4_1)",
        "x the update's rms (over 0.5)",
        "type='f16'",
        "'q8_0'",
        "GGUF adapter",
        "allow_lossy=True",
        "Nothing was written",
    ):
        assert part in msg, (part, msg)
    assert not (tmp_path / "m.gguf").exists()
    rep = ge.save_merged_gguf(small, tmp_path / "m.gguf", base=q41, type="base", allow_lossy=True)
    assert rep.worst()[1].relative > ge.MAX_REQUANT_RELATIVE and rep.path.is_file()
    exact = ge.save_merged_gguf(small, tmp_path / "f16.gguf", base=q41, type="f16")  # f16 keeps it
    assert exact.worst()[1].relative < ge.MAX_REQUANT_RELATIVE


def test_weight_type_is_the_files_not_the_most_common_tensor_type(tiny, tmp_path):
    """A quantised GGUF of a real model holds more F32 norm vectors than quantised matrices: its weight type is
    its general.file_type (or, without one, the most common type of its 2-D tensors), never "F32"."""
    path, _, _ = tiny
    q41 = ge.save_merged_gguf({}, tmp_path / "b41.gguf", base=path, type="q4_1").path
    assert ge.weight_type(q41) == "Q4_1" and ge.weight_type(path) == "F32"
    reader = lgguf.open_gguf(q41)
    w = gguf.GGUFWriter(str(tmp_path / "no-type.gguf"), "llama")
    ge._copy_metadata(reader, w, {"general.architecture", "general.file_type"})
    for t in reader.tensors:
        w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    for i in range(40):  # norm-like vectors, as a deep model has: now F32 is the most common tensor type
        w.add_tensor(f"extra.{i}.weight", np.ones(64, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    types = [t.tensor_type.name for t in lgguf.open_gguf(tmp_path / "no-type.gguf").tensors]
    assert types.count("F32") > types.count("Q4_1")  # the trap the parity table fell into
    assert ge.weight_type(tmp_path / "no-type.gguf") == "Q4_1"


def test_merged_gguf_falls_back_for_types_gguf_cannot_write(tiny, adapters, tmp_path, caplog):
    """An adapted Q4_K tensor (gguf-py dequantises K-quants but cannot write them) is written as the fallback
    type, Q8_0, with a warning; the untouched Q4_K tensor is copied as it is."""
    path, params, _ = tiny
    reader = lgguf.open_gguf(path)
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    ge._copy_metadata(reader, w, {"general.architecture"})
    rng = np.random.RandomState(0)
    for t in reader.tensors:
        if t.name.endswith("ffn_down.weight"):  # (64, 256): one 256-value Q4_K block (144 bytes) per row
            block = rng.randint(0, 256, (64, 144)).astype(np.uint8)
            block[:, 0:2] = np.array([0.002], np.float16).view(np.uint8)  # d
            block[:, 2:4] = np.array([0.001], np.float16).view(np.uint8)  # dmin
            w.add_tensor(t.name, block, raw_shape=block.shape, raw_dtype=gguf.GGMLQuantizationType.Q4_K)
        else:
            w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    layer0 = stacking.unstack(adapters)["model"]["layers_0"]
    only_layer0 = {"model": {"layers_0": {"mlp": {"down_proj": layer0["mlp"]["down_proj"]}}}}
    with caplog.at_level("WARNING", logger="lora_jax.gguf"):
        rep = ge.save_merged_gguf(
            only_layer0, tmp_path / "m.gguf", base=tmp_path / "k.gguf", type="base", allow_lossy=True
        )
    assert rep.types["blk.0.ffn_down.weight"] == "Q8_0" and rep.types["blk.1.ffn_down.weight"] == "Q4_K"
    assert "Q8_0 instead of Q4_K" in caplog.text
    err = rep.errors["model/layers_0/mlp/down_proj/kernel"]
    assert 0 < err.rms < err.delta_rms
    assert ge._quantisable(gguf.GGMLQuantizationType.Q4_1) and not ge._quantisable(gguf.GGMLQuantizationType.Q4_K)


# --------------------------------------------------------------------------------------- the real llama.cpp


def _our_logits(model, params, adapters, ids):
    weights = lora.wrap(params, adapters) if adapters else params
    out, _ = model.apply({"params": weights}, jnp.asarray([ids]))
    return np.asarray(out[0], np.float32)


@pytest.mark.slow
@pytest.mark.llamacpp
@pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python is not installed (pip install -e '.[gguf]')")
def test_llama_cpp_runs_our_adapter_and_merged_file(tiny, adapters, tmp_path):
    """float32 tiny Llama: llama.cpp's matmuls are float32 too, so logits agree to float32 accumulation
    differences (atol 2e-3 on logits of magnitude ~10), and greedy continuations are identical."""
    path, params, model = tiny
    file = ge.save_gguf_adapter(adapters, tmp_path / "a.gguf", base=path)
    merged = ge.save_merged_gguf(adapters, tmp_path / "m.gguf", base=path, type="f32").path
    ids = [1, 50, 72, 28, 201, 17, 33, 260, 12, 99]
    ours = _our_logits(model, params, adapters, ids)
    base_ours = _our_logits(model, params, None, ids)
    mark = llamacpp.log_mark()
    with_adapter = llamacpp.open_model(path, file)
    cpp = llamacpp.logits(with_adapter, ids)
    assert llamacpp.warnings_since(mark) == [], llamacpp.log_since(mark)
    assert "llama_adapter_lora_init_impl" in llamacpp.log_since(mark)  # the adapter was really loaded
    assert np.abs(ours - base_ours).max() > 1.0  # the adapter changes the logits a lot...
    np.testing.assert_allclose(cpp, ours, atol=2e-3, rtol=0)  # ...and llama.cpp applies exactly that
    mark = llamacpp.log_mark()
    from_merged = llamacpp.open_model(merged)
    np.testing.assert_allclose(llamacpp.logits(from_merged, ids), ours, atol=2e-3, rtol=0)
    assert llamacpp.warnings_since(mark) == [], llamacpp.log_since(mark)
    steps = 12
    from lora_jax.models import generate as gen

    ours_greedy = np.asarray(
        gen.generate(
            model, lora.wrap(params, adapters), np.array([ids]), max_new_tokens=steps, eos_token_id=2, pad_token_id=0
        )
    )[0, len(ids) :].tolist()
    if 2 in ours_greedy:
        ours_greedy = ours_greedy[: ours_greedy.index(2) + 1]
    cpp_greedy = llamacpp.greedy(with_adapter, ids, steps, eos=2)
    assert cpp_greedy == ours_greedy == llamacpp.greedy(from_merged, ids, steps, eos=2)


@pytest.mark.slow
@pytest.mark.llamacpp
@pytest.mark.skipif(
    llamacpp.source_dir() is None,
    reason="llama.cpp's convert_lora_to_gguf.py is not unpacked "
    "(python -c 'from benchmarks import llamacpp; llamacpp.fetch_source()')",
)
def test_llama_cpp_converter_writes_the_same_file(tiny, tmp_path):
    """A PEFT export converted by llama.cpp's own convert_lora_to_gguf.py holds the tensors our writer writes
    (same names, shapes, permutation, values), and reads back here to the same dW."""
    path, params, _ = tiny
    ad = nonzero(lora.init(params, r=4, alpha=8.0, targets="all-linear", key=jax.random.key(3)))
    lora.save_peft(ad, tmp_path / "peft", config=TINY)
    hf = TINY.to_hf()
    hf.architectures = ["LlamaForCausalLM"]
    hf.save_pretrained(tmp_path / "hf")  # the converter reads the base's config.json only
    llamacpp.convert_peft(tmp_path / "peft", tmp_path / "hf", tmp_path / "theirs.gguf")
    ours = ge.save_gguf_adapter(ad, tmp_path / "ours.gguf", base=path)
    theirs_r, ours_r = lgguf.open_gguf(tmp_path / "theirs.gguf"), lgguf.open_gguf(ours)
    meta = lgguf.metadata(theirs_r)
    assert (meta["general.type"], meta["adapter.type"], meta["adapter.lora.alpha"]) == ("adapter", "lora", 8.0)
    theirs_t = {t.name: t for t in theirs_r.tensors}
    ours_t = {t.name: t for t in ours_r.tensors}
    assert set(theirs_t) == set(ours_t)
    for name, t in theirs_t.items():
        assert list(t.shape) == list(ours_t[name].shape) and t.tensor_type == ours_t[name].tensor_type, name
        np.testing.assert_array_equal(lgguf.dequantize(t), lgguf.dequantize(ours_t[name]), err_msg=name)
    back = ge.load_gguf_adapter(tmp_path / "theirs.gguf", path, params=params)
    for (p, want), (_, got) in zip(lora.adapter_items(ad), lora.adapter_items(back)):
        np.testing.assert_allclose(got.delta(), want.delta(), atol=1e-6, err_msg=p)


# ------------------------------------------------------------------------------------ train.run / predict


def _run_overrides(model, out, **extra):
    base = {
        "model.name": str(model),
        "data.max_length": 248,
        "train.steps": 3,
        "train.batch_size": 4,
        "eval.every": 100,
        "eval.batch_size": 8,
        "eval.generate_samples": 0,
        "eval.generate_eval": 0,
        "data.max_eval_examples": 8,
        "checkpoint.every": 100,
        "lora.r": 4,
        "lora.targets": "attention",
        "optim.lr": 1e-2,
        "output.dir": str(out),
    }
    base.update(extra)
    if base["train.method" if "train.method" in base else "lora.r"] == "full":  # no lora.* keys without adapters
        base = {k: v for k, v in base.items() if not k.startswith("lora.")}
    return [f"{k}={v}" for k, v in base.items()]


def test_export_gguf_writes_the_run_files(tiny, adapters, tmp_path):
    """train.loop.export_gguf (what train.run calls at the end with output.export_gguf_adapter /
    output.export_gguf) writes adapter.gguf and merged.gguf with its error report."""
    from train import loop
    from train.config import load_config

    path, params, _ = tiny
    cfg = load_config(
        None, _run_overrides(path, tmp_path, **{"output.export_gguf_adapter": True, "output.export_gguf": "f16"})
    )
    said = []
    loop.export_gguf(cfg, tmp_path, {"model": adapters["model"]}, {}, None, said.append)
    back = ge.load_gguf_adapter(tmp_path / loop.GGUF_ADAPTER, path)
    assert len(lora.adapter_items(back)) == len(per_layer(adapters["model"]))
    report = json.loads((tmp_path / loop.GGUF_MERGED_REPORT).read_text())
    assert report["type"] == "f16" and report["types"]["blk.1.ffn_up.weight"] == "F16"
    assert set(report["errors"]) == {"model/" + p for p, _ in per_layer(adapters["model"])}
    assert all(0 < e["rms"] < e["delta_rms"] for e in report["errors"].values())
    assert lgguf.open_gguf(tmp_path / loop.GGUF_MERGED).metadata["general.file_type"] == 1  # MOSTLY_F16
    assert len(said) == 2 and "adapter.gguf" in said[0] and "merged GGUF (f16)" in said[1]


@pytest.mark.slow
def test_train_run_exports_gguf_and_predict_reads_it(tiny, tmp_path):
    """output.export_gguf_adapter / output.export_gguf write files that hold the trained adapters (read back
    here), with the merged file's error report; train.predict --adapter X.gguf runs the same adapters."""
    from lora_jax import stacking
    from lora_jax.checkpoint import load_adapters
    from train import loop, predict
    from train.config import load_config

    path, params, model = tiny
    out = tmp_path / "run"
    cfg = load_config(
        None, _run_overrides(path, out, **{"output.export_gguf_adapter": True, "output.export_gguf": "q8_0"})
    )
    run = loop.run(cfg, print_fn=lambda *a, **k: None).folder  # out/run-1: each run has its own folder
    # the job trained the layers scanned (stacked adapters); the files and these params name layers one by one
    trained = stacking.unstack(load_adapters(run / "adapters"))
    assert any(p.startswith("model/layers_1/") for p, _ in lora.adapter_items(trained))
    back = stacking.unstack(ge.load_gguf_adapter(run / "adapter.gguf", path, params=params))
    for (p, want), (_, got) in zip(lora.adapter_items(trained), lora.adapter_items(back)):
        np.testing.assert_allclose(got.delta(), want.delta(), atol=1e-6, err_msg=p)
    report = json.loads((run / "merged_gguf_errors.json").read_text())
    assert set(report["errors"]) == {p for p, _ in lora.adapter_items(trained)}
    assert report["types"]["blk.0.attn_q.weight"] == "Q8_0"
    _, merged, _, _ = lgguf.load_gguf(run / "merged.gguf", tokenizer=False)
    flat = tree.flatten(stacking.unstack(merged))
    exact = tree.flatten(stacking.unstack(lora.merge(params, trained)))
    for p, e in report["errors"].items():
        key = tuple(p.split("/"))
        assert np.isclose(np.abs(np.asarray(flat[key]) - np.asarray(exact[key])).max(), e["max_abs"], rtol=1e-5)

    p = predict.from_base(str(path), str(run / "adapter.gguf"))  # what train.predict --adapter X.gguf runs
    _, loaded = lora.unwrap(p.weights)
    loaded = stacking.unstack(loaded)
    for (q, want), (_, got) in zip(lora.adapter_items(trained), lora.adapter_items(loaded)):
        np.testing.assert_allclose(got.delta(), want.delta(), atol=1e-6, err_msg=q)
    records = predict.predict(
        predict.parse_args(
            [
                "--base",
                str(path),
                "--adapter",
                str(run / "adapter.gguf"),
                "--max-new-tokens",
                "2",
                "--text",
                "The Eagle",
            ]
        ),
        print_fn=lambda *a: None,
    )
    assert len(records) == 1 and records[0]["prompt"] == "The Eagle"


def test_train_run_refuses_gguf_exports_it_cannot_write(tiny, tmp_path, minilm_path):
    from train import loop
    from train.config import ConfigError, load_config

    path, _, _ = tiny
    bad = [
        ({"output.export_gguf": "q4_k"}, "must be one of"),
        ({"output.export_gguf_adapter": True, "lora.use_dora": True}, "no DoRA"),
        (
            {"output.export_gguf_adapter": True, "train.method": "full"},
            r"output.export_gguf_adapter=\w+ has no effect here: it applies only with train.method=lora or qlora",
        ),
    ]
    for extra, match in bad:
        with pytest.raises(ConfigError, match=match):
            loop.run(load_config(None, _run_overrides(path, tmp_path / "x", **extra)), print_fn=lambda *a: None)
    with pytest.raises(ConfigError, match="need a GGUF base"):
        loop.run(
            load_config(None, _run_overrides(minilm_path, tmp_path / "y", **{"output.export_gguf": "f16"})),
            print_fn=lambda *a: None,
        )
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # refused before anything was written
