"""Scanned against unrolled decoder layers: compile time by depth, compiled memory, and step time.

    python -m benchmarks.scan_layers [--quick] [--depths 4 32] [--rounds 2] [--time-rounds 5]

The step is the training job's own (``train.loop.make_train_step`` on ``train.loop.prepare``'s split: LoRA r=8 on q
and v, AdamW, the chunked cross-entropy, float32, the default ``train.remat``) for a Llama of width 128 (4 heads of
32, 2 key/value heads, MLP 512, vocab 32,000), batch 4 x 128 tokens, lowered from abstract shapes as
``benchmarks.loss_memory`` does. ``scanned`` is what building a decoder gives (``scan_layers=True``: one
``jax.lax.scan`` over stacked layers, :mod:`lora_jax.stacking`), ``unrolled`` the per-layer Python loop.

Sections:

1. **compile**: seconds to lower and compile the step at each ``--depths`` depth, both forms, ``--rounds`` rounds
   interleaved (medians), with XLA's plan of the step's temporaries. Goal (issue 26): scanned, the deepest step
   compiles in at most 1.5x the time of the shallowest (32 vs 4 layers; unrolled is the reference).
2. **time** (real steps on random weights at the shallowest depth and the deepest): interleaved rounds, the median
   of per-round ratios scanned / unrolled. On a CPU a small model may run faster unrolled (XLA fuses across
   layers); the table says by how much.

Writes ``benchmarks/results/scan_layers.json`` (``--out`` to change the name).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import Recorder, block, median, paired_summary, table, time_interleaved
from benchmarks.loss_memory import AbstractLM, job_config, step_memory
from train import loop

MiB = 2**20
GOAL = 1.5
SOURCES = (
    "lora_jax/models",
    "lora_jax/stacking.py",
    "lora_jax/core.py",
    "lora_jax/ops.py",
    "lora_jax/losses.py",
    "train/loop.py",
    "train/config.py",
    "benchmarks/scan_layers.py",
    "benchmarks/loss_memory.py",
    "benchmarks/common.py",
)
FORMS = ("scanned", "unrolled")


def llama_config(layers: int, quick: bool):
    import transformers

    from lora_jax.models import llama

    if quick:
        hf = transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=512,
        )
    else:
        hf = transformers.LlamaConfig(
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            vocab_size=32000,
        )
    return llama.Config.from_hf(hf)


def abstract_lm(layers: int, form: str, quick: bool) -> AbstractLM:
    from lora_jax.models import llama

    config = dataclasses.replace(llama_config(layers, quick), scan_layers=form == "scanned")
    params = jax.eval_shape(lambda: llama.init_params(config, jax.random.key(0)))
    return AbstractLM(f"llama-{layers}x128/{form}", config, llama.build(config), params)


def compile_section(args, remat: str) -> list[dict]:
    runs: dict[tuple[int, str], list[dict]] = {}
    for r in range(args.rounds):
        for depth in args.depths:
            for form in FORMS if r % 2 == 0 else FORMS[::-1]:  # each round starts with the other form
                m = step_memory(abstract_lm(depth, form, args.quick), "lora", "auto", remat, args.batch, args.seq)
                runs.setdefault((depth, form), []).append(m)
                print(
                    f"  round {r}: {depth} layers {form}: compiled in {m['compile_s']:.2f} s, temp "
                    f"{m['temp'] / MiB:,.1f} MiB",
                    flush=True,
                )
    rows = []
    for (depth, form), ms in sorted(runs.items()):
        rows.append(
            {
                "layers": depth,
                "form": form,
                "compile_s": median([m["compile_s"] for m in ms]),
                "compile_runs_s": [m["compile_s"] for m in ms],
                "temp_MiB": ms[0]["temp"] / MiB,
                "peak_MiB": ms[0]["peak"] / MiB,
                "bytes": ms[0],
            }
        )
    return rows


def growth(rows: list[dict], form: str) -> dict[str, Any]:
    mine = sorted((r for r in rows if r["form"] == form), key=lambda r: r["layers"])
    lo, hi = mine[0], mine[-1]
    return {
        "shallow": lo["layers"],
        "deep": hi["layers"],
        "compile_ratio": hi["compile_s"] / lo["compile_s"],
        "temp_ratio": hi["bytes"]["temp"] / lo["bytes"]["temp"],
    }


def time_section(args) -> list[dict]:
    from lora_jax import stacking
    from lora_jax.models import llama

    rows = []
    for depth in (min(args.depths), max(args.depths)):
        config = llama_config(depth, args.quick)
        unrolled = dataclasses.replace(config, scan_layers=False)
        params = llama.init_params(unrolled, jax.random.key(0))
        rng = np.random.RandomState(0)
        ids = jnp.asarray(rng.randint(0, config.vocab_size, (1, args.batch, args.seq)), jnp.int32)
        batches = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "loss_mask": jnp.ones_like(ids)}
        cfg = job_config("lora", "auto", "auto" if args.remat == "auto" else args.remat, args.batch)
        tx = loop.make_optimizer(cfg)
        fns, losses = {}, {}
        for form in FORMS:
            c = dataclasses.replace(config, scan_layers=form == "scanned")
            p = stacking.stack(params) if form == "scanned" else params  # the same weights in either form
            prepared = loop.prepare(cfg, p, jax.random.key(0))
            model = llama.build(c).clone(remat=loop.remat_name(cfg.train.remat))
            step = jax.jit(loop.make_train_step(model, cfg, tx), compiler_options=loop.step_compiler_options(cfg))
            opt_state = tx.init(prepared.trainable)

            def run(step=step, opt_state=opt_state, prepared=prepared, form=form):
                _, _, m = step(prepared.trainable, opt_state, prepared.frozen, batches, jax.random.key(1))
                losses[form] = float(block(m["loss"]))

            fns[form] = run
        times = time_interleaved(fns, rounds=args.time_rounds, warmup=1, rotate=True)
        paired = paired_summary(times["scanned"], times["unrolled"])
        for form in FORMS:
            rows.append(
                {
                    "layers": depth,
                    "form": form,
                    "median_ms": 1e3 * median(times[form]),
                    "loss": losses[form],
                    "times_s": times[form],
                    **(
                        {"ratio_to_unrolled": paired["median"], "ci95": paired["ci95"], "paired": paired}
                        if form == "scanned"
                        else {}
                    ),
                }
            )
        print(
            f"  {depth} layers: scanned {1e3 * median(times['scanned']):,.0f} ms, unrolled "
            f"{1e3 * median(times['unrolled']):,.0f} ms: {paired['median']:.2f}x (95% CI {paired['ci95'][0]:.2f}-"
            f"{paired['ci95'][1]:.2f}); losses {losses['scanned']:.6f} / {losses['unrolled']:.6f}",
            flush=True,
        )
    return rows


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="width 32, vocab 512, depths 2 and 8: a smoke run")
    ap.add_argument("--sections", nargs="+", default=["compile", "time"], choices=["compile", "time"])
    ap.add_argument("--depths", nargs="+", type=int, default=[4, 32])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--remat", default="auto", help="train.remat for the step (auto: the job's default)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--time-rounds", type=int, default=5)
    ap.add_argument("--out", default=None, help="results name (default scan_layers, _quick with --quick)")
    ap.add_argument("--out-dir", default=None, help="write the JSON here instead of benchmarks/results/")
    args = ap.parse_args(argv)
    if args.quick:
        args.depths, args.seq, args.batch, args.rounds, args.time_rounds = [2, 8], 32, 2, 1, 2
    args.out = args.out or ("scan_layers_quick" if args.quick else "scan_layers")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from train.config import Config

    default_remat = Config().train.remat
    if args.remat == "auto":
        args.remat = default_remat
    remat = loop.remat_name(args.remat)
    recorder = Recorder("scan_layers", SOURCES, argv)
    result: dict[str, Any] = {"config": dict(vars(args)), "remat": remat}
    print(f"{jax.default_backend()} x{jax.device_count()}, commit {recorder.git.get('commit')}, train.remat={remat}")
    goals = {}
    if "compile" in args.sections:
        print(f"== compiling the LoRA step, batch {args.batch} x {args.seq}, {args.rounds} interleaved rounds ==")
        rows = compile_section(args, args.remat)
        print(table(rows, ["layers", "form", "compile_s", "temp_MiB", "peak_MiB"]))
        result["compile"] = rows
        result["growth"] = {form: growth(rows, form) for form in FORMS}
        for form, g in result["growth"].items():
            print(
                f"  {form}: {g['deep']} / {g['shallow']} layers: compile {g['compile_ratio']:.2f}x, temporaries "
                f"{g['temp_ratio']:.2f}x"
            )
        g = result["growth"]["scanned"]
        goals[f"scanned: compile({g['deep']} layers) / compile({g['shallow']} layers) <= {GOAL:g}"] = {
            "value": g["compile_ratio"],
            "met": g["compile_ratio"] <= GOAL,
        }
    if "time" in args.sections:
        print(f"== LoRA step time, scanned vs unrolled, {args.time_rounds} interleaved rounds ==")
        result["time"] = time_section(args)
    result["goals"] = goals
    for k, g in goals.items():
        print(f"{'MET   ' if g['met'] else 'MISSED'} {k}: {g['value']:.2f}")
    path = recorder.write(args.out, result, args.out_dir)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
