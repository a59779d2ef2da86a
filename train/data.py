"""Data: load rows (built-in task, local files or a hub data set), split, tokenise once, serve batches.

Examples are tokenised to ``(n, max_length)``; training batches are fixed (that width), length-bucketed (a few
widths, so the jitted step compiles a few times) or packed (several causal-LM examples per row): see
:class:`Batches`. The order of examples is a pure function of ``(seed, step)``: a resumed run sees exactly the
batches an uninterrupted run would. Evaluation batches are fixed (:func:`eval_batches`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lora_jax.errors import DataError
from train import builtin, sources
from train.config import DataConfig

FILE_TYPES = sources.FILE_TYPES


# ------------------------------------------------------------------------------------------------ rows


# Each row remembers where it came from (file and row number, counted from 1 after any header), so that an error
# found after the rows were shuffled and split names the row of the file. Extra keys do not disturb
# ``prompt_template.format(**row)``.
SOURCE_KEY = "__source_row__"


def source_of(row: dict, fallback: str = "a row") -> str:
    """Where ``row`` came from, e.g. ``'data/train.csv row 17'``."""
    return str(row.get(SOURCE_KEY, fallback))


def _tag(rows: list[dict], source: str) -> list[dict]:
    for i, row in enumerate(rows, 1):
        row[SOURCE_KEY] = f"{source} row {i}"
    return rows


def _load_files(paths: list[str], required: list[str]) -> list[dict]:
    import datasets

    suffixes = {Path(p).suffix.lower() for p in paths}
    if len(suffixes) != 1 or next(iter(suffixes)) not in FILE_TYPES:
        raise DataError(f"data files must share one of the types {sorted(FILE_TYPES)}, got {paths}")
    suffix = suffixes.pop()
    for p in paths:
        if not Path(p).is_file():
            raise DataError(f"data file {p!r} does not exist")
        if Path(p).stat().st_size == 0:
            raise DataError(f"data file {p!r} is empty")
    kwargs = {"delimiter": "\t", "quoting": 3} if suffix == ".tsv" else {}
    rows: list[dict] = []
    bars = not datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # errors are one line on stderr; no progress bars around them
    try:
        for p in paths:  # one file at a time, so that each row knows its file
            # A fresh cache folder: datasets' own cache is keyed on the path and modification time, so an edit
            # that keeps both would be served stale (the tokenised cache above is keyed on the content).
            with tempfile.TemporaryDirectory(prefix="lora_jax_data_") as tmp:
                try:
                    ds = datasets.load_dataset(
                        FILE_TYPES[suffix], data_files=[p], split="train", cache_dir=tmp, **kwargs
                    )
                    columns, n, file_rows = ds.column_names, len(ds), ds.to_list()
                except Exception as e:  # datasets raises many types for malformed files
                    detail = " ".join(f"{type(e).__name__}: {e}".split())
                    raise DataError(f"could not read {p!r} as {FILE_TYPES[suffix]}: {detail[:300]}") from None
            missing = [c for c in required if c not in columns]
            if missing:
                raise DataError(
                    f"{p!r} has columns {columns}; expected {missing} too "
                    "(set data.*_column to the names your file uses)"
                )
            if n == 0:
                raise DataError(f"{p!r} holds no rows")
            rows += _tag(file_rows, p)
    finally:
        if not bars:
            datasets.enable_progress_bars()
    return rows


def _load_hub(name: str, split: str) -> list[dict]:
    import datasets

    try:
        return datasets.load_dataset(name, split=split).to_list()
    except Exception as e:
        raise DataError(
            f"could not load data set {name!r} split {split!r} from the hub ({type(e).__name__}: {e}); "
            "offline, give local files instead (csv/tsv/json/jsonl/parquet)"
        ) from None


def _required_columns(cfg: DataConfig, pairs: bool = False) -> list[str]:
    if pairs:  # preference pairs (train.objective=dpo): a prompt (chat: messages or the prompt column) + answers
        prompt = (
            []
            if cfg.task == "chat"
            else [cfg.prompt_column if c == "prompt" else c for c in _template_fields(cfg.prompt_template)]
        )
        cols = prompt + [cfg.chosen_column, cfg.rejected_column]
    elif cfg.task == "chat":
        cols = [cfg.messages_column]
    elif cfg.task == "causal-lm":
        cols = [cfg.completion_column] + [
            cfg.prompt_column if c == "prompt" else c for c in _template_fields(cfg.prompt_template)
        ]
    elif cfg.task == "audio-classification":
        cols = [cfg.audio_column, cfg.label_column]
    else:
        cols = [cfg.text_column, cfg.label_column]
    return list(dict.fromkeys(cols + ([cfg.group_column] if cfg.group_column else [])))


def _check_columns(rows: list[dict], cfg: DataConfig, source: str, pairs: bool = False) -> list[dict]:
    columns = [c for c in rows[0] if c != SOURCE_KEY] if rows else []
    missing = [c for c in _required_columns(cfg, pairs) if c not in columns]
    if missing:
        raise DataError(
            f"{source} has columns {columns}; expected {missing} too (set data.*_column / "
            "data.prompt_template to the names it uses)"
        )
    return rows


def format_prompt(row: dict, cfg: DataConfig) -> str:
    """The prompt of ``row``: ``data.prompt_template`` with its fields from the row's columns (``{prompt}`` from
    ``data.prompt_column``)."""
    return cfg.prompt_template.format(**{**row, "prompt": row.get(cfg.prompt_column, row.get("prompt"))})


# ------------------------------------------------------------------------------------------------ chat
#
# A conversation is a list of {"role", "content"} messages (TRL's, Axolotl's and tunix's format), rendered by the
# model's own chat template. The loss covers the assistant turns only: the characters each assistant message adds
# to the rendering (its content and the template's end-of-turn text, not the header that announces the turn, which
# the prompt at inference already holds) are found by rendering the conversation up to that message twice (with
# the generation prompt, and with the message), and the tokens that overlap them are the targets.

ROLES = ("system", "user", "assistant", "tool")
# the system message of the built-in restaurants task read as conversations (data.task=chat)
CHAT_SYSTEM = "Describe the restaurant in one sentence from its attributes."


def parse_messages(value: Any, where: str, what: str) -> list[dict]:
    """``value`` as a list of ``{"role", "content"}`` dicts (a JSON string of one is parsed, as a CSV cell
    holds it); anything else is a :class:`DataError` naming ``where``."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(
                f"{where}: {what} must be a list of {{'role', 'content'}} messages (or its JSON text), "
                f"got the text {_short(value)}"
            ) from None
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(
            f"{where}: {what} must be a non-empty list of {{'role', 'content'}} messages, got {_short(value)}"
        )
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: {what}[{i}] must be {{'role': str, 'content': str}}, got {_short(m)}")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: {what}[{i}] has role {m['role']!r}; expected one of {list(ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def chat_messages(row: dict, cfg: DataConfig) -> list[dict]:
    """The conversation of a chat row (``data.messages_column``); it must end with an assistant message."""
    where = source_of(row)
    msgs = parse_messages(row[cfg.messages_column], where, f"column {cfg.messages_column!r}")
    if msgs[-1]["role"] != "assistant":
        raise DataError(
            f"{where}: the conversation ends with a {msgs[-1]['role']!r} message; the last message must "
            "be the assistant's (what the model learns to write)"
        )
    return msgs


