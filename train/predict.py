"""``python -m train.predict``: run a trained adapter on new inputs.

    python -m train.predict --run runs/sst2_minilm_lora --text "a gorgeous film" --text "dull and long"
    python -m train.predict --run runs/default --file prompts.jsonl --column prompt --out generations.jsonl
    python -m train.predict --base all-MiniLM-L6-v2 --adapter runs/sst2/peft --file dev.tsv --column sentence
    python -m train.predict --base SmolLM2-135M-Instruct-Q4_1 --adapter runs/default/adapter.gguf --text "..."

The model comes from one of

- ``--run DIR``: a finished ``python -m train.run`` run folder, or a job's ``output.dir`` (its ``latest`` run is
  used). The run's ``config.yaml`` says which base, task,
  method and precision; its ``adapters/`` (and ``params/``: leaves trained in full, e.g. a classifier head) hold
  what was trained. The frozen base is rebuilt as the run trained over it: quantised for ``qlora``, PiSSA's
  residual for ``lora.init: pissa``.
- ``--base NAME --adapter DIR``: any model :func:`lora_jax.models.load` accepts and an adapter folder, either
  :func:`lora_jax.checkpoint.save_adapters`' (``runs/X/adapters``) or a PEFT adapter (``adapter_config.json``,
  e.g. ``runs/X/peft``; its ``modules_to_save`` such as a classifier head come with it), or a llama.cpp LoRA
  adapter file (``.gguf``, e.g. ``runs/X/adapter.gguf``, or one made by llama.cpp's ``convert_lora_to_gguf.py``).

By default the adapters run factored (``x @ W0 + ((x @ A) @ B) * s``); ``--merged`` folds them into the base
first (a quantised base is dequantised), which gives the same outputs at the base model's speed.

Inputs are ``--text`` (repeatable) or ``--file`` (``.txt``: one input per line; ``.jsonl``: one JSON object or
string per line; ``.csv`` / ``.tsv``: a header row) with ``--column``. A causal LM continues each prompt (greedy;
``--num-beams N`` for beam search, ``--max-new-tokens``); prompts are formatted with the run's
``data.prompt_template`` (a row that holds every field of the template fills it; a bare text fills its only
field; ``--template '{text}'`` passes texts unchanged). A classifier prints the label and the class
probabilities. ``--out FILE.jsonl`` writes one JSON record per input.

Bad input (a missing folder or file, an adapter trained on another base, an unknown column) exits with status
2 and a one-line message; ``LORA_JAX_TRACEBACK=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import string
import sys
from pathlib import Path
from typing import Any

from lora_jax.errors import LoraJaxError
from train.cli import ArgumentParser


class PredictError(LoraJaxError, ValueError):
    """Input to ``train.predict`` that does not fit (a folder, file, column or adapter)."""


def parse_args(argv=None) -> argparse.Namespace:
    ap = ArgumentParser(
        prog="python -m train.predict",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = ap.add_argument_group("model (one of --run, or --base with --adapter)")
    src.add_argument("--run", help="a finished train.run run folder, or its output.dir (the latest run)")
    src.add_argument("--base", help="base model: a Hugging Face folder, .gguf file or offline alias")
    src.add_argument(
        "--adapter",
        help="with --base: a lora_jax adapters folder, a PEFT adapter folder or a llama.cpp LoRA adapter .gguf file",
    )
    src.add_argument(
        "--task",
        choices=["causal-lm", "classification"],
        help="with --base: the task (default: a PEFT adapter's task_type, else causal-lm for a model "
        "family that has one, classification for the others)",
    )
    src.add_argument("--num-labels", type=int, help="with --base, classification: number of classes")
    src.add_argument("--precision", choices=["float32", "bfloat16"], help="compute dtype (default: the run's)")
    ap.add_argument("--merged", action="store_true", help="merge the adapters into the base before inference")
    inp = ap.add_argument_group("inputs")
    inp.add_argument("--text", action="append", default=[], help="an input text (repeatable)")
    inp.add_argument("--file", help="a .txt, .jsonl, .csv or .tsv file of inputs")
    inp.add_argument("--column", help="the field of --file rows to read (default: the run's text/prompt column)")
    inp.add_argument(
        "--template",
        help="prompt template for a causal LM (default: the run's data.prompt_template; '{text}' for --base)",
    )
    gen = ap.add_argument_group("generation / classification")
    gen.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's eval.max_new_tokens")
    gen.add_argument("--num-beams", type=int, default=1, help="beam search with N beams (default 1: greedy)")
    gen.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="classification: tokens per input (default: the run's data.max_length)",
    )
    gen.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", help="write one JSON record per input to this .jsonl file")
    args = ap.parse_args(argv)
    if bool(args.run) == bool(args.base):
        ap.error("give either --run DIR or --base NAME --adapter DIR")
    if args.base and not args.adapter:
        ap.error(
            "--base needs --adapter DIR (to run the base model alone, point --adapter at nothing: not "
            "supported; use lora_jax.models.load)"
        )
    if args.run and (args.adapter or args.task or args.num_labels):
        ap.error("--adapter / --task / --num-labels go with --base; a --run folder names its own")
    if not args.text and not args.file:
        ap.error("give inputs with --text (repeatable) or --file")
    if args.num_beams < 1 or args.batch_size < 1 or (args.max_new_tokens is not None and args.max_new_tokens < 1):
        ap.error("--num-beams, --batch-size and --max-new-tokens must be >= 1")
    return args


# ------------------------------------------------------------------------------------------------ inputs


def read_inputs(texts: list[str], file: str | None, column: str | None) -> list[dict | str]:
    """The inputs in order: each ``--text`` as a string, then each row of ``file`` (a dict for .jsonl objects
    and .csv / .tsv rows, a string for .txt lines and .jsonl strings)."""
    try:
        return _read_inputs(texts, file, column)
    except UnicodeDecodeError as e:
        raise PredictError(f"--file {file!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise PredictError(f"--file {file!r} is not a valid CSV / TSV file ({e})") from None


def _read_inputs(texts: list[str], file: str | None, column: str | None) -> list[dict | str]:
    rows: list[dict | str] = list(texts)
    if file is None:
        return rows
    path = Path(file)
    if not path.is_file():
        raise PredictError(f"--file {file!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        rows += [line.rstrip("\n") for line in path.read_text().splitlines() if line.strip()]
    elif suffix == ".jsonl":
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise PredictError(f"{file}:{i}: not valid JSON: {e}") from None
            if not isinstance(value, (dict, str)):
                raise PredictError(f"{file}:{i}: expected a JSON object or string, got {type(value).__name__}")
            rows.append(value)
    elif suffix in (".csv", ".tsv"):
        with path.open(newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            rows += [dict(r) for r in reader]
    else:
        raise PredictError(f"--file {file!r}: expected a .txt, .jsonl, .csv or .tsv file")
    if len(rows) == len(texts):
        raise PredictError(f"--file {file!r} holds no inputs")
    if column is not None:
        for i, row in enumerate(rows):
            if isinstance(row, dict) and column not in row:
                raise PredictError(
                    f"{file}: row {i + 1 - len(texts)} has columns {sorted(row)}, no {column!r} (--column)"
                )
    return rows


def template_fields(template: str) -> list[str]:
    """The ``{field}`` names of ``template``; a malformed template, or a field with a conversion or format
    spec (``{text!r}``, ``{text:>99999999}``), is a :class:`PredictError`."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise PredictError(
            f"template {template!r} is not valid ({e}); write fields as {{name}}, a literal brace as {{{{ or }}}}"
        ) from None
    for _, name, spec, conversion in parsed:
        if name is not None and (not name.isidentifier() or spec or conversion):
            raise PredictError(
                f"template {template!r}: field {{{name}{'!' + conversion if conversion else ''}"
                f"{':' + spec if spec else ''}}} must be a plain {{name}}"
            )
    return [f for _, f, _, _ in parsed if f]


