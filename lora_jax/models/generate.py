"""Autoregressive generation with a key/value cache: greedy, sampling and beam search, compiled once per shape.

Every decoder of :mod:`lora_jax.models` shares the cache defined here. A causal LM is called as::

    logits, cache = model.apply({"params": params}, input_ids, positions=None, attention_mask=None, cache=None,
                                segment_ids=None)

``cache=None`` runs without a cache (training). With a :class:`KVCache` of ``max_len`` slots the ``S`` new
tokens are written at slots ``cache.index ... cache.index + S - 1`` and attend to every filled slot before
them, so prefilling a prompt and then feeding one token at a time gives the same logits as the full forward.
All shapes are fixed by ``(batch, max_len)``: a decoding loop jits once.

Packed rows (training): ``segment_ids (B, S)`` says which example each token belongs to (``0``: padding); a
token attends only to earlier tokens of its own example and positions restart at each example
(:func:`segment_positions`), so each example of a packed row gets the logits it would get alone. A call with
``segment_ids`` takes no cache.

Left-padded batches: row ``b`` of a prompt may start with padding (``attention_mask[b, t] == 0``). Padding
slots are never attended to, and :func:`generate` gives each real token the position
``cumsum(attention_mask) - 1``, so a padded row generates what it would alone (as ``transformers`` does).

:func:`generate` follows ``transformers``' ``generate`` step for step (same logits processing order, same beam
search bookkeeping), so on the same weights greedy and beam outputs agree token for token.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.errors import ArgumentError
from lora_jax.models import attention

Array = jax.Array
PyTree = Any

# ---------------------------------------------------------------------------------------- the KV cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer for ``max_len`` token slots.

    Attributes:
      keys, values: one array per layer, ``(batch, max_len, num_kv_heads, head_dim)``; for a model with scanned
        layers (``config.scanned``) one stacked array ``(layers, batch, max_len, num_kv_heads, head_dim)``.
      mask: ``(batch, max_len)`` bool: the slot holds a real token (False for padding and unwritten slots).
      index: ``()`` int32: the next slot to write (the same for every row: rows are left-padded).
    """

    keys: tuple[Array, ...] | Array
    values: tuple[Array, ...] | Array
    mask: Array
    index: Array

    @property
    def max_len(self) -> int:
        return self.mask.shape[1]

    @property
    def batch(self) -> int:
        return self.mask.shape[0]


def init_cache(config: Any, batch: int, max_len: int, dtype: Any = jnp.float32) -> KVCache:
    """An empty cache for ``config`` (any decoder ``Config`` with ``num_hidden_layers``,
    ``num_key_value_heads`` and ``head_dim``): zeros of ``(batch, max_len, num_kv_heads, head_dim)`` per layer
    (stacked into one ``(layers, ...)`` array when ``config.scanned``), no slot filled, index 0."""
    if batch < 1 or max_len < 1:
        raise ArgumentError(f"init_cache needs batch >= 1 and max_len >= 1, got batch={batch}, max_len={max_len}")
    shape = (batch, max_len, config.num_key_value_heads, config.head_dim)
    if getattr(config, "scanned", False):
        stacked = (config.num_hidden_layers, *shape)
        return KVCache(
            keys=jnp.zeros(stacked, dtype),
            values=jnp.zeros(stacked, dtype),
            mask=jnp.zeros((batch, max_len), bool),
            index=jnp.zeros((), jnp.int32),
        )
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers))
    return KVCache(
        keys=zeros,
        values=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers)),
        mask=jnp.zeros((batch, max_len), bool),
        index=jnp.zeros((), jnp.int32),
    )


def reorder_cache(cache: KVCache, rows: Array) -> KVCache:
    """The cache with its batch rows replaced by ``rows`` (``(batch,)`` int): beam search keeps the cache of
    the beams it continues."""
    take = functools.partial(jnp.take, indices=rows, axis=0)
    return KVCache(*_per_layer(take, cache.keys, cache.values), take(cache.mask), cache.index)


def _per_layer(f, keys, values):
    """``f`` (an operation on batch axis 0) applied to every layer's keys and values, stacked or not."""
    if isinstance(keys, tuple):
        return tuple(map(f, keys)), tuple(map(f, values))
    return jax.vmap(f)(keys), jax.vmap(f)(values)


