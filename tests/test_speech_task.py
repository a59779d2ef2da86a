"""The synthesised spoken-language task (train.speech_data) and train.run on audio: a tiny slice generated on
the fly with espeak-ng and sox, a tiny random Whisper, LoRA / full / frozen-encoder runs."""

import json

import numpy as np
import pytest

from conftest import require_program

require_program("espeak-ng", "sox")

from lora_jax.errors import DataError  # noqa: E402
from lora_jax.models import audio  # noqa: E402
from train import data as data_lib  # noqa: E402
from train import speech_data  # noqa: E402
from train.config import load_config  # noqa: E402
from train.loop import run  # noqa: E402
from train.speech_sentences import EVAL_VARIANTS, SENTENCES, TRAIN_VARIANTS, family  # noqa: E402

LANGS = ["en", "de", "es"]


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    """3 languages x (2 training sentences x 2 clips, 1 validation sentence x 2 clips)."""
    out = tmp_path_factory.mktemp("speech")
    speech_data.generate(
        out, languages=LANGS, train_per_sentence=2, eval_per_sentence=2, n_train=2, n_eval=1, print_fn=lambda *a: None
    )
    return out


def _rows(folder, split):
    return [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]


def test_split_holds_out_sentences_and_voices(tiny_task):
    train, evals = _rows(tiny_task, "train"), _rows(tiny_task, "eval")
    assert len(train) == 3 * 2 * 2 and len(evals) == 3 * 1 * 2
    assert json.loads((tiny_task / "labels.json").read_text()) == LANGS
    assert {r["label"] for r in train} == {0, 1, 2} and all(LANGS[r["label"]] == r["language"] for r in train + evals)
    assert {r["text"] for r in train}.isdisjoint({r["text"] for r in evals})
    assert all(r["text"] in SENTENCES[r["language"]][speech_data.N_TRAIN_SENTENCES :] for r in evals)
    variant = lambda r: r["voice"].split("+")[1]  # noqa: E731
    assert {variant(r) for r in train} <= set(TRAIN_VARIANTS) and {variant(r) for r in evals} <= set(EVAL_VARIANTS)
    for r in train[:3]:
        wave, rate = audio.read_wav(tiny_task / r["audio"])
        assert rate == 16000 and abs(wave.size / rate - r["seconds"]) < 1e-3 and 0.25 < np.abs(wave).max() <= 1.0
        assert 5.0 <= r["snr_db"] <= 30.0 and 130 <= r["speed"] <= 210


def test_the_full_task_holds_out_whole_voice_families_and_sentences():
    """The plan the experiment uses (all ten languages, the default counts): no voice family (a voice and its
    numbered variants, or a named twin) and no sentence is heard on both sides, and validation has enough of
    both to measure on."""
    rows = speech_data.plan(list(speech_data.VOICES), 6, 2, seed=0)
    train, evals = rows["train"], rows["eval"]
    families = lambda split: {family(r["voice"].split("+")[1]) for r in split}  # noqa: E731
    assert families(train).isdisjoint(families(evals))
    assert {family(v) for v in TRAIN_VARIANTS}.isdisjoint({family(v) for v in EVAL_VARIANTS})
    assert family("edward2") == family("edward") and family("klatt3") == family("klatt") and family("m7") == "m"
    assert family("robert") == family("rob") and family("Andy") == "andy"
    assert {r["text"] for r in train}.isdisjoint({r["text"] for r in evals})
    assert len(train) == 1200 and len(evals) == 200
    assert len({r["text"] for r in evals}) == 100 and len(families(evals)) >= 15
    for lang in speech_data.VOICES:  # every language is validated on 10 sentences
        assert len({r["text"] for r in evals if r["language"] == lang}) == 10


def test_same_key_keeps_the_folder_and_a_new_one_regenerates(tiny_task, tmp_path):
    spec = json.loads((tiny_task / "spec.json").read_text())
    before = (tiny_task / "clips" / "train" / "00000.wav").stat().st_mtime_ns
    messages = []
    speech_data.generate(
        tiny_task,
        languages=LANGS,
        train_per_sentence=2,
        eval_per_sentence=2,
        n_train=2,
        n_eval=1,
        print_fn=messages.append,
    )
    assert messages == [f"{tiny_task}: up to date (key {spec['key']})"]
    assert (tiny_task / "clips" / "train" / "00000.wav").stat().st_mtime_ns == before
    # the same plan written elsewhere is the same audio, sample for sample (all randomness comes from the seed)
    speech_data.generate(
        tmp_path,
        languages=["en"],
        train_per_sentence=1,
        eval_per_sentence=1,
        n_train=1,
        n_eval=1,
        print_fn=lambda *a: None,
    )
    again = tmp_path / "again"
    speech_data.generate(
        again,
        languages=["en"],
        train_per_sentence=1,
        eval_per_sentence=1,
        n_train=1,
        n_eval=1,
        print_fn=lambda *a: None,
    )
    assert (tmp_path / "clips/train/00000.wav").read_bytes() == (again / "clips/train/00000.wav").read_bytes()
    other = speech_data.plan(["en"], 1, 1, seed=1, n_train=1, n_eval=1)
    assert speech_data.spec_key(other) != speech_data.spec_key(speech_data.plan(["en"], 1, 1, 0, 1, 1))
    with pytest.raises(DataError, match="unknown languages"):
        speech_data.generate(tmp_path / "x", languages=["xx"])


