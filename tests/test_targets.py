"""Which kernels the presets select on the trees people have: Flax Linen modules with their auto-names, indexed
block names, ``nnx`` state, Hugging Face naming and this project's models. Each test builds the real tree and
asserts the exact selection of the default preset ("attention"), of "qv" and of "all-linear": attention kernels
in, MLP kernels, heads and embeddings out."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

import lora_jax as lora
from lora_jax.errors import TargetError

D, HEADS = 16, 2


def selected(params, targets=None) -> list[str]:
    """The kernel paths ``lora.init(params, r=...)`` adapts (r=2: the tiny kernels here have 16 columns)."""
    return [p for p, _ in lora.adapter_items(lora.init(params, r=2, targets=targets))]


def qkvo(prefix: str) -> list[str]:
    return [f"{prefix}/{n}/kernel" for n in ("key", "out", "query", "value")]


def linen_params(module: nn.Module, ids=True) -> dict:
    x = jnp.zeros((1, 4), jnp.int32) if ids else jnp.zeros((1, 4, D))
    return module.init(jax.random.key(0), x)["params"]


# ------------------------------------------------------------------------------------------- Flax Linen


class LinenTransformer(nn.Module):
    """Flax's own attention modules, unnamed (Linen names them ``ClassName_N``), an MLP and a head."""

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(50, D)(ids)
        x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS)(x)
        x = x + nn.SelfAttention(num_heads=HEADS)(x)
        x = x + nn.Dense(D)(nn.gelu(nn.Dense(2 * D)(x)))
        return nn.Dense(3, name="head")(x)


def test_linen_multi_head_dot_product_attention_auto_names():
    params = linen_params(LinenTransformer())
    assert {"Embed_0", "MultiHeadDotProductAttention_0", "SelfAttention_0", "Dense_0", "Dense_1", "head"} == set(params)
    attn = qkvo("MultiHeadDotProductAttention_0") + qkvo("SelfAttention_0")
    assert selected(params) == attn
    assert selected(params, "attention") == attn
    assert selected(params, "qv") == [
        "MultiHeadDotProductAttention_0/query/kernel",
        "MultiHeadDotProductAttention_0/value/kernel",
        "SelfAttention_0/query/kernel",
        "SelfAttention_0/value/kernel",
    ]
    assert selected(params, "all-linear") == ["Dense_0/kernel", "Dense_1/kernel"] + attn  # no head, no Embed_0


class Attention(nn.Module):
    """A user's own attention class: Linen auto-names its instances ``Attention_0``, ``Attention_1``, ..."""

    @nn.compact
    def __call__(self, x):
        q, k, v = (nn.Dense(D, name=n)(x) for n in ("q", "k", "v"))
        w = jax.nn.softmax(q @ k.swapaxes(-1, -2), axis=-1)
        return nn.Dense(D, name="o")(w @ v)


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(D, name="fc2")(nn.gelu(nn.Dense(2 * D, name="fc1")(x)))


class AutoNamedBlocks(nn.Module):
    @nn.compact
    def __call__(self, x):
        for _ in range(4):
            x = x + Attention()(x)
            x = x + Mlp()(x)
        return x


def test_linen_user_attention_class_auto_names():
    params = linen_params(AutoNamedBlocks(), ids=False)
    attn = [f"Attention_{i}/{n}/kernel" for i in range(4) for n in ("k", "o", "q", "v")]
    assert selected(params) == attn
    assert selected(params, "qv") == [f"Attention_{i}/{n}/kernel" for i in range(4) for n in ("q", "v")]
    assert selected(params, "all-linear") == attn + [f"Mlp_{i}/{n}/kernel" for i in range(4) for n in ("fc1", "fc2")]


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attn")(x)
        return x + Mlp(name="mlp")(x)


class IndexedBlocks(nn.Module):
    """Blocks named with an index: ``attention_0``, ``attention_1`` directly, and ``layers_2/attn``."""

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(50, D, name="embed")(ids)
        for i in range(2):
            x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, name=f"attention_{i}")(x)
            x = x + Mlp(name=f"mlp_{i}")(x)
        x = Block(name="layers_2")(x)
        return nn.Dense(50, name="lm_head")(x)


def test_indexed_block_names():
    params = linen_params(IndexedBlocks())
    attn = qkvo("attention_0") + qkvo("attention_1") + qkvo("layers_2/attn")
    assert selected(params) == attn
    assert selected(params, "qv") == [p for p in attn if p.endswith(("query/kernel", "value/kernel"))]
    mlp = ["mlp_0/fc1/kernel", "mlp_0/fc2/kernel", "mlp_1/fc1/kernel", "mlp_1/fc2/kernel"]
    assert selected(params, "all-linear") == attn + ["layers_2/mlp/fc1/kernel", "layers_2/mlp/fc2/kernel"] + mlp


