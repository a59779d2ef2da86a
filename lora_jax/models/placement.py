"""Parameters born sharded: every leaf is created directly with its final sharding, from the blocks it needs.

A checkpoint opened with :func:`lora_jax.models.open_checkpoint` gives one :class:`~lora_jax.models.hf.LeafSource`
per parameter (a memory-mapped safetensors tensor, a GGUF tensor, a CTranslate2 variable). :func:`place_leaf`
builds the leaf with ``jax.make_array_from_callback``: for each device of this process it reads the block that
device holds (only its bytes, for a safetensors tensor in a sliceable layout), casts it in numpy to the run's
dtype, and hands it to that device. So

- no parameter is ever whole on one device unless its sharding says so (a replicated leaf);
- in a multi-process run each process reads only the blocks its own devices hold;
- host memory holds at most one leaf's local blocks at a time beyond the memory-mapped file.

A block shared by several devices (a leaf replicated over the ``data`` axis) is read once per process.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.errors import CheckpointError

Path = tuple[str, ...]
DtypeFor = Any  # a dtype, or ``(path) -> dtype``


def is_float(dtype: Any) -> bool:
    return jnp.issubdtype(np.dtype(dtype), jnp.floating)


def dtype_of(dtype: DtypeFor, path: Path) -> np.dtype | None:
    """``dtype`` for the leaf at ``path``: ``dtype`` itself when it names a dtype (``jnp.bfloat16``, ``"float32"``:
    scalar types are callable too, so the test is whether numpy reads it), else ``dtype(path)``."""
    if dtype is None:
        return None
    try:
        return np.dtype(dtype)
    except TypeError:
        return np.dtype(dtype(path))


def _key(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(*s.indices(n)) for s, n in zip(index, shape))


def place_leaf(source: Any, sharding: jax.sharding.Sharding, dtype: Any = None) -> jax.Array:
    """The leaf ``source`` (a :class:`~lora_jax.models.hf.LeafSource`) as a global array with ``sharding``, its
    float values cast to ``dtype`` (``None``: as stored). Each distinct block this process's devices hold is read
    and cast once."""
    target = np.dtype(dtype) if dtype is not None and is_float(source.dtype) else np.dtype(source.dtype)
    shape = tuple(source.shape)
    blocks: dict[tuple, np.ndarray] = {}
    whole = None if source.blockwise else np.asarray(source.value())  # read once, sliced per device

    def read(index: tuple[slice, ...]) -> np.ndarray:
        index = _key(index, shape)
        key = tuple((s.start, s.stop) for s in index)
        if key not in blocks:
            x = np.asarray(source.block(index) if whole is None else whole[index])
            want = tuple(s.stop - s.start for s in index)
            if x.shape != want:
                raise CheckpointError(f"{source.what}: block {index} read with shape {x.shape}, expected {want}")
            blocks[key] = np.ascontiguousarray(x.astype(target, copy=False))
        return blocks[key]

    return jax.make_array_from_callback(shape, sharding, read, dtype=target)


def place(
    sources: Mapping[Path, Any],
    shardings: Mapping[Path, jax.sharding.Sharding] | Callable[[Path], Any],
    dtype: DtypeFor = None,
    then: Callable[[Path, jax.Array], Any] | None = None,
) -> dict[Path, Any]:
    """:func:`place_leaf` for every ``{path: source}``, with ``shardings[path]`` (or ``shardings(path)``) and
    ``dtype`` (one dtype, or ``dtype(path)``), one leaf after the other; ``then(path, array)``, if given, replaces
    each leaf as soon as it is placed (a quantiser: the dense leaf is dropped before the next one is read)."""
    out = {}
    for path, source in sources.items():
        sharding = shardings(path) if callable(shardings) else shardings[path]
        x = place_leaf(source, sharding, dtype_of(dtype, path))
        out[path] = then(path, x) if then is not None else x
    return out


def shard_nbytes(x: Any) -> int:
    """Bytes of the largest block of ``x`` (an array or ``ShapeDtypeStruct`` with a sharding) on one device."""
    sharding = getattr(x, "sharding", None)
    shape = sharding.shard_shape(x.shape) if sharding is not None else x.shape
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


__all__ = ["dtype_of", "is_float", "place", "place_leaf", "shard_nbytes"]
