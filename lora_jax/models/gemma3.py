"""Gemma 3 (text): the shared decoder (:mod:`lora_jax.models.decoder`) with Gemma's differences.

- Interleaved attention: the layers ``layer_types`` marks ``"sliding_attention"`` (five in six:
  ``sliding_window_pattern`` 6) see the last ``sliding_window`` tokens and rotate with their own RoPE base
  (``rope_local_base_freq``, 10,000); the others attend globally with ``rope_theta`` (1,000,000, linear scaling
  in the larger models).
- Four ``(1 + w)`` RMSNorms per layer, "sandwich" style: ``x + post_attention_layernorm(attn(input_layernorm(x)))``,
  then ``x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))``; per-head ``(1 + w)`` q/k norms
  before RoPE; a ``(1 + w)`` final norm. The stored weights are ``w`` (they initialise to zeros).
- Scores scaled by ``query_pre_attn_scalar ** -0.5`` (not ``head_dim ** -0.5``); GeGLU MLP
  (``gelu_pytorch_tanh``); embeddings multiplied by ``sqrt(hidden_size)`` in the compute dtype; the head tied to
  the embedding; soft-capping of the attention scores / final logits when ``attn_logit_softcapping`` /
  ``final_logit_softcapping`` are set (``None`` in every released Gemma 3; ``transformers``' Gemma3 reads but does
  not apply ``attn_logit_softcapping``, Google's reference applies it, as here).

Parameter paths are the decoder's, plus per layer::

    model/layers_N/pre_feedforward_layernorm/scale  (D,)   model.layers.N.pre_feedforward_layernorm.weight
    model/layers_N/post_feedforward_layernorm/scale (D,)   model.layers.N.post_feedforward_layernorm.weight

(``post_attention_layernorm`` normalises the attention output here, not the MLP input as in Llama.)

GGUF files of the ``gemma3`` architecture (llama.cpp) read as ``transformers``' ``gemma3_text``: llama.cpp stores
every norm weight as ``1 + w`` (undone on reading, redone on writing), names the norms ``attn_norm`` /
``post_attention_norm`` / ``ffn_norm`` / ``post_ffw_norm``, and keeps what its metadata does not say fixed:
every sixth layer global, a local RoPE base of 10,000 (``gemma3.rope.freq_base_swa`` when present) and
``query_pre_attn_scalar = head_dim`` (``hidden_size / heads`` for the 62-layer 27B). The tokenizer is the
file's SentencePiece vocabulary (:func:`lora_jax.models.gguf.tokenizer_from_metadata`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from lora_jax.errors import ArgumentError
from lora_jax.models import decoder
from lora_jax.models.arch import GGUF, Architecture
from lora_jax.models.decoder import DecoderConfig, DecoderModel
from lora_jax.models.layers import Attention, GatedMLP, RMSNorm, Rope

SLIDING_WINDOW_PATTERN = 6  # transformers' and llama.cpp's default: layers 6, 12, ... attend globally


@dataclasses.dataclass(frozen=True)
class Config(DecoderConfig):
    """A Gemma 3 text decoder: :class:`~lora_jax.models.decoder.DecoderConfig` (``rope_*``: the global layers'
    RoPE) plus ``rope_local_base_freq`` (the sliding layers' RoPE base), ``query_pre_attn_scalar`` and the
    soft-capping values. Defaults are Gemma 3 270M's."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("gemma3_text",)
    vocab_size: int = 262_144
    hidden_size: int = 640
    intermediate_size: int = 2048
    num_hidden_layers: int = 18
    num_attention_heads: int = 4
    num_key_value_heads: int = 1
    head_dim: int = 256
    hidden_act: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 32_768
    rope_theta: float = 1_000_000.0
    rope_local_base_freq: float = 10_000.0
    query_pre_attn_scalar: float = 256.0
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    qk_norm: bool = True
    tie_word_embeddings: bool = True
    sliding_window: int | None = 512
    bos_token_id: int | None = 2
    eos_token_id: int | tuple[int, ...] | None = 1
    pad_token_id: int | None = 0
    model_type: str = "gemma3_text"

    def __post_init__(self):
        super().__post_init__()
        if not self.qk_norm or self.qkv_bias != self.o_bias or self.mlp_bias:
            raise ArgumentError(
                "a Gemma 3 config has q/k norms, one attention_bias for q, k, v and o and no MLP bias; "
                "this Config differs"
            )

    @property
    def local_rope(self) -> Rope:
        """The RoPE of the sliding-window layers (no scaling)."""
        return Rope(self.rope_local_base_freq, max_position_embeddings=self.max_position_embeddings)

    def layer_rope(self, layer: int) -> Rope:
        return self.local_rope if self.is_sliding(layer) else self.rope

    @classmethod
    def fields_from_hf(cls, hf_config) -> dict:
        if getattr(hf_config, "use_bidirectional_attention", False):
            raise ArgumentError("gemma3_text: use_bidirectional_attention (an encoder) is not supported")
        local = dict((getattr(hf_config, "rope_parameters", None) or {}).get("sliding_attention") or {})
        if local.get("rope_type", "default") != "default":
            raise ArgumentError(f"gemma3_text: a scaled RoPE on the sliding layers ({local}) is not supported")
        caps = {
            k: (None if getattr(hf_config, k, None) is None else float(getattr(hf_config, k)))
            for k in ("final_logit_softcapping", "attn_logit_softcapping")
        }
        return dict(
            caps,
            rope_local_base_freq=float(local.get("rope_theta", 10_000.0)),
            query_pre_attn_scalar=float(hf_config.query_pre_attn_scalar),
            qk_norm=True,
        )

    def hf_fields(self) -> dict:
        fields = super().hf_fields()
        fields["hidden_activation"] = fields.pop("hidden_act")
        scalar = self.query_pre_attn_scalar
        return {
            **fields,
            "attention_bias": self.qkv_bias,
            "rope_parameters": {
                "full_attention": fields["rope_parameters"],
                "sliding_attention": {"rope_type": "default", "rope_theta": self.rope_local_base_freq},
            },
            "query_pre_attn_scalar": int(scalar) if float(scalar).is_integer() else scalar,
            "final_logit_softcapping": self.final_logit_softcapping,
            "attn_logit_softcapping": self.attn_logit_softcapping,
            "sliding_window": self.sliding_window,
            "layer_types": self.layer_types(),
        }


class DecoderLayer(nn.Module):
    """``x + post_attention_layernorm(self_attn(input_layernorm(x)))``, then
    ``x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))``; every norm ``(1 + w)``."""

    config: Config
    layer: int | None  # None: a scanned stack mixing local and global layers (see decoder.DecoderLayer)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, mask, kv, start):
        c = self.config
        norm = functools.partial(RMSNorm, eps=c.rms_norm_eps, dtype=self.dtype, offset=1.0)
        mixed = self.layer is None  # a scanned stack of local and global layers: the mask says which (LayerMask)
        attn = Attention(
            **{**c.attention_kwargs(), "rope": c.rope if mixed else c.layer_rope(self.layer)},
            sliding_rope=c.local_rope if mixed else None,
            norm_offset=1.0,
            scale=c.query_pre_attn_scalar**-0.5,
            softcap=c.attn_logit_softcapping,
            dtype=self.dtype,
            name="self_attn",
        )
        h, kv = attn(norm(name="input_layernorm")(x), positions, mask, kv, start)
        x = x + norm(name="post_attention_layernorm")(h)
        mlp = GatedMLP(
            features=c.hidden_size,
            intermediate=c.intermediate_size,
            activation=c.hidden_act,
            use_bias=False,
            init_std=c.initializer_range,
            dtype=self.dtype,
            name="mlp",
        )
        return x + norm(name="post_feedforward_layernorm")(mlp(norm(name="pre_feedforward_layernorm")(x))), kv


Gemma3TextModel = functools.partial(DecoderModel, layer=DecoderLayer, norm_offset=1.0, scale_embeddings=True)


# ------------------------------------------------------------------------------------------------ GGUF

GGUF_TENSORS = {
    **decoder.GGUF_TENSORS,
    r"model\.layers\.(\d+)\.post_attention_layernorm": r"blk.\1.post_attention_norm",
    r"model\.layers\.(\d+)\.pre_feedforward_layernorm": r"blk.\1.ffn_norm",
    r"model\.layers\.(\d+)\.post_feedforward_layernorm": r"blk.\1.post_ffw_norm",
}


def _gguf_fields(meta: Mapping[str, Any], names: set[str], arch: str) -> dict:
    """What llama.cpp's ``gemma3`` metadata leaves implicit: the RoPE per layer type, the interleaving and the
    score scale (llama.cpp's ``llm_build_gemma3``)."""
    get = lambda key, default=None: meta.get(f"{arch}.{key}", default)  # noqa: E731
    full = {"rope_type": "default", "rope_theta": float(get("rope.freq_base", 1_000_000.0))}
    if get("rope.scaling.type", "none") == "linear":
        full.update(rope_type="linear", factor=float(get("rope.scaling.factor", 1.0)))
    layers, heads, hidden = int(get("block_count")), int(get("attention.head_count")), int(get("embedding_length"))
    head_dim = int(get("attention.key_length", hidden // heads))
    return {
        "rope_parameters": {
            "full_attention": full,
            "sliding_attention": {"rope_type": "default", "rope_theta": float(get("rope.freq_base_swa", 10_000.0))},
        },
        "layer_types": [
            "sliding_attention" if (i + 1) % SLIDING_WINDOW_PATTERN else "full_attention" for i in range(layers)
        ],
        "query_pre_attn_scalar": hidden // heads if layers == 62 else head_dim,
    }


def _norm_shift(sign: float):
    """llama.cpp stores a Gemma norm weight ``w`` as ``1 + w``: ``sign`` -1 undoes that, +1 does it."""

    def fix(name: str, x: np.ndarray, config: Config) -> np.ndarray:
        return x + np.asarray(sign, x.dtype) if name.endswith("norm.weight") else x

    return fix


ARCHITECTURE = Architecture(
    name="gemma3",
    model_types=Config.MODEL_TYPES,
    config=Config,
    tasks=decoder.tasks(backbone=Gemma3TextModel, lm_class="Gemma3ForCausalLM"),
    names=decoder.NAMES,
    presets=decoder.PRESETS,
    logical_axes=decoder.LOGICAL_AXES,
    gguf=GGUF(
        model_types={"gemma3": "gemma3_text"},
        tensors=GGUF_TENSORS,
        config={**decoder.GGUF_CONFIG, "attention.sliding_window": "sliding_window"},
        required=decoder.GGUF_REQUIRED,
        derive=_gguf_fields,
        from_gguf=_norm_shift(-1.0),
        to_gguf=_norm_shift(1.0),
    ),
)
build = ARCHITECTURE.build
init_params = ARCHITECTURE.init_params

__all__ = ["ARCHITECTURE", "Config", "DecoderLayer", "Gemma3TextModel", "build", "init_params"]
