"""One LoRA fine-tuning step, ours vs peers: Hugging Face PEFT (PyTorch), Flax NNX ``LoRALinear``, qwix.

    .venv/bin/python -m benchmarks.peers [--quick] [--batch 8 --seq 128 --rounds 5]

The same work in every framework: a GPT-2-small-shaped causal LM (``transformers.GPT2Config()``: 12 layers, d=768,
12 heads, vocab 50,257, tied head, no dropout), random weights, float32, a batch of ``batch x seq`` random token
ids, mean next-token cross-entropy over every position, LoRA r=8 (alpha 16) on the fused q,k,v projection
``c_attn`` only (PEFT's default target for GPT-2), AdamW (lr 1e-4) over the adapters only:

- **ours**: ``lora_jax.models.gpt2`` + ``lora.wrap`` (factored ``x@W0 + ((x@A)@B)*s``), the step of
  :mod:`benchmarks.train_step` (jitted, adapters and optimizer state donated);
- **peft**: ``peft.get_peft_model(transformers.GPT2LMHeadModel(config), LoraConfig(target_modules=["c_attn"]))``,
  ``torch.optim.AdamW`` over the trainable parameters, ``loss.backward(); opt.step(); opt.zero_grad()`` in eager
  PyTorch (transformers' default attention, SDPA), ``torch.set_num_threads(<cores>)``;
- **nnx**: a minimal GPT-2 written with ``flax.nnx`` below (``nnx.Embed``, ``nnx.LayerNorm``, ``nnx.Linear``;
  ``c_attn`` is an ``nnx.LoRALinear``), ``nnx.Optimizer(model, optax.adamw, wrt=nnx.LoRAParam)``, gradients
  w.r.t. ``nnx.LoRAParam`` only, the step under ``nnx.jit``; and the same model driven the way the NNX
  performance guide recommends for small steps, ``nnx.split`` once and a plain ``jax.jit`` over the state
  (row ``nnx (split + jax.jit)``);
- **qwix**: the same NNX model with a plain ``nnx.Linear`` ``c_attn``, LoRA added by
  ``qwix.apply_lora_to_model(model, qwix.LoraProvider(module_path=".*c_attn", rank=8, alpha=16))`` (it
  intercepts the layer's ``dot_general`` and adds the factored ``(x@A)@B``), trained as the NNX row.

The NNX models use the same attention arithmetic as ours (``lora_jax.models.layers.attend``: scores and softmax in
float32, a causal mask), so the JAX rows differ only in how they express the model and the adapters.
All variants are warmed up and then timed round-robin in one process (each round starting at the next variant);
the table reports medians and ours/peer: the median over rounds of ours' time divided by the peer's in the same
round (below 1: ours is faster), with its 95% bootstrap CI and a sign test; a peer is called faster or slower
only when the CI excludes 1. The notes quote only this run's figures: the per-step FLOPs of ours (XLA's cost
analysis of the compiled step) and of PEFT (``torch.utils.flop_counter`` over one extra, untimed step), each
over its own median step time. ``--quick``: a 1-layer width-64 model on 2 x 16 tokens, 2 rounds (a smoke run).
Writes ``benchmarks/results/peers.json`` with the provenance of :class:`benchmarks.common.Recorder`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lora
from benchmarks.common import (
    Recorder,
    block,
    median,
    paired_ratio,
    paired_summary,
    ratio_verdict,
    table,
    time_interleaved,
)
from benchmarks.train_step import build_lm, make_batch, prepare
from lora_jax.models.layers import attend

PEERS = ("ours", "peft", "nnx", "nnx-split", "qwix")
# The code this benchmark measures (benchmarks.staleness).
SOURCES = (
    "lora_jax/core.py",
    "lora_jax/ops.py",
    "lora_jax/models",
    "train/tasks.py",
    "benchmarks/peers.py",
    "benchmarks/train_step.py",
    "benchmarks/common.py",
)
LABELS = {
    "ours": "ours (lora_jax factored)",
    "peft": "HF PEFT (torch CPU)",
    "nnx": "flax nnx.LoRALinear (nnx.jit)",
    "nnx-split": "flax nnx.LoRALinear (split + jax.jit)",
    "qwix": "qwix LoraProvider (nnx.jit)",
}


def hf_config(quick: bool):
    import transformers

    kw = dict(n_layer=1, n_embd=64, n_head=4, vocab_size=512) if quick else {}
    return transformers.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw)


# ------------------------------------------------------------------------------------------ NNX GPT-2


def nnx_model(cfg, lora_rank: int | None, seed: int = 0):
    """A minimal GPT-2 in ``flax.nnx`` (pre-norm blocks, fused ``c_attn``, tied head). ``lora_rank``: make
    ``c_attn`` an ``nnx.LoRALinear`` of that rank; ``None``: a plain ``nnx.Linear`` (for qwix)."""
    from flax import nnx

    d, heads, ff = cfg.n_embd, cfg.n_head, cfg.n_inner or 4 * cfg.n_embd
    init = nnx.initializers.normal(cfg.initializer_range)

    def linear(n_in, n_out, rngs, rank=None):
        if rank:
            return nnx.LoRALinear(n_in, n_out, lora_rank=rank, kernel_init=init, rngs=rngs)
        return nnx.Linear(n_in, n_out, kernel_init=init, rngs=rngs)

    def norm(rngs):
        return nnx.LayerNorm(d, epsilon=cfg.layer_norm_epsilon, use_fast_variance=False, rngs=rngs)

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.ln_1, self.ln_2 = norm(rngs), norm(rngs)
            self.c_attn = linear(d, 3 * d, rngs, lora_rank)
            self.attn_proj = linear(d, d, rngs)
            self.c_fc = linear(d, ff, rngs)
            self.mlp_proj = linear(ff, d, rngs)

        def __call__(self, x, mask):
            b, s, _ = x.shape
            q, k, v = (t.reshape(b, s, heads, d // heads) for t in jnp.split(self.c_attn(self.ln_1(x)), 3, axis=-1))
            x = x + self.attn_proj(attend(q, k, v, mask).reshape(b, s, d))
            return x + self.mlp_proj(jax.nn.gelu(self.c_fc(self.ln_2(x)), approximate=True))

    class GPT2(nnx.Module):
        def __init__(self, rngs):
            self.wte = nnx.Embed(cfg.vocab_size, d, embedding_init=init, rngs=rngs)
            self.wpe = nnx.Embed(cfg.n_positions, d, embedding_init=init, rngs=rngs)
            self.h = nnx.List([Block(rngs) for _ in range(cfg.n_layer)])
            self.ln_f = norm(rngs)

        def __call__(self, ids):
            b, s = ids.shape
            x = self.wte(ids) + self.wpe(jnp.arange(s)[None])
            mask = jnp.broadcast_to(jnp.tril(jnp.ones((s, s), bool)), (b, s, s))
            for blk in self.h:
                x = blk(x, mask)
            return self.wte.attend(self.ln_f(x))

    return GPT2(nnx.Rngs(seed))


def mean_ce(logits, ids):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), ids[:, 1:]))


def nnx_step(model, lr: float):
    """The NNX training step under ``nnx.jit``: ``run()`` does one step in place."""
    from flax import nnx

    optimizer = nnx.Optimizer(model, optax.adamw(lr), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer, ids):
        loss, grads = nnx.value_and_grad(lambda m: mean_ce(m(ids), ids), argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    return lambda ids: block(step(model, optimizer, ids)), optimizer


def nnx_split_step(model, lr: float):
    """The same step, functional: ``nnx.split`` once, a plain ``jax.jit`` over (LoRA params, optimizer state,
    frozen rest), donating the trained state; the frozen base is an argument, never copied to the output."""
    from flax import nnx

    tx = optax.adamw(lr)
    graphdef, lora_state, rest = nnx.split(model, nnx.LoRAParam, ...)
    opt_state = tx.init(lora_state)

    def step(lora_state, opt_state, rest, ids):
        loss, grads = jax.value_and_grad(lambda ls: mean_ce(nnx.merge(graphdef, ls, rest)(ids), ids))(lora_state)
        updates, opt_state = tx.update(grads, opt_state, lora_state)
        return optax.apply_updates(lora_state, updates), opt_state, loss

    step = jax.jit(step, donate_argnums=(0, 1))
    state = {"lora": lora_state, "opt": opt_state}

    def run(ids):
        state["lora"], state["opt"], loss = step(state["lora"], state["opt"], rest, ids)
        block(loss)

    return run, state


def count_lora(model) -> int:
    from flax import nnx

    return sum(int(x.size) for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.LoRAParam)))


# ------------------------------------------------------------------------------------------------ PEFT


def peft_step(cfg, ids: np.ndarray, r: int, lr: float, threads: int):
    import peft
    import torch
    import transformers

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = peft.get_peft_model(
        transformers.GPT2LMHeadModel(cfg),
        peft.LoraConfig(
            r=r,
            lora_alpha=2 * r,
            target_modules=["c_attn"],
            lora_dropout=0.0,
            fan_in_fan_out=True,
            task_type="CAUSAL_LM",
        ),
    )
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr)
    ids_t = torch.tensor(ids, dtype=torch.long)

    def run():
        loss = model(input_ids=ids_t, labels=ids_t).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    info = {
        "torch": torch.__version__,
        "peft": peft.__version__,
        "threads": torch.get_num_threads(),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "trainable": sum(p.numel() for p in trainable),
    }
    return run, info


def peft_step_flops(run) -> float | None:
    """FLOPs of one PEFT step as ``torch.utils.flop_counter`` counts them (matmuls, attention; one untimed step)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:  # pragma: no cover - older torch
        return None
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return float(counter.get_total_flops())


