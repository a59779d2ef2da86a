"""The training job: config validation, data, the loop, checkpoints and exact resume, sharding."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import lora_jax as lora
from conftest import shared_data
from train import data as data_lib
from train import loop
from train.config import ConfigError, load_config
from train.loop import NonFiniteError, run
from train.metrics import read_log

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, minilm_path):
    """A 2-layer, 32-wide random BERT with MiniLM's tokenizer, saved in Hugging Face layout."""
    from transformers import AutoTokenizer

    from lora_jax.models import bert, save_pretrained

    config = bert.Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    params = bert.init_params(config, jax.random.key(0), task="sequence-classification")
    folder = tmp_path_factory.mktemp("tiny_bert")
    save_pretrained(params, config, folder, tokenizer=AutoTokenizer.from_pretrained(str(minilm_path)))
    return folder


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, minilm_path):
    """A 2-layer, 32-wide random Llama with MiniLM's tokenizer (its vocabulary), saved in Hugging Face layout."""
    from transformers import AutoTokenizer

    from lora_jax.models import llama, save_pretrained

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path))
    config = llama.Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
    )
    params = llama.init_params(config, jax.random.key(0))
    folder = tmp_path_factory.mktemp("tiny_llama")
    save_pretrained(params, config, folder, tokenizer=tokenizer)
    return folder


def lm_overrides(model_dir, out, **extra):
    """The built-in restaurants task (causal LM) on :func:`tiny_llama`, no generation."""
    base = {
        "model.name": str(model_dir),
        "data.max_length": 96,
        "train.steps": 6,
        "train.batch_size": 4,
        "eval.every": 100,
        "eval.batch_size": 16,
        "eval.generate_samples": 0,
        "eval.generate_eval": 0,
        "data.max_eval_examples": 8,
        "checkpoint.every": 3,
        "checkpoint.keep": 10,
        "optim.lr": 5e-3,
        "optim.warmup_steps": 1,
        "output.dir": str(out),
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def overrides(model_dir, out, **extra):
    base = {
        "model.name": str(model_dir),
        "data.source": "builtin:sentiment",
        "data.task": "classification",
        "data.max_length": 16,
        "train.steps": 12,
        "train.batch_size": 8,
        "eval.every": 6,
        "eval.batch_size": 16,
        "checkpoint.every": 4,
        "checkpoint.keep": 10,
        "lora.targets": "qv",
        "optim.lr": 5e-3,
        "optim.warmup_steps": 2,
        "output.dir": str(out),
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


# ---------------------------------------------------------------------------------------------- config


def test_config_defaults_and_overrides():
    cfg = load_config(None, ["lora.r=16", "optim.lr=3e-4", "lora.targets=[q_proj, v_proj]", "train.remat=true"])
    assert cfg.lora.r == 16 and cfg.optim.lr == 3e-4 and cfg.lora.targets == ["q_proj", "v_proj"]
    assert cfg.train.remat is True and cfg.data.source == "builtin:restaurants"


def test_default_batching_packs_causal_lm_and_buckets_classification():
    from train.config import batching

    assert load_config(None, []).data.batching == "auto"
    assert batching(load_config(None, [])) == "packed"
    assert batching(load_config(None, ["data.task=classification"])) == "bucketed"
    assert batching(load_config(None, ["data.task=audio-classification"])) == "fixed"
    assert batching(load_config(None, ["data.task=classification", "data.batching=fixed"])) == "fixed"
    assert batching(load_config(None, ["data.batching=bucketed", "data.buckets=2"])) == "bucketed"


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["data.batching=padded"],
            r"^data.batching: expected one of \['auto', 'fixed', 'bucketed', 'packed'\], got "
            r"'padded' \(str\)$",
        ),
        (["data.task=classification", "data.batching=packed"], r"^data.batching=packed needs data.task=causal-lm"),
        (["data.task=audio-classification", "data.batching=bucketed"], r"^data.batching=bucketed with data.task=audio"),
        (["data.buckets=2"], r"^data.buckets=2 has no effect here: it applies only with data.batching=bucketed"),
        (
            ["data.batching=fixed", "data.pack_length=128"],
            r"^data.pack_length=128 has no effect here: it applies only "
            r"with data.batching=packed",
        ),
        (["data.task=classification", "data.buckets=0"], r"^data.buckets must be in \[1, 64\], got 0$"),
    ],
)
def test_bad_batching_is_refused_in_one_line(extra, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(None, extra)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("lora.rank=4", "unknown config key 'lora.rank'; did you mean 'lora.r'"),
        ("optimizer.lr=1", "unknown config key 'optimizer'; did you mean 'optim'"),
        ("optim.lr=fast", "optim.lr: expected a number, got 'fast'"),
        ("train.steps=2.5", "train.steps: expected an integer"),
        ("train.method=qlora2", "train.method: expected one of"),
        ("lora.r=0", "lora.r must be >= 1"),
        ("lora", "must look like section.key=value"),
        ("lora.dropout=1.5", "lora.dropout must be in"),
    ],
)
def test_config_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, [override])


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  r: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_shipped_configs_are_valid():
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)


