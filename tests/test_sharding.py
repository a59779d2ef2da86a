"""Sharding on a (data=2, fsdp=4) mesh of 8 forced CPU devices: where every array of the train state lives.

XLA reads ``--xla_force_host_platform_device_count`` once, when JAX starts, so the checks run in a child pytest
process started with ``XLA_FLAGS`` set (``test_sharding_on_8_cpu_devices``); in the parent session the
``test_8dev_*`` tests skip. Run them directly with

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu LORA_JAX_8DEV=1 \\
        python -m pytest tests/test_sharding.py -k 8dev

What they check, against the rules in :mod:`lora_jax.sharding`:

- the frozen base: leaves with >= 2**14 elements are split along the fsdp axis (the largest axis that 4
  divides) and replicated along data; smaller leaves are replicated;
- adapters: replicated when small (the default for a tiny model), otherwise ``A`` along the base's input axis
  and ``B`` along the base's output axis, matching the base;
- optimizer state: every moment has its parameter's sharding, step counts are replicated (on all 8 devices);
- the batch: its example axis split over ``(data, fsdp)``, every device a different eighth;
- a few train steps: the same losses and adapters as on one device, one compilation, shardings that do not
  drift from step to step; and the real ``train.loop.run`` places its state the same way.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHILD = os.environ.get("LORA_JAX_8DEV") == "1"
child_only = pytest.mark.skipif(not CHILD, reason="runs in the 8-device child of test_sharding_on_8_cpu_devices")


def test_sharding_on_8_cpu_devices():
    """Run this file's 8-device tests in a child process whose JAX starts with 8 CPU devices."""
    if CHILD:
        pytest.skip("already the 8-device child")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu", LORA_JAX_8DEV="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "8dev", str(Path(__file__))],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


# ------------------------------------------------------------------------------------- 8-device child


FSDP, DATA, MIN_SHARD = 4, 2, 2**14


