"""Which leaves get adapters: paths, regex rules, presets and the errors that explain a miss.

A leaf's path is its pytree key path joined by '/', e.g. ``encoder/layer_0/attention/query/kernel``. The
``value`` attribute that ``nnx.split`` states add under each variable is dropped, so a Linen tree and the
state of the equivalent NNX module have the same paths.

Rules are regexes that must match a whole path (``fullmatch``), run by RE2 (:mod:`lora_jax.regex`: linear-time
matching, so no rule can hang on a path; backreferences and lookaround are refused). Presets are names for rule
sets that follow the naming of Flax, Hugging Face and this project's models:

- ``"qv"``: the query and value projections (PEFT's default targets: BERT query/value, Llama q_proj/v_proj,
  GPT-2's fused c_attn, Flax ``MultiHeadDotProductAttention``'s query/value);
- ``"attention"`` (the default): every dense kernel inside an attention block. A block is found by its name
  or by what it holds:

  * by name: a path component that contains ``attention``, ``attn`` or is ``mha`` (any case, any prefix or
    index), so Flax Linen's auto-names (``MultiHeadDotProductAttention_0``, ``SelfAttention_0``,
    ``Attention_3``), indexed names (``attention_0``, ``layers_2/attn``) and Hugging Face's
    (``self_attn/q_proj``, ``attention/self/query``, ``attn/c_attn``) all count;
  * by content: a node whose children include a query, key and value projection (``query``/``key``/``value``,
    ``q_proj``/``k_proj``/``v_proj``, ``q``/``k``/``v``, ``wq``/``wk``/``wv``): its projection kernels
    (those three and the output ``out``/``o_proj``/``out_proj``/``o``/``wo``) are attention kernels, which
    covers the state of a bare ``nnx.MultiHeadAttention`` (``query/kernel``, ..., ``out/kernel``);
  * a block named like attention is not proof enough: a kernel below it in a module named like an MLP
    (``mlp``, ``ffn``, ``feed_forward``, ``fc1``, ``c_fc``, ``intermediate``, ``gate_proj``, ``w1``, ``experts``,
    ...), or in a block that holds a further attention block (``AttentionBlock_0/{attn, Dense_0}``: the
    transformer layer, not its attention), is not selected;
- ``"all-linear"``: every dense kernel except embeddings, the output head and convolutions (a kernel of more
  than two axes in a module named ``conv*``, e.g. Whisper's ``conv1``), and, in a mixture of experts, except the
  routers and the routed experts, as PEFT's ``"all-linear"``, which takes ``nn.Linear`` modules only.

Every preset skips embedding tables and output heads (``lm_head``, ``classifier``, ``head``, ``score``, ...,
with or without a Linen index).

Mixtures of experts. A leaf of an MoE block has one of three roles (:func:`moe_roles`), told apart by name:

- **routed experts**: the kernels under a module named exactly ``experts`` (``mlp/experts/gate_up_proj``,
  ``experts/down_proj/kernel``, or per-expert modules ``experts_3/w1/kernel``); a 3-D kernel there is a
  stack ``(E, d_in, d_out)`` and gets one adapter per expert (:func:`default_expert_axes`);
- **shared experts**: kernels under ``shared_expert`` / ``shared_experts`` / ``shared_mlp`` (Qwen2-MoE,
  DeepSeek, Llama 4): dense MLPs every token goes through;
- **routers**: the ``gate`` / ``router`` kernel beside an ``experts`` module (``mlp/gate/kernel``), and
  Qwen2-MoE's ``shared_expert_gate``.

Presets for them: ``"experts"`` (routed experts only), ``"shared-experts"``, ``"router"`` and
``"all-linear+experts"`` (``"all-linear"`` plus the routed experts; still no router). A router is adapted
only when asked for by name. A regex rule that selects a router together with any other kernel, or routed
together with shared experts, is an error: ``".*experts/.*"`` also matches ``shared_experts/...``, and
``".*gate.*"`` matches ``gate_up_proj`` and the router ``gate``; a rule has to say which one it means.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp

from lora_jax import regex, stacking
from lora_jax.errors import TargetError
from lora_jax.tree import join, leaves, path_str, path_tuple  # noqa: F401  (path_str, path_tuple: public here too)

_KERNEL = r"(kernel|weight|w)"
# A path component naming an attention block: contains "attention" or "attn" (MultiHeadDotProductAttention_0,
# SelfAttention_0, Attention_3, attention_0, self_attn, attn_proj, ...) or is "mha" / "mha_N"; any case.
_ATTN_BLOCK = r"([^/]*(attention|attn)[^/]*|mha(_\d+)?)"
_ATTN_COMPONENT = re.compile(_ATTN_BLOCK, re.IGNORECASE)
# A module inside an attention-named block that is an MLP, not attention (a transformer layer named
# "AttentionBlock" holding its feed-forward): its kernels are not attention kernels.
_MLP_COMPONENT = re.compile(
    r"[^/]*(mlp|ffn|feed_?forward|moe)[^/]*|ff(_\d+)?|fc[12]|c_fc|intermediate|experts?(_\d+)?|"
    r"gate_proj|up_proj|down_proj|gate_up_proj|w[123]|wi(_\d+)?|dense_h_to_4h|dense_4h_to_h",
    re.IGNORECASE,
)
_NOT_BIAS = r"(?!\w*bias)\w+"  # a leaf name that is not a bias (GPT-OSS stores expert biases (E, d_out))
# Routed experts: anything (but a bias) under a component named exactly "experts" (or "experts_N").
_ROUTED_RULE = rf"(.*/)?experts(_\d+)?/(.*/)?{_NOT_BIAS}"
_SHARED_RULE = rf"(.*/)?(shared_experts?|shared_mlp)(_\d+)?/(.*/)?{_KERNEL}"
_ROUTER_RULE = rf"(.*/)?(gate|router|shared_expert_gate)/{_NOT_BIAS}"
_ROUTED = re.compile(_ROUTED_RULE)
_SHARED = re.compile(_SHARED_RULE)
_ROUTER = re.compile(rf"(?P<parent>(.*/)?)(gate|router)/{_NOT_BIAS}")
_SHARED_GATE = re.compile(rf"(.*/)?shared_expert_gate/{_NOT_BIAS}")

PRESETS: dict[str, tuple[str, ...]] = {
    "qv": (rf"(.*/)?(query|value|q_proj|v_proj|q|v|c_attn|wq|wv)/{_KERNEL}",),
    "attention": (rf"(?i)(.*/)?{_ATTN_BLOCK}/(.*/)?{_KERNEL}",),
    "all-linear": (rf"(.*/)?{_KERNEL}",),
    "experts": (_ROUTED_RULE,),
    "shared-experts": (_SHARED_RULE,),
    "router": (_ROUTER_RULE,),
    "all-linear+experts": (
        rf"(.*/)?{_KERNEL}",
        _ROUTED_RULE,
    ),
}
DEFAULT_PRESET = "attention"

# "attention" also selects the projections of a node that holds a query, key and value projection, whatever
# the node is called (a bare nnx.MultiHeadAttention's state has no block name at all): the kernel below one of
# these children, when the node's children include one whole triple of QKV_NAMES.
QKV_NAMES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q", "k", "v"), ("wq", "wk", "wv"))
ATTENTION_PROJECTIONS = frozenset(
    {
        "query",
        "key",
        "value",
        "out",
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "out_proj",
        "q",
        "k",
        "v",
        "o",
        "wq",
        "wk",
        "wv",
        "wo",
    }
)

# The MoE roles (see moe_roles) each preset may select; None: a leaf outside any MoE role.
ROUTED, SHARED, ROUTER = "routed expert", "shared expert", "router"
_PRESET_ROLES: dict[str, frozenset] = {
    "qv": frozenset({None}),
    "attention": frozenset({None}),
    "all-linear": frozenset({None, SHARED}),
    "experts": frozenset({ROUTED}),
    "shared-experts": frozenset({SHARED}),
    "router": frozenset({ROUTER}),
    "all-linear+experts": frozenset({None, SHARED, ROUTED}),
}

# Leaves never adapted by a preset: embeddings and output heads (as PEFT's "all-linear" does).
_EMBEDDING = re.compile(r"(.*/)?(\w*embed\w*|wte|wpe|embedding)(/.*)?", re.IGNORECASE)
_HEAD = re.compile(r"(.*/)?(lm_head|classifier|score|head|qa_outputs)(_\d+)?(/.*)?", re.IGNORECASE)
# Convolution kernels (k, in, out): not linear layers, so no preset selects them (PEFT's "all-linear" neither).
_CONV = re.compile(r"(.*/)?(conv\w*|\w*_conv)/(kernel|weight)", re.IGNORECASE)
# Kernels with more than two axes whose inputs are all but the last axis (output projections of attention).
_OUTPUT_PROJ = re.compile(r"(.*/)?(out|o_proj|out_proj|output|c_proj|wo|o)/\w+")


# Pytree nodes that stand for one kernel, e.g. a quantised weight (lora_jax.quant.QuantizedWeight). Path
# functions treat them as leaves, so rules see ``layer/kernel`` rather than the arrays inside. Such a node has
# the logical kernel's ``shape``, ``dtype`` and ``ndim`` and a ``dequantize(dtype) -> Array`` method.
_WEIGHT_NODES: tuple[type, ...] = ()


def register_weight_node(cls: type) -> type:
    """Class decorator: treat instances of ``cls`` as kernels (leaves) when selecting and mapping paths."""
    global _WEIGHT_NODES
    if cls not in _WEIGHT_NODES:
        _WEIGHT_NODES = (*_WEIGHT_NODES, cls)
    return cls


def is_weight_node(x: Any) -> bool:
    return isinstance(x, _WEIGHT_NODES)


def leaf_paths(tree: Any) -> list[tuple[str, Any]]:
    """``[(path, leaf), ...]`` for every array leaf (or weight node, see :func:`register_weight_node`)."""
    return [(join(p), leaf) for p, leaf in leaves(tree, is_leaf=is_weight_node)]


def compile_rules(rules: str | Sequence[str] | None, what: str) -> list[regex.Pattern]:
    """User rules (one regex or a list) compiled by RE2 (:func:`lora_jax.regex.compile`): ``TargetError`` naming
    ``what`` for a rule that is not a string or that RE2 refuses."""
    if rules is None:
        return []
    if isinstance(rules, str):
        rules = [rules]
    if not isinstance(rules, Sequence):
        raise TargetError(f"{what}: expected a regex string or a list of them, got {type(rules).__name__}")
    return [regex.compile(rule, what) for rule in rules]


def _preset_rules(preset: str) -> list[re.Pattern]:
    """A preset's own rules (written here, so Python's ``re`` with its lookahead is safe for them)."""
    return [re.compile(rule) for rule in PRESETS[preset]]


def in_attention_block(paths: Sequence[str]) -> set[str]:
    """The paths among ``paths`` below a component named like attention (:data:`_ATTN_BLOCK`) that are attention
    kernels: not below an MLP-named module inside that block, and not in a block that holds a further
    attention-named block (then the outer block is a whole transformer layer, and only its inner attention
    counts). The kernel's own module (``attn/c_attn/kernel``) names a projection, not a block."""
    last: dict[tuple[str, ...], int] = {}
    outer: set[tuple[str, ...]] = set()
    for p in paths:
        parts = tuple(p.split("/"))
        hits = [i for i, c in enumerate(parts[:-1]) if _ATTN_COMPONENT.fullmatch(c)]
        if not hits:
            continue
        last[parts] = hits[-1]
        blocks = [i for i in hits if i < len(parts) - 2]
        outer.update(parts[: j + 1] for j in blocks[:-1])
    return {
        "/".join(parts)
        for parts, i in last.items()
        if parts[: i + 1] not in outer and not any(_MLP_COMPONENT.fullmatch(c) for c in parts[i + 1 : -1])
    }


