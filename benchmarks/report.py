"""The figures of the README and the docs pages, generated from ``benchmarks/results/*.json``.

    python -m benchmarks.report            # rewrite the marked parts of README.md and docs/**/*.md from the results
    python -m benchmarks.report --check    # exit 1 when a page and the results disagree

A marked part is everything between ``<!-- report:ID -->`` and ``<!-- /report:ID -->``; ``RENDERERS[ID]`` makes
it from the results (a table, a list of goals, or an inline phrase). Nothing else in a page is touched. The pages
are the README and every Markdown file under ``docs/`` (:func:`pages`); an ID may appear on several pages.
Every figure shown is read from the JSON files or computed from their raw per-round times (paired ratios with
:func:`benchmarks.common.paired_summary`), and every block names the run it comes from (commit, date, CPU, load,
library versions, or "not recorded" for results that predate provenance recording).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, bootstrap_median_ci, paired_summary

RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
MARKER = re.compile(r"<!-- report:(?P<id>[\w.-]+) -->(?P<body>.*?)<!-- /report:(?P=id) -->", re.S)
MiB = 2**20


# ------------------------------------------------------------------------------------------ formatting


def _ms(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def _x(x: float) -> str:
    return f"{x:.2f}"


def _params(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def provenance(record: dict[str, Any], command: str) -> str:
    """One line naming the run: ``command``, commit, date, CPU, cores, load average, library versions."""
    p = record.get("provenance")
    env = record.get("environment", {})
    if not p:
        return (
            f"*Run: `{command}` on {env.get('time', '?')}, {env.get('cpu_count', '?')} cores, jax "
            f"{env.get('jax', '?')}; commit, CPU model, load and other versions not recorded (this result "
            "predates provenance recording: rerun it).*"
        )
    git = p.get("git", {})
    commit = git.get("commit")
    state = (
        "not a git checkout"
        if not commit
        else f"commit {commit[:10]}" + (" with uncommitted changes" if git.get("dirty") else "")
    )
    cpu = p.get("cpu", {})
    load = p.get("load_average", {})
    libs = ", ".join(
        f"{k} {v}"
        for k, v in p.get("libraries", {}).items()
        if v and k in ("jax", "jaxlib", "flax", "torch", "peft", "transformers", "qwix")
    )
    before, after = load.get("before") or ["?"], load.get("after") or ["?"]
    return (
        f"*Run: `{p.get('command', command)}`, {state}, {p.get('date', '?')[:16].replace('T', ' ')} UTC, "
        f"{cpu.get('model', '?')}, {cpu.get('usable_cores', cpu.get('logical_cores', '?'))} cores, load average "
        f"{before[0]} before / {after[0]} after, {p.get('wall_s', 0) / 60:.0f} min; {libs}.*"
    )


def _verdict(s: dict[str, Any]) -> str:
    lo, hi = s["ci95"]
    return (
        f"median {_x(s['median'])}x (95% CI {_x(lo)}-{_x(hi)}, slower in {s['slower_rounds']} of "
        f"{s['rounds']} rounds, sign test p = {s['sign_test_p_slower']:.2g})"
    )


# ---------------------------------------------------------------------------------------- train_step


def _inference_summaries(r: dict) -> tuple[dict, dict]:
    times = r["times_s"]["inference"]
    return paired_summary(times["merged"], times["base"]), paired_summary(times["base_again"], times["base"])


def train_step_headline(results: dict) -> str:
    r = results["train_step"]
    ratio = {(s["model"], s["method"]): s["ratio_to_full"] for s in r["step"]}
    opt = {(m["model"], m["method"]): m["opt_state_MiB"] for m in r["memory"]}
    fac = "LoRA factored (lora.wrap)"
    return (
        f"A GPT-2-small train step costs **{_x(ratio[('gpt2-small', fac)])}x** full fine-tuning, SmolLM2-135M "
        f"**{_x(ratio[('smollm2-135m', fac)])}x**; the optimizer state is {opt[('gpt2-small', fac)]:.1f} MiB "
        f"instead of {opt[('gpt2-small', 'full fine-tuning')]:,.0f} MiB"
    )


def merged_headline(results: dict) -> str:
    merged, _ = _inference_summaries(results["train_step"])
    lo, hi = merged["ci95"]
    return f"measured merged/base forward {_x(merged['median'])}x, 95% CI {_x(lo)}-{_x(hi)}"


def train_step_block(results: dict) -> str:
    r = results["train_step"]
    names = {"gpt2-small": "GPT-2-small", "smollm2-135m": "SmolLM2-135M"}
    methods = {
        "full fine-tuning": "full fine-tuning",
        "LoRA merge-then-forward": "LoRA merge-then-forward",
        "LoRA factored (lora.wrap)": "LoRA factored (ours)",
    }
    mem = {(m["model"], m["method"]): m for m in r["memory"]}
    rows = []
    for s in r["step"]:
        m = mem[(s["model"], s["method"])]
        full = s["method"] == "full fine-tuning"
        rows.append(
            [
                names.get(s["model"], s["model"]),
                methods.get(s["method"], s["method"]),
                _params(s["trainable"]),
                _ms(s["median_ms"]),
                _x(s["ratio_to_full"]),
                f"{m['peak_MiB']:,.0f}" + ("" if full else f" ({_x(m['peak_ratio_to_full'])})"),
                f"{m['sum_MiB']:,.0f}" + ("" if full else f" ({_x(m['sum_ratio_to_full'])})"),
                f"{m['opt_state_MiB']:,.1f} MiB",
            ]
        )
    cfg = r["config"]
    out = [
        f"Batch {cfg['batch']} x {cfg['seq']} tokens, r={cfg['r']} on q, v, AdamW, medians of {cfg['rounds']} "
        "rotated rounds; ratios are medians of per-round ratios.",
        "",
        _table(
            [
                "model",
                "method",
                "trainable",
                "step ms",
                "ratio to full",
                "step peak MiB (donated)",
                "without donation",
                "optimizer state",
            ],
            rows,
        ),
        "",
    ]
    merged, control = _inference_summaries(r)
    goals = []
    for name, g in r.get("goals", {}).items():
        if name.startswith("merged/base"):
            continue  # restated below from the raw rounds, with the current rule
        goals.append(
            f"- {'MET' if g['met'] else 'MISSED'}: {name}: {_x(g['value'])}"
            + (f" (measured why: {g['why']})" if g.get("why") else "")
        )
    from benchmarks.train_step import MERGED_GOAL  # the rule the benchmark applies now

    met = merged["ci95"][1] <= MERGED_GOAL
    goals.append(
        f"- {'MET' if met else 'MISSED'}: merged/base forward <= {MERGED_GOAL} (upper end of the 95% CI of "
        f"the median paired ratio): {_verdict(merged)}; the base timed twice per round, as a noise "
        f"control: {_verdict(control)}"
    )
    out += ["Goals:", "", *goals, ""]
    inf = {i["what"]: i for i in r["inference"]}
    info = r["inference_info"]
    out.append(
        f"Inference ({names.get(r['config']['inference_model'], '?')}, {info['adapted_matrices']} all-linear "
        f"adapters, {cfg['batch']} x {cfg['seq']} tokens): base forward "
        f"{_ms(inf['forward, base params']['median_ms'])} ms, factored unmerged forward "
        f"{_x(inf['forward, unmerged (lora.wrap, factored)']['ratio_to_base_forward'])}x of it, `lora.merge` of "
        f"all adapters {_ms(inf['lora.merge (jitted)']['median_ms'])} ms jitted / "
        f"{_ms(inf['lora.merge (eager, op by op)']['median_ms'])} ms eager; max |logits(merged) - "
        f"logits(factored)| = {info['max_abs_diff_merged_vs_factored_logits']:.0e}."
    )
    sweeps: dict[str, list[str]] = {}
    for s in r["scaling"]:
        if s["variant"] != "full fine-tuning":
            sweeps.setdefault(f"{s['sweep']}, {s['model']}", []).append(f"{s['variant']} {_x(s['ratio_to_full'])}x")
    out += [
        "",
        "Scaling (step time relative to full fine-tuning of the same smaller model): "
        + "; ".join(f"{k}: {', '.join(v)}" for k, v in sweeps.items())
        + ".",
    ]
    notes = r.get("notes") or []
    if notes:
        out += ["", *[f"Note from this run: {n}" for n in notes]]
    out += ["", provenance(r, "python -m benchmarks.train_step")]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------- peers


def peers_block(results: dict) -> str:
    r = results["peers"]
    times = r["times_s"]
    label = {
        "ours": "lora_jax (factored)",
        "peft": "Hugging Face PEFT {peft} on PyTorch {torch} CPU",
        "nnx": "Flax `nnx.LoRALinear` (`nnx.jit`)",
        "nnx-split": "Flax `nnx.LoRALinear` (split + `jax.jit`)",
        "qwix": "qwix `LoraProvider` {qwix}",
    }
    info = r.get("info", {})
    fmt = {
        "peft": info.get("peft", {}).get("peft", "?"),
        "torch": info.get("peft", {}).get("torch", "?"),
        "qwix": info.get("qwix", {}).get("version", "").replace("qwix ", ""),
    }
    rows, verdicts = [], []
    for name, ts in times.items():
        ms = 1e3 * sorted(ts)[len(ts) // 2] if len(ts) % 2 else 1e3 * sum(sorted(ts)[len(ts) // 2 - 1 :][:2]) / 2
        if name == "ours":
            rows.append([label[name], _ms(ms), "1.00", ""])
            continue
        s = paired_summary(times["ours"], ts)
        rows.append(
            [label.get(name, name).format(**fmt), _ms(ms), _x(s["median"]), f"{_x(s['ci95'][0])}-{_x(s['ci95'][1])}"]
        )
        lo, hi = s["ci95"]
        verdicts.append(
            f"{label.get(name, name).format(**fmt)}: "
            + ("ours slower" if lo > 1 else "ours faster" if hi < 1 else "no difference detected")
            + f" ({s['slower_rounds']} of {s['rounds']} rounds ours slower)"
        )
    cfg = r["config"]
    out = [
        f"GPT-2-small train step, batch {cfg['batch']} x {cfg['seq']}, r={cfg['r']} on c_attn, medians of "
        f"{cfg['rounds']} rotated rounds:",
        "",
        _table(["implementation", "median step ms", "our time / theirs (median of paired rounds)", "95% CI"], rows),
        "",
        "From the paired rounds: " + "; ".join(verdicts) + ".",
    ]
    flops = [(n, info[n]) for n in ("ours", "peft") if info.get(n, {}).get("flops_per_step")]
    if flops:
        out += [
            "",
            "Measured in this run: "
            + "; ".join(f"{n} {i['flops_per_step'] / 1e9:,.4g} GFLOP per step ({i['flops_counter']})" for n, i in flops)
            + ".",
        ]
    for k, g in r.get("goals", {}).items():
        out += [
            "",
            f"Goal: {'MET' if g['met'] else 'MISSED'}: {k}: {_x(g['value'])} (95% CI {_x(g['ci95'][0])}-"
            f"{_x(g['ci95'][1])})" + (f"; measured why: {g['why']}." if g.get("why") else "."),
        ]
    out += ["", provenance(r, "python -m benchmarks.peers")]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ the rest


def qlora_block(results: dict) -> str:
    r = results["qlora_memory"]
    rows = [
        [
            x["method"],
            f"{x['weights MiB']:.1f}",
            f"{x['bits/weight']:.3f}".rstrip("0").rstrip("."),
            f"{x['peak MiB']:,.0f}",
        ]
        for x in r["rows"]
    ]
    cfg = r["config"]
    return "\n".join(
        [
            f"{cfg['layers']} blocks of d={cfg['d']} ({r['kernel_weights'] / 1e6:.0f}M kernel weights), "
            f"batch {cfg['batch']} x {cfg['seq']}, r={cfg['r']} on every linear layer:",
            "",
            _table(["method", "kernels MiB", "bits/weight", "step peak MiB"], rows),
            "",
            provenance(r, "python -m benchmarks.qlora_memory"),
        ]
    )


def multi_adapter_block(results: dict) -> str:
    r = results["multi_adapter"]
    rows = [
        [
            x["variant"],
            _ms(x["median_ms"]),
            _x(x["throughput_vs_one_adapter"]),
            _x(x["speedup_vs_peft_same_mix"]) if "speedup_vs_peft_same_mix" in x else "",
        ]
        for x in r["rows"]
    ]
    cfg = r["config"]
    return "\n".join(
        [
            f"{cfg['layers']} layers, hidden {cfg['hidden']}, a batch of {cfg['batch']} rows x {cfg['seq']} "
            f"tokens, medians of {cfg['rounds']} rounds:",
            "",
            _table(["variant", "median ms", "throughput vs one adapter", "speed-up vs PEFT, same mix"], rows),
            "",
            provenance(r, "python -m benchmarks.multi_adapter"),
        ]
    )


def smollm2_block(results: dict) -> str:
    r = results["smollm2_speed"]
    rows = [
        [x["what"], f"{x['seconds']:.2f}", f"{x['tokens/s']:,.0f}" if x["tokens/s"] != "" else ""] for x in r["rows"]
    ]
    args = r["args"]
    cmd = (
        "python -m benchmarks.smollm2_speed"
        + (" --torch" if args.get("torch") else "")
        + (f" --rounds {args['rounds']}" if args.get("rounds") != 5 else "")
    )
    return "\n".join([_table(["what", "seconds (median)", "tokens/s"], rows), "", provenance(r, cmd)])


def step_ratio_block(results: dict) -> str:
    r = results["step_ratio"]
    rows = [[x["method"], _ms(x["median_ms"]), _x(x["ratio_to_full"])] for x in r["rows"]]
    cfg = r["config"]
    cmd = "python -m benchmarks.step_ratio" + (f" --rounds {cfg['rounds']}" if cfg.get("rounds") != 12 else "")
    return "\n".join(
        [
            f"{cfg['layers']} dense layers of {cfg['d']} x {cfg['d']}, {cfg['tokens']} tokens, r={cfg['r']}:",
            "",
            _table(["method", "median ms", "ratio to full"], rows),
            "",
            provenance(r, cmd),
        ]
    )


def loss_memory_block(results: dict) -> str:
    r = results["loss_memory"]
    long = r if "longest_sequence" in r else results["loss_memory_long"]  # one run of every section, or two
    names = {"gpt2-small": "GPT-2-small", "smollm2-135m": "SmolLM2-135M"}
    cfg = r["config"]
    rows = [
        [
            names.get(m["model"], m["model"]),
            "full fine-tuning" if m["method"] == "full" else "LoRA",
            m["loss"],
            m["remat"],
            f"{m['temp_MiB']:,.0f}",
            f"{m['peak_MiB']:,.0f}",
            _x(m["ratio_to_full"]),
        ]
        for m in r["memory"]
    ]
    ref = [
        [names.get(m["model"], m["model"]), m["step"], f"{m['peak_MiB']:,.0f}", _x(m["ratio_to_full"])]
        for m in r["memory_train_step"]
    ]
    out = [
        f"The job's own step (`train.loop.make_train_step`, AdamW, LoRA r=8 on q, v), batch {cfg['batch']} x "
        f"{cfg['seq']}, float32; compiled memory (`peak` = argument + output - alias + temp; ratio to full "
        "fine-tuning with the plain loss and no remat):",
        "",
        _table(["model", "method", "loss", "train.remat", "temp MiB", "step peak MiB", "ratio to full"], rows),
        "",
        "`benchmarks.train_step`'s step (no gradient clipping or finiteness check; where the 0.48x / 0.51x of "
        "issue 16 came from), no remat:",
        "",
        _table(["model", "step", "step peak MiB", "ratio to full"], ref),
        "",
        "Goals:",
        "",
    ]
    out += [
        f"- {'MET' if g['met'] else 'MISSED'}: {k}: {_x(g['value'])}"
        + (f" (measured why: {g['why']})" if g.get("why") else "")
        for k, g in r.get("goals", {}).items()
    ]
    lc = long["config"]
    lrows = [
        [m["loss"], m["remat"], f"{m['longest_seq']:,}" + (" (the cap)" if m["capped_at_max"] else "")]
        for m in long["longest_sequence"]
    ]
    out += [
        "",
        f"Longest sequence of a SmolLM2-135M LoRA step (batch {lc['long_batch']}, a multiple of "
        f"{lc['long_step']} tokens, at most {lc['long_max']:,}) whose compiled peak fits {lc['budget_gib']:g} GiB:",
        "",
        _table(["loss", "train.remat", "longest sequence"], lrows),
        "",
    ]
    trows = [
        [
            names.get(t["model"], t["model"]),
            t["variant"],
            _ms(t["median_ms"]),
            _x(t["ratio_to_plain"]),
            f"{_x(t['ratio_to_plain_ci95'][0])}-{_x(t['ratio_to_plain_ci95'][1])}",
        ]
        for t in r.get("time", [])
    ]
    if trows:
        out += [
            f"LoRA step time, batch {cfg['batch']} x {cfg['seq']}, {cfg['rounds']} rotated rounds on a shared "
            "machine (compare the paired ratios, not the times):",
            "",
            _table(["model", "variant", "median ms", "time / plain (paired median)", "95% CI"], trows),
            "",
        ]
    out += [provenance(r, "python -m benchmarks.loss_memory")]
    if long is not r:
        out += ["", provenance(long, "python -m benchmarks.loss_memory --sections long")]
    return "\n".join(out)


def _llamacpp_family(name: str, r: dict) -> list[str]:
    rows = []
    for c in r["comparisons"]:
        warn = c["warnings_beyond_base"]
        rows.append(
            [
                c["llama_cpp"],
                c["reference"],
                f"{c['tokens_agreeing']} / {c['tokens']}",
                f"{c['identical_continuations']} / {c['prompts']}",
                f"{c['max_abs_logit_diff']:.3g} ({c['max_abs_logit']:.0f})",
                str(len(warn)) if warn else "none",
            ]
        )
    q = r["requantisation"]
    lines = [
        f"**{name}** (`{r['base']}`, {r['adapters']['count']} adapters r={'/'.join(map(str, r['adapters']['r']))}"
        f"; {r['prompts']} prompts x {r['max_new_tokens']} greedy tokens):",
        "",
        _table(
            [
                "llama.cpp runs",
                "against",
                "tokens agreeing",
                "identical continuations",
                "max logit diff (max logit)",
                "new warnings",
            ],
            rows,
        ),
        "",
        "Re-quantisation error of the merged files (rms of requant(W) - W over the rms of the update dW, per "
        f"tensor): the base's own types ({', '.join(q['base']['types_of_changed_tensors'])}) worst "
        f"{q['base']['worst_relative']:.2f}, median {q['base']['median_relative']:.2f}; Q8_0 worst "
        f"{q['q8_0']['worst_relative']:.2f}, median {q['q8_0']['median_relative']:.2f}.",
    ]
    c = r.get("converter")
    if c:
        lines[-1] += (
            f" llama.cpp's `convert_lora_to_gguf.py` on our PEFT export writes "
            f"{'the same tensors' if c['same_tensor_names'] else 'other tensor names'} (max difference "
            f"{c['max_abs_tensor_diff']:.3g}), which load here to dW within {c['loaded_here_max_abs_dW_diff']:.3g}."
        )
    if r.get("base_warnings"):
        lines[-1] += (
            " The base file alone makes llama.cpp warn: " + "; ".join(f'"{w[:90]}"' for w in r["base_warnings"]) + "."
        )
    return lines


def llamacpp_block(results: dict) -> str:
    r = results["llamacpp_parity"]
    head = (
        f"llama-cpp-python {r['llama_cpp_python']} ({r['llama_cpp_settings']}); token ids from our tokenizer go "
        "into both; logits teacher-forced on prompt + our continuation, every position and vocabulary entry."
    )
    if r.get("run_eval_after"):
        ev = r["run_eval_after"]
        head += (
            f" The SmolLM2 adapter is `{r['run']}` ({r['run_steps']} steps; held-out BLEU {ev.get('bleu', 0):.1f}"
            f", loss {ev.get('loss', 0):.3f})."
        )
    parts = [head, ""] + _llamacpp_family("SmolLM2-135M-Instruct", r["smollm2"])
    if "gemma3" in r:
        parts += ["", *_llamacpp_family("Gemma 3 270M, a deterministic nonzero adapter", r["gemma3"])]
    return "\n".join(
        parts + ["", provenance(r, "python -m benchmarks.llamacpp_parity --run runs/llamacpp_parity --gemma3")]
    )


def moe_step_block(results: dict) -> str:
    r = results["moe_step"]
    cfg = r["config"]
    mem = {(m["model"], m["variant"]): m for m in r["memory"]}
    keys = {
        v: k
        for k, v in {
            "full": "full fine-tuning (grouped)",
            "lora": "LoRA factored (grouped ragged_dot)",
            "lora-merged": "LoRA merge-then-forward (grouped)",
            "lora-dense": "LoRA factored (dense one-hot dispatch)",
            "full-dense": "full fine-tuning (dense one-hot dispatch)",
            "peft": "HF PEFT target_parameters (torch CPU)",
        }.items()
    }
    rows = []
    for s in r["step"]:
        e = s["model"].split("E=")[-1]
        key = keys.get(s["variant"])
        ps = r["models"][f"E={e}"]["paired_to_full"].get(key) if key != "full" else None
        m = mem.get((s["model"], s["variant"]))
        rows.append(
            [
                e,
                s["variant"],
                _params(s["trainable"]),
                _ms(s["median_ms"]),
                "1.00" if ps is None else f"{_x(ps['median'])} ({_x(ps['ci95'][0])}-{_x(ps['ci95'][1])})",
                "-" if m is None else f"{m['peak_MiB']:,.1f}",
                "-" if m is None else f"{m['opt_state_MiB']:,.2f}",
            ]
        )
    info = next(iter(r["models"].values()))
    verdicts = [f"E={i['experts']}: {v}" for i in r["models"].values() for v in i["verdicts"].values()]
    out = [
        f"Qwen3-MoE-shaped model (d={info['hidden']}, {info['layers']} layers, experts of width "
        f"{info['expert_width']}, top-{info['top_k']}, vocab {info['vocab']}), batch {cfg['batch']} x {cfg['seq']}, "
        f"LoRA r={cfg['r']} on the routed experts and q/k/v/o, AdamW, medians of {cfg['rounds']} rotated rounds:",
        "",
        _table(
            ["E", "variant", "trained", "median step ms", "time / full (95% CI)", "peak MiB", "optimizer state MiB"],
            rows,
        ),
        "",
        "From the paired rounds:",
        "",
        *(f"- {v}" for v in verdicts),
        "",
        provenance(r, "python -m benchmarks.moe_step"),
    ]
    return "\n".join(out)


def time_to_accuracy_block(results: dict) -> str:
    from benchmarks.time_to_accuracy import goals  # the rule the benchmark applies now

    r = results["time_to_accuracy"]
    cfg, times, acc = r["config"], r["times_s"], r["accuracy"]
    total = {n: sum(ts) for n, ts in times.items()}
    rows = [
        [
            x["method"],
            _params(x["trainable"]),
            f"{total[n]:,.1f}",
            f"{x['pad_fraction']:.2f}",
            f"{100 * acc[n]:.1f}%",
            f"{x['final_loss']:.3f}",
        ]
        for n, x in zip(("ours", "peft"), r["rows"])
    ]
    paired = paired_summary(times["ours"], times["peft"])
    lo, hi = paired["ci95"]
    goal = goals(total["peft"] / total["ours"], acc["ours"], acc["peft"])
    out = [
        f"SST-2, all-MiniLM-L6-v2, LoRA r={cfg['r']} on query/value + a new head, batch {cfg['batch']}, lr "
        f"{cfg['lr']:g}, {cfg['steps']} steps on the same examples in {cfg['rounds']} alternating rounds; dev "
        f"accuracy on {r['eval_examples']} sentences; ours used widths {sorted(set(r['widths_used']))} "
        f"({r['compilations']} compilations):",
        "",
        _table(
            [
                "implementation",
                "trainable",
                "training wall s",
                "padding fraction",
                "dev accuracy",
                "final loss (last 10 steps)",
            ],
            rows,
        ),
        "",
        f"PEFT's training time / ours: **{_x(total['peft'] / total['ours'])}x**; per round, ours / PEFT: median "
        f"{_x(paired['median'])} (95% CI {_x(lo)}-{_x(hi)}, round 1 includes our compilations).",
        "",
        "Goals:",
        "",
        *(f"- {'MET' if g['met'] else 'MISSED'}: {k}: {_x(g['value'])}" for k, g in goal.items()),
        "",
        provenance(r, "python -m benchmarks.time_to_accuracy"),
    ]
    return "\n".join(out)


def causal_tokens_block(results: dict) -> str:
    from benchmarks.causal_tokens import goals  # the rule the benchmark applies now

    r = results["causal_tokens"]
    cfg, times, best = r["config"], r["times_s"], r["best_peft"]
    total = {n: sum(ts) for n, ts in times.items()}
    rows = [
        [
            x["method"],
            _params(x["trainable"]),
            f"{x['useful_tokens']:,}",
            f"{x['loss_tokens']:,}",
            f"{x['pad_fraction']:.2f}",
            f"{total[x['runner']]:,.1f}",
            f"{x['useful_tokens'] / total[x['runner']]:,.0f}",
            f"{x['warmup_s']:,.1f}",
        ]
        for x in r["rows"]
    ]
    per_round = [p / o for o, p in zip(times["ours"], times[best])]
    lo, hi = bootstrap_median_ci(per_round)
    speedup = total[best] / total["ours"]
    goal = goals(speedup)
    check = r["peft_packing_check"]
    info = r["peft_info"][best]
    layers = f" (first {cfg['layers']} layers)" if cfg.get("layers") else ""
    out = [
        f"E2E (training split), SmolLM2-135M-Instruct{layers}, LoRA r={cfg['r']} on q,v, {cfg['batch']} packed "
        f"rows x {r['pack_width']} tokens per step on our side, the same examples flattened into one "
        f"padding-free row per step on PEFT's; {cfg['steps']} steps after one warm-up step each, in "
        f"{cfg['rounds']} rotating rounds; ours: {r['compilations']} compilation(s) of the step; PEFT: "
        f"{info['attn_implementation']} attention, no KV cache (its packed-sequence mask checked: logits as run "
        f"alone within {check['max_abs_logit_diff']:.1g}), run at each torch thread count listed:",
        "",
        _table(
            [
                "implementation",
                "trainable",
                "useful tokens",
                "loss tokens",
                "padding fraction",
                "training wall s",
                "useful tokens/s",
                "warm-up s (excluded)",
            ],
            rows,
        ),
        "",
        f"Ours / PEFT's fastest ({info['threads']} torch thread(s)) useful tokens per second: **{_x(speedup)}x**; "
        f"per round: median {_x(statistics.median(per_round))} (95% CI {_x(lo)}-{_x(hi)}).",
        "",
        "Goal:",
        "",
        *(f"- {'MET' if g['met'] else 'MISSED'}: {k}: {_x(g['value'])}" for k, g in goal.items()),
        "",
    ]
    if not all(g["met"] for g in goal.values()):
        by = {x["runner"]: x for x in r["rows"]}
        ms = {n: 1e3 * total[n] / by[n]["token_slots"] for n in ("ours", best)}
        out += [
            f"Measured why (this run): per computed token (padding included) ours takes {ms['ours']:.2f} ms and "
            f"PEFT {ms[best]:.2f} ms ({_x(ms['ours'] / ms[best])}x); ours computes {by['ours']['token_slots']:,} "
            f"token slots for {by['ours']['useful_tokens']:,} useful tokens ({by['ours']['pad_fraction']:.0%} "
            f"padding in the packed rows' tails), PEFT's flattened rows none.",
            "",
        ]
    out += [provenance(r, "python -m benchmarks.causal_tokens")]
    return "\n".join(out)


def xla_flags_block(results: dict) -> str:
    r = results["xla_flags"]
    out = [
        f"Each set in its own process, {r['config']['rounds']} alternating rounds against a reference process "
        "without extra flags; time / default is the median of the per-round ratios; outputs: the first step's "
        "loss and updated adapters against the reference's:",
        "",
    ]
    for m in r["results"]:
        rows = []
        for row in m["rows"]:
            s = row.get("ratio_to_default")
            rows.append(
                [
                    row["set"],
                    f"`{row['flags']}`" if row["flags"] else "",
                    _ms(row["median_step_ms"]) if row.get("median_step_ms") else "",
                    f"{_x(s['median'])} ({_x(s['ci95'][0])}-{_x(s['ci95'][1])})" if s else "",
                    "unchanged" if row.get("unchanged") else ("differ" if row["status"] == "ran" else ""),
                    row["verdict"] + (f": {row['error']}" if row.get("error") else ""),
                ]
            )
        out += [
            f"**{m['model']}** ({m['steps_per_round']} steps per round):",
            "",
            _table(["set", "XLA_FLAGS", "median step ms", "time / default (95% CI)", "outputs", "verdict"], rows),
            "",
        ]
    helps = {m: ", ".join(v) or "none" for m, v in r["helps"].items()}
    out += [
        "Helps (outputs unchanged, CI below 1, sign test p < 0.05): "
        + "; ".join(f"{m}: {v}" for m, v in helps.items())
        + ".",
        "",
        provenance(r, "python -m benchmarks.xla_flags"),
    ]
    return "\n".join(out)


def host_overlap_block(results: dict) -> str:
    from benchmarks.host_overlap import goals  # the rule the benchmark applies now

    r = results["host_overlap"]
    cfg, times = r["config"], r["times_s"]
    paired = paired_summary(times["on"], times["off"])
    rows = [
        [mode, f"{x['median_round_s']:.2f}", f"{x['steps_per_s']:.2f}"]
        for mode, x in zip(("on", "off"), sorted(r["rows"], key=lambda x: x["prefetch"] != "on"))
    ]
    out = [
        (
            "**A smoke run (`--quick`), not a measurement: rerun `python -m benchmarks.host_overlap`.** "
            if cfg.get("quick")
            else ""
        )
        + f"SST-2 / all-MiniLM-L6-v2 LoRA (`configs/sst2_minilm_lora.yaml`), `train.loop.train_steps` with "
        f"`train.prefetch` on and off, {cfg['steps']} steps per round, {cfg['rounds']} alternating rounds after "
        f"a warm-up that compiled the step for the {r['compilations']} of the batch widths {r['widths']} "
        "that the rounds' batches use:",
        "",
        _table(["train.prefetch", "median round s", "steps / s"], rows),
        "",
        f"Time with prefetch on / off: {_verdict(paired)}.",
        "",
        "Goals:",
        "",
        *(f"- {'MET' if g['met'] else 'MISSED'}: {k}: {g['value']:.3f}" for k, g in goals(paired).items()),
        "",
        provenance(r, "python -m benchmarks.host_overlap"),
    ]
    return "\n".join(out)


# id -> (results it reads, renderer, inline?)
# ------------------------------------------------------------------------------------------ experiments


EXPERIMENTS = ROOT / "experiments"
E2E = "experiments/e2e_smollm2"  # results key of train.experiment e2e_smollm2's JSON


def e2e_block(results: dict) -> str:
    """The E2E experiment (``python -m train.experiment e2e_smollm2``): training seen, held-out loss before and after,
    BLEU / ROUGE-L of the saved adapter on every held-out MR per decoding."""
    from train.experiment import E2E_STEPS

    r = results[E2E]
    t, h, run = r["training"], r["heldout"], r["runs"][0]
    evals = [e for e in run["evals"] if "loss" in e]
    before, after = evals[0], evals[-1]
    scale = t["steps"] / E2E_STEPS
    capped = any(o.startswith("data.max_eval_examples=") for o in run["overrides"])
    over = "a capped part of the held-out rows" if capped else f"{h['references']} rows"
    rows = [
        [
            d["name"].replace("beam10_lp0.9_norepeat4", "beam 10, length penalty 0.9, no repeated 4-grams"),
            f"{d['bleu']:.1f}",
            f"{d['rougeL']:.1f}",
            str(d["prompts_scored"]),
            str(d["references"]),
            f"{d['decode_s']:,.0f}",
        ]
        for d in r["table"]
    ]
    return "\n".join(
        [
            f"{t['steps']} steps of {t['batching']} batches ({t['examples_seen']:,} examples: "
            f"{t['epochs']:.2f} epochs of the {t['train_rows']:,} training rows, {t['train_mrs']} MRs), "
            f"LoRA r=8 on q, v; held-out loss over {over} of {h['prompts']} MRs never seen in training: "
            f"{before['loss']:.3f} before, "
            f"{after['loss']:.3f} after (perplexity {before['perplexity']:.2f} -> {after['perplexity']:.2f}).",
            "",
            "The saved adapter (merged) on every held-out MR, against all its references:",
            "",
            _table(["decoding", "BLEU", "ROUGE-L", "MRs", "references", "decode s"], rows),
            "",
            *[
                f'Before training: `{p.strip()}` -> "{b.strip()}"; after: "{a.strip()}"' + "\n"
                for (p, b), (_, a) in list(
                    zip(run["result"].get("samples_before") or [], run["result"].get("samples_after") or [])
                )[:1]
            ],
            f"*Run: `python -m train.experiment e2e_smollm2 --scale {scale:.2g}` "
            f"(results: `experiments/e2e_smollm2.json`; `--scale 1` = {E2E_STEPS} steps, two epochs).*",
        ]
    )


def e2e_headline(results: dict) -> str:
    """One line for the README: the E2E experiment's held-out scores (greedy and beam) and its command."""
    from train.experiment import E2E_STEPS

    r = results[E2E]
    t, h = r["training"], r["heldout"]
    by_name = {d["name"]: d for d in r["table"]}
    greedy, beam = by_name.get("greedy"), next((d for n, d in by_name.items() if n.startswith("beam")), None)
    parts = [f"greedy BLEU {greedy['bleu']:.1f} / ROUGE-L {greedy['rougeL']:.1f}"] if greedy else []
    if beam:
        parts.append(f"beam search BLEU {beam['bleu']:.1f} / ROUGE-L {beam['rougeL']:.1f}")
    return (
        f"E2E NLG with SmolLM2-135M-Instruct and LoRA r=8 ({t['steps']} steps): "
        f"{' and '.join(parts)} on all {h['prompts']} held-out meaning representations "
        f"(`python -m train.experiment e2e_smollm2 --scale {t['steps'] / E2E_STEPS:.2g}`)"
    )


