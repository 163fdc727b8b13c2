#!/usr/bin/env bash
# Sets up .venv and runs the whole test suite once per Keras backend.
# Usage: bash scripts/test.sh [extra pytest args]
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv || exit 1
# shellcheck disable=SC1091
. .venv/bin/activate
pip install -q --upgrade pip || exit 1
# timm needs torchvision; these two builds are a matching pair (on this project's
# machines they come from the local package index, without a download).
pip install -q "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}" || exit 1
pip install -q -e ".[test]" || exit 1
bash scripts/fashion_mnist.sh  # real data offline (Debian package)

echo "== ruff"
ruff check . && ruff format --check . || exit 1

status=0
for backend in tensorflow jax torch; do
    echo "== pytest, KERAS_BACKEND=$backend"
    KERAS_BACKEND=$backend TF_CPP_MIN_LOG_LEVEL=3 python -m pytest -p no:cacheprovider "$@" || status=1
done
exit $status
