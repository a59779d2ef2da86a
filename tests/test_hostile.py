"""Hostile input, by class: every input either works or says why (one line, exit 2), and nothing is lost.

- the output folder: nothing is written before every input is checked; a run that fails before its first
  checkpoint leaves the job folder as it was (a replaced run comes back); a second run goes beside the first;
- non-finite updates: an update that makes the parameters NaN / inf is not kept, the message names the last
  finite step;
- values that make no sense or would have no effect are refused (config), duplicate YAML keys and alias bombs too;
- untrusted files: adapter_config.json / lora_adapters.json numbers and patterns (RE2: linear time), data labels
  (named by file row), the tokenised cache keyed on content;
- the command lines: one line and exit 2, a short all-checkpoints-damaged error, metrics not repeated on resume;
- lora.merge / unmerge: the merge state survives copies and jit, wrong argument types are errors;
- a hypothesis fuzz of ``train.run --check`` overrides over every config key.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import subprocess
import sys
import time
import typing
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

import lora_jax as lora
from lora_jax.errors import CheckpointError, ConfigError, DataError, MergeStateError, NonFiniteError, PeftError
from train import config as config_lib
from train import data as data_lib
from train import loop, outputs
from train.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"print_fn": lambda *a, **k: None}


def random_bert(task=None, **sizes):
    """``(config, params)`` of a small random BERT. The params are drawn with numpy in the shapes
    ``bert.init_params`` gives (``jax.eval_shape``: 1 s, where running the Flax init takes 30 s on a busy CPU)."""
    from lora_jax.models import bert

    config = bert.Config(
        **{
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "max_position_embeddings": 128,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            **sizes,
        }
    )
    shapes = jax.eval_shape(lambda k: bert.init_params(config, k, task=task), jax.random.key(0))
    rng = np.random.default_rng(0)

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return np.ones(s.shape, s.dtype)
        if "bias" in name:
            return np.zeros(s.shape, s.dtype)
        return (0.05 * rng.standard_normal(s.shape)).astype(s.dtype)

    return config, jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, minilm_path):
    """A 2-layer, 32-wide random BERT classifier with MiniLM's tokenizer, in Hugging Face layout."""
    from transformers import AutoTokenizer

    from lora_jax.models import save_pretrained

    config, params = random_bert(task="sequence-classification")
    folder = tmp_path_factory.mktemp("tiny_bert")
    save_pretrained(params, config, folder, tokenizer=AutoTokenizer.from_pretrained(str(minilm_path)))
    return folder


