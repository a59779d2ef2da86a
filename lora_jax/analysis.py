"""What the low-rank update learned: the analysis of dW in Hu et al. 2021 (LoRA), Section 7.

Pure functions of adapters and base kernels, computed in float64 with numpy:

- :func:`delta_w` / :func:`svd`: ``dW = scale * A @ B`` as a 2-D ``(d_in, d_out)`` matrix, and its thin SVD
  computed from the factors (never from the dense ``d_in x d_out`` matrix).
- :func:`subspace_similarity` (Sec. 7.2, Fig. 3-4): how much of the subspace spanned by the top-i singular
  directions of one adapter lies in the subspace spanned by the top-j directions of another, as an ``(i, j)``
  grid. :func:`grassmann_similarity` is the same quantity for any two orthonormal bases.
- :func:`amplification` (Sec. 7.3, Table 7): how strongly dW amplifies directions of W, compared with W's own
  top directions and with random ones.
- :func:`effective_rank`, :func:`energy_rank`: how many directions dW really uses.
- :func:`layer_stats` / :func:`concentration`: all of the above per adapted matrix, and where in the network
  the update concentrates.

Layouts. The paper writes ``h = W0 x + B A x`` with ``W0, dW: (d_out, d_in)``, ``B: (d_out, r)``,
``A: (r, d_in)``. This library stores kernels as ``(d_in, d_out)`` (``y = x @ W``) with ``A: (d_in, r)`` and
``B: (r, d_out)``, so ``A_ours = A_paper^T``, ``B_ours = B_paper^T`` and ``dW_ours = dW_paper^T``. Every
function here takes and returns the library's layout and says which space (``"input"``, ``R^{d_in}``, or
``"output"``, ``R^{d_out}``) a basis lives in; the docstrings give the paper's name for each.

DoRA adapters (those with a ``magnitude`` vector) are analysed through their low-rank directional update
``scale * A @ B``; the magnitude's column rescaling is not part of dW here.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import numpy as np

from lora_jax import stacking, tree
from lora_jax.core import LoraAdapter, adapter_items
from lora_jax.errors import ArgumentError, ArgumentTypeError, NotFoundError

PyTree = Any
Basis = Literal["A", "B", "input", "output"]
BASES: tuple[str, ...] = ("A", "B", "input", "output")


# ------------------------------------------------------------------------------------------ matrices


def _f64(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _check_2d(adapter: LoraAdapter, what: str) -> None:
    if not isinstance(adapter, LoraAdapter):
        raise ArgumentTypeError(f"{what}: expected a LoraAdapter, got {type(adapter).__name__}")
    if np.ndim(adapter.a) != 2 or np.ndim(adapter.b) != 2:
        raise ArgumentError(
            f"{what}: expected a (d_in, r) A and an (r, d_out) B, got A {tuple(np.shape(adapter.a))} "
            f"and B {tuple(np.shape(adapter.b))}; split stacked adapters with iter_matrices()"
        )


def delta_w(adapter: LoraAdapter) -> np.ndarray:
    """``dW = scale * A @ B`` as a float64 ``(d_in, d_out)`` matrix (``d_in = prod(in_shape)``), i.e. the
    transpose of the paper's ``dW = B A``. Unlike :meth:`LoraAdapter.delta` it is not reshaped to the kernel's
    axes."""
    _check_2d(adapter, "delta_w")
    return adapter.scale * (_f64(adapter.a) @ _f64(adapter.b))


@dataclasses.dataclass(frozen=True)
class Svd:
    """A thin SVD ``M = u @ diag(s) @ v.T`` with ``s`` in descending order.

    Attributes:
      u: ``(m, k)`` orthonormal columns (left singular vectors).
      s: ``(k,)`` singular values, descending.
      v: ``(n, k)`` orthonormal columns (right singular vectors; note: ``v``, not numpy's ``vh = v.T``).
    """

    u: np.ndarray
    s: np.ndarray
    v: np.ndarray


def _svd_dense(m: np.ndarray) -> Svd:
    u, s, vh = np.linalg.svd(_f64(m), full_matrices=False)
    return Svd(u, s, vh.T)


def svd(x: LoraAdapter | np.ndarray) -> Svd:
    """The thin SVD of ``dW = scale * A @ B`` (for an adapter) or of a 2-D array.

    For an adapter of rank r it is computed from the factors: with ``A = Q_a R_a`` and ``B^T = Q_b R_b``,
    ``dW = Q_a (scale R_a R_b^T) Q_b^T`` and only the ``r x r`` core is decomposed. Returns ``u: (d_in, r)``
    (dW's input-space directions: the paper's right singular vectors of ``dW_paper``), ``s: (r,)``,
    ``v: (d_out, r)`` (output-space directions: the paper's left singular vectors).
    """
    if not isinstance(x, LoraAdapter):
        m = _f64(x)
        if m.ndim != 2:
            raise ArgumentError(f"svd: expected a 2-D matrix or a LoraAdapter, got an array of shape {m.shape}")
        return _svd_dense(m)
    _check_2d(x, "svd")
    qa, ra = np.linalg.qr(_f64(x.a))
    qb, rb = np.linalg.qr(_f64(x.b).T)
    core = _svd_dense(x.scale * ra @ rb.T)
    return Svd(qa @ core.u, core.s, qb @ core.v)


def basis(adapter: LoraAdapter, of: Basis = "A") -> np.ndarray:
    """An orthonormal basis, ordered by singular value (largest first), of one of the adapter's subspaces.

    Args:
      adapter: a 2-D :class:`~lora_jax.core.LoraAdapter` (``A: (d_in, r)``, ``B: (r, d_out)``).
      of: which subspace:

        - ``"A"``: the paper's choice (Sec. 7.2): the right-singular vectors of ``A_paper: (r, d_in)``, i.e. the
          left-singular vectors of our ``A: (d_in, r)``. ``(d_in, r)``: the input directions A reads.
        - ``"B"``: the paper's suggested alternative: the left-singular vectors of ``B_paper: (d_out, r)``, i.e.
          the right-singular vectors of our ``B: (r, d_out)``. ``(d_out, r)``.
        - ``"input"``: the right-singular vectors of ``dW_paper`` (the row space of ``dW_paper``, the column
          space of our ``(d_in, d_out)`` dW). ``(d_in, r)``. Unlike ``"A"`` it is ordered by dW's spectrum,
          which B shapes too.
        - ``"output"``: the left-singular vectors of ``dW_paper`` (the column space of ``dW_paper``, the row space
          of our dW): the directions the update writes. ``(d_out, r)``.
    """
    _check_2d(adapter, "basis")
    if of == "A":
        return _svd_dense(adapter.a).u
    if of == "B":
        return _svd_dense(adapter.b).v
    if of == "input":
        return svd(adapter).u
    if of == "output":
        return svd(adapter).v
    raise ArgumentError(f"basis: `of` must be one of {BASES}, got {of!r}")


# ---------------------------------------------------------------------------------- subspace similarity


def grassmann_similarity(u1: np.ndarray, u2: np.ndarray) -> np.ndarray:
    """The normalised subspace similarity of Hu et al. (2021, Eq. 4) for every pair of leading sub-bases.

    ``phi[i - 1, j - 1] = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j)`` for ``1 <= i <= k1``, ``1 <= j <= k2``.

    It lies in ``[0, 1]``: 1 when the smaller of the two subspaces lies inside the other, 0 when they are
    orthogonal. For random subspaces of ``R^d`` its expectation is ``max(i, j) / d``
    (:func:`random_similarity`).

    Args:
      u1: ``(d, k1)`` orthonormal columns, most important first.
      u2: ``(d, k2)`` orthonormal columns, most important first.

    Returns:
      ``(k1, k2)`` float64 grid.
    """
    u1, u2 = _f64(u1), _f64(u2)
    if u1.ndim != 2 or u2.ndim != 2 or u1.shape[0] != u2.shape[0]:
        raise ArgumentError(
            f"grassmann_similarity: expected two (d, k) bases in the same space, got {u1.shape} and {u2.shape}"
        )
    overlap = np.cumsum(np.cumsum((u1.T @ u2) ** 2, axis=0), axis=1)
    i = np.arange(1, u1.shape[1] + 1)[:, None]
    j = np.arange(1, u2.shape[1] + 1)[None, :]
    return np.clip(overlap / np.minimum(i, j), 0.0, 1.0)


def subspace_similarity(adapter1: LoraAdapter, adapter2: LoraAdapter, of: Basis = "A") -> np.ndarray:
    """``phi(A1, A2, i, j)`` (Hu et al. 2021, Sec. 7.2) between two adapters of the same kernel, as a grid.

    With the default ``of="A"`` this is the paper's Fig. 3-4: ``U1``, ``U2`` are the right-singular unitary
    matrices of the paper's ``A: (r, d_in)`` (the left-singular vectors of this library's ``A: (d_in, r)``), and
    ``phi[i - 1, j - 1] = ||U1_i^T U2_j||_F^2 / min(i, j)`` measures how much of the top-i directions of
    adapter 1 lie in the top-j directions of adapter 2 (e.g. ``r=8`` vs ``r=64``). ``of="output"`` compares the
    column spaces of the paper's dW (what the updates write), ``"input"`` dW's input directions, ``"B"`` the
    column spaces of the paper's B; see :func:`basis`.

    Returns:
      ``(r1, r2)`` float64 grid, ``[i - 1, j - 1]`` for the top-i of adapter 1 and top-j of adapter 2.
    """
    u1, u2 = basis(adapter1, of), basis(adapter2, of)
    if u1.shape[0] != u2.shape[0]:
        raise ArgumentError(
            f"subspace_similarity: the adapters' {of!r} bases live in spaces of different size "
            f"({u1.shape[0]} vs {u2.shape[0]}); they must adapt kernels of the same shape"
        )
    return grassmann_similarity(u1, u2)


def random_similarity(d: int, k1: int, k2: int) -> np.ndarray:
    """The expected :func:`grassmann_similarity` of two uniformly random subspaces of ``R^d``:
    ``E phi[i - 1, j - 1] = i * j / d / min(i, j) = max(i, j) / d``. ``(k1, k2)`` grid: the floor to compare
    measured similarities with."""
    i = np.arange(1, k1 + 1)[:, None]
    j = np.arange(1, k2 + 1)[None, :]
    return np.maximum(i, j) / float(d) + np.zeros((k1, k2))


# ----------------------------------------------------------------------------------- amplification


@dataclasses.dataclass(frozen=True)
class Amplification:
    """Sec. 7.3 / Table 7 of Hu et al. (2021) for one kernel.

    Attributes:
      r: the number of directions projected onto.
      norm_w: ``||W||_F``.
      norm_dw: ``||dW||_F``.
      proj_dw: ``||U^T W V||_F`` with U, V the top-r left / right singular vectors of dW: how much W already
        has along the directions dW changes (the paper's ``||U^T W V^T||_F``, same number in either layout).
      proj_w: ``||U_W^T W V_W||_F`` with W's own top-r singular vectors ``= sqrt(sum of W's top-r sigma^2)``.
      proj_random: the mean of ``||U^T W V||_F`` over random orthonormal r-frames U, V.
    """

    r: int
    norm_w: float
    norm_dw: float
    proj_dw: float
    proj_w: float
    proj_random: float

    @property
    def factor(self) -> float:
        """The amplification factor ``||dW||_F / ||U^T W V||_F`` (``nan`` when dW is zero)."""
        if self.norm_dw == 0.0:
            return math.nan
        return self.norm_dw / self.proj_dw if self.proj_dw > 0 else math.inf


def _random_frame(rng: np.random.Generator, d: int, r: int) -> np.ndarray:
    q, rr = np.linalg.qr(rng.standard_normal((d, r)))
    return q * np.sign(np.diag(rr))  # Haar-distributed


def amplification(
    w: np.ndarray, dw: LoraAdapter | np.ndarray, r: int | None = None, *, n_random: int = 16, seed: int = 0
) -> Amplification:
    """How much dW amplifies directions of W (Hu et al. 2021, Sec. 7.3, Table 7).

    Args:
      w: the base kernel, ``(d_in, d_out)`` (this library's layout; reshape multi-axis kernels first, see
        :func:`kernel_2d`).
      dw: the update as a :class:`~lora_jax.core.LoraAdapter` (its SVD is taken from the factors) or a
        ``(d_in, d_out)`` array.
      r: how many top directions to project onto; default: the adapter's rank (for an array: its rank).
      n_random: how many random orthonormal frame pairs to average for :attr:`Amplification.proj_random`.
      seed: seed of those random frames.

    In the paper's layout (``W: (d_out, d_in)``) the projection is ``U^T W V^T`` with U the left and V^T the
    right singular vectors of ``dW_paper``. Here ``W = W_paper^T`` and dW's left singular vectors ``u: (d_in, r)``
    are the paper's right ones, so the same number is ``||u^T W v||_F``: each factor of dW's SVD meets W on the
    side (input or output) that it lives on.
    """
    w = _f64(w)
    dec = svd(dw)
    if w.ndim != 2 or (dec.u.shape[0], dec.v.shape[0]) != w.shape:
        raise ArgumentError(
            f"amplification: W has shape {w.shape}, dW is ({dec.u.shape[0]}, {dec.v.shape[0]}); "
            "both must be (d_in, d_out)"
        )
    if r is None:  # the adapter's rank, or an array's numerical rank
        r = len(dec.s) if isinstance(dw, LoraAdapter) else max(int(np.sum(dec.s > dec.s[0] * 1e-10)), 1)
    if not 1 <= r <= min(w.shape):
        raise ArgumentError(f"amplification: r must be in [1, {min(w.shape)}], got {r}")
    u, v = dec.u[:, :r], dec.v[:, :r]
    if u.shape[1] < r:
        raise ArgumentError(f"amplification: dW has only {u.shape[1]} singular directions, asked for r={r}")
    sw = np.linalg.svd(w, compute_uv=False)
    rng = np.random.default_rng(seed)
    rand = [
        np.linalg.norm(_random_frame(rng, w.shape[0], r).T @ w @ _random_frame(rng, w.shape[1], r))
        for _ in range(n_random)
    ]
    return Amplification(
        r=r,
        norm_w=float(np.linalg.norm(w)),
        norm_dw=float(np.sqrt(np.sum(dec.s**2))),
        proj_dw=float(np.linalg.norm(u.T @ w @ v)),
        proj_w=float(np.sqrt(np.sum(sw[:r] ** 2))),
        proj_random=float(np.mean(rand)),
    )


# ------------------------------------------------------------------------------------------ rank


def effective_rank(s: np.ndarray) -> float:
    """Entropy effective rank (Roy & Vetterli 2007): ``exp(-sum p_i log p_i)`` with ``p = s / sum(s)``.

    1 for a single non-zero singular value, k for k equal ones; ``0`` for an all-zero spectrum.
    """
    s = np.abs(_f64(s)).ravel()
    total = s.sum()
    if total == 0.0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


def energy_rank(s: np.ndarray, fraction: float = 0.9) -> int:
    """The fewest singular values whose squares hold ``fraction`` of ``sum(s^2)`` (``||dW||_F^2``); 0 for a zero
    spectrum."""
    if not 0.0 < fraction <= 1.0:
        raise ArgumentError(f"energy_rank: fraction must be in (0, 1], got {fraction}")
    e = np.sort(np.abs(_f64(s)).ravel())[::-1] ** 2
    if e.sum() == 0.0:
        return 0
    cum = np.cumsum(e) / e.sum()
    return int(np.searchsorted(cum, fraction - 1e-12) + 1)


# ------------------------------------------------------------------------------------ per layer


_LAYER = re.compile(r"(?:^|/)(?:layer|layers|h|block|blocks)[_.]?(\d+)(?:/|$)")
_PARAM_NAME = {"kernel", "weight", "w"}


def layer_of(path: str) -> int | None:
    """The layer index in a parameter path (``bert/encoder/layer_3/...``, ``model/layers_3/...``, ``h_3``, or a
    stacked adapter's ``path[3]``); ``None`` if there is none."""
    m = _LAYER.search(path)
    if m:
        return int(m.group(1))
    m = re.search(r"\[(\d+)", path)
    return int(m.group(1)) if m else None


def matrix_of(path: str) -> str:
    """The matrix name in a parameter path: the last component that is not ``kernel`` / ``weight``
    (``.../self/query/kernel`` -> ``query``)."""
    parts = [p for p in re.sub(r"\[.*\]$", "", path).split("/") if p]
    while len(parts) > 1 and parts[-1] in _PARAM_NAME:
        parts.pop()
    return parts[-1] if parts else path


def iter_matrices(adapters: PyTree) -> Iterator[tuple[str, tuple[int, ...], LoraAdapter]]:
    """``(label, index, adapter_2d)`` for every adapter in a tree, in tree order.

    Stacked adapters (``A: (L, d_in, r)`` from :func:`lora_jax.transform.init_stacked`) are split into one 2-D
    adapter per layer, labelled ``path[l]`` with ``index = (l,)``; ordinary ones have ``index = ()``.
    """
    for path, ad in adapter_items(adapters):
        a, b = np.asarray(ad.a), np.asarray(ad.b)
        n = a.ndim - 2
        if n < 0 or b.ndim != a.ndim:
            raise ArgumentError(
                f"{path}: adapter factors of shapes A {a.shape}, B {b.shape} are not (..., d_in, r) and (..., r, d_out)"
            )
        if n == 0:
            yield path, (), ad
            continue
        stack = a.shape[:n]
        magnitude = getattr(ad, "magnitude", None)  # DoRA: (*stack, d_out)
        for idx in np.ndindex(*stack):
            extra = {"magnitude": np.asarray(magnitude)[idx]} if magnitude is not None else {}
            yield (
                f"{path}[{','.join(map(str, idx))}]",
                idx,
                dataclasses.replace(ad, a=a[idx], b=b[idx], in_shape=tuple(ad.in_shape[n:]), **extra),
            )


def find_kernel(params: PyTree, path: str) -> Any:
    """The leaf of ``params`` at the '/'-joined ``path``, allowing for a task wrapper on either side.

    Tried in order: the exact path; the path without leading components (an adapter trained on
    ``bert/encoder/...`` of a classification model, analysed against the base model's ``encoder/...``); a
    unique leaf whose path ends with ``/path`` (the other way round). Raises ``KeyError`` naming what exists.
    """
    keys = path.split("/")
    layer = next((int(k.rsplit("_", 1)[1]) for k in keys[:-1] if re.fullmatch(rf"{stacking.STACK}_\d+", k)), None)
    if layer is not None and stacking.is_stacked(params):  # a layer of a scanned stack: its slice of the leaf
        stacked = [stacking.STACK if re.fullmatch(rf"{stacking.STACK}_\d+", k) else k for k in keys]
        return find_kernel(params, "/".join(stacked))[layer]
    for start in range(len(keys) - 1):
        leaf = tree.get(params, keys[start:])
        if leaf is not None and not isinstance(leaf, Mapping):
            return leaf
    from lora_jax.targets import leaf_paths

    paths = leaf_paths(params)
    ends = [leaf for p, leaf in paths if p.endswith("/" + path)]
    if len(ends) == 1:
        return ends[0]
    top = sorted(params.keys())[:20] if isinstance(params, Mapping) else type(params).__name__
    raise NotFoundError(
        f"base params have no {path!r} "
        f"({'several leaves end with it' if ends else 'nor any suffix of it'}; top-level keys: {top}); "
        "was this adapter trained on another model?"
    )


def kernel_2d(params: PyTree, path: str, adapter: LoraAdapter, index: tuple[int, ...] = ()) -> np.ndarray:
    """The base kernel at ``path`` (see :func:`find_kernel`) as a float64 ``(d_in, d_out)`` matrix in the
    adapter's axis layout, taking stack ``index`` for stacked kernels. Raises naming the path and shapes when
    ``params`` has no such leaf or it does not fit the adapter."""
    w = _f64(find_kernel(params, path))
    w = w[index] if index else w
    if tuple(w.shape) != (*adapter.in_shape, *adapter.out_shape):
        raise ArgumentError(
            f"{path}: base kernel has shape {tuple(w.shape)}, the adapter expects "
            f"{(*adapter.in_shape, *adapter.out_shape)}; was this adapter trained on another model?"
        )
    return w.reshape(adapter.a.shape[-2], adapter.b.shape[-1])


@dataclasses.dataclass(frozen=True)
class LayerStats:
    """What one adapted matrix's update looks like.

    Attributes:
      path: the kernel's '/'-joined path (``path[l]`` for a layer of a stacked kernel).
      layer: the layer index parsed from the path, or ``None``.
      matrix: the matrix name (``query``, ``value``, ``q_proj``, ...).
      shape: ``(d_in, d_out)``.
      r: adapter rank; scale: ``alpha / r`` (or rsLoRA's).
      spectrum: dW's singular values, descending, ``(r,)``.
      effective_rank: :func:`effective_rank` of the spectrum; rank90: :func:`energy_rank` at 90%.
      relative: ``||dW||_F / ||W||_F``.
      amp: the :class:`Amplification` numbers at the adapter's rank.
    """

    path: str
    layer: int | None
    matrix: str
    shape: tuple[int, int]
    r: int
    scale: float
    spectrum: np.ndarray
    effective_rank: float
    rank90: int
    relative: float
    amp: Amplification


def layer_stats(
    params: PyTree, adapters: PyTree, *, r: int | None = None, n_random: int = 16, seed: int = 0
) -> list[LayerStats]:
    """:class:`LayerStats` for every adapted matrix of ``adapters`` against its base kernel in ``params``
    (amplification at rank ``r``, default each adapter's own rank)."""
    adapters = stacking.conform(adapters, params)  # adapters trained scanned, params loaded unrolled (or back)
    rows = []
    for path, idx, ad in iter_matrices(adapters):
        w = kernel_2d(params, path.split("[")[0], ad, idx)
        dec = svd(ad)
        amp = amplification(w, ad, min(r or ad.r, ad.r), n_random=n_random, seed=seed)
        layer = layer_of(path)
        rows.append(
            LayerStats(
                path=path,
                layer=layer if layer is not None else (idx[0] if idx else None),
                matrix=matrix_of(path),
                shape=(w.shape[0], w.shape[1]),
                r=ad.r,
                scale=float(ad.scale),
                spectrum=dec.s,
                effective_rank=effective_rank(dec.s),
                rank90=energy_rank(dec.s, 0.9),
                relative=amp.norm_dw / amp.norm_w if amp.norm_w else math.nan,
                amp=amp,
            )
        )
    return rows


def concentration(rows: list[LayerStats], by: Literal["path", "layer", "matrix"] = "layer") -> dict[Any, float]:
    """Where the update concentrates: each group's share of the total ``sum ||dW||_F^2`` over ``rows``.

    ``by="layer"`` groups by layer index, ``"matrix"`` by matrix name, ``"path"`` gives each matrix on its own.
    The shares sum to 1 (all 0 if every dW is zero); keys keep the rows' order.
    """
    if by not in ("path", "layer", "matrix"):
        raise ArgumentError(f"concentration: `by` must be 'path', 'layer' or 'matrix', got {by!r}")
    energy: dict[Any, float] = {}
    for row in rows:
        key = getattr(row, by)
        energy[key] = energy.get(key, 0.0) + row.amp.norm_dw**2
    total = sum(energy.values())
    return {k: (e / total if total else 0.0) for k, e in energy.items()}


__all__ = [
    "Amplification",
    "BASES",
    "LayerStats",
    "Svd",
    "amplification",
    "basis",
    "concentration",
    "delta_w",
    "effective_rank",
    "energy_rank",
    "find_kernel",
    "grassmann_similarity",
    "iter_matrices",
    "kernel_2d",
    "layer_of",
    "layer_stats",
    "matrix_of",
    "random_similarity",
    "subspace_similarity",
    "svd",
]
