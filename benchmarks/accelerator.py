"""LoRA fine-tuning throughput on whatever accelerator is here: tokens/s, peak memory per device, MFU two ways.

    python -m benchmarks.accelerator [--quick] [--models llama gemma3] [--batch 8 --seq 2048 --steps 10] ...

One command fine-tunes a Llama-shaped and a Gemma-shaped decoder (random weights) with the training job's own step
(``train.loop.make_train_step`` on ``train.loop.prepare``'s split): LoRA r=16 on all linear layers, bfloat16 frozen
base and compute (``train.precision=bfloat16``; adapters float32 masters), AdamW, the chunked cross-entropy, every
position a loss position, full rows of ``--seq`` tokens. The default attention (``auto``: cuDNN on GPU, splash on
TPU, blockwise elsewhere) and remat policy (``--remat``). With several devices the batch is split over them (data
parallel, parameters replicated); ``--batch`` is the global batch.

Shapes (``--quick``: 2 layers of width 64, vocab 512, 2 x 128 tokens, on CPU devices, so a test keeps the command
working):

- ``llama``: Llama 3.2 1B (16 layers, d=2048, 32 heads / 8 KV heads of 64, MLP 8192, vocab 128,256, tied head);
- ``gemma3``: Gemma 3 1B (26 layers, d=1152, 4 heads / 1 KV head of 256, MLP 6912, vocab 262,144, sliding window 512
  on five layers in six, tied head).

Measured: compile time, the median step time over ``--steps`` steps after ``--warmup`` (each step blocked on), tokens
per second (global batch x seq / step time), peak memory per device (the runtime's ``peak_bytes_in_use`` where the
backend reports it; on CPU XLA's compiled plan ``argument + output - alias + temp``, named as such).

FLOPs per token, ``N`` = the parameters of every matrix a token is multiplied by (the layers' linear kernels and the
output head; the embedding lookup is not a matmul), ``N_a`` = the adapters' parameters:

- the usual ``6N`` (forward 2N, backward 4N: input and weight gradients of every matrix);
- LoRA-aware: ``4N + 6 N_a``: the frozen base needs its forward (2N) and its input gradients (2N) but no weight
  gradients; the adapters need all three.

Neither counts the attention's own score / value products (recorded beside them as ``attention_flops_per_token``:
forward ``4 L H hd`` times the keys a query sees on average, tripled for the backward). MFU = FLOPs per token x
tokens/s / (devices x the device's peak bfloat16 dense FLOP/s), from a table of known devices (``--peak-tflops``
overrides; none for CPU: MFU is left empty there).

Writes ``benchmarks/results/accelerator.json`` (``--out`` to change the name). The committed record is a ``--quick``
run on CPU: a smoke test of the command, not a measurement of any accelerator.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import Recorder, median, memory_analysis, table
from lora_jax import stacking
from train import loop
from train.config import load_config

GiB = 2**30
SOURCES = (
    "lora_jax/models",
    "lora_jax/core.py",
    "lora_jax/ops.py",
    "lora_jax/losses.py",
    "train/loop.py",
    "train/tasks.py",
    "train/config.py",
    "benchmarks/accelerator.py",
    "benchmarks/common.py",
)

# Peak dense bfloat16 FLOP/s per device (vendor datasheets; without sparsity), by the start of ``device_kind``.
PEAK_BF16_TFLOPS = {
    "NVIDIA H200": 989.4,
    "NVIDIA H100 80GB HBM3": 989.4,
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100": 989.4,
    "NVIDIA A100": 312.0,
    "NVIDIA L4": 121.0,
    "NVIDIA A10G": 125.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v5": 459.0,
    "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
}


def peak_tflops(device_kind: str) -> float | None:
    """The table's entry whose name ``device_kind`` starts with (the longest such name), else ``None``."""
    names = [n for n in PEAK_BF16_TFLOPS if device_kind.startswith(n)]
    return PEAK_BF16_TFLOPS[max(names, key=len)] if names else None


