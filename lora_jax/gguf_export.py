"""Adapters that llama.cpp runs: GGUF LoRA adapter files and merged GGUF models, both ways.

Three things, each checked against the real llama.cpp (``tests/test_gguf_export.py``,
``benchmarks/llamacpp_parity.py``):

    lora.save_gguf_adapter(adapters, "adapter.gguf", base="SmolLM2.Q4_1.gguf")   # llama.cpp --lora
    adapters = lora.load_gguf_adapter("adapter.gguf", base="SmolLM2.Q4_1.gguf")
    report = lora.save_merged_gguf(adapters, "merged.gguf", base="SmolLM2.Q4_1.gguf", type="base")

**The adapter file** (what llama.cpp's ``convert_lora_to_gguf.py`` writes and ``llama-adapter.cpp`` reads):
metadata ``general.type = "adapter"``, ``general.architecture`` = the base's (llama.cpp refuses a mismatch),
``adapter.type = "lora"``, ``adapter.lora.alpha`` (float32); per adapted base tensor ``T`` (named as in the
base GGUF: ``blk.3.attn_q.weight``) two tensors ``T.lora_a`` and ``T.lora_b``. For a base weight of GGUF shape
``ne = [d_in, d_out]`` (numpy ``(d_out, d_in)``, as PyTorch's ``nn.Linear``):

    T.lora_a   ne = [d_in, r]    numpy (r, d_in)    = our A.T     (PEFT's lora_A.weight)
    T.lora_b   ne = [r, d_out]   numpy (d_out, r)   = our B.T     (PEFT's lora_B.weight), rows permuted as T's

and llama.cpp adds ``scale * B(A x)`` with ``scale = alpha / r`` (``r`` read from ``lora_b``; ``alpha = 0``
means scale 1). The token embedding is the exception (``llm_build_inp_embd``): ``token_embd.weight.lora_a`` is
numpy ``(vocab, r)`` (our A as it is, rows gathered by token) and ``.lora_b`` numpy ``(d, r)``.

One ``alpha`` serves the whole file, so adapters whose ``scale * r`` differs (``alpha_pattern``, rsLoRA with
mixed ranks) get the ratio folded into their ``lora_b``: the file computes the same ``dW`` and reads back with
``scale = alpha / r``.

llama.cpp stores the rows of Llama Q and K projections permuted for its interleaved RoPE (see
:func:`lora_jax.models.decoder.permute_rope_rows`); a LoRA ``B`` is permuted the same way (its rows are the
projection's output rows), ``A`` is not.

**The merged model** is the base GGUF with ``dW`` folded into the adapted tensors, every other tensor copied
byte for byte (or converted, for a requested type), and all metadata (tokenizer, chat template, hyper-
parameters) copied from the base. ``type="base"`` keeps each tensor's own type, re-quantising the adapted ones
with ``gguf.quants.quantize`` (Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / BF16 / F16 / F32; the package cannot
quantise K-quants or i-quants, which fall back to ``fallback``, Q8_0 by default); ``"f32"`` / ``"f16"`` /
``"bf16"`` / ``"q8_0"`` / ``"q4_0"`` / ... writes every 2-D weight in that type. The error each re-quantised
tensor costs is measured as :func:`lora_jax.merge_quantized` does (:class:`~lora_jax.quant.RequantError`).

**Families.** Which of our parameter paths is which GGUF tensor, and how llama.cpp stores its values, comes
from the family's declaration (:class:`lora_jax.models.arch.GGUF`: names, ``to_gguf`` / ``from_gguf`` fixes),
read by :func:`tensor_map`: every family that declares GGUF support exports (Llama / SmolLM2 and Qwen2 as
``llama`` / ``qwen2``, Qwen3, Gemma 3 as ``gemma3``) with nothing family-specific here. A LoRA ``B`` carries a
fix only when it acts on output rows alone (a permutation: checked on a probe), else the tensor is refused
for adapter files (merged export still works).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import core, stacking, tree
from lora_jax.errors import ArgumentError, CheckpointError, UnsupportedError
from lora_jax.quant import RequantError
from lora_jax.untrusted import check_array, check_number

PyTree = Any
logger = logging.getLogger("lora_jax.gguf")

ADAPTER_TYPES = ("f32", "f16", "bf16")
# Merged-export types by name (``base``: each tensor keeps its own). Only types ``gguf.quants.quantize`` writes.
MERGED_TYPES = ("base", "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
# A merged export whose re-quantisation error (rms, worst tensor) exceeds this fraction of the update's own rms
# (RequantError.relative) has lost much of the fine-tune: save_merged_gguf refuses it unless allow_lossy=True.
# (Merging into a 4-bit base measured 1.17x: 0 of 16 llama.cpp continuations matched the fine-tuned model.)
MAX_REQUANT_RELATIVE = 0.5


# ------------------------------------------------------------------------------------ the family mapping


@dataclasses.dataclass(frozen=True)
class Leaf:
    """Where one parameter sits in a GGUF file: its Hugging Face tensor names, the GGUF tensor names of each
    (several: concatenated along the second-to-last axis, a fused ``gate_up_proj``), and the layout between
    our leaf and the Hugging Face tensors (:class:`lora_jax.models.arch.Layout`)."""

    hf_names: tuple[str, ...]
    gguf_names: tuple[tuple[str, ...], ...]
    layout: Any


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """How a model's parameters are laid out in a GGUF file, read from the family's declaration
    (:class:`lora_jax.models.arch.GGUF`: tensor names, the value fixes ``to_gguf`` / ``from_gguf`` such as
    llama.cpp's Q / K row permutation for Llama, Gemma's ``1 + w`` norms).

    ``arch``: GGUF ``general.architecture``; ``leaves``: our parameter path (causal-LM layout,
    ``("model", "layers_0", "self_attn", "q_proj", "kernel")``) -> :class:`Leaf`; ``tied``: the output head is
    the embedding table (no ``output.weight``).
    """

    arch: str
    leaves: Mapping[tuple[str, ...], Leaf]
    tied: bool
    config: Any
    spec: Any  # lora_jax.models.arch.GGUF
    backbone: str | None = "model"  # the causal LM's backbone key (its bare backbone's paths lack it)

    @functools.cached_property
    def names(self) -> dict[tuple[str, ...], str]:
        """Path -> GGUF tensor name, for the leaves stored as one GGUF tensor."""
        return {
            p: leaf.gguf_names[0][0]
            for p, leaf in self.leaves.items()
            if len(leaf.gguf_names) == 1 and len(leaf.gguf_names[0]) == 1
        }

    @functools.cached_property
    def _owner(self) -> dict[str, tuple[str, ...]]:
        return {n: p for p, leaf in self.leaves.items() for names in leaf.gguf_names for n in names}

    def path_of(self, name: str) -> tuple[str, ...] | None:
        """The parameter path holding GGUF tensor ``name`` (``None`` for a name this family does not use)."""
        return self._owner.get(name)

    def _fix(self, hf_name: str, x: np.ndarray, to_gguf: bool) -> np.ndarray:
        fix = self.spec.to_gguf if to_gguf else self.spec.from_gguf
        return fix(hf_name, x, self.config) if fix is not None else x

    def to_gguf(self, path: tuple[str, ...], x) -> dict[str, np.ndarray]:
        """Our leaf as its GGUF tensors ``{name: array in GGUF's numpy layout}`` (``(out, in)`` for a kernel,
        fixed as llama.cpp stores it)."""
        leaf = self.leaves[path]
        out = {}
        for hf, names, arr in zip(leaf.hf_names, leaf.gguf_names, leaf.layout.save(np.asarray(x, np.float32))):
            arr = self._fix(hf, np.asarray(arr, np.float32), True)
            parts = np.split(arr, len(names), axis=-2) if len(names) > 1 else [arr]
            out.update({n: np.ascontiguousarray(a) for n, a in zip(names, parts)})
        return out

    def from_gguf(self, path: tuple[str, ...], tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        """Inverse of :meth:`to_gguf`: the leaf from its GGUF tensors (dequantised, GGUF's numpy layout)."""
        leaf = self.leaves[path]
        arrays = []
        for hf, names in zip(leaf.hf_names, leaf.gguf_names):
            arr = np.concatenate([tensors[n] for n in names], axis=-2) if len(names) > 1 else tensors[names[0]]
            arrays.append(self._fix(hf, np.asarray(arr, np.float32), False))
        return np.ascontiguousarray(np.asarray(leaf.layout.load(arrays), np.float32))

    def lora_rows(
        self, path: tuple[str, ...]
    ) -> tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]:
        """``(to_gguf, from_gguf)`` for a LoRA ``B.T`` ``(out, r)`` of the kernel at ``path``: the family's fix
        of that tensor applied to B's rows. Raises ``NotImplementedError`` when llama.cpp's LoRA cannot express
        an adapter of this leaf: not one 2-D tensor stored transposed (a kernel) or as it is (a token table), or
        a fix that does not act on rows alone (it must commute with ``@ A.T``; checked on a random probe)."""
        leaf = self.leaves[path]
        where = "/".join(path)
        if len(leaf.hf_names) != 1 or len(leaf.gguf_names[0]) != 1:
            raise UnsupportedError(
                f"{where} is stored as {leaf.gguf_names} in GGUF; llama.cpp LoRA adapters "
                "adapt single tensors: export the merged model instead"
            )
        hf = leaf.hf_names[0]
        embedding = path[-1] == "embedding"
        if embedding == bool(leaf.layout.transposed):
            raise UnsupportedError(
                f"{where}: a {'transposed table' if embedding else 'kernel stored as it is'}"
                " has no llama.cpp LoRA layout"
            )
        rng = np.random.RandomState(0)
        n = self.shape(path)[-1 if not embedding else 0]
        probe, mix = rng.standard_normal((n, 3)).astype(np.float32), rng.standard_normal((3, 2)).astype(np.float32)
        try:
            fixed = self._fix(hf, probe, True)
            ok = np.allclose(self._fix(hf, probe @ mix, True), fixed @ mix, atol=1e-4) and (
                not embedding or np.allclose(fixed, probe)
            )
        except (ValueError, IndexError, TypeError):  # a fix that needs the whole tensor's shape (a reshape of it)
            # is not a row transform
            ok = False
        if not ok:
            raise UnsupportedError(
                f"{where}: the family's GGUF fix of {hf} is not a transform of the output "
                "rows alone, so a LoRA B cannot carry it; export the merged model instead"
            )
        return (lambda b: self._fix(hf, b, True)), (lambda b: self._fix(hf, b, False))

    @functools.cached_property
    def _shapes(self) -> dict:
        from lora_jax.models import arch as arch_lib

        return arch_lib.for_config(self.config).shapes(self.config, self.spec.task)

    def shape(self, path: tuple[str, ...]) -> tuple[int, ...]:
        """The shape of our leaf at ``path``."""
        return tuple(self._shapes[path].shape)


