"""The seed presentations' experiments, each one command:

    python -m train.experiment sst2_methods   # LoRA vs full fine-tuning vs frozen encoder + head, one epoch each
    python -m train.experiment rank_study     # rank r = 1..64, and which matrices at a fixed parameter budget
    python -m train.experiment e2e_smollm2    # E2E data-to-text with SmolLM2-135M + LoRA: BLEU / ROUGE-L
    python -m train.experiment whisper_methods  # the seed's own: a pretrained speech encoder, spoken-language ID
    python -m train.experiment e2e_dpo        # E2E: SFT, then DPO on MR-contradicting pairs: slot error rate, BLEU

Options: ``--out DIR`` (default ``experiments/``), ``--scale F`` (multiplies budgets and steps, e.g. 0.1 for a
smoke run) and ``--reuse`` (take the result of a finished run whose saved config is the same instead of training
it again: an experiment extended by a run, or one interrupted part-way, only trains what is missing). Each
writes ``DIR/NAME.json`` (every run's config, eval history and result, and the provenance benchmark results
carry: commit, dirty flag, date, CPU, cores, load before / after, library versions, the exact command) and PNG
plots beside it. ``SOURCES`` names the code each experiment measures: ``python -m benchmarks.staleness`` fails
when a committed result is older than it. The runs of one experiment execute one after another in this process;
on a shared machine their wall-clock times carry its noise, so each run records the machine's load average
while it trained.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from train.cli import ArgumentParser
from train.config import dump, last_wins, load_config
from train.loop import run
from train.metrics import read_log

ROOT = Path(__file__).resolve().parents[1]
SST2 = "configs/sst2_minilm_lora.yaml"
SPEECH = "configs/whisper_langid_lora.yaml"


REUSE = False  # --reuse

# The code each experiment measures (files and folders relative to the repository root), read by
# ``python -m benchmarks.staleness`` without importing this module: keep it a literal.
SOURCES = {
    "sst2_methods": ("lora_jax", "train", "configs/sst2_minilm_lora.yaml"),
    "rank_study": ("lora_jax", "train", "configs/sst2_minilm_lora.yaml"),
    "qlora_vs_lora": ("lora_jax", "train", "configs/sst2_minilm_lora.yaml"),
    "e2e_smollm2": ("lora_jax", "train", "configs/e2e_smollm2_lora.yaml"),
    "e2e_dpo": ("lora_jax", "train", "configs/e2e_smollm2_lora.yaml", "configs/e2e_smollm2_dpo.yaml"),
    "whisper_methods": ("lora_jax", "train", "configs/whisper_langid_lora.yaml"),
}


class LoadSampler:
    """The machine's 1-minute load average sampled every ``every_s`` seconds in a background thread while a
    run trains: ``with LoadSampler() as load: ...``, then ``load.summary()``."""

    def __init__(self, every_s: float = 2.0):
        import threading

        self.every_s = every_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append(round(_load()[0], 2))
            self._stop.wait(self.every_s)

    def __enter__(self) -> LoadSampler:
        self.before = _load()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.after = _load()

    def summary(self) -> dict:
        """Load before / after (1, 5, 15 min), the 1-minute average's max and mean while training, the usable
        cores, and ``overloaded``: whether the 1-minute average exceeded the core count at any sample."""
        cores = _cores()
        peak = max(self.samples, default=self.before[0])
        return {
            "before": self.before,
            "after": self.after,
            "max_1min": peak,
            "mean_1min": round(sum(self.samples) / len(self.samples), 2) if self.samples else None,
            "samples": len(self.samples),
            "cores": cores,
            "overloaded": peak > cores,
        }


def _load() -> list[float]:
    import os

    return [round(x, 2) for x in os.getloadavg()]


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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
    cfg = load_config(
        ROOT / config if config else None, last_wins([*overrides, f"output.dir={job}", "output.overwrite=true"])
    )
    folder = job / "latest"
    load = None
    if REUSE and _finished(folder, cfg):
        print(f"\n=== {name}: reusing the finished run in {folder.resolve()}", flush=True)
        saved_load = folder / "load.json"
        load = json.loads(saved_load.read_text()) if saved_load.is_file() else None
    else:
        print(f"\n=== {name}: {' '.join(overrides)}", flush=True)
        with LoadSampler() as sampler:
            folder = run(cfg, print_fn=lambda *a, **k: print(*a, **k, flush=True)).folder
        load = sampler.summary()
        (folder / "load.json").write_text(json.dumps(load))
        print(
            f"load average while {name} ran: max {load['max_1min']}, mean {load['mean_1min']} on {load['cores']} cores"
            + (" (OVERLOADED: above the core count)" if load["overloaded"] else ""),
            flush=True,
        )
    log = read_log(folder)
    evals = [r for r in log if r["kind"] == "eval"]
    train = [r for r in log if r["kind"] == "train"]
    saved = json.loads((folder / "result.json").read_text())
    return {
        "name": name,
        "overrides": overrides,
        "evals": evals,
        "result": saved,
        "final_train_loss": train[-1]["loss"] if train else None,
        "load": load,
    }


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


def sst2_methods(out: Path, scale: float, config: str | None = SST2, extra: tuple[str, ...] = ()) -> dict:
    """LoRA vs full fine-tuning vs frozen encoder + trained head on SST-2 (MiniLM, the 872-sentence validation
    split): the same number of steps each, one epoch of the training set (67,349 sentences, 2,105 batches of 32)
    x ``scale``, evaluated 16 times along the way, plotted against training time (evaluation excluded).
    ``config`` / ``extra`` (overrides applied last): for tests."""
    from train import data as data_lib

    cfg = load_config(ROOT / config if config else None, list(extra))
    rows = data_lib.load_rows(cfg.data, "train")
    if cfg.data.eval_source is None:  # the job holds out data.eval_fraction of the rows
        rows = data_lib.split_rows(rows, cfg.data)[0]
    train_rows = len(rows)
    steps = max(int(math.ceil(train_rows / cfg.train.batch_size * scale)), 2)
    common = [f"train.steps={steps}", f"eval.every={max(-(-steps // 16), 1)}", "checkpoint.every=100000"]
    runs = [
        _run("lora", config, [*common, "train.method=lora", "optim.lr=1e-3", *extra], out),
        # (the config's lora.alpha applies to adapters only)
        _run("full", config, [*common, "train.method=full", "optim.lr=5e-5", "lora.alpha=null", *extra], out),
        _run(
            "linear_probe",
            config,
            [*common, "train.method=linear_probe", "optim.lr=5e-3", "lora.alpha=null", *extra],
            out,
        ),
    ]
    title = f"SST-2, MiniLM-L6: {steps:,} steps of {cfg.train.batch_size} each"
    _plot(runs, "auc", out / "sst2_methods_auc.png", title)
    _plot(runs, "loss", out / "sst2_methods_loss.png", title)
    table = _table(runs)
    for row in table:
        row["epochs"] = row["examples_seen"] / train_rows
    return {
        "runs": runs,
        "table": table,
        "train_rows": train_rows,
        "steps": steps,
        "batch_size": cfg.train.batch_size,
        "scale": scale,
    }


def _table(runs: list[dict]) -> list[dict]:
    """The methods table: trainable parameters, steps, final validation metrics, optimizer state, checkpoint."""
    rows = []
    for r in runs:
        res = r["result"]
        rows.append(
            {
                "name": r["name"],
                "trainable_params": res["trainable_params"],
                "steps": res["steps"],
                "examples_seen": res.get("examples_seen"),
                "train_s": res["train_s"],
                "wall_s": res.get("wall_s"),
                "step_compilations": res.get("step_compilations"),
                "batching": res.get("batching"),
                "batch_widths": res.get("batch_widths"),
                **{k: res["eval_after"].get(k) for k in ("auc", "accuracy", "loss")},
                "optimizer_state_bytes": res["optimizer_state_bytes"],
                "checkpoint_bytes": res["checkpoint_bytes"],
            }
        )
    print(
        f"\n{'run':<22} {'trainable':>11} {'steps':>6} {'AUC':>7} {'acc':>7} {'loss':>7} {'opt MB':>8} {'ckpt MB':>8}"
    )
    for row in rows:
        print(
            f"{row['name']:<22} {row['trainable_params']:>11,} {row['steps']:>6} {row['auc']:>7.4f} "
            f"{row['accuracy']:>7.4f} {row['loss']:>7.4f} {row['optimizer_state_bytes'] / 1e6:>8.2f} "
            f"{(row['checkpoint_bytes'] or 0) / 1e6:>8.2f}"
        )
    return rows


# whisper_methods: the training-time budget of each run at --scale 1, the seeds, the evaluations per run (spaced by
# training time, so every curve gets them whatever its method's step rate) and the methods with their learning rates.
WHISPER_BUDGET_S = 120
WHISPER_SEEDS = (0, 1, 2)
WHISPER_EVALS = 10
WHISPER_METHODS = {
    "lora": ["train.method=lora", "optim.lr=1e-3"],
    "full": ["train.method=full", "optim.lr=1e-4", "lora.alpha=null"],
    "frozen_head": ["train.method=linear_probe", "optim.lr=3e-3", "lora.alpha=null"],
}
WHISPER_LABELS = {
    "lora": "LoRA r=8 on q_proj, v_proj + head",
    "full": "full fine-tuning",
    "frozen_head": "frozen encoder + head",
}


def metric_at(evals: list[dict], metric: str, t: float) -> float | None:
    """A run's validation ``metric`` as it stood after ``t`` seconds of training: the newest evaluation made at
    or before ``t`` (``None`` before the first)."""
    past = [e for e in evals if metric in e and e.get("train_s", 0.0) <= t]
    return past[-1][metric] if past else None


def whisper_summary(runs: list[dict], budget: float, checkpoints: tuple[float, ...] = (0.25, 0.5, 1.0)) -> dict:
    """Per method over its seeds: final validation AUC / accuracy / loss (mean, min, max), steps; and at each
    fraction of the budget in ``checkpoints``, the method with the best mean AUC and whether it led in every
    seed (a ranking a reader can trust holds seed by seed, not only on average)."""
    by_method: dict[str, list[dict]] = {}
    for r in runs:
        by_method.setdefault(r["method"], []).append(r)
    table = []
    for method, rs in by_method.items():
        row = {"method": method, "seeds": [r["seed"] for r in rs]}
        for k in ("auc", "accuracy", "loss"):
            vals = [r["result"]["eval_after"][k] for r in rs]
            row[k] = {"mean": float(np.mean(vals)), "min": min(vals), "max": max(vals), "values": vals}
        row["steps"] = [r["result"]["steps"] for r in rs]
        row["train_s"] = [r["result"]["train_s"] for r in rs]
        row["trainable_params"] = rs[0]["result"]["trainable_params"]
        row["eval_points"] = [len([e for e in r["evals"] if "auc" in e]) for r in rs]
        row["overloaded_runs"] = sum(bool((r.get("load") or {}).get("overloaded")) for r in rs)
        table.append(row)
    seeds = sorted({r["seed"] for r in runs})
    leaders = []
    for frac in checkpoints:
        t = frac * budget
        per_seed = {}
        for seed in seeds:
            at = {
                r["method"]: (r["result"]["eval_after"]["auc"] if frac >= 1 else metric_at(r["evals"], "auc", t))
                for r in runs
                if r["seed"] == seed
            }
            at = {m: v for m, v in at.items() if v is not None}
            per_seed[seed] = max(at, key=at.get) if at else None
        means = {}
        for method, rs in by_method.items():
            vals = [r["result"]["eval_after"]["auc"] if frac >= 1 else metric_at(r["evals"], "auc", t) for r in rs]
            if all(v is not None for v in vals):
                means[method] = float(np.mean(vals))
        best = max(means, key=means.get) if means else None
        leaders.append(
            {
                "fraction": frac,
                "seconds": t,
                "mean_auc": means,
                "best": best,
                "best_per_seed": {str(k): v for k, v in per_seed.items()},
                "holds_in_every_seed": best is not None and all(v == best for v in per_seed.values()),
            }
        )
    return {"table": table, "leaders": leaders}


def _plot_seeds(runs: list[dict], metric: str, path: Path, title: str, cores: int) -> None:
    """Validation ``metric`` against training time: each seed a thin line (dashed when the machine's load
    average exceeded ``cores`` while it ran), the mean over seeds bold, the min-max band over seeds shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colours = dict(zip(WHISPER_METHODS, ("#4c72b0", "#c44e52", "#55a868")))
    overloaded = False
    for method, colour in colours.items():
        rs = [r for r in runs if r["method"] == method]
        if not rs:
            continue
        curves = []
        for r in rs:
            pts = [(e.get("train_s", 0.0), e[metric]) for e in r["evals"] if metric in e]
            loaded = bool((r.get("load") or {}).get("overloaded"))
            overloaded |= loaded
            ax.plot(*zip(*pts), color=colour, lw=0.8, alpha=0.6, ls="--" if loaded else "-", marker=".", ms=3)
            curves.append(pts)
        end = min(max(t for t, _ in c) for c in curves)
        grid = np.linspace(0.0, end, 50)
        vals = np.array(
            [[metric_at([{"train_s": t, metric: v} for t, v in c], metric, g) for g in grid] for c in curves]
        )
        ax.fill_between(grid, vals.min(0), vals.max(0), color=colour, alpha=0.15, lw=0)
        ax.plot(grid, vals.mean(0), color=colour, lw=2, label=f"{WHISPER_LABELS[method]} ({len(rs)} seeds)")
    ax.set_xlabel("training time (s; evaluation excluded)")
    ax.set_ylabel(f"validation {metric}")
    note = f"dashed: load average above {cores} cores during the run" if overloaded else f"load <= {cores} cores"
    ax.set_title(f"{title}\n{note}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def whisper_methods(
    out: Path,
    scale: float,
    config: str | None = SPEECH,
    extra: tuple[str, ...] = (),
    seeds: tuple[int, ...] = WHISPER_SEEDS,
    data: Path | None = None,
) -> dict:
    """The seed presentation's experiment: the pretrained speech encoder of ``SPEECH`` (the config's model) +
    a new classification head on spoken-language identification (10 languages of synthesised speech; validation
    sentences and whole voice families unseen in training; generated by train.speech_data if missing), the
    encoder run on the clip's own 2 s window (``data.max_length`` frames, not the checkpoint's 30 s).

    LoRA r=8 on the self-attention's q_proj / v_proj (+ head) vs full fine-tuning vs the frozen encoder + trained
    head, the same training-time budget each (``WHISPER_BUDGET_S x scale``, evaluation excluded), every method
    with each of ``seeds`` (the head's and adapters' init and the batch order), evaluated at every
    ``1 / WHISPER_EVALS`` of the budget (``eval.every_s``: with the evaluations before and after training,
    ``WHISPER_EVALS + 1`` points per curve), the machine's load sampled while each run trains. ``config`` / ``extra``
    (overrides applied last) / ``data`` (a generated task folder): for tests."""
    from train import speech_data

    folder = data if data is not None else speech_data.generate(ROOT / "data" / "speech_langid")
    budget = WHISPER_BUDGET_S * scale
    common = [
        "train.steps=1000000",
        f"train.time_budget_s={budget:g}",
        "eval.every=1000000",
        f"eval.every_s={budget / WHISPER_EVALS:g}",
        "checkpoint.every=1000000",
        f"data.source={folder / 'train.jsonl'}",
        f"data.eval_source={folder / 'eval.jsonl'}",
    ]
    runs = []
    for seed in seeds:  # the methods alternate, so that a change in the machine's load reaches all of them
        for method, over in WHISPER_METHODS.items():
            r = _run(f"whisper_{method}_s{seed}", config, [*common, *over, f"train.seed={seed}", *extra], out)
            runs.append({**r, "method": method, "seed": seed})
    cfg = load_config(ROOT / config if config else None, list(extra))
    title = f"Spoken-language ID, {cfg.model.name}: {budget:.0f} s of training each"
    _plot_seeds(runs, "auc", out / "whisper_methods_auc.png", title, _cores())
    _plot_seeds(runs, "loss", out / "whisper_methods_loss.png", title, _cores())
    summary = whisper_summary(runs, budget)
    eval_rows = sum(1 for _ in open(folder / "eval.jsonl"))
    train_rows = sum(1 for _ in open(folder / "train.jsonl"))
    print(f"\n{'method':<14} {'AUC mean (min-max)':>22} {'loss mean':>10} {'steps':>16} {'overloaded':>10}")
    for row in summary["table"]:
        a = row["auc"]
        print(
            f"{row['method']:<14} {a['mean']:>8.3f} ({a['min']:.3f}-{a['max']:.3f}) {row['loss']['mean']:>10.3f} "
            f"{str(row['steps']):>16} {row['overloaded_runs']:>10}"
        )
    for lead in summary["leaders"]:
        print(
            f"at {lead['seconds']:.0f} s: best mean AUC {lead['best']}"
            + ("" if lead["holds_in_every_seed"] else f" (not in every seed: {lead['best_per_seed']})")
        )
    return {
        "runs": runs,
        **summary,
        "budget_s": budget,
        "scale": scale,
        "seeds": list(seeds),
        "evals_per_run": WHISPER_EVALS,
        "batch_size": cfg.train.batch_size,
        "frames": cfg.data.max_length,
        "train_clips": train_rows,
        "eval_clips": eval_rows,
        "data_spec": json.loads((folder / "spec.json").read_text()),
    }