def as_text(row: dict | str, column: str | None, default_column: str) -> str:
    """The text of an input for a classifier: the string itself, or the row's ``column``."""
    if isinstance(row, str):
        return row
    name = column or default_column
    if name not in row:
        raise PredictError(f"an input row has columns {sorted(row)}, no {name!r}; name the text with --column")
    return str(row[name])


def as_prompt(row: dict | str, column: str | None, template: str, prompt_column: str = "prompt") -> str:
    """A causal-LM prompt: a row holding every field of ``template`` fills it (``{prompt}`` from the run's
    ``data.prompt_column``); otherwise the text (the string, or the row's ``column``) fills the template's one
    field (or is used as it is, for a template of several)."""
    fields = template_fields(template)
    if isinstance(row, dict) and "prompt" in fields and "prompt" not in row and prompt_column in row:
        row = {**row, "prompt": row[prompt_column]}
    if isinstance(row, dict):
        if column is None and fields and all(f in row for f in fields):
            return template.format(**row)
        if column is None:
            raise PredictError(
                f"an input row has columns {sorted(row)}, not the template's fields {fields}; name "
                "the prompt with --column"
            )
        row = str(row[column])
    if len(fields) == 1:
        return template.format(**{fields[0]: row})
    return row


def as_chat_prompt(row: dict | str, column: str | None, tokenizer, data_cfg) -> str:
    """A chat run's prompt, rendered by the run's chat template with the generation prompt: a text is one user
    message; a row's ``column`` (default ``data.messages_column``) holds messages (a last assistant message, the
    reference, is dropped)."""
    from train import data as data_lib

    if isinstance(row, str):
        messages = [{"role": "user", "content": row}]
    else:
        name = column or data_cfg.messages_column
        if name not in row:
            raise PredictError(f"an input row has columns {sorted(row)}, no {name!r}; name the messages with --column")
        value = row[name]
        if isinstance(value, str) and not value.lstrip().startswith("["):
            messages = [{"role": "user", "content": value}]
        else:
            try:
                messages = data_lib.parse_messages(value, "an input row", f"column {name!r}")
            except data_lib.DataError as e:
                raise PredictError(str(e)) from None
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
    try:
        template = data_lib.chat_template(tokenizer, data_cfg)
        return data_lib.render_chat(tokenizer, messages, template, add_generation_prompt=True)
    except data_lib.DataError as e:
        raise PredictError(str(e)) from None


