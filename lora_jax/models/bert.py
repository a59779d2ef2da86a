"""BERT (Devlin et al. 2018) as a Flax Linen encoder whose projections all run through :mod:`lora_jax.ops`.

Read top to bottom: ``Config`` -> embeddings -> self-attention -> feed-forward -> layer -> encoder ->
:class:`BertModel` / :class:`BertForSequenceClassification` -> sentence-embedding helpers -> the declaration.

Parameter paths mirror the Hugging Face module names, so a LoRA target written for PEFT reads the same here
(list index ``.N.`` -> ``_N``; ``nn.Linear.weight`` (out, in) -> ``kernel`` (in, out); ``LayerNorm.weight`` ->
``scale``; ``nn.Embedding.weight`` -> ``embedding``)::

    BertModel params                                         Hugging Face tensor
    embeddings/word_embeddings/embedding        (V, D)        embeddings.word_embeddings.weight
    embeddings/position_embeddings/embedding    (P, D)        embeddings.position_embeddings.weight
    embeddings/token_type_embeddings/embedding  (T, D)        embeddings.token_type_embeddings.weight
    embeddings/LayerNorm/{scale,bias}           (D,)          embeddings.LayerNorm.{weight,bias}
    encoder/layer_N/attention/self/{query,key,value}/kernel (D, D)
                                                              encoder.layer.N.attention.self.{query,key,value}.weight
    encoder/layer_N/attention/output/dense/kernel (D, D)      encoder.layer.N.attention.output.dense.weight
    encoder/layer_N/attention/output/LayerNorm/{scale,bias}   encoder.layer.N.attention.output.LayerNorm.*
    encoder/layer_N/intermediate/dense/kernel   (D, F)        encoder.layer.N.intermediate.dense.weight
    encoder/layer_N/output/dense/kernel         (F, D)        encoder.layer.N.output.dense.weight
    encoder/layer_N/output/LayerNorm/{scale,bias}             encoder.layer.N.output.LayerNorm.*
    pooler/dense/kernel                         (D, D)        pooler.dense.weight
    (every Dense also has a ``bias`` <-> ``.bias``)

:class:`BertForSequenceClassification` puts the tree above under ``bert/`` and adds ``classifier/kernel``
``(D, num_labels)`` and ``classifier/bias``, exactly as Hugging Face names ``bert.*`` and ``classifier.*``.
So ``lora.init(params, targets="qv")`` adapts ``.../attention/self/query/kernel`` and ``.../value/kernel`` of
every layer, like PEFT's default for BERT.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.errors import ArgumentError
from lora_jax.models.arch import Architecture, Names, Task
from lora_jax.models.layers import (
    ACTIVATIONS,
    Dense,
    Embed,
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

MODEL_TYPES = ("bert",)


# --------------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class Config:
    """BERT hyper-parameters (the fields of ``transformers.BertConfig`` this model uses).

    ``pooler``: whether the model has the pooler (HF ``add_pooling_layer``); checkpoints saved from heads
    without it (e.g. ``BertForMaskedLM``) have no ``pooler.*`` tensors. ``labels``: the class names of a
    sequence-classification head (HF ``id2label``), ``None`` for the default ``LABEL_i``.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    classifier_dropout: float | None = None
    num_labels: int = 2
    labels: tuple[str, ...] | None = None
    problem_type: str | None = None
    pooler: bool = True

    def __post_init__(self):
        check_multiple("BERT hidden_size", self.hidden_size, "num_attention_heads", self.num_attention_heads)
        check_activation(self.hidden_act, "BERT hidden_act")
        check_labels("BERT", self.labels, self.num_labels)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, hf_config) -> Config:
        """From a ``transformers`` ``BertConfig`` (or any ``PretrainedConfig`` with ``model_type == "bert"``).

        Raises ``ValueError`` for settings this encoder does not implement: decoder / cross-attention use,
        relative position embeddings, an unknown activation.
        """
        check_model_type(hf_config, MODEL_TYPES, "bert.Config.from_hf")
        if getattr(hf_config, "is_decoder", False) or getattr(hf_config, "add_cross_attention", False):
            raise ArgumentError(
                "BERT as a decoder (is_decoder / add_cross_attention) is not supported: this is the "
                "bidirectional encoder only"
            )
        pos = getattr(hf_config, "position_embedding_type", "absolute")
        if pos not in (None, "absolute"):
            raise ArgumentError(f"BERT position_embedding_type {pos!r} is not supported; only 'absolute'")
        check_activation(hf_config.hidden_act, "BERT hidden_act")
        num_labels, labels = labels_from_hf(hf_config)
        return cls(
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            num_hidden_layers=hf_config.num_hidden_layers,
            num_attention_heads=hf_config.num_attention_heads,
            intermediate_size=hf_config.intermediate_size,
            hidden_act=hf_config.hidden_act,
            hidden_dropout_prob=float(hf_config.hidden_dropout_prob),
            attention_probs_dropout_prob=float(hf_config.attention_probs_dropout_prob),
            max_position_embeddings=hf_config.max_position_embeddings,
            type_vocab_size=hf_config.type_vocab_size,
            layer_norm_eps=float(hf_config.layer_norm_eps),
            initializer_range=float(hf_config.initializer_range),
            pad_token_id=hf_config.pad_token_id,
            classifier_dropout=None if hf_config.classifier_dropout is None else float(hf_config.classifier_dropout),
            num_labels=num_labels,
            labels=labels,
            problem_type=getattr(hf_config, "problem_type", None),
        )

    def to_hf(self):
        """The equivalent ``transformers.BertConfig``."""
        import transformers

        names = id2label(self.labels, self.num_labels)
        return transformers.BertConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            hidden_act=self.hidden_act,
            hidden_dropout_prob=self.hidden_dropout_prob,
            attention_probs_dropout_prob=self.attention_probs_dropout_prob,
            max_position_embeddings=self.max_position_embeddings,
            type_vocab_size=self.type_vocab_size,
            layer_norm_eps=self.layer_norm_eps,
            initializer_range=self.initializer_range,
            pad_token_id=self.pad_token_id,
            classifier_dropout=self.classifier_dropout,
            id2label=names,
            label2id={v: k for k, v in names.items()},
            problem_type=self.problem_type,
        )


