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
are flat and are placed by the rules alone.) A step traced under that mesh (``jax.set_mesh(mesh)``:
:func:`expert_mesh`) also moves the tokens: each MoE block sends them to their experts' devices and back with
all-to-alls (:func:`lora_jax.models.moe.experts_glu_sharded`) instead of every device walking every token.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lora_jax import regex
from lora_jax.core import LoraAdapter
from lora_jax.errors import ArgumentError
from lora_jax.stacking import layer_axes
from lora_jax.targets import default_expert_axes
from lora_jax.tree import path_str, path_tuple

BATCH_AXES = ("data", "fsdp")
EXPERT_AXIS = "expert"
TENSOR_AXIS = "tensor"
Rule = tuple[str, Any]

LOGICAL_AXES = {
    "embed": "fsdp",
    "vocab": TENSOR_AXIS,
    "heads": TENSOR_AXIS,
    "kv_heads": TENSOR_AXIS,
    "mlp": TENSOR_AXIS,
    "experts": EXPERT_AXIS,
}
"""The one table from the logical axes that architectures declare for their kernels (``embed``, ``heads``, ...) to
mesh axes: the model width is split over ``fsdp`` (gathered before use), attention heads, MLP columns and the
vocabulary over ``tensor`` (each device computes its part: tensor parallelism), routed experts over ``expert``."""


def make_mesh(
    data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None, *, expert: int = 1, tensor: int = 1
) -> Mesh:
    """A ``(data, fsdp)`` mesh over ``devices`` (default: all), with an ``expert`` axis when ``expert > 1``
    (routed experts split over ``expert`` devices) and a ``tensor`` axis, last (neighbouring devices), when
    ``tensor > 1`` (heads, MLP columns and vocabulary split over ``tensor`` devices, which see the same
    examples). ``-1`` on data or fsdp takes the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if tensor < 1 or n % tensor:
        raise ArgumentError(f"mesh: tensor={tensor} must be a positive divisor of the {n} devices")
    n //= tensor
    if expert < 1 or n % expert:
        raise ArgumentError(
            f"mesh: expert={expert} must be a positive divisor of the {n * tensor} devices / tensor={tensor}"
        )
    n //= expert
    if data == -1 and fsdp == -1:
        raise ArgumentError("mesh: at most one of data/fsdp may be -1")
    if data == -1:
        if n % fsdp:
            raise ArgumentError(f"mesh: fsdp={fsdp} does not divide the {n * expert} devices / expert={expert}")
        data = n // fsdp
    if fsdp == -1:
        if n % data:
            raise ArgumentError(f"mesh: data={data} does not divide the {n * expert} devices / expert={expert}")
        fsdp = n // data
    if data * fsdp != n:
        raise ArgumentError(
            f"mesh: data={data} x fsdp={fsdp} x expert={expert} x tensor={tensor} = "
            f"{data * fsdp * expert * tensor} devices, but {n * expert * tensor} are available"
        )
    sizes = {"data": data, "fsdp": fsdp, EXPERT_AXIS: expert, TENSOR_AXIS: tensor}
    names = (*BATCH_AXES, *(a for a in (EXPERT_AXIS, TENSOR_AXIS) if sizes[a] > 1))
    return Mesh(np.asarray(devices).reshape(*(sizes[a] for a in names)), names)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes the example axis of a batch is split over: ``data``, ``fsdp`` and ``expert`` (the devices
    of a ``tensor`` group see the same examples)."""
    return tuple(a for a in (*BATCH_AXES, EXPERT_AXIS) if a in mesh.shape)


_ACTIVATIONS: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("activation_mesh", default=None)
ACTIVATION_AXES = {"heads": TENSOR_AXIS, "kv_heads": TENSOR_AXIS, "mlp": TENSOR_AXIS, "vocab": TENSOR_AXIS}


