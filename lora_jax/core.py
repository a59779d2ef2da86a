"""The adapter tree: LoRA as a transform of parameter pytrees.

A LoRA adapter for a kernel ``W0`` of shape ``(*in_shape, *out_shape)`` is a pair

    A: (prod(in_shape), r)      B: (r, prod(out_shape))

and the adapted kernel is ``W0 + scale * reshape(A @ B)`` with ``scale = alpha / r`` (or ``alpha / sqrt(r)``
with rsLoRA). ``B`` starts at zero, so an adapted model equals its base model exactly at step 0. A stack of
expert kernels ``(E, d_in, d_out)`` (a mixture of experts) gets one such pair per expert, stacked:
``A (E, d_in, r)``, ``B (E, r, d_out)`` (see :func:`init`'s ``expert_axes``).

Everything here is a pure function over pytrees:

- :func:`init` builds the adapter tree for the targeted leaves of any parameter pytree (a Flax Linen
  ``params`` dict, the state of ``nnx.split``, plain nested dicts);
- :func:`merge` folds the adapters into the base (zero added inference latency), :func:`unmerge` undoes it;
- :func:`wrap` puts :class:`LoraWeight` nodes in the tree so that :mod:`lora_jax.ops` computes the factored
  forward ``x @ W0 + ((x @ A) @ B) * scale`` without ever forming ``W0 + A @ B``;
- :func:`split` / :func:`combine` separate the frozen base from what is trained.

The adapter tree is a nested ``dict`` that mirrors the parameter tree but holds only the targeted branches;
its leaves are :class:`LoraAdapter` nodes whose arrays are pytree children and whose rank, alpha, scale
and axis layout are static metadata, so ``jax.jit`` takes it and Orbax checkpoints it.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import stacking as _stacking
from lora_jax import targets as _targets
from lora_jax import tree as _tree
from lora_jax.errors import ArgumentError, ArgumentTypeError, MergeStateError, UnsupportedError

PyTree = Any
Array = jax.Array


# --------------------------------------------------------------------------------------------- nodes


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraAdapter:
    """The trainable low-rank factors of one kernel.

    Attributes:
      a: ``(prod(in_shape), r)``, random at init. A stacked adapter (one per expert of an expert stack, or
        per layer of a scanned stack) has leading stack axes: ``(*stack, prod(in_shape[len(stack):]), r)``.
      b: ``(r, prod(out_shape))``, zero at init; stacked: ``(*stack, r, prod(out_shape))``.
      alpha: the LoRA alpha (static).
      scale: the factor applied to ``A @ B``: ``alpha / r`` or ``alpha / sqrt(r)`` with rsLoRA (static).
      in_shape: the kernel's input axes, contracted with the activations (static).
      out_shape: the kernel's output axes (static).
      dropout: dropout rate applied to the input of ``A`` during training (static).
      magnitude: DoRA only (``None`` for plain LoRA): ``(prod(out_shape),)`` trainable magnitude ``m`` of
        the adapted kernel ``W' = m * (W0 + scale*A@B) / ||W0 + scale*A@B||``, the norm taken over the input
        axes for each output feature (Liu et al. 2024).
    """

    a: Array
    b: Array
    alpha: float = dataclasses.field(default=8.0, metadata=dict(static=True))
    scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))
    in_shape: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))
    out_shape: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))
    dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))
    magnitude: Array | None = None

    @property
    def r(self) -> int:
        return self.a.shape[-1]

    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None

    @property
    def stack_shape(self) -> tuple[int, ...]:
        """The leading stack axes of a stacked adapter (``(E,)`` for an expert stack), ``()`` otherwise; they
        lead ``in_shape`` too."""
        return tuple(self.a.shape[:-2])

    def __repr__(self) -> str:
        return (
            f"LoraAdapter(r={self.r}, alpha={self.alpha:g}, scale={self.scale:g}, kernel={self.kernel_shape}, "
            f"a={describe(self.a)}, b={describe(self.b)}"
            f"{f', dropout={self.dropout:g}' if self.dropout else ''}"
            f"{f', dora magnitude={describe(self.magnitude)}' if self.is_dora else ''})"
        )

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return (*self.in_shape, *self.out_shape)

    def delta(self, dtype=jnp.float32) -> Array:
        """``scale * A @ B`` reshaped to the kernel's shape, computed in ``dtype`` (float32 by default).
        (For DoRA this is the directional update only: see :func:`merged_kernel` for the adapted kernel.)"""
        a = self.a.astype(dtype)
        b = self.b.astype(dtype)
        dw = (a @ b) * jnp.asarray(self.scale, dtype)
        return dw.reshape(self.kernel_shape)


class WrappedKernel:
    """What a kernel wrapped for the factored ops (:class:`LoraWeight`, :class:`lora_jax.MultiLoraWeight`) shows
    model code: the ``base`` kernel's ``shape``, ``dtype`` and ``ndim``, and a clear error where a model uses it
    as an array instead of calling ``lora_jax.ops``."""

    # Enough of the array interface for model code that inspects its weights.
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    @property
    def dtype(self):
        return self.base.dtype

    @property
    def ndim(self) -> int:
        return self.base.ndim

    # A model that was not written with lora_jax.ops treats its kernels as arrays: say what to do instead of
    # failing deep inside the model ("'LoraWeight' object is not subscriptable", "float() argument ...").
    def __getitem__(self, index):
        raise not_an_array(self, f"indexes it ([{index!r}])")

    def __jax_array__(self):
        raise not_an_array(self, "converts it to an array")

    def __array__(self, *args, **kwargs):
        raise not_an_array(self, "converts it to a NumPy array")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraWeight(WrappedKernel):
    """A frozen kernel with its adapter, as seen by a model during a factored forward pass.

    ``lora_jax.ops.dot`` / ``einsum`` on a ``LoraWeight`` compute
    ``x @ base + ((dropout(x) @ A) @ B) * scale`` and never form ``base + A @ B``.
    ``key`` is the dropout key (``None``: no dropout, e.g. at evaluation).
    ``base`` may also be a weight node such as :class:`lora_jax.quant.QuantizedWeight` (QLoRA).
    """

    base: Array
    adapter: LoraAdapter
    key: Array | None = None

    def __repr__(self) -> str:
        return f"LoraWeight(base={describe(self.base)}, adapter={self.adapter!r}, key={self.key is not None})"

    def materialize(self) -> Array:
        """``base + scale * A @ B`` (dW in float32, cast to the base dtype), for code that needs the dense
        kernel. The factored ops never call this."""
        return merged_kernel(self.base, self.adapter).astype(self.base.dtype)


def not_an_array(w: Any, how: str) -> Exception:
    """The error for model code that uses a wrapped kernel (``LoraWeight``, ``MultiLoraWeight``) as an array."""
    return UnsupportedError(
        f"a model {how}, but it is a {type(w).__name__} (a frozen kernel {tuple(w.shape)} with its adapter), not an "
        "array. Models that do not call lora_jax.ops.dot / einsum need lora.transform around the function: "
        "lora.transform(lambda p, x: model.apply({'params': p}, x))(lora.wrap(params, adapters), x), or for NNX "
        "lora.transform(lambda s, x: nnx.merge(graphdef, s)(x))(lora.wrap(state, adapters), x); or merge first "
        "(lora.merge(params, adapters))"
    )


def describe(x: Any) -> str:
    """An array as ``dtype[shape]`` (``float32[4, 8]``), anything else as its repr: for reprs and messages."""
    return f"{x.dtype}{list(x.shape)}" if hasattr(x, "shape") and hasattr(x, "dtype") else repr(x)


def is_adapter(x: Any) -> bool:
    return isinstance(x, LoraAdapter)


def is_lora_weight(x: Any) -> bool:
    return isinstance(x, LoraWeight)


def _is_node(x: Any) -> bool:
    return is_adapter(x) or is_lora_weight(x) or _targets.is_weight_node(x)


def as_dense(w: Any, dtype=jnp.float32) -> Array:
    """A kernel as a dense array in ``dtype``: a plain array is cast, a weight node (e.g. a
    :class:`lora_jax.quant.QuantizedWeight`) is dequantised."""
    return w.dequantize(dtype) if _targets.is_weight_node(w) else jnp.asarray(w).astype(dtype)


def dora_norm(base: Any, adapter: LoraAdapter) -> Array:
    """DoRA's ``||W0 + scale * A @ B||`` over the kernel's input axes: ``(prod(out_shape),)`` float32.

    Callers in the forward pass wrap it in ``stop_gradient``, as the DoRA paper (sec. 4.3) and PEFT do.
    """
    d_in = math.prod(adapter.in_shape)
    v = as_dense(base, jnp.float32).reshape(d_in, -1) + adapter.delta(jnp.float32).reshape(d_in, -1)
    return jnp.sqrt(jnp.sum(v * v, axis=0))


def merged_kernel(base: Any, adapter: LoraAdapter) -> Array:
    """The adapted kernel in float32: ``W0 + scale * A @ B``, or for DoRA
    ``m * (W0 + scale * A @ B) / ||W0 + scale * A @ B||`` (column norms over the input axes)."""
    v = as_dense(base, jnp.float32) + adapter.delta(jnp.float32)
    if not adapter.is_dora:
        return v
    d_in = math.prod(adapter.in_shape)
    flat = v.reshape(d_in, -1)
    norm = jnp.sqrt(jnp.sum(flat * flat, axis=0))
    return (flat * (adapter.magnitude.astype(jnp.float32) / norm)).reshape(v.shape)


# ------------------------------------------------------------------------------------- tree plumbing


def _leaves_by_path(tree: PyTree) -> list[tuple[tuple[str, ...], Any]]:
    return _tree.leaves(tree, is_leaf=_is_node)


_nested_get = _tree.get
_nested_set = _tree.put


def adapter_items(adapters: PyTree) -> list[tuple[str, LoraAdapter]]:
    """``[("a/b/kernel", LoraAdapter), ...]`` in tree order."""
    return [("/".join(p), leaf) for p, leaf in _leaves_by_path(adapters) if is_adapter(leaf)]


def map_targets(params: PyTree, adapters: PyTree, fn: Callable[[str, Array, LoraAdapter], Any], what: str) -> PyTree:
    """Replace every leaf of ``params`` that has an adapter by ``fn(path, leaf, adapter)``.

    Raises if an adapter names a path that ``params`` lacks or whose shape differs: an adapter for another
    base is a bug, never something to ignore.
    """
    adapters = _stacking.conform(adapters, params)  # trained scanned, applied unrolled (or back)
    adapter_paths = {tuple(p.split("/")): ad for p, ad in adapter_items(adapters)}
    used = set()

    def visit(path, leaf):
        key = _targets.path_tuple(path)
        ad = adapter_paths.get(key)
        if ad is None:
            return leaf
        if is_lora_weight(leaf) or is_adapter(leaf):
            raise MergeStateError(
                f"{what}: {'/'.join(key)} already holds a {type(leaf).__name__}; wrap/merge a tree once"
            )
        if tuple(leaf.shape) != ad.kernel_shape:
            raise ArgumentError(
                f"{what}: adapter for {'/'.join(key)} expects a kernel of shape {ad.kernel_shape}, "
                f"the params have {tuple(leaf.shape)}; this adapter belongs to another base model"
            )
        used.add(key)
        return fn("/".join(key), leaf, ad)

    out = jax.tree_util.tree_map_with_path(visit, params, is_leaf=_is_node)
    missing = sorted("/".join(k) for k in adapter_paths.keys() - used)
    if missing:
        raise ArgumentError(
            f"{what}: {len(missing)} adapter(s) have no matching leaf in params: {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}; this adapter belongs to another base model"
        )
    return out


# ------------------------------------------------------------------------------------------------ init


INIT_METHODS = ("lora", "gaussian")


def _column_norms(leaf: Any, path: str, n_in: int) -> Array:
    """``||W0[..., j]||`` over the first ``n_in`` axes, flattened over the output axes (DoRA's initial m)."""
    if not (_targets.is_weight_node(leaf) or isinstance(leaf, (jax.Array, np.ndarray))):
        raise ArgumentError(
            f"init(use_dora=True): {path} is a {type(leaf).__name__} without values; DoRA starts its "
            "magnitude at the kernel's column norms, so it needs the real parameters"
        )
    w = as_dense(leaf, jnp.float32)
    w = w.reshape(math.prod(w.shape[:n_in]), -1)
    return jnp.sqrt(jnp.sum(w * w, axis=0))


def init(
    params: PyTree,
    r: int = 8,
    *,
    alpha: float | None = None,
    targets: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    key: Array | None = None,
    init: str = "lora",
    dropout: float = 0.0,
    use_rslora: bool = False,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    in_axes: Mapping[str, int] | None = None,
    dtype: Any = None,
    allow_embeddings: bool = False,
    use_dora: bool = False,
    expert_axes: Mapping[str, int] | None = None,
    layer_axes: Mapping[str, int] | None = None,
) -> PyTree:
    """Create LoRA adapters for the targeted kernels of ``params``.

    Args:
      params: any pytree of arrays (Flax Linen params, ``nnx.split`` state, nested dicts).
      r: the rank of every adapter (overridden per leaf by ``rank_pattern``).
      alpha: LoRA alpha; defaults to ``r`` (scale 1). The adapter computes ``(alpha / r) * A @ B``.
      targets: which leaves to adapt: a preset name (``"attention"`` (default), ``"qv"``, ``"all-linear"``) or
        regexes that must fully match a '/'-joined leaf path, e.g. ``".*attention/(query|value)/kernel"``.
        A rule that matches nothing raises, listing the candidate paths.
      exclude: regexes of paths never to adapt.
      key: PRNG key for ``A``; ``None`` means ``jax.random.key(0)`` (deterministic).
      init: ``"lora"`` (A Kaiming-uniform as in the reference implementation: U(-1/sqrt(d_in), 1/sqrt(d_in))),
        or ``"gaussian"`` (A ~ N(0, 1/r^2)). B is zero either way.
      dropout: dropout rate on the adapter input during training (applied when :func:`wrap` gets a key).
      use_rslora: scale by ``alpha / sqrt(r)`` (Kalajdzievski 2023) instead of ``alpha / r``.
      rank_pattern, alpha_pattern: ``{regex: value}`` overrides per leaf path (first full match wins).
      in_axes: ``{regex: n}``: how many leading kernel axes are inputs, for kernels with more than two
        axes. By default 1, or ``ndim - 1`` for output projections (paths ending in out/o_proj/c_proj/...).
        For an expert stack, the axes after the expert axes.
      expert_axes: ``{regex: n}``: how many leading kernel axes index experts. Such a kernel
        ``(E, *in_shape, *out_shape)`` gets one adapter per expert, stacked: ``a (E, d_in, r)``,
        ``b (E, r, d_out)``, ``in_shape = (E, *in_shape)`` (so ``merge`` / ``unmerge`` / ``wrap`` work on it
        unchanged and :func:`lora_jax.ops.ragged_dot` applies it factored). Default: 1 for a 3-D kernel of
        routed experts (under a module named ``experts``, see :mod:`lora_jax.targets`), else 0.
      layer_axes: ``{regex: n}``: how many leading kernel axes index the layers of a scanned stack (before any
        expert axes); each layer gets its own adapter, stacked the same way. Default: 1 for a kernel under a module
        named ``layers`` (:mod:`lora_jax.stacking`'s convention), else 0.
      dtype: dtype of ``A`` and ``B``; default float32 (adapters train in full precision over a low-precision
        base).
      allow_embeddings: embedding tables are never adapted unless this is set and a rule names them.
      use_dora: DoRA (Liu et al. 2024): each adapter also gets a trainable magnitude vector, initialised to
        the column norms of ``W0`` (so the adapted model equals the base at step 0). Needs concrete params.
        For PiSSA's SVD initialisation, which also changes the base, use :func:`lora_jax.init_pissa`.

    Returns:
      A nested dict mirroring ``params`` with a :class:`LoraAdapter` for each targeted leaf.
    """
    if not isinstance(r, (int, np.integer)) or r < 1:
        raise ArgumentError(f"r must be a positive int, got {r!r}")
    if init not in INIT_METHODS:
        hint = " (PiSSA also changes the base: use lora.init_pissa(params, r, ...))" if "pissa" in str(init) else ""
        raise ArgumentError(f"init must be one of {INIT_METHODS}, got {init!r}{hint}")
    if not 0.0 <= dropout < 1.0:
        raise ArgumentError(f"dropout must be in [0, 1), got {dropout!r}")
    key = jax.random.key(0) if key is None else key
    dtype = jnp.float32 if dtype is None else jnp.dtype(dtype)

    selected = _targets.select(params, targets, exclude=exclude, allow_embeddings=allow_embeddings)
    rank_of = _targets.PatternMap(rank_pattern, "rank_pattern", [p for p, _ in selected])
    alpha_of = _targets.PatternMap(alpha_pattern, "alpha_pattern", [p for p, _ in selected])
    in_axes_of = _targets.PatternMap(in_axes, "in_axes", [p for p, _ in selected])
    expert_axes_of = _targets.PatternMap(expert_axes, "expert_axes", [p for p, _ in selected])
    layer_axes_of = _targets.PatternMap(layer_axes, "layer_axes", [p for p, _ in selected])

    adapters: dict = {}
    keys = jax.random.split(key, max(len(selected), 1))
    for (path, leaf), k in zip(selected, keys):
        n_layers = int(layer_axes_of.get(path, _stacking.layer_axes(path)))  # a scanned stack: one per layer
        n_stack = n_layers + int(expert_axes_of.get(path, _targets.default_expert_axes(path, leaf.ndim - n_layers)))
        if not 0 <= n_stack <= leaf.ndim - 2:
            raise ArgumentError(
                f"expert_axes for {path} must be in [0, {leaf.ndim - 2}] for a kernel of shape "
                f"{tuple(leaf.shape)} (each expert's kernel needs an input and an output axis), "
                f"got {n_stack}"
            )
        stack, per_expert = tuple(leaf.shape[:n_stack]), tuple(leaf.shape[n_stack:])
        n_in = in_axes_of.get(path, _targets.default_in_axes(path, len(per_expert)))
        if not 1 <= n_in < len(per_expert):
            raise ArgumentError(
                f"in_axes for {path} must be in [1, {len(per_expert) - 1}] for a kernel of shape "
                f"{tuple(leaf.shape)}{f' ({n_stack} expert axes)' if n_stack else ''}, got {n_in}"
            )
        in_shape, out_shape = per_expert[:n_in], per_expert[n_in:]
        d_in, d_out = math.prod(in_shape), math.prod(out_shape)
        leaf_r = int(rank_of.get(path, r))
        leaf_alpha = float(alpha_of.get(path, alpha if alpha is not None else leaf_r))
        if leaf_r < 1:
            raise ArgumentError(f"rank for {path} must be positive, got {leaf_r}")
        if leaf_r > min(d_in, d_out):
            raise ArgumentError(
                f"rank {leaf_r} for {path} exceeds min(d_in, d_out) = {min(d_in, d_out)} of its {d_in}x{d_out} kernel"
            )
        if init == "lora":
            bound = 1.0 / math.sqrt(d_in)
            a = jax.random.uniform(k, (*stack, d_in, leaf_r), dtype, -bound, bound)
        else:
            a = jax.random.normal(k, (*stack, d_in, leaf_r), dtype) / leaf_r
        b = jnp.zeros((*stack, leaf_r, d_out), dtype)
        scale = leaf_alpha / (math.sqrt(leaf_r) if use_rslora else leaf_r)
        magnitude = None
        if use_dora:
            if _targets.is_embedding(path):
                raise UnsupportedError(
                    f"init(use_dora=True): {path} is an embedding table; DoRA is implemented for dense kernels only"
                )
            if n_layers:
                raise _stacking.unsupported(f"DoRA (init(use_dora=True) on {path})")
            if n_stack:
                raise UnsupportedError(
                    f"init(use_dora=True): {path} is a stack of {math.prod(stack)} expert kernels {tuple(leaf.shape)}; "
                    "DoRA is implemented for dense kernels only (PEFT refuses it on target_parameters too). Use plain "
                    "LoRA on the experts, or exclude them from the DoRA targets"
                )
            magnitude = _column_norms(leaf, path, n_in).astype(dtype)
        _nested_set(
            adapters,
            tuple(path.split("/")),
            LoraAdapter(
                a,
                b,
                alpha=leaf_alpha,
                scale=scale,
                in_shape=(*stack, *in_shape),
                out_shape=out_shape,
                dropout=float(dropout),
                magnitude=magnitude,
            ),
        )
    return adapters


# ------------------------------------------------------------------------------------- merge / unmerge

# Two records of what was merged:
# - MergedParams: the dict that merge returns carries, as static pytree metadata, the kernel paths each merge
#   changed. A copy (jax.tree.map, device_put, copy.deepcopy, pickle) and a jit call (in and out) keep it, so a
#   second merge into those kernels, or an unmerge of params that never held the adapters, is caught. Only paths
#   are recorded (no digest of the values): the record is part of the tree structure, and values in it would make
#   jit compile again for every adapter. dict(...), files and containers other than a dict (nnx.State,
#   FrozenDict) do not carry it: unmerge then asks the caller to say so (assume_merged=True).
# - _MERGED: each merged leaf made outside jit is remembered weakly with the adapter folded into it, which also
#   catches merging twice into the same object for any container type. A DoRA merge also remembers the column
#   norms ||W0 + s*A@B|| it divided by: the merged kernel alone does not determine them, and unmerge needs them
#   (PEFT caches them on the layer for the same reason). (jax arrays are unhashable, hence a dict keyed by id()
#   that weak references keep honest.)
_MERGED: dict[int, tuple[weakref.ref, weakref.ref, Array | None]] = {}


class MergedParams(dict):
    """The parameter dict :func:`merge` returns: an ordinary ``dict`` for every consumer (Flax ``apply``,
    ``save_pretrained``, Orbax), which also records in ``merges`` the kernel paths of each merge it went through
    (a tuple of frozensets, oldest first).

    It is a pytree node whose record is static metadata: ``jax.tree.map`` copies, ``jax.device_put`` and ``jit``
    (arguments and results) keep it. Its tree structure is therefore not a plain dict's: to combine it with plain
    params in one ``jax.tree.map`` (or compare them with ``chex``), use ``dict(merged)``, which drops the record.
    """

    __slots__ = ("merges",)

    def __init__(self, items=(), merges: tuple[frozenset, ...] = ()):
        super().__init__(items)
        self.merges = tuple(merges)

    def __repr__(self) -> str:
        return f"MergedParams({dict.__repr__(self)}, merges={len(self.merges)})"

    def __reduce__(self):
        return (MergedParams, (dict(self), self.merges))


def _flatten_merged(tree: MergedParams):
    keys = sorted(tree.keys())
    return [(jax.tree_util.DictKey(k), tree[k]) for k in keys], (tuple(keys), tree.merges)


def _unflatten_merged(aux, children) -> MergedParams:
    keys, merges = aux
    return MergedParams(zip(keys, children), merges)


jax.tree_util.register_pytree_with_keys(
    MergedParams,
    _flatten_merged,
    _unflatten_merged,
    lambda t: ([t[k] for k in sorted(t.keys())], (tuple(sorted(t.keys())), t.merges)),
)


def _frozen_dict_type():
    """Flax's ``FrozenDict`` if Flax is imported (core does not import Flax itself)."""
    mod = sys.modules.get("flax.core.frozen_dict")
    return getattr(mod, "FrozenDict", None)


_MERGED_FROZEN: dict[type, type] = {}


def _merged_frozen_cls():
    """``MergedFrozenDict``: a Flax ``FrozenDict`` that records its merges as :class:`MergedParams` does (a pytree
    node whose record is static metadata, so ``jit`` and ``jax.tree.map`` keep it). Built on first use."""
    base = _frozen_dict_type()
    if base in _MERGED_FROZEN:
        return _MERGED_FROZEN[base]

    class MergedFrozenDict(base):
        __slots__ = ("merges",)

        def __init__(self, *args, merges: tuple[frozenset, ...] = (), **kwargs):
            super().__init__(*args, **kwargs)
            self.merges = tuple(merges)

        def __reduce__(self):
            return (_rebuild_frozen, (dict(self._dict), self.merges))

    def flatten(t):
        keys = sorted(t.keys())
        return [(jax.tree_util.DictKey(k), t[k]) for k in keys], (tuple(keys), t.merges)

    def unflatten(aux, children):
        keys, merges = aux
        return MergedFrozenDict(dict(zip(keys, children)), __unsafe_skip_copy__=True, merges=merges)

    jax.tree_util.register_pytree_with_keys(
        MergedFrozenDict,
        flatten,
        unflatten,
        lambda t: ([t[k] for k in sorted(t.keys())], (tuple(sorted(t.keys())), t.merges)),
    )
    _MERGED_FROZEN[base] = MergedFrozenDict
    return MergedFrozenDict


def _rebuild_frozen(items: dict, merges):
    return _merged_frozen_cls()(items, merges=merges)


def _is_variable(x: Any) -> bool:
    """A Flax NNX ``Variable`` (``nnx.Param``, ...): its metadata is static pytree data that ``jit`` keeps."""
    return (
        type(x).__module__.startswith("flax.")
        and hasattr(x, "get_metadata")
        and hasattr(x, "replace")
        and hasattr(x, "has_metadata")
    )


_META = "lora_merges"  # the NNX Variable metadata key: the merges folded into this kernel, oldest first


def _variables(tree: PyTree) -> list[tuple[str, Any]]:
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_variable)[0]
    return [(_targets.path_str(p), v) for p, v in flat if _is_variable(v)]


