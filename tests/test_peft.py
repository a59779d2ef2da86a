"""PEFT interop checked against the real ``peft`` library and transformers' PyTorch models (tiny random models).

- adapters trained a few steps with PEFT load here and give PEFT's logits (Llama with rsLoRA + rank/alpha
  patterns, BERT sequence classification with a ``modules_to_save`` classifier, GPT-2 ``Conv1D`` layers);
- adapters made here (random non-zero B, mixed ranks, rsLoRA, a trained head) load in PEFT with our logits;
- our merged export (``lora.merge`` + ``save_pretrained``) equals PEFT's ``merge_and_unload``;
- bad folders give errors that name the tensor.
"""

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.numpy import save_file

import lora_jax as lora
from lora_jax import peft as lpeft
from lora_jax.models import load, save_pretrained

V, S = 64, 10
TINY = {
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    ),
    "bert": lambda: transformers.BertConfig(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    ),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    ),
}
TORCH_CLASS = {
    "llama": transformers.LlamaForCausalLM,
    "bert": transformers.BertForSequenceClassification,
    "gpt2": transformers.GPT2LMHeadModel,
}
# What PEFT trains in each case: the settings whose semantics load_peft must honour.
PEFT_CONFIGS = {
    "llama": lambda: peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        use_rslora=True,
        rank_pattern={"q_proj": 2},
        alpha_pattern={"layers.1.self_attn.v_proj": 5},
        lora_dropout=0.0,
    ),
    "bert": lambda: peft.LoraConfig(
        task_type="SEQ_CLS",
        r=4,
        lora_alpha=16,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        lora_dropout=0.0,
    ),
    "gpt2": lambda: peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_proj"],
        fan_in_fan_out=True,
        lora_dropout=0.0,
    ),
}


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if ("norm" in name.lower() or ".ln_" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return module.eval()


def inputs(seed: int = 0, batch: int = 3) -> np.ndarray:
    return np.random.RandomState(seed).randint(3, V, (batch, S))


def torch_logits(model, ids) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def jax_logits(model, params, ids) -> np.ndarray:
    out = model.apply({"params": params}, jnp.asarray(ids))
    return np.asarray(out[0] if isinstance(out, tuple) else out)


@dataclasses.dataclass
class Case:
    arch: str
    base_dir: str  # the base model as a Hugging Face folder
    model: object  # our Flax model, params and config loaded from it
    params: dict
    config: object

    def torch_base(self):
        return TORCH_CLASS[self.arch].from_pretrained(self.base_dir).eval()


@pytest.fixture(scope="module", params=list(TINY))
def case(request, tmp_path_factory) -> Case:
    arch = request.param
    torch.manual_seed(0)
    base_dir = str(tmp_path_factory.mktemp(f"{arch}_base"))
    randomize(TORCH_CLASS[arch](TINY[arch]())).save_pretrained(base_dir)
    # unrolled: the PEFT settings exercised here include per-layer rank / alpha patterns (layers.1, layer_1),
    # which a scanned stack refuses (test_peft_trained_adapter_gives_peft_logits checks that); other families ignore it
    model, params, _, config = load(base_dir, scan_layers=False)
    return Case(arch, base_dir, model, params, config)


def train_with_peft(case: Case, peft_config, steps: int = 4):
    """A PEFT model trained a few Adam steps (so B != 0 and the head moves), in eval mode."""
    torch.manual_seed(1)
    model = peft.get_peft_model(case.torch_base(), peft_config)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    ids = torch.tensor(inputs(seed=7, batch=4))
    for _ in range(steps):
        if case.arch == "bert":
            loss = model(ids, labels=torch.tensor([0, 1, 2, 1])).loss
        else:
            loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained(case, tmp_path_factory):
    """(PEFT model trained here, its saved adapter folder)."""
    model = train_with_peft(case, PEFT_CONFIGS[case.arch]())
    folder = tmp_path_factory.mktemp(f"{case.arch}_peft")
    model.save_pretrained(str(folder))
    return model, folder


# ------------------------------------------------------------------------------------------ PEFT -> here


def test_peft_trained_adapter_gives_peft_logits(case, trained):
    peft_model, folder = trained
    loaded = lora.load_peft(folder, case.params, config=case.config)
    ids = inputs(1)
    ref = torch_logits(peft_model, ids)
    base = torch_logits(case.torch_base(), ids)
    assert np.abs(ref - base).max() > 1e-2  # the adapter changes the model: the check below means something
    params = loaded.update(case.params)
    np.testing.assert_allclose(
        jax_logits(case.model, lora.wrap(params, loaded.adapters), ids), ref, atol=1e-4, rtol=1e-4
    )
    if case.arch == "llama":  # the model as load() builds it by default (scanned) refuses the per-layer alpha by name
        _, scanned, _, config = load(case.base_dir)
        assert config.scanned
        with pytest.raises(lora.PeftError, match=r"layer 1's adapter has alpha=5.0.*scan_layers=False"):
            lora.load_peft(folder, scanned, config=config)
    np.testing.assert_allclose(
        jax_logits(case.model, lora.merge(params, loaded.adapters), ids), ref, atol=1e-4, rtol=1e-4
    )


def test_scaling_follows_rank_alpha_patterns_and_rslora(case, trained):
    peft_model, folder = trained
    loaded = lora.load_peft(folder, case.params, config=case.config)
    items = dict(lora.adapter_items(loaded.adapters))
    names = lpeft.naming(case.config)
    by_module = {names.module_name(tuple(p.split("/"))): ad for p, ad in items.items()}
    # every LoRA layer PEFT made is here, with PEFT's own rank and scaling for it
    layers = {
        name: m for name, m in peft_model.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    assert set(by_module) == set(layers) and layers
    for name, module in layers.items():
        ad = by_module[name]
        assert ad.r == module.r["default"]
        assert math.isclose(ad.scale, module.scaling["default"], rel_tol=1e-9), name
    # without the config the architecture is recognised from the parameter paths
    guessed = dict(lora.adapter_items(lora.load_peft(folder, case.params).adapters))
    assert guessed.keys() == items.keys()
    for p, ad in guessed.items():
        np.testing.assert_array_equal(ad.a, items[p].a)
    if case.arch == "llama":
        q = items["model/layers_0/self_attn/q_proj/kernel"]
        v1 = items["model/layers_1/self_attn/v_proj/kernel"]
        assert (q.r, q.scale) == (2, pytest.approx(8 / math.sqrt(2)))
        assert (v1.r, v1.scale) == (4, pytest.approx(5 / 2))


def test_modules_to_save_come_back_as_trained_leaves(case, trained):
    peft_model, folder = trained
    loaded = lora.load_peft(folder, case.params, config=case.config)
    if case.arch != "bert":
        assert loaded.trained == {}
        return
    head = peft_model.base_model.model.classifier.modules_to_save["default"]
    assert set(loaded.trained) == {"classifier"}
    np.testing.assert_array_equal(loaded.trained["classifier"]["kernel"], head.weight.detach().numpy().T)
    np.testing.assert_array_equal(loaded.trained["classifier"]["bias"], head.bias.detach().numpy())
    assert not np.allclose(loaded.trained["classifier"]["kernel"], case.params["classifier"]["kernel"])


def _safetensors(folder) -> dict[str, np.ndarray]:
    out = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), "np") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_merged_export_equals_peft_merge_and_unload(case, trained, tmp_path):
    peft_model, folder = trained
    loaded = lora.load_peft(folder, case.params, config=case.config)
    save_pretrained(lora.merge(loaded.update(case.params), loaded.adapters), case.config, tmp_path / "ours")
    merged = peft.PeftModel.from_pretrained(case.torch_base(), str(folder)).merge_and_unload()
    merged.save_pretrained(str(tmp_path / "peft"))  # what PEFT + transformers write (tied weights once)
    ref, ours = _safetensors(tmp_path / "peft"), _safetensors(tmp_path / "ours")
    base = {k: v.detach().numpy() for k, v in case.torch_base().state_dict().items()}
    assert set(ours) == set(ref), (sorted(set(ref) - set(ours)), sorted(set(ours) - set(ref)))
    for k in sorted(ref):
        np.testing.assert_allclose(ours[k], ref[k], atol=1e-6, rtol=1e-6, err_msg=k)
    # the modules PEFT adapted (GPT-2: the Conv1D c_attn and both c_proj, stored (in, out)) were merged: their
    # weights moved away from the base, so the equality above compares real updates
    with safe_open(str(folder / "adapter_model.safetensors"), "np") as f:
        adapted = {k.removeprefix("base_model.model.").split(".lora_A.")[0] for k in f.keys() if ".lora_A." in k}
    expected = {"llama": 6, "bert": 4, "gpt2": 6}[case.arch]
    assert len(adapted) == expected, sorted(adapted)
    changed = {m for m in adapted if np.abs(ref[m + ".weight"] - base[m + ".weight"]).max() > 1e-4}
    assert changed == adapted
    if case.arch == "gpt2":
        assert {m.split(".", 3)[-1] for m in adapted} == {"attn.c_attn", "attn.c_proj", "mlp.c_proj"}


