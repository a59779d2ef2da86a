"""Property tests (hypothesis) for the two places where user input meets the project: the config loader and the
target rules of ``lora.init``.

Config: ``load_config(None, overrides)`` with random ``dotted.key=value`` overrides (real keys, near-misses of
real keys, random text; YAML-ish values, valid or not) either returns a :class:`Config` whose every field has its
declared type (and survives a dump / load round trip), or raises :class:`ConfigError` whose message names the
offending key; never any other exception.

Targets: ``lora.init`` over a random small parameter tree (nested dicts of kernels of varied rank and dtype,
integer leaves, embedding tables, heads) with random presets / regex lists / excludes either adapts exactly the
leaves the documented rules select, with consistent adapter shapes, ``B = 0`` and a model output equal to the
base, or raises a ``ValueError`` of the kind the rules predict (a rule that matches nothing lists the candidates).
"""

from __future__ import annotations

import dataclasses
import math
import re
import string
import types
import typing
from typing import Any, Literal, get_args, get_origin

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, example, given, note, settings
from hypothesis import strategies as st

import lora_jax as lora
from lora_jax import targets as targets_lib
from train import config as config_lib
from train.config import Config, ConfigError, load_config

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=False)

# ---------------------------------------------------------------------------------------------- config

SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
SECTION_TYPES = typing.get_type_hints(Config)
FIELD_TYPES = {f"{s}.{name}": tp for s, cls in SECTION_TYPES.items() for name, tp in typing.get_type_hints(cls).items()}
REAL_KEYS = sorted(FIELD_TYPES)
PEFT_NAMES = [
    "lora.rank",
    "lora.lora_alpha",
    "lora.target_modules",
    "optim.learning_rate",
    "train.max_steps",
    "optimizer.lr",
    "output.output_dir",
    "train.per_device_train_batch_size",
]
KEY_CHARS = string.ascii_lowercase + string.digits + "._-"


def _literal_values(tp: Any) -> set[str]:
    if get_origin(tp) is Literal:
        return {str(a) for a in get_args(tp)}
    return set().union(*(_literal_values(a) for a in get_args(tp))) if get_args(tp) else set()


LITERALS = set().union(*(_literal_values(tp) for tp in FIELD_TYPES.values()))


@st.composite
def near_miss(draw, key: str) -> str:
    """``key`` with one typo: a character dropped, doubled, swapped, replaced or upper-cased, a segment added or
    dropped, or blanks around it."""
    i = draw(st.integers(0, len(key) - 1))
    kind = draw(
        st.sampled_from(["drop", "double", "swap", "replace", "upper", "deeper", "section", "blank", "empty_segment"])
    )
    if kind == "drop":
        return key[:i] + key[i + 1 :]
    if kind == "double":
        return key[:i] + key[i] + key[i:]
    if kind == "swap" and i + 1 < len(key):
        return key[:i] + key[i + 1] + key[i] + key[i + 2 :]
    if kind == "replace":
        return key[:i] + draw(st.sampled_from(KEY_CHARS)) + key[i + 1 :]
    if kind == "upper":
        return key.upper() if i % 2 else key.capitalize()
    if kind == "deeper":
        return key + "." + draw(st.sampled_from(["x", "r", "lr", "value", "0"]))
    if kind == "section":
        return key.split(".")[0]
    if kind == "blank":
        return f" {key} "
    if kind == "empty_segment":
        return draw(st.sampled_from([key + ".", "." + key, key.replace(".", "..", 1)]))
    return key


keys = st.one_of(
    st.sampled_from(REAL_KEYS),
    st.sampled_from(REAL_KEYS).flatmap(near_miss),
    st.sampled_from(PEFT_NAMES + sorted(SECTIONS)),
    st.text(KEY_CHARS, min_size=0, max_size=16),
)