def merge_record(params: PyTree) -> tuple[frozenset, ...] | None:
    """The kernel paths of each :func:`merge` that ``params`` went through, oldest first (empty: none), or
    ``None`` when ``params`` carries no record, so that it cannot be told.

    The record travels with the tree through copies, ``jax.tree.map`` and ``jit``: a dict from :func:`merge` is a
    :class:`MergedParams`, a Flax ``FrozenDict`` a ``MergedFrozenDict`` (both keep it as static pytree metadata),
    and an ``nnx.State`` keeps it on each merged kernel's ``Variable`` (metadata ``lora_merges``), so an
    ``nnx.State`` always knows (an unmarked one: no merge).
    """
    if isinstance(params, MergedParams) or (type(params).__name__ == "MergedFrozenDict" and hasattr(params, "merges")):
        return params.merges
    variables = _variables(params)
    if not variables:
        return None
    merges: list[frozenset] = []
    for _, v in variables:
        for rec in v.get_metadata().get(_META, ()) if v.has_metadata(_META) else ():
            if frozenset(rec) not in merges:
                merges.append(frozenset(rec))
    return tuple(merges)


def _with_record(tree: PyTree, paths: frozenset, merges: tuple[frozenset, ...], add: bool) -> PyTree:
    """``tree`` (the result of a merge or an unmerge) carrying ``merges``: the container's record for a dict or a
    ``FrozenDict``, the Variables' metadata for an ``nnx.State`` (``add``: mark ``paths`` with this merge;
    otherwise remove it from them)."""
    if type(tree) in (dict, MergedParams):
        return MergedParams(tree, merges) if merges else dict(tree)
    frozen = _frozen_dict_type()
    if frozen is not None and isinstance(tree, frozen):
        items = dict(tree._dict)
        return (
            _merged_frozen_cls()(items, __unsafe_skip_copy__=True, merges=merges)
            if merges
            else frozen(items, __unsafe_skip_copy__=True)
        )
    sig = tuple(sorted(paths))

    def mark(path, v):
        if not _is_variable(v) or _targets.path_str(path) not in paths:
            return v
        recs = tuple(v.get_metadata().get(_META, ())) if v.has_metadata(_META) else ()
        recs = (*recs, sig) if add else tuple(r for r in recs if tuple(r) != sig)
        return v.replace(**{_META: recs})

    return jax.tree_util.tree_map_with_path(mark, tree, is_leaf=_is_variable)