# ------------------------------------------------------------------------------------------ here -> PEFT


def random_adapters(case: Case, **kw):
    targets = {"llama": "all-linear", "bert": "qv", "gpt2": "qv"}[case.arch]
    adapters = lora.init(case.params, targets=targets, key=jax.random.key(3), **kw)
    keys = iter(jax.random.split(jax.random.key(4), 100))
    return jax.tree_util.tree_map(
        lambda ad: dataclasses.replace(ad, b=0.3 * jax.random.normal(next(keys), ad.b.shape)),
        adapters,
        is_leaf=lora.is_adapter,
    )


@pytest.mark.parametrize("variant", ["plain", "rslora+patterns"])
def test_our_adapter_loads_in_peft_with_our_logits(case, variant, tmp_path):
    kw = dict(r=4, alpha=8.0)
    if variant != "plain":
        layer1 = {"llama": "model/layers_1/.*", "bert": "bert/encoder/layer_1/.*", "gpt2": "transformer/h_1/.*"}
        kw.update(use_rslora=True, rank_pattern={layer1[case.arch]: 2}, alpha_pattern={".*_0/.*": 3.0})
    adapters = random_adapters(case, **kw)
    head = None
    params = case.params
    if case.arch == "bert":  # a trained classifier head travels as modules_to_save
        head = {"classifier": jax.tree_util.tree_map(lambda x: x + 0.5, case.params["classifier"])}
        params = lpeft.with_leaves(params, head)
    lora.save_peft(adapters, tmp_path, config=case.config, base_model_name_or_path=case.base_dir, modules_to_save=head)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is (variant != "plain") and cfg["fan_in_fan_out"] is (case.arch == "gpt2")
    if variant != "plain":
        assert cfg["rank_pattern"] and all(v == 2 for v in cfg["rank_pattern"].values())

    peft_model = peft.PeftModel.from_pretrained(case.torch_base(), str(tmp_path)).eval()
    ids = inputs(2)
    ours = jax_logits(case.model, lora.wrap(params, adapters), ids)
    np.testing.assert_allclose(torch_logits(peft_model, ids), ours, atol=1e-4, rtol=1e-4)
    assert np.abs(ours - jax_logits(case.model, case.params, ids)).max() > 1e-2
    # and it reads back here unchanged
    back = lora.load_peft(tmp_path, case.params, config=case.config)
    for (p, a), (q, b) in zip(lora.adapter_items(adapters), lora.adapter_items(back.adapters)):
        assert p == q and a.r == b.r and math.isclose(a.scale, b.scale, rel_tol=1e-6)
        np.testing.assert_array_equal(a.a, b.a)
        np.testing.assert_array_equal(a.b, b.b)