def rank_study(out: Path, scale: float) -> dict:
    """Rank r at fixed targets (q, v); then which matrices at a fixed budget of adapter parameters."""
    steps = max(int(300 * scale), 2)
    common = [f"train.steps={steps}", f"eval.every={max(steps // 4, 1)}", "checkpoint.every=100000", "optim.lr=1e-3"]
    runs = [
        _run(f"r{r}_qv", SST2, [*common, f"lora.r={r}", f"lora.alpha={2 * r}", "lora.targets=qv"], out)
        for r in (1, 2, 4, 8, 16, 64)
    ]
    # Fixed budget: 8 x (384 + 384) adapter parameters per layer, spread over more matrices at lower rank. Every
    # linear layer at the lowest rank, r=1 (4 x 768 + 2 x 1920 per layer, plus the pooler), is 1.15x the budget.
    layouts = {
        "Wq r=8": (".*/self/query/kernel", 8),
        "Wq,Wv r=4": ("qv", 4),
        "Wq,Wk,Wv,Wo r=2": ("attention", 2),
        "all-linear r=1": ("all-linear", 1),
    }
    for name, (targets, r) in layouts.items():
        runs.append(
            _run(
                name.replace(",", "").replace(" ", "_").replace("=", ""),
                SST2,
                [*common, f"lora.r={r}", f"lora.alpha={2 * r}", f"lora.targets={targets}"],
                out,
            )
        )
    _plot(runs[:6], "auc", out / "rank_study_auc.png", "SST-2, MiniLM-L6: LoRA rank (W_q, W_v)", x="step")
    _plot(
        runs[6:],
        "auc",
        out / "rank_study_matrices_auc.png",
        "SST-2, MiniLM-L6: which matrices, ~6K adapter params per layer",
        x="step",
    )
    return {"runs": runs}