def _tiny_bert(layers: int = 1):
    import jax
    import jax.numpy as jnp

    from lora_jax.models import bert

    config = bert.Config(
        vocab_size=512,
        hidden_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=384,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = bert.build(config, jnp.float32, "sequence-classification")
    return model, lambda: bert.init_params(config, jax.random.key(0), "sequence-classification")


def _cfg(*extra: str):
    from train.config import last_wins, load_config

    return load_config(
        None,
        last_wins(
            [
                "data.task=classification",
                "lora.targets=all-linear",
                "lora.r=8",
                "train.steps=6",
                "optim.warmup_steps=0",
                "optim.schedule=constant",
                "optim.lr=1e-2",
                *extra,
            ]
        ),
    )


def _state(mesh, rules=None, *extra: str):
    """The train state as ``train.loop.run`` builds it: split, place, optimizer state from the placed tree."""
    import jax

    from lora_jax import sharding
    from train import loop

    model, make_params = _tiny_bert()
    cfg = _cfg(*extra)
    frozen, trainable = loop.choose_trainable(cfg, make_params(), jax.random.key(1))
    frozen = sharding.put_tree(frozen, sharding.tree_shardings(frozen, mesh, rules))
    trainable = sharding.put_tree(trainable, sharding.tree_shardings(trainable, mesh, rules))
    tx = loop.make_optimizer(cfg)
    opt_state = sharding.init_opt_state(tx, trainable)
    return model, cfg, tx, frozen, trainable, opt_state


def _batch(mesh, step: int, batch_size: int = 8, length: int = 16):
    from lora_jax import sharding

    rng = np.random.default_rng(step)
    host = {
        "input_ids": rng.integers(1, 512, (1, batch_size, length)).astype(np.int32),
        "attention_mask": np.ones((1, batch_size, length), np.int32),
        "labels": rng.integers(0, 2, (1, batch_size)).astype(np.int32),
    }
    host["attention_mask"][:, :, length - 3 - step % 4 :] = 0  # some padding
    batch_3d = sharding.batch_sharding(mesh, ndim=3, leading=1)
    batch_2d = sharding.NamedSharding(mesh, sharding.P(None, sharding.BATCH_AXES))
    return host, {k: sharding.host_to_global(v, batch_3d if v.ndim == 3 else batch_2d) for k, v in host.items()}


def _specs(tree) -> dict:
    from lora_jax.targets import leaf_paths

    return {p: x.sharding for p, x in leaf_paths(tree)}


def _expected_base_spec(shape) -> tuple:
    """The default rule written out: >= 2**14 elements -> the largest axis 4 divides is split, else replicate."""
    if int(np.prod(shape)) < MIN_SHARD:
        return ()
    for i in sorted(range(len(shape)), key=lambda i: -shape[i]):
        if shape[i] % FSDP == 0:
            return tuple("fsdp" if j == i else None for j in range(len(shape)))
    return ()


def _norm(spec) -> tuple:
    """A PartitionSpec without trailing Nones (P('fsdp', None) and P('fsdp') place alike)."""
    t = tuple(spec)
    while t and t[-1] is None:
        t = t[:-1]
    return t


@pytest.fixture(scope="module")
def mesh():
    import jax

    from lora_jax import sharding

    assert jax.device_count() == 8, f"the child needs 8 devices, got {jax.devices()}"
    return sharding.make_mesh(DATA, FSDP)


@child_only
def test_8dev_mesh_layout(mesh):
    assert dict(mesh.shape) == {"data": DATA, "fsdp": FSDP}
    assert mesh.devices.shape == (DATA, FSDP) and len({d.id for d in mesh.devices.flat}) == 8


@child_only
def test_8dev_base_weights_fsdp_sharded(mesh):
    _, _, _, frozen, _, _ = _state(mesh)
    specs = _specs(frozen)
    sharded = 0
    for path, s in specs.items():
        x = dict(_leaves(frozen))[path]
        assert _norm(s.spec) == _norm(_expected_base_spec(x.shape)), (path, x.shape, s.spec)
        assert s.mesh.shape == mesh.shape and len(x.sharding.device_set) == 8
        if "fsdp" in tuple(s.spec):
            sharded += 1
            axis = tuple(s.spec).index("fsdp")
            shard_shapes = {tuple(sh.data.shape) for sh in x.addressable_shards}
            want = tuple(n // FSDP if i == axis else n for i, n in enumerate(x.shape))
            assert shard_shapes == {want}, (path, shard_shapes, want)
            # replicated along data: the devices of one fsdp column hold the same block
            by_device = {sh.device.id: np.asarray(sh.data) for sh in x.addressable_shards}
            for col in range(FSDP):
                a, b = (by_device[mesh.devices[row, col].id] for row in range(DATA))
                np.testing.assert_array_equal(a, b)
        else:
            assert all(tuple(sh.data.shape) == tuple(x.shape) for sh in x.addressable_shards), path
    # the kernels of this model that the default rule splits, each along the axis it names
    layer = "bert/encoder/layer_0"
    assert _norm(specs[f"{layer}/attention/self/query/kernel"].spec) == ("fsdp",)  # (128, 128): first axis
    assert _norm(specs[f"{layer}/intermediate/dense/kernel"].spec) == (None, "fsdp")  # (128, 384): output axis
    assert _norm(specs[f"{layer}/output/dense/kernel"].spec) == ("fsdp",)  # (384, 128): input axis
    assert _norm(specs["bert/embeddings/word_embeddings/embedding"].spec) == ("fsdp",)  # (512, 128)
    assert _norm(specs[f"{layer}/attention/self/query/bias"].spec) == ()
    assert sharded == 8  # word embeddings, q/k/v/o, intermediate, output, pooler


def _leaves(tree):
    from lora_jax.targets import leaf_paths

    return leaf_paths(tree)


@child_only
def test_8dev_small_adapters_replicated(mesh):
    _, _, _, _, trainable, _ = _state(mesh)
    specs = _specs(trainable)
    assert any(p.startswith("adapters/") for p in specs)
    for path, s in specs.items():  # every factor (128 x 8, 8 x 384, ...) is far below 2**14 elements
        assert _norm(s.spec) == () and len(s.device_set) == 8, (path, s)


@child_only
def test_8dev_large_adapters_follow_their_base(mesh):
    """With a threshold the factors pass, A is split on the base's input axis and B on its output axis."""
    from lora_jax import sharding

    rules = sharding.default_rules(min_shard_size=512)
    _, _, _, frozen, trainable, _ = _state(mesh, rules)
    base = _specs(frozen)
    checked = 0
    for path, s in _specs(trainable).items():
        if not path.startswith("adapters/"):
            continue
        kernel, factor = path[len("adapters/") :].rsplit("/", 1)
        b_spec = _norm(base[kernel].spec)
        if factor == "a":  # (d_in, r): split iff the base is split along its input axis
            assert _norm(s.spec) == (("fsdp",) if b_spec == ("fsdp",) else ()), (path, b_spec, s.spec)
        else:  # (r, d_out): split iff the base is split along its output axis
            assert _norm(s.spec) == ((None, "fsdp") if b_spec == (None, "fsdp") else ()), (path, b_spec, s.spec)
        checked += 1
    assert checked == 14
    layer = "adapters/bert/encoder/layer_0"
    specs = _specs(trainable)
    assert _norm(specs[f"{layer}/intermediate/dense/kernel/b"].spec) == (None, "fsdp")
    assert _norm(specs[f"{layer}/intermediate/dense/kernel/a"].spec) == ()
    assert _norm(specs[f"{layer}/output/dense/kernel/a"].spec) == ("fsdp",)
    assert _norm(specs[f"{layer}/output/dense/kernel/b"].spec) == ()


@child_only
def test_8dev_multi_axis_kernels_follow_first_in_or_out_axis(mesh):
    """DenseGeneral kernels: only the first input / first output axis maps onto the flattened factor."""
    import jax.numpy as jnp

    import lora_jax as lora
    from lora_jax import sharding

    params = {
        "attn": {
            "query": {"kernel": jnp.ones((256, 4, 32))},  # in (256,), out (4, 32): split on axis 0
            "out": {"kernel": jnp.ones((4, 32, 256))},  # in (4, 32), out (256,): axis 2
            "o": {"kernel": jnp.ones((2, 256, 64))},
        }
    }  # in (2, 256), out (64,): axis 1, not first
    adapters = lora.init(params, r=32, targets=r"attn/.*/kernel")
    rules = sharding.default_rules(min_shard_size=512)
    base = sharding.tree_shardings(params, mesh, rules)
    ad = sharding.tree_shardings(adapters, mesh, rules)
    assert _norm(base["attn"]["query"]["kernel"].spec) == ("fsdp",)
    assert _norm(ad["attn"]["query"]["kernel"].a.spec) == ("fsdp",)
    assert _norm(ad["attn"]["query"]["kernel"].b.spec) == ()
    assert _norm(base["attn"]["out"]["kernel"].spec) == (None, None, "fsdp")
    assert _norm(ad["attn"]["out"]["kernel"].a.spec) == ()
    assert _norm(ad["attn"]["out"]["kernel"].b.spec) == (None, "fsdp")
    assert _norm(base["attn"]["o"]["kernel"].spec) == (None, "fsdp")
    assert _norm(ad["attn"]["o"]["kernel"].a.spec) == () and _norm(ad["attn"]["o"]["kernel"].b.spec) == ()
    placed = sharding.put_tree(adapters, ad)  # the sharding tree has the adapter tree's structure
    assert placed["attn"]["query"]["kernel"].a.addressable_shards[0].data.shape == (64, 32)


@child_only
def test_8dev_quantized_base_shardings(mesh):
    """A QLoRA base: the stored arrays of a quantised kernel are placed on their own shapes."""
    import jax
    import jax.numpy as jnp

    from lora_jax import quant, sharding

    params = quant.quantize(
        {
            "attn": {"query": {"kernel": jax.random.normal(jax.random.key(0), (256, 512))}},
            "norm": {"scale": jnp.ones(256)},
        }
    )
    shardings = sharding.tree_shardings(params, mesh)
    placed = sharding.put_tree(params, shardings)
    codes = placed["attn"]["query"]["kernel"].codes
    assert _norm(codes.sharding.spec) == ("fsdp",) and codes.addressable_shards[0].data.shape[0] == codes.shape[0] // 4
    np.testing.assert_array_equal(
        np.asarray(quant.dequantize(placed)["attn"]["query"]["kernel"]),
        np.asarray(quant.dequantize(params)["attn"]["query"]["kernel"]),
    )


@pytest.mark.parametrize("extra", [(), ("optim.lora_plus_ratio=16",)], ids=["adamw", "lora_plus"])
@pytest.mark.parametrize("threshold", [None, 512], ids=["default", "low_threshold"])
@child_only
def test_8dev_optimizer_state_sharded_like_its_parameter(mesh, extra, threshold):
    from lora_jax import sharding

    rules = None if threshold is None else sharding.default_rules(threshold)
    _, _, _, _, trainable, opt_state = _state(mesh, rules, *extra)
    params = _specs(trainable)
    moments = 0
    for path, s in _specs(opt_state).items():
        assert isinstance(s, sharding.NamedSharding) and len(s.device_set) == 8, (path, s)
        owner = [p for p in params if path.endswith("/" + p)]
        if owner:
            assert s == params[owner[0]], (path, s, params[owner[0]])
            moments += 1
        else:
            assert path.endswith("count") and _norm(s.spec) == (), (path, s)
    n_params = len(params)
    assert moments == 2 * n_params  # mu and nu of every trained array (LoRA+: each in its own group only)
    if threshold:
        assert any("fsdp" in tuple(s.spec) for s in _specs(opt_state).values())


@child_only
def test_8dev_batch_split_over_data_and_fsdp(mesh):
    host, batch = _batch(mesh, 0)
    ids = batch["input_ids"]
    assert _norm(ids.sharding.spec) == (None, ("data", "fsdp"))
    rows = {}
    for sh in ids.addressable_shards:
        assert sh.data.shape == (1, 1, 16)  # 8 examples over 8 devices
        rows[sh.device.id] = int(sh.index[1].start)
    assert sorted(rows.values()) == list(range(8))  # every device a different example
    # the example axis is laid out data-major: device (d, f) holds example d * 4 + f
    for d in range(DATA):
        for f in range(FSDP):
            assert rows[mesh.devices[d, f].id] == d * FSDP + f
    np.testing.assert_array_equal(np.asarray(ids), host["input_ids"])


def _train(mesh, rules, steps: int):
    import jax

    from train import loop

    model, cfg, tx, frozen, trainable, opt_state = _state(mesh, rules)
    before = (_specs(trainable), _specs(opt_state))
    step_fn = jax.jit(loop.make_train_step(model, cfg, tx), donate_argnums=(0, 1))
    losses = []
    _, batch = _batch(mesh, 0)  # one batch, so that the loss must fall
    for i in range(steps):
        trainable, opt_state, m = step_fn(trainable, opt_state, frozen, batch, jax.random.key(i))
        losses.append(float(m["loss"]))
    after = (_specs(trainable), _specs(opt_state))
    return losses, jax.device_get(trainable), step_fn._cache_size(), before, after


@pytest.mark.parametrize("threshold", [None, 512], ids=["default", "low_threshold"])
@child_only
def test_8dev_train_steps_match_one_device(mesh, threshold):
    import jax

    from lora_jax import sharding
    from lora_jax.targets import leaf_paths

    rules = None if threshold is None else sharding.default_rules(threshold)
    losses8, final8, compiles, before, after = _train(mesh, rules, steps=4)
    one = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    losses1, final1, _, _, _ = _train(one, rules, steps=4)
    assert compiles == 1  # placed state in, same shardings out: the step never recompiles
    assert before == after  # no drift of the state's shardings across steps
    assert losses8[-1] < losses8[0]
    np.testing.assert_allclose(losses8, losses1, rtol=2e-5)
    # Adam divides by sqrt(v): a gradient element near 0 that sums in another order moves by up to ~lr per step,
    # so the adapters agree to a small fraction of the learning rate (1e-2), not to float32 rounding
    for (p8, x8), (p1, x1) in zip(leaf_paths(final8), leaf_paths(final1), strict=True):
        assert p8 == p1
        np.testing.assert_allclose(x8, x1, rtol=1e-4, atol=5e-5, err_msg=p8)


def _moe_train(mesh, steps: int):
    """A tiny Qwen3-MoE (8 experts, top-2, load-balancing loss on) trained by train.loop's step: LoRA on the
    routed experts and q/v, the state placed by the default rules on ``mesh``."""
    import jax

    from lora_jax import sharding
    from lora_jax.models import qwen3_moe
    from train import loop

    config = qwen3_moe.Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        max_position_embeddings=32,
        output_router_logits=True,
        router_aux_loss_coef=0.05,
    )
    model = qwen3_moe.build(config)
    cfg = _cfg(
        "data.task=causal-lm", "lora.targets=['(.*/)?mlp/experts/.*', '.*self_attn/(q|v)_proj/kernel']", "lora.r=4"
    )
    frozen, trainable = loop.choose_trainable(cfg, qwen3_moe.init_params(config, jax.random.key(0)), jax.random.key(1))
    frozen = sharding.put_tree(frozen, sharding.tree_shardings(frozen, mesh))
    trainable = sharding.put_tree(trainable, sharding.tree_shardings(trainable, mesh))
    tx = loop.make_optimizer(cfg)
    opt_state = sharding.init_opt_state(tx, trainable)
    rng = np.random.default_rng(0)
    host = {
        "input_ids": rng.integers(1, 128, (1, 8, 16)).astype(np.int32),
        "attention_mask": np.ones((1, 8, 16), np.int32),
        "loss_mask": np.ones((1, 8, 16), np.int32),
    }
    host["attention_mask"][:, 1, :3] = 0
    batch = {k: sharding.host_to_global(v, sharding.batch_sharding(mesh, ndim=3, leading=1)) for k, v in host.items()}
    step_fn = jax.jit(loop.make_train_step(model, cfg, tx), donate_argnums=(0, 1))
    placed = (_specs(frozen), _specs(trainable))
    losses = []
    for i in range(steps):
        trainable, opt_state, m = step_fn(trainable, opt_state, frozen, batch, jax.random.key(i))
        losses.append(float(m["loss"]))
    return losses, jax.device_get(trainable), placed, frozen


@child_only
def test_8dev_expert_axis_splits_experts_and_matches_one_device():
    """mesh.expert: a (data=2, fsdp=1, expert=4) mesh holds 2 of the 8 experts of each stack (and of its
    per-expert adapters) per device; the batch is split over all 8 devices; train steps equal one device's."""
    import jax

    from lora_jax import sharding
    from lora_jax.targets import leaf_paths

    mesh = sharding.make_mesh(2, 1, expert=4)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 4}
    assert sharding.batch_axes(mesh) == ("data", "fsdp", "expert")
    losses8, final8, (base, trained), frozen = _moe_train(mesh, steps=3)
    stack = "model/layers/mlp/experts/gate_up_proj"  # scanned: (layers, experts, ...), the layer axis whole
    assert _norm(base[stack].spec) == (None, "expert")
    x = dict(leaf_paths(frozen))[stack]
    assert {tuple(sh.data.shape) for sh in x.addressable_shards} == {(2, 2, 64, 64)}  # 2 whole experts per device
    assert _norm(base["model/layers/self_attn/q_proj/kernel"].spec) == ()  # (2, 64, 64): below the threshold
    for factor in ("a", "b"):
        assert _norm(trained[f"adapters/{stack}/{factor}"].spec) == (None, "expert")  # small, but with its experts
    assert _norm(trained["adapters/model/layers/self_attn/q_proj/kernel/a"].spec) == ()
    one = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    losses1, final1, _, _ = _moe_train(one, steps=3)
    assert losses8[-1] < losses8[0]
    np.testing.assert_allclose(losses8, losses1, rtol=2e-5)
    for (p8, x8), (p1, x1) in zip(leaf_paths(final8), leaf_paths(final1), strict=True):
        assert p8 == p1
        np.testing.assert_allclose(x8, x1, rtol=1e-4, atol=5e-5, err_msg=p8)


