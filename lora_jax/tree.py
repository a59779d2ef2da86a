"""Parameter paths: the one place that turns pytree key paths into names and nested dicts into flat ones (and
counts a tree's bytes, :func:`nbytes`).

A parameter's path is a tuple of strings, ``("model", "layers_0", "self_attn", "q_proj", "kernel")``, or the same
joined by ``'/'``: ``"model/layers_0/self_attn/q_proj/kernel"``. Key paths of any pytree (dicts, lists,
dataclasses, ``nnx.State``) convert to these; the ``value`` attribute that ``nnx.split`` states add under each
variable is dropped, so a Linen tree and the state of the equivalent NNX module have the same paths.

    >>> flat = flatten({"a": {"b": 1, "c": {"d": 2}}})
    >>> flat
    {('a', 'b'): 1, ('a', 'c', 'd'): 2}
    >>> unflatten({join(p): v for p, v in flat.items()})
    {'a': {'b': 1, 'c': {'d': 2}}}
    >>> get({"a": {"b": 1}}, "a/b"), get({"a": {"b": 1}}, ("a", "x"))
    (1, None)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

Path = tuple[str, ...]


def key_name(key: Any) -> str:
    """One entry of a jax key path as a string (a dict key, a sequence index, an attribute name)."""
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)  # pragma: no cover - future key types


def path_tuple(keypath: Sequence[Any]) -> Path:
    """A jax key path as a tuple of strings; the trailing ``.value`` of NNX variables is dropped."""
    parts = tuple(key_name(k) for k in keypath)
    if len(parts) > 1 and parts[-1] == "value" and isinstance(keypath[-1], jax.tree_util.GetAttrKey):
        parts = parts[:-1]
    return parts


def path_str(keypath: Sequence[Any]) -> str:
    """A jax key path joined by ``'/'``."""
    return join(path_tuple(keypath))


def join(path: Sequence[str] | str) -> str:
    """``("a", "b")`` -> ``"a/b"`` (a string is returned as it is)."""
    return path if isinstance(path, str) else "/".join(path)


def split(path: Sequence[str] | str) -> Path:
    """``"a/b"`` -> ``("a", "b")`` (a tuple is returned as it is)."""
    return tuple(path.split("/")) if isinstance(path, str) else tuple(path)


def leaves(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> list[tuple[Path, Any]]:
    """``[(path, leaf), ...]`` of any pytree, in tree order (``is_leaf`` as in ``jax.tree_util``)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_tuple(p), leaf) for p, leaf in flat]


def flatten(tree: Mapping) -> dict[Path, Any]:
    """A nested mapping as ``{path: value}``; anything that is not a ``Mapping`` is a value (so an adapter, a
    quantised weight or a ``jax.ShapeDtypeStruct`` stays whole)."""
    out: dict[Path, Any] = {}

    def visit(node: Mapping, prefix: Path) -> None:
        for k, v in node.items():
            if isinstance(v, Mapping):
                visit(v, prefix + (k,))
            else:
                out[prefix + (k,)] = v

    visit(tree, ())
    return out


def unflatten(flat: Mapping[Sequence[str] | str, Any]) -> dict:
    """``{path: value}`` (tuples or '/'-joined strings) as nested dicts."""
    tree: dict = {}
    for path, v in flat.items():
        put(tree, path, v)
    return tree


def get(tree: Any, path: Sequence[str] | str, default: Any = None) -> Any:
    """The node at ``path`` of nested mappings, or ``default`` when a key is missing."""
    node = tree
    for k in split(path):
        if not isinstance(node, Mapping) or k not in node:
            return default
        node = node[k]
    return node


def put(tree: dict, path: Sequence[str] | str, value: Any) -> None:
    """Set ``tree[p0][p1]...[pn] = value`` in place, creating the dicts on the way."""
    keys = split(path)
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value


def nbytes(tree: Any) -> int:
    """Exact bytes stored by every array leaf of ``tree`` (arrays, ``jax.ShapeDtypeStruct``; a quantised kernel
    counted by its codes and scales): the one byte counter of the project.

    >>> import numpy as np
    >>> nbytes({"w": np.zeros((4, 8), np.float32), "step": 3, "b": np.zeros(8, np.int8)})
    136
    """
    return sum(
        math.prod(x.shape) * np.dtype(x.dtype).itemsize
        for x in jax.tree_util.tree_leaves(tree)
        if hasattr(x, "shape") and hasattr(x, "dtype")
    )


__all__ = [
    "Path",
    "flatten",
    "get",
    "join",
    "key_name",
    "leaves",
    "nbytes",
    "path_str",
    "path_tuple",
    "put",
    "split",
    "unflatten",
]