scalars = st.one_of(
    st.integers(-3, 10**6).map(str),
    st.integers().map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        [
            "null",
            "~",
            "true",
            "false",
            "yes",
            "no",
            "on",
            "off",
            "True",
            "3e-4",
            "3.0e-4",
            "1e3",
            ".5",
            "0x1F",
            "0o17",
            "1_000",
            ".inf",
            "-.inf",
            ".nan",
            "'quoted'",
            '"dq"',
            "''",
            "",
            "  ",
            "-1",
            "0",
            "2.5",
            "1.5",
            "0.1",
            "8",
            "64",
            "2001-12-14",
            "12:30",
            "a: b",
            "- x",
            "ä",
            "\t",
        ]
    ),
    # values of the Literal fields, right and nearly right
    st.sampled_from(sorted(LITERALS) + ["Adamw", "fp16", "lora ", "qv", "attention", "all-linear"]),
    st.text(string.ascii_letters + string.digits + " ._-/:[]{},'\"!&*#", max_size=12),
)


def _yaml_list(items: list[str]) -> str:
    return "[" + ", ".join(items) + "]"


values = st.one_of(
    scalars,
    st.lists(scalars, max_size=3).map(_yaml_list),
    st.dictionaries(st.sampled_from(["a", ".*q_proj", "r", "lr", "1", "x/kernel"]), scalars, max_size=2).map(
        lambda d: "{" + ", ".join(f"{k!r}: {v}" for k, v in d.items()) + "}"
    ),
    st.sampled_from(
        [
            "[unclosed",
            "{a: ",
            "!!int abc",
            "!!bool maybe",
            "!!float x",
            "!!timestamp 12",
            "!!binary ###",
            "!!python/object:os.system",
            "!!set {a}",
            "*alias",
            "&a [*a]",
            "&a {r: *a}",
            "[" * 200 + "]" * 200,
            "[" * 3000 + "]" * 3000,
            "{r: 4, alpha: 8}",
            "{r: 0}",
            "{}",
            "[]",
            "[[1]]",
            "[1, 2]",
            "[q_proj, v_proj]",
            "{'.*': 4}",
            "{'.*': 0}",
        ]
    ),
)


@st.composite
def override_lists(draw) -> list[str]:
    items = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.integers(0, 15))
        if kind == 0:
            items.append(draw(st.sampled_from(["lora", "lora.r", "", "=", "lora.r=3=4"])))  # no '=' / odd shapes
        elif kind < 9:  # a real key with a value of its declared type (written as YAML, maybe unquoted)
            key = draw(st.sampled_from(REAL_KEYS))
            value = draw(_value_of(FIELD_TYPES[key]))
            text = _to_yaml(value)
            if isinstance(value, str) and draw(st.booleans()):
                text = value  # unquoted: 'null', '3' or 'true' then read as other types
            items.append(f"{key}={text}")
        else:
            items.append(f"{draw(keys)}={draw(values)}")
    return items


def conforms(value: Any, tp: Any) -> bool:
    """``value`` has the annotated type ``tp`` exactly (bool is not an int, an int is not a float)."""
    origin = get_origin(tp)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, a) for a in get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        return type(value) is list and all(conforms(v, get_args(tp)[0]) for v in value)
    if origin is dict:
        k_tp, v_tp = get_args(tp)
        return type(value) is dict and all(conforms(k, k_tp) and conforms(v, v_tp) for k, v in value.items())
    if tp in (float, int, bool, str):
        return type(value) is tp
    raise AssertionError(f"conforms: no rule for {tp}")


def _names_a_key(message: str, overrides: list[str]) -> bool:
    """The message names (a dotted prefix of) one of the override keys, or quotes an override that has no key
    (whole, or as ``train.config.short`` bounds a long one)."""
    for text in overrides:
        quoted = {repr(text), config_lib.short(text)}
        if "=" not in text:
            if any(q in message for q in quoted):
                return True
            continue
        if any(q in message for q in quoted):  # 'override 'lora.r=!!int abc': value is not valid YAML'
            return True
        key = text.split("=", 1)[0].strip()
        parts = key.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix and re.search(r"(?<![\w.])" + re.escape(prefix) + r"(?!\w)", message):
                return True
    return False


