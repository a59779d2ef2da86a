"""Qwen3-MoE: the Qwen3 decoder (q/k norms) whose MLPs are sparse mixtures of experts
(:mod:`lora_jax.models.moe`): a router ``gate``, top-``k`` of ``num_experts`` routed experts
(``norm_topk_prob``: renormalise the ``k`` weights), on the layers ``decoder_sparse_step`` /
``mlp_only_layers`` mark (a dense MLP of ``intermediate_size`` on the others).

Parameter paths are the decoder's (:mod:`lora_jax.models.decoder`) with, on each sparse layer::

    model/layers_N/mlp/gate/kernel          (D, E)        model.layers.N.mlp.gate.weight
    model/layers_N/mlp/experts/gate_up_proj (E, D, 2F)    model.layers.N.mlp.experts.M.{gate,up}_proj.weight (F, D) each
    model/layers_N/mlp/experts/down_proj    (E, F, D)     model.layers.N.mlp.experts.M.down_proj.weight (D, F)

The expert leaves are named as ``transformers``' runtime ``Qwen3MoeExperts`` parameters (so PEFT's
``target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]`` names them), while checkpoints hold
one tensor per expert and projection, as ``transformers`` saves them. GGUF files (``qwen3moe``) hold each
projection's experts stacked: ``blk.N.ffn_{gate,up,down}_exps.weight`` and the router ``blk.N.ffn_gate_inp``.

Training: :func:`lora_jax.models.moe.aux_loss` gives ``router_aux_loss_coef`` times the load-balancing loss
from a forward pass with ``mutable=["intermediates"]`` (``transformers`` adds it when
``output_router_logits``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from lora_jax.models import decoder, moe, qwen3
from lora_jax.models.arch import GGUF, Architecture, Names, Rule, stacked
from lora_jax.models.decoder import DecoderConfig


@dataclasses.dataclass(frozen=True)
class Config(DecoderConfig):
    """A Qwen3-MoE decoder: :class:`~lora_jax.models.decoder.DecoderConfig` with q/k norms and the MoE fields of
    ``transformers.Qwen3MoeConfig``. ``moe_dispatch``: ``"ragged"`` (grouped products) or ``"dense"`` (the
    one-hot reference); ``moe_capacity_factor``: rows per expert under expert parallelism
    (:func:`lora_jax.models.moe.expert_capacity`; ``None``: never drop a token). Neither is a ``transformers``
    field."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("qwen3_moe",)
    qk_norm: bool = True
    num_experts: int = 128
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = False
    moe_dispatch: str = "ragged"
    moe_capacity_factor: float | None = None
    model_type: str = "qwen3_moe"

    def __post_init__(self):
        super().__post_init__()
        moe.check_config(self)

    def is_sparse(self, layer: int) -> bool:
        """Whether ``layer`` has the sparse MoE block (``transformers``' rule)."""
        return (
            layer not in self.mlp_only_layers and self.num_experts > 0 and (layer + 1) % self.decoder_sparse_step == 0
        )

    def layer_structure(self, layer: int) -> bool:
        return self.is_sparse(layer)  # dense and sparse layers cannot share a scanned stack

    @classmethod
    def fields_from_hf(cls, hf_config) -> dict:
        return {
            "qk_norm": True,
            "num_experts": hf_config.num_experts,
            "num_experts_per_tok": hf_config.num_experts_per_tok,
            "moe_intermediate_size": hf_config.moe_intermediate_size,
            "norm_topk_prob": bool(hf_config.norm_topk_prob),
            "decoder_sparse_step": hf_config.decoder_sparse_step,
            "mlp_only_layers": tuple(hf_config.mlp_only_layers or ()),
            "router_aux_loss_coef": float(hf_config.router_aux_loss_coef),
            "output_router_logits": bool(hf_config.output_router_logits),
        }

    def hf_fields(self) -> dict:
        return {
            **super().hf_fields(),
            **qwen3.attention_hf_fields(self, "Qwen3-MoE"),
            "num_experts": self.num_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "moe_intermediate_size": self.moe_intermediate_size,
            "norm_topk_prob": self.norm_topk_prob,
            "decoder_sparse_step": self.decoder_sparse_step,
            "mlp_only_layers": list(self.mlp_only_layers),
            "router_aux_loss_coef": self.router_aux_loss_coef,
            "output_router_logits": self.output_router_logits,
        }


_EXPERT = "layers.{layer}.mlp.experts.{expert}.{name}"
NAMES = Names(
    lists=decoder.NAMES.lists,
    ignore=decoder.NAMES.ignore,
    tied=decoder.NAMES.tied,
    rules=(
        Rule(
            r"(.*/)?layers_\d+/mlp/experts/gate_up_proj",
            moe.per_expert(2),
            moe.expert_tensor_names(_EXPERT, ("gate_proj", "up_proj")),
            also=moe.FUSED,
        ),
        Rule(
            r"(.*/)?layers_\d+/mlp/experts/down_proj",
            stacked(),
            moe.expert_tensor_names(_EXPERT, ("down_proj",)),
            also=moe.FUSED,
        ),
    ),
)

PRESETS = {
    **decoder.PRESETS,
    # PEFT's all-linear takes nn.Linear modules: attention and the dense MLPs of mlp_only layers, not the router
    # (a Qwen3MoeTopKRouter) nor the experts (parameters, reached with target_parameters)
}

GGUF_TENSORS = {
    **decoder.GGUF_TENSORS,
    r"model\.layers\.(\d+)\.mlp\.gate": r"blk.\1.ffn_gate_inp",
    r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.gate_proj": r"blk.\1.ffn_gate_exps[\2]",
    r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.up_proj": r"blk.\1.ffn_up_exps[\2]",
    r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.down_proj": r"blk.\1.ffn_down_exps[\2]",
}
GGUF_CONFIG = {
    **decoder.GGUF_CONFIG,
    "expert_count": "num_experts",
    "expert_used_count": "num_experts_per_tok",
    "expert_feed_forward_length": "moe_intermediate_size",
}

ARCHITECTURE = Architecture(
    name="qwen3_moe",
    model_types=Config.MODEL_TYPES,
    config=Config,
    tasks=decoder.tasks(moe.MoeDecoderModel),
    names=NAMES,
    presets=PRESETS,
    logical_axes=decoder.LOGICAL_AXES,
    # llama.cpp's qwen3moe graph always renormalises the top-k weights (transformers' GGUF reader sets it too)
    gguf=GGUF(
        model_types={"qwen3moe": "qwen3_moe"},
        tensors=GGUF_TENSORS,
        config=GGUF_CONFIG,
        required=(*decoder.GGUF_REQUIRED, "expert_count", "expert_used_count"),
        derive=lambda meta, names, arch: {"norm_topk_prob": True},
    ),
)
build = ARCHITECTURE.build
init_params = ARCHITECTURE.init_params

__all__ = ["ARCHITECTURE", "Config", "build", "init_params"]