def repeat_cache(cache: KVCache, n: int) -> KVCache:
    """Each batch row repeated ``n`` times in a row (``(B, ...)`` -> ``(B * n, ...)``), for ``n`` beams."""
    rep = functools.partial(jnp.repeat, repeats=n, axis=0)
    return KVCache(*_per_layer(rep, cache.keys, cache.values), rep(cache.mask), cache.index)


@dataclasses.dataclass(frozen=True)
class StepMask:
    """What every layer needs to attend during one call: computed once per call by :func:`begin_step`.

    ``start``: slot of the first new token (0 without a cache); ``key_valid``: ``(B, T)`` real-token slots
    (``T = S`` without a cache, ``max_len`` with one); ``causal``: ``(B, S, T)`` bool, query may see key;
    ``sliding``: the same restricted to a window (``None`` when the model has no sliding window);
    ``segment_ids``: the packed rows' ``(B, S)`` segments (``None``: none), ``window``: the sliding window,
    ``padded``: an ``attention_mask`` or a cache says which key slots are real (else every slot is).

    Under ``jit`` the dense ``causal`` / ``sliding`` masks cost nothing unless a layer reads them: :meth:`mask`
    describes the same masks in ``O(S + T)`` numbers for :func:`lora_jax.models.attention.attend`.
    """

    start: Array
    key_valid: Array
    causal: Array
    sliding: Array | None
    segment_ids: Array | None = None
    window: int | None = None
    padded: bool = True
    cached: bool = False

    def mask(self, sliding: bool, implementation: str = "auto") -> attention.Mask:
        """The :class:`lora_jax.models.attention.Mask` of a layer (``sliding``: with the window, as
        :attr:`sliding`, else as :attr:`causal`) for the attention ``implementation``."""
        return attention.Mask(
            self.key_valid if self.padded else None,
            self.segment_ids,
            self.start,
            self.window if sliding else None,
            self.cached,
            implementation,
        )


def begin_step(
    batch: int,
    seq_len: int,
    attention_mask: Array | None,
    cache: KVCache | None,
    sliding_window: int | None = None,
    segment_ids: Array | None = None,
) -> StepMask:
    """The attention masks for ``seq_len`` new tokens of ``batch`` rows.

    Query ``i`` (slot ``start + i``) may attend key slot ``j`` when ``j`` holds a real token and
    ``j <= start + i``; with a sliding window also ``start + i - j < sliding_window`` (on slots, as
    ``transformers`` counts them).

    ``segment_ids`` ``(B, S)`` int (packed rows, training without a cache): which example each token belongs to
    (``1, 2, ...``; ``0``: padding). A query then attends only keys of its own segment, so every example of a
    packed row sees exactly what it would alone (with :func:`segment_positions`). Without ``attention_mask`` the
    tokens of segment 0 are padding.
    """
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids)
        if segment_ids.shape != (batch, seq_len):
            raise ArgumentError(
                f"segment_ids must have shape (batch, seq_len) = {(batch, seq_len)}, got {tuple(segment_ids.shape)}"
            )
        if cache is not None:
            raise ArgumentError(
                "segment_ids (packed rows) are for calls without a KV cache; decode one sequence per "
                "row (left-padded) with a cache"
            )
        if attention_mask is None:
            attention_mask = segment_ids != 0
    new_valid = jnp.ones((batch, seq_len), bool) if attention_mask is None else jnp.asarray(attention_mask) != 0
    if new_valid.shape != (batch, seq_len):
        raise ArgumentError(
            f"attention_mask must have shape (batch, seq_len) = {(batch, seq_len)}, got {tuple(new_valid.shape)}"
        )
    if cache is None:
        start = jnp.zeros((), jnp.int32)
        key_valid = new_valid
        key_slots = jnp.arange(seq_len)
    else:
        if cache.batch != batch:
            raise ArgumentError(f"the cache holds {cache.batch} rows, the input has {batch}")
        if seq_len > cache.max_len:
            raise ArgumentError(f"{seq_len} tokens do not fit a cache of max_len {cache.max_len}")
        if not isinstance(cache.index, jax.core.Tracer) and int(cache.index) + seq_len > cache.max_len:
            raise ArgumentError(
                f"the cache is full: {int(cache.index)} of {cache.max_len} slots used, {seq_len} more "
                "tokens do not fit (init_cache with a larger max_len)"
            )
        start = cache.index
        key_valid = jax.lax.dynamic_update_slice(cache.mask, new_valid, (0, start))
        key_slots = jnp.arange(cache.max_len)
    query_slots = start + jnp.arange(seq_len)
    distance = query_slots[:, None] - key_slots[None, :]  # (S, T)
    causal = key_valid[:, None, :] & (distance >= 0)[None]
    if segment_ids is not None:
        causal = causal & (segment_ids[:, :, None] == segment_ids[:, None, :])
    sliding = None if sliding_window is None else causal & (distance < sliding_window)[None]
    return StepMask(
        start,
        key_valid,
        causal,
        sliding,
        segment_ids,
        sliding_window,
        padded=attention_mask is not None or cache is not None,
        cached=cache is not None,
    )


