"""GGUF files (llama.cpp's format): weights, config and tokenizer, parsed here and dequantised with the ``gguf``
package.

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
  (``model.layers.0.self_attn.q_proj.weight`` -> ``blk.0.attn_q.weight``; a name ``blk.0.ffn_gate_exps[3]`` is
  expert 3 of a tensor stacking every expert, as llama.cpp stores MoE experts), dequantised with
  ``gguf.quants.dequantize`` (Q4_0/Q4_1/Q8_0/K-quants/F16/BF16/F32: whatever the package implements), fixed
  where the declaration says (llama.cpp permutes the Llama Q and K rows for its interleaved RoPE), put in our
  layout and cast to the requested dtype. LoRA then trains on top of the dequantised base.
- The tokenizer is rebuilt with ``tokenizers`` from ``tokenizer.ggml.tokens`` / ``merges`` (byte-level BPE,
  ``tokenizer.ggml.model == "gpt2"``, or SentencePiece BPE, ``"llama"``, whose merges the vocabulary implies),
  with llama.cpp's pre-tokenizer for ``tokenizer.ggml.pre`` and the
  special tokens and chat template of the metadata, wrapped as ``transformers.PreTrainedTokenizerFast``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax import tree
from lora_jax.errors import CheckpointError
from lora_jax.models import arch as arch_lib
from lora_jax.untrusted import check_array

logger = logging.getLogger("lora_jax.models")

# llama.cpp pre-tokenizer names whose split is GPT-2's regex, with digits split one by one for the second set
# (llama.cpp's llama-vocab.cpp: "\p{N}" before the GPT-2 expression).
GPT2_PRE = ("gpt2", "default", "mpt", "olmo", "jais")
DIGIT_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
# GGUF token types (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


# ------------------------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: ``shape`` in llama.cpp's order (``ne0`` first), ``data`` a read-only view of the
    file (the element type for float / integer tensors, the raw bytes ``(..., bytes per row)`` for quantised
    ones), as ``gguf.GGUFReader`` gives it and ``gguf.quants.dequantize`` takes it."""

    name: str
    tensor_type: Any
    shape: tuple[int, ...]
    data: np.ndarray


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    """A GGUF file's metadata (``{key: Python value}``) and tensors (:class:`GGUFTensor`), memory-mapped."""

    path: Path
    metadata: dict[str, Any]
    tensors: list[GGUFTensor]
    types: dict[str, tuple[int, int | None]] = dataclasses.field(default_factory=dict)
    """key -> (GGUF value type, element type of an array or None): what a writer needs to copy the metadata."""


# GGUF metadata value types (gguf-py's GGUFValueType) -> struct formats; 8: string, 9: array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
# Tensor types stored as plain numpy elements (the others as raw bytes).
_TYPED = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "I8": "i1", "I16": "<i2", "I32": "<i4", "I64": "<i8"}


