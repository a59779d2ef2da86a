"""Mixture-of-experts layers, written once for every MoE family: routing, dispatch, the expert MLP, and the
load-balancing loss, with Hugging Face's semantics.

A sparse MoE block (Qwen3-MoE, Mixtral, ...) on ``T`` tokens of width ``D`` with ``E`` experts, top-``k``:

1. :func:`route`: router logits ``x @ W_gate (T, E)``, softmax in float32, the ``k`` largest probabilities and
   their experts; with ``norm_topk_prob`` the ``k`` weights are divided by their sum (Qwen3-MoE's flag; Mixtral
   always does it).
2. :func:`sort_by_expert`: the ``T * k`` (token, expert) pairs sorted by expert, once: the order and the
   number of rows per expert (``group_sizes``).
3. :func:`experts_glu`: each sorted row through its expert's gated MLP,
   ``down(act(x @ gate) * (x @ up))``, as grouped products :func:`lora_jax.ops.ragged_dot` that share the one
   sort and its group sizes. An expert kernel may be a plain stack ``(E, d_in, d_out)``, a quantised one, or a
   :class:`~lora_jax.core.LoraWeight` with one adapter per expert (factored: no per-token or per-expert dense
   update is formed). Each output row is scaled by its routing weight and the ``k`` rows of a token summed.
   ``dispatch="dense"`` is the one-hot reference instead: every expert on every token, weighted by a dense
   ``(T, E)`` combine matrix (``E / k`` times the FLOPs of the grouped path).
4. :func:`load_balancing_loss`: the Switch Transformer auxiliary loss exactly as ``transformers`` computes it
   (``load_balancing_loss_func``) from the router logits of every layer.

Expert kernels are in this project's layout ``(E, d_in, d_out)`` (Hugging Face stores ``(E, d_out, d_in)``:
the converters transpose). The fused ``gate_up`` kernel ``(E, D, 2F)`` holds the gate in its first ``F``
columns and the up projection in the last ``F`` (HF's ``gate_up_proj(...).chunk(2)``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lora_jax import ops
from lora_jax.core import LoraWeight

Array = jax.Array

DISPATCHES = ("ragged", "dense")


class Routing(NamedTuple):
    """What :func:`route` returns. ``weights (T, k)`` in the logits' dtype, ``experts (T, k)`` int32 (largest
    probability first), ``logits (T, E)`` as computed (for the auxiliary loss)."""

    weights: Array
    experts: Array
    logits: Array


def route(logits: Array, top_k: int, *, norm_topk_prob: bool = True) -> Routing:
    """Top-``k`` routing as Hugging Face's ``TopKRouter``: ``softmax(logits)`` in float32, the ``k`` largest
    probabilities (renormalised to sum to 1 with ``norm_topk_prob``), cast back to the logits' dtype."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(weights.astype(logits.dtype), experts.astype(jnp.int32), logits)


class Sorted(NamedTuple):
    """The (token, expert) pairs of a routing sorted by expert.

    ``order (T*k,)``: position in the flattened ``(T, k)`` routing of each sorted row (so its token is
    ``order // k``); ``group_sizes (E,)`` int32: rows per expert; ``inverse (T*k,)``: where each flattened pair
    landed (``sorted[inverse]`` restores the ``(T, k)`` order).
    """

    order: Array
    group_sizes: Array
    inverse: Array


def sort_by_expert(experts: Array, num_experts: int) -> Sorted:
    """Sort the ``(T, k)`` expert choices by expert (stable: tokens keep their order within an expert)."""
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    return Sorted(order, group_sizes, inverse)


def _split_gate_up(h: Array) -> tuple[Array, Array]:
    f = h.shape[-1] // 2
    return h[..., :f], h[..., f:]


def _all_experts(x: Array, w: Array | LoraWeight) -> Array:
    """Every expert of ``w (E, d_in, d_out)`` on ``x``: the same tokens ``(T, d_in)`` or each expert its own
    ``(E, T, d_in)`` -> ``(E, T, d_out)``. Factored for a :class:`LoraWeight` with per-expert adapters (the
    dense one-hot reference path)."""
    xs = "td" if x.ndim == 2 else "etd"
    base = w.base if isinstance(w, LoraWeight) else w
    y = jnp.einsum(f"{xs},edf->etf", x, ops.materialize(base).astype(x.dtype))
    if not isinstance(w, LoraWeight):
        return y
    ad = w.adapter
    h = jnp.einsum(f"{xs},edr->etr", x, ad.a.astype(x.dtype))
    return y + jnp.einsum("etr,erf->etf", h, ad.b.astype(x.dtype)) * jnp.asarray(ad.scale, x.dtype)


