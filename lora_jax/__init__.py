"""lora_jax: LoRA for JAX and Flax as a parameter-tree transform.

    import lora_jax as lora
    adapters = lora.init(params, r=8)                 # adapters for the attention kernels
    y = model.apply({"params": lora.wrap(params, adapters)}, x)   # factored forward
    merged = lora.merge(params, adapters)             # zero-latency inference

QLoRA: ``lora.quantize(params, "nf4")`` stores the frozen kernels in 4 bits (see :mod:`lora_jax.quant`);
DoRA: ``lora.init(..., use_dora=True)``; PiSSA: ``lora.init_pissa(params, r)`` (see :mod:`lora_jax.variants`).
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
    CheckpointError,
    ConfigError,
    DataError,
    LoraJaxError,
    MergeStateError,
    NonFiniteError,
    PeftError,
    TargetError,
)
from lora_jax.ops import dense, dot, einsum, embed, materialize
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
from lora_jax.optim import lora_plus, masked, trainable_labels
from lora_jax.quant import QuantizedWeight, dequantize, merge_quantized, quantize
from lora_jax.variants import init_pissa
from lora_jax.peft import LoadedPeft, load_peft, save_peft
from lora_jax.targets import PRESETS
from lora_jax.transform import init_stacked, transform, transform_report

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "DataError", "LoraJaxError", "MergeStateError", "NonFiniteError", "PeftError",
    "TargetError",
    "LoraAdapter", "LoraWeight", "MergedParams", "Summary", "PRESETS", "adapter_items", "combine", "dense", "dot", "einsum",
    "embed", "init", "is_adapter", "is_lora_weight", "lora_plus", "masked", "materialize", "merge", "merge_record", "split",
    "summary", "trainable_labels", "unmerge", "unwrap", "wrap",
    "init_stacked", "transform", "transform_report",
    "QuantizedWeight", "dequantize", "init_pissa", "merge_quantized", "quantize",
    "LoadedPeft", "load_peft", "save_peft",
    "AdapterSet", "MultiLoraWeight", "StackedAdapter", "load_slot", "row_ids", "stack_adapters", "weighted_adapter",
    "wrap_mixed",
]
