"""Cross-entropy over a large vocabulary without the full logits.

A language model's loss is ``CE(h @ W, targets)`` with ``h`` the final hidden states ``(tokens, D)`` and ``W``
the output head ``(D, V)`` (or, tied to the input embedding, the table ``(V, D)`` read transposed). Computed
plainly, the float32 logits ``(tokens, V)`` exist at once, and autodiff keeps them (and the softmax, and the
logits' cotangent) alive between the forward and the backward pass: at 512 tokens and a 50K vocabulary that is
~100 MiB per copy, more than every LoRA adapter's activations together.

:func:`chunked_cross_entropy` walks the tokens in chunks along the sequence axis. For each chunk it forms that
chunk's logits (float32, whatever the compute dtype), their log-sum-exp, the loss, and, when something is being
differentiated, the logits' cotangent ``softmax - onehot`` and from it at once the gradients of the hidden
states and of whatever in the head is trained (a fused linear cross-entropy, as Liger-Kernel and Apple's
Cut-Cross-Entropy do it; here a ``jax.custom_vjp`` whose forward rule returns the gradients as residuals, so
the backward pass only scales them). At most one chunk's ``(chunk, V)`` logits live at a time, in the forward
pass and in the backward pass, and the head's matmul runs once forward and twice backward, as in the plain
path (nothing is recomputed).

The head may be

- a plain array (kernel ``(D, V)`` or tied table ``(V, D)``): its gradient is formed only when it is
  differentiated (full fine-tuning, a trained head), chunk by chunk into one float32 ``(D, V)`` buffer;
- a :class:`~lora_jax.quant.QuantizedWeight` (frozen: dequantised once to the compute dtype);
- a :class:`~lora_jax.core.LoraWeight` over either (LoRA on ``lm_head``, or on the tied embedding table): the
  adapter runs factored, ``h @ W0 + s * (h @ A) @ B`` (kernel) or ``h @ E0.T + s * (h @ B.T) @ A.T`` (table),
  and the gradients of ``A`` and ``B`` come from the chunk's cotangent through the rank-``r`` bottleneck,
  never through a ``(D, V)`` weight gradient. Adapter dropout draws the same mask as the plain path (the mask
  has the hidden states' shape). A DoRA head forms its adapted ``(D, V)`` kernel once (weight-sized, never
  tokens x vocab), with the norm held constant as :mod:`lora_jax.ops` does.

Which inputs are differentiated is known inside the custom VJP (``symbolic_zeros``), so a frozen head costs no
weight-gradient matmul and a frozen ``W0`` under an adapter none either.

Logits only where the loss is: in supervised fine-tuning most positions carry no loss (the prompt, padding), yet
the head's matmuls cost the same at every position. ``positions`` (from :func:`loss_positions`, built on the host
with a fixed capacity per row, so shapes stay static under ``jit``) gathers the hidden states, targets and weights
of the positions that carry loss before the head is applied: the head then runs on ``K`` positions per row instead
of ``S``, and the result is the same sum over the same tokens. The gather's backward pass scatters the hidden
states' gradient back to their positions.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import core as _core
from lora_jax import ops as _ops
from lora_jax.core import LoraWeight
from lora_jax.errors import ArgumentError, DataError, UnsupportedError
from lora_jax.quant import is_quantized

Array = jax.Array

# One chunk's float32 logits take about this many bytes when ``chunk_size`` is not given. Each chunk streams the
# whole head through two matmuls, so on a CPU, where they are bound by memory bandwidth, small chunks cost time:
# GPT-2's tied head, 512 tokens, loss + gradient, measured side by side on 2 shared cores: 32 tokens per chunk
# 1.9x the full-logits time, 64 1.4x, 128 1.16x, 256 1.08x.
DEFAULT_CHUNK_BYTES = 64 * 2**20


def default_chunk_size(vocab_size: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Tokens per chunk such that one chunk's float32 logits take about ``chunk_bytes`` (at least 8 tokens):
    4096 tokens at a 4K vocabulary, 333 at GPT-2's 50,257, 64 at a 262K vocabulary."""
    return max(8, chunk_bytes // (4 * vocab_size))


@dataclasses.dataclass(frozen=True)
class _Static:
    tied: bool
    scale: float  # LoRA scale (unused without adapter)
    rows: int  # sequence positions per chunk (each chunk holds batch x rows tokens)
    z_loss: float
    label_smoothing: float
    softcap: float | None


def _subscripts(tied: bool) -> tuple[str, str, str]:
    """einsum names of the head ``w`` and of the adapter's input factor (d -> r) and output factor (r -> v).

    Kernel ``(D, V)``: ``A (D, r)``, ``B (r, V)``. Table ``(V, D)`` (its adapter has input axis V, output D):
    ``A (V, r)``, ``B (r, D)``, so ``h @ (E + s A B).T = h @ E.T + s (h @ B.T) @ A.T``: B is the input factor.
    """
    return ("vd", "rd", "vr") if tied else ("dv", "dr", "rv")


def _run(st: _Static, need: dict[str, bool], h, xl, w, fin, fout, targets, weights):
    """The loop over chunks: ``(loss_sum, grads)``, ``grads[name]`` for every ``need[name]`` (else ``None``).

    ``h`` (B, S, D), ``xl`` the adapter's input (``h`` with dropout applied) or ``None``, ``w`` the head in the
    compute dtype, ``fin`` / ``fout`` the adapter's factors (see :func:`_subscripts`) or ``None``, ``targets``
    (B, S) int, ``weights`` (B, S) float32.
    """
    b, s, d = h.shape
    cdt = h.dtype
    rows = st.rows
    n = -(-s // rows)
    ws, ins, outs = _subscripts(st.tied)
    vocab = w.shape[0] if st.tied else w.shape[1]
    lora = fin is not None
    f32 = jnp.float32

    def ein(spec, x, y):
        return jnp.einsum(spec, x, y, preferred_element_type=f32)

    def zeros_like(x):
        return jnp.zeros(x.shape, f32)

    grads0 = {
        "h": jnp.zeros_like(h) if need["h"] else None,
        "xl": jnp.zeros_like(xl) if need["xl"] else None,
        "w": zeros_like(w) if need["w"] else None,
        "fin": zeros_like(fin) if need["fin"] else None,
        "fout": zeros_like(fout) if need["fout"] else None,
    }
    any_grad = any(need.values())

    def body(i, carry):
        loss, g = carry
        # The last chunk is shifted back to end at s; the positions an earlier chunk covered get weight 0.
        start = jnp.minimum(i * rows, s - rows)
        take = lambda x: jax.lax.dynamic_slice_in_dim(x, start, rows, axis=1)  # noqa: E731
        h_c, t_c = take(h), take(targets)
        wt = take(weights) * ((start + jnp.arange(rows)) >= i * rows).astype(f32)
        z = ein(f"bsd,{ws}->bsv", h_c, w)
        if lora:
            xl_c = take(xl)
            u = ein(f"bsd,{ins}->bsr", xl_c, fin).astype(cdt)
            z = z + ein(f"bsr,{outs}->bsv", u, fout) * st.scale
        if st.softcap:  # Gemma 2's final soft-capping: cap * tanh(logits / cap)
            th = jnp.tanh(z / st.softcap)
            z = st.softcap * th
        lse = jax.nn.logsumexp(z, axis=-1)
        zt = jnp.take_along_axis(z, t_c[..., None], axis=-1)[..., 0]
        eps = st.label_smoothing
        nll = lse - zt if not eps else lse - (1 - eps) * zt - eps * jnp.mean(z, axis=-1)
        if st.z_loss:
            nll = nll + st.z_loss * lse * lse
        live = wt != 0  # (where, not a product: a weight-0 position never brings a NaN in)
        loss = loss + jnp.sum(jnp.where(live, nll * wt, 0.0))
        if not any_grad:
            return loss, g
        # d nll / d z = softmax * (1 + 2 z_loss lse) - (1 - eps) onehot - eps / V, times the token's weight
        p = jnp.exp(z - lse[..., None])
        if st.z_loss:
            p = p * (1 + 2 * st.z_loss * lse)[..., None]
        onehot = jax.lax.broadcasted_iota(jnp.int32, z.shape, 2) == t_c[..., None]
        dz = jnp.where(live[..., None], (p - jnp.where(onehot, 1 - eps, 0.0) - eps / vocab) * wt[..., None], 0.0)
        if st.softcap:
            dz = dz * (1 - th * th)
        dz = dz.astype(cdt)
        g = dict(g)
        if need["h"]:
            g["h"] = jax.lax.dynamic_update_slice_in_dim(
                g["h"], take(g["h"]) + ein(f"bsv,{ws}->bsd", dz, w).astype(cdt), start, axis=1
            )
        if need["w"]:
            g["w"] = g["w"] + ein(f"bsv,bsd->{ws}", dz, h_c)
        if lora:
            if need["fout"]:
                g["fout"] = g["fout"] + ein(f"bsv,bsr->{outs}", dz, u) * st.scale
            if need["xl"] or need["fin"]:
                du = (ein(f"bsv,{outs}->bsr", dz, fout) * st.scale).astype(cdt)
                if need["fin"]:
                    g["fin"] = g["fin"] + ein(f"bsr,bsd->{ins}", du, xl_c)
                if need["xl"]:
                    g["xl"] = jax.lax.dynamic_update_slice_in_dim(
                        g["xl"], take(g["xl"]) + ein(f"bsr,{ins}->bsd", du, fin).astype(cdt), start, axis=1
                    )
        return loss, g

    loss, grads = jax.lax.fori_loop(0, n, body, (jnp.zeros((), f32), grads0))
    like = {"w": w, "fin": fin, "fout": fout}
    grads = {k: (v.astype(like[k].dtype) if k in like and v is not None else v) for k, v in grads.items()}
    return loss, grads


_NAMES = ("h", "xl", "w", "fin", "fout")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _loss_sum(st: _Static, h, xl, w, fin, fout, targets, weights):
    loss, _ = _run(st, dict.fromkeys(_NAMES, False), h, xl, w, fin, fout, targets, weights)
    return loss


def _loss_sum_fwd(st, h, xl, w, fin, fout, targets, weights):
    args = dict(zip(_NAMES, (h, xl, w, fin, fout)))
    need = {k: v is not None and bool(v.perturbed) for k, v in args.items()}
    values = {k: (None if v is None else v.value) for k, v in args.items()}
    loss, grads = _run(st, need, *(values[k] for k in _NAMES), targets.value, weights.value)
    return loss, grads


def _loss_sum_bwd(st, grads, ct):
    if isinstance(ct, jax.custom_derivatives.SymbolicZero):  # the loss itself is not differentiated
        return (None,) * (len(_NAMES) + 2)
    out = tuple(None if grads[k] is None else (grads[k] * ct.astype(grads[k].dtype)) for k in _NAMES)
    return (*out, None, None)


_loss_sum.defvjp(_loss_sum_fwd, _loss_sum_bwd, symbolic_zeros=True)


def _dense(w: Any, dtype) -> Array:
    """A base kernel or table in ``dtype``; a quantised one dequantised (frozen: no gradient flows into it)."""
    if is_quantized(w):
        return jax.lax.stop_gradient(w.dequantize(dtype))
    return jnp.asarray(w).astype(dtype)


def _dora_kernel(w: LoraWeight, dtype) -> Array:
    """A DoRA head's adapted kernel ``m / ||W0 + s A B|| * (W0 + s A B)`` with the norm held constant (as
    :func:`lora_jax.ops.dot` computes it), differentiable in ``A``, ``B`` and ``m``."""
    ad = w.adapter
    v = _core.as_dense(w.base, jnp.float32) + ad.delta(jnp.float32)
    norm = jax.lax.stop_gradient(_core.dora_norm(w.base, ad))
    d_in = math.prod(ad.in_shape)
    factor = ad.magnitude.astype(jnp.float32) / norm
    return (v.reshape(d_in, -1) * factor).reshape(v.shape).astype(dtype)


def loss_positions(weights: Any, capacity: int, *, multiple: int = 1) -> np.ndarray:
    """Host-side (numpy) indices of the positions that carry loss, ``capacity`` slots per row.

    Args:
      weights: ``(..., S)`` per-token weights or a 0/1 loss mask (nonzero: the position carries loss).
      capacity: slots per row ``K`` (a static shape: keep it fixed across batches, or one compilation per value).
      multiple: round ``capacity`` up to a multiple of this.

    Returns:
      ``(..., K)`` int32: each row's loss positions in increasing order, then ``S`` (one past the last position:
      an empty slot, which :func:`gather_positions` fills with zeros) in the slots left over.

    Raises:
      DataError: a row carries loss at more than ``K`` positions (naming the row and its count): a gather of
      ``K`` slots would drop loss silently.
    """
    w = np.asarray(weights)
    if w.ndim < 1:
        raise ArgumentError(f"loss_positions: weights must be (..., S), got a scalar of shape {w.shape}")
    k = int(capacity)
    if k < 1:
        raise ArgumentError(f"loss_positions: capacity must be >= 1 slot, got {capacity}")
    k = -(-k // multiple) * multiple
    s = w.shape[-1]
    live = w.reshape(-1, s) != 0
    counts = live.sum(axis=1)
    if counts.size and counts.max() > k:
        row = int(np.argmax(counts))
        raise DataError(
            f"loss_positions: row {row} carries loss at {int(counts[row])} positions, more than the "
            f"capacity of {k} slots per row (raise the capacity, or pack fewer loss tokens per row)"
        )
    out = np.full((live.shape[0], k), s, np.int32)
    rows, cols = np.nonzero(live)  # row-major: each row's positions in increasing order
    slot = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    out[rows, slot] = cols
    return out.reshape(*w.shape[:-1], k)


def gather_positions(x: Array, positions: Array) -> Array:
    """``x[..., positions, ...]`` along the sequence axis: ``x`` ``(..., S)`` or ``(..., S, D)`` (per-token
    values or vectors), ``positions`` ``(..., K)`` int (same leading axes); slots outside ``[0, S)`` give zeros
    (and take no gradient). Returns ``(..., K)`` or ``(..., K, D)``."""
    lead = positions.ndim - 1
    if x.ndim == positions.ndim:
        return jnp.take_along_axis(x, positions, axis=-1, mode="fill", fill_value=0)
    if x.ndim != positions.ndim + 1:
        raise ArgumentError(
            f"gather_positions: positions of shape {tuple(positions.shape)} do not index the sequence "
            f"axis of an array of shape {tuple(x.shape)} (expected (..., S) or (..., S, D) with the "
            f"leading axes {tuple(positions.shape[:lead])})"
        )
    return jnp.take_along_axis(x, positions[..., None], axis=-2, mode="fill", fill_value=0)


def _gather_inputs(hidden, targets, weights, positions, who: str):
    """``hidden``, ``targets``, ``weights`` at ``positions`` (see :func:`gather_positions`), checked."""
    if tuple(positions.shape[:-1]) != tuple(hidden.shape[:-2]):
        raise ArgumentError(
            f"{who}: positions of shape {tuple(positions.shape)} do not fit hidden states "
            f"{tuple(hidden.shape)} (expected {tuple(hidden.shape[:-2])} + (K,))"
        )
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ArgumentError(f"{who}: positions must be integer indices, got {positions.dtype}")
    if weights is None:  # an empty slot must weigh 0
        weights = jnp.ones(targets.shape, jnp.float32)
    return (
        gather_positions(hidden, positions),
        gather_positions(targets, positions),
        gather_positions(weights, positions),
    )


def chunked_cross_entropy(
    hidden: Array,
    head: Any,
    targets: Array,
    weights: Array | None = None,
    *,
    tied: bool = False,
    chunk_size: int | None = None,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    logit_softcap: float | None = None,
    positions: Array | None = None,
) -> tuple[Array, Array]:
    """Summed cross-entropy of ``hidden @ head`` against ``targets``, never holding all the logits.

    Args:
      hidden: final hidden states ``(..., S, D)`` (e.g. ``(B, S, D)``; ``(N, D)`` is one row of N tokens), any
        float dtype (the compute dtype: the head is cast to it; logits, softmax and loss are float32). Chunks
        run along the second-to-last axis, so a batch sharded over its leading axes stays sharded.
      head: the output projection: a kernel ``(D, V)`` (``tied=False``) or an embedding table ``(V, D)``
        (``tied=True``, logits ``hidden @ head.T``); an array, a :class:`~lora_jax.quant.QuantizedWeight` or a
        :class:`~lora_jax.core.LoraWeight` (see the module docstring).
      targets: integer ids ``hidden.shape[:-1]`` in ``[0, V)``.
      weights: per-token weights (e.g. a 0/1 loss mask) of ``targets``' shape; ``None``: all ones.
      tied: the head is a ``(V, D)`` table.
      chunk_size: tokens per chunk over the whole batch (``chunk_size // batch`` sequence positions, at least
        one); ``None``: :func:`default_chunk_size` for this vocabulary. Chunks are made equal (``S`` split in
        ``ceil(S / positions)`` parts), so no chunk is wasted on padding.
      z_loss: adds ``z_loss * logsumexp(logits)**2`` per token (PaLM's auxiliary loss).
      label_smoothing: the target distribution puts ``1 - label_smoothing`` on the target and spreads
        ``label_smoothing`` uniformly over the vocabulary (optax.smooth_labels).
      logit_softcap: ``c``: the logits are ``c * tanh(logits / c)`` (Gemma 2's ``final_logit_softcapping``).
      positions: ``(..., K)`` int (``hidden``'s leading axes): the sequence positions that carry loss, from
        :func:`loss_positions` (slots outside ``[0, S)`` are empty); only these positions get logits. Every
        position of nonzero weight must be among them (what :func:`loss_positions` checks on the host); the
        result is then the full computation's up to float rounding. ``None``: every position.

    Returns:
      ``(loss_sum, count)``: ``sum(weights * ce)`` and ``sum(weights)``, float32 scalars, so callers can
      normalise over a whole (accumulated, sharded) batch. Differentiable w.r.t. ``hidden`` and every float
      array in ``head``; equal to ``optax.softmax_cross_entropy_with_integer_labels`` on the full float32
      logits up to float rounding.
    """
    if hidden.ndim < 2:
        raise ArgumentError(f"chunked_cross_entropy: hidden must be (..., S, D), got shape {tuple(hidden.shape)}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ArgumentError(
            f"chunked_cross_entropy: targets of shape {tuple(targets.shape)} do not fit hidden states "
            f"{tuple(hidden.shape)} (expected {tuple(hidden.shape[:-1])})"
        )
    if weights is not None and tuple(weights.shape) != tuple(targets.shape):
        raise ArgumentError(
            f"chunked_cross_entropy: weights of shape {tuple(weights.shape)}, expected "
            f"{tuple(targets.shape)} like targets"
        )
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ArgumentError(f"chunked_cross_entropy: targets must be integer ids, got {targets.dtype}")
    if positions is not None:
        hidden, targets, weights = _gather_inputs(hidden, targets, weights, positions, "chunked_cross_entropy")
    if hasattr(head, "lora_dot"):
        raise UnsupportedError(
            f"chunked_cross_entropy: a {type(head).__name__} head (several adapters in one "
            "batch) is not supported; compute its logits with lora.dot"
        )
    d = hidden.shape[-1]
    cdt = hidden.dtype
    shape = tuple(head.shape)
    if len(shape) != 2 or shape[1 if tied else 0] != d:
        want = "(V, D) table" if tied else "(D, V) kernel"
        raise ArgumentError(
            f"chunked_cross_entropy: head of shape {shape} is not a {want} for hidden size {d} (tied={tied})"
        )
    vocab = shape[0] if tied else shape[1]

    lead = hidden.shape[:-2]
    s = hidden.shape[-2]
    h = hidden.reshape(math.prod(lead), s, d) if lead else hidden[None]
    t = targets.reshape(h.shape[:2]).astype(jnp.int32)
    wt = jnp.ones(h.shape[:2], jnp.float32) if weights is None else weights.reshape(h.shape[:2]).astype(jnp.float32)

    xl = fin = fout = None
    scale = 0.0
    if isinstance(head, LoraWeight):
        ad = head.adapter
        if ad.is_dora:
            if tied:
                raise UnsupportedError(
                    "chunked_cross_entropy: a DoRA adapter on a tied embedding table is not "
                    "supported (lora.embed does not support it either)"
                )
            w = _dora_kernel(head, cdt)
        else:
            want_in = (vocab,) if tied else (d,)
            if tuple(ad.in_shape) != want_in:
                raise ArgumentError(
                    f"chunked_cross_entropy: the head's adapter has input axes {ad.in_shape}, expected "
                    f"{want_in} for a {'table' if tied else 'kernel'} of shape {shape}"
                )
            w = _dense(head.base, cdt)
            a, b = ad.a.astype(cdt), ad.b.astype(cdt)
            fin, fout = (b, a) if tied else (a, b)
            scale = float(ad.scale)
            xl = _ops.adapter_dropout(hidden, head).reshape(h.shape)
    else:
        w = _dense(head, cdt)

    batch = h.shape[0]
    tokens = default_chunk_size(vocab) if chunk_size is None else int(chunk_size)
    if tokens < 1:
        raise ArgumentError(f"chunked_cross_entropy: chunk_size must be >= 1 token, got {chunk_size}")
    rows = min(s, max(1, tokens // batch))
    rows = -(-s // -(-s // rows))  # ceil(S / n) for n = ceil(S / rows): equal chunks
    st = _Static(
        tied=bool(tied),
        scale=scale,
        rows=rows,
        z_loss=float(z_loss),
        label_smoothing=float(label_smoothing),
        softcap=float(logit_softcap) if logit_softcap else None,
    )
    loss = _loss_sum(st, h, xl, w, fin, fout, t, wt)
    return loss, jnp.sum(wt)


def cross_entropy(
    hidden: Array,
    head: Any,
    targets: Array,
    weights: Array | None = None,
    *,
    tied: bool = False,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    logit_softcap: float | None = None,
    positions: Array | None = None,
) -> tuple[Array, Array]:
    """The plain path, for comparison: full float32 logits (``hidden @ head`` through :func:`lora_jax.ops.dot`,
    or ``hidden @ materialize(head).T`` for a table), then optax's cross-entropy. Same signature and result as
    :func:`chunked_cross_entropy` (``positions``: the logits of those positions only)."""
    if positions is not None:
        hidden, targets, weights = _gather_inputs(hidden, targets, weights, positions, "cross_entropy")
    if tied:
        logits = jnp.matmul(hidden, _ops.materialize(head).astype(hidden.dtype).T)
    else:
        logits = _ops.dot(hidden, _ops.astype(head, hidden.dtype))
    logits = logits.astype(jnp.float32)
    if logit_softcap:
        logits = logit_softcap * jnp.tanh(logits / logit_softcap)
    vocab = logits.shape[-1]
    wt = jnp.ones(targets.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
    if label_smoothing:
        import optax

        labels = optax.smooth_labels(jax.nn.one_hot(targets, vocab), label_smoothing)
        ce = optax.softmax_cross_entropy(logits, labels)
    else:
        import optax

        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    if z_loss:
        ce = ce + z_loss * jax.nn.logsumexp(logits, axis=-1) ** 2
    return jnp.sum(ce * wt), jnp.sum(wt)


# --------------------------------------------------------------------------------------- preference losses
#
# Direct preference optimisation (Rafailov et al. 2023) and two variants, over per-example sequence
# log-probabilities: ``sum_t log p(y_t | x, y_<t)`` over the response tokens of the chosen and of the rejected
# answer, under the policy and (DPO, IPO) under the reference policy. With LoRA the reference is the frozen base
# with the adapters off. Conventions and metric names follow TRL's DPOTrainer / CPOTrainer.

PREFERENCE_LOSSES = ("sigmoid", "ipo", "simpo")


@dataclasses.dataclass(frozen=True)
class PreferenceOutput:
    """Per-pair results of :func:`preference_loss`, each ``(B,)`` float32: ``losses``, and the implicit
    rewards of the chosen and rejected answers (no gradient), as TRL logs them."""

    losses: Array
    chosen_rewards: Array
    rejected_rewards: Array


def sequence_logps(token_logps: Array, mask: Array) -> tuple[Array, Array]:
    """``(logps, tokens)``, both ``(B,)`` float32: per-sequence log-probabilities summed over the response tokens
    (``mask`` ``(B, T)``, 1 where ``token_logps[b, t]`` scores a response token) and the number of them."""
    mask = mask.astype(jnp.float32)
    return jnp.sum(token_logps.astype(jnp.float32) * mask, axis=-1), jnp.sum(mask, axis=-1)


def preference_loss(
    chosen_logps: Array,
    rejected_logps: Array,
    ref_chosen_logps: Array | None = None,
    ref_rejected_logps: Array | None = None,
    *,
    chosen_tokens: Array | None = None,
    rejected_tokens: Array | None = None,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    simpo_gamma: float = 0.5,
) -> PreferenceOutput:
    """The per-pair preference loss of ``loss_type``, as TRL computes it. Inputs ``(B,)``: log-probabilities
    *summed* over each response's tokens (:func:`sequence_logps`), and (``ipo``, ``simpo``) the number of
    response tokens of each answer, ``chosen_tokens`` / ``rejected_tokens``.

    - ``sigmoid`` (DPO, TRL's DPOTrainer): ``-log sigmoid(beta h)`` with
      ``h = (chosen - ref_chosen) - (rejected - ref_rejected)``;
    - ``ipo`` (Azar et al. 2023, TRL's DPOTrainer): ``(h' - 1 / (2 beta))**2`` where ``h'`` takes each answer's
      log-ratio averaged over its tokens;
    - ``simpo`` (Meng et al. 2024, TRL's CPOTrainer with ``cpo_alpha=0``), reference-free:
      ``-log sigmoid(beta (avg_chosen - avg_rejected) - simpo_gamma)`` on per-token averages (the reference
      arguments are ignored; pass ``None``).

    Rewards (TRL's): ``beta * (logps - ref_logps)`` (DPO, IPO; sums), ``beta * avg_logps`` (SimPO), without
    gradient. Raises ``ValueError`` for an unknown ``loss_type``, a non-positive ``beta`` or a missing input.
    """
    if loss_type not in PREFERENCE_LOSSES:
        raise ArgumentError(f"preference_loss: loss_type must be one of {list(PREFERENCE_LOSSES)}, got {loss_type!r}")
    if not beta > 0:
        raise ArgumentError(f"preference_loss: beta must be > 0, got {beta}")
    if loss_type in ("ipo", "simpo") and (chosen_tokens is None or rejected_tokens is None):
        raise ArgumentError(
            f"preference_loss: loss_type={loss_type!r} averages over the response tokens: pass "
            "chosen_tokens and rejected_tokens"
        )
    if loss_type != "simpo" and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ArgumentError(f"preference_loss: loss_type={loss_type!r} needs the reference log-probabilities")
    sg = jax.lax.stop_gradient
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    chosen, rejected = f32(chosen_logps), f32(rejected_logps)
    if loss_type == "simpo":
        avg_c = chosen / jnp.maximum(f32(chosen_tokens), 1.0)
        avg_r = rejected / jnp.maximum(f32(rejected_tokens), 1.0)
        losses = -jax.nn.log_sigmoid(beta * (avg_c - avg_r) - simpo_gamma)
        return PreferenceOutput(losses, beta * sg(avg_c), beta * sg(avg_r))
    ratio_c = chosen - f32(ref_chosen_logps)
    ratio_r = rejected - f32(ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = -jax.nn.log_sigmoid(beta * (ratio_c - ratio_r))
    else:
        delta = (ratio_c / jnp.maximum(f32(chosen_tokens), 1.0)) - (ratio_r / jnp.maximum(f32(rejected_tokens), 1.0))
        losses = (delta - 1 / (2 * beta)) ** 2
    return PreferenceOutput(losses, beta * sg(ratio_c), beta * sg(ratio_r))


def preference_metrics(out: PreferenceOutput, weight: Array | None = None) -> dict[str, Array]:
    """TRL's logged names, summed over the pairs (divide by the weight's sum for the mean): ``rewards/chosen``,
    ``rewards/rejected``, ``rewards/margins`` and ``rewards/accuracies`` (chosen reward > rejected reward)."""
    w = jnp.ones_like(out.losses) if weight is None else weight.astype(jnp.float32)
    c, r = out.chosen_rewards, out.rejected_rewards
    return {
        "rewards/chosen": jnp.sum(c * w),
        "rewards/rejected": jnp.sum(r * w),
        "rewards/margins": jnp.sum((c - r) * w),
        "rewards/accuracies": jnp.sum((c > r).astype(jnp.float32) * w),
    }


__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "PREFERENCE_LOSSES",
    "PreferenceOutput",
    "chunked_cross_entropy",
    "cross_entropy",
    "default_chunk_size",
    "gather_positions",
    "loss_positions",
    "preference_loss",
    "preference_metrics",
    "sequence_logps",
]
