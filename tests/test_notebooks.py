"""The notebooks in notebooks/: committed with their outputs (so they read on a code host), and executed in the slow
tier (every cell run by a fresh kernel through nbclient; an error in any cell fails the test)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import require, require_program

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_is_the_whisper_notebook():
    assert ROOT / "notebooks" / "whisper_lora.ipynb" in NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebooks_are_committed_with_their_outputs(path):
    nbformat = require("nbformat")
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs for c in code), f"{path.name}: a code cell without outputs (execute it first)"
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "run top to bottom, once"
    assert not any(o.output_type == "error" for c in code for o in c.outputs)
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs), "the plot is missing"


@pytest.mark.slow
def test_whisper_notebook_runs(tmp_path):
    """LoRA on Whisper, end to end in a fresh kernel (a few minutes on 2 cores): the merged model gives the
    factored model's outputs and the PEFT export names the adapted modules and the head."""
    nbformat = require("nbformat")
    nbclient = require("nbclient")
    require("ipykernel")
    require_program("espeak-ng", "sox")
    nb = nbformat.read(ROOT / "notebooks" / "whisper_lora.ipynb", as_version=4)
    nbclient.NotebookClient(
        nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    diff = float(re.search(r"largest difference, merged vs factored logits: (\S+)", text).group(1))
    assert diff < 1e-3
    assert "'target_modules': ['q_proj', 'v_proj'], 'modules_to_save': ['classifier', 'projector']" in text
    assert re.search(r"LoRA +final: .*auc 0\.\d+", text) and re.search(r"frozen head +final: .*auc 0\.\d+", text)
