"""lora_jax.losses.chunked_cross_entropy: equal to optax on the full logits, and never holding them.

The reference everywhere is ``optax.softmax_cross_entropy_with_integer_labels`` on float32 logits formed in
full (``h @ W``, ``h @ E.T``, the factored LoRA product of :func:`lora_jax.ops.dot`, or the dense adapted
table), differentiated by JAX's own autodiff.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lora
from lora_jax import losses, ops

ROOT = Path(__file__).resolve().parents[1]
B, S, D, V = 3, 37, 16, 101  # S = 37 is prime: no chunk size divides it


def _data(seed=0, dtype=jnp.float32):
    k = jax.random.split(jax.random.key(seed), 6)
    h = jax.random.normal(k[0], (B, S, D), jnp.float32).astype(dtype)
    kernel = jax.random.normal(k[1], (D, V)) * 0.3
    table = jax.random.normal(k[2], (V, D)) * 0.3
    targets = jax.random.randint(k[3], (B, S), 0, V)
    mask = (jax.random.uniform(k[4], (B, S)) > 0.3).astype(jnp.float32)
    return h, kernel, table, targets, mask


def _reference(logits_fn, targets, mask, *, z_loss=0.0, label_smoothing=0.0, softcap=None):
    def loss(*args):
        logits = logits_fn(*args).astype(jnp.float32)
        if softcap:
            logits = softcap * jnp.tanh(logits / softcap)
        if label_smoothing:
            ce = optax.softmax_cross_entropy(logits, optax.smooth_labels(jax.nn.one_hot(targets, V), label_smoothing))
        else:
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        if z_loss:
            ce = ce + z_loss * jax.nn.logsumexp(logits, axis=-1) ** 2
        return jnp.sum(ce * mask)

    return loss


def _assert_close(got, want, atol=1e-5, rtol=1e-5):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=atol, rtol=rtol)


@pytest.mark.parametrize("tied", [False, True], ids=["kernel", "table"])
@pytest.mark.parametrize("chunk", [7, None], ids=["chunk7", "auto"])
def test_loss_and_gradients_equal_optax_on_full_logits(tied, chunk):
    h, kernel, table, targets, mask = _data()
    head = table if tied else kernel
    logits = (lambda h, w: h @ w.T) if tied else (lambda h, w: h @ w)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(_reference(logits, targets, mask), argnums=(0, 1)))(h, head)

    def chunked(h, w):
        return losses.chunked_cross_entropy(h, w, targets, mask, tied=tied, chunk_size=chunk)[0]

    loss, grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(h, head)
    _assert_close(loss, ref_loss)
    _assert_close(grads, ref_grads)
    # hidden states only (a frozen head): the same gradient
    _assert_close(jax.grad(chunked)(h, head), ref_grads[0])
    count = losses.chunked_cross_entropy(h, head, targets, mask, tied=tied, chunk_size=chunk)[1]
    assert float(count) == float(mask.sum())


@pytest.mark.parametrize("tied", [False, True], ids=["kernel", "table"])
def test_z_loss_label_smoothing_and_softcap(tied):
    h, kernel, table, targets, mask = _data(1)
    head = table if tied else kernel
    logits = (lambda h, w: h @ w.T) if tied else (lambda h, w: h @ w)
    ref = _reference(logits, targets, mask, z_loss=1e-2, label_smoothing=0.1, softcap=3.0)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(ref, argnums=(0, 1)))(h, head)

    def chunked(h, w):
        return losses.chunked_cross_entropy(
            h, w, targets, mask, tied=tied, chunk_size=10, z_loss=1e-2, label_smoothing=0.1, logit_softcap=3.0
        )[0]

    loss, grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(h, head)
    _assert_close(loss, ref_loss)
    _assert_close(grads, ref_grads)


def _adapted(seed=2, targets=("lm_head/kernel", "embed/embedding"), **init_kw):
    """Params with a kernel head and an embedding table, adapters on ``targets`` with B != 0."""
    _, kernel, table, _, _ = _data()
    params = {"lm_head": {"kernel": kernel}, "embed": {"embedding": table}}
    adapters = lora.init(params, r=4, alpha=8, targets=list(targets), allow_embeddings=True, **init_kw)
    keys = iter(jax.random.split(jax.random.key(seed), 8))
    return params, jax.tree.map(
        lambda ad: dataclasses.replace(ad, b=0.1 * jax.random.normal(next(keys), ad.b.shape)),
        adapters,
        is_leaf=lora.is_adapter,
    )


@pytest.mark.parametrize("tied", [False, True], ids=["lora-lm_head", "lora-tied-table"])
def test_lora_head_gradients_for_a_and_b(tied):
    h, _, _, targets, mask = _data()
    params, adapters = _adapted()
    path = ("embed", "embedding") if tied else ("lm_head", "kernel")

    def head_of(a):
        return lora.wrap(params, a)[path[0]][path[1]]

    def plain_logits(h, a):  # the model's own paths: Embed.attend materialises the table, Dense runs ops.dot
        w = head_of(a)
        return h @ ops.materialize(w).T if tied else ops.dot(h, w)

    ref = _reference(plain_logits, targets, mask)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(ref, argnums=(0, 1)))(h, adapters)

    def chunked(h, a):
        return losses.chunked_cross_entropy(h, head_of(a), targets, mask, tied=tied, chunk_size=8)[0]

    loss, grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(h, adapters)
    _assert_close(loss, ref_loss)
    _assert_close(grads, ref_grads)
    name = "/".join(path)
    ad_grad = dict(lora.adapter_items(grads[1]))[name]
    assert float(jnp.abs(ad_grad.a).max()) > 0 and float(jnp.abs(ad_grad.b).max()) > 0


def test_lora_head_with_dropout_and_dora():
    """Adapter dropout on the head draws the plain path's mask; a DoRA head keeps its norm constant as ops.dot."""
    h, _, _, targets, mask = _data()
    for kw in ({"dropout": 0.3}, {"use_dora": True}):
        params, adapters = _adapted(targets=["lm_head/kernel"], **kw)
        key = jax.random.key(7)

        def head_of(a):
            return lora.wrap(params, a, dropout_key=key)["lm_head"]["kernel"]

        ref = _reference(lambda h, a: ops.dot(h, head_of(a)), targets, mask)
        ref_loss, ref_grads = jax.jit(jax.value_and_grad(ref, argnums=(0, 1)))(h, adapters)
        loss, grads = jax.jit(
            jax.value_and_grad(
                lambda h, a: losses.chunked_cross_entropy(h, head_of(a), targets, mask, chunk_size=16)[0],
                argnums=(0, 1),
            )
        )(h, adapters)
        _assert_close(loss, ref_loss)
        _assert_close(grads, ref_grads)