# --------------------------------------------------------------------------------------------- layers


def _layer_norm(config: Config, dtype: Dtype, name: str) -> nn.LayerNorm:
    return layer_norm(config.layer_norm_eps, dtype, name)


def _dense(config: Config, features: int, dtype: Dtype, name: str) -> Dense:
    return Dense(features, dtype=dtype, kernel_init=normal(config.initializer_range), name=name)


class Embeddings(nn.Module):
    """word + position + token-type embeddings, LayerNorm, dropout: ``(B, S)`` ids -> ``(B, S, D)``."""

    config: Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: Array, token_type_ids: Array, position_ids: Array, deterministic: bool) -> Array:
        c = self.config
        embed = lambda n, name: Embed(n, c.hidden_size, self.dtype, init_std=c.initializer_range, name=name)
        x = embed(c.vocab_size, "word_embeddings")(input_ids)
        x = x + embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids)
        x = x + embed(c.max_position_embeddings, "position_embeddings")(position_ids)
        x = _layer_norm(c, self.dtype, "LayerNorm")(x)
        return nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product attention over the whole sequence (bidirectional).

    ``x (B, S, D)``, ``mask (B, S)`` (1/True = attend to this key) -> ``(B, S, D)``. Scores and softmax run in
    float32; a key masked out gets probability 0 exactly.
    """

    config: Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array, deterministic: bool) -> Array:
        c = self.config
        b, s, _ = x.shape
        dense = lambda name: _dense(c, c.hidden_size, self.dtype, name)  # noqa: E731
        heads = lambda t: t.reshape(b, s, c.num_attention_heads, c.head_dim)
        q, k, v = heads(dense("query")(x)), heads(dense("key")(x)), heads(dense("value")(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / np.sqrt(c.head_dim)
        scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        probs = nn.Dropout(c.attention_probs_dropout_prob)(probs, deterministic=deterministic)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, c.hidden_size)


class AddNorm(nn.Module):
    """``LayerNorm(residual + dropout(dense(x)))``: HF's ``BertSelfOutput`` and ``BertOutput``."""

    config: Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, residual: Array, deterministic: bool) -> Array:
        c = self.config
        h = _dense(c, c.hidden_size, self.dtype, "dense")(x)
        h = nn.Dropout(c.hidden_dropout_prob)(h, deterministic=deterministic)
        return _layer_norm(c, self.dtype, "LayerNorm")(h + residual)


