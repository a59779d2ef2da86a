"""What decoder-only language models share, written once: the config mapping, the pre-norm decoder block, the
stack, the language-model head, and the tables for their checkpoints.

- :class:`DecoderConfig`: the fields of ``transformers``' Llama-style configs (GQA, ``head_dim``, RoPE scaling,
  sliding windows per layer, biases, q/k norms, tied embeddings) with ``from_hf`` / ``to_hf``; a family
  subclasses it and declares its ``MODEL_TYPES`` (and overrides :meth:`DecoderConfig.hf_fields` /
  :meth:`DecoderConfig.fields_from_hf` where its ``transformers`` config differs).
- :class:`DecoderLayer` (``x + attn(norm(x))``, then ``x + mlp(norm(x))``), :class:`DecoderModel` (embeddings,
  layers, final norm, KV cache) and :class:`CausalLM` (a backbone plus ``lm_head`` or the tied embedding).
- :data:`NAMES`, :func:`tasks`, :data:`PRESETS`, :data:`GGUF_TENSORS`, :data:`GGUF_CONFIG` and
  :func:`permute_rope_rows` for the families' declarations.

Parameter paths mirror ``transformers`` (``LlamaForCausalLM`` and its relatives); these are the unrolled model's
(``scan_layers=False``), and the scanned one (the default) holds each ``layers_N`` leaf once, under ``layers``, with
a leading layer axis (``model/layers/self_attn/q_proj/kernel (L, D, H*hd)``; :mod:`lora_jax.stacking`)::

    model/embed_tokens/embedding           (V, D)          model.embed_tokens.weight
    model/layers_N/input_layernorm/scale   (D,)            model.layers.N.input_layernorm.weight
    model/layers_N/self_attn/q_proj/kernel (D, H*hd)       model.layers.N.self_attn.q_proj.weight   (+ bias)
    model/layers_N/self_attn/{k,v}_proj/kernel (D, KV*hd)  model.layers.N.self_attn.{k,v}_proj.weight
    model/layers_N/self_attn/o_proj/kernel (H*hd, D)       model.layers.N.self_attn.o_proj.weight
    model/layers_N/self_attn/{q,k}_norm/scale (hd,)        model.layers.N.self_attn.{q,k}_norm.weight (q/k norms)
    model/layers_N/post_attention_layernorm/scale          model.layers.N.post_attention_layernorm.weight
    model/layers_N/mlp/{gate,up}_proj/kernel (D, F)        model.layers.N.mlp.{gate,up}_proj.weight
    model/layers_N/mlp/down_proj/kernel    (F, D)          model.layers.N.mlp.down_proj.weight
    model/norm/scale                       (D,)            model.norm.weight
    lm_head/kernel                         (D, V)          lm_head.weight   (absent with tied embeddings)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import stacking, tree
from lora_jax.errors import ArgumentError
from lora_jax.models import attention
from lora_jax.models.arch import Names, Task
from lora_jax.models.generate import KVCache, begin_step, finish_step, input_positions, run_layers
from lora_jax.models.layers import (
    REMAT_POLICIES,
    Attention,
    Dense,
    Embed,
    GatedMLP,
    RMSNorm,
    Rope,
    check_activation,
    check_model_type,
    check_multiple,
    normal,
    remat,
)

Array = jax.Array
Dtype = Any


# --------------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Hyper-parameters of a Llama-style decoder (the fields of ``transformers.LlamaConfig`` and its relatives
    that the model uses).

    ``rope_*``: rotary embedding base and scaling (see :class:`~lora_jax.models.layers.Rope`). ``qkv_bias`` /
    ``o_bias`` / ``mlp_bias``: which projections have biases. ``qk_norm``: per-head RMSNorm of queries and keys
    before RoPE. ``sliding_window``: local attention span in tokens, applied to the layers marked in
    ``sliding_layers`` (``None``: all layers). ``scan_layers`` (default ``True``): run the layers as one scanned
    layer over stacked parameters (:mod:`lora_jax.stacking`; see :attr:`scanned`); ``False`` builds them unrolled
    (``layers_N``), which QLoRA, DoRA and LoRA rules naming single layers still need. Not a file setting:
    ``from_hf`` / ``to_hf`` leave it alone.
    """

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ()

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    model_type: str = ""
    scan_layers: bool = True

    def __post_init__(self):
        if self.model_type not in self.MODEL_TYPES:
            raise ArgumentError(
                f"{type(self).__module__}.Config model_type must be one of {self.MODEL_TYPES}, got {self.model_type!r}"
            )
        check_multiple(
            "num_attention_heads",
            self.num_attention_heads,
            "num_key_value_heads",
            self.num_key_value_heads,
            "grouped-query attention",
        )
        if self.head_dim % 2:
            raise ArgumentError(f"rotary embeddings need an even head_dim, got {self.head_dim}")
        check_activation(self.hidden_act, "hidden_act")
        self.rope  # noqa: B018  (validates the rope type)
        if self.sliding_layers is not None and len(self.sliding_layers) != self.num_hidden_layers:
            raise ArgumentError(
                f"sliding_layers has {len(self.sliding_layers)} entries for {self.num_hidden_layers} layers"
            )

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def rope(self) -> Rope:
        return Rope(
            self.rope_theta,
            self.rope_type,
            self.rope_factor,
            self.rope_low_freq_factor,
            self.rope_high_freq_factor,
            self.rope_original_max_position_embeddings,
            self.max_position_embeddings,
        )

    def is_sliding(self, layer: int) -> bool:
        return self.sliding_window is not None and (self.sliding_layers is None or self.sliding_layers[layer])

    @property
    def layer_kinds(self) -> tuple[bool, ...]:
        """Per layer, whether it attends through the sliding window (:meth:`is_sliding`)."""
        return tuple(self.is_sliding(i) for i in range(self.num_hidden_layers))

    def attention_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :class:`~lora_jax.models.layers.Attention` that this config decides; a family's
        layer adds (or replaces) only what differs (Gemma 3: the RoPE per layer, the score scale, soft-capping)."""
        return dict(
            num_heads=self.num_attention_heads,
            num_kv_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            features=self.hidden_size,
            qkv_bias=self.qkv_bias,
            o_bias=self.o_bias,
            rope=self.rope,
            qk_norm_eps=self.rms_norm_eps if self.qk_norm else None,
            init_std=self.initializer_range,
        )

    def layer_structure(self, layer: int) -> Any:
        """What decides layer ``layer``'s parameters (a family whose layers differ overrides it: Qwen3-MoE's dense
        layers among sparse ones). Layers of one structure can share a scanned stack; layers that differ only in
        their window (:meth:`is_sliding`) can too."""
        return ()

    @property
    def scanned(self) -> bool:
        """Whether the model runs its layers scanned: ``scan_layers`` and every layer of one structure
        (:meth:`layer_structure`); else it runs them unrolled, with per-layer parameters ``layers_N``."""
        n = self.num_hidden_layers
        return self.scan_layers and n > 0 and len({self.layer_structure(i) for i in range(n)}) == 1

    @classmethod
    def from_hf(cls, hf_config) -> DecoderConfig:
        """From a ``transformers`` config of one of ``MODEL_TYPES``.

        Raises ``ValueError`` for settings this model does not implement: a RoPE scaling other than ``linear``
        / ``llama3``, partial rotary embeddings, an unknown activation.
        """
        model_type = check_model_type(hf_config, cls.MODEL_TYPES, f"{cls.__module__}.Config.from_hf")
        rope = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
        # RoPE settings per layer type (Gemma 3): those of the full-attention layers are the model's; a family reads
        # the others in fields_from_hf.
        rope = dict(rope.get("full_attention") or {}) if "full_attention" in rope else rope
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise ArgumentError(
                f"{model_type} rope scaling {rope_type!r} is not supported; supported: ('default', 'linear', 'llama3')"
            )
        if float(rope.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0)) or 1.0) != 1.0:
            raise ArgumentError(
                f"{model_type}: partial rotary embeddings (partial_rotary_factor "
                f"{rope.get('partial_rotary_factor')}) are not supported"
            )
        act = getattr(hf_config, "hidden_act", None) or getattr(hf_config, "hidden_activation", None)  # Gemma's name
        check_activation(act, f"{model_type} hidden_act")
        heads = hf_config.num_attention_heads
        eos = getattr(hf_config, "eos_token_id", None)
        fields = dict(
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_hidden_layers=hf_config.num_hidden_layers,
            num_attention_heads=heads,
            num_key_value_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
            head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
            hidden_act=act,
            max_position_embeddings=hf_config.max_position_embeddings,
            rms_norm_eps=float(hf_config.rms_norm_eps),
            initializer_range=float(hf_config.initializer_range),
            rope_theta=float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))),
            rope_type=rope_type,
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_position_embeddings=rope.get("original_max_position_embeddings"),
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            bos_token_id=getattr(hf_config, "bos_token_id", None),
            eos_token_id=tuple(eos) if isinstance(eos, (list, tuple)) else eos,
            pad_token_id=getattr(hf_config, "pad_token_id", None),
            model_type=model_type,
        )
        bias = bool(getattr(hf_config, "attention_bias", False))
        fields.update(qkv_bias=bias, o_bias=bias)
        window = getattr(hf_config, "sliding_window", None)
        types = getattr(hf_config, "layer_types", None)
        if window:
            fields["sliding_window"] = int(window)
            if types is not None:
                fields["sliding_layers"] = tuple(t == "sliding_attention" for t in types)
                if not any(fields["sliding_layers"]):
                    fields.update(sliding_window=None, sliding_layers=None)
        fields.update(cls.fields_from_hf(hf_config))
        return cls(**fields)

    @classmethod
    def fields_from_hf(cls, hf_config) -> dict:
        """Fields a family reads differently from the generic rule (override; default: none)."""
        return {}

    def hf_fields(self) -> dict:
        """The ``transformers`` config's fields (a family adds or changes its own, e.g. sliding windows)."""
        rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type != "default":
            rope["factor"] = self.rope_factor
        if self.rope_type == "llama3":
            rope.update(
                low_freq_factor=self.rope_low_freq_factor,
                high_freq_factor=self.rope_high_freq_factor,
                original_max_position_embeddings=self.rope_original_max_position_embeddings,
            )
        return dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act=self.hidden_act,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            initializer_range=self.initializer_range,
            rope_parameters=rope,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )

    def layer_types(self) -> list[str]:
        """``transformers``' ``layer_types``: ``"sliding_attention"`` / ``"full_attention"`` per layer."""
        return ["sliding_attention" if sliding else "full_attention" for sliding in self.layer_kinds]

    def to_hf(self):
        """The equivalent ``transformers`` config (``AutoConfig.for_model(model_type, **hf_fields())``)."""
        import transformers

        return transformers.AutoConfig.for_model(self.model_type, **self.hf_fields())