def _parse(path: Path) -> GGUFFile:
    """Parse a little-endian GGUF v2 / v3 file with ``struct`` (``gguf.GGUFReader`` makes a numpy view of every
    array element at open: 17 s of CPU for Gemma 3's 262,144-token vocabulary, against well under a second
    here). Raises ``ValueError`` / ``struct.error`` / ``UnicodeDecodeError`` on a damaged file."""
    import mmap
    import struct

    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    pos = 4

    def read(fmt: str):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string() -> str:
        nonlocal pos
        n = read("Q")
        if pos + n > len(buf):
            raise CheckpointError(f"a string of {n} bytes at offset {pos} runs past the end of the file")
        pos += n
        return buf[pos - n : pos].decode("utf-8")

    def value(kind: int):
        nonlocal pos
        if kind in _SCALARS:
            return read(_SCALARS[kind])
        if kind == 8:
            return string()
        if kind != 9:
            raise CheckpointError(f"unknown metadata value type {kind} at offset {pos}")
        item, n = read("IQ")
        if item in _SCALARS and item != 7:
            dtype = np.dtype("<" + _SCALARS[item])
            pos += n * dtype.itemsize
            return np.frombuffer(buf, dtype, n, pos - n * dtype.itemsize).tolist()
        return [value(item) for _ in range(n)]

    version, n_tensors, n_kv = read("IQQ")
    if version not in (2, 3):
        raise CheckpointError(f"GGUF version {version} (expected 2 or 3, little-endian)")
    meta, types = {}, {}
    for _ in range(n_kv):
        key = string()
        kind = read("I")
        types[key] = (kind, struct.unpack_from("<I", buf, pos)[0] if kind == 9 else None)
        meta[key] = value(kind)
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = read("I")
        shape = tuple(int(d) for d in np.frombuffer(buf, "<u8", dims, pos))
        pos += 8 * dims
        infos.append((name, shape, *read("IQ")))
    align = int(meta.get("general.alignment", 32))
    start = -(-pos // align) * align
    tensors = []
    for name, shape, kind, offset in infos:
        kind = GGMLQuantizationType(kind)
        rows = tuple(reversed(shape))
        block, size = GGML_QUANT_SIZES[kind]
        if kind.name in _TYPED:
            dtype, count = np.dtype(_TYPED[kind.name]), int(np.prod(shape))
        else:
            dtype, rows = np.dtype(np.uint8), rows[:-1] + (rows[-1] // block * size,)
            count = int(np.prod(rows))
        if start + offset + count * dtype.itemsize > len(buf):
            raise CheckpointError(f"tensor {name!r} runs past the end of the file ({len(buf)} bytes)")
        tensors.append(GGUFTensor(name, kind, shape, np.frombuffer(buf, dtype, count, start + offset).reshape(rows)))
    return GGUFFile(path, meta, tensors, types)


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """A GGUF file's metadata and tensor index (:class:`GGUFFile`, memory-mapped); a missing, foreign,
    truncated or corrupt file raises :class:`~lora_jax.errors.CheckpointError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: GGUF file not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        return _parse(path)
    except Exception as e:  # struct / value / unicode errors on a damaged file
        raise CheckpointError(
            f"{path}: cannot read this GGUF file ({type(e).__name__}: {e}); it may be truncated "
            "or corrupt, re-download it"
        ) from None


def metadata(reader: GGUFFile) -> dict[str, Any]:
    """The key/value metadata of a GGUF file as Python values (strings, numbers, lists)."""
    return dict(reader.metadata)


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
        raise CheckpointError(
            f"{source}: GGUF architecture {name!r} is not supported; supported: {arch_lib.gguf_architectures()}"
        )
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
        raise CheckpointError(
            f"{source}: per-frequency RoPE factors (rope_freqs.weight, Llama 3.1 scaling) are not "
            "supported in GGUF files; load the Hugging Face checkpoint instead"
        )
    heads, hidden = get("attention.head_count"), get("embedding_length")
    head_dim = get("attention.key_length", hidden // heads if heads and hidden else None)
    rope_dim = get("rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise CheckpointError(
            f"{source}: partial rotary embeddings ({name}.rope.dimension_count {rope_dim} < head "
            f"dim {head_dim}) are not supported"
        )
    scaling = get("rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise CheckpointError(f"{source}: {name}.rope.scaling.type {scaling!r} is not supported (none, linear)")
    rope = {
        "rope_type": "linear" if scaling == "linear" else "default",
        "rope_theta": float(get("rope.freq_base", 10000.0)),
    }
    if scaling == "linear":
        rope["factor"] = float(get("rope.scaling.factor", 1.0))
    vocab = fields.get("vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
    if not vocab:
        raise CheckpointError(f"{source}: no vocabulary size ({name}.vocab_size or tokenizer.ggml.tokens)")
    fields.update(
        vocab_size=int(vocab),
        rope_parameters=rope,
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )
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


def sources_from_reader(reader, config: Any, arch: str, source: str) -> dict:
    """``{path: LeafSource}`` for the params of the family's GGUF task (a causal LM) from a GGUF file (``arch``: its
    ``general.architecture``). Names are checked here (a missing or unused tensor raises naming it and
    ``source``); a leaf's tensors are dequantised to float32 only when its source is read (whole: a quantised
    block row mixes every column of a row), and a wrong shape raises then."""
    from lora_jax.models.hf import LeafSource

    family = arch_lib.for_gguf(arch)
    if family is None:
        raise CheckpointError(
            f"{source}: GGUF architecture {arch!r} is not supported; supported: {arch_lib.gguf_architectures()}"
        )
    spec = family.gguf
    tensors = {t.name: t for t in reader.tensors}
    task = spec.task
    prefix = family.tasks[task].backbone
    sources, used = {}, set()
    for path, shape in family.shapes(config, task).items():
        where = family.names.tensor(family.checkpoint_path(path, task, prefix), config)
        wants = [tuple(x.shape) for x in where.layout.save(np.broadcast_to(np.zeros((), np.float32), shape.shape))]
        plan = []
        for hf_name, want in zip(where.names, wants):
            parts = []
            for name in spec.names(hf_name) or (hf_name,):
                # "blk.0.ffn_gate_exps[3].weight": expert 3 of a tensor that stacks every expert on its first axis
                part = re.fullmatch(r"(?P<stem>.+)\[(?P<index>\d+)\](?P<leaf>\.\w+)", name)
                stem = part["stem"] + part["leaf"] if part is not None else name
                if stem not in tensors:
                    raise CheckpointError(f"{source}: missing tensor {stem!r} (for {tree.join(path)}, shape {want})")
                parts.append((stem, None if part is None else int(part["index"])))
                used.add(stem)
            plan.append((hf_name, want, parts))

        def value(path=path, where=where, plan=plan) -> np.ndarray:
            stacks, arrays = {}, []
            for hf_name, want, parts in plan:
                xs = []
                for stem, index in parts:
                    if stem not in stacks:  # dequantised once for all its experts
                        stacks[stem] = dequantize(tensors[stem], np.float32)
                    if index is None:
                        xs.append(stacks[stem])
                        continue
                    if index >= stacks[stem].shape[0]:
                        raise CheckpointError(
                            f"{source}: tensor {stem!r} of shape {stacks[stem].shape} has no expert "
                            f"{index} (for {tree.join(path)})"
                        )
                    xs.append(stacks[stem][index])
                x = np.concatenate(xs, axis=-2) if len(xs) > 1 else xs[0]
                if tuple(x.shape) != want:
                    names = " + ".join(dict.fromkeys(stem for stem, _ in parts))
                    raise CheckpointError(
                        f"{source}: tensor {names!r} has shape {tuple(x.shape)}, expected {want} for {tree.join(path)}"
                    )
                check_array(x, " + ".join(dict.fromkeys(stem for stem, _ in parts)), source)  # NaN / inf weights
                arrays.append(spec.from_gguf(hf_name, x, config) if spec.from_gguf is not None else x)
            return np.ascontiguousarray(where.layout.load(arrays))

        sources[path] = LeafSource(
            tuple(shape.shape),
            np.dtype(np.float32),
            lambda index, value=value: value()[index],
            " + ".join(dict.fromkeys(stem for *_, parts in plan for stem, _ in parts)),
            blockwise=False,
        )
    unused = sorted(set(tensors) - used)
    if unused:
        raise CheckpointError(
            f"{source}: {len(unused)} tensor(s) do not fit the {arch} config read from its metadata: {unused[:5]}"
        )
    return sources


def params_from_reader(reader, config: Any, arch: str, dtype, source: str) -> dict:
    """The params of the family's GGUF task (a causal LM) from a GGUF file (``arch``: its
    ``general.architecture``), dequantised to ``dtype``, whole, on the default device; a missing tensor, a wrong
    shape or an unused tensor raises naming the tensor and ``source``."""
    return tree.unflatten(
        {
            path: jnp.asarray(src.value(), dtype)
            for path, src in sources_from_reader(reader, config, arch, source).items()
        }
    )


# ------------------------------------------------------------------------------------------ tokenizer


def sentencepiece_merges(pieces: list[str]) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece BPE vocabulary implies (GGUF files of ``tokenizer.ggml.model == "llama"``
    store no merges): every split of a piece into two pieces of the vocabulary, ranked by the merged piece's
    position in the vocabulary (SentencePiece lists BPE pieces in the order they were learned; the scores of
    some files, Gemma's, do not follow it), then by the longer left part first."""
    vocab = set(pieces)
    return [
        (piece[:cut], piece[cut:])
        for piece in pieces
        for cut in range(len(piece) - 1, 0, -1)
        if piece[:cut] in vocab and piece[cut:] in vocab
    ]


