"""Products that understand adapter leaves.

Model code calls these instead of ``jnp.dot`` / ``jnp.einsum`` / indexing. On a plain array they are the
ordinary ``jnp`` operation; on a :class:`~lora_jax.core.LoraWeight` they compute the factored form

    x @ W0 + ((dropout(x) @ A) @ B) * scale

so that backpropagation through them forms gradients for ``A`` (d_in x r) and ``B`` (r x d_out) and for the
activations, but never a d_in x d_out gradient for the frozen ``W0``. The low-rank path runs in the dtype
of the base product (bf16 compute with float32 adapters casts the adapters down, and their gradients back
up).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from lora_jax.core import LoraWeight

Array = jax.Array


def _dropout(x: Array, w: LoraWeight) -> Array:
    rate = w.adapter.dropout
    if w.key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(w.key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))


def _tensordot(x: Array, w: Array, axes: int, precision) -> Array:
    if axes == 1:
        return jnp.matmul(x, w, precision=precision) if w.ndim == 2 else jnp.tensordot(x, w, 1, precision=precision)
    return jnp.tensordot(x, w, axes, precision=precision)


def dot(x: Array, w: Array | LoraWeight, axes: int = 1, *, precision=None) -> Array:
    """Contract the last ``axes`` axes of ``x`` with the first ``axes`` axes of ``w`` (``jnp.tensordot``).

    Shapes: ``x (..., *in_shape)``, ``w (*in_shape, *out_shape)`` -> ``(..., *out_shape)``. With
    ``axes=1`` and a 2-D ``w`` this is ``x @ w``.
    """
    if not isinstance(w, LoraWeight):
        return _tensordot(x, w, axes, precision)
    ad = w.adapter
    if len(ad.in_shape) != axes or tuple(x.shape[x.ndim - axes:]) != ad.in_shape:
        raise ValueError(f"lora dot: input of shape {tuple(x.shape)} contracting {axes} axes does not fit an "
                         f"adapter whose kernel inputs are {ad.in_shape} (kernel {ad.kernel_shape})")
    y = _tensordot(x, w.base, axes, precision)
    batch = x.shape[: x.ndim - axes]
    h = _dropout(x, w).reshape(*batch, math.prod(ad.in_shape))
    h = jnp.matmul(h, ad.a.astype(y.dtype), precision=precision)
    h = jnp.matmul(h, ad.b.astype(y.dtype), precision=precision) * jnp.asarray(ad.scale, y.dtype)
    return y + h.reshape(*batch, *ad.out_shape)


def dense(x: Array, kernel: Array | LoraWeight, bias: Array | None = None, axes: int = 1, *, precision=None) -> Array:
    """``dot(x, kernel) + bias``."""
    y = dot(x, kernel, axes, precision=precision)
    return y if bias is None else y + bias.astype(y.dtype)


def _parse(subscripts: str) -> tuple[str, str, str]:
    try:
        inputs, out = subscripts.replace(" ", "").split("->")
        xs, ws = inputs.split(",")
    except ValueError:
        raise ValueError(f"lora einsum needs explicit 'x,w->out' subscripts with two operands, got {subscripts!r}")
    return xs, ws, out


def einsum(subscripts: str, x: Array, w: Array | LoraWeight, *, precision=None) -> Array:
    """``jnp.einsum(subscripts, x, w)`` where ``w`` may be a :class:`LoraWeight`.

    For a ``LoraWeight`` the subscripts must be explicit (``"bsd,dnh->bsnh"``), ``w`` must not use an
    ellipsis, its first ``len(in_shape)`` indices must be contracted with ``x`` and its remaining indices must
    appear in the output. The adapter term is computed as two einsums through the rank-r bottleneck.
    """
    if not isinstance(w, LoraWeight):
        return jnp.einsum(subscripts, x, w, precision=precision)
    xs, ws, out = _parse(subscripts)
    ad = w.adapter
    n_in = len(ad.in_shape)
    if "." in ws or len(ws) != w.ndim:
        raise ValueError(f"lora einsum: weight subscripts {ws!r} must name each of its {w.ndim} axes explicitly")
    w_in, w_out = ws[:n_in], ws[n_in:]
    if any(c not in xs or c in out for c in w_in) or any(c in xs or c not in out for c in w_out):
        raise ValueError(f"lora einsum {subscripts!r}: the adapter's input axes {w_in!r} (kernel {ad.kernel_shape}) "
                         f"must be contracted with x and its output axes {w_out!r} must be kept")
    y = jnp.einsum(subscripts, x, w.base, precision=precision)
    rank = next(c for c in "ZYXWVUTSRQPONMLKJIHGFEDCBA" if c not in subscripts)
    x_kept = "".join(c for c in xs if c == "." or c in out)
    a = ad.a.astype(y.dtype).reshape(*ad.in_shape, ad.r)
    b = ad.b.astype(y.dtype).reshape(ad.r, *ad.out_shape)
    h = jnp.einsum(f"{xs},{w_in}{rank}->{x_kept}{rank}", _dropout(x, w), a, precision=precision)
    h = jnp.einsum(f"{x_kept}{rank},{rank}{w_out}->{out}", h, b, precision=precision)
    return y + h * jnp.asarray(ad.scale, y.dtype)


def embed(ids: Array, table: Array | LoraWeight) -> Array:
    """``table[ids]``; with a ``LoraWeight`` (an adapted embedding) ``table[ids] + (A[ids] @ B) * scale``."""
    if not isinstance(table, LoraWeight):
        return jnp.take(table, ids, axis=0)
    ad = table.adapter
    y = jnp.take(table.base, ids, axis=0)
    h = jnp.take(ad.a.astype(y.dtype), ids, axis=0) @ ad.b.astype(y.dtype)
    return y + h * jnp.asarray(ad.scale, y.dtype)


def materialize(w: Array | LoraWeight) -> Array:
    """The dense kernel, for the rare operation that needs one (e.g. tying an output head to an adapted
    embedding). Forms ``W0 + dW``: use sparingly."""
    return w.materialize() if isinstance(w, LoraWeight) else w


def astype(w: Array | LoraWeight, dtype) -> Array | LoraWeight:
    """Cast a kernel to the compute dtype; a ``LoraWeight`` casts its frozen base (its adapters are cast
    inside the products, so their float32 master copies keep receiving float32 gradients)."""
    if isinstance(w, LoraWeight):
        return dataclasses.replace(w, base=w.base.astype(dtype))
    return jnp.asarray(w).astype(dtype)