# ------------------------------------------------------------------------------------------------- model


@dataclasses.dataclass
class Predictor:
    model: Any
    weights: Any  # plain, merged or wrapped (lora.wrap) parameters
    tokenizer: Any
    cfg: Any  # a train Config: task, max_length, prompt template, generation settings
    source: str


def _check_folder(path: str, what: str) -> Path:
    folder = Path(path)
    if not folder.exists():
        raise PredictError(f"{what} {path!r} does not exist")
    if not folder.is_dir():
        raise PredictError(f"{what} {path!r} is not a folder")
    return folder


def _finish(model, params, adapters, tokenizer, cfg, merged: bool, source: str) -> Predictor:
    import lora_jax as lora
    from train import loop

    if merged:
        weights = loop.merged_params(params, adapters)
    else:
        weights = lora.wrap(params, adapters) if adapters else params
    return Predictor(model, weights, tokenizer, cfg, source)


def from_run(folder: str, *, merged: bool = False, precision: str | None = None) -> Predictor:
    """The model of a finished ``train.run`` folder, its frozen base rebuilt as the run trained over it."""
    import lora_jax as lora
    from lora_jax.checkpoint import load_adapters
    from train import loop, outputs

    run_dir = outputs.resolve_run(folder, "--run")
    cfg = outputs.saved_config(run_dir, f"--run {folder!r}")
    if precision:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))
    model, params, tokenizer, _ = loop.load_model(cfg)
    init_key, _ = loop.run_keys(cfg)
    prepared = loop.prepare(cfg, params, init_key)
    del params
    adapters: Any = {}
    if cfg.train.method in ("lora", "qlora"):
        if not (run_dir / "adapters").is_dir():
            raise PredictError(
                f"--run {folder!r}: {run_dir} has no adapters/ folder: the run did not finish "
                "(resume it with python -m train.run --resume)"
            )
        adapters = load_adapters(run_dir / "adapters")
        expected = {p: ad.kernel_shape for p, ad in lora.adapter_items(prepared.trainable["adapters"])}
        found = {p: ad.kernel_shape for p, ad in lora.adapter_items(adapters)}
        if set(found) != set(expected):
            raise PredictError(
                f"{run_dir / 'adapters'} adapts {sorted(found)[:4]}..., its config.yaml targets "
                f"{sorted(expected)[:4]}...; the folder mixes two runs"
            )
    trained = prepared.trainable["params"]
    if lora.targets.leaf_paths(trained):
        if not (run_dir / "params").is_dir():
            raise PredictError(
                f"--run {folder!r} has no params/ folder (the leaves trained in full, e.g. the "
                "classifier head): the run did not finish, or was written by an older train.run"
            )
        trained = loop.load_trained(run_dir / "params", trained)
    params, adapters = lora.combine(prepared.frozen, {"adapters": adapters, "params": trained})
    return _finish(model, params, adapters, tokenizer, cfg, merged, str(run_dir))