def _concrete(x: Any) -> bool:
    return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)


def _mark_merged(w: Array, ad: LoraAdapter, norm: Array | None = None) -> None:
    if _concrete(w) and _concrete(ad.b):
        key = id(w)
        _MERGED[key] = (weakref.ref(w, lambda _, key=key: _MERGED.pop(key, None)), weakref.ref(ad.b), norm)


def _merged_with(w: Array, ad: LoraAdapter) -> bool:
    entry = _MERGED.get(id(w))
    return entry is not None and entry[0]() is w and entry[1]() is ad.b


def _merged_norm(w: Array, ad: LoraAdapter) -> Array | None:
    return _MERGED[id(w)][2] if _merged_with(w, ad) else None


def _checked_adapters(adapters: Any, what: str) -> list[tuple[str, LoraAdapter]]:
    """The items of an adapter tree, after checking that it is one (a mapping whose leaves are all
    ``LoraAdapter``; not empty)."""
    if isinstance(adapters, LoraAdapter):
        raise ArgumentTypeError(
            f"{what}: adapters must be the tree (nested dict) of LoraAdapter that lora.init "
            "returns, got a single LoraAdapter"
        )
    if not isinstance(adapters, Mapping):
        raise ArgumentTypeError(
            f"{what}: adapters must be the tree (nested dict) of LoraAdapter that lora.init "
            f"returns, got {type(adapters).__name__}"
        )
    leaves = jax.tree.leaves(adapters, is_leaf=_is_node)
    other = [leaf for leaf in leaves if not is_adapter(leaf)]
    if other:
        raise ArgumentTypeError(
            f"{what}: adapters hold a leaf of type {type(other[0]).__name__}; an adapter tree "
            "holds only LoraAdapter (were params and adapters swapped?)"
        )
    if not leaves:
        raise ArgumentError(f"{what}: the adapter tree is empty: there is nothing to {what}")
    return adapter_items(adapters)