def test_linen_attention_runs_factored_and_merges():
    """The card's first line on Flax's own module: default targets, ``lora.transform`` of the Linen apply, the
    factored output equals the merged model's, and no kernel had to be materialised."""
    model = LinenTransformer()
    params = linen_params(model)
    ads = lora.init(params, r=2, key=jax.random.key(1))
    ads = jax.tree.map(lambda a: dataclasses.replace(a, b=0.1 * jnp.ones_like(a.b)), ads, is_leaf=lora.is_adapter)
    ids = jnp.arange(8).reshape(2, 4)
    apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    base = apply(params, ids)
    merged = apply(lora.merge(params, ads), ids)
    factored = lora.transform(apply)(lora.wrap(params, ads), ids)
    assert float(jnp.max(jnp.abs(merged - base))) > 1e-3  # the adapters change the model
    np.testing.assert_allclose(factored, merged, atol=1e-5, rtol=1e-5)
    report = lora.transform_report(apply, lora.wrap(params, ads), ids)
    assert len(report.weights) == 8 and report.n_factored == 8 and report.n_materialized == 0, str(report)


# ------------------------------------------------------------------------------------------------- NNX


def test_nnx_multi_head_attention_state():
    mha = nnx.MultiHeadAttention(num_heads=HEADS, in_features=D, decode=False, rngs=nnx.Rngs(0))
    _, state = nnx.split(mha)
    assert selected(state) == ["key/kernel", "out/kernel", "query/kernel", "value/kernel"]
    assert selected(state, "qv") == ["query/kernel", "value/kernel"]
    assert selected(state, "all-linear") == ["key/kernel", "out/kernel", "query/kernel", "value/kernel"]