def write_cache(cached: Array, new: Array, start: Array) -> Array:
    """``cached`` ``(B, T, ...)`` with ``new`` ``(B, S, ...)`` written at slots ``start ... start + S - 1``."""
    return jax.lax.dynamic_update_slice(cached, new.astype(cached.dtype), (0, start) + (0,) * (cached.ndim - 2))


def finish_step(
    cache: KVCache, step: StepMask, keys: Sequence[Array] | Array, values: Sequence[Array] | Array, seq_len: int
) -> KVCache:
    """The cache after a call that wrote ``seq_len`` tokens: the layers' new keys/values (a sequence per layer,
    or the stacked arrays of a scanned stack), the filled mask, the index moved on."""
    if not isinstance(keys, jax.Array):
        keys, values = tuple(keys), tuple(values)
    return KVCache(keys, values, step.key_valid, cache.index + seq_len)


def run_layers(
    layers: Sequence[Any], x: Array, cache: KVCache | None, step: StepMask, call: Any
) -> tuple[Array, KVCache | None]:
    """Run a decoder's layers in order, each ``x, kv = call(i, layer, x, kv)`` with ``kv`` its ``(keys,
    values)`` from ``cache`` (``None`` without one), and collect the updated cache."""
    keys, values = [], []
    for i, layer in enumerate(layers):
        x, kv = call(i, layer, x, None if cache is None else (cache.keys[i], cache.values[i]))
        if kv is not None:
            keys.append(kv[0])
            values.append(kv[1])
    return x, None if cache is None else finish_step(cache, step, keys, values, x.shape[1])


def default_positions(batch: int, seq_len: int, start: Array) -> Array:
    """``start + arange(seq_len)`` for every row: ``(B, S)`` int32 (what ``transformers`` uses when no
    ``position_ids`` are given)."""
    return jnp.broadcast_to(start + jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))


def segment_positions(segment_ids: Array) -> Array:
    """Positions that restart at 0 where each segment of a packed row begins: ``(B, S)`` int32.

    ``[[1, 1, 1, 2, 2, 0, 0]] -> [[0, 1, 2, 0, 1, 0, 1]]`` (a run of equal ids is one segment; padding counts
    on like a segment of its own, and is never attended to).
    """
    segment_ids = jnp.asarray(segment_ids)
    t = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
    begins = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    first = jax.lax.cummax(jnp.where(begins, t[None, :], 0), axis=1)
    return t[None, :] - first


def input_positions(
    positions: Array | None, segment_ids: Array | None, batch: int, seq_len: int, start: Array
) -> Array:
    """The positions a decoder gives its ``(B, S)`` new tokens: ``positions`` when given, else restarting per
    segment of a packed row (:func:`segment_positions`), else :func:`default_positions`."""
    if positions is not None:
        return jnp.asarray(positions)
    if segment_ids is not None:
        return segment_positions(segment_ids)
    return default_positions(batch, seq_len, start)


# ------------------------------------------------------------------------------------- logits processing

NEG_INF = -jnp.inf


