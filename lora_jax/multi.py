"""Many adapters on one base: a named registry, weighted combinations, and mixed-adapter batches.

Three tools, each a small set of pure functions over adapter trees (the base parameters are never copied):

- :class:`AdapterSet`: named adapters with one active (``add`` / ``activate`` / ``delete`` / ``enable`` /
  ``disable``); ``wrap`` / ``merge`` use the active one. Immutable: every method returns a new set.
- :func:`weighted_adapter`: one adapter from a weighted sum of several, as PEFT's ``add_weighted_adapter``:
  ``"linear"`` (equal ranks; weighted sum of the factors), ``"cat"`` (ranks concatenated; exactly
  ``sum_i w_i dW_i``) and ``"svd"`` (``sum_i w_i dW_i`` re-factorised to a target rank).
- Mixed-adapter batches: :func:`stack_adapters` stacks ``n`` adapters per kernel along a new axis (ranks
  zero-padded to a common maximum); :func:`wrap_mixed` puts :class:`MultiLoraWeight` nodes in the params so that
  row ``i`` of the batch runs with adapter ``ids[i]`` (``-1``: the base model alone). The project's models
  run it unchanged: :mod:`lora_jax.ops` hands a ``MultiLoraWeight`` its own product, which gathers each row's
  factors and runs two batched matmuls through the rank bottleneck (no loop over adapters). Any other model
  (stock Flax layers, NNX) runs it through :func:`lora_jax.transform`:
  ``lora.transform(lambda p, x: model.apply({"params": p}, x))(lora.wrap_mixed(params, stacked, ids), x)``.
  Adapter values, scales and ids are arrays, so a compiled step serves any ids and any set of same-shaped adapters;
  :func:`load_slot` hot-swaps one adapter (of the same or a smaller rank) without recompiling.

    stacked = lora.stack_adapters([ad_a, ad_b, ad_c])                 # slots 0, 1, 2
    step = jax.jit(lambda p, s, ids, x: model.apply({"params": lora.wrap_mixed(p, s, ids)}, x))
    logits = step(params, stacked, jnp.array([0, 2, -1, 1]), tokens)  # row i uses adapter ids[i]
    stacked = lora.load_slot(stacked, 1, ad_d)                        # same compiled step
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import core, ops, stacking
from lora_jax import targets as _targets
from lora_jax.core import LoraAdapter
from lora_jax.errors import ArgumentError, NotFoundError, UnsupportedError
from lora_jax.tree import unflatten

PyTree = Any
Array = jax.Array


def _no_dora(path: str, ad: LoraAdapter, what: str) -> None:
    if getattr(ad, "magnitude", None) is not None:
        raise UnsupportedError(
            f"{what}: {path} is a DoRA adapter (it has a magnitude); {what} supports plain LoRA adapters only"
        )


def _items(tree: PyTree, what: str) -> dict[str, LoraAdapter]:
    items = dict(core.adapter_items(tree))
    if not items:
        raise ArgumentError(f"{what}: an adapter tree holds no LoraAdapter")
    layered = [p for p in items if stacking.layer_axes(p)]
    if layered:  # slots would stack on the layer axis: refused by name, not a shape error further on
        raise stacking.unsupported(f"{what} on adapters of a scanned model ({layered[0]}: one adapter per layer)")
    return items


def _tree(items: Mapping[str, Any]) -> dict:
    return unflatten(items)


# -------------------------------------------------------------------------------------------- registry


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class AdapterSet:
    """Named adapter trees for one base model, one of them active.

    ``names``: the names in insertion order; ``trees``: their adapter trees; ``active``: the active name (or
    ``None``); ``enabled``: ``False`` runs the base model whatever is active (PEFT's ``disable_adapter``).
    A pytree (the trees are its children), so it passes through ``jax.jit``.
    """

    names: tuple[str, ...] = ()
    trees: tuple[PyTree, ...] = ()
    active: str | None = None
    enabled: bool = True

    def __post_init__(self):
        if len(self.names) != len(self.trees) or len(set(self.names)) != len(self.names):
            raise ArgumentError(f"AdapterSet: names {self.names} must be unique and match the {len(self.trees)} trees")
        if self.active is not None and self.active not in self.names:
            raise ArgumentError(f"AdapterSet: active adapter {self.active!r} is not one of {list(self.names)}")

    # pytree protocol
    def tree_flatten(self):
        return self.trees, (self.names, self.active, self.enabled)

    @classmethod
    def tree_unflatten(cls, aux, trees):
        names, active, enabled = aux
        return cls(names, tuple(trees), active, enabled)

    # lookup
    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, name: str) -> PyTree:
        return self.trees[self._index(name)]

    def _index(self, name: str) -> int:
        if name not in self.names:
            raise NotFoundError(f"no adapter named {name!r}; the set holds {list(self.names)}")
        return self.names.index(name)

    # edits (each returns a new set)
    def add(self, name: str, adapters: PyTree, *, activate: bool = False, overwrite: bool = False) -> AdapterSet:
        """Add (or with ``overwrite``, replace) the adapter tree ``adapters`` under ``name``."""
        if not isinstance(name, str) or not name:
            raise ArgumentError(f"adapter names must be non-empty strings, got {name!r}")
        _items(adapters, f"AdapterSet.add({name!r})")
        if name in self.names:
            if not overwrite:
                raise ArgumentError(f"an adapter named {name!r} exists; delete it first or pass overwrite=True")
            trees = list(self.trees)
            trees[self._index(name)] = adapters
            new = dataclasses.replace(self, trees=tuple(trees))
        else:
            new = dataclasses.replace(self, names=self.names + (name,), trees=self.trees + (adapters,))
        return new.activate(name) if activate else new

    def activate(self, name: str | None) -> AdapterSet:
        """Make ``name`` the active adapter (``None``: none)."""
        if name is not None:
            self._index(name)
        return dataclasses.replace(self, active=name)

    def delete(self, name: str) -> AdapterSet:
        """Remove ``name``; deleting the active adapter leaves none active."""
        i = self._index(name)
        return dataclasses.replace(
            self,
            names=self.names[:i] + self.names[i + 1 :],
            trees=self.trees[:i] + self.trees[i + 1 :],
            active=None if self.active == name else self.active,
        )

    def enable(self) -> AdapterSet:
        return dataclasses.replace(self, enabled=True)

    def disable(self) -> AdapterSet:
        """Run the base model (the active adapter stays selected for :meth:`enable`)."""
        return dataclasses.replace(self, enabled=False)

    def add_weighted(
        self,
        name: str,
        sources: Sequence[str],
        weights: Sequence[float],
        combination: str = "svd",
        rank: int | None = None,
        *,
        activate: bool = False,
    ) -> AdapterSet:
        """Add ``weighted_adapter([self[s] for s in sources], weights, combination, rank)`` as ``name``."""
        combined = weighted_adapter([self[s] for s in sources], weights, combination, rank)
        return self.add(name, combined, activate=activate)

    # use
    @property
    def current(self) -> PyTree | None:
        """The adapter tree in use: the active one, or ``None`` when disabled or none is active."""
        return self[self.active] if self.enabled and self.active is not None else None

    def wrap(self, params: PyTree, *, dropout_key: Array | None = None) -> PyTree:
        """:func:`lora_jax.wrap` with the current adapter; ``params`` itself when there is none."""
        current = self.current
        return params if current is None else core.wrap(params, current, dropout_key=dropout_key)

    def merge(self, params: PyTree) -> PyTree:
        """:func:`lora_jax.merge` with the current adapter; ``params`` itself when there is none."""
        current = self.current
        return params if current is None else core.merge(params, current)

    def stack(self, names: Sequence[str] | None = None, *, rank: int | None = None, slots: int | None = None) -> PyTree:
        """:func:`stack_adapters` of ``names`` (default: all, in order): slot ``i`` holds ``names[i]``."""
        names = list(self.names if names is None else names)
        return stack_adapters([self[n] for n in names], rank=rank, slots=slots)


def row_ids(rows: Sequence[str | None], slots: Sequence[str]) -> np.ndarray:
    """Per-row adapter ids for :func:`wrap_mixed`: the slot of each row's adapter name, ``-1`` for ``None``
    (base model). ``(B,)`` int32."""
    index = {n: i for i, n in enumerate(slots)}
    missing = sorted({r for r in rows if r is not None and r not in index})
    if missing:
        raise NotFoundError(f"rows name adapters {missing} that are in no slot; slots: {list(slots)}")
    return np.asarray([-1 if r is None else index[r] for r in rows], np.int32)


# -------------------------------------------------------------------------------- weighted combinations

COMBINATIONS = ("linear", "cat", "svd")


def _combine_linear(path: str, ads: list[LoraAdapter], ws: list[float]) -> LoraAdapter:
    ranks = {ad.r for ad in ads}
    if len(ranks) != 1:
        raise ArgumentError(
            f"weighted_adapter 'linear': {path} has adapters of ranks {sorted(ranks)}; linear needs "
            "equal ranks (use 'cat' or 'svd')"
        )
    # PEFT's definition: sqrt(|w * scale|) on both factors, the sign of w * scale on A.
    a = sum(
        math.copysign(math.sqrt(abs(w * ad.scale)), w * ad.scale) * ad.a.astype(jnp.float32) for ad, w in zip(ads, ws)
    )
    b = sum(math.sqrt(abs(w * ad.scale)) * ad.b.astype(jnp.float32) for ad, w in zip(ads, ws))
    return _like(ads[0], a, b)


def _combine_cat(path: str, ads: list[LoraAdapter], ws: list[float]) -> LoraAdapter:
    a = jnp.concatenate([(w * ad.scale) * ad.a.astype(jnp.float32) for ad, w in zip(ads, ws)], axis=1)
    b = jnp.concatenate([ad.b.astype(jnp.float32) for ad in ads], axis=0)
    return _like(ads[0], a, b)


def _combine_svd(path: str, ads: list[LoraAdapter], ws: list[float], rank: int | None) -> LoraAdapter:
    d_in, d_out = ads[0].a.shape[0], ads[0].b.shape[1]
    k = rank if rank is not None else max(ad.r for ad in ads)
    k = min(k, d_in, d_out)
    dw = sum(w * ad.scale * (ad.a.astype(jnp.float32) @ ad.b.astype(jnp.float32)) for ad, w in zip(ads, ws))
    u, s, vh = jnp.linalg.svd(dw, full_matrices=False)
    root = jnp.sqrt(s[:k])
    return _like(ads[0], u[:, :k] * root, root[:, None] * vh[:k])


def _like(template: LoraAdapter, a: Array, b: Array) -> LoraAdapter:
    """An adapter with factors ``a``, ``b`` and scale 1 (alpha = r), on ``template``'s kernel."""
    r = a.shape[1]
    return dataclasses.replace(
        template, a=a.astype(template.a.dtype), b=b.astype(template.b.dtype), alpha=float(r), scale=1.0
    )


def weighted_adapter(
    adapters: Sequence[PyTree], weights: Sequence[float], combination: str = "svd", rank: int | None = None
) -> PyTree:
    """One adapter tree from a weighted combination of ``adapters`` (PEFT's ``add_weighted_adapter``).

    For each kernel, with ``dW_i = scale_i * A_i @ B_i`` and weights ``w_i``:

    - ``"linear"``: ``A = sum_i sign(w_i s_i) sqrt(|w_i s_i|) A_i``, ``B = sum_i sqrt(|w_i s_i|) B_i`` (equal
      ranks). Not ``sum_i w_i dW_i`` in general (cross terms ``A_i B_j``): it is PEFT's definition, exact when the
      adapters share their ``A`` or ``B`` subspace;
    - ``"cat"``: ``A = [w_1 s_1 A_1, w_2 s_2 A_2, ...]`` along the rank, ``B = [B_1; B_2; ...]``: exactly
      ``sum_i w_i dW_i`` at rank ``sum_i r_i``;
    - ``"svd"``: the best rank-``rank`` approximation of ``sum_i w_i dW_i`` (truncated SVD, singular values split
      evenly between ``A`` and ``B``); ``rank`` defaults to the largest input rank; exact when ``rank`` reaches
      the rank of the sum.

    Kernels that only some adapters adapt combine over those. The result has ``scale = 1`` (``alpha = r``).
    """
    if combination not in COMBINATIONS:
        raise ArgumentError(f"combination must be one of {COMBINATIONS}, got {combination!r}")
    if len(adapters) != len(weights) or not adapters:
        raise ArgumentError(
            f"weighted_adapter needs one weight per adapter, got {len(adapters)} adapters and {len(weights)} weights"
        )
    if rank is not None and combination != "svd":
        raise ArgumentError(f"rank is the target of 'svd'; {combination!r} sets the rank itself")
    items = [_items(t, "weighted_adapter") for t in adapters]
    paths = list(dict.fromkeys(p for it in items for p in it))
    out = {}
    for path in paths:
        present = [(it[path], float(w)) for it, w in zip(items, weights) if path in it]
        ads, ws = [ad for ad, _ in present], [w for _, w in present]
        shapes = {ad.kernel_shape for ad in ads}
        if len(shapes) != 1:
            raise ArgumentError(f"weighted_adapter: {path} has adapters for kernels of shapes {sorted(shapes)}")
        for ad in ads:
            _no_dora(path, ad, "weighted_adapter")
        if combination == "linear":
            out[path] = _combine_linear(path, ads, ws)
        elif combination == "cat":
            out[path] = _combine_cat(path, ads, ws)
        else:
            out[path] = _combine_svd(path, ads, ws, rank)
    return _tree(out)


# ------------------------------------------------------------------------------------ mixed-adapter batches


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StackedAdapter:
    """The adapters of ``n`` slots for one kernel, ranks zero-padded to ``R``.

    Attributes:
      a: ``(n, prod(in_shape), R)``; b: ``(n, R, prod(out_shape))``; scale: ``(n,)`` float32 (an array, so
      loading adapters with other alphas does not recompile; 0 for a slot that does not adapt this kernel).
      in_shape, out_shape: the kernel's axes (static).
    """

    a: Array
    b: Array
    scale: Array
    in_shape: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))
    out_shape: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))

    @property
    def slots(self) -> int:
        return self.a.shape[0]

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return (*self.in_shape, *self.out_shape)

    def __repr__(self) -> str:
        return f"StackedAdapter(slots={self.slots}, rank={self.rank}, kernel={self.kernel_shape})"


