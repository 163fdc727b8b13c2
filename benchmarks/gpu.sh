#!/usr/bin/env bash
# The GPU rows of benchmarks/README.md: Sequencer2D-S at 224 on one CUDA GPU, timm against Keras on JAX and
# PyTorch (TensorFlow joins where its GPU build is installed), in float32 and in mixed_float16 against timm
# under AMP (float16 autocast + GradScaler). Each step is bounded so that one slow compile cannot take the
# rest; bench.json is rewritten after every engine, so a step stopped at its limit keeps what it measured.
# Each step's bench.json and one log land in OUTPUT.
#
#   bash benchmarks/gpu.sh [OUTPUT [STEP ...]]
#     OUTPUT: default benchmarks/results/gpu; STEP: float32_jax_paths, float32_auto, float16_auto (default: all)
#     SIZE=56 for a quick dry run; LIMIT=seconds per step (default 330: a JAX engine compiles for ~40 s per
#     batch size and again for its training step)
set -uo pipefail
out=${1:-benchmarks/results/gpu}
shift || true
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(float32_jax_paths float32_auto float16_auto)
mkdir -p "$out"
work=$(mktemp -d)
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
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  KERAS_BACKEND=jax python -c "import torch, timm, jax, keras; print('jax', jax.__version__, jax.devices(), '| keras',
    keras.__version__, '| torch', torch.__version__, torch.cuda.get_device_name(), '| timm', timm.__version__)" 2>&1
  for name in "${steps[@]}"; do
    [ -n "${args[$name]:-}" ] || { echo "unknown step $name (one of: ${!args[*]})"; continue; }
    echo "=== $name: bench ${args[$name]} ($(date -u +%T))"
    # shellcheck disable=SC2086
    timeout "${LIMIT:-330}" python -m keras_sequencer bench ${args[$name]} "${common[@]}" --output "$work/$name"
    echo "=== $name: exit $? ($(date -u +%T))"
    cp "$work/$name/bench.json" "$out/$name.json" 2>/dev/null
  done
} 2>&1 | grep -v "^I0000\|^W0000\|^WARNING: All log" | tee "$out/gpu.log"
rm -rf "$work"