def _check_flag(value: Any, what: str, name: str) -> None:
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{what}: {name} must be True or False, got {value!r}")


def _check_params(params: Any, what: str) -> None:
    if isinstance(params, (str, bytes, LoraAdapter)) or hasattr(params, "shape"):
        raise ArgumentTypeError(
            f"{what}: params must be a parameter tree (nested dict of arrays), got {type(params).__name__}"
        )


def _sample(paths) -> str:
    paths = sorted(paths)
    return ", ".join(paths[:2]) + (f" and {len(paths) - 2} more" if len(paths) > 2 else "")


def merge(params: PyTree, adapters: PyTree, *, stack: bool = False) -> PyTree:
    """Fold every adapter into its kernel: ``W = W0 + scale * A @ B`` (DoRA: ``m * (W0 + s*A@B) / ||.||``).

    Pure and jit-able (also with ``donate_argnums=0``). dW is computed in float32 and the sum cast back to
    each base leaf's dtype; leaves without an adapter pass through untouched. The result runs at exactly the base
    model's speed. For a dict ``params`` it is a :class:`MergedParams` (a dict) that records which kernels were
    merged, through copies and ``jit``: merging adapters into kernels that already hold a recorded merge raises
    :class:`~lora_jax.errors.MergeStateError` (the same adapter would add dW twice) unless ``stack=True`` says it
    is a different adapter to add on top. A quantised base (:class:`lora_jax.quant.QuantizedWeight`) is
    dequantised and merges into a dense kernel of its compute dtype; to quantise the result again, with a report
    of the error that costs, use :func:`lora_jax.quant.merge_quantized`. ``adapters`` that are not an adapter
    tree raise ``TypeError``.
    """
    _check_params(params, "merge")
    _check_flag(stack, "merge", "stack")
    paths = frozenset(p for p, _ in _checked_adapters(adapters, "merge"))
    prior = merge_record(params) or ()
    shared = set().union(*(rec & paths for rec in prior)) if prior else set()
    if shared and not stack:
        raise MergeStateError(
            f"merge: {_sample(shared)} already hold a merged adapter (these params, or a copy of "
            "them, come from lora.merge); merging the same adapter again would add dW twice. "
            "Unmerge first or merge into the original params, or pass stack=True to add a "
            "different adapter on top"
        )

    def fold(path: str, w, ad: LoraAdapter):
        if _merged_with(w, ad):
            raise MergeStateError(
                f"merge: {path} already has this adapter merged in; merging again would add dW "
                "twice (unmerge first, or merge into the original params)"
            )
        out = merged_kernel(w, ad).astype(w.dtype)
        _mark_merged(out, ad, dora_norm(w, ad) if ad.is_dora and _concrete(out) else None)
        return out

    out = map_targets(params, adapters, fold, "merge")
    return _with_record(out, paths, (*prior, paths), add=True)


