"""How each task turns a batch into a loss: the only place that knows the models' call signatures."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def packing(batch: dict) -> dict:
    """The packed-row inputs of ``batch`` (``segment_ids``, ``positions``) that it has, as model keywords."""
    return {k: batch[k] for k in ("segment_ids", "positions") if k in batch}


def causal_lm_loss(model, params, batch: dict, *, train: bool, rng: jax.Array | None) -> tuple[jax.Array, dict]:
    """Mean next-token cross-entropy over completion tokens only (the prompt is context, not a target).

    ``batch["loss_mask"][i, t] = 1`` when token ``t + 1`` belongs to the completion. A packed batch
    (``train.data.PackedBatches``) also has ``segment_ids`` and ``positions``: the model keeps each example to
    itself, and the loss mask never predicts across examples. Returns the summed loss over
    tokens and the token count, so that gradient accumulation and sharded batches weight every token equally.
    """
    logits, _ = model.apply({"params": params}, batch["input_ids"], attention_mask=batch["attention_mask"],
                            **packing(batch))
    logits = logits[:, :-1].astype(jnp.float32)
    targets = batch["input_ids"][:, 1:]
    mask = batch["loss_mask"][:, :-1].astype(jnp.float32)
    if "weight" in batch:  # padding rows of the last eval batch weigh 0
        mask = mask * batch["weight"][:, None]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(ce * mask), {"count": jnp.sum(mask)}


def classification_loss(model, params, batch: dict, *, train: bool, rng: jax.Array | None) -> tuple[jax.Array, dict]:
    """Summed cross-entropy over examples, with the logits for metrics."""
    rngs = {"dropout": rng} if (train and rng is not None) else None
    logits = model.apply({"params": params}, batch["input_ids"], attention_mask=batch["attention_mask"],
                         deterministic=not train, rngs=rngs)
    logits = logits.astype(jnp.float32)
    weight = batch.get("weight", jnp.ones(logits.shape[:1], jnp.float32))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    return jnp.sum(ce * weight), {"count": jnp.sum(weight), "logits": logits}


LOSSES: dict[str, Any] = {"causal-lm": causal_lm_loss, "classification": classification_loss}