def overrides(model_dir, out, **extra) -> list[str]:
    base = {
        "model.name": str(model_dir),
        "data.source": "builtin:sentiment",
        "data.task": "classification",
        "data.max_length": 16,
        "train.steps": 3,
        "train.batch_size": 8,
        "eval.every": 100,
        "eval.batch_size": 16,
        "checkpoint.every": 100,
        "optim.warmup_steps": 0,
        "output.dir": str(out),
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def snapshot(folder: Path) -> dict:
    """Every path under ``folder`` with its bytes (links: their target)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = ("link", os.readlink(p)) if p.is_symlink() else p.read_bytes() if p.is_file() else "dir"
    return out


def fake_job(job: Path) -> Path:
    """A job folder holding one finished run (as train.run writes it: run-1 + latest), with marker files."""
    run = job / "run-1"
    (run / "checkpoints" / "4").mkdir(parents=True)
    (run / "checkpoints" / "4" / "state").write_bytes(b"weights of a finished run")
    (run / "config.yaml").write_text(config_lib.dump(load_config(None)))
    (run / "result.json").write_text('{"steps": 4}')
    os.symlink("run-1", job / "latest")
    return run


# ------------------------------------------------------------------------------------------- output folder


def test_bad_input_is_refused_before_anything_is_written(tiny_bert, tmp_path):
    """A data path typo with output.overwrite=true: the finished run in the folder is untouched, nothing added."""
    job = tmp_path / "job"
    fake_job(job)
    before = snapshot(job)
    for extra, error in (
        ({"data.source": str(tmp_path / "typo.csv")}, DataError),
        ({"lora.targets": ".*/nothing/kernel"}, ValueError),
        ({"model.name": str(tmp_path / "no_model")}, OSError),
    ):
        cfg = load_config(None, overrides(tiny_bert, job, **{"output.overwrite": "true", **extra}))
        with pytest.raises(error):
            loop.run(cfg, **QUIET)
        assert snapshot(job) == before, extra
    assert not (tmp_path / "new").exists()
    assert loop.run(load_config(None, overrides(tiny_bert, tmp_path / "new")), check=True, **QUIET) is None
    assert not (tmp_path / "new").exists()  # --check writes nothing


def test_output_plans(tmp_path):
    """The same command twice gives run-2 beside run-1; --resume finds latest; a run folder is never written into
    unless replaced; a file, a damaged or different config.yaml, a run without checkpoints are one-line errors."""
    job = tmp_path / "job"
    run1 = fake_job(job)
    cfg = load_config(None, [f"output.dir={job}"])
    assert outputs.plan(cfg, resume=False).folder == job / "run-2"
    assert outputs.plan(cfg, resume=True).folder.resolve() == run1.resolve()
    replace = outputs.plan(load_config(None, [f"output.dir={job}", "output.overwrite=true"]), resume=False)
    assert replace.folder == job / "run-2" and replace.replaces == run1  # beside it until it checkpoints
    cases = [
        ([f"output.dir={run1}"], False, "is itself a run folder"),
        ([f"output.dir={job}", "lora.r=4"], True, "different config (lora.r: saved 8, now 4)"),
        ([f"output.dir={tmp_path / 'empty'}"], True, "does not exist; there is nothing to resume"),
        ([f"output.dir={run1 / 'result.json'}"], False, "is a file, expected a folder"),
        ([f"output.dir={run1 / 'result.json' / 'x'}"], False, "is a file, so the folder cannot be created"),
    ]
    for ov, resume, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            outputs.plan(load_config(None, ov), resume=resume)
    (run1 / "config.yaml").write_text("lora: {r: [unclosed\n")
    with pytest.raises(ConfigError, match="config.yaml is damaged or from another version"):
        outputs.plan(cfg, resume=True)
    (run1 / "config.yaml").write_text(config_lib.dump(load_config(None)))
    (run1 / "checkpoints" / "4" / "state").unlink()
    (run1 / "checkpoints" / "4").rmdir()
    with pytest.raises(ConfigError, match="has no checkpoint"):
        outputs.plan(cfg, resume=True)


def test_failed_update_is_not_kept_and_a_replaced_run_comes_back(tiny_bert, tmp_path):
    """optim.lr=1e39 is infinite in float32: the first update makes every adapter NaN / inf while its loss and
    gradient are finite. It is not applied; the error names the last finite step; no checkpoint was written, so
    the run folder is removed and the run it was replacing (output.overwrite) is put back byte for byte."""
    job = tmp_path / "job"
    fake_job(job)
    before = snapshot(job)
    cfg = load_config(
        None,
        overrides(
            tiny_bert,
            job,
            **{"optim.lr": 1e39, "optim.name": "sgd", "optim.schedule": "constant", "output.overwrite": "true"},
        ),
    )
    with pytest.raises(NonFiniteError) as e:
        loop.run(cfg, **QUIET)
    message = str(e.value)
    assert "step 1: loss" in message and "the update made the trained parameters" in message, message
    assert "The last finite step is 0; no checkpoint was written" in message
    assert snapshot(job) == before


# --------------------------------------------------------------------------------------- config values


@pytest.mark.parametrize(
    "extra, message",
    [
        # the sign of the update reversed, or nothing trained, or nothing kept
        (["optim.lora_plus_ratio=-4"], "optim.lora_plus_ratio must be > 0, got -4"),
        (["optim.grad_clip=-1"], "optim.grad_clip must be > 0"),
        (["optim.grad_clip=0"], "optim.grad_clip must be > 0"),
        (["optim.weight_decay=600"], "lr x weight_decay must be < 1"),
        (["optim.weight_decay=-0.1"], "optim.weight_decay must be >= 0"),
        (["optim.b1=1"], "optim.b1 must be in [0, 1)"),
        (["lora.alpha=0"], "lora.alpha must be > 0"),
        (["lora.alpha_pattern={'.*': 0}"], "lora.alpha_pattern['.*'] must be > 0"),
        (["checkpoint.keep=0"], "checkpoint.keep must be in [1, 10000]"),
        (["data.task=classification", "model.num_labels=1"], "model.num_labels must be >= 2"),
        (["data.max_train_examples=0"], "data.max_train_examples must be >= 1"),
        (["train.time_budget_s=0"], "train.time_budget_s must be > 0"),
        (["optim.lr=.inf"], "optim.lr must be a finite number"),
        (["lora.targets=[]"], "lora.targets must not be empty"),
        (["train.seed=-1"], "train.seed must be >= 0"),
        # accepted before, with no effect
        (["quant.type=int8"], "quant.type='int8' has no effect here: it applies only with train.method=qlora"),
        (["train.method=full", "lora.r=16"], "lora.r=16 has no effect here"),
        (["optim.name=sgd", "optim.b2=0.9"], "optim.b2=0.9 has no effect here: it applies only with optim.name=adam"),
        (["data.task=classification", "eval.num_beams=4"], "eval.num_beams=4 has no effect here"),
        (["data.eval_split=test"], "data.eval_split='test' has no effect here"),
        (["data.prompt_column=mr", "data.prompt_template='{mr}'"], "data.prompt_column='mr' has no effect"),
        (["train.method=linear_probe", "output.export_peft=true"], "output.export_peft=True has no effect here"),
        # templates and patterns that would fail (or hang) later
        (["data.prompt_template='{}'"], "must be a column name"),
        (["data.prompt_template='{prompt:>999999999}'"], "must be a plain {name}"),
        (["data.prompt_template='no fields'"], "has no {column} field"),
        (["lora.exclude=['(']"], "lora.exclude: '(' is not a valid pattern for linear-time matching"),
    ],
)
def test_values_that_make_no_sense_are_refused(extra, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, extra)
    assert message in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_yaml_duplicate_keys_and_alias_bombs_are_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  r: 4\n  alpha: 8\n  r: 16\n")
    with pytest.raises(ConfigError, match=r"key 'r' is given twice in one mapping \(lines 2 and 4\)"):
        load_config(path)
    path.write_text("lora: {r: 4}\nlora: {alpha: 8}\n")
    with pytest.raises(ConfigError, match="key 'lora' is given twice"):
        load_config(path)
    # a merge key may be overridden by the explicit keys that follow it
    path.write_text("lora:\n  <<: {r: 4, alpha: 8}\n  r: 16\n")
    assert load_config(path).lora.r == 16 and load_config(path).lora.alpha == 8
    # billion laughs: 9 levels of 9 aliases (~4e8 values), refused in linear time without being built
    lines = (
        ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
        + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
        + ["lora: {targets: *a9}"]
    )
    path.write_text("\n".join(lines) + "\n")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="aliases expand to more than 100,000 values"):
        load_config(path)
    assert time.perf_counter() - t0 < 5
    items = ["&a0 [x, x, x, x, x, x, x, x]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 8)}]" for i in range(1, 8)]
    with pytest.raises(ConfigError, match="aliases expand to more than"):  # the same in an override
        load_config(None, ["lora.targets=[" + ", ".join(items) + "]"])
    path.write_text("lora: &x {train: *x}\n")
    with pytest.raises(ConfigError, match="refers to the node that contains it"):
        load_config(path)


def test_readme_key_table_is_the_generated_one():
    text = (ROOT / "docs" / "reference" / "config.md").read_text()  # the docs' config reference
    table = text.split("<!-- keys:begin -->\n", 1)[1].split("\n<!-- keys:end -->", 1)[0]
    assert table == config_lib.key_table()
    documented = {row.split("`")[1] for row in table.splitlines()[2:]}
    assert documented == {
        f"{s}.{k}" for s, cls in typing.get_type_hints(Config).items() for k in cls.__pydantic_fields__
    }


# ------------------------------------------------------------------------------------------ untrusted files


def _peft_folder(tmp_path):
    config, params = random_bert(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        vocab_size=64,
        max_position_embeddings=32,
    )
    adapters = lora.init(params, r=2, targets="qv")
    folder = lora.save_peft(adapters, tmp_path / "peft", config=config)
    return folder, params, config


def test_untrusted_adapter_config_numbers_and_patterns(tmp_path):
    folder, params, config = _peft_folder(tmp_path)
    good = json.loads((folder / "adapter_config.json").read_text())
    cases = [
        ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number > 0, got nan"),
        ({"lora_alpha": float("inf")}, "lora_alpha must be a finite number > 0, got inf"),
        ({"r": 2.5}, "r must be an integer > 0, got 2.5"),
        ({"r": True}, "r must be an integer > 0, got True"),
        ({"lora_dropout": 1.5}, "lora_dropout must be a finite number >= 0 and < 1"),
        ({"alpha_pattern": {".*query": float("inf")}}, "alpha_pattern['.*query'] must be a finite number > 0"),
        ({"rank_pattern": {"(": 2}}, "rank_pattern key '(' is not a valid pattern for linear-time matching"),
        ({"rank_pattern": {r"(a)\1": 2}}, "backreferences and lookaround are not supported"),
        ({"rank_pattern": [1, 2]}, "rank_pattern must be a mapping"),
        ({"use_rslora": "yes"}, "use_rslora must be true or false"),
    ]
    for change, message in cases:
        (folder / "adapter_config.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(PeftError) as e:
            lora.load_peft(folder, params, config=config)
        assert message in str(e.value) and "\n" not in str(e.value), (change, str(e.value))
    # A pattern that backtracks exponentially in Python's re runs in linear time (RE2) and matches nothing here.
    (folder / "adapter_config.json").write_text(json.dumps({**good, "rank_pattern": {"(.*.*.*.*)*zz": 7}}))
    t0 = time.perf_counter()
    loaded = lora.load_peft(folder, params, config=config)
    assert time.perf_counter() - t0 < 10
    assert {ad.r for _, ad in lora.adapter_items(loaded.adapters)} == {2}


def test_untrusted_lora_adapters_json(tmp_path):
    params = {"attention": {"kernel": jnp.ones((4, 4))}}
    folder = lora.checkpoint.save_adapters(tmp_path / "ad", lora.init(params, r=2))
    meta_path = folder / "lora_adapters.json"
    good = json.loads(meta_path.read_text())
    entry = good["attention/kernel"]
    for change, message in [
        ({"scale": float("nan")}, "scale must be a finite number"),
        ({"r": 0}, "r must be an integer >= 1"),
        ({"in_shape": [-4]}, "in_shape must be a non-empty list of positive integers"),
        ({"dtype": "object"}, "dtype must be one of"),
    ]:
        meta_path.write_text(json.dumps({"attention/kernel": {**entry, **change}}))
        with pytest.raises(CheckpointError, match=message):
            lora.checkpoint.load_adapters(folder)
    meta_path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="is corrupt"):
        lora.checkpoint.load_adapters(folder)


def test_trained_params_round_trip_and_a_missing_or_mismatched_folder_is_a_checkpoint_error(tmp_path):
    head = {"classifier": {"kernel": jnp.arange(6.0).reshape(3, 2), "bias": jnp.ones(2)}}
    folder = lora.save_trained(tmp_path / "params", head)
    back = lora.load_trained(folder, head)
    for x, y in zip(jax.tree.leaves(head), jax.tree.leaves(back)):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(CheckpointError, match="holds no trained parameters"):
        lora.load_trained(tmp_path / "nowhere", head)
    with pytest.raises(CheckpointError, match="could not restore trained parameters from"):
        lora.load_trained(folder, {"classifier": {"kernel": jnp.zeros((5, 2)), "bias": jnp.ones(2)}})


@pytest.mark.parametrize(
    "value, message",
    [
        (1.5, "label 1.5 is not an integer class id"),
        ("pos", "label 'pos' is not an integer class id"),
        (True, "label True is not an integer class id"),
        (None, "label None is not an integer class id"),
        (2**40, "label 1099511627776 is outside [0, 2)"),
        (-1, "label -1 is outside [0, 2)"),
        (float("nan"), "label nan is not an integer class id"),
    ],
)
def test_labels_that_are_not_class_ids_are_refused(value, message):
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        data_lib.class_id(value, 2, "f.csv row 3: label")
    assert data_lib.class_id(1.0, 2, "x") == 1 and data_lib.class_id(" 1", 2, "x") == 1


def test_data_errors_name_the_file_row_and_the_cache_follows_content(tmp_path, minilm_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_path))
    path = tmp_path / "d.csv"
    rows = [f"sentence {i},{i % 2}" for i in range(40)]
    rows[16] = "sentence 16,1.5"  # the 17th data row: after the split's shuffle it is somewhere else
    path.write_text("sentence,label\n" + "\n".join(rows) + "\n")
    cfg = load_config(None, ["data.task=classification", f"data.source={path}", "data.max_length=16"]).data
    with pytest.raises(DataError, match=rf"{path} row 17: label: label 1.5 is not an integer class id"):
        data_lib.load_tokenized(cfg, tok, "minilm", 128, 2)

    rows[16] = "sentence 16,1"
    path.write_text("sentence,label\n" + "\n".join(rows) + "\n")
    cache = tmp_path / "cache"
    train, evals = data_lib.load_tokenized(cfg, tok, "minilm", 128, 2, cache_dir=cache)
    stat = path.stat()
    flipped = [r.rsplit(",", 1)[0] + f",{1 - int(r.rsplit(',', 1)[1])}" for r in rows]  # same size, other labels
    path.write_text("sentence,label\n" + "\n".join(flipped) + "\n")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    train2, evals2 = data_lib.load_tokenized(cfg, tok, "minilm", 128, 2, cache_dir=cache)
    np.testing.assert_array_equal(train2.labels, 1 - train.labels)  # not the stale cache entry
    assert len(list(cache.glob("*.npz"))) == 2


# ------------------------------------------------------------------------------------------- command lines


def test_all_checkpoints_damaged_error_is_short(tmp_path):
    from lora_jax.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path / "c", every=1, keep=5)
    tree = {"adapters": {"w": jnp.ones(3)}, "params": {}}
    for step in (1, 2):
        ckpt.save(step, tree, {"count": jnp.zeros(())}, {"step": step})
    ckpt.close()
    for f in (tmp_path / "c").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "_CHECKPOINT_METADATA" not in f.name:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning lines besides the error: it names every damaged step
        with pytest.raises(CheckpointError) as e:
            Checkpointer(tmp_path / "c").restore_latest(tree, {"count": jnp.zeros(())})
    message = str(e.value)
    assert message.startswith(f"no checkpoint in {tmp_path / 'c'} could be restored (steps 2, 1 are damaged")
    assert "\n" not in message and len(message) < 800, message


def test_metrics_records_after_the_checkpoint_are_dropped_on_resume(tmp_path):
    from train import metrics

    log = metrics.MetricLog(tmp_path, enabled=True)
    for step in range(1, 7):
        log.write("train", step, loss=1.0 / step)
    log.write("eval", 4, loss=0.3)
    log.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "st')  # a record cut by a kill
    assert metrics.truncate_log(tmp_path, 4) == 5
    assert [(r["kind"], r["step"]) for r in metrics.read_log(tmp_path)] == [
        ("train", 1),
        ("train", 2),
        ("train", 3),
        ("train", 4),
        ("eval", 4),
    ]


def _cli(module: str, *args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LORA_JAX_TRACEBACK"}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env
    )


def test_cli_paths_answer_one_line_and_exit_2(tiny_bert, tmp_path, capsys):
    from train import analyze, experiment, predict
    from train import run as run_cli

    job = tmp_path / "job"
    fake_job(job)
    (job / "run-1" / "config.yaml").write_text("{{{ not yaml")
    bad_peft = tmp_path / "peft"
    bad_peft.mkdir()
    (bad_peft / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8, "lora_alpha": NaN}')
    cases = [
        (run_cli.main, ["--resume", f"output.dir={job}"], "config.yaml is damaged or from another version"),
        (
            run_cli.main,
            [*overrides(tiny_bert, tmp_path / "x"), "model.num_labels=0"],
            "model.num_labels must be >= 2, got 0",
        ),
        (
            run_cli.main,
            overrides(tiny_bert, tmp_path / "x", **{"data.source": job / "run-1" / "result.json"}),
            "has columns",
        ),
        (
            run_cli.main,
            [*overrides(tiny_bert, tmp_path / "x"), "lora.r=8", "lora.r=16"],
            "lora.r is already given on this command line ('lora.r=8'); give each key once",
        ),
        (predict.main, ["--run", str(job), "--text", "x"], "config.yaml is damaged"),
        (
            predict.main,
            ["--base", str(tiny_bert), "--adapter", str(bad_peft), "--text", "x"],
            "lora_alpha must be a finite number > 0, got nan",
        ),
        (predict.main, ["--run", str(job), "--text", "x", "--template", "{x:>99999999999}"], "must be a plain"),
        (
            analyze.main,
            ["--base", str(tiny_bert), "--adapters", str(tmp_path), "--out", str(tmp_path / "r")],
            "holds no run",
        ),
    ]
    for main, argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "r").exists() and not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as e:
        experiment.main(["rank_study", "--scale", "-1", "--out", str(tmp_path / "e")])
    assert e.value.code == 2 and "--scale must be a positive number" in capsys.readouterr().err
    # and the real entry point: one line, no traceback, for a YAML error in an override
    proc = _cli("train.run", "lora.r=!!int abc")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------------------- merge state


def test_merge_state_survives_copies_and_jit_and_arguments_are_checked():
    params = {"attn": {"kernel": jax.random.normal(jax.random.key(0), (8, 8))}, "head": {"kernel": jnp.ones((8, 2))}}
    ad = jax.tree.map(lambda x: x + 0.1, lora.init(params, r=2, targets=".*attn/kernel"))
    merged = lora.merge(params, ad)
    assert isinstance(merged, lora.MergedParams) and lora.merge_record(merged) == (frozenset({"attn/kernel"}),)
    import copy
    import pickle

    for twin in (
        jax.tree.map(jnp.copy, merged),
        copy.deepcopy(merged),
        pickle.loads(pickle.dumps(merged)),
        jax.device_put(merged),
        jax.jit(lambda p: p)(merged),
    ):
        with pytest.raises(MergeStateError, match="already hold a merged adapter"):
            lora.merge(twin, ad)
        with pytest.raises(MergeStateError, match="already hold a merged adapter"):
            jax.jit(lora.merge)(twin, ad)
        with pytest.raises(MergeStateError):
            lora.wrap(twin, ad)
    with pytest.raises(MergeStateError, match="already hold"):  # merged inside jit, merged again outside
        lora.merge(jax.jit(lora.merge)(params, ad), ad)
    # unmerge: back to the base from copies and jit; never-merged params are refused, not silently subtracted
    np.testing.assert_allclose(jax.jit(lora.unmerge)(merged, ad)["attn"]["kernel"], params["attn"]["kernel"], atol=1e-6)
    with pytest.raises(MergeStateError, match="carry no merge record"):
        lora.unmerge(params, ad)
    head_merged = lora.merge(params, lora.init(params, r=2, targets=".*head/kernel"))
    with pytest.raises(MergeStateError, match="record no merge at attn/kernel"):
        lora.unmerge(head_merged, ad)
    np.testing.assert_allclose(
        lora.unmerge(dict(merged), ad, assume_merged=True)["attn"]["kernel"], params["attn"]["kernel"], atol=1e-6
    )
    # a different adapter on top, said explicitly
    other = jax.tree.map(lambda x: x * 2, ad)
    stacked = lora.merge(merged, other, stack=True)
    np.testing.assert_allclose(
        stacked["attn"]["kernel"],
        params["attn"]["kernel"] + ad["attn"]["kernel"].delta() + other["attn"]["kernel"].delta(),
        atol=1e-5,
    )
    for bad in ("adapters", ["x"], params, ad["attn"]["kernel"]):
        with pytest.raises(TypeError, match="adapters"):
            lora.merge(params, bad)
    with pytest.raises(ValueError, match="the adapter tree is empty"):
        lora.merge(params, {})
    with pytest.raises(TypeError, match="params must be a parameter tree"):
        lora.merge("params", ad)


# ---------------------------------------------------------------------------------------------- the fuzz

HINTS = typing.get_type_hints(Config)
KEYS = [f"{s}.{k}" for s, cls in HINTS.items() for k in cls.__pydantic_fields__]

# A valid non-default value of every key, and the overrides it needs to have an effect.
NON_DEFAULT: dict[str, tuple[str, list[str]]] = {
    "model.name": ("all-MiniLM-L6-v2", []),
    "model.router_aux_loss_coef": ("0.01", []),
    "model.attention": ("blockwise", []),
    "model.scan_layers": ("false", []),
    "model.num_labels": ("3", ["data.task=classification"]),
    "lora.r": ("4", []),
    "lora.alpha": ("16", []),
    "lora.targets": ("attention", []),
    "lora.exclude": ("['.*layer_1.*']", []),
    "lora.dropout": ("0.1", []),
    "lora.use_rslora": ("true", []),
    "lora.use_dora": ("true", []),
    "lora.init": ("gaussian", []),
    "lora.pissa_niter": ("2", ["lora.init=pissa"]),
    "lora.rank_pattern": ("{'.*query.*': 2}", []),
    "lora.alpha_pattern": ("{'.*query.*': 4}", []),
    "lora.train": ("['classifier/.*']", []),
    "quant.type": ("int8", ["train.method=qlora"]),
    "quant.block_size": ("128", ["train.method=qlora"]),
    "quant.double_quant": ("false", ["train.method=qlora"]),
    "quant.targets": ("qv", ["train.method=qlora"]),
    "data.source": ("builtin:sentiment", []),
    "data.task": ("classification", []),
    "data.train_split": ("validation", ["data.source=glue"]),
    "data.eval_source": ("x.csv", []),
    "data.eval_split": ("test", ["data.source=glue"]),
    "data.eval_fraction": ("0.25", []),
    "data.prompt_column": ("mr", []),
    "data.completion_column": ("ref", []),
    "data.text_column": ("text", ["data.task=classification"]),
    "data.label_column": ("y", ["data.task=classification"]),
    "data.audio_column": ("wav", ["data.task=audio-classification"]),
    "data.group_column": ("prompt", []),
    "data.max_length": ("32", []),
    "data.batching": ("fixed", []),
    "data.buckets": ("2", ["data.task=classification"]),
    "data.pack_length": ("256", []),
    "data.loss_capacity": ("64", []),
    "data.max_train_examples": ("100", []),
    "data.max_eval_examples": ("10", []),
    "data.prompt_template": ("'Q: {prompt}\\n'", []),
    "data.seed": ("3", []),
    "optim.name": ("sgd", []),
    "optim.lr": ("0.001", []),
    "optim.weight_decay": ("0.01", []),
    "optim.b1": ("0.8", []),
    "optim.b2": ("0.99", []),
    "optim.schedule": ("cosine", []),
    "optim.warmup_steps": ("2", []),
    "optim.grad_clip": ("null", []),
    "optim.lora_plus_ratio": ("8", []),
    "train.method": ("full", []),
    "train.steps": ("5", []),
    "train.batch_size": ("8", []),
    "train.grad_accum": ("2", []),
    "train.precision": ("bfloat16", []),
    "train.remat": ("true", []),
    "train.loss_chunk": ("64", []),
    "train.logits": ("all", []),
    "train.seed": ("7", []),
    "train.nan_policy": ("skip", []),
    "train.time_budget_s": ("60", []),
    "train.prefetch": ("false", []),
    "mesh.data": ("1", []),
    "mesh.fsdp": ("2", []),
    "mesh.expert": ("2", []),
    "mesh.tensor": ("2", []),
    "train.device_memory": ("16GB", []),
    "model.adapter": ("runs/sft", []),
    "train.objective": ("dpo", []),
    "data.messages_column": ("conversation", ["data.task=chat"]),
    "data.chat_template": ("'{{ messages }}'", ["data.task=chat"]),
    "data.chosen_column": ("good", ["train.objective=dpo"]),
    "data.rejected_column": ("bad", ["train.objective=dpo"]),
    "dpo.loss": ("ipo", ["train.objective=dpo"]),
    "dpo.beta": ("0.5", ["train.objective=dpo"]),
    "dpo.simpo_gamma": ("1.0", ["train.objective=dpo", "dpo.loss=simpo"]),
    "dpo.reference": ("cached", ["train.objective=dpo"]),
    "eval.every": ("5", []),
    "eval.every_s": ("30", []),
    "eval.batch_size": ("8", []),
    "eval.generate_samples": ("0", []),
    "eval.generate_eval": ("4", []),
    "eval.max_new_tokens": ("8", []),
    "eval.num_beams": ("2", []),
    "checkpoint.every": ("2", []),
    "checkpoint.keep": ("3", []),
    "output.dir": ("runs/x", []),
    "output.overwrite": ("true", []),
    "output.export_merged": ("true", []),
    "output.export_peft": ("true", []),
    "output.peft_base_model": ("org/base", ["output.export_peft=true"]),
    "output.export_gguf_adapter": ("true", []),
    "output.export_gguf": ("q8_0", []),
}


def test_every_key_has_an_effect_or_is_refused():
    """Each key's non-default value is taken as given where it applies; set where it cannot apply (e.g. every
    lora.* key with train.method=full), it is refused with a message naming it; never kept silently."""
    assert sorted(NON_DEFAULT) == sorted(KEYS)
    default = Config()
    for key, (value, needs) in NON_DEFAULT.items():
        cfg = load_config(None, [*needs, f"{key}={value}"])
        got = config_lib._get(cfg, key)
        assert got != config_lib._get(default, key) and got == yaml.safe_load(value), (key, got)
    refused = 0
    for key, (value, needs) in NON_DEFAULT.items():
        for keys, applies, _ in config_lib.APPLIES:
            if key not in keys:
                continue
            for other in (
                ["train.method=full"],
                ["data.task=classification"],
                ["optim.name=sgd"],
                ["data.eval_source=x.csv"],
                ["eval.generate_samples=0", "eval.generate_eval=0"],
            ):
                try:
                    cfg = load_config(None, [*needs, *other])
                except ConfigError:
                    continue
                if applies(cfg):
                    continue
                with pytest.raises(ConfigError, match=f"{key}=.* has no effect here"):
                    load_config(None, [*needs, *other, f"{key}={value}"])
                refused += 1
    assert refused >= 30


VALUES = st.one_of(
    st.sampled_from(
        [
            "0",
            "1",
            "-1",
            "2",
            "3",
            "8",
            "16",
            "0.5",
            "1e-3",
            "1e39",
            "true",
            "false",
            "null",
            ".nan",
            "'x'",
            "''",
            "[]",
            "{}",
            "[a, b]",
            "{'.*query.*': 2}",
            "qv",
            "all-linear",
            "sgd",
            "cosine",
            "skip",
            "classification",
            "causal-lm",
            "qlora",
            "full",
            "linear_probe",
            "int8",
            "pissa",
            "bfloat16",
            "builtin:sentiment",
            "builtin:restaurants",
            "'{prompt}'",
            "'{'",
            "!!int x",
            "&a [*a]",
            "9999999999999",
            "1_0",
            "0x10",
            "~",
        ]
    ),
    st.integers(-3, 70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)


_load_model = loop.load_model


@functools.lru_cache(maxsize=8)
def _cached_model(name, task, num_labels, precision):
    return _load_model(
        load_config(
            None,
            [
                f"model.name={name}",
                f"data.task={task}",
                f"model.num_labels={num_labels}",
                f"train.precision={precision}",
            ]
            if task == "classification"
            else [f"model.name={name}", f"train.precision={precision}"],
        )
    )


def _typed(tp) -> st.SearchStrategy:
    """YAML text of a value of the annotated type (in range or not)."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _typed(typing.get_args(tp)[0])
    if origin is typing.Literal:
        return st.sampled_from([str(a) for a in typing.get_args(tp)])
    if origin in (typing.Union, __import__("types").UnionType):
        return st.one_of([_typed(a) for a in typing.get_args(tp)])
    if tp is type(None):
        return st.just("null")
    if tp is bool:
        return st.sampled_from(["true", "false"])
    if tp is int:
        return st.integers(-2, 40).map(str)
    if tp is float:
        return st.sampled_from(["0.0", "0.5", "1e-4", "0.999", "2.0", "-1.0", "1e39"])
    if tp is str:
        return st.sampled_from(["'x'", "'qv'", "'.*query.*'", "'{prompt}'", "'sentence'", "'label'"])
    if origin is list:
        return st.lists(_typed(typing.get_args(tp)[0]), max_size=2).map(lambda xs: "[" + ", ".join(xs) + "]")
    if origin is dict:
        return st.dictionaries(
            st.sampled_from(["'.*query.*'", "'.*'", "'('"]), _typed(typing.get_args(tp)[1]), max_size=2
        ).map(lambda d: "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}")
    raise AssertionError(tp)


