"""GGUF files (llama.cpp's format): Llama-family weights, config and tokenizer, read with the ``gguf`` package.

:func:`load_gguf` returns what :func:`lora_jax.models.load` returns for a Hugging Face folder::

    model, params, tokenizer, config = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")

- Tensors are dequantised with ``gguf.quants.dequantize`` (Q4_0/Q4_1/Q8_0/K-quants/F16/BF16/F32: whatever the
  package implements) and cast to the requested dtype. LoRA then trains on top of the dequantised base.
- Names map as llama.cpp's converter wrote them::

      token_embd.weight           model/embed_tokens/embedding
      blk.N.attn_norm.weight      model/layers_N/input_layernorm/scale
      blk.N.attn_{q,k,v}.weight   model/layers_N/self_attn/{q,k,v}_proj/kernel   (+ .bias for Qwen2)
      blk.N.attn_output.weight    model/layers_N/self_attn/o_proj/kernel
      blk.N.ffn_norm.weight       model/layers_N/post_attention_layernorm/scale
      blk.N.ffn_{gate,up,down}.weight  model/layers_N/mlp/{gate,up,down}_proj/kernel
      output_norm.weight          model/norm/scale
      output.weight               lm_head/kernel   (absent: tied embeddings)

  llama.cpp stores the rows of the Llama Q and K projections permuted for its interleaved RoPE; they are
  permuted back here so the result is the Hugging Face layout (rotate-half RoPE) the model uses.
- The config comes from the ``{arch}.*`` metadata (heads, KV heads, rope theta, RMS eps, context length).
- The tokenizer is rebuilt with ``tokenizers`` from ``tokenizer.ggml.tokens`` / ``merges`` (byte-level BPE,
  ``tokenizer.ggml.model == "gpt2"``), with llama.cpp's pre-tokenizer for ``tokenizer.ggml.pre`` and the
  special tokens and chat template of the metadata, wrapped as ``transformers.PreTrainedTokenizerFast``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax.models import llama
from lora_jax.errors import CheckpointError

logger = logging.getLogger("lora_jax.models")

ARCHITECTURES = ("llama", "qwen2")
# llama.cpp pre-tokenizer names whose split is GPT-2's regex, with digits split one by one for the second set
# (llama.cpp's llama-vocab.cpp: "\p{N}" before the GPT-2 expression).
GPT2_PRE = ("gpt2", "default", "mpt", "olmo", "jais")
DIGIT_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
# GGUF token types (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


# ------------------------------------------------------------------------------------------- reading


def open_gguf(path: str | os.PathLike):
    """A ``gguf.GGUFReader`` over ``path`` (memory-mapped); a missing, foreign, truncated or corrupt file raises
    :class:`~lora_jax.models.hf.CheckpointError` naming it."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: GGUF file not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError / struct / numpy errors on a damaged file
        raise CheckpointError(f"{path}: cannot read this GGUF file ({type(e).__name__}: {e}); it may be truncated "
                              "or corrupt, re-download it") from None


