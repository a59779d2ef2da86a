"""Evaluation that cannot leak: the default job's and the E2E config's held-out prompts, built through the real
loader (``train.data.load_tokenized`` with the model's own tokenizer, as ``train.loop`` calls it), are never seen
in training; ``max_eval_examples`` keeps whole prompts with all their references."""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

import pytest

from conftest import shared_data
from train import data as data_lib
from train.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf_path):
    """The default job's tokenizer, rebuilt from the GGUF metadata as ``lora_jax.models.load`` does."""
    from lora_jax.models import gguf

    return gguf.tokenizer_from_metadata(gguf.metadata(gguf.open_gguf(smollm2_gguf_path)), str(smollm2_gguf_path))


def _check_no_leak(cfg, tokenizer, rows):
    """Split ``rows`` as the job does and check the held-out side."""
    train, evals = data_lib.load_tokenized(cfg.data, tokenizer, cfg.model.name, cache_dir=None)
    assert len(train) and len(evals)
    both = set(train.prompts) & set(evals.prompts)
    assert not both, f"{len(both)} of {len(set(evals.prompts))} held-out prompts are also trained on"
    # what the job scores with BLEU / ROUGE-L (train.loop: the first generate_eval distinct eval prompts)
    scored = list(dict.fromkeys(evals.prompts))[: cfg.eval.generate_eval]
    assert scored and not set(scored) & set(train.prompts)
    # every held-out prompt keeps all of its references (as many as the source has for it)
    per_prompt = collections.Counter(data_lib.format_prompt(r, cfg.data) for r in rows)
    for prompt, refs in zip(evals.prompts, evals.references):
        assert len(refs) == per_prompt[prompt], prompt
    return train, evals, scored


@pytest.mark.parametrize("config", [None, "configs/default.yaml"])
def test_default_job_evaluates_on_unseen_prompts(config, smollm2_tokenizer):
    cfg = load_config(None if config is None else ROOT / config)
    assert cfg.data.source == "builtin:restaurants" and cfg.data.group_column is None
    rows = data_lib.load_rows(cfg.data, cfg.data.train_split)
    prompts = collections.Counter(data_lib.format_prompt(r, cfg.data) for r in rows)
    assert sum(n > 1 for n in prompts.values()) > 0.3 * len(prompts)  # prompts repeat: a row split would leak
    train, evals, scored = _check_no_leak(cfg, smollm2_tokenizer, rows)
    assert len(train) + len(evals) == len(rows)
    assert len(scored) == cfg.eval.generate_eval == 16


def test_e2e_config_evaluates_on_unseen_mrs(smollm2_tokenizer):
    cfg = load_config(ROOT / "configs" / "e2e_smollm2_lora.yaml")
    devset = shared_data("e2e", "devset.csv")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source=str(devset)))
    rows = data_lib.load_rows(cfg.data, cfg.data.train_split)
    train, evals, scored = _check_no_leak(cfg, smollm2_tokenizer, rows)
    mrs = {r["mr"] for r in rows}
    held = set(evals.prompts)
    assert len(mrs) == 547 and len(held) == round(0.1 * 547)  # all held-out MRs fit max_eval_examples
    assert len(evals) == sum(r["mr"] + "\n" in held for r in rows)
    assert len(scored) == len(held) == 55  # eval.generate_eval covers every held-out MR
    # train.experiment e2e_smollm2's final scoring (train.predict.score_heldout) sees the same 55 MRs, each once
    # with every reference the loader kept for it
    from train import predict

    train_rows, eval_rows = predict.heldout_split(cfg)
    prompts, refs = predict.reference_groups(eval_rows, cfg.data)
    assert len(prompts) == len(set(prompts)) == 55 and set(prompts) == held
    assert dict(zip(prompts, refs)) == dict(zip(evals.prompts, evals.references))
    assert len(train_rows) == len(train) and not set(prompts) & set(train.prompts)


def test_reference_groups_keeps_each_prompt_once_with_all_its_references():
    from train import predict

    rows = [
        {"mr": m, "ref": r} for m, r in (("b", "b1"), ("a", "a1"), ("b", "b2"), ("c", "c1"), ("a", "a2"), ("b", "b3"))
    ]
    cfg = load_config(None, ["data.prompt_column=mr", "data.completion_column=ref"]).data
    prompts, refs = predict.reference_groups(rows, cfg)
    assert prompts == ["b\n", "a\n", "c\n"] and refs == [["b1", "b2", "b3"], ["a1", "a2"], ["c1"]]


def test_max_eval_examples_caps_prompts_not_rows():
    rows = [{"prompt": p, "completion": f"{p} {i}"} for p, n in (("a", 3), ("b", 1), ("c", 2)) for i in range(n)]
    cfg = load_config(None, ["data.max_eval_examples=2"]).data
    assert data_lib.cap_eval_rows(rows, cfg) == rows[:4]  # a (3 references) and b, not the first two rows
    cls = load_config(None, ["data.max_eval_examples=2", "data.task=classification"]).data
    assert data_lib.cap_eval_rows(rows, cls) == rows[:2]


def test_causal_lm_split_groups_by_rendered_prompt():
    """Without group_column the key is the prompt as the model sees it: two columns of the template, not one."""
    rows = [
        {"a": a, "b": b, "completion": str(i)}
        for i, (a, b) in enumerate([(x, y) for x in "pqrs" for y in "xy" for _ in range(2)])
    ]
    cfg = load_config(None, ['data.prompt_template="{a}-{b}: "']).data
    train, evals = data_lib.split_rows(rows, cfg)
    assert not {(r["a"], r["b"]) for r in train} & {(r["a"], r["b"]) for r in evals}
    assert len(evals) == 2  # one (a, b) group of 8 held out, both its rows
