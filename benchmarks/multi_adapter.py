"""Mixed-adapter batches: throughput of one batch spread over 1, 4, 16, 64 adapters vs the same batch on one adapter,
and vs PEFT's ``adapter_names=`` mixed-batch forward on the same torch model.

A Llama-style decoder (random weights, float32) serves a batch of ``--batch`` rows x ``--seq`` tokens (a prefill
forward pass to logits). Every adapter has rank ``--r`` on the attention projections (q, k, v, o); adapter ``n``
of a mix has rank ``r`` or ``r/2`` alternately, so the stack pads ranks. Row ``i`` uses adapter ``i % n``.

Ours: ``lora.wrap_mixed`` inside one jitted step (``MultiLoraWeight``: per-row gathered factors, two batched
matmuls through the rank bottleneck); the baseline "one adapter" is the ordinary factored forward
(``lora.wrap``, a ``LoraWeight`` per kernel). PEFT: the same weights in ``transformers``' ``LlamaForCausalLM``,
the adapters saved with ``lora.save_peft`` and loaded with ``load_adapter``, the forward called with
``adapter_names=[...]`` (PEFT groups the rows by adapter and runs each group's LoRA path in a Python loop).
All variants are timed round-robin in one process (medians).

    python -m benchmarks.multi_adapter [--batch 64 --seq 32 --hidden 256 --layers 4 --r 8 --rounds 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lora
from benchmarks.common import Recorder, block, median, table, time_interleaved
from lora_jax.models import llama, save_pretrained

MIXES = (1, 4, 16, 64)
# The code this benchmark measures (benchmarks.staleness).
SOURCES = (
    "lora_jax/core.py",
    "lora_jax/ops.py",
    "lora_jax/multi.py",
    "lora_jax/peft.py",
    "lora_jax/models",
    "benchmarks/multi_adapter.py",
    "benchmarks/common.py",
)


def make_adapters(params, n: int, r: int, seed: int = 0) -> list:
    """``n`` adapters on the attention projections, ranks r and r/2 alternately, random non-zero factors."""
    out = []
    for i in range(n):
        rank = r if i % 2 == 0 else max(1, r // 2)
        rng = np.random.RandomState(seed + i)
        template = lora.init(params, r=rank, alpha=2.0 * rank, targets="attention")
        out.append(
            jax.tree_util.tree_map(
                lambda ad: dataclasses.replace(
                    ad,
                    a=jnp.asarray(rng.uniform(-1, 1, ad.a.shape) / np.sqrt(ad.a.shape[0]), jnp.float32),
                    b=jnp.asarray(0.05 * rng.standard_normal(ad.b.shape), jnp.float32),
                ),
                template,
                is_leaf=lora.is_adapter,
            )
        )
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-peft", action="store_true", help="skip the PEFT comparison (no torch needed)")
    ap.add_argument("--out", default="multi_adapter")
    ap.add_argument("--out-dir", default=None, help="write the JSON here instead of benchmarks/results/")
    args = ap.parse_args(argv)
    recorder = Recorder("multi_adapter", SOURCES, argv)
    if args.batch % max(MIXES):
        raise SystemExit(f"--batch must be a multiple of {max(MIXES)} so that every mix fills whole groups")

    config = llama.Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=int(2.75 * args.hidden),
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64 or 1,
        num_key_value_heads=args.hidden // 64 or 1,
        head_dim=min(64, args.hidden),
        max_position_embeddings=max(128, args.seq),
    )
    params = jax.jit(llama.init_params, static_argnums=0)(config, jax.random.key(0))
    model = llama.build(config)
    adapters = make_adapters(params, max(MIXES), args.r)
    tokens = np.random.RandomState(0).randint(0, args.vocab, (args.batch, args.seq))
    x = jnp.asarray(tokens, jnp.int32)
    tokens_per_call = args.batch * args.seq

    base_step = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])
    single_step = jax.jit(lambda p, a, x: model.apply({"params": lora.wrap(p, a)}, x)[0])
    mixed_step = jax.jit(lambda p, st, ids, x: model.apply({"params": lora.wrap_mixed(p, st, ids)}, x)[0])

    fns = {
        "base model (no adapter)": lambda: block(base_step(params, x)),
        "one adapter (lora.wrap)": lambda: block(single_step(params, adapters[0], x)),
    }
    stacks = {}
    for n in MIXES:
        stacks[n] = (lora.stack_adapters(adapters[:n], rank=args.r), jnp.asarray(np.arange(args.batch) % n, jnp.int32))
        fns[f"mixed batch, {n} adapter(s)"] = lambda n=n: block(mixed_step(params, stacks[n][0], stacks[n][1], x))

    # correctness spot check of the mixed step (rows of adapter 0 equal the one-adapter forward)
    got = np.asarray(mixed_step(params, stacks[4][0], stacks[4][1], x))[::4]
    want = np.asarray(single_step(params, adapters[0], x))[::4]
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-3)

    peft_model = None
    if not args.no_peft:
        import peft
        import torch
        import transformers

        tmp = Path(tempfile.mkdtemp(prefix="multi_adapter_"))
        save_pretrained(params, config, tmp / "base")
        torch_model = transformers.LlamaForCausalLM.from_pretrained(str(tmp / "base")).eval()
        for i, ad in enumerate(adapters):
            lora.save_peft(ad, tmp / f"a{i}", config=config)
        peft_model = peft.PeftModel.from_pretrained(torch_model, str(tmp / "a0"), adapter_name="a0")
        for i in range(1, max(MIXES)):
            peft_model.load_adapter(str(tmp / f"a{i}"), adapter_name=f"a{i}")
        peft_model.eval()
        tx = torch.tensor(tokens)

        def peft_forward(names):
            with torch.no_grad():
                return peft_model(tx, adapter_names=names).logits

        ref = peft_forward([f"a{i % 4}" for i in range(args.batch)]).numpy()
        np.testing.assert_allclose(
            ref, np.asarray(mixed_step(params, stacks[4][0], stacks[4][1], x)), atol=1e-3, rtol=1e-3
        )
        for n in MIXES:
            names = [f"a{i % n}" for i in range(args.batch)]
            fns[f"PEFT adapter_names=, {n} adapter(s)"] = lambda names=names: peft_forward(names)

    times = time_interleaved(fns, rounds=args.rounds, warmup=1)
    one = median(times["one adapter (lora.wrap)"])
    peft_one = median(times["PEFT adapter_names=, 1 adapter(s)"]) if peft_model is not None else None
    rows = []
    for name, ts in times.items():
        t = median(ts)
        row = {
            "variant": name,
            "median_ms": 1e3 * t,
            "tokens_per_s": tokens_per_call / t,
            "throughput_vs_one_adapter": one / t,
        }
        for n in MIXES:
            if name == f"mixed batch, {n} adapter(s)" and peft_model is not None:
                row["speedup_vs_peft_same_mix"] = median(times[f"PEFT adapter_names=, {n} adapter(s)"]) / t
        if name.startswith("PEFT") and peft_one is not None:
            row["throughput_vs_peft_1_adapter"] = peft_one / t
        rows.append(row)
    print(
        f"Llama-style decoder: {args.layers} layers, d={args.hidden}, vocab {args.vocab}; batch {args.batch} x "
        f"{args.seq} tokens; LoRA r={args.r} (and r/2) on q,k,v,o; float32, CPU; medians of {args.rounds} rounds"
    )
    print(
        table(
            rows,
            [
                "variant",
                "median_ms",
                "tokens_per_s",
                "throughput_vs_one_adapter",
                "speedup_vs_peft_same_mix",
                "throughput_vs_peft_1_adapter",
            ],
        )
    )
    at16 = one / median(times["mixed batch, 16 adapter(s)"])
    print(f"\nmixed batch over 16 adapters: {at16:.2f}x the throughput of the same batch on one adapter (goal >= 0.8)")
    path = recorder.write(args.out, {"config": vars(args), "rows": rows, "ratio_16_vs_one_adapter": at16}, args.out_dir)
    print(f"wrote {path}")
    return {"rows": rows, "ratio_16": at16}


if __name__ == "__main__":
    main()