def _build_map(config) -> TensorMap:
    from lora_jax.models import arch as arch_lib

    family = arch_lib.for_config(config)
    spec = family.gguf
    archs = [k for k, v in (spec.model_types.items() if spec is not None else ()) if v == config.model_type]
    if not archs:
        raise UnsupportedError(
            f"GGUF export of a {config.model_type!r} model is not declared (families with "
            f"GGUF: {arch_lib.gguf_architectures()})"
        )
    task = spec.task
    prefix = family.tasks[task].backbone
    leaves = {}
    for path in family.shapes(config, task):
        where = family.names.tensor(family.checkpoint_path(path, task, prefix), config)
        leaves[path] = Leaf(tuple(where.names), tuple(spec.names(n) or (n,) for n in where.names), where.layout)
    return TensorMap(archs[0], leaves, bool(getattr(config, "tie_word_embeddings", False)), config, spec, prefix)


def tensor_map(config) -> TensorMap:
    """The :class:`TensorMap` of a model ``Config`` (a registered family's), from its declaration."""
    try:
        return _cached_map(config)
    except TypeError:  # an unhashable config
        return _build_map(config)


@functools.lru_cache(maxsize=16)
def _cached_map(config) -> TensorMap:
    return _build_map(config)


# ------------------------------------------------------------------------------------------- the base


