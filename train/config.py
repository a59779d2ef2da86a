"""Run configuration: typed sections, YAML files, ``dotted.key=value`` overrides, strict validation.

A config is a tree of frozen dataclasses whose fields declare their type, default, allowed range and meaning in
one place (pydantic validates them, in strict mode: ``true`` is not an integer, ``"4"`` is not a number).
``load_config(path, overrides)`` reads a YAML file (or the embedded default when ``path`` is None), applies
overrides such as ``lora.r=16`` or ``optim.lr=3e-4`` (values parsed as YAML), and checks

- every key: an unknown or misspelt key is an error that names the closest valid key;
- every value: its type and range (``lora.r must be >= 1, got 0``);
- every combination: a value that cannot have an effect with the others (``quant.type=int8`` without
  ``train.method=qlora``) or that makes no sense with them is refused rather than silently ignored.

YAML files are read strictly: a key given twice in one mapping is an error, and alias expansion is bounded.
``python -m train.config`` prints the table of every key with its default and range (README's key table).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import reprlib
import string
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import BeforeValidator, ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass as _pydantic_dataclass

from lora_jax import regex
from lora_jax.errors import ConfigError
from train import sources

NF4_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # as lora_jax.quant (bitsandbytes' block sizes)
SEED_MAX = 2**32 - 1
INT_MAX = 2**31 - 1


def _yaml_number(value: Any) -> Any:
    """YAML 1.1 reads ``3e-4`` (no dot) as a string: accept a string that is a decimal number."""
    if isinstance(value, str) and re.fullmatch(r"\s*[-+]?(\d[\d_]*\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", value):
        return float(value)
    return value


Float = Annotated[float, BeforeValidator(_yaml_number)]
_SECTION = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


def section(cls: type) -> type:
    """A config section: a frozen dataclass validated by pydantic (strict types, finite numbers)."""
    return _pydantic_dataclass(frozen=True, config=_SECTION)(cls)


def key(default: Any, doc: str, **rules: Any) -> Any:
    """A config field: its default, one line of documentation and its range (pydantic ``Field`` rules)."""
    return Field(default, description=doc, **rules)


@section
class ModelConfig:
    name: str = key(
        "SmolLM2-135M-Instruct-Q4_1",
        "a Hugging Face hub id, a local HF folder, a .gguf file or an "
        "offline alias (all-MiniLM-L6-v2, SmolLM2-135M-Instruct-Q4_1, gemma-3-270m)",
        min_length=1,
    )
    num_labels: int = key(2, "classes of a sequence classifier (data.task=classification)", ge=2, le=INT_MAX)
    router_aux_loss_coef: Float | None = key(
        None,
        "mixtures of experts: weight of the load-balancing loss added "
        "to the training loss (transformers' router_aux_loss_coef); null: as "
        "the checkpoint's config says (output_router_logits); 0: off",
        ge=0,
    )
    attention: Literal["auto", "xla", "blockwise", "cudnn", "splash"] = key(
        "auto",
        "decoders' attention (lora_jax.models.attention): auto (cuDNN on GPU, splash on TPU, else blockwise; "
        "xla when decoding), xla (dense T x T scores), blockwise (never forms T x T), cudnn, splash",
    )
    scan_layers: Literal["auto"] | bool = key(
        "auto",
        "decoders: run the layers as one scanned layer over stacked parameters (compile time that does not "
        "grow with depth; benchmarks.scan_layers) or unrolled; auto: scanned unless the run needs unrolled layers "
        "(train.method=qlora, lora.use_dora, a lora rule that names one layer, e.g. layers_3), which the log says",
    )
    adapter: str | None = key(
        None,
        "a trained LoRA adapter (a run folder, or its adapters/ folder) merged into the "
        "frozen base before training: new adapters start from that model (e.g. DPO after "
        "SFT, whose reference is then the SFT model)",
        min_length=1,
    )


@section
class LoraConfig:
    r: int = key(8, "LoRA rank (at most min(d_in, d_out) of each adapted kernel)", ge=1, le=INT_MAX)
    alpha: Float | None = key(None, "LoRA alpha: scale = alpha / r (null: alpha = r, scale 1)", gt=0)
    targets: str | list[str] = key(
        "qv",
        "kernels adapted: a preset (qv, attention, all-linear) or regexes matching whole '/'-joined paths",
        min_length=1,
    )
    exclude: list[str] | None = key(None, "regexes of kernels never adapted", min_length=1)
    dropout: Float = key(0.0, "dropout on the adapters' input during training", ge=0, lt=1)
    use_rslora: bool = key(False, "rsLoRA: scale = alpha / sqrt(r)")
    use_dora: bool = key(False, "DoRA: a trained magnitude per output feature (Liu et al. 2024)")
    init: Literal["lora", "gaussian", "pissa"] = key(
        "lora", "A's init; pissa: A, B on W's top-r singular directions, the base becomes the residual"
    )
    pissa_niter: int | None = key(
        None, "pissa: null for the exact SVD, N for a randomised SVD with N power iterations", ge=0, le=1000
    )
    rank_pattern: dict[str, Annotated[int, Field(ge=1, le=INT_MAX)]] | None = key(
        None, "{regex of a kernel path: r}, the first full match wins", min_length=1
    )
    alpha_pattern: dict[str, Annotated[Float, Field(gt=0)]] | None = key(
        None, "{regex of a kernel path: alpha}", min_length=1
    )
    train: list[str] | None = key(
        None,
        "regexes of base leaves trained in full (e.g. a new classifier head; classification default: classifier/.*)",
        min_length=1,
    )


@section
class DataConfig:
    source: str = key(
        "builtin:restaurants",
        "builtin:NAME (restaurants, sentiment), a hub data set name, or "
        "local csv/tsv/json/jsonl/parquet files (comma-separated)",
        min_length=1,
    )
    task: Literal["causal-lm", "chat", "classification", "audio-classification"] = key(
        "causal-lm",
        "causal-lm: loss on the completion only; chat: conversations (messages_column) rendered by the "
        "chat template, loss on the assistant turns only; classification: a sequence classifier; "
        "audio-classification: rows name a WAV file (audio_column) and a class id, max_length counts log-mel frames",
    )
    train_split: str = key("train", "hub data set: the training split", min_length=1)
    eval_source: str | None = key(None, "local evaluation file(s); null: see eval_split", min_length=1)
    eval_split: str | None = key(
        None,
        "hub data set: the evaluation split; null (and no eval_source): hold out "
        "data.eval_fraction of the training rows",
        min_length=1,
    )
    eval_fraction: Float = key(0.1, "share of the training rows held out for evaluation", gt=0, lt=1)
    prompt_column: str = key("prompt", "causal-lm: the column that fills {prompt} in prompt_template", min_length=1)
    completion_column: str = key("completion", "causal-lm: the column the model learns to write", min_length=1)
    messages_column: str = key(
        "messages",
        "chat: the column of {role, content} message lists (JSON text in a CSV "
        "cell); dpo: may hold the prompt's messages",
        min_length=1,
    )
    chat_template: str | None = key(
        None,
        "chat: a Jinja chat template (its text or a .jinja file) replacing the "
        "tokenizer's (null: the tokenizer's own; a GGUF file's tokenizer.chat_template)",
        min_length=1,
    )
    chosen_column: str = key(
        "chosen", "train.objective=dpo: the preferred answer (text, or assistant messages)", min_length=1
    )
    rejected_column: str = key("rejected", "train.objective=dpo: the dispreferred answer", min_length=1)
    text_column: str = key("sentence", "classification: the text column", min_length=1)
    label_column: str = key("label", "classification: the column of integer class ids 0..num_labels-1", min_length=1)
    audio_column: str = key(
        "audio",
        "audio-classification: the column of 16 kHz WAV paths (relative ones: to the data file's folder)",
        min_length=1,
    )
    group_column: str | None = key(
        None,
        "rows sharing this value stay on the same side of the split (E2E: the "
        "meaning representation); null: causal-lm keeps the rows of one prompt together, "
        "classification splits rows",
        min_length=1,
    )
    max_length: int = key(64, "tokens per example (prompt + completion)", ge=8, le=2**20)
    batching: Literal["auto", "fixed", "bucketed", "packed"] = key(
        "auto",
        "training batches: fixed (every batch padded to max_length), bucketed (examples of similar length "
        "together, each batch cut to one of data.buckets widths), packed (causal-lm: several examples per row of "
        "pack_length tokens, kept apart; train.batch_size counts rows); auto: packed for causal-lm, bucketed for "
        "classification, fixed for audio-classification. Evaluation batches are always fixed",
    )
    buckets: int = key(4, "bucketed: at most this many sequence widths (each one compilation of the step)", ge=1, le=64)
    pack_length: int | None = key(
        None,
        "packed: tokens per packed row (null: max_length); rows wider than the examples hold more of them",
        ge=8,
        le=2**20,
    )
    loss_capacity: int | None = key(
        None,
        "packed, with train.logits=loss: at most this many loss positions "
        "(completion tokens) per packed row, the logits computed per row; null: the most "
        "of any row of the first epoch packed without a limit",
        ge=1,
        le=2**20,
    )
    max_train_examples: int | None = key(None, "use at most this many training rows", ge=1, le=INT_MAX)
    max_eval_examples: int | None = key(
        None,
        "use at most this many evaluation examples (causal-lm: distinct "
        "prompts, with all their rows; classification: rows)",
        ge=1,
        le=INT_MAX,
    )
    prompt_template: str = key("{prompt}\n", "causal-lm: the prompt, with {column} fields", min_length=1)
    seed: int = key(0, "seed of the built-in data and of the train / eval split", ge=0, le=SEED_MAX)


@section
class OptimConfig:
    name: Literal["adamw", "adam", "sgd"] = key("adamw", "the optimizer")
    lr: Float = key(2e-3, "peak learning rate", gt=0)
    weight_decay: Float = key(0.0, "adamw: decoupled weight decay (optim.lr x weight_decay must stay < 1)", ge=0)
    b1: Float = key(0.9, "adam / adamw: first-moment decay", ge=0, lt=1)
    b2: Float = key(0.999, "adam / adamw: second-moment decay", ge=0, lt=1)
    schedule: Literal["constant", "linear", "cosine"] = key(
        "linear", "learning-rate schedule after the warmup (linear and cosine decay to 0 at train.steps)"
    )
    warmup_steps: int = key(
        10, "steps of linear warmup from 0 (shortened to train.steps - 1 if longer)", ge=0, le=INT_MAX
    )
    grad_clip: Float | None = key(1.0, "clip the gradients' global norm to this (null: no clipping)", gt=0)
    lora_plus_ratio: Float | None = key(None, "LoRA+: B's learning rate = ratio x A's (null: equal)", gt=0)


@section
class QuantConfig:
    """The frozen base of ``train.method: qlora`` (Dettmers et al. 2023): kernels stored quantised, dequantised
    to ``train.precision`` inside the jitted step; the adapters (and leaves trained in full) stay float32."""

    type: Literal["nf4", "int8"] = key("nf4", "nf4: 4-bit NormalFloat, block-wise absmax; int8: per output channel")
    block_size: int = key(64, f"nf4: values per absmax block, one of {list(NF4_BLOCK_SIZES)}", ge=32, le=4096)
    double_quant: bool = key(True, "nf4: quantise the absmax constants to 8 bits (blocks of 256)")
    targets: str | list[str] = key(
        "all-linear+experts",
        "frozen kernels quantised (preset or regexes; a mixture "
        "of experts' expert stacks too); embeddings, heads and routers stay float",
        min_length=1,
    )


@section
class TrainConfig:
    method: Literal["lora", "qlora", "full", "linear_probe"] = key(
        "lora",
        "lora: adapters (+ lora.train leaves); qlora: lora over a quantised base; full: every weight; "
        "linear_probe: only lora.train leaves (the head)",
    )
    steps: int = key(40, "optimizer steps (a resumed run may raise it)", ge=1, le=INT_MAX)
    batch_size: int = key(4, "examples per step (a multiple of the mesh's devices)", ge=1, le=2**24)
    grad_accum: int = key(1, "micro-batches of batch_size accumulated per step", ge=1, le=2**16)
    precision: Literal["float32", "bfloat16"] = key(
        "float32",
        "frozen base and compute dtype; adapters (and, for lora / qlora, leaves trained in full) stay float32",
    )
    remat: bool | Literal["none", "full", "dots", "dots_no_batch"] = key(
        False,
        "activation checkpointing of each layer (lora_jax.models.layers.REMAT_POLICIES; models without "
        "per-layer remat: of the whole loss): none / full (keep layer inputs only) / dots / dots_no_batch; "
        "true = dots_no_batch",
    )
    loss_chunk: int | Literal["auto"] = key(
        "auto", "causal-lm: tokens per cross-entropy chunk (never the full tokens x vocab logits); 0: full logits"
    )
    logits: Literal["loss", "all"] = key(
        "loss",
        "causal-lm: where the LM head and the cross-entropy run: loss (only "
        "at the positions that carry loss, the completion tokens; same loss) or all "
        "(every position, prompt and padding too)",
    )
    seed: int = key(0, "seed of the adapters' init, dropout and the batch order", ge=0, le=SEED_MAX)
    nan_policy: Literal["stop", "skip"] = key(
        "stop",
        "a step whose loss, gradients or updated state are not "
        "finite: stop (exit 3; checkpoints stay finite) or skip it (at most "
        "10 in a row)",
    )
    device_memory: str | None = key(
        None,
        "memory per device that the run may use, e.g. '16GB' (null: what the "
        "backend reports; checked against the memory plan before the first step)",
        pattern=r"(?i)^\s*\d+(\.\d+)?\s*([KMGT]?i?B?)\s*$",
    )
    time_budget_s: Float | None = key(None, "stop (with a checkpoint) when training has taken this many seconds", gt=0)
    objective: Literal["sft", "dpo"] = key(
        "sft",
        "sft: the task's loss; dpo: preference tuning on prompt + "
        "chosen + rejected rows (lora / qlora: the reference is the frozen base "
        "with the adapters off; see the dpo section)",
    )
    prefetch: bool = key(
        True,
        "overlap host work with the step: place the next batch and read the previous step's "
        "loss while a step runs (the non-finite stop then comes one step later; same results)",
    )


@section
class DpoConfig:
    """Preference tuning (``train.objective: dpo``), as TRL's DPOTrainer (sigmoid, IPO) and CPOTrainer (SimPO)."""

    loss: Literal["sigmoid", "ipo", "simpo"] = key(
        "sigmoid",
        "sigmoid: DPO (Rafailov et al. 2023); ipo: IPO (Azar "
        "et al. 2023); simpo: SimPO, reference-free (Meng et al. 2024)",
    )
    beta: Float = key(0.1, "inverse temperature of the implicit reward (IPO: the regulariser tau)", gt=0)
    simpo_gamma: Float = key(0.5, "simpo: the target reward margin", ge=0)
    reference: Literal["step", "cached"] = key(
        "step",
        "sigmoid / ipo: the reference log-probabilities computed in "
        "every step (a second forward, adapters off) or cached: once for "
        "every training pair before training",
    )


