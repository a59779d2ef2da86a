"""``python -m train.analyze --base MODEL --adapters DIR [DIR2 ...] --out REPORT_DIR``

What trained LoRA updates look like, after Hu et al. (2021), Section 7: for every adapted matrix the norms of W and
dW, dW's singular value spectrum and effective rank, and the amplification factor (does dW amplify directions
that W already emphasises?); with two or more adapters of the same base, the subspace similarity between the
first two (e.g. an r=8 and an r=64 run) at every common matrix.

``MODEL`` is anything :func:`lora_jax.models.load` accepts (``all-MiniLM-L6-v2``, a Hugging Face folder, a GGUF
file); each ``DIR`` is a folder written by :func:`lora_jax.checkpoint.save_adapters` (``runs/<name>/run-N/adapters``
for a training run), a run folder, or a job folder (``runs/<name>``: its latest run). Writes
``REPORT_DIR/report.md`` (tables), ``analysis.json`` (every number), ``spectra_<label>.png`` and, with two
adapters, ``similarity_A.png`` / ``similarity_output.png`` (heat maps of phi(i, j)).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lora_jax import analysis
from lora_jax.errors import ArgumentError
from train.cli import ArgumentParser

# Subspaces compared between the first two adapters: the paper's (A's input directions) and dW's column space
# in the paper's layout (the output directions the update writes).
SIMILARITY_BASES = ("A", "output")
BASIS_TITLE = {
    "A": "right-singular vectors of A (paper Fig. 3)",
    "output": "column space of dW (output side)",
    "input": "row space of dW (input side)",
    "B": "column space of B",
}


def adapter_folder(folder: str | Path) -> Path:
    """The adapter folder that ``folder`` names: itself (``runs/x/run-1/adapters``), or a run folder's
    ``adapters/``, or the latest run's of a job folder (``runs/x``)."""
    from lora_jax.checkpoint import META_FILE
    from train import outputs

    folder = Path(folder)
    if (folder / META_FILE).is_file() or folder.name == "adapters":
        return folder
    return outputs.resolve_run(folder, "--adapters") / "adapters"


def labels_for(folders: Sequence[Path]) -> list[str]:
    """A short name per adapter folder: ``runs/r8_qv/adapters``, ``runs/r8_qv/latest/adapters`` and ``runs/r8_qv``
    -> ``r8_qv``; duplicates get ``#2``, ``#3``."""
    import re

    out: list[str] = []
    for folder in folders:
        folder = Path(folder).absolute()
        if folder.name == "adapters":
            folder = folder.parent
        if folder.name == "latest" or re.fullmatch(r"run-\d+", folder.name):
            folder = folder.parent
        name = folder.name
        label, n = name, 2
        while label in out:
            label, n = f"{name}#{n}", n + 1
        out.append(label)
    return out


def _fmt(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if math.isinf(x):
        return "inf"
    return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.3e}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(map(str, r)) + " |" for r in rows),
    ]


# ---------------------------------------------------------------------------------------------- numbers


def similarity_summary(grid: np.ndarray, d: int) -> dict:
    """A few numbers of one phi grid: phi(1, 1), phi(r1, r2), the grid mean, and their random expectations."""
    k1, k2 = grid.shape
    rand = analysis.random_similarity(d, k1, k2)
    return {
        "phi_1_1": float(grid[0, 0]),
        "phi_r1_r2": float(grid[-1, -1]),
        "mean": float(grid.mean()),
        "random_1_1": float(rand[0, 0]),
        "random_r1_r2": float(rand[-1, -1]),
        "random_mean": float(rand.mean()),
        "shape": [k1, k2],
    }


def compare(adapters1, adapters2, bases: Sequence[str] = SIMILARITY_BASES) -> dict[str, dict[str, np.ndarray]]:
    """``{basis: {path: phi grid}}`` for every matrix the two adapter trees share (same kernel shape)."""
    first = {p: ad for p, _, ad in analysis.iter_matrices(adapters1)}
    second = {p: ad for p, _, ad in analysis.iter_matrices(adapters2)}
    common = [
        p
        for p in first
        if p in second and (first[p].a.shape[0], first[p].b.shape[1]) == (second[p].a.shape[0], second[p].b.shape[1])
    ]
    return {of: {p: analysis.subspace_similarity(first[p], second[p], of) for p in common} for of in bases}


