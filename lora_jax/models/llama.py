"""Llama-family decoders (Llama 1-3, Mistral, Qwen2): a declaration over the shared decoder
(:mod:`lora_jax.models.decoder`).

What differs between the three ``model_type`` values is their config: Qwen2 has q/k/v biases, Mistral a sliding
window on every layer, Qwen2 one on the layers its ``layer_types`` mark. Parameter paths mirror the Hugging Face
names (the table is in :mod:`lora_jax.models.decoder`), so ``lora.init(params, targets="qv")`` adapts every
``q_proj`` and ``v_proj`` kernel (PEFT's default for Llama) and ``"all-linear"`` the seven projections of every
layer but not the embedding or ``lm_head``.

GGUF files of the ``llama`` and ``qwen2`` architectures read too; llama.cpp stores the Llama Q and K rows
permuted for its interleaved RoPE, which the declaration undoes.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from lora_jax.errors import ArgumentError
from lora_jax.models import decoder
from lora_jax.models.arch import GGUF, Architecture
from lora_jax.models.decoder import DecoderConfig, permute_rope_rows, rope_rows, unpermute_rope_rows

MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclasses.dataclass(frozen=True)
class Config(DecoderConfig):
    """A Llama, Mistral or Qwen2 decoder (``model_type``); fields as :class:`~lora_jax.models.decoder.DecoderConfig`
    (no q/k norms)."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = MODEL_TYPES
    model_type: str = "llama"

    def __post_init__(self):
        super().__post_init__()
        if self.qk_norm:
            raise ArgumentError(f"{self.model_type} has no q/k norms (qk_norm=True is Qwen3: lora_jax.models.qwen3)")

    @classmethod
    def fields_from_hf(cls, hf_config) -> dict:
        if hf_config.model_type == "qwen2":
            return {"qkv_bias": True, "o_bias": False}
        return {}

    def hf_fields(self) -> dict:
        fields = super().hf_fields()
        if self.model_type == "llama":
            if self.qkv_bias != self.o_bias:
                raise ArgumentError("a Llama config has one attention_bias for q, k, v and o; this Config differs")
            fields.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        elif self.model_type == "mistral":
            fields.update(sliding_window=self.sliding_window)
        else:
            fields.update(
                use_sliding_window=self.sliding_window is not None,
                sliding_window=self.sliding_window,
                layer_types=self.layer_types() if self.sliding_window is not None else None,
            )
        return fields


def _llama_rows(fix):
    return lambda name, x, config: fix(name, x, config) if config.model_type == "llama" else x


ARCHITECTURE = Architecture(
    name="llama",
    model_types=MODEL_TYPES,
    config=Config,
    tasks=decoder.tasks(),
    names=decoder.NAMES,
    presets=decoder.PRESETS,
    logical_axes=decoder.LOGICAL_AXES,
    gguf=GGUF(
        model_types={"llama": "llama", "qwen2": "qwen2"},
        tensors=decoder.GGUF_TENSORS,
        config=decoder.GGUF_CONFIG,
        required=decoder.GGUF_REQUIRED,
        derive=lambda meta, names, arch: {"attention_bias": "blk.0.attn_q.bias" in names} if arch == "llama" else {},
        from_gguf=_llama_rows(rope_rows(unpermute_rope_rows)),
        to_gguf=_llama_rows(rope_rows(permute_rope_rows)),
    ),
)
build = ARCHITECTURE.build
init_params = ARCHITECTURE.init_params

__all__ = ["ARCHITECTURE", "MODEL_TYPES", "Config", "build", "init_params"]
