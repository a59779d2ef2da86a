"""Logits only where the loss is: the LM head and the cross-entropy at the positions that carry loss.

The reference is the full-logits path of the same code (every position's logits, weighted by the loss mask), which
test_losses.py checks against optax and test_models_*.py check against transformers' PyTorch models.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lora
from lora_jax import losses
from lora_jax.errors import DataError


def _close(a, b, rtol=2e-5, atol=2e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------------ host indices


def test_loss_positions_lists_each_rows_loss_positions_then_empty_slots():
    mask = np.array([[0, 1, 1, 0, 1, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    pos = losses.loss_positions(mask, 5)
    assert pos.dtype == np.int32 and pos.shape == (3, 5)
    np.testing.assert_array_equal(pos, [[1, 2, 4, 6, 6], [6, 6, 6, 6, 6], [0, 1, 2, 3, 4]])
    assert losses.loss_positions(mask, 5, multiple=4).shape == (3, 8)
    # leading axes are kept (accumulation x rows)
    assert losses.loss_positions(np.stack([mask, mask]), 5).shape == (2, 3, 5)


def test_loss_positions_refuses_a_row_over_capacity():
    mask = np.array([[0, 1, 1, 0, 1, 0], [1, 1, 1, 1, 1, 0]])
    with pytest.raises(DataError, match="row 1 carries loss at 5 positions, more than the capacity of 4"):
        losses.loss_positions(mask, 4)
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        losses.loss_positions(mask, 0)


def test_gather_positions_fills_empty_slots_with_zeros_and_checks_shapes():
    x = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
    pos = jnp.array([[3, 0, 4], [1, 4, 4]])
    out = losses.gather_positions(x, pos)
    np.testing.assert_array_equal(out[0], x[0, jnp.array([3, 0])].tolist() + [[0, 0, 0]])
    np.testing.assert_array_equal(out[1, 1:], 0)
    np.testing.assert_array_equal(losses.gather_positions(x[..., 0], pos)[1], [x[1, 1, 0], 0, 0])
    with pytest.raises(ValueError, match="do not index the sequence axis"):
        losses.gather_positions(x[None], pos)
    h = jnp.zeros((2, 4, 3))
    with pytest.raises(ValueError, match=r"positions of shape \(3, 2\) do not fit hidden states"):
        losses.chunked_cross_entropy(
            h, jnp.zeros((3, 5)), jnp.zeros((2, 4), jnp.int32), positions=jnp.zeros((3, 2), jnp.int32)
        )
    with pytest.raises(ValueError, match="integer indices"):
        losses.chunked_cross_entropy(h, jnp.zeros((3, 5)), jnp.zeros((2, 4), jnp.int32), positions=jnp.zeros((2, 2)))


# ------------------------------------------------------------------------------------------ the loss itself


def _case(tied: bool, lora_head: bool, seed: int = 0):
    rng = np.random.RandomState(seed)
    b, s, d, v = 3, 24, 16, 61
    h = jnp.asarray(rng.randn(b, s, d), jnp.float32)
    w = jnp.asarray(rng.randn(*((v, d) if tied else (d, v))) * 0.3, jnp.float32)
    targets = jnp.asarray(rng.randint(0, v, (b, s)), jnp.int32)
    mask = (rng.rand(b, s) < 0.35).astype(np.float32)
    mask[1] = 0  # a row without loss
    mask[2, -1] = 1  # a loss at the last position
    head = w
    if lora_head:
        params = {"head": {"kernel": w}}
        ad = lora.init(params, r=4, targets=".*", allow_embeddings=True, key=jax.random.key(seed))
        ad = jax.tree.map(lambda a: dataclasses.replace(a, b=0.2 * jnp.ones_like(a.b)), ad, is_leaf=lora.is_adapter)
        head = lora.wrap(params, ad)["head"]["kernel"]
    return h, head, targets, jnp.asarray(mask)


@pytest.mark.parametrize(
    "tied,lora_head,options,plain",
    [
        (True, False, {}, False),
        (False, False, {"logit_softcap": 5.0}, False),
        (True, True, {"z_loss": 1e-3, "label_smoothing": 0.1}, False),
        (False, True, {"logit_softcap": 3.0}, False),
        (True, False, {}, True),
        (False, True, {"logit_softcap": 3.0}, True),
    ],
)
def test_loss_and_gradients_at_loss_positions_equal_the_full_logits(tied, lora_head, options, plain):
    """Loss, count and the gradients of the hidden states and of the head (a plain array, or a LoRA adapter's
    factors) equal the full computation's; tied and untied heads, soft-capping, z-loss, label smoothing; the
    chunked and the plain path."""
    h, head, targets, mask = _case(tied, lora_head)
    pos = jnp.asarray(losses.loss_positions(np.asarray(mask), 12, multiple=8))  # (3, 16): empty slots too
    fn = losses.cross_entropy if plain else functools_partial(losses.chunked_cross_entropy, chunk_size=8)

    def loss(h, head, positions):
        total, count = fn(h, head, targets, mask, tied=tied, positions=positions, **options)
        return total, count

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (l_all, c_all), g_all = grad(h, head, None)
    (l_at, c_at), g_at = grad(h, head, pos)
    assert float(c_at) == float(c_all) == float(mask.sum())
    _close(l_at, l_all)
    _close(g_at, g_all)
    assert float(jnp.abs(g_at[0]).max()) > 0


def functools_partial(fn, **kw):
    import functools

    return functools.partial(fn, **kw)


def test_positions_that_miss_a_loss_position_change_the_loss():
    """The check can fail: a gather that leaves out a position of nonzero weight is not the full loss."""
    h, head, targets, mask = _case(True, False)
    pos = losses.loss_positions(np.asarray(mask), 12)
    pos[0, 0] = h.shape[1]  # drop row 0's first loss position
    full, _ = losses.chunked_cross_entropy(h, head, targets, mask, tied=True)
    short, count = losses.chunked_cross_entropy(h, head, targets, mask, tied=True, positions=jnp.asarray(pos))
    assert float(count) == float(mask.sum()) - 1
    assert abs(float(short) - float(full)) > 1e-3


# ------------------------------------------------------------------------------------- batches (train.data)


def _tokenized(n: int = 60, width: int = 24, seed: int = 0):
    """Causal-LM examples of random prompt and completion lengths, as train.data.tokenize lays them out."""
    from train.data import Tokenized

    rng = np.random.RandomState(seed)
    ids = np.zeros((n, width), np.int32)
    att = np.zeros((n, width), np.int32)
    lm = np.zeros((n, width), np.int32)
    for i in range(n):
        p = rng.randint(4, 13)  # a prompt, then a completion of about the same length, as in E2E
        c = rng.randint(2, min(12, width - p) + 1)
        ids[i, : p + c] = rng.randint(1, VOCAB, p + c)
        att[i, : p + c] = 1
        lm[i, p - 1 : p + c - 1] = 1
    return Tokenized(ids, att, loss_mask=lm)


def test_packed_rows_respect_the_capacity_and_carry_every_loss_position():
    from train import data as D

    data = _tokenized()
    free = D.PackedBatches(data, 4, seed=0, width=64)
    auto = D.PackedBatches(data, 4, seed=0, width=64, loss_positions=True)
    # the automatic capacity: the most of any first-epoch row packed without a limit, so those rows are the same
    first = free.stream.take(0, free.stream._size(0))
    most = max(int(free.losses[r].sum()) for r in first)
    assert auto.capacity == -(-most // 8) * 8
    assert [r.tolist() for r in auto.stream.take(0, auto.stream._size(0))] == [r.tolist() for r in first]
    tight = D.PackedBatches(data, 4, seed=0, width=64, loss_positions=True, capacity=24)
    for batches in (auto, tight):
        for step in range(12):  # several epochs
            batch = batches(step)
            pos = batch["loss_positions"]
            assert pos.shape == (4, batches.capacity)
            for row, mask in zip(pos, batch["loss_mask"]):
                assert sorted(row[row < 64].tolist()) == np.flatnonzero(mask).tolist()
    # a tighter capacity closes rows earlier: more rows per epoch
    assert tight.stream._size(0) > auto.stream._size(0)
    assert "logits at 24 of 64 positions per row" in tight.describe()
    with pytest.raises(DataError, match="more than the capacity of 8 loss positions per packed row"):
        D.PackedBatches(data, 4, seed=0, width=64, loss_positions=True, capacity=8)


def test_fixed_bucketed_and_eval_batches_carry_loss_positions():
    from train import data as D

    data = _tokenized()
    cap = D.example_capacity(data)
    assert cap == -(-int(data.loss_mask.sum(1).max()) // 8) * 8
    fixed = D.FixedBatches(data, 4, seed=0, loss_positions=True)
    bucketed = D.BucketedBatches(data, 4, seed=0, loss_positions=True)
    for batch in [fixed(0), fixed(3), bucketed(0), bucketed(5), *D.eval_batches(data, 16)]:
        width = batch["loss_mask"].shape[1]
        assert batch["loss_positions"].shape == (len(batch["loss_mask"]), min(cap, width))
        for row, mask in zip(batch["loss_positions"], batch["loss_mask"]):
            assert row[row < width].tolist() == np.flatnonzero(mask).tolist()
    assert "loss_positions" not in D.FixedBatches(data, 4, seed=0)(0)


# ------------------------------------------------------------------------------------- the training job


VOCAB = 1024  # the head outweighs the tiny body, as a 49K-262K vocabulary does in a 135M-270M model


def _tiny_lm(family: str):
    from lora_jax.models import gemma3, llama

    if family == "gemma3":  # soft-capped logits, tied embeddings
        config = gemma3.Config(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            query_pre_attn_scalar=16.0,
            sliding_window=8,
            max_position_embeddings=128,
            final_logit_softcapping=4.0,
        )
        return gemma3.build(config), gemma3.init_params(config, jax.random.key(0))
    config = llama.Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=False,
        max_position_embeddings=128,
    )
    return llama.build(config), llama.init_params(config, jax.random.key(0))


def _step_setup(family: str, logits: str, accum: int, chunk="auto"):
    from train import loop
    from train.config import load_config

    cfg = load_config(
        None,
        [
            f"train.logits={logits}",
            f"train.grad_accum={accum}",
            "train.batch_size=2",
            f"train.loss_chunk={chunk}",
            "lora.r=4",
            "lora.targets=all-linear",
        ],
    )
    model, params = _tiny_lm(family)
    prepared = loop.prepare(cfg, params, jax.random.key(0))
    # non-zero B, so that every adapter (and the head's input) gets a gradient
    keys = iter(jax.random.split(jax.random.key(3), 256))
    trainable = jax.tree.map(
        lambda a: dataclasses.replace(a, b=0.05 * jax.random.normal(next(keys), a.b.shape)),
        prepared.trainable,
        is_leaf=lora.is_adapter,
    )
    tx = loop.make_optimizer(cfg)
    return cfg, model, prepared.frozen, trainable, tx


@pytest.mark.parametrize(
    "family,accum,chunk",
    [
        ("llama", 2, "auto"),
        pytest.param("gemma3", 1, 32, marks=pytest.mark.slow),
        pytest.param("llama", 1, 0, marks=pytest.mark.slow),
    ],
)
def test_train_step_at_loss_positions_equals_full_logits(family, accum, chunk):
    """The job's step on packed rows (several examples per row, pack_length above max_length), with gradient
    accumulation: the loss, the gradient norm and the updated adapters equal the full-logits step's; its compiled
    FLOPs (XLA's cost analysis) are fewer. Evaluation: the same loss and token count.

    (XLA's cost analysis counts a loop's body once: with one loss chunk, ``auto`` at this vocabulary, both steps'
    heads are counted whole; with 32-token chunks the count is one chunk's either way.)"""
    from train import data as D
    from train import loop

    data = _tokenized(n=40, width=24)
    batches = D.PackedBatches(data, 2 * accum, seed=0, width=48, loss_positions=True)
    host = batches(1)
    assert batches.capacity < 48
    steps, results = {}, {}
    for logits in ("all", "loss"):
        cfg, model, frozen, trainable, tx = _step_setup(family, logits, accum, chunk)
        step = jax.jit(loop.make_train_step(model, cfg, tx))
        args = (
            trainable,
            tx.init(trainable),
            frozen,
            {k: jnp.asarray(v) for k, v in loop.micro_batches(host, accum).items()},
            jax.random.key(0),
        )
        steps[logits] = step.lower(*args).compile()
        new, _, m = steps[logits](*args)
        ev = jax.jit(loop.make_eval_step(model, cfg))
        batch = next(D.eval_batches(data, 8))
        l_ev, c_ev, _ = ev(trainable, frozen, {k: jnp.asarray(v) for k, v in batch.items()})
        results[logits] = (m["loss"], m["grad_norm"], new["adapters"], l_ev, c_ev)
    assert bool(m["finite"])
    _close(results["loss"], results["all"], rtol=1e-4, atol=1e-6)
    flops = {k: v.cost_analysis()["flops"] for k, v in steps.items()}
    if chunk != 32:
        assert flops["loss"] < 0.9 * flops["all"], flops


def test_logits_config_keys():
    from train.config import ConfigError, load_config

    assert load_config(None, []).train.logits == "loss"
    assert load_config(None, ["data.loss_capacity=64"]).data.loss_capacity == 64
    with pytest.raises(ConfigError, match="train.logits"):
        load_config(None, ["train.logits=some"])
    with pytest.raises(ConfigError, match="data.loss_capacity"):
        load_config(None, ["data.loss_capacity=64", "train.logits=all"])
    with pytest.raises(ConfigError, match="train.logits"):
        load_config(None, ["train.logits=all", "data.task=classification", "data.source=builtin:sentiment"])


# ------------------------------------------------------------------------------------------ the benchmark


def _bench_row(**changes):
    row = {
        "pack_length": 96,
        "flops_drop": 0.10,
        "expected_drop": 0.11,
        "time_ratio_ci95": [0.85, 0.95],
        "speedup": 1.1,
        "loss": {"all": 2.0, "loss": 2.0000001},
    }
    row.update(changes)
    return row


def test_loss_positions_goals_can_fail():
    from benchmarks.loss_positions import goals

    def met(**changes):
        return [g["met"] for g in goals([_bench_row(**changes)]).values()]

    assert met() == [True, True, True]
    assert met(flops_drop=0.01) == [False, True, True]  # FLOPs did not drop as the head's share says
    assert met(time_ratio_ci95=[0.9, 1.05]) == [True, False, True]  # no speed-up shown
    assert met(loss={"all": 2.0, "loss": 2.01}) == [True, True, False]  # a different loss


def test_loss_positions_benchmark_quick(tmp_path, smollm2_gguf_path):
    """``python -m benchmarks.loss_positions --quick`` runs and writes its record (a smoke run: the figures are
    checked for consistency, not for speed; its tokenizer comes from SmolLM2's GGUF metadata)."""
    import json

    from benchmarks import loss_positions

    loss_positions.main(["--quick", "--out-dir", str(tmp_path)])
    rec = json.loads((tmp_path / "loss_positions_quick.json").read_text())
    assert rec["provenance"]["benchmark"] == "loss_positions"
    (row,) = rec["rows"]
    assert row["capacity"] < row["pack_length"]
    assert row["step_gflops"]["loss"] < row["step_gflops"]["all"]
    assert row["head_gflops"]["loss"] < row["head_gflops"]["all"]
    assert abs(row["loss"]["all"] - row["loss"]["loss"]) <= 1e-4 * abs(row["loss"]["all"])
    assert len(rec["goals"]) == 3


_SHARDED_CHILD = r"""
import dataclasses, json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
sys.path.insert(0, ".")
sys.path.insert(0, "tests")
import lora_jax as lora
from lora_jax import sharding
from test_loss_positions import _tiny_lm, _tokenized
from train import data as D
from train.tasks import causal_lm_loss

assert jax.device_count() == 8, jax.devices()
model, params = _tiny_lm("llama")
ad = lora.init(params, r=4, targets="all-linear", key=jax.random.key(1))
ad = jax.tree.map(lambda a: dataclasses.replace(a, b=0.05 * jnp.ones_like(a.b)), ad, is_leaf=lora.is_adapter)
host = D.PackedBatches(_tokenized(n=60, width=24), 8, seed=0, width=48, loss_positions=True)(0)
mesh = sharding.make_mesh(4, 2)  # data 4 x fsdp 2: rows over all 8 devices, the base FSDP-sharded, as the job does
rows = sharding.batch_sharding(mesh, ndim=2)
placed = sharding.put_tree(params, sharding.tree_shardings(params, mesh))
out = {}
for logits in ("all", "loss"):
    def f(a, p, batch):
        return causal_lm_loss(model, lora.wrap(p, a), batch, train=True, rng=None, logits=logits)[0]
    g = jax.jit(jax.value_and_grad(f))
    one = g(ad, params, {k: jnp.asarray(v) for k, v in host.items()})
    batch = {k: jax.device_put(v, rows) for k, v in host.items()}
    hlo = g.lower(ad, placed, batch).compile().as_text()
    many = g(ad, placed, batch)
    out[logits] = {"one": float(one[0]), "many": float(many[0]), "all_gathers": hlo.count("all-gather("),
                   "grad_diff": max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(one[1]),
                                                                                 jax.tree.leaves(many[1])))}
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow  # ~30 s: a child process with 8 CPU devices, four compilations
def test_loss_positions_on_8_devices_match_one_and_gather_nothing_more(tmp_path):
    """Rows split over 8 devices and the base FSDP-sharded (mesh data 4 x fsdp 2, as the job places them): the loss
    and gradients at loss positions equal one device's and the full-logits path's, and the compiled gather adds no
    all-gather (each device gathers its own rows)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDED_CHILD], cwd=root, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    for r in out.values():
        assert r["many"] == pytest.approx(r["one"], rel=1e-5) and r["grad_diff"] < 1e-5, r
    assert out["loss"]["one"] == pytest.approx(out["all"]["one"], rel=1e-5)
    assert out["loss"]["all_gathers"] <= out["all"]["all_gathers"], out
