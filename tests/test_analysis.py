"""lora_jax.analysis (Hu et al. 2021, Sec. 7) on matrices whose answers are known, and python -m train.analyze."""

import dataclasses
import json
import math

import jax
import numpy as np
import pytest

import lora_jax as lora
from lora_jax import analysis
from lora_jax.checkpoint import save_adapters
from lora_jax.core import LoraAdapter


def orthonormal(rng, d, k):
    q, _ = np.linalg.qr(rng.standard_normal((d, k)))
    return q


def adapter(a, b, scale=1.0):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return LoraAdapter(a, b, alpha=scale * a.shape[1], scale=scale, in_shape=(a.shape[0],), out_shape=(b.shape[1],))


def same_span_in_order(u, expected):
    """Each column of u equals the expected column up to sign."""
    return np.allclose(np.abs(np.sum(u * expected, axis=0)), 1.0, atol=1e-5)


# ------------------------------------------------------------------------------------------- dW and SVD


def test_delta_w_and_factored_svd_match_the_dense_matrix():
    rng = np.random.default_rng(0)
    ad = adapter(rng.standard_normal((24, 5)), rng.standard_normal((5, 17)), scale=2.5)
    dw = analysis.delta_w(ad)
    assert dw.shape == (24, 17) and dw.dtype == np.float64
    np.testing.assert_allclose(dw, np.asarray(ad.delta()), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, 2.5 * ad.a.astype(np.float64) @ ad.b.astype(np.float64), rtol=1e-12)

    dec = analysis.svd(ad)
    assert dec.u.shape == (24, 5) and dec.s.shape == (5,) and dec.v.shape == (17, 5)
    np.testing.assert_allclose(dec.s, np.linalg.svd(dw, compute_uv=False)[:5], rtol=1e-10)
    np.testing.assert_allclose(dec.u @ np.diag(dec.s) @ dec.v.T, dw, atol=1e-10)
    np.testing.assert_allclose(dec.u.T @ dec.u, np.eye(5), atol=1e-10)
    np.testing.assert_allclose(dec.v.T @ dec.v, np.eye(5), atol=1e-10)


def test_bases_follow_the_papers_layout():
    """Build the paper's A (r, d_in), B (d_out, r) and dW = B A (d_out, d_in); our adapter stores their
    transposes. Each basis must equal the numpy SVD factor of the paper's matrix that Sec. 7 names."""
    rng = np.random.default_rng(1)
    d_in, d_out, r = 30, 20, 4
    a_paper = orthonormal(rng, r, r) @ np.diag([4.0, 3.0, 2.0, 1.0]) @ orthonormal(rng, d_in, r).T
    b_paper = orthonormal(rng, d_out, r) @ np.diag([5.0, 2.0, 1.5, 0.5]) @ orthonormal(rng, r, r)
    ad = adapter(a_paper.T, b_paper.T)
    dw_paper = b_paper @ a_paper

    _, _, vh_a = np.linalg.svd(a_paper, full_matrices=False)  # right-singular vectors of A: in R^{d_in}
    u_b, _, _ = np.linalg.svd(b_paper, full_matrices=False)  # left-singular vectors of B: in R^{d_out}
    u_dw, _, vh_dw = np.linalg.svd(dw_paper, full_matrices=False)  # column space (d_out) / row space (d_in)
    assert same_span_in_order(analysis.basis(ad, "A"), vh_a[:r].T)
    assert same_span_in_order(analysis.basis(ad, "B"), u_b[:, :r])
    assert same_span_in_order(analysis.basis(ad, "output"), u_dw[:, :r])
    assert same_span_in_order(analysis.basis(ad, "input"), vh_dw[:r].T)
    assert analysis.basis(ad, "A").shape == (d_in, r) and analysis.basis(ad, "output").shape == (d_out, r)
    with pytest.raises(ValueError, match="one of"):
        analysis.basis(ad, "rows")


