"""Run configuration: typed sections, YAML files, ``dotted.key=value`` overrides, strict validation.

A config is a tree of frozen dataclasses. ``load_config(path, overrides)`` reads a YAML file (or the embedded
default when ``path`` is None), applies overrides such as ``lora.r=16`` or ``optim.lr=3e-4`` (values parsed as
YAML), and checks every key and type: an unknown or misspelt key is an error that names the closest valid key,
a value of the wrong type names the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from lora_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str = "SmolLM2-135M-Instruct-Q4_1"  # HF hub id, local folder, .gguf file or offline alias
    num_labels: int = 2  # for sequence classification


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    r: int = 8
    alpha: float | None = None  # default: r (scale 1)
    targets: str | list[str] = "qv"
    exclude: list[str] | None = None
    dropout: float = 0.0
    use_rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r
    use_dora: bool = False  # DoRA: a trained magnitude per output feature (Liu et al. 2024)
    init: Literal["lora", "gaussian", "pissa"] = "lora"  # pissa: A, B on W's top-r singular directions (residual base)
    pissa_niter: int | None = None  # pissa: None for the exact SVD, N for a randomised SVD with N power iterations
    rank_pattern: dict[str, int] | None = None  # {regex of a kernel path: r}, first full match wins
    alpha_pattern: dict[str, float] | None = None  # {regex of a kernel path: alpha}
    train: list[str] | None = None  # base leaves trained in full (e.g. a new classifier head)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "builtin:restaurants"  # builtin:NAME, a hub dataset name, or local csv/tsv/json/jsonl/parquet files
    # audio-classification: rows name a WAV file (audio_column) and a class id; max_length counts mel frames
    task: Literal["causal-lm", "classification", "audio-classification"] = "causal-lm"
    train_split: str = "train"
    eval_source: str | None = None  # evaluation file(s) (local data); None: see eval_split
    eval_split: str | None = None  # hub data set split; None (and no eval_source): hold out eval_fraction of train
    eval_fraction: float = 0.1
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    text_column: str = "sentence"
    label_column: str = "label"
    audio_column: str = "audio"  # audio-classification: WAV paths (relative ones: to the data file's folder)
    group_column: str | None = None  # rows sharing this value stay on the same side of the split (E2E: the MR)
    max_length: int = 64
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    prompt_template: str = "{prompt}\n"
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 2e-3
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    schedule: Literal["constant", "linear", "cosine"] = "linear"
    warmup_steps: int = 10
    grad_clip: float | None = 1.0
    lora_plus_ratio: float | None = None  # LoRA+: B's learning rate = ratio x A's


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """The frozen base of ``train.method: qlora`` (Dettmers et al. 2023): kernels stored quantised, dequantised
    to ``train.precision`` inside the jitted step; the adapters (and leaves trained in full) stay float32."""

    type: Literal["nf4", "int8"] = "nf4"  # nf4: 4-bit NormalFloat, block-wise absmax; int8: per output channel
    block_size: int = 64  # nf4: values per absmax block (32, 64, ..., 4096)
    double_quant: bool = True  # nf4: quantise the absmax constants to 8 bits (blocks of 256)
    targets: str | list[str] = "all-linear"  # which frozen kernels (preset or regexes); embeddings/heads stay float


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    method: Literal["lora", "qlora", "full", "linear_probe"] = "lora"
    steps: int = 60
    batch_size: int = 8
    grad_accum: int = 1
    # frozen base and compute dtype; adapters (and, for lora / qlora, leaves trained in full) stay float32
    precision: Literal["float32", "bfloat16"] = "float32"
    remat: bool = False
    seed: int = 0
    nan_policy: Literal["stop", "skip"] = "stop"
    time_budget_s: float | None = None  # stop early when the wall-clock budget is spent


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # devices along the data axis (-1: all devices / fsdp)
    fsdp: int = 1  # devices along the FSDP axis that shards the frozen base


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    every: int = 20
    batch_size: int = 16
    generate_samples: int = 3  # sample generations printed before and after training (causal LM)
    generate_eval: int = 16  # examples decoded for BLEU / ROUGE-L at the end (causal LM); 0 disables
    max_new_tokens: int = 32
    num_beams: int = 1


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 50
    keep: int = 2


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    dir: str = "runs/default"
    overwrite: bool = False  # allow writing into a folder that holds a different run
    export_merged: bool = False  # write merged HF-layout safetensors at the end
    export_peft: bool = False  # write a PEFT-format adapter at the end


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    quant: QuantConfig = QuantConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    output: OutputConfig = OutputConfig()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)




# ---------------------------------------------------------------------------------------------- typing


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints are accepted for floats)."""
    origin = get_origin(tp)
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{where}: expected one of {list(get_args(tp))}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in get_args(tp):
            try:
                return _coerce(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r} ({type(value).__name__})")
        (item,) = get_args(tp)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r} ({type(value).__name__})")
        k_tp, v_tp = get_args(tp)
        return {_coerce(k, k_tp, f"{where} key"): _coerce(v, v_tp, f"{where}[{k!r}]") for k, v in value.items()}
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r} ({type(value).__name__})")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r} ({type(value).__name__})")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r} ({type(value).__name__})")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r} ({type(value).__name__})")
    raise ConfigError(f"{where}: unsupported type {tp}")  # pragma: no cover - schema bug