def test_cli_reports_config_error():
    out = subprocess.run([sys.executable, "-m", "train.run", "lora.rr=3"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "did you mean 'lora.r'" in out.stderr


# ------------------------------------------------------------------------------------------------ data


def test_builtin_restaurants_split_by_group():
    cfg = load_config(None).data  # the default config as it is: no group_column set
    rows = data_lib.load_rows(cfg, "train")
    assert len({r["group"] for r in rows}) < 0.7 * len(rows)  # MRs repeat: a row split would leak
    train, evals = data_lib.split_rows(rows, cfg)
    assert not {r["group"] for r in train} & {r["group"] for r in evals}
    assert len(evals) > 0.05 * len(rows)


def test_causal_lm_loss_mask_covers_completion_only(minilm_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_path))
    cfg = load_config(None, ["data.max_length=32"]).data
    rows = [{"prompt": "name[The Mill]", "completion": "The Mill is a pub."}]
    t = data_lib.tokenize(rows, tok, cfg)
    p = tok("name[The Mill]\n", add_special_tokens=False)["input_ids"]
    c = tok("The Mill is a pub.", add_special_tokens=False)["input_ids"]
    n = len(p) + len(c) + (tok.eos_token_id is not None)
    assert t.attention_mask[0].sum() == n
    # position t is marked when token t+1 is a completion token
    np.testing.assert_array_equal(np.nonzero(t.loss_mask[0])[0], np.arange(len(p) - 1, n - 1))
    assert t.references == [["The Mill is a pub."]]


def test_batch_indices_are_epochs_of_a_permutation():
    n = 10
    first_epoch = np.concatenate([data_lib.batch_indices(n, 5, s, seed=3) for s in range(2)])
    assert sorted(first_epoch.tolist()) == list(range(n))
    np.testing.assert_array_equal(data_lib.batch_indices(n, 5, 7, 3), data_lib.batch_indices(n, 5, 7, 3))
    assert not np.array_equal(data_lib.batch_indices(n, 5, 0, 3), data_lib.batch_indices(n, 5, 2, 3))


def test_data_file_errors(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    cfg = load_config(None, [f"data.source={empty}", "data.task=classification"]).data
    with pytest.raises(data_lib.DataError, match="is empty"):
        data_lib.load_rows(cfg, "train")
    wrong = tmp_path / "wrong.tsv"
    wrong.write_text("text\tlabel\nhello\t1\n")
    cfg = load_config(None, [f"data.source={wrong}", "data.task=classification"]).data
    with pytest.raises(data_lib.DataError, match=r"expected \['sentence'\]"):
        data_lib.load_rows(cfg, "train")
    cfg = load_config(None, [f"data.source={tmp_path / 'nope.jsonl'}"]).data
    with pytest.raises(data_lib.DataError, match="does not exist"):
        data_lib.load_rows(cfg, "train")


def test_sst2_tsv_loads():
    sst2 = shared_data("sst2", "dev.tsv")
    cfg = load_config(None, [f"data.source={sst2}", "data.task=classification"]).data
    rows = data_lib.load_rows(cfg, "train")
    assert len(rows) == 872 and set(r["label"] for r in rows) == {0, 1}


# ------------------------------------------------------------------------------------------------- run


@pytest.fixture(scope="module")
def full_run(tiny_bert, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "full"
    result = run(load_config(None, overrides(tiny_bert, out)), print_fn=lambda *a: None)
    assert result.folder == out / "run-1" and (out / "latest").resolve() == result.folder.resolve()
    return result.folder, result


def test_run_trains_and_writes_everything(full_run):
    out, result = full_run
    assert result.steps_done == 12
    assert result.eval_after["loss"] < result.eval_before["loss"]
    for name in ("config.yaml", "metrics.jsonl", "result.json", "adapters/lora_adapters.json"):
        assert (out / name).exists(), name
    assert any(p.name.startswith("events") for p in (out / "tensorboard").iterdir())
    log = read_log(out)
    assert [r["step"] for r in log if r["kind"] == "train"] == list(range(1, 13))
    assert {"accuracy", "auc", "f1", "loss"} <= set(next(r for r in log if r["kind"] == "eval"))
    adapters = lora.checkpoint.load_adapters(out / "adapters")
    assert {p for p, _ in lora.adapter_items(adapters)} == {
        f"bert/encoder/layer_{i}/attention/self/{m}/kernel" for i in range(2) for m in ("query", "value")
    }


def test_eval_every_s_evaluates_by_training_time(tiny_bert, tmp_path):
    """``eval.every_s``: an evaluation whenever that much training time has passed since the last one, beside
    ``eval.every``'s steps (a time-budgeted run gets its curve's points whatever its step rate)."""

    def eval_steps(every_s: str) -> list[int]:
        extra = {"train.steps": 5, "eval.every": 1000, "eval.every_s": every_s, "checkpoint.every": 1000}
        folder = run(load_config(None, overrides(tiny_bert, tmp_path / every_s, **extra)), print_fn=lambda *a: None)
        return [r["step"] for r in read_log(folder.folder) if r["kind"] == "eval"]

    inner = lambda steps: [s for s in steps if 0 < s < 5]  # noqa: E731 (before and after training are always there)
    assert inner(eval_steps("1e-9")) == [1, 2, 3, 4]  # every step takes longer than a nanosecond
    assert inner(eval_steps("1e6")) == []


def test_run_logs_the_learning_rate_and_draws_its_loss(full_run):
    """Each training record carries the learning rate its update used, and the run leaves loss.png behind."""
    out, result = full_run
    cfg = load_config(None, overrides("unused", "unused"))
    train = [r for r in read_log(out) if r["kind"] == "train"]
    assert [r["lr"] for r in train] == [pytest.approx(loop.lr_at(cfg, r["step"])) for r in train]
    assert train[0]["lr"] == 0.0 and max(r["lr"] for r in train) == pytest.approx(cfg.optim.lr)
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


def _train_batches(cfg, model_dir):
    """The run's training batches (:func:`train.loop.training_batches`) rebuilt from its config."""
    from transformers import AutoTokenizer

    from train.loop import training_batches

    train_data, _ = data_lib.load_tokenized(
        cfg.data,
        AutoTokenizer.from_pretrained(str(model_dir)),
        cfg.model.name,
        None,
        cfg.model.num_labels if cfg.data.task != "causal-lm" else None,
    )
    return train_data, training_batches(cfg, train_data)


def test_classification_run_is_bucketed_and_records_its_step_shapes(full_run, tiny_bert):
    """The default batching of classification is length-bucketed: result.json records the widths, the step shapes
    compiled (those of the batches the steps took) and the share of real tokens, above the fixed batches'."""
    out, result = full_run
    cfg = load_config(None, overrides(tiny_bert, out.parent))
    saved = json.loads((out / "result.json").read_text())
    train_data, batches = _train_batches(cfg, tiny_bert)
    assert type(batches) is data_lib.BucketedBatches and saved["batching"] == "bucketed"
    assert saved["batch_widths"] == list(batches.widths) == [8, 16]
    shapes = sorted({(1, *batches(s)["input_ids"].shape) for s in range(12)})
    assert saved["step_shapes"] == [list(x) for x in shapes] and saved["step_compilations"] == 2
    masks = [batches(s)["attention_mask"] for s in range(12)]
    assert saved["real_token_share"] == pytest.approx(sum(m.sum() for m in masks) / sum(m.size for m in masks))
    assert saved["real_token_share"] > train_data.attention_mask.mean() + 0.05  # less padding than fixed batches
    assert saved["examples_seen"] == 12 * 8


def _resume_after(out: Path, copy: Path, step: int, cfg_overrides: list[str]):
    """Copy the run folder ``out``, drop its checkpoints after ``step`` and its exports, ``--resume`` it."""
    shutil.copytree(out, copy)
    for step_dir in (copy / "checkpoints").iterdir():  # as if the run had died after ``step``
        if step_dir.name.isdigit() and int(step_dir.name) > step:
            shutil.rmtree(step_dir)
    shutil.rmtree(copy / "adapters")
    return run(load_config(None, cfg_overrides), resume=True, print_fn=lambda *a: None)


def _same_adapters(a_dir: Path, b_dir: Path) -> None:
    a, b = lora.checkpoint.load_adapters(a_dir), lora.checkpoint.load_adapters(b_dir)
    assert [p for p, _ in lora.adapter_items(a)] == [p for p, _ in lora.adapter_items(b)]
    for (_, x), (_, y) in zip(lora.adapter_items(a), lora.adapter_items(b)):
        np.testing.assert_allclose(x.a, y.a, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(x.b, y.b, rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def packed_run(tiny_llama, tmp_path_factory):
    """The default causal-LM batching (packed rows), 2 micro-batches of 4 rows per step."""
    out = tmp_path_factory.mktemp("runs") / "packed"
    cfg = load_config(None, lm_overrides(tiny_llama, out, **{"train.grad_accum": 2}))
    return cfg, run(cfg, print_fn=lambda *a: None)


def test_packed_run_trains_on_full_rows_and_records_its_shape(packed_run, tiny_llama):
    """Causal LM packs examples by default: one step shape (2 x 4 rows x 96 tokens, compiled once), about two
    examples per row, nearly no padding; tokens per second count real tokens only."""
    from train.loop import training_batches

    cfg, result = packed_run
    saved = json.loads((result.folder / "result.json").read_text())
    train_data, batches = _train_batches(cfg, tiny_llama)
    assert type(batches) is data_lib.PackedBatches and saved["batching"] == "packed"
    assert saved["step_shapes"] == [[2, 4, 96]] and saved["step_compilations"] == 1
    assert saved["examples_seen"] == sum(batches.examples(s) for s in range(6)) > 6 * 8 * 1.5
    masks = [batches(s)["attention_mask"] for s in range(6)]
    assert saved["real_token_share"] == pytest.approx(sum(m.sum() for m in masks) / sum(m.size for m in masks))
    assert saved["real_token_share"] > max(0.9, 1.8 * train_data.attention_mask.mean())  # fixed: about 0.49
    assert result.eval_after["loss"] < result.eval_before["loss"]
    # data.pack_length: rows twice as wide hold about twice the examples
    wide = training_batches(
        load_config(None, lm_overrides(tiny_llama, "x", **{"train.grad_accum": 2, "data.pack_length": 192})), train_data
    )
    assert wide.widths == (192,) and wide(0)["input_ids"].shape == (8, 192)
    assert sum(wide.examples(s) for s in range(6)) > 1.8 * saved["examples_seen"]
    log = [r for r in read_log(result.folder) if r["kind"] == "train"]
    assert log[-1]["tokens_per_s"] > 0 and [r["step"] for r in log] == list(range(1, 7))


def test_packed_run_resumes_exactly_and_accumulation_equals_one_batch(packed_run, tiny_llama, tmp_path):
    """Resumed at the step-3 checkpoint, the packed run trains the same batches: equal losses and adapters. And
    2 micro-batches of 4 rows give the losses of one batch of 8 rows (the same packed rows, one width)."""
    cfg, result = packed_run
    again = _resume_after(
        result.folder,
        tmp_path / "resumed",
        3,
        lm_overrides(tiny_llama, tmp_path / "resumed", **{"train.grad_accum": 2}),
    )
    assert [h["step"] for h in again.history] == [4, 5, 6]
    np.testing.assert_allclose([h["loss"] for h in again.history], [h["loss"] for h in result.history[3:]], rtol=1e-6)
    _same_adapters(result.folder / "adapters", tmp_path / "resumed" / "adapters")
    one = run(
        load_config(None, lm_overrides(tiny_llama, tmp_path / "one", **{"train.batch_size": 8})),
        print_fn=lambda *a: None,
    )
    assert json.loads((one.folder / "result.json").read_text())["step_shapes"] == [[1, 8, 96]]
    np.testing.assert_allclose([h["loss"] for h in one.history], [h["loss"] for h in result.history], rtol=2e-5)


def test_resume_continues_exactly(full_run, tiny_bert, tmp_path):
    out, result = full_run
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    for step_dir in (resumed / "checkpoints").iterdir():  # as if the run had died after step 4
        if step_dir.name.isdigit() and int(step_dir.name) > 4:
            shutil.rmtree(step_dir)
    shutil.rmtree(resumed / "adapters")
    again = run(load_config(None, overrides(tiny_bert, resumed)), resume=True, print_fn=lambda *a: None)
    assert [h["step"] for h in again.history] == list(range(5, 13))
    np.testing.assert_allclose([h["loss"] for h in again.history], [h["loss"] for h in result.history[4:]], rtol=1e-6)
    a = lora.checkpoint.load_adapters(out / "adapters")
    b = lora.checkpoint.load_adapters(resumed / "adapters")
    for (pa, x), (pb, y) in zip(lora.adapter_items(a), lora.adapter_items(b)):
        assert pa == pb
        np.testing.assert_allclose(x.b, y.b, rtol=1e-6, atol=1e-7)


def test_a_second_run_goes_beside_the_first_and_a_run_folder_is_not_reused(full_run, tiny_bert):
    from train import outputs

    out, _ = full_run
    job = out.parent
    again = outputs.plan(load_config(None, overrides(tiny_bert, job)), resume=False)
    assert again.folder == job / "run-2" and again.replaces is None  # the same command twice: a second run
    assert outputs.plan(load_config(None, overrides(tiny_bert, job)), resume=True).folder.resolve() == out.resolve()
    with pytest.raises(ConfigError, match="is itself a run folder"):  # never written into, unless replaced
        run(load_config(None, overrides(tiny_bert, out, **{"lora.r": 4})), print_fn=lambda *a: None)
    with pytest.raises(ConfigError, match=r"holds a run with a different config \(lora.r: saved 8, now 4\)"):
        run(load_config(None, overrides(tiny_bert, job, **{"lora.r": 4})), resume=True, print_fn=lambda *a: None)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_bert, tmp_path):
    cfg = load_config(
        None,
        overrides(
            tiny_bert,
            tmp_path / "nan",
            **{
                "optim.lr": 1e38,
                "optim.grad_clip": "null",
                "optim.name": "sgd",
                "optim.warmup_steps": 0,
                "optim.schedule": "constant",
                "checkpoint.every": 1,
            },
        ),
    )
    with pytest.raises(NonFiniteError, match=r"step \d+: loss .* is not finite"):
        run(cfg, print_fn=lambda *a: None)
    from lora_jax.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path / "nan" / "latest" / "checkpoints")
    assert ckpt.steps()  # at least one good step was saved before the failure
    for step in ckpt.steps():  # no checkpoint holds a NaN
        state = ckpt.restore_untyped(step)
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))
    assert not (tmp_path / "nan" / "latest" / "adapters").exists()  # nothing exported from a broken run
    for line in (tmp_path / "nan" / "latest" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train" and rec["finite"]:
            assert np.isfinite(rec["loss"])


def _records(folder):
    """The run's metric records without their clocks (``train_s``, ``tokens_per_s``)."""
    return [{k: v for k, v in r.items() if k not in ("train_s", "tokens_per_s")} for r in read_log(folder)]


def test_prefetch_off_trains_and_logs_exactly_as_on(full_run, tiny_bert, tmp_path):
    """``train.prefetch`` (on in ``full_run``: the next batch placed and the previous step's metrics read while a
    step runs) changes only when the host works: the same records in the same order (every loss, gradient norm
    and evaluation equal to the bit), the same checkpoints, the same adapters."""
    out, result = full_run
    off = run(
        load_config(None, overrides(tiny_bert, tmp_path / "off", **{"train.prefetch": "false"})),
        print_fn=lambda *a: None,
    )
    assert _records(off.folder) == _records(out)
    assert [h["loss"] for h in off.history] == [h["loss"] for h in result.history]
    assert sorted(os.listdir(off.folder / "checkpoints")) == sorted(os.listdir(out / "checkpoints"))
    a = lora.checkpoint.load_adapters(out / "adapters")
    b = lora.checkpoint.load_adapters(off.folder / "adapters")
    for (_, x), (_, y) in zip(lora.adapter_items(a), lora.adapter_items(b)):
        np.testing.assert_array_equal(x.a, y.a)
        np.testing.assert_array_equal(x.b, y.b)


def test_nan_with_prefetch_stops_as_without_it(tiny_bert, tmp_path):
    """With ``train.prefetch`` a step's metrics are read one step late; a non-finite step still stops the run
    with the error of the synchronous loop (the same step, the same last finite step, the same newest
    checkpoint), after the same records, and no checkpoint holds a NaN. The first non-finite step here is not a
    checkpoint step, so its check really is deferred past the next step's dispatch."""
    seen = {}
    for prefetch in ("true", "false"):
        out = tmp_path / prefetch
        cfg = load_config(
            None,
            overrides(
                tiny_bert,
                out,
                **{
                    "optim.lr": 1e38,
                    "optim.grad_clip": "null",
                    "optim.name": "sgd",
                    "optim.warmup_steps": 8,
                    "optim.schedule": "constant",
                    "checkpoint.every": 2,
                    "eval.every": 100,
                    "train.prefetch": prefetch,
                },
            ),
        )
        with pytest.raises(NonFiniteError, match=r"step \d+: .*not finite") as e:
            run(cfg, print_fn=lambda *a: None)
        folder = (out / "latest").resolve()
        from lora_jax.checkpoint import Checkpointer

        ckpt = Checkpointer(folder / "checkpoints")
        for step in ckpt.steps():  # no checkpoint holds a NaN
            state = ckpt.restore_untyped(step)
            assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))
        seen[prefetch] = (str(e.value).replace(str(folder), "RUN"), ckpt.steps(), _records(folder))
    message, steps, records = seen["true"]
    assert seen["true"] == seen["false"]
    assert steps, "the run must fail after a checkpoint for the test to check one"
    first_bad = int(message.split(":")[0].split()[1])
    assert first_bad % 2, message  # not a checkpoint step: the deferred check is the one that fired
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, first_bad))