def model_config(name: str, quick: bool):
    """The decoder ``Config`` of ``name`` (``llama`` / ``gemma3``) at full size or, with ``quick``, tiny."""
    import transformers

    from lora_jax.models import gemma3, llama

    if name == "llama":
        size = (
            dict(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=512,
            )
            if quick
            else dict(
                hidden_size=2048,
                intermediate_size=8192,
                num_hidden_layers=16,
                num_attention_heads=32,
                num_key_value_heads=8,
                head_dim=64,
                vocab_size=128256,
                rope_theta=500000.0,
            )
        )
        return llama.Config.from_hf(
            transformers.LlamaConfig(**size, tie_word_embeddings=True, max_position_embeddings=131072)
        )
    if name == "gemma3":
        size = (
            dict(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=1,
                head_dim=16,
                vocab_size=512,
                sliding_window=64,
                layer_types=["sliding_attention", "full_attention"],
            )
            if quick
            else dict(
                hidden_size=1152,
                intermediate_size=6912,
                num_hidden_layers=26,
                num_attention_heads=4,
                num_key_value_heads=1,
                head_dim=256,
                vocab_size=262144,
                sliding_window=512,
            )
        )
        return gemma3.Config.from_hf(transformers.Gemma3TextConfig(**size, max_position_embeddings=32768))
    raise ValueError(f"unknown model {name!r}; expected llama or gemma3")


def matmul_params(params: Any, config: Any) -> int:
    """``N``: every linear kernel's entries, plus the output head (``V x D``) once (tied or not)."""
    n = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [str(getattr(p, "key", getattr(p, "name", ""))) for p in path]
        layer_axis = 1 if stacking.layer_axes("/".join(keys)) else 0  # a scanned stack: (L, d_in, d_out)
        if keys and keys[-1] == "kernel" and getattr(leaf, "ndim", 0) - layer_axis == 2 and "lm_head" not in keys:
            n += int(np.prod(leaf.shape))
    return n + config.vocab_size * config.hidden_size


def attention_flops_per_token(config: Any, seq: int) -> float:
    """Score and value products per token, forward and backward (3x forward): ``4 L H hd`` x the mean number of
    keys a query sees under the causal mask (and the window of sliding layers)."""
    total = 0.0
    for layer in range(config.num_hidden_layers):
        window = config.sliding_window if config.is_sliding(layer) else None
        keys = np.minimum(np.arange(1, seq + 1), window or seq).mean()
        total += 4 * config.num_attention_heads * config.head_dim * keys
    return 3 * total


def job_config(args):
    return load_config(
        None,
        [
            "train.method=lora",
            "lora.r=16",
            "lora.targets=all-linear",
            "train.precision=bfloat16",
            f"train.batch_size={args.batch}",
            f"train.remat={args.remat}",
            "train.loss_chunk=auto",
            f"train.steps={args.steps + args.warmup}",
        ],
    )


def device_memory() -> list[int | None]:
    """``peak_bytes_in_use`` of every local device (``None`` where the backend reports no memory stats)."""
    out = []
    for d in jax.local_devices():
        try:
            stats = d.memory_stats() or {}
        except Exception:  # noqa: BLE001  (a backend without memory stats)
            stats = {}
        out.append(stats.get("peak_bytes_in_use"))
    return out