def test_quantized_table_head():
    h, _, table, targets, mask = _data()
    q = lora.quantize({"e": {"embedding": table}}, "nf4", targets=["e/embedding"], allow_embeddings=True)
    q = q["e"]["embedding"]
    assert isinstance(q, lora.QuantizedWeight)
    dense = q.dequantize(jnp.float32)
    ref_loss, ref_grad = jax.jit(jax.value_and_grad(_reference(lambda h: h @ dense.T, targets, mask)))(h)
    loss, grad = jax.jit(
        jax.value_and_grad(lambda h: losses.chunked_cross_entropy(h, q, targets, mask, tied=True, chunk_size=16)[0])
    )(h)
    _assert_close(loss, ref_loss)
    _assert_close(grad, ref_grad)


def test_mask_is_respected():
    """Masked positions change neither the loss nor any gradient, whatever their hidden states and targets (even
    ids outside the vocabulary, as padding may carry)."""
    h, kernel, _, targets, mask = _data()
    off = mask == 0
    h2 = jnp.where(off[..., None], 100.0, h)
    t2 = jnp.where(off, V + 5, targets)

    def f(h, w, t):
        return losses.chunked_cross_entropy(h, w, t, mask, chunk_size=8)[0]

    grad = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
    (l1, (gh1, gw1)), (l2, (gh2, gw2)) = (grad(hh, kernel, tt) for hh, tt in ((h, targets), (h2, t2)))
    _assert_close(l1, l2)
    _assert_close(gw1, gw2, atol=1e-6)
    assert float(jnp.abs(jnp.where(off[..., None], gh2, 0.0)).max()) == 0.0
    _assert_close(jnp.where(off[..., None], 0.0, gh2), gh1)