def stats_record(row: analysis.LayerStats) -> dict:
    a = row.amp
    return {
        "path": row.path,
        "layer": row.layer,
        "matrix": row.matrix,
        "shape": list(row.shape),
        "r": row.r,
        "scale": row.scale,
        "norm_w": a.norm_w,
        "norm_dw": a.norm_dw,
        "relative": row.relative,
        "spectrum": [float(s) for s in row.spectrum],
        "effective_rank": row.effective_rank,
        "rank90": row.rank90,
        "proj_dw": a.proj_dw,
        "proj_w": a.proj_w,
        "proj_random": a.proj_random,
        "amplification": a.factor,
    }


# ------------------------------------------------------------------------------------------------ plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid_layout(paths: Sequence[str]) -> tuple[list[str], list, dict[str, tuple[int, int]]]:
    """Panels with one row per matrix name and one column per layer."""
    matrices = list(dict.fromkeys(analysis.matrix_of(p) for p in paths))
    layers = list(dict.fromkeys(analysis.layer_of(p) for p in paths))
    where, used = {}, set()
    for p in paths:
        cell = (matrices.index(analysis.matrix_of(p)), layers.index(analysis.layer_of(p)))
        while cell in used:  # two matrices of one name and layer: next free column
            cell = (cell[0], cell[1] + 1)
        used.add(cell)
        where[p] = cell
    ncols = max(c for _, c in where.values()) + 1
    return matrices, list(range(ncols)), where


def plot_similarity(grids: dict[str, np.ndarray], path: Path, title: str, labels: tuple[str, str]) -> None:
    """Heat maps of phi(i, j), one panel per matrix (rows: matrix names, columns: layers)."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    matrices, cols, where = _grid_layout(list(grids))
    fig, axes = plt.subplots(
        len(matrices),
        len(cols),
        figsize=(2.6 * len(cols) + 1, 2.2 * len(matrices) + 0.8),
        squeeze=False,
        constrained_layout=True,
    )
    for ax in axes.ravel():
        ax.set_visible(False)
    image = None
    for p, grid in grids.items():
        ax = axes[where[p]]
        ax.set_visible(True)
        k1, k2 = grid.shape
        image = ax.imshow(
            grid,
            vmin=0.0,
            vmax=1.0,
            cmap="viridis",
            aspect="auto",
            interpolation="nearest",
            extent=(0.5, k2 + 0.5, k1 + 0.5, 0.5),
        )
        layer = analysis.layer_of(p)
        ax.set_title(f"{analysis.matrix_of(p)}" + (f", layer {layer}" if layer is not None else ""), fontsize=9)
        ax.set_xlabel(f"j ({labels[1]})", fontsize=8)
        ax.set_ylabel(f"i ({labels[0]})", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="phi(i, j)")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_spectra(rows: Sequence[analysis.LayerStats], path: Path, title: str) -> None:
    """dW's singular values per matrix name (one panel each), one line per layer."""
    plt = _pyplot()
    matrices = list(dict.fromkeys(r.matrix for r in rows))
    fig, axes = plt.subplots(
        1, len(matrices), figsize=(4.2 * len(matrices), 3.4), squeeze=False, constrained_layout=True
    )
    for ax, name in zip(axes[0], matrices):
        for r in (r for r in rows if r.matrix == name):
            ax.plot(
                np.arange(1, len(r.spectrum) + 1),
                r.spectrum,
                marker="o",
                ms=3,
                label=f"layer {r.layer}" if r.layer is not None else r.path,
            )
        ax.set_title(f"{name}: singular values of dW", fontsize=9)
        ax.set_xlabel("index")
        ax.set_ylabel("sigma")
        if all(np.all(r.spectrum > 0) for r in rows if r.matrix == name):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- report