@section
class MeshConfig:
    data: int = key(-1, "devices along the data axis (-1: all devices / mesh.fsdp)", ge=-1, le=2**20)
    fsdp: int = key(1, "devices along the FSDP axis that shards the frozen base", ge=1, le=2**20)
    expert: int = key(
        1, "devices along the expert axis: a mixture of experts' routed experts split across them", ge=1, le=2**20
    )
    tensor: int = key(
        1,
        "devices along the tensor-parallel axis: attention heads, MLP columns and the vocabulary "
        "split across them (same examples on each)",
        ge=1,
        le=2**20,
    )


@section
class EvalConfig:
    every: int = key(20, "evaluate every N steps (and before and after training)", ge=1, le=INT_MAX)
    every_s: Float | None = key(
        None,
        "also evaluate at the first step past each multiple of this many seconds of training time "
        "(time-budgeted runs whose step rate is not known in advance)",
        gt=0,
    )
    batch_size: int = key(16, "evaluation batch size", ge=1, le=2**24)
    generate_samples: int = key(3, "causal-lm: sample generations printed before and after training", ge=0, le=10_000)
    generate_eval: int = key(
        16, "causal-lm: evaluation prompts decoded for BLEU / ROUGE-L at the end (0: none)", ge=0, le=INT_MAX
    )
    max_new_tokens: int = key(32, "causal-lm: tokens generated per prompt", ge=1, le=2**16)
    num_beams: int = key(1, "causal-lm: beam search width (1: greedy)", ge=1, le=64)