@contextlib.contextmanager
def activation_mesh(mesh: Mesh):
    """While a step is traced inside this block, :func:`constrain` pins the shared layers' activations to ``mesh``
    (batch over the batch axes, heads / MLP columns / vocabulary over ``tensor``)."""
    token = _ACTIVATIONS.set(mesh)
    try:
        yield mesh
    finally:
        _ACTIVATIONS.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``x`` with a sharding constraint from logical activation axis ``names`` (``"batch"``, ``"heads"``,
    ``"kv_heads"``, ``"mlp"``, ``"vocab"`` or ``None`` per axis) on the mesh of :func:`activation_mesh`; ``x`` itself
    outside that block or on a mesh without a ``tensor`` axis (FSDP alone needs no activation constraint). An axis
    that does not divide evenly is left unconstrained. Tensor parallelism needs this: without it XLA may gather a
    head-split activation whole before the output projection instead of reducing partial sums after it."""
    mesh = _ACTIVATIONS.get()
    if mesh is None or TENSOR_AXIS not in mesh.shape:
        return x
    spec = []
    for name, size in zip(names, x.shape):
        axes = batch_axes(mesh) if name == "batch" else (ACTIVATION_AXES.get(name),) if name else ()
        axes = tuple(a for a in axes if a is not None)
        n = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        spec.append((axes if len(axes) > 1 else axes[0]) if axes and size % n == 0 else None)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))


def logical_rules(axes: Sequence[tuple[str, Sequence[str | None]]], min_shard_size: int = 2**14) -> list[Rule]:
    """Sharding rules from an architecture's logical axes (``[(path regex, (logical name per axis)), ...]``,
    :attr:`lora_jax.models.arch.Architecture.logical_axes`), then the default rules for every other leaf."""
    return [(pattern, ("logical", tuple(names))) for pattern, names in axes] + default_rules(min_shard_size)


def logical_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
    """The ``PartitionSpec`` of a leaf whose axes have logical ``names``, through :data:`LOGICAL_AXES`: an axis is
    split over its mesh axis when the mesh has it and it divides the axis evenly, and left whole otherwise."""
    if len(names) != len(shape):
        raise ArgumentError(f"sharding: logical axes {tuple(names)} do not fit a leaf of shape {tuple(shape)}")
    spec = []
    for name, size in zip(names, shape):
        axis = LOGICAL_AXES.get(name) if name is not None else None
        ok = axis in mesh.shape and mesh.shape[axis] > 1 and size % mesh.shape[axis] == 0
        spec.append(axis if ok else None)
    return P(*spec)


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
    if layer_axes(path) and len(shape) > 1:  # a scanned stack: the layer axis stays whole, each layer as unrolled
        return P(None, *_spec_one(path, tuple(shape[1:]), mesh, rules))
    return _spec_one(path, shape, mesh, rules)


def _spec_one(path: str, shape: Sequence[int], mesh: Mesh, rules: Sequence[Rule]) -> P:
    pattern, spec = _rule_for(path, rules)
    n_exp = expert_size(mesh)
    if (
        n_exp > 1
        and default_expert_axes(path, len(shape))
        and shape[0] % n_exp == 0
        and spec is not None
        and not isinstance(spec, P)
        and spec != "replicate"
    ):
        rest = tuple(_rule_spec(pattern, spec, tuple(shape[1:]), mesh))  # the rule on one expert's kernel
        return P(EXPERT_AXIS, *rest)
    return _rule_spec(pattern, spec, shape, mesh)


def _rule_spec(pattern: str | None, spec: Any, shape: Sequence[int], mesh: Mesh) -> P:
    fsdp = mesh.shape["fsdp"]
    if isinstance(spec, tuple) and spec[0] == "logical":
        if TENSOR_AXIS not in mesh.shape:  # FSDP alone: the largest divisible axis, whatever its name
            return fsdp_spec(shape, fsdp) if int(np.prod(shape)) >= DEFAULT_MIN_SHARD_SIZE else P()
        return logical_spec(spec[1], shape, mesh)
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
    raise ArgumentError(f"sharding rule {pattern!r}: unknown spec {spec!r}")


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
    return dataclasses.replace(
        adapter,
        a=place(adapter.a, n_stack, entry_in),
        b=place(adapter.b, n_stack + 1, entry_out),
        magnitude=place(adapter.magnitude, 0, entry_out),
    )


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


# ------------------------------------------------------------------------------------ expert parallelism


def expert_mesh() -> Any:
    """The mesh that routed experts are dispatched over, or ``None``.

    That is the mesh set by ``jax.set_mesh(mesh)`` (an ``AbstractMesh`` while tracing), else the one of
    :func:`activation_mesh` (the training loop's), when it has an ``expert``
    axis of more than one device: a :class:`lora_jax.models.moe.SparseMoeBlock` traced under it sends each token
    to the devices holding its experts (all-to-all, :func:`lora_jax.models.moe.experts_glu_sharded`) instead of
    every device walking every token. Without such a mesh in context the experts run as on one device (their
    stacks may still be placed along ``expert``: then XLA partitions the single-device program)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        mesh = _ACTIVATIONS.get()  # the training loop traces its step inside activation_mesh(mesh)
    if mesh is None or mesh.shape.get(EXPERT_AXIS, 1) <= 1:
        return None
    return mesh


def token_axes(mesh: Any) -> tuple[str, ...]:
    """The mesh axes that the tokens entering an expert block are split over inside the expert dispatch: the
    batch axes (:func:`batch_axes`: ``data``, ``fsdp``, ``expert``) that ``mesh`` has."""
    return batch_axes(mesh)
