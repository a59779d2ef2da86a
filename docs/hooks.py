"""MkDocs hook: the experiments' plots (``experiments/**/*.png``, written by ``python -m train.experiment`` and
``python -m train.analyze``) are served from where the experiments leave them, so the site shows the same files
the repository holds; nothing is copied into ``docs/``."""

from __future__ import annotations

import logging
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]


def on_files(files: Files, config) -> Files:
    for png in sorted((ROOT / "experiments").rglob("*.png")):
        rel = png.relative_to(ROOT)
        if "runs" in rel.parts or "stale" in rel.parts:  # run folders are not committed; withdrawn plots not shown
            continue
        files.append(File.generated(config, rel.as_posix(), abs_src_path=str(png)))
    return files


class _NotAReference(logging.Filter):
    """Doctest lines in docstrings (``p["dense"]["kernel"]``) read as Markdown reference links; a subscript with a
    quoted key is never a cross-reference, so autorefs' warning about it is dropped (every other one stays)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Could not find cross-reference target '\"" not in record.getMessage()


logging.getLogger("mkdocs.plugins.mkdocs_autorefs._internal.plugin").addFilter(_NotAReference())
