"""Many adapters: the named registry, weighted combinations (checked against dense sums and against PEFT's
add_weighted_adapter), and mixed-adapter batches (each row equals that row run alone with its adapter, and
equals PEFT's ``adapter_names=`` forward on the same torch model; hot-swapping does not recompile)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lora
from lora_jax import multi, ops
from lora_jax.models import bert, llama

V, S = 64, 8
LLAMA = llama.Config(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    scan_layers=False,  # several adapters at once (registry, combinations, mixed batches) need the layers apart
)


def spread(params):
    """Base weights with N(0, 0.2) scale, so that logits differ visibly between adapters."""
    return jax.tree_util.tree_map(lambda x: x * 10.0 if x.ndim == 2 else x, params)


@pytest.fixture(scope="module")
def tiny_llama():
    params = spread(jax.jit(llama.init_params, static_argnums=0)(LLAMA, jax.random.key(0)))
    return llama.build(LLAMA), params


def nonzero(adapters, seed: int, std: float = 0.3):
    """``adapters`` with random A and non-zero random B (numpy draws: fast on a busy CPU)."""
    rng = np.random.RandomState(seed)
    return jax.tree_util.tree_map(
        lambda ad: dataclasses.replace(
            ad,
            a=jnp.asarray(rng.uniform(-1, 1, ad.a.shape) / np.sqrt(ad.a.shape[0]), jnp.float32),
            b=jnp.asarray(std * rng.standard_normal(ad.b.shape), jnp.float32),
        ),
        adapters,
        is_leaf=lora.is_adapter,
    )


def make_adapters(params, ranks, targets="all-linear", seed=10):
    """One adapter tree per rank (alphas differ too), all with random non-zero factors. lora.init runs once
    for the layout; the factors of each rank are drawn with numpy."""
    template = lora.init(params, r=1, targets=targets)
    out = []
    for i, r in enumerate(ranks):
        rng = np.random.RandomState(seed + i)
        alpha = 2.0 * r + i

        def draw(ad):
            d_in, d_out = ad.a.shape[0], ad.b.shape[1]
            return dataclasses.replace(
                ad,
                a=jnp.asarray(rng.uniform(-1, 1, (d_in, r)) / np.sqrt(d_in), jnp.float32),
                b=jnp.asarray(0.3 * rng.standard_normal((r, d_out)), jnp.float32),
                alpha=alpha,
                scale=alpha / r,
            )

        out.append(jax.tree_util.tree_map(draw, template, is_leaf=lora.is_adapter))
    return out


def dense_delta(adapters):
    return {p: np.asarray(ad.delta()) for p, ad in lora.adapter_items(adapters)}


# -------------------------------------------------------------------------------------------- registry


def test_registry_edits_are_immutable_and_checked(tiny_llama):
    _, params = tiny_llama
    a, b = make_adapters(params, [2, 4])
    empty = multi.AdapterSet()
    s = empty.add("a", a).add("b", b, activate=True)
    assert empty.names == () and s.names == ("a", "b") and s.active == "b" and s.current is b
    assert s.activate("a").current is a and s.active == "b"
    assert s.disable().current is None and s.disable().enable().current is b
    mixed = s.add_weighted("mix", ["a", "b"], [0.5, 0.5], "cat", activate=True)
    assert mixed.active == "mix" and {ad.r for _, ad in lora.adapter_items(mixed.current)} == {6}
    t = s.delete("b")
    assert t.names == ("a",) and t.active is None and t.current is None and "b" in s
    with pytest.raises(ValueError, match="an adapter named 'a' exists"):
        s.add("a", b)
    assert s.add("a", b, overwrite=True)["a"] is b
    with pytest.raises(KeyError, match=r"no adapter named 'c'; the set holds \['a', 'b'\]"):
        s.activate("c")
    # a pytree: jit takes it, the names and the active one are static
    leaves = jax.tree_util.tree_leaves(s)
    assert len(leaves) == 2 * (len(lora.adapter_items(a)) + len(lora.adapter_items(b)))


def test_registry_wrap_and_merge_use_the_active_adapter_and_share_the_base(tiny_llama):
    model, params = tiny_llama
    a, b = make_adapters(params, [2, 4])
    s = multi.AdapterSet().add("a", a).add("b", b).activate("b")
    ids = jnp.arange(S)[None] % V
    out = lambda p: np.asarray(model.apply({"params": p}, ids)[0])  # noqa: E731
    np.testing.assert_allclose(out(s.wrap(params)), out(lora.wrap(params, b)), atol=1e-6)
    np.testing.assert_allclose(out(s.merge(params)), out(lora.merge(params, b)), atol=1e-6)
    assert s.disable().wrap(params) is params and s.activate(None).merge(params) is params
    wrapped = s.wrap(params)["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert wrapped.base is params["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]  # no copy of the base


# ----------------------------------------------------------------------------------- weighted combinations


@pytest.fixture(scope="module")
def three(tiny_llama):
    _, params = tiny_llama
    return params, make_adapters(params, [2, 3, 4], targets="qv")


def test_cat_and_full_rank_svd_equal_the_weighted_dense_sum(three):
    _, ads = three
    weights = [0.7, -1.3, 0.4]
    deltas = [dense_delta(ad) for ad in ads]
    want = {p: sum(w * d[p] for w, d in zip(weights, deltas)) for p in deltas[0]}
    cat = multi.weighted_adapter(ads, weights, "cat")
    svd = multi.weighted_adapter(ads, weights, "svd", rank=9)
    for combined, r in ((cat, 9), (svd, 9)):
        got = dense_delta(combined)
        assert set(got) == set(want)
        for p in want:
            np.testing.assert_allclose(got[p], want[p], atol=1e-5, err_msg=p)
        assert {ad.r for _, ad in lora.adapter_items(combined)} == {r}
        assert {ad.scale for _, ad in lora.adapter_items(combined)} == {1.0}


def test_truncated_svd_is_the_best_rank_k_approximation(three):
    _, ads = three
    weights = [1.0, 0.5, -0.5]
    full = dense_delta(multi.weighted_adapter(ads, weights, "cat"))
    low = dense_delta(multi.weighted_adapter(ads, weights, "svd"))  # rank: the largest input rank, 4
    for p, dw in full.items():
        s = np.linalg.svd(dw, compute_uv=False)
        np.testing.assert_allclose(np.linalg.norm(dw - low[p]), np.sqrt(np.sum(s[4:] ** 2)), rtol=1e-4, atol=1e-6)


def test_linear_is_its_definition_and_needs_equal_ranks(tiny_llama):
    _, params = tiny_llama
    a, b = make_adapters(params, [4, 4], targets="qv")
    w = [0.6, -0.9]
    lin = dict(lora.adapter_items(multi.weighted_adapter([a, b], w, "linear")))
    for p, ad_a in lora.adapter_items(a):
        ad_b = dict(lora.adapter_items(b))[p]
        ca, cb = w[0] * ad_a.scale, w[1] * ad_b.scale
        want_a = np.sign(ca) * np.sqrt(abs(ca)) * ad_a.a + np.sign(cb) * np.sqrt(abs(cb)) * ad_b.a
        want_b = np.sqrt(abs(ca)) * ad_a.b + np.sqrt(abs(cb)) * ad_b.b
        np.testing.assert_allclose(lin[p].a, want_a, atol=1e-6)
        np.testing.assert_allclose(lin[p].b, want_b, atol=1e-6)
        assert (lin[p].r, lin[p].scale) == (4, 1.0)
    c = make_adapters(params, [2], targets="qv")[0]
    with pytest.raises(ValueError, match=r"ranks \[2, 4\]; linear needs equal ranks"):
        multi.weighted_adapter([a, c], [1.0, 1.0], "linear")
    with pytest.raises(ValueError, match="combination must be one of"):
        multi.weighted_adapter([a], [1.0], "ties")


@pytest.mark.parametrize("combination", ["linear", "cat", "svd"])
def test_weighted_combination_matches_peft_add_weighted_adapter(tiny_llama, tmp_path, combination):
    import peft
    import torch
    import transformers

    _, params = tiny_llama
    ads = make_adapters(params, [4, 4] if combination == "linear" else [2, 4], targets="qv")
    weights = [0.8, -0.6]
    base_dir = tmp_path / "base"
    lora.models.save_pretrained(params, LLAMA, base_dir)
    model = transformers.LlamaForCausalLM.from_pretrained(str(base_dir))
    for i, ad in enumerate(ads):
        lora.save_peft(ad, tmp_path / f"a{i}", config=LLAMA)
    peft_model = peft.PeftModel.from_pretrained(model, str(tmp_path / "a0"), adapter_name="a0")
    peft_model.load_adapter(str(tmp_path / "a1"), adapter_name="a1")
    peft_model.add_weighted_adapter(["a0", "a1"], weights, "mix", combination_type=combination)
    ours = dense_delta(multi.weighted_adapter(ads, weights, combination))
    names = lora.peft.naming(LLAMA)
    for p, dw in ours.items():
        module = peft_model.base_model.model.get_submodule(names.module_name(tuple(p.split("/"))))
        with torch.no_grad():
            ref = module.get_delta_weight("mix").numpy().T  # (out, in) -> our (in, out)
        np.testing.assert_allclose(dw, ref, atol=1e-5, err_msg=p)


# ---------------------------------------------------------------------------------- mixed-adapter batches


def row_by_row(model, params, adapters, ids, x, **kw):
    """Each row alone (a batch of one), with its own adapter (or the base for -1); one compiled function."""
    ids = [int(k) for k in np.asarray(ids)]

    @jax.jit
    def run(params, adapters, x, kw):
        rows = []
        for i, k in enumerate(ids):
            p = params if k < 0 else lora.wrap(params, adapters[k])
            out = model.apply({"params": p}, x[i : i + 1], **{n: v[i : i + 1] for n, v in kw.items()})
            rows.append(out[0] if isinstance(out, tuple) else out)
        return jnp.concatenate(rows)

    return np.asarray(run(params, list(adapters), x, kw))


def test_llama_mixed_batch_equals_each_row_alone(tiny_llama):
    model, params = tiny_llama
    ads = make_adapters(params, [2, 4, 8, 4])
    ids = jnp.array([2, 0, -1, 3, 1, 0])
    x = jax.random.randint(jax.random.key(5), (6, S), 3, V)
    stacked = lora.stack_adapters(ads)
    step = jax.jit(lambda p, st, ids, x: model.apply({"params": lora.wrap_mixed(p, st, ids)}, x)[0])
    got = np.asarray(step(params, stacked, ids, x))
    want = row_by_row(model, params, ads, ids, x)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    base = row_by_row(model, params, ads, [-1] * len(ids), x)
    change = np.abs(want - base).max(axis=(1, 2))
    assert change[2] < 1e-4 and np.delete(change, 2).min() > 1e-1  # the -1 row is the base model, no other is


def test_bert_mixed_batch_and_padding_mask():
    config = bert.Config(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        num_labels=3,
    )
    init = jax.jit(bert.init_params, static_argnums=(0, 2))
    params = spread(init(config, jax.random.key(1), "sequence-classification"))
    model = bert.build(config, task="sequence-classification")
    ads = make_adapters(params, [4, 2, 4], targets="attention")
    ids = jnp.array([1, -1, 0, 2, 2])
    x = jax.random.randint(jax.random.key(6), (5, S), 3, V)
    mask = jnp.ones((5, S), jnp.int32).at[3, 5:].set(0)
    mixed = jax.jit(lambda p, st, ids, x, m: model.apply({"params": lora.wrap_mixed(p, st, ids)}, x, attention_mask=m))
    got = mixed(params, lora.stack_adapters(ads), ids, x, mask)
    want = row_by_row(model, params, ads, ids, x, attention_mask=mask)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_mixed_batch_on_a_quantised_base(tiny_llama):
    """QLoRA serving: an NF4 base, several adapters in one batch."""
    model, params = tiny_llama
    qparams = lora.quantize(params, "nf4", compute_dtype=jnp.float32)
    ads = make_adapters(params, [2, 4], targets="qv")
    ids = jnp.array([1, -1, 0])
    x = jax.random.randint(jax.random.key(11), (3, S), 3, V)
    got = jax.jit(lambda p, st, x: model.apply({"params": lora.wrap_mixed(p, st, ids)}, x)[0])(
        qparams, lora.stack_adapters(ads), x
    )
    want = row_by_row(model, lora.dequantize(qparams), ads, ids, x)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)


def test_hot_swap_and_new_ids_do_not_recompile(tiny_llama):
    model, params = tiny_llama
    ads = make_adapters(params, [4, 4, 2])
    stacked = lora.stack_adapters(ads[:2], rank=4, slots=3)  # slot 2 starts empty: the base model
    step = jax.jit(lambda p, st, ids, x: model.apply({"params": lora.wrap_mixed(p, st, ids)}, x)[0])
    x = jax.random.randint(jax.random.key(7), (4, S), 3, V)
    ids = jnp.array([0, 1, 2, -1])
    first = np.asarray(step(params, stacked, ids, x))
    np.testing.assert_allclose(first, row_by_row(model, params, ads[:2], [0, 1, -1, -1], x), atol=1e-4, rtol=1e-4)
    # a smaller-rank adapter with another alpha into slot 2, another into slot 0, new ids: same executable
    fresh = make_adapters(params, [3], seed=50)[0]
    stacked = lora.load_slot(lora.load_slot(stacked, 2, ads[2]), 0, fresh)
    ids = jnp.array([2, 0, 1, 2])
    got = np.asarray(step(params, stacked, ids, x))
    np.testing.assert_allclose(got, row_by_row(model, params, [fresh, ads[1], ads[2]], ids, x), atol=1e-4, rtol=1e-4)
    assert step._cache_size() == 1
    # emptying a slot gives the base model for its rows
    emptied = lora.load_slot(stacked, 2, None)
    np.testing.assert_allclose(
        np.asarray(step(params, emptied, ids, x))[[0, 3]],
        np.asarray(step(params, emptied, jnp.full((4,), -1, jnp.int32), x))[[0, 3]],
        atol=1e-5,
    )
    assert step._cache_size() == 1


def test_mixed_batch_matches_peft_adapter_names(tiny_llama, tmp_path):
    import peft
    import torch
    import transformers

    _, params = tiny_llama
    ads = make_adapters(params, [2, 4, 4], targets="all-linear")
    base_dir = tmp_path / "base"
    lora.models.save_pretrained(params, LLAMA, base_dir)
    model = transformers.LlamaForCausalLM.from_pretrained(str(base_dir)).eval()
    for i, ad in enumerate(ads):
        lora.save_peft(ad, tmp_path / f"a{i}", config=LLAMA)
    peft_model = peft.PeftModel.from_pretrained(model, str(tmp_path / "a0"), adapter_name="a0")
    for i in (1, 2):
        peft_model.load_adapter(str(tmp_path / f"a{i}"), adapter_name=f"a{i}")
    peft_model.eval()
    rows = ["a2", "__base__", "a0", "a1", "a2"]
    x = np.random.RandomState(0).randint(3, V, (len(rows), S))
    with torch.no_grad():
        ref = peft_model(torch.tensor(x), adapter_names=rows).logits.numpy()
    ids = multi.row_ids([None if r == "__base__" else r for r in rows], ["a0", "a1", "a2"])
    got = llama.build(LLAMA).apply({"params": lora.wrap_mixed(params, lora.stack_adapters(ads), ids)}, x)[0]
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4, rtol=1e-4)


def test_greedy_generation_with_mixed_adapters(tiny_llama):
    from lora_jax.models.generate import generate

    model, params = tiny_llama
    ads = make_adapters(params, [4, 4])  # equal ranks: the rows' own runs share one compiled decoder
    prompts = jax.random.randint(jax.random.key(8), (3, 4), 3, V)
    ids = jnp.array([1, 0, 1])
    got = generate(model, lora.wrap_mixed(params, lora.stack_adapters(ads), ids), prompts, max_new_tokens=5)
    alone = [
        generate(model, lora.wrap(params, ads[k]), prompts[i : i + 1], max_new_tokens=5)[0]
        for i, k in enumerate(np.asarray(ids))
    ]
    np.testing.assert_array_equal(np.asarray(got), np.stack(alone))
    assert len({tuple(np.asarray(r[4:])) for r in alone}) > 1  # the adapters steer generation apart


def test_ops_einsum_and_embed_per_row():
    k = jax.random.split(jax.random.key(9), 6)
    base = jax.random.normal(k[0], (6, 2, 5))  # (d, heads, head_dim): in_shape (6,)
    table = jax.random.normal(k[1], (11, 6))
    ad_w = lambda r, s: nonzero(lora.init({"w": base}, r=r, targets="w", key=k[2 + s]), s)  # noqa: E731
    ad_t = lambda r, s: nonzero(lora.init({"t": table}, r=r, targets="t", key=k[4 + s], allow_embeddings=True), s)  # noqa: E731
    ws, ts = [ad_w(2, 0), ad_w(3, 1)], [ad_t(1, 0), ad_t(3, 1)]
    ids = jnp.array([1, -1, 0])
    x = jax.random.normal(k[5], (3, 4, 6))
    tok = jnp.array([[1, 2], [3, 4], [10, 0]])

    @jax.jit
    def mixed(sw, st, x, tok):
        mw = lora.wrap_mixed({"w": base}, sw, ids)["w"]
        mt = lora.wrap_mixed({"t": table}, st, ids)["t"]
        return ops.einsum("bsd,dnh->bsnh", x, ops.astype(mw, jnp.float32)), ops.embed(tok, mt)

    @jax.jit
    def alone(ws, ts, x, tok):
        ys, es = [], []
        for i, j in enumerate(np.asarray(ids)):
            w = base if j < 0 else lora.wrap({"w": base}, ws[j])["w"]
            t = table if j < 0 else lora.wrap({"t": table}, ts[j])["t"]
            ys.append(ops.einsum("bsd,dnh->bsnh", x[i : i + 1], w)[0])
            es.append(ops.embed(tok[i : i + 1], t)[0])
        return jnp.stack(ys), jnp.stack(es)

    got, want = mixed(lora.stack_adapters(ws), lora.stack_adapters(ts), x, tok), alone(ws, ts, x, tok)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5)
        assert np.abs(w).max() > 0.1


def test_mixed_errors_are_clear(tiny_llama):
    model, params = tiny_llama
    ads = make_adapters(params, [2, 4], targets="qv")
    stacked = lora.stack_adapters(ads)
    x = jnp.zeros((3, S), jnp.int32)
    with pytest.raises(ValueError, match=r"\(2,\) adapter ids for a batch of 3 rows"):
        model.apply({"params": lora.wrap_mixed(params, stacked, jnp.array([0, 1]))}, x)
    big = make_adapters(params, [8], targets="qv")[0]
    with pytest.raises(ValueError, match="adapter rank 8 exceeds the stack's rank 4"):
        lora.load_slot(stacked, 0, big)
    wider = make_adapters(params, [2], targets="attention")[0]
    with pytest.raises(ValueError, match="which the stack does not hold"):
        lora.load_slot(stacked, 0, wider)
    with pytest.raises(KeyError, match=r"rows name adapters \['c'\]"):
        multi.row_ids(["a", "c"], ["a", "b"])
    dora = lora.init(params, r=2, targets="qv", use_dora=True)
    with pytest.raises(NotImplementedError, match="DoRA adapter"):
        lora.stack_adapters([ads[0], dora])
    with pytest.raises(NotImplementedError, match="DoRA adapter"):
        lora.weighted_adapter([dora], [1.0], "cat")
    # on the scanned model (the library default) the multi-adapter paths refuse by name, before any shape error
    scanned = llama.init_params(dataclasses.replace(LLAMA, scan_layers=True), jax.random.key(0))
    layered = [lora.init(scanned, r=2, targets="qv", key=jax.random.key(i)) for i in range(2)]
    for call in (
        lambda: lora.stack_adapters(layered),
        lambda: lora.weighted_adapter(layered, [0.5, 0.5], "cat"),
        lambda: lora.AdapterSet().add("a", layered[0]),
        lambda: lora.load_slot(stacked, 0, layered[0]),
    ):
        with pytest.raises(lora.UnsupportedError, match="scanned model .*scan_layers=False"):
            call()