def suggestions(candidates: Sequence[str], skip: str | None = None) -> str:
    """What would match these candidate kernel paths: each preset that selects some of them (by path), and a
    regex naming the projection layers among them (``.*/(query|value)/kernel``). Empty if nothing would."""
    lines = []
    for name, rules in PRESETS.items():
        hits = [p for p in candidates if any(re.fullmatch(r, p) for r in rules)]
        if hits and name != skip:
            lines.append(
                f"preset {name!r} would select {len(hits)} ({', '.join(hits[:2])}{', ...' if len(hits) > 2 else ''})"
            )
    parents = sorted(
        {p.split("/")[-2] for p in candidates if p.count("/") >= 1 and p.split("/")[-2] in ATTENTION_PROJECTIONS}
    )
    qv = [n for n in parents if n in ("query", "value", "q_proj", "v_proj", "q", "v", "wq", "wv")]
    if parents:
        lines.append(f"a regex: targets='(.*/)?({'|'.join(qv or parents)})/kernel'")
    return ("\nWould match: " + "; ".join(lines)) if lines else ""


def no_match_message(what: str, rule: str, candidates: Sequence[str], limit: int = 40) -> str:
    shown = "\n  ".join(candidates[:limit])
    more = f"\n  ... and {len(candidates) - limit} more" if len(candidates) > limit else ""
    hint = suggestions(candidates, skip=rule) if what == "targets" else ""
    return (
        f"{what} rule {rule!r} matches no leaf (rules must match the whole '/'-joined path).{hint} "
        f"Candidates:\n  {shown}{more}"
    )


