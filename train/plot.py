"""``python -m train.plot RUN [--out FILE]``: the loss curve of a run as a PNG.

``RUN`` is a run folder (``runs/default/run-1``) or a job folder (``runs/default``: its ``latest`` run). The plot
shows the training loss by step, the evaluation loss at each evaluation, and the learning rate on a second axis;
it is written to ``RUN/loss.png`` (or ``--out``) and its path is printed. ``python -m train.run`` draws the same
plot at the end of every run.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lora_jax.errors import DataError, MissingFileError
from train.cli import ArgumentParser, guarded
from train.metrics import read_log


def run_folder(path: str | Path) -> Path:
    """``path`` itself when it holds a run's ``metrics.jsonl``, else its ``latest`` run."""
    path = Path(path)
    if (path / "metrics.jsonl").is_file():
        return path
    if (path / "latest" / "metrics.jsonl").is_file():
        return (path / "latest").resolve()
    raise MissingFileError(
        f"{path} is neither a run folder nor a job folder with a latest run (no metrics.jsonl in it or in its latest/)"
    )


def plot_run(folder: str | Path, out: str | Path | None = None) -> Path:
    """Draw ``folder``'s ``metrics.jsonl`` (training loss, evaluation loss, learning rate by step) into ``out``
    (default ``folder/loss.png``); return the file's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    records = read_log(folder)
    train = [r for r in records if r.get("kind") == "train" and r.get("finite", True)]
    evals = [r for r in records if r.get("kind") == "eval" and "loss" in r]
    if not train and not evals:
        raise DataError(f"{folder / 'metrics.jsonl'} holds no training or evaluation loss yet")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1.2, label="training loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", lw=1.5, label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    lines, labels = ax.get_legend_handles_labels()
    lrs = [r for r in train if "lr" in r]
    if lrs:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in lrs], [r["lr"] for r in lrs], color="0.55", ls="--", lw=1, label="learning rate")
        ax2.set_ylabel("learning rate")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        more, more_labels = ax2.get_legend_handles_labels()
        lines, labels = lines + more, labels + more_labels
    ax.legend(lines, labels, loc="upper right")
    ax.set_title(folder.name)
    fig.tight_layout()
    out = Path(out) if out is not None else folder / "loss.png"
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m train.plot", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    ap.add_argument("run", help="a run folder, or a job folder (its latest run)")
    ap.add_argument("--out", help="where to write the PNG (default: RUN/loss.png)")
    args = ap.parse_args(argv)
    return guarded(lambda: print(plot_run(run_folder(args.run), args.out)))


if __name__ == "__main__":
    sys.exit(main())
