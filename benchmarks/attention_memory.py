"""Train-step memory and time by attention implementation: does the step's memory grow with T or with T^2?

    python -m benchmarks.attention_memory [--quick] [--seqs 1024 2048 4096 8192] [--impls xla blockwise] ...

The step is the training job's own (``train.loop.make_train_step`` on ``train.loop.prepare``'s split: LoRA r=8 on q
and v, AdamW, the chunked cross-entropy, float32, no remat), for a 2-layer Llama of width 128 (4 heads of 64, 2
key/value heads, MLP 512, vocab 32,000), batch ``--batch`` of one packed row each, lowered from abstract shapes
exactly as ``benchmarks.loss_memory`` does: the numbers are what XLA plans for the compiled step
(``compiled.memory_analysis()``), nothing is executed. ``temp`` is the step's temporaries (activations kept for the
backward pass, gradients, the attention's own buffers); ``peak = argument + output - alias + temp``.

Sections:

1. **memory**: temp and peak for each ``--impls`` attention implementation (``lora_jax.models.attention``) at each
   ``--seqs`` length. Goal (issue 26): with the default implementation on this backend (``auto``: ``blockwise`` on
   CPU) the temporaries at the longest length are at most 10x those at the shortest (8,192 vs 1,024: 8x the
   tokens); ``xla`` (the dense scores every model used before) is the reference.
2. **time** (``--time-seqs``, real steps on random weights): the same step per implementation, interleaved rounds
   (each round starting at the next implementation), medians of per-round ratios to ``xla``. The machine may be
   shared: the ratio is the claim, not the absolute times.

Writes ``benchmarks/results/attention_memory.json`` (``--out`` to change the name).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import Recorder, block, median, paired_summary, table, time_interleaved
from benchmarks.loss_memory import AbstractLM, job_config, step_memory
from lora_jax.models import attention
from train import loop

MiB = 2**20
GOAL = 10.0
SOURCES = (
    "lora_jax/models",
    "lora_jax/losses.py",
    "lora_jax/core.py",
    "lora_jax/ops.py",
    "train/loop.py",
    "train/tasks.py",
    "train/config.py",
    "benchmarks/attention_memory.py",
    "benchmarks/loss_memory.py",
    "benchmarks/common.py",
)


def llama_config(quick: bool, max_len: int):
    """The issue's 2-layer width-128 Llama (``--quick``: 1 layer of width 32, vocab 512)."""
    import transformers

    from lora_jax.models import llama

    if quick:
        hf = transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=512,
            max_position_embeddings=max_len,
        )
    else:
        hf = transformers.LlamaConfig(
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            vocab_size=32000,
            max_position_embeddings=max_len,
        )
    return llama.Config.from_hf(hf)


def abstract_lm(impl: str, quick: bool, max_len: int) -> AbstractLM:
    from lora_jax.models import llama

    config = llama_config(quick, max_len)
    params = jax.eval_shape(lambda: llama.init_params(config, jax.random.key(0)))
    return AbstractLM(f"llama-2x128/{impl}", config, llama.build(config).clone(attention=impl), params)


def memory_section(args) -> list[dict]:
    rows = []
    for impl in args.impls:
        lm = abstract_lm(impl, args.quick, max(args.seqs))
        for seq in args.seqs:
            m = step_memory(lm, "lora", "auto", "none", args.batch, seq)
            rows.append(
                {
                    "attention": impl,
                    "seq": seq,
                    "batch": args.batch,
                    "temp_MiB": m["temp"] / MiB,
                    "peak_MiB": m["peak"] / MiB,
                    "compile_s": m["compile_s"],
                    "bytes": m,
                }
            )
            print(
                f"  {impl} seq {seq}: temp {m['temp'] / MiB:,.1f} MiB, peak {m['peak'] / MiB:,.1f} MiB "
                f"(compiled in {m['compile_s']:.0f} s)",
                flush=True,
            )
    return rows


def growth(rows: list[dict], impl: str) -> dict[str, Any] | None:
    """Temp at the longest length over temp at the shortest, for ``impl``."""
    mine = sorted((r for r in rows if r["attention"] == impl), key=lambda r: r["seq"])
    if len(mine) < 2:
        return None
    lo, hi = mine[0], mine[-1]
    return {
        "short": lo["seq"],
        "long": hi["seq"],
        "tokens_ratio": hi["seq"] / lo["seq"],
        "temp_ratio": hi["bytes"]["temp"] / lo["bytes"]["temp"],
        "peak_ratio": hi["bytes"]["peak"] / lo["bytes"]["peak"],
    }


