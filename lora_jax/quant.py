"""Quantised frozen bases: NF4 with double quantisation (QLoRA, Dettmers et al. 2023) and int8.

QLoRA trains float adapters over a base whose kernels are stored in 4 bits:

- **NF4**: each block of ``block_size`` (64) consecutive values of the flattened kernel is scaled by its
  absolute maximum into [-1, 1] and rounded to the nearest of 16 "NormalFloat" values (the table of
  bitsandbytes, :data:`NF4`). Two 4-bit codes are packed per ``uint8`` (the first value of a pair in the
  high nibble, as bitsandbytes does). Stored: ``n / 2`` bytes of codes plus one float32 absmax per block.
- **Double quantisation**: the per-block absmax constants themselves are quantised. Their mean is
  subtracted, and the centred constants are quantised to 8 bits in blocks of 256 with bitsandbytes'
  signed dynamic 8-bit code (:func:`dynamic_map`), keeping one float32 scale per 256 constants and the
  float32 mean. A kernel then costs ``4 + 8 / 64 + 32 / (64 * 256)`` = 4.127 bits per weight.
- **int8**: symmetric per-output-channel absmax (one float32 absmax per output feature; codes
  ``round(127 * w / absmax)``).

A quantised kernel is a :class:`QuantizedWeight` pytree node (arrays as children, shape/dtype/format as
static metadata) that stands in the parameter tree where the kernel was. :func:`lora_jax.ops.dot` /
``einsum`` dequantise it block-wise to its compute dtype inside the jitted computation (under
``jax.checkpoint``, so that backpropagation re-dequantises instead of keeping a dense copy of every layer
alive), and :func:`lora_jax.init` / :func:`~lora_jax.wrap` / :func:`~lora_jax.merge` accept it as a base:

    qparams = lora.quantize(params, "nf4")                       # all-linear kernels (and experts) -> NF4
    adapters = lora.init(qparams, r=16, targets="all-linear")    # reads the logical kernel shapes
    y = model.apply({"params": lora.wrap(qparams, adapters)}, x)  # dequantised base + factored LoRA
    merged = lora.merge(qparams, adapters)                       # dense kernels (compute dtype)
    requantized, errors = lora.merge_quantized(qparams, adapters) # back to NF4, with the error it costs
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import core as _core
from lora_jax import stacking as _stacking
from lora_jax import targets as _targets
from lora_jax import tree as _tree
from lora_jax.errors import ArgumentError
from lora_jax.tree import nbytes  # public here too: the bytes a quantised tree stores

PyTree = Any
Array = jax.Array

# The 16 NF4 values of bitsandbytes (``get_4bit_type("nf4")``): quantiles of N(0, 1) normalised to [-1, 1]
# with an exact zero. Hard-coded: recomputing them from normal quantiles does not reproduce every entry.
NF4 = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)

METHODS = ("nf4", "int8")
_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def _linspace_f32(start: float, stop: float, num: int) -> np.ndarray:
    """float32 ``linspace`` rounded as PyTorch computes it (a float32 step, ``start + step * i`` with one
    rounding for the first half, ``stop - step * (num - 1 - i)`` for the second), so that the code below
    equals bitsandbytes' bit for bit."""
    start32, stop32 = np.float32(start), np.float32(stop)
    step = np.float64((stop32 - start32) / np.float32(num - 1))
    i = np.arange(num, dtype=np.float64)
    return np.where(i < num // 2, np.float64(start32) + step * i, np.float64(stop32) - step * (num - 1 - i)).astype(
        np.float32
    )