def chat_prompt_messages(row: dict, cfg: DataConfig) -> list[dict]:
    """The prompt of a chat row as messages: a conversation without its last (assistant) message, or, for a
    preference row, its ``messages_column`` / ``prompt_column`` (a list of messages, or a text that becomes one
    user message)."""
    if cfg.chosen_column in row and cfg.rejected_column in row:  # a preference row
        for col in (cfg.messages_column, cfg.prompt_column):
            if col in row:
                value = row[col]
                if isinstance(value, str) and not value.lstrip().startswith("["):
                    return [{"role": "user", "content": value}]
                return parse_messages(value, source_of(row), f"column {col!r}")
        raise DataError(
            f"{source_of(row)}: a preference row needs its prompt in column {cfg.messages_column!r} "
            f"or {cfg.prompt_column!r} (data.messages_column / data.prompt_column)"
        )
    return chat_messages(row, cfg)[:-1]


def answer_messages(value: Any, where: str, what: str) -> list[dict]:
    """A preference row's answer as messages: a text becomes one assistant message (TRL's conversational
    preference rows hold ``[{"role": "assistant", ...}]``)."""
    if isinstance(value, str) and not value.lstrip().startswith("["):
        return [{"role": "assistant", "content": value}]
    msgs = parse_messages(value, where, what)
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: {what} must end with an assistant message, got {msgs[-1]['role']!r}")
    return msgs


def chat_template(tokenizer, cfg: DataConfig) -> str:
    """The Jinja chat template: ``data.chat_template`` (its text, or a file holding it) or the tokenizer's own (a
    Hugging Face tokenizer's ``chat_template``; for a GGUF model, the file's ``tokenizer.chat_template``)."""
    given = cfg.chat_template
    if given:
        path = Path(given)
        if "{" not in given and path.suffix in (".jinja", ".j2", ".txt") or path.is_file():
            if not path.is_file():
                raise DataError(f"data.chat_template={given!r}: no such file")
            return path.read_text()
        return given
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):
        own = own.get("default")
    if not own:
        raise DataError(
            "data.task=chat: this model's tokenizer has no chat template (a base model, or a GGUF file "
            "without tokenizer.chat_template); give one with data.chat_template (the template text, or "
            "a .jinja file)"
        )
    return own


def render_chat(tokenizer, messages: list[dict], template: str, add_generation_prompt: bool = False) -> str:
    """``messages`` rendered by ``template`` (``transformers``' ``apply_chat_template``), as text."""
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:  # noqa: BLE001 - the template's own raise_exception, or a Jinja error
        raise DataError(
            f"the chat template cannot render this conversation ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
        ) from None


def assistant_spans(
    tokenizer, messages: list[dict], template: str, first: int = 0
) -> tuple[str, list[tuple[int, int]]]:
    """``(text, spans)``: the rendered conversation and the character spans ``[start, end)`` of the assistant
    messages from index ``first`` on: what rendering message ``i`` adds to the rendering of ``messages[:i]`` with
    the generation prompt (the content and the template's end of turn; not the turn's header).

    Raises :class:`DataError` when the template does not render a conversation as the concatenation of its
    prefixes (a template that rewrites earlier turns, e.g. drops past reasoning, cannot be masked this way)."""
    text = render_chat(tokenizer, messages, template)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < first:
            continue
        before = render_chat(tokenizer, messages[:i], template, add_generation_prompt=True) if i else ""
        through = render_chat(tokenizer, messages[: i + 1], template)
        if not (through.startswith(before) and text.startswith(through)):
            raise DataError(
                f"the chat template renders assistant message {i} differently inside the whole "
                "conversation than after its prefix; it cannot be masked turn by turn (give a template "
                "that renders each turn once, with data.chat_template)"
            )
        spans.append((len(before), len(through)))
    return text, spans


def chat_token_mask(tokenizer, messages: list[dict], template: str, first: int = 0) -> tuple[list[int], list[int]]:
    """``(ids, mask)``: the token ids of the rendered conversation and 1 on each token that overlaps an
    assistant span of :func:`assistant_spans` (as ``transformers``' ``return_assistant_tokens_mask`` marks the
    tokens of a template's ``{% generation %}`` blocks)."""
    text, spans = assistant_spans(tokenizer, messages, template, first)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    mask = [int(any(a < e and b > s for s, e in spans)) for a, b in offsets]
    return ids, mask


def _template_fields(template: str) -> list[str]:
    import string

    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def _text_columns(cfg: DataConfig) -> tuple[list[str], list[str]]:
    """(columns that must hold text, template fields that may also hold a number) for ``cfg.task``."""
    if cfg.task == "causal-lm":
        fields = [cfg.prompt_column if c == "prompt" else c for c in _template_fields(cfg.prompt_template)]
        text = [cfg.completion_column] + ([cfg.prompt_column] if cfg.prompt_column in fields else [])
        return text, [f for f in fields if f not in text]
    if cfg.task == "classification":
        return [cfg.text_column], []
    return [], []


def _chat_hint() -> str:
    """Where a list of chat messages belongs, true whether or not this version has a chat task."""
    import typing

    tasks = typing.get_args(typing.get_type_hints(DataConfig)["task"])
    if "chat" in tasks:
        return "a column of chat messages is read by data.task=chat"
    return (
        "this version has no chat task (data.task is one of " + ", ".join(tasks) + "): flatten each "
        "conversation into a prompt and a completion column"
    )


def check_cells(rows: list[dict], cfg: DataConfig) -> list[dict]:
    """``rows`` unchanged when every cell the task reads as text is a string (a template field may also be a
    number); a list or dict (a chat ``messages`` column), None or bytes would otherwise be trained as its Python
    text form. Raises :class:`DataError` naming the file, the row and the column."""
    text, numeric = _text_columns(cfg)
    for row in rows:
        for col in text + numeric:
            value = row.get(col)
            if isinstance(value, str) or (
                col in numeric and isinstance(value, (int, float)) and not isinstance(value, bool)
            ):
                continue
            kind = type(value).__name__
            hint = f"; {_chat_hint()}" if isinstance(value, (list, dict)) else ""
            raise DataError(
                f"{source_of(row)}: column {col!r} holds a {kind} ({_short(value)}), expected text"
                f"{' or a number' if col in numeric else ''}{hint}"
            )
    return rows