def _has_nan(cfg: Config) -> bool:
    return any(
        isinstance(v, float) and math.isnan(v) for section in dataclasses.asdict(cfg).values() for v in section.values()
    )


@SETTINGS
@given(override_lists())
@example(["lora.r=!!int abc"])
@example(["lora.r=!!bool maybe"])
@example(["lora.alpha=!!timestamp 12"])
@example(["lora.targets=" + "[" * 3000 + "]" * 3000])
@example(["lora.r=3", "lora=5"])
@example(["lora=5", "lora.r=3"])
@example([".lora.r=3"])
@example(["lora..r=3"])
@example(["=4"])
def test_config_overrides_either_valid_or_config_error(tmp_path_factory, overrides):
    note(f"overrides={overrides!r}")
    try:
        cfg = load_config(None, overrides)
    except ConfigError as e:
        event("ConfigError")
        assert _names_a_key(str(e), overrides), f"{e} does not name any of the keys of {overrides}"
        return
    event("valid Config")
    # any other exception type propagates and fails the test
    assert isinstance(cfg, Config)
    for section, cls in SECTION_TYPES.items():
        sub = getattr(cfg, section)
        assert isinstance(sub, cls)
        for name, tp in typing.get_type_hints(cls).items():
            assert conforms(getattr(sub, name), tp), (f"{section}.{name}", getattr(sub, name), tp)
    config_lib.validate(cfg)
    if not _has_nan(cfg):  # nan != nan
        path = tmp_path_factory.mktemp("cfg") / "cfg.yaml"
        path.write_text(config_lib.dump(cfg))
        assert load_config(path) == cfg


@SETTINGS
@given(st.sampled_from(REAL_KEYS).flatmap(near_miss), st.sampled_from(["4", "0.5", "true", "qv", "null", "[a]"]))
def test_config_misspelt_key_suggests_a_real_key(key, value):
    """A key that is not in the schema is an error naming it; a 'did you mean' names a key that exists."""
    stripped = key.strip()
    assume(stripped not in FIELD_TYPES and stripped not in SECTIONS)
    # 'lora.rank_pattern.x=4' is a real override: one entry of a mapping field
    assume(not any(stripped.startswith(k + ".") for k, tp in FIELD_TYPES.items() if _is_mapping(tp)))
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"{key}={value}"])
    message = str(info.value)
    assert _names_a_key(message, [f"{key}={value}"]), message
    for suggestion in re.findall(r"did you mean '([^']*)'", message):
        assert suggestion in FIELD_TYPES or suggestion in SECTIONS, (key, suggestion)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from(REAL_KEYS), min_size=1, max_size=4, unique=True), st.data())
def test_config_valid_values_round_trip(fields, data):
    """Values drawn from each field's own type are accepted (unless a value check names them) and kept."""
    overrides, expected = [], {}
    for key in fields:
        value = data.draw(_value_of(FIELD_TYPES[key]), label=key)
        overrides.append(f"{key}={_to_yaml(value)}")
        expected[key] = value
    try:
        cfg = load_config(None, overrides)
    except ConfigError as e:
        assert _names_a_key(str(e), overrides), str(e)
        assert "expected" not in str(e), f"a value of the declared type was refused: {e}"
        return
    for key, value in expected.items():
        section, name = key.split(".")
        got = getattr(getattr(cfg, section), name)
        assert got == value or (isinstance(value, float) and math.isnan(value) and math.isnan(got)), (key, got, value)


def _is_mapping(tp: Any) -> bool:
    return get_origin(tp) is dict or any(_is_mapping(a) for a in get_args(tp) if get_origin(tp) is not Literal)