def _adapter_kind(folder: Path) -> str:
    from lora_jax.checkpoint import META_FILE

    if (folder / "adapter_config.json").is_file():
        return "peft"
    if (folder / META_FILE).is_file():
        return "lora_jax"
    raise PredictError(
        f"--adapter {str(folder)!r} holds neither a lora_jax adapter ({META_FILE}) nor a PEFT "
        "adapter (adapter_config.json)"
    )


def from_base(
    base: str,
    adapter: str,
    *,
    task: str | None = None,
    num_labels: int | None = None,
    merged: bool = False,
    precision: str | None = None,
) -> Predictor:
    """A base model (anything :func:`lora_jax.models.load` takes) with a lora_jax or PEFT adapter."""
    from lora_jax import models
    from lora_jax.checkpoint import load_adapters
    from train.config import load_config

    if num_labels is not None and num_labels < 1:
        raise PredictError(f"--num-labels must be >= 1, got {num_labels}")
    if Path(adapter).is_file() and Path(adapter).suffix.lower() == ".gguf":
        folder, kind = Path(adapter), "gguf"
    else:
        folder = _check_folder(adapter, "--adapter folder")
        kind = _adapter_kind(folder)
    run_config = folder.parent / "config.yaml"
    if kind == "lora_jax" and run_config.is_file():
        from train import outputs

        run_cfg = outputs.saved_config(folder.parent, f"--adapter {adapter!r}")
        if run_cfg.train.method == "qlora" or run_cfg.lora.init == "pissa":
            raise PredictError(
                f"{folder} was trained over a {'quantised' if run_cfg.train.method == 'qlora' else ''}"
                f"{' PiSSA residual' if run_cfg.lora.init == 'pissa' else ''} base, not over "
                f"{base!r} as it is; use --run {folder.parent}"
            )
    if kind == "peft":
        from lora_jax.peft import read_config

        peft_cfg = read_config(folder)
    else:
        peft_cfg = {}
    if task is None and peft_cfg.get("task_type") in ("SEQ_CLS", "CAUSAL_LM"):
        task = "classification" if peft_cfg["task_type"] == "SEQ_CLS" else "causal-lm"
    path = models.resolve(base)
    if task is None:
        task = (
            "causal-lm"
            if not path.is_dir() or "causal-lm" in models.for_model_type(_model_type(path)).tasks
            else "classification"
        )
    if num_labels is not None and task != "classification":
        raise PredictError("--num-labels is for classification")
    default = load_config(None)
    cfg = dataclasses.replace(
        default,
        model=dataclasses.replace(
            default.model,
            name=str(base),
            num_labels=num_labels or (_num_labels(path) if task == "classification" else default.model.num_labels),
        ),
        data=dataclasses.replace(default.data, task=task, prompt_template="{text}"),
        train=dataclasses.replace(default.train, precision=precision or "float32"),
    )
    load_task = "causal-lm" if task == "causal-lm" else "sequence-classification"
    extra = {"num_labels": cfg.model.num_labels} if task == "classification" else {}
    loaded = models.load_model(base, dtype=cfg.train.precision, task=load_task, **extra)
    params = loaded.params
    if kind == "peft":
        from lora_jax.peft import load_peft

        peft = load_peft(folder, params, config=loaded.config)
        adapters, params = peft.adapters, peft.update(params)
        fresh = [p for p in loaded.new_params if not _in_tree(peft.trained, p)]
    elif kind == "gguf":
        from lora_jax.gguf_export import load_gguf_adapter

        adapters = load_gguf_adapter(folder, loaded.config, params=params)
        fresh = list(loaded.new_params)
    else:
        adapters = load_adapters(folder)
        fresh = list(loaded.new_params)
    if fresh:
        raise PredictError(
            f"{base!r} has no trained {', '.join(fresh[:2])} (a new head would be random) and the "
            f"adapter does not bring it; use --run with the training folder, or a PEFT export with "
            f"modules_to_save"
        )
    return _finish(loaded.model, params, adapters, loaded.tokenizer, cfg, merged, f"{base} + {folder}")