# ----------------------------------------------------------------------------------- subspace similarity


def test_similarity_identical_orthogonal_and_random():
    rng = np.random.default_rng(2)
    q = orthonormal(rng, 50, 20)
    np.testing.assert_allclose(analysis.grassmann_similarity(q[:, :8], q[:, :8]), np.ones((8, 8)), atol=1e-12)
    np.testing.assert_allclose(analysis.grassmann_similarity(q[:, :8], q[:, 8:20]), np.zeros((8, 12)), atol=1e-12)
    # Rotating the whole space changes nothing; swapping the arguments transposes the grid.
    u1, u2, rot = orthonormal(rng, 50, 5), orthonormal(rng, 50, 7), orthonormal(rng, 50, 50)
    g = analysis.grassmann_similarity(u1, u2)
    assert g.shape == (5, 7) and np.all((g >= 0) & (g <= 1))
    np.testing.assert_allclose(analysis.grassmann_similarity(rot @ u1, rot @ u2), g, atol=1e-10)
    np.testing.assert_allclose(analysis.grassmann_similarity(u2, u1), g.T, atol=1e-12)
    # Random subspaces: E phi(i, j) = max(i, j) / d.
    d, k1, k2, n = 400, 4, 16, 200
    mean = np.mean(
        [analysis.grassmann_similarity(orthonormal(rng, d, k1), orthonormal(rng, d, k2)) for _ in range(n)], axis=0
    )
    np.testing.assert_allclose(mean, analysis.random_similarity(d, k1, k2), rtol=0.15)


def test_similarity_of_nested_and_tilted_subspaces():
    e = np.eye(10)
    u1 = e[:, [0, 1, 2, 3]]
    u2 = e[:, [0, 5, 1, 6, 2]]  # u1's directions at positions 1, 3, 5 of u2
    g = analysis.grassmann_similarity(u1, u2)
    overlap = np.array([[1, 1, 1, 1, 1], [1, 1, 2, 2, 2], [1, 1, 2, 2, 3], [1, 1, 2, 2, 3]], float)
    expected = overlap / np.minimum(np.arange(1, 5)[:, None], np.arange(1, 6)[None, :])
    np.testing.assert_allclose(g, expected, atol=1e-12)
    assert g[1, 1] == pytest.approx(0.5) and g[3, 4] == pytest.approx(0.75)
    theta = 0.3
    tilted = (np.cos(theta) * e[:, 0] + np.sin(theta) * e[:, 1])[:, None]
    assert analysis.grassmann_similarity(tilted, e[:, :1])[0, 0] == pytest.approx(np.cos(theta) ** 2)
    with pytest.raises(ValueError, match="same space"):
        analysis.grassmann_similarity(e[:, :2], np.eye(9)[:, :2])


def test_adapter_similarity_r8_vs_r64_known_grid():
    """A of the r=64 adapter spans Q[:, :64] (singular values descending in that order); A of the r=8 adapter
    spans Q[:, 8:16], so its top-i directions are the r=64 adapter's directions 9..8+i:
    phi(i, j) = clip(j - 8, 0, i) / min(i, j)."""
    rng = np.random.default_rng(3)
    d, d_out = 96, 80
    q = orthonormal(rng, d, 64)
    a64 = q @ np.diag(np.linspace(64, 1, 64)) @ orthonormal(rng, 64, 64)
    a8 = q[:, 8:16] @ np.diag(np.linspace(8, 1, 8)) @ orthonormal(rng, 8, 8)
    ad64 = adapter(a64, rng.standard_normal((64, d_out)))
    ad8 = adapter(a8, rng.standard_normal((8, d_out)))
    grid = analysis.subspace_similarity(ad8, ad64, "A")
    i, j = np.arange(1, 9)[:, None], np.arange(1, 65)[None, :]
    np.testing.assert_allclose(grid, np.clip(j - 8, 0, i) / np.minimum(i, j), atol=1e-5)
    assert grid.shape == (8, 64)
    np.testing.assert_allclose(analysis.subspace_similarity(ad8, ad8, "output"), np.ones((8, 8)), atol=1e-6)
    with pytest.raises(ValueError, match="different size"):
        analysis.subspace_similarity(ad8, adapter(rng.standard_normal((50, 8)), rng.standard_normal((8, d_out))))