def test_target_modules_are_short_and_exact(tmp_path):
    hf_config = TINY["bert"]()
    hf_config.num_labels = 2
    from lora_jax.models import bert

    config = bert.Config.from_hf(hf_config)
    params = bert.init_params(config, jax.random.key(0), "sequence-classification")
    adapters = lora.init(params, r=2, targets=[".*layer_0/attention/output/dense/kernel", ".*/query/kernel"])
    lora.save_peft(adapters, tmp_path, config=config)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    # "dense" alone would also catch intermediate.dense, output.dense and pooler.dense
    assert cfg["target_modules"] == ["layer.0.attention.output.dense", "query"]
    assert cfg["task_type"] == "SEQ_CLS"
    lora.save_peft(adapters, tmp_path / "noconfig")
    cfg = json.loads((tmp_path / "noconfig" / "adapter_config.json").read_text())
    assert "bert.encoder.layer.1.attention.self.query" in cfg["target_modules"]


def test_pattern_lookup_is_peft_rule():
    from peft.utils.other import get_pattern_key

    patterns = {"q_proj": 2, "layers.1.self_attn.v_proj": 5, r"layers\.1\d\..*": 7}
    for name in [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
        "model.layers.11.self_attn.v_proj",
        "model.layers.12.mlp.up_proj",
        "model.layers.0.mlp.up_proj",
    ]:
        key = get_pattern_key(patterns.keys(), name)
        assert lpeft.pattern_value(patterns, name, -1) == patterns.get(key, -1), name


