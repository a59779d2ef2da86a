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

Expert parallelism: traced under a mesh with an ``expert`` axis (``jax.set_mesh(mesh)``,
:func:`lora_jax.sharding.expert_mesh`), a :class:`SparseMoeBlock` routes each device's own tokens
(:func:`route_sharded`) and sends them to the devices that hold their experts and back with two all-to-alls
(:func:`experts_glu_sharded`): each device computes only its own experts' rows, with their per-expert adapters,
at a fixed capacity per expert (``moe_capacity_factor``; ``None`` never drops a token) and a count of the
dropped pairs sown as ``intermediates / dropped_pairs``. Without such a mesh the single-device path above runs.

Expert kernels are in this project's layout ``(E, d_in, d_out)`` (Hugging Face stores ``(E, d_out, d_in)``:
the converters transpose). The fused ``gate_up`` kernel ``(E, D, 2F)`` holds the gate in its first ``F``
columns and the up projection in the last ``F`` (HF's ``gate_up_proj(...).chunk(2)``).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from lora_jax import ops, tree
from lora_jax.core import LoraWeight
from lora_jax.errors import ArgumentError, UnsupportedError
from lora_jax.models.arch import Layout, permuted
from lora_jax.models.decoder import DecoderLayer, DecoderModel
from lora_jax.models.layers import ACTIVATIONS, Dense

Array = jax.Array
Dtype = Any

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


def route_sharded(logits: Array, top_k: int, *, norm_topk_prob: bool = True, mesh: Any = None) -> Routing:
    """:func:`route` on each device's own tokens: ``logits (T, E)`` split over ``mesh``'s token axes
    (:func:`lora_jax.sharding.token_axes`) in a ``jax.shard_map``, so that no device gathers the whole batch's
    probabilities (XLA's partitioner all-gathers the ``(T, E)`` probabilities in front of a ``top_k`` on tokens
    it has split). Plain :func:`route` when ``mesh`` is ``None`` or ``T`` does not split evenly."""
    if mesh is None:
        return route(logits, top_k, norm_topk_prob=norm_topk_prob)
    from lora_jax import sharding

    axes = sharding.token_axes(mesh)
    if logits.shape[0] % int(np.prod([mesh.shape[a] for a in axes])):
        return route(logits, top_k, norm_topk_prob=norm_topk_prob)
    tok = P(axes)
    return jax.shard_map(
        functools.partial(route, top_k=top_k, norm_topk_prob=norm_topk_prob),
        mesh=mesh,
        in_specs=tok,
        out_specs=Routing(tok, tok, tok),
    )(logits)


def _expert_mesh() -> Any:
    from lora_jax import sharding

    return sharding.expert_mesh()


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
        raise ArgumentError(f"experts_glu: dispatch must be one of {DISPATCHES}, got {dispatch!r}")
    if (gate_up is None) == (gate is None or up is None) or (
        gate_up is not None and (gate is not None or up is not None)
    ):
        raise ArgumentError("experts_glu: pass either gate_up (E, D, 2F) or both gate and up (E, D, F)")
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


# ---------------------------------------------------------------------------------- expert parallelism


class Dispatch(NamedTuple):
    """What :func:`experts_glu_sharded` returns: ``y (T, D)``; ``dropped``: int32 scalar, the (token, expert)
    pairs over all devices that found their expert full (each contributed 0 to its token); ``capacity``: the
    rows each expert takes from each device (static)."""

    y: Array
    dropped: Array
    capacity: int


def expert_capacity(tokens: int, top_k: int, num_experts: int, capacity_factor: float | None) -> int:
    """Rows each expert takes from the ``tokens`` of one device: ``ceil(capacity_factor * tokens * top_k /
    num_experts)``, at least 1 and at most ``tokens``; ``None`` gives ``tokens``, which never drops a pair (the
    ``k`` experts of a token are distinct, so no expert can be chosen by more than ``tokens`` pairs of one device).
    A factor of 1 is the share of a perfectly balanced router; 1.25 - 2 is the usual headroom."""
    if capacity_factor is None:
        return tokens
    if not capacity_factor > 0:
        raise ArgumentError(
            f"expert capacity: capacity_factor must be > 0 (or None: never drop), got {capacity_factor}"
        )
    return int(min(tokens, max(1, int(np.ceil(capacity_factor * tokens * top_k / num_experts)))))


def dispatch_slots(experts: Array, num_experts: int, capacity: int) -> tuple[Array, Array]:
    """Where each (token, expert) pair of one device goes in its send buffer ``(num_experts * capacity, D)``.

    ``experts (t, k)`` -> ``slot (t*k,)`` int32 and ``keep (t*k,)`` bool, in the flattened ``(t, k)`` order.
    Expert ``e`` owns rows ``e * capacity`` up to ``(e + 1) * capacity``; its pairs fill them in token order
    (then choice order) and the pairs past ``capacity`` are dropped (``keep`` False, ``slot`` =
    ``num_experts * capacity``, one past the buffer)."""
    s = sort_by_expert(experts, num_experts)
    flat = experts.reshape(-1)
    starts = jnp.cumsum(s.group_sizes) - s.group_sizes
    pos = s.inverse.astype(jnp.int32) - starts[flat]  # rank of the pair among its expert's pairs (stable sort)
    keep = pos < capacity
    return jnp.where(keep, flat * capacity + pos, num_experts * capacity).astype(jnp.int32), keep


def _per_expert(x: Array, w: Array | LoraWeight) -> Array:
    """Each expert of ``w (El, d_in, d_out)`` on its own rows ``x (El, c, d_in)`` -> ``(El, c, d_out)``; a
    :class:`LoraWeight` with per-expert adapters factored (``x @ W0 + (dropout(x) @ A) @ B * scale``)."""
    base = w.base if isinstance(w, LoraWeight) else w
    y = jnp.einsum("ecd,edf->ecf", x, base.astype(x.dtype))
    if not isinstance(w, LoraWeight):
        return y
    ad = w.adapter
    if ad.is_dora:
        raise UnsupportedError("experts_glu_sharded: DoRA adapters on expert kernels are not supported")
    h = jnp.einsum("ecd,edr->ecr", ops.adapter_dropout(x, w), ad.a.astype(x.dtype))
    return y + jnp.einsum("ecr,erf->ecf", h, ad.b.astype(x.dtype)) * jnp.asarray(ad.scale, x.dtype)


def expert_parallel_blocker(mesh: Any, n_tokens: int, kernels: Mapping[str, Any]) -> str | None:
    """Why the routed experts ``kernels`` (``{name: (E, d_in, d_out) stack}``) on ``n_tokens`` tokens cannot be
    dispatched over ``mesh``'s ``expert`` axis, or ``None`` when they can. They cannot when ``E`` is not a
    multiple of the expert axis (the stacks are then replicated, :func:`lora_jax.sharding.spec_for`), when a
    stack is quantised (its stored arrays are flat, not split by expert), when an adapter is not one per expert,
    or when the tokens do not split evenly over the token axes (:func:`lora_jax.sharding.token_axes`): a
    generation step with fewer tokens than devices, for one."""
    from lora_jax import sharding

    n_exp = mesh.shape[sharding.EXPERT_AXIS]
    n_tok = int(np.prod([mesh.shape[a] for a in sharding.token_axes(mesh)]))
    for name, w in kernels.items():
        base = w.base if isinstance(w, LoraWeight) else w
        if ops.is_quantized(base) or not hasattr(base, "shape"):
            return f"{name} is a quantised stack (its stored arrays are not split by expert)"
        if base.shape[0] % n_exp:
            return f"{name} has {base.shape[0]} experts, not a multiple of the expert axis ({n_exp})"
        if isinstance(w, LoraWeight) and w.adapter.stack_shape != (base.shape[0],):
            return f"{name}'s adapter is not one adapter per expert"
    if n_tokens % n_tok:
        return f"{n_tokens} tokens do not split over the {n_tok} devices of the token axes"
    return None


def experts_glu_sharded(
    x: Array,
    routing: Routing,
    *,
    mesh: Any,
    down: Array | LoraWeight,
    gate_up: Array | LoraWeight | None = None,
    gate: Array | LoraWeight | None = None,
    up: Array | LoraWeight | None = None,
    act: Callable[[Array], Array] = jax.nn.silu,
    capacity_factor: float | None = None,
) -> Dispatch:
    """:func:`experts_glu` with the experts split over ``mesh``'s ``expert`` axis: tokens travel to their
    experts and back, each device computes only its own experts' rows.

    ``x (T, D)`` and ``routing`` are split over the token axes (:func:`lora_jax.sharding.token_axes`), the
    stacks ``(E, ...)`` and their per-expert adapters ``a (E, d_in, r)`` / ``b (E, r, d_out)`` over ``expert``
    (``n`` devices, ``El = E / n`` experts each). In one ``jax.shard_map``, each device with its ``t`` tokens:

    1. places its ``t * k`` (token, expert) pairs in a send buffer ``(E * C, D)``, ``C`` rows per expert
       (:func:`expert_capacity`, :func:`dispatch_slots`; pairs past ``C`` are dropped and counted);
    2. ``all_to_all`` over ``expert``: device ``j`` receives, from each of the ``n`` devices of its expert group,
       the ``El * C`` rows of its experts ``(n * El * C, D)``;
    3. runs its ``El`` experts' gated MLP as batched products on ``(El, n * C, D)`` (LoRA factored, the adapters
       never leave their experts' device; padding rows are zeros and give zeros);
    4. ``all_to_all`` back, gathers each pair's row, and sums a token's ``k`` rows times their routing weights.

    Per device that is ``E * C * 3 * 2 * D * F`` expert FLOPs, ``capacity_factor * k * t`` rows: ``1 / n`` of the
    whole batch's at a fixed capacity factor. The activations crossing devices are the two all-to-alls of
    ``(E * C, D)``; nothing of shape ``(tokens, D)`` is all-gathered or all-reduced. With ``capacity_factor``
    ``None`` (``C = t``) nothing is dropped and the result equals :func:`experts_glu`'s, at ``E / k`` times
    the rows of a perfectly balanced capacity.
    """
    from lora_jax import sharding

    if (gate_up is None) == (gate is None or up is None) or (
        gate_up is not None and (gate is not None or up is not None)
    ):
        raise ArgumentError("experts_glu_sharded: pass either gate_up (E, D, 2F) or both gate and up (E, D, F)")
    kernels = {"down": down, **({"gate_up": gate_up} if gate_up is not None else {"gate": gate, "up": up})}
    why = expert_parallel_blocker(mesh, x.shape[0], kernels)
    if why is not None:
        raise ArgumentError(f"experts_glu_sharded: cannot dispatch over the expert axis: {why}")
    axis = sharding.EXPERT_AXIS
    tok_axes = sharding.token_axes(mesh)
    n_exp = down.shape[0]
    n_dev = mesh.shape[axis]
    local_experts = n_exp // n_dev
    t = x.shape[0] // int(np.prod([mesh.shape[a] for a in tok_axes]))
    k = routing.experts.shape[1]
    capacity = expert_capacity(t, k, n_exp, capacity_factor)

    def split(w):  # a stack, its per-expert factors: along expert; a dropout key: the same on every device
        return jax.tree.map(
            lambda leaf: P(axis) if getattr(leaf, "ndim", 0) >= 1 and leaf.shape[0] == n_exp else P(), w
        )

    def local(x, weights, experts, kernels):
        d = x.shape[-1]
        slot, keep = dispatch_slots(experts, n_exp, capacity)
        kernels = {name: _fold_key(w, tok_axes) for name, w in kernels.items()}
        send = jnp.zeros((n_exp * capacity, d), x.dtype).at[slot].set(x[jnp.arange(slot.shape[0]) // k], mode="drop")
        recv = jax.lax.all_to_all(send, axis, 0, 0, tiled=True)  # (src, local expert, C) rows
        h = recv.reshape(n_dev, local_experts, capacity, d).transpose(1, 0, 2, 3)
        h = h.reshape(local_experts, n_dev * capacity, d)
        if "gate_up" in kernels:
            g, u = _split_gate_up(_per_expert(h, kernels["gate_up"]))
        else:
            g, u = _per_expert(h, kernels["gate"]), _per_expert(h, kernels["up"])
        y = _per_expert(act(g) * u, kernels["down"])
        y = y.reshape(local_experts, n_dev, capacity, -1).transpose(1, 0, 2, 3).reshape(n_exp * capacity, -1)
        back = jax.lax.all_to_all(y, axis, 0, 0, tiled=True)  # each row home, in its send slot
        rows = back.at[slot].get(mode="fill", fill_value=0).reshape(experts.shape[0], k, -1)
        out = jnp.einsum("tkd,tk->td", rows, weights.astype(rows.dtype)).astype(x.dtype)
        dropped = jax.lax.psum(jnp.sum(~keep, dtype=jnp.int32), tok_axes)
        return out, dropped

    tok = P(tok_axes)
    y, dropped = jax.shard_map(local, mesh=mesh, in_specs=(tok, tok, tok, split(kernels)), out_specs=(tok, P()))(
        x, routing.weights, routing.experts, kernels
    )
    return Dispatch(y, dropped, capacity)


def _fold_key(w: Any, axes: tuple[str, ...]) -> Any:
    """A :class:`LoraWeight` whose dropout key differs on every device of the token ``axes`` (each draws masks for
    its own rows; devices that hold the same tokens draw the same masks)."""
    if not isinstance(w, LoraWeight) or w.key is None:
        return w
    return dataclasses.replace(w, key=jax.random.fold_in(w.key, jax.lax.axis_index(axes)))


def load_balancing_loss(
    router_logits: Sequence[Array], num_experts: int, top_k: int, attention_mask: Array | None = None
) -> Array:
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


def check_config(config: Any, experts: str = "num_experts") -> None:
    """What a MoE family's ``Config.__post_init__`` checks of its MoE fields: ``moe_dispatch`` is one of
    :data:`DISPATCHES` and ``1 <= num_experts_per_tok <= num_experts``; ``experts`` names the expert count as the
    family's ``transformers`` config does (Mixtral: ``num_local_experts``). Raises ``ValueError``."""
    if config.moe_dispatch not in DISPATCHES:
        raise ArgumentError(f"moe_dispatch must be one of {DISPATCHES}, got {config.moe_dispatch!r}")
    cf = getattr(config, "moe_capacity_factor", None)
    if cf is not None and not (isinstance(cf, int | float) and cf > 0):
        raise ArgumentError(f"moe_capacity_factor must be a number > 0 or None (never drop a token), got {cf!r}")
    if not 1 <= config.num_experts_per_tok <= config.num_experts:
        raise ArgumentError(
            f"num_experts_per_tok {config.num_experts_per_tok} must be in [1, {experts} {config.num_experts}]"
        )


# ------------------------------------------------------------------------------------------ Linen modules


class Experts(nn.Module):
    """The routed experts of a block: parameters ``gate_up_proj (E, D, 2F)`` and ``down_proj (E, F, D)`` (named
    as ``transformers``' ``*Experts`` modules name them), applied by :func:`experts_glu`, or by
    :func:`experts_glu_sharded` when traced under a mesh with an ``expert`` axis (``jax.set_mesh``) that the
    dispatch applies to (:func:`expert_parallel_blocker`); then the number of dropped (token, expert) pairs is
    sown as ``intermediates / dropped_pairs``. ``capacity_factor``: see :func:`expert_capacity`."""

    num_experts: int
    features: int
    intermediate: int
    activation: str = "silu"
    init_std: float = 0.02
    dtype: Dtype = jnp.float32
    dispatch: str = "ragged"
    capacity_factor: float | None = None

    @nn.compact
    def __call__(self, x: Array, routing: Routing) -> Array:
        e, d, f = self.num_experts, self.features, self.intermediate
        init = lambda shape: lambda: self.init_std * jax.random.normal(self.make_rng("params"), shape)  # noqa: E731
        gate_up = ops.astype(self.variable("params", "gate_up_proj", init((e, d, 2 * f))).value, self.dtype)
        down = ops.astype(self.variable("params", "down_proj", init((e, f, d))).value, self.dtype)
        act = ACTIVATIONS[self.activation]
        mesh = _expert_mesh() if self.dispatch == "ragged" and not self.is_initializing() else None
        if mesh is not None and expert_parallel_blocker(mesh, x.shape[0], {"gate_up": gate_up, "down": down}) is None:
            out = experts_glu_sharded(
                x.astype(self.dtype),
                routing,
                mesh=mesh,
                gate_up=gate_up,
                down=down,
                act=act,
                capacity_factor=self.capacity_factor,
            )
            self.sow("intermediates", "dropped_pairs", out.dropped)
            return out.y
        return experts_glu(x.astype(self.dtype), routing, gate_up=gate_up, down=down, act=act, dispatch=self.dispatch)


class SparseMoeBlock(nn.Module):
    """A sparse MoE block as ``transformers``' ``*SparseMoeBlock``: the router ``gate`` (a bias-free
    ``(D, E)`` kernel), top-``k`` :func:`route`, the :class:`Experts`. ``(B, S, D) -> (B, S, D)``.

    The router logits ``(B*S, E)`` are sown as ``intermediates / router_logits`` (apply with
    ``mutable=["intermediates"]`` to get them; :func:`collect_router_logits` gathers every layer's in order)."""

    num_experts: int
    top_k: int
    features: int
    intermediate: int
    norm_topk_prob: bool = True
    activation: str = "silu"
    init_std: float = 0.02
    dtype: Dtype = jnp.float32
    dispatch: str = "ragged"
    capacity_factor: float | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, s, d = x.shape
        h = x.reshape(b * s, d)
        logits = Dense(
            self.num_experts,
            use_bias=False,
            dtype=self.dtype,
            kernel_init=nn.initializers.normal(self.init_std),
            name="gate",
        )(h)
        self.sow("intermediates", "router_logits", logits)
        routing = route_sharded(
            logits,
            self.top_k,
            norm_topk_prob=self.norm_topk_prob,
            mesh=None if self.is_initializing() else _expert_mesh(),
        )
        y = Experts(
            self.num_experts,
            d,
            self.intermediate,
            self.activation,
            self.init_std,
            self.dtype,
            self.dispatch,
            self.capacity_factor,
            name="experts",
        )(h, routing)
        return y.reshape(b, s, d)


class MoeDecoderLayer(DecoderLayer):
    """The pre-norm decoder block of the MoE families (Qwen3-MoE, Mixtral): a
    :class:`~lora_jax.models.decoder.DecoderLayer` (``x + self_attn(input_layernorm(x))``, then
    ``x + mlp(post_attention_layernorm(x))``) whose ``mlp`` is a :class:`SparseMoeBlock` on the layers
    ``config.is_sparse(layer)`` marks and the dense :class:`~lora_jax.models.layers.GatedMLP` on the others.

    ``config``: a :class:`~lora_jax.models.decoder.DecoderConfig` with ``num_experts``, ``num_experts_per_tok``,
    ``moe_intermediate_size``, ``norm_topk_prob``, ``moe_dispatch`` and ``is_sparse(layer)``."""

    def feed_forward(self) -> nn.Module:
        c = self.config
        if not c.is_sparse(0 if self.layer is None else self.layer):  # a scanned stack: every layer alike
            return super().feed_forward()
        return SparseMoeBlock(
            num_experts=c.num_experts,
            top_k=c.num_experts_per_tok,
            features=c.hidden_size,
            intermediate=c.moe_intermediate_size,
            norm_topk_prob=c.norm_topk_prob,
            activation=c.hidden_act,
            init_std=c.initializer_range,
            dtype=self.dtype,
            dispatch=c.moe_dispatch,
            capacity_factor=getattr(c, "moe_capacity_factor", None),
            name="mlp",
        )


MoeDecoderModel = functools.partial(DecoderModel, layer=MoeDecoderLayer)
"""The decoder stack of the MoE families (:class:`~lora_jax.models.decoder.DecoderModel` of
:class:`MoeDecoderLayer` blocks): their declarations' ``tasks=decoder.tasks(moe.MoeDecoderModel)``."""


def aux_loss(intermediates: Mapping, config: Any, attention_mask: Array | None = None) -> Array:
    """``config.router_aux_loss_coef * load_balancing_loss(...)`` over the router logits sown by a forward pass
    with ``mutable=["intermediates"]``: what ``transformers``' ``*ForCausalLM`` adds to its loss when
    ``output_router_logits`` is set. ``attention_mask (B, S)`` leaves padding out."""
    logits = collect_router_logits(intermediates)
    if not logits:
        raise ArgumentError(
            "aux_loss: no router_logits in intermediates; apply the model with mutable=['intermediates']"
        )
    return config.router_aux_loss_coef * load_balancing_loss(
        logits, config.num_experts, config.num_experts_per_tok, attention_mask
    )


def collect_router_logits(intermediates: Mapping) -> list[Array]:
    """Every ``router_logits`` sown by a :class:`SparseMoeBlock` in ``intermediates`` (from
    ``apply(..., mutable=["intermediates"])``), in layer order (``layers_0``, ``layers_1``, ...)."""
    found = []
    for path, value in tree.flatten(intermediates).items():
        if path[-1] == "router_logits":  # sow keeps a tuple: one entry per call
            order = tuple(int(m.group(1)) if (m := re.fullmatch(r".*_(\d+)", p)) else -1 for p in path)
            found += [(order, i, v) for i, v in enumerate(value if isinstance(value, tuple) else (value,))]
    return [v for *_, v in sorted(found, key=lambda t: t[:2])]


# -------------------------------------------------------------------------------------- checkpoint layouts


def expert_tensor_names(module_template: str, names: Sequence[str]) -> Callable:
    """A :class:`~lora_jax.models.arch.Rule` ``name`` for a stacked expert leaf stored as one tensor per expert and
    projection, as ``transformers`` saves MoE checkpoints: ``module_template`` formats ``{layer}`` / ``{expert}``
    / ``{name}`` into a module name (``"model.layers.{layer}.mlp.experts.{expert}.{name}"``), for each expert and
    each of ``names`` (``("gate_proj", "up_proj")`` for a fused ``gate_up_proj`` leaf). The layer is the first
    ``layers.N`` in the default name; without a config (``Names.hf_name``) only expert 0's names."""

    def rule(default: str, config: Any) -> tuple[str, ...]:
        layer = re.search(r"layers\.(\d+)\.", default).group(1)
        prefix = default[: default.index("layers.")]
        experts = 1 if config is None else config.num_experts  # without a config: the first tensor's name
        return tuple(
            prefix + module_template.format(layer=layer, expert=e, name=n) + ".weight"
            for e in range(experts)
            for n in names
        )

    return rule


FUSED = ((permuted((0, 2, 1)), None),)
"""A :class:`~lora_jax.models.arch.Rule`'s ``also`` for an expert stack: the one fused ``(E, d_out, d_in)`` tensor
named as ``transformers`` names the parameter at run time (``model.layers.0.mlp.experts.gate_up_proj``), which is
what a file saved from a ``state_dict`` holds (``transformers`` reads such files too)."""


def per_expert(parts: int) -> Layout:
    """The :class:`~lora_jax.models.arch.Layout` of a stacked expert leaf ``(E, d_in, parts * d_out)`` stored as
    ``E * parts`` ``nn.Linear`` weights ``(d_out, d_in)``, expert-major (``gate_0, up_0, gate_1, up_1, ...``): each
    expert's kernel is its parts side by side along the output axis (``parts=2``: a fused ``gate_up_proj``)."""

    def load(xs):
        lib = jnp if isinstance(xs[0], jax.Array) else np
        n = len(xs) // parts
        return lib.stack([lib.concatenate([xs[e * parts + i].T for i in range(parts)], axis=1) for e in range(n)])

    def save(x):
        f = x.shape[2] // parts
        return [x[e, :, i * f : (i + 1) * f].T for e in range(x.shape[0]) for i in range(parts)]

    return Layout(load=load, save=save, transposed=True)


__all__ = [
    "DISPATCHES",
    "FUSED",
    "Dispatch",
    "Experts",
    "MoeDecoderLayer",
    "MoeDecoderModel",
    "Routing",
    "Sorted",
    "SparseMoeBlock",
    "aux_loss",
    "check_config",
    "collect_router_logits",
    "dispatch_slots",
    "expert_capacity",
    "expert_parallel_blocker",
    "expert_tensor_names",
    "experts_glu",
    "experts_glu_sharded",
    "load_balancing_loss",
    "per_expert",
    "route",
    "route_sharded",
    "sort_by_expert",
]
