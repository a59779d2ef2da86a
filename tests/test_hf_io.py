"""Hugging Face folders: save_pretrained -> transformers (PyTorch) round trips, sharded checkpoints, prefixes,
aliases, and the errors for bad checkpoints and offline hub ids."""

import json
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import require

torch = require("torch")
transformers = require("transformers")

import lora_jax as lora  # noqa: E402
from lora_jax.models import (  # noqa: E402
    CheckpointError,
    bert,
    from_hf_weights,
    hf,
    load,
    load_model,
    resolve,  # noqa: E402
    save_pretrained,
    to_hf_weights,
)

TINY = bert.Config(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
    num_labels=3,
    hidden_act="gelu",
)


def inputs(seed=0, batch=2, seq=7):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, TINY.vocab_size, (batch, seq))
    mask = np.ones_like(ids)
    mask[1, seq - 3 :] = 0
    types = np.zeros_like(ids)
    types[:, seq // 2 :] = 1
    return ids, mask, types


def torch_out(model, ids, mask, types):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types))


def random_params(task, seed=0):
    """init_params with O(1) perturbations everywhere (LayerNorms and biases included)."""
    params = bert.init_params(TINY, jax.random.key(seed), task)
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def assert_trees_equal(a, b):
    flat_a, flat_b = dict(lora.targets.leaf_paths(a)), dict(lora.targets.leaf_paths(b))
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k]), err_msg=k)


# --------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    "task, auto", [("base", "AutoModel"), ("sequence-classification", "AutoModelForSequenceClassification")]
)
def test_save_pretrained_loads_in_transformers(tmp_path, task, auto):
    params = random_params(task)
    model = bert.build(TINY, task=task)
    save_pretrained(params, TINY, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [
        {"base": "BertModel", "sequence-classification": "BertForSequenceClassification"}[task]
    ]
    ref_model = getattr(transformers, auto).from_pretrained(tmp_path).eval()
    ids, mask, types = inputs()
    ref = torch_out(ref_model, ids, mask, types)
    ours = model.apply({"params": params}, ids, mask, types)
    if task == "base":
        np.testing.assert_allclose(np.asarray(ours.last_hidden_state), ref.last_hidden_state.numpy(), atol=1e-4)
        np.testing.assert_allclose(np.asarray(ours.pooler_output), ref.pooler_output.numpy(), atol=1e-4)
    else:
        np.testing.assert_allclose(np.asarray(ours), ref.logits.numpy(), atol=1e-4)
    # and back: the folder loads here to the very same parameters
    _, again, _, config = load(tmp_path, task=task)
    assert config == TINY
    assert_trees_equal(again, params)


def test_merged_lora_model_saves_and_wrapped_does_not(tmp_path):
    params = random_params("sequence-classification")
    adapters = lora.init(params, r=2, targets="qv")
    with pytest.raises(ValueError, match="merge"):
        save_pretrained(lora.wrap(params, adapters), TINY, tmp_path)
    save_pretrained(lora.merge(params, adapters), TINY, tmp_path)
    assert (tmp_path / "model.safetensors").is_file()


def test_minilm_round_trip_with_tokenizer(tmp_path, minilm_path):
    model, params, tokenizer, config = load(minilm_path)
    save_pretrained(params, config, tmp_path, tokenizer=tokenizer)
    text = ["A man is playing a guitar.", "Completely different words here"]
    tok2 = transformers.AutoTokenizer.from_pretrained(tmp_path)
    enc = tokenizer(text, padding=True, return_tensors="np")
    assert (tok2(text, padding=True, return_tensors="np")["input_ids"] == enc["input_ids"]).all()
    ref_orig = torch_out(
        transformers.AutoModel.from_pretrained(minilm_path).eval(),
        enc["input_ids"],
        enc["attention_mask"],
        enc["token_type_ids"],
    )
    ref_saved = torch_out(
        transformers.AutoModel.from_pretrained(tmp_path).eval(),
        enc["input_ids"],
        enc["attention_mask"],
        enc["token_type_ids"],
    )
    np.testing.assert_array_equal(ref_saved.last_hidden_state.numpy(), ref_orig.last_hidden_state.numpy())
    # original checkpoint and our re-save hold the same tensors (bar the position_ids buffer)
    orig = load_file(minilm_path / "model.safetensors")
    saved = load_file(tmp_path / "model.safetensors")
    assert set(orig) - set(saved) == {"embeddings.position_ids"}
    for k in saved:
        np.testing.assert_array_equal(saved[k], orig[k], err_msg=k)


def test_sharded_checkpoint(tmp_path):
    params = random_params("sequence-classification", seed=3)
    save_pretrained(params, TINY, tmp_path, max_shard_size="8KB")
    index = json.loads((tmp_path / hf.INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / hf.WEIGHTS_NAME).exists()
    assert all((tmp_path / s).is_file() for s in shards)
    loaded = load_model(tmp_path)
    assert loaded.source.endswith(hf.INDEX_NAME) and loaded.new_params == []
    assert_trees_equal(loaded.params, params)
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    ids, mask, types = inputs(1)
    np.testing.assert_allclose(
        np.asarray(loaded.model.apply({"params": loaded.params}, ids, mask, types)),
        torch_out(ref, ids, mask, types).logits.numpy(),
        atol=1e-4,
    )
    # re-saving unsharded removes the shards, so nothing stale shadows the new file
    save_pretrained(params, TINY, tmp_path)
    assert not (tmp_path / hf.INDEX_NAME).exists() and not list(tmp_path.glob("model-*-of-*.safetensors"))


def test_bfloat16_params_save_as_bf16(tmp_path):
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), random_params("base"))
    save_pretrained(params, TINY, tmp_path)
    ref = transformers.AutoModel.from_pretrained(tmp_path)
    assert ref.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    _, again, _, _ = load(tmp_path, dtype=jnp.bfloat16)
    assert_trees_equal(again, params)


