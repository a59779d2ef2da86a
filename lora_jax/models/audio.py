"""Whisper's log-mel front end in numpy: the features ``transformers.WhisperFeatureExtractor`` computes, without
torch.

    fe = FeatureExtractor()                                   # 80 mel bins, 16 kHz, hop 160, n_fft 400
    feats = fe(waveforms, num_frames=300)                     # (B, 80, 300) float32: 3 s windows
    feats = fe(waveforms)                                     # (B, 80, 3000): Hugging Face's 30 s windows

Per waveform: pad with zeros (or cut) to ``num_frames * hop_length`` samples; short-time Fourier transform with a
periodic Hann window of ``n_fft`` samples, centred frames (the signal reflect-padded by ``n_fft // 2`` at both
ends), hop ``hop_length``; power spectrum; the last frame dropped (``num_frames`` remain); Slaney-normalised mel
filter bank (0-8 kHz); ``log10(max(mel, 1e-10))``; floored at the example's maximum minus 8; ``(x + 4) / 4``.

With the default 30 s window this equals Hugging Face's features (within float32 rounding: their STFT runs
in torch when torch is installed). With a shorter window the frames are the first ``num_frames`` of Hugging
Face's 30 s features whenever the clip ends at least ``n_fft // 2`` samples before the window does (the
reflect padding then mirrors zeros, as it does in the 30 s window) and its loudest frame lies inside the
window; the Whisper models here accept such shorter inputs (:mod:`lora_jax.models.whisper`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from lora_jax.errors import ArgumentError, DataError

PREPROCESSOR_NAME = "preprocessor_config.json"


def hz_to_mel(freq: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above (27 mels per factor 6.4)."""
    freq = np.asarray(freq, np.float64)
    mels = 3.0 * freq / 200.0
    log = freq >= 1000.0
    return np.where(log, 15.0 + np.log(np.maximum(freq, 1e-12) / 1000.0) * (27.0 / np.log(6.4)), mels)


def mel_to_hz(mels: np.ndarray) -> np.ndarray:
    """Inverse of :func:`hz_to_mel`."""
    mels = np.asarray(mels, np.float64)
    freq = 200.0 * mels / 3.0
    return np.where(mels >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (mels - 15.0)), freq)


def mel_filter_bank(
    num_frequency_bins: int = 201,
    num_mel_filters: int = 80,
    sampling_rate: int = 16000,
    min_frequency: float = 0.0,
    max_frequency: float = 8000.0,
) -> np.ndarray:
    """Triangular filters equally spaced on the Slaney mel scale, each scaled to unit area (Slaney
    normalisation): ``(num_frequency_bins, num_mel_filters)`` float64, the matrix Whisper multiplies the power
    spectrum by."""
    fft_freqs = np.linspace(0.0, sampling_rate / 2, num_frequency_bins)
    mel_points = np.linspace(hz_to_mel(min_frequency), hz_to_mel(max_frequency), num_mel_filters + 2)
    edges = mel_to_hz(mel_points)
    widths = np.diff(edges)
    slopes = edges[None, :] - fft_freqs[:, None]
    rising = -slopes[:, :-2] / widths[:-1]
    falling = slopes[:, 2:] / widths[1:]
    filters = np.maximum(0.0, np.minimum(rising, falling))
    return filters * (2.0 / (edges[2:] - edges[:-2]))[None, :]


