"""Causal-LM training throughput in useful tokens per second: the training job's step on packed rows vs PEFT +
transformers on padding-free flattened batches, the same examples in the same order, side by side.

    .venv/bin/python -m benchmarks.causal_tokens [--quick] [--steps 8] [--rounds 8] [--batch 2] [--threads 1,2]
                                                 [--data FILE]

The task (``configs/e2e_smollm2_lora.yaml``): E2E NLG (``../shared/data/e2e/devset.csv`` or ``--data`` /
``$LORA_JAX_SHARED_DATA``), the training split only (10% of the MRs held out, as the job splits them),
SmolLM2-135M-Instruct (the real weights, ``SmolLM2-135M-Instruct-Q4_1``, dequantised to float32), LoRA r=8
(alpha 16) on q_proj and v_proj, AdamW with the config's schedule and gradient clipping, float32, the loss on each
completion only.

- **ours**: ``train.loop.make_train_step`` (jitted, adapters and optimizer state donated) fed by
  ``train.loop.training_batches``: ``train.data.PackedBatches``, ``--batch`` rows (``train.batch_size``; 2 by
  default, the config's 8 on request, to keep a run to a few minutes on 2 cores) of ``data.pack_length``
  tokens (null: ``data.max_length``), several examples per row kept apart by segment ids, positions restarting
  per example, the rest of a row padding;
- **peft**: ``transformers.LlamaForCausalLM`` of the same config holding the same (dequantised) weights, converted
  by ``lora_jax.models.to_hf_weights``, ``peft.get_peft_model`` with ``LoraConfig(r=8, target_modules=["q_proj",
  "v_proj"])``, ``torch.optim.AdamW`` with the same schedule (``LambdaLR``) and ``clip_grad_norm_``, eager
  PyTorch, SDPA attention, no KV cache (with one, transformers skips the packed-sequence mask below). It runs once
  per torch thread count of ``--threads`` (default: 1 and all cores; each its own model, the same init), and the
  goal compares ours with the fastest: on a busy machine PyTorch's OpenMP threads wait on each other at every op
  (measured on a shared 2-core machine: 2 threads 4-10x slower than 1), so "all cores" alone can be a straw man.
  Each step's batch is ``DataCollatorWithFlattening`` over the examples of
  our step's packed rows, in their order: one row of concatenated examples, no padding, ``position_ids``
  restarting per example and no attention mask, from which transformers (``masking_utils.
  find_packed_sequence_indices``) builds a block-diagonal causal mask, so attention stays inside each example
  (checked: an untimed forward pass of the first flattened batch gives each example's logits as run alone,
  recorded as ``peft_packing_check``). Labels are -100 on the prompt tokens (and at each example's first token,
  the collator's separator), so the loss covers the same completion tokens as ours.

Useful tokens are the real (non-padding) input tokens of a step: the same examples on both sides, so the same
count every step (checked, and recorded with the loss-bearing token counts). Step 0 of each is a warm-up
(our compilation, PEFT's first step), timed and recorded but excluded from the ratio; steps 1..``--steps`` are
cut into ``--rounds`` rounds, in each of which every runner runs the same steps, each round starting at the next
runner; round
times include everything a training loop does per step (packing or collating the batch, host to device). The
metric is useful tokens per second; ours / PEFT is the fastest PEFT runner's total time over ours (equal
tokens), with the paired per-round ratios' median and 95% bootstrap CI. Goal (issue 16): ours >= 1.3x PEFT's
useful tokens per second.

``--quick``: the first decoder layer of the model only (both sides), 2 rows per step, 32 training examples,
2 steps in 2 rounds (a smoke run; no conclusions from its times). Writes ``benchmarks/results/causal_tokens.json``
with the provenance of :class:`benchmarks.common.Recorder`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from benchmarks.common import ROOT, Recorder, bootstrap_median_ci, paired_summary, ratio_verdict, table
from benchmarks.time_to_accuracy import peft_lora, torch_update  # (PEFT trained as the job trains)

# The code this benchmark measures (benchmarks.staleness).
SOURCES = (
    "benchmarks/causal_tokens.py",
    "benchmarks/common.py",
    "benchmarks/time_to_accuracy.py",
    "configs/e2e_smollm2_lora.yaml",
    "train/loop.py",
    "train/data.py",
    "train/tasks.py",
    "train/config.py",
    "lora_jax/core.py",
    "lora_jax/ops.py",
    "lora_jax/models/decoder.py",
    "lora_jax/models/llama.py",
    "lora_jax/models/layers.py",
)
CONFIG = ROOT / "configs" / "e2e_smollm2_lora.yaml"
SPEEDUP_GOAL = 1.3  # ours' useful tokens per second / PEFT's
LABELS = {"ours": "ours (make_train_step, packed rows)", "peft": "HF PEFT + transformers (DataCollatorWithFlattening)"}


def data_file(given: str | None) -> Path:
    """The E2E dev set: ``given``, ``$LORA_JAX_SHARED_DATA/e2e/devset.csv``, or ``shared/data/e2e/devset.csv``
    next to / inside the checkout (as the tests look for it)."""
    candidates = [Path(given)] if given else []
    if os.environ.get("LORA_JAX_SHARED_DATA"):
        candidates.append(Path(os.environ["LORA_JAX_SHARED_DATA"]) / "e2e" / "devset.csv")
    candidates += [
        ROOT.parent / "shared" / "data" / "e2e" / "devset.csv",
        ROOT / "shared" / "data" / "e2e" / "devset.csv",
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"E2E devset.csv not found in {[str(p) for p in candidates]}: pass --data or set LORA_JAX_SHARED_DATA"
    )


def build_config(args, path: Path):
    from train.config import load_config

    overrides = [
        f"data.source={path}",
        f"train.steps={args.steps + 1}",
        f"train.batch_size={args.batch}",
        f"lora.r={args.r}",
        f"lora.alpha={2 * args.r}",
        "lora.targets=qv",
        f"train.seed={args.seed}",
    ]
    if args.max_train:
        overrides.append(f"data.max_train_examples={args.max_train}")
    return load_config(str(CONFIG), overrides)


def load_model(cfg, layers: int | None):
    """:func:`train.loop.load_model`; ``layers``: keep only the first ``layers`` decoder layers (``--quick``)."""
    import jax

    from lora_jax import models, stacking
    from train import loop

    model, params, tokenizer, model_cfg = loop.load_model(cfg)
    if layers:
        model_cfg = dataclasses.replace(model_cfg, num_hidden_layers=layers)
        if stacking.STACK in params["model"]:  # scanned: every leaf of the stack leads with the layer axis
            body = {
                **params["model"],
                stacking.STACK: jax.tree.map(lambda a: a[:layers], params["model"][stacking.STACK]),
            }
        else:
            keep = {f"layers_{i}" for i in range(layers)}
            body = {k: v for k, v in params["model"].items() if not k.startswith("layers_") or k in keep}
        params = {**params, "model": body}
        model = models.build(model_cfg, task="causal-lm")
        if hasattr(model, "remat"):  # as loop.load_model sets it
            model = model.clone(remat=loop.remat_name(cfg.train.remat))
    return model, params, tokenizer, model_cfg


def example_features(data) -> list[dict[str, list[int]]]:
    """Each training example as ``DataCollatorWithFlattening`` takes it: its real tokens, and labels that are the
    token where our ``loss_mask`` says the previous position predicts it (a completion token), else -100."""
    feats = []
    for ids, mask, lm in zip(data.input_ids, data.attention_mask, data.loss_mask):
        n = int(mask.sum())
        ids = [int(t) for t in ids[:n]]
        labels = [-100] + [t if lm[j] else -100 for j, t in enumerate(ids[1:])]
        feats.append({"input_ids": ids, "labels": labels})
    return feats


# ------------------------------------------------------------------------------------------------ ours


class Ours:
    """The training job's step on its packed batches; ``run(start, steps)`` trains steps ``start..start+steps-1``."""

    def __init__(self, cfg, train_data, model, params):
        from train import loop

        self.cfg = cfg
        self.batches = loop.training_batches(cfg, train_data)
        init_key, self.step_key = loop.run_keys(cfg)
        prepared = loop.prepare(cfg, params, init_key)
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
        self.losses: list[float] = []
        self.real_tokens: list[int] = []
        self.loss_tokens: list[int] = []
        self.slots: list[int] = []
        self.trainable_count = sum(int(np.size(x)) for x in jax.tree.leaves(self.trainable))

    def run(self, start: int, steps: int) -> None:
        from train import loop

        metrics = []
        for step in range(start, start + steps):
            host = self.batches(step)
            self.real_tokens.append(int(host["attention_mask"].sum()))
            self.loss_tokens.append(int(host["loss_mask"][:, :-1].sum()))
            self.slots.append(int(host["attention_mask"].size))
            batch = jax.device_put(loop.micro_batches(host, 1))  # a gradient-accumulation axis of 1
            self.trainable, self.opt_state, m = self.step_fn(
                self.trainable, self.opt_state, self.frozen, batch, jax.random.fold_in(self.step_key, step)
            )
            metrics.append(m["loss"])
        self.losses += [float(x) for x in jax.block_until_ready(metrics)]  # read once per round

    def compilations(self) -> int | None:
        size = getattr(self.step_fn, "_cache_size", None)
        return int(size()) if callable(size) else None


