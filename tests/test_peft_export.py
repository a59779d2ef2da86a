"""PEFT exports that load with the standard recipes.

- ``base_model_name_or_path`` resolves: the hub id for an offline alias, the absolute path for a local folder,
  ``output.peft_base_model`` to override it (before issue 31 it recorded the alias, e.g.
  ``SmolLM2-135M-Instruct-Q4_1``, which ``AutoPeftModelForCausalLM`` cannot find).
- A PEFT export from ``train.run`` over a local Hugging Face folder loads with
  ``peft.AutoPeftModelForCausalLM.from_pretrained(folder)`` and gives our fine-tuned model's logits.
- The offline GGUF recipe: transformers reads the GGUF base (``gguf_file=``) and ``PeftModel.from_pretrained`` puts
  our adapter on it (slow: the real SmolLM2 GGUF).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lora
from lora_jax import models
from tests.conftest import require
from train import loop
from train.config import load_config

QUIET = dict(print_fn=lambda *a, **k: None)


def test_peft_base_name_resolves_aliases_and_folders(tmp_path):
    assert models.peft_base_name("SmolLM2-135M-Instruct-Q4_1") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert models.peft_base_name("all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    assert models.peft_base_name("org/some-model") == "org/some-model"
    assert models.peft_base_name(str(tmp_path)) == str(tmp_path.resolve())
    assert set(models.HUB_IDS) == set(models.ALIASES)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, minilm_path):
    """A 2-layer, 32-wide random Llama with MiniLM's tokenizer, in Hugging Face layout (a local base folder)."""
    from transformers import AutoTokenizer

    from lora_jax.models import llama, save_pretrained

    tok = AutoTokenizer.from_pretrained(str(minilm_path))
    config = llama.Config(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    params = llama.init_params(config, jax.random.key(1), task="causal-lm")
    folder = tmp_path_factory.mktemp("tiny_llama")
    save_pretrained(params, config, folder, tokenizer=tok)
    return folder


def _run(model_dir, out, **extra):
    base = {
        "model.name": str(model_dir),
        "train.batch_size": 4,
        "eval.every": 100,
        "eval.batch_size": 16,
        "checkpoint.every": 100,
        "lora.targets": "qv",
        "optim.lr": 2e-2,
        "optim.warmup_steps": 1,
        "train.steps": 4,
        "output.dir": str(out),
        "data.source": "builtin:restaurants",
        "data.task": "causal-lm",
        "data.max_length": 64,
        "data.max_eval_examples": 16,
        "eval.generate_samples": 0,
        "eval.generate_eval": 0,
        "output.export_peft": "true",
        **extra,
    }
    return loop.run(load_config(None, [f"{k}={v}" for k, v in base.items()]), **QUIET).folder


def test_train_run_peft_export_loads_with_auto_peft_model(tiny_llama, tmp_path):
    torch = require("torch")
    peft = require("peft")
    run = _run(tiny_llama, tmp_path / "job")
    cfg = json.loads((run / "peft" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_llama.resolve())

    peft_model = peft.AutoPeftModelForCausalLM.from_pretrained(str(run / "peft")).eval()
    ids = np.array([[2, 45, 300, 17, 999, 8, 77]], np.int64)
    with torch.no_grad():
        theirs = peft_model(torch.tensor(ids)).logits.numpy()

    model, params, _, _ = models.load(str(tiny_llama), task="causal-lm")
    adapters = lora.load_adapters(run / "adapters")
    ours, _ = model.apply({"params": lora.merge(params, adapters)}, jnp.asarray(ids, jnp.int32))
    base, _ = model.apply({"params": params}, jnp.asarray(ids, jnp.int32))
    assert float(jnp.abs(ours - base).max()) > 1e-4  # the fine-tune changed the logits
    np.testing.assert_allclose(theirs, np.asarray(ours), atol=1e-4, rtol=1e-4)


def test_peft_base_model_config_key_overrides(tiny_llama, tmp_path):
    run = _run(tiny_llama, tmp_path / "job", **{"output.peft_base_model": "my-org/my-base", "train.steps": 1})
    cfg = json.loads((run / "peft" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "my-org/my-base"


@pytest.mark.slow
def test_offline_gguf_recipe_loads_our_peft_adapter(tmp_path):
    """transformers reads the SmolLM2 GGUF itself (``gguf_file=``), PEFT puts our adapter on it: same logits."""
    torch = require("torch")
    peft = require("peft")
    require("gguf")
    from transformers import AutoModelForCausalLM

    alias = "SmolLM2-135M-Instruct-Q4_1"
    gguf_path = models.resolve(alias)
    model, params, _, config = models.load(alias, task="causal-lm")
    adapters = lora.init(params, r=4, targets="qv", key=jax.random.key(3))
    adapters = jax.tree.map(lambda x: x + 0.02 if x.ndim == 2 and x.shape[0] == 4 else x, adapters)  # B != 0
    folder = lora.save_peft(
        adapters, tmp_path / "peft", base_model_name_or_path=models.peft_base_name(alias), config=config
    )
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"

    base = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, torch_dtype=torch.float32
    )
    tuned = peft.PeftModel.from_pretrained(base, str(folder if folder is not None else tmp_path / "peft")).eval()
    ids = np.array([[1, 504, 3458, 314, 253, 1345, 30]], np.int64)
    with torch.no_grad():
        theirs = tuned(torch.tensor(ids)).logits.numpy()
    ours, _ = model.apply({"params": lora.merge(params, adapters)}, jnp.asarray(ids, jnp.int32))
    np.testing.assert_allclose(theirs, np.asarray(ours), atol=2e-3, rtol=2e-3)