def run_model(name: str, args) -> dict:
    from jax.sharding import NamedSharding, PartitionSpec

    from lora_jax.models import gemma3, llama

    arch = llama if name == "llama" else gemma3
    config = model_config(name, args.quick)
    cfg = job_config(args)
    devices = jax.devices()
    if args.batch % len(devices):
        raise ValueError(f"--batch {args.batch} must be a multiple of the {len(devices)} devices")
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    params = jax.jit(lambda k: arch.init_params(config, k), out_shardings=replicated)(jax.random.key(0))
    prepared = loop.prepare(cfg, params, jax.random.key(1))
    del params
    model = arch.build(config).clone(dtype=jnp.bfloat16, remat=loop.remat_name(cfg.train.remat))
    tx = loop.make_optimizer(cfg)
    trainable, frozen = prepared.trainable, prepared.frozen
    opt_state = jax.jit(tx.init, out_shardings=replicated)(trainable)
    rng = np.random.RandomState(0)
    ids = rng.randint(0, config.vocab_size, (1, args.batch, args.seq)).astype(np.int32)
    shard = NamedSharding(mesh, PartitionSpec(None, "data"))
    batches = {
        k: jax.device_put(v, shard)
        for k, v in {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}.items()
    }
    step = jax.jit(
        loop.make_train_step(model, cfg, tx), donate_argnums=(0, 1), compiler_options=loop.step_compiler_options(cfg)
    )
    t0 = time.perf_counter()
    compiled = step.lower(trainable, opt_state, frozen, batches, jax.random.key(2)).compile()
    compile_s = time.perf_counter() - t0
    mem = memory_analysis(compiled)
    planned = mem["peak"] if mem is not None else None
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        trainable, opt_state, metrics = compiled(trainable, opt_state, frozen, batches, jax.random.key(3 + i))
        losses.append(float(jax.block_until_ready(metrics["loss"])))
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = median(times)
    tokens_per_s = args.batch * args.seq / step_s
    n = matmul_params(frozen, config)
    n_a = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable["adapters"]) if hasattr(x, "shape"))
    flops = {"6N": 6.0 * n, "lora_aware_4N_plus_6Na": 4.0 * n + 6.0 * n_a}
    kind = getattr(devices[0], "device_kind", str(devices[0]))
    peak = args.peak_tflops or peak_tflops(kind)
    measured = device_memory()
    row = {
        "model": name,
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "vocab": config.vocab_size,
        "batch": args.batch,
        "seq": args.seq,
        "devices": len(devices),
        "device_kind": kind,
        "matmul_params_N": n,
        "adapter_params_Na": n_a,
        "compile_s": compile_s,
        "step_s": step_s,
        "step_times_s": times,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_device": tokens_per_s / len(devices),
        "flops_per_token": flops,
        "attention_flops_per_token": attention_flops_per_token(config, args.seq),
        "peak_tflops_per_device": peak,
        "losses": losses,
        "peak_memory_per_device_GiB": ([m / GiB for m in measured] if all(m is not None for m in measured) else None),
        "compiled_plan_per_device_GiB": None if planned is None else planned / GiB,
        "memory_source": "runtime peak_bytes_in_use"
        if all(m is not None for m in measured)
        else "XLA compiled plan (argument + output - alias + temp); this backend reports no runtime peak",
    }
    row["mfu"] = {k: (f * tokens_per_s / (len(devices) * peak * 1e12) if peak else None) for k, f in flops.items()}
    return row


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2-layer width-64 models, 2 x 128 tokens, 2 steps (CPU)")
    ap.add_argument("--models", nargs="+", default=["llama", "gemma3"], choices=["llama", "gemma3"])
    ap.add_argument("--batch", type=int, default=8, help="global batch (a multiple of the devices)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--remat", default="none", choices=["none", "full", "dots", "dots_no_batch"])
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's peak bf16 TFLOP/s (else the table)")
    ap.add_argument("--out", default="accelerator")
    ap.add_argument("--out-dir", default=None, help="write the JSON here instead of benchmarks/results/")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.steps, args.warmup = max(2, jax.device_count()), 128, 2, 1
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    recorder = Recorder("accelerator", SOURCES, argv)
    dev = jax.devices()[0]
    print(
        f"{jax.default_backend()} x{jax.device_count()} ({getattr(dev, 'device_kind', dev)}), commit "
        f"{recorder.git.get('commit')}",
        flush=True,
    )
    rows = []
    for name in args.models:
        row = run_model(name, args)
        rows.append(row)
        mfu = row["mfu"]
        mem = row["peak_memory_per_device_GiB"]
        print(
            f"  {name}: {row['tokens_per_s']:,.0f} tokens/s ({row['step_s'] * 1e3:,.0f} ms/step, compiled in "
            f"{row['compile_s']:.0f} s), peak memory/device "
            + (f"{max(mem):.2f} GiB" if mem else f"{row['compiled_plan_per_device_GiB']:.3f} GiB (compiled plan)")
            + ", MFU "
            + (
                "6N {:.1%}, LoRA-aware {:.1%}".format(mfu["6N"], mfu["lora_aware_4N_plus_6Na"])
                if mfu["6N"] is not None
                else "n/a (no peak FLOP/s known for this device)"
            ),
            flush=True,
        )
    view = [
        {
            "model": r["model"],
            "tokens_per_s": r["tokens_per_s"],
            "step_ms": r["step_s"] * 1e3,
            "mem_GiB": max(r["peak_memory_per_device_GiB"])
            if r["peak_memory_per_device_GiB"]
            else r["compiled_plan_per_device_GiB"],
            "MFU_6N": "n/a" if r["mfu"]["6N"] is None else f"{r['mfu']['6N']:.1%}",
            "MFU_lora": "n/a" if r["mfu"]["6N"] is None else f"{r['mfu']['lora_aware_4N_plus_6Na']:.1%}",
        }
        for r in rows
    ]
    print(table(view, ["model", "tokens_per_s", "step_ms", "mem_GiB", "MFU_6N", "MFU_lora"]))
    result = {
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "config": dict(vars(args)),
        "runs": rows,
        "measured_on_accelerator": jax.default_backend() in ("gpu", "cuda", "rocm", "tpu"),
    }
    path = recorder.write(args.out, result, args.out_dir)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