_MAX_LAYERS = 1024  # the layer indices tried when a rule may name single layers of a scanned stack


def _unrolled(path: str, i: int) -> str:
    """``path`` of a scanned stack (``.../layers/...``) named as layer ``i`` of the unrolled model."""
    parts = path.split("/")
    k = next(j for j, p in enumerate(parts[:-1]) if p == stacking.STACK and not parts[j + 1].isdigit())
    return "/".join((*parts[:k], f"{stacking.STACK}_{i}", *parts[k + 1 :]))


def no_match_error(what: str, rule: Any, candidates: Sequence[str]) -> Exception:
    """The error for a ``what`` rule (a compiled pattern) that matches none of ``candidates``: an
    :class:`~lora_jax.errors.UnsupportedError` naming ``scan_layers=False`` when the rule names layers of a scanned
    stack one by one (it matches the unrolled names ``layers_N`` of a stacked leaf), else a ``TargetError``."""
    stacked = [p for p in candidates if stacking.layer_axes(p)]
    if any(rule.fullmatch(_unrolled(p, i)) for p in stacked for i in range(_MAX_LAYERS)):
        return stacking.unsupported(f"{what} rule {rule.pattern!r} (it names single layers, {stacking.STACK}_N)")
    return TargetError(no_match_message(what, rule.pattern, list(candidates)))


