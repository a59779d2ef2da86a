"""Train-step memory with the plain vs the chunked cross-entropy, under each remat policy, and the longest
sequence a LoRA step fits in a memory budget.

    python -m benchmarks.loss_memory [--quick] [--models gpt2-small smollm2-135m] [--budget-gib 4] ...

Every step here is the training job's own (``train.loop.make_train_step`` on ``train.loop.prepare``'s split,
AdamW with the job's defaults, LoRA r=8 on q and v, float32), jitted with its trained tree and optimizer state
donated as ``train.loop`` does, and lowered from abstract shapes: the memory numbers are what XLA plans for the
compiled step on this backend (``compiled.memory_analysis()``; nothing is executed). ``peak = argument + output
- alias + temp`` (donated state counted once). Models: GPT-2 small and SmolLM2-135M shapes, as
``benchmarks.train_step`` builds them (tied heads, vocab 50,257 / 49,152).

Sections:

1. **memory** (batch ``--batch`` x ``--seq``): for each model, full fine-tuning (plain loss; chunked loss with every
   layer checkpointed) and LoRA with ``train.loss_chunk`` 0 (full float32 logits + optax) and ``auto``
   (``lora_jax.losses.chunked_cross_entropy``) under each ``--policies`` ``train.remat`` policy (each layer
   checkpointed; with ``--whole`` also the whole loss, as ``train.remat=true`` did before). Ratios are to full
   fine-tuning with the plain loss and no remat. The same for ``benchmarks.train_step``'s own step (no clipping,
   no finiteness check), which is where the issue's 0.48x / 0.51x came from. Goal: LoRA <= 0.35x full.
2. **longest sequence** (SmolLM2-135M, LoRA, batch ``--long-batch``): the largest sequence length (a multiple of
   ``--long-step`` tokens, at most ``--long-max``) whose compiled step peak fits ``--budget-gib`` GiB, found by
   binary search over compiled memory only, for plain vs chunked loss, without remat and with each layer
   checkpointed (``train.remat=full``).
3. **time** (real steps on random weights): the LoRA step with the plain loss, the chunked loss, and the chunked
   loss with every layer checkpointed, measured side by side (interleaved rounds, each round starting at the
   next variant; medians of per-round ratios). The machine may be shared with other work: the ratio is the
   claim, not the absolute times.

Writes ``benchmarks/results/loss_memory.json`` (``--out`` to change the name).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import (
    Recorder,
    block,
    donated_step_memory,
    median,
    memory_analysis,
    paired_summary,
    table,
    time_interleaved,
)
from benchmarks.train_step import build_lm
from lora_jax.models.layers import REMAT_POLICIES
from train import loop
from train.config import load_config

MiB = 2**20
GiB = 2**30
GOAL = 0.35
POLICIES = list(REMAT_POLICIES)  # none, full, dots, dots_no_batch
# The code this benchmark measures (benchmarks.staleness: a result older than their last commit is stale).
SOURCES = (
    "lora_jax/losses.py",
    "lora_jax/core.py",
    "lora_jax/ops.py",
    "lora_jax/models",
    "train/tasks.py",
    "train/loop.py",
    "train/config.py",
    "benchmarks/loss_memory.py",
    "benchmarks/train_step.py",
    "benchmarks/common.py",
)


def job_config(method: str, loss_chunk: Any, remat: str, batch: int):
    return load_config(
        None,
        [
            f"train.method={method}",
            f"train.loss_chunk={loss_chunk}",
            f"train.remat={remat}",
            f"train.batch_size={batch}",
            "lora.r=8",
            "lora.targets=qv",
        ],
    )


def abstract_setup(lm, cfg, batch: int, seq: int, whole: bool = False):
    """Abstract ``(trainable, opt_state, frozen, batches, key)`` of the job's step for ``cfg``, and the step.

    ``train.remat`` checkpoints each layer, as ``train.loop.load_model`` sets the model up; ``whole``: the model
    is left as it is, so the step checkpoints the whole loss with that policy instead."""
    params = lm.params
    model = lm.model if whole else lm.model.clone(remat=loop.remat_name(cfg.train.remat))

    def split(p):
        prepared = loop.prepare(cfg, p, jax.random.key(0))
        return prepared.frozen, prepared.trainable

    frozen, trainable = jax.eval_shape(split, params)
    tx = loop.make_optimizer(cfg)
    opt_state = jax.eval_shape(tx.init, trainable)
    ids = jax.ShapeDtypeStruct((cfg.train.grad_accum, batch, seq), jnp.int32)
    batches = {"input_ids": ids, "attention_mask": ids, "loss_mask": ids}
    key = jax.eval_shape(lambda: jax.random.key(0))
    step = jax.jit(
        loop.make_train_step(model, cfg, tx), donate_argnums=(0, 1), compiler_options=loop.step_compiler_options(cfg)
    )
    return step, (trainable, opt_state, frozen, batches, key)


def step_memory(lm, method: str, loss_chunk: Any, remat: str, batch: int, seq: int, whole: bool = False) -> dict:
    """XLA's plan for the compiled job step: bytes of argument / output / alias / temp and peak."""
    cfg = job_config(method, loss_chunk, remat, batch)
    step, args = abstract_setup(lm, cfg, batch, seq, whole)
    t0 = time.perf_counter()
    m = memory_analysis(step.lower(*args).compile())
    out = {k: m[k] for k in ("argument", "output", "alias", "temp", "peak")}
    out["compile_s"] = time.perf_counter() - t0
    return out


