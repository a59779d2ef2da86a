"""Factored LoRA for JAX functions this project did not write.

:mod:`lora_jax.ops` gives a factored forward to model code that calls ``lora.dot`` / ``lora.einsum``. A
Flax ``nn.Dense``, a Hugging Face-style port or any other third-party function calls ``lax.dot_general``
on its kernel directly, and a :class:`~lora_jax.core.LoraWeight` is not an array it can take.
:func:`transform` closes that gap without touching the function::

    loss = lora.transform(lambda p, x: model.apply({"params": p}, x))
    y = loss(lora.wrap(params, adapters), x)          # same signature, LoraWeight leaves anywhere

How it works (all at trace time, so the result costs nothing at run time beyond the factored products):

1. ``fn`` is traced to a jaxpr with every ``LoraWeight`` leaf replaced by its frozen base array.
2. The jaxpr is evaluated by a small interpreter. Each variable holds either an ordinary value or a
   *LoRA value*: the kernel ``T(W0) + T(s * A @ B)`` after the structural operations ``T`` that the function
   applied to it so far. The interpreter keeps ``T(W0)`` as an ordinary array (what the function computed
   anyway) and ``T(s * A @ B)`` as two small factors, ``left`` and ``right``, plus a *kind* per axis saying
   where that axis lives:

   - ``"L"``: in ``left`` only (an input axis of the original kernel),
   - ``"R"``: in ``right`` only (an output axis),
   - ``"B"``: in both (a stacked layer axis: per-layer adapters, see below),
   - ``"N"``: in neither (a broadcast axis along which the delta is constant).

   So the delta is ``einsum(left[L/B axes..., r], right[R/B axes..., r])`` broadcast along the ``"N"`` axes,
   times ``s``. Both factors keep their axes in the value's axis order with the rank axis last.
3. Structural operations act on the factors, never on the product: ``transpose`` permutes kinds (the
   transpose of a 2-D kernel swaps the roles of A and B, as in a tied head ``x @ E.T``);
   ``convert_element_type`` to a float type is recorded and the factors are cast at the product;
   ``reshape`` that only splits or merges axes of one kind reshapes that factor; ``broadcast_in_dim`` adds
   ``"N"`` axes; ``slice`` / ``dynamic_slice`` / ``rev`` / ``squeeze`` / ``split`` / ``unstack`` act on the
   factor(s) that hold the axis; ``neg`` and multiplication or division by a scalar fold into the scale;
   ``copy`` / ``device_put`` / ``sharding_constraint`` / ``stop_gradient`` pass through.
4. Products consume the LoRA value in factored form: ``dot_general(x, W)`` becomes
   ``dot_general(x, W0) + ((dropout(x) . F1) . F2) * s``, where ``F1`` is the factor that holds the
   contracted axes (``A`` for ``x @ W``, ``B`` for ``x @ W.T``); ``conv_general_dilated`` convolves with the
   factor holding the spatial and input-feature axes (a rank-``r`` output) and then projects with the other;
   ``gather`` (embedding lookups) gathers rows of the factor and forms only the gathered rows;
   ``ragged_dot_general`` (``jax.lax.ragged_dot``: the grouped product of a mixture of experts) on an expert
   stack with per-expert adapters becomes ``ragged_dot(x, W0) + ragged_dot(ragged_dot(dropout(x), A), B) * s``
   on the same group sizes.
5. Nested jaxprs are interpreted recursively when a LoRA value flows into them: ``jit`` / ``closed_call``
   (inlined), ``checkpoint`` (re-wrapped in :func:`jax.checkpoint` with the same policy), ``scan`` (a LoRA
   value among the scanned-over ``xs`` is sliced per iteration: base and factors alike), ``while`` and
   ``cond`` (LoRA values among the constants / operands). ``custom_jvp_call`` / ``custom_vjp_call`` whose
   operands include a LoRA value get the dense kernel, because their derivative rules were written for
   it. A LoRA value in a ``scan`` / ``while`` carry is materialised.
6. Everything else that consumes a LoRA value (``add``, ``mul`` by a tensor, ``concatenate``, a reshape
   that merges input with output axes, ...) gets the dense kernel ``W0 + s * A @ B``, and so do LoRA
   values returned by ``fn``. Each such materialisation is recorded with its reason and the weight's path:
   :func:`transform_report` (or ``transform(fn, report=True)``) returns the counts, and
   ``transform(fn, strict=True)`` raises instead.

Every weight kind of the library goes through it:

- a quantised base (:class:`~lora_jax.quant.QuantizedWeight`, QLoRA), wrapped or not: ``fn`` is traced with a
  stand-in of the kernel's shape and dtype, structural ops are recorded on the still-quantised kernel, and each
  product dequantises it right there (after its input is known) and again in the backward pass, keeping only the
  quantised kernel in between (:func:`lora_jax.ops.with_base`), so no dense copy of the base is ever whole;
- mixed-adapter batches (:class:`~lora_jax.multi.MultiLoraWeight` from ``lora.wrap_mixed``): the ``n`` slots'
  factors sit side by side on the rank axis and a ``(rows, n * R)`` mask keeps, for each batch row (the
  activations' first axis), only its slot's columns times that slot's scale; exact, and no per-row gather;
- DoRA: ``(x @ W0 + s * (x @ A) @ B) * m / ||W0 + s*A@B||`` over the output axes (the norm a constant), through
  casts and products; other ops on a DoRA kernel get its dense form.

What has no correct form here raises :class:`~lora_jax.errors.UnsupportedError` naming the weight and what to
do: a mixed-adapter kernel that would need one dense kernel (or is indexed as an embedding), a quantised stack
scanned over per layer.

The re-traced program is ordinary JAX: ``jax.jit``, ``jax.grad``, ``jax.vmap`` and friends apply to it as
usual, and the gradient of a factored product reaches ``A`` and ``B`` through the rank-``r`` bottleneck
without ever forming a ``d_in x d_out`` array.

Dropout follows :func:`lora_jax.ops.dot`: the adapter input ``x`` is dropped with the weight's key (set by
``lora.wrap(..., dropout_key=...)``) at the adapter's rate. A weight used several times draws the same mask
for inputs of the same shape, as in ``ops``; a weight scanned over with ``scan`` gets one key per step.

Stacked kernels (Flax ``nn.scan``, ``nnx.scan`` / ``nnx.vmap`` layers, or any kernel with a leading layer
axis). A scanned kernel has shape ``(L, *in_shape, *out_shape)``. ``lora.init`` cannot express the layer
axis: with ``in_axes`` it would either fold ``L`` into the input (``A: (L * d_in, r)`` with one ``B`` shared
by all layers) or into the output. This module represents per-layer adapters without new classes: a
*stacked adapter* is an ordinary :class:`~lora_jax.core.LoraAdapter` whose factors have leading stack axes,

    a: (L, prod(in_shape), r)        b: (L, r, prod(out_shape))        in_shape = (L, *in_shape)

so its ``kernel_shape`` is the stacked kernel's shape and ``lora.merge`` / ``lora.unmerge`` /
``lora.wrap`` / ``lora.summary`` work on it unchanged (``A @ B`` is a batched product and the reshape
to ``kernel_shape`` is exact). The transform recognises the stack axes by ``a.ndim - 2`` and gives them
kind ``"B"``; ``scan`` then slices base, ``A`` and ``B`` per layer. :func:`init_stacked` builds such
adapters for a subtree whose leaves are all stacked (e.g. the ``nn.scan`` module's params).
:mod:`lora_jax.ops` does not understand stacked adapters (its shape check rejects them): use them through
this transform or merge them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from lora_jax import core as _core
from lora_jax import multi as _multi
from lora_jax import ops as _ops
from lora_jax import targets as _targets
from lora_jax.core import LoraWeight
from lora_jax.errors import ArgumentError, UnsupportedError

Array = jax.Array
PyTree = Any

L, R, B, N = "L", "R", "B", "N"  # where an axis of a LoRA value lives: left factor, right, both, neither


# ------------------------------------------------------------------------------------------ LoRA values


@jax.tree_util.register_pytree_node_class
class _Lazy:
    """A quantised kernel (:class:`~lora_jax.quant.QuantizedWeight`) after the structural ops seen so far,
    kept quantised: :meth:`at_product` dequantises it where a product uses it, so a QLoRA base never exists
    as a whole dense tree (one kernel at a time, as :mod:`lora_jax.ops` does).

    ``steps``: ``(eqn, position, output index)`` per op, applied in order to the dense kernel with the op's
    other operands ``extras`` (static: the equations); ``aval``: the shape and dtype after the ops.
    """

    def __init__(self, q: Any, extras: tuple = (), steps: tuple = (), aval: Any = None):
        self.q, self.extras, self.steps = q, tuple(extras), tuple(steps)
        self.aval = aval if aval is not None else jax.ShapeDtypeStruct(tuple(q.shape), jnp.dtype(q.dtype))

    def tree_flatten(self):
        return (self.q, self.extras), (self.steps, self.aval)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], children[1], *aux)

    shape = property(lambda self: tuple(self.aval.shape))
    dtype = property(lambda self: self.aval.dtype)
    ndim = property(lambda self: len(self.aval.shape))

    def then(self, eqn, invals: Sequence[Any], pos: int) -> list[_Lazy]:
        """The outputs of ``eqn`` applied with this kernel at operand ``pos`` (the others are ``invals``)."""
        others = tuple(v for i, v in enumerate(invals) if i != pos)
        return [
            _Lazy(self.q, (*self.extras, others), (*self.steps, (eqn, pos, k)), out.aval)
            for k, out in enumerate(eqn.outvars)
        ]

    def apply(self, dense: Array, extras: Sequence[Any] | None = None) -> Array:
        """The recorded ops applied to the dequantised kernel ``dense``."""
        for (eqn, pos, k), others in zip(self.steps, self.extras if extras is None else extras):
            args = list(others)
            args.insert(pos, dense)
            dense = _bind(eqn, args)[k]
        return dense

    def materialize(self) -> Array:
        return self.apply(self.q.dequantize())


def _on_base(eqn, invals: Sequence[Any], v: _Lora) -> list[Any]:
    """``eqn`` applied to ``v``'s base (``v`` among ``invals``, the other operands ordinary values)."""
    pos = next(i for i, a in enumerate(invals) if a is v)
    if isinstance(v.base, _Lazy):
        return v.base.then(eqn, [a for a in invals], pos)
    return _bind(eqn, [v.base if i == pos else a for i, a in enumerate(invals)])


