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
import transformers

import lora_jax as lora
from conftest import require
from lora_jax import models, tree
from lora_jax.models import arch as arch_lib
from lora_jax.models import bert, gpt2, hf, llama, mixtral, qwen3, qwen3_moe, whisper

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
)
# A tiny transformers config for every registered family: a family added without one fails test_every_family.
TINY = {
    "bert": lambda: transformers.BertConfig(**SMALL, num_labels=3),
    "llama": lambda: transformers.LlamaConfig(**SMALL, num_key_value_heads=2, attention_bias=True),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "qwen3": lambda: transformers.Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=16),
    "gemma3": lambda: transformers.Gemma3TextConfig(**SMALL, num_key_value_heads=2, head_dim=16, sliding_window=8),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **SMALL, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16
    ),
    "mixtral": lambda: transformers.MixtralConfig(
        **SMALL, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2
    ),
    "whisper": lambda: transformers.WhisperConfig(
        vocab_size=64,
        d_model=32,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=48,
        decoder_layers=1,
        decoder_attention_heads=4,
        decoder_ffn_dim=48,
        num_mel_bins=8,
        max_source_positions=16,
        max_target_positions=16,
        classifier_proj_size=12,
        num_labels=3,
        use_weighted_layer_sum=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    ),
}


def test_every_family_has_a_tiny_config_here():
    assert {a.name for a in arch_lib.families()} <= set(TINY), "add a tiny config for the new family to TINY"


CASES = [(a.name, task) for a in arch_lib.families() if a.name in TINY for task in a.tasks]


@pytest.mark.parametrize("family,task", CASES)
def test_checkpoint_names_and_shapes_are_transformers_own(family, task, tmp_path):
    """Every leaf of every task maps to the tensor transformers' own class of that task saves, with its shape
    (an MoE's experts one tensor per expert, as save_pretrained writes them); transformers loads the weights,
    and they come back from its state_dict (its run-time names: an MoE's experts fused) unchanged."""
    hf_config = TINY[family]()
    arch = arch_lib.for_model_type(hf_config.model_type)
    config = arch.config.from_hf(hf_config)
    params = arch.init_params(config, jax.random.key(0), task)
    tensors = models.to_hf_weights(params, config)
    cls = getattr(transformers, arch.hf_class(config.to_hf(), task))
    cls(config.to_hf()).save_pretrained(tmp_path / "theirs")
    saved = hf.open_weights(tmp_path / "theirs")
    prefix = arch.checkpoint_prefix(list(saved))
    strip = lambda n: n[len(prefix) + 1 :] if prefix and n.startswith(prefix + ".") else n  # noqa: E731
    want = {k: saved.shape(k) for k in saved if not arch.names.is_ignored(strip(k), config)}
    assert {k: v.shape for k, v in tensors.items()} == want
    hf.save_pretrained(params, config, tmp_path / "ours")
    loaded, info = cls.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert all(arch.names.is_ignored(strip(k), config) for k in info["missing_keys"]), info
    for state in (tensors, {k: v.numpy() for k, v in loaded.state_dict().items()}):
        back = models.from_hf_weights(config, state, "to_hf_weights", task)
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
    assert {"qv", "attention", "all-linear"} <= set(arch.presets) <= set(lora.PRESETS)
    for preset in arch.presets:
        selected = {p for p, _ in lora.targets.select(params, preset)}
        declared = {p for p in kernels if any(re.fullmatch(r, p) for r in arch.preset_rules(preset))}
        assert selected == declared and selected, (preset, sorted(selected ^ declared))


