"""The seed presentations' experiments, each one command:

    python -m train.experiment sst2_methods   # LoRA vs full fine-tuning vs frozen encoder + head, one epoch each
    python -m train.experiment rank_study     # rank r = 1..64, and which matrices at a fixed parameter budget
    python -m train.experiment e2e_smollm2    # E2E data-to-text with SmolLM2-135M + LoRA: BLEU / ROUGE-L
    python -m train.experiment whisper_methods  # the seed's own: a pretrained speech encoder, spoken-language ID
    python -m train.experiment e2e_dpo        # E2E: SFT, then DPO on MR-contradicting pairs: slot error rate, BLEU

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

import numpy as np

from train.cli import ArgumentParser
from train.config import dump, last_wins, load_config
from train.loop import run
from train.metrics import read_log

ROOT = Path(__file__).resolve().parents[1]
SST2 = "configs/sst2_minilm_lora.yaml"
SPEECH = "configs/whisper_langid_lora.yaml"


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
    cfg = load_config(
        ROOT / config if config else None, last_wins([*overrides, f"output.dir={job}", "output.overwrite=true"])
    )
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
    return {
        "name": name,
        "overrides": overrides,
        "evals": evals,
        "result": saved,
        "final_train_loss": train[-1]["loss"] if train else None,
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


def whisper_methods(out: Path, scale: float) -> dict:
    """The seed presentation's experiment: the pretrained speech encoder of ``SPEECH`` (OpenAI's base model) + a
    new classification head on spoken-language identification (10 languages of synthesised speech, validation
    sentences and voices unseen in training; generated by train.speech_data if missing), 2 s clips. LoRA r=8 on
    the self-attention's q_proj / v_proj (+ head) vs full fine-tuning vs the frozen encoder + trained head, the
    same wall-clock training budget each (evaluation excluded). Evaluations are spaced by each method's step
    rate (about 8 per run)."""
    from train import speech_data

    speech_data.generate(ROOT / "data" / "speech_langid")
    budget = 600 * scale
    common = [
        "train.steps=100000",
        f"train.time_budget_s={budget}",
        "checkpoint.every=100000",
        f"data.source={ROOT / 'data/speech_langid/train.jsonl'}",
        f"data.eval_source={ROOT / 'data/speech_langid/eval.jsonl'}",
    ]
    every = lambda steps_per_budget: f"eval.every={max(int(steps_per_budget * scale / 8), 1)}"  # noqa: E731
    runs = [
        _run("whisper_lora", SPEECH, [*common, "train.method=lora", "optim.lr=1e-3", every(90)], out),
        _run("whisper_full", SPEECH, [*common, "train.method=full", "optim.lr=1e-4", every(35)], out),
        _run("whisper_frozen_head", SPEECH, [*common, "train.method=linear_probe", "optim.lr=3e-3", every(160)], out),
    ]
    title = f"Spoken-language ID, {load_config(ROOT / SPEECH).model.name}: {budget:.0f}s budget each"
    _plot(runs, "auc", out / "whisper_methods_auc.png", title)
    _plot(runs, "loss", out / "whisper_methods_loss.png", title)
    return {"runs": runs, "table": _table(runs)}


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
        result = EXPERIMENTS[args.name](out, args.scale)
        (out / f"{args.name}.json").write_text(json.dumps(result, indent=1, default=float))
        print(f"\nwrote {out / (args.name + '.json')}")

    from train.cli import guarded

    return guarded(go)


if __name__ == "__main__":
    sys.exit(main())