def _base_out(eqn, invals: Sequence[Any], w: _Lora, x_pos: int) -> Array:
    """``eqn`` (a product linear in operand ``x_pos``) on ``w``'s base. A lazy quantised base is dequantised
    right there, after ``x`` is known, and again in the backward pass (:func:`lora_jax.ops.with_base`), so
    only the quantised kernel is kept between them."""
    pos = next(i for i, a in enumerate(invals) if a is w)
    if not isinstance(w.base, _Lazy):
        return _bind(eqn, [w.base if i == pos else a for i, a in enumerate(invals)])[0]
    lz = w.base
    flat, tree = jax.tree_util.tree_flatten(lz.extras)
    aux_pos = [i for i in range(len(invals)) if i not in (pos, x_pos)]

    def product(x, dense, *rest):
        kernel = lz.apply(dense, jax.tree_util.tree_unflatten(tree, rest[: len(flat)]))
        args = list(invals)
        args[pos], args[x_pos] = kernel, x
        for i, a in zip(aux_pos, rest[len(flat) :]):
            args[i] = a
        return _bind(eqn, args)[0]

    return _ops.with_base(product, invals[x_pos], lz.q, *flat, *[invals[i] for i in aux_pos])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Lora:
    """A kernel in the middle of a traced function: ``base + scale * einsum(left, right)``, broadcast.

    Attributes:
      base: ``T(W0)``, the frozen kernel after the structural ops seen so far; its dtype is the dtype the
        function computes with (the factors are cast to it at the product).
      left: ``(*[shape[i] for i with kind L or B], r)``.
      right: ``(*[shape[i] for i with kind R or B], r)``.
      key: dropout key or ``None``.
      kinds: one of ``L R B N`` per axis of ``base`` (static).
      scale: the LoRA scale, with any folded ``neg`` (static).
      rate: dropout rate (static).
      name: the weight's path in the arguments, for reports (static).
      gathered: rows picked by a ``gather`` (an embedding lookup): activation-sized, so forming it densely
        *is* the factored lookup and is not counted as a materialisation (static).
      rowmask: mixed-adapter batches only (:class:`~lora_jax.multi.MultiLoraWeight`): ``(rows, n * R)``, the
        coefficient of each rank column for each row of the batch. The ``n`` slots' factors are concatenated
        along the rank axis (``left (..., n * R)``), and row ``i`` keeps only the columns of its slot ``ids[i]``,
        times that slot's scale: ``x_i @ W0 + ((x_i @ A_cat) * rowmask_i) @ B_cat^T``. Such a value has one
        kernel per row, so it never materialises.
      col: DoRA only: ``m / ||W0 + s*A@B||`` over the output axes (kind ``R``, in order), the norm a constant;
        the kernel is ``(base + delta) * col``. Kept only through ops that leave the axes in place.
      ``base`` is an array, or a :class:`_Lazy` quantised kernel that is dequantised at each product.
    """

    base: Array
    left: Array
    right: Array
    key: Array | None
    kinds: tuple[str, ...] = dataclasses.field(metadata=dict(static=True))
    scale: float = dataclasses.field(metadata=dict(static=True))
    rate: float = dataclasses.field(default=0.0, metadata=dict(static=True))
    name: str = dataclasses.field(default="", metadata=dict(static=True))
    gathered: bool = dataclasses.field(default=False, metadata=dict(static=True))
    rowmask: Array | None = None
    col: Array | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    @property
    def ndim(self) -> int:
        return self.base.ndim

    @property
    def dtype(self):
        return self.base.dtype

    def axes(self, side: str) -> list[int]:
        """The value's axes held by factor ``side`` (``L`` or ``R``), in order."""
        return [i for i, k in enumerate(self.kinds) if k in (side, B)]

    def factor(self, side: str) -> Array:
        return self.left if side == L else self.right


def _is_lora(x: Any) -> bool:
    return isinstance(x, _Lora)


def _from_weight(w: LoraWeight, name: str) -> _Lora:
    """The LoRA value of a wrapped kernel: stacked adapters (see the module docstring), a quantised base
    (kept lazy) and DoRA (the column factor ``m / ||W0 + s*A@B||`` computed here, its norm a constant as in
    :func:`lora_jax.ops.dot`) included."""
    ad, base = w.adapter, w.base
    if _targets.is_weight_node(base) and not hasattr(base, "dequantize"):
        raise UnsupportedError(
            f"lora.transform: the base at {name!r} is a {type(base).__name__}, which has no "
            "dequantize(); transform handles arrays and lora_jax.quant.QuantizedWeight bases"
        )
    a, b = ad.a, ad.b
    n_stack = a.ndim - 2
    stack = tuple(a.shape[: max(n_stack, 0)])
    in_rest = tuple(ad.in_shape[max(n_stack, 0) :])
    ok = (
        n_stack >= 0
        and b.ndim == a.ndim
        and tuple(b.shape[:n_stack]) == stack
        and tuple(ad.in_shape[:n_stack]) == stack
        and a.shape[-2] == math.prod(in_rest)
        and b.shape[-1] == math.prod(ad.out_shape)
        and a.shape[-1] == b.shape[-2]
        and tuple(base.shape) == ad.kernel_shape
    )
    if not ok:
        raise ArgumentError(
            f"lora.transform: the LoraWeight at {name!r} does not fit together: base {tuple(base.shape)}, "
            f"a {tuple(a.shape)}, b {tuple(b.shape)}, in_shape {ad.in_shape}, out_shape {ad.out_shape}; expected "
            "a (*stack, prod(in_shape without stack), r), b (*stack, r, prod(out_shape)) and a base of shape "
            "in_shape + out_shape (stack axes lead in_shape)"
        )
    r = a.shape[-1]
    left = a.reshape(*stack, *in_rest, r)
    right = jnp.moveaxis(b.reshape(*stack, r, *ad.out_shape), n_stack, -1)
    kinds = (B,) * n_stack + (L,) * len(in_rest) + (R,) * len(ad.out_shape)
    key = w.key if ad.dropout > 0.0 else None
    col = None
    if ad.is_dora:
        if n_stack:
            raise UnsupportedError(
                f"lora.transform: the DoRA adapter at {name!r} is stacked {stack}; DoRA is "
                "implemented for single kernels (use plain LoRA adapters on stacked kernels)"
            )
        norm = lax.stop_gradient(_core.dora_norm(base, ad))
        col = (ad.magnitude.astype(jnp.float32) / norm).reshape(ad.out_shape)
    lazy = _Lazy(base) if _targets.is_weight_node(base) else base
    return _Lora(lazy, left, right, key, kinds, float(ad.scale), float(ad.dropout), name, col=col)


