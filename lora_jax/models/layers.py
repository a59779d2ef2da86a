"""Building blocks shared by the project's Flax models, written once.

Every projection goes through :func:`lora_jax.ops.dot`, so a kernel that :func:`lora_jax.wrap` turned into a
``LoraWeight`` runs the factored LoRA forward, and a plain kernel runs an ordinary matmul.

Kernels and tables are read with ``self.variable("params", ...)`` rather than ``self.param``: Linen's ``param``
checks the stored value's leaves against the initialiser's shape, which a ``LoraWeight`` (base, A, B) or a
quantised kernel would fail although the model handles them.

Submodules are named as ``transformers`` names them (``q_proj``, ``gate_proj``, ``q_norm``, ...), so the default
name rule of :class:`lora_jax.models.arch.Names` maps their parameters.

- :class:`Dense`, :class:`Embed` (with ``attend`` for a tied output head), :class:`RMSNorm` (``offset=1``:
  Gemma's ``(1 + w)``), :func:`layer_norm`, :data:`ACTIVATIONS`;
- :class:`Rope` (default / linear / Llama 3 scaling) and :func:`apply_rope`;
- :func:`attend` (grouped-query softmax attention under a boolean mask) and :class:`Attention` (q/k/v/o
  projections, RoPE, optional per-head q/k RMSNorm, KV cache; the mask carries causality and sliding windows,
  see :mod:`lora_jax.models.generate`);
- :class:`GatedMLP` (SwiGLU / GeGLU: ``down(act(gate(x)) * up(x))``);
- the configs' shared checks and mappings: :func:`check_activation`, :func:`check_multiple`,
  :func:`check_model_type`, :func:`check_labels`, :func:`labels_from_hf` / :func:`id2label`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import ops
from lora_jax.errors import ArgumentError
from lora_jax.models import attention
from lora_jax.models.generate import write_cache
from lora_jax.sharding import constrain

Array = jax.Array
Dtype = Any

# Hugging Face ``hidden_act`` / ``activation_function`` names -> functions (``gelu`` is the exact erf form).
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


# ------------------------------------------------------------------------------------ config checks
# What the families' configs check and map alike (``__post_init__``, ``from_hf`` / ``to_hf``), written once; each
# error names the field, what it expected and what came.


def check_activation(name: str, what: str) -> None:
    """Raise ``ValueError`` naming the supported activations when ``name`` is not one."""
    if name not in ACTIVATIONS:
        raise ArgumentError(f"{what} {name!r} is not supported; expected one of {sorted(ACTIVATIONS)}")


def check_multiple(what: str, value: int, of: str, divisor: int, why: str | None = None) -> None:
    """Raise ``ValueError`` unless ``value`` (the field ``what``, e.g. ``"BERT hidden_size"``) is a multiple of
    ``divisor`` (the field ``of``, e.g. ``"num_attention_heads"``): ``"<what> <value> must be a multiple of <of>
    <divisor>"``, then `` (<why>)`` when given."""
    if value % divisor:
        raise ArgumentError(f"{what} {value} must be a multiple of {of} {divisor}" + (f" ({why})" if why else ""))