# Names people bring from PEFT / transformers, mapped to ours for the "did you mean" hint.
_ALIASES = {"rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "targets",
            "learning_rate": "lr", "optimizer": "optim", "max_steps": "steps", "per_device_train_batch_size":
            "batch_size", "gradient_accumulation_steps": "grad_accum", "output_dir": "dir"}


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        name = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = [_ALIASES[key]] if _ALIASES.get(key) in fields else \
                difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {(where + '.' if where else '') + close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {name!r}{hint} Valid keys here: {sorted(fields)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, name)
        else:
            kwargs[key] = _coerce(value, tp, name)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
    node[parts[-1]] = value


# What yaml.safe_load raises on bad input: YAMLError, but also ValueError / KeyError / AttributeError from explicit
# tags with unparsable values (!!int abc, !!bool maybe, !!timestamp 12) and RecursionError from deep nesting.
_YAML_ERRORS = (yaml.YAMLError, ValueError, KeyError, AttributeError, TypeError, RecursionError)


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. lora.r=16)")
    key, raw = text.split("=", 1)
    if not all(key.strip().split(".")):  # '=4', '.lora.r=4', 'lora..r=4' would report an unknown key ''
        raise ConfigError(f"override {text!r}: the key has an empty part; overrides look like section.key=value "
                          "(e.g. lora.r=16)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except _YAML_ERRORS as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {e}") from None
    return key.strip(), value


def _merge_dicts(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (``None``: the defaults), apply ``dotted.key=value`` overrides, validate."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except _YAML_ERRORS as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(raw).__name__}")
    extra: dict = {}
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(extra, key, value)
    cfg = _build(Config, _merge_dicts(raw, extra), "")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Checks that involve values, not just types."""
    checks = [
        (cfg.lora.r >= 1, f"lora.r must be >= 1, got {cfg.lora.r}"),
        (0.0 <= cfg.lora.dropout < 1.0, f"lora.dropout must be in [0, 1), got {cfg.lora.dropout}"),
        (cfg.train.steps >= 1, f"train.steps must be >= 1, got {cfg.train.steps}"),
        (cfg.train.batch_size >= 1, f"train.batch_size must be >= 1, got {cfg.train.batch_size}"),
        (cfg.train.grad_accum >= 1, f"train.grad_accum must be >= 1, got {cfg.train.grad_accum}"),
        (cfg.optim.lr > 0, f"optim.lr must be > 0, got {cfg.optim.lr}"),
        (cfg.data.max_length >= 8, f"data.max_length must be >= 8, got {cfg.data.max_length}"),
        (0.0 < cfg.data.eval_fraction < 1.0, f"data.eval_fraction must be in (0, 1), got {cfg.data.eval_fraction}"),
        (cfg.eval.every >= 1, f"eval.every must be >= 1, got {cfg.eval.every}"),
        (cfg.checkpoint.every >= 1, f"checkpoint.every must be >= 1, got {cfg.checkpoint.every}"),
        (cfg.mesh.fsdp >= 1, f"mesh.fsdp must be >= 1, got {cfg.mesh.fsdp}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    lc = cfg.lora
    for path, r in (lc.rank_pattern or {}).items():
        if r < 1:
            raise ConfigError(f"lora.rank_pattern[{path!r}] must be >= 1, got {r}")
    if lc.pissa_niter is not None and (lc.init != "pissa" or lc.pissa_niter < 0):
        raise ConfigError(f"lora.pissa_niter={lc.pissa_niter} needs lora.init=pissa and a value >= 0")
    if cfg.quant.type == "nf4" and cfg.quant.block_size not in NF4_BLOCK_SIZES:
        raise ConfigError(f"quant.block_size must be one of {list(NF4_BLOCK_SIZES)} for nf4, got "
                          f"{cfg.quant.block_size}")
    if cfg.train.method == "qlora" and lc.init == "pissa" and cfg.output.export_peft:
        raise ConfigError("output.export_peft with lora.init=pissa and train.method=qlora: the adapters belong to the "
                          "quantised PiSSA residual, a base PEFT cannot rebuild from the original model; export "
                          "output.export_merged instead, or train PiSSA without quantisation")


NF4_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # as lora_jax.quant (bitsandbytes' block sizes)


def dump(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