def _value_for(key: str) -> st.SearchStrategy:
    section, name = key.split(".")
    tp = typing.get_type_hints(HINTS[section], include_extras=True)[name]
    return st.one_of(st.just(NON_DEFAULT[key][0]), _typed(tp), VALUES)


OVERRIDES = st.lists(
    st.sampled_from(KEYS).flatmap(lambda k: st.tuples(st.just(k), _value_for(k))), min_size=1, max_size=3
)
# The classes a refusal of train.run may name: lora_jax's error classes (a non-finite stop is exit 3, not 2).
LIBRARY_ERRORS = {name for name in lora.errors.__all__ if name not in ("LoraJaxError", "NonFiniteError")}
FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@settings(max_examples=12, derandomize=True, **FUZZ)  # the same 12 draws on every CI run
@given(OVERRIDES)
def test_fuzz_run_check_over_every_key(tiny_bert, tmp_path_factory, capsys, monkeypatch, pairs):
    """``python -m train.run --check`` with random overrides of any key (over a tiny valid base config): exit 0
    with every override in effect, or exit 2 with one line that names the input and what was expected, raised as
    the right kind of error (the config's own refusals a ``ConfigError`` from ``load_config``; a later refusal one
    of the library's error classes, named in the line); never a traceback, never another exit status (an
    internal error is exit 70). (``-m slow``: 150 examples.)"""
    _fuzz_check(tiny_bert, tmp_path_factory, capsys, monkeypatch, pairs)