SST2 = "experiments/sst2_methods"  # results key of train.experiment sst2_methods' JSON
SST2_NAMES = {
    "lora": "LoRA r=8 on W_q, W_v + head",
    "full": "full fine-tuning",
    "linear_probe": "frozen encoder + linear head",
}


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} KB"


def sst2_block(results: dict) -> str:
    """The SST-2 methods experiment (``python -m train.experiment sst2_methods``): the same steps for LoRA, full
    fine-tuning and a frozen encoder + head, their time and final validation metrics; the best of each bold."""
    r = results[SST2]
    table = r["table"]
    best = {k: max(row[k] for row in table) for k in ("auc", "accuracy")}
    best["loss"] = min(row["loss"] for row in table)
    per_step = {row["name"]: row["train_s"] / row["steps"] for row in table}

    def metric(row: dict, k: str) -> str:
        return f"**{row[k]:.3f}**" if row[k] == best[k] else f"{row[k]:.3f}"

    rows = [
        [
            SST2_NAMES.get(row["name"], row["name"]),
            f"{row['trainable_params']:,}",
            f"{row['steps']:,}",
            f"{row['epochs']:.2f}",
            f"{row['train_s']:,.0f}",
            f"{per_step[row['name']] * 1e3:,.0f}",
            metric(row, "auc"),
            metric(row, "accuracy"),
            metric(row, "loss"),
            _bytes(row["optimizer_state_bytes"]),
            _bytes(row["checkpoint_bytes"]),
        ]
        for row in table
    ]
    widths = sorted({w for row in table for w in row.get("batch_widths") or []})
    ratios = (
        ", ".join(f"{SST2_NAMES.get(n, n)} {t / per_step['full']:.2f}x" for n, t in per_step.items() if n != "full")
        if "full" in per_step
        else ""
    )
    scale = "" if r["scale"] == 1 else f" --scale {r['scale']:g}"
    return "\n".join(
        [
            f"{r['steps']:,} steps of {r['batch_size']} sentences each ({table[0]['epochs']:.2f} epochs of the "
            f"{r['train_rows']:,} training sentences), {table[0]['batching']} batches (widths {widths}), the same data "
            "order for every method; validation on the 872 sentences of the dev set. Training time excludes evaluation "
            "and includes the step's compilations.",
            "",
            _table(
                [
                    "method",
                    "trainable params",
                    "steps",
                    "epochs",
                    "train s",
                    "ms / step",
                    "val AUC",
                    "val accuracy",
                    "val loss",
                    "optimizer state",
                    "checkpoint",
                ],
                rows,
            ),
            "",
            *([f"Time per step relative to full fine-tuning: {ratios}.", ""] if ratios else []),
            f"*Run: `python -m train.experiment sst2_methods{scale}` "
            "(results: `experiments/sst2_methods.json`; `--scale 1` = one epoch).*",
        ]
    )