@dataclasses.dataclass
class AbstractLM:
    """A model of ``benchmarks.train_step.build_lm``'s shapes with abstract params (nothing materialised)."""

    name: str
    config: Any
    model: Any
    params: Any


def abstract_lm(name: str, quick: bool) -> AbstractLM:
    from lora_jax.models import gpt2, llama

    arch = gpt2 if name == "gpt2-small" else llama
    config = _config(name, quick)
    params = jax.eval_shape(lambda: arch.init_params(config, jax.random.key(0)))
    return AbstractLM(name, config, arch.build(config), params)


def _config(name: str, quick: bool):
    import transformers

    from benchmarks.train_step import smollm2_config
    from lora_jax.models import gpt2, llama

    if name == "gpt2-small":
        hf = (
            transformers.GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=512)
            if quick
            else transformers.GPT2Config()
        )
        return gpt2.Config.from_hf(hf)
    if quick:
        return llama.Config.from_hf(
            transformers.LlamaConfig(
                hidden_size=48,
                intermediate_size=128,
                num_hidden_layers=1,
                num_attention_heads=3,
                num_key_value_heads=1,
                vocab_size=512,
                tie_word_embeddings=True,
                max_position_embeddings=4096,
            )
        )
    return smollm2_config()[0]


def reference_memory(lm, kind: str, loss_chunk: Any, batch: int, seq: int) -> dict:
    """The step of ``benchmarks.train_step`` (value_and_grad + AdamW, no clipping; the issue's 0.48x / 0.51x came
    from it), compiled from abstract shapes: ``kind`` full or factored (LoRA r=8, alpha 16, on q and v)."""
    import optax

    import lora_jax as lora
    from benchmarks.train_step import make_step

    tx = optax.adamw(1e-4)
    if kind == "full":
        trainable, frozen = lm.params, {}
    else:
        trainable = jax.eval_shape(lambda p: lora.init(p, r=8, alpha=16, targets="qv"), lm.params)
        frozen = lm.params
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    args = (
        trainable,
        jax.eval_shape(tx.init, trainable),
        frozen,
        {"input_ids": ids, "attention_mask": ids, "loss_mask": ids},
    )
    m = donated_step_memory(make_step(lm.model, tx, kind, loss_chunk), *args)
    return {"temp": m["temp"], "peak": m["peak"]}


# ------------------------------------------------------------------------------------------------ sections