# E2E's training split (492 MRs, 4219 rows) packs into 3602 rows of data.pack_length=96 tokens per epoch (1.17
# examples per row), 450 steps of train.batch_size=8 rows: 910 steps cover two epochs (the packing of each epoch
# differs a little; the result records the epochs actually covered).
E2E_STEPS = 910


def _shared_data(*parts: str) -> Path | None:
    """A file of the shared data: ``$LORA_JAX_SHARED_DATA`` or ``../shared/data`` beside the checkout."""
    import os

    roots = [Path(os.environ["LORA_JAX_SHARED_DATA"])] if os.environ.get("LORA_JAX_SHARED_DATA") else []
    for root in [*roots, ROOT.parent / "shared" / "data", ROOT / "shared" / "data"]:
        if (root / Path(*parts)).exists():
            return root / Path(*parts)
    return None


def e2e_smollm2(
    out: Path, scale: float, config: str | None = "configs/e2e_smollm2_lora.yaml", extra: tuple[str, ...] = ()
) -> dict:
    """E2E NLG (split by MR) with SmolLM2-135M-Instruct and LoRA r=8 on q_proj, v_proj, packed rows, ``E2E_STEPS``
    (two epochs of the training MRs) x ``scale`` steps. The saved adapter is then scored on every held-out MR
    against all its references, greedy and with the LoRA paper's beam search (:func:`train.predict.score_heldout`);
    the run's own BLEU before and after training is switched off. ``config`` / ``extra`` (overrides applied
    last): for tests."""
    from train import predict

    steps = max(int(math.ceil(E2E_STEPS * scale)), 2)
    # Four evaluations in training, the last at the final step (not one two steps before it).
    overrides = [
        f"train.steps={steps}",
        f"eval.every={max(-(-steps // 4), 1)}",
        "checkpoint.every=100000",
        "eval.generate_eval=0",
    ]
    source = _shared_data("e2e", "devset.csv")
    if config is not None and source is not None and not Path(load_config(ROOT / config).data.source).is_file():
        overrides.append(f"data.source={source}")
    runs = [_run("e2e_lora", config, [*overrides, *extra], out)]
    _plot(runs, "loss", out / "e2e_smollm2_loss.png", "E2E, SmolLM2-135M + LoRA", x="step")
    folder = out / "runs" / "e2e_lora" / "latest"
    print("\n=== scoring the adapter on every held-out MR", flush=True)
    scores = predict.score_heldout(
        predict.from_run(str(folder), merged=True),
        {"greedy": predict.GREEDY, "beam10_lp0.9_norepeat4": predict.PAPER_BEAM},
        print_fn=lambda *a: print(*a, flush=True),
    )
    res = runs[0]["result"]
    training = {
        "steps": res["steps"],
        "examples_seen": res["examples_seen"],
        "train_rows": scores["train_rows"],
        "train_mrs": scores["train_prompts"],
        "epochs": res["examples_seen"] / scores["train_rows"],
        "batching": res.get("batching"),
        "train_s": res["train_s"],
    }
    table = [
        {"name": name, **{k: v for k, v in d.items() if k != "predictions"}} for name, d in scores["decodings"].items()
    ]
    print(
        f"\ntraining: {training['steps']} steps, {training['examples_seen']} examples seen = "
        f"{training['epochs']:.2f} epochs of {training['train_rows']} training rows ({training['train_mrs']} MRs), "
        f"{training['train_s']:.0f} s"
    )
    print(f"{'decoding':<24} {'BLEU':>6} {'ROUGE-L':>8} {'MRs':>5} {'refs':>5} {'decode s':>9}")
    for row in table:
        print(
            f"{row['name']:<24} {row['bleu']:>6.2f} {row['rougeL']:>8.2f} {row['prompts_scored']:>5} "
            f"{row['references']:>5} {row['decode_s']:>9.1f}"
        )
    return {"runs": runs, "training": training, "heldout": scores, "table": table}