E2E_ANALYSIS = "experiments/analysis_e2e/analysis"  # python -m train.analyze on the E2E experiment's adapter


def e2e_analysis_block(results: dict) -> str:
    """dW of the E2E adapter (``python -m train.analyze``): per adapted matrix kind, medians over the layers of
    ‖dW‖/‖W‖, effective rank, W along dW's directions against random frames and against W's own top directions,
    and the amplification factor; then the layers holding most of Σ‖dW‖²."""
    r = results[E2E_ANALYSIS]
    ((label, adapter),) = r["adapters"].items()
    ms = adapter["matrices"]
    rows = []
    for name in sorted({m["matrix"] for m in ms}):
        group = [m for m in ms if m["matrix"] == name]
        rel = [m["relative"] for m in group]
        amp = [m["amplification"] for m in group]
        rows.append(
            [
                name,
                f"{statistics.median(rel):.3f} ({min(rel):.3f}-{max(rel):.3f})",
                f"{statistics.median([m['effective_rank'] for m in group]):.1f}",
                f"{statistics.median([m['proj_dw'] / m['proj_random'] for m in group]):.2f}",
                f"{statistics.median([m['proj_w'] / m['proj_dw'] for m in group]):.1f}",
                f"{statistics.median(amp):.1f} ({min(amp):.1f}-{max(amp):.1f})",
            ]
        )
    by_layer: dict[int, float] = {}
    for m in ms:
        by_layer[m["layer"]] = by_layer.get(m["layer"], 0.0) + m["norm_dw"] ** 2
    top = sorted(by_layer, key=by_layer.get, reverse=True)[:6]
    share = sum(by_layer[k] for k in top) / sum(by_layer.values())
    ranks = sorted({m["r"] for m in ms})
    return "\n".join(
        [
            f"E2E / SmolLM2-135M, r={'/'.join(map(str, ranks))} on q, v ({len(ms)} matrices of the `{label}` adapter; "
            f"`python -m train.analyze --base {r['base']} --adapters experiments/runs/e2e_lora --out "
            "experiments/analysis_e2e`; medians over the layers):",
            "",
            _table(
                [
                    "matrix",
                    "‖dW‖/‖W‖ (median, range)",
                    f"effective rank of dW (of {ranks[-1]})",
                    "‖UᵀWV‖ / random frame",
                    f"W's own top-{ranks[-1]} / ‖UᵀWV‖",
                    "amplification (median, range)",
                ],
                rows,
            ),
            "",
            f"The 6 layers with the largest Σ‖dW‖² (layers {', '.join(map(str, sorted(top)))}) hold "
            f"{100 * share:.0f}% of it ({len(by_layer)} layers).",
        ]
    )


