"""BERT: parity with transformers' PyTorch BERT (tiny random and the real all-MiniLM-L6-v2), sentence
embeddings, LoRA on BERT (targets, merged == factored, a short fine-tune)."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import require

torch = require("torch")
transformers = require("transformers")

import lora_jax as lora  # noqa: E402
from lora_jax.models import CheckpointError, bert, load, load_model  # noqa: E402

TOL = 1e-4


def _randomize(module: "torch.nn.Module", seed: int) -> None:
    """Give every weight a random O(1)-scale value, so that parity is not hidden by near-zero init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 0.5 if p.ndim == 2 else 0.2
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if name.endswith("LayerNorm.weight") else 0.0))


def tiny_hf_config(**kw) -> "transformers.BertConfig":
    base = dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        type_vocab_size=2,
        num_labels=3,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    return transformers.BertConfig(**{**base, **kw})


def inputs(batch=3, seq=9, vocab=99, seed=0):
    """ids, a padding mask with different lengths per row, and mixed token types."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (batch, seq))
    lengths = np.linspace(seq, seq // 2, batch).astype(int)
    mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int64)
    types = (np.arange(seq)[None] >= (lengths[:, None] // 2)).astype(np.int64) * mask
    return ids * mask, mask, types


def torch_forward(model, ids, mask, types):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random transformers BertForSequenceClassification saved with save_pretrained (``bert.`` prefix), and
    its BertModel saved on its own (no prefix)."""
    torch.manual_seed(0)
    cls = transformers.BertForSequenceClassification(tiny_hf_config()).eval()
    _randomize(cls, 0)
    cls_dir, base_dir = tmp_path_factory.mktemp("tiny_cls"), tmp_path_factory.mktemp("tiny_base")
    cls.save_pretrained(cls_dir)
    cls.bert.save_pretrained(base_dir)
    return cls, cls_dir, base_dir


# ----------------------------------------------------------------------------------------------- parity


def test_base_parity_with_masks_and_token_types(tiny):
    cls, _, base_dir = tiny
    model, params, _, config = load(base_dir)
    assert isinstance(model, bert.BertModel) and config.num_hidden_layers == 2
    ids, mask, types = inputs()
    ref = torch_forward(cls.bert, ids, mask, types)
    out = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
    np.testing.assert_allclose(np.asarray(out.last_hidden_state), ref.last_hidden_state.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(out.pooler_output), ref.pooler_output.numpy(), atol=TOL, rtol=0)
    # the masks and token types matter (otherwise the check above would not test them)
    plain = model.apply({"params": params}, jnp.asarray(ids))
    assert np.abs(np.asarray(plain.last_hidden_state) - ref.last_hidden_state.numpy()).max() > 1e-2


def test_sequence_classification_parity(tiny):
    cls, cls_dir, _ = tiny
    model, params, _, config = load(cls_dir)  # task inferred from the checkpoint's classifier
    assert isinstance(model, bert.BertForSequenceClassification) and config.num_labels == 3
    ids, mask, types = inputs(seed=1)
    logits = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
    np.testing.assert_allclose(
        np.asarray(logits), torch_forward(cls, ids, mask, types).logits.numpy(), atol=TOL, rtol=0
    )


def test_bfloat16_compute_stays_close(tiny):
    _, cls_dir, _ = tiny
    ids, mask, types = inputs(seed=2)
    m32, p32, _, _ = load(cls_dir)
    m16, p16, _, _ = load(cls_dir, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree_util.tree_leaves(p16)} == {jnp.dtype(jnp.bfloat16)}
    y32 = m32.apply({"params": p32}, ids, mask, types)
    y16 = m16.apply({"params": p16}, ids, mask, types)
    assert y16.dtype == jnp.bfloat16
    assert np.abs(np.asarray(y16, np.float32) - np.asarray(y32)).max() < 0.1 * np.abs(np.asarray(y32)).max()


@pytest.mark.slow  # long; the default suite keeps a cheaper test of the same path
def test_dropout_only_when_not_deterministic(tiny):
    _, cls_dir, _ = tiny
    model, params, _, _ = load(cls_dir)
    ids, mask, types = inputs()
    ref = model.apply({"params": params}, ids, mask, types)
    key = jax.random.key(3)
    a = model.apply({"params": params}, ids, mask, types, deterministic=False, rngs={"dropout": key})
    b = model.apply({"params": params}, ids, mask, types, deterministic=False, rngs={"dropout": key})
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(a) - np.asarray(ref)).max() > 1e-3