def load_rows(cfg: DataConfig, split: str, pairs: bool = False) -> list[dict]:
    """Rows of ``split`` from ``cfg.source``: ``builtin:NAME``, local file(s) (comma-separated), or a hub name;
    every cell read as text checked to be text (:func:`check_cells`). ``pairs``: preference rows (prompt +
    ``chosen_column`` + ``rejected_column``, whose columns :func:`tokenize_pairs` checks)."""
    rows = _load_rows(cfg, split, pairs)
    return rows if pairs else check_cells(rows, cfg)


def _load_rows(cfg: DataConfig, split: str, pairs: bool = False) -> list[dict]:
    source = cfg.source
    kind = sources.kind(source)
    if kind == "builtin":
        name = source.split(":", 1)[1]
        if name not in builtin.BUILTIN:
            raise DataError(f"unknown built-in data set {name!r}; choose from {sorted(builtin.BUILTIN)}")
        rows = builtin.BUILTIN[name](seed=cfg.seed)
        if name == "restaurants":  # its columns are prompt / completion / group
            rows = [{"prompt": r["prompt"], "completion": r["completion"], "group": r["group"]} for r in rows]
            if cfg.task == "chat" and not pairs:  # as conversations: a system message, the MR, the description
                rows = [
                    {
                        "messages": [
                            {"role": "system", "content": CHAT_SYSTEM},
                            {"role": "user", "content": r["prompt"]},
                            {"role": "assistant", "content": r["completion"]},
                        ],
                        "group": r["group"],
                    }
                    for r in rows
                ]
        return _check_columns(_tag([dict(r) for r in rows], source), cfg, f"data.source={source!r}", pairs)
    if kind == "files":
        paths = sources.paths(source)
        rows = _load_files(paths, _required_columns(cfg, pairs))
        if cfg.task == "audio-classification":  # audio paths relative to the data file's folder
            base = Path(paths[0]).parent
            rows = [{**r, cfg.audio_column: str(base / r[cfg.audio_column])} for r in rows]
        return rows
    return _check_columns(_tag(_load_hub(source, split), f"{source}[{split}]"), cfg, f"data set {source!r}", pairs)


def split_key(cfg: DataConfig):
    """What keeps rows together across the train / eval split, as a function of a row, or None to split rows.

    ``group_column`` when set; otherwise, for causal-lm, the prompt as the model sees it
    (``prompt_template`` filled in): every reference of a prompt lands on one side, so the held-out prompts are
    ones training never showed (the built-in task and E2E have several references per meaning
    representation). Classification splits by row."""
    if cfg.group_column:
        return lambda row: str(row[cfg.group_column])
    if cfg.task == "chat":  # the conversation up to its last answer (preference rows: their prompt)
        return lambda row: json.dumps(chat_prompt_messages(row, cfg), sort_keys=True)
    if cfg.task == "causal-lm":
        return lambda row: format_prompt(row, cfg)
    return None


def split_rows(rows: list[dict], cfg: DataConfig) -> tuple[list[dict], list[dict]]:
    """Hold out ``eval_fraction`` of the groups of :func:`split_key` (of the rows when there is none): evaluation
    inputs are unseen in training."""
    rng = random.Random(cfg.seed)
    key = split_key(cfg)
    if key is not None:
        groups = sorted({key(r) for r in rows})
        rng.shuffle(groups)
        held = set(groups[: max(1, int(round(cfg.eval_fraction * len(groups))))])
        train = [r for r in rows if key(r) not in held]
        evals = [r for r in rows if key(r) in held]
    else:
        order = list(range(len(rows)))
        rng.shuffle(order)
        n_eval = max(1, int(round(cfg.eval_fraction * len(rows))))
        evals = [rows[i] for i in order[:n_eval]]
        train = [rows[i] for i in order[n_eval:]]
    if not train or not evals:
        raise DataError(f"splitting {len(rows)} rows left an empty side (train {len(train)}, eval {len(evals)})")
    return train, evals


def cap_eval_rows(rows: list[dict], cfg: DataConfig) -> list[dict]:
    """The rows of the first ``max_eval_examples`` distinct prompts (causal-lm: every reference of a kept prompt
    stays, so BLEU / ROUGE-L score it against all of them) or the first ``max_eval_examples`` rows
    (classification)."""
    if cfg.task not in ("causal-lm", "chat"):
        return rows[: cfg.max_eval_examples]
    kept: set[str] = set()
    out = []
    key = split_key(dataclasses.replace(cfg, group_column=None))
    for row in rows:
        prompt = key(row)
        if prompt not in kept and len(kept) >= cfg.max_eval_examples:
            continue
        kept.add(prompt)
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------ tokenising


@dataclass
class Tokenized:
    """Fixed-shape arrays for one split.

    ``input_ids``/``attention_mask``: (n, max_length) int32. Causal LM: ``loss_mask`` (n, max_length) marks the
    positions whose *next* token is part of the completion, ``prompts``/``references`` keep the raw text for
    generation metrics. Classification: ``labels`` (n,). Audio classification: ``input_features`` (n, mel bins,
    max_length) float32 log-mel spectrograms instead of ``input_ids``, ``attention_mask`` marking the frames that
    hold audio.
    """

    input_ids: np.ndarray | None
    attention_mask: np.ndarray
    loss_mask: np.ndarray | None = None
    labels: np.ndarray | None = None
    prompts: list[str] | None = None
    references: list[list[str]] | None = None
    input_features: np.ndarray | None = None
    ref_logps: np.ndarray | None = None  # preference pairs, dpo.reference=cached: (n, 2) float32

    def __len__(self) -> int:
        return len(self.attention_mask)

    def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        batch = {"attention_mask": self.attention_mask[idx]}
        if self.input_ids is not None:
            batch["input_ids"] = self.input_ids[idx]
        if self.input_features is not None:
            batch["input_features"] = self.input_features[idx]
        if self.loss_mask is not None:
            batch["loss_mask"] = self.loss_mask[idx]
        if self.labels is not None:
            batch["labels"] = self.labels[idx]
        if self.ref_logps is not None:
            batch["ref_logps"] = self.ref_logps[idx]
        return batch


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0


def _labels(rows: list[dict], cfg: DataConfig, num_labels: int | None) -> np.ndarray:
    """Each row's ``label_column`` as a class id in ``[0, num_labels)`` (:func:`class_id`)."""
    return np.array(
        [
            class_id(row[cfg.label_column], num_labels, f"{source_of(row, f'row {i}')}: {cfg.label_column}")
            for i, row in enumerate(rows)
        ],
        np.int32,
    ).reshape(len(rows))


