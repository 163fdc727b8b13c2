"""ONNX export: tf2onnx on the `Bidirectional(LSTM)` path, which it maps to native ONNX `LSTM` ops."""

import contextlib
import os

import keras

from keras_sequencer.layers import token_mixing


def to_onnx(model: keras.Model, shape: tuple, output: str) -> int:
    """Writes `model` as an ONNX file taking `shape` (batch None); returns its size in bytes."""
    try:
        import tf2onnx  # noqa: F401
    except ImportError as error:
        raise ImportError("ONNX export needs tf2onnx and onnx: pip install 'keras-sequencer[export]'") from error
    with token_mixing.use_path("keras"), _normalization_as_constants(model):
        model.export(output, format="onnx", input_signature=[keras.InputSpec(shape=shape, dtype="float32")],
                     verbose=False)  # fmt: skip
    import onnx

    inputs = [i.name for i in onnx.load(output, load_external_data=False).graph.input]
    if len(inputs) != 1:
        os.remove(output)
        raise ValueError(f"The ONNX graph has inputs {inputs}, expected only the image; please report this.")
    return os.path.getsize(output)


@contextlib.contextmanager
def _normalization_as_constants(model):
    """Normalization layers with NumPy statistics while tracing for tf2onnx.

    Keras keeps a Normalization's given mean/variance as eager tensors, which a
    traced function captures as extra inputs; tf2onnx then makes them graph
    inputs the user would have to feed. NumPy values become graph constants.
    """
    layers = [layer for layer in _all_layers(model) if isinstance(layer, keras.layers.Normalization)]
    saved = [(layer.mean, layer.variance) for layer in layers]
    try:
        for layer in layers:
            layer.mean = keras.ops.convert_to_numpy(layer.mean)
            layer.variance = keras.ops.convert_to_numpy(layer.variance)
        yield
    finally:
        for layer, (mean, variance) in zip(layers, saved, strict=True):
            layer.mean, layer.variance = mean, variance


def _all_layers(layer):
    yield layer
    for sub in getattr(layer, "layers", ()):
        yield from _all_layers(sub)