def test_output_similarity_of_dw_column_spaces():
    """dW1 writes into P[:, :4] and dW2 into P[:, 2:6] (both in R^{d_out}); their A factors are unrelated."""
    rng = np.random.default_rng(4)
    p = orthonormal(rng, 40, 6)
    ad1 = adapter(orthonormal(rng, 30, 4) @ np.diag([4.0, 3, 2, 1]), p[:, :4].T)
    ad2 = adapter(orthonormal(rng, 30, 4) @ np.diag([4.0, 3, 2, 1]), p[:, 2:6].T)
    grid = analysis.subspace_similarity(ad1, ad2, "output")
    # top directions: ad1 -> p0, p1, p2, p3 ; ad2 -> p2, p3, p4, p5
    np.testing.assert_allclose(
        grid, [[0, 0, 0, 0], [0, 0, 0, 0], [1, 1 / 2, 1 / 3, 1 / 3], [1, 1, 2 / 3, 2 / 4]], atol=1e-5
    )


# ------------------------------------------------------------------------------------------- amplification


def test_amplification_of_a_dw_built_on_ws_weak_directions():
    """W = P diag(sigma) Q^T (d_in=40, d_out=30). dW = sum_k c_k p_k q_k^T over W's 3 weakest singular pairs, so
    U^T W V = diag(sigma_weak) exactly: ||U^T W V||_F = ||sigma_weak||, amplification = ||c|| / ||sigma_weak||."""
    rng = np.random.default_rng(5)
    d_in, d_out, r = 40, 30, 3
    p, q = orthonormal(rng, d_in, d_out), orthonormal(rng, d_out, d_out)
    sigma = np.linspace(10.0, 0.5, d_out)
    w = p @ np.diag(sigma) @ q.T
    weak = [d_out - 1, d_out - 2, d_out - 3]
    c = np.array([6.0, 4.0, 2.0])
    ad = adapter(p[:, weak] * c / 2.0, q[:, weak].T, scale=2.0)

    amp = analysis.amplification(w, ad, n_random=64)
    assert amp.r == r
    assert amp.norm_w == pytest.approx(np.linalg.norm(sigma), rel=1e-6)
    assert amp.norm_dw == pytest.approx(np.linalg.norm(c), rel=1e-5)
    assert amp.proj_dw == pytest.approx(np.linalg.norm(sigma[weak]), rel=1e-5)
    assert amp.proj_w == pytest.approx(np.linalg.norm(sigma[:r]), rel=1e-10)
    assert amp.factor == pytest.approx(np.linalg.norm(c) / np.linalg.norm(sigma[weak]), rel=1e-5)
    # Random r-frames: E ||U^T W V||_F^2 = r^2 / (d_in d_out) ||W||_F^2.
    assert amp.proj_random == pytest.approx(r / math.sqrt(d_in * d_out) * np.linalg.norm(sigma), rel=0.15)
    # The same number computed the paper's way, in its (d_out, d_in) layout.
    u, _, vh = np.linalg.svd(analysis.delta_w(ad).T)
    assert np.linalg.norm(u[:, :r].T @ w.T @ vh[:r].T) == pytest.approx(amp.proj_dw, rel=1e-5)
    # dW along W's strongest directions is not amplified: ||U^T W V|| is W's own top-r.
    strong = adapter(p[:, :r] * c, q[:, :r].T)
    amp_strong = analysis.amplification(w, strong)
    assert amp_strong.proj_dw == pytest.approx(amp_strong.proj_w, rel=1e-5)
    assert amp_strong.factor == pytest.approx(np.linalg.norm(c) / np.linalg.norm(sigma[:r]), rel=1e-5)
    # A dense dW gives the same numbers; a transposed W is refused.
    assert analysis.amplification(w, analysis.delta_w(ad), n_random=64).proj_dw == pytest.approx(amp.proj_dw)
    with pytest.raises(ValueError, match=r"\(d_in, d_out\)"):
        analysis.amplification(w.T, ad)
    zero = analysis.amplification(w, adapter(p[:, :r], np.zeros((r, d_out))))
    assert zero.norm_dw == 0.0 and math.isnan(zero.factor)


