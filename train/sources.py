"""Where a data set comes from: ``data.source`` (and ``data.eval_source``) read one way everywhere, by the config's
checks (which keys apply), the loader and the early data check.

    >>> kind("builtin:restaurants"), kind("train.csv,dev.csv"), kind("glue")
    ('builtin', 'files', 'hub')
    >>> paths(" a.jsonl, b.jsonl ,")
    ['a.jsonl', 'b.jsonl']
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

BUILTIN = "builtin:"
# The local file types, by suffix, and the reader (a `datasets` builder name) of each.
FILE_TYPES = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}

Kind = Literal["builtin", "files", "hub"]


def paths(source: str) -> list[str]:
    """The comma-separated entries of ``source``, stripped, empty ones dropped."""
    return [p.strip() for p in source.split(",") if p.strip()]


def kind(source: str) -> Kind:
    """``"builtin"`` for ``builtin:NAME``; ``"files"`` when an entry has a data file suffix (:data:`FILE_TYPES`) or
    is a path (holds a path separator) that exists; ``"hub"`` otherwise (a hub data set name, ``org/name``)."""
    if source.startswith(BUILTIN):
        return "builtin"
    separators = {"/", os.sep}
    for p in paths(source):
        if Path(p).suffix.lower() in FILE_TYPES or (any(s in p for s in separators) and Path(p).exists()):
            return "files"
    return "hub"
