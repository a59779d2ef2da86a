"""GGUF files (llama.cpp's format): weights, config and tokenizer, read with the ``gguf`` package.

:func:`load_gguf` returns what :func:`lora_jax.models.load` returns for a Hugging Face folder::

    model, params, tokenizer, config = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")

One reader for every family that declares GGUF support (:class:`lora_jax.models.arch.GGUF`):

- ``general.architecture`` names the family (:func:`lora_jax.models.arch.for_gguf`).
- The config: the ``{arch}.*`` metadata mapped to ``transformers`` config fields by the declaration (heads, KV
  heads, context length, RMS eps, ...), plus what every file says the same way (RoPE base and linear scaling,
  the vocabulary size, special token ids, tied embeddings when there is no ``output.weight``), then the
  family's ``Config.from_hf``: so a GGUF file and the Hugging Face folder of the same model give the same
  ``Config``.
- Tensors are named from the family's Hugging Face names through the declared table
  (``model.layers.0.self_attn.q_proj.weight`` -> ``blk.0.attn_q.weight``), dequantised with
  ``gguf.quants.dequantize`` (Q4_0/Q4_1/Q8_0/K-quants/F16/BF16/F32: whatever the package implements), fixed
  where the declaration says (llama.cpp permutes the Llama Q and K rows for its interleaved RoPE), put in our
  layout and cast to the requested dtype. LoRA then trains on top of the dequantised base.
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

from lora_jax import tree
from lora_jax.errors import CheckpointError
from lora_jax.models import arch as arch_lib

logger = logging.getLogger("lora_jax.models")

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


def architecture(meta: Mapping[str, Any], source: str) -> arch_lib.Architecture:
    """The family of a GGUF file (its ``general.architecture``); ``CheckpointError`` when none reads it."""
    name = meta.get("general.architecture")
    arch = arch_lib.for_gguf(name)
    if arch is None:
        raise CheckpointError(f"{source}: GGUF architecture {name!r} is not supported; supported: "
                              f"{arch_lib.gguf_architectures()}")
    return arch


def hf_config_fields(meta: Mapping[str, Any], tensor_names: set[str], source: str) -> tuple[str, dict]:
    """``(model_type, {transformers config field: value})`` described by GGUF metadata."""
    name = meta.get("general.architecture")
    spec = architecture(meta, source).gguf

    def get(key: str, default: Any = None):
        return meta.get(f"{name}.{key}", default)

    for key in spec.required:
        if get(key) is None:
            raise CheckpointError(f"{source}: GGUF metadata {name}.{key} is missing")
    fields = {field: get(key) for key, field in spec.config.items() if get(key) is not None}
    if "rope_freqs.weight" in tensor_names:
        raise CheckpointError(f"{source}: per-frequency RoPE factors (rope_freqs.weight, Llama 3.1 scaling) are not "
                              "supported in GGUF files; load the Hugging Face checkpoint instead")
    heads, hidden = get("attention.head_count"), get("embedding_length")
    head_dim = get("attention.key_length", hidden // heads if heads and hidden else None)
    rope_dim = get("rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise CheckpointError(f"{source}: partial rotary embeddings ({name}.rope.dimension_count {rope_dim} < head "
                              f"dim {head_dim}) are not supported")
    scaling = get("rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise CheckpointError(f"{source}: {name}.rope.scaling.type {scaling!r} is not supported (none, linear)")
    rope = {"rope_type": "linear" if scaling == "linear" else "default",
            "rope_theta": float(get("rope.freq_base", 10000.0))}
    if scaling == "linear":
        rope["factor"] = float(get("rope.scaling.factor", 1.0))
    vocab = fields.get("vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
    if not vocab:
        raise CheckpointError(f"{source}: no vocabulary size ({name}.vocab_size or tokenizer.ggml.tokens)")
    fields.update(
        vocab_size=int(vocab), rope_parameters=rope, tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"))
    if spec.derive is not None:
        fields.update(spec.derive(meta, tensor_names, name))
    return spec.model_types[name], fields


def config_from_metadata(meta: Mapping[str, Any], tensor_names: set[str], source: str) -> Any:
    """The family ``Config`` described by GGUF metadata: :func:`hf_config_fields` through ``transformers``'
    config class and the family's ``Config.from_hf`` (so a setting the model does not implement raises here,
    as ``CheckpointError`` naming ``source``)."""
    import transformers

    arch = architecture(meta, source)
    model_type, fields = hf_config_fields(meta, tensor_names, source)
    try:
        return arch.config.from_hf(transformers.AutoConfig.for_model(model_type, **fields))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{source}: {e}") from None


# -------------------------------------------------------------------------------------------- weights


def params_from_reader(reader, config: Any, arch: str, dtype, source: str) -> dict:
    """The params of the family's GGUF task (a causal LM) from a GGUF file (``arch``: its
    ``general.architecture``), dequantised to ``dtype``; a missing tensor, a wrong shape or an unused tensor
    raises naming the tensor and ``source``."""
    family = arch_lib.for_gguf(arch)
    if family is None:
        raise CheckpointError(f"{source}: GGUF architecture {arch!r} is not supported; supported: "
                              f"{arch_lib.gguf_architectures()}")
    spec = family.gguf
    tensors = {t.name: t for t in reader.tensors}
    task = spec.task
    prefix = family.tasks[task].backbone
    params, used = {}, set()
    for path, shape in family.shapes(config, task).items():
        where = family.names.tensor(family.checkpoint_path(path, task, prefix), config)
        arrays = []
        for hf_name, want in zip(where.names, [tuple(x.shape) for x in where.layout.save(
                np.broadcast_to(np.zeros((), np.float32), shape.shape))]):
            name = spec.name(hf_name)
            if name is None or name not in tensors:
                raise CheckpointError(f"{source}: missing tensor {name or hf_name!r} (for {tree.join(path)}, shape "
                                      f"{want})")
            x = dequantize(tensors[name], np.float32)
            if tuple(x.shape) != want:
                raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(x.shape)}, expected {want} for "
                                      f"{tree.join(path)}")
            arrays.append(spec.from_gguf(hf_name, x, config) if spec.from_gguf is not None else x)
            used.add(name)
        params[path] = jnp.asarray(np.ascontiguousarray(where.layout.load(arrays)), dtype)
    unused = sorted(set(tensors) - used)
    if unused:
        raise CheckpointError(f"{source}: {len(unused)} tensor(s) do not fit the {arch} config read from its "
                              f"metadata: {unused[:5]}")
    return tree.unflatten(params)


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
    """Load a GGUF file: ``(model, params, tokenizer, config)``.

    Args:
      path: the ``.gguf`` file.
      dtype: compute dtype of the model and storage dtype of the dequantised parameters.
      task: ``None`` (the family's GGUF task, a causal LM) or another task of the family whose params are
        part of it (``"base"``: the backbone alone).
      tokenizer: build the tokenizer from the metadata (``False``: return ``None`` for it).

    Raises :class:`~lora_jax.errors.CheckpointError` (naming the file) for a missing, truncated or corrupt
    file, an unsupported architecture, or tensors that do not fit the metadata.
    """
    path = Path(path)
    start = time.perf_counter()
    reader = open_gguf(path)
    try:
        meta = metadata(reader)
        names = {t.name for t in reader.tensors}
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read the GGUF metadata ({type(e).__name__}: {e}); the file may be "
                              "corrupt") from None
    family = architecture(meta, str(path))
    own = family.gguf.task
    task = own if task is None else family.task(task)
    backbone = family.tasks[own].backbone
    if task != own and not (family.tasks[task].backbone is None and backbone is not None):
        raise ValueError(f"{path}: a GGUF file holds a {own} model; task {task!r} cannot be read from it")
    config = config_from_metadata(meta, names, str(path))
    params = params_from_reader(reader, config, meta["general.architecture"], dtype, str(path))
    if task != own:
        params = params[backbone]
    tok = tokenizer_from_metadata(meta, str(path)) if tokenizer else None
    logger.info("%s: loaded %s (%d layers) in %.1f s", path, meta.get("general.name", "model"),
                getattr(config, "num_hidden_layers", -1), time.perf_counter() - start)
    return family.build(config, jnp.dtype(dtype), task), params, tok, config


__all__ = ["architecture", "config_from_metadata", "dequantize", "hf_config_fields", "load_gguf", "metadata",
           "open_gguf", "params_from_reader", "tokenizer_from_metadata"]