def featurize(rows: list[dict], feature_extractor, cfg: DataConfig, num_labels: int | None = None) -> Tokenized:
    """Audio classification: each row's WAV file as log-mel features of ``cfg.max_length`` frames (a clip is
    padded with silence or cut; ``attention_mask`` marks the frames that hold audio)."""
    import wave as wave_lib

    from lora_jax.models.audio import read_wav

    fe = feature_extractor
    if not hasattr(fe, "log_mel"):
        raise DataError(
            f"data.task=audio-classification needs an audio model (its loader gives a feature "
            f"extractor); this model's preprocessor is a {type(fe).__name__}"
        )
    frames = cfg.max_length
    if frames % 2 or frames > fe.nb_max_frames:
        raise DataError(
            f"data.max_length={frames} mel frames: the model needs an even number of at most "
            f"{fe.nb_max_frames} ({fe.nb_max_frames * fe.hop_length // fe.sampling_rate} s)"
        )
    feats = np.zeros((len(rows), fe.feature_size, frames), np.float32)
    mask = np.zeros((len(rows), frames), np.int32)
    for i, row in enumerate(rows):
        path = row[cfg.audio_column]
        try:
            wave, rate = read_wav(path)
        except (OSError, EOFError, ValueError, wave_lib.Error) as e:
            raise DataError(f"row {i}: cannot read {path!r} as a PCM WAV file ({type(e).__name__}: {e})") from None
        if rate != fe.sampling_rate:
            raise DataError(
                f"row {i}: {path!r} is sampled at {rate} Hz; the model needs {fe.sampling_rate} Hz "
                f"(resample it, e.g. sox in.wav -r {fe.sampling_rate} out.wav)"
            )
        feats[i] = fe.log_mel(wave, frames)
        mask[i, : min(frames, -(-len(wave) // fe.hop_length))] = 1
    return Tokenized(None, mask, labels=_labels(rows, cfg, num_labels), input_features=feats)


def tokenize(
    rows: list[dict],
    tokenizer,
    cfg: DataConfig,
    max_positions: int | None = None,
    num_labels: int | None = None,
    pairs: bool = False,
) -> Tokenized:
    if cfg.task == "audio-classification":
        return featurize(rows, tokenizer, cfg, num_labels)
    if max_positions is not None and cfg.max_length > max_positions:
        raise DataError(f"data.max_length={cfg.max_length} exceeds the model's {max_positions} positions")
    if pairs:
        return tokenize_pairs(rows, tokenizer, cfg)
    if cfg.task == "chat":
        return tokenize_chat(rows, tokenizer, cfg)
    n, length = len(rows), cfg.max_length
    ids = np.full((n, length), _pad_id(tokenizer), np.int32)
    mask = np.zeros((n, length), np.int32)
    if cfg.task == "classification":
        labels = _labels(rows, cfg, num_labels)
        for i, row in enumerate(rows):
            toks = tokenizer(str(row[cfg.text_column]), truncation=True, max_length=length)["input_ids"]
            ids[i, : len(toks)] = toks
            mask[i, : len(toks)] = 1
        return Tokenized(ids, mask, labels=labels)

    loss_mask = np.zeros((n, length), np.int32)
    eos = getattr(tokenizer, "eos_token_id", None)
    prompts, too_long = [], 0
    for i, row in enumerate(rows):
        prompt = format_prompt(row, cfg)
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(str(row[cfg.completion_column]), add_special_tokens=False)["input_ids"]
        c = c + ([eos] if eos is not None else [])
        if len(p) >= length:
            raise DataError(
                f"{source_of(row, f'row {i}')}: the prompt alone has {len(p)} tokens, data.max_length is {length}"
            )
        if len(p) + len(c) > length:
            too_long += 1
        toks = (p + c)[:length]
        ids[i, : len(toks)] = toks
        mask[i, : len(toks)] = 1
        # position t predicts token t+1: mark positions whose next token is a completion token
        loss_mask[i, len(p) - 1 : len(toks) - 1] = 1
        prompts.append(prompt)
    if too_long > 0.5 * n:
        raise DataError(f"{too_long} of {n} examples are cut at data.max_length={length}; raise it")
    # All references of a prompt (E2E has several per MR), for BLEU / ROUGE.
    refs: dict[str, list[str]] = {}
    for prompt, row in zip(prompts, rows):
        refs.setdefault(prompt, []).append(str(row[cfg.completion_column]))
    return Tokenized(ids, mask, loss_mask=loss_mask, prompts=prompts, references=[refs[p] for p in prompts])


def _place(ids: list[int], target: list[int], length: int, row: int, out: dict, where: str) -> bool:
    """Write one example (``target[t] = 1``: token ``t`` is learnt) into row ``row`` of ``out``'s
    ``(n, [2,] length)`` arrays, cut to ``length``; the loss mask is shifted (position ``t`` predicts ``t + 1``).
    Returns whether it was cut; an example with no learnt token left is a :class:`DataError`."""
    if not any(target[1:length]):
        raise DataError(
            f"{where}: no answer token is left within data.max_length={length} (the prompt takes "
            f"{target.index(1) if 1 in target else len(ids)} tokens); raise data.max_length"
        )
    n = min(len(ids), length)
    out["input_ids"][row][:n] = ids[:n]
    out["attention_mask"][row][:n] = 1
    out["loss_mask"][row][: n - 1] = target[1:n]
    return len(ids) > length


def tokenize_chat(rows: list[dict], tokenizer, cfg: DataConfig) -> Tokenized:
    """Chat rows (``data.messages_column``) rendered by the chat template (:func:`chat_template`), the loss on
    every assistant turn (:func:`chat_token_mask`). ``prompts``: the conversation before its last answer with the
    generation prompt (what generation continues), ``references``: every last answer of that prompt."""
    template = chat_template(tokenizer, cfg)
    n, length = len(rows), cfg.max_length
    out = {
        "input_ids": np.full((n, length), _pad_id(tokenizer), np.int32),
        "attention_mask": np.zeros((n, length), np.int32),
        "loss_mask": np.zeros((n, length), np.int32),
    }
    prompts, answers, cut = [], [], 0
    for i, row in enumerate(rows):
        msgs = chat_messages(row, cfg)
        where = source_of(row, f"row {i}")
        try:
            ids, target = chat_token_mask(tokenizer, msgs, template)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        cut += _place(ids, target, length, i, out, where)
        prompts.append(render_chat(tokenizer, msgs[:-1], template, add_generation_prompt=True))
        answers.append(msgs[-1]["content"])
    if cut > 0.5 * n:
        raise DataError(f"{cut} of {n} conversations are cut at data.max_length={length}; raise it")
    refs: dict[str, list[str]] = {}
    for prompt, answer in zip(prompts, answers):
        refs.setdefault(prompt, []).append(answer)
    return Tokenized(
        out["input_ids"],
        out["attention_mask"],
        loss_mask=out["loss_mask"],
        prompts=prompts,
        references=[refs[p] for p in prompts],
    )


def tokenize_pairs(rows: list[dict], tokenizer, cfg: DataConfig) -> Tokenized:
    """Preference rows (``train.objective=dpo``): a prompt and two answers, ``chosen_column`` and
    ``rejected_column``. Arrays ``(n, 2, max_length)``, ``[:, 0]`` the prompt + chosen answer, ``[:, 1]`` the
    prompt + rejected one, the loss mask on the answer's tokens. ``data.task=chat``: the prompt's messages
    (:func:`chat_prompt_messages`) and the answer as the next assistant turn, rendered by the chat template, as
    TRL's DPOTrainer renders them; ``causal-lm``: ``prompt_template`` filled in, then the answer and EOS.
    ``prompts`` / ``references``: the prompt as generation continues it, and its chosen answers."""
    chat = cfg.task == "chat"
    template = chat_template(tokenizer, cfg) if chat else None
    eos = getattr(tokenizer, "eos_token_id", None)
    n, length = len(rows), cfg.max_length
    out = {
        "input_ids": np.full((n, 2, length), _pad_id(tokenizer), np.int32),
        "attention_mask": np.zeros((n, 2, length), np.int32),
        "loss_mask": np.zeros((n, 2, length), np.int32),
    }
    prompts, chosen, cut = [], [], 0
    for i, row in enumerate(rows):
        where = source_of(row, f"row {i}")
        if chat:
            prompt_msgs = chat_prompt_messages(row, cfg)
            prompt = render_chat(tokenizer, prompt_msgs, template, add_generation_prompt=True)
        else:
            prompt = format_prompt(row, cfg)
            p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for k, col in enumerate((cfg.chosen_column, cfg.rejected_column)):
            if chat:
                answer = answer_messages(row[col], where, f"column {col!r}")
                try:
                    ids, target = chat_token_mask(tokenizer, prompt_msgs + answer, template, first=len(prompt_msgs))
                except DataError as e:
                    raise DataError(f"{where}: {e}") from None
                text = answer[-1]["content"]
            else:
                text = str(row[col])
                c_ids = tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
                ids, target = p_ids + c_ids, [0] * len(p_ids) + [1] * len(c_ids)
            view = {name: arr[:, k] for name, arr in out.items()}
            cut += _place(ids, target, length, i, view, where)
            if k == 0:
                chosen.append(text)
        prompts.append(prompt)
    if cut > 0.5 * 2 * n:
        raise DataError(f"{cut} of {2 * n} answers are cut at data.max_length={length}; raise it")
    refs: dict[str, list[str]] = {}
    for prompt, answer in zip(prompts, chosen):
        refs.setdefault(prompt, []).append(answer)
    return Tokenized(
        out["input_ids"],
        out["attention_mask"],
        loss_mask=out["loss_mask"],
        prompts=prompts,
        references=[refs[p] for p in prompts],
    )


def class_id(value: Any, num_labels: int | None, where: str) -> int:
    """``value`` as a class id in ``[0, num_labels)``: an integer, an integral float (``1.0``, as a CSV column of
    numbers reads) or a string of digits. Anything else (``1.5``, ``true``, ``'pos'``, ``2**40``) is refused
    rather than truncated or wrapped."""
    v: int | None = None
    if isinstance(value, (bool, np.bool_)) or value is None:
        v = None
    elif isinstance(value, (int, np.integer)):
        v = int(value)
    elif isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        v = int(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d{1,18}\s*", value):
        v = int(value)
    if v is None:
        raise DataError(f"{where}: label {_short(value)} is not an integer class id")
    hi = num_labels if num_labels is not None else 2**31
    if not 0 <= v < hi:
        raise DataError(f"{where}: label {v} is outside [0, {hi})" + (" (model.num_labels)" if num_labels else ""))
    return v


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """A digest of what the tokenizer does (its serialised vocabulary, merges and normalisers), so that a
    changed tokenizer behind the same model name does not reuse cached token ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        text = backend.to_str()
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()) if hasattr(tokenizer, "get_vocab") else repr(tokenizer))
    extra = {k: getattr(tokenizer, k, None) for k in ("pad_token_id", "eos_token_id", "bos_token_id")}
    return hashlib.sha256((text + json.dumps(extra, default=str)).encode()).hexdigest()


# The code that turns rows into arrays: a cache made by other code is not reused.
_CODE = hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (sys.modules[__name__], builtin))).hexdigest()


def cache_key(cfg: DataConfig, split: str, tokenizer_name: str, tokenizer=None) -> str:
    """Key of the tokenised cache: the data config, the split, the tokenizer (its name and, given, its content),
    the code, and the *content* of every local data file (not its path, size or modification time, which an
    edit can leave unchanged)."""
    # split_rule: bump when split_rows / cap_eval_rows change what a config selects (2: split by prompt)
    payload = {
        "cfg": dataclasses.asdict(cfg),
        "split": split,
        "tokenizer": tokenizer_name,
        "code": _CODE,
        "tokenizer_digest": tokenizer_digest(tokenizer) if tokenizer is not None else None,
        "split_rule": 2,
    }
    if cfg.task == "chat":  # the tokenizer's own chat template renders the rows
        payload["chat_template"] = str(getattr(tokenizer, "chat_template", None))
    paths = [p.strip() for p in f"{cfg.source},{cfg.eval_source or ''}".split(",") if p.strip()]
    payload["files"] = [(p, file_digest(p)) for p in paths if os.path.isfile(p)]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def load_tokenized(
    cfg: DataConfig,
    tokenizer,
    tokenizer_name: str,
    max_positions: int | None = None,
    num_labels: int | None = None,
    cache_dir: str | Path | None = None,
    pairs: bool = False,
) -> tuple[Tokenized, Tokenized]:
    """Train and eval splits, tokenised; cached as .npz under ``cache_dir`` keyed by config, files and tokenizer.
    ``pairs``: preference rows (:func:`tokenize_pairs`)."""
    key = cache_key(cfg, "pairs" if pairs else "both", tokenizer_name, tokenizer)
    cache = Path(cache_dir) / f"{key}.npz" if cache_dir else None
    meta = Path(cache_dir) / f"{key}.json" if cache_dir else None
    if cache is not None and cache.is_file() and meta.is_file():
        try:
            with np.load(cache) as arrays:
                text = json.loads(meta.read_text())
                out = []
                for split in ("train", "eval"):
                    fields = {k.split("/", 1)[1]: arrays[k] for k in arrays.files if k.startswith(split + "/")}
                    out.append(Tokenized(**{"input_ids": None, **fields}, **text[split]))
            return out[0], out[1]
        except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt
            pass

    rows = load_rows(cfg, cfg.train_split, pairs)
    if cfg.eval_source:
        train_rows, eval_rows = rows, load_rows(dataclasses.replace(cfg, source=cfg.eval_source), "validation", pairs)
    elif cfg.eval_split:
        train_rows, eval_rows = rows, load_rows(cfg, cfg.eval_split, pairs)
    else:
        train_rows, eval_rows = split_rows(rows, cfg)
    if cfg.max_train_examples:
        train_rows = train_rows[: cfg.max_train_examples]
    if cfg.max_eval_examples:
        eval_rows = cap_eval_rows(eval_rows, cfg)
    train = tokenize(train_rows, tokenizer, cfg, max_positions, num_labels, pairs)
    evals = tokenize(eval_rows, tokenizer, cfg, max_positions, num_labels, pairs)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        arrays = {}
        text = {}
        for split, t in (("train", train), ("eval", evals)):
            for name in ("input_ids", "attention_mask", "loss_mask", "labels", "input_features"):
                if getattr(t, name) is not None:
                    arrays[f"{split}/{name}"] = getattr(t, name)
            text[split] = {"prompts": t.prompts, "references": t.references}
        # Written to temporary names and renamed: a reader never sees half a cache entry.
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        tmp_meta = meta.with_name(f".{meta.name}.{os.getpid()}.tmp")
        tmp_meta.write_text(json.dumps(text))
        os.replace(tmp_meta, meta)
        os.replace(tmp, cache)
    return train, evals


# -------------------------------------------------------------------------------------------- batching


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Example indices of global batch ``step``: epochs of a seeded permutation, a pure function of its inputs."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        take = min(batch_size - len(out), n - offset)
        out.extend(perm[offset : offset + take].tolist())
    return np.asarray(out, np.int64)


def eval_batches(data: Tokenized, batch_size: int, loss_positions: bool = True):
    """Fixed-shape eval batches: the last one is padded by repeating rows, with ``weight`` 0 on the padding.
    Causal LM: with ``loss_positions`` (:func:`with_loss_positions`, one capacity for the whole set) unless
    ``loss_positions`` is false (preference pairs, scored by their sequence log-probabilities)."""
    n = len(data)
    capacity = example_capacity(data) if data.loss_mask is not None and loss_positions else None
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        weight = (idx < n).astype(np.float32)
        batch = data.take(np.minimum(idx, n - 1))
        batch["weight"] = weight
        yield with_loss_positions(batch, capacity)


# ----------------------------------------------------------------------------- bucketed and packed batches
#
# Padding every batch to data.max_length computes padding: SST-2 sentences are 13 MiniLM tokens on average, against
# a max_length of 64. Two ways not to, both pure functions of (seed, batch index), so a resumed run sees exactly
# the batches an uninterrupted one would:
# - classification: batches of examples of similar length (grouped within a shuffled window, the batches then
#   shuffled), each cut to the smallest of a few fixed widths: few shapes, so the step compiles a few times;
# - causal LM: several examples packed into each row with segment ids (the models keep attention inside each
#   example and restart positions, lora_jax.models.generate), every row of one width: one compilation.


def example_lengths(data: Tokenized) -> np.ndarray:
    """Real (non-padding) tokens of each example: ``(n,)`` int64."""
    return np.asarray(data.attention_mask, np.int64).sum(axis=1)


# ------------------------------------------------------------------------------- loss positions
#
# The LM head and the cross-entropy need to run only where the loss is (lora_jax.losses: ``positions``). Each
# causal-LM batch carries ``loss_positions`` (rows, K): the positions of each row whose next token is a completion
# token, then empty slots (the row width). K is fixed per run (one compilation): the longest completion for batches
# of one example per row, a capacity per packed row that the packer respects (:func:`pack_order`).

CAPACITY_MULTIPLE = 8  # loss slots per row are rounded up to a multiple of this


def _round_up(n: int, multiple: int = CAPACITY_MULTIPLE) -> int:
    return max(multiple, -(-int(n) // multiple) * multiple)


def loss_counts(data: Tokenized, width: int | None = None) -> np.ndarray:
    """Positions carrying loss in each example's first ``width`` tokens (all of them: ``None``): ``(n,)``
    int64."""
    mask = np.asarray(data.loss_mask, np.int64)
    return (mask if width is None else mask[:, :width]).sum(axis=1)


def example_capacity(data: Tokenized) -> int:
    """Loss slots per row for batches of one example per row: the most loss positions of any example, rounded up
    to a multiple of :data:`CAPACITY_MULTIPLE`, at most the tokenised width."""
    width = data.loss_mask.shape[1]
    most = int(loss_counts(data).max()) if len(data) else 1
    return min(_round_up(most), width)


def with_loss_positions(batch: dict[str, np.ndarray], capacity: int | None) -> dict[str, np.ndarray]:
    """``batch`` with ``loss_positions`` (:func:`lora_jax.losses.loss_positions` of its ``loss_mask``, ``capacity``
    slots per row, at most the batch's width); unchanged when ``capacity`` is ``None`` or it has no loss mask."""
    if capacity is None or "loss_mask" not in batch:
        return batch
    from lora_jax.losses import loss_positions

    width = batch["loss_mask"].shape[1]
    return {**batch, "loss_positions": loss_positions(batch["loss_mask"], min(capacity, width))}


class EpochStream:
    """The endless concatenation ``order(0), order(1), ...`` of per-epoch sequences (an epoch's length may vary:
    packed rows), read by global position. ``order(epoch)`` must be a pure function; the last few epochs are
    cached, and so is the length of every epoch seen."""

    def __init__(self, order: Any, cached_epochs: int = 3):
        import functools

        self._order = functools.lru_cache(maxsize=cached_epochs)(order)
        self._sizes: list[int] = []

    def _size(self, epoch: int) -> int:
        while len(self._sizes) <= epoch:
            size = len(self._order(len(self._sizes)))
            if size == 0:
                raise DataError("an epoch of the training data holds no batch item")
            self._sizes.append(size)
        return self._sizes[epoch]

    def take(self, start: int, count: int) -> list:
        """Items ``start ... start + count - 1`` of the stream."""
        epoch, offset = 0, start
        while offset >= self._size(epoch):
            offset -= self._size(epoch)
            epoch += 1
        out: list = []
        while len(out) < count:
            items = self._order(epoch)
            out.extend(items[offset : offset + count - len(out)])
            epoch, offset = epoch + 1, 0
        return out


def grouped_order(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, group: int = 50) -> np.ndarray:
    """An epoch's order of examples whose consecutive ``batch_size`` runs are of similar length.

    A seeded permutation is cut into windows of ``group`` batches; each window is sorted by length (longest
    first), cut into batches, and the batches of the whole epoch are shuffled (a last, smaller batch stays last).
    As ``transformers``' ``group_by_length``: the examples of a batch come from a random window, not from the whole
    set, so batches stay varied while their padding shrinks.
    """
    n = len(lengths)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    window = batch_size * group
    chunks = [perm[i : i + window] for i in range(0, n, window)]
    ordered = np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in chunks])
    full = n // batch_size
    batches = ordered[: full * batch_size].reshape(full, batch_size)
    batches = batches[np.random.default_rng([seed, epoch, 1]).permutation(full)]
    return np.concatenate([batches.reshape(-1), ordered[full * batch_size :]])


def bucket_widths(needed: np.ndarray, top: int, n_shapes: int = 4, multiple: int = 8) -> tuple[int, ...]:
    """At most ``n_shapes`` widths (multiples of ``multiple``, the largest ``top``) that minimise the padded
    tokens of batches needing ``needed`` tokens each (a batch takes the smallest width that holds it).

    Dynamic programming over the candidate widths ``multiple, 2 * multiple, ..., top``: exact for the batches
    given (the first epoch's, by :class:`BucketedBatches`).
    """
    needed = np.asarray(needed, np.int64)
    if needed.size and needed.max() > top:
        raise DataError(f"a batch needs {int(needed.max())} tokens, more than the largest width {top}")
    cands = sorted({min(-(-int(w) // multiple) * multiple, top) for w in needed} | {top})
    if n_shapes <= 1 or len(cands) == 1:
        return (top,)
    # cost[i][j]: padded tokens of the batches whose need lies in (cands[i-1], cands[j]] when they take cands[j]
    counts = np.array([np.sum((needed > (cands[i - 1] if i else 0)) & (needed <= c)) for i, c in enumerate(cands)])
    m = len(cands)
    INF = float("inf")
    # best[k][j]: least cost covering needs up to cands[j] with k widths, the largest being cands[j]
    best = [[INF] * m for _ in range(n_shapes + 1)]
    back = [[-1] * m for _ in range(n_shapes + 1)]
    for j in range(m):
        best[1][j] = cands[j] * counts[: j + 1].sum()
    for k in range(2, n_shapes + 1):
        for j in range(m):
            for i in range(j):
                cost = best[k - 1][i] + cands[j] * counts[i + 1 : j + 1].sum()
                if cost < best[k][j]:
                    best[k][j], back[k][j] = cost, i
    k = min(range(1, n_shapes + 1), key=lambda k: (best[k][m - 1], k))
    widths, j = [], m - 1
    while j >= 0 and k >= 1:
        widths.append(cands[j])
        j, k = back[k][j], k - 1
    return tuple(sorted(widths))


class Batches:
    """Training batches by global index: ``batches(i) -> {name: (B, W) or (B,) array}`` (host numpy), a pure
    function of the data, the seed and ``i``. ``widths``: the sequence widths a batch can have (one compilation of
    the step each); ``examples(i)``: how many examples batch ``i`` holds."""

    widths: tuple[int, ...] = ()

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def examples(self, index: int) -> int:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


class FixedBatches(Batches):
    """Every batch ``(batch_size, max_length)``: :func:`batch_indices` (the data as tokenised)."""

    def __init__(self, data: Tokenized, batch_size: int, seed: int, loss_positions: bool = False):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.widths = (data.attention_mask.shape[-1],)  # audio: frames (no input_ids); pairs: (n, 2, T)
        self.capacity = example_capacity(data) if loss_positions and data.loss_mask is not None else None

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        return with_loss_positions(
            self.data.take(batch_indices(len(self.data), self.batch_size, index, self.seed)), self.capacity
        )

    def examples(self, index: int) -> int:
        return self.batch_size

    def describe(self) -> str:
        return f"fixed batches of {self.batch_size} x {self.widths[0]} tokens" + _describe_capacity(
            self.capacity, self.widths[0]
        )


def _describe_capacity(capacity: int | None, width: int) -> str:
    return "" if capacity is None else f", logits at {capacity} of {width} positions per row"


def _cut(batch: dict[str, np.ndarray], width: int) -> dict[str, np.ndarray]:
    return {k: v[:, :width] if v.ndim == 2 else v for k, v in batch.items()}


class BucketedBatches(Batches):
    """Length-grouped batches (:func:`grouped_order`), each cut to the smallest of ``widths`` that holds its
    longest example. ``widths`` default to :func:`bucket_widths` of the first epoch's batches (``n_shapes`` of
    them, the largest the longest example rounded up to a multiple of 8, at most the tokenised width)."""

    def __init__(
        self,
        data: Tokenized,
        batch_size: int,
        seed: int,
        n_shapes: int = 4,
        widths: tuple[int, ...] | None = None,
        group: int = 50,
        loss_positions: bool = False,
    ):
        self.data, self.batch_size, self.seed, self.group = data, batch_size, seed, group
        # a batch cut to width w gets min(capacity, w) slots: one shape per width
        self.capacity = example_capacity(data) if loss_positions and data.loss_mask is not None else None
        self.lengths = example_lengths(data)
        full = data.input_ids.shape[1]
        self.stream = EpochStream(lambda e: grouped_order(self.lengths, batch_size, seed, e, group))
        if widths is None:
            first = np.asarray(self.stream.take(0, len(data)))
            ends = range(0, len(first), batch_size)
            needed = np.array([self.lengths[first[i : i + batch_size]].max() for i in ends])
            top = min(-(-int(self.lengths.max()) // 8) * 8, full)
            widths = bucket_widths(needed, top, n_shapes)
        self.widths = tuple(sorted(widths))
        if self.widths[-1] < self.lengths.max():
            raise DataError(
                f"bucket widths {self.widths} do not hold the longest example ({self.lengths.max()} tokens)"
            )

    def indices(self, index: int) -> np.ndarray:
        return np.asarray(self.stream.take(index * self.batch_size, self.batch_size), np.int64)

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        idx = self.indices(index)
        longest = int(self.lengths[idx].max())
        width = next(w for w in self.widths if w >= longest)
        return with_loss_positions(_cut(self.data.take(idx), width), self.capacity)

    def examples(self, index: int) -> int:
        return self.batch_size

    def describe(self) -> str:
        return f"length-bucketed batches of {self.batch_size} examples, widths {list(self.widths)}"


def pack_order(
    lengths: np.ndarray,
    width: int,
    seed: int,
    epoch: int,
    window: int = 1024,
    losses: np.ndarray | None = None,
    capacity: int | None = None,
) -> list[np.ndarray]:
    """An epoch's packed rows: lists of example indices whose lengths sum to at most ``width``.

    A seeded permutation is cut into windows of ``window`` examples; each window is packed best-fit decreasing
    (the longest example first, each into the fullest row it fits, else a new row), and the rows of the epoch
    are shuffled. Examples longer than ``width`` are cut to it when packed.

    ``losses`` (n,) / ``capacity``: each example's loss positions (within its first ``width`` tokens) and the most
    a row may hold; an example goes only into a row with room for its tokens and for its loss positions (the
    fullest such row). Without them (or when the capacity never binds) the rows are the same.
    """
    if capacity is not None and losses is not None and len(losses) and int(np.max(losses)) > capacity:
        i = int(np.argmax(losses))
        raise DataError(
            f"example {i} carries loss at {int(losses[i])} positions, more than the capacity of "
            f"{capacity} loss positions per packed row (data.loss_capacity)"
        )
    bound = capacity is not None and losses is not None
    perm = np.random.default_rng([seed, epoch]).permutation(len(lengths))
    rows: list[list[int]] = []
    for start in range(0, len(perm), window):
        chunk = perm[start : start + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        free: list[list[int]] = [[] for _ in range(width + 1)]  # free[s]: open rows with s tokens left
        local: list[list[int]] = []
        room: list[int] = []  # loss positions each row can still take
        for i in chunk:
            n = min(int(lengths[i]), width)
            need = int(losses[i]) if bound else 0
            r = None
            for s in range(n, width + 1):
                if not free[s]:
                    continue
                # the last row opened with s tokens left, as without a capacity; else the last that has room
                at = (
                    next((j for j in range(len(free[s]) - 1, -1, -1) if room[free[s][j]] >= need), None)
                    if bound
                    else len(free[s]) - 1
                )
                if at is not None:
                    r = free[s].pop(at)
                    local[r].append(int(i))
                    break
            if r is None:
                local.append([int(i)])
                room.append(capacity if bound else 0)
                r, s = len(local) - 1, width
            if bound:
                room[r] -= need
            left = s - n
            if left > 0:
                free[left].append(r)
        rows.extend(local)
    order = np.random.default_rng([seed, epoch, 1]).permutation(len(rows))
    return [np.asarray(rows[i], np.int64) for i in order]


def pack_rows(data: Tokenized, rows: list[np.ndarray], width: int) -> dict[str, np.ndarray]:
    """Packed arrays ``(len(rows), width)``: ``input_ids``, ``attention_mask``, ``loss_mask`` (each example's
    own, so the loss covers each completion only and never predicts across examples), ``segment_ids`` (1, 2, ...
    per example, 0 on padding) and ``positions`` (restarting at 0 in each example)."""
    lengths = example_lengths(data)
    shape = (len(rows), width)
    out = {
        k: np.zeros(shape, np.int32) for k in ("input_ids", "attention_mask", "loss_mask", "segment_ids", "positions")
    }
    for r, row in enumerate(rows):
        at = 0
        for k, i in enumerate(row):
            n = min(int(lengths[i]), width - at)
            out["input_ids"][r, at : at + n] = data.input_ids[i, :n]
            out["loss_mask"][r, at : at + n] = data.loss_mask[i, :n]
            out["segment_ids"][r, at : at + n] = k + 1
            out["positions"][r, at : at + n] = np.arange(n)
            at += n
        out["attention_mask"][r, :at] = 1
    # an example cut at the row's end must not predict past it
    ends = np.concatenate(
        [out["segment_ids"][:, 1:] != out["segment_ids"][:, :-1], np.ones((len(rows), 1), bool)], axis=1
    )
    out["loss_mask"][ends] = 0
    return out


class PackedBatches(Batches):
    """Causal-LM batches of ``rows`` rows of ``width`` tokens, each row several examples (:func:`pack_order`,
    :func:`pack_rows`).

    ``loss_positions``: each batch carries ``loss_positions`` (rows, ``capacity``) and no row holds more loss
    positions than ``capacity`` (the packer respects it). ``capacity=None``: the most loss positions of any row of
    the first epoch packed without a limit (rounded up to a multiple of :data:`CAPACITY_MULTIPLE`), so the first
    epoch's rows are the rows packed without loss positions, and later epochs rarely differ."""

    def __init__(
        self,
        data: Tokenized,
        rows: int,
        seed: int,
        width: int | None = None,
        window: int = 1024,
        loss_positions: bool = False,
        capacity: int | None = None,
    ):
        if data.loss_mask is None:
            raise DataError("packing is for causal-LM data (examples with a loss mask)")
        self.data, self.rows, self.seed = data, rows, seed
        self.width = int(width or data.input_ids.shape[1])
        self.widths = (self.width,)
        self.lengths = example_lengths(data)
        self.losses = loss_counts(data, self.width)
        self.capacity = None
        if loss_positions:
            if capacity is None:
                first = pack_order(self.lengths, self.width, seed, 0, window)
                capacity = _round_up(max((int(self.losses[r].sum()) for r in first), default=1))
            self.capacity = min(int(capacity), self.width)
            if len(data) and int(self.losses.max()) > self.capacity:
                i = int(np.argmax(self.losses))
                raise DataError(
                    f"example {i} carries loss at {int(self.losses[i])} positions, more than the "
                    f"capacity of {self.capacity} loss positions per packed row (data.loss_capacity); "
                    f"raise it to at least {int(self.losses[i])}"
                )
        self.stream = EpochStream(
            lambda e: pack_order(self.lengths, self.width, seed, e, window, self.losses, self.capacity)
        )

    def row_indices(self, index: int) -> list[np.ndarray]:
        return self.stream.take(index * self.rows, self.rows)

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        return with_loss_positions(pack_rows(self.data, self.row_indices(index), self.width), self.capacity)

    def examples(self, index: int) -> int:
        return sum(len(r) for r in self.row_indices(index))

    def describe(self) -> str:
        rows = self.stream.take(0, self.stream._size(0))
        used = sum(min(int(self.lengths[i]), self.width) for r in rows for i in r)
        return (
            f"packed batches of {self.rows} rows x {self.width} tokens ({len(self.data) / len(rows):.2f} "
            f"examples and {100 * used / (len(rows) * self.width):.1f}% real tokens per row in the first epoch)"
            + _describe_capacity(self.capacity, self.width)
        )