def metadata(reader) -> dict[str, Any]:
    """The key/value metadata of a GGUF file as Python values (strings, numbers, lists)."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def dequantize(tensor, dtype=jnp.float32) -> np.ndarray:
    """One GGUF tensor as a numpy array of ``dtype``, in the row-major shape llama.cpp reports reversed
    (a weight stored ``[in, out]`` comes back ``(out, in)``, as the PyTorch weight it was converted from)."""
    from gguf import quants

    try:
        x = quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise CheckpointError(f"tensor {tensor.name!r}: {e}") from None
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return np.asarray(x, np.float32).reshape(shape).astype(jnp.dtype(dtype))


# --------------------------------------------------------------------------------------------- config


def config_from_metadata(meta: Mapping[str, Any], tensor_names: set[str], source: str) -> llama.Config:
    """The :class:`lora_jax.models.llama.Config` described by GGUF metadata (``general.architecture`` llama or
    qwen2); tied embeddings when the file has no ``output.weight``."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{source}: GGUF architecture {arch!r} is not supported; supported: {ARCHITECTURES}")

    def get(key: str, default: Any = KeyError):
        value = meta.get(f"{arch}.{key}", default)
        if value is KeyError:
            raise CheckpointError(f"{source}: GGUF metadata {arch}.{key} is missing")
        return value

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    head_dim = int(get("attention.key_length", hidden // heads))
    rope_dim = int(get("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise CheckpointError(f"{source}: partial rotary embeddings ({arch}.rope.dimension_count {rope_dim} < head "
                              f"dim {head_dim}) are not supported")
    scaling = get("rope.scaling.type", "none")
    if "rope_freqs.weight" in tensor_names:
        raise CheckpointError(f"{source}: per-frequency RoPE factors (rope_freqs.weight, Llama 3.1 scaling) are not "
                              "supported in GGUF files; load the Hugging Face checkpoint instead")
    if scaling not in ("none", "linear"):
        raise CheckpointError(f"{source}: {arch}.rope.scaling.type {scaling!r} is not supported (none, linear)")
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
    if not vocab:
        raise CheckpointError(f"{source}: no vocabulary size ({arch}.vocab_size or tokenizer.ggml.tokens)")
    layers = int(get("block_count"))
    return llama.Config(
        vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads)), head_dim=head_dim,
        max_position_embeddings=int(get("context_length")),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_type="linear" if scaling == "linear" else "default",
        rope_factor=float(get("rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0,
        qkv_bias=arch == "qwen2" or "blk.0.attn_q.bias" in tensor_names,
        o_bias="blk.0.attn_output.bias" in tensor_names,
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        model_type="qwen2" if arch == "qwen2" else "llama",
    )


# -------------------------------------------------------------------------------------------- weights


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of Q / K rows: within each head it stores the two RoPE halves interleaved
    (row pairs ``(i, i + hd/2)`` adjacent); Hugging Face keeps the halves contiguous. ``w`` is ``(out, ...)``
    with ``out = n_heads * head_dim`` (a weight ``(out, in)`` or a bias ``(out,)``)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(path: tuple[str, ...]) -> str:
    """GGUF tensor name of a :class:`LlamaForCausalLM` parameter path."""
    if path[0] == "lm_head":
        return "output.weight"
    if path[1] == "embed_tokens":
        return "token_embd.weight"
    if path[1] == "norm":
        return "output_norm.weight"
    layer = path[1].split("_")[1]
    module = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "q_proj": "attn_q",
              "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output", "gate_proj": "ffn_gate",
              "up_proj": "ffn_up", "down_proj": "ffn_down"}[path[-2]]
    return f"blk.{layer}.{module}.{'bias' if path[-1] == 'bias' else 'weight'}"


def params_from_reader(reader, config: llama.Config, arch: str, dtype, source: str) -> dict:
    """The :class:`LlamaForCausalLM` params of a GGUF file, dequantised to ``dtype``; a missing tensor, a wrong
    shape or an unused tensor raises naming the tensor and ``source``."""
    tensors = {t.name: t for t in reader.tensors}
    expected = llama._expected(config, "causal-lm")
    params, used = {}, set()
    for path, spec in expected.items():
        name = _gguf_name(path)
        want = llama._hf_shape(path, spec.shape)
        if name not in tensors:
            raise CheckpointError(f"{source}: missing tensor {name!r} (for {'/'.join(path)}, shape {want})")
        x = dequantize(tensors[name], np.float32)
        if tuple(x.shape) != want:
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(x.shape)}, expected {want} for "
                                  f"{'/'.join(path)}")
        if arch == "llama" and path[-2] in ("q_proj", "k_proj"):
            x = unpermute_rope_rows(x, config.num_attention_heads if path[-2] == "q_proj"
                                    else config.num_key_value_heads)
        if path[-1] == "kernel":
            x = x.T
        params[path] = jnp.asarray(np.ascontiguousarray(x), dtype)
        used.add(name)
    unused = sorted(set(tensors) - used)
    if unused:
        raise CheckpointError(f"{source}: {len(unused)} tensor(s) do not fit the {arch} config read from its "
                              f"metadata: {unused[:5]}")
    return llama._unflat(params)


# ------------------------------------------------------------------------------------------ tokenizer


def tokenizer_from_metadata(meta: Mapping[str, Any], source: str = "<gguf>"):
    """A ``transformers.PreTrainedTokenizerFast`` rebuilt from the ``tokenizer.*`` metadata of a GGUF file, or
    ``None`` when it has none.

    Only byte-level BPE (``tokenizer.ggml.model == "gpt2"``) is implemented, with the pre-tokenizers of
    llama.cpp's ``gpt2`` family and of its ``smollm`` / ``starcoder`` family (digits split one by one); other
    models or pre-tokenizers raise ``ValueError``. Control tokens become special tokens (never split,
    skipped by ``decode(..., skip_special_tokens=True)``).
    """
    import transformers
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        return None
    if kind != "gpt2":
        raise ValueError(f"{source}: GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2'); "
                         "pass tokenizer=False to load_gguf to load the weights alone")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in GPT2_PRE + DIGIT_PRE:
        raise ValueError(f"{source}: GGUF pre-tokenizer {pre!r} is not supported (supported: {GPT2_PRE + DIGIT_PRE}); "
                         "pass tokenizer=False to load_gguf to load the weights alone")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    if any(len(m) != 2 for m in merges):
        raise ValueError(f"{source}: tokenizer.ggml.merges holds entries without a space separator")

    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False,
                               byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=bool(meta.get("tokenizer.ggml.add_space_prefix", False)),
                                          use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if pre in DIGIT_PRE else byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types) if kind == TOKEN_CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, kind in zip(tokens, types) if kind == TOKEN_USER_DEFINED])

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos = token("bos")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    kwargs = {k: v for k, v in dict(bos_token=bos, eos_token=token("eos"), unk_token=token("unknown"),
                                     pad_token=token("padding")).items() if v is not None}
    if "tokenizer.chat_template" in meta:
        kwargs["chat_template"] = meta["tokenizer.chat_template"]
    arch = meta.get("general.architecture")
    context = meta.get(f"{arch}.context_length")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, clean_up_tokenization_spaces=False,
        model_max_length=int(context) if context else int(1e30), **kwargs)


