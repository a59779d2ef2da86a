"""Soak: 2,000 short training steps of a tiny model must neither compile again after warm-up nor grow the process.

Two runs, both ``-m slow``:

- ``test_soak_train_step``: the jitted, donating train step of ``train.loop`` driven directly, batches placed from
  fresh host arrays every step as the loop does;
- ``test_soak_training_job``: the real ``train.loop.run`` (data pipeline, step, metrics log, tensorboard, progress
  bar), sampled at each step's metrics record.

Compilations are counted from ``jax.log_compiles`` records ("Compiling jit(...)") and must stop after step 200
(warm-up); memory is the process RSS (psutil) after ``gc.collect()``, every 100 steps from step 200 to 2,000. The
numbers are printed (``pytest -m slow -n 0 -s tests/test_soak.py``).
"""

from __future__ import annotations

import gc
import json
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.slow

STEPS, WARM, EVERY = 2000, 200, 100
# RSS is sampled every 100 steps from step 200 to 2000. On the bare step it wanders by +-5 MB around a flat line
# (glibc arenas, XLA's CPU allocator: flat to +0.3 MB over 6,000 steps); the real job releases ~100-150 MB once,
# around step 400-500, then grows by ~0.6 KB/step (its history keeps a dict per step, by design). So the checks
# compare medians of three samples: the end against step 200, and the end against the lowest sample (a leak after
# the release would show there). A leak of one tiny-model state (~60 KB of adapters and moments) per step would
# add ~100 MB over the 1,800 steps.
MAX_GROWTH_MB = 10.0


def _rss_mb() -> float:
    import psutil

    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def _verdict(samples: dict[int, float]) -> tuple[float, float, str]:
    """``(growth_mb, rebound_mb, text)`` of RSS samples ``{step: MB}`` taken from step ``WARM``: the median of the
    last three samples minus the median of the first three, and minus the lowest sample."""
    steps = sorted(samples)
    values = np.array([samples[k] for k in steps])
    end = float(np.median(values[-3:]))
    growth, rebound = end - float(np.median(values[:3])), end - float(values.min())
    slope = float(np.polyfit(np.array(steps, float), values, 1)[0] * 1000)
    text = (
        f"RSS {samples[steps[0]]:.1f} MB at step {steps[0]} -> {samples[steps[-1]]:.1f} MB at step {steps[-1]} "
        f"(range {values.min():.1f}-{values.max():.1f}; median growth {growth:+.1f} MB, {rebound:+.1f} MB above "
        f"the lowest sample; fitted slope {slope:+.2f} MB / 1000 steps)"
    )
    return growth, rebound, text


class _Compiles(logging.Handler):
    """Counts "Compiling <fun>" records of jax.log_compiles, by function, from when ``mark`` is called."""

    def __init__(self):
        super().__init__()
        self.all: list[str] = []
        self.after_mark: list[str] = []
        self.marked = False

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("Compiling "):
            name = message.split(" with ", 1)[0][len("Compiling ") :]
            self.all.append(name)
            if self.marked:
                self.after_mark.append(name)

    def mark(self):
        self.marked = True


@pytest.fixture
def compiles():
    handler = _Compiles()
    logger = logging.getLogger("jax._src.interpreters.pxla")
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            yield handler
    finally:
        logger.removeHandler(handler)