# SFT then DPO on E2E, sized for about 25 minutes of a 2-core machine: E2E_DPO_SFT_STEPS packed SFT steps, then
# E2E_DPO_STEPS preference steps (configs/e2e_smollm2_dpo.yaml) from the SFT adapter.
E2E_DPO_SFT_STEPS = 120
E2E_DPO = "configs/e2e_smollm2_dpo.yaml"


def build_e2e_pairs(
    train_rows: list[dict],
    eval_rows: list[dict],
    folder: Path,
    seed: int = 0,
    mr_column: str = "mr",
    ref_column: str = "ref",
) -> dict:
    """Preference pairs for E2E: each training reference is a chosen answer, its rejected twin contradicts the
    MR (:func:`train.e2e_slots.rejected_answer`); the held-out MRs get one pair each (their first reference), for
    the DPO run's evaluation. Writes ``folder/train.jsonl`` and ``folder/eval.jsonl``; returns the counts of
    each kind of corruption."""
    import collections
    import random

    from train import e2e_slots

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    kinds: dict[str, collections.Counter] = {}
    for name, rows in (
        ("train", train_rows),
        ("eval", list({r[mr_column]: r for r in eval_rows[::-1]}.values())[::-1]),
    ):
        counts: collections.Counter = collections.Counter()
        with open(folder / f"{name}.jsonl", "w") as f:
            for row in rows:
                made = e2e_slots.rejected_answer(row[mr_column], row[ref_column], rng)
                counts[made[1] if made else "none"] += 1
                if made:
                    f.write(
                        json.dumps(
                            {"mr": row[mr_column], "chosen": row[ref_column], "rejected": made[0], "kind": made[1]}
                        )
                        + "\n"
                    )
        kinds[name] = dict(counts)
    return kinds