def _sentencepiece_model(meta: Mapping[str, Any], tokens: list[str], unk: str | None):
    """The ``(model, normalizer, pre_tokenizer, decoder)`` of a SentencePiece BPE vocabulary: spaces become
    ``"▁"``, with one ``"▁"`` before the text when ``tokenizer.ggml.add_space_prefix`` (the default; not before
    text that follows a special token), no pre-split, unknown bytes as the ``<0xNN>`` byte pieces."""
    from tokenizers import decoders, models, normalizers, pre_tokenizers

    # A piece of spaces stored as real spaces (Gemma's "  ") could never match the normalised text.
    pieces = ["\u2581" * len(t) if t and not t.strip(" ") else t for t in tokens]
    model = models.BPE(
        vocab={t: i for i, t in enumerate(pieces)},
        merges=sentencepiece_merges(pieces),
        unk_token=unk,
        fuse_unk=True,
        byte_fallback=True,
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if meta.get("tokenizer.ggml.add_space_prefix", True):
        return (
            model,
            None,
            pre_tokenizers.Metaspace("\u2581", prepend_scheme="first", split=False),
            decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)]),
        )
    return model, normalizers.Replace(" ", "\u2581"), None, decoders.Sequence(steps)


def _byte_level_model(meta: Mapping[str, Any], tokens: list[str], source: str):
    """The ``(model, normalizer, pre_tokenizer, decoder)`` of a byte-level BPE vocabulary with its merges and
    llama.cpp's pre-tokenizer for ``tokenizer.ggml.pre``."""
    from tokenizers import decoders, models, pre_tokenizers

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in GPT2_PRE + DIGIT_PRE:
        raise CheckpointError(
            f"{source}: GGUF pre-tokenizer {pre!r} is not supported (supported: "
            f"{GPT2_PRE + DIGIT_PRE}); pass tokenizer=False to load_gguf to load the weights alone"
        )
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    if any(len(m) != 2 for m in merges):
        raise CheckpointError(f"{source}: tokenizer.ggml.merges holds entries without a space separator")
    model = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False, byte_fallback=False)
    byte_level = pre_tokenizers.ByteLevel(
        add_prefix_space=bool(meta.get("tokenizer.ggml.add_space_prefix", False)), use_regex=True
    )
    pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if pre in DIGIT_PRE
        else byte_level
    )
    return model, None, pre_tokenizer, decoders.ByteLevel()


