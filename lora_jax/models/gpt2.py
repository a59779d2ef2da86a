"""GPT-2 (Radford et al. 2019) as a Flax Linen decoder whose projections all run through :mod:`lora_jax.ops`.

Read top to bottom: ``Config`` -> attention (fused ``c_attn``) -> MLP -> block -> :class:`GPT2Model` -> the
declaration (the language-model head is the shared :class:`lora_jax.models.decoder.CausalLM`).

GPT-2's projections are ``Conv1D`` modules whose weights are already stored ``(in, out)``, so they are used
as kernels without a transpose. Parameter paths mirror the Hugging Face names::

    GPT2LMHeadModel params                             Hugging Face tensor
    transformer/wte/embedding          (V, D)          transformer.wte.weight
    transformer/wpe/embedding          (P, D)          transformer.wpe.weight
    transformer/h_N/ln_1/{scale,bias}  (D,)            transformer.h.N.ln_1.{weight,bias}
    transformer/h_N/attn/c_attn/kernel (D, 3D)         transformer.h.N.attn.c_attn.weight   (+ bias)
    transformer/h_N/attn/c_proj/kernel (D, D)          transformer.h.N.attn.c_proj.weight   (+ bias)
    transformer/h_N/ln_2/{scale,bias}  (D,)            transformer.h.N.ln_2.{weight,bias}
    transformer/h_N/mlp/c_fc/kernel    (D, F)          transformer.h.N.mlp.c_fc.weight      (+ bias)
    transformer/h_N/mlp/c_proj/kernel  (F, D)          transformer.h.N.mlp.c_proj.weight    (+ bias)
    transformer/ln_f/{scale,bias}      (D,)            transformer.ln_f.{weight,bias}
    lm_head/kernel                     (D, V)          lm_head.weight (only when not tied; nn.Linear, transposed)

Checkpoints saved from ``GPT2Model`` (the original ``gpt2`` weights among them) name the same tensors
without the ``transformer.`` prefix; both load. ``lora.init(params, targets="qv")`` adapts every fused
``c_attn`` kernel, PEFT's default target for GPT-2.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.errors import ArgumentError
from lora_jax.models.arch import SAME, Architecture, Names, Rule, Task
from lora_jax.models.decoder import CausalLM
from lora_jax.models.generate import KVCache, begin_step, input_positions, run_layers, write_cache
from lora_jax.models.layers import (
    ACTIVATIONS,
    Dense,
    Embed,
    attend,
    check_activation,
    check_model_type,
    check_multiple,
    layer_norm,
    normal,
    remat,
)

Array = jax.Array
Dtype = Any

MODEL_TYPES = ("gpt2",)


# --------------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class Config:
    """GPT-2 hyper-parameters, named as the ``transformers.GPT2Config`` attributes they come from
    (``hidden_size`` = ``n_embd``, ``num_hidden_layers`` = ``n_layer``, ``num_attention_heads`` = ``n_head``,
    ``max_position_embeddings`` = ``n_positions``, ``intermediate_size`` = ``n_inner or 4 * n_embd``)."""

    vocab_size: int = 50257
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 1024
    intermediate_size: int = 3072
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | tuple[int, ...] | None = 50256
    pad_token_id: int | None = None

    def __post_init__(self):
        check_multiple("GPT-2 n_embd", self.hidden_size, "n_head", self.num_attention_heads)
        check_activation(self.activation_function, "GPT-2 activation_function")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_heads(self) -> int:
        """Every head has its own keys and values (what the KV cache stores)."""
        return self.num_attention_heads

    @property
    def position_limit(self) -> int:
        """Learned positions: sequences cannot be longer than this."""
        return self.max_position_embeddings

    @classmethod
    def from_hf(cls, hf_config) -> Config:
        """From a ``transformers.GPT2Config``. Raises ``ValueError`` for cross-attention (GPT-2 as the decoder of
        an encoder-decoder) and for an unknown activation."""
        check_model_type(hf_config, MODEL_TYPES, "gpt2.Config.from_hf")
        if getattr(hf_config, "add_cross_attention", False):
            raise ArgumentError("GPT-2 with add_cross_attention is not supported: this is the decoder-only model")
        check_activation(hf_config.activation_function, "GPT-2 activation_function")
        eos = hf_config.eos_token_id
        return cls(
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.n_embd,
            num_hidden_layers=hf_config.n_layer,
            num_attention_heads=hf_config.n_head,
            max_position_embeddings=hf_config.n_positions,
            intermediate_size=hf_config.n_inner or 4 * hf_config.n_embd,
            activation_function=hf_config.activation_function,
            layer_norm_epsilon=float(hf_config.layer_norm_epsilon),
            initializer_range=float(hf_config.initializer_range),
            scale_attn_weights=bool(hf_config.scale_attn_weights),
            scale_attn_by_inverse_layer_idx=bool(hf_config.scale_attn_by_inverse_layer_idx),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
            bos_token_id=hf_config.bos_token_id,
            eos_token_id=tuple(eos) if isinstance(eos, (list, tuple)) else eos,
            pad_token_id=hf_config.pad_token_id,
        )

    def to_hf(self):
        """The equivalent ``transformers.GPT2Config``."""
        import transformers

        return transformers.GPT2Config(
            vocab_size=self.vocab_size,
            n_embd=self.hidden_size,
            n_layer=self.num_hidden_layers,
            n_head=self.num_attention_heads,
            n_positions=self.max_position_embeddings,
            n_inner=None if self.intermediate_size == 4 * self.hidden_size else self.intermediate_size,
            activation_function=self.activation_function,
            layer_norm_epsilon=self.layer_norm_epsilon,
            initializer_range=self.initializer_range,
            scale_attn_weights=self.scale_attn_weights,
            scale_attn_by_inverse_layer_idx=self.scale_attn_by_inverse_layer_idx,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )


# --------------------------------------------------------------------------------------------- layers


def _dense(config: Config, features: int, dtype: Dtype, name: str) -> Dense:
    return Dense(features, dtype=dtype, name=name, kernel_init=normal(config.initializer_range))


class Attention(nn.Module):
    """Causal multi-head self-attention with the fused ``c_attn`` projection ``(D, 3D)`` -> q, k, v."""

    config: Config
    layer: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array, kv: tuple[Array, Array] | None, start: Array):
        """``x (B, S, D)`` -> ``(B, S, D)`` and the layer's updated ``(keys, values)`` (``None`` without cache)."""
        c = self.config
        b, s, d = x.shape
        q, k, v = jnp.split(_dense(c, 3 * d, self.dtype, "c_attn")(x), 3, axis=-1)
        q, k, v = (t.reshape(b, s, c.num_attention_heads, c.head_dim) for t in (q, k, v))
        if kv is not None:
            k, v = write_cache(kv[0], k, start), write_cache(kv[1], v, start)
            kv = (k, v)
        scale = 1.0 / math.sqrt(c.head_dim) if c.scale_attn_weights else 1.0
        if c.scale_attn_by_inverse_layer_idx:
            scale /= self.layer + 1
        out = attend(q, k.astype(self.dtype), v.astype(self.dtype), mask, scale).reshape(b, s, d)
        return _dense(c, d, self.dtype, "c_proj")(out), kv