def _from_multi(w: Any, name: str) -> _Lora:
    """The LoRA value of a :class:`~lora_jax.multi.MultiLoraWeight`: the ``n`` slots' factors side by side on
    the rank axis, and a per-row mask that keeps each row's slot (see ``_Lora.rowmask``)."""
    st, base, ids = w.stacked, w.base, jnp.asarray(w.ids)
    if st.a.ndim != 3 or tuple(base.shape) != st.kernel_shape:
        raise UnsupportedError(
            f"lora.transform: the mixed-adapter weight at {name!r} has factors "
            f"{tuple(st.a.shape)} / {tuple(st.b.shape)} for a kernel {tuple(base.shape)}; "
            "transform handles slots of single kernels, a (n, d_in, R) / (n, R, d_out)"
        )
    if ids.ndim != 1:
        raise ArgumentError(
            f"lora.transform: the mixed-adapter weight at {name!r} has ids of shape {ids.shape}; "
            "expected one id per batch row, (rows,)"
        )
    n, d_in, rank = st.a.shape
    left = jnp.transpose(st.a, (1, 0, 2)).reshape(*st.in_shape, n * rank)
    right = jnp.transpose(st.b, (2, 0, 1)).reshape(*st.out_shape, n * rank)
    ids = ids.astype(jnp.int32)
    k = jnp.clip(ids, 0, n - 1)
    coef = jax.nn.one_hot(k, n, dtype=jnp.float32) * jnp.where(ids >= 0, st.scale[k], 0.0)[:, None]
    rowmask = jnp.repeat(coef, rank, axis=1)
    kinds = (L,) * len(st.in_shape) + (R,) * len(st.out_shape)
    lazy = _Lazy(base) if _targets.is_weight_node(base) else base
    return _Lora(lazy, left, right, None, kinds, 1.0, 0.0, name, rowmask=rowmask)


def _from_node(q: Any, name: str) -> _Lora:
    """A quantised kernel without an adapter (an untargeted layer of a QLoRA base): a lazy base with rank-0
    factors, so it too is dequantised one product at a time."""
    if not hasattr(q, "dequantize"):
        raise UnsupportedError(f"lora.transform: {name!r} is a {type(q).__name__}, which has no dequantize()")
    stack = int(getattr(q, "stack_ndim", 0))
    n_in = int(getattr(q, "in_ndim", 1))
    shape = tuple(q.shape)
    kinds = (B,) * stack + (L,) * n_in + (R,) * (len(shape) - stack - n_in)
    left = jnp.zeros((*shape[: stack + n_in], 0), q.dtype)
    right = jnp.zeros((*shape[:stack], *shape[stack + n_in :], 0), q.dtype)
    return _Lora(_Lazy(q), left, right, None, kinds, 1.0, 0.0, name)


def _rank0(v: _Lora) -> bool:
    return v.left.shape[-1] == 0


def _col_axes(v: _Lora) -> list[int]:
    return [i for i, k in enumerate(v.kinds) if k == R]


def _delta(v: _Lora, dtype) -> Array:
    """``scale * einsum(left, right)`` broadcast to ``v.shape``, computed in ``dtype``."""
    n = v.ndim
    kept = [i for i in range(n) if v.kinds[i] != N]
    d = jnp.einsum(v.left.astype(dtype), [*v.axes(L), n], v.right.astype(dtype), [*v.axes(R), n], kept)
    d = d * jnp.asarray(v.scale, dtype)
    return lax.broadcast_in_dim(d, v.shape, kept) if len(kept) < n else d


def _dense(v: _Lora) -> Array:
    """``base + delta`` in the base dtype (the sum taken in at least float32, as ``LoraWeight.materialize``);
    DoRA: times the column factor."""
    if v.rowmask is not None:
        raise UnsupportedError(
            f"lora.transform: the mixed-adapter weight at {v.name!r} would need its dense kernel "
            "(see the report's reason), but a mixed batch has one kernel per row; use the kernel "
            "only in products (dot_general) with the batch rows on the activations' first axis"
        )
    base = v.base.materialize() if isinstance(v.base, _Lazy) else v.base
    if _rank0(v):
        return base
    if v.gathered:
        return base + _delta(v, v.dtype)
    acc = jnp.promote_types(v.dtype, jnp.float32)
    out = base.astype(acc) + _delta(v, acc)
    if v.col is not None:
        out = out * lax.broadcast_in_dim(v.col.astype(acc), v.shape, _col_axes(v))
    return out.astype(v.dtype)


def _dropout(x: Array, v: _Lora) -> Array:
    """As :func:`lora_jax.ops.dot`: inverted dropout of the adapter input with the weight's key."""
    if v.key is None or v.rate == 0.0:
        return x
    keep = jax.random.bernoulli(v.key, 1.0 - v.rate, x.shape)
    return jnp.where(keep, x / (1.0 - v.rate), jnp.zeros((), x.dtype))


def _as_broadcast(v: _Lora, axes: Sequence[int]) -> _Lora:
    """Turn size-1 axes into ``N`` axes (dropping them from the factors), e.g. before a broadcast."""
    axes = [a for a in axes if v.kinds[a] != N]
    if not axes:
        return v
    la, ra = v.axes(L), v.axes(R)
    left = lax.squeeze(v.left, tuple(la.index(a) for a in axes if a in la))
    right = lax.squeeze(v.right, tuple(ra.index(a) for a in axes if a in ra))
    kinds = tuple(N if i in axes else k for i, k in enumerate(v.kinds))
    return dataclasses.replace(v, left=left, right=right, kinds=kinds)


# ------------------------------------------------------------------------------------------------ report


@dataclasses.dataclass(frozen=True)
class Report:
    """What :func:`transform` did with the LoRA weights of one trace.

    Attributes:
      weights: paths of the ``LoraWeight`` leaves found in the arguments.
      factored: ``(primitive, count)``: products computed in factored form.
      materialized: ``(reason, count)``: places that formed the dense ``W0 + s * A @ B``.
      details: ``(reason, weight path)`` for each materialisation.
    """

    weights: tuple[str, ...] = ()
    factored: tuple[tuple[str, int], ...] = ()
    materialized: tuple[tuple[str, int], ...] = ()
    details: tuple[tuple[str, str], ...] = ()

    @property
    def n_materialized(self) -> int:
        return sum(n for _, n in self.materialized)

    @property
    def n_factored(self) -> int:
        return sum(n for _, n in self.factored)

    def __str__(self) -> str:
        lines = [
            f"lora.transform: {len(self.weights)} LoRA weight(s), {self.n_factored} factored product(s), "
            f"{self.n_materialized} materialisation(s)"
        ]
        lines += [f"  factored     {n:4d}  {prim}" for prim, n in self.factored]
        lines += [f"  materialised {n:4d}  {why}" for why, n in self.materialized]
        lines += [f"    {why}: {name}" for why, name in self.details]
        return "\n".join(lines)


