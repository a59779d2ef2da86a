"""Train-step memory: full fine-tuning vs LoRA over a bf16 base vs QLoRA over an NF4 base.

A GPT-2-small-shaped stack of dense layers (12 blocks of c_attn 768x2304, attn c_proj 768x768, c_fc 768x3072,
mlp c_proj 3072x768: 85M weights; attention itself is replaced by an elementwise gate, since it holds no
weights), a batch of 8 x 128 tokens, AdamW. Each train step (value_and_grad + optax update, with its state
donated) is lowered from abstract shapes and compiled; nothing is executed, so the numbers are what XLA plans
for this backend:

- ``argument``: parameters, optimizer state and batch handed to the step;
- ``temp``: the step's temporaries (activations kept for the backward pass, gradients, dequantised kernels);
- ``peak`` = argument + output - aliased + temp (the donated state is updated in place);
- ``weights``: bytes stored for the frozen or trained kernels themselves.

    python -m benchmarks.qlora_memory [--layers 12 --d 768 --batch 8 --seq 128 --r 16]

QLoRA settings follow the paper: NF4, block 64, double quantisation, bf16 compute, adapters (float32, r=16)
on every linear layer. The quantised rows dequantise one layer at a time, in the forward and again in the
backward pass (lora_jax.ops), so their ``temp`` holds one dense kernel, not twelve.

Measured on CPU (see results/qlora_memory.json), two effects of XLA's CPU backend show in ``temp``: bf16
matmul operands are converted to float32, so the bf16-base row carries float32 copies of its kernels; and
XLA fuses the ``x @ W0 + lora`` sum into the activation's derivative, keeping both addends for the backward
pass, which is why every LoRA row's ``temp`` exceeds what its activations alone would need.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

import lora_jax as lora
from benchmarks.common import Recorder, donated_step_memory, table
from lora_jax import ops, quant

MiB = 2**20
# The code this benchmark measures (benchmarks.staleness).
SOURCES = (
    "lora_jax/core.py",
    "lora_jax/ops.py",
    "lora_jax/quant.py",
    "benchmarks/qlora_memory.py",
    "benchmarks/common.py",
)


def kernel_shapes(d: int) -> dict[str, tuple[int, int]]:
    return {"attn/c_attn": (d, 3 * d), "attn/c_proj": (d, d), "mlp/c_fc": (d, 4 * d), "mlp/c_proj": (4 * d, d)}


def abstract_params(layers: int, d: int, dtype) -> dict:
    """``{"h_i": {"attn": {"c_attn": {"kernel", "bias"}, ...}, "mlp": {...}}}`` as ShapeDtypeStructs."""
    params: dict = {}
    for i in range(layers):
        block: dict = {}
        for name, (d_in, d_out) in kernel_shapes(d).items():
            scope, leaf = name.split("/")
            block.setdefault(scope, {})[leaf] = {
                "kernel": jax.ShapeDtypeStruct((d_in, d_out), dtype),
                "bias": jax.ShapeDtypeStruct((d_out,), dtype),
            }
        params[f"h_{i}"] = block
    return params


def forward(params: dict, x: jax.Array, dtype) -> jax.Array:
    """Pre-norm residual blocks; the kernels may be plain, LoraWeight, or quantised."""

    def dense(h, p):
        return ops.dense(h, ops.astype(p["kernel"], dtype), p["bias"].astype(dtype))

    def norm(h):
        h32 = h.astype(jnp.float32)
        return (h32 * jax.lax.rsqrt(jnp.mean(h32 * h32, -1, keepdims=True) + 1e-6)).astype(dtype)

    x = x.astype(dtype)
    for i in range(len(params)):
        p = params[f"h_{i}"]
        q, k, v = jnp.split(dense(norm(x), p["attn"]["c_attn"]), 3, axis=-1)
        x = x + dense(jax.nn.sigmoid(q + k) * v, p["attn"]["c_proj"])
        x = x + dense(jax.nn.gelu(dense(norm(x), p["mlp"]["c_fc"])), p["mlp"]["c_proj"])
    return x


def loss_fn(params: dict, x: jax.Array, y: jax.Array, dtype) -> jax.Array:
    return jnp.mean((forward(params, x, dtype).astype(jnp.float32) - y) ** 2)


def full_finetuning(params, batch, tx):
    state = jax.eval_shape(tx.init, params)

    def step(params, state, x, y):
        loss, g = jax.value_and_grad(loss_fn)(params, x, y, jnp.float32)
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state, loss

    return donated_step_memory(step, params, state, *batch)


def lora_step(base, batch, tx, r: int, dtype):
    adapters = lora.init(base, r=r, alpha=2 * r, targets="all-linear")
    adapters = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), adapters)
    state = jax.eval_shape(tx.init, adapters)

    def step(adapters, state, base, x, y):
        loss, g = jax.value_and_grad(lambda a: loss_fn(lora.wrap(base, a), x, y, dtype))(adapters)
        updates, state = tx.update(g, state, adapters)
        return optax.apply_updates(adapters, updates), state, loss

    return donated_step_memory(step, adapters, state, base, *batch), quant.nbytes(adapters)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--out-dir", default=None, help="write the JSON here instead of benchmarks/results/")
    args = ap.parse_args(argv)
    recorder = Recorder("qlora_memory", SOURCES, argv)

    f32 = abstract_params(args.layers, args.d, jnp.float32)
    bf16 = abstract_params(args.layers, args.d, jnp.bfloat16)
    nf4 = _abstract_quantize(f32, "nf4")
    int8 = _abstract_quantize(f32, "int8")
    batch = (jax.ShapeDtypeStruct((args.batch, args.seq, args.d), jnp.float32),) * 2
    tx = optax.adamw(1e-4)
    n_weights = sum(a * b for a, b in kernel_shapes(args.d).values()) * args.layers

    def kernels(tree):
        return [leaf for path, leaf in lora.targets.leaf_paths(tree) if path.endswith("kernel")]

    rows = []

    def add(method, weights_tree, mem, trainable_bytes):
        rows.append(
            {
                "method": method,
                "weights MiB": quant.nbytes(kernels(weights_tree)) / MiB,
                "bits/weight": 8 * quant.nbytes(kernels(weights_tree)) / n_weights,
                "trainable MiB": trainable_bytes / MiB,
                "argument MiB": mem["argument"] / MiB,
                "temp MiB": mem["temp"] / MiB,
                "peak MiB": mem["peak"] / MiB,
                **{f"_{k}": v for k, v in mem.items()},
            }
        )
        print(f"  compiled {method}", flush=True)

    add("full fine-tuning f32 (AdamW)", f32, full_finetuning(f32, batch, tx), quant.nbytes(f32))
    mem, ad_bytes = lora_step(f32, batch, tx, args.r, jnp.float32)
    add(f"LoRA r={args.r}, f32 base", f32, mem, ad_bytes)
    mem, ad_bytes = lora_step(bf16, batch, tx, args.r, jnp.bfloat16)
    add(f"LoRA r={args.r}, bf16 base", bf16, mem, ad_bytes)
    mem, ad_bytes = lora_step(int8, batch, tx, args.r, jnp.bfloat16)
    add(f"LoRA r={args.r}, int8 base", int8, mem, ad_bytes)
    mem, ad_bytes = lora_step(nf4, batch, tx, args.r, jnp.bfloat16)
    add(f"QLoRA r={args.r}, NF4 + double quant", nf4, mem, ad_bytes)

    columns = ["method", "weights MiB", "bits/weight", "trainable MiB", "argument MiB", "temp MiB", "peak MiB"]
    print(
        f"\n{args.layers} blocks, d={args.d} ({n_weights / 1e6:.1f}M kernel weights), batch {args.batch}x{args.seq}, "
        f"backend {jax.default_backend()}\n"
    )
    print(table(rows, columns))
    result = {
        "config": vars(args),
        "kernel_weights": n_weights,
        "rows": [{k.lstrip("_"): v for k, v in r.items()} for r in rows],
    }
    print(f"\nwrote {recorder.write('qlora_memory', result, args.out_dir)}")
    return result


def _abstract_quantize(params: dict, method: str) -> dict:
    """The quantised tree's structure and shapes, without quantising anything (every kernel is abstract)."""

    def q(path, leaf):
        if not lora.targets.path_str(path).endswith("kernel"):
            return leaf
        return jax.eval_shape(lambda w: quant.quantize_array(w, method, compute_dtype=jnp.bfloat16), leaf)

    return jax.tree_util.tree_map_with_path(q, params)


if __name__ == "__main__":
    main()