def _value_of(tp: Any) -> st.SearchStrategy:
    origin = get_origin(tp)
    if origin is Literal:
        return st.sampled_from(get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return st.one_of([_value_of(a) for a in get_args(tp)])
    if tp is type(None):
        return st.none()
    if origin is list:
        return st.lists(_value_of(get_args(tp)[0]), max_size=3)
    if origin is dict:
        k_tp, v_tp = get_args(tp)
        return st.dictionaries(_value_of(k_tp), _value_of(v_tp), max_size=2)
    if tp is float:
        return st.floats(-1e6, 1e6, allow_nan=False).filter(lambda x: x == 0 or abs(x) > 1e-30)
    if tp is int:
        return st.integers(-5, 10**6)
    if tp is bool:
        return st.booleans()
    if tp is str:
        return st.text(string.ascii_letters + string.digits + " ._-/:", max_size=10)
    raise AssertionError(tp)


def _to_yaml(value: Any) -> str:
    """A YAML flow value for ``value`` (strings always quoted, so 'null' or '3' stay strings)."""
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return repr(value) if "e" in repr(value) or "." in repr(value) else f"{value:.1f}"
    if isinstance(value, list):
        return "[" + ", ".join(_to_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_to_yaml(k)}: {_to_yaml(v)}" for k, v in value.items()) + "}"
    return str(value)


# --------------------------------------------------------------------------------------------- targets

BRANCHES = [
    "attention",
    "attn",
    "self_attn",
    "mlp",
    "layer_0",
    "layer_1",
    "encoder",
    "query",
    "value",
    "key",
    "q_proj",
    "v_proj",
    "o_proj",
    "out",
    "dense",
    "c_attn",
    "c_proj",
    "embeddings",
    "wte",
    "lm_head",
    "classifier",
    "head",
    "norm",
]
ATTENTION_BRANCHES = [
    "attention",
    "attn",
    "self_attn",
    "query",
    "value",
    "q_proj",
    "v_proj",
    "c_attn",
    "SelfAttention_0",
    "attention_1",
]
LEAVES = ["kernel", "weight", "w", "bias", "scale", "embedding", "count", "step"]
DTYPES = ["float32", "float32", "bfloat16", "float16", "int32", "int8", "uint8", "bool"]


@st.composite
def param_trees(draw, depth: int = 0) -> dict:
    """A nested dict of arrays: 1-3 children per node, up to 3 levels, leaves of 0-4 axes (sizes 1-5)."""
    tree = {}
    for _ in range(draw(st.integers(1, 3))):
        if depth < 2 and draw(st.booleans()):
            name = draw(st.sampled_from(BRANCHES if draw(st.booleans()) else ATTENTION_BRANCHES))
            if name not in tree:
                tree[name] = draw(param_trees(depth + 1))
        else:
            name = draw(st.sampled_from(LEAVES))
            shape = tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=4)))
            dtype = draw(st.sampled_from(DTYPES))
            if name in ("kernel", "weight", "w", "embedding") and draw(st.integers(0, 4)):  # mostly kernel-like
                shape = tuple(draw(st.lists(st.integers(2, 5), min_size=2, max_size=3)))
                dtype = draw(st.sampled_from(["float32", "float32", "bfloat16", "float16"]))
            tree.setdefault(name, (shape, dtype))
    if depth == 0 and draw(st.integers(0, 3)):  # most trees hold an attention block with a kernel
        block = tree.setdefault(draw(st.sampled_from(ATTENTION_BRANCHES)), {})
        if isinstance(block, dict):
            block.setdefault(
                draw(st.sampled_from(["kernel", "weight", "w"])),
                (tuple(draw(st.lists(st.integers(2, 5), min_size=2, max_size=3))), "float32"),
            )
    return tree


def _materialise(spec: dict, seed: int) -> dict:
    rng = np.random.default_rng(seed)

    def make(node):
        if isinstance(node, dict):
            return {k: make(v) for k, v in node.items()}
        shape, dtype = node
        if dtype == "bool":
            return jnp.asarray(rng.integers(0, 2, shape).astype(bool))
        if np.issubdtype(np.dtype(dtype), np.integer):
            return jnp.asarray(rng.integers(0, 5, shape), dtype=dtype)
        return jnp.asarray(rng.normal(size=shape), dtype=dtype)

    return make(spec)