# A report is static data: as a pytree without leaves it can be returned from jax.jit / eval_shape.
jax.tree_util.register_pytree_node(Report, lambda r: ((), r), lambda r, _: r)


def _counts(items) -> tuple[tuple[str, int], ...]:
    out: dict[str, int] = {}
    for k in items:
        out[k] = out.get(k, 0) + 1
    return tuple(out.items())


class _Context:
    """Per-call state of the interpreter: where it is (for de-duplicated counting) and what it did.

    Events are keyed by the stack of equations being interpreted, so a body that JAX traces twice (``scan``
    re-traces on weak-type changes) is counted once, while two call sites of one jaxpr count twice.
    """

    def __init__(self, strict: bool):
        self.strict = strict
        self.stack: tuple[int, ...] = ()
        self.weights: list[str] = []
        self.factored: dict[tuple, str] = {}
        self.materialized: dict[tuple, tuple[str, str]] = {}

    def note_factored(self, prim: str, slot: Any = 0) -> None:
        self.factored[(self.stack, slot)] = prim

    def materialize(self, v: _Lora, reason: str, slot: Any) -> Array:
        if v.gathered:
            self.note_factored("gather", ("dense", slot))
            return _dense(v)
        if self.strict:
            raise ArgumentError(
                f"lora.transform(strict=True): {reason} needs the dense kernel W0 + s*A@B of "
                f"{v.name!r} (shape {v.shape}, axis kinds {''.join(v.kinds)})"
            )
        self.materialized[(self.stack, slot)] = (reason, v.name)
        return _dense(v)

    def report(self) -> Report:
        details = tuple(self.materialized.values())
        return Report(tuple(self.weights), _counts(self.factored.values()), _counts(why for why, _ in details), details)


# ------------------------------------------------------------------------------------------ interpreter


