#!/usr/bin/env bash
# Developer / CI set-up: a .venv in the repository with streamdiff and its test extras.
# torch is installed only when the venv has none: `torch==2.13.0` (the quick CPU wheel on our CPU machines).
# GPU users installing streamdiff for real use keep their own CUDA torch: `pip install streamdiff` never pins it.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q "torch==${STREAMDIFF_TORCH_VERSION:-2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -c "import streamdiff, torch; print(f'streamdiff {streamdiff.__version__} ready (torch {torch.__version__})')"
