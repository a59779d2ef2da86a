"""The seed presentations' experiments, each one command:

    python -m train.experiment sst2_methods   # LoRA vs full fine-tuning vs frozen encoder + head, same time budget
    python -m train.experiment rank_study     # rank r = 1..64, and which matrices at a fixed parameter budget
    python -m train.experiment e2e_smollm2    # E2E data-to-text with SmolLM2-135M + LoRA: BLEU / ROUGE-L

Options: ``--out DIR`` (default ``experiments/``), ``--scale F`` (multiplies budgets and steps, e.g. 0.1 for a
smoke run) and ``--reuse`` (take the result of a finished run whose saved config is the same instead of training
it again: an experiment extended by a run, or one interrupted part-way, only trains what is missing). Each
writes ``DIR/NAME.json`` (every run's config, eval history and result) and PNG plots beside it.
The runs of one experiment execute one after another in this process; on a shared machine their wall-clock times
carry its noise, which the JSON records with each evaluation.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from train.cli import ArgumentParser
from train.config import dump, load_config
from train.loop import run
from train.metrics import read_log

ROOT = Path(__file__).resolve().parents[1]
SST2 = "configs/sst2_minilm_lora.yaml"


REUSE = False  # --reuse


def _finished(folder: Path, cfg) -> bool:
    """Whether ``folder`` holds a finished run of exactly ``cfg``."""
    try:
        return (folder / "config.yaml").read_text() == dump(cfg) and (folder / "result.json").is_file()
    except OSError:
        return False


def _run(name: str, config: str | None, overrides: list[str], out: Path) -> dict:
    """Run (or, with ``--reuse``, reuse) one configuration; each name keeps one run, ``out/runs/NAME/latest``
    (``output.overwrite``: a rerun replaces it once the new run has checkpointed)."""
    job = out / "runs" / name
    cfg = load_config(ROOT / config if config else None,
                      [*overrides, f"output.dir={job}", "output.overwrite=true"])
    folder = job / "latest"
    if REUSE and _finished(folder, cfg):
        print(f"\n=== {name}: reusing the finished run in {folder.resolve()}", flush=True)
    else:
        print(f"\n=== {name}: {' '.join(overrides)}", flush=True)
        folder = run(cfg, print_fn=lambda *a, **k: print(*a, **k, flush=True)).folder
    log = read_log(folder)
    evals = [r for r in log if r["kind"] == "eval"]
    train = [r for r in log if r["kind"] == "train"]
    saved = json.loads((folder / "result.json").read_text())
    return {"name": name, "overrides": overrides, "evals": evals, "result": saved,
            "final_train_loss": train[-1]["loss"] if train else None}


def _plot(runs: list[dict], metric: str, path: Path, title: str, x: str = "train_s") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        pts = [(e.get(x, 0.0), e[metric]) for e in r["evals"] if metric in e]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=r["name"])
    ax.set_xlabel("training time (s)" if x == "train_s" else x)
    ax.set_ylabel(f"validation {metric}")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sst2_methods(out: Path, scale: float) -> dict:
    """Same wall-clock budget for each method on SST-2 (MiniLM, 872-sentence validation split)."""
    budget = 300 * scale
    common = ["train.steps=100000", f"train.time_budget_s={budget}", "eval.every=25", "checkpoint.every=100000"]
    runs = [
        _run("lora", SST2, [*common, "train.method=lora", "optim.lr=1e-3"], out),
        # (the config's lora.alpha applies to adapters only)
        _run("full", SST2, [*common, "train.method=full", "optim.lr=5e-5", "lora.alpha=null"], out),
        _run("linear_probe", SST2, [*common, "train.method=linear_probe", "optim.lr=5e-3", "lora.alpha=null"], out),
    ]
    _plot(runs, "auc", out / "sst2_methods_auc.png", f"SST-2, MiniLM-L6: {budget:.0f}s budget each")
    _plot(runs, "loss", out / "sst2_methods_loss.png", f"SST-2, MiniLM-L6: {budget:.0f}s budget each")
    return {"runs": runs}


def rank_study(out: Path, scale: float) -> dict:
    """Rank r at fixed targets (q, v); then which matrices at a fixed budget of adapter parameters."""
    steps = max(int(300 * scale), 2)
    common = [f"train.steps={steps}", f"eval.every={max(steps // 4, 1)}", "checkpoint.every=100000", "optim.lr=1e-3"]
    runs = [_run(f"r{r}_qv", SST2, [*common, f"lora.r={r}", f"lora.alpha={2 * r}", "lora.targets=qv"], out)
            for r in (1, 2, 4, 8, 16, 64)]
    # Fixed budget: 8 x (384 + 384) adapter parameters per layer, spread over more matrices at lower rank. Every
    # linear layer at the lowest rank, r=1 (4 x 768 + 2 x 1920 per layer, plus the pooler), is 1.15x the budget.
    layouts = {"Wq r=8": (".*/self/query/kernel", 8), "Wq,Wv r=4": ("qv", 4),
               "Wq,Wk,Wv,Wo r=2": ("attention", 2), "all-linear r=1": ("all-linear", 1)}
    for name, (targets, r) in layouts.items():
        runs.append(_run(name.replace(",", "").replace(" ", "_").replace("=", ""), SST2,
                         [*common, f"lora.r={r}", f"lora.alpha={2 * r}", f"lora.targets={targets}"], out))
    _plot(runs[:6], "auc", out / "rank_study_auc.png", "SST-2, MiniLM-L6: LoRA rank (W_q, W_v)", x="step")
    _plot(runs[6:], "auc", out / "rank_study_matrices_auc.png",
          "SST-2, MiniLM-L6: which matrices, ~6K adapter params per layer", x="step")
    return {"runs": runs}


def e2e_smollm2(out: Path, scale: float) -> dict:
    """E2E NLG (split by MR) with SmolLM2-135M-Instruct and LoRA r=8 on q_proj, v_proj."""
    steps = max(int(400 * scale), 2)
    runs = [_run("e2e_lora", "configs/e2e_smollm2_lora.yaml",
                 [f"train.steps={steps}", f"eval.every={max(steps // 4, 1)}", "checkpoint.every=100000"], out)]
    _plot(runs, "loss", out / "e2e_smollm2_loss.png", "E2E, SmolLM2-135M + LoRA", x="step")
    return {"runs": runs}


def qlora_vs_lora(out: Path, scale: float) -> dict:
    """SST-2 / MiniLM, the same steps for each: LoRA over a float32 base, LoRA over a bfloat16 base, QLoRA over an
    NF4 base (block 64, double quantisation, bfloat16 compute; every linear kernel quantised). Quality (validation
    AUC, accuracy, loss) against memory: the frozen base as stored (all of it, the float word embeddings
    included), the optimizer state and the compiled train step's peak (XLA's memory analysis)."""
    steps = max(int(300 * scale), 2)
    common = [f"train.steps={steps}", f"eval.every={max(steps // 4, 1)}", "checkpoint.every=100000"]
    variants = {
        "lora_f32": ["train.method=lora", "train.precision=float32"],
        "lora_bf16_base": ["train.method=lora", "train.precision=bfloat16"],
        "qlora_nf4": ["train.method=qlora", "train.precision=bfloat16", "quant.type=nf4", "quant.block_size=64",
                      "quant.double_quant=true"],
    }
    runs = [_run(name, SST2, [*common, *extra], out) for name, extra in variants.items()]
    table = []
    for r in runs:
        res = r["result"]
        table.append({"name": r["name"], **{k: res["eval_after"].get(k) for k in ("auc", "accuracy", "loss")},
                      "frozen_bytes": res.get("frozen_bytes"), "optimizer_state_bytes": res["optimizer_state_bytes"],
                      "trainable_bytes": res["trainable_bytes"], "step_memory_bytes": res.get("step_memory_bytes"),
                      "train_s": res["train_s"]})
    print(f"\n{'run':<16} {'AUC':>7} {'acc':>7} {'loss':>7} {'base MiB':>9} {'opt MiB':>8} {'step MiB':>9}")
    for row in table:
        mib = [f"{row[k] / 2**20:.2f}" if row[k] is not None else "n/a"
               for k in ("frozen_bytes", "optimizer_state_bytes", "step_memory_bytes")]
        print(f"{row['name']:<16} {row['auc']:>7.4f} {row['accuracy']:>7.4f} {row['loss']:>7.4f} {mib[0]:>9} "
              f"{mib[1]:>8} {mib[2]:>9}")
    _plot(runs, "auc", out / "qlora_vs_lora_auc.png", f"SST-2, MiniLM-L6: {steps} steps each", x="step")
    _plot(runs, "loss", out / "qlora_vs_lora_loss.png", f"SST-2, MiniLM-L6: {steps} steps each", x="step")
    return {"runs": runs, "table": table}


EXPERIMENTS = {"sst2_methods": sst2_methods, "rank_study": rank_study, "e2e_smollm2": e2e_smollm2,
               "qlora_vs_lora": qlora_vs_lora}


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m train.experiment", description=__doc__.split("\n\n")[0])
    ap.add_argument("name", choices=sorted(EXPERIMENTS))
    ap.add_argument("--out", default="experiments")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--reuse", action="store_true", help="keep finished runs whose saved config is the same")
    args = ap.parse_args(argv)
    if not (math.isfinite(args.scale) and args.scale > 0):
        ap.error(f"--scale must be a positive number, got {args.scale}")
    global REUSE
    REUSE = args.reuse
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        ap.error(f"--out {args.out!r} is a file, expected a folder")

    def go():
        result = EXPERIMENTS[args.name](out, args.scale)
        (out / f"{args.name}.json").write_text(json.dumps(result, indent=1, default=float))
        print(f"\nwrote {out / (args.name + '.json')}")

    from train.cli import guarded

    return guarded(go)


if __name__ == "__main__":
    sys.exit(main())
