"""Meshes and partition rules for the base, the adapters, the optimizer state and the batch.

The mesh has two axes: ``data`` (replicas that see different examples) and ``fsdp`` (devices that each hold a
shard of the frozen base and also see different examples). The batch is split over both. Rules are data: a list
of ``(regex, spec)`` pairs matched in order against '/'-joined leaf paths, where ``spec`` is a
``PartitionSpec``, ``"fsdp"`` (shard the largest axis divisible by the fsdp size) or ``"replicate"``.

Default rules: leaves with at least ``min_shard_size`` elements are FSDP-sharded, everything else (biases,
norms, LoRA factors) is replicated. Optimizer state follows its parameter: initialise it with
``jax.jit(tx.init)`` on the placed parameters and the moments inherit each parameter's sharding.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lora_jax.targets import leaf_paths

BATCH_AXES = ("data", "fsdp")
Rule = tuple[str, Any]


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp)`` mesh over ``devices`` (default: all). ``-1`` on one axis takes the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if data == -1 and fsdp == -1:
        raise ValueError("mesh: at most one of data/fsdp may be -1")
    if data == -1:
        if n % fsdp:
            raise ValueError(f"mesh: fsdp={fsdp} does not divide the {n} devices")
        data = n // fsdp
    if fsdp == -1:
        if n % data:
            raise ValueError(f"mesh: data={data} does not divide the {n} devices")
        fsdp = n // data
    if data * fsdp != n:
        raise ValueError(f"mesh: data={data} x fsdp={fsdp} = {data * fsdp} devices, but {n} are available")
    return Mesh(np.asarray(devices).reshape(data, fsdp), BATCH_AXES)


def fsdp_spec(shape: Sequence[int], fsdp_size: int) -> P:
    """Shard the largest axis that ``fsdp_size`` divides; replicate if none does."""
    if fsdp_size <= 1:
        return P()
    order = sorted(range(len(shape)), key=lambda i: -shape[i])
    for i in order:
        if shape[i] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[i] = "fsdp"
            return P(*spec)
    return P()


def default_rules(min_shard_size: int = 2**14) -> list[Rule]:
    return [(".*", ("fsdp-if-large", min_shard_size))]


def spec_for(path: str, shape: Sequence[int], mesh: Mesh, rules: Sequence[Rule]) -> P:
    fsdp = mesh.shape["fsdp"]
    for pattern, spec in rules:
        if re.fullmatch(pattern, path):
            if isinstance(spec, P):
                return spec
            if spec == "replicate":
                return P()
            if spec == "fsdp":
                return fsdp_spec(shape, fsdp)
            if isinstance(spec, tuple) and spec[0] == "fsdp-if-large":
                return fsdp_spec(shape, fsdp) if int(np.prod(shape)) >= spec[1] else P()
            raise ValueError(f"sharding rule {pattern!r}: unknown spec {spec!r}")
    return P()


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[Rule] | None = None) -> Any:
    """A tree of ``NamedSharding`` with the structure of ``tree`` (``None`` leaves stay ``None``)."""
    rules = default_rules() if rules is None else rules
    paths = iter(leaf_paths(tree))

    def one(leaf):
        path, _ = next(paths)
        return NamedSharding(mesh, spec_for(path, np.shape(leaf), mesh, rules))

    return jax.tree.map(one, tree)


def replicated(tree: Any, mesh: Mesh) -> Any:
    return jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)


def batch_sharding(mesh: Mesh, ndim: int = 2, leading: int = 0) -> NamedSharding:
    """Shard axis ``leading`` (the example axis) over both mesh axes."""
    spec = [None] * ndim
    spec[leading] = BATCH_AXES
    return NamedSharding(mesh, P(*spec))


def host_to_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Place a host array that every process holds in full (a batch computed identically everywhere) as a global
    array: each process contributes only the rows its own devices hold (``make_array_from_process_local_data``)."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    index_map = sharding.addressable_devices_indices_map(x.shape)
    # The rows this process holds along every axis: the span of its devices' slices (contiguous by construction:
    # the mesh lists each process's devices together).
    block = []
    for axis in range(x.ndim):
        starts = [idx[axis].start or 0 for idx in index_map.values()]
        stops = [x.shape[axis] if idx[axis].stop is None else idx[axis].stop for idx in index_map.values()]
        block.append(slice(min(starts), max(stops)))
    return jax.make_array_from_process_local_data(sharding, np.asarray(x[tuple(block)]), x.shape)


def put_tree(tree: Any, shardings: Any) -> Any:
    """``jax.device_put`` for trees whose values every process holds in full (loaded from the same checkpoint)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    return jax.tree.map(lambda x, s: host_to_global(np.asarray(x), s), tree, shardings)


def global_to_host(x: jax.Array) -> np.ndarray:
    """The full value of a (possibly multi-process) global array on every process."""
    if jax.process_count() == 1 or getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