def _stats_section(label: str, rows: Sequence[analysis.LayerStats]) -> list[str]:
    lines = [
        f"## {label}: dW per matrix",
        "",
        "`‖UᵀWV‖_F`: W along dW's top-r singular directions; `W top-r`: W along its own top-r directions "
        "(sqrt of the sum of its top-r sigma^2); `random`: along random r-frames (mean of 16); amplification "
        "= `‖dW‖_F / ‖UᵀWV‖_F` (Hu et al. 2021, Table 7). Effective rank: exp(entropy) of dW's normalised "
        "singular values; rank90: singular values holding 90% of `‖dW‖_F²`.",
        "",
    ]
    body = []
    for r in rows:
        a = r.amp
        body.append(
            [
                f"`{r.path}`",
                r.layer if r.layer is not None else "",
                r.matrix,
                f"{r.shape[0]}x{r.shape[1]}",
                r.r,
                _fmt(a.norm_w),
                _fmt(a.norm_dw),
                _fmt(r.relative),
                _fmt(float(r.spectrum[0])),
                _fmt(r.effective_rank),
                r.rank90,
                _fmt(a.proj_dw),
                _fmt(a.proj_w),
                _fmt(a.proj_random),
                _fmt(a.factor),
            ]
        )
    lines += _table(
        [
            "matrix path",
            "layer",
            "name",
            "d_in x d_out",
            "r",
            "‖W‖_F",
            "‖dW‖_F",
            "‖dW‖/‖W‖",
            "sigma_1(dW)",
            "eff. rank",
            "rank90",
            "‖UᵀWV‖_F",
            "W top-r",
            "random",
            "amplification",
        ],
        body,
    )
    lines.append("")
    for by in ("layer", "matrix"):
        shares = analysis.concentration(list(rows), by)
        lines += [f"Share of `Σ ‖dW‖_F²` by {by}: " + ", ".join(f"{k}: {100 * v:.1f}%" for k, v in shares.items()), ""]
    lines += _verdict(rows) + [""]
    return lines


def _verdict(rows: Sequence[analysis.LayerStats]) -> list[str]:
    """One paragraph answering: does dW amplify directions that W does not emphasise?"""
    live = [r for r in rows if r.amp.norm_dw > 0]
    if not live:
        return ["Every dW is zero (untrained adapters): nothing to analyse."]
    to_w = np.array([r.amp.proj_dw / r.amp.proj_w for r in live])
    to_rand = np.array([r.amp.proj_dw / r.amp.proj_random for r in live])
    factors = np.array([r.amp.factor for r in live])
    top = max(live, key=lambda r: r.amp.factor)
    text = (
        f"W's component along dW's top-r directions is {100 * to_w.min():.1f}-{100 * to_w.max():.1f}% "
        f"(median {100 * np.median(to_w):.1f}%) of its component along its own top-r directions, and "
        f"{to_rand.min():.2g}-{to_rand.max():.2g}x (median {np.median(to_rand):.2g}x) its component along "
        f"random r-dimensional directions. "
    )
    if np.median(to_w) >= 0.5:
        text += "dW's directions are largely among W's dominant ones here. "
    elif np.median(to_rand) > 2.0:
        text += (
            "dW amplifies directions that W contains but does not emphasise, as Hu et al. (2021, Table 7) "
            "found for GPT-3 (0.32 along dW's directions vs 21.67 along W's own and 0.02 along random ones). "
        )
    else:
        text += (
            "dW works along directions that W does not emphasise, and W has no more along them than along "
            "random directions: here the update looks unrelated to W's structure. "
        )
    text += (
        f"Amplification factor `‖dW‖_F / ‖UᵀWV‖_F`: {factors.min():.3g}-{factors.max():.3g} (median "
        f"{np.median(factors):.3g}); largest at `{top.path}` ({top.amp.factor:.3g})."
    )
    return [text]


def _similarity_section(
    labels: tuple[str, str], grids: dict[str, dict[str, np.ndarray]], dims: dict[str, dict], pngs: dict[str, str]
) -> list[str]:
    lines = [
        f"## Subspace similarity: {labels[0]} vs {labels[1]}",
        "",
        "φ(i, j) = ‖U1_iᵀ U2_j‖_F² / min(i, j) (Hu et al. 2021, Eq. 4): how much of the top-i directions "
        f"of {labels[0]} lie in the top-j directions of {labels[1]}; 1 = contained, 0 = orthogonal. `random` "
        "is the expectation for random subspaces, max(i, j) / d.",
        "",
    ]
    for of, by_path in grids.items():
        if not by_path:
            continue
        lines += [f"### {BASIS_TITLE[of]}", "", f"![phi grid]({pngs[of]})", ""]
        body = []
        for p, grid in by_path.items():
            s = similarity_summary(grid, dims[of][p])
            body.append(
                [
                    f"`{p}`",
                    f"{s['shape'][0]}x{s['shape'][1]}",
                    _fmt(s["phi_1_1"]),
                    _fmt(s["random_1_1"]),
                    _fmt(s["phi_r1_r2"]),
                    _fmt(s["random_r1_r2"]),
                    _fmt(s["mean"]),
                    _fmt(s["random_mean"]),
                ]
            )
        lines += _table(["matrix", "grid", "φ(1,1)", "random", "φ(r1,r2)", "random", "mean φ", "random"], body)
        lines.append("")
    return lines