# ------------------------------------------------------------------------------------------------- rank


def test_effective_and_energy_rank():
    assert analysis.effective_rank([3.0, 0, 0]) == pytest.approx(1.0)
    assert analysis.effective_rank([2.0, 2, 2, 2]) == pytest.approx(4.0)
    p = np.array([2 / 3, 1 / 3])
    assert analysis.effective_rank([2.0, 1.0]) == pytest.approx(np.exp(-np.sum(p * np.log(p))))
    assert analysis.effective_rank([0.0, 0.0]) == 0.0
    assert analysis.energy_rank([3.0, 1.0], 0.9) == 1  # 9 of 10 is exactly 90%
    assert analysis.energy_rank([1.0, 1, 1, 1], 0.9) == 4
    assert analysis.energy_rank([1.0, 1, 1, 1], 0.5) == 2
    assert analysis.energy_rank([1.0, 3.0], 0.5) == 1  # order-free
    assert analysis.energy_rank([0.0], 0.9) == 0


# -------------------------------------------------------------------------------------------- per layer


def toy_model(rng, d=16):
    return {
        "encoder": {
            f"layer_{i}": {
                "attention": {m: {"kernel": rng.standard_normal((d, d)).astype(np.float32)} for m in ("query", "value")}
            }
            for i in range(2)
        }
    }


def test_layer_stats_and_concentration():
    rng = np.random.default_rng(6)
    params = toy_model(rng)
    adapters = lora.init(params, r=2, targets="qv")
    norms = {}

    def fill(path, ad):
        b = rng.standard_normal(ad.b.shape).astype(np.float32)
        norms[path] = np.linalg.norm(ad.scale * np.asarray(ad.a, np.float64) @ b)
        return dataclasses.replace(ad, b=b)

    adapters = jax.tree_util.tree_map_with_path(
        lambda kp, ad: fill("/".join(k.key for k in kp), ad), adapters, is_leaf=lora.is_adapter
    )
    rows = analysis.layer_stats(params, adapters)
    assert [(r.layer, r.matrix) for r in rows] == [(0, "query"), (0, "value"), (1, "query"), (1, "value")]
    for row in rows:
        w = params["encoder"][f"layer_{row.layer}"]["attention"][row.matrix]["kernel"]
        assert row.amp.norm_dw == pytest.approx(norms[row.path], rel=1e-6)
        assert row.relative == pytest.approx(norms[row.path] / np.linalg.norm(w.astype(np.float64)), rel=1e-6)
        assert row.spectrum.shape == (2,) and 1.0 <= row.effective_rank <= 2.0 and row.rank90 in (1, 2)
    total = sum(v**2 for v in norms.values())
    by_layer = analysis.concentration(rows, "layer")
    assert by_layer[1] == pytest.approx(sum(v**2 for p, v in norms.items() if "layer_1" in p) / total)
    assert sum(analysis.concentration(rows, "matrix").values()) == pytest.approx(1.0)
    assert list(analysis.concentration(rows, "path")) == [r.path for r in rows]

    # Adapters trained on a classification wrapper ("bert/encoder/...") against the bare encoder's params.
    wrapped = {"bert": adapters}
    assert [r.amp.norm_dw for r in analysis.layer_stats(params, wrapped)] == [r.amp.norm_dw for r in rows]
    with pytest.raises(KeyError, match="another model"):
        analysis.layer_stats({"decoder": params["encoder"]}, adapters)
    small = toy_model(rng, d=8)
    with pytest.raises(ValueError, match=r"shape \(8, 8\).*expects \(16, 16\)"):
        analysis.layer_stats(small, adapters)


