"""Meshes and partition rules for the base, the adapters, the optimizer state and the batch.

The mesh has two axes: ``data`` (replicas that see different examples) and ``fsdp`` (devices that each hold a
shard of the frozen base and also see different examples). The batch is split over both. Rules are data: a list
of ``(regex, spec)`` pairs matched in order against '/'-joined leaf paths, where ``spec`` is a
``PartitionSpec``, ``"fsdp"`` (shard the largest axis divisible by the fsdp size) or ``"replicate"``.

Default rules: leaves with at least ``min_shard_size`` elements are FSDP-sharded, everything else (biases,
norms) is replicated. A LoRA adapter follows its base kernel: the rules are applied to the kernel's path and
shape, and a factor that is at least as large as the rule's threshold is sharded along the base's matching
axis (``A``'s input axis when the base is sharded along its first input axis, ``B``'s output axis when it is
sharded along its first output axis); otherwise (the usual case: the factors are small) it is replicated.
Optimizer state follows its parameter: :func:`init_opt_state` runs ``tx.init`` with output shardings taken
from the parameters (a bare ``jax.jit(tx.init)`` does not do this: its zeros depend on no input, so they land
on one device).

Mixtures of experts: ``make_mesh(..., expert=n)`` adds a third axis ``expert`` (expert parallelism). A
routed-expert stack ``(E, d_in, d_out)`` (:func:`lora_jax.targets.default_expert_axes`) is split along ``E``
over it, each device holding ``E / n`` whole experts (its other axes follow the rule as before), and its
per-expert adapters ``a (E, d_in, r)`` / ``b (E, r, d_out)`` are split the same way, whatever their size, so an
expert's factors live with its kernel. The batch is split over every axis. (A quantised stack's stored arrays
are flat and are placed by the rules alone.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lora_jax import regex
from lora_jax.core import LoraAdapter
from lora_jax.targets import default_expert_axes
from lora_jax.tree import path_str, path_tuple

BATCH_AXES = ("data", "fsdp")
EXPERT_AXIS = "expert"
Rule = tuple[str, Any]


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None, *, expert: int = 1) -> Mesh:
    """A ``(data, fsdp)`` mesh over ``devices`` (default: all), or ``(data, fsdp, expert)`` with ``expert > 1``
    (routed experts split over ``expert`` devices). ``-1`` on data or fsdp takes the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if expert < 1 or n % expert:
        raise ValueError(f"mesh: expert={expert} must be a positive divisor of the {n} devices")
    n //= expert
    if data == -1 and fsdp == -1:
        raise ValueError("mesh: at most one of data/fsdp may be -1")
    if data == -1:
        if n % fsdp:
            raise ValueError(f"mesh: fsdp={fsdp} does not divide the {n * expert} devices / expert={expert}")
        data = n // fsdp
    if fsdp == -1:
        if n % data:
            raise ValueError(f"mesh: data={data} does not divide the {n * expert} devices / expert={expert}")
        fsdp = n // data
    if data * fsdp != n:
        raise ValueError(f"mesh: data={data} x fsdp={fsdp} x expert={expert} = {data * fsdp * expert} devices, but "
                         f"{n * expert} are available")
    if expert == 1:
        return Mesh(np.asarray(devices).reshape(data, fsdp), BATCH_AXES)
    return Mesh(np.asarray(devices).reshape(data, fsdp, expert), (*BATCH_AXES, EXPERT_AXIS))


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes the example axis of a batch is split over: all of them (``data``, ``fsdp``, ``expert``)."""
    return tuple(a for a in (*BATCH_AXES, EXPERT_AXIS) if a in mesh.shape)


def expert_size(mesh: Mesh) -> int:
    return mesh.shape.get(EXPERT_AXIS, 1)


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


DEFAULT_MIN_SHARD_SIZE = 2**14


def _rule_for(path: str, rules: Sequence[Rule]) -> Any:
    for pattern, spec in rules:
        if regex.compile(pattern, "sharding rule").fullmatch(path):  # RE2: a user's rule, linear time
            return pattern, spec
    return None, None


def spec_for(path: str, shape: Sequence[int], mesh: Mesh, rules: Sequence[Rule]) -> P:
    pattern, spec = _rule_for(path, rules)
    n_exp = expert_size(mesh)
    if n_exp > 1 and default_expert_axes(path, len(shape)) and shape[0] % n_exp == 0 and spec is not None \
            and not isinstance(spec, P) and spec != "replicate":
        rest = tuple(_rule_spec(pattern, spec, tuple(shape[1:]), mesh))  # the rule on one expert's kernel
        return P(EXPERT_AXIS, *rest)
    return _rule_spec(pattern, spec, shape, mesh)


def _rule_spec(pattern: str | None, spec: Any, shape: Sequence[int], mesh: Mesh) -> P:
    fsdp = mesh.shape["fsdp"]
    if spec is None:
        return P()
    if isinstance(spec, P):
        return spec
    if spec == "replicate":
        return P()
    if spec == "fsdp":
        return fsdp_spec(shape, fsdp)
    if isinstance(spec, tuple) and spec[0] == "fsdp-if-large":
        return fsdp_spec(shape, fsdp) if int(np.prod(shape)) >= spec[1] else P()
    raise ValueError(f"sharding rule {pattern!r}: unknown spec {spec!r}")


def _axis_size(mesh: Mesh, entry: Any) -> int:
    names = entry if isinstance(entry, tuple) else (entry,)
    return int(np.prod([mesh.shape[n] for n in names]))


def adapter_shardings(path: str, adapter: LoraAdapter, mesh: Mesh, rules: Sequence[Rule]) -> LoraAdapter:
    """Shardings for the arrays of one adapter (a :class:`LoraAdapter` whose array fields are
    ``NamedSharding``): the factors follow the spec that ``rules`` give the base kernel (``path``, the adapter's
    kernel shape). ``A`` (d_in, r) is sharded on its first axis when the base is sharded along its first input
    axis, ``B`` (r, d_out) and a DoRA magnitude (d_out,) on their output axis when the base is sharded along its
    first output axis, if the factor has at least the rule's ``min_shard_size`` elements (2**14 for rules without
    one) and the axis divides evenly; every other factor is replicated. A stacked adapter (per expert:
    ``a (E, d_in, r)``, ``b (E, r, d_out)``) splits its stack axes as the base splits its own, at any size."""
    base = tuple(spec_for(path, adapter.kernel_shape, mesh, rules))
    base = base + (None,) * (len(adapter.kernel_shape) - len(base))
    _, rule = _rule_for(path, rules)
    threshold = rule[1] if isinstance(rule, tuple) and rule[0] == "fsdp-if-large" else DEFAULT_MIN_SHARD_SIZE
    n_in = len(adapter.in_shape)
    n_stack = len(adapter.stack_shape)  # a stacked adapter (one per expert): its stack axes lead a, b and the base
    entry_in, entry_out = base[n_stack], base[n_in]

    def place(x: Any, axis: int, entry: Any) -> Any:
        if x is None:
            return None
        shape = np.shape(x)
        spec = [None] * len(shape)
        for i in range(n_stack):  # the stack axes follow the base's, whatever the factor's size
            if base[i] is not None and shape[i] % _axis_size(mesh, base[i]) == 0:
                spec[i] = base[i]
        if entry is not None and int(np.prod(shape)) >= threshold and shape[axis] % _axis_size(mesh, entry) == 0:
            spec[axis] = entry
        return NamedSharding(mesh, P(*spec) if any(e is not None for e in spec) else P())

    # Only the first input / output axis: flattening (in_shape) -> d_in keeps its blocks contiguous.
    return dataclasses.replace(adapter, a=place(adapter.a, n_stack, entry_in),
                               b=place(adapter.b, n_stack + 1, entry_out),
                               magnitude=place(adapter.magnitude, 0, entry_out))


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[Rule] | None = None) -> Any:
    """A tree of ``NamedSharding`` with the structure of ``tree`` (``None`` leaves stay ``None``).

    Every array is placed by ``rules`` on its own path and shape (the stored arrays of a quantised kernel too,
    e.g. ``layer/kernel/codes``), except the factors of a LoRA adapter, which follow their base kernel (see
    :func:`adapter_shardings`)."""
    rules = default_rules() if rules is None else rules

    def one(path, leaf):
        if isinstance(leaf, LoraAdapter):
            return adapter_shardings(path_str(path), leaf, mesh, rules)
        return NamedSharding(mesh, spec_for(path_str(path), np.shape(leaf), mesh, rules))

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=lambda x: isinstance(x, LoraAdapter))


def opt_state_shardings(state: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for an optimizer state (or its ``jax.eval_shape``): a state leaf whose key path ends with a
    parameter's key path and has that parameter's shape (Adam's ``mu/<path>``, ``nu/<path>``, the same inside
    ``multi_transform`` / ``masked`` states) takes the parameter's sharding; the rest (step counts) is
    replicated."""
    by_path = {}
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_shardings = jax.tree_util.tree_leaves(param_shardings)
    for (p, x), s in zip(flat_params, flat_shardings, strict=True):
        by_path[path_tuple(p)] = (tuple(np.shape(x)), s)
    longest = max((len(k) for k in by_path), default=0)

    def one(path, leaf):
        key = path_tuple(path)
        for n in range(min(len(key), longest), 0, -1):
            hit = by_path.get(key[-n:])
            if hit is not None and hit[0] == tuple(np.shape(leaf)):
                return hit[1]
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, state)


