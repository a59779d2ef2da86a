"""What a newcomer meets after the first command: ``train.run --help`` lists every config key, the learning rate
is logged beside the loss, the run draws its loss curve (``train.plot``) and says where its outputs went, a wrong
data path fails before the model is loaded, one generation pass serves BLEU / ROUGE-L and the printed samples, and
the README's times are rendered from the record ``benchmarks.newcomer`` writes."""

import copy
import json
import typing
from pathlib import Path

import jax
import pytest

from benchmarks import report
from lora_jax.errors import DataError
from train import loop, plot
from train import run as run_cli
from train.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_config_key_with_its_meaning(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    keys = {f"{s}.{k}" for s, cls in typing.get_type_hints(Config).items() for k in cls.__pydantic_fields__}
    missing = [k for k in keys if f"  {k} (default " not in out]
    assert not missing, f"--help does not list {missing}"
    assert "peak learning rate" in out  # the meanings, not only the names


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_logged_learning_rate_is_the_one_the_optimizer_used(schedule):
    cfg = load_config(
        None,
        [
            f"optim.schedule={schedule}",
            "optim.warmup_steps=3",
            "train.steps=10",
            "optim.lr=0.01",
            "optim.grad_clip=null",
            "optim.name=sgd",
        ],
    )
    # an SGD step with gradient 1 moves a parameter by exactly the learning rate it used
    tx = loop.make_optimizer(cfg)
    params = {"w": jax.numpy.zeros(())}
    state = tx.init(params)
    for step in range(1, 11):
        updates, state = tx.update({"w": jax.numpy.ones(())}, state, params)
        assert float(-updates["w"]) == pytest.approx(loop.lr_at(cfg, step), rel=1e-6, abs=1e-9), step
    assert loop.lr_at(cfg, 1) == 0.0 and loop.lr_at(cfg, 4) == pytest.approx(0.01)


def test_plot_draws_loss_eval_and_learning_rate(tmp_path, capsys):
    run = tmp_path / "job" / "run-1"
    run.mkdir(parents=True)
    records = (
        [{"kind": "eval", "step": 0, "loss": 2.0}]
        + [
            {"kind": "train", "step": i, "loss": 2.0 / i, "lr": 1e-3 * min(i, 3) / 3, "finite": True}
            for i in range(1, 7)
        ]
        + [{"kind": "eval", "step": 6, "loss": 0.5}]
    )
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "job" / "latest").symlink_to(run)
    assert plot.main([str(tmp_path / "job")]) == 0  # a job folder: its latest run
    png = run / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and capsys.readouterr().out.strip() == str(png)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="no training or evaluation loss"):
        plot.plot_run(empty)
    assert plot.main([str(tmp_path / "nowhere")]) == 2  # one line, exit 2


def test_a_wrong_data_path_fails_before_the_model_is_loaded(tmp_path, monkeypatch):
    def no_model(cfg):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(loop, "load_model", no_model)
    for source, message in ((tmp_path / "nope.jsonl", "does not exist"), ("builtin:nope", "unknown built-in")):
        cfg = load_config(None, [f"data.source={source}", f"output.dir={tmp_path / 'out'}"])
        with pytest.raises(DataError, match=message):
            loop.run(cfg, check=True, print_fn=lambda *a: None)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"question": "a", "answer": "b"}\n')
    cfg = load_config(None, [f"data.source={rows}", f"output.dir={tmp_path / 'out'}"])
    with pytest.raises(DataError, match="expected"):  # a column the config names is missing
        loop.run(cfg, check=True, print_fn=lambda *a: None)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, minilm_path):
    """A 1-layer, 32-wide random Llama with MiniLM's tokenizer, saved in Hugging Face layout."""
    from transformers import AutoTokenizer

    from lora_jax.models import llama, save_pretrained

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path))
    config = llama.Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
    )
    folder = tmp_path_factory.mktemp("tiny_llama")
    save_pretrained(llama.init_params(config, jax.random.key(0)), config, folder, tokenizer=tokenizer)
    return folder