def unmerge(merged: PyTree, adapters: PyTree, *, assume_merged: bool = False) -> PyTree:
    """Inverse of :func:`merge`: ``W0 = W - scale * A @ B`` (exact up to rounding in the base dtype).

    ``merged`` must hold these adapters. A :class:`MergedParams` from :func:`merge` records which kernels were
    merged: unmerging adapters whose kernels it records no merge of raises
    :class:`~lora_jax.errors.MergeStateError` instead of subtracting a dW that was never added. Params without
    that record (a plain dict, an ``nnx.State``, params read back from a file) cannot tell: unmerge raises unless
    ``assume_merged=True`` says they hold these adapters. (The record holds kernel paths, not values: unmerging
    a *different* adapter of the same kernels is the caller's concern.) The result is a plain dict (a
    :class:`MergedParams` while other merges remain).

    DoRA: ``W0 = W * ||W0 + s*A@B|| / m - s*A@B``. The merged kernel does not determine those norms, so a
    DoRA adapter unmerges only from a tree that :func:`merge` returned in this process outside ``jit`` (it
    remembers them, as PEFT caches them); otherwise keep the original params instead of unmerging.
    """
    _check_params(merged, "unmerge")
    _check_flag(assume_merged, "unmerge", "assume_merged")
    paths = frozenset(p for p, _ in _checked_adapters(adapters, "unmerge"))
    record = merge_record(merged)
    remaining: tuple[frozenset, ...] = record or ()
    hits: list[int] = []
    if record is not None and not (assume_merged and not any(rec & paths for rec in record)):
        hits = [i for i, rec in enumerate(record) if rec & paths]
        if not hits:
            raise MergeStateError(
                f"unmerge: these params record no merge at {_sample(paths)}; unmerging would "
                "subtract a dW that was never added"
            )
        i = hits[-1]
        if record[i] != paths:
            raise MergeStateError(
                f"unmerge: the merge recorded at {_sample(record[i] & paths)} covered "
                f"{len(record[i])} kernels, these adapters cover {len(paths)}; unmerge with the "
                "adapter tree that was merged"
            )
        remaining = record[:i] + record[i + 1 :]
    elif not assume_merged:
        raise MergeStateError(
            f"unmerge: params of type {type(merged).__name__} carry no merge record, so whether "
            "they hold these adapters cannot be told (lora.merge's result records it, for a dict, "
            "a FrozenDict and an nnx.State, through copies and jit; dict(...) and files do not "
            "keep it). If they do hold them, pass assume_merged=True"
        )

    def unfold(path: str, w, ad: LoraAdapter):
        if not ad.is_dora:
            return (as_dense(w, jnp.float32) - ad.delta(jnp.float32)).astype(w.dtype)
        norm = _merged_norm(w, ad)
        if norm is None:
            raise MergeStateError(
                f"unmerge: {path} has a DoRA adapter, whose unmerge needs the column norms "
                "||W0 + s*A@B|| used by merge; only a kernel returned by lora.merge in this process "
                "(outside jit, with this same adapter) remembers them. Keep the base params instead."
            )
        d_in = math.prod(ad.in_shape)
        v = as_dense(w, jnp.float32).reshape(d_in, -1) * (norm / ad.magnitude.astype(jnp.float32))
        return (v.reshape(w.shape) - ad.delta(jnp.float32)).astype(w.dtype)

    out = map_targets(merged, adapters, unfold, "unmerge")
    if record is None:
        return out
    return _with_record(out, record[hits[-1]] if hits else paths, remaining, add=False)