@pytest.mark.slow
@settings(max_examples=150, **FUZZ)
@given(OVERRIDES)
def test_fuzz_run_check_over_every_key_long(tiny_bert, tmp_path_factory, capsys, monkeypatch, pairs):
    _fuzz_check(tiny_bert, tmp_path_factory, capsys, monkeypatch, pairs)


def _same_value(got, want) -> bool:
    """An override's value as the config holds it: a float field takes an int, and a number YAML reads as a
    string ("1e-4": YAML 1.1 wants a dot); NaN equals NaN."""
    if got == want:
        return True
    if isinstance(got, float) and isinstance(want, (int, float, str)):
        try:
            w = float(want)
        except ValueError:
            return False
        return got == w or (math.isnan(got) and math.isnan(w))
    return False


def _fuzz_check(tiny_bert, tmp_path_factory, capsys, monkeypatch, pairs):
    from train import run as run_cli

    monkeypatch.setattr(
        loop,
        "load_model",
        lambda cfg: _cached_model(cfg.model.name, cfg.data.task, cfg.model.num_labels, cfg.train.precision),
    )
    out = tmp_path_factory.mktemp("fuzz")
    given_ = [f"{k}={v}" for k, v in pairs]
    base = [
        b
        for b in overrides(tiny_bert, out / "job", **{"eval.batch_size": 8})  # (a key given twice is refused)
        if b.split("=", 1)[0] not in {k for k, _ in pairs}
    ]
    note(f"overrides: {given_}")
    status = run_cli.main(["--check", *base, *given_])
    err = capsys.readouterr().err
    assert status in (0, 2), (status, err)
    assert "Traceback" not in err
    if status == 2:
        assert err.count("\n") == 1 and len(err) < 800, err
        if err.startswith("config error: "):  # refused while loading the config: load_config raises ConfigError
            with pytest.raises(ConfigError):
                load_config(None, [*base, *given_])
            event("refused: config")
            return
        kind = re.match(r"error: (\w+): ", err)
        assert kind and kind[1] in LIBRARY_ERRORS, f"refused as {kind and kind[1]}, not a library error: {err}"
        load_config(None, [*base, *given_])  # the config itself was valid
        event(f"refused later: {kind[1]}")
        return
    event("checked: valid")
    cfg = load_config(None, [*base, *given_])
    for text in given_:  # every accepted override is in effect (a key given twice was refused)
        k, v = text.split("=", 1)
        want = config_lib.parse_override(text)[1]
        got = config_lib._get(cfg, k)
        assert _same_value(got, want), (k, got, want)
    assert not any(out.rglob("config.yaml"))  # --check writes nothing


