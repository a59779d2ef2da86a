"""Products that understand adapter leaves.

Model code calls these instead of ``jnp.dot`` / ``jnp.einsum`` / indexing. On a plain array they are the
ordinary ``jnp`` operation; on a :class:`~lora_jax.core.LoraWeight` they compute the factored form

    x @ W0 + ((dropout(x) @ A) @ B) * scale

so that backpropagation through them forms gradients for ``A`` (d_in x r) and ``B`` (r x d_out) and for the
activations, but never a d_in x d_out gradient for the frozen ``W0``. The low-rank path runs in the dtype
of the base product (bf16 compute with float32 adapters casts the adapters down, and their gradients back
up).

Two variants ride on the same products:

- a quantised base (:class:`~lora_jax.quant.QuantizedWeight`, QLoRA) is dequantised block-wise to its
  compute dtype inside the computation, under ``jax.checkpoint``: backpropagation dequantises it again
  rather than keeping a dense copy of every layer alive between the forward and the backward pass;
- a DoRA adapter (``adapter.magnitude`` set) rescales each output feature:
  ``m / ||W0 + s*A@B|| * (x @ W0 + s * (x @ A) @ B)`` with the norm held constant for the gradient
  (``stop_gradient``, as the DoRA paper and PEFT do). With dropout active it follows PEFT exactly:
  ``x @ W0 + (m/n - 1) * (x' @ W0) + m/n * s * (x' @ A) @ B`` where ``x'`` is the dropped-out input.

Other weight types bring their own products by duck typing: a weight with a ``lora_dot`` / ``lora_einsum`` /
``lora_embed`` / ``lora_astype`` method gets the call (e.g. :class:`lora_jax.multi.MultiLoraWeight`: several
adapters in one batch, row by row).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from lora_jax import core as _core
from lora_jax.core import LoraWeight
from lora_jax.errors import ArgumentError, UnsupportedError
from lora_jax.quant import QuantizedWeight, is_quantized

Array = jax.Array


def adapter_dropout(x: Array, w: LoraWeight) -> Array:
    """The adapter's input: ``x`` with ``w``'s LoRA dropout applied (``x`` itself without a key or a rate)."""
    rate = w.adapter.dropout
    if w.key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(w.key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))


def _dropout_active(w: LoraWeight) -> bool:
    return w.key is not None and w.adapter.dropout > 0.0


def _dense_tensordot(x: Array, w: Array, axes: int, precision) -> Array:
    if axes == 1:
        return jnp.matmul(x, w, precision=precision) if w.ndim == 2 else jnp.tensordot(x, w, 1, precision=precision)
    return jnp.tensordot(x, w, axes, precision=precision)


def _tie(w, x: Array):
    """``w`` (an array or a quantised kernel) unchanged in value but computed after ``x``.

    So the compiler cannot hoist each layer's dequantisation (or DoRA norm) to the start of the step and hold
    every layer's dense kernel at once. ``lax.optimization_barrier`` says exactly this, but XLA's CPU backend
    drops barriers; there (on one device) ``w`` is made data-dependent on ``x`` instead: ``x[0] * 0``
    converted to an integer is 0 for every ``x`` (XLA converts NaN and infinities to 0 too). On several devices
    that element would have to be broadcast, so the barrier is used there.
    """
    if jax.default_backend() != "cpu" or jax.device_count() > 1:
        _, w = jax.lax.optimization_barrier((x, w))
        return w
    zero = (x.reshape(-1)[0] * 0).astype(jnp.uint8)
    if is_quantized(w):
        return dataclasses.replace(w, codes=w.codes + zero.astype(w.codes.dtype))
    return w + zero.astype(w.dtype)


def with_base(product, x: Array, w: Array | QuantizedWeight, *aux: Array) -> Array:
    """``product(x, dense_w, *aux)`` for a ``product`` linear in ``x``; ``aux`` are non-differentiable operands
    (the group sizes of a grouped product).

    A quantised ``w`` is dequantised right where it is used, after ``x`` is known (:func:`_tie`), and its
    custom VJP keeps only the quantised kernel for the backward pass, which dequantises it again after the
    incoming cotangent is known (as bitsandbytes does). No cotangent flows into ``w``: a quantised base is
    frozen.
    """
    if not is_quantized(w):
        return product(x, w, *aux)
    x_shape = jax.ShapeDtypeStruct(x.shape, x.dtype)

    @jax.custom_vjp
    def run(x, q, *aux):
        return product(x, _tie(q, x).dequantize(), *aux)

    def fwd(x, q, *aux):
        return run(x, q, *aux), (q, aux)

    def bwd(res, dy):
        q, aux = res
        dense = _tie(q, dy).dequantize()
        (dx,) = jax.linear_transpose(lambda x: product(x, dense, *aux), x_shape)(dy)
        return (dx, None, *(None for _ in aux))

    run.defvjp(fwd, bwd)
    return run(x, w, *aux)


def _tensordot(x: Array, w: Array | QuantizedWeight, axes: int, precision) -> Array:
    return with_base(lambda x, w: _dense_tensordot(x, w, axes, precision), x, w)


def _dora_factor(x: Array, w: LoraWeight, dtype) -> Array:
    """``m / ||W0 + s*A@B||`` per output feature, ``(*out_shape)`` in ``dtype``, the norm a constant.
    (Tied to ``x`` so that each layer forms its ``W0 + s*A@B`` only when it runs.)"""
    ad = w.adapter
    norm = jax.lax.stop_gradient(_core.dora_norm(_tie(w.base, x), ad))
    return (ad.magnitude.astype(jnp.float32) / norm).astype(dtype).reshape(ad.out_shape)


def dot(x: Array, w: Array | LoraWeight, axes: int = 1, *, precision=None) -> Array:
    """Contract the last ``axes`` axes of ``x`` with the first ``axes`` axes of ``w`` (``jnp.tensordot``).

    Shapes: ``x (..., *in_shape)``, ``w (*in_shape, *out_shape)`` -> ``(..., *out_shape)``. With
    ``axes=1`` and a 2-D ``w`` this is ``x @ w``.
    """
    if hasattr(w, "lora_dot"):  # a weight type that brings its own product (lora_jax.multi)
        return w.lora_dot(x, axes, precision=precision)
    if not isinstance(w, LoraWeight):
        return _tensordot(x, w, axes, precision)
    ad = w.adapter
    if len(ad.in_shape) != axes or tuple(x.shape[x.ndim - axes :]) != ad.in_shape:
        raise ArgumentError(
            f"lora dot: input of shape {tuple(x.shape)} contracting {axes} axes does not fit an "
            f"adapter whose kernel inputs are {ad.in_shape} (kernel {ad.kernel_shape})"
        )
    y = _tensordot(x, w.base, axes, precision)
    batch = x.shape[: x.ndim - axes]
    xd = adapter_dropout(x, w)
    # The low-rank path runs on a 2-D (tokens, d_in) matrix: with the batch axes kept, autodiff forms
    # dB = h^T @ dy as a dot contracting several axes, and XLA:CPU transposes the whole (tokens, d_out)
    # cotangent for it (benchmarks/train_step.py, adapters on every linear layer: 0.97x -> 0.75x of full fine-tuning).
    h = xd.reshape(math.prod(batch), math.prod(ad.in_shape))
    h = jnp.matmul(h, ad.a.astype(y.dtype), precision=precision)
    h = jnp.matmul(h, ad.b.astype(y.dtype), precision=precision) * jnp.asarray(ad.scale, y.dtype)
    h = h.reshape(*batch, *ad.out_shape)
    if not ad.is_dora:
        return y + h
    f = _dora_factor(x, w, y.dtype)
    if _dropout_active(w):
        return y + (f - 1) * _tensordot(xd, w.base, axes, precision) + f * h
    return f * (y + h)


def ragged_dot(
    x: Array, w: Array | LoraWeight, group_sizes: Array, *, precision=None, preferred_element_type=None
) -> Array:
    """The grouped product of a mixture of experts: each row of ``x`` times the kernel of its group.

    Shapes: ``x (m, d_in)`` with its rows sorted by group (group ``g`` holds rows
    ``sum(group_sizes[:g])`` up to ``sum(group_sizes[:g + 1])``; rows past ``sum(group_sizes)`` give 0),
    ``w (E, d_in, d_out)``, ``group_sizes (E,)`` integer -> ``(m, d_out)``. This is
    ``jax.lax.ragged_dot``; ``w`` may also be

    - a :class:`~lora_jax.quant.QuantizedWeight` of the stack (QLoRA): dequantised block-wise to its compute
      dtype inside the product and again in the backward pass (never stored between them);
    - a :class:`~lora_jax.core.LoraWeight` whose adapter is per expert (``a (E, d_in, r)``,
      ``b (E, r, d_out)``, from :func:`lora_jax.init` on a routed-expert stack): then
      ``ragged_dot(x, W0) + ragged_dot(ragged_dot(dropout(x), A), B) * scale``, the three products sharing the
      one sort of the tokens and its ``group_sizes``. Backpropagation forms ``(E, d_in, r)`` and ``(E, r, d_out)``
      gradients, never an ``(E, d_in, d_out)`` one, and no per-token kernel is ever gathered.

    (On GPU and TPU XLA runs ``ragged_dot`` as a grouped matmul; XLA:CPU lowers it to a dense product masked
    per group, which costs ``E`` times the FLOPs of the grouped one.)
    """
    if hasattr(w, "lora_ragged_dot"):
        return w.lora_ragged_dot(x, group_sizes, precision=precision, preferred_element_type=preferred_element_type)

    def product(x, w, group_sizes):
        return jax.lax.ragged_dot(x, w, group_sizes, precision=precision, preferred_element_type=preferred_element_type)

    base = w.base if isinstance(w, LoraWeight) else w
    if x.ndim != 2 or len(base.shape) != 3 or x.shape[1] != base.shape[1] or group_sizes.shape != base.shape[:1]:
        raise ArgumentError(
            f"lora ragged_dot: expected x (m, d_in), w (E, d_in, d_out) and group_sizes (E,), got x "
            f"{tuple(x.shape)}, w {tuple(base.shape)}, group_sizes {tuple(group_sizes.shape)}"
        )
    if not isinstance(w, LoraWeight):
        return with_base(product, x, w, group_sizes)
    ad = w.adapter
    if ad.is_dora:
        raise UnsupportedError(
            "lora ragged_dot: DoRA adapters on expert kernels are not supported (a DoRA "
            "magnitude per expert output is not implemented; PEFT refuses it there too)"
        )
    n_exp, d_in, d_out = base.shape
    if ad.stack_shape != (n_exp,) or ad.a.shape[1] != d_in or ad.b.shape[2] != d_out:
        raise ArgumentError(
            f"lora ragged_dot: the adapter (a {tuple(ad.a.shape)}, b {tuple(ad.b.shape)}) is not one "
            f"adapter per expert of the ({n_exp}, {d_in}, {d_out}) expert stack; expected a "
            f"({n_exp}, {d_in}, r) and b ({n_exp}, r, {d_out}) (lora.init on a routed-expert kernel)"
        )
    y = with_base(product, x, base, group_sizes)
    h = product(adapter_dropout(x, w), ad.a.astype(x.dtype), group_sizes)
    h = product(h, ad.b.astype(h.dtype), group_sizes)
    return y + (h * jnp.asarray(ad.scale, h.dtype)).astype(y.dtype)


def dense(x: Array, kernel: Array | LoraWeight, bias: Array | None = None, axes: int = 1, *, precision=None) -> Array:
    """``dot(x, kernel) + bias``."""
    y = dot(x, kernel, axes, precision=precision)
    return y if bias is None else y + bias.astype(y.dtype)


def parse_subscripts(subscripts: str) -> tuple[str, str, str]:
    """``"bsd,dh->bsh"`` as ``("bsd", "dh", "bsh")``: the input, weight and output subscripts of a two-operand
    einsum (``ArgumentError`` for any other form)."""
    try:
        inputs, out = subscripts.replace(" ", "").split("->")
        xs, ws = inputs.split(",")
    except ValueError:
        raise ArgumentError(
            f"lora einsum needs explicit 'x,w->out' subscripts with two operands, got {subscripts!r}"
        ) from None
    return xs, ws, out


def einsum(subscripts: str, x: Array, w: Array | LoraWeight, *, precision=None) -> Array:
    """``jnp.einsum(subscripts, x, w)`` where ``w`` may be a :class:`LoraWeight`.

    For a ``LoraWeight`` the subscripts must be explicit (``"bsd,dnh->bsnh"``), ``w`` must not use an
    ellipsis, its first ``len(in_shape)`` indices must be contracted with ``x`` and its remaining indices must
    appear in the output. The adapter term is computed as two einsums through the rank-r bottleneck.
    """
    if hasattr(w, "lora_einsum"):
        return w.lora_einsum(subscripts, x, precision=precision)
    if not isinstance(w, LoraWeight):
        return with_base(lambda x, w: jnp.einsum(subscripts, x, w, precision=precision), x, w)
    xs, ws, out = parse_subscripts(subscripts)
    ad = w.adapter
    n_in = len(ad.in_shape)
    if "." in ws or len(ws) != w.ndim:
        raise ArgumentError(f"lora einsum: weight subscripts {ws!r} must name each of its {w.ndim} axes explicitly")
    w_in, w_out = ws[:n_in], ws[n_in:]
    if any(c not in xs or c in out for c in w_in) or any(c in xs or c not in out for c in w_out):
        raise ArgumentError(
            f"lora einsum {subscripts!r}: the adapter's input axes {w_in!r} (kernel {ad.kernel_shape}) "
            f"must be contracted with x and its output axes {w_out!r} must be kept"
        )

    def base_product(x, w):
        return jnp.einsum(subscripts, x, w, precision=precision)

    y = with_base(base_product, x, w.base)
    rank = next(c for c in "ZYXWVUTSRQPONMLKJIHGFEDCBA" if c not in subscripts)
    x_kept = "".join(c for c in xs if c == "." or c in out)
    a = ad.a.astype(y.dtype).reshape(*ad.in_shape, ad.r)
    b = ad.b.astype(y.dtype).reshape(ad.r, *ad.out_shape)
    xd = adapter_dropout(x, w)
    h = jnp.einsum(f"{xs},{w_in}{rank}->{x_kept}{rank}", xd, a, precision=precision)
    h = jnp.einsum(f"{x_kept}{rank},{rank}{w_out}->{out}", h, b, precision=precision) * jnp.asarray(ad.scale, y.dtype)
    if not ad.is_dora:
        return y + h
    f = _to_output_layout(_dora_factor(x, w, y.dtype), w_out, out, y.ndim)
    if _dropout_active(w):
        return y + (f - 1) * with_base(base_product, xd, w.base) + f * h
    return f * (y + h)


def _to_output_layout(g: Array, w_out: str, out: str, ndim: int) -> Array:
    """``g`` of shape ``(*out_shape)`` (axes named by ``w_out``) transposed and reshaped to broadcast against
    an einsum output named by ``out`` (which may hold an ellipsis) with ``ndim`` axes."""
    kept = "".join(c for c in out if c in w_out)
    g = jnp.einsum(f"{w_out}->{kept}", g)
    pre, _, post = out.partition("...")
    names = [*pre, *([None] * (ndim - len(pre) - len(post)) if "..." in out else []), *post]
    return g.reshape([g.shape[kept.index(c)] if c is not None and c in w_out else 1 for c in names])


def embed(ids: Array, table: Array | LoraWeight) -> Array:
    """``table[ids]``; with a ``LoraWeight`` (an adapted embedding) ``table[ids] + (A[ids] @ B) * scale``."""
    if hasattr(table, "lora_embed"):
        return table.lora_embed(ids)
    if not isinstance(table, LoraWeight):
        return jnp.take(_core.as_dense(table, table.dtype) if is_quantized(table) else table, ids, axis=0)
    ad = table.adapter
    if ad.is_dora:
        raise UnsupportedError("lora embed: DoRA adapters on embedding tables are not supported")
    base = table.base
    y = jnp.take(_core.as_dense(base, base.dtype) if is_quantized(base) else base, ids, axis=0)
    h = jnp.take(ad.a.astype(y.dtype), ids, axis=0) @ ad.b.astype(y.dtype)
    return y + h * jnp.asarray(ad.scale, y.dtype)


def materialize(w: Array | LoraWeight) -> Array:
    """The dense kernel, for the rare operation that needs one (e.g. tying an output head to an adapted
    embedding). Forms ``W0 + dW``: use sparingly."""
    if isinstance(w, LoraWeight):
        return w.materialize()
    return w.dequantize() if is_quantized(w) else w


def astype(w: Array | LoraWeight, dtype) -> Array | LoraWeight:
    """Cast a kernel to the compute dtype; a ``LoraWeight`` casts its frozen base (its adapters are cast
    inside the products, so their float32 master copies keep receiving float32 gradients). A quantised
    kernel only records the dtype: the products dequantise straight to it."""
    if hasattr(w, "lora_astype"):
        return w.lora_astype(dtype)
    if isinstance(w, LoraWeight):
        return dataclasses.replace(w, base=astype(w.base, dtype))
    if is_quantized(w):
        return w.astype(dtype)
    return jnp.asarray(w).astype(dtype)