# ----------------------------------------------------------------------------------------------- errors


# The error checks edit the Llama adapter: they run for that case only (not skipped for the others).
llama_only = pytest.mark.parametrize("case", ["llama"], indirect=True)


@pytest.fixture
def llama_adapter(case, trained, tmp_path):
    assert case.arch == "llama", "use @llama_only"
    _, folder = trained
    out = tmp_path / "edit"
    out.mkdir()
    cfg = json.loads((folder / "adapter_config.json").read_text())
    with safe_open(str(folder / "adapter_model.safetensors"), "np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}

    def write(cfg=cfg, tensors=tensors):
        (out / "adapter_config.json").write_text(json.dumps(cfg))
        save_file(tensors, str(out / "adapter_model.safetensors"))
        return out

    return cfg, tensors, write


@llama_only
def test_unknown_key_missing_target_and_shape_errors_name_the_tensor(case, llama_adapter):
    cfg, tensors, write = llama_adapter
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    bad = dict(tensors)
    bad["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = tensors[f"{q}.lora_A.weight"]
    bad["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"] = tensors[f"{q}.lora_B.weight"]
    with pytest.raises(lpeft.PeftError, match=r"layers\.7\.self_attn\.q_proj\.lora_A\.weight.*no kernel"):
        lora.load_peft(write(tensors=bad), case.params, config=case.config)
    bad = dict(tensors)
    bad["base_model.model.model.extra_head.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(lpeft.PeftError, match=r"'base_model\.model\.model\.extra_head\.weight'.*no parameter"):
        lora.load_peft(write(tensors=bad), case.params, config=case.config)
    bad = dict(tensors)
    bad[f"{q}.lora_A.weight"] = np.zeros((2, 31), np.float32)
    with pytest.raises(lpeft.PeftError, match=r"q_proj\.lora_A\.weight' has shape \(2, 31\), expected \(2, 32\)"):
        lora.load_peft(write(tensors=bad), case.params, config=case.config)
    bad = dict(tensors)
    del bad[f"{q}.lora_B.weight"]
    with pytest.raises(lpeft.PeftError, match=r"q_proj\.lora_A\.weight' has no matching .*q_proj\.lora_B\.weight"):
        lora.load_peft(write(tensors=bad), case.params, config=case.config)
    with pytest.raises(lpeft.PeftError, match=r"q_proj\.lora_A\.weight' has rank 2, .* rank 4"):
        lora.load_peft(write(cfg={**cfg, "rank_pattern": {}}), case.params, config=case.config)
    with pytest.raises(lpeft.PeftError, match="peft_type is 'IA3'"):
        lora.load_peft(write(cfg={**cfg, "peft_type": "IA3"}), case.params, config=case.config)
    with pytest.raises(NotImplementedError, match="lora_bias"):
        lora.load_peft(write(cfg={**cfg, "lora_bias": True}), case.params, config=case.config)


@llama_only
def test_dora_is_loaded_or_refused_by_name(case, llama_adapter, tmp_path):
    cfg, tensors, write = llama_adapter
    if not lpeft._has_dora():
        dora = dict(tensors)
        dora["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = np.ones(32, np.float32)
        with pytest.raises(NotImplementedError, match="DoRA"):
            lora.load_peft(write(cfg={**cfg, "use_dora": True}, tensors=dora), case.params, config=case.config)
        with pytest.raises(NotImplementedError, match="lora_magnitude_vector"):
            lora.load_peft(write(tensors=dora), case.params, config=case.config)
        return
    peft_model = train_with_peft(
        case,
        peft.LoraConfig(
            task_type="CAUSAL_LM",
            r=4,
            lora_alpha=8,
            use_dora=True,
            target_modules=["q_proj", "v_proj"],
            lora_dropout=0.0,
        ),
    )
    peft_model.save_pretrained(str(tmp_path / "dora"))
    loaded = lora.load_peft(tmp_path / "dora", case.params, config=case.config)
    ids = inputs(5)
    np.testing.assert_allclose(
        jax_logits(case.model, lora.wrap(case.params, loaded.adapters), ids),
        torch_logits(peft_model, ids),
        atol=1e-4,
        rtol=1e-4,
    )
    lora.save_peft(loaded.adapters, tmp_path / "back", config=case.config)
    again = peft.PeftModel.from_pretrained(case.torch_base(), str(tmp_path / "back"))
    np.testing.assert_allclose(torch_logits(again, ids), torch_logits(peft_model, ids), atol=1e-5, rtol=1e-5)


def test_embedding_lora_and_backbone_prefix(case, trained, tmp_path):
    """PEFT's lora_embedding_A/B on a token table (Llama), and an adapter trained on the bare backbone
    (BertModel: no 'bert.' prefix) loading onto the classifier's params (BERT)."""
    if case.arch == "llama":
        peft_model = train_with_peft(
            case, peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["embed_tokens", "o_proj"])
        )
        peft_model.save_pretrained(str(tmp_path))
        loaded = lora.load_peft(tmp_path, case.params, config=case.config)
        assert "embedding" in loaded.adapters["model"]["embed_tokens"]
        ids = inputs(6)
        np.testing.assert_allclose(
            jax_logits(case.model, lora.wrap(case.params, loaded.adapters), ids),
            torch_logits(peft_model, ids),
            atol=1e-4,
            rtol=1e-4,
        )
        lora.save_peft(loaded.adapters, tmp_path / "back", config=case.config)
        again = peft.PeftModel.from_pretrained(case.torch_base(), str(tmp_path / "back"))
        np.testing.assert_allclose(torch_logits(again, ids), torch_logits(peft_model, ids), atol=1e-5, rtol=1e-5)
    elif case.arch == "bert":
        _, folder = trained
        with safe_open(str(folder / "adapter_model.safetensors"), "np") as f:
            bare = {
                k.replace("base_model.model.bert.", "base_model.model."): f.get_tensor(k)
                for k in f.keys()
                if ".lora_" in k
            }
        save_file(bare, str(tmp_path / "adapter_model.safetensors"))
        (tmp_path / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
        a = lora.load_peft(folder, case.params, config=case.config).adapters
        b = lora.load_peft(tmp_path, case.params, config=case.config).adapters
        assert [p for p, _ in lora.adapter_items(a)] == [p for p, _ in lora.adapter_items(b)]
        for (_, x), (_, y) in zip(lora.adapter_items(a), lora.adapter_items(b)):
            np.testing.assert_array_equal(x.b, y.b)


def test_folder_and_hub_errors(case, tmp_path):
    with pytest.raises(lpeft.PeftError, match="no adapter_config.json"):
        lora.load_peft(tmp_path, case.params)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (tmp_path / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(lpeft.PeftError, match="only safetensors"):
        lora.load_peft(tmp_path, case.params)
    with pytest.raises(OSError, match="could not fetch the adapter 'nobody/no-such-adapter'.*HF_HUB_OFFLINE"):
        lora.load_peft("nobody/no-such-adapter", case.params)