def is_stacked(x: Any) -> bool:
    return isinstance(x, StackedAdapter)


def _stacked_items(stacked: PyTree) -> dict[str, StackedAdapter]:
    flat, _ = jax.tree_util.tree_flatten_with_path(stacked, is_leaf=is_stacked)
    items = {"/".join(_targets.path_tuple(p)): leaf for p, leaf in flat}
    bad = [p for p, leaf in items.items() if not is_stacked(leaf)]
    if bad or not items:
        raise ArgumentError(f"expected a tree of StackedAdapter (from stack_adapters), found other leaves at {bad[:3]}")
    return items


def _pad(ad: LoraAdapter, rank: int, path: str, dtype) -> tuple[Array, Array]:
    if ad.r > rank:
        raise ArgumentError(f"{path}: adapter rank {ad.r} exceeds the stack's rank {rank}; stack with rank >= {ad.r}")
    pad = rank - ad.r
    return (jnp.pad(ad.a.astype(dtype), ((0, 0), (0, pad))), jnp.pad(ad.b.astype(dtype), ((0, pad), (0, 0))))


def _concrete(ads: Sequence[LoraAdapter | None]) -> bool:
    return all(
        isinstance(x, (np.ndarray, jax.Array)) and not isinstance(x, jax.core.Tracer)
        for ad in ads
        if ad is not None
        for x in (ad.a, ad.b)
    )