def is_embedding(path: str) -> bool:
    return _EMBEDDING.fullmatch(path) is not None


def is_head(path: str) -> bool:
    return _HEAD.fullmatch(path) is not None


def attention_by_content(paths: Sequence[str]) -> set[str]:
    """The paths among ``paths`` that are ``node/P/kernel`` (``kernel``, ``weight`` or ``w``) for a projection
    ``P`` in :data:`ATTENTION_PROJECTIONS` of a ``node`` (possibly the root) whose children include one whole
    triple of :data:`QKV_NAMES`: the attention kernels of a block that no name marks as attention."""
    children: dict[tuple[str, ...], set[str]] = {}
    for p in paths:
        parts = tuple(p.split("/"))
        for i in range(len(parts)):
            children.setdefault(parts[:i], set()).add(parts[i])
    blocks = {node for node, kids in children.items() if any(set(qkv) <= kids for qkv in QKV_NAMES)}
    out = set()
    for p in paths:
        parts = tuple(p.split("/"))
        if (
            len(parts) >= 2
            and re.fullmatch(_KERNEL, parts[-1])
            and parts[-2] in ATTENTION_PROJECTIONS
            and parts[:-2] in blocks
        ):
            out.add(p)
    return out


def _is_kernel_like(leaf: Any) -> bool:
    return (
        hasattr(leaf, "shape")
        and hasattr(leaf, "dtype")
        and len(leaf.shape) >= 2
        and jnp.issubdtype(leaf.dtype, jnp.floating)
    )


