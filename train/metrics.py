"""Evaluation metrics (thin wrappers over scikit-learn, sacrebleu and rouge-score) and metric logging."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np


def classification(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """Accuracy, ROC AUC (binary: on the positive-class probability; multi-class: one-vs-rest) and F1
    (binary, or macro for more classes)."""
    from sklearn.metrics import f1_score, roc_auc_score

    labels = np.asarray(labels)
    logits = np.asarray(logits, np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    preds = probs.argmax(-1)
    out = {"accuracy": float((preds == labels).mean())}
    n_classes = logits.shape[-1]
    try:
        if n_classes == 2:
            out["auc"] = float(roc_auc_score(labels, probs[:, 1]))
        else:
            out["auc"] = float(roc_auc_score(labels, probs, multi_class="ovr", labels=list(range(n_classes))))
    except ValueError:  # a single class present in the labels
        out["auc"] = float("nan")
    out["f1"] = float(f1_score(labels, preds, average="binary" if n_classes == 2 else "macro", zero_division=0))
    return out


def generation(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu, multi-reference) and mean best-reference ROUGE-L F1 (rouge-score)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    n_refs = max(len(r) for r in references)
    ref_streams = [[r[i] if i < len(r) else r[0] for r in references] for i in range(n_refs)]
    bleu = sacrebleu.corpus_bleu(predictions, ref_streams).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = np.mean(
        [max(scorer.score(ref, pred)["rougeL"].fmeasure for ref in refs) for pred, refs in zip(predictions, references)]
    )
    return {"bleu": float(bleu), "rougeL": float(100 * rouge)}


class MetricLog:
    """Appends one JSON object per record to ``metrics.jsonl`` and mirrors scalars to TensorBoard events."""

    def __init__(self, folder: str | Path, enabled: bool = True, purge_step: int | None = None):
        """``purge_step``: a resumed run trains the steps from ``purge_step`` again; TensorBoard drops the
        events it had for them (see :func:`truncate_log` for ``metrics.jsonl``)."""
        self.enabled = enabled
        self.path = Path(folder) / "metrics.jsonl"
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(Path(folder) / "tensorboard"), purge_step=purge_step)
            except ImportError:  # pragma: no cover - tensorboardX is a dependency
                self._tb = None

    def write(self, kind: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **values}
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=float) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def truncate_log(folder: str | Path, step: int) -> int:
    """Drop the records of steps after ``step`` from ``metrics.jsonl`` (a run resumed from the checkpoint of
    ``step`` logs them again); a damaged line (a write cut by a kill) is dropped too. Returns the records kept.
    The file is replaced atomically."""
    path = Path(folder) / "metrics.jsonl"
    if not path.exists():
        return 0
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)
    return len(kept)


def read_log(folder: str | Path) -> list[dict]:
    path = Path(folder) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