WHISPER = "experiments/whisper_methods"  # train.experiment whisper_methods
WHISPER_NAMES = {
    "lora": "LoRA r=8 on q_proj, v_proj + head",
    "full": "full fine-tuning",
    "frozen_head": "frozen encoder + head",
}


def _spread(d: dict) -> str:
    return f"{d['mean']:.3f} ({d['min']:.3f}-{d['max']:.3f})"


def whisper_block(results: dict) -> str:
    """The Whisper methods experiment: per method over its seeds, the final validation AUC / accuracy / loss
    (mean and range), steps in the budget; which method leads at each fraction of the budget and whether it leads
    in every seed; whether the seed spread is smaller than the gaps between methods; the load while they ran."""
    r = results[WHISPER]
    table = r["table"]
    rows = [
        [
            WHISPER_NAMES.get(row["method"], row["method"]),
            f"{row['trainable_params']:,}",
            " / ".join(map(str, row["steps"])),
            _spread(row["auc"]),
            _spread(row["accuracy"]),
            _spread(row["loss"]),
            f"{min(row['eval_points'])}",
            f"{row['overloaded_runs']} of {len(row['seeds'])}",
        ]
        for row in table
    ]
    leads = []
    for lead in r["leaders"]:
        best = WHISPER_NAMES.get(lead["best"], lead["best"])
        per_seed = lead["best_per_seed"]
        held = (
            "in every seed"
            if lead["holds_in_every_seed"]
            else "not in every seed: "
            + ", ".join(f"seed {k} {WHISPER_NAMES.get(v, v)}" for k, v in per_seed.items() if v != lead["best"])
        )
        leads.append(f"- after {lead['seconds']:.0f} s of training: {best} has the best mean AUC, {held}.")
    means = sorted(row["auc"]["mean"] for row in table)
    gap = min(b - a for a, b in zip(means, means[1:])) if len(means) > 1 else float("nan")
    spread = max(row["auc"]["max"] - row["auc"]["min"] for row in table)
    runs = r["runs"]
    loads = [x["load"] for x in runs if x.get("load")]
    over = sum(bool(x["overloaded"]) for x in loads)
    cores = loads[0]["cores"] if loads else "?"
    load_line = (
        f"The machine's 1-minute load average while the runs trained: {min(x['mean_1min'] for x in loads):.1f}-"
        f"{max(x['max_1min'] for x in loads):.1f} on {cores} cores; {over} of {len(runs)} runs went above the core "
        "count (dashed in the plots), so their times carry other jobs' load"
        if loads
        else "The load while the runs trained was not recorded"
    )
    scale = "" if r["scale"] == 1 else f" --scale {r['scale']:g}"
    return "\n".join(
        [
            f"{len(r['seeds'])} seeds per method, {r['budget_s']:.0f} s of training each (evaluation excluded), batch "
            f"{r['batch_size']}, the encoder on the clip's first {r['frames']} mel frames "
            f"({r['frames'] // 100} s; Whisper's own window is 30 s); {r['train_clips']:,} training clips, "
            f"{r['eval_clips']:,} validation clips whose sentences and voice families never occur in training. "
            "Final validation metrics, mean (min-max) over the seeds:",
            "",
            _table(
                [
                    "method",
                    "trainable params",
                    "steps (per seed)",
                    "val AUC",
                    "val accuracy",
                    "val loss",
                    "points per curve",
                    "runs above the core count",
                ],
                rows,
            ),
            "",
            *leads,
            "",
            f"Largest spread of final AUC between seeds of one method: {spread:.3f}; smallest gap between two "
            f"methods' mean final AUC: {gap:.3f}"
            + (" (the seeds separate the methods)." if spread < gap else " (the seeds do not separate every pair)."),
            f"{load_line}.",
            "",
            provenance(r, f"python -m train.experiment whisper_methods{scale}"),
        ]
    )


