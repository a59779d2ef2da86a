"""Fine-tuning a model bigger than one device: peak host memory of ``train.run`` loading straight into the mesh.

    python -m benchmarks.sharded_load [--quick] [--preset 1.1b] [--steps 3]

A Llama-shaped checkpoint with random weights (preset ``1.1b``: 22 layers, width 2,048, MLP 5,632, 32 heads / 4 KV
heads, SmolLM2's 49,152-token vocabulary: 1.17 B parameters, 2.3 GB as bfloat16) is generated once, as Hugging
Face sharded safetensors (``model-0000K-of-0000N`` + index, 500 MB shards) with SmolLM2's tokenizer, into
``~/.cache/lora_jax/bench/llama-<preset>`` (never committed). Then, each in a fresh process timed by
``/usr/bin/time`` (its maximum resident set size):

1. ``whole``: what loading looked like before: ``lora_jax.models.load(folder, dtype=float32)``, the whole model on
   one device in float32 (the loader alone, no training);
2. ``sharded 1x8``: ``python -m train.run`` on 8 CPU devices (``mesh.fsdp=8``), ``train.precision=bfloat16``,
   ``train.remat=full``, LoRA r=8 on q/v, ``--steps`` steps of 8 rows x 64 tokens, evaluation and exports off,
   layers scanned (the job's default); ``sharded 1x8 unrolled``: the same with ``model.scan_layers=false`` (the
   reference: unrolled, XLA keeps each layer's gathered weights from the forward to the backward pass);
3. ``sharded 2x4``: the same job as two processes of 4 CPU devices each forming a JAX cluster on 127.0.0.1 (each
   process's peak is reported; each reads only the blocks its devices hold);
4. ``runtime (no weights)``: what the job's process holds before it reads a weight (its imports, 8 CPU devices,
   ``open_checkpoint``: config, tokenizer, tensor headers), the part of each peak that is not the model; and the
   same with torch importable, as this project's test environment has it.

Every measured process runs as the ``train`` extra installs the job, without torch (see ``HIDE_TORCH``).

CPU devices live in host memory, so the sharded base alone is 1.0x the checkpoint's bytes in one process and
0.5x in each of two. Goals (issue 25): peak RSS <= 1.4x the checkpoint's bytes for ``sharded 1x8``, <= 0.8x per
process for ``sharded 2x4``. ``--quick`` runs a 2-layer width-64 model (the command stays working; its ratios mean
nothing: the runtime dominates). Writes ``benchmarks/results/sharded_load.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT, Recorder, table

SOURCES = [
    "lora_jax/models",
    "lora_jax/stacking.py",
    "lora_jax/sharding.py",
    "train/loop.py",
    "train/memory.py",
    "benchmarks/sharded_load.py",
]
PRESETS = {
    "1.1b": dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4
    ),
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
}
GOALS = {"sharded 1x8": 1.4, "sharded 2x4": 0.8}


def make_checkpoint(folder: Path, preset: str, shard_size: str = "500MB") -> int:
    """Write the preset's random-weight Llama checkpoint (bfloat16, sharded safetensors + index, SmolLM2's
    tokenizer) into ``folder`` unless it is there; return its weights' bytes."""
    import ml_dtypes
    import transformers

    from lora_jax import models
    from lora_jax.models import arch as arch_lib
    from lora_jax.models import hf, llama

    index = folder / hf.INDEX_NAME
    if not index.is_file():
        hf_config = transformers.LlamaConfig(
            vocab_size=49152,
            max_position_embeddings=2048,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            torch_dtype="bfloat16",
            **PRESETS[preset],
        )
        config = llama.Config.from_hf(hf_config)
        family = arch_lib.for_config(config)
        specs, fill = {}, {}
        for path, spec in family.shapes(config, "causal-lm").items():
            t = family.names.tensor(path, config)
            (shape,) = [tuple(x.shape) for x in t.layout.save(np.broadcast_to(np.zeros((), np.float32), spec.shape))]
            specs[t.names[0]] = (shape, ml_dtypes.bfloat16)
            fill[t.names[0]] = path[-1]
        rng = np.random.default_rng(0)

        def get(name: str) -> np.ndarray:
            shape, dtype = specs[name]
            if fill[name] == "scale":
                return np.ones(shape, dtype)
            return (rng.standard_normal(shape, np.float32) * 0.02).astype(dtype)

        folder.mkdir(parents=True, exist_ok=True)
        hf.write_safetensors_streaming(specs, get, folder, shard_size)
        hf_config.save_pretrained(str(folder))
        models.open_checkpoint("SmolLM2-135M-Instruct-Q4_1").tokenizer.save_pretrained(str(folder))
    weights = json.loads(index.read_text()) if index.is_file() else None
    return int(weights["metadata"]["total_size"])