def _stack_one(path: str, ads: Sequence[LoraAdapter | None], rank: int, slots: int, dtype) -> StackedAdapter:
    """The :class:`StackedAdapter` of one kernel; slots past ``len(ads)`` and ``None`` entries are empty."""
    present = [ad for ad in ads if ad is not None]
    for ad in present:
        _no_dora(path, ad, "stack_adapters")
        if ad.r > rank:
            raise ArgumentError(f"{path}: adapter rank {ad.r} exceeds the stack's rank {rank}")
    layouts = {(ad.in_shape, ad.out_shape) for ad in present}
    if len(layouts) != 1:
        raise ArgumentError(f"stack_adapters: {path} has adapters for different kernel layouts {sorted(layouts)}")
    in_shape, out_shape = layouts.pop()
    d_in, d_out = math.prod(in_shape), math.prod(out_shape)
    scale = np.asarray([0.0 if ad is None else ad.scale for ad in ads] + [0.0] * (slots - len(ads)), np.float32)
    if _concrete(ads):  # host-side assembly: one transfer per array instead of a scatter per slot
        a = np.zeros((slots, d_in, rank), dtype)
        b = np.zeros((slots, rank, d_out), dtype)
        for i, ad in enumerate(ads):
            if ad is not None:
                a[i, :, : ad.r] = np.asarray(ad.a, dtype)
                b[i, : ad.r] = np.asarray(ad.b, dtype)
    else:
        zeros = (jnp.zeros((d_in, rank), dtype), jnp.zeros((rank, d_out), dtype))
        pairs = [zeros if ad is None else _pad(ad, rank, path, dtype) for ad in ads]
        pairs += [zeros] * (slots - len(ads))
        a, b = jnp.stack([p[0] for p in pairs]), jnp.stack([p[1] for p in pairs])
    return StackedAdapter(jnp.asarray(a), jnp.asarray(b), jnp.asarray(scale), in_shape, out_shape)


