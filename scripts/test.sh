#!/usr/bin/env bash
# Sets up .venv and runs ruff and the test suite without keras-hub: the whole suite on the TensorFlow backend,
# then the backend-dependent tests (not marked backend_agnostic) on JAX and on PyTorch. Then it installs
# keras-hub and runs the tests marked `hub` on each backend (the three at once). Prints the 25 slowest tests and
# the test time per module.
# Tests run in TEST_WORKERS pytest-xdist processes (default: one per core), each limited to one compute
# thread so that they share the cores instead of fighting over them.
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
# The main passes run as a user without keras-hub would (it is an optional extra).
pip uninstall -q -y keras-hub >/dev/null 2>&1
bash scripts/fashion_mnist.sh  # real data offline (Debian package)

echo "== ruff"
ruff check . && ruff format --check . || exit 1

workers=${TEST_WORKERS:-$(nproc)}
if [ "$workers" -gt 1 ]; then
    export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=2
    export XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
fi
reports=$(mktemp -d)
trap 'rm -rf "$reports"' EXIT
# Tests that build the same model at the same shapes compile the same XLA programs; JAX's persistent
# compilation cache, in this run's temporary folder, lets the later ones, the other xdist worker and the
# tests' subprocesses reuse them. Every program goes in, the many small ones of eager ops too (a fresh JAX
# process builds and calls its first small model ~8 s sooner with them); no size limit, since with one JAX
# scans the whole folder on every write. A worker that reads an entry another is still writing gets an
# error that JAX turns into a warning and a compilation.
export JAX_COMPILATION_CACHE_DIR="$reports/jax-cache" JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
status=0
for backend in tensorflow jax torch; do
    selection=(-m "not hub")
    [ "$backend" = tensorflow ] || selection=(-m "not backend_agnostic and not hub")
    echo "== pytest, KERAS_BACKEND=$backend ${selection[*]}"
    KERAS_BACKEND=$backend TF_CPP_MIN_LOG_LEVEL=3 python -m pytest -p no:cacheprovider -n "$workers" \
        --dist worksteal --junitxml="$reports/$backend.xml" "${selection[@]}" "$@" || status=1
done

# keras-hub's wheel requires the `tensorflow` distribution, whose modules tensorflow-cpu (installed above, the
# same version) already provides: keras-hub and tensorflow-text go in without dependencies, their others after.
echo "== keras-hub"
pip install -q --no-deps "keras-hub==${KERAS_HUB_VERSION:-0.32.0}" "tensorflow-text==${TF_TEXT_VERSION:-2.21.1}" &&
    pip install -q regex sentencepiece tokenizers kagglehub "kagglesdk==0.1.28" rich || exit 1
# The three backends' passes run at once, one process each (one compute thread each when there are several
# cores, as the xdist workers above): most of their time is single-threaded imports and compilation. Each has
# its own log, printed in order when all are done, and its own temporary folder.
for backend in tensorflow jax torch; do
    selection=(-m hub)
    [ "$backend" = tensorflow ] || selection=(-m "hub and not backend_agnostic")
    # One process per backend: the tests share one converted preset per module.
    (
        echo "== pytest, KERAS_BACKEND=$backend ${selection[*]}"
        KERAS_BACKEND=$backend TF_CPP_MIN_LOG_LEVEL=3 python -m pytest -p no:cacheprovider -p no:xdist \
            --basetemp="$reports/tmp-$backend-hub" --junitxml="$reports/$backend-hub.xml" "${selection[@]}" "$@"
        echo $? >"$reports/$backend-hub.status"
    ) >"$reports/$backend-hub.log" 2>&1 &
done
wait
for backend in tensorflow jax torch; do
    cat "$reports/$backend-hub.log"
    code=$(cat "$reports/$backend-hub.status" 2>/dev/null || echo 1)
    [ "$code" -eq 0 ] || [ "$code" -eq 5 ] || status=1  # 5: arguments that select no hub test
done

echo "== 25 slowest tests (all passes)"
python - "$reports" <<'EOF'
import glob, os, sys
import xml.etree.ElementTree as ET

rows = []
for path in glob.glob(os.path.join(sys.argv[1], "*.xml")):
    backend = os.path.basename(path)[: -len(".xml")]
    for case in ET.parse(path).iter("testcase"):
        rows.append((float(case.get("time", 0)), backend, f"{case.get('classname')}::{case.get('name')}"))
for seconds, backend, name in sorted(rows, reverse=True)[:25]:
    print(f"{seconds:8.1f} s  {backend:10s}  {name}")
print(f"{sum(r[0] for r in rows):8.1f} s  in {len(rows)} tests")
print("== test time per module (all passes; each pass's seconds)")
modules = {}
for seconds, backend, name in rows:
    per_pass = modules.setdefault(name.split("::")[0], {})
    per_pass[backend] = per_pass.get(backend, 0.0) + seconds
for module, per_pass in sorted(modules.items(), key=lambda item: -sum(item[1].values())):
    passes = ", ".join(f"{backend} {seconds:.0f}" for backend, seconds in sorted(per_pass.items()))
    print(f"{sum(per_pass.values()):8.1f} s  {module}  ({passes})")
EOF
exit $status