@section
class CheckpointConfig:
    every: int = key(
        50, "save a checkpoint every N steps (and at the end, on SIGTERM and at the time budget)", ge=1, le=INT_MAX
    )
    keep: int = key(2, "checkpoints kept (the newest ones)", ge=1, le=10_000)


@section
class OutputConfig:
    dir: str = key(
        "runs/default", "the job's folder: each run writes a new DIR/run-N and points DIR/latest at it", min_length=1
    )
    overwrite: bool = key(
        False,
        "replace DIR/latest instead of starting a new run beside it (the old run is "
        "kept aside until the new one has checkpointed)",
    )
    export_merged: bool = key(False, "write merged Hugging Face safetensors (merged/) at the end")
    export_peft: bool = key(False, "lora / qlora: write a PEFT adapter folder (peft/) at the end")
    peft_base_model: str | None = key(
        None,
        "the base_model_name_or_path the PEFT export records (what "
        "AutoPeftModel loads); default: the hub id of an offline alias, the absolute "
        "path of a local folder, else model.name",
        min_length=1,
    )
    export_gguf_adapter: bool = key(
        False, "lora / qlora over a GGUF base: write a llama.cpp LoRA adapter (adapter.gguf) at the end"
    )
    export_gguf: str | None = key(
        None,
        "GGUF base: write the merged model (merged.gguf) at the end, its tensors as "
        "base (the base's own types), f32, f16, bf16, q8_0, q4_0, q4_1, q5_0 or q5_1",
    )