def _bind(eqn, invals: Sequence[Any]) -> list[Any]:
    """Apply ``eqn``'s primitive to ordinary values (as ``jax.core.eval_jaxpr`` does)."""
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _eval(ctx: _Context, jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    """Evaluate ``jaxpr`` on values that may be LoRA values."""
    env: dict[Any, Any] = {}

    def read(var):
        return var.val if isinstance(var, jcore.Literal) else env[var]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    outer = ctx.stack
    try:
        for eqn in jaxpr.eqns:
            invals = [read(v) for v in eqn.invars]
            ctx.stack = outer + (id(eqn),)
            if any(_is_lora(v) and v.col is not None for v in invals) and eqn.primitive.name not in _COL_SAFE:
                invals = [
                    ctx.materialize(
                        v,
                        f"{eqn.primitive.name} (a DoRA kernel keeps its factored form through casts and products only)",
                        ("dora", i),
                    )
                    if _is_lora(v) and v.col is not None
                    else v
                    for i, v in enumerate(invals)
                ]
            if any(map(_is_lora, invals)):
                outvals = _RULES.get(eqn.primitive.name, _materialize_rule)(ctx, eqn, invals)
            else:
                outvals = _bind(eqn, invals)
            env.update(zip(eqn.outvars, outvals))
    finally:
        ctx.stack = outer
    return [read(v) for v in jaxpr.outvars]


def _eval_closed(ctx: _Context, jaxpr, args: Sequence[Any]) -> list[Any]:
    """``_eval`` on a ``ClosedJaxpr`` or an open ``Jaxpr`` without constants."""
    if isinstance(jaxpr, jcore.ClosedJaxpr):
        return _eval(ctx, jaxpr.jaxpr, jaxpr.consts, args)
    return _eval(ctx, jaxpr, [], args)


def _dense_all(ctx: _Context, vals: Sequence[Any], reason: str, tag: str) -> list[Any]:
    return [ctx.materialize(v, reason, (tag, i)) if _is_lora(v) else v for i, v in enumerate(vals)]


# ----------------------------------------------------------------------------------------------- rules
# A rule takes (ctx, eqn, invals) where at least one inval is a LoRA value and returns the outvals.


def _materialize_rule(ctx: _Context, eqn, invals, why: str = "") -> list[Any]:
    """The fallback: give the primitive dense kernels."""
    reason = eqn.primitive.name + (f" ({why})" if why else "")
    return _bind(eqn, _dense_all(ctx, invals, reason, "in"))


def _structural(fn: Callable) -> Callable:
    """A rule for an op on a single LoRA operand that may fail to push through (returns None)."""

    @functools.wraps(fn)
    def rule(ctx, eqn, invals):
        if not _is_lora(invals[0]) or any(map(_is_lora, invals[1:])):
            return _materialize_rule(ctx, eqn, invals, "LoRA value in an unsupported operand position")
        out = fn(eqn, *invals)
        if isinstance(out, str):
            return _materialize_rule(ctx, eqn, invals, out)
        return out

    return rule


@_structural
def _transpose_rule(eqn, v: _Lora):
    perm = tuple(eqn.params["permutation"])
    kinds = tuple(v.kinds[p] for p in perm)

    def permute(arr, side):
        old = v.axes(side)
        order = [old.index(p) for p in perm if v.kinds[p] in (side, B)] + [len(old)]
        return arr if order == sorted(order) else arr.transpose(order)

    base = _on_base(eqn, [v], v)[0]
    return [dataclasses.replace(v, base=base, kinds=kinds, left=permute(v.left, L), right=permute(v.right, R))]


@_structural
def _convert_rule(eqn, v: _Lora):
    if not jnp.issubdtype(eqn.params["new_dtype"], jnp.floating):
        return f"to the non-float dtype {eqn.params['new_dtype']}"
    return [dataclasses.replace(v, base=_on_base(eqn, [v], v)[0])]


def _reshape_kinds(old_shape, old_kinds, new_shape) -> tuple[str, ...] | None:
    """Kinds of the axes of ``reshape(old_shape -> new_shape)`` when every group of axes that the reshape
    merges or splits has a single kind (size-1 axes become ``N``); ``None`` otherwise."""
    old = [(d, k) for d, k in zip(old_shape, old_kinds) if d != 1]
    new = [j for j, d in enumerate(new_shape) if d != 1]
    kinds = [N] * len(new_shape)
    i = j = 0
    while i < len(old) and j < len(new):
        group, po, pn = [old[i][1]], old[i][0], new_shape[new[j]]
        members = [new[j]]
        i, j = i + 1, j + 1
        while po != pn:
            if po < pn and i < len(old):
                po *= old[i][0]
                group.append(old[i][1])
                i += 1
            elif pn < po and j < len(new):
                pn *= new_shape[new[j]]
                members.append(new[j])
                j += 1
            else:
                return None
        if len(set(group)) != 1:
            return None
        for m in members:
            kinds[m] = group[0]
    return tuple(kinds) if i == len(old) and j == len(new) else None


@_structural
def _reshape_rule(eqn, v: _Lora):
    new_shape = tuple(eqn.params["new_sizes"])
    if eqn.params.get("dimensions") is not None or 0 in v.shape:
        return "with dimensions"
    kinds = _reshape_kinds(v.shape, v.kinds, new_shape)
    if kinds is None:
        return f"{v.shape} -> {new_shape} mixes axes of different factors ({''.join(v.kinds)})"
    v = _as_broadcast(v, [i for i, d in enumerate(v.shape) if d == 1])
    r = v.left.shape[-1]
    left = v.left.reshape(*[new_shape[i] for i, k in enumerate(kinds) if k in (L, B)], r)
    right = v.right.reshape(*[new_shape[i] for i, k in enumerate(kinds) if k in (R, B)], r)
    return [dataclasses.replace(v, base=_on_base(eqn, [v], v)[0], left=left, right=right, kinds=kinds)]


@_structural
def _squeeze_rule(eqn, v: _Lora):
    dims = tuple(eqn.params["dimensions"])
    v = _as_broadcast(v, dims)
    kinds = tuple(k for i, k in enumerate(v.kinds) if i not in dims)
    return [dataclasses.replace(v, base=_on_base(eqn, [v], v)[0], kinds=kinds)]


@_structural
def _broadcast_rule(eqn, v: _Lora, *dyn):
    if dyn:
        return "with dynamic shapes"
    shape, dims = tuple(eqn.params["shape"]), tuple(eqn.params["broadcast_dimensions"])
    if list(dims) != sorted(dims):
        return "with permuting broadcast_dimensions"
    v = _as_broadcast(v, [i for i, d in enumerate(dims) if v.shape[i] == 1 and shape[d] != 1])
    kinds = [N] * len(shape)
    for i, d in enumerate(dims):
        kinds[d] = v.kinds[i]
    return [dataclasses.replace(v, base=_on_base(eqn, [v], v)[0], kinds=tuple(kinds))]


def _per_axis(v: _Lora, side: str, values: Sequence[Any], rank_value: Any) -> list[Any]:
    return [values[a] for a in v.axes(side)] + [rank_value]


@_structural
def _slice_rule(eqn, v: _Lora):
    p = eqn.params
    strides = p["strides"] or (1,) * v.ndim
    r = v.left.shape[-1]

    def cut(side):
        return lax.slice(
            v.factor(side),
            _per_axis(v, side, p["start_indices"], 0),
            _per_axis(v, side, p["limit_indices"], r),
            _per_axis(v, side, strides, 1),
        )

    return [dataclasses.replace(v, base=_on_base(eqn, [v], v)[0], left=cut(L), right=cut(R))]


@_structural
def _dynamic_slice_rule(eqn, v: _Lora, *starts):
    sizes = tuple(eqn.params["slice_sizes"])
    if len(starts) != v.ndim:
        return "with dynamic sizes"
    r = v.left.shape[-1]

    def cut(side):
        arr, axes = v.factor(side), v.axes(side)
        if all(sizes[a] == v.shape[a] for a in axes):  # a full-size axis always starts at 0 (clamped)
            return arr
        zero = jnp.zeros((), jnp.asarray(starts[0]).dtype)
        return lax.dynamic_slice(arr, _per_axis(v, side, starts, zero), _per_axis(v, side, sizes, r))

    base = _on_base(eqn, [v, *starts], v)[0]
    return [dataclasses.replace(v, base=base, left=cut(L), right=cut(R))]


@_structural
def _rev_rule(eqn, v: _Lora):
    dims = tuple(eqn.params["dimensions"])

    def flip(side):
        axes = v.axes(side)
        local = tuple(axes.index(d) for d in dims if d in axes)
        return lax.rev(v.factor(side), local) if local else v.factor(side)

    return [dataclasses.replace(v, base=_on_base(eqn, [v], v)[0], left=flip(L), right=flip(R))]


@_structural
def _split_rule(eqn, v: _Lora):
    axis, sizes = eqn.params["axis"], tuple(eqn.params["sizes"])

    def parts(side):
        axes = v.axes(side)
        if axis in axes:
            return lax.split(v.factor(side), sizes, axes.index(axis))
        return [v.factor(side)] * len(sizes)

    bases = _on_base(eqn, [v], v)
    return [dataclasses.replace(v, base=b, left=lf, right=rf) for b, lf, rf in zip(bases, parts(L), parts(R))]


@_structural
def _unstack_rule(eqn, v: _Lora):
    axis = eqn.params["axis"]
    v = _as_broadcast(v, [axis]) if v.shape[axis] == 1 else v
    kinds = tuple(k for i, k in enumerate(v.kinds) if i != axis)

    def pick(side, i):
        axes = v.axes(side)
        return lax.index_in_dim(v.factor(side), i, axes.index(axis), keepdims=False) if axis in axes else v.factor(side)

    bases = _on_base(eqn, [v], v)
    return [dataclasses.replace(v, base=b, left=pick(L, i), right=pick(R, i), kinds=kinds) for i, b in enumerate(bases)]


@_structural
def _neg_rule(eqn, v: _Lora):
    return [dataclasses.replace(v, base=_on_base(eqn, [v], v)[0], scale=-v.scale)]


def _scalar_rule(ctx: _Context, eqn, invals):
    """``W * c``, ``c * W`` and ``W / c`` for a scalar ``c``: the factor ``right`` absorbs ``c``."""
    x, y = invals
    name = eqn.primitive.name
    if name == "mul" and _is_lora(y) and not _is_lora(x):
        x, y = y, x
    if _is_lora(x) and _is_lora(y):
        return _materialize_rule(ctx, eqn, invals, "of two LoRA values")
    if not _is_lora(x):
        return _materialize_rule(ctx, eqn, invals, "by a LoRA value")
    if np.shape(y) != ():
        return _materialize_rule(ctx, eqn, invals, "by a non-scalar")
    c = jnp.asarray(y).astype(x.right.dtype)
    right = x.right * c if name == "mul" else x.right / c
    base = _on_base(eqn, invals, x)[0]
    return [dataclasses.replace(x, base=base, right=right)]


def _passthrough_rule(ctx: _Context, eqn, invals):
    """Ops that return their operands unchanged in value (copies, placement, sharding annotations)."""
    if len(eqn.outvars) != len(invals):
        return _materialize_rule(ctx, eqn, invals)
    outs = _bind(eqn, [v.base if _is_lora(v) and not isinstance(v.base, _Lazy) else v for v in invals])
    return [
        (v if isinstance(v.base, _Lazy) else dataclasses.replace(v, base=o)) if _is_lora(v) else o
        for v, o in zip(invals, outs)
    ]


@_structural
def _stop_gradient_rule(eqn, v: _Lora):
    return [
        dataclasses.replace(
            v,
            base=_on_base(eqn, [v], v)[0],
            left=lax.stop_gradient(v.left),
            right=lax.stop_gradient(v.right),
            col=None if v.col is None else lax.stop_gradient(v.col),
        )
    ]


# ------------------------------------------------------------------------------------------- products


def _unique(xs):
    return list(dict.fromkeys(xs))


def _dot_general_rule(ctx: _Context, eqn, invals):
    """``dot_general(x, W) = dot_general(x, W0) + ((dropout(x) . F1) . F2) * s`` with einsum labels.

    Every axis gets a label: ``x``'s axes, the weight's free axes and the rank. ``F1`` is the factor that
    holds the contracted axes of the weight, so the first product shrinks ``x`` to rank ``r``; ``N``-kind
    weight axes are summed out of ``x`` (contracted), kept (batch) or broadcast at the end (free).
    """
    lhs, rhs = invals
    if _is_lora(lhs) and _is_lora(rhs):
        if lhs.gathered and not rhs.gathered:
            lhs = ctx.materialize(lhs, "dot_general (both operands are LoRA values)", 0)
        else:
            rhs = ctx.materialize(rhs, "dot_general (both operands are LoRA values)", 1)
        return _dot_general_rule(ctx, eqn, [lhs, rhs])
    w_is_rhs = _is_lora(rhs)
    w, x = (rhs, lhs) if w_is_rhs else (lhs, rhs)
    if w.gathered:
        return _bind(eqn, _dense_all(ctx, invals, "dot_general", "in"))
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    xc, wc, xb, wb = (lc, rc, lb, rb) if w_is_rhs else (rc, lc, rb, lb)
    if w.col is not None and any(i in wc for i in _col_axes(w)):
        return _materialize_rule(ctx, eqn, invals, "DoRA kernel whose output axes are contracted")
    x_pos = 0 if w_is_rhs else 1
    base_out = _base_out(eqn, invals, w, x_pos)
    if _rank0(w):  # a quantised kernel without an adapter
        return [base_out]

    x_lab = list(range(x.ndim))
    w_lab: list[int | None] = [None] * w.ndim
    for a, b in [*zip(xc, wc), *zip(xb, wb)]:
        w_lab[b] = x_lab[a]
    nxt = x.ndim
    for i in range(w.ndim):
        if w_lab[i] is None:
            w_lab[i], nxt = nxt, nxt + 1
    rank = nxt
    l_lab, r_lab = (x_lab, w_lab) if w_is_rhs else (w_lab, x_lab)
    out_lab = (
        [l_lab[i] for i in lb]
        + [l for i, l in enumerate(l_lab) if i not in lc and i not in lb]
        + [l for i, l in enumerate(r_lab) if i not in rc and i not in rb]
    )

    contracted = {x_lab[a] for a in xc}
    only = {side: {w_lab[i] for i, k in enumerate(w.kinds) if k == side} for side in (L, R)}
    first = R if (contracted & only[R]) and not (contracted & only[L]) else L
    second = R if first == L else L
    f1_lab = [w_lab[i] for i in w.axes(first)] + [rank]
    f2_lab = [w_lab[i] for i in w.axes(second)] + [rank]

    kw = dict(precision=eqn.params.get("precision"), preferred_element_type=eqn.params.get("preferred_element_type"))
    keep = set(f2_lab) | set(out_lab)
    h_lab = [l for l in _unique(x_lab + f1_lab) if l in keep]
    xd = _dropout(x, w)
    h = jnp.einsum(xd, x_lab, w.factor(first).astype(w.dtype), f1_lab, h_lab, **kw)
    if w.rowmask is not None:  # a mixed-adapter batch: row i keeps the rank columns of its own slot
        row = x_lab[0] if x.ndim else None
        if row not in h_lab or x.shape[0] != w.rowmask.shape[0]:
            raise UnsupportedError(
                f"lora.transform: the mixed-adapter weight at {w.name!r} meets activations of shape "
                f"{tuple(x.shape)} whose first axis is {'contracted' if row not in h_lab else 'not'} the batch of "
                f"{w.rowmask.shape[0]} rows (one adapter id per row); a mixed batch needs the rows on the "
                "activations' first axis, kept by every product with the kernel"
            )
        h = h * lax.broadcast_in_dim(w.rowmask.astype(h.dtype), h.shape, [h_lab.index(row), h_lab.index(rank)])
    y_lab = [l for l in out_lab if l in set(h_lab) | set(f2_lab)]
    y = jnp.einsum(h, h_lab, w.factor(second).astype(w.dtype), f2_lab, y_lab, **kw)
    y = y if w.scale == 1.0 else y * jnp.asarray(w.scale, y.dtype)
    if len(y_lab) < len(out_lab):
        y = lax.broadcast_in_dim(y, base_out.shape, [out_lab.index(l) for l in y_lab])
    ctx.note_factored("dot_general")
    if w.col is None:
        return [base_out + y.astype(base_out.dtype)]
    # DoRA, as lora_jax.ops.dot: (x @ W0 + s*(x A) B) * col; with dropout the magnitude's share of the base
    # path sees the dropped input: x @ W0 + (col - 1) * (xd @ W0) + col * s*(xd A) B.
    col = lax.broadcast_in_dim(
        w.col.astype(base_out.dtype), base_out.shape, [out_lab.index(w_lab[i]) for i in _col_axes(w)]
    )
    if xd is x:
        return [(base_out + y.astype(base_out.dtype)) * col]
    base_d = _base_out(eqn, [xd, w] if w_is_rhs else [w, xd], w, x_pos)
    return [base_out + (col - 1) * base_d + col * y.astype(base_out.dtype)]


def _ragged_dot_rule(ctx: _Context, eqn, invals):
    """``ragged_dot(x, W, group_sizes)`` with ``W`` an expert stack ``(E, d_in, d_out)`` holding per-expert
    adapters: ``ragged_dot(x, W0) + ragged_dot(ragged_dot(dropout(x), A), B) * s``, all three on the same
    ``group_sizes`` (the tokens' one sort by expert).

    Handled: ``W`` the right operand of a ragged (non-contracting) product without batch axes, its group axis
    a stack axis (kind ``B``), its contracted axes held by one factor and its free axes by the other (so also
    ``x @ W[e].T`` through a transpose). Anything else gets the dense stack."""
    lhs, rhs, sizes = invals
    p = eqn.params
    dims = p["ragged_dot_dimension_numbers"]
    (lc, rc), (lb, rb) = dims.dot_dimension_numbers
    if _is_lora(lhs) or _is_lora(sizes) or lb or rb or p.get("group_offset") is not None:
        return _materialize_rule(ctx, eqn, invals, "LoRA value outside the grouped kernel, or batch axes")
    (ragged,), (group,) = tuple(dims.lhs_ragged_dimensions), tuple(dims.rhs_group_dimensions)
    free = [i for i in range(rhs.ndim) if i != group and i not in rc]
    first = rhs.kinds[rc[0]] if rc else None
    second = R if first == L else L
    if (
        ragged in lc
        or rhs.kinds[group] != B
        or first not in (L, R)
        or any(rhs.kinds[i] != first for i in rc)
        or any(rhs.kinds[i] != second for i in free)
    ):
        return _materialize_rule(
            ctx,
            eqn,
            invals,
            f"expert kernel axis kinds {''.join(rhs.kinds)} do not separate "
            "the expert axis, the inputs and the outputs",
        )
    kw = dict(precision=p.get("precision"), preferred_element_type=p.get("preferred_element_type"))
    base_out = _base_out(eqn, [lhs, rhs, sizes], rhs, 0)
    if _rank0(rhs):
        return [base_out]
    f1_axes, f2_axes = rhs.axes(first), rhs.axes(second)
    f1 = rhs.factor(first).astype(rhs.dtype)  # axes: f1_axes + rank
    h = lax.ragged_dot_general(
        _dropout(lhs, rhs),
        f1,
        sizes,
        lax.RaggedDotDimensionNumbers(
            dot_dimension_numbers=((tuple(lc), tuple(f1_axes.index(i) for i in rc)), ((), ())),
            lhs_ragged_dimensions=(ragged,),
            rhs_group_dimensions=(f1_axes.index(group),),
        ),
        **kw,
    )
    # h: x's free axes (the ragged one among them) then the rank
    x_free = [i for i in range(lhs.ndim) if i not in lc]
    f2 = rhs.factor(second).astype(rhs.dtype)  # axes: f2_axes + rank
    y = lax.ragged_dot_general(
        h,
        f2,
        sizes,
        lax.RaggedDotDimensionNumbers(
            dot_dimension_numbers=(((h.ndim - 1,), (f2.ndim - 1,)), ((), ())),
            lhs_ragged_dimensions=(x_free.index(ragged),),
            rhs_group_dimensions=(f2_axes.index(group),),
        ),
        **kw,
    )
    y = y if rhs.scale == 1.0 else y * jnp.asarray(rhs.scale, y.dtype)
    ctx.note_factored("ragged_dot_general")
    return [base_out + y.astype(base_out.dtype)]


def _conv_rule(ctx: _Context, eqn, invals):
    """``conv(x, W) = conv(x, W0) + (conv(dropout(x), K) . F_out) * s`` where ``K`` is the factor holding the
    kernel's spatial and input-feature axes with the rank as its output features."""
    x, w = invals
    p = eqn.params
    if _is_lora(x):
        return _materialize_rule(ctx, eqn, invals, "LoRA value as the convolution input")
    if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
        return _materialize_rule(ctx, eqn, invals, "grouped convolution")
    _, rhs_spec, out_spec = p["dimension_numbers"]
    o_ax = rhs_spec[0]
    outer = w.kinds[o_ax]
    inner = R if outer == L else L
    rest = [a for a in range(w.ndim) if a != o_ax]
    if outer not in (L, R) or any(w.kinds[a] != inner and not (w.kinds[a] == N and w.shape[a] == 1) for a in rest):
        return _materialize_rule(
            ctx, eqn, invals, f"kernel axis kinds {''.join(w.kinds)} do not separate output features from the rest"
        )
    r = w.left.shape[-1]
    kernel = w.factor(inner).reshape(*[w.shape[a] for a in rest], r)  # size-1 N axes come back as 1s
    kernel = jnp.moveaxis(kernel, -1, o_ax).astype(w.dtype)
    base_out = _base_out(eqn, [x, w], w, 0)
    if _rank0(w):
        return [base_out]
    h = _bind(eqn, [_dropout(x, w), kernel])[0]
    f = out_spec[1]
    h_lab = list(range(h.ndim))
    rank, d_out = h.ndim, h.ndim + 1
    h_lab[f] = rank
    y_lab = list(range(h.ndim))
    y_lab[f] = d_out
    y = jnp.einsum(
        h,
        h_lab,
        w.factor(outer).astype(w.dtype),
        [d_out, rank],
        y_lab,
        precision=p.get("precision"),
        preferred_element_type=p.get("preferred_element_type"),
    )
    ctx.note_factored("conv_general_dilated")
    return [base_out + (y * jnp.asarray(w.scale, y.dtype)).astype(base_out.dtype)]


def _gather_rule(ctx: _Context, eqn, invals):
    """Embedding lookups ``table[ids]``: gather rows of the factor that holds the indexed axes; the result
    is a LoRA value over the gathered rows (activation-sized)."""
    v, idx = invals
    p = eqn.params
    dn, sizes = p["dimension_numbers"], tuple(p["slice_sizes"])
    if not _is_lora(v) or _is_lora(idx) or dn.operand_batching_dims:
        return _materialize_rule(ctx, eqn, invals, "batched gather")
    if v.rowmask is not None:
        raise UnsupportedError(
            f"lora.transform: the mixed-adapter weight at {v.name!r} is indexed (an embedding "
            "lookup); transform runs mixed batches through products only. Leave embeddings out "
            "of the stacked adapters, or run the model with lora_jax.ops.embed"
        )
    indexed = set(dn.start_index_map) | set(dn.collapsed_slice_dims)
    kinds = {v.kinds[a] for a in indexed}
    side = kinds.pop() if len(kinds) == 1 else None
    if side not in (L, R) or any(sizes[a] != v.shape[a] for a in range(v.ndim) if a not in indexed):
        return _materialize_rule(ctx, eqn, invals, "indices over several factors or partial slices")
    other = R if side == L else L
    axes = v.axes(side)
    pos = {a: i for i, a in enumerate(axes)}
    factor = v.factor(side)
    n_batch = idx.ndim - 1
    n_offset = factor.ndim - len(dn.collapsed_slice_dims)
    fdn = lax.GatherDimensionNumbers(
        offset_dims=tuple(range(n_batch, n_batch + n_offset)),
        collapsed_slice_dims=tuple(pos[a] for a in dn.collapsed_slice_dims),
        start_index_map=tuple(pos[a] for a in dn.start_index_map),
    )
    gathered = lax.gather(
        factor,
        idx,
        fdn,
        tuple(sizes[a] for a in axes) + (factor.shape[-1],),
        mode=p["mode"],
        fill_value=p["fill_value"],
        unique_indices=p["unique_indices"],
        indices_are_sorted=p["indices_are_sorted"],
    )
    # The original output: batch axes where offset_dims are not, operand axes (not collapsed) at offset_dims.
    kept_axes = [a for a in range(v.ndim) if a not in dn.collapsed_slice_dims]
    kept_in_factor = [a for a in axes if a not in dn.collapsed_slice_dims]
    out_kinds, perm, n_b, n_o = [], [], 0, 0
    for q in range(n_batch + len(dn.offset_dims)):
        if q in dn.offset_dims:
            a = kept_axes[n_o]
            n_o += 1
            out_kinds.append(v.kinds[a])
            if v.kinds[a] in (side, B):
                perm.append(n_batch + kept_in_factor.index(a))
        else:
            out_kinds.append(side)
            perm.append(n_b)
            n_b += 1
    gathered = gathered.transpose(perm + [gathered.ndim - 1])
    base = _on_base(eqn, [v, idx], v)[0]
    out = dataclasses.replace(
        v,
        base=base,
        kinds=tuple(out_kinds),
        gathered=True,
        **{("left" if side == L else "right"): gathered, ("right" if side == L else "left"): v.factor(other)},
    )
    return [out]


# ---------------------------------------------------------------------------------------- control flow


def _call_rule(ctx: _Context, eqn, invals):
    """``jit`` / ``closed_call``: inline the callee (LoRA values may flow in and out)."""
    jaxpr = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    return _eval_closed(ctx, jaxpr, invals)


def _remat_rule(ctx: _Context, eqn, invals):
    """``checkpoint``: the callee re-wrapped in ``jax.checkpoint`` with the same policy."""
    p = eqn.params

    def body(*args):
        return _eval_closed(ctx, p["jaxpr"], args)

    return list(jax.checkpoint(body, prevent_cse=p.get("prevent_cse", True), policy=p.get("policy"))(*invals))


def _custom_rule(ctx: _Context, eqn, invals):
    return _materialize_rule(ctx, eqn, invals, "its custom derivative rule takes the dense kernel")


def _scan_rule(ctx: _Context, eqn, invals):
    """``scan``: LoRA constants stay LoRA inside the body; a LoRA value scanned over (a stacked kernel) is
    sliced per step, base and factors alike; a LoRA value in the carry is materialised."""
    p = eqn.params
    nc, nk = p["num_consts"], p["num_carry"]
    consts, init, xs = invals[:nc], invals[nc : nc + nk], invals[nc + nk :]
    init = _dense_all(ctx, init, "scan (LoRA value in the carry)", "carry")
    xs_in = []
    for v in xs:
        if _is_lora(v):
            if isinstance(v.base, _Lazy):
                raise UnsupportedError(
                    f"lora.transform: the quantised kernel at {v.name!r} {v.shape} is scanned over (a stacked "
                    "layer axis); a quantised stack cannot be sliced per layer. Quantise the layers unstacked, or "
                    "lora.dequantize this kernel before transform"
                )
            keys = None if v.key is None else jax.random.split(v.key, p["length"])
            xs_in.append(
                (v.base, v.left if v.kinds[0] in (L, B) else None, v.right if v.kinds[0] in (R, B) else None, keys)
            )
        else:
            xs_in.append(v)

    def body(carry, x):
        xvals = []
        for v, xi in zip(xs, x):
            if _is_lora(v):
                base, left, right, key = xi
                xvals.append(
                    dataclasses.replace(
                        v,
                        base=base,
                        left=v.left if left is None else left,
                        right=v.right if right is None else right,
                        key=key,
                        kinds=v.kinds[1:],
                    )
                )
            else:
                xvals.append(xi)
        outs = _eval_closed(ctx, p["jaxpr"], [*consts, *carry, *xvals])
        outs = _dense_all(ctx, outs, "scan (LoRA value as a carry or output)", "out")
        return outs[:nk], outs[nk:]

    carry, ys = lax.scan(
        body,
        list(init),
        xs_in,
        length=p["length"],
        reverse=p["reverse"],
        unroll=p["unroll"],
        _split_transpose=p.get("_split_transpose", False),
    )
    return [*carry, *ys]


def _while_rule(ctx: _Context, eqn, invals):
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cond_consts, body_consts = invals[:cn], invals[cn : cn + bn]
    init = _dense_all(ctx, invals[cn + bn :], "while (LoRA value in the carry)", "carry")

    def cond_fn(carry):
        return _eval_closed(ctx, p["cond_jaxpr"], [*cond_consts, *carry])[0]

    def body_fn(carry):
        outs = _eval_closed(ctx, p["body_jaxpr"], [*body_consts, *carry])
        return _dense_all(ctx, outs, "while (LoRA value in the carry)", "out")

    return list(lax.while_loop(cond_fn, body_fn, list(init)))


def _cond_rule(ctx: _Context, eqn, invals):
    index, *operands = invals
    if _is_lora(index):
        return _materialize_rule(ctx, eqn, invals)

    def branch(jaxpr, k):
        def run(*args):
            outs = _eval_closed(ctx, jaxpr, args)
            return _dense_all(ctx, outs, "cond (LoRA value as a branch output)", ("out", k))

        return run

    return list(lax.switch(index, [branch(j, k) for k, j in enumerate(eqn.params["branches"])], *operands))


# Ops that keep a DoRA value's axes in place (its column factor stays valid); any other op on one gets the
# dense DoRA kernel.
_COL_SAFE = frozenset(
    {
        "convert_element_type",
        "copy",
        "copy_p",
        "device_put",
        "sharding_constraint",
        "stop_gradient",
        "neg",
        "mul",
        "div",
        "dot_general",
        "jit",
        "pjit",
        "closed_call",
        "core_call",
        "remat",
        "remat2",
        "checkpoint",
        "cond",
        "while",
    }
)

_RULES: dict[str, Callable] = {
    "transpose": _transpose_rule,
    "convert_element_type": _convert_rule,
    "reshape": _reshape_rule,
    "squeeze": _squeeze_rule,
    "broadcast_in_dim": _broadcast_rule,
    "slice": _slice_rule,
    "dynamic_slice": _dynamic_slice_rule,
    "rev": _rev_rule,
    "split": _split_rule,
    "unstack": _unstack_rule,
    "neg": _neg_rule,
    "mul": _scalar_rule,
    "div": _scalar_rule,
    "copy": _passthrough_rule,
    "copy_p": _passthrough_rule,
    "device_put": _passthrough_rule,
    "sharding_constraint": _passthrough_rule,
    "stop_gradient": _stop_gradient_rule,
    "dot_general": _dot_general_rule,
    "ragged_dot_general": _ragged_dot_rule,
    "conv_general_dilated": _conv_rule,
    "gather": _gather_rule,
    "jit": _call_rule,
    "pjit": _call_rule,
    "closed_call": _call_rule,
    "core_call": _call_rule,
    "remat": _remat_rule,
    "remat2": _remat_rule,
    "checkpoint": _remat_rule,
    "custom_jvp_call": _custom_rule,
    "custom_vjp_call": _custom_rule,
    "custom_vjp_call_jaxpr": _custom_rule,
    "scan": _scan_rule,
    "while": _while_rule,
    "cond": _cond_rule,
}


# ------------------------------------------------------------------------------------------- public API


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _is_weight(x: Any) -> bool:
    return _core.is_lora_weight(x) or isinstance(x, _multi.MultiLoraWeight) or _targets.is_weight_node(x)


def _run(fn: Callable, args: tuple, kwargs: dict, ctx: _Context) -> PyTree:
    flat, treedef = jax.tree_util.tree_flatten_with_path((args, kwargs), is_leaf=_is_weight)
    leaves = [leaf for _, leaf in flat]
    dyn_pos, values, traced = [], [], []
    for i, (path, leaf) in enumerate(flat):
        if _is_weight(leaf):
            name = _targets.path_str(path[1:])
            if _core.is_lora_weight(leaf):
                ctx.weights.append(name)
                values.append(_from_weight(leaf, name))
            elif isinstance(leaf, _multi.MultiLoraWeight):
                ctx.weights.append(name)
                values.append(_from_multi(leaf, name))
            else:
                values.append(_from_node(leaf, name))
            dyn_pos.append(i)
            base = values[-1].base
            # fn is traced with a stand-in of the kernel's shape and dtype; a quantised kernel stays quantised
            traced.append(jax.ShapeDtypeStruct(base.shape, base.dtype) if isinstance(base, _Lazy) else base)
        elif _is_array(leaf):  # Python scalars, strings, ... stay static (e.g. ``train=True``)
            dyn_pos.append(i)
            values.append(leaf)
            traced.append(leaf)

    def flat_fn(*dyn):
        full = list(leaves)
        for i, x in zip(dyn_pos, dyn):
            full[i] = x
        a, k = jax.tree_util.tree_unflatten(treedef, full)
        return fn(*a, **k)

    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*traced)
    outs = _eval_closed(ctx, closed, values)
    outs = _dense_all(ctx, outs, "output (fn returns a LoRA value)", "output")
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)