# ------------------------------------------------------------------------------------ issue 30, smaller items


def test_an_overwrite_killed_before_its_first_checkpoint_hides_nothing(tmp_path):
    """output.overwrite writes the new run beside the one latest points to; latest moves and the old run goes
    only at the new run's first checkpoint. Killed before then (no abort ran), the old run is where it was and
    latest still points to it. A run folder replaced in place (output.dir = the run) is put back by the next
    plan when the process that moved it aside is gone."""
    job = tmp_path / "job"
    run1 = fake_job(job)
    before = snapshot(job)
    cfg = load_config(None, [f"output.dir={job}", "output.overwrite=true"])
    rf = outputs.plan(cfg, resume=False).create(cfg)  # ... and the process is killed here
    assert rf.folder == job / "run-2" and os.readlink(job / "latest") == "run-1"
    assert {k: v for k, v in snapshot(job).items() if not k.startswith("run-2")} == before
    assert outputs.resolve_run(job) == run1
    rf.commit()  # the new run's first checkpoint: now it replaces the old one
    assert os.readlink(job / "latest") == "run-2" and not run1.exists()

    job2 = tmp_path / "job2"
    run = fake_job(job2)
    before = snapshot(job2)
    cfg = load_config(None, [f"output.dir={run}", "output.overwrite=true"])
    rf = outputs.plan(cfg, resume=False).create(cfg)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    aside = rf.aside.rename(rf.aside.with_name(rf.aside.name.rsplit("-", 1)[0] + f"-{dead.pid}"))  # killed
    assert aside.exists() and not (run / "result.json").exists()
    outputs.plan(cfg, resume=False)  # the next command puts the old run back
    assert snapshot(job2) == before

    # as an older version left it: run-1 moved aside, latest pointing at a run-1 without a checkpoint
    job3 = tmp_path / "job3"
    old = fake_job(job3)
    before = snapshot(job3)
    old.rename(job3 / f".run-1.replaced-123-{dead.pid}")
    (job3 / "run-1").mkdir()
    (job3 / "run-1" / "config.yaml").write_text(config_lib.dump(load_config(None)))
    outputs.plan(load_config(None, [f"output.dir={job3}"]), resume=False)
    assert snapshot(job3) == before


def test_resume_of_a_finished_run_logs_its_final_evaluation_once(tiny_bert, tmp_path):
    from train.metrics import read_log

    job = tmp_path / "job"
    cfg = load_config(None, overrides(tiny_bert, job, **{"train.steps": 2, "checkpoint.every": 2}))
    loop.run(cfg, **QUIET)
    loop.run(cfg, resume=True, **QUIET)
    finals = [r for r in read_log(job / "latest") if r["kind"] == "eval" and r["step"] == 2]
    assert len(finals) == 1, finals
