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
    guarded = _EmptyBatchGuard(model)
    guarded.build(shape)
    with token_mixing.use_path("keras"), _normalization_as_constants(model):
        guarded.export(
            output, format="onnx", input_signature=[keras.InputSpec(shape=shape, dtype="float32")], verbose=False
        )
    import onnx

    inputs = [i.name for i in onnx.load(output, load_external_data=False).graph.input]
    if len(inputs) != 1:
        os.remove(output)
        raise ValueError(f"The ONNX graph has inputs {inputs}, expected only the image; please report this.")
    return os.path.getsize(output)


class _EmptyBatchGuard(keras.Model):
    """`model`, except that a batch of 0 images gives an empty output instead of an abort.

    onnxruntime's LSTM kernel ends the whole process (C++ `terminate`) on an
    empty batch. The batch is padded with `max(1 - n, 0)` blank images (none
    unless it is empty) and the output cut back to `n` rows: two cheap
    copies, no branch, the same graph for every batch size.
    """

    def __init__(self, model):
        super().__init__(name=f"{model.name}_any_batch")
        self.model = model

    def build(self, input_shape):
        self.built = True  # `model` is built already

    def call(self, images):
        ops = keras.ops
        count = ops.shape(images)[0]
        blank = ops.zeros((ops.maximum(1 - count, 0), *images.shape[1:]), dtype=images.dtype)
        return self.model(ops.concatenate([images, blank], axis=0))[:count]


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