# ------------------------------------------------------------------------------------------------ wrap


def wrap(params: PyTree, adapters: PyTree, *, dropout_key: Array | None = None, stack: bool = False) -> PyTree:
    """Return ``params`` with each targeted kernel replaced by a :class:`LoraWeight` (base + adapter).

    Models that compute their projections with :func:`lora_jax.ops.dot` / :func:`lora_jax.ops.einsum` then
    run the factored forward. Pass ``dropout_key`` during training to enable the adapters' dropout (each
    adapter gets its own key); leave it ``None`` for evaluation. Params from :func:`merge` that already hold a
    merged adapter at these kernels raise :class:`~lora_jax.errors.MergeStateError` unless ``stack=True``.
    """
    if not isinstance(adapters, Mapping):
        raise ArgumentTypeError(
            f"wrap: adapters must be the tree (nested dict) of LoraAdapter that lora.init returns, "
            f"got {type(adapters).__name__}"
        )
    _check_flag(stack, "wrap", "stack")
    items = adapter_items(adapters)
    record = merge_record(params)
    if record and not stack:
        shared = set().union(*(rec & {p for p, _ in items} for rec in record))
        if shared:
            raise MergeStateError(
                f"wrap: {_sample(shared)} already hold a merged adapter (these params come from "
                "lora.merge); wrapping the same adapter would add dW a second time. Wrap the "
                "original params, or pass stack=True to add a different adapter on top"
            )
    index = {p: i for i, (p, _) in enumerate(items)}

    def to_weight(path: str, w, ad: LoraAdapter):
        key = None
        if dropout_key is not None and ad.dropout > 0.0:
            key = jax.random.fold_in(dropout_key, index[path])
        return LoraWeight(w, ad, key)

    return map_targets(params, adapters, to_weight, "wrap")


