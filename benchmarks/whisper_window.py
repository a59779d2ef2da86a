"""The Whisper encoder on the clip's own frames against Whisper's 30 s window, on the real Whisper base weights.

    python -m benchmarks.whisper_window [--quick] [--per-language N] [--rounds R]

The speech task (``train.speech_data``; ``configs/whisper_langid_lora.yaml``) runs the encoder on the clip's first
``data.max_length`` mel frames (200: 2 s, the first 100 of Whisper's 1,500 positions) instead of the 30 s window
Whisper was trained on. What that changes, on ``N`` training and ``N`` validation clips per language of the task
(generated if missing; the first ones of each split, so every run measures the same clips):

1. **features**: the encoder's last hidden state at the task's window and at 3,000 frames (the clip padded with
   silence to 30 s, as Hugging Face's feature extractor does). Cosine similarity per clip between (a) the mean over
   the clip's own positions (the first ``T / 2``) of both, and (b) the short window's mean against the full
   window's mean over all 1,500 positions, which is what ``WhisperForAudioClassification``'s mean pooling sees
   with Whisper's own window.
2. **probe**: the frozen-encoder baseline both ways: a multinomial logistic regression (standardised features, L2,
   full-batch Adam) trained on the pooled features of the training clips, validation AUC (one-vs-rest) and
   accuracy. Same clips, same probe: the windows' difference is the only one.
3. **time**: the encoder's forward pass on a batch of ``--batch`` clips at each window, ``--rounds`` interleaved
   rounds, the median of per-round ratios (full / short).

``--quick``: a random 2-layer, 64-wide Whisper (1,500 positions) on 3 classes of synthetic chirps, a smoke run of
the same code. Writes ``benchmarks/results/whisper_window.json`` (``--out`` to change the name).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import ROOT, Recorder, block, median, paired_summary, table, time_interleaved

SOURCES = (
    "benchmarks/whisper_window.py",
    "benchmarks/common.py",
    "lora_jax/models/whisper.py",
    "lora_jax/models/audio.py",
    "lora_jax/models/ct2.py",
    "lora_jax/models/layers.py",
    "lora_jax/ops.py",
    "train/speech_data.py",
    "train/speech_sentences.py",
    "train/metrics.py",
    "configs/whisper_langid_lora.yaml",
)


def task_clips(per_language: int) -> tuple[list[np.ndarray], list[int], list[np.ndarray], list[int], list[str]]:
    """The first ``per_language`` training and validation clips of each language of the speech task:
    ``(train_waves, train_labels, eval_waves, eval_labels, languages)``."""
    from lora_jax.models.audio import read_wav
    from train import speech_data

    folder = speech_data.generate(ROOT / "data" / "speech_langid")
    languages = json.loads((folder / "labels.json").read_text())
    out: list[Any] = []
    for split in ("train", "eval"):
        rows = [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]
        picked = [r for lang in range(len(languages)) for r in [r for r in rows if r["label"] == lang][:per_language]]
        out += [[read_wav(folder / r["audio"])[0] for r in picked], [r["label"] for r in picked]]
    return (*out, languages)


def chirp_clips(per_class: int, classes: int = 3, seed: int = 0):
    """Synthetic stand-ins for --quick: class ``c`` is a chirp around ``200 * (c + 1)`` Hz, 1-2.5 s, with noise."""
    rng = np.random.default_rng(seed)

    def clip(c: int) -> np.ndarray:
        n = int(16000 * rng.uniform(1.0, 2.5))
        t = np.arange(n) / 16000
        f0 = 200.0 * (c + 1) * rng.uniform(0.9, 1.1)
        wave = 0.3 * np.sin(2 * np.pi * f0 * t * (1 + 0.3 * t)) + 0.02 * rng.standard_normal(n)
        return wave.astype(np.float32)

    splits = []
    for _ in range(2):
        labels = [c for c in range(classes) for _ in range(per_class)]
        splits += [[clip(c) for c in labels], labels]
    return (*splits, [f"chirp{c}" for c in range(classes)])


def encoder(quick: bool):
    """``(apply(features) -> last hidden state, feature extractor, config, name)``: Whisper base's encoder, or a
    random 2-layer one for --quick."""
    from lora_jax.models import audio, load, whisper

    if quick:
        cfg = whisper.Config(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128)
        model = whisper.build(cfg, task="base")
        params = whisper.init_params(cfg, jax.random.key(0), task="base")
        fe, name = audio.FeatureExtractor(), "random Whisper, 2 layers x 64"
    else:
        model, params, fe, cfg = load("whisper-base", task="base")
        name = "whisper-base"
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x).last_hidden_state)
    return (lambda x: fn(params, jnp.asarray(x))), fe, cfg, name


def encode(apply, fe, waves: list[np.ndarray], frames: int, batch: int) -> np.ndarray:
    """Last hidden states ``(N, frames / 2, D)`` of ``waves`` at a window of ``frames`` mel frames."""
    outs = []
    for i in range(0, len(waves), batch):
        chunk = waves[i : i + batch]
        x = np.stack(
            [fe.log_mel(w, frames) for w in chunk]
            + [np.zeros((fe.feature_size, frames), np.float32)] * (batch - len(chunk))
        )
        outs.append(np.asarray(block(apply(x)))[: len(chunk)])
    return np.concatenate(outs)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def probe(train_x, train_y, eval_x, eval_y, classes: int, steps: int = 500, l2: float = 1e-3) -> dict[str, float]:
    """The frozen-encoder baseline on fixed features: softmax regression on standardised features (L2 ``l2``,
    ``steps`` full-batch Adam steps), scored on the validation features (``train.metrics.classification``)."""
    import optax

    from train.metrics import classification

    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    xt, xe = jnp.asarray((train_x - mu) / sd), jnp.asarray((eval_x - mu) / sd)
    yt = jnp.asarray(train_y)
    params = {"w": jnp.zeros((xt.shape[1], classes)), "b": jnp.zeros((classes,))}
    tx = optax.adam(1e-2)

    def loss(p):
        logits = xt @ p["w"] + p["b"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, yt).mean()
        return ce + l2 * jnp.sum(p["w"] ** 2)

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = tx.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    logits = np.asarray(xe @ params["w"] + params["b"])
    out = classification(np.asarray(eval_y), logits)
    return {k: out[k] for k in ("auc", "accuracy")}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a random 2-layer Whisper on synthetic chirps: a smoke run")
    ap.add_argument("--per-language", type=int, default=6, help="training and validation clips per language")
    ap.add_argument("--frames", type=int, default=None, help="the short window (default: the task's data.max_length)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None, help="results name (default whisper_window, _quick with --quick)")
    ap.add_argument("--out-dir", default=None, help="write the JSON here instead of benchmarks/results/")
    args = ap.parse_args(argv)
    if args.quick:
        args.per_language, args.batch, args.rounds = 4, 2, 2
    args.out = args.out or ("whisper_window_quick" if args.quick else "whisper_window")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from train.config import load_config

    recorder = Recorder("whisper_window", SOURCES, argv)
    frames = args.frames or load_config(ROOT / "configs" / "whisper_langid_lora.yaml").data.max_length
    apply, fe, cfg, name = encoder(args.quick)
    full = cfg.num_frames
    tr_w, tr_y, ev_w, ev_y, labels = chirp_clips(args.per_language) if args.quick else task_clips(args.per_language)
    print(
        f"{name}: {len(tr_w)} training / {len(ev_w)} validation clips, windows {frames} and {full} frames", flush=True
    )

    pooled: dict[str, dict[str, np.ndarray]] = {"short": {}, "full_clip": {}, "full_all": {}}
    for split, waves in (("train", tr_w), ("eval", ev_w)):
        short = encode(apply, fe, waves, frames, args.batch)
        whole = encode(apply, fe, waves, full, args.batch)
        pooled["short"][split] = short.mean(1)
        pooled["full_clip"][split] = whole[:, : frames // 2].mean(1)  # the same positions as the short window
        pooled["full_all"][split] = whole.mean(1)  # what mean pooling over Whisper's own window sees
    both = lambda k: np.concatenate([pooled[k]["train"], pooled[k]["eval"]])  # noqa: E731
    sims = {
        "clip_positions": cosine(both("short"), both("full_clip")),
        "whole_window": cosine(both("short"), both("full_all")),
    }
    features = [
        {"pooling": k, "median_cosine": float(np.median(v)), "min_cosine": float(v.min()), "clips": int(v.size)}
        for k, v in sims.items()
    ]
    print(table(features, ["pooling", "median_cosine", "min_cosine", "clips"]), flush=True)

    probes = []
    for k, what in (
        ("short", f"{frames} frames"),
        ("full_clip", f"{full} frames, clip positions"),
        ("full_all", f"{full} frames, all positions"),
    ):
        scores = probe(pooled[k]["train"], np.array(tr_y), pooled[k]["eval"], np.array(ev_y), len(labels))
        probes.append({"features": k, "window": what, **scores})
    print(table(probes, ["features", "window", "auc", "accuracy"]), flush=True)

    x_short = np.stack([fe.log_mel(w, frames) for w in ev_w[: args.batch]])
    x_full = np.stack([fe.log_mel(w, full) for w in ev_w[: args.batch]])
    times = time_interleaved(
        {"short": lambda: block(apply(x_short)), "full": lambda: block(apply(x_full))}, rounds=args.rounds, warmup=1
    )
    paired = paired_summary(times["full"], times["short"])
    timing = {
        "batch": len(x_short),
        "short_ms": 1e3 * median(times["short"]),
        "full_ms": 1e3 * median(times["full"]),
        "speedup": paired,
    }
    print(
        f"forward of {len(x_short)} clips: {timing['short_ms']:,.0f} ms at {frames} frames, "
        f"{timing['full_ms']:,.0f} ms at {full}: {paired['median']:.1f}x "
        f"(95% CI {paired['ci95'][0]:.1f}-{paired['ci95'][1]:.1f})",
        flush=True,
    )
    result = {
        "config": dict(vars(args)),
        "model": name,
        "frames": {"short": frames, "full": full},
        "clips": {
            "train": len(tr_w),
            "eval": len(ev_w),
            "classes": labels,
            "source": "synthetic chirps" if args.quick else "the speech task (train.speech_data)",
        },
        "features": features,
        "probe": probes,
        "time": timing,
        "times_s": times,
    }
    path = recorder.write(args.out, result, args.out_dir)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
