"""Whether a mixed-precision policy pays on this machine, and a warning, once per process and dtype, when it does not.

Sequencer's time goes into matmuls and the LSTM recurrence's small elementwise ops. On a CPU, 16-bit compute
pays only where the hardware multiplies 16-bit numbers natively and the backend uses those instructions:

- bfloat16 needs AVX512-BF16 or AMX-BF16. Without them every backend ran slower in `"mixed_bfloat16"` than in
  float32 (PyTorch's CPU kernels by an order of magnitude; benchmarks/README.md, "Mixed precision on a CPU").
- float16 needs AVX512-FP16 or AMX-FP16, for the same reason; and even with AVX512-FP16 every backend ran
  slower: TensorFlow and PyTorch trained Sequencer2D-S at about a third of float32's speed, JAX at three
  quarters, and all three inferred slower.
- XLA on a CPU (the JAX backend) ran bfloat16 slower than float32 even on CPUs with AVX512-BF16 and AMX-BF16.

On a GPU or TPU none of this applies and nothing is said. Where the CPU's features cannot be read (no
`/proc/cpuinfo`, or a CPU other than x86) only the XLA rule is applied: the package does not guess.
"""

import functools
import os
import sys
import warnings

import keras

__all__ = ["PrecisionWarning", "slower_than_float32_reason", "warn_if_slower_than_float32"]

_NATIVE = {"bfloat16": ("avx512_bf16", "amx_bf16"), "float16": ("avx512_fp16", "amx_fp16")}
# Per backend, what ran float16 slower than float32 on an x86 CPU with AVX512-FP16, and how fast S trained.
_FLOAT16_SLOW = {
    "tensorflow": ("TensorFlow's CPU kernels run", "about a third of"),
    "torch": ("PyTorch's CPU kernels run", "about a third of"),
    "jax": ("XLA on a CPU runs", "three quarters of"),
}
_warned: set[str] = set()


class PrecisionWarning(UserWarning):
    """A 16-bit dtype policy that runs slower than float32 on this machine.

    Silence it with `warnings.filterwarnings("ignore", category=keras_sequencer.PrecisionWarning)`.
    """


@functools.cache
def _first_processor() -> dict[str, str]:
    """The fields of the first processor in /proc/cpuinfo (name -> value); empty where it cannot be read."""
    fields = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if not line.strip():  # the blank line after the first processor
                    break
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_flags() -> frozenset[str] | None:
    """The x86 feature flags of this machine's CPU from /proc/cpuinfo; None where they cannot be read."""
    flags = _first_processor().get("flags")  # x86 only (ARM names its line "Features")
    return None if flags is None else frozenset(flags.split())


def cpu_identity() -> tuple[str, int] | None:
    """The x86 CPU's vendor and family from /proc/cpuinfo (e.g. `("AuthenticAMD", 26)`); None where they cannot
    be read."""
    fields = _first_processor()
    try:
        return fields["vendor_id"], int(fields["cpu family"])
    except (KeyError, ValueError):
        return None


def on_accelerator(backend: str) -> bool:
    """Whether the backend computes on a GPU or TPU in this process."""
    if backend == "jax":
        import jax

        return jax.default_backend() != "cpu"
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))
    if backend == "torch":
        import torch

        return torch.cuda.is_available()
    return False


def slower_than_float32_reason(
    compute_dtype: str,
    backend: str | None = None,
    flags: frozenset[str] | None = ...,
    accelerator: bool | None = None,
) -> str | None:
    """Why computing in `compute_dtype` is slower than float32 here, or None when it is not known to be.

    Args:
        compute_dtype: a dtype policy's compute dtype ("float32", "bfloat16", "float16", ...).
        backend: the Keras backend; this process' by default.
        flags: the CPU's x86 feature flags, None for unknown; this machine's (`cpu_flags()`) by default.
        accelerator: whether the backend computes on a GPU/TPU; looked up by default.
    """
    if compute_dtype not in _NATIVE:
        return None
    backend = backend or keras.backend.backend()
    if accelerator is None:
        accelerator = on_accelerator(backend)
    if accelerator:
        return None
    if flags is ...:
        flags = cpu_flags()
    if flags is not None and not any(flag in flags for flag in _NATIVE[compute_dtype]):
        first, second = (flag.upper().replace("_", "-") for flag in _NATIVE[compute_dtype])
        return f"this CPU has neither {first} nor {second}, the instructions that make {compute_dtype} math fast"
    if compute_dtype == "bfloat16" and backend == "jax":
        return "XLA on a CPU runs bfloat16 slower than float32, even on CPUs with AVX512-BF16 or AMX-BF16"
    if compute_dtype == "float16" and backend in _FLOAT16_SLOW and flags is not None:
        engine, share = _FLOAT16_SLOW[backend]
        return (
            f"{engine} float16 slower than float32 even on CPUs with AVX512-FP16 "
            f"(Sequencer2D-S trained at {share} float32's speed)"
        )
    return None


def _caller_stacklevel() -> int:
    """The `stacklevel` that points a warning at the first frame outside this package and Keras (user code)."""
    ours = (os.path.dirname(__file__) + os.sep, os.path.dirname(keras.__file__) + os.sep)  # not keras_hub
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(ours):
        frame, level = frame.f_back, level + 1
    return level


def warn_if_slower_than_float32(compute_dtype: str) -> None:
    """Warns (a `PrecisionWarning`, once per process and dtype) when `compute_dtype` is slower than float32 here."""
    if compute_dtype in _warned:
        return
    reason = slower_than_float32_reason(compute_dtype)
    if reason is None:
        return
    _warned.add(compute_dtype)
    warnings.warn(
        f"This Sequencer2D computes in {compute_dtype} on a CPU, where float32 is faster: {reason}. "
        "For speed set `keras.config.set_dtype_policy('float32')` before building the model; it is measured "
        "in the repository's benchmarks/README.md, 'Mixed precision on a CPU'.",
        PrecisionWarning,
        stacklevel=_caller_stacklevel(),
    )