def test_new_classification_head_on_a_base_checkpoint(tiny, caplog):
    _, _, base_dir = tiny
    with caplog.at_level(logging.WARNING, logger="lora_jax.models"):
        loaded = load_model(base_dir, task="sequence-classification")
    assert loaded.new_params == ["classifier/bias", "classifier/kernel"]
    assert "initialised new parameters" in caplog.text and "classifier" in caplog.text
    _, base_params, _, _ = load(base_dir)
    chex_equal = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), loaded.params["bert"], base_params)
    assert all(jax.tree_util.tree_leaves(chex_equal))
    logits = loaded.model.apply({"params": loaded.params}, *inputs()[:2])
    assert logits.shape == (3, 3)
    # a head of another size for a new task; an existing head of the wrong size is an error
    model, params, _, config = load(base_dir, task="sequence-classification", num_labels=5)
    assert config.num_labels == 5 and params["classifier"]["kernel"].shape == (32, 5)
    with pytest.raises(CheckpointError, match=r"classifier\.(weight|bias).* \(3,.*num_labels=5"):
        load(tiny[1], num_labels=5)
    with pytest.raises(TypeError, match="no field.*num_lables"):
        load(base_dir, num_lables=5)


def test_sentence_embedding_helpers():
    hidden = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)
    mask = jnp.array([[1, 1, 0], [1, 0, 0]])
    np.testing.assert_allclose(bert.mean_pooling(hidden, mask), np.stack([hidden[0, :2].mean(0), hidden[1, 0]]))
    e = bert.sentence_embedding(hidden, mask)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(e), axis=-1), 1.0, rtol=1e-6)


def test_config_rejects_what_it_does_not_implement():
    with pytest.raises(ValueError, match="decoder"):
        bert.Config.from_hf(tiny_hf_config(is_decoder=True))
    with pytest.raises(ValueError, match="hidden_act 'quick_gelu'"):
        bert.Config.from_hf(tiny_hf_config(hidden_act="quick_gelu"))
    with pytest.raises(ValueError, match="model_type"):
        bert.Config.from_hf(transformers.GPT2Config())
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        bert.Config(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="tasks"):
        bert.build(bert.Config(), task="causal-lm")
    c = bert.Config.from_hf(tiny_hf_config(id2label={0: "neg", 1: "neu", 2: "pos"}))
    assert c.labels == ("neg", "neu", "pos") and c.to_hf().id2label[2] == "pos"


# ------------------------------------------------------------------------------------ real all-MiniLM-L6-v2

PARAPHRASE = ("A man is playing a guitar.", "A person plays the guitar.")
UNRELATED = "The central bank raised interest rates by half a percentage point."


@pytest.fixture(scope="module")
def minilm(minilm_path):
    model, params, tokenizer, config = load("sentence-transformers/all-MiniLM-L6-v2")
    return model, params, tokenizer, config, minilm_path