@pytest.mark.slow  # tests/test_sharding.py checks the same on 8 devices in the fast suite
def test_eight_devices_match_one(tiny_bert, tmp_path):
    """The same run on 8 forced CPU devices (data 4 x fsdp 2) gives the losses of the 1-device run."""
    losses = {}
    for name, devices, mesh in (
        ("one", 1, ["mesh.data=1", "mesh.fsdp=1"]),
        ("eight", 8, ["mesh.data=4", "mesh.fsdp=2"]),
    ):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
        args = overrides(tiny_bert, tmp_path / name, **{"train.steps": 6, "eval.every": 100}) + mesh
        proc = subprocess.run(
            [sys.executable, "-m", "train.run", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"over {devices} cpu device(s)" in proc.stdout
        losses[name] = [r["loss"] for r in read_log(tmp_path / name / "latest") if r["kind"] == "train"]
    assert len(losses["one"]) == 6
    np.testing.assert_allclose(losses["eight"], losses["one"], rtol=2e-4)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # long; the default suite keeps a cheaper test of the same path
def test_two_processes_match_one(tiny_bert, tmp_path):
    """A real 2-process JAX cluster on 127.0.0.1 (gloo), 4 CPU devices each, data 4 x fsdp 2: same losses and
    adapters as one process on one device."""
    args = overrides(tiny_bert, tmp_path / "multi", **{"train.steps": 6, "eval.every": 3})
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(
            os.environ,
            XLA_FLAGS="--xla_force_host_platform_device_count=4",
            JAX_PLATFORMS="cpu",
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(pid),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "train.run", *args, "mesh.data=4", "mesh.fsdp=2"],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
    assert "over 8 cpu device(s), 2 process(es)" in outs[0][0]
    # only process 0 prints (gloo's own connection messages aside, which its threads may split across lines)
    assert [
        line
        for line in outs[1][0].splitlines()
        if not line.startswith("[Gloo]") and "connected to" not in line and "peer ranks" not in line
    ] == []

    single = tmp_path / "single"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "train.run", *overrides(tiny_bert, single, **{"train.steps": 6, "eval.every": 3})],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    multi = [r["loss"] for r in read_log(tmp_path / "multi" / "latest") if r["kind"] == "train"]
    one = [r["loss"] for r in read_log(single / "latest") if r["kind"] == "train"]
    np.testing.assert_allclose(multi, one, rtol=2e-4)
    assert sorted(p.name for p in (tmp_path / "multi").iterdir()) == ["latest", "run-1"]  # one folder, agreed on
    a = lora.checkpoint.load_adapters(tmp_path / "multi" / "latest" / "adapters")
    b = lora.checkpoint.load_adapters(single / "latest" / "adapters")
    for (_, x), (_, y) in zip(lora.adapter_items(a), lora.adapter_items(b)):
        np.testing.assert_allclose(x.b, y.b, rtol=1e-3, atol=1e-6)


def _losses_by_step(folder) -> dict[int, float]:
    """The logged loss of every step."""
    return {r["step"]: r["loss"] for r in read_log(folder) if r["kind"] == "train"}


def _start_and_interrupt(tiny_bert, out, sig, at_step) -> subprocess.Popen:
    import signal
    import time

    args = overrides(tiny_bert, out, **{"checkpoint.every": 1, "eval.every": 100})
    proc = subprocess.Popen(
        [sys.executable, "-m", "train.run", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "latest" / "metrics.jsonl").exists() and max(_losses_by_step(out / "latest"), default=0) >= at_step:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal({"kill": signal.SIGKILL, "term": signal.SIGTERM}[sig])
    proc.communicate(timeout=120)
    return proc


@pytest.mark.parametrize(
    "sig", [pytest.param("kill", marks=pytest.mark.slow), pytest.param("term", marks=pytest.mark.slow)]
)
def test_interrupted_run_resumes_to_the_same_result(full_run, tiny_bert, tmp_path, sig):
    """SIGKILL at a random step (or SIGTERM, the preemption notice) and --resume: per-step losses and final
    adapters equal the uninterrupted run's."""
    out, uninterrupted = full_run
    at_step = int(np.random.default_rng().integers(2, 9))
    proc = _start_and_interrupt(tiny_bert, tmp_path / sig, sig, at_step)
    if sig == "term":
        assert proc.returncode == 0  # a clean exit after saving
        assert (
            max(int(p.name) for p in (tmp_path / sig / "latest" / "checkpoints").iterdir() if p.name.isdigit())
            >= at_step
        )
    else:
        assert proc.returncode == -9
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "train.run",
            "--resume",
            *overrides(tiny_bert, tmp_path / sig, **{"checkpoint.every": 1, "eval.every": 100}),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    losses = _losses_by_step(tmp_path / sig / "latest")
    assert sorted(losses) == list(range(1, 13))
    steps = [r["step"] for r in read_log(tmp_path / sig / "latest") if r["kind"] == "train"]
    assert steps == list(range(1, 13))  # the steps trained again after the checkpoint are logged once
    np.testing.assert_allclose([losses[s] for s in range(1, 13)], [h["loss"] for h in uninterrupted.history], rtol=1e-6)
    a = lora.checkpoint.load_adapters(out / "adapters")
    b = lora.checkpoint.load_adapters(tmp_path / sig / "latest" / "adapters")
    for (_, x), (_, y) in zip(lora.adapter_items(a), lora.adapter_items(b)):
        np.testing.assert_allclose(x.b, y.b, rtol=1e-6, atol=1e-7)


@pytest.mark.slow  # long; the default suite keeps a cheaper test of the same path
def test_damaged_latest_checkpoint_falls_back(full_run, tiny_bert, tmp_path):
    """Truncate every file of the newest checkpoint: resume warns, uses the previous step and still ends equal."""
    out, uninterrupted = full_run
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    for step_dir in (damaged / "checkpoints").iterdir():
        if step_dir.name.isdigit() and int(step_dir.name) > 8:
            shutil.rmtree(step_dir)
    truncated = 0
    for f in (damaged / "checkpoints" / "8").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
            truncated += 1
    assert truncated
    with pytest.warns(UserWarning, match="skipping damaged checkpoint: checkpoint step 8"):
        again = run(load_config(None, overrides(tiny_bert, damaged)), resume=True, print_fn=lambda *a: None)
    assert again.history[0]["step"] == 5  # resumed from step 4
    assert [p.name.split("-")[0] for p in (damaged / "checkpoints-damaged").iterdir()] == ["8"]  # kept aside
    np.testing.assert_allclose(
        [h["loss"] for h in again.history], [h["loss"] for h in uninterrupted.history[4:]], rtol=1e-6
    )


def test_orbax_never_lists_an_unfinished_step(tmp_path):
    """A step folder without Orbax's commit marker (as a write killed midway leaves) is not a checkpoint."""
    import jax.numpy as jnp

    from lora_jax.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path / "c", every=1)
    tree = {"adapters": {"w": jnp.ones(3)}, "params": {}}
    ckpt.save(1, tree, {"count": jnp.zeros(())}, {"step": 1})
    ckpt.close()
    shutil.copytree(tmp_path / "c" / "1", tmp_path / "c" / "2.orbax-checkpoint-tmp-123")
    assert Checkpointer(tmp_path / "c").steps() == [1]


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"lora.targets": ".*/nothing/kernel"}, "matches no leaf"),
        ({"model.name": "/nonexistent/model"}, "no such model"),
        # each case starts a fresh interpreter (~15 s on 2 cores): the default run keeps two, -m slow runs all five
        pytest.param({"data.source": "/nonexistent/data.csv"}, "does not exist", marks=pytest.mark.slow),
        pytest.param({"data.max_length": 4096}, "exceeds the model's 128 positions", marks=pytest.mark.slow),
        pytest.param({"model.num_labels": 5}, "has shape (2,), expected (5,)", marks=pytest.mark.slow),  # 2-way head
    ],
)
def test_cli_bad_input_is_a_clear_error(tiny_bert, tmp_path, extra, message):
    args = overrides(tiny_bert, tmp_path / "bad", **{"train.steps": 1, **extra})
    proc = subprocess.run(
        [sys.executable, "-m", "train.run", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_e2e_experiment_scores_every_heldout_mr_greedy_and_with_the_papers_beam(tiny_llama, tmp_path, monkeypatch):
    """train.experiment e2e_smollm2 on a tiny E2E-like CSV and a tiny random Llama: every held-out MR is decoded
    once per decoding and scored against all its references; the beam settings reach generate."""
    import csv
    import random

    from lora_jax.models import generate as gen
    from train import experiment

    rng = random.Random(0)
    mrs = [f"name[N{i}], food[F{i % 3}]" for i in range(12)]
    rows = [
        {"mr": mr, "ref": f"N{i} serves F{i % 3} food, version {k}."}
        for i, mr in enumerate(mrs)
        for k in range(1 + rng.randrange(3))
    ]
    rng.shuffle(rows)
    source = tmp_path / "e2e.csv"
    with open(source, "w", newline="") as f:
        writer = csv.DictWriter(f, ["mr", "ref"])
        writer.writeheader()
        writer.writerows(rows)
    calls = []
    real = gen.generate
    monkeypatch.setattr(gen, "generate", lambda *a, **k: calls.append((a[2].shape, k)) or real(*a, **k))
    extra = lm_overrides(
        tiny_llama,
        tmp_path / "unused",
        **{
            "data.source": source,
            "data.prompt_column": "mr",
            "data.completion_column": "ref",
            "data.group_column": "mr",
            "data.eval_fraction": 0.25,
            "data.max_eval_examples": 2,
            "eval.max_new_tokens": 3,
            "eval.batch_size": 8,
            "eval.generate_samples": 1,
            "train.steps": 2,
        },
    )
    out = experiment.e2e_smollm2(tmp_path, 0.001, config=None, extra=[o for o in extra if "output.dir" not in o])
    json.dumps(out, default=float)  # what main() writes

    held_mrs = {r["mr"] for r in data_lib.split_rows(rows, load_config(None, extra).data)[1]}
    assert len(held_mrs) == 3  # max_eval_examples (2) caps the run's eval loss, not the final scoring
    h = out["heldout"]
    assert sorted(h["prompt_texts"]) == sorted(m + "\n" for m in held_mrs)
    assert h["prompts"] == 3 and h["references"] == sum(r["mr"] in held_mrs for r in rows)
    assert h["train_rows"] == len(rows) - h["references"] and h["train_prompts"] == 9
    greedy, beam = h["decodings"]["greedy"], h["decodings"]["beam10_lp0.9_norepeat4"]
    for d in (greedy, beam):
        assert len(d["predictions"]) == d["prompts_scored"] == 3 and d["references"] == h["references"]
        assert {"bleu", "rougeL", "decode_s", "decoding"} <= set(d) and d["decode_s"] > 0
    # the run decoded its one sample before and after training, no BLEU prompts; then one batch of
    # eval.batch_size rows per decoding holds all 3 held-out prompts
    assert len(calls) == 4 and all(shape[0] == 8 for shape, _ in calls)
    calls = calls[2:]
    assert calls[0][1] == {"max_new_tokens": 3} and greedy["decoding"] == {"num_beams": 1, "max_new_tokens": 3}
    assert calls[1][1] == {"max_new_tokens": 3, "num_beams": 10, "length_penalty": 0.9, "no_repeat_ngram_size": 4}
    assert beam["decoding"] == calls[1][1]
    t = out["training"]
    assert t["steps"] == 2 and t["train_rows"] == h["train_rows"] and t["batching"] == "packed"
    assert t["epochs"] == t["examples_seen"] / t["train_rows"] > 0
    assert [r["name"] for r in out["table"]] == ["greedy", "beam10_lp0.9_norepeat4"]
    assert out["table"][1]["decoding"] == beam["decoding"] and out["table"][1]["bleu"] == beam["bleu"]


def test_sst2_methods_runs_each_method_for_the_same_steps_an_epoch_times_scale(tiny_bert, tmp_path):
    """train.experiment sst2_methods on the built-in sentiment set (600 rows, 540 after the 10% held out) with a
    tiny BERT: the steps are one epoch (68 batches of 8) x scale for every method, and the README block renders
    from the JSON it writes."""
    from benchmarks import report
    from train import experiment

    extra = [
        o
        for o in overrides(tiny_bert, tmp_path / "unused")
        if not o.startswith(("output.dir=", "train.steps=", "eval.every="))
    ]
    out = experiment.sst2_methods(tmp_path, 0.1, config=None, extra=tuple(extra))
    out = json.loads(json.dumps(out, default=float))  # what main() writes
    assert out["train_rows"] == 540 and out["steps"] == 7  # ceil(540 / 8 x 0.1)
    assert [r["name"] for r in out["table"]] == ["lora", "full", "linear_probe"]
    trainable = {r["name"]: r["trainable_params"] for r in out["table"]}
    assert trainable["linear_probe"] < trainable["lora"] < trainable["full"]
    for one, row in zip(out["runs"], out["table"]):
        assert row["steps"] == 7 and row["examples_seen"] == 56 and row["epochs"] == pytest.approx(56 / 540)
        assert [e["step"] for e in one["evals"]] == list(range(8))  # before training, then every step (7 // 16 -> 1)
        assert row["auc"] == one["evals"][-1]["auc"] and row["batching"] == "bucketed"
    for name in ("sst2_methods_auc.png", "sst2_methods_loss.png"):
        assert (tmp_path / name).stat().st_size > 0
    block = report.sst2_block({report.SST2: out})
    assert "7 steps of 8 sentences each (0.10 epochs of the 540 training sentences)" in block
    assert "`python -m train.experiment sst2_methods --scale 0.1`" in block
    best_auc = max(r["auc"] for r in out["table"])
    assert f"**{best_auc:.3f}**" in block and block.count("**") >= 6  # the best of each metric column is bold


def test_experiment_run_records_evals_and_reuse_skips_only_an_identical_finished_run(tiny_bert, tmp_path, monkeypatch):
    from train import experiment

    ov = [
        o
        for o in overrides(tiny_bert, tmp_path / "unused", **{"train.steps": 4, "eval.every": 2})
        if not o.startswith("output.dir=")
    ]
    first = experiment._run("tiny", None, ov, tmp_path)
    assert [e["step"] for e in first["evals"]] == [0, 2, 4] and first["result"]["steps"] == 4
    assert np.isfinite(first["final_train_loss"])

    monkeypatch.setattr(experiment, "REUSE", True)
    calls = []
    real_run = experiment.run
    monkeypatch.setattr(experiment, "run", lambda cfg, **k: calls.append(cfg) or real_run(cfg, **k))
    again = experiment._run("tiny", None, ov, tmp_path)  # same config: reused, not trained
    assert calls == [] and again["result"] == first["result"] and again["evals"] == first["evals"]
    changed = experiment._run("tiny", None, [*ov, "lora.r=2"], tmp_path)  # another config: trained again
    assert (
        len(calls) == 1
        and calls[0].lora.r == 2
        and changed["result"]["trainable_params"] != first["result"]["trainable_params"]
    )
