"""Llama-family decoders (Llama 1-3, Mistral, Qwen2) as Flax Linen modules whose projections all run through
:mod:`lora_jax.ops`.

Read top to bottom: ``Config`` -> RMSNorm -> rotary embeddings -> grouped-query attention -> SwiGLU MLP ->
decoder layer -> :class:`LlamaModel` / :class:`LlamaForCausalLM` -> Hugging Face weight conversion.

Parameter paths mirror the Hugging Face module names (list index ``.N.`` -> ``_N``; ``nn.Linear.weight``
(out, in) -> ``kernel`` (in, out); RMSNorm ``weight`` -> ``scale``; ``nn.Embedding.weight`` -> ``embedding``)::

    LlamaForCausalLM params                                Hugging Face tensor
    model/embed_tokens/embedding           (V, D)          model.embed_tokens.weight
    model/layers_N/input_layernorm/scale   (D,)            model.layers.N.input_layernorm.weight
    model/layers_N/self_attn/q_proj/kernel (D, H*hd)       model.layers.N.self_attn.q_proj.weight
    model/layers_N/self_attn/k_proj/kernel (D, KV*hd)      model.layers.N.self_attn.k_proj.weight
    model/layers_N/self_attn/v_proj/kernel (D, KV*hd)      model.layers.N.self_attn.v_proj.weight
    model/layers_N/self_attn/o_proj/kernel (H*hd, D)       model.layers.N.self_attn.o_proj.weight
    model/layers_N/post_attention_layernorm/scale          model.layers.N.post_attention_layernorm.weight
    model/layers_N/mlp/{gate,up}_proj/kernel (D, F)        model.layers.N.mlp.{gate,up}_proj.weight
    model/layers_N/mlp/down_proj/kernel    (F, D)          model.layers.N.mlp.down_proj.weight
    model/norm/scale                       (D,)            model.norm.weight
    lm_head/kernel                         (D, V)          lm_head.weight   (absent with tied embeddings)
    (q/k/v ``bias`` for Qwen2 or ``attention_bias``; o_proj ``bias`` with ``attention_bias``; mlp ``bias`` with
    ``mlp_bias``)

So ``lora.init(params, targets="qv")`` adapts every ``q_proj`` and ``v_proj`` kernel (PEFT's default for
Llama) and ``"all-linear"`` adapts the seven projections of every layer but not the embedding or ``lm_head``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import ops
from lora_jax.core import is_lora_weight
from lora_jax.models.generate import KVCache, begin_step, default_positions, finish_step, write_cache
from lora_jax.models.layers import Dense, remat

from lora_jax.errors import CheckpointError

Array = jax.Array
Dtype = Any
logger = logging.getLogger("lora_jax.models")

MODEL_TYPES = ("llama", "mistral", "qwen2")
TASKS = ("causal-lm", "base")
ROPE_TYPES = ("default", "linear", "llama3")

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


# --------------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class Config:
    """Hyper-parameters of a Llama-family decoder (the fields of ``transformers.LlamaConfig`` /
    ``MistralConfig`` / ``Qwen2Config`` that the model uses).

    ``rope_*``: rotary embedding base and scaling (``rope_type`` one of ``"default"``, ``"linear"``,
    ``"llama3"``). ``qkv_bias`` / ``o_bias`` / ``mlp_bias``: which projections have biases (Qwen2: q, k, v).
    ``sliding_window``: Mistral / Qwen2 local attention span in tokens, applied to the layers marked in
    ``sliding_layers`` (``None``: all layers).
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    model_type: str = "llama"

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"llama.Config model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads} (grouped-query attention)")
        if self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {self.head_dim}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; expected one of "
                             f"{sorted(ACTIVATIONS)}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type {self.rope_type!r} is not supported; expected one of {ROPE_TYPES}")
        if self.sliding_layers is not None and len(self.sliding_layers) != self.num_hidden_layers:
            raise ValueError(f"sliding_layers has {len(self.sliding_layers)} entries for {self.num_hidden_layers} "
                             "layers")

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    def is_sliding(self, layer: int) -> bool:
        return self.sliding_window is not None and (self.sliding_layers is None or self.sliding_layers[layer])

    @classmethod
    def from_hf(cls, hf_config) -> Config:
        """From a ``transformers`` ``LlamaConfig``, ``MistralConfig`` or ``Qwen2Config``.

        Raises ``ValueError`` for settings this model does not implement: a RoPE scaling other than
        ``linear`` / ``llama3``, partial rotary embeddings, an unknown activation.
        """
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in MODEL_TYPES:
            raise ValueError(f"llama.Config.from_hf expects a config with model_type in {MODEL_TYPES}, got "
                             f"{model_type!r}")
        rope = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"{model_type} rope scaling {rope_type!r} is not supported; supported: {ROPE_TYPES}")
        if float(rope.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0)) or 1.0) != 1.0:
            raise ValueError(f"{model_type}: partial rotary embeddings (partial_rotary_factor "
                             f"{rope.get('partial_rotary_factor')}) are not supported")
        theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
        if hf_config.hidden_act not in ACTIVATIONS:
            raise ValueError(f"{model_type} hidden_act {hf_config.hidden_act!r} is not supported; expected one of "
                             f"{sorted(ACTIVATIONS)}")

        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        qkv_bias, o_bias = (True, False) if model_type == "qwen2" else (attention_bias, attention_bias)
        window, sliding_layers = None, None
        if model_type == "mistral" and getattr(hf_config, "sliding_window", None):
            window = int(hf_config.sliding_window)
        if model_type == "qwen2" and getattr(hf_config, "use_sliding_window", False) and hf_config.sliding_window:
            window = int(hf_config.sliding_window)
            types = getattr(hf_config, "layer_types", None)
            if types is None:
                types = ["sliding_attention" if i >= hf_config.max_window_layers else "full_attention"
                         for i in range(hf_config.num_hidden_layers)]
            sliding_layers = tuple(t == "sliding_attention" for t in types)
            if not any(sliding_layers):
                window, sliding_layers = None, None
        eos = getattr(hf_config, "eos_token_id", None)
        return cls(
            vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size, num_hidden_layers=hf_config.num_hidden_layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
            hidden_act=hf_config.hidden_act, max_position_embeddings=hf_config.max_position_embeddings,
            rms_norm_eps=float(hf_config.rms_norm_eps), initializer_range=float(hf_config.initializer_range),
            rope_theta=float(theta), rope_type=rope_type, rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_position_embeddings=rope.get("original_max_position_embeddings"),
            qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            sliding_window=window, sliding_layers=sliding_layers,
            bos_token_id=getattr(hf_config, "bos_token_id", None),
            eos_token_id=tuple(eos) if isinstance(eos, (list, tuple)) else eos,
            pad_token_id=getattr(hf_config, "pad_token_id", None), model_type=model_type,
        )

    def to_hf(self):
        """The equivalent ``transformers`` config (``LlamaConfig``, ``MistralConfig`` or ``Qwen2Config``)."""
        import transformers

        rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type != "default":
            rope["factor"] = self.rope_factor
        if self.rope_type == "llama3":
            rope.update(low_freq_factor=self.rope_low_freq_factor, high_freq_factor=self.rope_high_freq_factor,
                        original_max_position_embeddings=self.rope_original_max_position_embeddings)
        common = dict(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, hidden_act=self.hidden_act,
            max_position_embeddings=self.max_position_embeddings, rms_norm_eps=self.rms_norm_eps,
            initializer_range=self.initializer_range, rope_parameters=rope,
            tie_word_embeddings=self.tie_word_embeddings, bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        if self.model_type == "llama":
            if self.qkv_bias != self.o_bias:
                raise ValueError("a Llama config has one attention_bias for q, k, v and o; this Config differs")
            return transformers.LlamaConfig(head_dim=self.head_dim, attention_bias=self.qkv_bias,
                                            mlp_bias=self.mlp_bias, **common)
        if self.model_type == "mistral":
            return transformers.MistralConfig(head_dim=self.head_dim, sliding_window=self.sliding_window, **common)
        layer_types = None
        if self.sliding_window is not None:
            layer_types = ["sliding_attention" if self.is_sliding(i) else "full_attention"
                           for i in range(self.num_hidden_layers)]
        cfg = transformers.Qwen2Config(use_sliding_window=self.sliding_window is not None,
                                       sliding_window=self.sliding_window, layer_types=layer_types, **common)
        if self.head_dim != self.hidden_size // self.num_attention_heads:
            cfg.head_dim = self.head_dim
        return cfg


# --------------------------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """``scale * x / sqrt(mean(x^2) + eps)``, statistics in float32, as Hugging Face's ``LlamaRMSNorm``."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return jnp.asarray(scale, self.dtype) * h.astype(self.dtype)


class Embed(nn.Module):
    """A token table ``(num_embeddings, features)`` read through :func:`lora_jax.ops.embed`; ``attend``
    computes ``x @ table.T`` for a tied output head (materialising the table only when it is adapted)."""

    num_embeddings: int
    features: int
    dtype: Dtype = jnp.float32
    init_std: float = 0.02

    def setup(self):
        self.table = self.variable("params", "embedding", lambda: self.init_std * jax.random.normal(
            self.make_rng("params"), (self.num_embeddings, self.features), jnp.float32))

    def __call__(self, ids: Array) -> Array:
        """``(...,)`` int -> ``(..., features)`` in ``dtype``."""
        return ops.embed(ids, self.table.value).astype(self.dtype)

    def attend(self, x: Array) -> Array:
        """``(..., features)`` -> ``(..., num_embeddings)`` logits."""
        table = ops.materialize(self.table.value)
        return jnp.matmul(x, jnp.asarray(table, x.dtype).T)


def rope_frequencies(config: Config) -> np.ndarray:
    """Inverse frequencies ``(head_dim // 2,)`` float32 of the rotary embedding, after the config's scaling:

    - ``default``: ``theta ** (-2i / head_dim)``;
    - ``linear``: divided by ``factor`` (positions interpolated);
    - ``llama3``: long wavelengths divided by ``factor``, short ones kept, a smooth blend in between
      (Llama 3.1).
    """
    dim = config.head_dim
    inv_freq = 1.0 / (np.float32(config.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    if config.rope_type == "linear":
        inv_freq = inv_freq / np.float32(config.rope_factor)
    elif config.rope_type == "llama3":
        factor, low, high = config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
        old_len = config.rope_original_max_position_embeddings or config.max_position_embeddings
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


def attend(q: Array, k: Array, v: Array, mask: Array, scale: float | None = None) -> Array:
    """Softmax attention with grouped key/value heads.

    Shapes: ``q (B, S, H, hd)``, ``k``/``v`` ``(B, T, KV, hd)`` with ``H`` a multiple of ``KV``, ``mask
    (B, S, T)`` bool (True: may attend) -> ``(B, S, H, hd)``. Scores (times ``scale``, default
    ``1 / sqrt(hd)``) and softmax in float32.
    """
    b, s, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, s, kv, h // kv, d)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    scores = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgst,btkd->bskgd", probs, v).reshape(b, s, h, d)


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings and an optional KV cache."""

    config: Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, positions: Array, mask: Array, kv: tuple[Array, Array] | None, start: Array):
        """``x (B, S, D)`` -> ``(B, S, D)`` and the layer's updated ``(keys, values)`` (``None`` without
        cache)."""
        c = self.config
        b, s, _ = x.shape
        dense = lambda n, bias, name: Dense(n, use_bias=bias, dtype=self.dtype, name=name,  # noqa: E731
                                            kernel_init=nn.initializers.normal(c.initializer_range))
        q = dense(c.num_attention_heads * c.head_dim, c.qkv_bias, "q_proj")(x)
        k = dense(c.num_key_value_heads * c.head_dim, c.qkv_bias, "k_proj")(x)
        v = dense(c.num_key_value_heads * c.head_dim, c.qkv_bias, "v_proj")(x)
        q = q.reshape(b, s, c.num_attention_heads, c.head_dim)
        k = k.reshape(b, s, c.num_key_value_heads, c.head_dim)
        v = v.reshape(b, s, c.num_key_value_heads, c.head_dim)
        inv_freq = rope_frequencies(c)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        if kv is not None:
            k, v = write_cache(kv[0], k, start), write_cache(kv[1], v, start)
            kv = (k, v)
        out = attend(q, k.astype(self.dtype), v.astype(self.dtype), mask).reshape(b, s, -1)
        return dense(c.hidden_size, c.o_bias, "o_proj")(out), kv


class MLP(nn.Module):
    """SwiGLU: ``down(act(gate(x)) * up(x))``."""

    config: Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        dense = lambda n, name: Dense(n, use_bias=c.mlp_bias, dtype=self.dtype, name=name,  # noqa: E731
                                      kernel_init=nn.initializers.normal(c.initializer_range))
        h = ACTIVATIONS[c.hidden_act](dense(c.intermediate_size, "gate_proj")(x)) * dense(c.intermediate_size,
                                                                                         "up_proj")(x)
        return dense(c.hidden_size, "down_proj")(h)


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    config: Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, positions, mask, kv, start):
        c = self.config
        h, kv = Attention(c, self.dtype, name="self_attn")(
            RMSNorm(c.rms_norm_eps, self.dtype, name="input_layernorm")(x), positions, mask, kv, start)
        x = x + h
        x = x + MLP(c, self.dtype, name="mlp")(RMSNorm(c.rms_norm_eps, self.dtype,
                                                       name="post_attention_layernorm")(x))
        return x, kv


class LlamaModel(nn.Module):
    """Embeddings, decoder layers and the final norm: ``(B, S)`` ids -> ``(B, S, D)`` hidden states and the
    updated cache (``None`` when called without one). See :mod:`lora_jax.models.generate` for the cache."""

    config: Config
    dtype: Dtype = jnp.float32
    remat: str = "none"  # checkpoint policy of each layer (lora_jax.models.layers.REMAT_POLICIES)

    def setup(self):
        c = self.config
        self.embed_tokens = Embed(c.vocab_size, c.hidden_size, self.dtype, c.initializer_range)
        self.layers = [remat(DecoderLayer, self.remat)(c, self.dtype) for _ in range(c.num_hidden_layers)]
        self.norm = RMSNorm(c.rms_norm_eps, self.dtype)

    def __call__(self, input_ids: Array, positions: Array | None = None, attention_mask: Array | None = None,
                 cache: KVCache | None = None) -> tuple[Array, KVCache | None]:
        b, s = input_ids.shape
        step = begin_step(b, s, attention_mask, cache, self.config.sliding_window)
        positions = default_positions(b, s, step.start) if positions is None else jnp.asarray(positions)
        x = self.embed_tokens(input_ids)
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            mask = step.sliding if self.config.is_sliding(i) else step.causal
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            x, kv = layer(x, positions, mask, kv, step.start)
            if kv is not None:
                keys.append(kv[0])
                values.append(kv[1])
        x = self.norm(x)
        return x, None if cache is None else finish_step(cache, step, keys, values, s)


class LlamaForCausalLM(nn.Module):
    """:class:`LlamaModel` plus the language-model head (tied to the embedding or ``lm_head``).

    ``__call__(input_ids (B, S), positions=None, attention_mask=None, cache=None) -> (logits (B, S, V),
    cache)``. ``positions`` default to ``cache.index + arange(S)`` (``arange(S)`` without a cache), as
    ``transformers`` does without ``position_ids``; ``attention_mask`` ``(B, S)`` marks real tokens (0: padding,
    never attended to).
    """

    config: Config
    dtype: Dtype = jnp.float32
    remat: str = "none"  # checkpoint policy of each decoder layer

    def setup(self):
        self.model = LlamaModel(self.config, self.dtype, self.remat)
        if not self.config.tie_word_embeddings:
            self.lm_head = Dense(self.config.vocab_size, use_bias=False, dtype=self.dtype,
                                 kernel_init=nn.initializers.normal(self.config.initializer_range))

    def __call__(self, input_ids: Array, positions: Array | None = None, attention_mask: Array | None = None,
                 cache: KVCache | None = None, hidden: bool = False) -> tuple[Array, KVCache | None]:
        h, cache = self.model(input_ids, positions, attention_mask, cache)
        if hidden:  # the final hidden states (B, S, D), for a loss that applies self.head() itself
            return h, cache
        logits = self.model.embed_tokens.attend(h) if self.config.tie_word_embeddings else self.lm_head(h)
        return logits, cache

    def head(self) -> tuple[Any, bool]:
        """The output projection as ``(weight, tied)``: the embedding table ``(V, D)`` and ``True`` when tied, else
        ``lm_head``'s kernel ``(D, V)`` and ``False``; the stored leaf (an array, ``LoraWeight`` or
        ``QuantizedWeight``), for :func:`lora_jax.losses.chunked_cross_entropy`."""
        params = self.variables["params"]
        if self.config.tie_word_embeddings:
            return params["model"]["embed_tokens"]["embedding"], True
        return params["lm_head"]["kernel"], False


def build(config: Config, dtype: Dtype = jnp.float32, task: str | None = None) -> nn.Module:
    """The Linen module for ``task``: ``None`` / ``"causal-lm"`` -> :class:`LlamaForCausalLM`, ``"base"`` ->
    :class:`LlamaModel`. ``dtype`` is the compute dtype."""
    task = _check_task(task)
    return (LlamaForCausalLM if task == "causal-lm" else LlamaModel)(config, dtype)


def init_params(config: Config, key: Array, task: str | None = None) -> dict:
    """Randomly initialised float32 parameters (Hugging Face's scheme: N(0, initializer_range) kernels and
    tables, zero biases, unit norm scales)."""
    return build(config, jnp.float32, task).init(key, jnp.zeros((1, 2), jnp.int32))["params"]


def _check_task(task: str | None) -> str:
    task = "causal-lm" if task is None else task
    if task not in TASKS:
        raise ValueError(f"Llama supports tasks {TASKS}, got {task!r}")
    return task


# ------------------------------------------------------------------------------- Hugging Face weights

# Buffers some checkpoints carry that hold no parameter (rotary tables are recomputed from the config).
_HARMLESS = re.compile(r"(model\.)?(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq")


def hf_name(path: tuple[str, ...]) -> str:
    """The Hugging Face tensor name of a parameter path, e.g. ``("model", "layers_0", "self_attn", "q_proj",
    "kernel")`` -> ``"model.layers.0.self_attn.q_proj.weight"``."""
    *modules, leaf = path
    modules = [re.sub(r"^layers_(\d+)$", r"layers.\1", m) for m in modules]
    return ".".join(modules + ["bias" if leaf == "bias" else "weight"])


def _flat(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflat(flat: Mapping[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def _expected(config: Config, task: str) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    return _flat(jax.eval_shape(lambda: init_params(config, jax.random.key(0), task)))


def _hf_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(reversed(shape)) if path[-1] == "kernel" else tuple(shape)


def from_hf_weights(config: Config, tensors: Mapping[str, np.ndarray], source: str,
                    task: str | None = None) -> dict:
    """Parameters for ``build(config, task=task)`` from Hugging Face tensors (``nn.Linear`` weights are
    transposed to ``(in, out)`` kernels).

    A ``"base"`` model reads the ``model.*`` tensors of a causal-LM checkpoint or the unprefixed tensors of a
    ``LlamaModel`` checkpoint. A missing tensor or a wrong shape raises
    :class:`~lora_jax.models.hf.CheckpointError` naming the tensor and ``source``; tensors that the model does
    not use raise too, except rotary ``inv_freq`` buffers, ``lm_head.weight`` when the embeddings are tied (or
    for the base model).
    """
    task = _check_task(task)
    names = list(tensors.keys())
    unprefixed = task == "base" and not any(n.startswith("model.") for n in names)
    where = getattr(tensors, "source_of", None)
    params, used = {}, set()
    for path, spec in _expected(config, task).items():
        name = hf_name(path if task == "causal-lm" or unprefixed else ("model",) + path)
        want = _hf_shape(path, spec.shape)
        if name not in tensors:
            raise CheckpointError(
                f"{source}: missing tensor {name!r} (for parameter {'/'.join(path)}, shape {want}) of a "
                f"{config.model_type} with {config.num_hidden_layers} layers"
                f"{', untied lm_head' if name == 'lm_head.weight' else ''}; the checkpoint has {len(names)} "
                "tensors. Is the config from the same model?")
        x = np.asarray(tensors[name])
        if tuple(x.shape) != want:
            raise CheckpointError(
                f"{where(name) if where else source}: tensor {name!r} has shape {tuple(x.shape)}, expected {want} "
                f"for {'/'.join(path)} (hidden_size={config.hidden_size}, heads={config.num_attention_heads}, "
                f"kv_heads={config.num_key_value_heads}, head_dim={config.head_dim}, "
                f"intermediate_size={config.intermediate_size}, vocab_size={config.vocab_size})")
        if x.dtype.kind != "f" and x.dtype.name != "bfloat16":
            raise CheckpointError(f"{source}: tensor {name!r} has dtype {x.dtype}, expected a float tensor")
        params[path] = jnp.asarray(np.ascontiguousarray(x.T) if path[-1] == "kernel" else x)
        used.add(name)

    harmless = lambda n: _HARMLESS.fullmatch(n) or (n == "lm_head.weight" and (  # noqa: E731
        config.tie_word_embeddings or task == "base"))
    unused = [n for n in names if n not in used and not harmless(n)]
    if unused:
        raise CheckpointError(f"{source}: {len(unused)} tensor(s) do not fit this {config.model_type} config "
                              f"({config.num_hidden_layers} layers, qkv_bias={config.qkv_bias}, "
                              f"tie_word_embeddings={config.tie_word_embeddings}): {unused[:5]}")
    return _unflat(params)


def to_hf_weights(params: Mapping, config: Config) -> dict[str, np.ndarray]:
    """Hugging Face names and layouts for the params of a :class:`LlamaForCausalLM` (``model.*``, and
    ``lm_head.weight`` unless tied) or of a :class:`LlamaModel` (unprefixed). LoRA-wrapped params raise:
    save ``lora.merge(params, adapters)``."""
    flat = _flat(params)
    wrapped = [p for p, v in flat.items() if is_lora_weight(v)]
    if wrapped:
        raise ValueError(f"to_hf_weights: params hold LoRA-wrapped kernels {['/'.join(p) for p in wrapped][:3]}; "
                         "save lora.merge(params, adapters) instead")
    task = "causal-lm" if "model" in params else "base"
    expected = _expected(config, task)
    if set(flat) != set(expected):
        missing = sorted("/".join(p) for p in set(expected) - set(flat))
        extra = sorted("/".join(p) for p in set(flat) - set(expected))
        raise ValueError(f"to_hf_weights: params do not match a {config.model_type} {task} model of this config: "
                         f"missing {missing[:5]}, unexpected {extra[:5]}")
    out = {}
    for path, spec in expected.items():
        x = np.asarray(flat[path])
        if tuple(x.shape) != tuple(spec.shape):
            raise ValueError(f"to_hf_weights: {'/'.join(path)} has shape {tuple(x.shape)}, the config needs "
                             f"{tuple(spec.shape)}")
        out[hf_name(path)] = np.ascontiguousarray(x.T) if path[-1] == "kernel" else x
    return out


def hf_architectures(params: Mapping, config: Config) -> list[str]:
    """The ``architectures`` entry of ``config.json`` for these params."""
    prefix = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[config.model_type]
    return [f"{prefix}ForCausalLM" if "model" in params else f"{prefix}Model"]
