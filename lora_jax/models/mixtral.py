"""Mixtral: the Llama-style decoder (GQA, RoPE, optional sliding window) whose every MLP is a sparse mixture of
``num_local_experts`` experts (:mod:`lora_jax.models.moe`), top-``k`` routing with the ``k`` weights always
renormalised to sum to 1.

Parameter paths are the decoder's (:mod:`lora_jax.models.decoder`) with, on every layer, the names of
``transformers``' runtime modules (``MixtralSparseMoeBlock`` is ``mlp``)::

    model/layers_N/mlp/gate/kernel          (D, E)       model.layers.N.block_sparse_moe.gate.weight
    model/layers_N/mlp/experts/gate_up_proj (E, D, 2F)   model.layers.N.block_sparse_moe.experts.M.{w1,w3}.weight
    model/layers_N/mlp/experts/down_proj    (E, F, D)    model.layers.N.block_sparse_moe.experts.M.w2.weight

(checkpoints keep the original ``block_sparse_moe`` names and one ``w1`` (gate) / ``w3`` (up) / ``w2`` (down)
tensor per expert, as ``transformers`` saves them; PEFT names the runtime modules: ``mlp.gate``,
``mlp.experts.gate_up_proj``). ``router_jitter_noise`` (a training-time multiplicative noise on the block's
input) is read and written back but not applied.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from lora_jax.errors import ArgumentError
from lora_jax.models import decoder, moe
from lora_jax.models.arch import TRANSPOSE, Architecture, Names, Rule, stacked
from lora_jax.models.decoder import DecoderConfig


@dataclasses.dataclass(frozen=True)
class Config(DecoderConfig):
    """A Mixtral decoder: :class:`~lora_jax.models.decoder.DecoderConfig` with the MoE fields of
    ``transformers.MixtralConfig`` (``num_experts`` is its ``num_local_experts``; each expert's width is
    ``intermediate_size``). ``moe_dispatch``: ``"ragged"`` or ``"dense"``; ``moe_capacity_factor``: rows per expert
    under expert parallelism (:func:`lora_jax.models.moe.expert_capacity`; ``None``: never drop a token). Neither
    is a ``transformers`` field."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("mixtral",)
    num_experts: int = 8
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = False
    router_jitter_noise: float = 0.0
    moe_dispatch: str = "ragged"
    moe_capacity_factor: float | None = None
    model_type: str = "mixtral"

    norm_topk_prob: ClassVar[bool] = True  # Mixtral's router always renormalises

    def __post_init__(self):
        super().__post_init__()
        moe.check_config(self, "num_local_experts")

    @property
    def moe_intermediate_size(self) -> int:
        return self.intermediate_size

    def is_sparse(self, layer: int) -> bool:
        return True

    @classmethod
    def fields_from_hf(cls, hf_config) -> dict:
        return {
            "num_experts": hf_config.num_local_experts,
            "num_experts_per_tok": hf_config.num_experts_per_tok,
            "router_aux_loss_coef": float(hf_config.router_aux_loss_coef),
            "output_router_logits": bool(hf_config.output_router_logits),
            "router_jitter_noise": float(getattr(hf_config, "router_jitter_noise", 0.0) or 0.0),
        }

    def hf_fields(self) -> dict:
        if self.qkv_bias or self.o_bias or self.mlp_bias or self.qk_norm:
            raise ArgumentError("a Mixtral config has no attention / MLP biases and no q/k norms; this Config differs")
        if self.sliding_layers is not None and not all(self.sliding_layers):
            raise ArgumentError("Mixtral applies its sliding window to every layer; this Config marks only some")
        return {
            **super().hf_fields(),
            "sliding_window": self.sliding_window,
            "num_local_experts": self.num_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "router_aux_loss_coef": self.router_aux_loss_coef,
            "output_router_logits": self.output_router_logits,
            "router_jitter_noise": self.router_jitter_noise,
        }


def _router_name(default: str, config) -> tuple[str, ...]:
    return (default.replace(".mlp.gate.", ".block_sparse_moe.gate."),)


_EXPERT = "layers.{layer}.block_sparse_moe.experts.{expert}.{name}"
NAMES = Names(
    lists=decoder.NAMES.lists,
    ignore=decoder.NAMES.ignore,
    tied=decoder.NAMES.tied,
    rules=(
        Rule(r"(.*/)?layers_\d+/mlp/gate/kernel", TRANSPOSE, _router_name, also=((TRANSPOSE, None),)),
        Rule(
            r"(.*/)?layers_\d+/mlp/experts/gate_up_proj",
            moe.per_expert(2),
            moe.expert_tensor_names(_EXPERT, ("w1", "w3")),
            also=moe.FUSED,
        ),
        Rule(
            r"(.*/)?layers_\d+/mlp/experts/down_proj",
            stacked(),
            moe.expert_tensor_names(_EXPERT, ("w2",)),
            also=moe.FUSED,
        ),
    ),
)

ARCHITECTURE = Architecture(
    name="mixtral",
    model_types=Config.MODEL_TYPES,
    config=Config,
    tasks=decoder.tasks(moe.MoeDecoderModel),
    names=NAMES,
    # PEFT's all-linear on Mixtral: the attention projections (the router and the experts are not nn.Linear)
    presets={**decoder.PRESETS, "all-linear": decoder.PRESETS["attention"]},
    logical_axes=decoder.LOGICAL_AXES,
)
build = ARCHITECTURE.build
init_params = ARCHITECTURE.init_params

__all__ = ["ARCHITECTURE", "Config", "build", "init_params"]