def test_prefixed_checkpoint_loads_as_base_model(tmp_path, caplog):
    params = random_params("sequence-classification", seed=4)
    save_pretrained(params, TINY, tmp_path)
    assert "bert.encoder.layer.0.attention.self.query.weight" in load_file(tmp_path / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="lora_jax.models"):
        model, base, _, _ = load(tmp_path, task="base")
    assert "classifier.weight" in caplog.text  # reported as unused
    assert isinstance(model, bert.BertModel)
    assert_trees_equal(base, params["bert"])


def test_checkpoint_without_pooler_loads_without_one(tmp_path):
    params = random_params("base")
    tensors = to_hf_weights(params, TINY)
    save_file(
        {k: v for k, v in tensors.items() if not k.startswith("pooler.")},
        str(tmp_path / "model.safetensors"),
        metadata={"format": "pt"},
    )
    TINY.to_hf().save_pretrained(tmp_path)
    model, loaded, _, config = load(tmp_path)
    assert not config.pooler and "pooler" not in loaded
    out = model.apply({"params": loaded}, *inputs()[:2])
    assert out.pooler_output is None and out.last_hidden_state.shape == (2, 7, 32)


def test_weight_conversion_inverts_on_a_plain_dict():
    """from_hf_weights takes any Mapping of HF names (here a dict), and to_hf_weights inverts it."""
    params = random_params("sequence-classification", seed=5)
    tensors = to_hf_weights(params, TINY)
    assert tensors["classifier.weight"].shape == (3, 32)  # nn.Linear layout (out, in)
    assert tensors["bert.encoder.layer.1.intermediate.dense.weight"].shape == (37, 32)
    assert_trees_equal(from_hf_weights(TINY, tensors, "a dict"), params)


# --------------------------------------------------------------------------------------------------- errors


@pytest.fixture
def saved(tmp_path):
    """A tiny base checkpoint folder and its tensors."""
    params = random_params("base")
    save_pretrained(params, TINY, tmp_path)
    return tmp_path, load_file(tmp_path / "model.safetensors")


def _rewrite(folder, tensors):
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor_names_tensor_and_file(saved):
    folder, tensors = saved
    del tensors["encoder.layer.1.attention.self.value.weight"]
    _rewrite(folder, tensors)
    with pytest.raises(CheckpointError, match=r"encoder\.layer\.1\.attention\.self\.value\.weight") as e:
        load(folder)
    assert str(folder / "model.safetensors") in str(e.value)


