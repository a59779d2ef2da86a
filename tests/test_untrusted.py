"""Nothing silently wrong, part two (issue 30): untrusted tensors, one regex engine, validated run folders.

- every tensor read from a file this run did not write (PEFT adapters, lora_jax adapter folders, fully trained
  leaves, GGUF adapters and their alpha, Hugging Face / GGUF checkpoints) is checked for dtype, shape and
  finiteness, with one error naming the file and the tensor; ``save_peft`` refuses to write NaN / inf;
- every user- or file-supplied pattern runs on RE2 (``lora_jax.regex``): catastrophic patterns such as
  ``(.*.*)*y`` finish in bounded time (checked in a subprocess with a deadline, so the old code fails instead of
  hanging the suite), lookaround is refused with a message that says why, and only RE2's own error becomes
  "not a valid pattern";
- the ``attention`` preset keeps to attention kernels inside a block whose name contains "attention";
- a key given twice on the command line is an error; a run folder's config.yaml is validated when read back.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lora
from lora_jax import checkpoint
from lora_jax.errors import CheckpointError, ConfigError, PeftError, TargetError

ROOT = Path(__file__).resolve().parents[1]


def small_bert():
    """``(config, params)`` of a one-layer, 16-wide random BERT (numpy draws in ``init_params``' shapes)."""
    from lora_jax.models import bert

    config = bert.Config(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        vocab_size=64,
        max_position_embeddings=32,
    )
    shapes = jax.eval_shape(lambda k: bert.init_params(config, k), jax.random.key(0))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
    return config, params


# ---------------------------------------------------------------------------------------- regex: RE2


def test_catastrophic_patterns_finish_in_bounded_time():
    """``(.*.*)*y`` and friends backtrack exponentially in Python's re on a path that does not match. Every place a
    user's or a file's pattern is matched runs them here, in a child process with a deadline."""
    code = textwrap.dedent(r"""
        import time, numpy as np, lora_jax as lora
        from lora_jax import peft, sharding
        from lora_jax.errors import TargetError
        path = "encoder_" + "a" * 40
        params = {path: {"layer": {"kernel": np.ones((4, 4), np.float32)}}}
        t0 = time.perf_counter()
        for kw in ({"targets": "(.*.*)*y"}, {"targets": ".*kernel", "exclude": "(a|aa)*b"},
                   {"targets": ".*kernel", "rank_pattern": {"(.*.*)*y": 4}},
                   {"targets": ".*kernel", "alpha_pattern": {"(x+x+)+y": 4.0}}):
            try:
                lora.init(params, r=2, **kw)
                raise SystemExit(f"no error for {kw}")
            except TargetError as e:
                assert "matches no leaf" in str(e), e
        assert peft.pattern_value({"(.*.*)*y": 3}, "a" * 60, 1) == 1
        assert sharding._rule_for(path + "/layer/kernel", [("(.*.*)*y", "replicate")]) == (None, None)
        print("elapsed", time.perf_counter() - t0)
    """)
    try:
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("a catastrophic pattern did not finish within 120 s (a backtracking regex engine)")
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.split("elapsed")[-1]) < 20, out.stdout


def test_lookaround_and_backreferences_are_refused_naming_the_rule():
    params = {"attn": {"kernel": jnp.ones((4, 4))}, "mlp": {"kernel": jnp.ones((4, 4))}}
    for kw, where in (
        ({"targets": "(?!mlp).*kernel"}, "targets"),
        ({"exclude": r"(a)\1"}, "exclude"),
        ({"targets": ".*kernel", "rank_pattern": {"(?<=a).*": 2}}, "rank_pattern"),
    ):
        with pytest.raises(TargetError) as e:
            lora.init(params, r=2, **kw)
        msg = str(e.value)
        assert msg.startswith(where) and "linear-time matching" in msg and "lookaround" in msg, msg


