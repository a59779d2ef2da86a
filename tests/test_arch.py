"""The model layer as declarations: every registered family's declaration is checked against transformers
(checkpoint names and shapes of every task), gguf-py (GGUF tensor names) and PEFT's preset modules; the code
that works from the declarations names no family; the library installs and imports without the training job's
packages."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers

import lora_jax as lora
from lora_jax import models, tree
from lora_jax.models import arch as arch_lib

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)
# A tiny transformers config for every registered family: a family added without one fails test_every_family.
TINY = {
    "bert": lambda: transformers.BertConfig(**SMALL, num_labels=3),
    "llama": lambda: transformers.LlamaConfig(**SMALL, num_key_value_heads=2, attention_bias=True),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "qwen3": lambda: transformers.Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=16),
    "gemma3": lambda: transformers.Gemma3TextConfig(**SMALL, num_key_value_heads=2, head_dim=16, sliding_window=8),
}


def test_every_family_has_a_tiny_config_here():
    assert {a.name for a in arch_lib.families()} <= set(TINY), "add a tiny config for the new family to TINY"


CASES = [(a.name, task) for a in arch_lib.families() if a.name in TINY for task in a.tasks]


@pytest.mark.parametrize("family,task", CASES)
def test_checkpoint_names_and_shapes_are_transformers_own(family, task):
    """Every leaf of every task maps to the tensor transformers' own class of that task holds, with its shape;
    the weights load into it and back."""
    hf_config = TINY[family]()
    arch = arch_lib.for_model_type(hf_config.model_type)
    config = arch.config.from_hf(hf_config)
    params = arch.init_params(config, jax.random.key(0), task)
    tensors = models.to_hf_weights(params, config)
    torch_model = getattr(transformers, arch.hf_class(config.to_hf(), task))(config.to_hf())
    state = torch_model.state_dict()
    prefix = arch.checkpoint_prefix(list(state))
    strip = lambda n: n[len(prefix) + 1:] if prefix and n.startswith(prefix + ".") else n  # noqa: E731
    want = {k: tuple(v.shape) for k, v in state.items() if not arch.names.is_ignored(strip(k), config)}
    assert {k: v.shape for k, v in tensors.items()} == want
    missing, unexpected = torch_model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()},
                                                      strict=False)
    assert not unexpected and all(arch.names.is_ignored(strip(k), config) for k in missing)
    back = models.from_hf_weights(config, tensors, "to_hf_weights", task)
    assert tree.flatten(back).keys() == tree.flatten(params).keys()
    for p, x in tree.flatten(params).items():
        np.testing.assert_array_equal(np.asarray(tree.get(back, p)), np.asarray(x))


@pytest.mark.parametrize("family", sorted(TINY))
def test_presets_select_the_declared_peft_modules(family):
    """lora.init's generic presets select exactly the kernels of the PEFT target_modules the family declares."""
    hf_config = TINY[family]()
    arch = arch_lib.for_model_type(hf_config.model_type)
    config = arch.config.from_hf(hf_config)
    task = next((n for n, t in arch.tasks.items() if t.backbone), arch.default_task)  # with its head
    params = jax.eval_shape(lambda: arch.init_params(config, jax.random.key(0), task))
    kernels = [tree.join(p) for p, _ in tree.leaves(params)]
    assert set(arch.presets) == set(lora.PRESETS)
    for preset in arch.presets:
        selected = {p for p, _ in lora.targets.select(params, preset)}
        declared = {p for p in kernels if any(re.fullmatch(r, p) for r in arch.preset_rules(preset))}
        assert selected == declared and selected, (preset, sorted(selected ^ declared))


@pytest.mark.parametrize("family", sorted(a.name for a in arch_lib.families() if a.gguf is not None))
def test_gguf_names_are_llama_cpp_own(family):
    """Each declared GGUF name is what gguf-py's tensor map (llama.cpp's converter) gives the Hugging Face name."""
    gguf = pytest.importorskip("gguf")
    arch = next(a for a in arch_lib.families() if a.name == family)
    hf_config = TINY[family]()
    config = arch.config.from_hf(hf_config)
    names = models.to_hf_weights(arch.init_params(config, jax.random.key(0), arch.gguf.task), config)
    for gguf_arch in arch.gguf.model_types:
        enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == gguf_arch)
        table = gguf.get_tensor_name_map(enum, config.num_hidden_layers)
        for name in names:
            assert arch.gguf.name(name) == table.get_name(name, try_suffixes=(".weight", ".bias")), (gguf_arch, name)


