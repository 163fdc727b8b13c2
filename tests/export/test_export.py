"""`export()` from this process' backend: on JAX and PyTorch it converts in a TensorFlow subprocess.

Requests are validated before any conversion; errors raised in the subprocess
come back as the same error type with the same message.
"""

import os

from conftest import BACKEND, tiny_model, to_numpy
import numpy as np
import pytest

from keras_sequencer.export import export, run_tflite, tflite_interpreter


def test_export_from_this_backend(tmp_path):
    # A non-square size, so the vertical and horizontal LSTMs cannot be swapped unnoticed.
    model = tiny_model(input_shape=(32, 48, 3), seed=3)
    images = np.random.default_rng(2).uniform(0, 255, (1, 32, 48, 3)).astype("float32")
    report = export(model, str(tmp_path / "model.tflite"))
    assert report["input_shape"] == [1, 32, 48, 3]
    # Maps 8x12 (2 blocks), 4x6, 4x6: per layer (8 - 1) + (12 - 1) or (4 - 1) + (6 - 1) recurrent matmuls.
    assert report["ops"]["BATCH_MATMUL"] == 2 * 18 + 8 + 8 and report["lstm"] == "unrolled", report["ops"]
    got = run_tflite(tflite_interpreter(str(tmp_path / "model.tflite")), images)
    np.testing.assert_allclose(got, to_numpy(model.predict_on_batch(images)), rtol=0, atol=1e-4)


def test_a_model_built_under_a_mixed_policy_exports_computing_in_float32(tmp_path):
    """Before, TensorFlow's converter failed with a dump of float16 ops (ERROR_NEEDS_FLEX_OPS)."""
    import keras

    keras.config.set_dtype_policy("mixed_float16")
    try:
        mixed = tiny_model(input_shape=(32, 32, 3), seed=4)
        assert "float16" in {layer.compute_dtype for layer in mixed.layers}
        mixed.save(tmp_path / "mixed.keras")
    finally:
        keras.config.set_dtype_policy("float32")
    reference = tiny_model(input_shape=(32, 32, 3))
    reference.set_weights(mixed.get_weights())  # a mixed policy keeps its variables in float32
    images = np.random.default_rng(5).uniform(0, 255, (1, 32, 32, 3)).astype("float32")
    expected = to_numpy(reference.predict_on_batch(images))
    # Off TensorFlow the model object itself reaches the converter as a .keras file: one export covers both.
    for source in (mixed, str(tmp_path / "mixed.keras")) if BACKEND == "tensorflow" else (mixed,):
        report = export(source, str(tmp_path / "m.tflite"))
        assert report["input_shape"] == [1, 32, 32, 3]
        got = run_tflite(tflite_interpreter(str(tmp_path / "m.tflite")), images)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_bad_requests_say_what_to_pass(tmp_path):
    out = str(tmp_path / "m.tflite")
    any_size = tiny_model(input_shape=(None, None, 3))
    with pytest.raises(ValueError, match=r"takes any image size.*input_size=\(height, width\)"):
        export(any_size, out)
    with pytest.raises(ValueError, match="built for height 32, but input_size asks for 64"):
        export(tiny_model(input_shape=(32, 32, 3)), out, input_size=(64, 32))
    with pytest.raises(ValueError, match="below the model's minimum 8x8"):
        export(any_size, out, input_size=(4, 32))
    with pytest.raises(ValueError, match="`format` must be one of"):
        export(any_size, out, format="coreml", input_size=(32, 32))
    with pytest.raises(ValueError, match="`quantize` applies to TFLite only"):
        export(any_size, out, format="onnx", quantize="int8", input_size=(32, 32))
    with pytest.raises(ValueError, match="pass `calibration`"):
        export(any_size, out, quantize="int8", input_size=(32, 32))
    assert not os.path.exists(out)


def test_errors_found_during_conversion_come_back_as_themselves(tmp_path):
    """A `.keras` path is only opened where the conversion runs (a TensorFlow subprocess on JAX and PyTorch):
    its ValueError still reaches the caller as a ValueError with the message, and nothing is written."""
    tiny_model(input_shape=(None, None, 3)).save(tmp_path / "any_size.keras")
    with pytest.raises(ValueError, match=r"takes any image size.*input_size=\(height, width\)"):
        export(str(tmp_path / "any_size.keras"), str(tmp_path / "m.tflite"))
    assert not os.path.exists(tmp_path / "m.tflite")


def test_numpy_sizes_are_taken_and_bad_sizes_refused(tmp_path):
    """`input_size` from NumPy (e.g. an array's shape) works from every backend; a wrong one is refused at once."""
    model = tiny_model(input_shape=(None, None, 3))
    report = export(model, str(tmp_path / "m.tflite"), input_size=np.array([32, 40]))
    assert report["input_shape"] == [1, 32, 40, 3]
    for bad in ((32,), (32, 0), (32.0, 40)):
        with pytest.raises(ValueError, match=r"`input_size` must be \(height, width\), positive ints"):
            export(model, str(tmp_path / "bad.tflite"), input_size=bad)