def moe_roles(paths: Sequence[str]) -> dict[str, str | None]:
    """The mixture-of-experts role of each path: :data:`ROUTED`, :data:`SHARED`, :data:`ROUTER` or ``None``.

    A ``gate`` / ``router`` leaf is a router only beside an ``experts`` module (its parent also holds
    ``experts``): a dense MLP whose projection happens to be called ``gate`` keeps the role ``None``.
    """
    paths = list(paths)
    parents = {m.group("parent") for p in paths if (m := re.fullmatch(r"(?P<parent>(.*/)?)experts(_\d+)?/.*", p))}
    roles: dict[str, str | None] = {}
    for p in paths:
        m = _ROUTER.fullmatch(p)
        if _ROUTED.fullmatch(p):
            roles[p] = ROUTED
        elif _SHARED.fullmatch(p):
            roles[p] = SHARED
        elif _SHARED_GATE.fullmatch(p) or (m is not None and m.group("parent") in parents):
            roles[p] = ROUTER
        else:
            roles[p] = None
    return roles


def default_expert_axes(path: str, ndim: int) -> int:
    """How many leading axes of a kernel index experts: 1 for a 3-D kernel of routed experts (a stack
    ``(E, d_in, d_out)``: one adapter per expert), else 0."""
    return 1 if ndim == 3 and _ROUTED.fullmatch(path) else 0


def default_in_axes(path: str, ndim: int) -> int:
    """How many leading axes of a kernel are its inputs: 1, or ``ndim - 1`` for an output projection with
    more than two axes (Flax ``DenseGeneral`` (heads, head_dim, d_model))."""
    if ndim > 2 and _OUTPUT_PROJ.fullmatch(path):
        return ndim - 1
    return 1


def select(
    params: Any,
    targets: str | Sequence[str] | None = None,
    *,
    exclude: str | Sequence[str] | None = None,
    allow_embeddings: bool = False,
) -> list[tuple[str, Any]]:
    """The ``(path, leaf)`` pairs that ``targets`` selects in ``params``, in tree order.

    Raises ``ValueError`` when a rule matches nothing (listing the candidate kernels), when a rule selects a
    non-floating or one-dimensional leaf, or an embedding table without ``allow_embeddings``, or mixes MoE
    roles (a router with anything else, routed with shared experts; see the module docstring).
    """
    leaves = leaf_paths(params)
    if not leaves:
        raise TargetError("params has no array leaves to adapt")
    excluded = compile_rules(exclude, "exclude")
    for rule in excluded:
        if not any(rule.fullmatch(p) for p, _ in leaves):
            raise no_match_error("exclude", rule, [p for p, _ in leaves])

    preset = None
    if targets is None:
        preset = DEFAULT_PRESET
    elif isinstance(targets, str) and targets in PRESETS:
        preset = targets
    elif (
        isinstance(targets, str)
        and re.fullmatch(r"[a-z]+(-[a-z]+)*", targets)
        and not any(regex.compile(targets, "targets").fullmatch(p) for p, _ in leaves)
    ):
        raise TargetError(
            f"targets {targets!r} is neither a preset {sorted(PRESETS)} nor a regex that matches a "
            f"leaf path (e.g. '.*{targets}/kernel')"
        )

    candidates = [p for p, leaf in leaves if _is_kernel_like(leaf) and not is_embedding(p)]
    roles = moe_roles([p for p, _ in leaves])
    chosen: dict[str, Any] = {}
    if preset is not None:
        rules = _preset_rules(preset)
        allowed = _PRESET_ROLES.get(preset, frozenset({None, SHARED}))
        paths = [p for p, _ in leaves]
        by_content = attention_by_content(paths) if preset == "attention" else set()
        by_name = in_attention_block(paths) if preset == "attention" else None
        for p, leaf in leaves:
            named = (any(r.fullmatch(p) for r in rules) and (by_name is None or p in by_name)) or p in by_content
            if (
                named
                and _is_kernel_like(leaf)
                and not is_embedding(p)
                and not is_head(p)
                and roles[p] in allowed
                and not (leaf.ndim > 2 and _CONV.fullmatch(p))
                and not any(r.fullmatch(p) for r in excluded)
            ):
                chosen[p] = leaf
        if not chosen:
            raise TargetError(
                f"targets preset {preset!r} matches no kernel of these params. Name the kernels with "
                f"a regex instead. {no_match_message('targets', preset, candidates)}"
            )
    else:
        rules = compile_rules(targets, "targets")
        for rule in rules:
            hits = [(p, leaf) for p, leaf in leaves if rule.fullmatch(p)]
            if not hits:
                raise no_match_error("targets", rule, candidates)
            for p, leaf in hits:
                if any(r.fullmatch(p) for r in excluded):
                    continue
                if not hasattr(leaf, "shape") or not jnp.issubdtype(leaf.dtype, jnp.floating):
                    raise TargetError(
                        f"targets rule {rule.pattern!r} selects {p}, which is not a floating-point "
                        f"array (dtype {getattr(leaf, 'dtype', type(leaf).__name__)}); LoRA adapts "
                        "float kernels only"
                    )
                if len(leaf.shape) < 2:
                    raise TargetError(
                        f"targets rule {rule.pattern!r} selects {p} of shape {tuple(leaf.shape)}; "
                        "LoRA adapts kernels with at least two axes (biases and norms are trained "
                        "in full with split(..., train=...) instead)"
                    )
                if is_embedding(p) and not allow_embeddings:
                    raise TargetError(
                        f"targets rule {rule.pattern!r} selects the embedding table {p}; embeddings "
                        "are adapted only with allow_embeddings=True (and lora_jax.ops.embed)"
                    )
                chosen[p] = leaf
            _check_roles(rule.pattern, [p for p, _ in hits if not any(r.fullmatch(p) for r in excluded)], roles)
        if not chosen:
            raise TargetError(
                f"targets {[r.pattern for r in rules]} select nothing once exclude "
                f"{[r.pattern for r in excluded]} is applied"
            )
    return [(p, leaf) for p, leaf in leaves if p in chosen]


