#!/usr/bin/env bash
# Regenerate tests/fixtures/reference/ from the original StreamDiffusion (streamdiffusion==0.1.1, PyPI).
#
#   bash tools/reference/make_golden.sh
#
# 1. a venv of its own (tools/reference/.venv, reused on re-runs) with the reference and the libraries of its day;
# 2. the fixture's small seeded model, built by streamdiff's own code (STREAMDIFF_PYTHON, default: the repo's
#    .venv, made by tools/setup.sh if missing) and saved as diffusers folders;
# 3. the reference run over every case on the CPU in float32; golden frames + metadata written next to the model.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="$here/.venv"
fixture="${REFERENCE_FIXTURE:-$repo/tests/fixtures/reference}"
python_base="${PYTHON:-python3}"

if [[ -z "${STREAMDIFF_PYTHON:-}" ]]; then
    STREAMDIFF_PYTHON="$repo/.venv/bin/python"
    [[ -x "$STREAMDIFF_PYTHON" ]] || bash "$repo/tools/setup.sh"
fi

if [[ ! -f "$venv/.installed" ]]; then
    echo "== creating the reference venv in $venv"
    "$python_base" -m venv "$venv"
    # torch first (the CPU wheel); the reference's own pins would pull CUDA packages, hence --no-deps at the end.
    "$venv/bin/python" -m pip install -q torch==2.13.0
    "$venv/bin/python" -m pip install -q diffusers==0.24.0 'huggingface_hub<0.26' transformers==4.46.3 accelerate==1.0.1
    "$venv/bin/python" -m pip install -q streamdiffusion==0.1.1 --no-deps
    touch "$venv/.installed"
fi

# Nothing is downloaded from the hub; a private HF_HOME keeps the old libraries away from the user's cache.
export HF_HUB_OFFLINE=1 HF_HOME="$venv/hf-home" HF_HUB_DISABLE_PROGRESS_BARS=1
export PYTHONWARNINGS=ignore TRANSFORMERS_VERBOSITY=error DIFFUSERS_VERBOSITY=error

echo "== building the fixture model with streamdiff ($STREAMDIFF_PYTHON)"
trap 'rm -rf "$fixture.tmp"' EXIT  # a failed run leaves the committed fixture as it was
rm -rf "$fixture.tmp"
mkdir -p "$fixture.tmp"
PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "$STREAMDIFF_PYTHON" "$here/build_model.py" "$fixture.tmp"

echo "== running the reference"
"$venv/bin/python" "$here/run_reference.py" "$fixture.tmp"

rm -rf "$fixture"
mv "$fixture.tmp" "$fixture"
du -sh "$fixture"
echo "== fixture written to $fixture"