def whisper_window_block(results: dict) -> str:
    """The encoder on the clip's own frames vs Whisper's 30 s window (benchmarks/whisper_window.py): pooled
    features' cosine similarity, the frozen-encoder probe both ways, the forward pass's speed-up."""
    r = results.get("whisper_window")
    if r is None:
        return "*Not measured on the current code yet: `python -m benchmarks.whisper_window`.*"
    f, t, c = r["frames"], r["time"], r["clips"]
    pool = {x["pooling"]: x for x in r["features"]}
    what = {
        "clip_positions": "mean over the clip's own positions, both windows",
        "whole_window": f"short window's mean vs the {f['full']}-frame window's mean over all its positions",
    }
    rows = [[what.get(k, k), f"{x['median_cosine']:.3f}", f"{x['min_cosine']:.3f}"] for k, x in pool.items()]
    probes = {p["features"]: p for p in r["probe"]}
    prow = [[p["window"], f"{p['auc']:.3f}", f"{p['accuracy']:.3f}"] for p in r["probe"]]
    s = t["speedup"]
    short, full = probes.get("short"), probes.get("full_all")
    verdict = (
        f"The frozen-encoder probe's validation AUC moves by {full['auc'] - short['auc']:+.3f} from the short "
        f"window to Whisper's own"
        if short and full
        else ""
    )
    rank = ""
    exp = results.get(WHISPER)
    if short and full and exp:
        means = {row["method"]: row["auc"]["mean"] for row in exp["table"]}
        if "frozen_head" in means and len(means) > 1:
            head = means.pop("frozen_head")
            nearest = min(means, key=lambda m: abs(means[m] - head))
            gap = abs(means[nearest] - head)
            shift = max(abs(p["auc"] - short["auc"]) for k, p in probes.items() if k != "short")
            rank = (
                f" In the methods experiment the frozen encoder + head ends {gap:.3f} AUC from the nearest method "
                f"({WHISPER_NAMES.get(nearest, nearest)}); Whisper's own window moves the probe by at most "
                f"{shift:.3f}, "
                + (
                    "less than that: on this evidence the baseline would rank the same with Whisper's own window."
                    if shift < gap
                    else "not less than that: with Whisper's own window the baseline could rank differently."
                )
            )
    return "\n".join(
        [
            f"{r['model']}, {c['train']} training and {c['eval']} validation clips of "
            f"{c.get('source', 'the speech task')} ({len(c['classes'])} classes); the encoder's last hidden state at "
            f"the task's {f['short']} frames against {f['full']} (the clip padded with silence to 30 s). Cosine "
            "similarity of pooled features per clip:",
            "",
            _table(["pooling", "median cosine", "lowest cosine"], rows),
            "",
            "The frozen-encoder baseline on each (softmax regression on the training clips' pooled features):",
            "",
            _table(["features", "val AUC", "val accuracy"], prow),
            "",
            f"{verdict}. The forward pass of {t['batch']} clips: {_ms(t['short_ms'])} ms at {f['short']} frames, "
            f"{_ms(t['full_ms'])} ms at {f['full']}: {s['median']:.1f}x faster (95% CI {s['ci95'][0]:.1f}-"
            f"{s['ci95'][1]:.1f}, {s['rounds']} paired rounds).{rank}",
            "",
            provenance(r, "python -m benchmarks.whisper_window"),
        ]
    )