def test_featurize_reads_the_manifest(tiny_task, tmp_path):
    cfg = load_config(
        None, [f"data.source={tiny_task / 'train.jsonl'}", "data.task=audio-classification", "data.max_length=200"]
    ).data
    rows = data_lib.load_rows(cfg, "train")
    feats = data_lib.tokenize(rows, audio.FeatureExtractor(), cfg, num_labels=3)
    assert feats.input_features.shape == (12, 80, 200) and feats.input_ids is None
    wave, _ = audio.read_wav(rows[0]["audio"])
    np.testing.assert_array_equal(feats.input_features[0], audio.FeatureExtractor().log_mel(wave, 200))
    assert feats.attention_mask[0].sum() == min(200, -(-wave.size // 160))
    assert list(feats.labels) == [r["label"] for r in rows]
    with pytest.raises(DataError, match="even number of at most 3000"):
        data_lib.tokenize(
            rows,
            audio.FeatureExtractor(),
            load_config(None, ["data.task=audio-classification", "data.max_length=301"]).data,
        )
    with pytest.raises(DataError, match="outside \\[0, 2\\)"):
        data_lib.tokenize(rows, audio.FeatureExtractor(), cfg, num_labels=2)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"audio": "missing.wav", "label": 0}) + "\n")
    bad = load_config(None, [f"data.source={tmp_path / 'bad.jsonl'}", "data.task=audio-classification"]).data
    with pytest.raises(DataError, match="missing.wav"):
        data_lib.tokenize(data_lib.load_rows(bad, "train"), audio.FeatureExtractor(), bad)


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory):
    """A random 2-layer, 32-wide Whisper speech model (80 mel bins, 1 s of positions) saved by transformers."""
    import transformers

    config = transformers.WhisperConfig(
        d_model=32,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=48,
        max_source_positions=50,
        classifier_proj_size=16,
        num_labels=3,
        vocab_size=60,
        decoder_layers=1,
        decoder_attention_heads=4,
        decoder_ffn_dim=48,
        max_target_positions=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    folder = tmp_path_factory.mktemp("tiny_whisper")
    transformers.WhisperForConditionalGeneration(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "method",
    ["lora", pytest.param("full", marks=pytest.mark.slow), pytest.param("linear_probe", marks=pytest.mark.slow)],
)
def test_train_run_on_audio(tiny_task, tiny_whisper, tmp_path, method):
    cfg = load_config(
        None,
        [
            f"model.name={tiny_whisper}",
            "model.num_labels=3",
            f"data.source={tiny_task / 'train.jsonl'}",
            f"data.eval_source={tiny_task / 'eval.jsonl'}",
            "data.task=audio-classification",
            "data.max_length=100",
            f"train.method={method}",
            "train.steps=4",
            "train.batch_size=4",
            "eval.every=2",
            "eval.batch_size=4",
            "checkpoint.every=100",
            "lora.targets=qv",
            "optim.lr=1e-2",
            "optim.warmup_steps=1",
            f"output.dir={tmp_path / 'run'}",
            f"output.export_peft={method == 'lora'}",
        ],
    )
    result = run(cfg, print_fn=lambda *a, **k: None)
    folder = result.folder  # output.dir/run-1 (output.dir/latest points at it)
    saved = json.loads((folder / "result.json").read_text())
    head = 32 * 16 + 16 + 16 * 3 + 3  # projector + classifier
    want = {"lora": head + 2 * 2 * 8 * (32 + 32), "linear_probe": head}.get(method)
    if want is not None:
        assert saved["trainable_params"] == want
    else:
        assert saved["trainable_params"] == saved["total_params"]
    assert saved["steps"] == 4 and np.isfinite(result.history[-1]["loss"])
    assert {"auc", "accuracy", "loss"} <= set(saved["eval_after"]) and saved["eval_after"]["loss"] > 0
    assert saved["eval_after"] != saved["eval_before"]
    if method == "lora":
        peft_cfg = json.loads((folder / "peft" / "adapter_config.json").read_text())
        assert sorted(peft_cfg["target_modules"]) == ["q_proj", "v_proj"]
        assert sorted(peft_cfg["modules_to_save"]) == ["classifier", "projector"]


def _fake_run(method: str, seed: int, aucs: list[float], overloaded: bool = False) -> dict:
    """A run record as train.experiment._run returns it, evaluated every 10 s."""
    evals = [{"step": i, "train_s": 10.0 * i, "auc": a, "loss": 1 - a, "accuracy": a} for i, a in enumerate(aucs)]
    return {
        "name": f"whisper_{method}_s{seed}",
        "method": method,
        "seed": seed,
        "overrides": [],
        "evals": evals,
        "result": {"eval_after": evals[-1], "steps": 10, "train_s": 10.0 * (len(aucs) - 1), "trainable_params": 5},
        "load": {"max_1min": 3.0 if overloaded else 1.0, "mean_1min": 1.0, "cores": 2, "overloaded": overloaded},
    }


def test_whisper_summary_says_which_method_leads_and_whether_every_seed_agrees():
    from benchmarks import report
    from train import experiment

    runs = [
        *(_fake_run("lora", s, [0.5, 0.6, 0.9 + 0.01 * s]) for s in range(3)),
        *(_fake_run("frozen_head", s, [0.5, 0.8, 0.85], overloaded=s == 2) for s in range(3)),
    ]
    runs[3]["evals"][1]["auc"] = 0.55  # seed 0: at 10 s LoRA (0.6) leads the head, unlike seeds 1 and 2
    s = experiment.whisper_summary(runs, budget=20.0, checkpoints=(0.5, 1.0))
    assert experiment.metric_at(runs[0]["evals"], "auc", 15.0) == 0.6
    assert experiment.metric_at(runs[0]["evals"], "auc", -1.0) is None
    half, end = s["leaders"]
    assert half["best"] == "frozen_head" and not half["holds_in_every_seed"]
    assert half["best_per_seed"] == {"0": "lora", "1": "frozen_head", "2": "frozen_head"}
    assert end["best"] == "lora" and end["holds_in_every_seed"]
    by = {row["method"]: row for row in s["table"]}
    assert by["lora"]["auc"]["min"] == 0.9 and by["lora"]["auc"]["max"] == 0.92 and by["lora"]["eval_points"] == [3] * 3
    assert by["frozen_head"]["overloaded_runs"] == 1
    record = {
        "runs": runs,
        **s,
        "budget_s": 20.0,
        "scale": 1.0,
        "seeds": [0, 1, 2],
        "batch_size": 16,
        "frames": 200,
        "train_clips": 10,
        "eval_clips": 5,
    }
    block = report.whisper_block({report.WHISPER: record})
    assert "after 10 s of training: frozen encoder + head has the best mean AUC, not in every seed" in block
    assert "after 20 s of training: LoRA r=8 on q_proj, v_proj + head has the best mean AUC, in every seed" in block
    assert "1 of 6 runs went above the core count" in block
    # spread within LoRA's seeds 0.02 < gap between the methods' means 0.06: the seeds separate them
    assert "0.020" in block and "the seeds separate the methods" in block


def _evaluated_once_per_tenth(evals: list[dict], every_s: float) -> None:
    """Evaluations before and after training, and in training at most one per multiple of ``every_s`` seconds of
    training time, at the first step past it."""
    inner = [e["train_s"] for e in evals[1:-1]]
    assert evals[0]["step"] == 0 and evals[-1]["train_s"] >= (inner or [0.0])[-1]
    ticks = [int(t // every_s) for t in inner]
    assert all(t >= 1 for t in ticks) and ticks == sorted(set(ticks)), inner


@pytest.mark.slow
def test_whisper_methods_experiment_on_a_tiny_model(tiny_task, tiny_whisper, tmp_path):
    """train.experiment whisper_methods end to end on the tiny task and model: every method with every seed, the
    same time budget, evaluations spaced by training time, the load recorded, the plots written."""
    from train import experiment

    extra = (
        f"model.name={tiny_whisper}",
        "model.num_labels=3",
        "data.task=audio-classification",
        "data.max_length=100",
        "train.batch_size=4",
        "eval.batch_size=4",
        "lora.targets=qv",
        "optim.warmup_steps=1",
    )
    scale = 3.0 / experiment.WHISPER_BUDGET_S  # 3 s of training each
    out = experiment.whisper_methods(tmp_path, scale, config=None, extra=extra, seeds=(0, 1), data=tiny_task)
    assert [(r["method"], r["seed"]) for r in out["runs"]] == [
        (m, s) for s in (0, 1) for m in experiment.WHISPER_METHODS
    ]
    for r in out["runs"]:
        assert r["result"]["train_s"] >= 3.0 and r["overrides"].count("train.time_budget_s=3") == 1
        assert r["load"]["samples"] >= 1 and r["load"]["cores"] >= 1 and isinstance(r["load"]["overloaded"], bool)
        _evaluated_once_per_tenth(r["evals"], every_s=0.3)
    # a step that compiles fast leaves every tenth its evaluation: before, 9 in training, after (the first run of a
    # process also compiles the evaluation, and a compile longer than a tenth takes that tenth's evaluation with it)
    assert max(len(r["evals"]) for r in out["runs"]) >= 10
    assert {row["method"] for row in out["table"]} == set(experiment.WHISPER_METHODS)
    assert out["eval_clips"] == 6 and out["train_clips"] == 12 and out["seeds"] == [0, 1]
    for name in ("whisper_methods_auc.png", "whisper_methods_loss.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