def test_config_check_uses_the_same_engine():
    """A config's patterns are compiled by RE2 at --check: lookahead (which lora.init would refuse) is refused
    there, and ``(.*.*)*y`` passes (it runs in linear time)."""
    from train.config import load_config

    with pytest.raises(ConfigError, match=r"lora.targets: .* is not a valid pattern for linear-time matching"):
        load_config(None, ["lora.targets=(?!x).*kernel"])
    assert load_config(None, ["lora.targets=(.*.*)*y"]).lora.targets == "(.*.*)*y"


def test_only_re2_errors_become_invalid_pattern(monkeypatch):
    """An unexpected failure inside the engine (a broken install) is raised as it is, never reported as "pattern is
    not valid" (the old PEFT loader swallowed every exception, including a missing google-re2)."""
    from lora_jax import regex

    def broken(pattern):
        raise ImportError("google-re2 is broken")

    monkeypatch.setattr(regex, "_compile", broken)
    with pytest.raises(ImportError, match="broken"):
        lora.peft.pattern_value({"query": 4}, "encoder.query", 1)
    with pytest.raises(ImportError, match="broken"):
        lora.init({"attn": {"kernel": jnp.ones((4, 4))}}, r=2, targets=".*kernel")


def test_re2_is_a_core_dependency():
    """``pip install lora_jax`` alone loads a PEFT adapter with rank patterns: google-re2 is in the core deps."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("google-re2") for d in project["dependencies"])
    assert not any(d.startswith("google-re2") for d in project["optional-dependencies"]["train"])


def _lower_bound(requirement: str) -> tuple[int, ...]:
    return tuple(int(x) for x in requirement.split(">=")[1].split(",")[0].split("."))


def test_dependencies_are_what_the_library_uses():
    """chex is not imported by lora_jax (only by tests): it is a test dependency, not a core one. transformers'
    lower bound is a version that defines Qwen3, Gemma 3 and the fused expert parameters the MoE code reads
    (``mlp.experts.gate_up_proj``: 5.0); the installed version has them."""
    import importlib.util

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("chex") for d in project["dependencies"])
    assert any(d.startswith("chex") for d in project["optional-dependencies"]["test"])
    assert not [f for f in (ROOT / "lora_jax").rglob("*.py") if "import chex" in f.read_text()]
    (transformers,) = [d for d in project["dependencies"] if d.startswith("transformers")]
    assert _lower_bound(transformers) >= (5, 0), transformers
    for module in ("transformers.models.qwen3.configuration_qwen3", "transformers.models.gemma3.configuration_gemma3"):
        assert importlib.util.find_spec(module) is not None, module
    moe = importlib.util.find_spec("transformers.models.qwen3_moe.modeling_qwen3_moe").origin
    assert "self.gate_up_proj = nn.Parameter" in Path(moe).read_text()


# ----------------------------------------------------------------------------------- attention preset


def test_attention_preset_skips_mlp_kernels_inside_an_attention_named_block():
    x = lambda: jnp.ones((4, 4))  # noqa: E731
    params = {
        # a transformer layer named like attention: its inner attention counts, its own dense layers do not
        "AttentionBlock_0": {
            "MultiHeadDotProductAttention_0": {n: {"kernel": x()} for n in ("query", "key", "value", "out")},
            "Dense_0": {"kernel": x()},
            "Dense_1": {"kernel": x()},
        },
        # an attention block that holds its MLP in a module named like one
        "layers_0": {
            "attention": {
                **{n: {"kernel": x()} for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
                "mlp": {"fc1": {"kernel": x()}, "fc2": {"kernel": x()}},
                "feed_forward": {"w1": {"kernel": x()}},
            }
        },
        # GPT-2's names: the kernel's own module is called c_attn, its block attn
        "h_0": {"attn": {"c_attn": {"kernel": x()}, "c_proj": {"kernel": x()}}, "mlp": {"c_fc": {"kernel": x()}}},
    }
    chosen = {p for p, _ in lora.targets.select(params, "attention")}
    assert chosen == {
        *(f"AttentionBlock_0/MultiHeadDotProductAttention_0/{n}/kernel" for n in ("query", "key", "value", "out")),
        *(f"layers_0/attention/{n}/kernel" for n in ("q_proj", "k_proj", "v_proj", "o_proj")),
        "h_0/attn/c_attn/kernel",
        "h_0/attn/c_proj/kernel",
    }


# ------------------------------------------------------------------------------------ untrusted tensors


def _poison(x: np.ndarray, value: float) -> np.ndarray:
    x = np.array(x, copy=True)
    x.flat[min(5, x.size - 1)] = value
    return x


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_peft_adapter_with_non_finite_tensor_is_refused_naming_it(tmp_path, value):
    from safetensors.numpy import load_file, save_file

    config, params = small_bert()
    adapters = lora.init(params, r=2, targets="qv")
    adapters = jax.tree.map(lambda x: x + 0.1, adapters)  # B != 0
    folder = lora.save_peft(adapters, tmp_path / "peft", config=config)
    tensors = load_file(folder / "adapter_model.safetensors")
    key = sorted(k for k in tensors if k.endswith("lora_B.weight"))[0]
    tensors[key] = _poison(tensors[key], value)
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(PeftError) as e:
        lora.load_peft(folder, params, config=config)
    msg = str(e.value)
    assert key in msg and ("1 NaN" if value != value else "1 inf") in msg and "\n" not in msg, msg
    # an integer tensor is refused too (dtype)
    tensors[key] = np.zeros(tensors[key].shape, np.int32)
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(PeftError, match="dtype int32, expected a floating-point tensor"):
        lora.load_peft(folder, params, config=config)


def test_save_peft_refuses_non_finite_adapters_and_writes_nothing(tmp_path):
    config, params = small_bert()
    adapters = lora.init(params, r=2, targets="qv")
    path, ad = next(iter(lora.adapter_items(adapters)))
    bad = jax.tree.map(lambda x: x, adapters)
    lora.tree.put(bad, path, dataclasses.replace(ad, b=ad.b.at[0, 0].set(jnp.nan)))
    with pytest.raises(PeftError, match=r"lora_B.weight' holds 1 NaN .*nothing was written"):
        lora.save_peft(bad, tmp_path / "out", config=config)
    assert not (tmp_path / "out").exists()


def test_lora_jax_adapter_folder_and_trained_leaves_with_nan_are_refused(tmp_path):
    params = {"attention": {"kernel": jnp.ones((4, 4))}}
    adapters = jax.tree.map(lambda x: x.at[0, 0].set(jnp.inf) if x.ndim == 2 else x, lora.init(params, r=2))
    folder = checkpoint.save_adapters(tmp_path / "ad", adapters)
    with pytest.raises(
        CheckpointError,
        match=r"arrays: tensor 'attention/kernel/a' holds 0 NaN and 1 inf of 8 "
        r"values \(first at index \(0, 0\)\)",
    ):
        checkpoint.load_adapters(folder)
    head = {"classifier": {"kernel": jnp.ones((3, 2)).at[2, 1].set(jnp.nan), "bias": jnp.ones(2)}}
    saved = lora.save_trained(tmp_path / "params", head)
    with pytest.raises(CheckpointError, match=r"params: tensor 'classifier/kernel' holds 1 NaN"):
        lora.load_trained(saved, head)


def test_hf_checkpoint_tensor_with_nan_is_refused_naming_it():
    from lora_jax.models import hf

    config, params = small_bert()
    tensors = hf.to_hf_weights(params, config)
    name = next(n for n in tensors if n.endswith("query.weight"))
    tensors[name] = _poison(tensors[name], float("nan"))
    with pytest.raises(CheckpointError, match=rf"merged/model.safetensors: tensor '{name}' holds 1 NaN"):
        hf.from_hf_weights(config, tensors, "merged/model.safetensors")


def _tiny_llama():
    from lora_jax.models import llama

    config = llama.Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    return config


def _rewrite_gguf(src: Path, dst: Path, *, alpha=None, poison: str | None = None) -> Path:
    """A copy of a GGUF adapter file with ``adapter.lora.alpha`` replaced and / or a NaN in tensor ``poison``."""
    import gguf

    from lora_jax.models import gguf as gguf_io

    reader = gguf_io.open_gguf(src)
    meta = gguf_io.metadata(reader)
    w = gguf.GGUFWriter(str(dst), meta["general.architecture"])
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", meta["adapter.lora.alpha"] if alpha is None else alpha)
    for t in reader.tensors:
        x = gguf_io.dequantize(t, np.float32)
        w.add_tensor(t.name, _poison(x, float("nan")) if t.name == poison else x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_gguf_adapter_alpha_and_tensors_are_checked(tmp_path):
    from lora_jax import gguf_export as ge

    config = _tiny_llama()
    params = {
        "model": {
            "layers_0": {
                "self_attn": {n: {"kernel": jnp.ones((32, 32 if n == "q_proj" else 16))} for n in ("q_proj", "v_proj")}
            }
        }
    }
    adapters = jax.tree.map(lambda x: x + 0.1, lora.init(params, r=2, targets="qv"))
    good = ge.save_gguf_adapter(adapters, tmp_path / "a.gguf", base=config)
    ge.load_gguf_adapter(good, config)  # reads back
    with pytest.raises(CheckpointError, match="adapter.lora.alpha must be a finite number, got nan"):
        ge.load_gguf_adapter(_rewrite_gguf(good, tmp_path / "nan-alpha.gguf", alpha=float("nan")), config)
    with pytest.raises(CheckpointError, match="adapter.lora.alpha must be >= 0"):
        ge.load_gguf_adapter(_rewrite_gguf(good, tmp_path / "neg-alpha.gguf", alpha=-4.0), config)
    with pytest.raises(CheckpointError, match=r"tensor 'blk.0.attn_v.weight.lora_b' holds 1 NaN"):
        ge.load_gguf_adapter(_rewrite_gguf(good, tmp_path / "nan-b.gguf", poison="blk.0.attn_v.weight.lora_b"), config)


# ------------------------------------------------------------------------------------ configs read back


def test_a_key_given_twice_on_the_command_line_is_an_error():
    from train.config import load_config

    with pytest.raises(ConfigError, match=r"lora.r is already given on this command line \('lora.r=8'\)"):
        load_config(None, ["lora.r=8", "lora.r=16"])
    assert load_config(None, ["lora.r=8", "lora.alpha=16"]).lora.r == 8


def test_a_run_folders_config_is_validated_when_read_back(tmp_path):
    """``train.predict --run`` reads config.yaml as a command line is read: an edited file with a pattern RE2
    refuses, or a combination validate() refuses, is one ConfigError naming the file."""
    from train import config as config_lib
    from train import outputs

    run = tmp_path / "run-1"
    run.mkdir()
    good = config_lib.load_config(None).to_dict()
    for section, key, value, message in (
        ("lora", "targets", "(?=q).*kernel", "not a valid pattern"),
        ("optim", "weight_decay", 20.0, "lr x weight_decay must be < 1"),
    ):
        bad = json.loads(json.dumps(good))
        bad[section][key] = value
        if key == "weight_decay":
            bad["optim"]["name"], bad["optim"]["lr"] = "adamw", 0.1
        (run / "config.yaml").write_text(config_lib.yaml.safe_dump(bad))
        with pytest.raises(ConfigError, match=f"--run: {run / 'config.yaml'} is damaged .*{message}"):
            outputs.saved_config(run, "--run")


# ------------------------------------------------------------------------------------------ CI strictness

# A skip call whose text says something is missing (or looks for it) is a dependency skip: it must go through
# conftest's helpers, which fail under LORA_JAX_CI=1. llama.cpp (the [gguf] extra) is optional: CI lacks it.
_MISSING_WORDS = ("install", "missing", "needed", "find_spec", "which(", "import")
_OPTIONAL = ("llama-cpp", "llama.cpp", "llamacpp")


def test_tests_never_skip_a_required_dependency_directly():
    """Every optional-dependency check goes through tests/conftest.py (require / require_program / missing), so
    that CI fails instead of skipping; this reads every skip call in the tests (``ast``) for a direct skip or
    importorskip of one. A skip for another reason ("one GGUF case" of a parametrisation) passes."""
    import ast

    bad = []
    for file in sorted((ROOT / "tests").glob("*.py")):
        if file.name == "conftest.py":
            continue
        text = file.read_text()
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.Call):
                continue
            name = ast.get_source_segment(text, node.func) or ""
            if not name.endswith(("skip", "skipif", "import" + "orskip")):
                continue
            call = (ast.get_source_segment(text, node) or "").lower()
            direct = name.endswith("import" + "orskip") or any(w in call for w in _MISSING_WORDS)
            if direct and not any(w in call for w in _OPTIONAL):
                bad.append(f"{file.name}:{node.lineno}: {call[:100]}")
    assert not bad, "skip a required dependency with conftest.require / require_program / missing:\n" + "\n".join(bad)


def test_ci_mode_fails_where_a_skip_would_hide_a_missing_dependency(tmp_path):
    """Under LORA_JAX_CI=1 the helpers fail (exit 1, 'is an error, not a skip'); without it they skip."""
    test = tmp_path / "test_dep.py"
    test.write_text(
        "from conftest import require, require_program\n"
        "def test_module():\n    require('no_such_module_xyz')\n"
        "def test_program():\n    require_program('no-such-program-xyz')\n"
    )
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    for ci, want in (("1", "2 failed"), ("0", "2 skipped")):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                str(test),
                "-q",
                "-p",
                "no:cacheprovider",
                "-n",
                "0",
                "-p",
                "no:randomly",
                "--rootdir",
                str(tmp_path),
                "-c",
                "/dev/null",
            ],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=300,
            env={**__import__("os").environ, "LORA_JAX_CI": ci},
        )
        assert want in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]


# ------------------------------------------------------------------------------------------------- data


def test_the_completion_column_may_not_also_fill_the_prompt():
    """data.prompt_column = data.completion_column (or a template field naming the completion column) would train
    with the answer inside the prompt; --check refuses it."""
    from train.config import load_config

    with pytest.raises(
        ConfigError,
        match=r"data.completion_column='text' is also read into the prompt \(through "
        r"data.prompt_column\)",
    ):
        load_config(None, ["data.prompt_column=text", "data.completion_column=text"])
    with pytest.raises(ConfigError, match=r"is also read into the prompt \(through data.prompt_template="):
        load_config(None, ["data.prompt_template='Q: {prompt} A: {completion}'"])
    load_config(None, ["data.prompt_column=question", "data.completion_column=answer"])


def test_cells_that_are_not_text_are_refused_naming_the_row(tmp_path):
    """A chat ``messages`` column (a list of dicts) would be trained as its Python text form; a missing (null)
    completion as the text 'None'. Both are one DataError naming the file, the row and the column."""
    from train import data as data_lib
    from train.config import load_config

    rows = [{"prompt": "hi", "completion": "hello"}] * 3 + [
        {"prompt": [{"role": "user", "content": "hi"}], "completion": "hello"}
    ]
    file = tmp_path / "chat.jsonl"
    file.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = load_config(None, [f"data.source={file}"])
    with pytest.raises(lora.LoraJaxError) as e:
        data_lib.load_rows(cfg.data, "train")
    msg = str(e.value)
    assert f"{file} row 4: column 'prompt' holds a list" in msg and "expected text" in msg, msg
    assert "chat" in msg and "\n" not in msg, msg
    file.write_text(
        "\n".join(json.dumps(r) for r in [{"prompt": "hi", "completion": "a"}, {"prompt": "ho", "completion": None}])
        + "\n"
    )
    with pytest.raises(
        lora.LoraJaxError,
        match=r"row 2: column 'completion' holds a NoneType \(None\), expected "
        r"text$",
    ):
        data_lib.load_rows(cfg.data, "train")
    # a number in a template field is formatted as the template says: accepted
    file.write_text(json.dumps({"q": "2+2", "n": 4, "completion": "4"}) + "\n")
    ok = load_config(None, [f"data.source={file}", "data.prompt_template='{q} ({n})'"])
    assert len(data_lib.load_rows(ok.data, "train")) == 1
