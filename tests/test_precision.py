"""16-bit dtype policies on a CPU: the rule for when float32 is faster, and the once-per-process warning."""

import os
import warnings

from conftest import BACKEND, global_dtype_policy, tiny_model
import keras
import pytest

import keras_sequencer as ks
from keras_sequencer import precision

AVX2 = frozenset({"sse2", "avx", "avx2", "fma"})  # a CPU of the kind without 16-bit arithmetic
BF16 = AVX2 | {"avx512f", "avx512_bf16"}
AMX = AVX2 | {"amx_bf16", "amx_fp16"}
FP16 = BF16 | {"avx512_fp16", "amx_bf16"}  # float16 arithmetic in AVX-512, bfloat16 in AMX too


@pytest.mark.backend_agnostic
@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_rule_follows_the_instructions_and_the_backend(backend):
    def reason(dtype, flags, accelerator=False):
        return precision.slower_than_float32_reason(dtype, backend, flags, accelerator)

    assert reason("float32", AVX2) is None
    assert "neither AVX512-BF16 nor AMX-BF16" in reason("bfloat16", AVX2)
    assert "neither AVX512-FP16 nor AMX-FP16" in reason("float16", AVX2)
    assert "neither AVX512-FP16" in reason("float16", BF16)  # bfloat16 instructions do not make float16 fast
    for flags in (FP16, AMX):  # with float16 instructions only XLA gains; TensorFlow's and PyTorch's kernels lose
        if backend == "jax":
            assert reason("float16", flags) is None
        else:
            assert "slower than float32 even on CPUs with AVX512-FP16" in reason("float16", flags)
    # XLA on a CPU runs bfloat16 slower than float32 even with the instructions; the other backends gain.
    for flags in (BF16, FP16, AMX, None):  # None: the CPU's features are unknown, only the XLA rule applies
        if backend == "jax":
            assert "XLA" in reason("bfloat16", flags)
        else:
            assert reason("bfloat16", flags) is None
    assert reason("float16", None) is None
    for dtype in ("bfloat16", "float16"):  # a GPU or TPU: never
        assert reason(dtype, AVX2, accelerator=True) is None


@pytest.mark.backend_agnostic
def test_cpu_flags_are_this_machines():
    if not os.path.exists("/proc/cpuinfo"):
        assert precision.cpu_flags() is None
        return
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        text = f.read()
    flags = precision.cpu_flags()
    if "\nflags" not in text:  # not an x86 CPU: its features stay unknown
        assert flags is None
    else:
        assert flags and {"sse2", "fpu"} <= flags
        assert ("avx512_bf16" in flags) == (" avx512_bf16" in text)


@pytest.fixture
def cpu(monkeypatch):
    """A CPU with the given flags and no accelerator, and a process that has not warned yet."""
    monkeypatch.setattr(precision, "_warned", set())
    monkeypatch.setattr(precision, "on_accelerator", lambda backend: False)

    def set_flags(flags):
        monkeypatch.setattr(precision, "cpu_flags", lambda: flags)

    return set_flags


def _built(policy, count=1):
    """The PrecisionWarnings that building `count` tiny models under `policy` raises."""
    with warnings.catch_warnings(record=True) as caught, global_dtype_policy(policy):
        warnings.simplefilter("always")
        for _ in range(count):
            tiny_model()
    return [w for w in caught if issubclass(w.category, ks.PrecisionWarning)]


def test_building_under_a_slow_policy_warns_once_at_the_callers_line(cpu):
    cpu(AVX2)
    assert _built("float32") == []
    caught = _built("mixed_bfloat16", count=2)
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert "computes in bfloat16" in message and "set_dtype_policy('float32')" in message
    assert caught[0].filename.endswith("conftest.py")  # the first frame outside keras_sequencer and Keras
    assert _built("mixed_bfloat16") == []  # once per process
    assert len(_built("mixed_float16")) == 1  # another dtype, another reason


def test_a_cpu_with_bfloat16_instructions_warns_only_under_xla(cpu):
    cpu(BF16)
    caught = _built("mixed_bfloat16")
    if BACKEND == "jax":
        assert len(caught) == 1 and "XLA" in str(caught[0].message)
    else:
        assert caught == []


def test_a_cpu_with_float16_instructions_warns_except_under_xla(cpu):
    cpu(FP16)
    caught = _built("mixed_float16")
    if BACKEND == "jax":
        assert caught == []
    else:
        assert len(caught) == 1 and "even on CPUs with AVX512-FP16" in str(caught[0].message)
    assert (len(_built("mixed_bfloat16")) == 1) == (BACKEND == "jax")


def test_loading_a_bfloat16_model_warns(cpu, tmp_path):
    cpu(AVX2)
    with global_dtype_policy("mixed_bfloat16"), pytest.warns(ks.PrecisionWarning):
        tiny_model().save(tmp_path / "m.keras")
    precision._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = keras.saving.load_model(tmp_path / "m.keras")  # under the float32 global policy
    assert model.layers[-2].compute_dtype == "bfloat16"
    assert [w for w in caught if issubclass(w.category, ks.PrecisionWarning)]
