#!/usr/bin/env bash
# The main job: sets up .venv and trains a small Sequencer2D on Fashion-MNIST, offline, on the CPU.
# Writes reports/demo/ (curves, confusion matrix, prediction grid, metrics.json, model.keras).
# Usage: bash scripts/demo.sh [extra `python -m keras_sequencer demo` args, e.g. --epochs 3]
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q -e ".[demo]"
bash scripts/fashion_mnist.sh  # real data offline (Debian package)
# TensorFlow trains this model fastest on a CPU (benchmarks/README.md).
export KERAS_BACKEND=${KERAS_BACKEND:-tensorflow}
python -m keras_sequencer demo "$@"