def test_minilm_hidden_states_match_transformers(minilm):
    model, params, tokenizer, config, path = minilm
    assert (config.hidden_size, config.num_hidden_layers) == (384, 6)
    enc = tokenizer([*PARAPHRASE, UNRELATED], padding=True, return_tensors="np")
    ref_model = transformers.AutoModel.from_pretrained(path).eval()
    ref = torch_forward(ref_model, enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    out = jax.jit(model.apply)({"params": params}, enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    err = np.abs(np.asarray(out.last_hidden_state) - ref.last_hidden_state.numpy()).max()
    assert err < TOL, err

    # sentence-transformers' recipe for this model: mean over the mask, then L2 normalise
    emb = np.asarray(bert.sentence_embedding(out.last_hidden_state, enc["attention_mask"]))
    m = enc["attention_mask"][..., None]
    ref_emb = (ref.last_hidden_state.numpy() * m).sum(1) / m.sum(1)
    ref_emb /= np.linalg.norm(ref_emb, axis=-1, keepdims=True)
    np.testing.assert_allclose(emb, ref_emb, atol=1e-5)
    cos = emb @ emb.T
    assert 0.6 < cos[0, 1] < 0.95, cos  # measured 0.85
    assert abs(cos[0, 2]) < 0.2 and abs(cos[1, 2]) < 0.2, cos


def test_minilm_qv_targets(minilm):
    _, params, *_ = minilm
    adapters = lora.init(params, r=4, targets="qv")
    expected = {f"encoder/layer_{i}/attention/self/{m}/kernel" for i in range(6) for m in ("query", "value")}
    assert {p for p, _ in lora.adapter_items(adapters)} == expected


# ----------------------------------------------------------------------------------------- LoRA on BERT


def _random_b(adapters, key, scale=0.3):
    items = lora.adapter_items(adapters)
    keys = dict(zip([p for p, _ in items], jax.random.split(key, len(items))))

    def fill(path, ad):
        b = scale * jax.random.normal(keys["/".join(lora.targets.path_tuple(path))], ad.b.shape)
        return lora.LoraAdapter(
            ad.a, b, alpha=ad.alpha, scale=ad.scale, in_shape=ad.in_shape, out_shape=ad.out_shape, dropout=ad.dropout
        )

    return jax.tree_util.tree_map_with_path(fill, adapters, is_leaf=lora.is_adapter)


def test_lora_qv_merged_equals_factored(tiny):
    _, cls_dir, _ = tiny
    model, params, _, config = load(cls_dir)
    adapters = lora.init(params, r=4, targets="qv", key=jax.random.key(1))
    expected = {
        f"bert/encoder/layer_{i}/attention/self/{m}/kernel"
        for i in range(config.num_hidden_layers)
        for m in ("query", "value")
    }
    assert {p for p, _ in lora.adapter_items(adapters)} == expected
    adapters = _random_b(adapters, jax.random.key(2))
    ids, mask, types = inputs()
    base = model.apply({"params": params}, ids, mask, types)
    factored = model.apply({"params": lora.wrap(params, adapters)}, ids, mask, types)
    merged = model.apply({"params": lora.merge(params, adapters)}, ids, mask, types)
    np.testing.assert_allclose(np.asarray(factored), np.asarray(merged), atol=1e-5, rtol=0)
    assert np.abs(np.asarray(factored) - np.asarray(base)).max() > 1e-2  # the adapters do something


def test_lora_fine_tune_lowers_the_loss(tmp_path):
    """A tiny task (does token 7 occur?) learnt through rank-4 adapters on query/value plus a fully trained new
    classifier, from a base checkpoint (HF's own init, N(0, 0.1))."""
    torch.manual_seed(0)
    transformers.BertModel(tiny_hf_config(initializer_range=0.1, num_labels=2)).save_pretrained(tmp_path)
    loaded = load_model(tmp_path, task="sequence-classification")
    assert loaded.new_params == ["classifier/bias", "classifier/kernel"]
    model, params = loaded.model, loaded.params
    rng = np.random.default_rng(0)
    ids = rng.integers(8, 99, (32, 12))
    labels = rng.integers(0, 2, 32)
    ids[labels == 1, rng.integers(1, 12, int(labels.sum()))] = 7
    mask = np.ones_like(ids)

    adapters = lora.init(params, r=4, targets="qv", key=jax.random.key(0))
    frozen, trainable = lora.split(params, adapters, train="classifier/.*")
    assert set(trainable["params"]) == {"classifier"}

    def loss_fn(trainable, key):
        p, ad = lora.combine(frozen, trainable)
        logits = model.apply({"params": lora.wrap(p, ad)}, ids, mask, deterministic=False, rngs={"dropout": key})
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    tx = optax.adam(3e-2)
    state = tx.init(trainable)

    @jax.jit
    def step(trainable, state, key):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, key)
        updates, state = tx.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state, loss

    losses = []
    for i in range(30):
        trainable, state, loss = step(trainable, state, jax.random.key(i))
        losses.append(float(loss))
    # from chance (ln 2 = 0.69) to well below it: the task is learnt, not only the label prior (measured 0.67 -> 0.03)
    assert losses[0] > 0.6 and np.mean(losses[-3:]) < 0.3, losses
    trained_ad = trainable["adapters"]
    b_norm = sum(float(jnp.abs(ad.b).sum()) for _, ad in lora.adapter_items(trained_ad))
    assert b_norm > 0  # the adapters were trained, not only the head