def test_bfloat16_hidden_states():
    """bf16 hidden states and head: float32 logits and loss, bf16 gradients close to the float32 result."""
    h, kernel, table, targets, mask = _data()
    hb, tb = h.astype(jnp.bfloat16), table.astype(jnp.bfloat16)
    ref = _reference(lambda h, w: h.astype(jnp.float32) @ w.astype(jnp.float32).T, targets, mask)
    ref_loss, (ref_gh, ref_gw) = jax.jit(jax.value_and_grad(ref, argnums=(0, 1)))(hb, tb)
    f = lambda h, w: losses.chunked_cross_entropy(h, w, targets, mask, tied=True, chunk_size=16)[0]  # noqa: E731
    loss, (gh, gw) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(hb, tb)
    assert loss.dtype == jnp.float32 and gh.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)  # logits accumulate in float32
    np.testing.assert_allclose(np.asarray(gh, np.float32), np.asarray(ref_gh, np.float32), atol=2e-2, rtol=2e-2)
    np.testing.assert_allclose(np.asarray(gw, np.float32), np.asarray(ref_gw, np.float32), atol=2e-2, rtol=2e-2)


def _dots(jaxpr) -> list[tuple[int, ...]]:
    """Output shapes of every dot_general in a jaxpr, sub-jaxprs (loops, custom VJPs) included."""
    from jax.extend.core import jaxprs_in_params

    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.append(tuple(eqn.outvars[0].aval.shape))
        for sub in jaxprs_in_params(eqn.params):
            shapes += _dots(sub)
    return shapes


def test_frozen_head_forms_no_weight_gradient():
    """With the head frozen (the hidden states differentiated only), no (V, D) product is formed; differentiating
    the table forms it."""
    h, _, table, targets, mask = _data()
    f = lambda h, w: losses.chunked_cross_entropy(h, w, targets, mask, tied=True, chunk_size=8)[0]  # noqa: E731
    frozen = _dots(jax.make_jaxpr(jax.grad(f))(h, table).jaxpr)
    trained = _dots(jax.make_jaxpr(jax.grad(f, argnums=1))(h, table).jaxpr)
    assert (V, D) not in frozen and (V, D) in trained, (frozen, trained)


def test_compiled_temporaries_stay_below_the_logits():
    """XLA's plan for loss + gradient: the chunked loss's temporaries are below one (N, V) float32 logits array,
    the plain path's above it (hidden states differentiated, as under LoRA; then the head too)."""
    b, s, d, v = 4, 128, 64, 8192
    logits_bytes = b * s * v * 4
    args = (
        jax.ShapeDtypeStruct((b, s, d), jnp.float32),
        jax.ShapeDtypeStruct((v, d), jnp.float32),
        jax.ShapeDtypeStruct((b, s), jnp.int32),
        jax.ShapeDtypeStruct((b, s), jnp.float32),
    )

    def temp(fn, argnums):
        grad = jax.jit(jax.value_and_grad(lambda h, w, t, m: fn(h, w, t, m)[0], argnums=argnums))
        return grad.lower(*args).compile().memory_analysis().temp_size_in_bytes

    def chunked(h, w, t, m):
        return losses.chunked_cross_entropy(h, w, t, m, tied=True, chunk_size=128)

    def plain(h, w, t, m):
        return losses.cross_entropy(h, w, t, m, tied=True)

    for argnums in ((0,), (0, 1)):
        # the table's gradient: a float32 accumulator and one chunk's product, each weight-sized
        weight_grad = 2 * 4 * v * d if 1 in argnums else 0
        assert temp(chunked, argnums) < 0.6 * logits_bytes + weight_grad, argnums
        assert temp(plain, argnums) > logits_bytes, argnums


def test_input_errors():
    h, kernel, table, targets, mask = _data()
    with pytest.raises(ValueError, match=r"not a \(D, V\) kernel"):
        losses.chunked_cross_entropy(h, table, targets, mask)
    with pytest.raises(ValueError, match="targets of shape"):
        losses.chunked_cross_entropy(h, kernel, targets[:, :-1], mask)
    with pytest.raises(ValueError, match="integer ids"):
        losses.chunked_cross_entropy(h, kernel, targets.astype(jnp.float32), mask)
    with pytest.raises(ValueError, match="chunk_size"):
        losses.chunked_cross_entropy(h, kernel, targets, mask, chunk_size=0)