@pytest.mark.slow  # a tiny causal-LM run with decoding before and after: ~30 s idle, minutes on a busy machine
def test_one_generation_pass_scores_and_prints_and_the_run_says_where_it_went(tiny_llama, tmp_path, monkeypatch):
    """Before and after training, one decoding of the scored prompts gives BLEU / ROUGE-L and the printed samples
    (their first ``eval.generate_samples``); the run's metrics log the learning rate, it draws ``loss.png`` and
    ends by printing where its outputs are."""
    from lora_jax.models import generate as gen

    calls = []
    real = gen.generate
    monkeypatch.setattr(gen, "generate", lambda *a, **k: calls.append(a[2].shape) or real(*a, **k))
    said = []
    cfg = load_config(
        None,
        [
            f"model.name={tiny_llama}",
            "train.steps=2",
            "train.batch_size=4",
            "data.max_length=64",
            "data.max_eval_examples=3",
            "eval.every=100",
            "eval.generate_samples=2",
            "eval.generate_eval=3",
            "eval.max_new_tokens=3",
            "optim.warmup_steps=1",
            f"output.dir={tmp_path / 'job'}",
        ],
    )
    result = loop.run(cfg, print_fn=lambda *a: said.append(" ".join(map(str, a))))
    assert calls == [(8, calls[0][1])] * 2  # one batch of the 3 scored prompts, before and after
    prompts = [p for p, _ in result.samples_after]
    assert len(prompts) == 2 and {"bleu", "rougeL"} <= set(result.eval_after)
    log = [json.loads(line) for line in (result.folder / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in log if r["kind"] == "train"]
    assert [r["lr"] for r in train] == [pytest.approx(loop.lr_at(cfg, r["step"])) for r in train]
    assert (result.folder / "loss.png").is_file()
    text = "\n".join(said)
    assert f"outputs in {result.folder}" in text and "python -m train.plot" in text
    assert str(result.folder / "loss.png") in text and str(result.folder / "result.json") in text
    phases = json.loads((result.folder / "result.json").read_text())["phases_s"]
    assert set(phases) == {"setup", "eval_before", "training", "eval_after", "export"}


def test_newcomer_block_renders_the_record():
    results = report.load_results()
    block = report.newcomer_block(results)
    if "newcomer" not in results:  # not measured yet: the block says so and names the command for each part
        for part in ("--main-job", "--tests", "--setup"):
            assert f"python -m benchmarks.newcomer {part}`).*" in block
        results = {**results, "newcomer": _fake_record()}
        block = report.newcomer_block(results)
    job = results["newcomer"].get("main_job")
    if job:
        assert f"{job['result']['eval_after']['loss']:.3f}" in block and "python -m train.run" in block
        changed = copy.deepcopy(results)
        changed["newcomer"]["main_job"]["wall_s"] += 60
        assert report.newcomer_block(changed) != block
    assert "cores" in block and " UTC" in block  # the CPU and the date it ran on


def _fake_record() -> dict:
    """A newcomer record shaped as benchmarks.newcomer writes it (to render before the first measurement)."""
    provenance = {
        "cpu": {"model": "Test CPU", "usable_cores": 2},
        "load_average": {"before": [0.1], "after": [0.2]},
        "git": {"commit": "0" * 40, "dirty": False},
        "date": "2026-12-07T00:00:00+00:00",
    }
    return {
        "main_job": {
            "wall_s": 140.0,
            "command": "python -m train.run",
            "provenance": provenance,
            "result": {
                "steps": 40,
                "generate_eval": 16,
                "phases_s": {"setup": 20.0, "training": 80.0},
                "eval_before": {"loss": 2.1, "bleu": 6.8, "rougeL": 21.2},
                "eval_after": {"loss": 0.4, "bleu": 70.0, "rougeL": 80.0},
            },
        },
        "tests": {"wall_s": 330.0, "command": "python -m pytest", "counts": {"passed": 600}, "provenance": provenance},
    }