class MLP(nn.Module):
    """``c_proj(act(c_fc(x)))``."""

    config: Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        h = ACTIVATIONS[c.activation_function](_dense(c, c.intermediate_size, self.dtype, "c_fc")(x))
        return _dense(c, c.hidden_size, self.dtype, "c_proj")(h)


class Block(nn.Module):
    """Pre-norm block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    config: Config
    layer: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, kv, start):
        c = self.config
        ln = lambda name: layer_norm(c.layer_norm_epsilon, self.dtype, name)  # noqa: E731
        h, kv = Attention(c, self.layer, self.dtype, name="attn")(ln("ln_1")(x), mask, kv, start)
        x = x + h
        return x + MLP(c, self.dtype, name="mlp")(ln("ln_2")(x)), kv


class GPT2Model(nn.Module):
    """Token + learned position embeddings, blocks, final LayerNorm: ``(B, S)`` ids -> ``(B, S, D)`` and the
    updated cache (``None`` when called without one). With ``segment_ids`` (packed rows) attention stays inside
    each example and the learned positions restart per example."""

    config: Config
    dtype: Dtype = jnp.float32
    remat: str = "none"  # checkpoint policy of each block (lora_jax.models.layers.REMAT_POLICIES)

    def setup(self):
        c = self.config
        self.wte = Embed(c.vocab_size, c.hidden_size, self.dtype, c.initializer_range)
        self.wpe = Embed(c.max_position_embeddings, c.hidden_size, self.dtype, c.initializer_range)
        self.h = [remat(Block, self.remat)(c, i, self.dtype) for i in range(c.num_hidden_layers)]
        self.ln_f = layer_norm(c.layer_norm_epsilon, self.dtype)

    def __call__(
        self,
        input_ids: Array,
        positions: Array | None = None,
        attention_mask: Array | None = None,
        cache: KVCache | None = None,
        segment_ids: Array | None = None,
    ) -> tuple[Array, KVCache | None]:
        b, s = input_ids.shape
        step = begin_step(b, s, attention_mask, cache, segment_ids=segment_ids)
        positions = input_positions(positions, segment_ids, b, s, step.start)
        x, cache = run_layers(
            self.h,
            self.wte(input_ids) + self.wpe(positions),
            cache,
            step,
            lambda i, block, x, kv: block(x, step.causal, kv, step.start),
        )
        return self.ln_f(x), cache

    def attend(self, h: Array) -> Array:
        """Logits through the tied embedding: ``h @ wte.T``."""
        return self.wte.attend(h)


# -------------------------------------------------------------------------------------------- declaration

# ``GPT2LMHeadModel``: :class:`GPT2Model` under ``transformer`` plus ``lm_head`` (tied to ``wte`` by default).
GPT2LMHeadModel = functools.partial(CausalLM, backbone=GPT2Model, backbone_name="transformer", embedding="wte")

ARCHITECTURE = Architecture(
    name="gpt2",
    model_types=MODEL_TYPES,
    config=Config,
    tasks={
        "causal-lm": Task(
            GPT2LMHeadModel, backbone="transformer", hf_class="{}LMHeadModel", peft_task_type="CAUSAL_LM"
        ),
        "base": Task(GPT2Model, hf_class="{}Model"),
    },
    names=Names(
        lists=("h",),
        # Conv1D stores its weight (in, out) like our kernels; only an untied lm_head is an nn.Linear.
        rules=(Rule(r"(.*/)?h_\d+/.*/kernel", SAME),),
        # causal-mask buffers that older checkpoints (the original gpt2 weights among them) store per layer
        ignore=(r"h\.\d+\.attn\.(bias|masked_bias)",),
        tied="lm_head.weight",
    ),
    presets={"qv": ("c_attn",), "attention": ("c_attn", "attn.c_proj"), "all-linear": ("c_attn", "c_proj", "c_fc")},
)
build = ARCHITECTURE.build
init_params = ARCHITECTURE.init_params

__all__ = ["ARCHITECTURE", "MODEL_TYPES", "Config", "GPT2LMHeadModel", "GPT2Model", "build", "init_params"]