def tokenizer_from_metadata(meta: Mapping[str, Any], source: str = "<gguf>"):
    """A ``transformers.PreTrainedTokenizerFast`` rebuilt from the ``tokenizer.*`` metadata of a GGUF file, or
    ``None`` when it has none.

    Two vocabularies are implemented: byte-level BPE (``tokenizer.ggml.model == "gpt2"``) with the
    pre-tokenizers of llama.cpp's ``gpt2`` family and of its ``smollm`` / ``starcoder`` family (digits split
    one by one), and SentencePiece BPE (``"llama"``: Llama 2, Gemma; merges rebuilt from the vocabulary by
    :func:`sentencepiece_merges`, byte fallback). Others raise ``ValueError``. Control tokens become special
    tokens (never split, skipped by ``decode(..., skip_special_tokens=True)``), user-defined ones added tokens;
    BOS / EOS are added as ``tokenizer.ggml.add_bos_token`` / ``add_eos_token`` say (llama.cpp adds BOS to a
    SentencePiece vocabulary that does not say).
    """
    import transformers
    from tokenizers import AddedToken, Tokenizer, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        return None
    if kind not in ("gpt2", "llama"):
        raise CheckpointError(
            f"{source}: GGUF tokenizer model {kind!r} is not supported (byte-level BPE 'gpt2', "
            "SentencePiece BPE 'llama'); pass tokenizer=False to load_gguf to load the weights alone"
        )
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens)))

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    if kind == "gpt2":
        model, normalizer, pre_tokenizer, decoder = _byte_level_model(meta, tokens, source)
    else:
        model, normalizer, pre_tokenizer, decoder = _sentencepiece_model(meta, tokens, token("unknown"))
    tok = Tokenizer(model)
    if normalizer is not None:
        tok.normalizer = normalizer
    if pre_tokenizer is not None:
        tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoder
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, types) if kind == TOKEN_CONTROL]
    )
    # (a user-defined piece the vocabulary respelled, Gemma's "  " -> "▁▁", is left to the model)
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for i, (t, kind) in enumerate(zip(tokens, types))
            if kind == TOKEN_USER_DEFINED and tok.token_to_id(t) == i
        ]
    )

    bos, eos = token("bos"), token("eos")
    bos = bos if meta.get("tokenizer.ggml.add_bos_token", kind == "llama") else None
    eos = eos if meta.get("tokenizer.ggml.add_eos_token", False) else None
    if bos is not None or eos is not None:
        first, last = [f"{bos}"] if bos else [], [f"{eos}"] if eos else []
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join(first + ["$A"] + last),
            pair=" ".join(first + ["$A"] + last + [f"{t}:1" for t in first] + ["$B:1"] + [f"{t}:1" for t in last]),
            special_tokens=[(t, tokens.index(t)) for t in dict.fromkeys(first + last)],
        )
    elif kind == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    kwargs = {
        k: v
        for k, v in dict(
            bos_token=token("bos"), eos_token=token("eos"), unk_token=token("unknown"), pad_token=token("padding")
        ).items()
        if v is not None
    }
    if "tokenizer.chat_template" in meta:
        kwargs["chat_template"] = meta["tokenizer.chat_template"]
    arch = meta.get("general.architecture")
    context = meta.get(f"{arch}.context_length")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        clean_up_tokenization_spaces=False,
        model_max_length=int(context) if context else int(1e30),
        **kwargs,
    )