@_pydantic_dataclass(frozen=True, config=ConfigDict(strict=True, extra="forbid"))
class Config:
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    quant: QuantConfig = QuantConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    dpo: DpoConfig = DpoConfig()
    mesh: MeshConfig = MeshConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    output: OutputConfig = OutputConfig()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = typing.get_type_hints(Config)


# ------------------------------------------------------------------------------------------- messages

_short_repr = reprlib.Repr()
_short_repr.maxstring, _short_repr.maxother, _short_repr.maxlevel = 60, 60, 3
_short_repr.maxlist = _short_repr.maxtuple = _short_repr.maxdict = _short_repr.maxset = 6


def short(value: Any) -> str:
    """A bounded ``repr`` for messages: a value from a file may be huge (or an alias graph many times larger
    than the file), the message stays one short line."""
    return _short_repr.repr(value)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Annotated:
        return _type_name(get_args(tp)[0])
    if origin is Literal:
        return f"one of {list(get_args(tp))}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, dict):
        names = [_type_name(a).split(" ", 1)[-1] + "s" for a in get_args(tp)]  # 'a string' -> 'strings'
        return f"a list of {names[0]}" if origin is list else f"a mapping of {names[0]} to {names[1]}"
    return {type(None): "null", float: "a number", int: "an integer", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _rules(field_info: Any) -> dict[str, Any]:
    """The range rules of a pydantic field (``ge``, ``gt``, ``le``, ``lt``, ``min_length``)."""
    out = {}
    for m in getattr(field_info, "metadata", []):
        for name in ("ge", "gt", "le", "lt", "min_length"):
            if getattr(m, name, None) is not None:
                out[name] = getattr(m, name)
    return out


def _num(x: Any) -> str:
    return (
        f"{x:g}"
        if isinstance(x, float)
        else (
            f"2**{x.bit_length() - 1}"
            if isinstance(x, int) and x > 10**6 and (x & (x - 1)) == 0
            else f"2**{(x + 1).bit_length() - 1} - 1"
            if isinstance(x, int) and x > 10**6 and (x & (x + 1)) == 0
            else str(x)
        )
    )


def range_text(rules: dict[str, Any], violated: str | None = None) -> str:
    """``{"ge": 0, "lt": 1}`` -> ``in [0, 1)``; ``{"ge": 1}`` -> ``>= 1``. With ``violated`` ("lower" or "upper"),
    a range whose other end is only a technical bound (above a million) shows the violated end alone."""
    hi_value = rules.get("le", rules.get("lt"))
    if violated and hi_value is not None and hi_value > 10**6:
        rules = {k: v for k, v in rules.items() if (k in ("ge", "gt")) == (violated == "lower")}
    lo = ("[", rules["ge"]) if "ge" in rules else ("(", rules["gt"]) if "gt" in rules else None
    hi = ("]", rules["le"]) if "le" in rules else (")", rules["lt"]) if "lt" in rules else None
    if lo and hi:
        return f"in {lo[0]}{_num(lo[1])}, {_num(hi[1])}{hi[0]}"
    if lo:
        return f"{'>=' if lo[0] == '[' else '>'} {_num(lo[1])}"
    if hi:
        return f"{'<=' if hi[0] == ']' else '<'} {_num(hi[1])}"
    return ""


def _field_rules(cls: type, name: str, loc: tuple) -> dict[str, Any]:
    """The rules that apply at ``loc`` inside field ``name`` (a dict value's own rules, e.g. rank_pattern's)."""
    info = cls.__pydantic_fields__[name]
    if len(loc) > 1:  # an item of a list / dict field: the item type's own rules
        for tp in (info.annotation, *get_args(info.annotation)):
            if get_origin(tp) in (dict, list):
                item = get_args(tp)[-1]
                if get_origin(item) is Annotated:
                    rules: dict = {}
                    for m in get_args(item)[1:]:
                        rules.update(_rules(m))
                    return rules
        return {}
    return _rules(info)


def _explain(cls: type, where: str, raw: dict, error: ValidationError) -> str:
    """One line for the first problem pydantic found in section ``where`` (``raw``: the values given)."""
    errors = error.errors(include_url=False)
    # A union tries every member: report a range / emptiness problem of the member the value has the type of,
    # rather than its mismatch with the other members.
    specific = [e for e in errors if not e["type"].endswith("_type") and e["type"] != "literal_error"]
    first = (specific or errors)[0]
    loc = first["loc"]
    name = str(loc[0]) if loc else ""
    full = f"{where}.{name}" if name else where
    value = raw.get(name, first.get("input"))
    kind = first["type"]
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "too_short"):
        rules = _field_rules(cls, name, loc)
        item = "".join(f"[{short(k)}]" for k in loc[1:] if not isinstance(k, str) or k not in ("str", "list[str]"))
        if kind == "too_short":
            return f"{full} must not be empty, got {short(first['input'])} (where null is allowed, it means none)"
        shown = first.get("input")
        side = "lower" if kind.startswith("greater") else "upper"
        return (
            f"{full}{item} must be {range_text({k: v for k, v in rules.items() if k != 'min_length'}, side)}, "
            f"got {short(shown)}"
        )
    if kind == "finite_number":
        return f"{full} must be a finite number, got {short(value)}"
    if kind == "string_too_short":
        return f"{full} must not be empty"
    if kind == "string_pattern_mismatch":  # the right type in the wrong form: say the form
        pattern = (first.get("ctx") or {}).get("pattern", "")
        return f"{full} is not in a form it accepts (the pattern {pattern}), got {short(value)}"
    tp = typing.get_type_hints(cls, include_extras=True)[name]
    return f"{full}: expected {_type_name(tp)}, got {short(value)} ({type(value).__name__})"


