"""Loading straight into the mesh (issue 25): blocks read from the file, leaves born sharded, tensor parallelism,
the memory plan, streaming exports.

The 8-device checks run in a child pytest process whose JAX starts with 8 CPU devices
(``test_sharded_load_on_8_cpu_devices``), as in tests/test_sharding.py; run them directly with

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu LORA_JAX_8DEV=1 \\
        python -m pytest tests/test_sharded_load.py -k 8dev
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHILD = os.environ.get("LORA_JAX_8DEV") == "1"
child_only = pytest.mark.skipif(not CHILD, reason="runs in the 8-device child of test_sharded_load_on_8_cpu_devices")


def test_sharded_load_on_8_cpu_devices():
    """Run this file's 8-device tests in a child process whose JAX starts with 8 CPU devices."""
    if CHILD:
        pytest.skip("already the 8-device child")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu", LORA_JAX_8DEV="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", "-k", "8dev", str(Path(__file__))],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


# ----------------------------------------------------------------------------------------- fixtures


def _llama_config(layers: int = 2):
    from lora_jax.models import llama

    return llama.Config(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A tiny Llama (width 64, SmolLM2's 49,152-token vocabulary and tokenizer) saved as Hugging Face sharded
    bfloat16 safetensors (several files and an index)."""
    import jax
    import jax.numpy as jnp

    from lora_jax import models
    from lora_jax.models import llama, save_pretrained

    config = _llama_config()
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), llama.init_params(config, jax.random.key(3), "causal-lm"))
    folder = tmp_path_factory.mktemp("llama") / "model"
    tokenizer = models.open_checkpoint("SmolLM2-135M-Instruct-Q4_1").tokenizer
    save_pretrained(params, config, folder, tokenizer=tokenizer, max_shard_size="1MB")
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


# ------------------------------------------------------------------------------------- one process


@pytest.mark.parametrize("layout_name", ["SAME", "TRANSPOSE", "permuted", "stacked"])
def test_layout_reads_only_the_block_it_needs(tmp_path, layout_name):
    """``Layout.read_block`` gives ``load(tensors)[index]`` and asks the file for that block's bytes only."""
    from lora_jax.models import arch, hf

    rng = np.random.default_rng(0)
    layout, tensors = {
        "SAME": (arch.SAME, {"t": rng.standard_normal((6, 8), np.float32)}),
        "TRANSPOSE": (arch.TRANSPOSE, {"t": rng.standard_normal((8, 6), np.float32)}),
        "permuted": (arch.permuted((0, 2, 1)), {"t": rng.standard_normal((4, 8, 6), np.float32)}),
        "stacked": (arch.stacked(), {f"e{i}": rng.standard_normal((8, 6), np.float32) for i in range(4)}),
    }[layout_name]
    hf.write_safetensors(tensors, tmp_path)
    weights = hf.open_weights(tmp_path)
    views = [weights.view(n) for n in tensors]
    whole = layout.load([tensors[n] for n in tensors])
    index = tuple(slice(1, n - 1) for n in whole.shape)
    with hf.recording_reads() as reads:
        block = layout.read_block(views, index)
    np.testing.assert_array_equal(block, whole[index])
    read = sum(int(np.prod([s.stop - s.start for s in slices])) for _, slices in reads)
    assert read == block.size, (reads, block.shape)  # exactly the block's elements, nothing whole


def test_streaming_writer_round_trips_and_loads_in_safetensors(tmp_path):
    """The leaf-by-leaf safetensors writer: shards + index that ``safetensors`` itself reads back bitwise."""
    import ml_dtypes
    from safetensors import safe_open

    from lora_jax.models import hf

    rng = np.random.default_rng(1)
    tensors = {
        "a": rng.standard_normal((16, 8)).astype(ml_dtypes.bfloat16),
        "b": np.arange(5, dtype=np.int64),
        "c": rng.standard_normal((3, 4, 5)).astype(np.float16),
    }
    asked = []
    files = hf.write_safetensors_streaming(
        {k: (v.shape, v.dtype) for k, v in tensors.items()},
        lambda k: asked.append(k) or tensors[k],
        tmp_path,
        max_shard_size=256,
    )
    assert asked == list(tensors)  # each tensor produced once, in order
    assert files[-1].name == hf.INDEX_NAME and len(files) == 3
    for f in files[:-1]:
        with safe_open(str(f), framework="np") as h:
            assert h.metadata() == {"format": "pt"}
            for k in h.keys():
                np.testing.assert_array_equal(h.get_tensor(k), tensors[k])
    with pytest.raises(ValueError, match="announced"):
        hf.write_safetensors_streaming({"a": ((2, 2), np.float32)}, lambda k: np.zeros((3,), np.float32), tmp_path)


def test_checkpoint_opens_without_reading_weights(llama_folder):
    """``open_checkpoint`` reads names, shapes and the config: no tensor block."""
    from lora_jax import models
    from lora_jax.models import hf

    with hf.recording_reads() as reads:
        ckpt = models.open_checkpoint(llama_folder)
        abstract = ckpt.abstract("bfloat16")
    assert reads == []
    q = abstract["model"]["layers"]["self_attn"]["q_proj"]["kernel"]  # scanned by default: the layers stacked
    assert q.dtype == np.dtype("bfloat16")
    assert q.shape == (ckpt.config.num_hidden_layers, 64, 64)


def test_memory_plan_refuses_a_run_that_does_not_fit(llama_folder, tmp_path):
    """With a fake device capacity below the plan, the job stops before training, naming the knobs; with room,
    the plan is in result.json and its argument bytes agree with XLA's within 10%."""
    from train.config import ConfigError, load_config
    from train.loop import run

    base = [
        f"model.name={llama_folder}",
        "data.task=causal-lm",
        "train.steps=1",
        "train.batch_size=4",
        "data.max_length=64",
        "eval.generate_samples=0",
        "eval.generate_eval=0",
        "data.max_eval_examples=4",
        "eval.batch_size=4",
    ]
    with pytest.raises(ConfigError, match=r"GiB over\): try more fsdp/tensor devices.*train.batch_size"):
        run(load_config(None, [*base, f"output.dir={tmp_path / 'small'}", "train.device_memory=100KB"]))
    run(load_config(None, [*base, f"output.dir={tmp_path / 'ok'}", "train.device_memory=64GB"]))
    plan = json.loads((tmp_path / "ok" / "latest" / "result.json").read_text())["memory_plan"]
    ours = plan["base"] + plan["trainable"] + plan["optimizer"] + plan["batch"]
    assert plan["xla_arguments"] > 0 and abs(ours - plan["xla_arguments"]) <= 0.1 * plan["xla_arguments"], plan
    assert plan["capacity"] == 64 * 10**9 and plan["total"] >= ours + plan["temp"]


# --------------------------------------------------------------------------------------- 8 devices


def _mesh(fsdp=8, tensor=1):
    from lora_jax import sharding

    return sharding.make_mesh(data=1, fsdp=fsdp, tensor=tensor)


@child_only
def test_8dev_leaves_are_born_sharded_and_equal_the_whole_load(llama_folder, monkeypatch):
    """Every leaf is created with its final sharding (each device holding one block), equal bitwise to the whole
    load, and no array larger than its block is ever created on one device while loading: array creation through
    ``jnp.asarray`` / ``jnp.array`` / ``jax.device_put`` is watched and fails the test (the old loader made each
    whole tensor with ``jnp.asarray`` on device 0)."""
    import jax
    import jax.numpy as jnp

    from lora_jax import models, sharding
    from lora_jax.models import hf, placement

    ckpt = models.open_checkpoint(llama_folder)
    mesh = _mesh()
    shardings = sharding.tree_shardings(ckpt.abstract(jnp.bfloat16), mesh, [(".*", "fsdp")])  # every leaf split
    biggest_block = max(
        placement.shard_nbytes(jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=s))
        for x, s in zip(jax.tree.leaves(ckpt.abstract()), jax.tree.leaves(shardings))
    )
    made = []

    def watch(fn):
        def wrapped(x, *args, **kwargs):
            made.append(int(np.asarray(x).nbytes) if hasattr(x, "shape") else 0)
            return fn(x, *args, **kwargs)

        return wrapped

    for mod, name in [(jnp, "asarray"), (jnp, "array"), (jax, "device_put")]:
        monkeypatch.setattr(mod, name, watch(getattr(mod, name)))
    with hf.recording_reads() as reads:
        params = ckpt.load(shardings, dtype=jnp.bfloat16)
    monkeypatch.undo()
    assert max(made, default=0) <= biggest_block, (max(made), biggest_block)
    whole = hf.from_hf_weights(ckpt.config, hf.open_weights(llama_folder), "whole")
    for (path, x), (_, y), s in zip(
        jax.tree_util.tree_leaves_with_path(params),
        jax.tree_util.tree_leaves_with_path(whole),
        jax.tree.leaves(shardings),
    ):
        assert x.sharding == s, path
        assert x.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        for shard in x.addressable_shards:
            assert shard.data.shape == s.shard_shape(x.shape)
    # each block read once per process: the elements read are the sum of the distinct blocks
    distinct = {(n, tuple((s.start, s.stop) for s in sl)) for n, sl in reads}
    assert len(distinct) == len(reads)


@child_only
def test_8dev_qlora_base_is_quantised_leaf_by_leaf_on_the_mesh(llama_folder):
    """``train.loop.prepare`` over a checkpoint for QLoRA: each targeted kernel is quantised as it is read, placed
    by the rules, and equals quantising the whole float32 load."""
    import jax
    import jax.numpy as jnp

    import lora_jax as lora
    from lora_jax import models
    from train import loop
    from train.config import load_config

    cfg = load_config(
        None, [f"model.name={llama_folder}", "train.method=qlora", "train.precision=bfloat16", "data.task=causal-lm"]
    )
    ckpt = models.open_checkpoint(llama_folder, scan_layers=loop.scan_layers(cfg))  # as the job: QLoRA unrolls
    assert not ckpt.config.scanned
    mesh = _mesh()
    prepared = loop.prepare(cfg, ckpt, jax.random.key(0), mesh)
    # what the job did before: quantise the whole float32 tree, then cast the rest
    reference = loop._cast_floats(loop.quantize_base(cfg, ckpt.load(dtype=jnp.float32)), jnp.bfloat16)
    q = prepared.frozen["model"]["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert lora.quant.is_quantized(q)
    for got, want in zip(jax.tree.leaves(prepared.frozen), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert all(
        isinstance(x.sharding, jax.sharding.NamedSharding) and x.sharding.mesh == mesh
        for x in jax.tree.leaves(prepared.frozen)
    )


@child_only
def test_8dev_tensor_parallel_trains_like_one_device(llama_folder):
    """fsdp 2 x tensor 4: the logical axes split heads / MLP columns / vocabulary over ``tensor`` and the width over
    ``fsdp``; 5 steps give the same losses as one device (float32), and each device holds about 1/8 of the base."""
    import jax
    import jax.numpy as jnp

    import lora_jax as lora
    from lora_jax import models, sharding
    from train import loop
    from train.config import load_config

    cfg = load_config(
        None,
        [
            f"model.name={llama_folder}",
            "data.task=causal-lm",
            "lora.targets=all-linear",
            "optim.lr=1e-2",
            "optim.warmup_steps=0",
            "optim.schedule=constant",
        ],
    )
    ckpt = models.open_checkpoint(llama_folder)
    model = ckpt.build(jnp.float32)
    tx = loop.make_optimizer(cfg)
    rng = np.random.default_rng(0)
    batches = [
        {
            "input_ids": rng.integers(0, 256, (1, 8, 16)).astype(np.int32),
            "attention_mask": np.ones((1, 8, 16), np.int32),
            "loss_mask": np.ones((1, 8, 16), np.float32),
        }
        for _ in range(5)
    ]

    def train(mesh):
        prepared = loop.prepare(cfg, ckpt, jax.random.key(0), mesh)
        trainable = sharding.put_tree(prepared.trainable, sharding.tree_shardings(prepared.trainable, mesh))
        opt_state = sharding.init_opt_state(tx, trainable)
        step = jax.jit(loop.on_mesh(loop.make_train_step(model, cfg, tx), mesh))
        losses = []
        for i, b in enumerate(batches):
            batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, ndim=3, leading=1)) for k, v in b.items()}
            trainable, opt_state, m = step(trainable, opt_state, prepared.frozen, batch, jax.random.key(i))
            losses.append(float(m["loss"]))
        return losses, prepared.frozen

    tp = sharding.make_mesh(data=1, fsdp=2, tensor=4)
    one = sharding.make_mesh(data=1, fsdp=1, devices=jax.devices()[:1])
    tp_losses, frozen = train(tp)
    one_losses, _ = train(one)
    np.testing.assert_allclose(tp_losses, one_losses, rtol=2e-5)
    q = frozen["model"]["layers"]["self_attn"]["q_proj"]["kernel"]  # scanned: the layer axis stays whole
    assert tuple(q.sharding.spec) == (None, "fsdp", "tensor")
    down = frozen["model"]["layers"]["mlp"]["down_proj"]["kernel"]
    assert tuple(down.sharding.spec) == (None, "tensor", "fsdp")
    per_device = sum(
        s.data.nbytes for x in jax.tree.leaves(frozen) for s in x.addressable_shards if s.device == jax.devices()[0]
    )
    total = sum(x.nbytes for x in jax.tree.leaves(frozen))
    assert per_device <= total / 8 * 1.3, (per_device, total)  # norms (small) are replicated
    assert lora.summary(frozen, {}).total > 0