def test_wrong_shape_names_tensor_shapes_and_file(saved):
    folder, tensors = saved
    tensors["encoder.layer.0.intermediate.dense.weight"] = np.zeros((36, 32), np.float32)
    _rewrite(folder, tensors)
    with pytest.raises(CheckpointError, match=r"intermediate\.dense\.weight.*\(36, 32\).*\(37, 32\)") as e:
        load(folder)
    assert str(folder / "model.safetensors") in str(e.value)


def test_extra_backbone_layer_is_an_error(saved):
    folder, tensors = saved
    tensors["encoder.layer.2.output.dense.bias"] = np.zeros(32, np.float32)
    _rewrite(folder, tensors)
    with pytest.raises(CheckpointError, match=r"encoder\.layer\.2\.output\.dense\.bias"):
        load(folder)


def test_truncated_safetensors_names_the_file(saved):
    folder, _ = saved
    file = folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as e:
        load(folder)
    assert str(file) in str(e.value)


def test_index_with_missing_shard(tmp_path):
    save_pretrained(random_params("base"), TINY, tmp_path, max_shard_size="8KB")
    victim = sorted(tmp_path.glob("model-*-of-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load(tmp_path)


@pytest.mark.parametrize(
    "model_type, error, match",
    [
        ("t5", ValueError, r"unsupported model_type 't5'.*bert"),
        ("no-such-architecture", CheckpointError, r"config\.json.*no-such-architecture"),
    ],
)
def test_unsupported_model_type(saved, model_type, error, match):
    folder, _ = saved
    config = json.loads((folder / "config.json").read_text())
    if model_type == "t5":
        transformers.T5Config().save_pretrained(folder)
    else:
        (folder / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    with pytest.raises(error, match=match):
        load(folder)


def test_folder_without_safetensors(saved):
    folder, _ = saved
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"no model\.safetensors.*pytorch_model\.bin"):
        load(folder)


def test_offline_hub_id_says_so_and_suggests_a_local_path():
    with pytest.raises(OSError, match=r"could not fetch 'lora-jax-tests/not-a-real-model'.*local path"):
        load("lora-jax-tests/not-a-real-model")


def test_missing_local_path():
    with pytest.raises(FileNotFoundError, match="no such model"):
        load("./no/such/folder")


def test_offline_aliases(minilm_path, smollm2_gguf_path):
    assert resolve("sentence-transformers/all-MiniLM-L6-v2") == minilm_path
    assert resolve("all-MiniLM-L6-v2") == minilm_path
    assert resolve("SmolLM2-135M-Instruct-Q4_1") == smollm2_gguf_path


def test_lazy_weights_read_on_demand(saved):
    folder, tensors = saved
    weights = hf.open_weights(folder)
    assert set(weights) == set(tensors) and len(weights) == len(tensors)
    name = "encoder.layer.0.attention.self.query.weight"
    assert weights.shape(name) == (32, 32) and weights.source_of(name) == str(folder / "model.safetensors")
    np.testing.assert_array_equal(weights[name], tensors[name])
    with pytest.raises(KeyError):
        weights["nope"]


def test_parse_size():
    assert hf.parse_size(123) == 123
    assert hf.parse_size("5GB") == 5 * 10**9
    assert hf.parse_size("10KiB") == 10 * 1024
    with pytest.raises(ValueError, match="max_shard_size"):
        hf.parse_size("lots")


def test_copied_minilm_folder_loads_like_the_original(tmp_path, minilm_path):
    """A plain copy of a Hugging Face folder (as a user would have after a download) loads by path."""
    for f in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        "special_tokens_map.json",
    ):
        shutil.copy(minilm_path / f, tmp_path / f)
    _, params, tokenizer, _ = load(str(tmp_path))
    assert tokenizer is not None and tokenizer("hello")["input_ids"][0] == tokenizer.cls_token_id
    assert params["encoder"]["layer_5"]["output"]["dense"]["kernel"].shape == (1536, 384)
