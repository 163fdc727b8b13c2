"""Exports checked by their own runtimes: LiteRT (ai-edge-litert), onnxruntime, a reloaded SavedModel.

The converters are TensorFlow's whatever the Keras backend, so the format checks
run in the tensorflow pass; `test_export_from_this_backend` runs in every pass
(on JAX and PyTorch `export()` converts in a TensorFlow subprocess).
"""

import collections
import functools
import os
import subprocess
import sys

from conftest import BACKEND, REPO, TINY, to_numpy
import keras
import numpy as np
import pytest

import keras_sequencer as ks
from keras_sequencer.export import export, op_histogram, run_tflite, tflite_interpreter

CONVERTERS_RUN_ON_TENSORFLOW = pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="TensorFlow's converters do the work whatever the backend: checked once, in the tensorflow pass "
    "(test_export_from_this_backend covers this backend's route)",
)
NOT_BUILTIN = ("CUSTOM", "DELEGATE")


def _tiny(input_shape=(32, 32, 3), seed=0):
    keras.utils.set_random_seed(seed)
    model = ks.Sequencer2D(**TINY, weights=None, input_shape=input_shape, classes=10, classifier_activation=None)
    # Random init leaves LayerNorm and biases at 1 / 0: perturb every weight so nothing hides.
    rng = np.random.default_rng(seed)
    model.set_weights([w + rng.normal(0, 0.05, w.shape).astype(w.dtype) for w in model.get_weights()])
    return model


def _images(n, size=32, seed=1):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


def _assert_builtin(ops):
    assert not [op for op in ops if op.startswith("Flex") or op in NOT_BUILTIN], ops


def _invoke_twice_without_reset(path, images):
    """Two plain `invoke()` calls on one interpreter, as deployment code does them."""
    interpreter = tflite_interpreter(path)
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    results = []
    for _ in range(2):
        interpreter.set_tensor(inp["index"], images)
        interpreter.invoke()
        results.append(interpreter.get_tensor(out["index"]).copy())
    return results


@CONVERTERS_RUN_ON_TENSORFLOW
def test_tflite_lowerings_are_builtin_and_match_keras(tmp_path):
    model = _tiny()
    images = _images(2)
    expected = to_numpy(model.predict_on_batch(images))
    directions = 4 * sum(TINY["layers"])  # v/h x fwd/bwd per block
    cases = {  # lstm -> (the op that must carry the recurrence, its count)
        "while": ("WHILE", directions),
        "unrolled": ("BATCH_MATMUL", None),
        "fused": ("UNIDIRECTIONAL_SEQUENCE_LSTM", directions),
    }
    for lstm, (op, count) in cases.items():
        path = str(tmp_path / f"{lstm}.tflite")
        report = export(model, path, batch_size=2, lstm=lstm)
        ops = op_histogram(open(path, "rb").read())
        assert report["ops"] == ops and report["lstm"] == lstm
        _assert_builtin(ops)
        assert op in ops and (count is None or ops[op] == count), (lstm, ops)
        assert not {"WHILE", "UNIDIRECTIONAL_SEQUENCE_LSTM"} & (ops.keys() - {op}), (lstm, ops)
        np.testing.assert_allclose(run_tflite(tflite_interpreter(path), images), expected, rtol=0, atol=1e-4)
        first, second = _invoke_twice_without_reset(path, images)
        np.testing.assert_allclose(first, expected, rtol=0, atol=1e-4)
        if lstm == "fused":  # TFLite's LSTM kernel starts the next call from the last state (documented)
            assert np.abs(second - expected).max() > 1e-3
        else:
            np.testing.assert_allclose(second, expected, rtol=0, atol=1e-4)
    assert export(model, str(tmp_path / "auto.tflite"))["lstm"] == "while"