def check_model_type(hf_config: Any, model_types: tuple[str, ...], who: str) -> str:
    """``hf_config.model_type`` when it is one of ``model_types``, else ``ValueError`` naming ``who`` (the reader,
    e.g. ``"bert.Config.from_hf"``), the model types it reads and the one that came."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in model_types:
        raise ArgumentError(f"{who} expects a config with model_type in {model_types}, got {model_type!r}")
    return model_type


def check_labels(what: str, labels: tuple[str, ...] | None, num_labels: int) -> None:
    """Raise ``ValueError`` when a classification head's class names ``labels`` (``None``: the defaults) are not
    ``num_labels`` of them; ``what`` names the family (``"BERT"``)."""
    if labels is not None and len(labels) != num_labels:
        raise ArgumentError(f"{what} labels {labels} must have num_labels={num_labels} entries")


def labels_from_hf(hf_config: Any) -> tuple[int, tuple[str, ...] | None]:
    """``(num_labels, labels)`` of a ``transformers`` config: ``num_labels`` (2 when absent) and the class names of
    its ``id2label`` in index order, ``None`` when they are all the defaults ``LABEL_i``."""
    num_labels = int(getattr(hf_config, "num_labels", 2))
    id2label = {int(k): str(v) for k, v in (getattr(hf_config, "id2label", None) or {}).items()}
    labels = tuple(id2label.get(i, f"LABEL_{i}") for i in range(num_labels))
    return num_labels, None if labels == tuple(f"LABEL_{i}" for i in range(num_labels)) else labels


def id2label(labels: tuple[str, ...] | None, num_labels: int) -> dict[int, str]:
    """A ``transformers`` config's ``id2label`` for these class names (``None``: ``LABEL_i``); the inverse of
    :func:`labels_from_hf`."""
    return {i: (labels[i] if labels else f"LABEL_{i}") for i in range(num_labels)}


def normal(std: float):
    return nn.initializers.normal(std)


class Dense(nn.Module):
    """``y = x @ kernel + bias`` with ``kernel`` of shape ``(in, features)`` (Hugging Face ``nn.Linear``
    weights are stored transposed, ``(out, in)``; the loaders transpose them)."""

    features: int
    use_bias: bool = True
    dtype: Dtype | None = None  # compute dtype; None: the input's
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, x):
        kernel = self.variable(
            "params",
            "kernel",
            lambda: self.kernel_init(self.make_rng("params"), (x.shape[-1], self.features), self.param_dtype),
        ).value
        dtype = self.dtype or x.dtype
        y = ops.dot(x.astype(dtype), ops.astype(kernel, dtype))
        if self.use_bias:
            bias = self.variable("params", "bias", lambda: jnp.zeros((self.features,), self.param_dtype)).value
            y = y + bias.astype(dtype)
        return y


class Embed(nn.Module):
    """A table ``(num_embeddings, features)`` read through :func:`lora_jax.ops.embed` (so an adapted table
    works); ``attend`` computes ``x @ table.T`` for a tied output head (materialising the table only when it
    is adapted)."""

    num_embeddings: int
    features: int
    dtype: Dtype = jnp.float32
    init_std: float = 0.02
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.table = self.variable(
            "params",
            "embedding",
            lambda: (
                self.init_std
                * jax.random.normal(self.make_rng("params"), (self.num_embeddings, self.features), self.param_dtype)
            ),
        )

    def __call__(self, ids: Array) -> Array:
        """``(...,)`` int -> ``(..., features)`` in ``dtype``."""
        return ops.embed(ids, self.table.value).astype(self.dtype)

    def attend(self, x: Array) -> Array:
        """``(..., features)`` -> ``(..., num_embeddings)`` logits."""
        table = ops.materialize(self.table.value)
        return jnp.matmul(x, jnp.asarray(table, x.dtype).T)


class RMSNorm(nn.Module):
    """``(offset + scale) * x / sqrt(mean(x^2) + eps)`` over the last axis, statistics in float32.

    ``offset=0`` (Llama, Qwen): the normalised ``x`` is cast to ``dtype`` before the scale, as
    ``LlamaRMSNorm``; ``offset=1`` (Gemma, whose stored weight is ``w`` in ``x * (1 + w)``): scaled in float32,
    then cast, as ``GemmaRMSNorm``; the scale then initialises to zeros.
    """

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    offset: float = 0.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), jnp.float32)
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (h * (self.offset + jnp.asarray(scale, jnp.float32))).astype(self.dtype)
        return jnp.asarray(scale, self.dtype) * h.astype(self.dtype)


def layer_norm(eps: float, dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
    """LayerNorm with the exact variance ``E[(x - mean)^2]`` that torch computes; statistics in float32
    whatever the compute dtype."""
    return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


# ---------------------------------------------------------------------------------------------- RoPE

ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class Rope:
    """Rotary embedding settings (Hugging Face ``rope_parameters``): base ``theta`` and a scaling
    (``default``, ``linear`` (positions interpolated by ``factor``) or ``llama3``)."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    max_position_embeddings: int = 2048

    def __post_init__(self):
        if self.type not in ROPE_TYPES:
            raise ArgumentError(f"rope_type {self.type!r} is not supported; expected one of {ROPE_TYPES}")

    def inv_freq(self, dim: int) -> np.ndarray:
        """Inverse frequencies ``(dim // 2,)`` float32 after the scaling:

        - ``default``: ``theta ** (-2i / dim)``;
        - ``linear``: divided by ``factor``;
        - ``llama3``: long wavelengths divided by ``factor``, short ones kept, a smooth blend in between
          (Llama 3.1).
        """
        inv_freq = 1.0 / (np.float32(self.theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
        if self.type == "linear":
            inv_freq = inv_freq / np.float32(self.factor)
        elif self.type == "llama3":
            factor, low, high = self.factor, self.low_freq_factor, self.high_freq_factor
            old_len = self.original_max_position_embeddings or self.max_position_embeddings
            wavelen = 2 * math.pi / inv_freq
            scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
            smooth = (old_len / wavelen - low) / (high - low)
            blended = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
            inv_freq = np.where(medium, blended, scaled)
        return np.asarray(inv_freq, np.float32)


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
    """Rotate ``x`` ``(B, S, heads, head_dim)`` by the angles ``positions (B, S) * inv_freq``.

    Hugging Face layout: the two halves of each head are the two coordinates of each rotated pair
    (``rotate_half``), angles computed in float32.
    """
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # (B, S, hd/2)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


# ----------------------------------------------------------------------------------------- attention


def attend(
    q: Array, k: Array, v: Array, mask: Array, scale: float | None = None, softcap: float | None = None
) -> Array:
    """Softmax attention with grouped key/value heads.

    Shapes: ``q (B, S, H, hd)``, ``k``/``v`` ``(B, T, KV, hd)`` with ``H`` a multiple of ``KV``, ``mask
    (B, S, T)`` bool (True: may attend) -> ``(B, S, H, hd)``. Scores (times ``scale``, default
    ``1 / sqrt(hd)``; with ``softcap`` then ``softcap * tanh(scores / softcap)``, Gemma's attention logit
    soft-capping) and softmax in float32.
    """
    b, s, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, s, kv, h // kv, d)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    scores = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgst,btkd->bskgd", probs, v).reshape(b, s, h, d)


class Attention(nn.Module):
    """Grouped-query self-attention: ``q_proj`` / ``k_proj`` / ``v_proj`` -> (per-head ``q_norm`` /
    ``k_norm``) -> RoPE -> KV cache -> :func:`lora_jax.models.attention.attend` -> ``o_proj``.

    Attributes:
      num_heads, num_kv_heads, head_dim, features: query heads, key/value heads (a divisor of ``num_heads``),
        the head width and the output width.
      qkv_bias, o_bias: which projections have biases.
      rope: the rotary embedding (``None``: no rotation).
      sliding_rope: the rotary embedding of the layers a :class:`lora_jax.models.attention.LayerMask` marks
        sliding (Gemma 3's local RoPE base; ``None``: ``rope``), for a scanned stack that mixes both kinds.
      qk_norm_eps: RMS-normalise each query and key head before RoPE (Qwen3, Gemma 3) with this epsilon;
        ``None``: no q/k norms. ``norm_offset``: the :class:`RMSNorm` offset of those norms.
      scale: the score scale (``None``: ``1 / sqrt(head_dim)``); softcap: soft-cap the scores at this value
        (``None``: no capping), see :func:`attend`.
      init_std: the std of the kernels' normal init.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    features: int
    qkv_bias: bool = False
    o_bias: bool = False
    rope: Rope | None = None
    qk_norm_eps: float | None = None
    norm_offset: float = 0.0
    scale: float | None = None
    softcap: float | None = None
    init_std: float = 0.02
    dtype: Dtype = jnp.float32
    sliding_rope: Rope | None = None

    @nn.compact
    def __call__(self, x: Array, positions: Array, mask: Array, kv: tuple[Array, Array] | None, start: Array):
        """``x (B, S, D)``, ``positions (B, S)``, ``mask`` (a :class:`lora_jax.models.attention.Mask`, whose
        implementation attends, or a ``(B, S, T)`` bool array) -> ``(B, S, features)`` and the layer's updated
        ``(keys, values)`` (``None`` without cache)."""
        b, s, _ = x.shape
        dense = lambda n, bias, name: Dense(
            n,
            use_bias=bias,
            dtype=self.dtype,
            name=name,  # noqa: E731
            kernel_init=normal(self.init_std),
        )
        q = dense(self.num_heads * self.head_dim, self.qkv_bias, "q_proj")(x)
        k = dense(self.num_kv_heads * self.head_dim, self.qkv_bias, "k_proj")(x)
        v = dense(self.num_kv_heads * self.head_dim, self.qkv_bias, "v_proj")(x)
        q = constrain(q.reshape(b, s, self.num_heads, self.head_dim), ("batch", None, "heads", None))
        k = constrain(k.reshape(b, s, self.num_kv_heads, self.head_dim), ("batch", None, "kv_heads", None))
        v = constrain(v.reshape(b, s, self.num_kv_heads, self.head_dim), ("batch", None, "kv_heads", None))
        if self.qk_norm_eps is not None:
            q = RMSNorm(self.qk_norm_eps, self.dtype, self.norm_offset, name="q_norm")(q)
            k = RMSNorm(self.qk_norm_eps, self.dtype, self.norm_offset, name="k_norm")(k)
        if self.rope is not None:
            inv_freq = self.rope.inv_freq(self.head_dim)
            if self.sliding_rope is not None and isinstance(mask, attention.LayerMask):
                inv_freq = jnp.where(mask.use_sliding, self.sliding_rope.inv_freq(self.head_dim), inv_freq)
            q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        if kv is not None:
            k, v = write_cache(kv[0], k, start), write_cache(kv[1], v, start)
            kv = (k, v)
        out = attention.attend(q, k.astype(self.dtype), v.astype(self.dtype), mask, self.scale, self.softcap)
        out = out.reshape(b, s, -1)
        return dense(self.features, self.o_bias, "o_proj")(out), kv


class GatedMLP(nn.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))``: SwiGLU with ``silu``, GeGLU with a ``gelu``."""

    features: int
    intermediate: int
    activation: str = "silu"
    use_bias: bool = False
    init_std: float = 0.02
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dense = lambda n, name: Dense(
            n,
            use_bias=self.use_bias,
            dtype=self.dtype,
            name=name,  # noqa: E731
            kernel_init=normal(self.init_std),
        )
        h = ACTIVATIONS[self.activation](dense(self.intermediate, "gate_proj")(x)) * dense(
            self.intermediate, "up_proj"
        )(x)
        return dense(self.features, "down_proj")(constrain(h, ("batch", None, "mlp")))


# Activation checkpointing of each block: what its forward pass keeps for the backward pass (the rest is
# recomputed there). "none": everything kept (no checkpoint); "full": only the block's inputs.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat(block: Any, policy: str) -> Any:
    """The module class ``block`` itself for ``policy="none"``, else ``nn.remat(block)`` with that policy of
    :data:`REMAT_POLICIES` (parameter paths are unchanged)."""
    if policy not in REMAT_POLICIES:
        raise ArgumentError(f"remat policy must be one of {sorted(REMAT_POLICIES)}, got {policy!r}")
    return block if policy == "none" else nn.remat(block, policy=REMAT_POLICIES[policy])


__all__ = [
    "ACTIVATIONS",
    "REMAT_POLICIES",
    "ROPE_TYPES",
    "Attention",
    "Dense",
    "Embed",
    "GatedMLP",
    "RMSNorm",
    "Rope",
    "apply_rope",
    "attend",
    "check_activation",
    "check_labels",
    "check_model_type",
    "check_multiple",
    "id2label",
    "labels_from_hf",
    "layer_norm",
    "normal",
    "remat",
]
