"""Checks on tensors that come from a file this run did not write: dtype, shape and finiteness.

A PEFT adapter, a lora_jax adapter folder, a GGUF adapter or a merged checkpoint may come from anywhere; one NaN
or inf in it turns every output into NaN without an error (``train.predict`` printing probabilities
``[nan nan]`` with exit status 0). Every loader passes each tensor it reads through :func:`check_array` (or a
whole restored tree through :func:`check_tree`), which raises one error naming the file and the tensor:

    CheckpointError: adapter_model.safetensors: tensor 'base_model.model.x.lora_B.weight' holds 3 NaN and 1 inf
    of 4096 values (first at index (0, 5)); a file with non-finite weights gives NaN outputs

The same check guards writers (:func:`lora_jax.save_peft` refuses non-finite adapters).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.errors import CheckpointError, LoraJaxError
from lora_jax.tree import path_str


def _is_float(dtype: Any) -> bool:
    return jnp.issubdtype(dtype, jnp.floating)


def _host(x: Any) -> np.ndarray | None:
    """``x`` as a host array, or ``None`` for an array spread over other processes (checked on device)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return None
    return np.asarray(x)


def nonfinite_summary(x: Any) -> str | None:
    """``None`` when every value of the floating array ``x`` is finite, else e.g. ``"3 NaN and 1 inf of 4096
    values (first at index (0, 5))"``."""
    host = _host(x)
    if host is None:  # a global array: count on device
        nans, infs = (int(v) for v in jax.jit(lambda v: (jnp.isnan(v).sum(), jnp.isinf(v).sum()))(x))
        return None if nans + infs == 0 else f"{nans} NaN and {infs} inf of {x.size} values"
    finite = np.isfinite(host)
    if finite.all():
        return None
    nans = int(np.isnan(host).sum())
    first = tuple(int(i) for i in np.argwhere(~finite)[0])
    return (
        f"{nans} NaN and {int((~finite).sum()) - nans} inf of {host.size} values (first at index "
        f"{first if len(first) != 1 else first[0]})"
    )


def check_array(
    x: Any, name: str, source: str, *, shape: Sequence[int] | None = None, error: type[LoraJaxError] = CheckpointError
) -> Any:
    """``x`` unchanged when it is a floating-point array (of ``shape``, when given) whose values are all finite;
    else ``error`` naming ``source`` (the file) and ``name`` (the tensor) and saying what was expected."""
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise error(f"{source}: tensor {name!r} is a {type(x).__name__}, expected an array")
    if not _is_float(x.dtype):
        raise error(f"{source}: tensor {name!r} has dtype {x.dtype}, expected a floating-point tensor")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise error(f"{source}: tensor {name!r} has shape {tuple(x.shape)}, expected {tuple(shape)}")
    bad = nonfinite_summary(x)
    if bad is not None:
        raise error(f"{source}: tensor {name!r} holds {bad}; a file with non-finite weights gives NaN outputs")
    return x


def check_number(value: Any, name: str, source: str, error: type[LoraJaxError] = CheckpointError) -> float:
    """``value`` as a float when it is a finite real number (not a bool), else ``error`` naming it."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if not ok or not np.isfinite(float(value)):
        raise error(f"{source}: {name} must be a finite number, got {value!r:.60}")
    return float(value)


def check_tree(tree: Any, source: str, *, error: type[LoraJaxError] = CheckpointError, is_leaf=None) -> Any:
    """``tree`` unchanged when every floating-point leaf is finite, else ``error`` naming the first bad leaf by
    its '/'-joined path (``attention/kernel/b``). Integer leaves (a step counter) are not checked."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]:
        if hasattr(leaf, "dtype") and _is_float(leaf.dtype):
            bad = nonfinite_summary(leaf)
            if bad is not None:
                raise error(
                    f"{source}: tensor {path_str(path)!r} holds {bad}; a file with non-finite weights gives NaN outputs"
                )
    return tree


__all__ = ["check_array", "check_number", "check_tree", "nonfinite_summary"]
