"""Smoke tests of the benchmark scripts: their ``--quick`` paths run in-process and produce the expected tables."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks folder is not an installed package

from benchmarks import peers, train_step  # noqa: E402


def _positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def _check_times(times: dict) -> None:
    for name, ts in times.items():
        assert ts and all(_positive(t) for t in ts), (name, ts)


def _check_step_and_memory(result, models) -> None:
    rows = result["step"]
    assert [(r["model"], r["method"]) for r in rows] == [
        (m, train_step.LABELS[k]) for m in models for k in train_step.KINDS]
    for r in rows:
        assert _positive(r["median_ms"]) and _positive(r["tokens/s"]) and _positive(r["ratio_to_full"])
    assert {r["method"]: r["ratio_to_full"] for r in rows if r["model"] == models[0]}["full fine-tuning"] == 1.0
    for name in models:
        _check_times(result["times_s"][f"step/{name}"])
        mem = {r["method"]: r for r in result["memory"] if r["model"] == name}
        assert set(mem) == set(train_step.LABELS.values())
        for r in mem.values():
            b = r["bytes"]
            assert b["peak"] == b["argument"] + b["output"] - b["alias"] + b["temp"] > 0
        # LoRA keeps optimizer state for the adapters only
        assert mem[train_step.LABELS["factored"]]["opt_state_bytes"] < mem["full fine-tuning"]["opt_state_bytes"] / 10


def test_train_step_quick_step_and_memory(tmp_path):
    result = train_step.main(["--quick", "--models", "gpt2-small", "--sections", "step", "--out-dir", str(tmp_path)])
    _check_step_and_memory(result, ["gpt2-small"])
    saved = json.loads((tmp_path / "train_step_quick.json").read_text())
    assert saved["step"] == json.loads(json.dumps(result["step"])) and "environment" in saved and saved["goals"]
    _check_provenance(saved, "train_step", "--quick --models gpt2-small --sections step")


def _check_provenance(saved: dict, benchmark: str, args: str) -> None:
    p = saved["provenance"]
    assert p["benchmark"] == benchmark and p["command"].startswith(f"python -m benchmarks.{benchmark} {args}")
    assert len(p["git"]["commit"]) == 40 and p["cpu"]["model"] and p["libraries"]["jax"]
    assert p["load_average"]["before"] and p["load_average"]["after"]


@pytest.mark.slow
def test_train_step_quick_all_sections(tmp_path):
    result = train_step.main(["--quick", "--out-dir", str(tmp_path)])
    _check_step_and_memory(result, ["gpt2-small", "smollm2-135m"])
    whats = [r["what"] for r in result["inference"]]
    assert len(whats) == 6 and whats[0] == "forward, base params" and any("merged" in w for w in whats)
    assert all(_positive(r["median_ms"]) for r in result["inference"])
    assert result["inference_info"]["max_abs_diff_merged_vs_factored_logits"] < 1e-4
    _check_times(result["times_s"]["inference"])
    sweeps = [(r["sweep"], r["variant"]) for r in result["scaling"]]
    assert sweeps[0] == ("rank (qv)", "full fine-tuning") and ("rank (qv)", "r=4") in sweeps
    assert [v for s, v in sweeps if s.startswith("targets")] == [
        "full fine-tuning", "qv (2/layer)", "attention (4/layer)", "all-linear (7/layer)"]
    assert all(_positive(r["median_ms"]) for r in result["scaling"])


def test_peers_quick_jax(tmp_path):
    result = peers.main(["--quick", "--peers", "nnx-split", "--out-dir", str(tmp_path)])
    assert [r["peer"] for r in result["rows"]] == [peers.LABELS["ours"], peers.LABELS["nnx-split"]]
    for r in result["rows"]:
        assert _positive(r["median_ms"]) and _positive(r["ours/peer"])
        assert r["trainable"] == result["rows"][0]["trainable"]
        assert r["paired"]["rounds"] == 2 and len(r["paired"]["ci95"]) == 2
    _check_times(result["times_s"])
    assert result["notes"] == [peers.explain({}, {}, quick=True)[0]]
    _check_provenance(json.loads((tmp_path / "peers_quick.json").read_text()), "peers", "--quick")


def test_peers_notes_quote_only_this_runs_figures():
    """Verdicts come from the paired rounds and the FLOP rates from the run's own counts; nothing else."""
    summary = {"median": 1.2, "ci95": [1.1, 1.3], "rounds": 5, "slower_rounds": 5}
    rows = {"ours": {"median_ms": 2000.0, "paired": summary}, "peft": {"median_ms": 1000.0, "paired": summary}}
    info = {"ours": {"flops_per_step": 4e11, "flops_counter": "XLA cost analysis"},
            "peft": {"flops_per_step": 3e11, "flops_counter": "torch.utils.flop_counter"}}
    notes = peers.explain(rows, info, quick=False)
    assert notes[0].startswith("ours is slower than peft (median 1.20, 95% CI 1.10-1.30")
    assert "ours: 400 GFLOP per step (XLA cost analysis) in 2.00 s = 200 GFLOP/s" in notes[1]
    assert "peft: 300 GFLOP per step (torch.utils.flop_counter) in 1.00 s = 300 GFLOP/s" in notes[1]
    numbers = {float(x.replace(",", "")) for n in notes for x in re.findall(r"\d[\d,]*\.?\d*", n)}
    assert numbers <= {1.2, 1.1, 1.3, 5.0, 400.0, 2.0, 200.0, 300.0, 1.0, 95.0}, numbers  # no fixed figures


@pytest.mark.slow
def test_peers_quick_all(tmp_path):
    result = peers.main(["--quick", "--out-dir", str(tmp_path)])
    names = [r["peer"] for r in result["rows"]]
    expected = [peers.LABELS[p] for p in peers.PEERS]
    skipped = [n for n in result["notes"] if "skipped" in n]
    assert names == [e for e in expected if e in names] and len(names) + len(skipped) == len(expected)
    assert {r["trainable"] for r in result["rows"]} == {result["rows"][0]["trainable"]}  # the same adapters everywhere
    for r in result["rows"]:
        assert _positive(r["median_ms"]) and _positive(r["tokens/s"])
    _check_times(result["times_s"])


@pytest.mark.slow  # ~60 s of CPU: five compiled steps and a PyTorch model
def test_moe_step_quick(tmp_path):
    from benchmarks import moe_step

    result = moe_step.main(["--quick", "--out-dir", str(tmp_path)])
    rows = {r["variant"]: r for r in result["step"]}
    assert set(rows) == {moe_step.LABELS[v] for v in moe_step.VARIANTS}
    for r in rows.values():
        assert _positive(r["median_ms"]) and _positive(r["ratio_to_full"])
    assert rows[moe_step.LABELS["full"]]["ratio_to_full"] == 1.0
    full, lora_ = rows[moe_step.LABELS["full"]]["trainable"], rows[moe_step.LABELS["lora"]]["trainable"]
    assert lora_ < full and rows[moe_step.LABELS["peft"]]["trainable"] == lora_  # PEFT trains the same adapters
    mem = {m["variant"]: m for m in result["memory"]}
    assert mem[moe_step.LABELS["lora"]]["opt_state_MiB"] < mem[moe_step.LABELS["full"]]["opt_state_MiB"]
    saved = json.loads((tmp_path / "moe_step_quick.json").read_text())
    assert saved["provenance"]["benchmark"] == "moe_step" and saved["provenance"]["git"]
    assert saved["step"] == json.loads(json.dumps(result["step"]))
