"""train.run's LoRA options, each shown to change what is trained: QLoRA (quantised frozen base), DoRA, PiSSA,
rsLoRA, rank/alpha patterns, LoRA+ and adapter dropout. Tiny random BERT (2 layers, 32 wide), a few steps each."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lora
from lora_jax import quant
from lora_jax.checkpoint import Checkpointer, load_adapters
from train import data as data_lib
from train import loop
from train.config import ConfigError, load_config

QUIET = dict(print_fn=lambda *a, **k: None)
QV = [f"bert/encoder/layer_{i}/attention/self/{m}/kernel" for i in range(2) for m in ("query", "value")]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, minilm_path):
    """A 2-layer, 32-wide random BERT with MiniLM's tokenizer and a 2-way head, saved in Hugging Face layout."""
    from transformers import AutoTokenizer

    from lora_jax.models import bert, save_pretrained

    config = bert.Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    params = bert.init_params(config, jax.random.key(0), task="sequence-classification")
    folder = tmp_path_factory.mktemp("tiny_bert")
    save_pretrained(params, config, folder, tokenizer=AutoTokenizer.from_pretrained(str(minilm_path)))
    return folder


def overrides(model_dir, out, **extra):
    base = {
        "model.name": str(model_dir),
        "data.source": "builtin:sentiment",
        "data.task": "classification",
        "data.max_length": 16,
        "train.steps": 8,
        "train.batch_size": 8,
        "eval.every": 100,
        "eval.batch_size": 16,
        "checkpoint.every": 100,
        "lora.targets": "qv",
        "optim.lr": 1e-2,
        "optim.warmup_steps": 2,
        "output.dir": str(out),
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def config(model_dir, out, **extra):
    return load_config(None, overrides(model_dir, out, **extra))


def _run(model_dir, out, **extra):
    cfg = config(model_dir, out, **extra)
    return cfg, loop.run(cfg, **QUIET)


def _data(cfg):
    model, params, tok, model_cfg = loop.load_model(cfg)
    _, evals = data_lib.load_tokenized(cfg.data, tok, cfg.model.name, 128, cfg.model.num_labels)
    return model, params, model_cfg, evals.take(np.arange(16))


def _logits(model, weights, batch):
    return np.asarray(model.apply({"params": weights}, batch["input_ids"], attention_mask=batch["attention_mask"]))


def trained(cfg, folder):
    """``(model, frozen params as trained over, adapters, eval batch, model config)`` of a finished run."""
    model, params, model_cfg, batch = _data(cfg)
    prepared = loop.prepare(cfg, params, loop.run_keys(cfg)[0])
    head = lora.load_trained(folder / "params", prepared.trainable["params"])
    adapters = load_adapters(folder / "adapters")
    full, adapters = lora.combine(prepared.frozen, {"adapters": adapters, "params": head})
    return model, full, adapters, batch, model_cfg, params


def _merged_matches_factored(folder, model, full, adapters, batch):
    from lora_jax import models

    merged_model, merged, _, _ = models.load(folder / "merged", task="sequence-classification")
    assert not any(quant.is_quantized(x) for x in jax.tree.leaves(merged, is_leaf=quant.is_quantized))
    factored = _logits(model, lora.wrap(full, adapters), batch)
    np.testing.assert_allclose(_logits(merged_model, merged, batch), factored, atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- config


def test_option_overrides_parse():
    cfg = load_config(
        None,
        [
            "train.method=qlora",
            "quant.type=nf4",
            "quant.block_size=128",
            "quant.double_quant=false",
            "lora.use_dora=true",
            "lora.init=pissa",
            "lora.pissa_niter=4",
            'lora.rank_pattern={".*/layer_0/.*": 2}',
            'lora.alpha_pattern={".*value.*": 3}',
            "optim.lora_plus_ratio=16",
            "lora.use_rslora=true",
            "lora.dropout=0.1",
        ],
    )
    assert (cfg.train.method, cfg.quant.type, cfg.quant.block_size, cfg.quant.double_quant) == (
        "qlora",
        "nf4",
        128,
        False,
    )
    assert cfg.lora.use_dora and cfg.lora.init == "pissa" and cfg.lora.pissa_niter == 4
    assert cfg.lora.rank_pattern == {".*/layer_0/.*": 2} and cfg.lora.alpha_pattern == {".*value.*": 3.0}
    assert cfg.optim.lora_plus_ratio == 16.0 and cfg.lora.use_rslora and cfg.lora.dropout == 0.1
    assert load_config(None).quant == type(cfg.quant)()  # defaults: nf4, block 64, double quant


@pytest.mark.parametrize(
    "extra, message",
    [
        (["quant.block_size=100"], "quant.block_size must be one of"),
        (["quant.type=fp8"], "quant.type: expected one of ['nf4', 'int8']"),
        (["lora.init=svd"], "lora.init: expected one of ['lora', 'gaussian', 'pissa']"),
        (["lora.pissa_niter=2"], "lora.pissa_niter=2 has no effect here: it applies only with lora.init=pissa"),
        (['lora.rank_pattern={".*": 0}'], "lora.rank_pattern['.*'] must be >= 1"),
        (["train.method=qlora", "lora.init=pissa", "output.export_peft=true"], "quantised PiSSA residual"),
    ],
)
def test_option_config_errors(extra, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, extra)
    assert message in str(e.value)


# ----------------------------------------------------------------------------------------------- QLoRA


@pytest.mark.parametrize("qtype, block, double", [("nf4", 64, True), ("nf4", 128, False), ("int8", 64, True)])
def test_qlora_base_is_stored_quantised(tiny_bert, tmp_path, qtype, block, double):
    """Every frozen linear kernel is a QuantizedWeight of exactly the expected bytes; embeddings, norms and the
    trained head are not; the jitted train step runs on it (dequantising inside) and the gradient reaches the
    adapters."""
    cfg = config(
        tiny_bert,
        tmp_path,
        **{
            "train.method": "qlora",
            "quant.type": qtype,
            "quant.block_size": block,
            "quant.double_quant": double,
            "optim.warmup_steps": 0,
            "optim.schedule": "constant",
        },
    )
    model, params, _, batch = _data(cfg)
    prepared = loop.prepare(cfg, params, jax.random.key(0))
    leaves = dict(lora.targets.leaf_paths(prepared.frozen))
    kernels = [p for p in leaves if p.endswith("kernel") and "embeddings" not in p]
    assert len(kernels) == 2 * 6 + 1  # q, k, v, o, intermediate, output per layer + pooler
    for p in kernels:
        q = leaves[p]
        assert quant.is_quantized(q), p
        assert q.method == qtype and q.dtype == jnp.float32
        if qtype == "nf4":
            assert q.block_size == block and q.double_quant == double
            assert q.nbytes == quant.expected_nbytes(q.shape, block, double)
        else:
            assert q.nbytes == math.prod(q.shape) + 4 * q.shape[-1]  # int8 codes + one f32 scale per column
    assert not quant.is_quantized(leaves["bert/embeddings/word_embeddings/embedding"])
    assert prepared.frozen["classifier"] == {"kernel": None, "bias": None}  # trained in full, float32:
    assert prepared.trainable["params"]["classifier"]["kernel"].dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(prepared.trainable))
    dense_kernel_bytes = sum(4 * math.prod(leaves[p].shape) for p in kernels)
    assert sum(leaves[p].nbytes for p in kernels) < dense_kernel_bytes / (3 if qtype == "int8" else 6)

    # The jitted train step runs on the quantised base, the gradient reaches the adapters, and it fits a batch.
    tx = loop.make_optimizer(cfg)
    step = jax.jit(loop.make_train_step(model, cfg, tx))
    batches = jax.tree.map(lambda x: x[None, :8], batch)
    state, opt_state, losses = prepared.trainable, tx.init(prepared.trainable), []
    for i in range(30 if (qtype, block, double) == ("nf4", 64, True) else 2):
        state, opt_state, m = step(state, opt_state, prepared.frozen, batches, jax.random.key(i))
        assert bool(m["finite"])
        losses.append(float(m["loss"]))
    moved = [
        float(jnp.abs(n.b - o.b).max())
        for (_, n), (_, o) in zip(
            lora.adapter_items(state["adapters"]), lora.adapter_items(prepared.trainable["adapters"])
        )
    ]
    assert min(moved) > 0
    assert len(losses) == 2 or losses[-1] < 0.7 * losses[0], losses


@pytest.fixture(scope="module")
def qlora_run(tiny_bert, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "qlora"
    cfg, result = _run(
        tiny_bert, out, **{"train.method": "qlora", "train.steps": 12, "optim.lr": 5e-3, "output.export_merged": "true"}
    )
    return cfg, result.folder, result


def test_qlora_run_trains_reports_memory_and_exports_merged(qlora_run):
    cfg, out, result = qlora_run
    assert result.eval_after["loss"] < result.eval_before["loss"]
    model, full, adapters, batch, _, params = trained(cfg, out)
    saved = json.loads((out / "result.json").read_text())
    frozen = loop.prepare(cfg, params, loop.run_keys(cfg)[0]).frozen
    assert saved["frozen_bytes"] == quant.nbytes(frozen)
    assert saved["frozen_bytes"] < quant.nbytes(params)
    memory = saved["step_memory"]
    assert saved["step_memory_bytes"] == memory["peak"] > 0
    assert memory["arguments"] >= saved["frozen_bytes"]  # the step reads the quantised base, not a dense copy
    assert {p for p, _ in lora.adapter_items(adapters)} == set(QV)
    # merged export: dequantised + merged dense kernels that give the factored model's outputs
    _merged_matches_factored(out, model, full, adapters, batch)


# ------------------------------------------------------------------------------------------------ DoRA


@pytest.fixture(scope="module")
def dora_run(tiny_bert, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "dora"
    cfg, result = _run(
        tiny_bert, out, **{"lora.use_dora": "true", "output.export_merged": "true", "output.export_peft": "true"}
    )
    return cfg, result.folder, result


def test_dora_magnitude_is_trained_checkpointed_merged_and_exported(dora_run):
    cfg, out, _ = dora_run
    meta = json.loads((out / "adapters" / "lora_adapters.json").read_text())
    assert sorted(meta) == sorted(QV) and all(m.get("dora") for m in meta.values())
    model, full, adapters, batch, _, params = trained(cfg, out)
    for path, ad in lora.adapter_items(adapters):
        w0 = np.asarray(lora.core._nested_get(params, tuple(path.split("/"))))
        norms = np.linalg.norm(w0, axis=0)  # DoRA's magnitude at init: W0's column norms
        assert ad.magnitude.shape == norms.shape
        assert np.abs(np.asarray(ad.magnitude) - norms).max() > 1e-4, f"{path}: magnitude was not trained"
    ckpt = Checkpointer(out / "checkpoints")
    state = ckpt.restore_untyped(ckpt.steps()[-1])
    ckpt.close()
    layer = state["trainable"]["adapters"]["bert"]["encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"]
    assert "magnitude" in layer and np.asarray(layer["magnitude"]).shape == (32,)
    _merged_matches_factored(out, model, full, adapters, batch)
    peft_cfg = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert peft_cfg["use_dora"] is True and peft_cfg["modules_to_save"] == ["classifier"]
    from safetensors.numpy import load_file

    tensors = load_file(out / "peft" / "adapter_model.safetensors")
    assert sum(k.endswith("lora_magnitude_vector") for k in tensors) == len(QV)


# ----------------------------------------------------------------------------------------------- PiSSA


def test_pissa_starts_on_the_principal_directions_and_equals_the_base(tiny_bert, tmp_path):
    cfg = config(tiny_bert, tmp_path, **{"lora.init": "pissa", "lora.r": 4})
    model, params, _, batch = _data(cfg)
    prepared = loop.prepare(cfg, params, jax.random.key(0))
    full, adapters = lora.combine(prepared.frozen, prepared.trainable)
    for path, ad in lora.adapter_items(adapters):
        w = np.asarray(lora.core._nested_get(params, tuple(path.split("/"))))
        res = np.asarray(lora.core._nested_get(full, tuple(path.split("/"))))
        s = np.linalg.svd(w, compute_uv=False)
        np.testing.assert_allclose(
            np.linalg.svd(ad.scale * np.asarray(ad.a @ ad.b), compute_uv=False)[:4], s[:4], rtol=1e-4
        )  # A @ B holds W's top-4 singular values; the residual the rest
        np.testing.assert_allclose(np.linalg.svd(res, compute_uv=False)[:4], s[4:8], rtol=1e-4)
    np.testing.assert_allclose(
        _logits(model, lora.wrap(full, adapters), batch), _logits(model, params, batch), atol=1e-5
    )


@pytest.fixture(scope="module")
def options_run(tiny_bert, tmp_path_factory):
    """rsLoRA with rank / alpha patterns, LoRA+ and adapter dropout in one run."""
    out = tmp_path_factory.mktemp("runs") / "options"
    cfg, result = _run(
        tiny_bert,
        out,
        **{
            "lora.r": 4,
            "lora.alpha": 8,
            "lora.use_rslora": "true",
            "lora.dropout": 0.3,
            "optim.lora_plus_ratio": 4,
            "lora.rank_pattern": '{".*/layer_0/attention/self/query/kernel": 2}',
            "lora.alpha_pattern": '{".*/layer_1/.*/value/kernel": 2}',
        },
    )
    return cfg, result.folder, result


def test_pissa_run_equals_base_at_step_0_and_exports_for_the_original_base(tiny_bert, tmp_path, options_run):
    cfg, result = _run(
        tiny_bert,
        tmp_path / "pissa",
        **{
            "lora.init": "pissa",
            "lora.r": 4,
            "lora.use_rslora": "true",
            "output.export_merged": "true",
            "output.export_peft": "true",
        },
    )
    # At step 0 the model is the base model: the same validation loss as a LoRA run (B = 0) of the same base.
    np.testing.assert_allclose(result.eval_before["loss"], options_run[2].eval_before["loss"], rtol=1e-5)
    assert result.eval_after["loss"] != result.eval_before["loss"]
    out = result.folder
    model, full, adapters, batch, model_cfg, params = trained(cfg, out)
    want = _logits(model, lora.wrap(full, adapters), batch)
    _merged_matches_factored(out, model, full, adapters, batch)
    # The PEFT export states the update against the ORIGINAL base (rank 2r: [A, A0] @ [B; -B0]).
    peft = lora.load_peft(out / "peft", params, config=model_cfg)
    assert {ad.r for _, ad in lora.adapter_items(peft.adapters)} == {8}
    np.testing.assert_allclose(
        _logits(model, lora.wrap(peft.update(params), peft.adapters), batch), want, atol=2e-5, rtol=1e-5
    )


# ------------------------------------------------------------------------ rsLoRA, patterns, LoRA+, dropout


def test_rslora_and_rank_alpha_patterns_in_saved_metadata(options_run):
    _, out, _ = options_run
    meta = json.loads((out / "adapters" / "lora_adapters.json").read_text())
    expect = {p: (4, 8.0) for p in QV}
    expect["bert/encoder/layer_0/attention/self/query/kernel"] = (2, 8.0)
    expect["bert/encoder/layer_1/attention/self/value/kernel"] = (4, 2.0)
    for path, (r, alpha) in expect.items():
        assert (meta[path]["r"], meta[path]["alpha"]) == (r, alpha), path
        assert meta[path]["scale"] == pytest.approx(alpha / math.sqrt(r)), path  # rsLoRA: alpha / sqrt(r)
        assert meta[path]["dropout"] == 0.3
    adapters = load_adapters(out / "adapters")
    assert lora.core._nested_get(adapters, tuple(QV[0].split("/"))).a.shape == (32, 2)


@pytest.mark.parametrize("ratio", [None, 4.0])
def test_lora_plus_gives_b_ratio_times_the_learning_rate(tiny_bert, tmp_path, ratio):
    """One Adam step on all-ones gradients moves every parameter by its learning rate: A by lr, B (and a DoRA
    magnitude) by ratio x lr, the head by lr."""
    extra = {"optim.schedule": "constant", "optim.warmup_steps": 0, "optim.lr": 1e-3, "lora.use_dora": "true"}
    if ratio:
        extra["optim.lora_plus_ratio"] = ratio
    cfg = config(tiny_bert, tmp_path, **extra)
    _, params, _, _ = _data(cfg)
    trainable = loop.prepare(cfg, params, jax.random.key(0)).trainable
    tx = loop.make_optimizer(cfg)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), trainable)
    updates, _ = tx.update(grads, tx.init(trainable), trainable)
    k = ratio or 1.0
    for _, ad in lora.adapter_items(updates["adapters"]):
        np.testing.assert_allclose(ad.a, -1e-3, rtol=1e-4)
        np.testing.assert_allclose(ad.b, -1e-3 * k, rtol=1e-4)
        np.testing.assert_allclose(ad.magnitude, -1e-3 * k, rtol=1e-4)
    for x in jax.tree.leaves(updates["params"]):
        np.testing.assert_allclose(x, -1e-3, rtol=1e-4)


def test_dropout_applies_in_training_with_the_step_key_and_not_in_eval(tiny_bert, options_run):
    cfg, out, _ = options_run
    model, full, adapters, batch, _, params = trained(cfg, out)
    prepared = loop.prepare(cfg, params, loop.run_keys(cfg)[0])
    trainable = {"adapters": adapters, "params": lora.load_trained(out / "params", prepared.trainable["params"])}
    tx = loop.make_optimizer(cfg)
    step = jax.jit(loop.make_train_step(model, cfg, tx))
    evaluate = jax.jit(loop.make_eval_step(model, cfg))
    batch = {k: v for k, v in batch.items() if k != "weight"}
    batches = jax.tree.map(lambda x: x[None], batch)

    def train_loss(trainable, key):
        return float(step(trainable, tx.init(trainable), prepared.frozen, batches, key)[2]["loss"])

    loss_sum, count, _ = evaluate(trainable, prepared.frozen, batch)
    eval_loss = float(loss_sum / count)
    k1, k2 = jax.random.fold_in(jax.random.key(5), 1), jax.random.fold_in(jax.random.key(5), 2)
    assert train_loss(trainable, k1) == train_loss(trainable, k1)  # deterministic given the key
    assert abs(train_loss(trainable, k1) - train_loss(trainable, k2)) > 1e-6  # a new mask every step
    assert abs(train_loss(trainable, k1) - eval_loss) > 1e-6  # dropout on in training
    no_dropout = jax.tree.map(lambda ad: dataclasses.replace(ad, dropout=0.0), adapters, is_leaf=lora.core.is_adapter)
    off = {"adapters": no_dropout, "params": trainable["params"]}
    np.testing.assert_allclose(train_loss(off, k1), eval_loss, rtol=1e-5)  # ... and the only difference
    # evaluation ignores dropout: the eval loss is the factored model's loss without it
    logits = _logits(model, lora.wrap(full, adapters), batch)
    ce = -jax.nn.log_softmax(logits)[np.arange(len(logits)), batch["labels"]]
    np.testing.assert_allclose(eval_loss, float(ce.mean()), rtol=1e-5)