def test_stacked_adapters_split_per_layer():
    rng = np.random.default_rng(7)
    stacked = {"layers": {"query": {"kernel": rng.standard_normal((3, 12, 10)).astype(np.float32)}}}
    ads = lora.init_stacked(stacked, r=2, targets=".*kernel")
    ads = jax.tree_util.tree_map(
        lambda ad: dataclasses.replace(ad, b=rng.standard_normal(ad.b.shape).astype(np.float32)),
        ads,
        is_leaf=lora.is_adapter,
    )
    items = list(analysis.iter_matrices(ads))
    assert [(p, idx) for p, idx, _ in items] == [(f"layers/query/kernel[{i}]", (i,)) for i in range(3)]
    full = np.asarray(ads["layers"]["query"]["kernel"].delta())
    for _, idx, ad in items:
        np.testing.assert_allclose(analysis.delta_w(ad), full[idx], rtol=1e-5, atol=1e-6)
    rows = analysis.layer_stats(stacked, ads)
    assert [r.layer for r in rows] == [0, 1, 2] and all(r.shape == (12, 10) for r in rows)
    w1 = stacked["layers"]["query"]["kernel"][1].astype(np.float64)
    assert rows[1].amp.norm_w == pytest.approx(np.linalg.norm(w1))


def test_path_parsing():
    assert analysis.layer_of("bert/encoder/layer_3/attention/self/query/kernel") == 3
    assert analysis.layer_of("model/layers_11/self_attn/q_proj/kernel") == 11
    assert analysis.layer_of("transformer/h_2/attn/c_attn/kernel") == 2
    assert analysis.layer_of("dense/kernel") is None
    assert analysis.matrix_of("bert/encoder/layer_3/attention/self/query/kernel") == "query"
    assert analysis.matrix_of("layers/q_proj/kernel[4]") == "q_proj"


def test_report_verdict_tells_the_three_cases_apart():
    """dW along W's strongest directions, along weak-but-present ones (the paper's finding), and random."""
    from train.analyze import _verdict

    rng = np.random.default_rng(8)
    d, r = 64, 2
    p, q = orthonormal(rng, d, d), orthonormal(rng, d, d)
    params = {"query": {"kernel": (p @ np.diag(np.linspace(10.0, 0.1, d)) @ q.T).astype(np.float32)}}

    def verdict(idx=None):
        if idx is None:
            return _verdict(
                analysis.layer_stats(
                    params, {"query": {"kernel": adapter(rng.standard_normal((d, r)), rng.standard_normal((r, d)))}}
                )
            )[0]
        a, b = p[:, idx], q[:, idx].T
        return _verdict(analysis.layer_stats(params, {"query": {"kernel": adapter(a, b)}}))[0]

    assert "among W's dominant ones" in verdict([0, 1])
    assert "as Hu et al. (2021, Table 7) found" in verdict([45, 46])
    assert "unrelated to W's structure" in verdict()


# ------------------------------------------------------------------------------------ python -m train.analyze


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, minilm_path):
    """A 2-layer, 32-wide random BERT with MiniLM's tokenizer, saved in Hugging Face layout, and its params."""
    from transformers import AutoTokenizer

    from lora_jax.models import bert, save_pretrained

    config = bert.Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=128
    )
    params = bert.init_params(config, jax.random.key(0), task="sequence-classification")
    folder = tmp_path_factory.mktemp("tiny_bert")
    save_pretrained(params, config, folder, tokenizer=AutoTokenizer.from_pretrained(str(minilm_path)))
    return folder, params


