"""Building blocks shared by the project's Flax models.

Every projection goes through :func:`lora_jax.ops.dot`, so a kernel that :func:`lora_jax.wrap` turned into a
``LoraWeight`` runs the factored LoRA forward, and a plain kernel runs an ordinary matmul.

Kernels are read with ``self.variable("params", ...)`` rather than ``self.param``: Linen's ``param`` checks
the stored value's leaves against the initialiser's shape, which a ``LoraWeight`` (base, A, B) or a
quantised kernel would fail although the model handles them.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax import ops

Dtype = Any


class Dense(nn.Module):
    """``y = x @ kernel + bias`` with ``kernel`` of shape ``(in, features)`` (Hugging Face ``nn.Linear``
    weights are stored transposed, ``(out, in)``; the loaders transpose them)."""

    features: int
    use_bias: bool = True
    dtype: Dtype | None = None  # compute dtype; None: the input's
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, x):
        kernel = self.variable("params", "kernel", lambda: self.kernel_init(
            self.make_rng("params"), (x.shape[-1], self.features), self.param_dtype)).value
        dtype = self.dtype or x.dtype
        y = ops.dot(x.astype(dtype), ops.astype(kernel, dtype))
        if self.use_bias:
            bias = self.variable("params", "bias", lambda: jnp.zeros((self.features,), self.param_dtype)).value
            y = y + bias.astype(dtype)
        return y


# Activation checkpointing of each block: what its forward pass keeps for the backward pass (the rest is
# recomputed there). "none": everything kept (no checkpoint); "full": only the block's inputs.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat(block: type[nn.Module], policy: str) -> type[nn.Module]:
    """``block`` itself for ``policy="none"``, else ``nn.remat(block)`` with that policy of
    :data:`REMAT_POLICIES` (parameter paths are unchanged)."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat policy must be one of {sorted(REMAT_POLICIES)}, got {policy!r}")
    return block if policy == "none" else nn.remat(block, policy=REMAT_POLICIES[policy])
