"""GPT-2 (Radford et al. 2019) as a Flax Linen decoder whose projections all run through :mod:`lora_jax.ops`.

Read top to bottom: ``Config`` -> attention (fused ``c_attn``) -> MLP -> block -> :class:`GPT2Model` /
:class:`GPT2LMHeadModel` -> Hugging Face weight conversion.

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
import math
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.core import is_lora_weight
from lora_jax.models.generate import KVCache, begin_step, default_positions, finish_step, write_cache
from lora_jax.models.layers import Dense, remat
from lora_jax.models.llama import CheckpointError, Embed, _flat, _unflat, attend

Array = jax.Array
Dtype = Any

MODEL_TYPES = ("gpt2",)
TASKS = ("causal-lm", "base")

ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


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
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"GPT-2 n_embd {self.hidden_size} must be a multiple of n_head "
                             f"{self.num_attention_heads}")
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(f"GPT-2 activation_function {self.activation_function!r} is not supported; expected "
                             f"one of {sorted(ACTIVATIONS)}")

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
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in MODEL_TYPES:
            raise ValueError(f"gpt2.Config.from_hf expects a config with model_type 'gpt2', got {model_type!r}")
        if getattr(hf_config, "add_cross_attention", False):
            raise ValueError("GPT-2 with add_cross_attention is not supported: this is the decoder-only model")
        if hf_config.activation_function not in ACTIVATIONS:
            raise ValueError(f"GPT-2 activation_function {hf_config.activation_function!r} is not supported; "
                             f"expected one of {sorted(ACTIVATIONS)}")
        eos = hf_config.eos_token_id
        return cls(
            vocab_size=hf_config.vocab_size, hidden_size=hf_config.n_embd, num_hidden_layers=hf_config.n_layer,
            num_attention_heads=hf_config.n_head, max_position_embeddings=hf_config.n_positions,
            intermediate_size=hf_config.n_inner or 4 * hf_config.n_embd,
            activation_function=hf_config.activation_function,
            layer_norm_epsilon=float(hf_config.layer_norm_epsilon),
            initializer_range=float(hf_config.initializer_range),
            scale_attn_weights=bool(hf_config.scale_attn_weights),
            scale_attn_by_inverse_layer_idx=bool(hf_config.scale_attn_by_inverse_layer_idx),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
            bos_token_id=hf_config.bos_token_id, eos_token_id=tuple(eos) if isinstance(eos, (list, tuple)) else eos,
            pad_token_id=hf_config.pad_token_id,
        )

    def to_hf(self):
        """The equivalent ``transformers.GPT2Config``."""
        import transformers

        return transformers.GPT2Config(
            vocab_size=self.vocab_size, n_embd=self.hidden_size, n_layer=self.num_hidden_layers,
            n_head=self.num_attention_heads, n_positions=self.max_position_embeddings,
            n_inner=None if self.intermediate_size == 4 * self.hidden_size else self.intermediate_size,
            activation_function=self.activation_function, layer_norm_epsilon=self.layer_norm_epsilon,
            initializer_range=self.initializer_range, scale_attn_weights=self.scale_attn_weights,
            scale_attn_by_inverse_layer_idx=self.scale_attn_by_inverse_layer_idx,
            tie_word_embeddings=self.tie_word_embeddings, bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )


# --------------------------------------------------------------------------------------------- layers


def _dense(config: Config, features: int, dtype: Dtype, name: str) -> Dense:
    return Dense(features, dtype=dtype, name=name, kernel_init=nn.initializers.normal(config.initializer_range))


def _layer_norm(config: Config, dtype: Dtype, name: str) -> nn.LayerNorm:
    # Exact variance (E[(x - mean)^2]) as torch computes it; statistics in float32 whatever the compute dtype.
    return nn.LayerNorm(epsilon=config.layer_norm_epsilon, dtype=dtype, use_fast_variance=False, name=name)


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
        h, kv = Attention(c, self.layer, self.dtype, name="attn")(_layer_norm(c, self.dtype, "ln_1")(x), mask, kv,
                                                                  start)
        x = x + h
        x = x + MLP(c, self.dtype, name="mlp")(_layer_norm(c, self.dtype, "ln_2")(x))
        return x, kv


class GPT2Model(nn.Module):
    """Token + learned position embeddings, blocks, final LayerNorm: ``(B, S)`` ids -> ``(B, S, D)`` and the
    updated cache (``None`` when called without one)."""

    config: Config
    dtype: Dtype = jnp.float32
    remat: str = "none"  # checkpoint policy of each block (lora_jax.models.layers.REMAT_POLICIES)

    def setup(self):
        c = self.config
        self.wte = Embed(c.vocab_size, c.hidden_size, self.dtype, c.initializer_range)
        self.wpe = Embed(c.max_position_embeddings, c.hidden_size, self.dtype, c.initializer_range)
        self.h = [remat(Block, self.remat)(c, i, self.dtype) for i in range(c.num_hidden_layers)]
        self.ln_f = _layer_norm(c, self.dtype, None)

    def __call__(self, input_ids: Array, positions: Array | None = None, attention_mask: Array | None = None,
                 cache: KVCache | None = None) -> tuple[Array, KVCache | None]:
        b, s = input_ids.shape
        step = begin_step(b, s, attention_mask, cache)
        positions = default_positions(b, s, step.start) if positions is None else jnp.asarray(positions)
        x = self.wte(input_ids) + self.wpe(positions)
        keys, values = [], []
        for i, block in enumerate(self.h):
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            x, kv = block(x, step.causal, kv, step.start)
            if kv is not None:
                keys.append(kv[0])
                values.append(kv[1])
        x = self.ln_f(x)
        return x, None if cache is None else finish_step(cache, step, keys, values, s)


class GPT2LMHeadModel(nn.Module):
    """:class:`GPT2Model` under ``transformer`` plus the language-model head (tied to ``wte`` by default).

    ``__call__(input_ids (B, S), positions=None, attention_mask=None, cache=None) -> (logits (B, S, V),
    cache)``, with the same conventions as :class:`lora_jax.models.llama.LlamaForCausalLM`.
    """

    config: Config
    dtype: Dtype = jnp.float32
    remat: str = "none"  # checkpoint policy of each block

    def setup(self):
        self.transformer = GPT2Model(self.config, self.dtype, self.remat)
        if not self.config.tie_word_embeddings:
            self.lm_head = Dense(self.config.vocab_size, use_bias=False, dtype=self.dtype,
                                 kernel_init=nn.initializers.normal(self.config.initializer_range))

    def __call__(self, input_ids: Array, positions: Array | None = None, attention_mask: Array | None = None,
                 cache: KVCache | None = None, hidden: bool = False) -> tuple[Array, KVCache | None]:
        h, cache = self.transformer(input_ids, positions, attention_mask, cache)
        if hidden:  # the final hidden states (B, S, D), for a loss that applies self.head() itself
            return h, cache
        logits = self.transformer.wte.attend(h) if self.config.tie_word_embeddings else self.lm_head(h)
        return logits, cache

    def head(self) -> tuple[Any, bool]:
        """The output projection as ``(weight, tied)``: the embedding table ``(V, D)`` and ``True`` when tied, else
        ``lm_head``'s kernel ``(D, V)`` and ``False``; the stored leaf (an array, ``LoraWeight`` or
        ``QuantizedWeight``), for :func:`lora_jax.losses.chunked_cross_entropy`."""
        params = self.variables["params"]
        if self.config.tie_word_embeddings:
            return params["transformer"]["wte"]["embedding"], True
        return params["lm_head"]["kernel"], False


def build(config: Config, dtype: Dtype = jnp.float32, task: str | None = None) -> nn.Module:
    """The Linen module for ``task``: ``None`` / ``"causal-lm"`` -> :class:`GPT2LMHeadModel`, ``"base"`` ->
    :class:`GPT2Model`. ``dtype`` is the compute dtype."""
    task = _check_task(task)
    return (GPT2LMHeadModel if task == "causal-lm" else GPT2Model)(config, dtype)


def init_params(config: Config, key: Array, task: str | None = None) -> dict:
    """Randomly initialised float32 parameters (N(0, initializer_range) kernels and tables, zero biases, unit
    LayerNorm scales)."""
    return build(config, jnp.float32, task).init(key, jnp.zeros((1, 2), jnp.int32))["params"]


def _check_task(task: str | None) -> str:
    task = "causal-lm" if task is None else task
    if task not in TASKS:
        raise ValueError(f"GPT-2 supports tasks {TASKS}, got {task!r}")
    return task


# ------------------------------------------------------------------------------- Hugging Face weights

# Causal-mask buffers that older checkpoints (the original gpt2 weights among them) store per layer.
_HARMLESS = re.compile(r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)")


def hf_name(path: tuple[str, ...]) -> str:
    """The Hugging Face tensor name of a parameter path, e.g. ``("transformer", "h_0", "attn", "c_attn",
    "kernel")`` -> ``"transformer.h.0.attn.c_attn.weight"``."""
    *modules, leaf = path
    modules = [re.sub(r"^h_(\d+)$", r"h.\1", m) for m in modules]
    return ".".join(modules + ["bias" if leaf == "bias" else "weight"])


def _transposed(path: tuple[str, ...]) -> bool:
    # Conv1D kernels are stored (in, out) like ours; only an untied lm_head is an nn.Linear (out, in).
    return path[-1] == "kernel" and path[0] == "lm_head"


def _expected(config: Config, task: str) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    return _flat(jax.eval_shape(lambda: init_params(config, jax.random.key(0), task)))


def from_hf_weights(config: Config, tensors: Mapping[str, np.ndarray], source: str,
                    task: str | None = None) -> dict:
    """Parameters for ``build(config, task=task)`` from Hugging Face tensors, named with or without the
    ``transformer.`` prefix. A missing tensor or a wrong shape raises
    :class:`~lora_jax.models.hf.CheckpointError` naming the tensor and ``source``; unused tensors raise too,
    except the per-layer ``attn.bias`` / ``attn.masked_bias`` mask buffers and a tied ``lm_head.weight``."""
    task = _check_task(task)
    names = list(tensors.keys())
    prefixed = any(n.startswith("transformer.") for n in names)
    where = getattr(tensors, "source_of", None)
    params, used = {}, set()
    for path, spec in _expected(config, task).items():
        backbone = path[1:] if task == "causal-lm" and path[0] == "transformer" else path
        is_head = task == "causal-lm" and path[0] == "lm_head"
        name = hf_name(path if is_head else (("transformer",) + backbone if prefixed else backbone))
        want = tuple(reversed(spec.shape)) if _transposed(path) else tuple(spec.shape)
        if name not in tensors:
            raise CheckpointError(
                f"{source}: missing tensor {name!r} (for parameter {'/'.join(path)}, shape {want}) of a GPT-2 with "
                f"{config.num_hidden_layers} layers; the checkpoint has {len(names)} tensors. Is the config from "
                "the same model?")
        x = np.asarray(tensors[name])
        if tuple(x.shape) != want:
            raise CheckpointError(
                f"{where(name) if where else source}: tensor {name!r} has shape {tuple(x.shape)}, expected {want} "
                f"for {'/'.join(path)} (n_embd={config.hidden_size}, n_inner={config.intermediate_size}, "
                f"n_positions={config.max_position_embeddings}, vocab_size={config.vocab_size})")
        if x.dtype.kind != "f" and x.dtype.name != "bfloat16":
            raise CheckpointError(f"{source}: tensor {name!r} has dtype {x.dtype}, expected a float tensor")
        params[path] = jnp.asarray(np.ascontiguousarray(x.T) if _transposed(path) else x)
        used.add(name)
    unused = [n for n in names if n not in used and not _HARMLESS.fullmatch(n)
              and not (n == "lm_head.weight" and (config.tie_word_embeddings or task == "base"))]
    if unused:
        raise CheckpointError(f"{source}: {len(unused)} tensor(s) do not fit this GPT-2 config "
                              f"({config.num_hidden_layers} layers, tie_word_embeddings="
                              f"{config.tie_word_embeddings}): {unused[:5]}")
    return _unflat(params)


def to_hf_weights(params: Mapping, config: Config) -> dict[str, np.ndarray]:
    """Hugging Face names and layouts for the params of a :class:`GPT2LMHeadModel` (``transformer.*``, plus
    ``lm_head.weight`` when untied) or of a :class:`GPT2Model` (unprefixed). LoRA-wrapped params raise: save
    ``lora.merge(params, adapters)``."""
    flat = _flat(params)
    wrapped = [p for p, v in flat.items() if is_lora_weight(v)]
    if wrapped:
        raise ValueError(f"to_hf_weights: params hold LoRA-wrapped kernels {['/'.join(p) for p in wrapped][:3]}; "
                         "save lora.merge(params, adapters) instead")
    task = "causal-lm" if "transformer" in params else "base"
    expected = _expected(config, task)
    if set(flat) != set(expected):
        missing = sorted("/".join(p) for p in set(expected) - set(flat))
        extra = sorted("/".join(p) for p in set(flat) - set(expected))
        raise ValueError(f"to_hf_weights: params do not match a GPT-2 {task} model of this config: missing "
                         f"{missing[:5]}, unexpected {extra[:5]}")
    out = {}
    for path, spec in expected.items():
        x = np.asarray(flat[path])
        if tuple(x.shape) != tuple(spec.shape):
            raise ValueError(f"to_hf_weights: {'/'.join(path)} has shape {tuple(x.shape)}, the config needs "
                             f"{tuple(spec.shape)}")
        out[hf_name(path)] = np.ascontiguousarray(x.T) if _transposed(path) else x
    return out


def hf_architectures(params: Mapping, config: Config) -> list[str]:
    """The ``architectures`` entry of ``config.json`` for these params."""
    return ["GPT2LMHeadModel" if "transformer" in params else "GPT2Model"]