def _timed(cmd: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        ["/usr/bin/time", "-f", "MAXRSS_KB %M", *cmd],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _finish(proc: subprocess.Popen, what: str) -> dict:
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{out[-4000:]}")
    rss = int(re.findall(r"MAXRSS_KB (\d+)", out)[-1]) * 1024
    load = re.findall(r"loaded \S+ into the mesh in ([\d.]+)s", out)
    loader = re.findall(r"LOAD_S ([\d.]+)", out)
    plan = re.findall(r"memory plan per device: .*", out)
    losses = [float(x) for x in re.findall(r"\bloss ([\d.]+)", out)]
    torch = re.findall(r"TORCH (True|False)", out)
    return {
        "torch": torch[0] == "True" if torch else None,
        "peak_rss_bytes": rss,
        "load_s": float((load or loader or ["nan"])[0]),
        "plan": plan[0] if plan else None,
        "losses": losses,
    }


def _env(devices: int, **extra: str) -> dict:
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        HF_HUB_OFFLINE="1",
        **extra,
    )
    env.pop("LORA_JAX_8DEV", None)
    return env


# The job as the ``train`` extra installs it, which has no torch: this project's test environment installs torch
# (for the parity tests) and transformers imports it whenever it is importable (~0.3 GB of resident memory that a
# user's training process does not have). Each measured process hides it: ``find_spec`` answers None and an
# ``import torch`` fails as if it were not installed.
HIDE_TORCH = (
    "import importlib.util as u, sys; f = u.find_spec; "
    "u.find_spec = lambda n, *a, **k: None if n.split('.')[0] == 'torch' else f(n, *a, **k); "
    "sys.meta_path.insert(0, type('NoTorch', (), {'find_spec': staticmethod(lambda n, *a: "
    "(_ for _ in ()).throw(ModuleNotFoundError(n)) if n.split('.')[0] == 'torch' else None)})()); "
)