@pytest.mark.parametrize("family", sorted(a.name for a in arch_lib.families() if a.gguf is not None))
def test_gguf_names_are_llama_cpp_own(family):
    """Each declared GGUF name is what gguf-py's tensor map (llama.cpp's converter) gives the Hugging Face name."""
    gguf = require("gguf")
    arch = next(a for a in arch_lib.families() if a.name == family)
    hf_config = TINY[family]()
    config = arch.config.from_hf(hf_config)
    names = models.to_hf_weights(arch.init_params(config, jax.random.key(0), arch.gguf.task), config)
    for gguf_arch in arch.gguf.model_types:
        enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == gguf_arch)
        table = gguf.get_tensor_name_map(enum, config.num_hidden_layers)
        for name in names:
            # one expert's tensor ("model.layers.0.mlp.experts.3.gate_proj.weight") is expert 3 of llama.cpp's
            # stack of them ("blk.0.ffn_gate_exps.weight[3]" is written "blk.0.ffn_gate_exps[3].weight")
            stack = re.sub(r"\.experts\.\d+\.", ".experts.", name)
            ours = re.sub(r"\[\d+\]", "", arch.gguf.name(name) or "") or None
            assert ours == table.get_name(stack, try_suffixes=(".weight", ".bias")), (gguf_arch, name)


def test_names_of_a_tree_of_no_family_follow_the_generic_rule():
    names = lora.peft.naming(None, [("encoder", "blocks_3", "mlp", "fc_1", "kernel")])
    assert (
        names.arch is None
        and names.tensor_name(("encoder", "blocks_3", "mlp", "fc_1", "kernel")) == "encoder.blocks.3.mlp.fc.1.weight"
    )
    assert names.transposed(("a", "kernel")) and not names.transposed(("a", "bias"))


def test_unknown_family_and_task_are_clear_errors():
    with pytest.raises(ValueError, match=r"unsupported model_type 'mamba'.*'qwen3'"):
        arch_lib.for_model_type("mamba")
    with pytest.raises(TypeError, match="Config of a lora_jax model family"):
        models.build(object())
    with pytest.raises(ValueError, match=r"qwen3 supports tasks \('causal-lm', 'base'\), got 'translation'"):
        arch_lib.for_model_type("qwen3").task("translation")


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: bert.Config(hidden_size=30, num_attention_heads=4),
            "BERT hidden_size 30 must be a multiple of num_attention_heads 4",
        ),
        (
            lambda: whisper.Config(d_model=30, encoder_attention_heads=4),
            "Whisper d_model 30 must be a multiple of encoder_attention_heads 4",
        ),
        (lambda: gpt2.Config(hidden_size=30, num_attention_heads=4), "GPT-2 n_embd 30 must be a multiple of n_head 4"),
        (
            lambda: llama.Config(num_attention_heads=6, num_key_value_heads=4),
            "num_attention_heads 6 must be a multiple of num_key_value_heads 4 (grouped-query attention)",
        ),
        (
            lambda: qwen3_moe.Config(num_attention_heads=6, num_key_value_heads=4),
            "num_attention_heads 6 must be a multiple of num_key_value_heads 4 (grouped-query attention)",
        ),
        (
            lambda: mixtral.Config(num_experts=4, num_experts_per_tok=5),
            "num_experts_per_tok 5 must be in [1, num_local_experts 4]",
        ),
        (
            lambda: qwen3_moe.Config(num_experts=4, num_experts_per_tok=0),
            "num_experts_per_tok 0 must be in [1, num_experts 4]",
        ),
        (
            lambda: qwen3_moe.Config(moe_dispatch="sparse"),
            "moe_dispatch must be one of ('ragged', 'dense'), got 'sparse'",
        ),
        (
            lambda: qwen3.Config(qkv_bias=True).hf_fields(),
            "a Qwen3 config has q/k norms and one attention_bias for q, k, v and o; this Config differs",
        ),
        (
            lambda: qwen3_moe.Config(qk_norm=False).hf_fields(),
            "a Qwen3-MoE config has q/k norms and one attention_bias for q, k, v and o; this Config differs",
        ),
        (lambda: bert.Config(num_labels=2, labels=("a",)), "BERT labels ('a',) must have num_labels=2 entries"),
        (
            lambda: whisper.Config(num_labels=3, labels=("a", "b")),
            "Whisper labels ('a', 'b') must have num_labels=3 entries",
        ),
        (
            lambda: bert.Config.from_hf(transformers.GPT2Config()),
            "bert.Config.from_hf expects a config with model_type in ('bert',), got 'gpt2'",
        ),
        (
            lambda: gpt2.Config.from_hf(transformers.BertConfig()),
            "gpt2.Config.from_hf expects a config with model_type in ('gpt2',), got 'bert'",
        ),
        (
            lambda: llama.Config.from_hf(transformers.BertConfig()),
            "lora_jax.models.llama.Config.from_hf expects a config with model_type in "
            "('llama', 'mistral', 'qwen2'), got 'bert'",
        ),
    ],
)
def test_config_checks_name_the_field_what_was_expected_and_what_came(make, message):
    """The configs' shared checks (lora_jax.models.layers.check_*): the same error type and words for each family."""
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        make()