@CONVERTERS_RUN_ON_TENSORFLOW
def test_tflite_float16_halves_the_weights(tmp_path):
    # Wide enough that the converter stores the weights in float16 (it skips small tensors).
    model = ks.Sequencer2D(layers=(1, 1), patch_sizes=(4, 1), embed_dims=(64, 64), hidden_sizes=(32, 32),
                           weights=None, input_shape=(32, 32, 3), classes=10, classifier_activation=None)  # fmt: skip
    images = _images(1)
    sizes = {}
    for quantize in (None, "float16"):
        path = str(tmp_path / f"{quantize}.tflite")
        report = export(model, path, quantize=quantize)
        np.testing.assert_allclose(
            run_tflite(tflite_interpreter(path), images), to_numpy(model.predict_on_batch(images)), rtol=0,
            atol=1e-4 if quantize is None else 1e-2,
        )  # fmt: skip
        sizes[quantize] = report["bytes"]
    assert sizes[None] - sizes["float16"] > 1.8 * model.count_params(), sizes


@functools.cache
def _fashion_model():
    """A small Sequencer2D trained briefly on real Fashion-MNIST images (28x28x1, 0-255 in)."""
    from keras_sequencer.data import load_fashion_mnist

    (x_train, y_train), (x_test, y_test) = load_fashion_mnist()
    keras.utils.set_random_seed(0)
    images = keras.Input((28, 28, 1))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(images)
    model = ks.Sequencer2D(layers=(1, 1), patch_sizes=(4, 1), embed_dims=(32, 32), hidden_sizes=(8, 8),
                           input_tensor=x, include_preprocessing=False, classes=10, classifier_activation=None,
                           weights=None)  # fmt: skip
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])  # fmt: skip
    model.fit(x_train[:20000].astype("float32"), y_train[:20000], batch_size=64, epochs=2, verbose=0)
    return model, x_train[20000:20064].astype("float32"), x_test[:400].astype("float32"), y_test[:400]


@CONVERTERS_RUN_ON_TENSORFLOW
def test_tflite_int8_and_dynamic_agree_with_float_on_fashion_mnist(tmp_path):
    model, calibration, x_test, y_test = _fashion_model()
    reference = to_numpy(model.predict(x_test, batch_size=100, verbose=0)).argmax(-1)
    assert (reference == y_test).mean() > 0.75  # a model that learned something real
    for quantize in ("int8", "dynamic"):
        path = str(tmp_path / f"{quantize}.tflite")
        export(model, path, quantize=quantize, calibration=calibration if quantize == "int8" else None)
        interpreter = tflite_interpreter(path)
        got = np.array([run_tflite(interpreter, image[None])[0].argmax() for image in x_test])
        agreement = (got == reference).mean()
        assert agreement >= 0.98, f"{quantize}: top-1 agrees with float32 on {agreement:.1%} of images"
        _assert_builtin(op_histogram(open(path, "rb").read()))
    # Full integer: the recurrences' and the projections' matmuls themselves run in int8.
    interpreter = tflite_interpreter(str(tmp_path / "int8.tflite"), delegate=False)
    tensors = {t["index"]: t["dtype"] for t in interpreter.get_tensor_details()}
    kinds = collections.Counter(
        (op["op_name"], tensors[op["inputs"][0]].__name__)
        for op in interpreter._get_ops_details()
        if op["op_name"] in ("BATCH_MATMUL", "FULLY_CONNECTED", "CONV_2D")
    )
    assert set(kinds) == {("BATCH_MATMUL", "int8"), ("FULLY_CONNECTED", "int8"), ("CONV_2D", "int8")}, kinds


@CONVERTERS_RUN_ON_TENSORFLOW
def test_onnx_has_native_lstms_and_a_dynamic_batch(tmp_path):
    import onnx
    import onnxruntime

    model = _tiny()
    path = str(tmp_path / "model.onnx")
    export(model, path, format="onnx")
    graph = onnx.load(path).graph
    kinds = collections.Counter(node.op_type for node in graph.node)
    assert kinds["LSTM"] >= 2 * sum(TINY["layers"]) and not kinds.keys() & {"Loop", "Scan"}, kinds
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    for batch in (1, 3):
        images = _images(batch, seed=batch)
        got = session.run(None, {name: images})[0]
        np.testing.assert_allclose(got, to_numpy(model.predict_on_batch(images)), rtol=0, atol=1e-4)