def e2e_dpo(
    out: Path,
    scale: float,
    sft_config: str | None = "configs/e2e_smollm2_lora.yaml",
    dpo_config: str | None = E2E_DPO,
    extra: tuple[str, ...] = (),
) -> dict:
    """SFT, then DPO from the SFT adapter, on E2E with SmolLM2-135M-Instruct: slot error rate
    (:mod:`train.e2e_slots`) and BLEU / ROUGE-L of greedy decoding on every held-out MR, SFT alone vs SFT + DPO.

    SFT: ``configs/e2e_smollm2_lora.yaml`` for ``E2E_DPO_SFT_STEPS x scale`` steps. Pairs: every training
    reference with a rejected twin that contradicts its MR (:func:`build_e2e_pairs`). DPO:
    ``configs/e2e_smollm2_dpo.yaml`` (sigmoid loss, beta 0.1; its steps x ``scale``) with ``model.adapter`` = the
    SFT run: the SFT update is merged into the frozen base, so the reference policy is the SFT model. The
    machine's load average is recorded before and after each stage. ``extra``: overrides of both runs (tests)."""
    import os
    import time

    from train import data as data_lib
    from train import e2e_slots, predict
    from train import metrics as metrics_lib

    def load() -> list[float]:
        return [round(x, 2) for x in os.getloadavg()]

    t0 = time.perf_counter()
    loads = {"start": load()}
    sft_steps = max(int(math.ceil(E2E_DPO_SFT_STEPS * scale)), 2)
    # (evaluation before and after only, on 8 held-out MRs: the held-out scoring below covers all of them)
    sft_over = [
        f"train.steps={sft_steps}",
        "eval.every=100000",
        "data.max_eval_examples=8",
        "checkpoint.every=100000",
        "eval.generate_eval=0",
        "eval.generate_samples=1",
        f"optim.warmup_steps={max(sft_steps // 10, 1)}",
    ]
    source = _shared_data("e2e", "devset.csv")
    if sft_config is not None and source is not None and not Path(load_config(ROOT / sft_config).data.source).is_file():
        sft_over.append(f"data.source={source}")
    sft = _run("e2e_sft", sft_config, [*sft_over, *extra], out)
    loads["after_sft"] = load()
    sft_folder = out / "runs" / "e2e_sft" / "latest"
    sft_cfg = load_config(sft_folder / "config.yaml")

    train_rows, eval_rows = predict.heldout_split(sft_cfg)
    pairs_dir = out / "runs" / "e2e_dpo_pairs"  # generated, reproducible: not committed
    kinds = build_e2e_pairs(
        train_rows,
        eval_rows,
        pairs_dir,
        mr_column=sft_cfg.data.prompt_column,
        ref_column=sft_cfg.data.completion_column,
    )
    dpo_cfg = load_config(ROOT / dpo_config if dpo_config else None)
    dpo_steps = max(int(math.ceil(dpo_cfg.train.steps * scale)), 2)
    dpo_over = [
        f"train.steps={dpo_steps}",
        f"eval.every={max(-(-dpo_steps // 2), 1)}",
        "checkpoint.every=100000",
        "data.max_eval_examples=16",
        f"data.source={pairs_dir / 'train.jsonl'}",
        f"data.eval_source={pairs_dir / 'eval.jsonl'}",
        f"model.adapter={sft_folder.resolve()}",
    ]
    dpo = _run("e2e_dpo", dpo_config, [*dpo_over, *extra], out)
    loads["after_dpo"] = load()

    # Every held-out MR, greedy, against all its references.
    prompts, refs = predict.reference_groups(eval_rows, sft_cfg.data)
    mr_of = {data_lib.format_prompt(r, sft_cfg.data): r[sft_cfg.data.prompt_column] for r in eval_rows}
    mrs = [mr_of[p] for p in prompts]
    floor = e2e_slots.corpus_ser([mr for mr, rs in zip(mrs, refs) for _ in rs], [x for rs in refs for x in rs])
    scores = {"human_references": {"slot_errors": floor}}
    for name, folder in (("sft", sft_folder), ("sft_dpo", out / "runs" / "e2e_dpo" / "latest")):
        print(f"\n=== {name}: decoding {len(prompts)} held-out MRs", flush=True)
        p = predict.from_run(str(folder), merged=True)
        t1 = time.perf_counter()
        preds = predict.generate(
            p, prompts, num_beams=1, max_new_tokens=sft_cfg.eval.max_new_tokens, batch_size=sft_cfg.eval.batch_size
        )
        scores[name] = {
            **metrics_lib.generation(preds, refs),
            "slot_errors": e2e_slots.corpus_ser(mrs, preds),
            "decode_s": time.perf_counter() - t1,
            "predictions": preds,
        }
    loads["end"] = load()
    _plot_e2e_dpo(scores, dpo, out)
    table = [
        {
            "name": n,
            "ser": scores[n]["slot_errors"]["ser"],
            **{k: scores[n]["slot_errors"][k] for k in ("missing", "wrong", "added")},
            "bleu": scores[n].get("bleu"),
            "rougeL": scores[n].get("rougeL"),
        }
        for n in ("human_references", "sft", "sft_dpo")
    ]
    print(f"\n{'':<18} {'SER %':>7} {'missing':>8} {'wrong':>6} {'added':>6} {'BLEU':>6} {'ROUGE-L':>8}")
    for row in table:
        print(
            f"{row['name']:<18} {100 * row['ser']:>7.2f} {100 * row['missing']:>8.2f} {100 * row['wrong']:>6.2f} "
            f"{100 * row['added']:>6.2f} {row['bleu'] or float('nan'):>6.2f} {row['rougeL'] or float('nan'):>8.2f}"
        )
    from benchmarks.common import cpu_info, git_state

    return {
        "runs": [sft, dpo],
        "pairs": kinds,
        "heldout": {"mrs": mrs, "references": refs, "prompts": prompts},
        "scores": scores,
        "table": table,
        "sft_steps": sft_steps,
        "dpo_steps": dpo_steps,
        "provenance": {
            "git": git_state(["train", "lora_jax", "configs"]),
            "cpu": cpu_info(),
            "load_average": loads,
            "wall_s": time.perf_counter() - t0,
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "command": f"python -m train.experiment e2e_dpo --scale {scale:g}",
        },
    }


