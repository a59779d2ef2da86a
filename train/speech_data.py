"""Spoken-language identification from synthesised speech: the audio task of ``whisper_methods``.

    python -m train.speech_data --out data/speech_langid      # 1,400 clips of 1.5-3.5 s, a few minutes

Ten languages (English, German, Dutch, Swedish, Danish, Spanish, Portuguese, Italian, French, Polish: three
groups of close relatives) are spoken by ``espeak-ng`` and reshaped by ``sox``; the label is the language. The
split cannot leak: validation clips use sentences *and* voice families that never occur in training
(:mod:`train.speech_sentences`: per language 20 training and 10 validation sentences, 6 and 2 clips of each:
1,200 training and 200 validation clips; 39 training and 25 validation voice variants, a voice and its numbered
variants always on the same side). Every clip draws its own speaking rate (130-210 words per minute), pitch (20-80 of
espeak's 0-99), ``sox`` tempo (0.9-1.1x) and, for half the clips, reverberation; then a leading silence of up
to 0.25 s, a gain (peak 0.3-0.9) and white or pink noise at 5-30 dB SNR. All draws come from one seed, so
the same command writes the same clips.

The folder gets ``train.jsonl`` / ``eval.jsonl`` (one row per clip: ``audio`` (a WAV path relative to the
folder), ``label`` (class index), ``language``, ``text``, ``voice`` and the drawn settings), ``labels.json``
(class names) and ``spec.json``, whose ``key`` hashes everything that determines the clips (sentences,
voices, counts, seed, this generator's version, the espeak-ng and sox versions): rerunning with the same key
keeps the folder as it is, a different key regenerates it. ``train.run`` reads the manifests with
``data.task: audio-classification`` (``configs/whisper_langid_lora.yaml``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from lora_jax.errors import DataError
from lora_jax.models.audio import read_wav, write_wav
from train.speech_sentences import EVAL_VARIANTS, SENTENCES, TRAIN_VARIANTS, VOICES

VERSION = 3  # bump when the synthesis or the augmentation changes
RATE = 16000
N_TRAIN_SENTENCES = 20  # per language; the rest are validation sentences


def tools() -> dict[str, str]:
    """The versions of ``espeak-ng`` and ``sox``; :class:`~lora_jax.errors.DataError` when one is missing."""
    out = {}
    for tool, flag in (("espeak-ng", "--version"), ("sox", "--version")):
        if shutil.which(tool) is None:
            raise DataError(
                f"{tool} is not installed; the speech task needs espeak-ng and sox "
                "(Debian/Ubuntu: apt-get install -y espeak-ng sox; scripts/setup.sh installs them)"
            )
        res = subprocess.run([tool, flag], capture_output=True, text=True, check=False)
        out[tool] = (res.stdout or res.stderr).strip().splitlines()[0] if (res.stdout or res.stderr) else "?"
    return out


def synthesize(
    text: str,
    voice: str,
    *,
    speed: int = 175,
    pitch: int = 50,
    tempo: float = 1.0,
    reverb: int | None = None,
    workdir: str | os.PathLike | None = None,
) -> np.ndarray:
    """``text`` spoken by espeak-ng ``voice`` (e.g. ``"de+m3"``) at ``speed`` words per minute and ``pitch``
    (0-99), resampled by sox to 16 kHz mono with ``tempo`` (time stretch without a pitch change) and
    ``reverb`` (0-100, ``None``: none): float32 samples in [-1, 1]."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        raw, out = Path(tmp) / "espeak.wav", Path(tmp) / "clip.wav"
        res = subprocess.run(
            ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(raw), text],
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode or not raw.is_file():
            raise DataError(f"espeak-ng -v {voice} failed on {text!r}: {res.stderr.strip()}")
        effects = (["tempo", f"{tempo:.3f}"] if tempo != 1.0 else []) + (["reverb", str(reverb)] if reverb else [])
        # -D: no dither (sox dithers with fresh noise by default, so its output would differ from run to run)
        res = subprocess.run(
            ["sox", "-D", str(raw), "-r", str(RATE), "-c", "1", "-b", "16", str(out), *effects],
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode:
            raise DataError(f"sox failed on the clip of {text!r} ({' '.join(effects)}): {res.stderr.strip()}")
        wave, rate = read_wav(out)
    if rate != RATE:
        raise DataError(f"sox wrote {rate} Hz, expected {RATE}")
    return wave


def _noise(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    white = rng.standard_normal(n)
    if kind == "white":
        return white
    spectrum = np.fft.rfft(white)  # pink: power falling as 1 / f
    spectrum /= np.sqrt(np.maximum(np.arange(spectrum.size), 1.0))
    return np.fft.irfft(spectrum, n)


def make_clip(rng: np.random.Generator, text: str, voice: str, workdir=None) -> tuple[np.ndarray, dict]:
    """One augmented clip of ``text`` in ``voice`` with settings drawn from ``rng``: ``(samples, settings)``."""
    s = {
        "speed": int(rng.integers(130, 211)),
        "pitch": int(rng.integers(20, 81)),
        "tempo": round(float(rng.uniform(0.9, 1.1)), 3),
        "reverb": int(rng.integers(10, 60)) if rng.random() < 0.5 else None,
        "lead_s": round(float(rng.uniform(0.0, 0.25)), 3),
        "peak": round(float(rng.uniform(0.3, 0.9)), 3),
        "noise": str(rng.choice(["white", "pink"])),
        "snr_db": round(float(rng.uniform(5.0, 30.0)), 1),
    }
    speech = synthesize(
        text, voice, speed=s["speed"], pitch=s["pitch"], tempo=s["tempo"], reverb=s["reverb"], workdir=workdir
    )
    speech = speech / max(float(np.abs(speech).max()), 1e-6) * s["peak"]
    wave = np.concatenate([np.zeros(int(s["lead_s"] * RATE), np.float32), speech])
    noise = _noise(rng, wave.size, s["noise"])
    power = float(np.mean(speech.astype(np.float64) ** 2))
    noise *= np.sqrt(power / 10 ** (s["snr_db"] / 10) / max(float(np.mean(noise**2)), 1e-12))
    return np.clip(wave + noise, -1.0, 1.0).astype(np.float32), s


def plan(
    languages: list[str],
    train_per_sentence: int,
    eval_per_sentence: int,
    seed: int,
    n_train: int = N_TRAIN_SENTENCES,
    n_eval: int | None = None,
) -> dict[str, list[dict]]:
    """Every clip to make, per split: ``{"train": [...], "eval": [...]}`` rows with language, label, text,
    voice and the clip's own seed; a pure function of its arguments."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list[dict]] = {"train": [], "eval": []}
    for label, lang in enumerate(languages):
        sentences = SENTENCES[lang]
        splits = {
            "train": (sentences[:n_train], TRAIN_VARIANTS, train_per_sentence),
            "eval": (sentences[N_TRAIN_SENTENCES:][:n_eval], EVAL_VARIANTS, eval_per_sentence),
        }
        for split, (texts, variants, per) in splits.items():
            for text in texts:
                for v in rng.choice(len(variants), size=per, replace=per > len(variants)):
                    rows[split].append(
                        {
                            "language": lang,
                            "label": label,
                            "text": text,
                            "voice": f"{VOICES[lang]}+{variants[int(v)]}",
                            "seed": int(rng.integers(2**31)),
                        }
                    )
    return rows


def spec_key(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def generate(
    out: str | os.PathLike,
    *,
    languages: list[str] | None = None,
    train_per_sentence: int = 6,
    eval_per_sentence: int = 2,
    seed: int = 0,
    n_train: int = N_TRAIN_SENTENCES,
    n_eval: int | None = None,
    workers: int = 2,
    print_fn=print,
) -> Path:
    """Write the task into ``out`` (see the module docstring), or keep it when ``out/spec.json`` has the same
    key. ``n_train`` / ``n_eval``: sentences per language used (a tiny slice for tests). Returns ``out``."""
    languages = list(languages or VOICES)
    unknown = sorted(set(languages) - set(VOICES))
    if unknown:
        raise DataError(f"unknown languages {unknown}; choose from {sorted(VOICES)}")
    out = Path(out)
    rows = plan(languages, train_per_sentence, eval_per_sentence, seed, n_train, n_eval)
    spec = {"version": VERSION, "languages": languages, "rows": rows, "tools": tools(), "rate": RATE}
    key = spec_key(spec)
    spec_file = out / "spec.json"
    if (
        spec_file.is_file()
        and json.loads(spec_file.read_text()).get("key") == key
        and all((out / f"{s}.jsonl").is_file() for s in rows)
    ):
        print_fn(f"{out}: up to date (key {key})")
        return out
    if spec_file.exists():
        spec_file.unlink()  # the folder is rewritten; until the end it holds no valid spec
    for split in rows:
        shutil.rmtree(out / "clips" / split, ignore_errors=True)
        (out / "clips" / split).mkdir(parents=True, exist_ok=True)

    def make(job):
        split, i, row = job
        wave, settings = make_clip(np.random.default_rng(row["seed"]), row["text"], row["voice"])
        path = Path("clips") / split / f"{i:05d}.wav"
        write_wav(out / path, wave, RATE)
        return {
            "audio": str(path),
            **{k: row[k] for k in ("label", "language", "text", "voice")},
            **settings,
            "seconds": round(wave.size / RATE, 3),
        }

    for split, split_rows in rows.items():
        jobs = [(split, i, r) for i, r in enumerate(split_rows)]
        with ThreadPoolExecutor(max(1, workers)) as pool:
            made = list(pool.map(make, jobs))
        with open(out / f"{split}.jsonl", "w") as f:
            for m in made:
                f.write(json.dumps(m, ensure_ascii=False) + "\n")
        secs = [m["seconds"] for m in made]
        print_fn(f"{split}: {len(made)} clips, {np.mean(secs):.2f} s on average ({min(secs):.2f}-{max(secs):.2f})")
    (out / "labels.json").write_text(json.dumps(languages) + "\n")
    spec_file.write_text(
        json.dumps(
            {
                "key": key,
                "version": VERSION,
                "languages": languages,
                "train_per_sentence": train_per_sentence,
                "eval_per_sentence": eval_per_sentence,
                "seed": seed,
                "tools": spec["tools"],
            },
            indent=1,
        )
        + "\n"
    )
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.speech_data", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="data/speech_langid")
    ap.add_argument("--languages", default=",".join(VOICES), help="comma-separated, of " + ",".join(VOICES))
    ap.add_argument("--train-per-sentence", type=int, default=6, help="clips per training sentence")
    ap.add_argument("--eval-per-sentence", type=int, default=2, help="clips per validation sentence")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    generate(
        args.out,
        languages=args.languages.split(","),
        train_per_sentence=args.train_per_sentence,
        eval_per_sentence=args.eval_per_sentence,
        seed=args.seed,
        workers=args.workers,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