def whisper_headline(results: dict) -> str:
    """One line for the README: the Whisper methods' final validation AUC (mean over seeds) and its command."""
    r = results[WHISPER]
    rows = sorted(r["table"], key=lambda row: -row["auc"]["mean"])
    final = r["leaders"][-1]
    agree = "in every seed" if final["holds_in_every_seed"] else "not in every seed"
    scale = "" if r["scale"] == 1 else f" --scale {r['scale']:g}"
    return (
        f"spoken-language ID with the pretrained Whisper base encoder, {r['budget_s']:.0f} s of CPU training per "
        f"method, {len(r['seeds'])} seeds: validation AUC "
        + ", ".join(f"{WHISPER_NAMES.get(row['method'], row['method'])} {row['auc']['mean']:.3f}" for row in rows)
        + f" (first {agree}; `python -m train.experiment whisper_methods{scale}`)"
    )


RANK = "experiments/rank_study"
QLORA_EXP = "experiments/qlora_vs_lora"
E2E_DPO = "experiments/e2e_dpo"
SST2_ANALYSIS = "experiments/analysis_sst2/analysis"


def _override(run: dict, key: str) -> str:
    return next((o.split("=", 1)[1] for o in run["overrides"] if o.startswith(key + "=")), "-")


def rank_study_block(results: dict) -> str:
    """The rank study: per run its targets, rank, trainable parameters and final validation metrics."""
    r = results[RANK]
    rows = [
        [
            x["name"],
            _override(x, "lora.targets"),
            _override(x, "lora.r"),
            f"{x['result']['trainable_params']:,}",
            str(x["result"]["steps"]),
            *(f"{x['result']['eval_after'][k]:.3f}" for k in ("auc", "accuracy", "loss")),
        ]
        for x in r["runs"]
    ]
    return "\n".join(
        [
            _table(
                ["run", "targets", "r", "trainable params (with head)", "steps", "val AUC", "val accuracy", "val loss"],
                rows,
            ),
            "",
            provenance(r, "python -m train.experiment rank_study"),
        ]
    )


def qlora_experiment_block(results: dict) -> str:
    """QLoRA vs LoRA on SST-2: final validation metrics and memory per variant."""
    r = results[QLORA_EXP]
    rows = [
        [
            x["name"],
            *(f"{x[k]:.3f}" for k in ("auc", "accuracy", "loss")),
            *(
                f"{x[k] / MiB:.1f}" if x.get(k) is not None else "-"
                for k in ("frozen_bytes", "optimizer_state_bytes", "step_memory_bytes")
            ),
        ]
        for x in r["table"]
    ]
    return "\n".join(
        [
            _table(
                [
                    "run",
                    "val AUC",
                    "val accuracy",
                    "val loss",
                    "frozen base MiB",
                    "optimizer state MiB",
                    "step peak MiB",
                ],
                rows,
            ),
            "",
            provenance(r, "python -m train.experiment qlora_vs_lora"),
        ]
    )


def e2e_dpo_block(results: dict) -> str:
    """SFT vs SFT + DPO on E2E: slot error rate and BLEU / ROUGE-L on every held-out MR."""
    r = results[E2E_DPO]
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    rows = [
        [
            x["name"],
            pct(x["ser"]),
            pct(x["missing"]),
            pct(x["wrong"]),
            pct(x["added"]),
            "-" if x.get("bleu") is None else f"{x['bleu']:.1f}",
            "-" if x.get("rougeL") is None else f"{x['rougeL']:.1f}",
        ]
        for x in r["table"]
    ]
    return "\n".join(
        [
            f"{r['sft_steps']} SFT steps, then {r['dpo_steps']} DPO steps; greedy outputs on the "
            f"{len(r['heldout']['mrs'])} held-out MRs:",
            "",
            _table(["outputs", "SER %", "missing %", "wrong %", "added %", "BLEU", "ROUGE-L"], rows),
            "",
            provenance(r, "python -m train.experiment e2e_dpo"),
        ]
    )


def sst2_analysis_block(results: dict) -> str:
    """dW of the rank study's r=8 and r=64 adapters: per adapter and matrix kind, medians over the layers."""
    r = results[SST2_ANALYSIS]
    rows = []
    for label, adapter in r["adapters"].items():
        ms = adapter["matrices"]
        for name in sorted({m["matrix"] for m in ms}):
            group = [m for m in ms if m["matrix"] == name]
            amp = [m["amplification"] for m in group]
            rows.append(
                [
                    label,
                    name,
                    f"{statistics.median([m['relative'] for m in group]):.3f}",
                    f"{statistics.median([m['effective_rank'] for m in group]):.1f} of {group[0]['r']}",
                    f"{statistics.median([m['proj_dw'] / m['proj_random'] for m in group]):.2f}",
                    f"{statistics.median(amp):.2f} ({min(amp):.2f}-{max(amp):.2f})",
                ]
            )
    return _table(
        [
            "adapter",
            "matrix",
            "‖dW‖/‖W‖ (median)",
            "effective rank of dW",
            "‖UᵀWV‖ / random frame",
            "amplification (median, range)",
        ],
        rows,
    )


def loss_positions_block(results: dict) -> str:
    """Logits everywhere vs at the loss positions: FLOPs (XLA) and paired step times per ``data.pack_length``."""
    r = results["loss_positions"]
    rows = [
        [
            str(x["pack_length"]),
            str(x["rows"]),
            f"{x['capacity']}",
            f"{x['no_loss_share']:.0%}",
            f"{x['no_logits_share']:.0%}",
            f"{x['head_share']:.0%}",
            f"{x['step_gflops']['all']:,.0f} -> {x['step_gflops']['loss']:,.0f}",
            f"-{x['flops_drop']:.1%} (expected -{x['expected_drop']:.1%})",
            f"{_ms(x['median_ms']['all'])} -> {_ms(x['median_ms']['loss'])}",
            " -> ".join(f"{x['loss_tokens_per_s'][k]:,.1f}" for k in ("all", "loss")),
            _verdict(x["paired"]),
        ]
        for x in r["rows"]
    ]
    out = [
        f"SmolLM2-135M shapes (tied 49,152-token head), LoRA r=8 on q,v, float32, packed rows of `{r['data']}`; "
        "the job's step with the head and cross-entropy at every position (`train.logits=all`) vs at the loss "
        "positions only (`train.logits=loss`, K loss slots per row), the same batch:",
        "",
        _table(
            [
                "pack_length",
                "rows",
                "K",
                "positions without loss",
                "positions without logits",
                "head's share of the FLOPs",
                "step GFLOP (XLA)",
                "FLOPs",
                "step ms (median)",
                "loss tokens/s",
                "time at loss positions / everywhere",
            ],
            rows,
        ),
        "",
        "Goals:",
        "",
        *(f"- {'MET' if g['met'] else 'MISSED'}: {k}: {g['value']:.3g}" for k, g in r["goals"].items()),
        "",
        "Step times come from the medians of each variant's rounds, the ratio from the rounds paired; on a loaded "
        "machine the two can disagree, and only the paired ratio is the claim.",
        "",
        provenance(r, "python -m benchmarks.loss_positions"),
    ]
    return "\n".join(out)


def _minutes(s: float) -> str:
    m, sec = divmod(int(round(s)), 60)
    return f"{m} min {sec} s" if m else f"{sec} s"


def _ran_on(section: dict) -> str:
    p = section.get("provenance", {})
    cpu, load = p.get("cpu", {}), p.get("load_average", {})
    git = p.get("git", {})
    commit = (git.get("commit") or "?")[:10] + (" with uncommitted changes" if git.get("dirty") else "")
    return (
        f"{cpu.get('model', '?')}, {cpu.get('usable_cores', cpu.get('logical_cores', '?'))} cores, load average "
        f"{(load.get('before') or ['?'])[0]} before / {(load.get('after') or ['?'])[0]} after, commit {commit}, "
        f"{p.get('date', '?')[:16].replace('T', ' ')} UTC"
    )


