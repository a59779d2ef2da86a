"""Qwen3 (dense): the shared decoder (:mod:`lora_jax.models.decoder`) with a per-head RMSNorm on queries and
keys before RoPE, no q/k/v bias (unless ``attention_bias``), and ``head_dim`` from the config (not
``hidden_size / heads``).

Parameter paths are the decoder's plus ``model/layers_N/self_attn/{q,k}_norm/scale (head_dim,)`` <->
``model.layers.N.self_attn.{q,k}_norm.weight``; GGUF files of the ``qwen3`` architecture name them
``blk.N.attn_{q,k}_norm.weight``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from lora_jax.errors import ArgumentError
from lora_jax.models import decoder
from lora_jax.models.arch import GGUF, Architecture
from lora_jax.models.decoder import DecoderConfig


@dataclasses.dataclass(frozen=True)
class Config(DecoderConfig):
    """A Qwen3 decoder: :class:`~lora_jax.models.decoder.DecoderConfig` with q/k norms."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("qwen3",)
    qk_norm: bool = True
    model_type: str = "qwen3"

    @classmethod
    def fields_from_hf(cls, hf_config) -> dict:
        return {"qk_norm": True}

    def hf_fields(self) -> dict:
        return {**super().hf_fields(), **attention_hf_fields(self, "Qwen3"), "layer_types": self.layer_types()}


def attention_hf_fields(config: DecoderConfig, family: str) -> dict:
    """The attention fields of a Qwen3-style ``transformers`` config (Qwen3, Qwen3-MoE: ``family``):
    ``attention_bias`` (one for q, k, v and o), ``use_sliding_window`` and ``sliding_window``. Raises
    ``ValueError`` for a ``config`` such a family cannot express (no q/k norms, or biases that differ)."""
    if config.qkv_bias != config.o_bias or not config.qk_norm:
        raise ArgumentError(
            f"a {family} config has q/k norms and one attention_bias for q, k, v and o; this Config differs"
        )
    return {
        "attention_bias": config.qkv_bias,
        "use_sliding_window": config.sliding_window is not None,
        "sliding_window": config.sliding_window,
    }


ARCHITECTURE = Architecture(
    name="qwen3",
    model_types=Config.MODEL_TYPES,
    config=Config,
    tasks=decoder.tasks(),
    names=decoder.NAMES,
    presets=decoder.PRESETS,
    logical_axes=decoder.LOGICAL_AXES,
    gguf=GGUF(
        model_types={"qwen3": "qwen3"},
        tensors=decoder.GGUF_TENSORS,
        config=decoder.GGUF_CONFIG,
        required=decoder.GGUF_REQUIRED,
    ),
)
build = ARCHITECTURE.build
init_params = ARCHITECTURE.init_params

__all__ = ["ARCHITECTURE", "Config", "attention_hf_fields", "build", "init_params"]