def analyze(
    base: str, folders: Sequence[str | Path], out: str | Path, labels: Sequence[str] | None = None, print_fn=print
) -> dict:
    """Run the whole analysis and write the report; returns the numbers that ``analysis.json`` holds."""
    from lora_jax.checkpoint import load_adapters
    from lora_jax.models import load

    folders = [Path(f) for f in folders]
    if not folders:
        raise ArgumentError("give at least one adapter folder")
    labels = list(labels) if labels else labels_for(folders)
    if len(labels) != len(folders):
        raise ArgumentError(f"{len(labels)} labels for {len(folders)} adapter folders")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ArgumentError(f"--out {str(out)!r} is a file, expected a folder")
    trees = [load_adapters(adapter_folder(f)) for f in folders]  # checked before the (slow) base model loads
    print_fn(f"loading base model {base}")
    params = load(base)[1]
    out.mkdir(parents=True, exist_ok=True)
    stats = {lab: analysis.layer_stats(params, tree) for lab, tree in zip(labels, trees)}

    lines = [
        "# LoRA update analysis",
        "",
        f"Base model: `{base}`",
        "",
        *_table(
            ["label", "folder", "matrices", "ranks", "scale"],
            [
                [
                    lab,
                    f"`{f}`",
                    len(rows),
                    ", ".join(sorted({str(r.r) for r in rows})),
                    ", ".join(sorted({_fmt(r.scale) for r in rows})),
                ]
                for lab, f, rows in zip(labels, folders, stats.values())
            ],
        ),
        "",
    ]
    dora = [
        lab
        for lab, tree in zip(labels, trees)
        if any(getattr(ad, "magnitude", None) is not None for _, _, ad in analysis.iter_matrices(tree))
    ]
    if dora:
        lines += [
            f"DoRA adapters ({', '.join(dora)}): dW below is their low-rank directional update "
            "`scale * A @ B`; the magnitude vector's rescaling is not included.",
            "",
        ]
    record: dict = {
        "base": base,
        "adapters": {
            lab: {"folder": str(f), "matrices": [stats_record(r) for r in rows]}
            for lab, f, rows in zip(labels, folders, stats.values())
        },
    }
    for lab, rows in stats.items():
        png = f"spectra_{lab.replace('/', '_').replace('#', '_')}.png"
        plot_spectra(rows, out / png, f"{lab}: singular values of dW")
        lines += _stats_section(lab, rows) + [f"![spectra]({png})", ""]

    if len(trees) >= 2:
        grids = compare(trees[0], trees[1])
        first = {p: ad for p, _, ad in analysis.iter_matrices(trees[0])}
        dims = {
            of: {p: first[p].a.shape[0] if of in ("A", "input") else first[p].b.shape[1] for p in by_path}
            for of, by_path in grids.items()
        }
        pngs = {}
        for of, by_path in grids.items():
            if by_path:
                pngs[of] = f"similarity_{of}.png"
                plot_similarity(
                    by_path,
                    out / pngs[of],
                    f"phi(i, j), {BASIS_TITLE[of]}: {labels[0]} (i) vs {labels[1]} (j)",
                    (labels[0], labels[1]),
                )
        lines += _similarity_section((labels[0], labels[1]), grids, dims, pngs)
        if not any(grids.values()):
            lines += [f"{labels[0]} and {labels[1]} share no adapted matrix of the same shape: no similarity.", ""]
        record["similarity"] = {
            "labels": labels[:2],
            **{
                of: {p: {**similarity_summary(g, dims[of][p]), "grid": g.tolist()} for p, g in by_path.items()}
                for of, by_path in grids.items()
            },
        }
    else:
        lines += [
            "Only one adapter given: no subspace similarity (pass two adapter folders, e.g. an r=8 and an "
            "r=64 run, to compare them).",
            "",
        ]

    (out / "report.md").write_text("\n".join(lines))
    (out / "analysis.json").write_text(json.dumps(record, indent=1, default=float))
    print_fn(f"wrote {out / 'report.md'}")
    return record


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m train.analyze", description=__doc__.split("\n\n")[1])
    ap.add_argument("--base", required=True, help="base model: anything lora_jax.models.load accepts")
    ap.add_argument(
        "--adapters", required=True, nargs="+", help="adapter folders (save_adapters); the first two are compared"
    )
    ap.add_argument("--out", required=True, help="report folder")
    ap.add_argument("--labels", nargs="+", help="names for the adapters (default: their run folder names)")
    args = ap.parse_args(argv)
    from train.cli import guarded

    return guarded(lambda: analyze(args.base, args.adapters, args.out, args.labels))


if __name__ == "__main__":
    sys.exit(main())
