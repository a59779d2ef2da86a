"""One fine-tuning step of a mixture of experts: LoRA on the routed experts vs full fine-tuning vs PEFT, and the
grouped (ragged) expert dispatch vs a dense one-hot dispatch.

    .venv/bin/python -m benchmarks.moe_step [--quick] [--experts 8 32] [--rounds 5]

The model: a tiny Qwen3-MoE-shaped causal LM (``lora_jax.models.qwen3_moe``; d=256, 2 layers, 4 query / 2 KV
heads of 64, ``E`` experts of width 128, top-2 with renormalised weights, vocab 4096), random float32 weights,
a batch of 4 x 128 random token ids, mean next-token cross-entropy, AdamW. LoRA: r=8 (alpha 16) on every routed
expert kernel (``gate_up_proj``, ``down_proj``: one adapter per expert) and on q/k/v/o. Variants, compiled once
and then timed round-robin in one process (each round starting at the next variant):

- ``full``: full fine-tuning (gradients and Adam state for every parameter), grouped dispatch;
- ``lora``: LoRA factored (``lora.wrap``): the experts' grouped products ``ragged_dot(x, W0) +
  ragged_dot(ragged_dot(x, A), B) * s`` on one sort of the tokens;
- ``lora-merged``: LoRA through ``lora.merge`` (forms ``W0 + A@B`` and its ``(E, d_in, d_out)`` gradient);
- ``lora-dense`` / ``full-dense``: the same with ``moe_dispatch="dense"``: every expert on every token, weighted
  by a one-hot combine matrix (``E / k`` times the FLOPs of the grouped products);
- ``peft``: ``transformers.Qwen3MoeForCausalLM`` of the same config with ``peft`` LoRA (``target_parameters`` on
  the experts, ``target_modules`` q/k/v/o), ``torch.optim.AdamW``, eager PyTorch on the CPU (its experts loop
  over the experts that received tokens and gather their tokens: grouped work).

Reported: median step time, the median over rounds of each variant's time over ``full``'s in the same round (with
its 95% bootstrap CI and sign test: :func:`benchmarks.common.paired_summary`), and XLA's compiled memory
(arguments + outputs - aliased + temporaries; PEFT: not measured). On XLA:CPU,
``jax.lax.ragged_dot`` is lowered to a dense product masked per expert (``E`` times the grouped FLOPs, more
than the one-hot path's ``E / k``), so on CPU the grouped path is the slower one; GPUs and TPUs lower it to a
grouped matmul. ``--quick``: a width-32 model, 2 rounds (a smoke run). Writes ``benchmarks/results/moe_step.json``
with its run's provenance (:class:`benchmarks.common.Recorder`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import numpy as np

import lora_jax as lora
from benchmarks.common import (
    Recorder,
    block,
    median,
    memory_analysis,
    paired_ratio,
    paired_summary,
    ratio_verdict,
    table,
    time_interleaved,
)
from benchmarks.train_step import LM, make_batch, prepare
from lora_jax.models import qwen3_moe

# The code this benchmark measures (benchmarks.staleness).
SOURCES = (
    "lora_jax/core.py",
    "lora_jax/ops.py",
    "lora_jax/quant.py",
    "lora_jax/models/moe.py",
    "lora_jax/models/qwen3_moe.py",
    "lora_jax/models/decoder.py",
    "lora_jax/models/layers.py",
    "lora_jax/models/generate.py",
    "lora_jax/models/arch.py",
    "train/tasks.py",
    "benchmarks/moe_step.py",
    "benchmarks/train_step.py",
    "benchmarks/common.py",
)
MiB = 2**20
VARIANTS = ("full", "lora", "lora-merged", "lora-dense", "full-dense", "peft")
LABELS = {
    "full": "full fine-tuning (grouped)",
    "lora": "LoRA factored (grouped ragged_dot)",
    "lora-merged": "LoRA merge-then-forward (grouped)",
    "lora-dense": "LoRA factored (dense one-hot dispatch)",
    "full-dense": "full fine-tuning (dense one-hot dispatch)",
    "peft": "HF PEFT target_parameters (torch CPU)",
}
TARGETS = ["(.*/)?mlp/experts/.*", ".*self_attn/(q|k|v|o)_proj/kernel"]


def hf_config(experts: int, quick: bool):
    import transformers

    width = (
        dict(
            hidden_size=32,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            moe_intermediate_size=16,
            vocab_size=256,
            num_hidden_layers=1,
        )
        if quick
        else dict(
            hidden_size=256,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            moe_intermediate_size=128,
            vocab_size=4096,
            num_hidden_layers=2,
        )
    )
    return transformers.Qwen3MoeConfig(
        **width,
        intermediate_size=4 * width["hidden_size"],
        num_experts=experts,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        max_position_embeddings=512,
        attention_dropout=0.0,
    )


def build(experts: int, quick: bool, dispatch: str = "ragged") -> LM:
    config = dataclasses.replace(qwen3_moe.Config.from_hf(hf_config(experts, quick)), moe_dispatch=dispatch)
    params = jax.jit(qwen3_moe.init_params, static_argnums=0)(config, jax.random.key(0))
    return LM(
        f"qwen3-moe E={experts}",
        config,
        qwen3_moe.build(config),
        block(params),
        f"transformers.Qwen3MoeConfig, {experts} experts, top-2, dispatch {dispatch}",
    )


class PeftStep:
    """The same step in PyTorch with peft (the variant ``peft``)."""

    def __init__(self, experts: int, quick: bool, batch: dict, r: int, threads: int):
        import peft
        import torch
        import transformers

        torch.set_num_threads(threads)
        torch.manual_seed(0)
        model = transformers.Qwen3MoeForCausalLM(hf_config(experts, quick)).train()
        config = peft.LoraConfig(
            r=r,
            lora_alpha=2 * r,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        )
        self.model = peft.get_peft_model(model, config)
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        self.ids = torch.tensor(np.asarray(batch["input_ids"]), dtype=torch.long)
        self.trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.torch = torch

    def __call__(self) -> None:
        logits = self.model(self.ids).logits[:, :-1].float()
        loss = self.torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.ids[:, 1:].reshape(-1))
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        float(loss)


def section(experts: int, args) -> tuple[list[dict], list[dict], dict, dict]:
    lm = build(experts, args.quick)
    dense = build(experts, args.quick, "dense")
    batch = make_batch(lm, args.batch, args.seq)
    adapters = lora.init(lm.params, r=args.r, alpha=2 * args.r, targets=TARGETS)
    fns, compiled = {}, {}
    for name in VARIANTS:
        if name == "peft":
            if args.no_peft:
                continue
            fns[name] = PeftStep(experts, args.quick, batch, args.r, args.threads)
            continue
        model = dense if name.endswith("dense") else lm
        kind = {
            "full": "full",
            "full-dense": "full",
            "lora": "factored",
            "lora-dense": "factored",
            "lora-merged": "merged",
        }[name]
        v = prepare(model, kind, batch, adapters=adapters, name=name)
        fns[name] = compiled[name] = v
    times = time_interleaved(fns, rounds=args.rounds, warmup=args.warmup, rotate=True)
    tokens = args.batch * args.seq
    rows, mems = [], []
    for name, fn in fns.items():
        trainable = fn.trainable if name == "peft" else compiled[name].trainable_params
        rows.append(
            {
                "model": lm.name,
                "variant": LABELS[name],
                "trainable": int(trainable),
                "median_ms": 1e3 * median(times[name]),
                "tokens/s": tokens / median(times[name]),
                "ratio_to_full": paired_ratio(times, name, "full"),
                "compile_s": getattr(fn, "compile_s", None),
            }
        )
        if name in compiled:
            m = memory_analysis(compiled[name].compiled)
            mems.append(
                {
                    "model": lm.name,
                    "variant": LABELS[name],
                    "peak_MiB": m["peak"] / MiB,
                    "temp_MiB": m["temp"] / MiB,
                    "opt_state_MiB": compiled[name].opt_state_bytes / MiB,
                    "bytes": m,
                }
            )
    full_peak = next(m["bytes"]["peak"] for m in mems if m["variant"] == LABELS["full"])
    for m in mems:
        m["peak_ratio_to_full"] = m["bytes"]["peak"] / full_peak
    e = lm.config
    info = {
        "params": lm.n_params,
        "experts": experts,
        "top_k": e.num_experts_per_tok,
        "hidden": e.hidden_size,
        "expert_width": e.moe_intermediate_size,
        "layers": e.num_hidden_layers,
        "vocab": e.vocab_size,
        "adapter_params": int(sum(x.size for x in jax.tree_util.tree_leaves(adapters))),
        "expert_rows_per_step": tokens * e.num_experts_per_tok,
    }
    info["verdicts"] = {
        f"{a} vs {b}": ratio_verdict(paired_summary(times[a], times[b]), LABELS[a], LABELS[b])
        for a, b in (
            ("lora", "full"),
            ("lora", "lora-dense"),
            ("full", "full-dense"),
            ("lora", "lora-merged"),
            ("lora", "peft"),
        )
        if a in times and b in times
    }
    info["paired_to_full"] = {name: paired_summary(times[name], times["full"]) for name in times if name != "full"}
    return rows, mems, {k: v for k, v in times.items()}, info


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a tiny model and 2 rounds: a smoke run")
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    ap.add_argument("--no-peft", action="store_true", help="skip the PyTorch / peft variant")
    ap.add_argument("--out", default=None, help="results name (default moe_step, moe_step_quick with --quick)")
    ap.add_argument("--out-dir", default=None, help="write the JSON here instead of benchmarks/results/")
    args = ap.parse_args(argv)
    if args.quick:
        args.experts, args.batch, args.seq, args.rounds = args.experts[:1], 2, 16, 2
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    recorder = Recorder("moe_step", SOURCES, argv)
    t0 = time.perf_counter()
    rows, mems, times, models = [], [], {}, {}
    for experts in args.experts:
        r, m, t, info = section(experts, args)
        rows += r
        mems += m
        times[f"E={experts}"] = t
        models[f"E={experts}"] = info
    print(table(rows, ["model", "variant", "trainable", "median_ms", "tokens/s", "ratio_to_full"]))
    print()
    print(
        table(
            [{k: v for k, v in m.items() if k != "bytes"} for m in mems],
            ["model", "variant", "peak_MiB", "peak_ratio_to_full", "temp_MiB", "opt_state_MiB"],
        )
    )
    for info in models.values():
        for verdict in info["verdicts"].values():
            print("  " + verdict)
    payload = {
        "config": vars(args),
        "models": models,
        "step": rows,
        "memory": mems,
        "times_s": times,
        "notes": [
            "XLA:CPU lowers jax.lax.ragged_dot to a dense product masked per expert (E x the grouped FLOPs), "
            "the one-hot dispatch costs E/k x: on CPU the grouped path is the slower one; on GPU/TPU "
            "ragged_dot is a grouped matmul.",
            "Timed on a CPU shared with other jobs: ratios within a round are the result, not absolute times.",
        ],
        "wall_s": time.perf_counter() - t0,
    }
    path = recorder.write(args.out or ("moe_step_quick" if args.quick else "moe_step"), payload, args.out_dir)
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