def _check_roles(rule: str, hits: Sequence[str], roles: Mapping[str, str | None]) -> None:
    """A rule may not select a router together with any other kernel, nor routed with shared experts."""
    by_role: dict[str | None, list[str]] = {}
    for p in hits:
        by_role.setdefault(roles[p], []).append(p)
    if ROUTER in by_role and len(by_role) > 1:
        other = next(r for r in by_role if r != ROUTER)
        raise TargetError(
            f"targets rule {rule!r} selects the router {by_role[ROUTER][0]} and also {other or 'non-MoE'} "
            f"kernel(s) such as {by_role[other][0]}; adapting a router changes which experts tokens go to, so it "
            "must be asked for alone (preset 'router' or a rule that selects only routers). For the experts use "
            "preset 'experts' / 'shared-experts' or a rule that excludes the router"
        )
    if ROUTED in by_role and SHARED in by_role:
        raise TargetError(
            f"targets rule {rule!r} selects routed experts ({by_role[ROUTED][0]}) and shared experts "
            f"({by_role[SHARED][0]}) at once; name one (presets 'experts' and 'shared-experts', or e.g. "
            "'(.*/)?mlp/experts/.*' for the routed ones), or give two rules to adapt both"
        )


class PatternMap:
    """``{regex: value}`` looked up by full match on a path; the first matching pattern wins. Every pattern
    must match at least one of ``paths`` (a silent no-op pattern is a typo nobody notices)."""

    def __init__(self, patterns: Mapping[str, Any] | None, what: str, paths: Sequence[str]):
        if patterns is not None and not isinstance(patterns, Mapping):
            raise TargetError(f"{what}: expected a mapping of regex -> value, got {type(patterns).__name__}")
        self._rules = [(regex.compile(k, what), v) for k, v in (patterns or {}).items()]
        for rule, _ in self._rules:
            if not any(rule.fullmatch(p) for p in paths):
                raise no_match_error(what, rule, paths)

    def get(self, path: str, default: Any) -> Any:
        for rule, value in self._rules:
            if rule.fullmatch(path):
                return value
        return default