def dynamic_map() -> np.ndarray:
    """The signed dynamic 8-bit code (Dettmers 2016; bitsandbytes' ``create_dynamic_map``): 256 sorted
    float32 values in [-1, 1]. For exponent ``e = 0..6`` it holds ``2**e`` linearly spaced fractions in
    [0.1, 1] (the midpoints of ``2**e + 1`` boundaries) times ``10**(e - 6)``, with both signs, plus 0 and 1.
    So small magnitudes get fine steps and large ones coarse steps, with 7 decades of range."""
    values = [0.0, 1.0]
    for e in range(7):
        bounds = _linspace_f32(0.1, 1.0, 2**e + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        scaled = np.float32(10.0 ** (e - 6)) * means  # in float32, as bitsandbytes multiplies
        values += [*scaled.tolist(), *(-scaled).tolist()]
    code = np.sort(np.array(values, dtype=np.float32))
    assert code.shape == (256,)
    return code


DYNAMIC = dynamic_map()


# ------------------------------------------------------------------------------------------------ node


@_targets.register_weight_node
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A quantised kernel of logical shape ``shape``.

    Attributes:
      codes: ``nf4``: ``(n_blocks * block_size / 2,)`` uint8, two 4-bit codes per byte (high nibble first) of
        the flattened kernel zero-padded to whole blocks; ``int8``: int8 of the kernel's ``shape``.
      absmax: ``nf4``: ``(n_blocks,)`` float32 per-block absmax, or uint8 codes of ``absmax - absmax_mean``
        with double quantisation; ``int8``: ``(prod(out_shape),)`` float32 per-output-channel absmax
        (``(*stack, prod(out_shape))`` for an expert stack: one per expert and output channel).
      absmax_scale: double quantisation only: ``(ceil(n_blocks / absmax_block_size),)`` float32.
      absmax_mean: double quantisation only: ``()`` float32, the mean of the per-block absmax.
      shape: the logical kernel shape (static).
      dtype: the compute dtype that :meth:`dequantize` returns by default (static).
      method: ``"nf4"`` or ``"int8"`` (static).
      block_size: values per absmax block (``nf4``; 0 for ``int8``) (static).
      absmax_block_size: absmax constants per second-level scale; 0 without double quantisation (static).
      in_ndim: how many axes (after the stack axes) are inputs (``int8`` channels are the remaining axes)
        (static).
      stack_ndim: leading expert axes of an expert stack ``(E, d_in, d_out)`` (static; ``int8`` scales are per
        expert; NF4 blocks never straddle two experts when ``d_in * d_out`` is a multiple of the block size).
    """

    codes: Array
    absmax: Array
    absmax_scale: Array | None = None
    absmax_mean: Array | None = None
    shape: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))
    dtype: Any = dataclasses.field(default=np.dtype(np.float32), metadata=dict(static=True))
    method: str = dataclasses.field(default="nf4", metadata=dict(static=True))
    block_size: int = dataclasses.field(default=64, metadata=dict(static=True))
    absmax_block_size: int = dataclasses.field(default=0, metadata=dict(static=True))
    in_ndim: int = dataclasses.field(default=1, metadata=dict(static=True))
    stack_ndim: int = dataclasses.field(default=0, metadata=dict(static=True))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def double_quant(self) -> bool:
        return self.absmax_block_size > 0

    @property
    def nbytes(self) -> int:
        """Bytes stored (codes and every scale), exactly."""
        return nbytes(self)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.size

    def astype(self, dtype) -> QuantizedWeight:
        """The same stored weight with another compute dtype (lazy: nothing is dequantised here)."""
        return dataclasses.replace(self, dtype=jnp.dtype(dtype))

    def dequantize(self, dtype=None) -> Array:
        """The dense kernel ``(*shape)`` in ``dtype`` (default: the compute dtype)."""
        return dequantize(self, dtype)

    def __repr__(self) -> str:
        fmt = (
            self.method
            if self.method == "int8"
            else f"{self.method}, block {self.block_size}{', double quant' if self.double_quant else ''}"
        )
        return (
            f"QuantizedWeight({fmt}, shape={self.shape}, dtype={jnp.dtype(self.dtype).name}, "
            f"{self.bits_per_weight:.3f} bits/weight)"
        )


# A scanned stack cannot hold a quantised base yet: every stacking operation on one refuses, naming QLoRA.
_stacking.register_node(QuantizedWeight, _stacking.refusing("a QuantizedWeight (a quantised base: QLoRA)"))


def is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedWeight)


# ----------------------------------------------------------------------------------------- primitives


def _nearest(scaled: Array, code: np.ndarray) -> Array:
    """Index of the nearest value of the sorted ``code`` for each element of ``scaled`` (ties go to the lower
    value, as bitsandbytes' ``bucketize`` over midpoints does)."""
    bounds = jnp.asarray((code[:-1] + code[1:]) / np.float32(2.0))
    return jnp.searchsorted(bounds, scaled, side="left").astype(jnp.uint8)


def _blockwise(x: Array, block: int, code: np.ndarray) -> tuple[Array, Array]:
    """Absmax-scale each block of the flat float32 ``x`` (zero-padded to whole blocks) and round to ``code``.

    Returns ``(indices (n_blocks, block) uint8, absmax (n_blocks,) float32)``.
    """
    n_blocks = -(-x.size // block)
    x = jnp.pad(x, (0, n_blocks * block - x.size)).reshape(n_blocks, block)
    absmax = jnp.max(jnp.abs(x), axis=1)
    scaled = jnp.clip(x * (1.0 / jnp.maximum(absmax, 1e-38))[:, None], -1.0, 1.0)
    return _nearest(scaled, code), absmax


def _quantize_nf4(w: Array, block_size: int, absmax_block_size: int) -> dict[str, Array]:
    idx, absmax = _blockwise(w.reshape(-1).astype(jnp.float32), block_size, NF4)
    flat = idx.reshape(-1)
    out = {"codes": (flat[0::2] << 4) | flat[1::2], "absmax": absmax}
    if absmax_block_size:
        mean = jnp.mean(absmax)
        mean = mean + jnp.mean(absmax - mean)  # one refinement step: the correctly rounded mean, in practice
        q2, scale2 = _blockwise(absmax - mean, absmax_block_size, DYNAMIC)
        out.update(absmax=q2.reshape(-1)[: absmax.size], absmax_scale=scale2, absmax_mean=mean)
    return out


def _quantize_int8(w: Array, in_ndim: int, stack_ndim: int = 0) -> dict[str, Array]:
    stack = w.shape[:stack_ndim]
    d_in = math.prod(w.shape[stack_ndim : stack_ndim + in_ndim])
    x = w.astype(jnp.float32).reshape(math.prod(stack), d_in, -1)
    absmax = jnp.max(jnp.abs(x), axis=1, keepdims=True)
    codes = jnp.round(x * (127.0 / jnp.maximum(absmax, 1e-38)))
    return {"codes": jnp.clip(codes, -127, 127).astype(jnp.int8).reshape(w.shape), "absmax": absmax.reshape(*stack, -1)}


def _absmax_f32(q: QuantizedWeight) -> Array:
    """The first-level per-block absmax in float32 (undoing double quantisation)."""
    if not q.double_quant:
        return q.absmax.astype(jnp.float32)
    n = q.absmax.shape[0]
    groups = q.absmax_scale.shape[0]
    vals = jnp.asarray(DYNAMIC)[jnp.pad(q.absmax, (0, groups * q.absmax_block_size - n)).astype(jnp.int32)]
    vals = vals.reshape(groups, q.absmax_block_size) * q.absmax_scale[:, None]
    return vals.reshape(-1)[:n] + q.absmax_mean


def quantize_array(
    w: Array,
    method: str = "nf4",
    *,
    block_size: int = 64,
    double_quant: bool = True,
    absmax_block_size: int = 256,
    compute_dtype: Any = None,
    in_ndim: int = 1,
    stack_ndim: int = 0,
) -> QuantizedWeight:
    """Quantise one kernel.

    Args:
      w: a float array with at least two axes (quantisation is of the flattened array; the shape is kept).
      method: ``"nf4"`` or ``"int8"``.
      block_size: NF4 values per absmax (one of 32, 64, ..., 4096, as in bitsandbytes).
      double_quant: NF4 only: quantise the absmax constants to 8 bits in blocks of ``absmax_block_size``.
      compute_dtype: the dtype :meth:`QuantizedWeight.dequantize` returns (default: ``w.dtype``).
      in_ndim: int8 only: how many leading axes (after the stack axes) are inputs; one scale per element of
        the other axes.
      stack_ndim: leading expert axes of an expert stack (int8: one set of scales per expert).
    """
    if method not in METHODS:
        raise ArgumentError(f"quantize: method must be one of {METHODS}, got {method!r}")
    if not hasattr(w, "shape") or not jnp.issubdtype(w.dtype, jnp.floating):
        raise ArgumentError(
            f"quantize: expected a float array, got {type(w).__name__} of dtype {getattr(w, 'dtype', None)}"
        )
    dtype = jnp.dtype(w.dtype if compute_dtype is None else compute_dtype)
    shape = tuple(int(s) for s in w.shape)
    if method == "int8":
        if not 0 <= stack_ndim <= len(shape) - 2 or not 1 <= in_ndim < len(shape) - stack_ndim:
            raise ArgumentError(
                f"quantize int8: in_ndim must be in [1, {len(shape) - stack_ndim - 1}] and stack_ndim "
                f"in [0, {len(shape) - 2}] for shape {shape}, got {in_ndim} and {stack_ndim}"
            )
        return QuantizedWeight(
            **_jit_int8(w, in_ndim, stack_ndim),
            shape=shape,
            dtype=dtype,
            method="int8",
            block_size=0,
            in_ndim=in_ndim,
            stack_ndim=stack_ndim,
        )
    if block_size not in _BLOCK_SIZES:
        raise ArgumentError(f"quantize nf4: block_size must be one of {_BLOCK_SIZES}, got {block_size}")
    if double_quant and absmax_block_size not in _BLOCK_SIZES:
        raise ArgumentError(f"quantize nf4: absmax_block_size must be one of {_BLOCK_SIZES}, got {absmax_block_size}")
    second = absmax_block_size if double_quant else 0
    return QuantizedWeight(
        **_jit_nf4(w, block_size, second),
        shape=shape,
        dtype=dtype,
        method="nf4",
        block_size=block_size,
        absmax_block_size=second,
        in_ndim=in_ndim,
        stack_ndim=stack_ndim,
    )


_jit_nf4 = jax.jit(_quantize_nf4, static_argnums=(1, 2))
_jit_int8 = jax.jit(_quantize_int8, static_argnums=(1, 2))


def dequantize(tree: QuantizedWeight | PyTree, dtype: Any = None) -> Array | PyTree:
    """Dense kernels from quantised ones.

    ``tree`` is a :class:`QuantizedWeight` (returns its ``(*shape)`` array in ``dtype``, default its compute
    dtype) or any pytree (every ``QuantizedWeight`` in it is replaced by its dense array; other leaves pass
    through). Pure jnp: inside ``jit`` it fuses into the computation that uses the kernel.
    """
    if not is_quantized(tree):
        return jax.tree_util.tree_map(
            lambda x: dequantize(x, dtype) if is_quantized(x) else x, tree, is_leaf=is_quantized
        )
    q = tree
    dtype = jnp.dtype(q.dtype if dtype is None else dtype)
    if q.method == "int8":
        n_stack = math.prod(q.shape[: q.stack_ndim])
        d_in = math.prod(q.shape[q.stack_ndim : q.stack_ndim + q.in_ndim])
        scale = q.absmax.astype(jnp.float32).reshape(n_stack, 1, -1) / 127.0
        w = q.codes.reshape(n_stack, d_in, -1).astype(jnp.float32) * scale
        return w.reshape(q.shape).astype(dtype)
    hi, lo = q.codes >> 4, q.codes & 0xF
    idx = jnp.stack([hi, lo], axis=-1).reshape(-1, q.block_size).astype(jnp.int32)
    w = jnp.asarray(NF4)[idx] * _absmax_f32(q)[:, None]
    return w.reshape(-1)[: q.size].reshape(q.shape).astype(dtype)


# ------------------------------------------------------------------------------------------- trees


def quantize(
    params: PyTree,
    method: str = "nf4",
    *,
    block_size: int = 64,
    double_quant: bool = True,
    absmax_block_size: int = 256,
    targets: str | Sequence[str] | None = "all-linear+experts",
    exclude: str | Sequence[str] | None = None,
    compute_dtype: Any = jnp.bfloat16,
    allow_embeddings: bool = False,
) -> PyTree:
    """Replace the targeted kernels of ``params`` by :class:`QuantizedWeight` nodes.

    Args:
      params: any parameter pytree.
      method: ``"nf4"`` (4-bit NormalFloat, block-wise absmax) or ``"int8"`` (per-output-channel absmax).
      block_size, double_quant, absmax_block_size: NF4 layout (QLoRA defaults: 64, True, 256).
      targets, exclude, allow_embeddings: which leaves, as in :func:`lora_jax.init`; the default
        ``"all-linear+experts"`` takes every dense kernel and the routed experts of a mixture of experts (most of
        its weights), and leaves embeddings, norms, biases, routers and heads in high precision (name them with a
        regex to quantise them too).
      compute_dtype: the dtype the kernels are dequantised to in the forward pass (``None``: their own).

    Returns:
      ``params`` with the targeted leaves quantised (everything else is the same object).
    """
    one = quantizer(
        params,
        method,
        block_size=block_size,
        double_quant=double_quant,
        absmax_block_size=absmax_block_size,
        targets=targets,
        exclude=exclude,
        compute_dtype=compute_dtype,
        allow_embeddings=allow_embeddings,
    )
    abstract = [
        (p, type(leaf).__name__)
        for p, leaf in _targets.leaf_paths(params)
        if one.targets(p) and not isinstance(leaf, (jax.Array, np.ndarray))
    ]
    if abstract:
        raise ArgumentError(
            f"quantize: {abstract[0][0]} is a {abstract[0][1]}, not an array with values; quantise concrete parameters"
        )
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: one(_targets.path_str(path), leaf), params, is_leaf=_targets.is_weight_node
    )


@dataclasses.dataclass(frozen=True)
class Quantizer:
    """What :func:`quantize` does to one leaf: ``quantizer(path, leaf)`` is the quantised leaf for a targeted
    '/'-joined ``path`` and ``leaf`` itself otherwise. Made by :func:`quantizer`, so that a loader can quantise each
    kernel as it is read (and drop its dense values) instead of holding the whole dense tree first."""

    chosen: frozenset
    kwargs: dict

    def targets(self, path: str) -> bool:
        return path in self.chosen

    def __call__(self, path: str, leaf: Any) -> Any:
        if path not in self.chosen:
            return leaf
        if _stacking.layer_axes(path):
            raise _stacking.unsupported(f"quantising {path} (QLoRA)")
        n_stack = _targets.default_expert_axes(path, leaf.ndim)
        return quantize_array(
            leaf, **self.kwargs, in_ndim=_targets.default_in_axes(path, leaf.ndim - n_stack), stack_ndim=n_stack
        )


def quantizer(
    params: PyTree,
    method: str = "nf4",
    *,
    block_size: int = 64,
    double_quant: bool = True,
    absmax_block_size: int = 256,
    targets: str | Sequence[str] | None = "all-linear+experts",
    exclude: str | Sequence[str] | None = None,
    compute_dtype: Any = jnp.bfloat16,
    allow_embeddings: bool = False,
) -> Quantizer:
    """The per-leaf :class:`Quantizer` of :func:`quantize` (same arguments) for the leaves ``params`` targets;
    ``params`` may be abstract (``jax.ShapeDtypeStruct`` leaves): only its paths and shapes are read. Raises
    as :func:`quantize` does for targets that match nothing or kernels already quantised."""
    selected = _targets.select(params, targets, exclude=exclude, allow_embeddings=allow_embeddings)
    already = [p for p, leaf in selected if is_quantized(leaf)]
    if already:
        raise ArgumentError(
            f"quantize: {len(already)} targeted kernel(s) are already quantised, e.g. {already[0]}; "
            "dequantize them first or exclude them"
        )
    if method not in METHODS:
        raise ArgumentError(f"quantize: method must be one of {METHODS}, got {method!r}")
    return Quantizer(
        frozenset(p for p, _ in selected),
        dict(
            method=method,
            block_size=block_size,
            double_quant=double_quant,
            absmax_block_size=absmax_block_size,
            compute_dtype=compute_dtype,
        ),
    )


def expected_nbytes(
    shape: Sequence[int], block_size: int = 64, double_quant: bool = True, absmax_block_size: int = 256
) -> int:
    """The bytes an NF4 :class:`QuantizedWeight` of ``shape`` stores: ``n_blocks * block_size / 2`` of codes,
    plus ``4 * n_blocks`` of absmax, or ``n_blocks + 4 * ceil(n_blocks / absmax_block_size) + 4`` with double
    quantisation."""
    n_blocks = -(-math.prod(shape) // block_size)
    codes = n_blocks * block_size // 2
    if not double_quant:
        return codes + 4 * n_blocks
    return codes + n_blocks + 4 * -(-n_blocks // absmax_block_size) + 4


# ------------------------------------------------------------------------------------- merge + requantise


@dataclasses.dataclass(frozen=True)
class RequantError:
    """What re-quantising a merged kernel cost, against the exact merge ``W = dequant(Q) + dW``.

    ``max_abs`` / ``rms``: of ``requant(W) - W``; ``delta_rms``: of the merged update itself (the adapter's
    change to the dequantised base). ``relative = rms / delta_rms`` above ~1 means the re-quantised kernel
    has lost most of what the adapter learned: keep the adapters separate (or merge into a dense copy).
    """

    max_abs: float
    rms: float
    delta_rms: float

    @property
    def relative(self) -> float:
        return self.rms / self.delta_rms if self.delta_rms > 0 else math.inf if self.rms > 0 else 0.0


def merge_quantized(
    params: PyTree, adapters: PyTree, *, requantize: bool = True
) -> tuple[PyTree, dict[str, RequantError]]:
    """Merge adapters into a base whose kernels may be quantised.

    Every adapted kernel becomes ``dequant(W0) + dW`` (DoRA: its re-normalised form), computed in float32.
    With ``requantize=True`` the kernels that were :class:`QuantizedWeight` are quantised again in the same
    format (method, block sizes, compute dtype), and the error this costs is measured per kernel.
    With ``requantize=False`` this is :func:`lora_jax.merge` (dense kernels in each base's dtype) and the
    error dict is empty.

    Returns:
      ``(merged_params, {path: RequantError})``. Not jit-able with ``requantize=True`` (the error report
      holds Python floats).
    """
    merged = _core.merge(params, adapters)
    if not requantize:
        return merged, {}
    errors: dict[str, RequantError] = {}
    adapted = {p for p, _ in _core.adapter_items(adapters)}

    def requant(path, q, new):
        p = _targets.path_str(path)
        if p not in adapted or not is_quantized(q):
            return new
        exact = _core.merged_kernel(q, _tree.get(adapters, p))
        out = quantize_array(
            exact,
            q.method,
            block_size=q.block_size or 64,
            double_quant=q.double_quant,
            absmax_block_size=q.absmax_block_size or 256,
            compute_dtype=q.dtype,
            in_ndim=q.in_ndim,
            stack_ndim=q.stack_ndim,
        )
        err = dequantize(out, jnp.float32) - exact
        delta = exact - dequantize(q, jnp.float32)
        errors[p] = RequantError(
            max_abs=float(jnp.max(jnp.abs(err))),
            rms=float(jnp.sqrt(jnp.mean(err * err))),
            delta_rms=float(jnp.sqrt(jnp.mean(delta * delta))),
        )
        return out

    record = _core.merge_record(merged)
    bare = dict(merged) if record is not None else merged  # the structure of params (a plain dict)
    out = jax.tree_util.tree_map_with_path(requant, params, bare, is_leaf=_targets.is_weight_node)
    if record is not None:  # keep merge's record of which kernels now hold the adapters
        out = _core.MergedParams(out, record)
    return out, errors


__all__ = [
    "DYNAMIC",
    "METHODS",
    "NF4",
    "QuantizedWeight",
    "RequantError",
    "dequantize",
    "dynamic_map",
    "expected_nbytes",
    "is_quantized",
    "merge_quantized",
    "nbytes",
    "quantize",
    "quantize_array",
]