def trained_like(params, r, seed):
    """Adapters on q, v with a random (non-zero) B per matrix, as after some training."""
    ads = lora.init(params, r=r, alpha=2 * r, targets="qv", key=jax.random.key(seed))
    leaves, treedef = jax.tree_util.tree_flatten(ads, is_leaf=lora.is_adapter)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [dataclasses.replace(ad, b=0.1 * jax.random.normal(k, ad.b.shape)) for ad, k in zip(leaves, keys)]
    )


def test_analyze_command_end_to_end(tiny_bert, tmp_path):
    from train import analyze

    folder, params = tiny_bert
    runs = {}
    for name, r in (("r2_qv", 2), ("r8_qv", 8)):
        runs[name] = trained_like(params, r, seed=r)
        save_adapters(tmp_path / "runs" / name / "adapters", runs[name])
    out = tmp_path / "report"
    rc = analyze.main(
        [
            "--base",
            str(folder),
            "--adapters",
            str(tmp_path / "runs/r2_qv/adapters"),
            str(tmp_path / "runs/r8_qv/adapters"),
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    report = (out / "report.md").read_text()
    assert "## r2_qv: dW per matrix" in report and "## r8_qv: dW per matrix" in report
    assert "Subspace similarity: r2_qv vs r8_qv" in report and "![phi grid](similarity_A.png)" in report
    for png in ("spectra_r2_qv.png", "spectra_r8_qv.png", "similarity_A.png", "similarity_output.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png

    # The numbers in analysis.json are the library's, computed on the base kernels as the model loads them.
    record = json.loads((out / "analysis.json").read_text())
    path = "bert/encoder/layer_1/attention/self/value/kernel"
    row = next(m for m in record["adapters"]["r8_qv"]["matrices"] if m["path"] == path)
    w = np.asarray(params["bert"]["encoder"]["layer_1"]["attention"]["self"]["value"]["kernel"], np.float64)
    ad = runs["r8_qv"]["bert"]["encoder"]["layer_1"]["attention"]["self"]["value"]["kernel"]
    amp = analysis.amplification(w, ad)
    assert row["amplification"] == pytest.approx(amp.factor, rel=1e-5)
    assert row["norm_w"] == pytest.approx(np.linalg.norm(w), rel=1e-6) and row["r"] == 8
    sim = record["similarity"]["A"][path]
    r2 = runs["r2_qv"]["bert"]["encoder"]["layer_1"]["attention"]["self"]["value"]["kernel"]
    np.testing.assert_allclose(sim["grid"], analysis.subspace_similarity(r2, ad, "A"), atol=1e-6)
    assert sim["shape"] == [2, 8] and len(record["similarity"]["output"]) == 4

    # One adapter: the per-matrix tables and no similarity.
    single = tmp_path / "single"
    assert (
        analyze.main(
            [
                "--base",
                str(folder),
                "--adapters",
                str(tmp_path / "runs/r8_qv/adapters"),
                "--out",
                str(single),
                "--labels",
                "only",
            ]
        )
        == 0
    )
    text = (single / "report.md").read_text()
    assert "## only: dW per matrix" in text and "Only one adapter given" in text
    assert not (single / "similarity_A.png").exists() and (single / "spectra_only.png").exists()


def test_analyze_command_rejects_adapters_of_another_model(tiny_bert, tmp_path, capsys):
    from train import analyze

    folder, _ = tiny_bert
    other = {
        "bert": {"encoder": {"layer_0": {"attention": {"self": {"query": {"kernel": np.zeros((48, 48), np.float32)}}}}}}
    }
    save_adapters(tmp_path / "other", trained_like(other, 2, seed=0))
    assert (
        analyze.main(["--base", str(folder), "--adapters", str(tmp_path / "other"), "--out", str(tmp_path / "out")])
        == 2
    )
    err = capsys.readouterr().err
    assert "(32, 32)" in err and "(48, 48)" in err
    assert (
        analyze.main(["--base", str(folder), "--adapters", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
        == 2
    )
    assert "missing' does not exist" in capsys.readouterr().err
