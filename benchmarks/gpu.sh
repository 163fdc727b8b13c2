#!/usr/bin/env bash
# Sequencer2D-S at 224 on one CUDA GPU, timm against Keras on JAX and PyTorch (TensorFlow joins where its GPU
# build is installed), in float32 and in mixed_float16 against timm under AMP (float16 autocast + GradScaler). Each step is bounded so that one slow compile cannot take the
# rest; bench.json is rewritten after every engine, so a step stopped at its limit keeps what it measured.
# Each step's bench.json and one log land in OUTPUT; the exit status is 1 if any step failed or was stopped.
#
#   bash benchmarks/gpu.sh [OUTPUT [STEP ...]]
#     OUTPUT: default benchmarks/results/gpu; STEP: float32_jax_paths, float32_auto, float16_auto (default: all)
#     SIZE=56 for a quick dry run; LIMIT=seconds per step (default 330: on an H200 JAX compiled S's training
#     step for 35-41 s, and each engine also compiles `predict` once per batch size)
set -uo pipefail
out=${1:-benchmarks/results/gpu}
shift || true
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(float32_jax_paths float32_auto float16_auto)
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1
# the bench's own process imports Keras (for MAC counts) before it spawns the engines; TensorFlow, Keras' default
# backend, is often missing from GPU images
export KERAS_BACKEND=${KERAS_BACKEND:-torch}
common=(--variants s --size "${SIZE:-224}" --batch-sizes 1 16 --runs 10 --warmup 3 --gemm-size 8192 --no-memory
        --no-tflite)

declare -A args=(
  [float32_jax_paths]="--backends jax --paths keras scan"
  [float32_auto]="--backends jax torch --paths auto"
  [float16_auto]="--backends jax torch --paths auto --dtype-policy mixed_float16"
)

{
  failed=0
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  KERAS_BACKEND=jax python -c "import torch, timm, jax, keras; print('jax', jax.__version__, jax.devices(), '| keras',
    keras.__version__, '| torch', torch.__version__, torch.cuda.get_device_name(), '| timm', timm.__version__)" 2>&1
  for name in "${steps[@]}"; do
    [ -n "$name" ] && [ -n "${args[$name]:-}" ] || { echo "unknown step '$name' (one of: ${!args[*]})"; exit 2; }
    echo "=== $name: bench ${args[$name]} ($(date -u +%T))"
    # --foreground: an interrupt of this script reaches the bench and its workers (they hold the GPU)
    # shellcheck disable=SC2086
    timeout --foreground "${LIMIT:-330}" python -m keras_sequencer bench ${args[$name]} "${common[@]}" \
      --output "$work/$name"
    status=$?
    echo "=== $name: exit $status$([ $status = 124 ] && echo ', stopped at the limit') ($(date -u +%T))"
    cp "$work/$name/bench.json" "$out/$name.json" 2>/dev/null
    [ $status = 0 ] || failed=1
  done
  exit $failed
} 2>&1 | grep --line-buffered -v "^I0000\|^W0000\|^WARNING: All log" | tee "$out/gpu.log"
exit "${PIPESTATUS[0]}"