def test_default_chunk_size():
    assert losses.default_chunk_size(4096) == 4096
    assert losses.default_chunk_size(50_257) == 333
    assert losses.default_chunk_size(262_144) == 64
    assert losses.default_chunk_size(10**9) == 8


# ------------------------------------------------------------------------------- the training job's loss


def _tiny(family: str, tied: bool):
    from lora_jax.models import gpt2, llama

    if family == "gpt2":
        arch, config = (
            gpt2,
            gpt2.Config(
                vocab_size=97,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=64,
                tie_word_embeddings=tied,
            ),
        )
    else:
        arch, config = (
            llama,
            llama.Config(
                vocab_size=97,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=8,
                tie_word_embeddings=tied,
                max_position_embeddings=64,
            ),
        )
    return arch, config, arch.init_params(config, jax.random.key(0))


def _lm_batch(vocab: int, b: int = 2, s: int = 13):
    rng = np.random.RandomState(0)
    ids = jnp.asarray(rng.randint(0, vocab, (b, s)), jnp.int32)
    attention = jnp.asarray(np.arange(s)[None, :] < np.array([[s], [s - 4]]), jnp.int32)  # row 1 padded
    loss_mask = attention * jnp.asarray(np.arange(s)[None, :] >= 3, jnp.int32)
    loss_mask = loss_mask.at[1, s - 5].set(0)  # the last real token of row 1 predicts padding
    return {
        "input_ids": ids,
        "attention_mask": attention,
        "loss_mask": loss_mask,
        "weight": jnp.asarray([1.0, 0.5], jnp.float32),
    }


@pytest.mark.parametrize(
    "family,tied", [pytest.param("llama", False, marks=pytest.mark.slow), ("llama", True), ("gpt2", True)]
)
def test_causal_lm_loss_chunked_equals_full_logits(family, tied):
    """train.tasks.causal_lm_loss through the model's hidden states + head() equals the full-logits path: loss,
    token count, and the gradients of LoRA adapters on q/v and on the head (lm_head, or the tied table)."""
    from train.tasks import causal_lm_loss

    arch, config, params = _tiny(family, tied)
    model = arch.build(config)
    head = (
        ("model/embed_tokens/embedding" if family == "llama" else "transformer/wte/embedding")
        if tied
        else "lm_head/kernel"
    )
    adapters = lora.init(params, r=4, targets=[".*(q_proj|v_proj|c_attn)/kernel", head], allow_embeddings=tied)
    keys = iter(jax.random.split(jax.random.key(1), 64))
    adapters = jax.tree.map(
        lambda ad: dataclasses.replace(ad, b=0.1 * jax.random.normal(next(keys), ad.b.shape)),
        adapters,
        is_leaf=lora.is_adapter,
    )
    batch = _lm_batch(config.vocab_size)

    def loss(a, chunk):
        total, aux = causal_lm_loss(model, lora.wrap(params, a), batch, train=True, rng=None, loss_chunk=chunk)
        return total, aux["count"]

    (l0, c0), g0 = jax.jit(jax.value_and_grad(lambda a: loss(a, 0), has_aux=True))(adapters)
    (l1, c1), g1 = jax.jit(jax.value_and_grad(lambda a: loss(a, 5), has_aux=True))(adapters)
    assert float(c0) == float(c1) == float(jnp.sum(batch["loss_mask"][:, :-1] * batch["weight"][:, None]))
    _assert_close(l1, l0)
    _assert_close(g1, g0)
    assert float(jnp.abs(dict(lora.adapter_items(g1))[head].b).max()) > 0


def test_config_remat_and_loss_chunk():
    from train import loop
    from train.config import ConfigError, load_config

    assert loop.remat_name(load_config(None, ["train.remat=true"]).train.remat) == "dots_no_batch"
    assert loop.remat_name(load_config(None, []).train.remat) == "none"
    assert loop.remat_name(load_config(None, ["train.remat=full"]).train.remat) == "full"
    assert load_config(None, []).train.loss_chunk == "auto"
    assert load_config(None, ["train.loss_chunk=256"]).train.loss_chunk == 256
    with pytest.raises(ConfigError, match="train.remat"):
        load_config(None, ["train.remat=everything"])
    with pytest.raises(ConfigError, match="train.loss_chunk"):
        load_config(None, ["train.loss_chunk=-1"])
    with pytest.raises(ConfigError, match="train.loss_chunk"):
        load_config(None, ["train.loss_chunk=big"])