@CONVERTERS_RUN_ON_TENSORFLOW
def test_saved_model_reloads_and_serves_any_batch(tmp_path):
    import tensorflow as tf

    model = _tiny()
    export(model, str(tmp_path / "saved"), format="saved_model")
    reloaded = tf.saved_model.load(str(tmp_path / "saved"))
    for batch in (1, 4):
        images = _images(batch, seed=batch)
        np.testing.assert_allclose(
            reloaded.serve(images).numpy(), to_numpy(model.predict_on_batch(images)), rtol=0, atol=1e-5
        )


@CONVERTERS_RUN_ON_TENSORFLOW
def test_cli_exports_a_keras_file(tmp_path):
    model = _tiny(input_shape=(None, None, 3))
    model.save(tmp_path / "model.keras")
    env = {**os.environ, "KERAS_BACKEND": BACKEND, "TF_CPP_MIN_LOG_LEVEL": "3"}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "keras_sequencer", "export", str(tmp_path / "model.keras"),
                               *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)  # fmt: skip

    result = cli("--output", str(tmp_path / "m.tflite"))
    assert result.returncode == 2 and "--input-size" in result.stderr, result.stderr[-2000:]
    result = cli("--input-size", "32", "40", "--lstm", "fused", "--output", str(tmp_path / "m.tflite"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{4 * sum(TINY['layers'])}  UNIDIRECTIONAL_SEQUENCE_LSTM" in result.stdout, result.stdout
    images = np.random.default_rng(0).uniform(0, 255, (1, 32, 40, 3)).astype("float32")
    got = run_tflite(tflite_interpreter(str(tmp_path / "m.tflite")), images)
    np.testing.assert_allclose(got, to_numpy(model.predict_on_batch(images)), rtol=0, atol=1e-4)


def test_export_from_this_backend(tmp_path):
    # A non-square size, so the vertical and horizontal LSTMs cannot be swapped unnoticed.
    model = _tiny(input_shape=(32, 48, 3), seed=3)
    images = np.random.default_rng(2).uniform(0, 255, (1, 32, 48, 3)).astype("float32")
    report = export(model, str(tmp_path / "model.tflite"))
    assert report["input_shape"] == [1, 32, 48, 3]
    assert report["ops"]["WHILE"] == 4 * sum(TINY["layers"]) and report["lstm"] == "while"
    got = run_tflite(tflite_interpreter(str(tmp_path / "model.tflite")), images)
    np.testing.assert_allclose(got, to_numpy(model.predict_on_batch(images)), rtol=0, atol=1e-4)


def test_bad_requests_say_what_to_pass(tmp_path):
    out = str(tmp_path / "m.tflite")
    any_size = _tiny(input_shape=(None, None, 3))
    with pytest.raises(ValueError, match=r"takes any image size.*input_size=\(height, width\)"):
        export(any_size, out)
    with pytest.raises(ValueError, match="built for height 32, but input_size asks for 64"):
        export(_tiny(), out, input_size=(64, 32))
    with pytest.raises(ValueError, match="below the model's minimum 8x8"):
        export(any_size, out, input_size=(4, 32))
    with pytest.raises(ValueError, match="`format` must be one of"):
        export(any_size, out, format="coreml", input_size=(32, 32))
    with pytest.raises(ValueError, match="`quantize` applies to TFLite only"):
        export(any_size, out, format="onnx", quantize="int8", input_size=(32, 32))
    with pytest.raises(ValueError, match="pass `calibration`"):
        export(any_size, out, quantize="int8", input_size=(32, 32))
    assert not os.path.exists(out)


@CONVERTERS_RUN_ON_TENSORFLOW
def test_example_script_prints_its_table(tmp_path):
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "examples/export_tflite.py", "--size", "32", "--variants", "float32", "fused", "--runs", "1",
         "--threads", "1", "--output", str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {
        line.split()[0]: line.split() for line in result.stdout.splitlines() if line.startswith(("float32 ", "fused "))
    }
    assert rows["float32"][1] == "while" and rows["fused"][1] == "fused", result.stdout
    for row in rows.values():
        assert float(row[5]) <= 1e-4 and row[6] == "yes", row
    assert "UNIDIRECTIONAL_SEQUENCE_LSTM x72" in result.stdout