def stack_adapters(
    adapters: Sequence[PyTree], *, rank: int | None = None, slots: int | None = None, dtype=None
) -> PyTree:
    """Stack adapter trees slot by slot for mixed-adapter batches.

    Args:
      adapters: ``n`` adapter trees on the same base (they may adapt different kernels; a slot that lacks a
        kernel leaves it unchanged).
      rank: the common rank ``R`` (default: the largest); smaller adapters are zero-padded, which changes
        nothing in their product.
      slots: total number of slots (default ``n``); slots past ``n`` start empty (base model), for adapters
        loaded later with :func:`load_slot`.
      dtype: dtype of the stacked factors (default: the first adapter's).

    Returns:
      A nested dict over the union of the adapted kernels with a :class:`StackedAdapter` per kernel.
    """
    items = [_items(t, "stack_adapters") for t in adapters]
    slots = len(items) if slots is None else slots
    if slots < len(items):
        raise ArgumentError(f"stack_adapters: {len(items)} adapters do not fit in {slots} slots")
    rank = rank if rank is not None else max(ad.r for it in items for ad in it.values())
    paths = list(dict.fromkeys(p for it in items for p in it))
    first = next(iter(items[0].values()))
    dt = np.dtype(dtype if dtype is not None else first.a.dtype)
    return _tree({p: _stack_one(p, [it.get(p) for it in items], rank, slots, dt) for p in paths})