def test_remat_policies_same_step_less_memory():
    """train.remat=full (each layer checkpointed, as train.loop.load_model sets the model up) gives the step of no
    remat, and on this backend plans less memory than none (on XLA:CPU only with step_compiler_options, which
    keeps the checkpoint's barriers)."""
    import optax

    from train import loop
    from train.config import load_config

    arch, config, params = _tiny("llama", True)
    batch = {k: v[None] for k, v in _lm_batch(config.vocab_size).items() if k != "weight"}
    out, temp = {}, {}
    for policy in ("none", "full"):
        cfg = load_config(None, [f"train.remat={policy}", "lora.targets=qv", "optim.warmup_steps=0"])
        model = arch.build(config).clone(remat=loop.remat_name(cfg.train.remat))
        prepared = loop.prepare(cfg, params, jax.random.key(0))
        tx = optax.sgd(1.0)
        step = jax.jit(loop.make_train_step(model, cfg, tx), compiler_options=loop.step_compiler_options(cfg))
        args = (prepared.trainable, tx.init(prepared.trainable), prepared.frozen, batch, jax.random.key(1))
        compiled = step.lower(*args).compile()
        temp[policy] = compiled.memory_analysis().temp_size_in_bytes
        out[policy] = compiled(*args)[0]
    _assert_close(out["full"], out["none"])
    assert temp["full"] < temp["none"], temp


SHARDED_CHILD = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from lora_jax import losses
assert jax.device_count() == 8, jax.devices()
k = jax.random.split(jax.random.key(0), 4)
h = jax.random.normal(k[0], (8, 21, 16))
w = jax.random.normal(k[1], (16, 101)) * 0.3
t = jax.random.randint(k[2], (8, 21), 0, 101)
m = (jax.random.uniform(k[3], (8, 21)) > 0.3).astype(jnp.float32)
f = jax.value_and_grad(lambda h, w: losses.chunked_cross_entropy(h, w, t, m, chunk_size=40)[0], argnums=(0, 1))
want = jax.jit(f)(h, w)
mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
hs = jax.device_put(h, NamedSharding(mesh, P(("data", "fsdp"))))
ws = jax.device_put(w, NamedSharding(mesh, P("fsdp", None)))
got = jax.jit(f)(hs, ws)
assert got[1][0].sharding.is_equivalent_to(hs.sharding, 3), got[1][0].sharding
for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
print("OK")
"""


def test_sharded_batch_on_8_cpu_devices():
    """A batch sharded over 8 devices (data 4 x fsdp 2, the head kernel split over fsdp): the loss and gradients of one
    device, and the hidden states' gradient keeps the batch's sharding."""
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT)
    )
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SHARDED_CHILD)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_loss_memory_benchmark_quick(tmp_path):
    """benchmarks/loss_memory.py --quick: its tables, ratios and goals come out consistent."""
    from benchmarks import loss_memory

    result = loss_memory.main(
        [
            "--quick",
            "--models",
            "gpt2-small",
            "--sections",
            "memory",
            "time",
            "--policies",
            "none",
            "full",
            "--out-dir",
            str(tmp_path),
        ]
    )
    rows = result["memory"]
    full = next(r for r in rows if r["method"] == "full" and r["loss"] == "plain" and r["remat"] == "none")
    assert full["ratio_to_full"] == 1.0
    for r in rows:
        b = r["bytes"]
        assert b["peak"] == b["argument"] + b["output"] - b["alias"] + b["temp"] > 0
        assert r["ratio_to_full"] == pytest.approx(b["peak"] / full["bytes"]["peak"])
    assert {r["variant"] for r in result["time"]} == set(loss_memory.TIME_VARIANTS)
    losses_by_variant = [r["loss"] for r in result["time"]]
    np.testing.assert_allclose(losses_by_variant, losses_by_variant[0], rtol=1e-5)
    saved = json.loads((tmp_path / "loss_memory_quick.json").read_text())
    assert (
        saved["provenance"]["benchmark"] == "loss_memory" and saved["provenance"]["git"]["commit"] and result["goals"]
    )
