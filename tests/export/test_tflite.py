"""TFLite export checked in its own runtime (LiteRT, ai-edge-litert): every lowering and quantisation."""

import collections
import functools

from conftest import IN_PROCESS_CONVERTERS, TINY, random_images, tiny_model, to_numpy
import keras
import numpy as np

import keras_sequencer as ks
from keras_sequencer.export import export, op_histogram, run_tflite, tflite_interpreter

pytestmark = IN_PROCESS_CONVERTERS
NOT_BUILTIN = ("CUSTOM", "DELEGATE")


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


def test_tflite_lowerings_are_builtin_and_match_keras(tmp_path):
    # Non-square with a batch of 2: the unrolled lowering's vertical and horizontal pairs advance separately
    # and its batch>1 layout is used; a swapped axis or direction would show.
    model = tiny_model(input_shape=(32, 48, 3))
    images = random_images(2, 32, seed=1, width=48)
    expected = to_numpy(model.predict_on_batch(images))
    directions = 4 * sum(TINY["layers"])  # v/h x fwd/bwd per block
    cases = {  # lstm -> (the op that must carry the recurrence, its count)
        "unrolled": ("BATCH_MATMUL", None),
        "while": ("WHILE", directions),
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
    assert export(model, str(tmp_path / "auto.tflite"))["lstm"] == "unrolled"


def test_tflite_unrolled_square_batch_one_matches_keras(tmp_path):
    """The layout the default export takes for square images at batch 1: all four directions in one step."""
    model = tiny_model(input_shape=(32, 32, 3), seed=2)
    images = random_images(1, 32, seed=3)
    report = export(model, str(tmp_path / "model.tflite"))
    # Maps 8x8 (2 blocks), 4x4, 4x4: one matmul per step after the first, for all four directions at once.
    assert report["lstm"] == "unrolled" and report["ops"]["BATCH_MATMUL"] == 2 * 7 + 3 + 3, report["ops"]
    first, second = _invoke_twice_without_reset(str(tmp_path / "model.tflite"), images)
    expected = to_numpy(model.predict_on_batch(images))
    np.testing.assert_allclose(first, expected, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(first, second)


def test_tflite_float16_halves_the_weights(tmp_path):
    # Wide enough that the converter stores the weights in float16 (it skips small tensors).
    model = ks.Sequencer2D(layers=(1, 1), patch_sizes=(4, 1), embed_dims=(64, 64), hidden_sizes=(32, 32),
                           weights=None, input_shape=(32, 32, 3), classes=10, classifier_activation=None)  # fmt: skip
    images = random_images(1, 32, seed=1)
    sizes = {}
    for quantize in (None, "float16"):
        path = str(tmp_path / f"{quantize}.tflite")
        report = export(model, path, quantize=quantize)
        np.testing.assert_allclose(
            run_tflite(tflite_interpreter(path), images), to_numpy(model.predict_on_batch(images)), rtol=0,
            atol=1e-4 if quantize is None else 1e-2,
        )  # fmt: skip
        sizes[quantize] = report["bytes"]
        first, second = _invoke_twice_without_reset(path, images)
        np.testing.assert_array_equal(first, second)
    assert sizes[None] - sizes["float16"] > 1.8 * model.count_params(), sizes


@functools.cache
def _fashion_model():
    """A small Sequencer2D trained for two epochs on real Fashion-MNIST images (28x28x1, 0-255 in)."""
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
        first, second = _invoke_twice_without_reset(path, x_test[:1])
        np.testing.assert_array_equal(first, second)
    # Full integer: the recurrences' and the projections' matmuls themselves run in int8, as fully-connected
    # layers (XNNPACK has no int8 batch matmul).
    interpreter = tflite_interpreter(str(tmp_path / "int8.tflite"), delegate=False)
    tensors = {t["index"]: t["dtype"] for t in interpreter.get_tensor_details()}
    kinds = collections.Counter(
        (op["op_name"], tensors[op["inputs"][0]].__name__)
        for op in interpreter._get_ops_details()
        if op["op_name"] in ("BATCH_MATMUL", "FULLY_CONNECTED", "CONV_2D")
    )
    assert set(kinds) == {("FULLY_CONNECTED", "int8"), ("CONV_2D", "int8")}, kinds