def _plot_e2e_dpo(scores: dict, dpo: dict, out: Path) -> None:
    """Two figures: the slot errors (missing / wrong / added, stacked) and BLEU of the human references, SFT and
    SFT + DPO on the held-out MRs; the DPO run's training curve (TRL's rewards/margins and rewards/accuracies)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [("human_references", "human refs"), ("sft", "SFT"), ("sft_dpo", "SFT + DPO")]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.6))
    bottom = np.zeros(len(names))
    for kind, colour in (("missing", "#c44e52"), ("wrong", "#dd8452"), ("added", "#8172b3")):
        vals = np.array([100 * scores[n]["slot_errors"][kind] for n, _ in names])
        ax[0].bar([label for _, label in names], vals, bottom=bottom, label=kind, color=colour)
        bottom += vals
    for i, v in enumerate(bottom):
        ax[0].text(i, v, f"{v:.1f}%", ha="center", va="bottom")
    ax[0].set_ylabel("slot error rate (%)")
    ax[0].set_title("E2E held-out MRs: slot errors")
    ax[0].legend()
    bleu = [scores[n].get("bleu", 0.0) for n, _ in names[1:]]
    ax[1].bar([label for _, label in names[1:]], bleu, color="#4c72b0")
    for i, v in enumerate(bleu):
        ax[1].text(i, v, f"{v:.1f}", ha="center", va="bottom")
    ax[1].set_ylabel("BLEU (greedy)")
    ax[1].set_title("BLEU")
    fig.tight_layout()
    fig.savefig(out / "e2e_dpo_scores.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for key, style in (("rewards/margins", "-"), ("rewards/accuracies", "--")):
        pts = [(e["step"], e[key]) for e in dpo["evals"] if key in e]
        if pts:
            ax.plot(*zip(*pts), style, marker="o", ms=3, label=f"held-out {key}")
    ax.set_xlabel("DPO step")
    ax.set_title("DPO from the SFT adapter: held-out pairs")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "e2e_dpo_rewards.png", dpi=120)
    plt.close(fig)


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
        "qlora_nf4": [
            "train.method=qlora",
            "train.precision=bfloat16",
            "quant.type=nf4",
            "quant.block_size=64",
            "quant.double_quant=true",
        ],
    }
    runs = [_run(name, SST2, [*common, *extra], out) for name, extra in variants.items()]
    table = []
    for r in runs:
        res = r["result"]
        table.append(
            {
                "name": r["name"],
                **{k: res["eval_after"].get(k) for k in ("auc", "accuracy", "loss")},
                "frozen_bytes": res.get("frozen_bytes"),
                "optimizer_state_bytes": res["optimizer_state_bytes"],
                "trainable_bytes": res["trainable_bytes"],
                "step_memory_bytes": res.get("step_memory_bytes"),
                "train_s": res["train_s"],
            }
        )
    print(f"\n{'run':<16} {'AUC':>7} {'acc':>7} {'loss':>7} {'base MiB':>9} {'opt MiB':>8} {'step MiB':>9}")
    for row in table:
        mib = [
            f"{row[k] / 2**20:.2f}" if row[k] is not None else "n/a"
            for k in ("frozen_bytes", "optimizer_state_bytes", "step_memory_bytes")
        ]
        print(
            f"{row['name']:<16} {row['auc']:>7.4f} {row['accuracy']:>7.4f} {row['loss']:>7.4f} {mib[0]:>9} "
            f"{mib[1]:>8} {mib[2]:>9}"
        )
    _plot(runs, "auc", out / "qlora_vs_lora_auc.png", f"SST-2, MiniLM-L6: {steps} steps each", x="step")
    _plot(runs, "loss", out / "qlora_vs_lora_loss.png", f"SST-2, MiniLM-L6: {steps} steps each", x="step")
    return {"runs": runs, "table": table}


EXPERIMENTS = {
    "sst2_methods": sst2_methods,
    "rank_study": rank_study,
    "e2e_smollm2": e2e_smollm2,
    "qlora_vs_lora": qlora_vs_lora,
    "whisper_methods": whisper_methods,
    "e2e_dpo": e2e_dpo,
}


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
        import shlex

        from benchmarks.common import Recorder

        argv_ = list(sys.argv[1:] if argv is None else argv)
        recorder = Recorder(
            args.name,
            SOURCES[args.name],
            command=" ".join(["python -m train.experiment", *map(shlex.quote, argv_)]),
            kind="experiment",
        )
        result = EXPERIMENTS[args.name](out, args.scale)
        path = recorder.write(args.name, result, out)
        print(f"\nwrote {path}")

    from train.cli import guarded

    return guarded(go)


if __name__ == "__main__":
    sys.exit(main())