@dataclasses.dataclass
class _Base:
    config: Any
    reader: Any  # lora_jax.models.gguf.GGUFFile, or None when the base is a Config
    source: str

    def tensors(self) -> dict:
        return {t.name: t for t in self.reader.tensors} if self.reader is not None else {}


def _open_base(base) -> _Base:
    """``base``: a GGUF file (path or offline alias such as ``"SmolLM2-135M-Instruct-Q4_1"``) or a model
    ``Config``."""
    from lora_jax.models import gguf as gguf_io

    if not isinstance(base, (str, os.PathLike)):  # GGUF names layers one by one: the unrolled model's config
        return _Base(stacking.unrolled(base), None, f"<{type(base).__name__} {base.model_type}>")
    from lora_jax.models import resolve

    try:
        path = resolve(base)
    except FileNotFoundError as e:
        raise CheckpointError(f"base {os.fspath(base)!r}: {e}") from None
    reader = gguf_io.open_gguf(path)
    meta = gguf_io.metadata(reader)
    config = gguf_io.config_from_metadata(meta, {t.name for t in reader.tensors}, str(path))
    return _Base(stacking.unrolled(config), reader, str(path))


def _gguf_shape(tensor) -> tuple[int, ...]:
    """A GGUF tensor's numpy shape (``ne`` reversed)."""
    return tuple(int(d) for d in reversed(tensor.shape))


def _normalise(path: tuple[str, ...], tmap: TensorMap) -> tuple[str, ...]:
    """Accept the paths of a bare backbone (``LlamaModel``: ``layers_0/...``) as well as a causal LM's."""
    if path in tmap.leaves or tmap.backbone is None:
        return path
    backbone = (tmap.backbone,) + path
    return backbone if backbone in tmap.leaves else path


# --------------------------------------------------------------------------------------- adapter files


