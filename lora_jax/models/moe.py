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

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import ops, tree
from lora_jax.core import LoraWeight
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
    if (gate_up is None) == (gate is None or up is None) or \
            (gate_up is not None and (gate is not None or up is not None)):
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


def check_config(config: Any, experts: str = "num_experts") -> None:
    """What a MoE family's ``Config.__post_init__`` checks of its MoE fields: ``moe_dispatch`` is one of
    :data:`DISPATCHES` and ``1 <= num_experts_per_tok <= num_experts``; ``experts`` names the expert count as the
    family's ``transformers`` config does (Mixtral: ``num_local_experts``). Raises ``ValueError``."""
    if config.moe_dispatch not in DISPATCHES:
        raise ValueError(f"moe_dispatch must be one of {DISPATCHES}, got {config.moe_dispatch!r}")
    if not 1 <= config.num_experts_per_tok <= config.num_experts:
        raise ValueError(f"num_experts_per_tok {config.num_experts_per_tok} must be in [1, {experts} "
                         f"{config.num_experts}]")


# ------------------------------------------------------------------------------------------ Linen modules


class Experts(nn.Module):
    """The routed experts of a block: parameters ``gate_up_proj (E, D, 2F)`` and ``down_proj (E, F, D)`` (named
    as ``transformers``' ``*Experts`` modules name them), applied by :func:`experts_glu`."""

    num_experts: int
    features: int
    intermediate: int
    activation: str = "silu"
    init_std: float = 0.02
    dtype: Dtype = jnp.float32
    dispatch: str = "ragged"

    @nn.compact
    def __call__(self, x: Array, routing: Routing) -> Array:
        e, d, f = self.num_experts, self.features, self.intermediate
        init = lambda shape: lambda: self.init_std * jax.random.normal(self.make_rng("params"), shape)  # noqa: E731
        gate_up = self.variable("params", "gate_up_proj", init((e, d, 2 * f))).value
        down = self.variable("params", "down_proj", init((e, f, d))).value
        return experts_glu(x.astype(self.dtype), routing, gate_up=ops.astype(gate_up, self.dtype),
                           down=ops.astype(down, self.dtype), act=ACTIVATIONS[self.activation], dispatch=self.dispatch)


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

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, s, d = x.shape
        h = x.reshape(b * s, d)
        logits = Dense(self.num_experts, use_bias=False, dtype=self.dtype, kernel_init=nn.initializers.normal(
            self.init_std), name="gate")(h)
        self.sow("intermediates", "router_logits", logits)
        routing = route(logits, self.top_k, norm_topk_prob=self.norm_topk_prob)
        y = Experts(self.num_experts, d, self.intermediate, self.activation, self.init_std, self.dtype, self.dispatch,
                    name="experts")(h, routing)
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
        if not c.is_sparse(self.layer):
            return super().feed_forward()
        return SparseMoeBlock(c.num_experts, c.num_experts_per_tok, c.hidden_size, c.moe_intermediate_size,
                              c.norm_topk_prob, c.hidden_act, c.initializer_range, self.dtype, c.moe_dispatch,
                              name="mlp")


MoeDecoderModel = functools.partial(DecoderModel, layer=MoeDecoderLayer)
"""The decoder stack of the MoE families (:class:`~lora_jax.models.decoder.DecoderModel` of
:class:`MoeDecoderLayer` blocks): their declarations' ``tasks=decoder.tasks(moe.MoeDecoderModel)``."""


def aux_loss(intermediates: Mapping, config: Any, attention_mask: Array | None = None) -> Array:
    """``config.router_aux_loss_coef * load_balancing_loss(...)`` over the router logits sown by a forward pass
    with ``mutable=["intermediates"]``: what ``transformers``' ``*ForCausalLM`` adds to its loss when
    ``output_router_logits`` is set. ``attention_mask (B, S)`` leaves padding out."""
    logits = collect_router_logits(intermediates)
    if not logits:
        raise ValueError("aux_loss: no router_logits in intermediates; apply the model with "
                         "mutable=['intermediates']")
    return config.router_aux_loss_coef * load_balancing_loss(logits, config.num_experts, config.num_experts_per_tok,
                                                             attention_mask)


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
        return tuple(prefix + module_template.format(layer=layer, expert=e, name=n) + ".weight"
                     for e in range(experts) for n in names)

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
        return [x[e, :, i * f:(i + 1) * f].T for e in range(x.shape[0]) for i in range(parts)]

    return Layout(load=load, save=save, transposed=True)


__all__ = ["DISPATCHES", "FUSED", "Experts", "MoeDecoderLayer", "MoeDecoderModel", "Routing", "Sorted",
           "SparseMoeBlock", "aux_loss", "check_config", "collect_router_logits", "expert_tensor_names", "experts_glu",
           "load_balancing_loss", "per_expert", "route", "sort_by_expert"]