# ------------------------------------------------------------------------------------------------ load


def open_gguf_checkpoint(
    path: str | os.PathLike, task: str | None = None, tokenizer: bool = True, scan_layers: bool | None = None
):
    """A GGUF file opened but not read: ``(family, config, task, sources, tokenizer)``, ``sources`` being
    ``{path: LeafSource}`` of ``task``'s params (paths relative to the task's tree). See :func:`load_gguf`.
    ``scan_layers``: build a decoder scanned or not (``None``: the config's default); the only setting a GGUF file
    does not fix."""
    path = Path(path)
    reader = open_gguf(path)
    try:
        meta = metadata(reader)
        names = {t.name for t in reader.tensors}
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot read the GGUF metadata ({type(e).__name__}: {e}); the file may be corrupt"
        ) from None
    family = architecture(meta, str(path))
    own = family.gguf.task
    task = own if task is None else family.task(task)
    backbone = family.tasks[own].backbone
    if task != own and not (family.tasks[task].backbone is None and backbone is not None):
        raise CheckpointError(f"{path}: a GGUF file holds a {own} model; task {task!r} cannot be read from it")
    config = config_from_metadata(meta, names, str(path))
    config = arch_lib.with_scan_layers(config, scan_layers)
    sources = sources_from_reader(reader, config, meta["general.architecture"], str(path))
    if task != own:
        sources = {p[1:]: src for p, src in sources.items() if p[0] == backbone}
    tok = tokenizer_from_metadata(meta, str(path)) if tokenizer else None
    return family, config, task, sources, tok


def load_gguf(path: str | os.PathLike, dtype=jnp.float32, task: str | None = None, tokenizer: bool = True):
    """Load a GGUF file: ``(model, params, tokenizer, config)``, the params whole on the default device (to load
    into a device mesh, see :func:`lora_jax.models.open_checkpoint`).

    Args:
      path: the ``.gguf`` file.
      dtype: compute dtype of the model and storage dtype of the dequantised parameters.
      task: ``None`` (the family's GGUF task, a causal LM) or another task of the family whose params are
        part of it (``"base"``: the backbone alone).
      tokenizer: build the tokenizer from the metadata (``False``: return ``None`` for it).

    Raises :class:`~lora_jax.errors.CheckpointError` (naming the file) for a missing, truncated or corrupt
    file, an unsupported architecture, or tensors that do not fit the metadata.
    """
    start = time.perf_counter()
    family, config, task, sources, tok = open_gguf_checkpoint(path, task, tokenizer)
    params = tree.unflatten({p: jnp.asarray(src.value(), dtype) for p, src in sources.items()})
    logger.info(
        "%s: loaded %s (%d layers) in %.1f s",
        path,
        family.name,
        getattr(config, "num_hidden_layers", -1),
        time.perf_counter() - start,
    )
    return family.build(config, jnp.dtype(dtype), task), params, tok, config


__all__ = [
    "GGUFFile",
    "GGUFTensor",
    "architecture",
    "config_from_metadata",
    "dequantize",
    "hf_config_fields",
    "load_gguf",
    "metadata",
    "open_gguf",
    "open_gguf_checkpoint",
    "params_from_reader",
    "sentencepiece_merges",
    "sources_from_reader",
    "tokenizer_from_metadata",
]