def memory_section(args) -> tuple[list[dict], list[dict]]:
    """Rows of the job-step table and of the reference-step table (``benchmarks.train_step``'s step)."""
    rows, ref_rows = [], []
    for name in args.models:
        lm = abstract_lm(name, args.quick)
        runs = [("full", 0, "none", False), ("full", "auto", "full", False)]
        runs += [("lora", chunk, policy, False) for chunk in (0, "auto") for policy in args.policies]
        if args.whole:  # the whole loss checkpointed (what train.remat=true did before)
            runs += [("lora", "auto", "dots_no_batch", True)]
        mems = {}
        for method, chunk, policy, whole in runs:
            mems[(method, chunk, policy, whole)] = m = step_memory(
                lm, method, chunk, policy, args.batch, args.seq, whole
            )
            print(
                f"  {name} {method} loss_chunk={chunk} remat={policy}{' (whole loss)' if whole else ''}: peak "
                f"{m['peak'] / MiB:,.1f} MiB (temp {m['temp'] / MiB:,.1f}, compiled in {m['compile_s']:.0f} s)",
                flush=True,
            )
        full = mems[("full", 0, "none", False)]["peak"]
        for (method, chunk, policy, whole), m in mems.items():
            rows.append(
                {
                    "model": name,
                    "method": method,
                    "loss": "chunked" if chunk else "plain",
                    "remat": policy + (" (whole loss)" if whole else " (per layer)" if policy != "none" else ""),
                    "argument_MiB": m["argument"] / MiB,
                    "temp_MiB": m["temp"] / MiB,
                    "peak_MiB": m["peak"] / MiB,
                    "ratio_to_full": m["peak"] / full,
                    "bytes": m,
                }
            )
        ref = {
            k: reference_memory(lm, kind, chunk, args.batch, args.seq)
            for k, (kind, chunk) in {
                "full": ("full", 0),
                "lora plain": ("factored", 0),
                "lora chunked": ("factored", "auto"),
            }.items()
        }
        for k, m in ref.items():
            ref_rows.append(
                {
                    "model": name,
                    "step": k,
                    "temp_MiB": m["temp"] / MiB,
                    "peak_MiB": m["peak"] / MiB,
                    "ratio_to_full": m["peak"] / ref["full"]["peak"],
                    "bytes": m,
                }
            )
        print(
            f"  {name} benchmarks.train_step's step: "
            + ", ".join(f"{k} {m['peak'] / MiB:,.1f} MiB" for k, m in ref.items()),
            flush=True,
        )
        del lm
    return rows, ref_rows


def longest_sequence(lm, loss_chunk: Any, remat: str, batch: int, budget: int, step: int, hi: int) -> dict:
    """Binary search for the largest multiple of ``step`` <= ``hi`` whose step peak fits ``budget`` bytes."""
    tried = {}

    def fits(seq: int) -> bool:
        m = step_memory(lm, "lora", loss_chunk, remat, batch, seq)
        tried[seq] = m["peak"]
        return m["peak"] <= budget

    lo_n, hi_n = 0, hi // step  # invariant: lo_n * step fits (or 0), anything above hi_n * step is not tried
    if fits(hi_n * step):
        lo_n = hi_n
    else:
        while hi_n - lo_n > 1:
            mid = (lo_n + hi_n) // 2
            if fits(mid * step):
                lo_n = mid
            else:
                hi_n = mid
    return {
        "longest": lo_n * step,
        "capped": lo_n * step == hi,
        "peaks_MiB": {s: p / MiB for s, p in sorted(tried.items())},
    }


def long_section(args) -> list[dict]:
    lm = abstract_lm("smollm2-135m", args.quick)
    rows = []
    for chunk, policy in args.long_runs:
        r = longest_sequence(
            lm, chunk, policy, args.long_batch, int(args.budget_gib * GiB), args.long_step, args.long_max
        )
        rows.append(
            {
                "model": "smollm2-135m",
                "batch": args.long_batch,
                "loss": "chunked" if chunk else "plain",
                "remat": policy,
                "longest_seq": r["longest"],
                "capped_at_max": r["capped"],
                "peaks_MiB": r["peaks_MiB"],
            }
        )
        print(
            f"  loss_chunk={chunk} remat={policy}: longest {r['longest']} tokens"
            f"{' (the cap)' if r['capped'] else ''}; tried {r['peaks_MiB']}",
            flush=True,
        )
    return rows


