"""Whisper's audio encoder (Radford et al. 2022) as a Flax Linen module whose projections all run through
:mod:`lora_jax.ops`, and the audio-classification head of ``transformers.WhisperForAudioClassification``.

Read top to bottom: ``Config`` -> convolutions and sinusoidal positions -> attention -> pre-LayerNorm layer ->
encoder -> :class:`WhisperEncoderModel` / :class:`WhisperForAudioClassification` -> Hugging Face weights.

The input is Whisper's log-mel spectrogram ``(B, num_mel_bins, T)`` (:mod:`lora_jax.models.audio` computes it
without torch). Two convolutions (kernel 3; the second with stride 2) with GELU turn it into ``T / 2``
frames of ``d_model``, sinusoidal position embeddings are added, then ``encoder_layers`` pre-LayerNorm
transformer layers and a final LayerNorm. Hugging Face's encoder accepts exactly ``T = 2 *
max_source_positions`` (3000 frames, 30 s of audio) and so does this one by default; with
``allow_shorter=True`` (the default of :func:`build`) it also accepts any even ``T`` below that and adds the
first ``T / 2`` position embeddings, which lets a task on clips of a few seconds skip 27 s of silence (the
network then sees a shorter context than Whisper was trained on: a fine-tuned model should be used with the
window it was trained with). At the full length both paths are the same computation.

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

``task="base"`` (:class:`WhisperEncoderModel`) has the ``encoder/...`` tree alone. A checkpoint of the whole
speech recogniser (``WhisperForConditionalGeneration`` / ``WhisperModel``) stores the encoder as
``model.encoder.*``; its decoder is not used. So ``lora.init(params, targets="qv")`` adapts
``encoder/layers_N/self_attn/{q,v}_proj/kernel`` like PEFT's ``target_modules=["q_proj", "v_proj"]``; the
convolutions are not linear layers and no preset selects them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import ops
from lora_jax.core import is_lora_weight
from lora_jax.errors import CheckpointError
from lora_jax.models.layers import Dense

Array = jax.Array
Dtype = Any
logger = logging.getLogger("lora_jax.models")

MODEL_TYPES = ("whisper",)
TASKS = ("base", "audio-classification")
# Hugging Face task names the training job and users may pass for the classification head.
_TASK_ALIASES = {"sequence-classification": "audio-classification", "classification": "audio-classification"}

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


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

    def __post_init__(self):
        if self.d_model % self.encoder_attention_heads:
            raise ValueError(f"Whisper d_model {self.d_model} must be a multiple of encoder_attention_heads "
                             f"{self.encoder_attention_heads}")
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(f"Whisper activation_function {self.activation_function!r} is not supported; expected "
                             f"one of {sorted(ACTIVATIONS)}")
        if self.labels is not None and len(self.labels) != self.num_labels:
            raise ValueError(f"Whisper labels {self.labels} must have num_labels={self.num_labels} entries")

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
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in MODEL_TYPES:
            raise ValueError(f"whisper.Config.from_hf expects a config with model_type in {MODEL_TYPES}, got "
                             f"{model_type!r}")
        if hf_config.activation_function not in ACTIVATIONS:
            raise ValueError(f"Whisper activation_function {hf_config.activation_function!r} is not supported; "
                             f"expected one of {sorted(ACTIVATIONS)}")
        num_labels = int(getattr(hf_config, "num_labels", 2))
        id2label = {int(k): str(v) for k, v in (getattr(hf_config, "id2label", None) or {}).items()}
        labels = tuple(id2label.get(i, f"LABEL_{i}") for i in range(num_labels))
        if labels == tuple(f"LABEL_{i}" for i in range(num_labels)):
            labels = None
        return cls(
            num_mel_bins=hf_config.num_mel_bins, d_model=hf_config.d_model, encoder_layers=hf_config.encoder_layers,
            encoder_attention_heads=hf_config.encoder_attention_heads, encoder_ffn_dim=hf_config.encoder_ffn_dim,
            activation_function=hf_config.activation_function, max_source_positions=hf_config.max_source_positions,
            dropout=float(hf_config.dropout), attention_dropout=float(hf_config.attention_dropout),
            activation_dropout=float(hf_config.activation_dropout), init_std=float(hf_config.init_std),
            classifier_proj_size=int(hf_config.classifier_proj_size), num_labels=num_labels, labels=labels,
            use_weighted_layer_sum=bool(hf_config.use_weighted_layer_sum), vocab_size=hf_config.vocab_size,
            decoder_layers=hf_config.decoder_layers, decoder_attention_heads=hf_config.decoder_attention_heads,
            decoder_ffn_dim=hf_config.decoder_ffn_dim, max_target_positions=hf_config.max_target_positions)

    def to_hf(self):
        """The equivalent ``transformers.WhisperConfig``."""
        import transformers

        id2label = {i: (self.labels[i] if self.labels else f"LABEL_{i}") for i in range(self.num_labels)}
        return transformers.WhisperConfig(
            num_mel_bins=self.num_mel_bins, d_model=self.d_model, encoder_layers=self.encoder_layers,
            encoder_attention_heads=self.encoder_attention_heads, encoder_ffn_dim=self.encoder_ffn_dim,
            activation_function=self.activation_function, max_source_positions=self.max_source_positions,
            dropout=self.dropout, attention_dropout=self.attention_dropout,
            activation_dropout=self.activation_dropout, init_std=self.init_std,
            classifier_proj_size=self.classifier_proj_size, use_weighted_layer_sum=self.use_weighted_layer_sum,
            vocab_size=self.vocab_size, decoder_layers=self.decoder_layers,
            decoder_attention_heads=self.decoder_attention_heads, decoder_ffn_dim=self.decoder_ffn_dim,
            max_target_positions=self.max_target_positions, id2label=id2label,
            label2id={v: k for k, v in id2label.items()})


# --------------------------------------------------------------------------------------------- layers


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's position table ``(length, channels)``: ``[sin(t * f_i), cos(t * f_i)]`` with ``channels / 2``
    frequencies ``f_i`` geometrically spaced from 1 to ``1 / max_timescale``."""
    if channels % 2:
        raise ValueError(f"sinusoids need an even number of channels, got {channels}")
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv = np.exp(-increment * np.arange(channels // 2, dtype=np.float64))
    t = np.arange(length, dtype=np.float64)[:, None] * inv[None, :]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(np.float32)


def _layer_norm(config: Config, dtype: Dtype, name: str) -> nn.LayerNorm:
    # Exact variance (E[(x - mean)^2]) as torch computes it; statistics in float32 whatever the compute dtype.
    return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype, use_fast_variance=False, name=name)


class Conv1d(nn.Module):
    """``torch.nn.Conv1d`` over ``(B, T, C_in)`` (channels last): ``kernel (k, C_in, C_out)``, zero padding
    ``padding`` on both sides, ``stride``; output ``(B, T', C_out)``, ``T' = (T + 2 * padding - k) // stride + 1``."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: int = 1
    dtype: Dtype = jnp.float32
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.variable("params", "kernel", lambda: self.init_std * jax.random.normal(
            self.make_rng("params"), (self.kernel_size, x.shape[-1], self.features), jnp.float32)).value
        bias = self.variable("params", "bias", lambda: jnp.zeros((self.features,), jnp.float32)).value
        y = jax.lax.conv_general_dilated(x.astype(self.dtype), ops.astype(kernel, self.dtype), (self.stride,),
                                         [(self.padding, self.padding)], dimension_numbers=("NWC", "WIO", "NWC"))
        return y + bias.astype(self.dtype)


class Attention(nn.Module):
    """Multi-head self-attention over all frames (HF ``WhisperAttention``, encoder use): ``(B, T, D)`` ->
    ``(B, T, D)``. ``k_proj`` has no bias. Scores and softmax run in float32."""

    config: Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        c = self.config
        b, t, _ = x.shape
        dense = lambda name, bias=True: Dense(c.d_model, use_bias=bias, dtype=self.dtype,  # noqa: E731
                                              kernel_init=nn.initializers.normal(c.init_std), name=name)
        heads = lambda h: h.reshape(b, t, c.encoder_attention_heads, c.head_dim)  # noqa: E731
        q = heads(dense("q_proj")(x) * (c.head_dim ** -0.5))  # HF scales the query, bias included
        k, v = heads(dense("k_proj", bias=False)(x)), heads(dense("v_proj")(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        probs = nn.Dropout(c.attention_dropout)(probs, deterministic=deterministic)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, c.d_model)
        return dense("out_proj")(out)


class EncoderLayer(nn.Module):
    """Pre-LayerNorm transformer layer: ``x + attn(LN(x))``, then ``x + fc2(act(fc1(LN(x))))``."""

    config: Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        c = self.config
        dense = lambda n, name: Dense(n, dtype=self.dtype, kernel_init=nn.initializers.normal(c.init_std),  # noqa
                                      name=name)
        h = Attention(c, self.dtype, name="self_attn")(_layer_norm(c, self.dtype, "self_attn_layer_norm")(x),
                                                       deterministic)
        x = x + nn.Dropout(c.dropout)(h, deterministic=deterministic)
        h = ACTIVATIONS[c.activation_function](dense(c.encoder_ffn_dim, "fc1")(
            _layer_norm(c, self.dtype, "final_layer_norm")(x)))
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
    def __call__(self, input_features: Array, deterministic: bool = True,
                 output_hidden_states: bool = False) -> EncoderOutput:
        c = self.config
        if input_features.ndim != 3 or input_features.shape[1] != c.num_mel_bins:
            raise ValueError(f"Whisper expects log-mel features of shape (batch, {c.num_mel_bins}, frames), got "
                             f"{input_features.shape}")
        frames = input_features.shape[2]
        if frames != c.num_frames and not (self.allow_shorter and frames % 2 == 0 and 0 < frames < c.num_frames):
            hint = "or an even number below it" if self.allow_shorter else \
                "(build(..., allow_shorter=True) accepts an even number below it)"
            raise ValueError(f"Whisper expects {c.num_frames} mel frames {hint}, got {frames}")
        act = ACTIVATIONS[c.activation_function]
        x = jnp.swapaxes(input_features, 1, 2).astype(self.dtype)  # (B, T, M)
        x = act(Conv1d(c.d_model, dtype=self.dtype, init_std=c.init_std, name="conv1")(x))
        x = act(Conv1d(c.d_model, stride=2, dtype=self.dtype, init_std=c.init_std, name="conv2")(x))
        table = self.variable("params", "embed_positions", lambda: {"embedding": jnp.asarray(
            sinusoids(c.max_source_positions, c.d_model))}).value["embedding"]
        x = x + ops.astype(table, self.dtype)[: x.shape[1]]
        x = nn.Dropout(c.dropout)(x, deterministic=deterministic)
        states = [x]
        for i in range(c.encoder_layers):
            x = EncoderLayer(c, self.dtype, name=f"layers_{i}")(x, deterministic)
            states.append(x)
        x = _layer_norm(c, self.dtype, "layer_norm")(x)
        states[-1] = x
        return EncoderOutput(x, tuple(states) if output_hidden_states else None)


class WhisperEncoderModel(nn.Module):
    """The encoder under ``encoder/`` (as HF names it inside every Whisper model): ``__call__(input_features,
    deterministic=True, output_hidden_states=False)`` -> :class:`EncoderOutput`."""

    config: Config
    dtype: Dtype = jnp.float32
    allow_shorter: bool = False

    @nn.compact
    def __call__(self, input_features: Array, deterministic: bool = True,
                 output_hidden_states: bool = False) -> EncoderOutput:
        return WhisperEncoder(self.config, self.dtype, self.allow_shorter, name="encoder")(
            input_features, deterministic, output_hidden_states)


class WhisperForAudioClassification(nn.Module):
    """HF ``WhisperForAudioClassification``: encoder states (the last, or a softmax-weighted sum of all
    ``L + 1`` with ``use_weighted_layer_sum``) -> ``projector`` -> mean over frames -> ``classifier`` -> logits
    ``(B, num_labels)``. ``__call__(input_features (B, M, T), deterministic=True)``."""

    config: Config
    dtype: Dtype = jnp.float32
    allow_shorter: bool = False

    @nn.compact
    def __call__(self, input_features: Array, deterministic: bool = True) -> Array:
        c = self.config
        out = WhisperEncoder(c, self.dtype, self.allow_shorter, name="encoder")(
            input_features, deterministic, output_hidden_states=c.use_weighted_layer_sum)
        if c.use_weighted_layer_sum:
            n = c.encoder_layers + 1
            weights = self.param("layer_weights", lambda _: jnp.full((n,), 1.0 / n, jnp.float32))
            norm = jax.nn.softmax(weights.astype(jnp.float32)).astype(self.dtype)
            h = jnp.einsum("l,lbtd->btd", norm, jnp.stack(out.hidden_states))
        else:
            h = out.last_hidden_state
        dense = lambda n, name: Dense(n, dtype=self.dtype, kernel_init=nn.initializers.normal(c.init_std),  # noqa
                                      name=name)
        pooled = jnp.mean(dense(c.classifier_proj_size, "projector")(h).astype(jnp.float32), axis=1)
        return dense(c.num_labels, "classifier")(pooled.astype(self.dtype))


def build(config: Config, dtype: Dtype = jnp.float32, task: str | None = None,
          allow_shorter: bool = True) -> nn.Module:
    """The Linen module for ``task``: ``"base"`` -> :class:`WhisperEncoderModel`, ``None`` /
    ``"audio-classification"`` (alias ``"sequence-classification"``) -> :class:`WhisperForAudioClassification`.
    ``allow_shorter``: accept inputs shorter than 30 s (see the module docstring); ``False`` enforces Hugging
    Face's 3000 frames."""
    task = _check_task(task)
    cls = WhisperEncoderModel if task == "base" else WhisperForAudioClassification
    return cls(config, dtype, allow_shorter)


def init_params(config: Config, key: Array, task: str | None = None) -> dict:
    """Randomly initialised float32 parameters (HF's scheme: N(0, init_std) kernels, zero biases, unit
    LayerNorm scales, the sinusoid position table, uniform layer weights)."""
    x = jnp.zeros((1, config.num_mel_bins, 2), jnp.float32)
    return build(config, jnp.float32, task).init(key, x)["params"]


def init_head(config: Config, key: Array) -> dict:
    """The classification head alone, initialised by :func:`init_params`' scheme (``projector``,
    ``classifier``: N(0, init_std) kernels, zero biases; ``layer_weights`` uniform with
    ``use_weighted_layer_sum``) from a numpy generator seeded by ``key``, without building the encoder or
    compiling anything."""
    c = config
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    normal = lambda *shape: jnp.asarray((c.init_std * rng.standard_normal(shape)).astype(np.float32))  # noqa
    head = {"projector": {"kernel": normal(c.d_model, c.classifier_proj_size),
                          "bias": jnp.zeros((c.classifier_proj_size,))},
            "classifier": {"kernel": normal(c.classifier_proj_size, c.num_labels), "bias": jnp.zeros((c.num_labels,))}}
    if c.use_weighted_layer_sum:
        head["layer_weights"] = jnp.full((c.encoder_layers + 1,), 1.0 / (c.encoder_layers + 1))
    return head


def _check_task(task: str | None) -> str:
    task = "audio-classification" if task is None else _TASK_ALIASES.get(task, task)
    if task not in TASKS:
        raise ValueError(f"Whisper supports tasks {TASKS} (and 'sequence-classification' for the audio head), "
                         f"got {task!r}")
    return task


# ------------------------------------------------------------------------------- Hugging Face weights

_DECODER = re.compile(r"(model\.)?(decoder\.|proj_out\.).*")


def hf_name(path: tuple[str, ...]) -> str:
    """The Hugging Face tensor name of a parameter path, e.g. ``("encoder", "layers_0", "self_attn", "q_proj",
    "kernel")`` -> ``"encoder.layers.0.self_attn.q_proj.weight"``; ``("layer_weights",)`` -> ``"layer_weights"``."""
    if tuple(path) == ("layer_weights",):
        return "layer_weights"
    *modules, leaf = path
    modules = [re.sub(r"^layers_(\d+)$", r"layers.\1", m) for m in modules]
    return ".".join(modules + ["bias" if leaf == "bias" else "weight"])


def _to_hf_layout(path: tuple[str, ...], x: np.ndarray) -> np.ndarray:
    if path[-1] != "kernel":
        return x
    return np.ascontiguousarray(np.transpose(x, (2, 1, 0)) if x.ndim == 3 else x.T)


def _from_hf_layout(path: tuple[str, ...], x: np.ndarray) -> np.ndarray:
    return _to_hf_layout(path, x)  # both transposes are involutions


def _hf_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(reversed(shape)) if path[-1] == "kernel" else tuple(shape)


def _flat(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflat(flat: Mapping[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def _expected(config: Config, task: str) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    return _flat(jax.eval_shape(lambda: init_params(config, jax.random.key(0), task)))


def _is_head(path: tuple[str, ...]) -> bool:
    return path[0] != "encoder"


def adapt_to_checkpoint(config: Config, names, task: str | None) -> tuple[Config, str]:
    """The task when none is asked for: ``"audio-classification"`` when the checkpoint has a ``classifier``,
    else ``"base"`` (a speech recogniser's encoder)."""
    if task is None:
        task = "audio-classification" if "classifier.weight" in set(names) else "base"
    return config, _check_task(task)


def from_hf_weights(config: Config, tensors: Mapping[str, np.ndarray], source: str, task: str | None = None,
                    key: Array | None = None, new: list | None = None) -> dict:
    """Parameters for ``build(config, task=task)`` from Hugging Face tensors (names as in the checkpoint).

    The encoder may be stored as ``encoder.*`` (``WhisperForAudioClassification``) or ``model.encoder.*``
    (``WhisperModel`` / ``WhisperForConditionalGeneration``, whose decoder is ignored). For the
    classification task a checkpoint without the head (``projector``, ``classifier``, ``layer_weights``) gets it
    freshly initialised from ``key`` and a warning is logged; any other missing tensor or a shape that does
    not fit ``config`` raises :class:`~lora_jax.errors.CheckpointError` naming the tensor and ``source``.
    The paths of freshly initialised parameters are appended to ``new`` when a list is given.
    """
    task = _check_task(task if task is not None else adapt_to_checkpoint(config, list(tensors.keys()), None)[1])
    names = list(tensors.keys())
    prefix = "model." if any(n.startswith("model.encoder.") for n in names) else ""
    expected = _expected(config, task)
    where = getattr(tensors, "source_of", None)
    params, fresh_paths, used = {}, [], set()
    for path, spec in expected.items():
        name = hf_name(path) if _is_head(path) else prefix + hf_name(path)
        if name not in tensors:
            if _is_head(path):
                fresh_paths.append(path)
                continue
            raise CheckpointError(f"{source}: missing tensor {name!r} (for parameter {'/'.join(path)}, shape "
                                  f"{_hf_shape(path, spec.shape)}); the checkpoint has {len(names)} tensors. Is the "
                                  "config.json from the same model?")
        x = np.asarray(tensors[name])
        want = _hf_shape(path, spec.shape)
        if tuple(x.shape) != want:
            file = where(name) if where else source
            raise CheckpointError(f"{file}: tensor {name!r} has shape {tuple(x.shape)}, expected {want} for "
                                  f"{'/'.join(path)} of a Whisper encoder with d_model={config.d_model}, "
                                  f"encoder_ffn_dim={config.encoder_ffn_dim}, num_mel_bins={config.num_mel_bins}, "
                                  f"max_source_positions={config.max_source_positions}"
                                  f"{f', num_labels={config.num_labels}' if _is_head(path) else ''}")
        if not np.issubdtype(x.dtype, np.floating) and x.dtype.name != "bfloat16":
            raise CheckpointError(f"{source}: tensor {name!r} has dtype {x.dtype}, expected a float tensor")
        params[path] = jnp.asarray(_from_hf_layout(path, x))
        used.add(name)

    if fresh_paths:
        fresh = _flat(init_head(config, jax.random.key(0) if key is None else key))
        for path in fresh_paths:
            params[path] = fresh[path]
        if new is not None:
            new.extend(fresh_paths)
        logger.warning("%s: no %s in the checkpoint; initialised new parameters %s for task %r (train them)",
                       source, sorted({hf_name(p).rsplit(".", 1)[0] for p in fresh_paths}),
                       ["/".join(p) for p in fresh_paths], task)

    unused = [n for n in names if n not in used and not _DECODER.fullmatch(n)]
    encoder_unused = [n for n in unused if n.startswith(prefix + "encoder.")]
    if encoder_unused:
        raise CheckpointError(f"{source}: {len(encoder_unused)} encoder tensor(s) do not fit the config "
                              f"({config.encoder_layers} layers): {encoder_unused[:5]}")
    if unused:
        logger.warning("%s: %d tensor(s) not used by the %s model: %s%s", source, len(unused), task, unused[:8],
                       " ..." if len(unused) > 8 else "")
    return _unflat(params)


def to_hf_weights(params: Mapping, config: Config) -> dict[str, np.ndarray]:
    """Hugging Face names and layouts for ``params`` of a :class:`WhisperForAudioClassification` (loadable by
    ``transformers.WhisperForAudioClassification``) or of a :class:`WhisperEncoderModel` (``encoder.*``).
    Parameters with LoRA still wrapped raise: merge them first (``lora.merge``)."""
    flat = _flat(params)
    wrapped = [p for p, v in flat.items() if is_lora_weight(v)]
    if wrapped:
        raise ValueError(f"to_hf_weights: params hold LoRA-wrapped kernels {['/'.join(p) for p in wrapped][:3]}; "
                         "save lora.merge(params, adapters) instead")
    task = "audio-classification" if "classifier" in params else "base"
    expected = _expected(config, task)
    if set(flat) != set(expected):
        missing = sorted("/".join(p) for p in set(expected) - set(flat))
        extra = sorted("/".join(p) for p in set(flat) - set(expected))
        raise ValueError(f"to_hf_weights: params do not match a Whisper {task} model of this config: missing "
                         f"{missing[:5]}, unexpected {extra[:5]}")
    out = {}
    for path, spec in expected.items():
        x = np.asarray(flat[path])
        if tuple(x.shape) != tuple(spec.shape):
            raise ValueError(f"to_hf_weights: {'/'.join(path)} has shape {tuple(x.shape)}, the config needs "
                             f"{tuple(spec.shape)}")
        out[hf_name(path)] = _to_hf_layout(path, x)
    return out


def hf_architectures(params: Mapping, config: Config) -> list[str]:
    """The ``architectures`` entry of ``config.json`` for these params."""
    return ["WhisperForAudioClassification" if "classifier" in params else "WhisperModel"]