class Attention(nn.Module):
    """Self-attention followed by its output projection, residual and LayerNorm."""

    config: Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array, deterministic: bool) -> Array:
        h = SelfAttention(self.config, self.dtype, name="self")(x, mask, deterministic)
        return AddNorm(self.config, self.dtype, name="output")(h, x, deterministic)


class Intermediate(nn.Module):
    """``act(x @ W + b)``: ``(B, S, D)`` -> ``(B, S, F)``."""

    config: Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        return ACTIVATIONS[c.hidden_act](_dense(c, c.intermediate_size, self.dtype, "dense")(x))


class Layer(nn.Module):
    """One transformer layer (post-LayerNorm, as in BERT): attention, then the feed-forward block."""

    config: Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array, deterministic: bool) -> Array:
        x = Attention(self.config, self.dtype, name="attention")(x, mask, deterministic)
        h = Intermediate(self.config, self.dtype, name="intermediate")(x)
        return AddNorm(self.config, self.dtype, name="output")(h, x, deterministic)


class Encoder(nn.Module):
    config: Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array, deterministic: bool) -> Array:
        for i in range(self.config.num_hidden_layers):
            x = Layer(self.config, self.dtype, name=f"layer_{i}")(x, mask, deterministic)
        return x


class Pooler(nn.Module):
    """``tanh(dense(h[:, 0]))``: the [CLS] token's hidden state through a dense layer, ``(B, D)``."""

    config: Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array) -> Array:
        c = self.config
        return jnp.tanh(_dense(c, c.hidden_size, self.dtype, "dense")(hidden[:, 0]))


# ---------------------------------------------------------------------------------------------- models


@flax.struct.dataclass
class ModelOutput:
    """``last_hidden_state (B, S, D)``; ``pooler_output (B, D)``, or ``None`` for a model without pooler."""

    last_hidden_state: Array
    pooler_output: Array | None = None


def _default_inputs(input_ids: Array, attention_mask, token_type_ids, position_ids):
    b, s = input_ids.shape
    mask = jnp.ones((b, s), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
    types = jnp.zeros((b, s), jnp.int32) if token_type_ids is None else token_type_ids
    positions = jnp.broadcast_to(jnp.arange(s), (b, s)) if position_ids is None else position_ids
    return mask, types, positions


class BertModel(nn.Module):
    """The BERT encoder (HF ``BertModel``).

    ``__call__(input_ids (B, S) int, attention_mask (B, S) 0/1 or bool (None: all ones), token_type_ids (B, S)
    (None: zeros), position_ids (B, S) (None: 0..S-1), deterministic=True)`` -> :class:`ModelOutput`.
    Pass ``deterministic=False`` and ``rngs={"dropout": key}`` to train with dropout. ``dtype`` is the compute
    dtype (float32 or bfloat16); parameters keep whatever dtype they are stored in.
    """

    config: Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
        position_ids: Array | None = None,
        deterministic: bool = True,
    ) -> ModelOutput:
        if input_ids.ndim != 2:
            raise ArgumentError(f"BertModel expects input_ids of shape (batch, seq), got {input_ids.shape}")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ArgumentError(
                f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                f"{self.config.max_position_embeddings}"
            )
        mask, types, positions = _default_inputs(input_ids, attention_mask, token_type_ids, position_ids)
        x = Embeddings(self.config, self.dtype, name="embeddings")(input_ids, types, positions, deterministic)
        x = Encoder(self.config, self.dtype, name="encoder")(x, mask, deterministic)
        pooled = Pooler(self.config, self.dtype, name="pooler")(x) if self.config.pooler else None
        return ModelOutput(last_hidden_state=x, pooler_output=pooled)