def _tiny_bert():
    from lora_jax.models import bert

    config = bert.Config(
        vocab_size=512,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return bert.build(config, jnp.float32, "sequence-classification"), bert.init_params(
        config, jax.random.key(0), "sequence-classification"
    )


def test_soak_train_step(compiles):
    from lora_jax import sharding
    from train import loop
    from train.config import load_config

    cfg = load_config(
        None,
        [
            "data.task=classification",
            "lora.targets=all-linear",
            f"train.steps={STEPS}",
            "lora.dropout=0.1",
            "optim.lr=1e-3",
        ],
    )
    model, params = _tiny_bert()
    mesh = sharding.make_mesh(1, 1)
    frozen, trainable = loop.choose_trainable(cfg, params, jax.random.key(1))
    frozen = sharding.put_tree(frozen, sharding.tree_shardings(frozen, mesh))
    trainable = sharding.put_tree(trainable, sharding.tree_shardings(trainable, mesh))
    tx = loop.make_optimizer(cfg)
    opt_state = sharding.init_opt_state(tx, trainable)
    state_shardings = jax.tree.map(lambda x: x.sharding, (trainable, opt_state))
    step_fn = jax.jit(
        loop.make_train_step(model, cfg, tx), donate_argnums=(0, 1), out_shardings=(*state_shardings, None)
    )
    batch_3d = sharding.batch_sharding(mesh, ndim=3, leading=1)
    batch_2d = sharding.NamedSharding(mesh, sharding.P(None, sharding.BATCH_AXES))
    rng = np.random.default_rng(0)
    pool_ids = rng.integers(1, 512, (64, 16)).astype(np.int32)
    pool_labels = (pool_ids[:, 0] % 2).astype(np.int32)  # learnable: the label is the parity of the first token
    key = jax.random.key(2)

    losses, t0, rss = [], time.perf_counter(), {}
    for step in range(STEPS):
        idx = rng.integers(0, 64, 8)
        host = {
            "input_ids": pool_ids[idx][None],
            "attention_mask": np.ones((1, 8, 16), np.int32),
            "labels": pool_labels[idx][None],
        }
        batch = {k: sharding.host_to_global(v, batch_3d if v.ndim == 3 else batch_2d) for k, v in host.items()}
        trainable, opt_state, m = step_fn(trainable, opt_state, frozen, batch, jax.random.fold_in(key, step))
        losses.append(float(m["loss"]))  # the loop reads the loss back every step too
        if step + 1 == WARM:
            t_warm = time.perf_counter()
            compiles.mark()
        if step + 1 >= WARM and (step + 1) % EVERY == 0:
            rss[step + 1] = _rss_mb()
    t_end = time.perf_counter()

    growth, rebound, text = _verdict(rss)
    ms = 1e3 * (t_end - t_warm) / (STEPS - WARM)
    print(
        f"\nsoak train step: {STEPS} steps in {t_end - t0:.1f}s ({ms:.2f} ms/step after warm-up); {text}; "
        f"compilations: {len(compiles.all)} in all, {len(compiles.after_mark)} after step {WARM}; "
        f"jit(step) cache size {step_fn._cache_size()}; loss {np.mean(losses[:50]):.3f} -> "
        f"{np.mean(losses[-50:]):.3f}"
    )
    assert compiles.all.count("jit(step)") == 1 and step_fn._cache_size() == 1
    assert compiles.after_mark == [], compiles.after_mark
    assert growth < MAX_GROWTH_MB and rebound < MAX_GROWTH_MB, text
    assert all(np.isfinite(losses)) and np.mean(losses[-50:]) < np.mean(losses[:50])


def test_soak_training_job(compiles, tmp_path, minilm_path, monkeypatch):
    from transformers import AutoTokenizer

    from lora_jax.models import bert, save_pretrained
    from train import loop
    from train import metrics as metrics_lib
    from train.config import load_config

    config = bert.Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    params = bert.init_params(config, jax.random.key(0), task="sequence-classification")
    save_pretrained(params, config, tmp_path / "model", tokenizer=AutoTokenizer.from_pretrained(str(minilm_path)))

    rss, times = {}, {}
    real_write = metrics_lib.MetricLog.write

    def write(self, kind, step, **values):  # called once per training step with its metrics
        real_write(self, kind, step, **values)
        if kind == "train" and step >= WARM and step % EVERY == 0:
            rss[step], times[step] = _rss_mb(), time.perf_counter()
            if step == WARM:
                compiles.mark()

    monkeypatch.setattr(metrics_lib.MetricLog, "write", write)
    cfg = load_config(
        None,
        [
            f"model.name={tmp_path / 'model'}",
            "data.source=builtin:sentiment",
            "data.task=classification",
            "data.max_length=16",
            f"train.steps={STEPS}",
            "train.batch_size=8",
            f"eval.every={10 * STEPS}",
            f"checkpoint.every={10 * STEPS}",
            "lora.targets=all-linear",
            "optim.lr=1e-3",
            f"output.dir={tmp_path / 'run'}",
        ],
    )
    t0 = time.perf_counter()
    result = loop.run(cfg, print_fn=lambda *a: None)
    wall = time.perf_counter() - t0

    growth, rebound, text = _verdict(rss)
    ms = 1e3 * (times[STEPS] - times[WARM]) / (STEPS - WARM)
    print(
        f"\nsoak training job: {STEPS} steps, run() {wall:.1f}s ({ms:.2f} ms/step after warm-up); {text}; "
        f"compilations: {len(compiles.all)} in all ({compiles.all.count('jit(step)')} of jit(step)), "
        f"{len(compiles.after_mark)} after step {WARM}: {sorted(set(compiles.after_mark))}; "
        f"eval loss {result.eval_before['loss']:.3f} -> {result.eval_after['loss']:.3f}"
    )
    assert result.steps_done == STEPS
    saved = json.loads((result.folder / "result.json").read_text())  # bucketed (classification's default)
    assert compiles.all.count("jit(step)") == saved["step_compilations"] <= cfg.data.buckets
    # after warm-up only the final evaluation / export may compile, never the step
    assert "jit(step)" not in compiles.after_mark
    assert growth < MAX_GROWTH_MB and rebound < MAX_GROWTH_MB, text