@child_only
def test_8dev_real_training_job_places_state_as_documented(mesh, tmp_path, minilm_path, monkeypatch):
    """``train.loop.run`` on 8 devices: spy on the jitted step's arguments at every call."""
    import jax
    from transformers import AutoTokenizer

    from lora_jax import sharding
    from lora_jax.models import bert, save_pretrained
    from train import loop
    from train.config import load_config

    config = bert.Config(
        hidden_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    params = bert.init_params(config, jax.random.key(0), task="sequence-classification")
    save_pretrained(params, config, tmp_path / "model", tokenizer=AutoTokenizer.from_pretrained(str(minilm_path)))

    calls = []
    real_jit = jax.jit

    class Spy:
        """The jitted step, recording the shardings of (trainable, opt_state, frozen, batch) it is given."""

        def __init__(self, jitted):
            self._jitted = jitted

        def _record(self, args):
            calls.append(jax.tree.map(lambda x: x.sharding, args[:4]))

        def __call__(self, *args):
            self._record(args)
            return self._jitted(*args)

        def lower(self, *args):  # the loop may compile ahead of time and then call the executable
            self._record(args)
            return self._jitted.lower(*args)

        def __getattr__(self, name):
            return getattr(self._jitted, name)

    def spy_jit(fun, *args, **kwargs):
        jitted = real_jit(fun, *args, **kwargs)
        return Spy(jitted) if getattr(fun, "__name__", "") == "step" else jitted

    compiles = []

    class CountCompiles(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("Compiling jit(step)"):
                compiles.append(record.getMessage()[:200])

    handler = CountCompiles()
    logger = logging.getLogger("jax._src.interpreters.pxla")
    logger.addHandler(handler)
    monkeypatch.setattr(jax, "jit", spy_jit)
    cfg = load_config(
        None,
        [
            f"model.name={tmp_path / 'model'}",
            "data.source=builtin:sentiment",
            "data.task=classification",
            "data.max_length=16",
            "train.steps=4",
            "train.batch_size=8",
            "eval.every=100",
            "checkpoint.every=100",
            "lora.targets=all-linear",
            f"mesh.data={DATA}",
            f"mesh.fsdp={FSDP}",
            f"output.dir={tmp_path / 'run'}",
        ],
    )
    try:
        with jax.log_compiles(True):
            result = loop.run(cfg, print_fn=lambda *a: None)
    finally:
        logger.removeHandler(handler)
        monkeypatch.undo()

    assert result.steps_done == 4
    saved = json.loads((result.folder / "result.json").read_text())
    assert saved["batching"] == "bucketed"  # classification's default: one compilation per width of batch taken
    assert len(compiles) == saved["step_compilations"] == len(saved["step_shapes"]) <= 2, compiles
    assert calls and all(c == calls[0] for c in calls)  # every step is handed the shardings of the first
    trainable, opt_state, frozen, batch = (jax.tree_util.tree_leaves_with_path(t) for t in calls[0])
    from lora_jax.targets import path_str

    frozen = {path_str(p): s for p, s in frozen}
    trainable = {path_str(p): s for p, s in trainable}
    opt_state = {path_str(p): s for p, s in opt_state}
    batch = {path_str(p): s for p, s in batch}
    # base: the documented rule on the kernel's shape; the (30522, 128) table splits its 128-wide axis
    shapes = {p: np.shape(x) for p, x in _leaves(params)}
    for path, s in frozen.items():
        assert _norm(s.spec) == _norm(_expected_base_spec(shapes[path])), (path, shapes[path], s.spec)
    assert _norm(frozen["bert/embeddings/word_embeddings/embedding"].spec) == (None, "fsdp")
    assert _norm(frozen["bert/encoder/layer_0/attention/self/query/kernel"].spec) == ("fsdp",)
    # adapters of a 128-wide model are small: replicated on all 8 devices
    assert all(_norm(s.spec) == () and len(s.device_set) == 8 for s in trainable.values())
    # optimizer moments: their parameter's sharding, never a single device
    for path, s in opt_state.items():
        assert isinstance(s, sharding.NamedSharding) and len(s.device_set) == 8, (path, s)
        owner = [p for p in trainable if path.endswith("/" + p)]
        assert s == trainable[owner[0]] if owner else _norm(s.spec) == (), (path, s)
    # the batch: (accumulation, examples, tokens) with examples over both mesh axes
    assert _norm(batch["input_ids"].spec) == (None, ("data", "fsdp"))
    assert _norm(batch["labels"].spec) == (None, ("data", "fsdp"))


# ------------------------------------------------------------------------------------------ docs/scaling.md


def _doc_commands(text: str) -> list[str]:
    """The shell commands of the page's code blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    commands = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [line.strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]
    return commands


def test_scaling_doc_uses_real_options():
    """Every ``python -m train.run`` command in docs/scaling.md parses: its flags exist, its config file exists,
    its overrides load, its batch divides over its mesh; every cluster variable it names is one the code reads."""
    import shlex

    from train.config import load_config
    from train.run import parse_args

    text = (ROOT / "docs" / "guides" / "scaling.md").read_text()
    runs = 0
    for command in _doc_commands(text):
        if "train.run" not in command:
            continue
        # up to the end of the command: a closing quote (gcloud's --command="..."), '&' or ';'
        rest = re.split(r'"|\s&|;', command.split("train.run", 1)[1])[0]
        words = shlex.split(rest.replace("$i", "0"))
        args = parse_args(words)  # argparse exits on an unknown --flag
        assert all(not w.startswith("--") or w in ("--config", "--resume", "--print-config") for w in words), words
        if args.config:
            assert (ROOT / args.config).is_file(), args.config
        cfg = load_config(ROOT / args.config if args.config else None, args.overrides)
        devices = cfg.mesh.data * cfg.mesh.fsdp
        assert cfg.mesh.data >= 1 and cfg.train.batch_size % devices == 0, (command, devices)
        runs += 1
    assert runs >= 8
    source = (ROOT / "train" / "distributed.py").read_text()
    for name in set(re.findall(r"\b((?:JAX|SLURM|OMPI)_[A-Z_]+)\b", text)) - {"JAX_PLATFORMS"}:
        assert name in source, f"docs/scaling.md names {name}, which train/distributed.py does not read"
    prefixed = re.findall(r"`(\w+\.\w+)`", text)  # `mesh.fsdp`, `train.batch_size`, ... in the prose
    from train.config import Config

    sections = typing.get_type_hints(Config)
    for key in prefixed:
        section, name = key.split(".")
        if section in sections and not (ROOT / section / f"{name}.py").exists():  # not the module train.run
            assert name in {f.name for f in dataclasses.fields(sections[section])}, key
