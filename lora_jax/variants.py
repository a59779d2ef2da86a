"""LoRA initialisations that also change the base: PiSSA (Meng et al. 2024).

PiSSA starts the adapter on the principal singular directions of each kernel instead of at zero. With the
kernel ``W (d_in, d_out) = U S V^T`` and ``s`` the adapter's scale (``alpha / r``):

    A = U_r sqrt(S_r / s)            (d_in, r)
    B = sqrt(S_r / s) V_r^T          (r, d_out)
    W_res = W - s * A @ B            the frozen base, which keeps the minor singular directions

so ``W_res + s * A @ B = W``: the adapted model equals the original one at step 0, and training moves the
top-r subspace, where most of the kernel's energy is. Because the base changes, this is its own function
(``lora.init`` never touches the base): :func:`init_pissa` returns the residual params with the adapters.

DoRA (``use_dora=True``) lives in the core (:func:`lora_jax.init`, :mod:`lora_jax.ops`); it combines with
PiSSA: its magnitude starts at the column norms of ``W = W_res + s*A@B``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import core as _core
from lora_jax import quant as _quant
from lora_jax import tree as _tree
from lora_jax.errors import ArgumentError, TargetError

PyTree = Any
Array = jax.Array


def _svd_lowrank(w: Array, r: int, niter: int, key: Array) -> tuple[Array, Array, Array]:
    """Top-``r`` SVD of ``w`` by randomised subspace iteration (Halko et al. 2011), ``niter`` power steps:
    ``(U (m, r), S (r,), Vt (r, n))``. Approximate: exact when ``w`` has rank ``<= r``."""
    q, _ = jnp.linalg.qr(w @ jax.random.normal(key, (w.shape[1], r), w.dtype))
    for _ in range(niter):
        q, _ = jnp.linalg.qr(w.T @ q)
        q, _ = jnp.linalg.qr(w @ q)
    u, s, vt = jnp.linalg.svd(q.T @ w, full_matrices=False)
    return q @ u, s, vt


def pissa_factors(
    w: Array, r: int, scale: float, *, niter: int | None = None, key: Array | None = None
) -> tuple[Array, Array, Array]:
    """PiSSA for one 2-D kernel ``w (d_in, d_out)``: ``(A (d_in, r), B (r, d_out), residual (d_in, d_out))``,
    all float32, with ``residual + scale * A @ B == w`` up to rounding.

    ``niter=None`` takes the exact SVD; an int uses a randomised top-``r`` SVD with that many power
    iterations (PEFT's ``"pissa_niter_N"``), much faster for large kernels.
    """
    w = jnp.asarray(w, jnp.float32)
    if w.ndim != 2:
        raise ArgumentError(f"pissa_factors: expected a 2-D kernel (d_in, d_out), got shape {tuple(w.shape)}")
    if niter is None:
        u, s, vt = jnp.linalg.svd(w, full_matrices=False)
    else:
        u, s, vt = _svd_lowrank(w, r, int(niter), jax.random.key(0) if key is None else key)
    root = jnp.sqrt(s[:r] / scale)
    a = u[:, :r] * root[None, :]
    b = root[:, None] * vt[:r]
    return a, b, w - scale * (a @ b)


def init_pissa(
    params: PyTree, r: int = 8, *, niter: int | None = None, key: Array | None = None, **init_kwargs: Any
) -> tuple[PyTree, PyTree]:
    """PiSSA adapters and the residual base they belong to.

    Args:
      params: the base parameter tree, in full precision (concrete arrays).
      r: the rank; ``key``: PRNG key of the randomised SVD (only with ``niter``).
      niter: ``None`` for the exact SVD, or the number of power iterations of a randomised top-r SVD.
      **init_kwargs: as for :func:`lora_jax.init` (``targets``, ``alpha``, ``rank_pattern``, ``use_rslora``,
        ``dropout``, ``use_dora``, ``dtype`` ...), except ``init``.

    Returns:
      ``(residual_params, adapters)``: ``params`` with each targeted kernel replaced by ``W - s*A@B`` (in the
      kernel's dtype), and the adapter tree. Use them together: ``lora.wrap(residual_params, adapters)``
      equals the original model at step 0; merging gives the fine-tuned kernels. For QPiSSA quantise the
      residual afterwards (``lora.quantize(residual_params)``): with the principal directions taken out it
      quantises with less error than ``W`` (quantised kernels are refused here, as PEFT refuses them).
    """
    if "init" in init_kwargs:
        raise ArgumentError("init_pissa: PiSSA is the initialisation; do not pass init=")
    adapters = _core.init(params, r, **init_kwargs)
    dtype = _core.adapter_items(adapters)[0][1].a.dtype
    factors: dict[str, tuple[Array, Array]] = {}
    keys = iter(jax.random.split(jax.random.key(0) if key is None else key, len(_core.adapter_items(adapters))))

    def residual(path: str, leaf, ad: _core.LoraAdapter):
        if _quant.is_quantized(leaf):
            raise ArgumentError(
                f"init_pissa: {path} is already quantised; run PiSSA on the full-precision params and "
                "quantise the residual it returns (QPiSSA): lora.quantize(residual_params)"
            )
        if not isinstance(leaf, (jax.Array, np.ndarray)):
            raise ArgumentError(
                f"init_pissa: {path} is a {type(leaf).__name__} without values; PiSSA needs the real kernel for its SVD"
            )
        w = jnp.asarray(leaf, jnp.float32).reshape(math.prod(ad.in_shape), -1)
        a, b, res = pissa_factors(w, ad.r, ad.scale, niter=niter, key=next(keys))
        factors[path] = (a.astype(dtype), b.astype(dtype))
        return res.reshape(ad.kernel_shape).astype(leaf.dtype)

    residual_params = _core.map_targets(params, adapters, residual, "init_pissa")

    def replace(path, ad):
        a, b = factors[_tree.path_str(path)]
        return _core.LoraAdapter(
            a,
            b,
            alpha=ad.alpha,
            scale=ad.scale,
            in_shape=ad.in_shape,
            out_shape=ad.out_shape,
            dropout=ad.dropout,
            magnitude=ad.magnitude,
        )

    return residual_params, jax.tree_util.tree_map_with_path(replace, adapters, is_leaf=_core.is_adapter)


def pissa_to_lora(adapters: PyTree, initial: PyTree) -> PyTree:
    """PiSSA adapters trained over the residual ``W_res = W - s*A0@B0`` as plain LoRA adapters over the original
    ``W`` (as PEFT converts them): ``W_res + s*A@B = W + s*[A, A0] @ [B; -B0]``, rank ``2r``, same scale (DoRA
    magnitudes are unchanged: the adapted kernel is the same).

    Args:
      adapters: the trained adapter tree (host or device arrays).
      initial: the adapters :func:`init_pissa` returned, before training (same paths and ranks).

    Returns:
      An adapter tree of numpy arrays: ``a`` of shape ``(d_in, 2r)``, ``b`` of shape ``(2r, d_out)``, ``alpha``
      such that the scale is unchanged (``s * 2r``, or ``s * sqrt(2r)`` for rsLoRA-scaled adapters).
      Raises :class:`lora_jax.TargetError` when an adapter has no initial adapter of the same rank.
    """
    init = {p: ad for p, ad in _core.adapter_items(initial)}

    def convert(path, ad):
        name = _tree.path_str(path)
        a0 = init.get(name)
        if a0 is None or a0.r != ad.r:
            raise TargetError(
                f"pissa_to_lora: {name} (rank {ad.r}) has "
                + ("no initial adapter" if a0 is None else f"an initial adapter of rank {a0.r}")
                + f"; the initial adapters hold {sorted(init)[:8]}"
            )
        r = 2 * ad.r
        rslora = not math.isclose(ad.scale, ad.alpha / ad.r) and math.isclose(ad.scale, ad.alpha / math.sqrt(ad.r))
        alpha = ad.scale * (math.sqrt(r) if rslora else r)
        return _core.LoraAdapter(
            np.concatenate([np.asarray(ad.a), np.asarray(a0.a)], axis=1),
            np.concatenate([np.asarray(ad.b), -np.asarray(a0.b)], axis=0),
            alpha=alpha,
            scale=ad.scale,
            in_shape=ad.in_shape,
            out_shape=ad.out_shape,
            dropout=ad.dropout,
            magnitude=ad.magnitude,
        )

    return jax.tree_util.tree_map_with_path(convert, adapters, is_leaf=_core.is_adapter)


__all__ = ["init_pissa", "pissa_factors", "pissa_to_lora"]