def _in_tree(tree: dict, path: str) -> bool:
    node: Any = tree
    for k in path.split("/"):
        if not isinstance(node, dict) or k not in node:
            return False
        node = node[k]
    return True


def _hf_config(path: Path) -> dict:
    file = path / "config.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def _model_type(path: Path) -> str | None:
    return _hf_config(path).get("model_type")


def _num_labels(path: Path) -> int:
    cfg = _hf_config(path)
    if "num_labels" in cfg:
        return int(cfg["num_labels"])
    return len(cfg.get("id2label") or {}) or 2


# ------------------------------------------------------------------------------------------------ running


def classify(p: Predictor, texts: list[str], *, max_length: int | None = None, batch_size: int = 8) -> list[dict]:
    """``[{"label": int, "probabilities": [...]}, ...]`` for ``texts`` (fixed-shape batches: one compile)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from train import data as data_lib

    length = max_length or p.cfg.data.max_length
    positions = getattr(getattr(p.model, "config", None), "max_position_embeddings", None)
    if positions is not None and length > positions:
        raise PredictError(f"--max-length {length} exceeds the model's {positions} positions")
    pad = data_lib._pad_id(p.tokenizer)

    @jax.jit
    def probs(weights, ids, mask):
        logits = p.model.apply({"params": weights}, ids, attention_mask=mask, deterministic=True)
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

    out = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        ids = np.full((batch_size, length), pad, np.int32)
        mask = np.zeros((batch_size, length), np.int32)
        for i, t in enumerate(chunk + [chunk[-1]] * (batch_size - len(chunk))):
            toks = p.tokenizer(t, truncation=True, max_length=length)["input_ids"]
            ids[i, : len(toks)] = toks
            mask[i, : len(toks)] = 1
        pr = np.asarray(probs(p.weights, ids, mask))[: len(chunk)]
        out += [{"label": int(np.argmax(row)), "probabilities": [float(x) for x in row]} for row in pr]
    return out


def generate(
    p: Predictor, prompts: list[str], *, max_new_tokens: int | None = None, num_beams: int = 1, batch_size: int = 8
) -> list[str]:
    """Continuations of ``prompts`` (greedy, or beam search as the run's evaluation decodes)."""
    from train import loop

    ev = dataclasses.replace(
        p.cfg.eval, num_beams=num_beams, max_new_tokens=max_new_tokens or p.cfg.eval.max_new_tokens
    )
    return loop.generate_texts(
        p.model, p.weights, p.tokenizer, prompts, dataclasses.replace(p.cfg, eval=ev), batch_size=batch_size
    )


# The decodings :func:`score_heldout` runs: greedy, and the LoRA paper's E2E decoding (beam 10, length penalty 0.9,
# no repeated 4-grams; :func:`train.loop.generate_texts` applies the last two whenever ``num_beams > 1``).
GREEDY = {"num_beams": 1}
PAPER_BEAM = {"num_beams": 10, "length_penalty": 0.9, "no_repeat_ngram_size": 4}


def reference_groups(rows: list[dict], cfg) -> tuple[list[str], list[list[str]]]:
    """Each distinct prompt of ``rows`` once (in first-seen order, ``data.prompt_template`` filled in) and all
    of its references (the ``data.completion_column`` of every row with that prompt, in row order)."""
    from train import data as data_lib

    refs: dict[str, list[str]] = {}
    for row in rows:
        refs.setdefault(data_lib.format_prompt(row, cfg), []).append(str(row[cfg.completion_column]))
    return list(refs), list(refs.values())


def heldout_split(cfg) -> tuple[list[dict], list[dict]]:
    """The training rows a run of ``cfg`` (a train Config) trained on and *every* held-out row: the split
    :func:`train.data.load_tokenized` makes, with ``data.max_train_examples`` applied and
    ``data.max_eval_examples`` not (scoring covers all held-out prompts)."""
    from train import data as data_lib

    dc = cfg.data
    rows = data_lib.load_rows(dc, dc.train_split)
    if dc.eval_source:
        train_rows, eval_rows = rows, data_lib.load_rows(dataclasses.replace(dc, source=dc.eval_source), "validation")
    elif dc.eval_split:
        train_rows, eval_rows = rows, data_lib.load_rows(dc, dc.eval_split)
    else:
        train_rows, eval_rows = data_lib.split_rows(rows, dc)
    if dc.max_train_examples:
        train_rows = train_rows[: dc.max_train_examples]
    return train_rows, eval_rows


def score_heldout(p: Predictor, decodings: dict[str, dict], *, batch_size: int | None = None, print_fn=None) -> dict:
    """BLEU / ROUGE-L (:func:`train.metrics.generation`) of ``p`` on every distinct held-out prompt of its run's
    split (:func:`heldout_split`), each decoded once and scored against all its references, once per entry of
    ``decodings`` (``name -> {"num_beams": K, ...}``; :data:`GREEDY`, :data:`PAPER_BEAM`).

    Returns ``{"prompts", "references", "prompt_texts", "train_rows", "train_prompts", "decodings": {name:
    {metrics..., "prompts_scored", "references", "decoding", "decode_s", "predictions"}}}`` (``predictions[i]``
    is the output for ``prompt_texts[i]``)."""
    import time

    from train import metrics as metrics_lib

    if p.cfg.data.task != "causal-lm":
        raise PredictError(f"scoring held-out prompts is for causal-lm runs, this one is {p.cfg.data.task}")
    train_rows, eval_rows = heldout_split(p.cfg)
    prompts, refs = reference_groups(eval_rows, p.cfg.data)
    out = {
        "prompts": len(prompts),
        "references": sum(map(len, refs)),
        "prompt_texts": prompts,
        "train_rows": len(train_rows),
        "train_prompts": len(reference_groups(train_rows, p.cfg.data)[0]),
        "decodings": {},
    }
    for name, settings in decodings.items():
        beams = int(settings.get("num_beams", 1))
        stated = PAPER_BEAM if beams > 1 else GREEDY
        if {**stated, **settings} != stated:
            raise PredictError(
                f"decoding {name!r}: {settings} cannot be run; train.loop.generate_texts decodes "
                f"greedily or as {PAPER_BEAM}"
            )
        t0 = time.perf_counter()
        preds = generate(p, prompts, num_beams=beams, batch_size=batch_size or p.cfg.eval.batch_size)
        seconds = time.perf_counter() - t0
        out["decodings"][name] = {
            **metrics_lib.generation(preds, refs),
            "prompts_scored": len(prompts),
            "references": sum(map(len, refs)),
            "decoding": {**stated, "max_new_tokens": p.cfg.eval.max_new_tokens},
            "decode_s": seconds,
            "predictions": preds,
        }
        if print_fn is not None:
            print_fn(
                f"{name}: "
                + ", ".join(f"{k} {v:.2f}" for k, v in out["decodings"][name].items() if isinstance(v, float))
            )
    return out


def predict(args: argparse.Namespace, print_fn=print) -> list[dict]:
    if args.template is not None:
        template_fields(args.template)  # a malformed --template is refused before anything is loaded
    if args.out is not None and Path(args.out).is_dir():
        raise PredictError(f"--out {args.out!r} is a folder, expected a .jsonl file")
    rows = read_inputs(args.text, args.file, args.column)
    if args.run:
        p = from_run(args.run, merged=args.merged, precision=args.precision)
    else:
        p = from_base(
            args.base,
            args.adapter,
            task=args.task,
            num_labels=args.num_labels,
            merged=args.merged,
            precision=args.precision,
        )
    dc = p.cfg.data
    records = []
    if dc.task == "classification":
        texts = [as_text(r, args.column, dc.text_column) for r in rows]
        for text, res in zip(texts, classify(p, texts, max_length=args.max_length, batch_size=args.batch_size)):
            records.append({"input": text, **res})
            probs = " ".join(f"{x:.4f}" for x in res["probabilities"])
            print_fn(f"{res['label']}\t[{probs}]\t{text}")
    else:
        if dc.task == "chat":
            prompts = [as_chat_prompt(r, args.column, p.tokenizer, dc) for r in rows]
        else:
            template = args.template if args.template is not None else dc.prompt_template
            prompts = [as_prompt(r, args.column, template, dc.prompt_column) for r in rows]
        outs = generate(
            p, prompts, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, batch_size=args.batch_size
        )
        for prompt, out in zip(prompts, outs):
            records.append({"prompt": prompt, "output": out})
            print_fn(f"{prompt.strip()!r} -> {out!r}")
    if args.out:
        out_path = Path(args.out)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def main(argv=None) -> int:
    args = parse_args(argv)
    from train.cli import guarded

    return guarded(lambda: predict(args))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    sys.exit(main())