TIME_VARIANTS = {"plain": (0, "none"), "chunked": ("auto", "none"), "chunked + remat full": ("auto", "full")}


def time_section(args) -> tuple[list[dict], dict]:
    rows, raw = [], {}
    for name in args.models:
        lm = build_lm(name, quick=args.quick)
        rng = np.random.RandomState(0)
        ids = jnp.asarray(rng.randint(0, lm.config.vocab_size, (1, args.batch, args.seq)), jnp.int32)
        batches = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "loss_mask": jnp.ones_like(ids)}
        fns, losses = {}, {}
        for label, (chunk, remat) in TIME_VARIANTS.items():
            cfg = job_config("lora", chunk, remat, args.batch)
            prepared = loop.prepare(cfg, lm.params, jax.random.key(0))
            tx = loop.make_optimizer(cfg)
            model = lm.model.clone(remat=loop.remat_name(cfg.train.remat))
            step = jax.jit(loop.make_train_step(model, cfg, tx), compiler_options=loop.step_compiler_options(cfg))
            trainable, opt_state = prepared.trainable, tx.init(prepared.trainable)

            def run(step=step, trainable=trainable, opt_state=opt_state, frozen=prepared.frozen, label=label):
                # the same state every call (nothing donated), so every variant times the same step
                _, _, m = step(trainable, opt_state, frozen, batches, jax.random.key(1))
                losses[label] = float(block(m["loss"]))

            fns[label] = run
        times = time_interleaved(fns, rounds=args.rounds, warmup=args.warmup, rotate=True)
        raw[name] = times
        for label in fns:
            paired = paired_summary(times[label], times["plain"])
            rows.append(
                {
                    "model": name,
                    "variant": label,
                    "median_ms": 1e3 * median(times[label]),
                    "ratio_to_plain": paired["median"],
                    "ratio_to_plain_ci95": paired["ci95"],
                    "paired": paired,
                    "loss": losses[label],
                }
            )
            print(
                f"  {name} {label}: {paired['median']:.3f} x plain (95% CI {paired['ci95'][0]:.3f}-"
                f"{paired['ci95'][1]:.3f}; median {rows[-1]['median_ms']:.0f} ms, loss {losses[label]:.6f})",
                flush=True,
            )
        del lm, fns
    return rows, raw


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1-layer tiny models, short search: a smoke run")
    ap.add_argument("--models", nargs="+", default=["gpt2-small", "smollm2-135m"])
    ap.add_argument("--sections", nargs="+", default=["memory", "long", "time"], choices=["memory", "long", "time"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--policies", nargs="+", default=POLICIES, choices=POLICIES)
    ap.add_argument("--budget-gib", type=float, default=4.0)
    ap.add_argument("--long-batch", type=int, default=1)
    ap.add_argument("--long-step", type=int, default=128)
    ap.add_argument("--long-max", type=int, default=8192, help="SmolLM2's max_position_embeddings")
    ap.add_argument(
        "--long-runs",
        nargs="+",
        default=["0:none", "auto:none", "0:full", "auto:full"],
        help="LOSS_CHUNK:REMAT pairs searched in the longest-sequence section",
    )
    ap.add_argument("--whole", action="store_true", help="also the whole loss checkpointed (dots_no_batch)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default=None, help="results name (default loss_memory, loss_memory_quick with --quick)")
    ap.add_argument("--out-dir", default=None, help="write the JSON here instead of benchmarks/results/")
    args = ap.parse_args(argv)
    args.long_runs = [(0 if c == "0" else c, p) for c, p in (r.split(":") for r in args.long_runs)]
    if args.quick:
        args.batch, args.seq, args.rounds = 2, 16, 2
        args.budget_gib, args.long_max, args.long_step = 0.05, 1024, 64
    args.out = args.out or ("loss_memory_quick" if args.quick else "loss_memory")
    return args


def explain_misses(goals: dict[str, dict], rows: list[dict], ref_rows: list[dict]) -> None:
    """Add ``why`` to each missed no-remat goal, from this run's rows: how much of the LoRA step's temporary memory
    per-layer checkpointing removes (what remains of the step is then the saved activations), and the peak the goal
    would need."""
    by = {(r["model"], r["method"], r["loss"], r["remat"]): r for r in rows}
    for key, g in goals.items():
        model = key.split(":")[0]
        plain, ckpt = by.get((model, "lora", "chunked", "none")), by.get((model, "lora", "chunked", "full (per layer)"))
        full = by.get((model, "full", "plain", "none"))
        ref_full = next((r for r in ref_rows if r["model"] == model and r["step"] == "full"), None)
        if not g["met"] and "train_step's" in key and ref_full and full and plain:
            g["why"] = (
                f"the same LoRA step ({plain['peak_MiB']:,.0f} MiB) against a full fine-tuning step without "
                f"the job's gradient clipping and finiteness check, whose peak is {ref_full['peak_MiB']:,.0f} "
                f"MiB instead of the job's {full['peak_MiB']:,.0f}"
            )
            continue
        if g["met"] or "remat none" not in key or not (plain and ckpt and full):
            continue
        g["why"] = (
            f"the chunked LoRA step's temporaries are {plain['temp_MiB']:,.0f} MiB; checkpointing each layer "
            f"(train.remat=full) cuts them to {ckpt['temp_MiB']:,.0f} MiB with the same arguments, so "
            f"{plain['temp_MiB'] - ckpt['temp_MiB']:,.0f} MiB are activations every layer keeps for the "
            f"backward pass; the goal needs a peak of {GOAL * full['peak_MiB']:,.0f} MiB, the step has "
            f"{plain['peak_MiB']:,.0f}"
        )


def main(argv=None) -> dict:
    args = parse_args(argv)
    recorder = Recorder("loss_memory", SOURCES, argv)
    result: dict[str, Any] = {"xla_flags": os.environ.get("XLA_FLAGS", ""), "config": dict(vars(args))}
    print(f"{jax.default_backend()} x{jax.device_count()}, commit {recorder.git.get('commit')}")
    if "memory" in args.sections:
        print(f"== compiled step memory, batch {args.batch} x {args.seq}, float32 ==")
        rows, ref_rows = memory_section(args)
        print(
            table(rows, ["model", "method", "loss", "remat", "argument_MiB", "temp_MiB", "peak_MiB", "ratio_to_full"])
        )
        print("benchmarks.train_step's step (the issue's 0.48x / 0.51x), no remat:")
        print(table(ref_rows, ["model", "step", "temp_MiB", "peak_MiB", "ratio_to_full"]))
        result["memory"], result["memory_train_step"] = rows, ref_rows
        goals = {}
        for r in rows:
            if r["method"] == "lora" and r["loss"] == "chunked" and r["remat"] in ("none", "full (per layer)"):
                key = f"{r['model']}: LoRA step peak / full fine-tuning <= {GOAL} (chunked loss, remat {r['remat']})"
                goals[key] = {"value": r["ratio_to_full"], "met": r["ratio_to_full"] <= GOAL}
        for r in ref_rows:
            if r["step"] == "lora chunked":
                key = f"{r['model']}: benchmarks.train_step's LoRA step / full <= {GOAL} (chunked loss, no remat)"
                goals[key] = {"value": r["ratio_to_full"], "met": r["ratio_to_full"] <= GOAL}
        explain_misses(goals, rows, ref_rows)
        result["goals"] = goals
        for k, g in goals.items():
            print(
                f"{'MET   ' if g['met'] else 'MISSED'} {k}: {g['value']:.3f}" + (f" ({g['why']})" if "why" in g else "")
            )
    if "long" in args.sections:
        print(
            f"== longest sequence of a SmolLM2-135M LoRA step (batch {args.long_batch}) within "
            f"{args.budget_gib:g} GiB of compiled memory =="
        )
        result["longest_sequence"] = long_section(args)
    if "time" in args.sections:
        print(
            f"== LoRA step time, batch {args.batch} x {args.seq}, {args.rounds} interleaved rounds (shared machine: "
            "ratios measured side by side) =="
        )
        rows, raw = time_section(args)
        result["time"] = rows
        result["times_s"] = raw
    path = recorder.write(args.out, result, args.out_dir)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