@st.composite
def rule_sets(draw, paths: list[str], kernels: list[str]):
    """A list of 1-3 regexes built from the tree's own paths (whole, by suffix, generalised; mostly of its
    kernels) and from nowhere."""

    def one():
        path = draw(st.sampled_from(kernels if kernels and draw(st.integers(0, 3)) else paths))
        parts = path.split("/")
        if draw(st.integers(0, 4)):  # mostly rules from the tree's own paths
            return draw(
                st.sampled_from(
                    [
                        re.escape(path),
                        re.escape(path),
                        ".*" + re.escape(parts[-1]),
                        "(.*/)?" + "/".join(map(re.escape, parts[-2:])),
                        ".*" + re.escape(parts[0]) + "/.*",
                    ]
                )
            )
        return draw(
            st.sampled_from(
                [
                    r".*/(kernel|weight)",
                    ".*kernel",
                    ".*",
                    ".*nothing/kernel",
                    "attention/.*",
                    "q_proj/kernel",
                    "(unclosed",
                    "[a-",
                    "*kernel",
                ]
            )
        )

    return [one() for _ in range(draw(st.integers(1, 3)))]


@st.composite
def target_cases(draw):
    spec = draw(param_trees())
    params = _materialise(spec, draw(st.integers(0, 2**16)))
    paths = [p for p, _ in targets_lib.leaf_paths(params)]
    kernels = [p for p, x in targets_lib.leaf_paths(params) if _kernel_like(x) and not targets_lib.is_embedding(p)]
    kind = draw(st.sampled_from(["default", "preset", "rules", "rule", "word"]))
    if kind == "default":
        targets = None
    elif kind == "preset":
        targets = draw(st.sampled_from(sorted(targets_lib.PRESETS)))
    elif kind == "rules":
        targets = draw(rule_sets(paths, kernels))
    elif kind == "rule":
        targets = draw(rule_sets(paths, kernels))[0]
    else:
        targets = draw(st.sampled_from(["qvv", "atention", "all-linears", "linear", "kernel", "q-proj"]))
    exclude = draw(rule_sets(paths, kernels)) if draw(st.integers(0, 2)) == 0 else None
    r = draw(st.integers(1, 3))
    return params, targets, exclude, r


def _compiles(rule: str) -> bool:
    try:
        re.compile(rule)
        return True
    except re.error:
        return False


def _kernel_like(leaf) -> bool:
    return leaf.ndim >= 2 and jnp.issubdtype(leaf.dtype, jnp.floating)


def _attention_by_content(paths: list[str]) -> set[str]:
    """The documented second rule of the "attention" preset, written out: ``node/P/(kernel|weight|w)`` where
    ``P`` is a q/k/v/output projection name and ``node``'s children include a whole q, k, v triple."""
    out = set()
    for p in paths:
        parts = p.split("/")
        if (
            len(parts) < 2
            or parts[-1] not in ("kernel", "weight", "w")
            or parts[-2] not in targets_lib.ATTENTION_PROJECTIONS
        ):
            continue
        node = parts[:-2]
        kids = {
            q.split("/")[len(node)]
            for q in paths
            if q.split("/")[: len(node)] == node and len(q.split("/")) > len(node)
        }
        if any(set(qkv) <= kids for qkv in targets_lib.QKV_NAMES):
            out.add(p)
    return out


