"""Optimizers that see only what is trained.

Two ways to keep the frozen base out of the optimizer:

1. Give the optimizer only the trainable tree from :func:`lora_jax.split` (the recommended way: the base is
   never differentiated and holds no optimizer state). :func:`lora_plus` then assigns B its own learning rate.
2. Keep one tree and mask it: :func:`masked` wraps any optax transformation with ``optax.multi_transform`` so
   frozen leaves go through ``optax.set_to_zero()``, which holds no state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from lora_jax.core import LoraAdapter, LoraWeight, is_adapter, is_lora_weight
from lora_jax.errors import ArgumentError

PyTree = Any


def _label_adapters(tree: PyTree, a_label: str, b_label: str, other: str) -> PyTree:
    """Label every array of ``tree``: adapter A factors, adapter B factors, everything else."""

    def label(node):
        if is_adapter(node):  # a DoRA magnitude goes with B, as in PEFT's LoRA+ (1-D parameters join B's group)
            return LoraAdapter(
                a_label,
                b_label,
                alpha=node.alpha,
                scale=node.scale,
                in_shape=node.in_shape,
                out_shape=node.out_shape,
                dropout=node.dropout,
                magnitude=None if node.magnitude is None else b_label,
            )
        if is_lora_weight(node):  # the base may be a pytree node itself (a quantised kernel)
            return LoraWeight(
                jax.tree_util.tree_map(lambda _: "frozen", node.base),
                _label_adapters(node.adapter, a_label, b_label, other),
                None if node.key is None else "frozen",
            )
        return other

    return jax.tree_util.tree_map(label, tree, is_leaf=lambda x: is_adapter(x) or is_lora_weight(x))


def trainable_labels(tree: PyTree, train: Callable[[str], bool] | None = None) -> PyTree:
    """``"trainable"`` for every adapter array of ``tree`` (and for leaves whose path satisfies ``train``),
    ``"frozen"`` elsewhere. ``tree`` may be wrapped params, an adapter tree, or any tree containing them."""
    from lora_jax.targets import path_str

    labels = _label_adapters(tree, "trainable", "trainable", "frozen")
    if train is None:
        return labels

    def relabel(path, lab):
        return "trainable" if lab == "frozen" and train(path_str(path)) else lab

    return jax.tree_util.tree_map_with_path(relabel, labels)


def masked(tx: optax.GradientTransformation, tree_or_labels: PyTree | Callable) -> optax.GradientTransformation:
    """Apply ``tx`` to the trainable leaves only; frozen leaves get zero updates and no optimizer state.

    ``tree_or_labels``: a tree as accepted by :func:`trainable_labels`, or a function from params to labels.
    """
    labels = tree_or_labels if callable(tree_or_labels) else trainable_labels(tree_or_labels)
    return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)


def lora_plus(
    make_tx: Callable[[Any], optax.GradientTransformation],
    learning_rate: Any,
    ratio: float = 16.0,
    other_learning_rate: Any = None,
) -> optax.GradientTransformation:
    """LoRA+ (Hayou et al. 2024): B learns ``ratio`` times faster than A.

    Args:
      make_tx: builds an optimizer from a learning rate (or schedule), e.g. ``optax.adamw``.
      learning_rate: the learning rate (or schedule) of the A factors.
      ratio: B's learning rate divided by A's (the paper recommends 2^4).
      other_learning_rate: for non-adapter leaves of the trained tree (e.g. a classification head); defaults to
        ``learning_rate``.

    Use on the trainable tree of :func:`lora_jax.split` or on an adapter tree.
    """
    if ratio <= 0:
        raise ArgumentError(f"LoRA+ ratio must be positive, got {ratio}")
    scaled = (lambda step: learning_rate(step) * ratio) if callable(learning_rate) else learning_rate * ratio
    return optax.multi_transform(
        {
            "lora_a": make_tx(learning_rate),
            "lora_b": make_tx(scaled),
            "other": make_tx(learning_rate if other_learning_rate is None else other_learning_rate),
        },
        lambda tree: _label_adapters(tree, "lora_a", "lora_b", "other"),
    )