def newcomer_block(results: dict) -> str:
    """The README's times and counts for what a newcomer runs (benchmarks/newcomer.py)."""
    r = results.get("newcomer", {})
    out = []
    job = r.get("main_job")
    if job:
        res = job["result"]
        before, after = res["eval_before"], res["eval_after"]
        phases = res.get("phases_s") or {}
        split = ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in phases.items())
        gen = res.get("generate_eval") or "the"
        out.append(
            f"**The main job** (`{job['command']}`) trains {res['steps']} steps and takes the loss on prompts it never "
            f"trained on from {before['loss']:.3f} to {after['loss']:.3f} and, on {gen} of them, BLEU from "
            f"{before.get('bleu', float('nan')):.1f} to {after.get('bleu', float('nan')):.1f} and ROUGE-L from "
            f"{before.get('rougeL', float('nan')):.1f} to {after.get('rougeL', float('nan')):.1f}, in "
            f"**{_minutes(job['wall_s'])}** of wall time"
            + (f" ({split})" if split else "")
            + "; it ends by printing where its outputs went and writes `loss.png` into its run folder."
        )
    tests = r.get("tests")
    if tests:
        counts = ", ".join(f"{n} {what}" for what, n in tests.get("counts", {}).items())
        out.append(
            f"**The tests** (`{tests['command']}`): {counts or 'no summary'} in "
            f"**{_minutes(tests['wall_s'])}** of wall time."
        )
    setup = r.get("setup")
    if setup:
        out.append(
            f"**The setup** (`{setup['command']}`, pip's cache {setup.get('pip_cache', '?')}): "
            f"{_minutes(setup['wall_s'])}."
        )
    for name, what in (("main_job", "the main job"), ("tests", "the tests"), ("setup", "the setup")):
        if name in r:
            p = r[name].get("provenance", {})
            load = ((p.get("load_average") or {}).get("before") or [0])[0]
            cores = (p.get("cpu") or {}).get("usable_cores") or 1
            busy = (
                (
                    f" **A busy machine** (load average {load} on {cores} cores): these times are inflated; rerun "
                    f"on an idle one."
                )
                if load > 2 * cores
                else ""
            )
            out.append(
                f"*Timed by `python -m benchmarks.newcomer --{name.replace('_', '-')}` ({what}): "
                f"{_ran_on(r[name])}.*{busy}"
            )
        else:
            out.append(
                f"*{what.capitalize()}: not recorded yet (`python -m benchmarks.newcomer --{name.replace('_', '-')}`).*"
            )
    return "\n\n".join(out)


# The command that measures again a withdrawn experiment whose record names none (it predates provenance recording).
RERUN = {
    "experiments/sst2_methods": "python -m train.experiment sst2_methods",
    "experiments/e2e_smollm2": "python -m train.experiment e2e_smollm2",
    "experiments/rank_study": "python -m train.experiment rank_study",
    "experiments/qlora_vs_lora": "python -m train.experiment qlora_vs_lora",
    "experiments/e2e_dpo": "python -m train.experiment e2e_dpo",
    "experiments/whisper_methods": "python -m train.experiment whisper_methods",
    "experiments/analysis_e2e/analysis": "python -m train.experiment e2e_smollm2 && python -m train.analyze --base "
    "SmolLM2-135M-Instruct-Q4_1 --adapters experiments/runs/e2e_lora --out experiments/analysis_e2e",
    "experiments/analysis_sst2/analysis": "python -m train.experiment rank_study && python -m train.analyze --base "
    "all-MiniLM-L6-v2 --adapters experiments/runs/r8_qv experiments/runs/r64_qv --out experiments/analysis_sst2",
}


def withdrawn(records: list[dict], inline: bool, names: list[str] | None = None) -> str:
    """What a page says in place of results whose code changed after they were measured (moved to
    ``benchmarks/results/stale/`` or ``experiments/stale/``): no figure, the commit they measured and the command
    that measures them again (``names``: their results keys, for the commands of records that name none)."""
    names = names or [""] * len(records)
    cmds = ", ".join(
        f"`{r.get('provenance', {}).get('command') or RERUN.get(n) or f'python -m benchmarks.{n}'}`"
        for r, n in zip(records, names)
    )
    if inline:
        return f"(withdrawn until {cmds} is rerun on the current code)"
    commits = [(r.get("provenance", {}).get("git", {}).get("commit") or "")[:10] for r in records]
    measured = (
        f"measured on commit {', '.join(c or '?' for c in commits)}"
        if any(commits)
        else "measured before results recorded their commit, CPU and load"
    )
    return (
        f"*Withdrawn: these figures were {measured}, and the code they measure has changed "
        f"since. They are not quoted until {cmds} is rerun (`python -m benchmarks.staleness` lists what is "
        "stale).*"
    )


def transform_qlora_block(results: dict) -> str:
    """Compiled train-step memory of a stock Linen model through lora.transform, dense vs NF4 bases."""
    r = results["transform_qlora"]
    rows = [[x["base"], f"{x['base MiB']:.1f}", f"{x['temp MiB']:.1f}", f"{x['peak MiB']:.1f}"] for x in r["rows"]]
    c = r["config"]
    return "\n".join(
        [
            f"{c['blocks']} blocks of `nn.MultiHeadDotProductAttention` + MLP, d={c['d']}, batch "
            f"{c['batch']} x {c['seq']}, r={c['r']}; XLA's compiled memory analysis of the train step:",
            "",
            _table(["base", "stored base MiB", "temp MiB", "peak MiB"], rows),
            "",
            provenance(r, "python -m benchmarks.transform_qlora"),
        ]
    )


def sharded_load_block(results: dict) -> str:
    """Peak host memory of train.run loading a 1.1B model straight into the mesh (benchmarks/sharded_load.py)."""
    r = results.get("sharded_load")
    if r is None:
        return "*Not recorded on the current code yet: `python -m benchmarks.sharded_load`.*"
    rows = [
        [
            x["run"],
            f"{x['peak_rss_gib']:.2f}",
            f"{x['x_checkpoint']:.2f}x",
            f"{x['load_s']:.0f}",
            f"<= {x['goal']}x" if x["goal"] else "",
            x["met"],
        ]
        for x in r["rows"]
    ]
    out = [
        f"A Llama-shaped checkpoint of {r['checkpoint_bytes'] / 2**30:.2f} GiB (bfloat16, HF sharded safetensors, "
        f"preset `{r['preset']}`), peak resident memory of each process (`/usr/bin/time`):",
        "",
        _table(["run", "peak RSS GiB", "x checkpoint", "load s", "goal", "met"], rows),
        "",
    ]
    plans = [f"- {x['run']}: {x['plan']}" for x in r["rows"] if x.get("plan")]
    if plans:  # what each job's compiled step holds per device (8 CPU devices share the one host's memory)
        out += ["Each job's own memory plan (XLA's compiled memory analysis of its step):", "", *plans, ""]
    out.append(provenance(r, "python -m benchmarks.sharded_load"))
    return "\n".join(out)


# Results whose block says "not recorded yet" until their command has run (what it says names the command).
OPTIONAL = frozenset({"newcomer", "sharded_load", "whisper_window"})


def attention_memory_block(results: dict) -> str:
    r = results["attention_memory"]
    cfg = r["config"]
    rows = [
        [
            m["attention"] + (f" ({r.get('auto_is')})" if m["attention"] == "auto" else ""),
            f"{m['seq']:,}",
            f"{m['temp_MiB']:,.0f}",
            f"{m['peak_MiB']:,.0f}",
        ]
        for m in r["memory"]
    ]
    growth = [
        f"- `{impl}`: {g['tokens_ratio']:.0f}x the tokens, {g['temp_ratio']:.1f}x the temporaries"
        for impl, g in r.get("growth", {}).items()
        if g
    ]
    out = [
        f"The job's LoRA step (r=8 on q, v, AdamW, chunked loss, float32, no remat) of a 2-layer width-128 Llama, "
        f"batch {cfg['batch']}, compiled memory by `model.attention`:",
        "",
        _table(["attention", "tokens", "temp MiB", "step peak MiB"], rows),
        "",
        *growth,
        "",
        "Goals:",
        "",
    ]
    out += [f"- {'MET' if g['met'] else 'MISSED'}: {k}: {_x(g['value'])}" for k, g in r.get("goals", {}).items()]
    trows = [
        [
            t["attention"],
            f"{t['seq']:,}",
            _ms(t["median_ms"]),
            _x(t[f"ratio_to_{cfg['impls'][0]}"]),
            f"{_x(t['ci95'][0])}-{_x(t['ci95'][1])}",
        ]
        for t in r.get("time", [])
    ]
    if trows:
        out += [
            "",
            f"Step time, {cfg['rounds']} rotated rounds on a shared machine (compare the paired ratios):",
            "",
            _table(["attention", "tokens", "median ms", f"time / {cfg['impls'][0]}", "95% CI"], trows),
        ]
    return "\n".join(out + ["", provenance(r, "python -m benchmarks.attention_memory")])