def transform(fn: Callable, *, report: bool = False, strict: bool = False) -> Callable:
    """Make ``fn`` compute in factored LoRA form on the :class:`~lora_jax.core.LoraWeight` leaves of its
    arguments.

    Args:
      fn: any JAX-traceable function (a Flax ``apply``, an ``nnx.merge``-then-call, a loss, ...). Array
        leaves of its arguments are traced; other leaves (Python numbers, strings) are passed as static.
      report: if true the returned function returns ``(out, Report)``; the report is static data, so this
        works under ``jax.jit`` too.
      strict: raise ``ValueError`` (naming the primitive and the weight) instead of materialising a dense
        kernel.

    Returns:
      A function with ``fn``'s signature that accepts pytrees with ``LoraWeight`` leaves (from
      ``lora.wrap``) anywhere in its arguments. Every ``dot_general`` / ``conv_general_dilated`` /
      ``gather`` / ``ragged_dot_general`` consuming such a weight, through transposes, casts, reshapes, slices, ``jit``,
      ``checkpoint``, ``scan``, ``while`` and ``cond``, runs as ``x @ W0 + ((dropout(x) @ A) @ B) * s``.
      It is ordinary JAX: jit it (eager calls re-trace ``fn`` each time), differentiate it.

    >>> import jax, jax.numpy as jnp, lora_jax as lora
    >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
    >>> adapters = lora.init(params, r=2, targets="dense/kernel")
    >>> f = lora.transform(lambda p, x: x @ p["dense"]["kernel"])
    >>> f(lora.wrap(params, adapters), jnp.ones((2, 4))).shape
    (2, 3)
    """

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        ctx = _Context(strict)
        out = _run(fn, args, kwargs, ctx)
        return (out, ctx.report()) if report else out

    return wrapped