def ban_repeated_ngrams(scores: Array, sequences: Array, length: Array, n: int) -> Array:
    """Forbid every token that would repeat an ``n``-gram of the sequence so far (``no_repeat_ngram_size``).

    Shapes: ``scores (R, V)``, ``sequences (R, T)`` of which the first ``length`` slots are filled (the left
    padding included, as ``transformers`` counts it). A token ``t`` gets ``-inf`` when the last ``n - 1``
    tokens followed by ``t`` already occur in ``sequences[:, :length]``.
    """
    if n <= 0:
        return scores
    rows, total = sequences.shape
    if n > total:
        return scores
    # Every n-gram that starts at slot i: (R, T - n + 1, n).
    grams = jnp.stack([sequences[:, j : total - n + 1 + j] for j in range(n)], axis=-1)
    complete = jnp.arange(total - n + 1) + n <= length  # the n-gram lies inside the filled prefix
    if n == 1:
        match = jnp.broadcast_to(complete, grams.shape[:2])
    else:
        prefix = jax.lax.dynamic_slice_in_dim(sequences, length - (n - 1), n - 1, axis=1)  # (R, n - 1)
        match = jnp.all(grams[:, :, :-1] == prefix[:, None, :], axis=-1) & complete[None]
    banned = (
        jnp.zeros(scores.shape, jnp.int32).at[jnp.arange(rows)[:, None], grams[:, :, -1]].add(match.astype(jnp.int32))
    )
    banned = (banned > 0) & (length + 1 >= n)
    return jnp.where(banned, NEG_INF, scores)


def top_k_filter(scores: Array, k: int) -> Array:
    """Keep the ``k`` highest scores of each row (ties at the k-th value kept too), ``-inf`` elsewhere."""
    k = min(max(k, 1), scores.shape[-1])
    kth = jax.lax.top_k(scores, k)[0][..., -1:]
    return jnp.where(scores < kth, NEG_INF, scores)


