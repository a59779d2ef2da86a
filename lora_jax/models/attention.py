"""Attention for the shared decoder, one entry point with implementations chosen by name.

:func:`attend` takes queries ``(B, S, H, hd)``, keys and values ``(B, T, KV, hd)`` (grouped-query: ``H`` a multiple of
``KV``) and a :class:`Mask`, and returns ``(B, S, H, hd)``. The mask is *described*, never formed: which slots hold
real tokens, the packed rows' segment ids, the slot of the first query and the sliding window, so an implementation
that works block by block builds only the block it is at. Scores are ``q . k * scale`` (default ``1 / sqrt(hd)``),
then, with ``softcap``, ``softcap * tanh(scores / softcap)`` (Gemma 2 / 3's attention logit soft-capping), in float32.

Query ``i`` (slot ``start + i``) may attend key slot ``j`` when ``j`` holds a real token, ``j <= start + i`` (causal),
``start + i - j < window`` (sliding window, when there is one) and both belong to the same segment (packed rows).

Implementations (``Mask.implementation``, from the model's ``attention`` setting, ``train``'s ``model.attention``):

- ``xla``: the dense reference (:func:`lora_jax.models.layers.attend`): the ``(B, S, T)`` boolean mask and float32
  ``(B, H, S, T)`` scores. What every model did before this module; decoding with a KV cache (``S`` new tokens
  against ``max_len`` slots) uses it under ``auto``.
- ``blockwise``: memory-efficient attention in plain JAX (Rabe & Staats 2021; the online softmax of FlashAttention,
  Dao et al. 2022): query blocks against key blocks with a running max and sum, so the forward keeps
  ``O(S)`` per row and head (the output and the log-sum-exp), never a block's probabilities. Its backward is a
  ``jax.custom_vjp`` that recomputes each block's probabilities from the log-sum-exp (FlashAttention 2's backward),
  so differentiating it keeps no ``S x T`` residual either. Key blocks entirely in the future of a query block (and,
  with a window, entirely behind it) are skipped. Runs on every backend.
- ``cudnn``: cuDNN's fused flash attention through ``jax.nn.dot_product_attention(..., implementation="cudnn")``
  (GPU, bfloat16 / float16). Causality and the window go to cuDNN as such; padding and packed segments go as a
  boolean ``(B, 1, S, T)`` mask (the public API has no segment ids), which is ``T x T`` bits per row but no scores.
  No soft-capping.
- ``splash``: JAX's Pallas splash attention for TPU (``jax.experimental.pallas.ops.tpu.splash_attention``), with its
  own causal / local masks, segment ids for packing and padding, and soft-capping; grouped heads run its
  multi-query kernel once per key/value head. Sequence lengths must be multiples of 128. ``interpret=True`` runs the
  kernel in Pallas' interpreter (any backend: how the tests check its numerics on CPU).
- ``auto`` (default): with a KV cache ``xla``; otherwise ``cudnn`` on GPU for bfloat16 / float16 without soft-capping,
  ``splash`` on TPU when the lengths are multiples of 128, else ``blockwise``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.errors import ArgumentError

Array = jax.Array

IMPLEMENTATIONS = ("auto", "xla", "blockwise", "cudnn", "splash")
BLOCK = 512  # default query / key block of the blockwise implementation
SPLASH_BLOCK = 512  # the splash kernel's largest block (smaller when the sequence is shorter)


def check_implementation(name: str) -> str:
    """``name`` when it is one of :data:`IMPLEMENTATIONS`, else ``ValueError`` listing them."""
    if name not in IMPLEMENTATIONS:
        raise ArgumentError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {name!r}")
    return name


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("key_valid", "segment_ids", "start"),
    meta_fields=("window", "cached", "implementation"),
)
@dataclasses.dataclass(frozen=True)
class Mask:
    """Which keys each query may attend, in ``O(B * (S + T))`` numbers.

    Attributes:
      key_valid: ``(B, T)`` bool, the key slot holds a real token; ``None``: every slot does.
      segment_ids: ``(B, S)`` int, packed rows (``S == T``, no cache): a query attends only keys of its own
        segment; ``None``: one example per row.
      start: ``()`` int32, the slot of the first query (0 without a cache; queries are at ``start + arange(S)``,
        keys at ``arange(T)``).
      window: sliding window in slots (``start + i - j < window``); ``None``: none.
      cached: the keys are a KV cache (decoding), not the queries' own sequence.
      implementation: one of :data:`IMPLEMENTATIONS`.
    """

    key_valid: Array | None
    segment_ids: Array | None
    start: Array
    window: int | None = None
    cached: bool = False
    implementation: str = "auto"

    def __post_init__(self):
        check_implementation(self.implementation)
        if self.window is not None and self.window < 1:
            raise ArgumentError(f"a sliding window must be at least 1 slot, got {self.window}")

    def dense(self, seq_len: int, kv_len: int) -> Array:
        """The ``(B, S, T)`` boolean mask this describes (what the ``xla`` implementation applies)."""
        return self.block(jnp.arange(seq_len), jnp.arange(kv_len), self.key_valid, self.segment_ids, self.segment_ids)

    def block(
        self, q_idx: Array, k_idx: Array, key_valid: Array | None, q_seg: Array | None, k_seg: Array | None
    ) -> Array:
        """The mask of queries ``q_idx (bq,)`` (indices into the queries) against key slots ``k_idx (bk,)``, given
        those keys' ``key_valid (B, bk)`` and the segment ids of both ``(B, bq)`` / ``(B, bk)``: ``(B or 1, bq, bk)``
        bool."""
        q_slot, k_slot = self.start + q_idx, k_idx
        distance = q_slot[:, None] - k_slot[None, :]
        m = (distance >= 0)[None]
        if self.window is not None:
            m = m & (distance < self.window)[None]
        if key_valid is not None:
            m = m & key_valid[:, None, :]
        if q_seg is not None:
            m = m & (q_seg[:, :, None] == k_seg[:, None, :])
        return m


@functools.partial(jax.tree_util.register_dataclass, data_fields=("full", "sliding", "use_sliding"), meta_fields=())
@dataclasses.dataclass(frozen=True)
class LayerMask:
    """The masks of a scanned layer stack whose layers differ only in their window (Gemma 3's interleaved local
    and global layers; Qwen2's ``layer_types``): ``full`` and ``sliding`` are the two :class:`Mask` s, and
    ``use_sliding`` (a ``()`` bool, one per layer, handed to each step of the scan) picks one. :func:`attend`
    runs the chosen one under ``jax.lax.cond``, so every layer runs one compiled body."""

    full: Mask
    sliding: Mask
    use_sliding: Array | None = None


def choose(mask: Mask, q: Array, softcap: float | None) -> str:
    """The implementation ``mask.implementation`` names; for ``auto`` the one this backend, dtype and call get
    (see the module docstring)."""
    name = mask.implementation
    if name != "auto":
        return name
    if mask.cached:
        return "xla"
    backend = jax.default_backend()
    if backend in ("gpu", "cuda", "rocm") and q.dtype in (jnp.bfloat16, jnp.float16) and softcap is None:
        return "cudnn"
    if backend == "tpu" and q.shape[1] % 128 == 0:
        return "splash"
    return "blockwise"


def attend(
    q: Array, k: Array, v: Array, mask: Mask | Array, scale: float | None = None, softcap: float | None = None
) -> Array:
    """Softmax attention with grouped key/value heads under ``mask``: ``q (B, S, H, hd)``, ``k`` / ``v``
    ``(B, T, KV, hd)`` -> ``(B, S, H, hd)`` in ``q``'s dtype.

    ``mask`` is a :class:`Mask` (its ``implementation`` picks the kernel) or a ``(B, S, T)`` boolean array (the
    dense ``xla`` path, as before). ``scale``: score scale, default ``1 / sqrt(hd)``; ``softcap``: see the module
    docstring.
    """
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ArgumentError(
            f"attend expects q (B, S, H, hd) and k, v (B, T, KV, hd) of one batch and head width, got "
            f"q {q.shape}, k {k.shape}, v {v.shape}"
        )
    if q.shape[2] % k.shape[2]:
        raise ArgumentError(f"the {q.shape[2]} query heads must be a multiple of the {k.shape[2]} key/value heads")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if isinstance(mask, LayerMask):
        if mask.use_sliding is None:
            raise ArgumentError("attend: a LayerMask needs use_sliding (the layer's flag) set")
        return jax.lax.cond(
            mask.use_sliding,
            lambda: attend(q, k, v, mask.sliding, scale, softcap),
            lambda: attend(q, k, v, mask.full, scale, softcap),
        )
    if not isinstance(mask, Mask):
        return xla(q, k, v, mask, scale, softcap)
    name = choose(mask, q, softcap)
    if name == "xla":
        return xla(q, k, v, mask.dense(q.shape[1], k.shape[1]), scale, softcap)
    if name == "blockwise":
        return blockwise(q, k, v, mask, scale, softcap)
    if name == "cudnn":
        return cudnn(q, k, v, mask, scale, softcap)
    return splash(q, k, v, mask, scale, softcap)


def xla(q: Array, k: Array, v: Array, mask: Array, scale: float, softcap: float | None = None) -> Array:
    """The dense reference: :func:`lora_jax.models.layers.attend` under the ``(B, S, T)`` boolean ``mask``."""
    from lora_jax.models.layers import attend as dense  # layers imports this module: import at call time

    return dense(q, k, v, mask, scale, softcap)


# ------------------------------------------------------------------------------------------------ blockwise


def blockwise(
    q: Array,
    k: Array,
    v: Array,
    mask: Mask,
    scale: float,
    softcap: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> Array:
    """Blockwise online-softmax attention (see the module docstring); shapes as :func:`attend`.

    ``block_q`` / ``block_k``: query / key block (default :data:`BLOCK`, at most the sequence). Sequences are padded
    up to whole blocks (padded keys are invalid, padded queries dropped). A query that may attend no key at all
    (padding) gets zeros.
    """
    b, s, h, d = q.shape
    t, kvh = k.shape[1], k.shape[2]
    bq, bk = min(block_q or BLOCK, s), min(block_k or BLOCK, t)
    sp, tp = -(-s // bq) * bq, -(-t // bk) * bk
    key_valid = mask.key_valid
    if tp != t:
        key_valid = jnp.ones((b, t), bool) if key_valid is None else key_valid
    pad = lambda x, n: (
        x
        if x is None or x.shape[1] == n
        else jnp.pad(  # noqa: E731
            x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
        )
    )
    seg = mask.segment_ids
    if seg is not None and seg.shape != (b, s):
        raise ArgumentError(f"segment_ids must be (B, S) = {(b, s)}, got {seg.shape}")
    if seg is not None and t != s:
        raise ArgumentError(f"packed rows (segment_ids) need as many keys as queries, got {s} queries and {t} keys")
    qb = pad(q, sp).reshape(b, sp // bq, bq, kvh, h // kvh, d)
    kb, vb = pad(k, tp).reshape(b, tp // bk, bk, kvh, d), pad(v, tp).reshape(b, tp // bk, bk, kvh, d)
    spec = _Spec(window=mask.window, scale=scale, softcap=softcap, bq=bq, bk=bk)
    out = _flash(spec, qb, kb, vb, pad(key_valid, tp), pad(seg, sp), pad(seg, tp), jnp.asarray(mask.start, jnp.int32))
    return out.reshape(b, sp, h, d)[:, :s].astype(q.dtype)


@dataclasses.dataclass(frozen=True)
class _Spec:
    """The static settings of one blockwise attention: window, score scale, soft-cap, block sizes."""

    window: int | None
    scale: float
    softcap: float | None
    bq: int
    bk: int

    def mask(self, i, j, key_valid, q_seg, k_seg, start) -> Array:
        """``(B or 1, 1, 1, bq, bk)`` bool mask of query block ``i`` against key block ``j``."""
        take = lambda x, n, blk: None if x is None else jax.lax.dynamic_slice_in_dim(x, n * blk, blk, 1)  # noqa: E731
        m = Mask(None, None, start, self.window).block(
            i * self.bq + jnp.arange(self.bq),
            j * self.bk + jnp.arange(self.bk),
            take(key_valid, j, self.bk),
            take(q_seg, i, self.bq),
            take(k_seg, j, self.bk),
        )
        return m[:, None, None]

    def scores(self, qi: Array, kj: Array) -> tuple[Array, Array | None]:
        """Float32 scores ``(B, KV, G, bq, bk)`` of a query block ``(B, bq, KV, G, d)`` against a key block
        ``(B, bk, KV, d)``, soft-capped; also ``tanh(raw / softcap)`` for the backward (``None`` without cap)."""
        s = jnp.einsum("bqkgd,btkd->bkgqt", qi, kj, preferred_element_type=jnp.float32) * self.scale
        if self.softcap is None:
            return s, None
        capped = jnp.tanh(s / self.softcap)
        return self.softcap * capped, capped

    def key_blocks(self, i, start, nk):
        """``[lo, hi)``: the key blocks query block ``i`` can see (causality; the window)."""
        last = start + (i + 1) * self.bq - 1  # slot of the block's last query
        hi = jnp.clip(last // self.bk + 1, 0, nk)
        if self.window is None:
            return jnp.zeros_like(hi), hi
        first = start + i * self.bq
        return jnp.clip((first - self.window + 1) // self.bk, 0, nk), hi

    def query_blocks(self, j, start, nq):
        """``[lo, hi)``: the query blocks that can see key block ``j``."""
        first_key = j * self.bk
        lo = jnp.clip((first_key - start) // self.bq, 0, nq)
        if self.window is None:
            return lo, jnp.full_like(lo, nq)
        last_query = first_key + self.bk - 1 + self.window - 1  # the last slot whose window reaches the block
        return lo, jnp.clip((last_query - start) // self.bq + 1, 0, nq)


def _forward(spec: _Spec, q, k, v, key_valid, q_seg, k_seg, start):
    """Output ``(B, nq, bq, KV, G, d)`` float32 and log-sum-exp ``(B, KV, G, nq * bq)`` (0 where nothing is
    attended)."""
    b, nq, bq, kvh, g, d = q.shape
    nk = k.shape[1]

    def query_block(i):
        qi = q[:, i]

        def key_block(j, carry):
            m, l, acc = carry
            s, _ = spec.scores(qi, k[:, j])
            msk = spec.mask(i, j, key_valid, q_seg, k_seg, start)
            m_new = jnp.maximum(m, jnp.max(jnp.where(msk, s, -jnp.inf), axis=-1))
            m_ref = jnp.where(jnp.isneginf(m_new), 0.0, m_new)  # rows that saw nothing yet: no inf - inf
            p = jnp.where(msk, jnp.exp(s - m_ref[..., None]), 0.0)
            alpha = jnp.exp(m - m_ref)
            pv = jnp.einsum("bkgqt,btkd->bkgqd", p.astype(v.dtype), v[:, j], preferred_element_type=jnp.float32)
            return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

        init = (
            jnp.full((b, kvh, g, bq), -jnp.inf, jnp.float32),
            jnp.zeros((b, kvh, g, bq), jnp.float32),
            jnp.zeros((b, kvh, g, bq, d), jnp.float32),
        )
        lo, hi = spec.key_blocks(i, start, nk)
        m, l, acc = jax.lax.fori_loop(lo, hi, key_block, init)
        seen = l > 0
        out = acc / jnp.where(seen, l, 1.0)[..., None]
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
        return out.transpose(0, 3, 1, 2, 4), lse  # (B, bq, KV, G, d), (B, KV, G, bq)

    out, lse = jax.lax.map(query_block, jnp.arange(nq))  # (nq, B, bq, KV, G, d), (nq, B, KV, G, bq)
    return out.transpose(1, 0, 2, 3, 4, 5), lse.transpose(1, 2, 3, 0, 4).reshape(b, kvh, g, nq * bq)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(spec: _Spec, q, k, v, key_valid, q_seg, k_seg, start):
    return _forward(spec, q, k, v, key_valid, q_seg, k_seg, start)[0].astype(q.dtype)


def _flash_fwd(spec, q, k, v, key_valid, q_seg, k_seg, start):
    out, lse = _forward(spec, q, k, v, key_valid, q_seg, k_seg, start)
    out = out.astype(q.dtype)
    return out, (q, k, v, key_valid, q_seg, k_seg, start, out, lse)


def _flash_bwd(spec, residuals, dout):
    """FlashAttention 2's backward: per key block, the query blocks that see it, each block's probabilities
    recomputed from the log-sum-exp; ``dq`` accumulated across key blocks in one ``(B, nq, bq, KV, G, d)`` buffer."""
    q, k, v, key_valid, q_seg, k_seg, start, out, lse = residuals
    b, nq, bq, kvh, g, d = q.shape
    nk, bk = k.shape[1], k.shape[2]
    # D_i = sum_d dO * O: the softmax's correction term, (B, KV, G, nq * bq)
    delta = jnp.einsum("bnqkgd,bnqkgd->bkgnq", dout.astype(jnp.float32), out.astype(jnp.float32)).reshape(
        b, kvh, g, nq * bq
    )

    def key_block(dq, j):
        kj, vj = k[:, j], v[:, j]

        def query_block(i, carry):
            dq, dk, dv = carry
            qi, doi = q[:, i], dout[:, i]
            lse_i = jax.lax.dynamic_slice_in_dim(lse, i * bq, bq, 3)
            delta_i = jax.lax.dynamic_slice_in_dim(delta, i * bq, bq, 3)
            s, capped = spec.scores(qi, kj)
            msk = spec.mask(i, j, key_valid, q_seg, k_seg, start)
            p = jnp.where(msk, jnp.exp(s - lse_i[..., None]), 0.0)  # (B, KV, G, bq, bk)
            dv = dv + jnp.einsum("bkgqt,bqkgd->btkd", p.astype(doi.dtype), doi, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bqkgd,btkd->bkgqt", doi, vj, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_i[..., None])
            if capped is not None:
                ds = ds * (1.0 - capped * capped)
            ds = (ds * spec.scale).astype(q.dtype)
            dq_i = jnp.einsum("bkgqt,btkd->bqkgd", ds, kj, preferred_element_type=jnp.float32)
            dq = dq.at[:, i].add(dq_i)
            dk = dk + jnp.einsum("bkgqt,bqkgd->btkd", ds, qi, preferred_element_type=jnp.float32)
            return dq, dk, dv

        lo, hi = spec.query_blocks(j, start, nq)
        zeros = jnp.zeros((b, bk, kvh, d), jnp.float32)
        dq, dk, dv = jax.lax.fori_loop(lo, hi, query_block, (dq, zeros, zeros))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(q.shape, jnp.float32), jnp.arange(nk))
    dk, dv = dk.transpose(1, 0, 2, 3, 4), dv.transpose(1, 0, 2, 3, 4)  # (B, nk, bk, KV, d)
    return (
        dq.astype(q.dtype),
        dk.astype(k.dtype),
        dv.astype(v.dtype),
        _zero(key_valid),
        _zero(q_seg),
        _zero(k_seg),
        _zero(start),
    )


def _zero(x):
    """The cotangent of a non-differentiable (bool / int) input: float0 zeros (``None`` for ``None``)."""
    return None if x is None else np.zeros(x.shape, jax.dtypes.float0)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ------------------------------------------------------------------------------------------- cuDNN (GPU)


def cudnn(q: Array, k: Array, v: Array, mask: Mask, scale: float, softcap: float | None = None) -> Array:
    """cuDNN flash attention via ``jax.nn.dot_product_attention(..., implementation="cudnn")``; padding and
    packed segments as a boolean ``(B, 1, S, T)`` mask. Not run on a GPU in this project yet."""
    if softcap is not None:
        raise ArgumentError("the cudnn attention has no logit soft-capping; use attention='blockwise' (or 'auto')")
    if mask.cached:
        raise ArgumentError("the cudnn attention is for training (no KV cache); decode with attention='xla' or 'auto'")
    s, t = q.shape[1], k.shape[1]
    dense = None
    if mask.key_valid is not None or mask.segment_ids is not None:
        dense = Mask(mask.key_valid, mask.segment_ids, mask.start).dense(s, t)[:, None]
    window = None if mask.window is None else (mask.window - 1, 0)
    return jax.nn.dot_product_attention(
        q, k, v, mask=dense, scale=scale, is_causal=True, local_window_size=window, implementation="cudnn"
    )


# --------------------------------------------------------------------------------------- splash (TPU)


def splash(
    q: Array,
    k: Array,
    v: Array,
    mask: Mask,
    scale: float,
    softcap: float | None = None,
    interpret: bool = False,
    block: int = SPLASH_BLOCK,
) -> Array:
    """JAX's Pallas splash attention (TPU): a static causal / local mask, segment ids for packing and padding,
    soft-capping in the kernel; grouped heads through its multi-query kernel per key/value head. ``interpret``:
    run the kernel in Pallas' interpreter (any backend). Lengths must be multiples of 128."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    if mask.cached:
        raise ArgumentError("the splash attention is for training (no KV cache); decode with attention='xla' or 'auto'")
    b, s, h, d = q.shape
    t, kvh = k.shape[1], k.shape[2]
    if s != t or s % 128:
        raise ArgumentError(
            f"the splash attention needs as many queries as keys, a multiple of 128, got {s} and {t}; "
            "use attention='blockwise'"
        )
    base = sm.CausalMask((s, t)) if mask.window is None else sm.LocalMask((s, t), (mask.window - 1, 0), 0)
    blk = math.gcd(s, block)
    sizes = sk.BlockSizes(
        block_q=blk,
        block_kv=blk,
        block_kv_compute=blk,
        block_q_dkv=blk,
        block_kv_dkv=blk,
        block_kv_dkv_compute=blk,
        block_q_dq=blk,
        block_kv_dq=blk,
    )
    kernel = sk.make_splash_mqa_single_device(
        sm.MultiHeadMask([base] * (h // kvh)), block_sizes=sizes, attn_logits_soft_cap=softcap, interpret=interpret
    )
    valid = jnp.ones((b, s), bool) if mask.key_valid is None else mask.key_valid
    seg = jnp.where(valid, 1 if mask.segment_ids is None else mask.segment_ids, -1).astype(jnp.int32)  # pad: -1
    qh = (q * jnp.asarray(scale, q.dtype)).reshape(b, s, kvh, h // kvh, d).transpose(0, 2, 3, 1, 4)  # (B,KV,G,S,d)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, KV, T, d)

    def one(qg, kg, vg, sg):
        return kernel(qg, kg, vg, segment_ids=sk.SegmentIds(q=sg, kv=sg))

    out = jax.vmap(jax.vmap(one, in_axes=(0, 0, 0, None)))(qh, kh, vh, seg)  # (B, KV, G, S, d)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, s, h, d).astype(q.dtype)


__all__ = [
    "BLOCK",
    "IMPLEMENTATIONS",
    "LayerMask",
    "Mask",
    "attend",
    "blockwise",
    "check_implementation",
    "choose",
    "cudnn",
    "splash",
    "xla",
]