# ------------------------------------------------------------------------------------- 2 processes

_READER = textwrap.dedent("""
    import json, os, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(os.environ["ADDR"], 2, int(os.environ["PID"]))
    import jax.numpy as jnp
    from lora_jax import models, sharding
    from lora_jax.models import hf
    ckpt = models.open_checkpoint(sys.argv[1])
    mesh = sharding.make_mesh(data=1, fsdp=8)
    shardings = sharding.tree_shardings(ckpt.abstract(jnp.bfloat16), mesh, [(".*", "fsdp")])
    with hf.recording_reads() as reads:
        params = ckpt.load(shardings, dtype=jnp.bfloat16)
    held = {}
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        idx = x.sharding.addressable_devices_indices_map(x.shape)
        held["/".join(k.key for k in path)] = sorted({tuple((s.start or 0, s.stop if s.stop is not None else n)
                                                            for s, n in zip(i, x.shape)) for i in idx.values()})
    print("RESULT " + json.dumps({"reads": [[n, [[s.start, s.stop] for s in sl]] for n, sl in reads],
                                  "held": held}))
""")


def test_two_processes_each_read_only_their_own_blocks(llama_folder, tmp_path):
    """A real 2-process JAX cluster (4 CPU devices each, fsdp 8, every leaf split): each process reads from the
    checkpoint exactly the blocks its own devices hold, and together they read every element once."""
    script = tmp_path / "reader.py"
    script.write_text(_READER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(llama_folder)],
            cwd=ROOT,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(
                os.environ,
                XLA_FLAGS="--xla_force_host_platform_device_count=4",
                JAX_PLATFORMS="cpu",
                ADDR=f"127.0.0.1:{port}",
                PID=str(i),
            ),
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    results = []
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    from lora_jax import models, stacking

    ckpt = models.open_checkpoint(llama_folder)  # scanned: a stacked leaf's block spans layers, one tensor each
    names = {
        "/".join(p): src.what for p, src in models.open_checkpoint(llama_folder, scan_layers=False).sources.items()
    }

    def tensor_blocks(path, block):
        """(tensor name, block read) of a held block; a 2-D kernel is stored transposed: its axes reversed."""
        parts = tuple(path.split("/"))
        if stacking.layer_axes(parts):
            (start, stop), block = block[0], block[1:]
            paths = ["/".join(stacking.per_layer_path(parts, i)) for i in range(start, stop)]
        else:
            paths = [path]
        block = tuple(tuple(b) for b in (block if len(block) == 1 or "kernel" not in path else block[::-1]))
        return {(names[p], block) for p in paths}

    for r in results:
        held = {t for path, blocks in r["held"].items() for block in blocks for t in tensor_blocks(path, block)}
        read = {(n, tuple(tuple(s) for s in sl)) for n, sl in r["reads"]}
        assert read == held
        assert len(r["reads"]) == len(read)  # no block read twice
    total = sum(int(np.prod([b - a for a, b in sl])) for r in results for _, sl in r["reads"])
    assert total == sum(int(np.prod(src.shape)) for src in ckpt.sources.values())  # every element read once


