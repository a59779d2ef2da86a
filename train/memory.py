"""The memory plan: what one device holds during a training step, checked before the first step.

Per device (the most loaded one: the largest block of every array):

- ``base``: the frozen base (as stored: ``train.precision``, or quantised for QLoRA);
- ``trainable``: the adapters and any leaves trained in full;
- ``optimizer``: the optimizer's state (moments placed like their parameters);
- ``batch``: the step's input batch;
- ``temp``: the step's temporaries (activations kept for the backward pass, gradients, dequantised kernels...),
  from XLA's compiled memory analysis of the step;
- ``outputs``: the step's outputs that do not reuse a donated input buffer.

``total`` is their sum; ``xla_arguments`` is XLA's own count of the step's inputs (base + trainable + optimizer +
batch), kept beside the plan's so that the two can be compared. A run whose ``total`` exceeds the device's capacity
(``train.device_memory``, else what the backend reports in ``memory_stats()``) stops before training, with one
line that names the knobs that would help and by how much it is over.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from lora_jax.models.hf import parse_size
from lora_jax.models.placement import shard_nbytes
from train.config import Config, ConfigError

GiB = 2**30


def device_bytes(tree: Any) -> int:
    """Bytes of ``tree`` (arrays, or ``ShapeDtypeStruct`` with shardings) on its most loaded device."""
    return int(sum(shard_nbytes(x) for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))


def device_capacity(cfg: Config) -> int | None:
    """Bytes one device may use: ``train.device_memory``, else the backend's ``bytes_limit`` (GPU, TPU), else
    ``None`` (CPU devices report none)."""
    if cfg.train.device_memory is not None:
        return parse_size(cfg.train.device_memory)
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - a backend without memory statistics
        return None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device of a training step (see the module docstring); ``capacity`` ``None``: unknown."""

    base: int
    trainable: int
    optimizer: int
    batch: int
    temp: int
    outputs: int
    xla_arguments: int
    capacity: int | None

    @property
    def total(self) -> int:
        return self.base + self.trainable + self.optimizer + self.batch + self.temp + self.outputs

    def describe(self) -> str:
        parts = [
            f"base {self.base / GiB:.2f}",
            f"trainable {self.trainable / GiB:.3f}",
            f"optimizer {self.optimizer / GiB:.3f}",
            f"batch {self.batch / GiB:.3f}",
            f"step temporaries {self.temp / GiB:.2f}",
            f"outputs {self.outputs / GiB:.3f}",
        ]
        cap = f" of {self.capacity / GiB:.2f} GiB" if self.capacity is not None else " (capacity not reported)"
        return f"memory plan per device: {self.total / GiB:.2f} GiB{cap} = " + " + ".join(parts) + " GiB"

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "total": self.total}


def plan(frozen: Any, trainable: Any, opt_state: Any, batch: Any, compiled: dict, capacity: int | None) -> MemoryPlan:
    """The plan of a step over these placed trees, with ``compiled`` the step's memory analysis
    (:func:`train.loop.compile_step`'s dict: ``temp``, ``outputs``, ``aliased``, ``arguments``; empty where the
    backend reports none, and then the plan counts only the arrays)."""
    return MemoryPlan(
        base=device_bytes(frozen),
        trainable=device_bytes(trainable),
        optimizer=device_bytes(opt_state),
        batch=device_bytes(batch),
        temp=int(compiled.get("temp", 0)),
        outputs=max(int(compiled.get("outputs", 0)) - int(compiled.get("aliased", 0)), 0),
        xla_arguments=int(compiled.get("arguments", 0)),
        capacity=capacity,
    )


def check(p: MemoryPlan, cfg: Config) -> None:
    """Raise :class:`~train.config.ConfigError` when the plan does not fit the device, naming what would help."""
    if p.capacity is None or p.total <= p.capacity:
        return
    over = p.total - p.capacity
    sharded = p.base + p.optimizer
    hints = [
        f"more fsdp/tensor devices (mesh.fsdp={cfg.mesh.fsdp}, mesh.tensor={cfg.mesh.tensor}: doubling them "
        f"saves about {sharded / 2 / GiB:.2f} GiB)"
    ]
    if cfg.train.remat in (False, "none"):
        hints.append("train.remat=full (keeps only each layer's input for the backward pass)")
    hints.append(
        f"a smaller train.batch_size (now {cfg.train.batch_size}; the step's temporaries are "
        f"{p.temp / GiB:.2f} GiB) or more train.grad_accum"
    )
    if cfg.data.task == "causal-lm":
        hints.append("a smaller loss chunk (the logits' share of the temporaries)")
    if cfg.train.method != "qlora":
        hints.append(
            "train.method=qlora (a 4-bit base: about a quarter of the base's "
            f"{p.base / GiB:.2f} GiB in {cfg.train.precision})"
        )
    raise ConfigError(
        f"the run needs {p.total / GiB:.2f} GiB per device but the device has "
        f"{p.capacity / GiB:.2f} GiB ({over / GiB:.2f} GiB over): try " + "; ".join(hints)
    )


__all__ = ["MemoryPlan", "check", "device_bytes", "device_capacity", "plan"]