def init_opt_state(tx: Any, params: Any) -> Any:
    """``tx.init(params)`` with every moment placed like its parameter (see :func:`opt_state_shardings`).

    ``params`` must already be placed (``NamedSharding`` on one mesh). ``jax.jit(tx.init)(params)`` alone
    puts the state on one device: the zeros depend on no input, so jit prunes the inputs and with them the
    shardings. A step function then also compiles twice (its second call sees the placed outputs of the first).
    """
    shardings = [x.sharding for x in jax.tree_util.tree_leaves(params)]
    if not shardings or not all(isinstance(s, NamedSharding) for s in shardings):
        return jax.jit(tx.init)(params)
    mesh = shardings[0].mesh
    abstract = jax.eval_shape(tx.init, params)
    out = opt_state_shardings(abstract, params, jax.tree.map(lambda x: x.sharding, params), mesh)
    return jax.jit(tx.init, out_shardings=out)(params)


def replicated(tree: Any, mesh: Mesh) -> Any:
    return jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)


def batch_sharding(mesh: Mesh, ndim: int = 2, leading: int = 0) -> NamedSharding:
    """Shard axis ``leading`` (the example axis) over every mesh axis (:func:`batch_axes`)."""
    spec = [None] * ndim
    spec[leading] = batch_axes(mesh)
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