# ------------------------------------------------------------------------------------------------ PEFT


class Peft:
    """transformers + PEFT, a plain training loop over ``DataCollatorWithFlattening`` batches of the same
    examples (``examples(step)``: the example indices of our step ``step``, in order)."""

    def __init__(self, cfg, model_cfg, params, features: list[dict], examples, threads: int):
        import peft
        import torch
        import transformers

        from lora_jax import models

        torch.set_num_threads(threads)
        torch.manual_seed(cfg.train.seed)  # the same LoRA init for every thread count
        self.torch, self.threads = torch, threads
        hf_cfg = model_cfg.to_hf()
        hf_cfg._attn_implementation = "sdpa"
        # No KV cache in training: with one (transformers builds a DynamicCache when config.use_cache is true, in
        # training mode too), masking_utils skips the packed-sequence detection from position_ids and the
        # flattened examples attend to each other (measured: logits off by ~0.5 on a tiny Llama).
        hf_cfg.use_cache = False
        base = transformers.LlamaForCausalLM(hf_cfg)
        state = {k: torch.tensor(np.asarray(v, np.float32)) for k, v in models.to_hf_weights(params, model_cfg).items()}
        missing, unexpected = base.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if hf_cfg.tie_word_embeddings else set()
        if set(missing) - tied or unexpected:
            raise RuntimeError(
                f"the converted weights do not fit LlamaForCausalLM: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        if tied:
            base.tie_weights()
        self.base_parameters = sum(p.numel() for p in base.parameters())
        self.model, self.params, self.opt, self.scheduler = peft_lora(base, cfg, "CAUSAL_LM", ["q_proj", "v_proj"])
        self.trainable_count = sum(p.numel() for p in self.params)
        self.grad_clip = cfg.optim.grad_clip
        self.collate = transformers.DataCollatorWithFlattening(return_tensors="pt")
        self.features, self.examples = features, examples
        self.losses: list[Any] = []
        self.real_tokens: list[int] = []
        self.loss_tokens: list[int] = []
        self.slots: list[int] = []
        self.info = {
            "torch": torch.__version__,
            "peft": peft.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "attn_implementation": base.config._attn_implementation,
            "use_cache": False,
            "weights": "ours, dequantised float32, converted by lora_jax.models.to_hf_weights",
        }

    def batch(self, step: int) -> dict:
        return self.collate([self.features[i] for i in self.examples(step)])

    def run(self, start: int, steps: int) -> None:
        torch = self.torch
        torch.set_num_threads(self.threads)  # process-wide: each PEFT runner sets its own
        for step in range(start, start + steps):
            batch = self.batch(step)
            self.real_tokens.append(int(batch["input_ids"].numel()))
            self.loss_tokens.append(int((batch["labels"] != -100).sum()))
            self.slots.append(int(batch["input_ids"].numel()))  # one row, no padding
            loss = self.model(**batch, use_cache=False).loss
            torch_update(loss, self.params, self.opt, self.scheduler, self.grad_clip)
            self.losses.append(loss.detach())
        self.losses = [float(x) for x in self.losses]

    def packing_check(self, step: int, examples: int = 3) -> dict[str, Any]:
        """Untimed: the logits of the first ``examples`` examples of step ``step``'s flattened batch, against each
        example run alone (max |difference|): zero up to float32 when attention stays inside each example."""
        torch = self.torch
        batch = self.batch(step)
        idx = list(self.examples(step))[:examples]
        torch.set_num_threads(self.threads)
        self.model.eval()
        diffs = []
        with torch.no_grad():
            packed = self.model(
                input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
            ).logits[0]
            at = 0
            for i in idx:
                ids = torch.tensor([self.features[i]["input_ids"]])
                alone = self.model(input_ids=ids, use_cache=False).logits[0]
                diffs.append(float((packed[at : at + ids.shape[1]] - alone).abs().max()))
                at += ids.shape[1]
        self.model.train()
        return {"examples": len(idx), "max_abs_logit_diff": max(diffs), "per_example": diffs}


# ------------------------------------------------------------------------------------------------ main


def goals(speedup: float) -> dict[str, dict]:
    """The issue's goal as a check that can fail."""
    return {
        f"ours / PEFT useful tokens per second >= {SPEEDUP_GOAL}": {"value": speedup, "met": speedup >= SPEEDUP_GOAL}
    }


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.causal_tokens",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="1 layer, 2 rows, 32 examples, 2 steps in 2 rounds")
    ap.add_argument("--steps", type=int, default=8, help="timed steps (after one warm-up step each)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument(
        "--batch",
        type=int,
        default=2,
        help="packed rows per step (train.batch_size; the config's 8 "
        "makes a run of several minutes per round on 2 cores)",
    )
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers")
    ap.add_argument("--max-train", type=int, default=None, help="use only the first N training examples")
    ap.add_argument(
        "--threads",
        default=None,
        help="PEFT runs once per torch thread count in this comma-separated list; the goal compares ours "
        "with the fastest (default: 1 and all cores)",
    )
    ap.add_argument("--data", default=None, help="the E2E devset.csv")
    ap.add_argument("--out", default=None, help="results name (default causal_tokens[_quick])")
    ap.add_argument("--out-dir", default=None, help="write the JSON here instead of benchmarks/results/")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.rounds, args.batch = 2, 2, 2
        args.layers, args.max_train = args.layers or 1, args.max_train or 32
    if not 1 <= args.rounds <= args.steps:
        ap.error(f"--rounds must be between 1 and --steps ({args.steps}), got {args.rounds}")
    args.threads = (
        sorted({int(t) for t in args.threads.split(",")}) if args.threads else sorted({1, os.cpu_count() or 1})
    )
    args.out = args.out or ("causal_tokens_quick" if args.quick else "causal_tokens")
    return args


def main(argv=None) -> dict:
    from train import data as data_lib

    args = parse_args(argv)
    recorder = Recorder("causal_tokens", SOURCES, argv)
    t_start = time.perf_counter()
    cfg = build_config(args, data_file(args.data))

    t0 = time.perf_counter()
    model, params, tokenizer, model_cfg = load_model(cfg, args.layers)
    train_data, _ = data_lib.load_tokenized(
        cfg.data, tokenizer, cfg.model.name, getattr(model_cfg, "max_position_embeddings", None)
    )
    ours = Ours(cfg, train_data, model, params)
    setup = {"ours_s": time.perf_counter() - t0}

    def examples(step: int) -> list[int]:
        return [int(i) for row in ours.batches.row_indices(step) for i in row]

    runners: dict[str, Any] = {"ours": ours}
    features = example_features(train_data)
    for t in args.threads:
        t0 = time.perf_counter()
        runners[f"peft-{t}t"] = Peft(cfg, model_cfg, params, features, examples, t)
        setup[f"peft-{t}t_s"] = time.perf_counter() - t0
    del params
    pefts = [n for n in runners if n != "ours"]
    labels = {"ours": LABELS["ours"], **{n: f"{LABELS['peft']}, {runners[n].threads} torch thread(s)" for n in pefts}}
    packing_check = runners[pefts[0]].packing_check(0)

    warmup: dict[str, float] = {}
    for name, r in runners.items():  # step 0: our compilation, PEFT's first step; not in the ratio
        t0 = time.perf_counter()
        r.run(0, 1)
        warmup[name] = time.perf_counter() - t0
    per_round = [args.steps // args.rounds + (i < args.steps % args.rounds) for i in range(args.rounds)]
    names = list(runners)
    times: dict[str, list[float]] = {n: [] for n in names}
    tokens_per_round: list[int] = []
    step = 1
    for i, steps in enumerate(per_round):
        for name in names[i % len(names) :] + names[: i % len(names)]:  # each round starts at the next runner
            t0 = time.perf_counter()
            runners[name].run(step, steps)
            times[name].append(time.perf_counter() - t0)
        tokens_per_round.append(sum(ours.real_tokens[step : step + steps]))
        step += steps
        print(
            f"round {i + 1}/{args.rounds} ({steps} steps, {tokens_per_round[-1]:,} useful tokens): "
            + ", ".join(f"{n} {times[n][-1]:.1f} s (loss {runners[n].losses[-1]:.3f})" for n in names),
            flush=True,
        )

    for n in pefts:
        r = runners[n]
        if r.real_tokens != ours.real_tokens or r.loss_tokens != ours.loss_tokens:
            raise AssertionError(
                f"ours and {n} consumed different tokens: real {ours.real_tokens} vs "
                f"{r.real_tokens}, loss-bearing {ours.loss_tokens} vs {r.loss_tokens}"
            )
    total = {n: float(sum(ts)) for n, ts in times.items()}
    best = min(pefts, key=lambda n: total[n])  # the baseline: PEFT at its fastest thread count on this machine
    useful = sum(tokens_per_round)
    speedup = total[best] / total["ours"]
    per_round_speedup = [p / o for o, p in zip(times["ours"], times[best])]
    ci = bootstrap_median_ci(per_round_speedup)
    paired = {n: paired_summary(times["ours"], times[n]) for n in pefts}
    rows = []
    for n, r in runners.items():
        timed = slice(1, None)
        rows.append(
            {
                "runner": n,
                "method": labels[n],
                "trainable": r.trainable_count,
                "train_s": total[n],
                "useful_tokens": sum(r.real_tokens[timed]),
                "loss_tokens": sum(r.loss_tokens[timed]),
                "token_slots": sum(r.slots[timed]),
                "useful_tokens/s": useful / total[n],
                "pad_fraction": 1.0 - sum(r.real_tokens[timed]) / sum(r.slots[timed]),
                "warmup_s": warmup[n],
                "final_loss": float(np.mean(r.losses[-5:])),
            }
        )
    goal = goals(speedup)
    notes = [ratio_verdict(paired[n], "ours", n) + " (per-round times, warm-up step excluded)" for n in pefts]
    notes += [
        f"the goal compares ours with {best}, PEFT's fastest thread count in this run",
        f"ours: {ours.compilations()} compilation(s) of the step; warm-up (compilation + step 0) "
        f"{warmup['ours']:.1f} s; PEFT's first step " + ", ".join(f"{warmup[n]:.1f} s ({n})" for n in pefts),
        f"PEFT packing check: the first {packing_check['examples']} examples of a flattened batch give their "
        f"logits as run alone within {packing_check['max_abs_logit_diff']:.2g}",
    ]
    if args.quick:
        notes.insert(0, "quick: 1 layer, 2 steps; no conclusions from these times")
    if args.layers:
        notes.append(f"both sides use the first {args.layers} decoder layers only")

    print(
        f"\nE2E / SmolLM2-135M-Instruct{f' (first {args.layers} layers)' if args.layers else ''}, LoRA r={args.r} "
        f"on q,v, {args.batch} packed rows x {ours.batches.width} tokens per step, {args.steps} timed steps in "
        f"{args.rounds} rotating rounds, {os.cpu_count()} cores{' [quick]' if args.quick else ''}"
    )
    print(
        table(
            rows,
            [
                "runner",
                "trainable",
                "useful_tokens",
                "loss_tokens",
                "pad_fraction",
                "train_s",
                "useful_tokens/s",
                "warmup_s",
                "final_loss",
            ],
        )
    )
    print(
        f"ours / PEFT ({best}) useful tokens per second: {speedup:.2f}x; per round: median "
        f"{statistics.median(per_round_speedup):.2f} (95% CI {ci[0]:.2f}-{ci[1]:.2f})"
    )
    for k, g in goal.items():
        print(f"{'MET' if g['met'] else 'MISSED'}: {k}: {g['value']:.2f}")
    for n in notes:
        print("note:", n)
    result = {
        "config": vars(args),
        "runners": names,
        "best_peft": best,
        "rows": rows,
        "times_s": times,
        "steps_per_round": per_round,
        "useful_tokens_per_round": tokens_per_round,
        "speedup": speedup,
        "per_round_speedup": {
            "values": per_round_speedup,
            "median": statistics.median(per_round_speedup),
            "ci95": list(ci),
        },
        "paired_ours_over_peft": paired,
        "goals": goal,
        "warmup_s": warmup,
        "compilations": ours.compilations(),
        "pack_width": ours.batches.width,
        "tokens": {
            k: {n: getattr(r, attr) for n, r in runners.items()}
            for k, attr in (("real", "real_tokens"), ("loss", "loss_tokens"), ("slots", "slots"))
        },
        "losses": {n: r.losses for n, r in runners.items()},
        "peft_packing_check": packing_check,
        "peft_info": {n: runners[n].info for n in pefts},
        "setup_s": setup,
        "train_examples": len(train_data),
        "notes": notes,
        "wall_s": time.perf_counter() - t_start,
    }
    print(f"wall time {result['wall_s']:.0f} s; wrote {recorder.write(args.out, result, args.out_dir)}")
    return result


if __name__ == "__main__":
    main()