def test_class_names_of_a_classification_head_map_both_ways():
    from lora_jax.models.layers import id2label, labels_from_hf

    named = transformers.BertConfig(num_labels=3, id2label={0: "neg", 1: "neu", 2: "pos"})
    assert labels_from_hf(named) == (3, ("neg", "neu", "pos"))
    assert labels_from_hf(transformers.BertConfig(num_labels=3)) == (3, None)  # the defaults LABEL_i: no names
    assert id2label(("neg", "neu", "pos"), 3) == {0: "neg", 1: "neu", 2: "pos"}
    assert id2label(None, 2) == {0: "LABEL_0", 1: "LABEL_1"}
    for family in (bert, whisper):
        config = family.Config(num_labels=3, labels=("neg", "neu", "pos"))
        assert family.Config.from_hf(config.to_hf()) == config


# ------------------------------------------------------------------------------------------ the code


def _family_words() -> re.Pattern:
    words = {w for a in arch_lib.families() for w in (a.name, *a.model_types)}
    # llama.cpp / llama-cli are a serving engine, not the Llama family
    return re.compile(rf"\b({'|'.join(sorted(map(re.escape, words)))})\b(?![.-](cpp|cli)\b)", re.IGNORECASE)


@pytest.mark.parametrize(
    "file",
    [
        "lora_jax/peft.py",
        "lora_jax/models/generate.py",
        "lora_jax/models/hf.py",
        *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "train").glob("*.py")),
    ],
)
def test_code_that_works_from_declarations_names_no_family(file):
    hits = [
        (i, line.strip())
        for i, line in enumerate((ROOT / file).read_text().splitlines(), 1)
        if _family_words().search(line)
    ]
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
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                bad.append(f"{file.name}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not bad, bad


# (yaml is not here: flax itself imports it)
TRAIN_ONLY = [
    "datasets",
    "sacrebleu",
    "rouge_score",
    "sklearn",
    "matplotlib",
    "tensorboardX",
    "tqdm",
    "torch",
    "peft",
    "train",
]


def test_the_library_imports_no_training_packages():
    code = (
        "import sys, lora_jax, lora_jax.models, lora_jax.models.hf, lora_jax.models.gguf, lora_jax.peft; "
        "from lora_jax.models import arch; arch.families(); "
        f"print(sorted(m for m in {TRAIN_ONLY!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"},
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_install_metadata_separates_the_training_job():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {re.split(r"[<>=!~\[ ]", d)[0].lower() for d in project["dependencies"]}
    extras = project["optional-dependencies"]
    assert not core & {
        "datasets",
        "sacrebleu",
        "rouge-score",
        "scikit-learn",
        "matplotlib",
        "tensorboardx",
        "pyyaml",
        "tqdm",
        "torch",
        "peft",
    }
    assert {"jax", "flax", "optax", "orbax-checkpoint", "safetensors", "numpy", "google-re2"} <= core
    train = {re.split(r"[<>=!~\[ ]", d)[0].lower() for d in extras["train"]}
    assert {"datasets", "sacrebleu", "rouge-score", "scikit-learn", "matplotlib", "tensorboardx", "pyyaml"} <= train
    for extra in ("test", "bench"):
        assert any(d.replace(" ", "").startswith("lora_jax[train") for d in extras[extra]), extra
    assert (ROOT / "lora_jax" / "py.typed").is_file()
