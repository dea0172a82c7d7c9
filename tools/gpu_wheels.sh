#!/usr/bin/env bash
# On a networked machine: download the wheels the offline GPU box lacks (tools/gpu_wheels.txt) into a folder
# (default gpu-wheels/, ignored by git), check that they come to less than 64 MiB, and print the commands for the box.
# Usage: bash tools/gpu_wheels.sh [FOLDER]      (PYTHON=python3.12 to choose the pip that downloads)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
folder="${1:-gpu-wheels}"
python="${PYTHON:-python3}"
mkdir -p "$folder"
# The box is Linux x86-64 with CPython 3.12: ask for wheels of that platform whatever this machine is.
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    --dest "$folder" --requirement "$repo/tools/gpu_wheels.txt"
# The plan: each wheel's size, the total against 64 MiB, wheels in the folder that are not listed, and the commands.
"$python" "$repo/tools/gpu_check_box.py" "$folder"
