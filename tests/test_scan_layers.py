"""Scanned layer stacks (``scan_layers=True``, :mod:`lora_jax.stacking`) against the unrolled decoder they replace:
the same weights give the same logits, LoRA gradients, merges, generations and checkpoint / PEFT files."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import lora_jax as lora
from lora_jax import stacking
from lora_jax.models import gemma3, generate, hf, llama, mixtral, moe, qwen3, qwen3_moe

SMALL = dict(
    vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64
)
FAMILIES = {
    "llama": lambda: llama.Config.from_hf(transformers.LlamaConfig(**SMALL, intermediate_size=64, num_hidden_layers=3)),
    "qwen3": lambda: qwen3.Config.from_hf(transformers.Qwen3Config(**SMALL, intermediate_size=64, num_hidden_layers=3)),
    # local and global layers in one stack: each step's flag picks the window and the RoPE base
    "gemma3": lambda: gemma3.Config.from_hf(
        transformers.Gemma3TextConfig(
            **SMALL,
            intermediate_size=64,
            num_hidden_layers=4,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
            query_pre_attn_scalar=8,
        )
    ),
    "qwen2-mixed-window": lambda: llama.Config.from_hf(
        transformers.Qwen2Config(
            **SMALL,
            intermediate_size=64,
            num_hidden_layers=3,
            use_sliding_window=True,
            sliding_window=3,
            layer_types=["full_attention", "sliding_attention", "full_attention"],
        )
    ),
    "mixtral": lambda: mixtral.Config.from_hf(
        transformers.MixtralConfig(
            **SMALL,
            intermediate_size=16,
            num_hidden_layers=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            output_router_logits=True,
        )
    ),
    "qwen3_moe": lambda: qwen3_moe.Config.from_hf(
        transformers.Qwen3MoeConfig(
            **SMALL,
            intermediate_size=48,
            moe_intermediate_size=16,
            num_hidden_layers=2,
            num_experts=4,
            num_experts_per_tok=2,
        )
    ),
}
ARCH = {
    "llama": llama,
    "qwen3": qwen3,
    "gemma3": gemma3,
    "qwen2-mixed-window": llama,
    "mixtral": mixtral,
    "qwen3_moe": qwen3_moe,
}


def pair(name):
    """``(family module, unrolled config, scanned config, unrolled params, the same params stacked)``."""
    mod = ARCH[name]
    config = dataclasses.replace(FAMILIES[name](), scan_layers=False)
    scanned = dataclasses.replace(config, scan_layers=True)
    assert scanned.scanned and not config.scanned
    params = mod.ARCHITECTURE.init_params(config, jax.random.key(0))
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), params)  # non-zero norms
    return mod, config, scanned, params, stacking.stack(params)


IDS = jax.random.randint(jax.random.key(2), (2, 9), 0, 64)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_scanned_equals_unrolled_logits_gradients_and_merge(name):
    mod, config, scanned, params, stacked = pair(name)
    # what init builds scanned has the stacked tree's structure and shapes
    assert jax.tree.structure(mod.ARCHITECTURE.init_params(scanned, jax.random.key(0))) == jax.tree.structure(stacked)
    assert all(x.shape[0] == config.num_hidden_layers for x in jax.tree.leaves(stacked["model"]["layers"]))
    model, model_s = mod.ARCHITECTURE.build(config), mod.ARCHITECTURE.build(scanned)
    np.testing.assert_allclose(
        model_s.apply({"params": stacked}, IDS)[0], model.apply({"params": params}, IDS)[0], atol=2e-5, rtol=1e-5
    )

    adapters = jax.tree.map(lambda x: x + 0.02, lora.init(params, r=2, targets="all-linear"))  # B != 0
    adapters_s = stacking.stack(adapters)
    # lora.init on the stacked tree gives one adapter per layer, stacked the same way
    init_s = lora.init(stacked, r=2, targets="all-linear")
    assert jax.tree.structure(init_s) == jax.tree.structure(adapters_s)
    assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(init_s), jax.tree.leaves(adapters_s)))

    def loss(ad, m, p):
        return jnp.mean(m.apply({"params": lora.wrap(p, ad)}, IDS)[0] ** 2)

    for remat in ("none", "full"):
        value_s, grads_s = jax.value_and_grad(loss)(adapters_s, model_s.clone(remat=remat), stacked)
        value, grads = jax.value_and_grad(loss)(adapters, model, params)
        np.testing.assert_allclose(value_s, value, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(grads_s), jax.tree.leaves(stacking.stack(grads))):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
    merged = lora.merge(stacked, adapters_s)
    for a, b in zip(jax.tree.leaves(dict(merged)), jax.tree.leaves(stacking.stack(dict(lora.merge(params, adapters))))):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # and back: unstack gives the per-layer trees
    for a, b in zip(jax.tree.leaves(stacking.unstack(adapters_s)), jax.tree.leaves(adapters)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_scanned_moe_sows_router_logits_in_layer_order(name):
    mod, config, scanned, params, stacked = pair(name)
    _, sown = mod.ARCHITECTURE.build(config).apply({"params": params}, IDS, mutable=["intermediates"])
    _, sown_s = mod.ARCHITECTURE.build(scanned).apply({"params": stacked}, IDS, mutable=["intermediates"])
    logits, logits_s = moe.collect_router_logits(sown), moe.collect_router_logits(sown_s)
    assert len(logits_s) == len(logits) == config.num_hidden_layers
    for a, b in zip(logits_s, logits):
        np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(moe.aux_loss(sown_s, scanned), moe.aux_loss(sown, config), rtol=1e-5)


def test_qwen3_moe_with_dense_layers_stays_unrolled():
    c = qwen3_moe.Config.from_hf(
        transformers.Qwen3MoeConfig(
            **SMALL,
            intermediate_size=48,
            moe_intermediate_size=16,
            num_hidden_layers=3,
            num_experts=4,
            num_experts_per_tok=2,
            mlp_only_layers=[1],
        )
    )
    c = dataclasses.replace(c, scan_layers=True)
    assert not c.scanned  # dense and sparse layers hold different parameters: no one stack
    assert "layers_1" in qwen3_moe.ARCHITECTURE.init_params(c, jax.random.key(0))["model"]


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_scanned_generation_with_the_kv_cache_equals_unrolled(name):
    mod, config, scanned, params, stacked = pair(name)
    assert generate.init_cache(scanned, 2, 8).keys.shape == (config.num_hidden_layers, 2, 8, 2, 8)
    for beams in (1, 2):
        out = generate.generate(mod.ARCHITECTURE.build(config), params, IDS[:, :4], max_new_tokens=5, num_beams=beams)
        out_s = generate.generate(
            mod.ARCHITECTURE.build(scanned), stacked, IDS[:, :4], max_new_tokens=5, num_beams=beams
        )
        np.testing.assert_array_equal(
            np.asarray(getattr(out_s, "sequences", out_s)), np.asarray(getattr(out, "sequences", out))
        )


@pytest.mark.parametrize("name", ["llama", "gemma3", "mixtral"])
def test_checkpoints_keep_their_per_layer_names(name):
    mod, config, scanned, params, stacked = pair(name)
    state = hf.to_hf_weights(params, config)
    assert any(".layers.1." in k for k in state)
    state_s = hf.to_hf_weights(stacked, scanned)  # a scanned tree writes the same tensors, by layer
    assert set(state_s) == set(state)
    for k in state:
        np.testing.assert_array_equal(state_s[k], state[k])
    loaded = hf.from_hf_weights(scanned, state, "ckpt")  # and reads them into the stacks
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(stacked)):
        np.testing.assert_array_equal(a, b)
    broken = {k: v for k, v in state.items() if ".layers.1.self_attn.q_proj" not in k}
    with pytest.raises(lora.CheckpointError, match=r"model\.layers\.1\.self_attn\.q_proj\.weight"):
        hf.from_hf_weights(scanned, broken, "ckpt")


def test_peft_files_of_a_scanned_model_are_the_unrolled_files(tmp_path):
    from safetensors.numpy import load_file

    mod, config, scanned, params, stacked = pair("llama")
    adapters = jax.tree.map(lambda x: x + 0.01, lora.init(params, r=2, targets="qv"))
    lora.save_peft(adapters, tmp_path / "unrolled", config=config)
    lora.save_peft(stacking.stack(adapters), tmp_path / "scanned", config=scanned)
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("unrolled", "scanned"))
    assert set(a) == set(b) and any(".layers.2." in k for k in a)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    configs = [(tmp_path / d / "adapter_config.json").read_text() for d in ("unrolled", "scanned")]
    assert configs[0] == configs[1]
    back = lora.load_peft(tmp_path / "scanned", stacked, config=scanned).adapters
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(stacking.stack(adapters))):
        np.testing.assert_array_equal(x, y)


def test_scanned_stack_refuses_what_it_does_not_support_by_name():
    _, config, scanned, params, stacked = pair("llama")
    with pytest.raises(lora.LoraJaxError, match="scan_layers=False"):
        lora.init(stacked, r=2, use_dora=True)
    with pytest.raises(lora.LoraJaxError, match="scan_layers=False"):
        lora.quantize(stacked)
    with pytest.raises(ValueError, match=r"layers \[1\] of 3 are missing"):
        stacking.stack({"model": {"layers_0": {}, "layers_2": {}}}, like=stacked)
    # rules naming single layers: refused by name on the stack, applied as before on the unrolled model
    per_layer = [
        dict(targets="model/layers_1/self_attn/q_proj/kernel"),
        dict(targets="qv", exclude=r".*layers_[12]/.*"),
        dict(targets="qv", rank_pattern={r".*layers_1/.*": 1}),
        dict(targets="qv", alpha_pattern={r"model/layers_2/self_attn/v_proj/kernel": 3.0}),
    ]
    for kwargs in per_layer:
        with pytest.raises(lora.UnsupportedError, match=r"names single layers.*scan_layers=False"):
            lora.init(stacked, r=2, **kwargs)
        assert lora.init(params, r=2, **kwargs)
    with pytest.raises(lora.UnsupportedError, match=r"train rule .*names single layers.*scan_layers=False"):
        lora.split(stacked, lora.init(stacked, r=2, targets="qv"), train="model/layers_0/input_layernorm/scale")
    with pytest.raises(lora.TargetError, match="matches no leaf"):  # a rule that names nothing stays a TargetError
        lora.init(stacked, r=2, targets="model/layer_1/.*")


def test_the_training_job_scans_unless_the_run_needs_layers_apart():
    from train import loop
    from train.config import ConfigError, load_config

    ckpt, model = loop.open_model(load_config(None, []))  # the default job: SmolLM2, scanned
    assert ckpt.config.scanned and model.config.scanned
    assert any(p[:2] == ("model", "layers") for p in ckpt.sources)
    assert ckpt.sources[("model", "layers", "self_attn", "q_proj", "kernel")].shape[0] == ckpt.config.num_hidden_layers
    for why in (
        ["lora.use_dora=true"],
        ["lora.targets=[model/layers_1/self_attn/q_proj/kernel]"],
        ["model.scan_layers=false"],
    ):
        assert not loop.scan_layers(load_config(None, why)), why
    with pytest.raises(ConfigError, match="lora.use_dora needs unrolled layers"):
        loop.scan_layers(load_config(None, ["model.scan_layers=true", "lora.use_dora=true"]))
    ckpt, _ = loop.open_model(load_config(None, ["model.name=all-MiniLM-L6-v2", "data.task=classification"]))
    assert not hasattr(ckpt.config, "scan_layers")  # a family that never scans opens as before


def test_adapters_trained_scanned_apply_to_the_unrolled_model_and_back():
    mod, config, scanned, params, stacked = pair("llama")
    adapters = jax.tree.map(lambda x: x + 0.01, lora.init(params, r=2, targets="qv"))
    adapters_s = stacking.stack(adapters)
    want = mod.ARCHITECTURE.build(config).apply({"params": lora.merge(params, adapters)}, IDS)[0]
    got = mod.ARCHITECTURE.build(config).apply({"params": lora.merge(params, adapters_s)}, IDS)[0]
    np.testing.assert_allclose(got, want, atol=1e-6)
    got_s = mod.ARCHITECTURE.build(scanned).apply({"params": lora.wrap(stacked, adapters)}, IDS)[0]
    np.testing.assert_allclose(got_s, want, atol=2e-5)
    partial = {"model": {"layers_0": adapters["model"]["layers_0"]}}  # one layer only: no stack to make
    with pytest.raises(ValueError, match=r"layers \[1, 2\] of 3 are missing"):
        lora.merge(stacked, partial)


def test_dw_analysis_of_a_scanned_stack_is_per_layer():
    from lora_jax import analysis

    mod, config, scanned, params, stacked = pair("llama")
    adapters = jax.tree.map(lambda x: x + 0.01, lora.init(params, r=2, targets="qv"))
    want = {(r.layer, r.matrix): r.amp.norm_dw for r in analysis.layer_stats(params, adapters, n_random=2)}
    got = {
        (r.layer, r.matrix): r.amp.norm_dw for r in analysis.layer_stats(stacked, stacking.stack(adapters), n_random=2)
    }
    assert set(got) == set(want) == {(i, m) for i in range(3) for m in ("q_proj", "v_proj")}
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-5)
    # scanned adapters against the model loaded unrolled (the library's default form)
    rows = analysis.layer_stats(params, stacking.stack(adapters), n_random=2)
    mixed = {(r.layer, r.matrix): r.amp.norm_dw for r in rows}
    assert mixed.keys() == want.keys()


def test_open_checkpoint_takes_scan_layers_as_a_build_option(tmp_path):
    from lora_jax import models

    mod, config, scanned, params, stacked = pair("llama")
    hf.save_pretrained(params, config, tmp_path / "llama")
    for scan in (True, False):
        ckpt = models.open_checkpoint(tmp_path / "llama", scan_layers=scan, tokenizer=False)
        assert ckpt.config.scanned is scan
        assert (("model", "layers", "self_attn", "q_proj", "kernel") in ckpt.sources) is scan
        for a, b in zip(jax.tree.leaves(ckpt.load()), jax.tree.leaves(stacked if scan else params)):
            np.testing.assert_array_equal(a, b)
    # a family whose layers never scan ignores it; a field no Config has still raises
    ckpt = models.open_checkpoint("all-MiniLM-L6-v2", scan_layers=True, tokenizer=False)
    assert not hasattr(ckpt.config, "scan_layers")
    with pytest.raises(lora.LoraJaxError, match="no field"):
        models.open_checkpoint(tmp_path / "llama", tokenizer=False, not_a_field=1)
