"""lora_jax: LoRA for JAX and Flax as a parameter-tree transform.

    import lora_jax as lora
    adapters = lora.init(params, r=8)                 # adapters for the attention kernels
    y = model.apply({"params": lora.wrap(params, adapters)}, x)   # factored forward
    merged = lora.merge(params, adapters)             # zero-latency inference

QLoRA: ``lora.quantize(params, "nf4")`` stores the frozen kernels in 4 bits (see :mod:`lora_jax.quant`);
DoRA: ``lora.init(..., use_dora=True)``; PiSSA: ``lora.init_pissa(params, r)`` (see :mod:`lora_jax.variants`).
Serving: ``lora.save_peft`` (transformers / vLLM), ``lora.save_gguf_adapter`` / ``lora.save_merged_gguf``
(llama.cpp / Ollama; see :mod:`lora_jax.gguf_export`).
Mixtures of experts: ``lora.init(params, targets="experts")`` gives each routed expert of a stacked expert kernel
its own adapter, applied by ``lora.ragged_dot`` (see :mod:`lora_jax.models.moe`).
"""

from lora_jax.core import (
    LoraAdapter,
    LoraWeight,
    MergedParams,
    Summary,
    adapter_items,
    combine,
    init,
    is_adapter,
    is_lora_weight,
    merge,
    merge_record,
    split,
    summary,
    unmerge,
    unwrap,
    wrap,
)
from lora_jax.errors import (
    ArgumentError,
    ArgumentTypeError,
    CheckpointError,
    ConfigError,
    DataError,
    LoraJaxError,
    MergeStateError,
    MissingFileError,
    NonFiniteError,
    NotFoundError,
    PeftError,
    TargetError,
    UnsupportedError,
)
from lora_jax.gguf_export import MergedGGUF, load_gguf_adapter, save_gguf_adapter, save_merged_gguf
from lora_jax.losses import chunked_cross_entropy
from lora_jax.multi import (
    AdapterSet,
    MultiLoraWeight,
    StackedAdapter,
    load_slot,
    row_ids,
    stack_adapters,
    weighted_adapter,
    wrap_mixed,
)
from lora_jax.ops import dense, dot, einsum, embed, materialize, ragged_dot
from lora_jax.optim import lora_plus, masked, trainable_labels
from lora_jax.peft import LoadedPeft, load_peft, save_peft
from lora_jax.quant import QuantizedWeight, dequantize, merge_quantized, quantize
from lora_jax.targets import PRESETS
from lora_jax.transform import init_stacked, transform, transform_report
from lora_jax.variants import init_pissa, pissa_to_lora

__version__ = "0.1.0"

__all__ = [
    "AdapterSet",
    "ArgumentError",
    "ArgumentTypeError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "LoadedPeft",
    "LoraAdapter",
    "LoraJaxError",
    "LoraWeight",
    "MergeStateError",
    "MergedGGUF",
    "MergedParams",
    "MissingFileError",
    "MultiLoraWeight",
    "NonFiniteError",
    "NotFoundError",
    "PRESETS",
    "PeftError",
    "QuantizedWeight",
    "StackedAdapter",
    "Summary",
    "TargetError",
    "TrainStateCheckpointer",
    "UnsupportedError",
    "adapter_items",
    "chunked_cross_entropy",
    "combine",
    "dense",
    "dequantize",
    "dot",
    "einsum",
    "embed",
    "init",
    "init_pissa",
    "init_stacked",
    "is_adapter",
    "is_lora_weight",
    "load_adapters",
    "load_gguf_adapter",
    "load_peft",
    "load_slot",
    "load_trained_params",
    "lora_plus",
    "masked",
    "materialize",
    "merge",
    "merge_quantized",
    "merge_record",
    "pissa_to_lora",
    "quantize",
    "ragged_dot",
    "row_ids",
    "save_adapters",
    "save_gguf_adapter",
    "save_merged_gguf",
    "save_peft",
    "save_trained_params",
    "split",
    "stack_adapters",
    "summary",
    "trainable_labels",
    "transform",
    "transform_report",
    "unmerge",
    "unwrap",
    "weighted_adapter",
    "wrap",
    "wrap_mixed",
]


# Checkpoints import Orbax, which takes a while: these names load lora_jax.checkpoint on first use.
_CHECKPOINT_NAMES = {
    "save_adapters": "save_adapters",
    "load_adapters": "load_adapters",
    "save_trained_params": "save_trained_params",
    "load_trained_params": "load_trained_params",
    "TrainStateCheckpointer": "Checkpointer",
}
_DEPRECATED = {"save_trained": "save_trained_params", "load_trained": "load_trained_params"}


def __getattr__(name: str):
    """``lora.save_adapters`` / ``lora.load_adapters`` (adapters), ``lora.save_trained_params`` /
    ``lora.load_trained_params`` (leaves trained in full) and ``lora.TrainStateCheckpointer`` (adapters + optimizer
    state every N steps), from :mod:`lora_jax.checkpoint`, imported on first use so that ``import lora_jax`` does
    not import Orbax. ``save_trained`` / ``load_trained`` are deprecated aliases."""
    if name in _CHECKPOINT_NAMES or name in _DEPRECATED:
        import warnings

        from lora_jax import checkpoint

        if name in _DEPRECATED:
            warnings.warn(f"lora.{name} is deprecated: use lora.{_DEPRECATED[name]}", DeprecationWarning, stacklevel=2)
            return getattr(checkpoint, _DEPRECATED[name])
        return getattr(checkpoint, _CHECKPOINT_NAMES[name])
    raise AttributeError(f"module 'lora_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_CHECKPOINT_NAMES))
