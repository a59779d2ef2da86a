"""python -m train.predict: a finished run's adapters on new inputs, factored or merged, from the run folder or
from a base model + adapter folder; clear errors for what does not fit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from train import loop, predict
from train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(print_fn=lambda *a, **k: None)


def _save_bert(folder, minilm_path, hidden=32):
    from transformers import AutoTokenizer

    from lora_jax.models import bert, save_pretrained

    config = bert.Config(
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    params = bert.init_params(config, jax.random.key(0), task="sequence-classification")
    save_pretrained(params, config, folder, tokenizer=AutoTokenizer.from_pretrained(str(minilm_path)))
    return folder


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, minilm_path):
    """A 2-layer, 32-wide random BERT classifier with MiniLM's tokenizer, in Hugging Face layout."""
    return _save_bert(tmp_path_factory.mktemp("tiny_bert"), minilm_path)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, minilm_path):
    """A 2-layer, 32-wide random Llama with MiniLM's (WordPiece) tokenizer, in Hugging Face layout."""
    from transformers import AutoTokenizer

    from lora_jax.models import llama, save_pretrained

    tok = AutoTokenizer.from_pretrained(str(minilm_path))
    config = llama.Config(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    params = llama.init_params(config, jax.random.key(1), task="causal-lm")
    folder = tmp_path_factory.mktemp("tiny_llama")
    save_pretrained(params, config, folder, tokenizer=tok)
    return folder


def _overrides(model_dir, out, **extra):
    base = {
        "model.name": str(model_dir),
        "train.batch_size": 8,
        "eval.every": 100,
        "eval.batch_size": 16,
        "checkpoint.every": 100,
        "lora.targets": "qv",
        "optim.lr": 1e-2,
        "optim.warmup_steps": 2,
        "train.steps": 6,
        "output.dir": str(out),
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def cls_run(tiny_bert, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "cls"
    return loop.run(
        load_config(
            None,
            _overrides(
                tiny_bert,
                out,
                **{
                    "data.source": "builtin:sentiment",
                    "data.task": "classification",
                    "data.max_length": 16,
                    "output.export_peft": "true",
                },
            ),
        ),
        **QUIET,
    ).folder


@pytest.fixture(scope="module")
def lm_run(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lm"
    loop.run(
        load_config(
            None,
            _overrides(
                tiny_llama,
                out,
                **{
                    "data.source": "builtin:restaurants",
                    "data.task": "causal-lm",
                    "data.max_length": 64,
                    "train.batch_size": 4,
                    "data.max_eval_examples": 16,
                    "eval.generate_samples": 0,
                    "eval.generate_eval": 0,
                },
            ),
        ),
        **QUIET,
    )
    return out  # the job folder: train.predict --run follows its latest run


def _records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ------------------------------------------------------------------------------------------- causal LM


def test_causal_lm_predict_factored_equals_merged(lm_run, tmp_path):
    prompts = ["name[The Mill], eatType[pub], food[English]", "name[Alimentum], area[riverside]"]
    args = ["--run", str(lm_run), *sum((["--text", p] for p in prompts), []), "--max-new-tokens", "8"]
    assert predict.main([*args, "--out", str(tmp_path / "factored.jsonl")]) == 0
    assert predict.main([*args, "--merged", "--out", str(tmp_path / "merged.jsonl")]) == 0
    factored, merged = _records(tmp_path / "factored.jsonl"), _records(tmp_path / "merged.jsonl")
    assert [r["prompt"] for r in factored] == [p + "\n" for p in prompts]  # the run's prompt template
    assert factored == merged
    assert all(r["output"] for r in factored)  # 8 new tokens of a random model: some text
    # jsonl rows that hold the template's fields fill it; beam search decodes too
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(prompts)))
    assert (
        predict.main(
            [
                "--run",
                str(lm_run),
                "--file",
                str(rows),
                "--num-beams",
                "2",
                "--max-new-tokens",
                "4",
                "--out",
                str(tmp_path / "beams.jsonl"),
            ]
        )
        == 0
    )
    beams = _records(tmp_path / "beams.jsonl")
    assert [r["prompt"] for r in beams] == [p + "\n" for p in prompts] and all(r["output"] for r in beams)


# -------------------------------------------------------------------------------------- classification


def test_classification_predict_from_file(cls_run, tiny_bert, tmp_path):
    sentences = [
        "a gorgeous, moving film",
        "dull , lifeless and far too long",
        "the cast is superb",
        "i walked out after an hour",
    ]
    csv_file = tmp_path / "in.csv"
    csv_file.write_text("id,sentence\n" + "".join(f'{i},"{s}"\n' for i, s in enumerate(sentences)))
    assert predict.main(["--run", str(cls_run), "--file", str(csv_file), "--out", str(tmp_path / "a.jsonl")]) == 0
    factored = _records(tmp_path / "a.jsonl")
    assert [r["input"] for r in factored] == sentences
    for r in factored:
        assert len(r["probabilities"]) == 2 and abs(sum(r["probabilities"]) - 1) < 1e-5
        assert r["label"] == int(np.argmax(r["probabilities"]))
    probs = np.array([r["probabilities"] for r in factored])

    txt = tmp_path / "in.txt"
    txt.write_text("\n".join(sentences) + "\n")
    assert (
        predict.main(["--run", str(cls_run), "--file", str(txt), "--merged", "--out", str(tmp_path / "b.jsonl")]) == 0
    )
    np.testing.assert_allclose([r["probabilities"] for r in _records(tmp_path / "b.jsonl")], probs, atol=1e-5)

    # The same model from the base + the run's PEFT export (adapters + the trained head as modules_to_save).
    assert (
        predict.main(
            [
                "--base",
                str(tiny_bert),
                "--adapter",
                str(cls_run / "peft"),
                "--file",
                str(csv_file),
                "--column",
                "sentence",
                "--out",
                str(tmp_path / "c.jsonl"),
            ]
        )
        == 0
    )
    np.testing.assert_allclose([r["probabilities"] for r in _records(tmp_path / "c.jsonl")], probs, atol=1e-5)

    # ... and it is the trained model, not the base: the untrained head gives other probabilities.
    cfg = load_config(cls_run / "config.yaml")
    model, params, tokenizer, _ = loop.load_model(cfg)
    base = predict.Predictor(model, params, tokenizer, cfg, "base")
    untrained = np.array([r["probabilities"] for r in predict.classify(base, sentences)])
    assert np.abs(untrained - probs).max() > 1e-3


# ------------------------------------------------------------------------------------------------ errors


@pytest.fixture(scope="module")
def wide_bert(tmp_path_factory, minilm_path):
    return _save_bert(tmp_path_factory.mktemp("wide_bert"), minilm_path, hidden=48)


def test_predict_errors(cls_run, tiny_bert, wide_bert, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    csv_file = tmp_path / "in.csv"
    csv_file.write_text("text\nhello\n")
    cases = [
        (["--run", str(tmp_path / "nope"), "--text", "x"], "--run '" + str(tmp_path / "nope") + "' does not exist"),
        (["--run", str(empty), "--text", "x"], "holds no run: no config.yaml and no latest"),
        (["--run", str(cls_run), "--file", str(tmp_path / "missing.csv")], "does not exist"),
        (["--run", str(cls_run), "--file", str(csv_file), "--column", "sentence"], "no 'sentence' (--column)"),
        (["--run", str(cls_run), "--file", str(csv_file)], "no 'sentence'; name the text with --column"),
        (["--base", str(tiny_bert), "--adapter", str(empty), "--text", "x"], "holds neither a lora_jax adapter"),
        # an adapter trained on another base: the leaf and both shapes
        (
            ["--base", str(wide_bert), "--adapter", str(cls_run / "adapters"), "--text", "x"],
            "adapter for bert/encoder/layer_0/attention/self/query/kernel expects a kernel of shape (32, 32), the "
            "params have (48, 48)",
        ),
        (
            ["--base", str(wide_bert), "--adapter", str(cls_run / "peft"), "--text", "x"],
            "tensor 'base_model.model.classifier.weight' has shape (2, 32), but classifier/kernel has shape (48, 2)",
        ),
    ]
    for argv, message in cases:
        assert predict.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)


def test_predict_cli_exit_code_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "train.predict", "--run", str(tmp_path / "missing"), "--text", "x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "LORA_JAX_TRACEBACK"},
    )
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "train.predict", "--text", "x"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2 and "give either --run DIR or --base NAME --adapter DIR" in proc.stderr