def experts_glu(
    x: Array,
    routing: Routing,
    *,
    down: Array | LoraWeight,
    gate_up: Array | LoraWeight | None = None,
    gate: Array | LoraWeight | None = None,
    up: Array | LoraWeight | None = None,
    act: Callable[[Array], Array] = jax.nn.silu,
    dispatch: str = "ragged",
) -> Array:
    """The routed experts' gated MLP on ``x (T, D)``: ``sum_k w_k * down_e(act(x @ gate_e) * (x @ up_e))``.

    Args:
      x: ``(T, D)`` tokens.
      routing: from :func:`route`.
      down: ``(E, F, D)``.
      gate_up: fused ``(E, D, 2F)`` (gate first), or else ``gate`` and ``up`` ``(E, D, F)`` each.
      act: the activation of the gate.
      dispatch: ``"ragged"`` (tokens sorted by expert once, grouped products) or ``"dense"`` (one-hot reference).

    Returns:
      ``(T, D)`` in ``x``'s dtype.
    """
    if dispatch not in DISPATCHES:
        raise ValueError(f"experts_glu: dispatch must be one of {DISPATCHES}, got {dispatch!r}")
    if (gate_up is None) == (gate is None or up is None) or (gate_up is not None and (gate is not None or up is not None)):
        raise ValueError("experts_glu: pass either gate_up (E, D, 2F) or both gate and up (E, D, F)")
    n_tok, k = routing.experts.shape
    n_exp = down.shape[0]
    if dispatch == "dense":
        if gate_up is not None:
            g, u = _split_gate_up(_all_experts(x, gate_up))
        else:
            g, u = _all_experts(x, gate), _all_experts(x, up)
        y = _all_experts(act(g) * u, down)
        combine = jnp.zeros((n_tok, n_exp), routing.weights.dtype)
        combine = combine.at[jnp.arange(n_tok)[:, None], routing.experts].add(routing.weights)
        return jnp.einsum("etd,te->td", y, combine.astype(y.dtype)).astype(x.dtype)
    s = sort_by_expert(routing.experts, n_exp)
    xs = x[s.order // k]
    if gate_up is not None:
        g, u = _split_gate_up(ops.ragged_dot(xs, gate_up, s.group_sizes))
    else:
        g, u = ops.ragged_dot(xs, gate, s.group_sizes), ops.ragged_dot(xs, up, s.group_sizes)
    y = ops.ragged_dot(act(g) * u, down, s.group_sizes)
    y = y[s.inverse].reshape(n_tok, k, -1)
    return jnp.einsum("tkd,tk->td", y, routing.weights.astype(y.dtype)).astype(x.dtype)


def load_balancing_loss(router_logits: Sequence[Array], num_experts: int, top_k: int,
                        attention_mask: Array | None = None) -> Array:
    """The auxiliary load-balancing loss of ``transformers``' ``load_balancing_loss_func`` (Switch Transformer
    eqs. 4-6), in float32.

    ``router_logits``: one ``(T, E)`` array per MoE layer (``T`` = batch * sequence). For the tokens kept by
    ``attention_mask`` (``(batch, sequence)``, all when ``None``), summed over layers: ``f_e`` = top-``k``
    assignments to expert ``e`` per token, ``P_e`` = mean router probability of ``e``;
    ``loss = E * sum_e f_e * P_e`` (``k`` for perfectly uniform routing).
    Models add ``router_aux_loss_coef * loss`` to the language-model loss.
    """
    counts = jnp.zeros((num_experts,), jnp.float32)
    prob_sum = jnp.zeros((num_experts,), jnp.float32)
    rows = jnp.zeros((), jnp.float32)
    mask = None if attention_mask is None else attention_mask.reshape(-1).astype(jnp.float32)
    for logits in router_logits:
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        _, chosen = jax.lax.top_k(probs, top_k)
        hits = jax.nn.one_hot(chosen, num_experts, dtype=jnp.float32).sum(axis=1)  # (T, E)
        if mask is None:
            counts += hits.sum(axis=0)
            prob_sum += probs.sum(axis=0)
            rows += probs.shape[0]
        else:
            counts += (hits * mask[:, None]).sum(axis=0)
            prob_sum += (probs * mask[:, None]).sum(axis=0)
            rows += mask.sum()
    return num_experts * jnp.sum((counts / rows) * (prob_sum / rows))


__all__ = ["DISPATCHES", "Routing", "Sorted", "experts_glu", "load_balancing_loss", "route", "sort_by_expert"]
