"""16-bit dtype policies on a CPU: the rule for when float32 is faster, and the once-per-process warning."""

import os
import warnings

from conftest import BACKEND, ONE_BLOCK, global_dtype_policy, perturb_weights, tiny_model
import keras
import numpy as np
import pytest

import keras_sequencer as ks
from keras_sequencer import precision
from keras_sequencer.layers.rnn import Float32Orthogonal

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
    for flags in (FP16, AMX):  # with float16 instructions every backend still loses
        assert "slower than float32 even on CPUs with AVX512-FP16" in reason("float16", flags)
        assert ("XLA" in reason("float16", flags)) == (backend == "jax")
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
    identity = precision.cpu_identity()
    if "\nvendor_id" not in text:
        assert identity is None
    else:  # the first processor's vendor and family
        vendor, family = identity
        assert f"vendor_id\t: {vendor}\n" in text and f"cpu family\t: {family}\n" in text


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


def test_a_cpu_with_float16_instructions_still_warns_about_float16(cpu):
    cpu(FP16)
    caught = _built("mixed_float16")
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


# === Pure 16-bit policies: 16-bit variables ===


def test_a_pure_bfloat16_policy_builds_predicts_trains_and_reloads_near_float32(tmp_path):
    """Under "bfloat16" every variable is 16-bit, the recurrent kernels' orthogonal start included (a QR
    decomposition, which has no 16-bit CPU kernel on any backend). The model computes what the float32 model
    with the same weights computes, to bfloat16 rounding, trains, and reloads from a `.keras` file."""
    keras.utils.set_random_seed(3)
    options = {"weights": None, "classes": 10, "classifier_activation": None}
    reference = perturb_weights(ks.Sequencer2D(**ONE_BLOCK, **options), seed=3)
    rng = np.random.default_rng(0)
    images = (rng.normal(size=(4, 32, 32, 3)) * 50 + 120).astype("float32")
    labels = rng.integers(0, 10, 4)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    reference.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss)
    with warnings.catch_warnings(), global_dtype_policy("bfloat16"):
        warnings.simplefilter("ignore", ks.PrecisionWarning)  # whether 16 bits are slow here is another test's
        model = ks.Sequencer2D(**ONE_BLOCK, **options)
        assert {v.dtype for v in model.weights} == {"bfloat16"}
        model.set_weights(reference.get_weights())
        before = [np.asarray(w, "float32") for w in model.get_weights()]
        logits = np.asarray(model.predict(images, verbose=0), "float32")
        expected = reference.predict(images, verbose=0)
        np.testing.assert_allclose(logits, expected, atol=0.05 * np.abs(expected).max())  # measured: 0.012-0.017
        np.testing.assert_array_equal(logits.argmax(-1), expected.argmax(-1))

        model.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss)
        first_loss = float(np.asarray(model.train_on_batch(images, labels)))
        np.testing.assert_allclose(first_loss, float(np.asarray(reference.test_on_batch(images, labels))), rtol=0.02)
        assert {v.dtype for v in model.weights} == {"bfloat16"}
        moved = [not np.array_equal(np.asarray(after, "float32"), was)
                 for after, was in zip(model.get_weights(), before, strict=True)]  # fmt: skip
        assert np.mean(moved) > 0.75, moved  # an update below a weight's bfloat16 step is lost
        assert float(np.asarray(model.test_on_batch(images, labels))) < first_loss
        model.save(tmp_path / "m.keras")
    restored = keras.saving.load_model(tmp_path / "m.keras")  # under the float32 global policy
    assert {v.dtype for v in restored.weights} == {"bfloat16"}
    for saved, loaded in zip(model.get_weights(), restored.get_weights(), strict=True):
        np.testing.assert_array_equal(np.asarray(loaded, "float32"), np.asarray(saved, "float32"))


@pytest.mark.parametrize("policy", ["bfloat16", "float16"])
def test_pure_16_bit_policies_build_16_bit_variables(policy):
    with warnings.catch_warnings(), global_dtype_policy(policy):
        warnings.simplefilter("ignore", ks.PrecisionWarning)
        model = ks.Sequencer2D(**ONE_BLOCK, weights=None, classes=10)
    assert {v.dtype for v in model.weights} == {policy}
    backbone = ks.Sequencer2DBackbone(**ONE_BLOCK, dtype=policy)  # keras-hub's way to ask for the dtype
    assert {v.dtype for v in backbone.weights} == {policy}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_the_recurrent_initializer_is_kerass_orthogonal_computed_in_float32(dtype):
    shape = (6, 24)  # an LSTM's recurrent kernel: units x 4 units
    values = Float32Orthogonal(seed=5)(shape, dtype=dtype)
    assert keras.backend.standardize_dtype(values.dtype) == dtype
    expected = keras.initializers.Orthogonal(seed=5)(shape, dtype="float32")
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(keras.ops.cast(values, "float32")),
        keras.ops.convert_to_numpy(keras.ops.cast(keras.ops.cast(expected, dtype), "float32")),
    )
    rows = keras.ops.convert_to_numpy(expected)
    np.testing.assert_allclose(rows @ rows.T, np.eye(6), atol=1e-5)  # orthonormal rows


@pytest.mark.parametrize("rnn_type", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_seeded_recurrent_layers_start_with_kerass_own_weights(rnn_type, bidirectional):
    """The float32 initializer changes no seeded start: the same weights as Keras' layers with its defaults."""
    from keras_sequencer.layers.rnn import _RNN_LAYERS, sequence_layer

    def built(make):
        keras.utils.set_random_seed(0)
        layer = make()
        layer.build((2, 5, 3))
        return [keras.ops.convert_to_numpy(w) for w in layer.weights]

    def plain():
        cls = getattr(keras.layers, _RNN_LAYERS[rnn_type])
        rnn = cls(4, return_sequences=True, name="r" if bidirectional else "x")
        return keras.layers.Bidirectional(rnn, name="x") if bidirectional else rnn

    ours, keras_own = built(lambda: sequence_layer(rnn_type, 4, bidirectional, name="x")), built(plain)
    assert len(ours) == len(keras_own)
    for found, expected in zip(ours, keras_own, strict=True):
        np.testing.assert_array_equal(found, expected)