def unwrap(wrapped: PyTree) -> tuple[PyTree, PyTree]:
    """Inverse of :func:`wrap`: ``(params, adapters)``."""
    adapters: dict = {}

    def take(path, leaf):
        if is_lora_weight(leaf):
            _nested_set(adapters, _targets.path_tuple(path), leaf.adapter)
            return leaf.base
        return leaf

    params = jax.tree_util.tree_map_with_path(take, wrapped, is_leaf=_is_node)
    return params, adapters


# ------------------------------------------------------------------------------------ frozen / trainable


def split(params: PyTree, adapters: PyTree, train: str | Sequence[str] | None = None) -> tuple[PyTree, dict]:
    """Separate what is trained from what stays frozen.

    Args:
      params: the base parameter tree.
      adapters: the adapter tree from :func:`init`.
      train: regexes (full match on '/'-joined paths) of base leaves trained in full, e.g. a new
        classification head ``"classifier/.*"``. A rule that matches nothing raises.

    Returns:
      ``(frozen, trainable)``: ``frozen`` is ``params`` with the fully trained leaves set to ``None``;
      ``trainable = {"adapters": adapters, "params": {...}}`` holds only what the optimizer should see.
      Differentiate a loss with respect to ``trainable`` alone and the frozen base gets no gradient buffer.
    """
    rules = _targets.compile_rules(train, "train")
    candidates = [p for p, _ in _targets.leaf_paths(params)]
    for rule in rules:
        if not any(rule.fullmatch(p) for p in candidates):
            raise _targets.no_match_error("train", rule, candidates)
    full: dict = {}

    def pick(path, leaf):
        p = _targets.path_str(path)
        if any(rule.fullmatch(p) for rule in rules):
            if _nested_get(adapters, tuple(p.split("/"))) is not None:
                raise ArgumentError(f"split: {p} has an adapter and is also trained in full; choose one")
            _nested_set(full, _targets.path_tuple(path), leaf)
            return None
        return leaf

    frozen = jax.tree_util.tree_map_with_path(pick, params, is_leaf=_targets.is_weight_node)
    return frozen, {"adapters": adapters, "params": full}


def combine(frozen: PyTree, trainable: Mapping) -> tuple[PyTree, PyTree]:
    """Inverse of :func:`split`: ``(params, adapters)``."""
    full = trainable.get("params", {})

    def put(path, leaf):
        if leaf is None:
            value = _nested_get(full, _targets.path_tuple(path))
            if value is None:
                raise ArgumentError(f"combine: {_targets.path_str(path)} is frozen as None but has no trained value")
            return value
        return leaf

    # A weight node (a quantised kernel) is one frozen leaf: its own ``None`` fields (an int8 or single-quantised
    # kernel has no second-level scales) are not trained leaves that went missing.
    is_leaf = lambda x: x is None or _targets.is_weight_node(x)  # noqa: E731
    params = jax.tree_util.tree_map_with_path(put, frozen, is_leaf=is_leaf)
    return params, trainable["adapters"]