def _attention_by_name(paths: list[str]) -> set[str]:
    """The documented name rule of the "attention" preset: below a component named like attention, not below an
    MLP-named module inside it, and not in a block that holds a further attention-named block (the kernel's own
    module, e.g. c_attn, names a projection, not a block)."""
    attn = lambda c: re.fullmatch(r"(?i)[^/]*(attention|attn)[^/]*|mha(_\d+)?", c) is not None  # noqa: E731
    outer = set()
    for p in paths:
        parts = p.split("/")
        blocks = [i for i in range(len(parts) - 2) if attn(parts[i])]
        outer |= {"/".join(parts[: i + 1]) for i in blocks[:-1]}
    out = set()
    for p in paths:
        parts = p.split("/")
        named = [i for i in range(len(parts) - 1) if attn(parts[i])]
        if (
            named
            and "/".join(parts[: named[-1] + 1]) not in outer
            and not any("mlp" in c.lower() for c in parts[named[-1] + 1 : -1])
        ):  # (BRANCHES' only MLP name)
            out.add(p)
    return out


def expected_selection(params, targets, exclude) -> tuple[dict, set[str], dict]:
    """The documented rules, written out independently of ``lora_jax.targets.select``.

    Returns ``(chosen, errors, candidates)``: ``chosen`` maps path -> leaf when nothing is wrong; ``errors`` is the
    set of error kinds that apply (any one of them may be the one raised); ``candidates`` the paths an error for
    a rule that matches nothing must list (for targets: floating kernels that are not embeddings; for exclude:
    every leaf).
    """
    leaves = dict(targets_lib.leaf_paths(params))
    errors = set()
    kernels = [p for p, x in leaves.items() if _kernel_like(x) and not targets_lib.is_embedding(p)]
    candidates = {"targets": kernels, "exclude": list(leaves)}
    ex_rules = [exclude] if isinstance(exclude, str) else list(exclude or [])
    if not all(_compiles(r) for r in ex_rules):
        return {}, {"invalid regex"}, candidates
    if any(not any(re.fullmatch(r, p) for p in leaves) for r in ex_rules):
        errors.add("exclude matches nothing")
    excluded = {p for p in leaves if any(re.fullmatch(r, p) for r in ex_rules)}

    chosen = {}
    if targets is None or (isinstance(targets, str) and targets in targets_lib.PRESETS):
        name = targets or targets_lib.DEFAULT_PRESET
        preset = targets_lib.PRESETS[name]
        by_content = _attention_by_content(list(leaves)) if name == "attention" else set()
        by_name = _attention_by_name(list(leaves)) if name == "attention" else None
        for p, x in leaves.items():
            named = any(re.fullmatch(r, p) for r in preset) and (by_name is None or p in by_name)
            if (
                (named or p in by_content)
                and _kernel_like(x)
                and not targets_lib.is_embedding(p)
                and not targets_lib.is_head(p)
                and p not in excluded
            ):
                chosen[p] = x
        if not chosen:
            errors.add("preset matches nothing")
        return chosen, errors, candidates
    rules = [targets] if isinstance(targets, str) else list(targets)
    if not all(_compiles(r) for r in rules):
        return {}, errors | {"invalid regex"}, candidates
    if (
        isinstance(targets, str)
        and re.fullmatch(r"[a-z]+(-[a-z]+)*", targets)
        and not any(re.fullmatch(targets, p) for p in leaves)
    ):
        return {}, errors | {"not a preset"}, candidates
    for rule in rules:
        hits = [p for p in leaves if re.fullmatch(rule, p)]
        if not hits:
            errors.add("rule matches nothing")
        for p in hits:
            if p in excluded:
                continue
            x = leaves[p]
            if not jnp.issubdtype(x.dtype, jnp.floating):
                errors.add("not floating")
            elif x.ndim < 2:
                errors.add("not two axes")
            elif targets_lib.is_embedding(p):
                errors.add("embedding")
            else:
                chosen[p] = x
    if not chosen:
        errors.add("nothing after exclude")
    return chosen, errors, candidates


ERROR_MESSAGES = {
    "invalid regex": "is not a valid pattern",
    "exclude matches nothing": "exclude rule .* matches no leaf",
    "preset matches nothing": "matches no kernel",
    "rule matches nothing": "targets rule .* matches no leaf",
    "not a preset": "is neither a preset",
    "not floating": "not a floating-point array",
    "not two axes": "at least two axes",
    "embedding": "embedding table",
    "nothing after exclude": "select nothing once exclude",
    "rank": r"exceeds min\(d_in, d_out\)",
}


