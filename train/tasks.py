"""How each task turns a batch into a loss: the only place that knows the models' call signatures."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lora_jax import losses


def packing(batch: dict) -> dict:
    """The packed-row inputs of ``batch`` (``segment_ids``, ``positions``) that it has, as model keywords."""
    return {k: batch[k] for k in ("segment_ids", "positions") if k in batch}


def causal_lm_loss(
    model,
    params,
    batch: dict,
    *,
    train: bool,
    rng: jax.Array | None,
    loss_chunk: int | str = "auto",
    logits: str = "loss",
) -> tuple[jax.Array, dict]:
    """Next-token cross-entropy over completion tokens only (the prompt is context, not a target).

    ``batch["loss_mask"][i, t] = 1`` when token ``t + 1`` belongs to the completion. A packed batch
    (``train.data.PackedBatches``) also has ``segment_ids`` and ``positions``: the model keeps each example to
    itself, and the loss mask never predicts across examples. Returns the summed loss over
    tokens and the token count, so that gradient accumulation and sharded batches weight every token equally.

    ``loss_chunk`` (``train.loss_chunk``): tokens per chunk of :func:`lora_jax.losses.chunked_cross_entropy`,
    which applies the output head chunk by chunk and never holds the ``(B, S, V)`` float32 logits (``"auto"``:
    sized by the vocabulary); ``0``: the full logits and optax's cross-entropy. A model without a ``head()``
    method (see :class:`lora_jax.models.decoder.CausalLM`) always takes the full-logits path.

    ``logits`` (``train.logits``): ``"loss"``: when the batch has ``loss_positions`` (``(B, K)``, from
    ``train.data``; every position of ``loss_mask`` among them), the head and the cross-entropy run on those K
    positions per row only (:func:`lora_jax.losses.chunked_cross_entropy`'s ``positions``; with ``loss_chunk=0``
    :func:`lora_jax.losses.cross_entropy` on them); the same loss as ``"all"``, every position's logits.

    A mixture of experts whose config sets ``output_router_logits`` adds, in training, its
    ``router_aux_loss_coef`` times the load-balancing loss over the non-padding tokens, as ``transformers`` adds
    it to the mean cross-entropy (here: times the token count, so that the sum over count is that mean).
    """
    ids = batch["input_ids"]
    mask = batch["loss_mask"].astype(jnp.float32)
    if "weight" in batch:  # padding rows of the last eval batch weigh 0
        mask = mask * batch["weight"][:, None]
    config = getattr(model, "config", None)
    with_aux = train and getattr(config, "output_router_logits", False)
    mutable = ["intermediates"] if with_aux else False

    def finish(loss_sum, count, state):
        if not with_aux:
            return loss_sum, {"count": count}
        from lora_jax.models import moe

        aux = moe.aux_loss(state["intermediates"], config, batch["attention_mask"])
        return loss_sum + aux * count, {"count": count, "aux_loss": aux}

    positions = batch.get("loss_positions") if logits == "loss" else None
    has_head = callable(getattr(type(model), "head", None))
    if has_head and (loss_chunk != 0 or positions is not None):

        def hidden_and_head(module, ids, attention_mask, **packed):
            h, _ = module(ids, attention_mask=attention_mask, hidden=True, **packed)
            return h, module.head()

        out = model.apply(
            {"params": params}, ids, batch["attention_mask"], method=hidden_and_head, mutable=mutable, **packing(batch)
        )
        (h, head), state = out if with_aux else (out, None)
        # Position t predicts token t + 1; the last position predicts nothing (weight 0, target 0).
        targets = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
        mask = mask.at[:, -1].set(0.0)
        if loss_chunk == 0:  # full logits, of the loss positions only
            loss_sum, count = losses.cross_entropy(h, targets=targets, weights=mask, positions=positions, **head)
        else:
            chunk = None if loss_chunk == "auto" else int(loss_chunk)
            loss_sum, count = losses.chunked_cross_entropy(
                h, targets=targets, weights=mask, chunk_size=chunk, positions=positions, **head
            )
        return finish(loss_sum, count, state)
    out = model.apply(
        {"params": params}, ids, attention_mask=batch["attention_mask"], mutable=mutable, **packing(batch)
    )
    (logits, _), state = out if with_aux else (out, None)
    logits = logits[:, :-1].astype(jnp.float32)
    mask = mask[:, :-1]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
    return finish(jnp.sum(ce * mask), jnp.sum(mask), state)


def classification_loss(model, params, batch: dict, *, train: bool, rng: jax.Array | None) -> tuple[jax.Array, dict]:
    """Summed cross-entropy over examples, with the logits for metrics. Text models read ``input_ids`` and
    ``attention_mask``, audio models ``input_features`` (log-mel spectrograms)."""
    rngs = {"dropout": rng} if (train and rng is not None) else None
    if "input_features" in batch:
        logits = model.apply({"params": params}, batch["input_features"], deterministic=not train, rngs=rngs)
    else:
        logits = model.apply(
            {"params": params},
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            deterministic=not train,
            rngs=rngs,
        )
    logits = logits.astype(jnp.float32)
    weight = batch.get("weight", jnp.ones(logits.shape[:1], jnp.float32))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    return jnp.sum(ce * weight), {"count": jnp.sum(weight), "logits": logits}


LOSSES: dict[str, Any] = {
    "causal-lm": causal_lm_loss,
    "chat": causal_lm_loss,
    "classification": classification_loss,
    "audio-classification": classification_loss,
}


def loss_for(cfg) -> Any:
    """``LOSSES[cfg.data.task]`` with the run's loss options bound (causal LM: ``train.loss_chunk``,
    ``train.logits``)."""
    fn = LOSSES[cfg.data.task]
    if fn is causal_lm_loss:
        return functools.partial(fn, loss_chunk=cfg.train.loss_chunk, logits=cfg.train.logits)
    return fn