def hann_window(n: int) -> np.ndarray:
    """Periodic Hann window of ``n`` samples (``torch.hann_window(n)``)."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
    """Whisper's log-mel features (the settings of ``WhisperFeatureExtractor``; its defaults are Whisper's).

    ``chunk_length``: seconds of the default window (30: 3000 frames). Calling it on a waveform ``(N,)`` or a
    batch ``(B, N)`` / list of 1-D arrays at ``sampling_rate`` returns ``(B, feature_size, num_frames)`` float32.
    """

    feature_size: int = 80
    sampling_rate: int = 16000
    hop_length: int = 160
    chunk_length: int = 30
    n_fft: int = 400
    padding_value: float = 0.0

    @property
    def nb_max_frames(self) -> int:
        """Frames of the default window: ``chunk_length * sampling_rate / hop_length`` (3000)."""
        return self.chunk_length * self.sampling_rate // self.hop_length

    @property
    def mel_filters(self) -> np.ndarray:
        return _filters(self.n_fft // 2 + 1, self.feature_size, self.sampling_rate)

    def __call__(self, waveforms, num_frames: int | None = None, sampling_rate: int | None = None) -> np.ndarray:
        if sampling_rate is not None and sampling_rate != self.sampling_rate:
            raise ArgumentError(
                f"Whisper features need audio at {self.sampling_rate} Hz, got {sampling_rate} Hz (resample it first)"
            )
        if isinstance(waveforms, np.ndarray) and waveforms.ndim == 1:
            waveforms = [waveforms]
        elif isinstance(waveforms, np.ndarray) and waveforms.ndim != 2:
            raise ArgumentError(
                f"expected a waveform (N,) or a batch (B, N) of mono audio, got shape {waveforms.shape}"
            )
        frames = self.nb_max_frames if num_frames is None else int(num_frames)
        if frames < 1:
            raise ArgumentError(f"num_frames must be >= 1, got {num_frames}")
        return np.stack([self.log_mel(np.asarray(w, np.float32), frames) for w in waveforms])

    def log_mel(self, waveform: np.ndarray, num_frames: int) -> np.ndarray:
        """``(feature_size, num_frames)`` features of one mono waveform (padded or cut to the window)."""
        if waveform.ndim != 1:
            raise ArgumentError(f"expected a mono waveform (N,), got shape {waveform.shape}")
        n = num_frames * self.hop_length
        x = np.full(n, self.padding_value, np.float32)
        x[: min(n, len(waveform))] = waveform[:n]
        half = self.n_fft // 2
        x = np.pad(x.astype(np.float64), (half, half), mode="reflect")
        starts = np.arange(num_frames) * self.hop_length  # frame num_frames (the last) is dropped
        frames = x[starts[:, None] + np.arange(self.n_fft)[None, :]] * hann_window(self.n_fft)[None, :]
        power = np.abs(np.fft.rfft(frames, axis=-1)) ** 2  # (num_frames, n_fft // 2 + 1)
        mel = power @ self.mel_filters  # (num_frames, feature_size)
        log_spec = np.log10(np.maximum(mel, 1e-10)).T
        log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
        return ((log_spec + 4.0) / 4.0).astype(np.float32)

    # ---- Hugging Face's preprocessor_config.json

    def to_dict(self) -> dict:
        return {
            "feature_extractor_type": "WhisperFeatureExtractor",
            "feature_size": self.feature_size,
            "sampling_rate": self.sampling_rate,
            "hop_length": self.hop_length,
            "chunk_length": self.chunk_length,
            "n_fft": self.n_fft,
            "padding_value": self.padding_value,
            "n_samples": self.chunk_length * self.sampling_rate,
            "nb_max_frames": self.nb_max_frames,
            "padding_side": "right",
            "return_attention_mask": False,
        }

    def save_pretrained(self, folder) -> Path:
        """Write ``preprocessor_config.json`` (``transformers.WhisperFeatureExtractor.from_pretrained`` reads it)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / PREPROCESSOR_NAME).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return folder / PREPROCESSOR_NAME

    @classmethod
    def from_pretrained(cls, folder) -> FeatureExtractor:
        """From a folder's ``preprocessor_config.json`` (the defaults when it has none)."""
        file = Path(folder) / PREPROCESSOR_NAME
        if not file.is_file():
            return cls()
        raw = json.loads(file.read_text())
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in fields})

    @classmethod
    def for_model(cls, num_mel_bins: int) -> FeatureExtractor:
        """The extractor of a Whisper model with ``num_mel_bins`` (80; 128 for large-v3)."""
        return cls(feature_size=num_mel_bins)


_FILTER_CACHE: dict[tuple[int, int, int], np.ndarray] = {}


def _filters(bins: int, mels: int, rate: int) -> np.ndarray:
    key = (bins, mels, rate)
    if key not in _FILTER_CACHE:
        _FILTER_CACHE[key] = mel_filter_bank(bins, mels, rate, 0.0, 8000.0)
    return _FILTER_CACHE[key]


def read_wav(path) -> tuple[np.ndarray, int]:
    """A PCM WAV file as ``(float32 samples in [-1, 1], sampling rate)``, mono (channels averaged)."""
    import wave

    with wave.open(str(path), "rb") as f:
        channels, width, rate, n = f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()
        raw = f.readframes(n)
    if width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 4:
        x = np.frombuffer(raw, "<i4").astype(np.float32) / 2147483648.0
    elif width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    else:
        raise DataError(f"{path}: {8 * width}-bit WAV samples are not supported (8, 16 or 32-bit PCM)")
    if channels > 1:
        x = x.reshape(-1, channels).mean(axis=1)
    return x, rate


def write_wav(path, samples: np.ndarray, sampling_rate: int = 16000) -> None:
    """Write mono float samples in [-1, 1] as 16-bit PCM WAV."""
    import wave

    pcm = np.clip(np.round(np.asarray(samples, np.float64) * 32767.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sampling_rate)
        f.writeframes(pcm.tobytes())


__all__ = ["FeatureExtractor", "hann_window", "hz_to_mel", "mel_filter_bank", "mel_to_hz", "read_wav", "write_wav"]