def top_p_filter(scores: Array, p: float) -> Array:
    """Nucleus filtering: keep the smallest set of highest-probability tokens whose probabilities sum to more
    than ``p`` (at least one token), ``-inf`` elsewhere (``transformers``' ``TopPLogitsWarper``)."""
    order = jnp.argsort(scores, axis=-1)  # ascending
    ascending = jnp.take_along_axis(scores, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    drop = (cumulative <= 1.0 - p).at[..., -1].set(False)
    drop = jnp.zeros_like(drop).at[jnp.arange(scores.shape[0])[:, None], order].set(drop)
    return jnp.where(drop, NEG_INF, scores)


# ----------------------------------------------------------------------------------------- generation


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """How :func:`generate` decodes (static: one compilation per setting and input shape).

    Attributes:
      max_new_tokens: tokens generated after the prompt.
      do_sample: sample from the processed distribution instead of taking the argmax.
      temperature, top_k, top_p: sampling warpers, applied in this order (``top_k=0``, ``top_p=1.0``: off).
      num_beams: > 1 for beam search (no sampling).
      length_penalty: beam scores are ``sum log p / generated_length ** length_penalty``.
      no_repeat_ngram_size: > 0 forbids repeating any n-gram of this size (all decoding methods).
      early_stopping: beam search stopping rule as in ``transformers``: ``False`` (stop when no running beam
        can beat the finished ones at the current length), ``True`` (stop once ``num_beams`` beams finished),
        ``"never"``.
      eos_token_id: tokens that end a sequence (``()``: none; ``None``: the model config's).
      pad_token_id: fills a row after its end (``None``: the model config's, else the first eos, else 0).
    """

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    early_stopping: bool | str = False
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ArgumentError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ArgumentError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and self.do_sample:
            raise ArgumentError(
                "beam search with sampling is not supported: use num_beams=1 with do_sample=True, or "
                "do_sample=False with num_beams > 1"
            )
        if self.temperature <= 0:
            raise ArgumentError(f"temperature must be > 0, got {self.temperature} (use do_sample=False for greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ArgumentError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.no_repeat_ngram_size < 0:
            raise ArgumentError(
                f"top_k and no_repeat_ngram_size must be >= 0, got {self.top_k}, {self.no_repeat_ngram_size}"
            )
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.early_stopping not in (True, False, "never"):
            raise ArgumentError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")


def process_logits(logits: Array, sequences: Array, length: Array, g: GenerationConfig) -> Array:
    """The scores a token is chosen from: float32 ``logits (R, V)``, n-gram ban, then (when sampling)
    temperature, top-k and top-p, in ``transformers``' order."""
    scores = ban_repeated_ngrams(logits.astype(jnp.float32), sequences, length, g.no_repeat_ngram_size)
    if g.do_sample:
        if g.temperature != 1.0:
            scores = scores / g.temperature
        if g.top_k > 0:
            scores = top_k_filter(scores, g.top_k)
        if g.top_p < 1.0:
            scores = top_p_filter(scores, g.top_p)
    return scores


def prompt_positions(attention_mask: Array) -> Array:
    """Positions of a left-padded prompt: ``cumsum(mask) - 1`` for real tokens, 0 for padding."""
    mask = attention_mask.astype(jnp.int32)
    return jnp.where(mask == 0, 0, jnp.cumsum(mask, axis=-1) - 1)


def _forward(model, params, ids, positions, attention_mask, cache):
    logits, cache = model.apply(
        {"params": params}, ids, positions=positions, attention_mask=attention_mask, cache=cache
    )
    return logits[:, -1].astype(jnp.float32), cache


def _is_eos(tokens: Array, eos: tuple[int, ...]) -> Array:
    if not eos:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(eos, tokens.dtype))


def _decode(model, g: GenerationConfig, params, input_ids, attention_mask, key):
    """Greedy or sampled decoding: prefill the prompt, then one token per ``while_loop`` step."""
    b, p = input_ids.shape
    n = g.max_new_tokens
    total = p + n
    cache = init_cache(model.config, b, max(total - 1, p), model.dtype)
    positions = prompt_positions(attention_mask)
    logits, cache = _forward(model, params, input_ids, positions, attention_mask, cache)
    seqs = jnp.full((b, total), g.pad_token_id, jnp.int32).at[:, :p].set(input_ids)

    def choose(seqs, logits, length, done, key):
        scores = process_logits(logits, seqs, length, g)
        if g.do_sample:
            token = jax.random.categorical(key, scores, axis=-1).astype(jnp.int32)
        else:
            token = jnp.argmax(scores, axis=-1).astype(jnp.int32)
        token = jnp.where(done, g.pad_token_id, token)
        seqs = jax.lax.dynamic_update_slice(seqs, token[:, None], (0, length))
        return seqs, token, done | _is_eos(token, g.eos_token_id)

    key, sub = jax.random.split(key)
    seqs, token, done = choose(seqs, logits, p, jnp.zeros((b,), bool), sub)

    def cond(state):
        step, _, _, done, _, _ = state
        return (step < n) & ~jnp.all(done)

    def body(state):
        step, seqs, token, done, cache, key = state
        pos = (positions[:, -1] + step)[:, None]
        logits, cache = _forward(model, params, token[:, None], pos, None, cache)
        key, sub = jax.random.split(key)
        seqs, token, done = choose(seqs, logits, p + step, done, sub)
        return step + 1, seqs, token, done, cache, key

    state = jax.lax.while_loop(cond, body, (jnp.ones((), jnp.int32), seqs, token, done, cache, key))
    return state[1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BeamState:
    """Beam search bookkeeping, ``B`` prompts x ``K`` beams, sequences of ``T`` slots.

    ``running (B, K, T)`` / ``running_scores (B, K)``: the live beams and their summed log-probabilities;
    ``parent (B, K)``: the beam each live beam continues (the cache row to keep); ``finished (B, K, T)`` /
    ``finished_scores`` / ``is_finished``: the best ended hypotheses (length-penalised scores);
    ``improvable (B, 1)``: whether a live beam may still beat the finished ones; ``length``: filled slots;
    ``go``: whether to continue.
    """

    running: Array
    running_scores: Array
    parent: Array
    finished: Array
    finished_scores: Array
    is_finished: Array
    improvable: Array
    length: Array
    go: Array


def _gather(x: Array, idx: Array) -> Array:
    """``x (B, N, ...)`` rows ``idx (B, M)`` along axis 1 -> ``(B, M, ...)``."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _beam_step(g: GenerationConfig, prompt_len: int, s: BeamState, logits: Array) -> BeamState:
    """One beam search step as ``transformers`` does it: top ``C = max(2, 1 + n_eos) * K`` continuations of all
    beams, the best ``K`` that did not end continue, those among the top ``K`` that ended join the finished."""
    b, k, total = s.running.shape
    vocab = logits.shape[-1]
    c = max(2, 1 + len(g.eos_token_id)) * k
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    log_probs = ban_repeated_ngrams(log_probs, s.running.reshape(b * k, total), s.length, g.no_repeat_ngram_size)
    log_probs = (log_probs.reshape(b, k, vocab) + s.running_scores[:, :, None]).reshape(b, k * vocab)

    top_scores, top_index = jax.lax.top_k(log_probs, c)
    top_parent, top_token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
    top_seqs = _gather(s.running, top_parent)
    top_seqs = jax.lax.dynamic_update_slice(top_seqs, top_token[:, :, None], (0, 0, s.length))
    ended = _is_eos(top_token, g.eos_token_id) | (s.length + 1 >= total)

    # The live beams of the next step.
    live_scores = top_scores + ended.astype(jnp.float32) * -1.0e9
    keep = jax.lax.top_k(live_scores, k)[1]
    running, running_scores, parent = _gather(top_seqs, keep), _gather(live_scores, keep), _gather(top_parent, keep)

    # Finished hypotheses: merge the ones that just ended (among the top K) with the previous best.
    just_ended = ended & (jnp.arange(c) < k)[None]
    generated = (s.length + 1 - prompt_len).astype(jnp.float32)
    end_scores = top_scores / generated**g.length_penalty
    if g.early_stopping is True:
        end_scores += jnp.all(s.is_finished, axis=-1, keepdims=True).astype(jnp.float32) * -1.0e9
    end_scores += (~s.improvable).astype(jnp.float32) * -1.0e9
    end_scores += (~just_ended).astype(jnp.float32) * -1.0e9
    merged_scores = jnp.concatenate([s.finished_scores, end_scores], axis=1)
    best = jax.lax.top_k(merged_scores, k)[1]
    finished = _gather(jnp.concatenate([s.finished, top_seqs], axis=1), best)
    finished_scores = _gather(merged_scores, best)
    is_finished = _gather(jnp.concatenate([s.is_finished, just_ended], axis=1), best)

    # Can a live beam still beat the worst finished one?
    length = s.length + 1
    if g.early_stopping == "never" and g.length_penalty > 0.0:
        best_length = jnp.asarray(total - prompt_len, jnp.float32)
    else:
        best_length = (length - prompt_len).astype(jnp.float32)
    best_possible = running_scores[:, :1] / best_length**g.length_penalty
    worst = jnp.where(is_finished, jnp.min(finished_scores, axis=1, keepdims=True), -1.0e9)
    improvable = s.improvable & jnp.any(best_possible > worst, axis=-1, keepdims=True)
    go = jnp.any(improvable) & ~jnp.all(ended)
    if g.early_stopping is True:
        go &= ~jnp.all(is_finished)
    return BeamState(running, running_scores, parent, finished, finished_scores, is_finished, improvable, length, go)


def _beam_search(model, g: GenerationConfig, params, input_ids, attention_mask, key):
    """Beam search with ``K = num_beams`` beams per prompt; returns the best finished hypothesis of each."""
    del key
    b, p = input_ids.shape
    k, total = g.num_beams, p + g.max_new_tokens
    cache = init_cache(model.config, b, max(total - 1, p), model.dtype)
    positions = prompt_positions(attention_mask)
    logits, cache = _forward(model, params, input_ids, positions, attention_mask, cache)
    cache, logits = repeat_cache(cache, k), jnp.repeat(logits, k, axis=0)
    last_position = jnp.repeat(positions[:, -1], k)

    seqs = jnp.full((b, k, total), g.pad_token_id, jnp.int32).at[:, :, :p].set(input_ids[:, None, :])
    state = BeamState(
        running=seqs,
        running_scores=jnp.zeros((b, k), jnp.float32).at[:, 1:].set(-1.0e9),
        parent=jnp.zeros((b, k), jnp.int32),
        finished=seqs,
        finished_scores=jnp.full((b, k), -1.0e9, jnp.float32),
        is_finished=jnp.zeros((b, k), bool),
        improvable=jnp.ones((b, 1), bool),
        length=jnp.asarray(p, jnp.int32),
        go=jnp.asarray(True),
    )
    state = _beam_step(g, p, state, logits)

    def body(carry):
        s, cache = carry
        rows = (jnp.arange(b)[:, None] * k + s.parent).reshape(-1)
        cache = reorder_cache(cache, rows)
        token = jax.lax.dynamic_slice_in_dim(s.running, s.length - 1, 1, axis=2).reshape(b * k, 1)
        pos = (last_position + (s.length - p))[:, None]
        logits, cache = _forward(model, params, token, pos, None, cache)
        return _beam_step(g, p, s, logits), cache

    state, _ = jax.lax.while_loop(lambda carry: carry[0].go, body, (state, cache))
    return state.finished[:, 0]


@functools.lru_cache(maxsize=64)
def _compiled(model, g: GenerationConfig):
    fn = _beam_search if g.num_beams > 1 else _decode
    return jax.jit(functools.partial(fn, model, g))


def _token_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (int, np.integer)):
        return (int(value),)
    return tuple(int(v) for v in value)


def generate(
    model,
    params: PyTree,
    input_ids,
    attention_mask=None,
    *,
    key: Array | None = None,
    config: GenerationConfig | None = None,
    **settings,
) -> Array:
    """Continue each prompt of a (left-padded) batch.

    Args:
      model: a causal LM module built by this package (``lora_jax.models.build(config)``); its ``config``
        gives the cache shape and the default ``eos_token_id`` / ``pad_token_id``.
      params: its parameters: plain, merged, or LoRA-wrapped (``lora.wrap``: the factored forward).
      input_ids: ``(B, P)`` int prompts, padded on the left.
      attention_mask: ``(B, P)``, 0 on padding (default: no padding).
      key: PRNG key for sampling (default ``jax.random.key(0)``).
      config: a :class:`GenerationConfig`; ``settings`` override its fields, e.g. ``max_new_tokens=20,
        num_beams=10, length_penalty=0.9, no_repeat_ngram_size=4`` (the LoRA paper's E2E decoding).
        ``eos_token_id`` / ``pad_token_id`` default to the model config's (pad: else the first eos, else 0).

    Returns:
      ``(B, P + max_new_tokens)`` int32: the prompt followed by the generated tokens; a row that ended early
      (an eos token) is filled with ``pad_token_id``. For beam search, the best finished hypothesis.

    Decoding runs under ``jax.jit`` with a ``lax.while_loop`` over a fixed-size KV cache: it compiles once
    per ``(B, P)`` and setting, and stops as soon as every row has ended.
    """
    model_config = model.config
    fields = {**(dataclasses.asdict(config) if config is not None else {}), **settings}
    if fields.get("eos_token_id") is None:
        fields["eos_token_id"] = getattr(model_config, "eos_token_id", None)
    fields["eos_token_id"] = _token_ids(fields["eos_token_id"])
    if fields.get("pad_token_id") is None:
        pad = getattr(model_config, "pad_token_id", None)
        fields["pad_token_id"] = pad if pad is not None else (fields["eos_token_id"] or (0,))[0]
    g = GenerationConfig(**fields)

    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ArgumentError(
            f"input_ids must be (batch, prompt_length) with a non-empty prompt, got shape {tuple(input_ids.shape)}"
        )
    mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    if mask.shape != input_ids.shape:
        raise ArgumentError(f"attention_mask shape {tuple(mask.shape)} differs from input_ids {tuple(input_ids.shape)}")
    mask_np = np.asarray(mask)
    if (np.diff(mask_np, axis=1) < 0).any():
        raise ArgumentError(
            "attention_mask must be left-padded (zeros only before the first real token of a row); "
            "pad prompts on the left for generation (tokenizer.padding_side = 'left')"
        )
    if not mask_np[:, -1].all():
        raise ArgumentError("every prompt needs at least one real token at the end (left padding only)")
    limit = getattr(model_config, "position_limit", None)
    if limit is not None and input_ids.shape[1] + g.max_new_tokens > limit:
        raise ArgumentError(
            f"prompt length {input_ids.shape[1]} + max_new_tokens {g.max_new_tokens} exceeds the "
            f"model's {limit} learned positions"
        )
    vocab = model_config.vocab_size
    if int(jnp.max(input_ids)) >= vocab or int(jnp.min(input_ids)) < 0:
        raise ArgumentError(
            f"input_ids must lie in [0, {vocab}), got values in [{int(jnp.min(input_ids))}, {int(jnp.max(input_ids))}]"
        )
    key = jax.random.key(0) if key is None else key
    return _compiled(model, g)(params, input_ids, mask, key)


__all__ = [
    "BeamState",
    "GenerationConfig",
    "KVCache",
    "ban_repeated_ngrams",
    "begin_step",
    "default_positions",
    "generate",
    "init_cache",
    "input_positions",
    "process_logits",
    "prompt_positions",
    "reorder_cache",
    "repeat_cache",
    "run_layers",
    "segment_positions",
    "top_k_filter",
    "top_p_filter",
    "write_cache",
]