# ------------------------------------------------------------------------------------- real weights


def _old_path(name: str):
    """The params as the loaders built them before loading into meshes: the host converters (kept in the library),
    every tensor whole, cast to float32."""
    import jax.numpy as jnp

    from lora_jax import models
    from lora_jax.models import ct2, gguf, hf

    path = models.resolve(name)
    if path.suffix == ".gguf":
        reader = gguf.open_gguf(path)
        meta = gguf.metadata(reader)
        config = gguf.config_from_metadata(meta, {t.name for t in reader.tensors}, str(path))
        return gguf.params_from_reader(reader, config, meta["general.architecture"], jnp.float32, str(path))
    if ct2.is_ct2_folder(path):
        parsed = ct2.read_model(path / ct2.MODEL_NAME)
        config = ct2.whisper_config(parsed)
        tensors = {k: v.astype(np.float32) for k, v in ct2.whisper_to_hf(parsed, decoder=False).items()}
        return hf.from_hf_weights(config, tensors, parsed.source, "base")
    weights = hf.open_weights(path)
    return hf.from_hf_weights(models.open_checkpoint(path).config, weights, weights.source)


def _assert_bitwise(name: str, shardings=None):
    import jax
    import jax.numpy as jnp

    from lora_jax import models

    ckpt = models.open_checkpoint(name)
    new = ckpt.load(shardings(ckpt) if shardings else None, dtype=jnp.float32)
    old = _old_path(name)
    flat_new, flat_old = jax.tree_util.tree_leaves_with_path(new), jax.tree_util.tree_leaves_with_path(old)
    assert [p for p, _ in flat_new] == [p for p, _ in flat_old]
    for (path, x), (_, y) in zip(flat_new, flat_old):
        assert x.dtype == y.dtype == jnp.float32, path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


@child_only
@pytest.mark.parametrize("name", ["all-MiniLM-L6-v2", "SmolLM2-135M-Instruct-Q4_1"])
def test_8dev_real_models_load_bitwise_as_before(name):
    """Real MiniLM (HF safetensors) and SmolLM2 (GGUF), FSDP-split over 8 devices: bitwise the old loaders'
    float32 params."""
    from lora_jax import sharding

    _assert_bitwise(name, lambda ckpt: sharding.tree_shardings(ckpt.abstract(), _mesh(), [(".*", "fsdp")]))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma-3-270m", "whisper-base"])
def test_real_models_load_bitwise_as_before(name):
    """Real Gemma 3 270M (GGUF Q4_K_M) and Whisper base (CTranslate2): bitwise the old loaders' float32 params."""
    _assert_bitwise(name)