class NnxModel(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(50, D, rngs=rngs)
        self.blocks = nnx.List(
            [nnx.MultiHeadAttention(num_heads=HEADS, in_features=D, decode=False, rngs=rngs) for _ in range(2)]
        )
        self.up, self.down = nnx.Linear(D, 2 * D, rngs=rngs), nnx.Linear(2 * D, D, rngs=rngs)
        self.head = nnx.Linear(D, 3, rngs=rngs)


def test_nnx_model_with_attention_list():
    _, state = nnx.split(NnxModel(nnx.Rngs(0)))
    attn = [f"blocks/{i}/{n}/kernel" for i in range(2) for n in ("key", "out", "query", "value")]
    assert selected(state) == attn
    assert selected(state, "qv") == [p for p in attn if p.endswith(("query/kernel", "value/kernel"))]
    assert selected(state, "all-linear") == attn + ["down/kernel", "up/kernel"]


# ------------------------------------------------------------------------------------ Hugging Face names


def _tree(paths: dict[str, tuple[int, ...]]) -> dict:
    tree: dict = {}
    for path, shape in paths.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.ones(shape)
    return tree


HF_TREES = {
    "llama": (
        {
            "model/embed_tokens/weight": (50, D),
            "lm_head/weight": (50, D),
            "model/norm/weight": (D,),
            **{f"model/layers/0/self_attn/{n}/weight": (D, D) for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
            **{f"model/layers/0/mlp/{n}/weight": (D, D) for n in ("gate_proj", "up_proj", "down_proj")},
        },
        ["q_proj", "k_proj", "v_proj", "o_proj"],
        ["q_proj", "v_proj"],
    ),
    "bert": (
        {
            "bert/embeddings/word_embeddings/weight": (50, D),
            "classifier/weight": (3, D),
            **{f"bert/encoder/layer/0/attention/self/{n}/weight": (D, D) for n in ("query", "key", "value")},
            "bert/encoder/layer/0/attention/output/dense/weight": (D, D),
            "bert/encoder/layer/0/intermediate/dense/weight": (D, D),
            "bert/encoder/layer/0/output/dense/weight": (D, D),
        },
        ["self/query", "self/key", "self/value", "output/dense"],
        ["self/query", "self/value"],
    ),
    "gpt2": (
        {
            "transformer/wte/weight": (50, D),
            "transformer/wpe/weight": (8, D),
            "transformer/h/0/attn/c_attn/weight": (D, 3 * D),
            "transformer/h/0/attn/c_proj/weight": (D, D),
            "transformer/h/0/mlp/c_fc/weight": (D, D),
            "transformer/h/0/mlp/c_proj/weight": (D, D),
        },
        ["c_attn", "c_proj"],
        ["c_attn"],
    ),
}


@pytest.mark.parametrize("arch", list(HF_TREES))
def test_hugging_face_names(arch):
    shapes, attention, qv = HF_TREES[arch]
    params = _tree(shapes)
    block = {
        "llama": "model/layers/0/self_attn",
        "bert": "bert/encoder/layer/0/attention",
        "gpt2": "transformer/h/0/attn",
    }[arch]
    assert set(selected(params)) == {f"{block}/{n}/weight" for n in attention}
    assert set(selected(params, "qv")) == {f"{block}/{n}/weight" for n in qv}
    kernels = {
        p
        for p, s in shapes.items()
        if len(s) == 2
        and "embed" not in p
        and "wte" not in p
        and "wpe" not in p
        and not p.startswith(("lm_head", "classifier"))
    }
    assert set(selected(params, "all-linear")) == kernels


# --------------------------------------------------------------------------------- this project's models


def _project_params(arch: str):
    from lora_jax.models import bert, gpt2, llama

    module, hf = {
        "llama": (
            llama,
            transformers.LlamaConfig(
                vocab_size=64,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=1,
                num_attention_heads=4,
                num_key_value_heads=2,
            ),
        ),
        "bert": (
            bert,
            transformers.BertConfig(
                vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48
            ),
        ),
        "gpt2": (
            gpt2,
            transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, bos_token_id=0, eos_token_id=0),
        ),
    }[arch]
    return module.init_params(module.Config.from_hf(hf), jax.random.key(0))


PROJECT = {
    "llama": (  # built scanned by default: one stack, model/layers, holding the layer
        "model/layers/self_attn",
        ["k_proj", "o_proj", "q_proj", "v_proj"],
        ["q_proj", "v_proj"],
        [
            "model/layers/mlp/down_proj/kernel",
            "model/layers/mlp/gate_proj/kernel",
            "model/layers/mlp/up_proj/kernel",
        ],
    ),
    "bert": (
        "encoder/layer_0/attention",
        ["output/dense", "self/key", "self/query", "self/value"],
        ["self/query", "self/value"],
        ["encoder/layer_0/intermediate/dense/kernel", "encoder/layer_0/output/dense/kernel", "pooler/dense/kernel"],
    ),
    "gpt2": (
        "transformer/h_0/attn",
        ["c_attn", "c_proj"],
        ["c_attn"],
        ["transformer/h_0/mlp/c_fc/kernel", "transformer/h_0/mlp/c_proj/kernel"],
    ),
}


@pytest.mark.parametrize("arch", list(PROJECT))
def test_project_models(arch):
    params = _project_params(arch)
    block, attention, qv, rest = PROJECT[arch]
    attn = [f"{block}/{n}/kernel" for n in attention]
    assert selected(params) == attn
    assert selected(params, "qv") == [f"{block}/{n}/kernel" for n in qv]
    assert sorted(selected(params, "all-linear")) == sorted(attn + rest)  # never lm_head or an embedding


# --------------------------------------------------------------------------------------------- misses


def test_preset_that_matches_nothing_is_an_error_listing_candidates():
    params = linen_params(Mlp(), ids=False)
    with pytest.raises(TargetError, match="preset 'attention' matches no kernel") as e:
        lora.init(params, r=2)
    assert "fc1/kernel" in str(e.value) and "fc2/kernel" in str(e.value)
    with pytest.raises(TargetError, match="preset 'qv' matches no kernel"):
        lora.init(params, r=2, targets="qv")


def test_query_and_value_alone_are_not_an_attention_block():
    """Content alone marks a block only with a whole q, k, v triple: ``query`` + ``value`` + ``out`` next to an
    MLP could be anything, so the default preset does not guess."""
    params = _tree({"layer/query/kernel": (D, D), "layer/value/kernel": (D, D), "layer/out/kernel": (D, D)})
    with pytest.raises(TargetError, match="matches no kernel"):
        lora.init(params, r=2)
    params = _tree(
        {
            "layer/query/kernel": (D, D),
            "layer/key/kernel": (D, D),
            "layer/value/kernel": (D, D),
            "layer/out/kernel": (D, D),
            "layer/mlp/kernel": (D, D),
        }
    )
    assert selected(params) == ["layer/key/kernel", "layer/out/kernel", "layer/query/kernel", "layer/value/kernel"]
