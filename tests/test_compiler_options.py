"""The XLA options of the job's compiled steps (``train.loop.step_compiler_options``), checked by what they are for:
on XLA:CPU, a bfloat16 base whose layers are scanned must not be held as a float32 copy of the whole stack."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from lora_jax.models import llama
from train import loop
from train.config import load_config

WIDTH, MLP = 256, 1024


def _step_temporaries(layers: int, options: dict | None) -> int:
    """XLA's temporaries of the job's LoRA step (bfloat16 base, remat=full) on a scanned Llama, from shapes only."""
    cfg = load_config(
        None,
        ["train.precision=bfloat16", "train.remat=full", "lora.targets=qv", "lora.r=8", "data.task=causal-lm"],
    )
    config = llama.Config(
        vocab_size=512,
        hidden_size=WIDTH,
        intermediate_size=MLP,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        scan_layers=True,
    )
    model = llama.build(config, dtype=jnp.bfloat16).clone(remat=loop.remat_name(cfg.train.remat))
    ids = jnp.zeros((1, 32), jnp.int32)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), ids)["params"])
    frozen, trainable = loop.choose_trainable(cfg, abstract, jax.random.key(1))
    frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), frozen)
    tx = loop.make_optimizer(cfg)
    opt_state = jax.eval_shape(tx.init, trainable)
    batch = {
        "input_ids": jax.ShapeDtypeStruct((1, 4, 32), jnp.int32),
        "attention_mask": jax.ShapeDtypeStruct((1, 4, 32), jnp.int32),
        "loss_mask": jax.ShapeDtypeStruct((1, 4, 32), jnp.int32),
    }
    step = jax.jit(loop.make_train_step(model, cfg, tx), compiler_options=options)
    compiled = step.lower(trainable, opt_state, frozen, batch, jax.random.key(2)).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


@pytest.mark.slow  # ~35 s: three compiles of the job's step
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the options are XLA:CPU's")
def test_a_scanned_bf16_base_is_converted_one_layer_at_a_time():
    options = loop.step_compiler_options(load_config(None, ["train.remat=full"]))
    assert options["xla_disable_hlo_passes"].split(",") == ["while-loop-invariant-code-motion", "cse_barrier_expander"]
    without = {"xla_disable_hlo_passes": "cse_barrier_expander"}  # what the step compiled with before
    layer_bf16 = 3 * WIDTH * MLP * 2  # one layer's MLP kernels in bfloat16 (attention adds less)
    two, six = _step_temporaries(2, options), _step_temporaries(6, options)
    six_without = _step_temporaries(6, without)
    # Without the option XLA:CPU hoists each stack's float32 convert out of the scan: the step holds a float32 copy
    # of every layer (2 x its bfloat16 bytes). With it, four more layers add far less than one such copy.
    assert six_without - six >= 6 * 2 * layer_bf16, (six_without, six, layer_bf16)
    assert six - two < 4 * layer_bf16 / 2, (two, six, layer_bf16)