def time_section(args) -> list[dict]:
    from lora_jax.models import llama

    rows = []
    for seq in args.time_seqs:
        config = llama_config(args.quick, seq)
        params = llama.init_params(config, jax.random.key(0))
        rng = np.random.RandomState(0)
        ids = jnp.asarray(rng.randint(0, config.vocab_size, (1, args.batch, seq)), jnp.int32)
        batches = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "loss_mask": jnp.ones_like(ids)}
        cfg = job_config("lora", "auto", "none", args.batch)
        prepared = loop.prepare(cfg, params, jax.random.key(0))
        tx = loop.make_optimizer(cfg)
        fns, losses = {}, {}
        for impl in args.impls:
            step = jax.jit(loop.make_train_step(llama.build(config).clone(attention=impl), cfg, tx))
            opt_state = tx.init(prepared.trainable)

            def run(step=step, opt_state=opt_state, impl=impl):
                _, _, m = step(prepared.trainable, opt_state, prepared.frozen, batches, jax.random.key(1))
                losses[impl] = float(block(m["loss"]))

            fns[impl] = run
        times = time_interleaved(fns, rounds=args.rounds, warmup=1, rotate=True)
        for impl in fns:
            paired = paired_summary(times[impl], times[args.impls[0]])
            rows.append(
                {
                    "seq": seq,
                    "attention": impl,
                    "median_ms": 1e3 * median(times[impl]),
                    f"ratio_to_{args.impls[0]}": paired["median"],
                    "ci95": paired["ci95"],
                    "paired": paired,
                    "loss": losses[impl],
                    "times_s": times[impl],
                }
            )
            print(
                f"  seq {seq} {impl}: {1e3 * median(times[impl]):,.0f} ms, {paired['median']:.2f} x "
                f"{args.impls[0]} (95% CI {paired['ci95'][0]:.2f}-{paired['ci95'][1]:.2f}), loss {losses[impl]:.6f}",
                flush=True,
            )
    return rows


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a 1-layer width-32 model, 512 / 2,048 tokens: a smoke run")
    ap.add_argument("--sections", nargs="+", default=["memory", "time"], choices=["memory", "time"])
    ap.add_argument("--impls", nargs="+", default=["xla", "auto"], choices=list(attention.IMPLEMENTATIONS))
    ap.add_argument("--seqs", nargs="+", type=int, default=[1024, 2048, 4096, 8192])
    ap.add_argument("--time-seqs", nargs="+", type=int, default=[1024])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None, help="results name (default attention_memory, _quick with --quick)")
    ap.add_argument("--out-dir", default=None, help="write the JSON here instead of benchmarks/results/")
    args = ap.parse_args(argv)
    if args.quick:
        args.seqs, args.time_seqs, args.rounds = [512, 2048], [512], 2
    args.out = args.out or ("attention_memory_quick" if args.quick else "attention_memory")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    recorder = Recorder("attention_memory", SOURCES, argv)
    resolved = attention.choose(attention.Mask(None, None, jnp.zeros((), jnp.int32)), jnp.zeros((1, 1, 1, 1)), None)
    result: dict[str, Any] = {
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "config": dict(vars(args)),
        "auto_is": resolved,
    }
    print(
        f"{jax.default_backend()} x{jax.device_count()} (auto attention here: {resolved}), commit "
        f"{recorder.git.get('commit')}"
    )
    if "memory" in args.sections:
        print(f"== compiled LoRA step memory, batch {args.batch}, float32 ==")
        rows = memory_section(args)
        print(table(rows, ["attention", "seq", "temp_MiB", "peak_MiB", "compile_s"]))
        result["memory"] = rows
        result["growth"] = {impl: growth(rows, impl) for impl in args.impls}
        goals = {}
        default = "auto" if "auto" in args.impls else next((i for i in args.impls if i != "xla"), None)
        g = result["growth"].get(default) if default else None
        if g is not None:
            key = (
                f"temp at {g['long']} tokens / temp at {g['short']} <= {GOAL:g} with attention={default} "
                f"({resolved if default == 'auto' else default})"
            )
            goals[key] = {"value": g["temp_ratio"], "met": g["temp_ratio"] <= GOAL}
        result["goals"] = goals
        for impl, g in result["growth"].items():
            if g:
                print(
                    f"  {impl}: {g['tokens_ratio']:.0f}x the tokens -> {g['temp_ratio']:.1f}x the temporaries, "
                    f"{g['peak_ratio']:.1f}x the peak"
                )
        for k, g in goals.items():
            print(f"{'MET   ' if g['met'] else 'MISSED'} {k}: {g['value']:.2f}")
    if "time" in args.sections:
        print(f"== LoRA step time by attention, batch {args.batch}, {args.rounds} interleaved rounds ==")
        result["time"] = time_section(args)
    path = recorder.write(args.out, result, args.out_dir)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