# --------------------------------------------------------------------------------------------- modules


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + self_attn(input_layernorm(x))``, then ``x + mlp(post_attention_layernorm(x))``.

    ``mlp`` is what :meth:`feed_forward` builds (a dense :class:`~lora_jax.models.layers.GatedMLP` here); a
    family whose feed-forward differs (:class:`lora_jax.models.moe.MoeDecoderLayer`) subclasses and overrides
    only that method, so the attention half and every parameter path stay the same.

    ``layer``: the layer's index, or for a scanned stack (:class:`LayerStack`) any layer of it when its layers are
    alike, ``None`` when they differ in their window (each step then gets a
    :class:`~lora_jax.models.attention.LayerMask` that says which kind it is)."""

    config: DecoderConfig
    layer: int | None
    dtype: Dtype = jnp.float32

    def feed_forward(self) -> nn.Module:
        """The feed-forward submodule ``mlp`` of this layer: ``(B, S, D) -> (B, S, D)``. Called from the compact
        ``__call__``, so the module it builds is bound there under the name ``mlp``."""
        c = self.config
        return GatedMLP(
            features=c.hidden_size,
            intermediate=c.intermediate_size,
            activation=c.hidden_act,
            use_bias=c.mlp_bias,
            init_std=c.initializer_range,
            dtype=self.dtype,
            name="mlp",
        )

    @nn.compact
    def __call__(self, x, positions, mask, kv, start):
        c = self.config
        attn = Attention(**c.attention_kwargs(), dtype=self.dtype, name="self_attn")
        norm = functools.partial(RMSNorm, eps=c.rms_norm_eps, dtype=self.dtype)
        h, kv = attn(norm(name="input_layernorm")(x), positions, mask, kv, start)
        x = x + h
        return x + self.feed_forward()(norm(name="post_attention_layernorm")(x)), kv


class LayerStack(nn.Module):
    """A decoder's layers as one scanned layer: the parameters of all ``config.num_hidden_layers`` layers stacked
    (each leaf ``(L, ...)``, under this module's name, :data:`lora_jax.stacking.STACK`) and ``jax.lax.scan``
    running one compiled ``layer`` over them, each step checkpointed with the ``remat`` policy. So the compiled
    program and its compile time do not grow with depth, and a backward pass recomputes one layer at a time
    (with FSDP: gathers one layer's weights at a time).

    ``__call__(x, positions, mask, kv, start, use_sliding)``: ``kv`` the stacked cache ``(keys, values)``, each
    ``(L, B, T, KV, hd)``, or ``None``; ``use_sliding`` ``(L,)`` bool when ``mask`` is a
    :class:`~lora_jax.models.attention.LayerMask` (layers that differ in their window), else ``None``. Values a
    layer sows (MoE router logits) are sown here once per layer, in layer order."""

    layer: Any
    config: Any
    dtype: Dtype = jnp.float32
    remat: str = "none"
    mixed: bool = False  # the layers differ in their window: each step gets its flag

    @nn.compact
    def __call__(self, x, positions, mask, kv, start, use_sliding):
        c = self.config
        n = c.num_hidden_layers
        block = self.layer(c, None if self.mixed else 0, self.dtype, parent=None)
        if self.is_initializing():
            probe = attention.Mask(None, None, jnp.zeros((), jnp.int32), implementation="xla")

            def init_one(key):
                return block.init(key, x[:1, :1], jnp.zeros((1, 1), jnp.int32), probe, None, jnp.zeros((), jnp.int32))[
                    "params"
                ]

            stacked = jax.vmap(init_one)(jax.random.split(self.make_rng("params"), n))
            params = {name: self.param(name, lambda _, v=v: v) for name, v in stacked.items()}
        else:
            params = self.variables["params"]
        views = jax.tree_util.tree_map(lambda p: stacking.layer_view(p, n), dict(params), is_leaf=stacking.is_node)

        def step(h, xs):
            p, layer_kv, flag = xs
            m = mask if flag is None else dataclasses.replace(mask, use_sliding=flag)
            (h, layer_kv), state = block.apply(
                {"params": p}, h, positions, m, layer_kv, start, mutable=["intermediates"]
            )
            return h, (layer_kv, state.get("intermediates", {}))

        if self.remat != "none":
            step = jax.checkpoint(step, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        x, (kv, sown) = jax.lax.scan(step, x, (views, kv, use_sliding))
        for path, value in tree.flatten(sown).items():  # a sow's tuple per layer: re-sown in layer order
            for call in value if isinstance(value, tuple) else (value,):
                self.sow(
                    "intermediates",
                    path[-1],
                    tuple(call[i] for i in range(n)),
                    init_fn=tuple,
                    reduce_fn=lambda xs, x: xs + x,
                )
        return x, kv


class DecoderModel(nn.Module):
    """``embed_tokens``, ``layers`` (``layer(config, i, dtype)`` blocks, :class:`DecoderLayer` by default) and the
    final ``norm``: ``(B, S)`` ids -> ``(B, S, D)`` hidden states and the updated cache (``None`` when called
    without one; ``segment_ids``: packed rows). See :mod:`lora_jax.models.generate` for the cache and masks.

    ``scale_embeddings``: multiply the embeddings by ``sqrt(hidden_size)`` (in the compute dtype, as Gemma);
    ``norm_offset``: the final :class:`~lora_jax.models.layers.RMSNorm`'s offset (1: Gemma's ``(1 + w)``).
    """

    config: DecoderConfig
    dtype: Dtype = jnp.float32
    layer: Any = DecoderLayer
    scale_embeddings: bool = False
    norm_offset: float = 0.0
    remat: str = "none"  # checkpoint policy of each layer (lora_jax.models.layers.REMAT_POLICIES)
    attention: str = "auto"  # the attention implementation (lora_jax.models.attention.IMPLEMENTATIONS)

    def setup(self):
        c = self.config
        self.embed_tokens = Embed(
            num_embeddings=c.vocab_size, features=c.hidden_size, dtype=self.dtype, init_std=c.initializer_range
        )
        if c.scanned:
            mixed = len(set(c.layer_kinds)) > 1
            self.layers = LayerStack(layer=self.layer, config=c, dtype=self.dtype, remat=self.remat, mixed=mixed)
        else:
            self.layers = [remat(self.layer, self.remat)(c, i, self.dtype) for i in range(c.num_hidden_layers)]
        self.norm = RMSNorm(eps=c.rms_norm_eps, dtype=self.dtype, offset=self.norm_offset)

    def __call__(
        self,
        input_ids: Array,
        positions: Array | None = None,
        attention_mask: Array | None = None,
        cache: KVCache | None = None,
        segment_ids: Array | None = None,
    ) -> tuple[Array, KVCache | None]:
        b, s = input_ids.shape
        step = begin_step(b, s, attention_mask, cache, self.config.sliding_window, segment_ids)
        positions = input_positions(positions, segment_ids, b, s, step.start)
        x = self.embed_tokens(input_ids)
        if self.scale_embeddings:
            x = x * jnp.asarray(self.config.hidden_size**0.5, x.dtype)
        c = self.config
        if c.scanned:
            kinds = c.layer_kinds
            if len(set(kinds)) == 1:
                mask, flags = step.mask(kinds[0], self.attention), None
            else:
                mask = attention.LayerMask(step.mask(False, self.attention), step.mask(True, self.attention))
                flags = jnp.asarray(kinds)
            x, kv = self.layers(
                x, positions, mask, None if cache is None else (cache.keys, cache.values), step.start, flags
            )
            cache = None if cache is None else finish_step(cache, step, kv[0], kv[1], s)
        else:
            x, cache = run_layers(
                self.layers,
                x,
                cache,
                step,
                lambda i, layer, x, kv: layer(x, positions, step.mask(c.is_sliding(i), self.attention), kv, step.start),
            )
        return self.norm(x), cache

    def attend(self, h: Array) -> Array:
        """Logits through the tied embedding: ``h @ embed_tokens.T``."""
        return self.embed_tokens.attend(h)


class CausalLM(nn.Module):
    """A decoder ``backbone`` (under the key ``backbone_name``) plus the language-model head: ``lm_head``, or
    the backbone's ``attend`` (the tied embedding) when ``config.tie_word_embeddings``; logits soft-capped to
    ``c * tanh(logits / c)`` when the config has a ``final_logit_softcapping`` ``c`` (Gemma 2 / 3).

    ``__call__(input_ids (B, S), positions=None, attention_mask=None, cache=None, segment_ids=None) ->
    (logits (B, S, V), cache)``. ``positions`` default to ``cache.index + arange(S)`` (``arange(S)`` without a
    cache), as ``transformers`` does without ``position_ids``; ``attention_mask`` ``(B, S)`` marks real tokens (0:
    padding, never attended to). ``segment_ids`` ``(B, S)``: packed rows (several examples per row, ``0``:
    padding; no cache): attention stays inside each example and the default positions restart per example.
    With ``hidden=True`` it returns the final hidden states ``(B, S, D)`` instead of the logits, for a loss that
    applies :meth:`head` itself (:func:`lora_jax.losses.chunked_cross_entropy`).

    ``embedding``: the backbone's token embedding (the tied head); ``remat``: the checkpoint policy of each of
    the backbone's layers (:data:`lora_jax.models.layers.REMAT_POLICIES`); ``attention``: the backbone's attention
    implementation (:data:`lora_jax.models.attention.IMPLEMENTATIONS`, ``auto`` by default).
    """

    config: Any
    dtype: Dtype = jnp.float32
    backbone: Any = DecoderModel
    backbone_name: str = "model"
    embedding: str = "embed_tokens"
    remat: str = "none"
    attention: str = "auto"

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        positions: Array | None = None,
        attention_mask: Array | None = None,
        cache: KVCache | None = None,
        hidden: bool = False,
        segment_ids: Array | None = None,
    ) -> tuple[Array, KVCache | None]:
        extra = {} if self.remat == "none" else {"remat": self.remat}  # a backbone without remat still builds
        extra.update({} if self.attention == "auto" else {"attention": self.attention})
        body = self.backbone(self.config, self.dtype, name=self.backbone_name, **extra)
        h, cache = body(input_ids, positions, attention_mask, cache, segment_ids)
        if hidden:
            return h, cache
        if self.config.tie_word_embeddings:
            logits = body.attend(h)
        else:
            logits = Dense(
                self.config.vocab_size,
                use_bias=False,
                dtype=self.dtype,
                kernel_init=normal(self.config.initializer_range),
                name="lm_head",
            )(h)
        cap = getattr(self.config, "final_logit_softcapping", None)
        return (logits if cap is None else cap * jnp.tanh(logits / cap)), cache

    def head(self) -> dict[str, Any]:
        """The output head as keyword arguments of :func:`lora_jax.losses.chunked_cross_entropy`: ``head`` (the
        stored leaf, an array, ``LoraWeight`` or ``QuantizedWeight``: the embedding table ``(V, D)`` when tied,
        else ``lm_head``'s kernel ``(D, V)``), ``tied`` and ``logit_softcap``."""
        params = self.variables["params"]
        tied = bool(self.config.tie_word_embeddings)
        weight = params[self.backbone_name][self.embedding]["embedding"] if tied else params["lm_head"]["kernel"]
        return {"head": weight, "tied": tied, "logit_softcap": getattr(self.config, "final_logit_softcapping", None)}


# --------------------------------------------------------------------------------------- declarations


def tasks(
    backbone: Any = DecoderModel,
    backbone_name: str = "model",
    lm_class: str = "{}ForCausalLM",
    base_class: str = "{}Model",
) -> dict[str, Task]:
    """``{"causal-lm": CausalLM over backbone, "base": the backbone}`` for a decoder family's declaration."""
    lm = functools.partial(CausalLM, backbone=backbone, backbone_name=backbone_name)
    return {
        "causal-lm": Task(lm, backbone=backbone_name, hf_class=lm_class, peft_task_type="CAUSAL_LM"),
        "base": Task(backbone, hf_class=base_class),
    }


NAMES = Names(lists=("layers",), ignore=(r"(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq",), tied="lm_head.weight")
"""The name rule of Llama-style decoders (RoPE ``inv_freq`` buffers hold no parameter)."""

PRESETS = {
    "qv": ("q_proj", "v_proj"),
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "all-linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
"""PEFT ``target_modules`` of the LoRA presets for Llama-style decoders."""

# llama.cpp's names (gguf-py's tensor mapping) for the modules of Llama-style decoders.
GGUF_TENSORS = {
    r"model\.embed_tokens": "token_embd",
    r"model\.norm": "output_norm",
    r"lm_head": "output",
    r"model\.layers\.(\d+)\.input_layernorm": r"blk.\1.attn_norm",
    r"model\.layers\.(\d+)\.self_attn\.q_proj": r"blk.\1.attn_q",
    r"model\.layers\.(\d+)\.self_attn\.k_proj": r"blk.\1.attn_k",
    r"model\.layers\.(\d+)\.self_attn\.v_proj": r"blk.\1.attn_v",
    r"model\.layers\.(\d+)\.self_attn\.o_proj": r"blk.\1.attn_output",
    r"model\.layers\.(\d+)\.self_attn\.q_norm": r"blk.\1.attn_q_norm",
    r"model\.layers\.(\d+)\.self_attn\.k_norm": r"blk.\1.attn_k_norm",
    r"model\.layers\.(\d+)\.post_attention_layernorm": r"blk.\1.ffn_norm",
    r"model\.layers\.(\d+)\.mlp\.gate_proj": r"blk.\1.ffn_gate",
    r"model\.layers\.(\d+)\.mlp\.up_proj": r"blk.\1.ffn_up",
    r"model\.layers\.(\d+)\.mlp\.down_proj": r"blk.\1.ffn_down",
}

# GGUF metadata (after "<arch>.") -> transformers config field, for Llama-style decoders.
GGUF_CONFIG = {
    "vocab_size": "vocab_size",
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
}
GGUF_REQUIRED = (
    "context_length",
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "attention.head_count",
    "attention.layer_norm_rms_epsilon",
)


LOGICAL_AXES = (
    (r"(.*/)?self_attn/q_proj/kernel", ("embed", "heads")),
    (r"(.*/)?self_attn/(k_proj|v_proj)/kernel", ("embed", "kv_heads")),
    (r"(.*/)?self_attn/o_proj/kernel", ("heads", "embed")),
    (r"(.*/)?self_attn/q_proj/bias", ("heads",)),
    (r"(.*/)?self_attn/(k_proj|v_proj)/bias", ("kv_heads",)),
    (r"(.*/)?mlp/(gate_proj|up_proj)/kernel", ("embed", "mlp")),
    (r"(.*/)?mlp/down_proj/kernel", ("mlp", "embed")),
    (r"(.*/)?embed_tokens/embedding", ("vocab", "embed")),
    (r"lm_head/kernel", ("embed", "vocab")),
)
"""The logical axes of the shared decoder's kernels (:attr:`lora_jax.models.arch.Architecture.logical_axes`): what a
``tensor`` mesh axis splits (heads, KV heads, MLP columns, the vocabulary) and what ``fsdp`` splits (the width)."""


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of Q / K rows: within each head it stores the two RoPE halves interleaved
    (row pairs ``(i, i + hd/2)`` adjacent); Hugging Face keeps the halves contiguous. ``w`` is ``(out, ...)``
    with ``out = n_heads * head_dim`` (a weight ``(out, in)`` or a bias ``(out,)``)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's reordering of Q / K rows (the inverse of :func:`unpermute_rope_rows`)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_rows(permute) -> Any:
    """A GGUF ``from_gguf`` / ``to_gguf`` fix applying ``permute`` (:func:`unpermute_rope_rows` or
    :func:`permute_rope_rows`) to the ``q_proj`` / ``k_proj`` weights and biases, as llama.cpp's converter does
    for the ``llama`` architecture."""

    def fix(name: str, x: np.ndarray, config: DecoderConfig) -> np.ndarray:
        module = name.rsplit(".", 1)[0]
        if module.endswith("self_attn.q_proj"):
            return permute(x, config.num_attention_heads)
        if module.endswith("self_attn.k_proj"):
            return permute(x, config.num_key_value_heads)
        return x

    return fix


__all__ = [
    "GGUF_CONFIG",
    "GGUF_REQUIRED",
    "GGUF_TENSORS",
    "NAMES",
    "PRESETS",
    "CausalLM",
    "DecoderConfig",
    "DecoderLayer",
    "DecoderModel",
    "LayerStack",
    "permute_rope_rows",
    "rope_rows",
    "tasks",
    "unpermute_rope_rows",
]