def load_slot(stacked: PyTree, slot: int, adapters: PyTree | None) -> PyTree:
    """``stacked`` with slot ``slot`` holding ``adapters`` (``None``: emptied). Shapes stay the same, so a step
    compiled for ``stacked`` runs the result without recompiling. The adapter's rank may be at most the
    stack's (it is zero-padded); kernels it does not adapt are cleared in that slot; a kernel outside the stack
    raises (that would change the compiled structure). Jit-able (``slot`` may then be a traced int): a server
    compiles it once per adapter shape."""
    items = {} if adapters is None else _items(adapters, "load_slot")
    stacked_items = _stacked_items(stacked)
    extra = sorted(set(items) - set(stacked_items))
    if extra:
        raise ArgumentError(
            f"load_slot: the adapter adapts {extra[:5]}, which the stack does not hold; stack those "
            "kernels from the start (a new kernel changes the compiled structure)"
        )
    out = {}
    for path, st in stacked_items.items():
        if isinstance(slot, (int, np.integer)) and not 0 <= slot < st.slots:
            raise ArgumentError(f"load_slot: slot {slot} is outside the stack's {st.slots} slots")
        ad = items.get(path)
        if ad is None:
            a, b, s = jnp.zeros_like(st.a[0]), jnp.zeros_like(st.b[0]), 0.0
        else:
            _no_dora(path, ad, "load_slot")
            if (ad.in_shape, ad.out_shape) != (st.in_shape, st.out_shape):
                raise ArgumentError(
                    f"load_slot: {path} adapts a kernel {ad.kernel_shape}, the stack holds {st.kernel_shape}"
                )
            (a, b), s = _pad(ad, st.rank, path, st.a.dtype), ad.scale
        out[path] = dataclasses.replace(
            st, a=st.a.at[slot].set(a), b=st.b.at[slot].set(b), scale=st.scale.at[slot].set(s)
        )
    return _tree(out)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MultiLoraWeight(core.WrappedKernel):
    """A frozen kernel with ``n`` stacked adapters, row ``i`` of the batch using adapter ``ids[i]``.

    :func:`lora_jax.ops.dot` / :func:`~lora_jax.ops.einsum` / :func:`~lora_jax.ops.embed` on it compute, for
    each batch row ``i`` (the activations' leading axis) with ``k = ids[i]``,
    ``x_i @ base + ((x_i @ A[k]) @ B[k]) * scale[k]``, and just ``x_i @ base`` for ``k = -1``.
    """

    base: Array
    stacked: StackedAdapter
    ids: Array

    def __repr__(self) -> str:
        return f"MultiLoraWeight(base={core.describe(self.base)}, stacked={self.stacked!r}, rows={self.ids.shape})"

    # the per-row factors
    def _rows(self, x_rows: int, dtype) -> tuple[Array, Array, Array]:
        """``A (B, d_in, R)``, ``B (B, R, d_out)`` and ``scale (B,)`` of each row, in ``dtype``."""
        if self.ids.ndim != 1 or self.ids.shape[0] != x_rows:
            raise ArgumentError(
                f"mixed-adapter batch: {self.ids.shape} adapter ids for a batch of {x_rows} rows; pass "
                "one id per row (the activations' leading axis)"
            )
        st = self.stacked
        ids = self.ids.astype(jnp.int32)
        k = jnp.clip(ids, 0, st.slots - 1)
        scale = jnp.where(ids >= 0, st.scale[k], 0.0).astype(dtype)
        return st.a[k].astype(dtype), st.b[k].astype(dtype), scale

    # the lora_jax.ops protocol
    def lora_astype(self, dtype) -> MultiLoraWeight:
        return dataclasses.replace(self, base=ops.astype(self.base, dtype))

    def lora_dot(self, x: Array, axes: int = 1, *, precision=None) -> Array:
        st = self.stacked
        if len(st.in_shape) != axes or tuple(x.shape[x.ndim - axes :]) != st.in_shape:
            raise ArgumentError(
                f"mixed lora dot: input of shape {tuple(x.shape)} contracting {axes} axes does not fit "
                f"adapters whose kernel inputs are {st.in_shape} (kernel {st.kernel_shape})"
            )
        y = ops.dot(x, self.base, axes, precision=precision)  # the base may be quantised (lora_jax.quant)
        a, b, scale = self._rows(x.shape[0], y.dtype)
        batch = x.shape[: x.ndim - axes]
        h = x.reshape(batch[0], -1, math.prod(st.in_shape))  # (B, T, d_in)
        h = jnp.matmul(h, a, precision=precision)  # (B, T, R)
        h = jnp.matmul(h * scale[:, None, None], b, precision=precision)  # (B, T, d_out)
        return y + h.reshape(*batch, *st.out_shape)

    def lora_einsum(self, subscripts: str, x: Array, *, precision=None) -> Array:
        xs, ws, out = ops.parse_subscripts(subscripts)
        st = self.stacked
        n_in = len(st.in_shape)
        row = xs[:1]
        if "." in xs + ws or len(ws) != self.ndim or not row or row not in out or row in ws:
            raise ArgumentError(
                f"mixed lora einsum {subscripts!r}: x's first index must be the batch row (kept in the "
                "output, not in the weight) and every axis must be named"
            )
        w_in, w_out = ws[:n_in], ws[n_in:]
        if any(c not in xs or c in out for c in w_in) or any(c in xs or c not in out for c in w_out):
            raise ArgumentError(
                f"mixed lora einsum {subscripts!r}: the kernel's input axes {w_in!r} must be "
                f"contracted with x and its output axes {w_out!r} kept"
            )
        y = ops.einsum(subscripts, x, self.base, precision=precision)
        a, b, scale = self._rows(x.shape[0], y.dtype)
        rank = next(c for c in "ZYXWVUTSRQPONMLKJIHGFEDCBA" if c not in subscripts)
        kept = "".join(c for c in xs if c in out)
        a = a.reshape(a.shape[0], *st.in_shape, st.rank)
        b = b.reshape(b.shape[0], st.rank, *st.out_shape)
        h = jnp.einsum(f"{xs},{row}{w_in}{rank}->{kept}{rank}", x, a, precision=precision)
        h = h * scale.reshape(-1, *([1] * (h.ndim - 1)))
        return y + jnp.einsum(f"{kept}{rank},{row}{rank}{w_out}->{out}", h, b, precision=precision)

    def lora_embed(self, tokens: Array) -> Array:
        y = ops.embed(tokens, self.base)
        st = self.stacked
        ids = self.ids.astype(jnp.int32)
        if ids.ndim != 1 or ids.shape[0] != tokens.shape[0]:
            raise ArgumentError(f"mixed-adapter batch: {ids.shape} adapter ids for token ids of shape {tokens.shape}")
        k = jnp.clip(ids, 0, st.slots - 1).reshape(-1, *([1] * (tokens.ndim - 1)))
        h = st.a[k, tokens].astype(y.dtype)  # (B, ..., R)
        h = jnp.einsum("b...r,brd->b...d", h, st.b[k.reshape(-1)].astype(y.dtype))
        scale = jnp.where(ids >= 0, st.scale[k.reshape(-1)], 0.0).astype(y.dtype)
        return y + h * scale.reshape(-1, *([1] * (h.ndim - 1)))