# ------------------------------------------------------------------------------------------------ load


def load_gguf(path: str | os.PathLike, dtype=jnp.float32, task: str | None = None, tokenizer: bool = True):
    """Load a Llama-family GGUF file: ``(model, params, tokenizer, config)``.

    Args:
      path: the ``.gguf`` file.
      dtype: compute dtype of the model and storage dtype of the dequantised parameters.
      task: ``None`` / ``"causal-lm"`` (:class:`~lora_jax.models.llama.LlamaForCausalLM`) or ``"base"``
        (:class:`~lora_jax.models.llama.LlamaModel`, whose params are the ``model`` subtree).
      tokenizer: build the tokenizer from the metadata (``False``: return ``None`` for it).

    Raises :class:`~lora_jax.models.hf.CheckpointError` (naming the file) for a missing, truncated or corrupt
    file, an unsupported architecture, or tensors that do not fit the metadata.
    """
    task = llama._check_task(task)
    path = Path(path)
    start = time.perf_counter()
    reader = open_gguf(path)
    try:
        meta = metadata(reader)
        names = {t.name for t in reader.tensors}
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read the GGUF metadata ({type(e).__name__}: {e}); the file may be "
                              "corrupt") from None
    config = config_from_metadata(meta, names, str(path))
    params = params_from_reader(reader, config, meta["general.architecture"], dtype, str(path))
    if task == "base":
        params = params["model"]
    tok = tokenizer_from_metadata(meta, str(path)) if tokenizer else None
    logger.info("%s: loaded %s (%d layers) in %.1f s", path, meta.get("general.name", "model"),
                config.num_hidden_layers, time.perf_counter() - start)
    return llama.build(config, jnp.dtype(dtype), task), params, tok, config


__all__ = ["config_from_metadata", "dequantize", "load_gguf", "metadata", "open_gguf", "params_from_reader",
           "tokenizer_from_metadata", "unpermute_rope_rows"]