def _listed_candidates(message: str) -> list[str]:
    tail = message.split("Candidates:", 1)[1]
    return [line.strip() for line in tail.splitlines() if line.strip() and not line.strip().startswith("...")]


@settings(SETTINGS, max_examples=100)  # each example is a few small jitted products: cheap
@given(target_cases())
def test_init_adapts_exactly_the_selected_leaves(case):
    params, targets, exclude, r = case
    note(f"targets={targets!r} exclude={exclude!r} r={r}")
    note("leaves: " + ", ".join(f"{p}{tuple(x.shape)}:{x.dtype}" for p, x in targets_lib.leaf_paths(params)))
    chosen, errors, candidates = expected_selection(params, targets, exclude)
    if not errors:  # a rank above a kernel's smaller side is the only other way init can refuse
        for p, x in chosen.items():
            n_in = targets_lib.default_in_axes(p, x.ndim)
            if r > min(math.prod(x.shape[:n_in]), math.prod(x.shape[n_in:])):
                errors.add("rank")
    try:
        adapters = lora.init(params, r=r, targets=targets, exclude=exclude, key=jax.random.key(0))
    except ValueError as e:
        message = str(e)
        event(f"ValueError ({', '.join(sorted(errors))})")
        assert errors, f"init raised although the rules select {sorted(chosen)}: {message}"
        assert any(re.search(ERROR_MESSAGES[k], message, re.S) for k in errors), (errors, message)
        if "matches no leaf" in message:  # the candidates are listed, all of them (up to 40)
            which = "exclude" if message.startswith("exclude") else "targets"
            assert _listed_candidates(message) == candidates[which][:40], message
        return
    assert not errors, f"expected an error of kind {errors}, init returned adapters"
    items = dict(lora.adapter_items(adapters))
    event(f"{len(items)} adapter(s)")
    assert set(items) == set(chosen)
    for path, ad in items.items():
        leaf = chosen[path]
        n_in = targets_lib.default_in_axes(path, leaf.ndim)
        assert ad.kernel_shape == tuple(leaf.shape) and ad.in_shape == tuple(leaf.shape[:n_in])
        d_in, d_out = math.prod(ad.in_shape), math.prod(ad.out_shape)
        assert ad.a.shape == (d_in, r) and ad.b.shape == (r, d_out) and ad.r == r
        assert ad.a.dtype == jnp.float32 and ad.b.dtype == jnp.float32
        assert not np.any(np.asarray(ad.b)) and np.all(np.isfinite(np.asarray(ad.a))) and np.any(np.asarray(ad.a))
        assert ad.scale == pytest.approx(1.0)  # alpha defaults to r
    # at init the adapted model is the base model: merged params are bitwise the base, factored products equal
    merged = lora.merge(params, adapters)
    for (p, x), (_, y) in zip(targets_lib.leaf_paths(params), targets_lib.leaf_paths(merged), strict=True):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)), p
    wrapped = lora.wrap(params, adapters)
    for path, ad in items.items():
        w = _get(wrapped, path)
        x = jax.random.normal(jax.random.key(1), (2, *ad.in_shape)).astype(w.dtype)
        got = lora.dot(x, w, len(ad.in_shape))
        want = jnp.tensordot(x, chosen[path], len(ad.in_shape))
        assert got.shape == want.shape == (2, *ad.out_shape)
        np.testing.assert_allclose(
            np.asarray(got, np.float32),
            np.asarray(want, np.float32),
            rtol=1e-6 if w.dtype == jnp.float32 else 1e-2,
            atol=1e-6,
            err_msg=path,
        )


def _get(tree, path: str):
    for k in path.split("/"):
        tree = tree[k]
    return tree
