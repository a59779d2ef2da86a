"""Host overlap in the training loop: ``train.prefetch`` on (the next batch gathered and placed, the previous
step's metrics read, while a step runs) vs off (batch placed, step run, loss read, one after the other).

    .venv/bin/python -m benchmarks.host_overlap [--quick] [--steps 60] [--rounds 5] [--data DIR]

The task is ``configs/sst2_minilm_lora.yaml`` (all-MiniLM-L6-v2, LoRA r=8 on query/value + a new head, batch
32, length-bucketed SST-2 batches), where a step is short enough that the host work per step shows. One
:func:`train.loop.setup` (one model, one jitted step), then :func:`train.loop.train_steps` itself, as a run calls
it (metric log written, a checkpoint at the end of each round, no evaluation), for ``--steps`` steps per round,
prefetch on and off alternating in ``--rounds`` rounds (the one going first alternating too), after a warm-up
round of each that compiles every batch width. Both modes share the compiled steps, so no round compiles. A
round's time is the loop's own training clock (``train_s``: steps only, the checkpoint excluded); the per-round
ratio on / off gives a median and a 95% bootstrap CI (:func:`benchmarks.common.paired_summary`).

Goal: prefetch on is not slower than off: the upper end of the CI of time on / off <= ``GOAL_UPPER`` (1.02).
Whether it is faster depends on how much host work there is to hide and on free cores (on a 2-core machine the
host thread competes with XLA's). ``--quick``: 8 steps, 2 rounds, 512 training sentences (a smoke run).
Writes ``benchmarks/results/host_overlap.json`` with the provenance of :class:`benchmarks.common.Recorder`.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

from benchmarks.common import ROOT, Recorder, median, paired_summary, ratio_verdict, table
from benchmarks.time_to_accuracy import data_dir

# The code this benchmark measures (benchmarks.staleness).
SOURCES = (
    "benchmarks/host_overlap.py",
    "benchmarks/common.py",
    "configs/sst2_minilm_lora.yaml",
    "train/loop.py",
    "train/data.py",
    "train/metrics.py",
    "train/config.py",
    "lora_jax/sharding.py",
    "lora_jax/checkpoint.py",
)
CONFIG = ROOT / "configs" / "sst2_minilm_lora.yaml"
GOAL_UPPER = 1.02  # the CI's upper end of time(prefetch on) / time(prefetch off)


class _Folder:
    """Stands in for :class:`train.outputs.RunFolder` (``train_steps`` commits it after a checkpoint)."""

    def commit(self) -> None:
        pass


def goals(summary: dict) -> dict[str, dict]:
    hi = summary["ci95"][1]
    return {
        f"prefetch on is not slower than off: CI upper end of time on / off <= {GOAL_UPPER}": {
            "value": hi,
            "met": hi <= GOAL_UPPER,
        }
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="steps per round and mode")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-train", type=int, default=None, help="use only this many training sentences")
    ap.add_argument("--data", default=None, help="the SST-2 folder (train.tsv, dev.tsv)")
    ap.add_argument("--quick", action="store_true", help="8 steps, 2 rounds, 512 sentences")
    ap.add_argument("--out", default="host_overlap")
    ap.add_argument("--out-dir", default=None, help="write the JSON here instead of benchmarks/results/")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.rounds, args.max_train = 8, 2, args.max_train or 512
    recorder = Recorder("host_overlap", SOURCES, argv)

    from lora_jax.checkpoint import Checkpointer
    from train import loop
    from train import metrics as metrics_lib
    from train.config import load_config

    root = data_dir(args.data)
    overrides = [
        f"data.source={root / 'train.tsv'}",
        f"data.eval_source={root / 'dev.tsv'}",
        f"train.steps={args.steps}",
        f"eval.every={args.steps + 1}",
        "data.max_eval_examples=64",
    ]
    if args.max_train:
        overrides.append(f"data.max_train_examples={args.max_train}")
    configs = {
        mode: load_config(str(CONFIG), [*overrides, f"train.prefetch={mode == 'on'}".lower()]) for mode in ("on", "off")
    }
    cfg = configs["on"]
    s, state = loop.setup(cfg, lambda *a, **k: None)
    s = dataclasses.replace(s, primary=False)  # no progress bar
    compiled: dict = {}  # shared by both modes: one compilation per width, in the warm-up
    times: dict[str, list[float]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory() as tmp:

        def one_round(mode: str, i: int) -> float:
            nonlocal state
            folder = Path(tmp) / f"{mode}-{i}"
            ckpt = Checkpointer(folder / "checkpoints", every=10**9, keep=1)
            log = metrics_lib.MetricLog(folder)
            p = loop.Progress(compiled=compiled)
            state, p = loop.train_steps(dataclasses.replace(s, cfg=configs[mode]), state, p, ckpt, log, _Folder())
            ckpt.close()
            log.close()
            return p.train_s

        for mode in ("on", "off"):  # warm-up: compiles every width the rounds' batches have
            one_round(mode, -1)
        for i in range(args.rounds):
            for mode in ("on", "off") if i % 2 == 0 else ("off", "on"):
                times[mode].append(one_round(mode, i))
    summary = paired_summary(times["on"], times["off"])
    rows = [
        {"prefetch": mode, "median_round_s": median(ts), "steps_per_s": args.steps * len(ts) / sum(ts)}
        for mode, ts in times.items()
    ]
    goal = goals(summary)
    print(
        f"SST-2 / all-MiniLM-L6-v2 LoRA, batch {cfg.train.batch_size}, {args.steps} steps per round, "
        f"{args.rounds} alternating rounds, widths {list(s.batches.widths)}, {len(compiled)} compilations"
    )
    print(table(rows, ["prefetch", "median_round_s", "steps_per_s"]))
    print("time on / off: " + ratio_verdict(summary, "prefetch on", "prefetch off"))
    for k, g in goal.items():
        print(f"{'MET' if g['met'] else 'MISSED'}: {k}: {g['value']:.3f}")
    result = {
        "config": vars(args),
        "rows": rows,
        "times_s": times,
        "ratio_on_off": summary,
        "goals": goal,
        "widths": list(s.batches.widths),
        "compilations": len(compiled),
    }
    print(f"wrote {recorder.write(args.out, result, args.out_dir)}")
    return result


if __name__ == "__main__":
    main()