def xla_flops(compiled) -> float | None:
    """FLOPs of a compiled XLA program as its cost analysis counts them (every op, elementwise included)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


# ------------------------------------------------------------------------------------------------ main


def explain(rows: dict[str, dict], info: dict[str, dict], quick: bool) -> list[str]:
    """Notes from this run's own measurements: each peer's paired comparison with ours, and the FLOP rates."""
    if quick:
        return ["quick: a tiny model, where per-call dispatch dominates; no conclusions from these times"]
    notes = [ratio_verdict(row["paired"], "ours", name) for name, row in rows.items() if name != "ours"]
    rates = []
    for name in ("ours", "peft"):
        flops = info.get(name, {}).get("flops_per_step")
        if flops and name in rows:
            ms = rows[name]["median_ms"]
            rates.append(
                f"{name}: {flops / 1e9:,.4g} GFLOP per step ({info[name]['flops_counter']}) in "
                f"{ms / 1e3:.2f} s = {flops / 1e6 / ms:,.4g} GFLOP/s"
            )
    if rates:
        notes.append("measured in this run (the two counters count different op sets): " + "; ".join(rates))
    return notes


GOAL = 1.3  # issue 16: our throughput >= 1.3x PEFT's on this step


def throughput_goal(rows: dict[str, dict], info: dict[str, dict]) -> dict:
    """Issue 16's goal on this run: PEFT's step time / ours (the paired median; its CI from the paired rounds),
    met when that median is at least :data:`GOAL`. When it is missed, ``why`` says what this run measured: the work
    each side does per step and the rate it runs at."""
    p = rows["peft"]["paired"]
    goal = {
        "value": 1 / p["median"],
        "ci95": [1 / p["ci95"][1], 1 / p["ci95"][0]],
        "target": GOAL,
        "met": 1 / p["median"] >= GOAL,
    }
    f_ours, f_peft = (info.get(n, {}).get("flops_per_step") for n in ("ours", "peft"))
    if not goal["met"] and f_ours and f_peft:
        rate = {n: info[n]["flops_per_step"] / (rows[n]["median_ms"] / 1e3) for n in ("ours", "peft")}
        goal["why"] = (
            f"ours does {f_ours / f_peft:.2f}x PEFT's counted FLOPs per step, at {rate['ours'] / 1e9:,.0f} "
            f"GFLOP/s against PEFT's {rate['peft'] / 1e9:,.0f} ({rate['ours'] / rate['peft']:.2f}x): "
            "the smaller graph runs at a lower FLOP rate on this CPU (the two counters count different "
            "op sets)"
        )
    return goal


def qwix_available() -> tuple[bool, str]:
    if importlib.util.find_spec("qwix") is None:
        return False, "qwix is not installed (pip install qwix: pure Python, no new dependencies beyond jax/flax)"
    import qwix

    return True, f"qwix {getattr(qwix, '__version__', '?')}"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a 1-layer width-64 model, 2 x 16 tokens, 2 rounds")
    ap.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    ap.add_argument("--out", default=None, help="results name (default peers, peers_quick with --quick)")
    ap.add_argument("--out-dir", default=None, help="write the JSON here instead of benchmarks/results/")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.rounds, args.warmup = 2, 16, 2, 1
    args.out = args.out or ("peers_quick" if args.quick else "peers")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    recorder = Recorder("peers", SOURCES, argv)
    t_start = time.perf_counter()
    cfg = hf_config(args.quick)
    notes: list[str] = []
    fns: dict[str, Any] = {}
    info: dict[str, Any] = {}

    # ours
    lm = build_lm("gpt2-small", quick=args.quick, layers=cfg.n_layer if args.quick else None)
    batch = make_batch(lm, args.batch, args.seq)
    ids = np.asarray(batch["input_ids"])
    t0 = time.perf_counter()
    adapters = lora.init(lm.params, r=args.r, alpha=2 * args.r, targets="qv")
    ours = prepare(lm, "factored", batch, adapters=adapters, lr=args.lr)
    fns["ours"] = ours
    info["ours"] = {
        "trainable": ours.trainable_params,
        "setup_s": time.perf_counter() - t0,
        "flops_per_step": xla_flops(ours.compiled),
        "flops_counter": "XLA cost analysis",
    }

    if "peft" in args.peers:
        if importlib.util.find_spec("peft") and importlib.util.find_spec("torch"):
            t0 = time.perf_counter()
            fns["peft"], info["peft"] = peft_step(cfg, ids, args.r, args.lr, args.threads)
            info["peft"]["setup_s"] = time.perf_counter() - t0
            info["peft"]["flops_per_step"] = peft_step_flops(fns["peft"])
            info["peft"]["flops_counter"] = "torch.utils.flop_counter"
        else:
            notes.append("peft: skipped, torch and peft are not installed (pip install torch==2.13.0 peft)")
    ids_j = jnp.asarray(ids)
    for peer, make_step in (("nnx", nnx_step), ("nnx-split", nnx_split_step)):
        if peer in args.peers:
            t0 = time.perf_counter()
            model = nnx_model(cfg, args.r)
            run, _ = make_step(model, args.lr)
            fns[peer] = lambda run=run: run(ids_j)
            info[peer] = {"trainable": count_lora(model), "setup_s": time.perf_counter() - t0}
    if "qwix" in args.peers:
        ok, why = qwix_available()
        if ok:
            import qwix
            from flax import nnx

            t0 = time.perf_counter()
            provider = qwix.LoraProvider(module_path=".*c_attn", rank=args.r, alpha=float(2 * args.r))
            model = qwix.apply_lora_to_model(nnx_model(cfg, None), provider, ids_j, rngs=nnx.Rngs(1))
            run, _ = nnx_step(model, args.lr)
            fns["qwix"] = lambda run=run: run(ids_j)
            info["qwix"] = {"trainable": count_lora(model), "version": why, "setup_s": time.perf_counter() - t0}
        else:
            notes.append(f"qwix: skipped, {why}")

    # compile / first call of everything, untimed, then interleaved rounds
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        info[name]["first_call_s"] = time.perf_counter() - t0
    times = time_interleaved(fns, rounds=args.rounds, warmup=args.warmup, rotate=True)
    tokens = args.batch * args.seq
    rows = []
    for name, ts in times.items():
        t = median(ts)
        paired = paired_summary(times["ours"], ts)
        rows.append(
            {
                "peer": LABELS[name],
                "trainable": info[name]["trainable"],
                "median_ms": 1e3 * t,
                "tokens/s": tokens / t,
                "ours/peer": paired_ratio(times, "ours", name),
                "ours/peer CI95": f"{paired['ci95'][0]:.2f}-{paired['ci95'][1]:.2f}",
                "min_ms": 1e3 * min(ts),
                "max_ms": 1e3 * max(ts),
                "paired": paired,
            }
        )
    notes += explain(dict(zip(times, rows)), info, args.quick)
    goals = (
        {}
        if args.quick or "peft" not in times
        else {"ours >= 1.3x PEFT's throughput": throughput_goal(dict(zip(times, rows)), info)}
    )

    print(
        f"GPT-2-small-shaped LM ({cfg.n_layer} layers, d={cfg.n_embd}, vocab {cfg.vocab_size}), batch {args.batch} x "
        f"{args.seq}, LoRA r={args.r} on c_attn, AdamW, float32, {os.cpu_count()} cores, medians of {args.rounds} "
        f"interleaved rounds{' [quick]' if args.quick else ''}"
    )
    print(
        table(rows, ["peer", "trainable", "median_ms", "tokens/s", "ours/peer", "ours/peer CI95", "min_ms", "max_ms"])
    )
    for n in notes:
        print("note:", n)
    for k, g in goals.items():
        print(
            f"goal {'MET' if g['met'] else 'MISSED'}: {k}: {g['value']:.2f}"
            + (f" ({g['why']})" if g.get("why") else "")
        )
    result = {
        "config": vars(args),
        "rows": rows,
        "info": info,
        "notes": notes,
        "goals": goals,
        "times_s": times,
        "wall_s": time.perf_counter() - t_start,
    }
    print(f"wall time {result['wall_s']:.0f} s; wrote {recorder.write(args.out, result, args.out_dir)}")
    return result


if __name__ == "__main__":
    main()