def scan_layers_block(results: dict) -> str:
    r = results["scan_layers"]
    cfg = r["config"]
    rows = [[str(m["layers"]), m["form"], f"{m['compile_s']:.2f}", f"{m['temp_MiB']:,.0f}"] for m in r["compile"]]
    growth = [
        f"- {form}: compile({g['deep']} layers) / compile({g['shallow']} layers) = {_x(g['compile_ratio'])}"
        for form, g in r["growth"].items()
    ]
    out = [
        f"Compiling the job's LoRA step (r=8 on q, v, AdamW, float32, train.remat={r['remat']}) of a width-128 Llama, "
        f"batch {cfg['batch']} x {cfg['seq']}, medians of {cfg['rounds']} interleaved rounds:",
        "",
        _table(["layers", "form", "compile s", "temp MiB"], rows),
        "",
        *growth,
        "",
        "Goals:",
        "",
    ]
    out += [f"- {'MET' if g['met'] else 'MISSED'}: {k}: {_x(g['value'])}" for k, g in r.get("goals", {}).items()]
    trows = [
        [
            str(t["layers"]),
            _ms(next(u["median_ms"] for u in r["time"] if u["layers"] == t["layers"] and u["form"] == "unrolled")),
            _ms(t["median_ms"]),
            _x(t["ratio_to_unrolled"]),
            f"{_x(t['ci95'][0])}-{_x(t['ci95'][1])}",
        ]
        for t in r.get("time", [])
        if t["form"] == "scanned"
    ]
    if trows:
        out += [
            "",
            f"Step time on this CPU, {cfg['time_rounds']} rotated rounds (compare the paired ratios):",
            "",
            _table(["layers", "unrolled ms", "scanned ms", "scanned / unrolled", "95% CI"], trows),
        ]
    return "\n".join(out + ["", provenance(r, "python -m benchmarks.scan_layers")])


def accelerator_block(results: dict) -> str:
    r = results["accelerator"]
    pct = lambda x: "n/a" if x is None else f"{x:.1%}"  # noqa: E731
    rows = [
        [
            m["model"],
            f"{m['layers']} x {m['hidden']}",
            f"{m['batch']} x {m['seq']}",
            m["device_kind"],
            f"{m['tokens_per_s']:,.0f}",
            f"{max(m['peak_memory_per_device_GiB']):.2f}"
            if m["peak_memory_per_device_GiB"]
            else f"{m['compiled_plan_per_device_GiB']:.3f} (plan)",
            pct(m["mfu"]["6N"]),
            pct(m["mfu"]["lora_aware_4N_plus_6Na"]),
        ]
        for m in r["runs"]
    ]
    head = (
        "Measured on an accelerator:"
        if r.get("measured_on_accelerator")
        else "**No accelerator has run this yet**: the record is the `--quick` CPU smoke run (tiny models), which only "
        "shows the command works; the accelerator row is unmeasured until a device is lent."
    )
    return "\n".join(
        [
            head,
            "",
            _table(
                [
                    "model",
                    "layers x width",
                    "batch x tokens",
                    "device",
                    "tokens/s",
                    "peak GiB / device",
                    "MFU 6N",
                    "MFU LoRA-aware",
                ],
                rows,
            ),
            "",
            provenance(r, "python -m benchmarks.accelerator"),
        ]
    )


RENDERERS: dict[str, tuple[tuple[str, ...], Callable[[dict], str], bool]] = {
    "train_step.headline": (("train_step",), train_step_headline, True),
    "train_step.merged": (("train_step",), merged_headline, True),
    "train_step": (("train_step",), train_step_block, False),
    "peers": (("peers",), peers_block, False),
    "qlora_memory": (("qlora_memory",), qlora_block, False),
    "multi_adapter": (("multi_adapter",), multi_adapter_block, False),
    "smollm2_speed": (("smollm2_speed",), smollm2_block, False),
    "step_ratio": (("step_ratio",), step_ratio_block, False),
    "loss_memory": (("loss_memory",), loss_memory_block, False),
    "llamacpp_parity": (("llamacpp_parity",), llamacpp_block, False),
    "moe_step": (("moe_step",), moe_step_block, False),
    "time_to_accuracy": (("time_to_accuracy",), time_to_accuracy_block, False),
    "causal_tokens": (("causal_tokens",), causal_tokens_block, False),
    "xla_flags": (("xla_flags",), xla_flags_block, False),
    "host_overlap": (("host_overlap",), host_overlap_block, False),
    "loss_positions": (("loss_positions",), loss_positions_block, False),
    "e2e_experiment": ((E2E,), e2e_block, False),
    "e2e_experiment.headline": ((E2E,), e2e_headline, True),
    "sst2_methods": ((SST2,), sst2_block, False),
    "e2e_analysis": ((E2E_ANALYSIS,), e2e_analysis_block, False),
    "whisper_methods": ((WHISPER,), whisper_block, False),
    "whisper_methods.headline": ((WHISPER,), whisper_headline, True),
    "whisper_window": (("whisper_window",), whisper_window_block, False),
    "rank_study": ((RANK,), rank_study_block, False),
    "qlora_vs_lora": ((QLORA_EXP,), qlora_experiment_block, False),
    "e2e_dpo": ((E2E_DPO,), e2e_dpo_block, False),
    "sst2_analysis": ((SST2_ANALYSIS,), sst2_analysis_block, False),
    "newcomer": (("newcomer",), newcomer_block, False),
    "attention_memory": (("attention_memory",), attention_memory_block, False),
    "accelerator": (("accelerator",), accelerator_block, False),
    "scan_layers": (("scan_layers",), scan_layers_block, False),
    "sharded_load": (("sharded_load",), sharded_load_block, False),
    "transform_qlora": (("transform_qlora",), transform_qlora_block, False),
}


EXPERIMENT_KEYS = (E2E, SST2, E2E_ANALYSIS, WHISPER, RANK, QLORA_EXP, E2E_DPO, SST2_ANALYSIS)


def load_results(results_dir: Path = RESULTS, experiments_dir: Path = EXPERIMENTS) -> dict[str, dict]:
    """Every benchmark's results (by name) and the experiments the pages report (``experiments/NAME``); results
    withdrawn because the code they measured changed (``benchmarks/results/stale/NAME.json``,
    ``experiments/stale/NAME.json``) as ``stale/NAME`` and ``stale/experiments/NAME``."""
    out = {p.stem: json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))}
    out.update({f"stale/{p.stem}": json.loads(p.read_text()) for p in sorted((results_dir / "stale").glob("*.json"))})
    for key in EXPERIMENT_KEYS:
        rel = key.split("/", 1)[1]
        path = experiments_dir / f"{rel}.json"
        if path.is_file():
            out[key] = json.loads(path.read_text())
        withdrawn_path = experiments_dir / "stale" / f"{rel}.json"
        if withdrawn_path.is_file():
            out[f"stale/{key}"] = json.loads(withdrawn_path.read_text())
    return out


def render(readme: str, results: dict[str, dict]) -> str:
    """``readme`` with every marked part regenerated from ``results``. Unknown ids are an error."""

    def one(m: re.Match) -> str:
        rid = m.group("id")
        if rid not in RENDERERS:
            raise KeyError(f"marker report:{rid} has no renderer; known: {sorted(RENDERERS)}")
        needs, fn, inline = RENDERERS[rid]
        missing = [n for n in needs if n not in results and n not in OPTIONAL]
        if any(f"stale/{n}" not in results for n in missing):
            raise FileNotFoundError(f"report:{rid} needs benchmarks/results/{missing[0]}.json")
        body = withdrawn([results[f"stale/{n}"] for n in missing], inline, missing) if missing else fn(results)
        return (
            f"<!-- report:{rid} -->{body}<!-- /report:{rid} -->"
            if inline
            else f"<!-- report:{rid} -->\n{body}\n<!-- /report:{rid} -->"
        )

    return MARKER.sub(one, readme)


def pages(root: Path = ROOT) -> list[Path]:
    """The pages that may hold marked parts: ``README.md`` and every Markdown file under ``docs/``."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def marker_ids(paths: list[Path] | None = None) -> set[str]:
    """Every report ID marked on ``paths`` (default: :func:`pages`)."""
    return {m.group("id") for p in (pages() if paths is None else paths) for m in MARKER.finditer(p.read_text())}


def stale_pages(results: dict[str, dict], paths: list[Path] | None = None) -> list[Path]:
    """The pages whose marked parts differ from what ``results`` renders."""
    return [p for p in (pages() if paths is None else paths) if render(p.read_text(), results) != p.read_text()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare only; exit 1 when a page is out of date")
    ap.add_argument("--pages", nargs="+", help="the pages to render (default: README.md and docs/**/*.md)")
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args(argv)
    paths = [Path(p) for p in args.pages] if args.pages else pages()
    results = load_results(Path(args.results))
    missing = set(RENDERERS) - marker_ids(paths) if not args.pages else set()
    if missing:
        print(f"no page marks {sorted(missing)}: every result belongs on a page", file=sys.stderr)
        return 1
    stale = stale_pages(results, paths)
    if args.check:
        for path in stale:
            print(f"{path} disagrees with {args.results}: run python -m benchmarks.report", file=sys.stderr)
        if not stale:
            print(f"{len(paths)} pages match {args.results}")
        return 1 if stale else 0
    for path in stale:
        path.write_text(render(path.read_text(), results))
        print(f"rewrote the report sections of {path}")
    if not stale:
        print(f"{len(paths)} pages already match {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