def transform_report(fn: Callable, *args, **kwargs) -> Report:
    """Trace ``transform(fn)(*args, **kwargs)`` abstractly (no computation) and report what was factored
    and what was materialised, by reason."""
    return jax.eval_shape(transform(fn, report=True), *args, **kwargs)[1]


# ------------------------------------------------------------------------------------- stacked adapters


def init_stacked(params: PyTree, r: int = 8, *, stack_axes: int = 1, key: Array | None = None, **init_kwargs) -> PyTree:
    """Per-layer adapters for a tree whose leaves are all stacked along ``stack_axes`` leading axes.

    For the params of a Flax ``nn.scan`` module (kernels ``(L, d_in, d_out)``) this returns
    :class:`~lora_jax.core.LoraAdapter` leaves with ``a: (L, d_in, r)``, ``b: (L, r, d_out)`` and
    ``in_shape = (L, d_in)``, each layer initialised independently as :func:`lora_jax.init` would (see the
    module docstring for why this representation merges and wraps with the ordinary functions).

    Args:
      params: a subtree whose leaves share their leading ``stack_axes`` dimensions.
      r: the rank; ``stack_axes``: how many leading axes are layers; ``key``: PRNG key (``None``: key 0).
      **init_kwargs: passed to :func:`lora_jax.init` (``targets``, ``alpha``, ``dropout``, ``in_axes``, ...),
        whose rules see the per-layer paths and shapes.
    """
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves:
        raise ArgumentError("init_stacked: params has no array leaves")
    stack = tuple(leaves[0].shape[:stack_axes])
    bad = [
        (p, tuple(x.shape))
        for p, x in _targets.leaf_paths(params)
        if tuple(x.shape[:stack_axes]) != stack or x.ndim <= stack_axes
    ]
    if bad or len(stack) != stack_axes:
        raise ArgumentError(
            f"init_stacked: every leaf must lead with the same {stack_axes} stack axes {stack}; these do not: {bad[:5]}"
        )
    per_layer = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape[stack_axes:], x.dtype), params)
    keys = jax.random.split(jax.random.key(0) if key is None else key, math.prod(stack))
    init_kwargs = {"layer_axes": {".*": 0}, **init_kwargs}  # the per-layer shapes are what init sees
    flat = jax.jit(jax.vmap(lambda k: _core.init(per_layer, r, key=k, **init_kwargs)))(keys)

    def restack(ad):
        return dataclasses.replace(
            ad,
            a=ad.a.reshape(*stack, *ad.a.shape[1:]),
            b=ad.b.reshape(*stack, *ad.b.shape[1:]),
            in_shape=(*stack, *ad.in_shape),
        )

    return jax.tree_util.tree_map(restack, flat, is_leaf=_core.is_adapter)


__all__ = ["Report", "init_stacked", "transform", "transform_report"]