def _qtype(name: str):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name.upper()]


def _write(writer, path: str | os.PathLike) -> Path:
    """Write a filled ``gguf.GGUFWriter`` (header, metadata, tensors) to ``path``, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _encode(x: np.ndarray, qtype) -> np.ndarray:
    from gguf import GGMLQuantizationType, quants

    x = np.ascontiguousarray(np.asarray(x, np.float32))
    return x if qtype == GGMLQuantizationType.F32 else quants.quantize(x, qtype)


def save_gguf_adapter(
    adapters: PyTree, path: str | os.PathLike, *, base, dtype: str = "f32", name: str | None = None
) -> Path:
    """Write ``adapters`` as a llama.cpp LoRA adapter (``llama-cli -m BASE.gguf --lora PATH``;
    ``llama_cpp.Llama(model_path=BASE, lora_path=PATH)``; Ollama's ``ADAPTER``).

    Args:
      adapters: the adapter tree (from :func:`lora_jax.init`, trained) of a causal LM (or its backbone).
      path: the ``.gguf`` file to write.
      base: the base GGUF file (path or offline alias) the adapters were trained on (its tensor names and
        shapes are checked), or the model ``Config`` (names from the family mapping alone).
      dtype: ``"f32"`` (default; exact), ``"f16"`` or ``"bf16"`` for the LoRA tensors.
      name: ``general.name`` written into the file (optional).

    Raises ``ValueError`` for what llama.cpp cannot run: DoRA magnitudes, an adapted tied embedding (its table
    is also llama.cpp's output head), kernels that are not 2-D; :class:`~lora_jax.CheckpointError` for an
    adapter that does not fit the base (named tensor and shapes).
    """
    adapters, base = stacking.unstack(adapters), stacking.unrolled(base)  # GGUF names layers
    import gguf

    if dtype not in ADAPTER_TYPES:
        raise ArgumentError(f"save_gguf_adapter: dtype must be one of {ADAPTER_TYPES}, got {dtype!r}")
    b = _open_base(base)
    tmap = tensor_map(b.config)
    base_tensors = b.tensors()
    items = [(_normalise(tuple(p.split("/")), tmap), ad) for p, ad in core.adapter_items(adapters)]
    if not items:
        raise ArgumentError("save_gguf_adapter: the adapter tree holds no LoraAdapter")
    for p, ad in items:
        where = "/".join(p)
        if ad.is_dora:
            raise ArgumentError(
                f"save_gguf_adapter: {where} is a DoRA adapter; llama.cpp's LoRA has no magnitude "
                "vector. Export the merged model instead (save_merged_gguf)"
            )
        if len(ad.in_shape) != 1 or len(ad.out_shape) != 1:
            raise ArgumentError(
                f"save_gguf_adapter: {where} adapts a kernel of shape {ad.kernel_shape}; llama.cpp LoRA tensors are 2-D"
            )
        if p not in tmap.leaves:
            raise CheckpointError(f"save_gguf_adapter: {where} has no GGUF tensor in a {tmap.arch} model ({b.source})")
        tmap.lora_rows(p)  # raises for a leaf llama.cpp's LoRA cannot adapt
        if p[-1] == "embedding" and tmap.tied:
            raise ArgumentError(
                f"save_gguf_adapter: {where} adapts the token embedding of a model with tied "
                "embeddings; llama.cpp uses that table as its output head too and cannot apply an "
                "adapter to it there. Export the merged model instead (save_merged_gguf)"
            )
        name_ = tmap.names[p]
        if base_tensors:
            if name_ not in base_tensors:
                raise CheckpointError(f"{b.source}: has no tensor {name_!r} for the adapter of {where}")
            want = _gguf_shape(base_tensors[name_])
            got = tuple(reversed(ad.kernel_shape)) if p[-1] == "kernel" else tuple(ad.kernel_shape)
            if want != got:
                raise CheckpointError(
                    f"{b.source}: tensor {name_!r} has shape {want}; the adapter of {where} "
                    f"is for a kernel {ad.kernel_shape} (GGUF layout {got})"
                )

    # One alpha for the file: the most common scale * r; other adapters carry the ratio in lora_b.
    products = [ad.scale * ad.r for _, ad in items]
    alpha = float(Counter(round(x, 9) for x in products).most_common(1)[0][0])
    if alpha == 0:
        raise ArgumentError("save_gguf_adapter: the adapters' scale is 0 (llama.cpp reads alpha = 0 as scale 1)")

    qtype = _qtype(dtype)
    writer = gguf.GGUFWriter(os.fspath(path), tmap.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_file_type(
        {
            "f32": gguf.LlamaFileType.ALL_F32,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        }[dtype]
    )
    if name:
        writer.add_name(name)
    for p, ad in items:
        fold = ad.scale * ad.r / alpha
        a = np.asarray(ad.a, np.float32)  # (d_in, r)
        bt = tmap.lora_rows(p)[0](np.asarray(ad.b, np.float32).T * np.float32(fold))  # (d_out, r)
        lora_a = a if p[-1] == "embedding" else a.T  # token_embd: A's rows are gathered per token
        tensor = tmap.names[p]
        for suffix, x in ((".lora_a", lora_a), (".lora_b", bt)):
            data = _encode(x, qtype)
            writer.add_tensor(tensor + suffix, data, raw_shape=data.shape, raw_dtype=qtype)
    return _write(writer, path)


def load_gguf_adapter(path: str | os.PathLike, base, *, params: PyTree | None = None, dtype=jnp.float32) -> PyTree:
    """Read a llama.cpp LoRA adapter (ours, or one ``convert_lora_to_gguf.py`` made from a PEFT folder) as an
    adapter tree for :func:`lora_jax.wrap` / :func:`lora_jax.merge`.

    Args:
      path: the adapter ``.gguf``.
      base: the base GGUF file (path or alias) or the model ``Config`` (for names, head counts, shapes).
      params: the base params, to check each adapter against its kernel (optional: the config's shapes are
        checked either way).
      dtype: dtype of the adapter factors.

    Each adapter gets ``alpha`` = the file's ``adapter.lora.alpha`` and ``scale = alpha / r`` (1 when alpha is 0,
    as llama.cpp reads it). Norm vectors some converters add (``*_norm.weight``) are skipped with a warning, as
    llama.cpp ignores them. Raises :class:`~lora_jax.CheckpointError` for a file that is not a LoRA adapter of
    this architecture, a tensor the base lacks, an unpaired or mis-shaped ``lora_a`` / ``lora_b``.
    """
    if params is not None and stacking.is_stacked(params):  # a scanned model: read per layer, stack
        return stacking.stack(
            load_gguf_adapter(path, stacking.unrolled(base), params=stacking.unstack(params), dtype=dtype), like=params
        )
    from lora_jax.models import gguf as gguf_io

    b = _open_base(base)
    tmap = tensor_map(b.config)
    reader = gguf_io.open_gguf(path)
    meta = gguf_io.metadata(reader)
    source = os.fspath(path)
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise CheckpointError(
            f"{source}: not a LoRA adapter (general.type={meta.get('general.type')!r}, "
            f"adapter.type={meta.get('adapter.type')!r}; expected 'adapter' / 'lora')"
        )
    if meta.get("general.architecture") != tmap.arch:
        raise CheckpointError(
            f"{source}: an adapter for a {meta.get('general.architecture')!r} model; the base "
            f"({b.source}) is {tmap.arch!r}"
        )
    if meta.get("adapter.alora_invocation_tokens") is not None:
        raise UnsupportedError(f"{source}: activated LoRA (adapter.alora_invocation_tokens) is not supported")
    alpha = check_number(meta.get("adapter.lora.alpha", 0.0), "adapter.lora.alpha", source)
    if alpha < 0:
        raise CheckpointError(f"{source}: adapter.lora.alpha must be >= 0 (0: scale 1), got {alpha!r}")

    pairs: dict[str, dict[str, Any]] = {}
    for t in reader.tensors:
        if t.name.endswith((".lora_a", ".lora_b")):
            pairs.setdefault(t.name[:-7], {})[t.name[-1]] = t
        elif t.name.endswith("_norm.weight"):
            logger.warning("%s: skipping %s (a norm vector; llama.cpp ignores these in adapters too)", source, t.name)
        else:
            raise CheckpointError(f"{source}: tensor {t.name!r} is neither a .lora_a nor a .lora_b tensor")
    kernels = (
        {_normalise(p, tmap): v for p, v in tree.flatten(params).items()}
        if params is not None
        else {p: leaf for p, leaf in tmap._shapes.items()}
    )
    bare = params is not None and not any(p in tmap.leaves for p in tree.flatten(params))
    adapters: dict = {}
    for name, ab in pairs.items():
        if set(ab) != {"a", "b"}:
            raise CheckpointError(
                f"{source}: {name}.lora_{next(iter(ab))} has no matching {name}.lora_{'b' if 'a' in ab else 'a'}"
            )
        p = tmap.path_of(name)
        if p is None:
            close = [n for n in tmap.names.values() if n.split(".")[-2:] == name.split(".")[-2:]][:3]
            raise CheckpointError(
                f"{source}: {name}.lora_a targets {name!r}, which a {tmap.arch} model of this "
                f"config does not have; close names: {close}"
            )
        if p not in kernels:
            raise CheckpointError(f"{source}: {name} is {'/'.join(p)}, which these params do not have")
        a = check_array(gguf_io.dequantize(ab["a"], np.float32), f"{name}.lora_a", source)
        bt = check_array(gguf_io.dequantize(ab["b"], np.float32), f"{name}.lora_b", source)
        shape = tuple(kernels[p].shape)
        if len(shape) != 2 or a.ndim != 2 or bt.ndim != 2:
            raise CheckpointError(
                f"{source}: {name}: 2-D lora tensors for a 2-D kernel expected, got lora_a "
                f"{a.shape}, lora_b {bt.shape} for {'/'.join(p)} {shape}"
            )
        d_in, d_out = shape
        r = bt.shape[1]
        want_a = (d_in, r) if p[-1] == "embedding" else (r, d_in)
        if tuple(a.shape) != want_a or tuple(bt.shape) != (d_out, r):
            raise CheckpointError(
                f"{source}: {name}: lora_a {a.shape} / lora_b {bt.shape} do not fit "
                f"{'/'.join(p)} {shape}: expected {want_a} / {(d_out, r)} (numpy layout)"
            )
        bt = tmap.lora_rows(p)[1](bt)
        a_ours = a if p[-1] == "embedding" else a.T
        scale = alpha / r if alpha else 1.0
        tree.put(
            adapters,
            p,
            core.LoraAdapter(
                a=jnp.asarray(a_ours, dtype),
                b=jnp.asarray(bt.T, dtype),
                alpha=alpha if alpha else float(r),
                scale=scale,
                in_shape=(d_in,),
                out_shape=(d_out,),
            ),
        )
    if not pairs:
        logger.warning("%s: the adapter holds no LoRA tensors", source)
    if bare:  # params of the bare backbone: adapters in its paths
        adapters = adapters.get(tmap.backbone, {})
    return adapters


# ---------------------------------------------------------------------------------------- merged model


class MergedGGUF(NamedTuple):
    """What :func:`save_merged_gguf` returns.

    ``path``: the file. ``errors``: ``{parameter path: RequantError}`` for every tensor that changed (adapted or
    trained in full), ``requant(W) - W`` against the exact float32 merge ``W``. ``types``: ``{GGUF tensor name:
    type written}`` for every tensor.
    """

    path: Path
    errors: dict[str, RequantError]
    types: dict[str, str]

    def worst(self) -> tuple[str, RequantError] | None:
        """The changed tensor with the largest ``rms / delta_rms``."""
        return max(self.errors.items(), key=lambda kv: kv[1].relative, default=None)


@functools.cache
def _quantisable(qtype) -> bool:
    """Whether ``gguf.quants.quantize`` can write ``qtype`` (it dequantises more types than it quantises)."""
    from gguf import GGML_QUANT_SIZES, quants

    try:
        quants.quantize(np.zeros((1, GGML_QUANT_SIZES[qtype][0]), np.float32), qtype)
    except NotImplementedError:
        return False
    return True


def _fits(shape: tuple[int, ...], qtype) -> bool:
    from gguf import GGML_QUANT_SIZES

    return shape[-1] % GGML_QUANT_SIZES[qtype][0] == 0


def check_merged_type(type: str) -> str:
    """``type`` lower-cased if it is one of :data:`MERGED_TYPES`, else ``ValueError`` listing them."""
    t = str(type).lower()
    if t not in MERGED_TYPES:
        raise ArgumentError(f"GGUF export type must be one of {MERGED_TYPES}, got {type!r}")
    return t


def _copy_metadata(file, writer, skip: set[str]) -> None:
    """Every metadata key of a :class:`~lora_jax.models.gguf.GGUFFile` but ``skip``, with its value type."""
    from gguf import GGUFValueType

    for key, value in file.metadata.items():
        if key in skip:
            continue
        kind, item = file.types[key]
        writer.add_key_value(key, value, GGUFValueType(kind), sub_type=None if item is None else GGUFValueType(item))


def weight_type(base: str | os.PathLike) -> str:
    """The weight type of a GGUF model file as llama.cpp names it (``"Q4_K_M"``, ``"Q4_1"``, ``"F16"``): its
    ``general.file_type``, else the most common type among its 2-D tensors. Not the most common type of all
    tensors, which in a quantised file is usually F32 (the norm vectors)."""
    import gguf

    from lora_jax.models import gguf as gguf_io

    reader = gguf_io.open_gguf(base)
    file_type = reader.metadata.get("general.file_type")
    if file_type is not None:
        try:
            name = gguf.LlamaFileType(int(file_type)).name
        except ValueError:
            name = None
        if name is not None:
            return name.removeprefix("MOSTLY_").removeprefix("ALL_")
    kinds = Counter(t.tensor_type.name for t in reader.tensors if len(_gguf_shape(t)) >= 2)
    if not kinds:
        raise CheckpointError(f"{os.fspath(base)}: no general.file_type and no 2-D tensors to tell its weight type")
    return kinds.most_common(1)[0][0]


def _lossy_message(path, t: str, worst: tuple[str, RequantError], base_type: str) -> str:
    name, err = worst
    return (
        f"save_merged_gguf: {path}: merging into {'the base types (' + base_type + ')' if t == 'base' else t} "
        f"re-quantises {name} with an error of {err.relative:.2f} x the update's rms (over "
        f"{MAX_REQUANT_RELATIVE:g}): the merged model would lose much of the fine-tune. Export type='f16' "
        "(exact to float16) or 'q8_0' to keep it in one file, or the GGUF adapter beside the base "
        "(save_gguf_adapter; train.run: output.export_gguf_adapter=true), or pass allow_lossy=True to write "
        "this file anyway. Nothing was written"
    )


def save_merged_gguf(
    adapters: PyTree,
    path: str | os.PathLike,
    *,
    base,
    type: str = "base",
    trained: PyTree | None = None,
    fallback: str = "q8_0",
    allow_lossy: bool = False,
) -> MergedGGUF:
    """Write the base GGUF with the adapters folded in (``W0 + scale * A @ B``; DoRA's re-normalised kernel),
    as a model file llama.cpp / Ollama load like the base.

    Args:
      adapters: the adapter tree (may be empty when only ``trained`` leaves change).
      path: the ``.gguf`` file to write.
      base: the base GGUF file (path or offline alias). Its metadata (tokenizer, chat template,
        hyper-parameters) is copied, and every tensor that neither an adapter nor ``trained`` touches is copied
        byte for byte (``type="base"``) or converted to ``type``.
      type: ``"base"``: each tensor keeps its type, the changed ones re-quantised into it; or one of ``"f32"``,
        ``"f16"``, ``"bf16"``, ``"q8_0"``, ``"q4_0"``, ``"q4_1"``, ``"q5_0"``, ``"q5_1"`` for every 2-D weight
        (vectors stay float32, as llama.cpp's converter writes them).
      trained: leaves trained in full (a nested dict mirroring the params, e.g. a full fine-tune's params),
        written instead of the base's tensors.
      fallback: the type for a tensor the requested type cannot hold: a base K-quant / i-quant that
        ``gguf.quants`` cannot write, or a row length that is not a multiple of the block size (then ``f16``).
      allow_lossy: write the file even when a changed tensor's re-quantisation error exceeds
        :data:`MAX_REQUANT_RELATIVE` of its update's rms (by default that raises ``ValueError`` naming the
        tensor and the exports that keep the fine-tune: ``f16``, ``q8_0``, the GGUF adapter; nothing is written).

    Returns :class:`MergedGGUF` (path, per-tensor re-quantisation errors, types written).
    """
    adapters, base = stacking.unstack(adapters), stacking.unrolled(base)  # GGUF names layers
    trained = None if trained is None else stacking.unstack(trained)
    import gguf
    from gguf import GGMLQuantizationType

    from lora_jax.models import gguf as gguf_io

    t = check_merged_type(type)
    b = _open_base(base)
    if b.reader is None:
        raise ArgumentError("save_merged_gguf: base must be a GGUF file (its metadata and tokenizer are copied)")
    tmap = tensor_map(b.config)
    changes: dict[tuple[str, ...], Any] = {}
    for p, ad in core.adapter_items(adapters or {}):
        changes[_normalise(tuple(p.split("/")), tmap)] = ad
    trained_leaves = {
        _normalise(tree.path_tuple(k), tmap): v for k, v in jax.tree_util.tree_flatten_with_path(trained or {})[0]
    }
    both = sorted("/".join(p) for p in set(changes) & set(trained_leaves))
    if both:
        raise ArgumentError(f"save_merged_gguf: {both[:3]} have an adapter and a fully trained value; pass one")
    unknown = sorted("/".join(p) for p in set(changes) | set(trained_leaves) if p not in tmap.leaves)
    if unknown:
        raise CheckpointError(f"save_merged_gguf: {unknown[:3]} have no tensor in a {tmap.arch} model ({b.source})")
    fallback_q = _qtype(check_merged_type(fallback)) if fallback != "base" else None
    target = None if t == "base" else _qtype(t)

    writer = gguf.GGUFWriter(os.fspath(path), tmap.arch)
    skip = {"general.architecture"}
    if target is not None:
        skip.add("general.file_type")
        writer.add_file_type(
            {
                "f32": gguf.LlamaFileType.ALL_F32,
                "f16": gguf.LlamaFileType.MOSTLY_F16,
                "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
                "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
                "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
                "q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
            }[t]
        )
    if "general.alignment" in b.reader.metadata:
        writer.data_alignment = int(b.reader.metadata["general.alignment"])
    _copy_metadata(b.reader, writer, skip)

    base_tensors = b.tensors()
    types: dict[str, str] = {}
    seen = set()
    exact_of: dict[tuple[str, ...], tuple[dict, dict]] = {}  # changed path -> ({name: exact}, {name: base})
    stats: dict[tuple[str, ...], list[float]] = {}  # changed path -> [max |err|, sum err^2, sum delta^2, count]

    def exact_tensors(p):
        """The changed leaf's GGUF tensors, exact (float32), and the base's."""
        if p not in exact_of:
            names = [n for group in tmap.leaves[p].gguf_names for n in group]
            w0 = {n: gguf_io.dequantize(base_tensors[n], np.float32) for n in names}
            leaf0 = tmap.from_gguf(p, w0)
            if p in changes:
                new = np.asarray(core.merged_kernel(jnp.asarray(leaf0), changes[p]))
            else:
                new = np.asarray(trained_leaves[p], np.float32)
                if new.shape != leaf0.shape:
                    raise CheckpointError(
                        f"save_merged_gguf: trained {'/'.join(p)} has shape {new.shape}, the base "
                        f"holds {leaf0.shape} ({', '.join(names)})"
                    )
            exact_of[p] = (tmap.to_gguf(p, new), w0)
        return exact_of[p]

    for tensor in b.reader.tensors:
        p = tmap.path_of(tensor.name)
        shape = _gguf_shape(tensor)
        own = GGMLQuantizationType(int(tensor.tensor_type))
        want = own if target is None else (target if len(shape) >= 2 else GGMLQuantizationType.F32)
        if want != own or p in changes or p in trained_leaves:
            if not _quantisable(want) or not _fits(shape, want):
                why = "gguf cannot quantise it" if not _quantisable(want) else f"rows of {shape[-1]} values"
                new = fallback_q if fallback_q is not None and _fits(shape, fallback_q) else GGMLQuantizationType.F16
                logger.warning("%s: %s as %s instead of %s (%s)", path, tensor.name, new.name, want.name, why)
                want = new
        if p is not None:
            seen.add(p)
        if p in changes or p in trained_leaves:
            exact_all, w0_all = exact_tensors(p)
            exact, w0 = exact_all[tensor.name], w0_all[tensor.name]
            data = _encode(exact, want)
            back = np.asarray(gguf.quants.dequantize(data, want), np.float32).reshape(exact.shape)
            err, delta = back - exact, exact - w0
            st = stats.setdefault(p, [0.0, 0.0, 0.0, 0])
            st[0] = max(st[0], float(np.max(np.abs(err))))
            st[1] += float(np.sum(err.astype(np.float64) ** 2))
            st[2] += float(np.sum(delta.astype(np.float64) ** 2))
            st[3] += err.size
        elif want != own:
            data = _encode(gguf_io.dequantize(tensor, np.float32), want)
        else:
            data = tensor.data
        writer.add_tensor(tensor.name, data, raw_shape=data.shape, raw_dtype=want)
        types[tensor.name] = want.name
    errors = {
        "/".join(p): RequantError(max_abs=m, rms=math.sqrt(e / n), delta_rms=math.sqrt(d / n))
        for p, (m, e, d, n) in stats.items()
    }
    missing = sorted("/".join(p) for p in (set(changes) | set(trained_leaves)) - seen)
    if missing:
        raise CheckpointError(f"{b.source}: has no tensors for {missing[:3]}")
    lossy = max(((k, e) for k, e in errors.items() if e.delta_rms > 0), key=lambda kv: kv[1].relative, default=None)
    if lossy is not None and lossy[1].relative > MAX_REQUANT_RELATIVE and not allow_lossy:
        raise ArgumentError(_lossy_message(path, t, lossy, weight_type(b.source) if t == "base" else t))
    path = _write(writer, path)
    if errors:
        worst = max(errors.items(), key=lambda kv: kv[1].relative)
        logger.info(
            "%s: %d tensors merged; worst re-quantisation rms %.3g (%.2f of the update's rms) at %s",
            path,
            len(errors),
            worst[1].rms,
            worst[1].relative,
            worst[0],
        )
    return MergedGGUF(path, errors, types)


__all__ = [
    "ADAPTER_TYPES",
    "MAX_REQUANT_RELATIVE",
    "MERGED_TYPES",
    "Leaf",
    "MergedGGUF",
    "TensorMap",
    "check_merged_type",
    "load_gguf_adapter",
    "save_gguf_adapter",
    "save_merged_gguf",
    "tensor_map",
    "weight_type",
]