# ------------------------------------------------------------------------------------------------ building


# Names people bring from PEFT / transformers, mapped to ours for the "did you mean" hint.
_ALIASES = {
    "rank": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "target_modules": "targets",
    "learning_rate": "lr",
    "optimizer": "optim",
    "max_steps": "steps",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "output_dir": "dir",
}


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {short(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in raw.items():
        full = f"{where}.{name}" if where else str(name)
        if name not in fields:
            close = (
                [_ALIASES[name]]
                if _ALIASES.get(name) in fields
                else difflib.get_close_matches(str(name), list(fields), n=1)
            )
            hint = f"; did you mean {(where + '.' if where else '') + close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {short(full)}{hint} Valid keys here: {sorted(fields)}")
        if cls is Config:
            kwargs[name] = _build(SECTIONS[name], value, full)
        else:
            kwargs[name] = value
    if cls is Config:
        return cls(**kwargs)
    try:
        return cls(**kwargs)
    except ValidationError as e:
        raise ConfigError(_explain(cls, where, kwargs, e)) from None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
    node[parts[-1]] = value


# ------------------------------------------------------------------------------------------------ YAML

MAX_YAML_NODES = 100_000  # nodes of a document with its aliases expanded (a config has a few hundred)

# What yaml raises on bad input: YAMLError, but also ValueError / KeyError / AttributeError from explicit tags
# with unparsable values (!!int abc, !!bool maybe, !!timestamp 12) and RecursionError from deep nesting.
_YAML_ERRORS = (yaml.YAMLError, ValueError, KeyError, AttributeError, TypeError, RecursionError, OverflowError)


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping and a document whose aliases expand to
    more than ``MAX_YAML_NODES`` nodes (or refer to themselves), before anything is constructed."""

    def get_single_data(self):
        node = self.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return self.construct_document(node)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # '<<: *base' entries may be overridden by the explicit keys that follow
                k = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(k)
                except TypeError:
                    raise yaml.constructor.ConstructorError(
                        None, None, "a mapping key must be a scalar", key_node.start_mark
                    ) from None
                if first is not None:
                    raise _DuplicateKey(
                        f"key {short(k)} is given twice in one mapping (lines {first} and {line}); "
                        "the second would silently replace the first"
                    )
                seen[k] = line
        return super().construct_mapping(node, deep)


class _DuplicateKey(ValueError):
    pass


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a node graph whose aliases expand beyond ``MAX_YAML_NODES`` nodes or form a cycle. Sizes are
    memoised per node, so a billion-laughs document is measured in time linear in its size."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        i = id(node)
        if i in sizes:
            return sizes[i]
        if i in active:
            raise ConfigError("a YAML alias refers to the node that contains it (a recursive structure)")
        active.add(i)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            for child in node.value:
                total += size(child)
                if total > MAX_YAML_NODES:
                    break
        elif isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                total += size(k) + size(v)
                if total > MAX_YAML_NODES:
                    break
        active.discard(i)
        if total > MAX_YAML_NODES:
            raise ConfigError(f"YAML aliases expand to more than {MAX_YAML_NODES:,} values (an alias bomb?)")
        sizes[i] = total
        return total

    size(root)


def load_yaml(text: str, what: str) -> Any:
    """Parse ``text`` with :class:`_StrictLoader`; ``what`` names the source in the error."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as e:
        raise ConfigError(f"{what}: {e}") from None
    except _DuplicateKey as e:
        raise ConfigError(f"{what}: {e}") from None
    except _YAML_ERRORS as e:
        detail = " ".join(str(e).split())
        raise ConfigError(f"{what} is not valid YAML: {detail[:300]}") from None


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {short(text)} must look like section.key=value (e.g. lora.r=16)")
    name, raw = text.split("=", 1)
    if not all(name.strip().split(".")):  # '=4', '.lora.r=4', 'lora..r=4' would report an unknown key ''
        raise ConfigError(
            f"override {short(text)}: the key has an empty part; overrides look like section.key=value (e.g. lora.r=16)"
        )
    value = load_yaml(raw, f"override {short(text)}: value") if raw.strip() else ""
    return name.strip(), value


def _merge_dicts(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_file(path: str | Path) -> dict:
    """The mapping of a YAML config file (not yet validated)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file {str(path)!r} does not exist"
            if not path.exists()
            else f"config file {str(path)!r} is not a file"
        )
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {e}") from None
    raw = load_yaml(text, f"config file {str(path)!r}")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(raw).__name__}")
    return raw


def last_wins(overrides: list[str] | tuple[str, ...]) -> list[str]:
    """``overrides`` with one entry per key, the last one given: for programs that compose command lines from parts
    (an experiment's base plus its variant); a person's command line names each key once (:func:`load_config`)."""
    out: dict[str, str] = {}
    for text in overrides:
        out.pop(parse_override(text)[0], None)
        out[parse_override(text)[0]] = text
    return list(out.values())


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (``None``: the defaults), apply ``dotted.key=value`` overrides, validate."""
    raw = read_file(path) if path is not None else {}
    extra: dict = {}
    given: dict[str, str] = {}
    for text in overrides:
        name, value = parse_override(text)
        if name in given:  # the last one would win without a word
            raise ConfigError(
                f"override {short(text)}: {name} is already given on this command line "
                f"({short(given[name])}); give each key once"
            )
        given[name] = text
        _set_dotted(extra, name, value)
    cfg = _build(Config, _merge_dicts(raw, extra), "")
    validate(cfg)
    return cfg


# ------------------------------------------------------------------------------------------- combinations


def uses_adapters(cfg: Config) -> bool:
    return cfg.train.method in ("lora", "qlora")


def _local(cfg: Config) -> bool:
    return sources.kind(cfg.data.source) == "files"


def _hub(cfg: Config) -> bool:
    return sources.kind(cfg.data.source) == "hub"


def _causal(cfg: Config) -> bool:
    return cfg.data.task == "causal-lm"


# data.batching=auto by task: padding-free packed rows for causal LM, length buckets for text classification, fixed
# batches for audio (its log-mel frames are not cut)
AUTO_BATCHING = {"causal-lm": "packed", "chat": "packed", "classification": "bucketed", "audio-classification": "fixed"}


def batching(cfg: Config) -> str:
    """``data.batching`` with ``auto`` resolved for ``data.task``: ``fixed``, ``bucketed`` or ``packed``
    (preference pairs: ``fixed``)."""
    if cfg.data.batching == "auto":
        return "fixed" if _dpo(cfg) else AUTO_BATCHING[cfg.data.task]
    return cfg.data.batching


def _dpo(cfg: Config) -> bool:
    return cfg.train.objective == "dpo"


def _generates(cfg: Config) -> bool:
    return cfg.data.task in ("causal-lm", "chat")


# (keys, applies(cfg), what must hold): a key whose value differs from its default while its condition does not
# hold would be silently ignored; it is refused instead.
APPLIES: list[tuple[tuple[str, ...], Callable[[Config], bool], str]] = [
    (("model.num_labels",), lambda c: not _generates(c), "data.task=classification"),
    (
        (
            "lora.r",
            "lora.alpha",
            "lora.targets",
            "lora.exclude",
            "lora.dropout",
            "lora.use_rslora",
            "lora.use_dora",
            "lora.init",
            "lora.rank_pattern",
            "lora.alpha_pattern",
            "optim.lora_plus_ratio",
            "output.export_peft",
            "output.export_gguf_adapter",
        ),
        uses_adapters,
        "train.method=lora or qlora",
    ),
    (("output.peft_base_model",), lambda c: uses_adapters(c) and c.output.export_peft, "output.export_peft=true"),
    (
        ("lora.train",),
        lambda c: c.train.method != "full",
        "train.method lora, qlora or linear_probe (full trains every leaf)",
    ),
    (("lora.pissa_niter",), lambda c: c.lora.init == "pissa", "lora.init=pissa"),
    (
        ("quant.type", "quant.block_size", "quant.double_quant", "quant.targets"),
        lambda c: c.train.method == "qlora",
        "train.method=qlora",
    ),
    (("quant.block_size", "quant.double_quant"), lambda c: c.quant.type == "nf4", "quant.type=nf4"),
    (("data.prompt_template",), _causal, "data.task=causal-lm"),
    (("data.completion_column",), lambda c: _causal(c) and not _dpo(c), "data.task=causal-lm (train.objective=sft)"),
    (
        ("data.prompt_column",),
        lambda c: _causal(c) or c.data.task == "chat" and _dpo(c),
        "data.task=causal-lm, or chat with train.objective=dpo",
    ),
    (("eval.generate_samples", "eval.generate_eval", "train.loss_chunk"), _generates, "data.task=causal-lm or chat"),
    (("train.logits",), _causal, "data.task=causal-lm"),
    (
        ("data.loss_capacity",),
        lambda c: _causal(c) and batching(c) == "packed" and c.train.logits == "loss",
        "data.task=causal-lm, data.batching=packed (its default) and train.logits=loss (its default)",
    ),
    (
        ("eval.max_new_tokens", "eval.num_beams"),
        lambda c: _generates(c) and (c.eval.generate_samples > 0 or c.eval.generate_eval > 0),
        "data.task=causal-lm or chat with eval.generate_samples or eval.generate_eval > 0",
    ),
    (("data.chat_template",), lambda c: c.data.task == "chat", "data.task=chat"),
    (("data.messages_column",), lambda c: c.data.task == "chat", "data.task=chat"),
    (("data.chosen_column", "data.rejected_column", "dpo.loss", "dpo.beta"), _dpo, "train.objective=dpo"),
    (("dpo.simpo_gamma",), lambda c: _dpo(c) and c.dpo.loss == "simpo", "train.objective=dpo with dpo.loss=simpo"),
    (
        ("dpo.reference",),
        lambda c: _dpo(c) and c.dpo.loss != "simpo",
        "train.objective=dpo with dpo.loss sigmoid or ipo (simpo has no reference)",
    ),
    (("data.text_column",), lambda c: c.data.task == "classification", "data.task=classification"),
    (
        ("data.buckets",),
        lambda c: batching(c) == "bucketed",
        "data.batching=bucketed (the default for data.task=classification)",
    ),
    (
        ("data.pack_length",),
        lambda c: batching(c) == "packed",
        "data.batching=packed (the default for data.task=causal-lm)",
    ),
    (("data.label_column",), lambda c: not _generates(c), "data.task=classification or audio-classification"),
    (("data.audio_column",), lambda c: c.data.task == "audio-classification", "data.task=audio-classification"),
    (
        ("data.train_split", "data.eval_split"),
        _hub,
        "a hub data set in data.source (local files and built-in data have no splits)",
    ),
    (
        ("data.eval_fraction",),
        lambda c: not c.data.eval_source and not c.data.eval_split,
        "no data.eval_source / data.eval_split (it sizes the held-out part of the training rows)",
    ),
    (
        ("data.group_column",),
        lambda c: not c.data.eval_source and not c.data.eval_split,
        "no data.eval_source / data.eval_split (it groups the rows of the train / eval split)",
    ),
    (("optim.b1", "optim.b2"), lambda c: c.optim.name in ("adam", "adamw"), "optim.name=adam or adamw"),
    (("optim.weight_decay",), lambda c: c.optim.name == "adamw", "optim.name=adamw"),
]

_DEFAULT = None


def _default() -> Config:
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Config()
    return _DEFAULT


def _get(cfg: Config, dotted: str) -> Any:
    s, k = dotted.split(".")
    return getattr(getattr(cfg, s), k)


def _regexes(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return list(value)
    return list(value)


def _yaml_repr(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else short(value)


def template_fields(template: str) -> list[str]:
    """The ``{field}`` names of a prompt template (raises ``ValueError`` for a malformed one)."""
    return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]


def validate(cfg: Config) -> None:
    """Checks that involve several values, or values against what they can mean (types and single-value ranges
    were checked when the sections were built)."""
    default = _default()
    lc, oc = cfg.lora, cfg.optim
    if cfg.mesh.data == 0:
        raise ConfigError("mesh.data must be -1 (all devices) or >= 1, got 0")
    if cfg.train.loss_chunk != "auto" and cfg.train.loss_chunk < 0:
        raise ConfigError(
            f"train.loss_chunk must be 'auto', 0 (full logits) or a number of tokens > 0, got {cfg.train.loss_chunk}"
        )
    if _dpo(cfg):
        if cfg.train.method not in ("lora", "qlora"):
            raise ConfigError(
                f"train.objective=dpo needs train.method lora or qlora (got {cfg.train.method}): the "
                "reference policy is the frozen base with the adapters off"
            )
        if not _generates(cfg):
            raise ConfigError(f"train.objective=dpo needs data.task causal-lm or chat, got {cfg.data.task}")
        if lc.train is not None:
            raise ConfigError(
                "train.objective=dpo with lora.train: leaves trained in full would change the "
                "reference policy (the base with the adapters off); train adapters only"
            )
        if batching(cfg) != "fixed":
            raise ConfigError(
                f"train.objective=dpo: data.batching={cfg.data.batching} is not supported for "
                "preference pairs; use fixed (or auto)"
            )
    if cfg.model.adapter is not None and (cfg.output.export_peft or cfg.output.export_gguf_adapter):
        raise ConfigError(
            "model.adapter with output.export_peft / export_gguf_adapter: the new adapters are an "
            "update of the base with model.adapter merged in, which a PEFT or llama.cpp adapter of "
            "the original base cannot state; export output.export_merged / export_gguf instead"
        )
    if cfg.data.batching == "packed" and not _generates(cfg):
        raise ConfigError(
            f"data.batching=packed needs data.task=causal-lm (a {cfg.data.task} model reads one "
            "example per row); use bucketed or fixed"
        )
    if cfg.data.batching == "bucketed" and cfg.data.task == "audio-classification":
        raise ConfigError(
            "data.batching=bucketed with data.task=audio-classification: log-mel frames are not cut "
            "to length; use fixed"
        )
    if cfg.quant.type == "nf4" and cfg.quant.block_size not in NF4_BLOCK_SIZES:
        raise ConfigError(
            f"quant.block_size must be one of {list(NF4_BLOCK_SIZES)} for nf4, got {cfg.quant.block_size}"
        )
    if oc.name == "adamw" and oc.lr * oc.weight_decay >= 1:
        raise ConfigError(
            f"optim.weight_decay={oc.weight_decay:g} with optim.lr={oc.lr:g}: adamw multiplies the "
            f"weights by 1 - lr x weight_decay = {1 - oc.lr * oc.weight_decay:g} each step, which "
            "flips or zeroes them; lr x weight_decay must be < 1"
        )
    if cfg.train.method == "qlora" and lc.init == "pissa" and cfg.output.export_peft:
        raise ConfigError(
            "output.export_peft with lora.init=pissa and train.method=qlora: the adapters belong to the "
            "quantised PiSSA residual, a base PEFT cannot rebuild from the original model; export "
            "output.export_merged instead, or train PiSSA without quantisation"
        )
    for keys, applies, condition in APPLIES:
        if applies(cfg):
            continue
        for dotted in keys:
            value = _get(cfg, dotted)
            if value != _get(default, dotted):
                raise ConfigError(
                    f"{dotted}={short(value)} has no effect here: it applies only with {condition}; "
                    f"remove it (the default is {_yaml_repr(_get(default, dotted))})"
                )
    from lora_jax.targets import PRESETS

    for dotted in (
        "lora.targets",
        "lora.exclude",
        "lora.train",
        "lora.rank_pattern",
        "lora.alpha_pattern",
        "quant.targets",
    ):
        for rule in _regexes(_get(cfg, dotted)):
            if isinstance(rule, str) and rule in PRESETS and dotted in ("lora.targets", "quant.targets"):
                continue
            if not rule:
                raise ConfigError(f"{dotted}: an empty pattern matches no path")
            regex.compile(rule, dotted, ConfigError)  # the engine lora_jax runs it with (RE2, linear time)
    if _causal(cfg):
        template = cfg.data.prompt_template
        try:
            fields = template_fields(template)
        except ValueError as e:
            raise ConfigError(
                f"data.prompt_template={short(template)} is not a valid template ({e}); write "
                "fields as {column} and a literal brace as {{ or }}"
            ) from None
        bad = [f for f in fields if not f.isidentifier()]
        if bad:
            raise ConfigError(
                f"data.prompt_template={short(template)}: field {{{bad[0]}}} must be a column name "
                "(no positional {} fields, indexing or attributes)"
            )
        styled = [
            f"{{{f}{'!' + c if c else ''}{':' + spec if spec else ''}}}"
            for _, f, spec, c in string.Formatter().parse(template)
            if f is not None and (spec or c)
        ]
        if styled:
            raise ConfigError(
                f"data.prompt_template={short(template)}: field {short(styled[0])} must be a plain "
                "{name} (no conversion or format spec)"
            )
        if not fields:
            raise ConfigError(
                f"data.prompt_template={short(template)} has no {{column}} field: every prompt would be the same text"
            )
        columns = [cfg.data.prompt_column if f == "prompt" else f for f in fields]
        if cfg.data.completion_column in columns:  # the answer would be inside the prompt
            via = (
                "data.prompt_column"
                if cfg.data.prompt_column == cfg.data.completion_column
                else f"data.prompt_template={short(template)}"
            )
            raise ConfigError(
                f"data.completion_column={short(cfg.data.completion_column)} is also read into the "
                f"prompt (through {via}): the model would see the answer in its prompt; point the "
                "prompt and the completion at different columns"
            )
        if cfg.data.prompt_column != default.data.prompt_column and "prompt" not in fields:
            raise ConfigError(
                f"data.prompt_column={short(cfg.data.prompt_column)} has no effect: it fills the "
                f"{{prompt}} field, and data.prompt_template={short(template)} has none"
            )
    if cfg.data.eval_source and cfg.data.eval_split:
        raise ConfigError(
            "data.eval_source and data.eval_split are both set; give one (eval_source: local files, "
            "eval_split: a split of the hub data set)"
        )
    if cfg.data.eval_source is not None and sources.kind(cfg.data.eval_source) == "builtin":
        raise ConfigError(
            f"data.eval_source={short(cfg.data.eval_source)}: built-in data sets are split from "
            "data.source (leave data.eval_source null)"
        )


# ------------------------------------------------------------------------------------------------- output


def dump(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def key_table() -> str:
    """A Markdown table of every config key: default, allowed values and meaning (README's key table)."""
    rows = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    hints = typing.get_type_hints(Config)
    for section_name in SECTIONS:
        cls = hints[section_name]
        types_ = typing.get_type_hints(cls, include_extras=True)
        for f in dataclasses.fields(cls):
            info = cls.__pydantic_fields__[f.name]
            tp = types_[f.name]
            allowed = _type_name(tp)
            rules = {k: v for k, v in _rules(info).items() if k != "min_length"}
            if rules:
                allowed += f", {range_text(rules, 'lower')}"
            item_rules = _field_rules(cls, f.name, (f.name, "item"))
            if item_rules:
                allowed += f" (values {range_text(item_rules, 'lower')})"
            default = info.default
            shown = (
                "null"
                if default is None
                else repr(default)
                if isinstance(default, str)
                else str(default).lower()
                if isinstance(default, bool)
                else f"{default:g}"
                if isinstance(default, float)
                else str(default)
            )
            rows.append(
                f"| `{section_name}.{f.name}` | `{shown}` | {allowed} | {info.description} |".replace("`'", "`")
                .replace("'`", "`")
                .replace("\n", "\\n")
            )
    return "\n".join(rows)


if __name__ == "__main__":
    print(key_table())