# ---------------------------------------------------------------------------------------------- summary


@dataclasses.dataclass(frozen=True)
class Summary:
    """Parameter counts of a LoRA setup. ``rows`` has one ``(path, kernel_shape, r, params, adapter_params)``
    per adapted kernel."""

    total: int
    trainable: int
    total_bytes: int
    trainable_bytes: int
    targeted: int
    rows: tuple[tuple[str, tuple[int, ...], int, int, int], ...]

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        width = max([len(r[0]) for r in self.rows] + [6])
        lines = [f"{'target':<{width}}  {'shape':>16}  {'r':>4}  {'params':>12}  {'lora':>10}"]
        for path, shape, r, n, n_lora in self.rows:
            lines.append(f"{path:<{width}}  {str(shape):>16}  {r:>4}  {n:>12,}  {n_lora:>10,}")
        lines.append(
            f"trainable {self.trainable:,} of {self.total:,} parameters ({100 * self.fraction:.3f}%), "
            f"{self.trainable_bytes:,} of {self.total_bytes:,} bytes"
        )
        return "\n".join(lines)


def summary(params: PyTree, adapters: PyTree, trainable_params: PyTree | None = None) -> Summary:
    """Count trainable vs total parameters and bytes.

    ``total`` counts the base plus the adapters; ``trainable`` counts the adapters plus
    ``trainable_params`` (leaves trained in full, e.g. ``split(...)[1]["params"]``).

    >>> import jax.numpy as jnp, lora_jax as lora
    >>> params = {"dense": {"kernel": jnp.zeros((512, 64))}}
    >>> s = lora.summary(params, lora.init(params, r=8, targets="dense/kernel"))
    >>> s.trainable, s.targeted, f"{1 - s.trainable / s.targeted:.0%} fewer"
    (4608, 32768, '86% fewer')
    """

    def size(tree):  # a weight node (quantised kernel) counts its logical parameters and its stored bytes
        leaves = [x for x in jax.tree_util.tree_leaves(tree, is_leaf=_targets.is_weight_node) if hasattr(x, "shape")]
        return sum(int(np.prod(x.shape)) for x in leaves), _tree.nbytes(leaves)

    base_n, base_b = size(params)
    lora_n, lora_b = size(adapters)
    full_n, full_b = size(trainable_params) if trainable_params is not None else (0, 0)
    rows = tuple(
        (
            p,
            ad.kernel_shape,
            ad.r,
            math.prod(ad.kernel_shape),
            int(ad.a.size + ad.b.size + (ad.magnitude.size if ad.is_dora else 0)),
        )
        for p, ad in adapter_items(adapters)
    )
    return Summary(
        total=base_n + lora_n,
        trainable=lora_n + full_n,
        total_bytes=base_b + lora_b,
        trainable_bytes=lora_b + full_b,
        targeted=sum(r[3] for r in rows),
        rows=rows,
    )


# ---------------------------------------------------------------------------------------- scanned stacks
# How adapters and wrapped kernels live in a scanned layer stack (lora_jax.stacking imports nothing from here).


def _adapter_join(nodes: list[LoraAdapter]) -> LoraAdapter:
    first = nodes[0]
    for i, x in enumerate(nodes[1:], 1):
        for field in ("r", "alpha", "scale", "dropout", "in_shape", "out_shape"):
            if getattr(x, field) != getattr(first, field):
                raise ArgumentError(
                    f"layer {i}'s adapter has {field}={getattr(x, field)}, layer 0's "
                    f"{getattr(first, field)}: a scanned stack holds one adapter shape and scale for "
                    "all its layers (per-layer rank / alpha patterns need unrolled layers)"
                )
    mags = [x.magnitude for x in nodes]
    return dataclasses.replace(
        first,
        a=_stacking.stack_arrays([x.a for x in nodes]),
        b=_stacking.stack_arrays([x.b for x in nodes]),
        in_shape=(len(nodes), *first.in_shape),
        magnitude=None if mags[0] is None else _stacking.stack_arrays(mags),
    )


_stacking.register_node(
    LoraAdapter,
    _stacking.NodeRule(
        size=lambda ad: ad.a.shape[0],
        view=lambda ad, n: dataclasses.replace(ad, in_shape=ad.in_shape[1:]),
        slice=lambda ad, i: dataclasses.replace(
            ad,
            a=ad.a[i],
            b=ad.b[i],
            in_shape=ad.in_shape[1:],
            magnitude=None if ad.magnitude is None else ad.magnitude[i],
        ),
        join=_adapter_join,
    ),
)
_stacking.register_node(
    LoraWeight,
    _stacking.NodeRule(
        size=lambda w: w.adapter.a.shape[0],
        view=lambda w, n: dataclasses.replace(
            w,
            base=_stacking.layer_view(w.base, n),
            adapter=_stacking.layer_view(w.adapter, n),
            key=_stacking.key_per_layer(w.key, n),
        ),
        slice=lambda w, i: dataclasses.replace(
            w,
            base=_stacking.layer_slice(w.base, i),
            adapter=_stacking.layer_slice(w.adapter, i),
            key=None if w.key is None else _stacking.key_per_layer(w.key, w.adapter.a.shape[0])[i],
        ),
        join=lambda ws: dataclasses.replace(
            ws[0],
            base=_stacking.join([w.base for w in ws]),
            adapter=_stacking.join([w.adapter for w in ws]),
            key=None if ws[0].key is None else _stacking.stack_arrays([w.key for w in ws]),
        ),
    ),
)