def _job_args(folder: Path, out: Path, steps: int, fsdp: int) -> list[str]:
    return [
        sys.executable,
        "-c",
        HIDE_TORCH + "import runpy; runpy.run_module('train.run', run_name='__main__', alter_sys=True)",
        f"model.name={folder}",
        "data.task=causal-lm",
        "data.source=builtin:restaurants",
        "lora.targets=qv",
        "lora.r=8",
        f"train.steps={steps}",
        "train.batch_size=8",
        "data.max_length=64",
        "train.precision=bfloat16",
        "train.remat=full",
        f"mesh.fsdp={fsdp}",
        "eval.every=100000",
        "eval.generate_samples=0",
        "eval.generate_eval=0",
        "data.max_eval_examples=8",
        "eval.batch_size=8",
        "checkpoint.every=100000",
        f"output.dir={out}",
        "optim.warmup_steps=0",
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(folder: Path, steps: int, work: Path) -> dict[str, list[dict]]:
    whole = _timed(
        [
            sys.executable,
            "-c",
            (
                HIDE_TORCH + "import time, jax.numpy as jnp; from lora_jax import models; t = time.perf_counter(); "
                f"models.load({str(folder)!r}, dtype=jnp.float32); print('LOAD_S', time.perf_counter() - t)"
            ),
        ],
        _env(8),
    )
    rows = {"whole": [_finish(whole, "whole-model load")]}
    # What the job's process holds before it reads a weight: Python, JAX with its devices, transformers (which
    # imports torch when it is installed, as in this project's test environment), the config and tokenizer.
    opened = (
        "import sys, jax, jax.numpy as jnp, train.run; from lora_jax import models; "
        f"jnp.zeros(jax.device_count()).block_until_ready(); models.open_checkpoint({str(folder)!r}); "
        "print('TORCH', 'torch' in sys.modules)"
    )
    for name, hide in (("runtime (no weights)", True), ("runtime (no weights), torch importable", False)):
        runtime = _timed([sys.executable, "-c", (HIDE_TORCH if hide else "") + opened], _env(8))
        rows[name] = [_finish(runtime, "the job's imports and open_checkpoint")]
        if rows[name][0]["torch"] == hide:
            raise RuntimeError(f"{name}: torch {'imported although hidden' if hide else 'not imported'}")
    one = _timed(_job_args(folder, work / "one", steps, 8), _env(8))
    rows["sharded 1x8"] = [_finish(one, "train.run on 8 devices")]
    unrolled = _timed([*_job_args(folder, work / "unrolled", steps, 8), "model.scan_layers=false"], _env(8))
    rows["sharded 1x8 unrolled"] = [_finish(unrolled, "train.run on 8 devices, unrolled layers")]
    port = _free_port()
    procs = [
        _timed(
            _job_args(folder, work / "two", steps, 8),
            _env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
        )
        for i in range(2)
    ]
    rows["sharded 2x4"] = [_finish(p, f"train.run process {i} of 2") for i, p in enumerate(procs)]
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 2-layer width-64 model: the command works")
    parser.add_argument("--preset", default="1.1b", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "lora_jax" / "bench"))
    parser.add_argument("--out", default="sharded_load")
    args = parser.parse_args(argv)
    recorder = Recorder("sharded_load", SOURCES, argv)
    preset = "tiny" if args.quick else args.preset
    folder = Path(args.cache) / f"llama-{preset}"
    ckpt_bytes = make_checkpoint(folder, preset, "500MB" if preset != "tiny" else "2MB")
    with tempfile.TemporaryDirectory() as work:
        measured = measure(folder, 1 if args.quick else args.steps, Path(work))
    rows = []
    for name, runs in measured.items():
        for i, r in enumerate(runs):
            ratio = r["peak_rss_bytes"] / ckpt_bytes
            goal = GOALS.get(name)
            rows.append(
                {
                    "run": name + (f" p{i}" if len(runs) > 1 else ""),
                    "peak_rss_gib": r["peak_rss_bytes"] / 2**30,
                    "x_checkpoint": ratio,
                    "load_s": r["load_s"],
                    "goal": goal if goal else "",
                    "met": ("yes" if ratio <= goal else "NO") if goal and not args.quick else "",
                    "losses": r["losses"],
                    "plan": r["plan"],
                }
            )
    print(f"checkpoint: {folder} ({ckpt_bytes / 2**30:.2f} GiB of bfloat16 weights)")
    print(table(rows, ["run", "peak_rss_gib", "x_checkpoint", "load_s", "goal", "met"]))
    for r in rows:
        if r["plan"]:
            print(f"{r['run']}: {r['plan']}")
    payload = {
        "preset": preset,
        "quick": args.quick,
        "checkpoint_bytes": ckpt_bytes,
        "rows": rows,
        "goals_met": None if args.quick else all(r["met"] == "yes" for r in rows if r["goal"]),
    }
    path = recorder.write(args.out, payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