class BertForSequenceClassification(nn.Module):
    """HF ``BertForSequenceClassification``: pooled [CLS] -> dropout -> ``classifier`` -> logits
    ``(B, num_labels)``. Same arguments as :class:`BertModel`."""

    config: Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
        position_ids: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        c = self.config
        if not c.pooler:
            raise ArgumentError("BertForSequenceClassification needs the pooler (Config.pooler=True)")
        out = BertModel(c, self.dtype, name="bert")(
            input_ids, attention_mask, token_type_ids, position_ids, deterministic
        )
        rate = c.classifier_dropout if c.classifier_dropout is not None else c.hidden_dropout_prob
        h = nn.Dropout(rate)(out.pooler_output, deterministic=deterministic)
        return _dense(c, c.num_labels, self.dtype, "classifier")(h)


# ----------------------------------------------------------------------------------- sentence embeddings


def mean_pooling(hidden: Array, attention_mask: Array) -> Array:
    """Average of the token states that the mask keeps: ``(B, S, D)``, ``(B, S)`` -> ``(B, D)`` (float32)."""
    m = jnp.asarray(attention_mask).astype(jnp.float32)[..., None]
    total = jnp.sum(hidden.astype(jnp.float32) * m, axis=1)
    return total / jnp.maximum(jnp.sum(m, axis=1), 1e-9)


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    """``x / max(||x||, eps)`` along the last axis."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def sentence_embedding(hidden: Array, attention_mask: Array, normalize: bool = True) -> Array:
    """What sentence-transformers computes for all-MiniLM-L6-v2: mean over the mask, then L2 normalise.

    ``hidden``: ``BertModel`` ``last_hidden_state (B, S, D)``; returns ``(B, D)``, unit norm when
    ``normalize``, so ``a @ b.T`` is the cosine similarity.
    """
    pooled = mean_pooling(hidden, attention_mask)
    return l2_normalize(pooled) if normalize else pooled


# -------------------------------------------------------------------------------------------- declaration


def adapt_to_checkpoint(config: Config, names: Sequence[str], task: str) -> Config:
    """What ``config.json`` does not say, from the checkpoint's tensor names: a base model has no pooler when
    the checkpoint has none (those saved from ``BertForMaskedLM``)."""
    if task == "base" and not any(re.fullmatch(r"(bert\.)?pooler\.dense\.weight", n) for n in names):
        config = dataclasses.replace(config, pooler=False)
    return config


ARCHITECTURE = Architecture(
    name="bert",
    model_types=MODEL_TYPES,
    config=Config,
    tasks={
        "base": Task(BertModel, optional=(r"pooler/.*",)),
        # a base checkpoint gets a new classifier (and pooler, if it has none)
        "sequence-classification": Task(
            BertForSequenceClassification,
            backbone="bert",
            head=(r"classifier/.*",),
            optional=(r"bert/pooler/.*",),
            hf_class="{}ForSequenceClassification",
            peft_task_type="SEQ_CLS",
        ),
    },
    names=Names(lists=("layer",), ignore=(r"embeddings\.(position_ids|token_type_ids)",)),
    presets={
        "qv": ("query", "value"),
        "attention": ("query", "key", "value", "attention.output.dense"),
        "all-linear": ("query", "key", "value", "dense"),
    },
    adapt=adapt_to_checkpoint,
)
build = ARCHITECTURE.build
init_params = ARCHITECTURE.init_params