def wrap_mixed(params: PyTree, stacked: PyTree, ids: Array) -> PyTree:
    """``params`` with each stacked kernel replaced by a :class:`MultiLoraWeight`: row ``i`` of the batch runs
    with slot ``ids[i]`` (``(B,)`` int, ``-1``: base model). Call inside ``jax.jit``; the ids are data."""
    ids = jnp.asarray(ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ArgumentError(f"ids must be a (batch,) integer array, got {ids.dtype}{list(ids.shape)}")
    stacked_items = _stacked_items(stacked)
    used = set()

    def visit(path, leaf):
        key = "/".join(_targets.path_tuple(path))
        st = stacked_items.get(key)
        if st is None:
            return leaf
        if not hasattr(leaf, "shape") or core.is_lora_weight(leaf) or isinstance(leaf, MultiLoraWeight):
            raise ArgumentError(f"wrap_mixed: {key} holds a {type(leaf).__name__}; pass the plain base params")
        if tuple(leaf.shape) != st.kernel_shape:
            raise ArgumentError(
                f"wrap_mixed: stacked adapters for {key} expect a kernel of shape {st.kernel_shape}, "
                f"the params have {tuple(leaf.shape)}"
            )
        used.add(key)
        return MultiLoraWeight(leaf, st, ids)

    out = jax.tree_util.tree_map_with_path(visit, params, is_leaf=_targets.is_weight_node)
    missing = sorted(set(stacked_items) - used)
    if missing:
        raise ArgumentError(f"wrap_mixed: stacked adapters for {missing[:5]} have no kernel in params")
    return out


stacking.register_node(MultiLoraWeight, stacking.refusing("a mixed-adapter batch (lora.wrap_mixed)"))

__all__ = [
    "COMBINATIONS",
    "AdapterSet",
    "MultiLoraWeight",
    "StackedAdapter",
    "is_stacked",
    "load_slot",
    "row_ids",
    "stack_adapters",
    "weighted_adapter",
    "wrap_mixed",
]