def test_names_of_a_tree_of_no_family_follow_the_generic_rule():
    names = lora.peft.naming(None, [("encoder", "blocks_3", "mlp", "fc_1", "kernel")])
    assert names.arch is None and names.tensor_name(("encoder", "blocks_3", "mlp", "fc_1", "kernel")) == \
        "encoder.blocks.3.mlp.fc.1.weight"
    assert names.transposed(("a", "kernel")) and not names.transposed(("a", "bias"))


def test_unknown_family_and_task_are_clear_errors():
    with pytest.raises(ValueError, match=r"unsupported model_type 'mamba'.*'qwen3'"):
        arch_lib.for_model_type("mamba")
    with pytest.raises(TypeError, match="Config of a lora_jax model family"):
        models.build(object())
    with pytest.raises(ValueError, match=r"qwen3 supports tasks \('causal-lm', 'base'\), got 'translation'"):
        arch_lib.for_model_type("qwen3").task("translation")


# ------------------------------------------------------------------------------------------ the code


def _family_words() -> re.Pattern:
    words = {w for a in arch_lib.families() for w in (a.name, *a.model_types)}
    return re.compile(rf"\b({'|'.join(sorted(map(re.escape, words)))})\b", re.IGNORECASE)


@pytest.mark.parametrize("file", ["lora_jax/peft.py", "lora_jax/models/generate.py", "lora_jax/models/hf.py",
                                  *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "train").glob("*.py"))])
def test_code_that_works_from_declarations_names_no_family(file):
    hits = [(i, line.strip()) for i, line in enumerate((ROOT / file).read_text().splitlines(), 1)
            if _family_words().search(line)]
    assert not hits, f"{file} names a model family: {hits[:5]}"


def test_models_package_does_not_probe_modules():
    src = (ROOT / "lora_jax/models/__init__.py").read_text()
    assert "hasattr(" not in src and "inspect" not in src


def test_no_module_imports_another_modules_private_names():
    """``from lora_jax.x import _y`` and ``x._y`` on an imported lora_jax module are reaching into another
    module's internals."""
    bad = []
    for file in sorted((ROOT / "lora_jax").rglob("*.py")):
        mod = ast.parse(file.read_text())
        aliases = set()
        for node in ast.walk(mod):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lora_jax"):
                for a in node.names:
                    if a.name.startswith("_"):
                        bad.append(f"{file.name}: from {node.module} import {a.name}")
                    aliases.add(a.asname or a.name)
            elif isinstance(node, ast.Import):
                aliases.update(a.asname or a.name for a in node.names if a.name.startswith("lora_jax"))
        for node in ast.walk(mod):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                bad.append(f"{file.name}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not bad, bad


# (yaml is not here: flax itself imports it)
TRAIN_ONLY = ["datasets", "sacrebleu", "rouge_score", "sklearn", "matplotlib", "tensorboardX", "tqdm", "torch", "peft",
              "train"]


def test_the_library_imports_no_training_packages():
    code = ("import sys, lora_jax, lora_jax.models, lora_jax.models.hf, lora_jax.models.gguf, lora_jax.peft; "
            "from lora_jax.models import arch; arch.families(); "
            f"print(sorted(m for m in {TRAIN_ONLY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_install_metadata_separates_the_training_job():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {re.split(r"[<>=!~\[ ]", d)[0].lower() for d in project["dependencies"]}
    extras = project["optional-dependencies"]
    assert not core & {"datasets", "sacrebleu", "rouge-score", "scikit-learn", "matplotlib", "tensorboardx",
                       "pyyaml", "tqdm", "torch", "peft"}
    assert {"jax", "flax", "optax", "orbax-checkpoint", "chex", "safetensors", "numpy"} <= core
    train = {re.split(r"[<>=!~\[ ]", d)[0].lower() for d in extras["train"]}
    assert {"datasets", "sacrebleu", "rouge-score", "scikit-learn", "matplotlib", "tensorboardx", "pyyaml"} <= train
    for extra in ("test", "bench"):
        assert any(d.replace(" ", "").startswith("lora_jax[train") for d in extras[extra]), extra
    assert (ROOT / "lora_jax" / "py.typed").is_file()
