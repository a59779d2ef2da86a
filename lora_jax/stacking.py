"""Scanned layer stacks: the one convention, and the conversions between stacked and per-layer trees.

A model whose identical layers run as one scanned layer (``jax.lax.scan`` over the layers, as Flax's ``nn.scan``,
MaxText and tunix do) keeps their parameters stacked: one leaf per parameter with the layer as its first axis,
under a module named :data:`STACK` (``layers``) where an unrolled model has ``layers_0``, ``layers_1``, ...::

    model/layers_N/self_attn/q_proj/kernel (D, H*hd)    unrolled: one leaf per layer
    model/layers/self_attn/q_proj/kernel   (L, D, H*hd) scanned: one leaf, layer first

Everything else follows from the convention. A LoRA adapter of a stacked kernel is stacked the same way (``a (L,
d_in, r)``, ``b (L, r, d_out)``, ``in_shape = (L, d_in)``: :class:`lora_jax.core.LoraAdapter`'s stack axes), so
``lora.init`` / ``merge`` / ``wrap`` work on it unchanged, and checkpoints keep their per-layer names
(:class:`lora_jax.models.arch.Names` maps a stacked leaf to its ``L`` tensors).

- :func:`unstack` / :func:`stack`: a tree (params, adapters, ``LoraWeight`` or ``QuantizedWeight`` nodes, shapes)
  between the two forms, for code that speaks per-layer names (PEFT files, GGUF, the dW analysis per layer).
- :func:`layer_view`: a stacked node whose static metadata describes one layer while its arrays stay stacked:
  what ``jax.lax.scan`` needs to hand each step a valid per-layer node.
- :func:`layer_axes`: whether a leaf path lies in a stack (its leaves lead with one layer axis).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from lora_jax.errors import ArgumentError, UnsupportedError

PyTree = Any

STACK = "layers"
"""The module name of a scanned layer stack (``nn.scan``'s usual name; the unrolled form names ``layers_N``)."""

_UNROLLED = re.compile(rf"{STACK}_(\d+)")


def layer_axes(path: str | tuple[str, ...]) -> int:
    """How many leading axes of the leaf at ``path`` ('/'-joined or a tuple) index layers of a scanned stack: 1
    when a module on the path is named :data:`STACK` (and not the leaf itself) and is not a list indexed by the
    next part (PyTorch-style names, ``model/layers/0/...``), else 0."""
    parts = path.split("/") if isinstance(path, str) else tuple(path)
    return int(any(p == STACK and not parts[i + 1].isdigit() for i, p in enumerate(parts[:-1])))


def is_stacked(tree: PyTree) -> bool:
    """Whether ``tree`` (a nested mapping) holds a scanned stack anywhere."""
    if not hasattr(tree, "items"):
        return False
    return any(k == STACK and hasattr(v, "items") or is_stacked(v) for k, v in tree.items())


def num_layers(tree: PyTree) -> int:
    """The layer count of the first stack in ``tree`` (the leading axis of its leaves)."""
    for k, v in tree.items():
        if k == STACK and hasattr(v, "items"):
            leaf = jax.tree_util.tree_leaves(v, is_leaf=is_node)[0]
            return int(_stack_size(leaf))
        if hasattr(v, "items") and is_stacked(v):
            return num_layers(v)
    raise ArgumentError("num_layers: the tree holds no scanned stack")


# ----------------------------------------------------------------------------------------------- nodes


@dataclasses.dataclass(frozen=True)
class NodeRule:
    """How a pytree node type (an adapter, a wrapped kernel) lives in a scanned stack: ``size(node)`` its layer
    count, ``view(node, n)`` its :func:`layer_view`, ``slice(node, i)`` layer ``i``, ``join(nodes)`` the stack of
    per-layer nodes. The module that defines the type registers it (:func:`register_node`), so this module
    imports none of them."""

    size: Callable[[Any], int]
    view: Callable[[Any, int], Any]
    slice: Callable[[Any, int], Any]
    join: Callable[[list], Any]


_RULES: dict[type, NodeRule] = {}


def register_node(cls: type, rule: NodeRule) -> type:
    """Teach stacking a node type (see :class:`NodeRule`)."""
    _RULES[cls] = rule
    return cls


def refusing(what: str) -> NodeRule:
    """The rule of a node type that cannot live in a scanned stack yet: every operation raises naming ``what``."""

    def refuse(*_):
        raise unsupported(what)

    return NodeRule(size=refuse, view=refuse, slice=refuse, join=refuse)


def is_node(x: Any) -> bool:
    """Whether ``x`` is a registered node (a leaf of the tree functions here, not a subtree)."""
    return type(x) in _RULES


def _rule(x: Any) -> NodeRule | None:
    return _RULES.get(type(x))


def _stack_size(x: Any) -> int:
    rule = _rule(x)
    return rule.size(x) if rule is not None else x.shape[0]


def unsupported(what: str) -> UnsupportedError:
    return UnsupportedError(
        f"{what} in a scanned layer stack is not supported yet; build the model with unrolled layers "
        "(the config's scan_layers=False; in the training job model.scan_layers: false)"
    )


def key_per_layer(key: Any, n: int) -> Any:
    """A dropout key for each layer: the stacked node's key split ``n`` ways (each layer draws its own mask)."""
    if key is None:
        return None
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    if (typed and key.ndim == 1 and key.shape[0] == n) or (not typed and key.ndim == 2 and key.shape[0] == n):
        return key  # already one per layer
    return jax.random.split(key, n)


def layer_view(node: Any, n: int) -> Any:
    """``node`` (stacked over ``n`` layers) with the static metadata of one layer and its arrays still stacked,
    so that slicing every array along axis 0 (what ``jax.lax.scan`` does to its inputs) gives a valid node of
    that layer. Plain arrays are returned as they are."""
    rule = _rule(node)
    return rule.view(node, n) if rule is not None else node


def layer_slice(node: Any, i: int) -> Any:
    """Layer ``i`` of a stacked node or array."""
    rule = _rule(node)
    if rule is not None:
        return rule.slice(node, i)
    if isinstance(node, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(node.shape[1:], node.dtype, sharding=None)
    return node[i]


def join(nodes: list) -> Any:
    """The stacked node (or array) of per-layer ``nodes``."""
    first = nodes[0]
    rule = _rule(first)
    if rule is not None:
        return rule.join(nodes)
    if isinstance(first, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(nodes), *first.shape), first.dtype)
    return stack_arrays(nodes)


def stack_arrays(xs: list) -> Any:
    if isinstance(xs[0], jax.Array):
        import jax.numpy as jnp

        return jnp.stack(xs)
    return np.stack([np.asarray(x) for x in xs])


# ----------------------------------------------------------------------------------------------- trees


def _map_nodes(tree: PyTree, f) -> PyTree:
    return jax.tree_util.tree_map(f, tree, is_leaf=is_node)


def unstack(tree: PyTree) -> PyTree:
    """``tree`` with every scanned stack (a mapping under :data:`STACK`) split into its layers ``layers_0`` ...
    ``layers_{L-1}`` (arrays sliced, adapters and nodes per layer). A tree without a stack is returned as it is.
    Dict-like containers come back as plain dicts."""
    if not hasattr(tree, "items"):
        return tree
    out = {}
    for k, v in tree.items():
        if k == STACK and hasattr(v, "items"):
            n = num_layers({k: v})
            for i in range(n):
                out[f"{STACK}_{i}"] = _map_nodes(unstack_plain(v), lambda x, i=i: layer_slice(x, i))
        else:
            out[k] = unstack(v) if hasattr(v, "items") else v
    return out


def unstack_plain(tree: PyTree) -> PyTree:
    """A stack's own subtree as plain nested dicts (a stack holds no nested stack)."""
    return {k: unstack_plain(v) for k, v in tree.items()} if hasattr(tree, "items") else tree


def stack(tree: PyTree, like: PyTree | None = None) -> PyTree:
    """The inverse of :func:`unstack`: every run ``layers_0`` ... ``layers_{L-1}`` of a mapping joined into one
    stack under :data:`STACK`. With ``like`` (a tree in the stacked form, e.g. the model's params), only the
    mappings that are stacks in ``like`` are joined, and a layer missing from ``tree`` raises; without it, every
    complete run is joined."""
    if not hasattr(tree, "items"):
        return tree
    keys = list(tree)
    numbered = sorted((int(m.group(1)), k) for k in keys if (m := _UNROLLED.fullmatch(k)))
    joining = bool(numbered) if like is None else (hasattr(like, "items") and STACK in like)
    out = {}
    if joining and numbered:
        n = num_layers({STACK: like[STACK]}) if like is not None else len(numbered)
        have = [i for i, _ in numbered]
        if have != list(range(n)):
            missing = sorted(set(range(n)) - set(have))
            raise ArgumentError(f"stack: layers {missing[:8]} of {n} are missing (have {have[:8]}...)")
        per_layer = [tree[f"{STACK}_{i}"] for i in range(n)]
        structure = jax.tree_util.tree_structure(per_layer[0], is_leaf=is_node)
        for i, t in enumerate(per_layer[1:], 1):
            if jax.tree_util.tree_structure(t, is_leaf=is_node) != structure:
                raise ArgumentError(f"stack: layer {i} holds other leaves than layer 0; only identical layers stack")
        out[STACK] = jax.tree_util.tree_map(lambda *xs: join(list(xs)), *per_layer, is_leaf=is_node)
    for k in keys:
        if joining and _UNROLLED.fullmatch(k):
            continue
        v = tree[k]
        sub_like = like.get(k) if hasattr(like, "get") else None
        out[k] = stack(v, sub_like) if hasattr(v, "items") and (like is None or sub_like is not None) else v
    return out


def _has_unrolled(tree: PyTree) -> bool:
    if not hasattr(tree, "items"):
        return False
    return any(_UNROLLED.fullmatch(str(k)) or _has_unrolled(v) for k, v in tree.items())


def conform(tree: PyTree, like: PyTree) -> PyTree:
    """``tree`` (adapters, trained leaves) in the form of ``like`` (the params they go with): unstacked when
    ``like`` has per-layer modules and ``tree`` a stack, stacked when ``like`` has a stack and ``tree`` per-layer
    modules, else as it is. So adapters trained scanned merge into a model loaded unrolled, and back."""
    if is_stacked(tree) and not is_stacked(like) and _has_unrolled(like):
        return unstack(tree)
    if is_stacked(like) and not is_stacked(tree) and _has_unrolled(tree):
        return stack(tree, like=like)
    return tree


def unrolled(config: Any) -> Any:
    """``config`` with ``scan_layers=False`` when it describes a scanned model (the per-layer names and shapes of
    the same model), else ``config`` itself."""
    if getattr(config, "scanned", False):
        return dataclasses.replace(config, scan_layers=False)
    return config


def per_layer_path(path: tuple[str, ...], layer: int) -> tuple[str, ...]:
    """``path`` of a stacked leaf with the stack named as layer ``layer`` (``layers`` -> ``layers_3``)."""
    return tuple(f"{STACK}_{layer}" if (p == STACK and i < len(path) - 1) else p for i, p in enumerate(path))


__all__ = [
    "STACK",
    "NodeRule",
    "conform",
    "is_node",
    "is_stacked",
    "join",
    "key_per_layer",
    "layer_axes",
    "layer_slice",
    "layer_view",
    "num_layers",
    "per_layer_path",
    "refusing",
    "register_node",
    "stack",
    "stack_arrays",
    "unrolled",
    "unstack",
    "unstack_plain",
    "unsupported",
]
