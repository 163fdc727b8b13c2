"""TensorFlow SavedModel export (TF Serving): signature `serve`, any batch."""

import os

import keras


def to_saved_model(model: keras.Model, shape: tuple, output: str) -> int:
    """Writes `model` as a SavedModel folder taking `shape` (batch None); returns its size in bytes."""
    signature = [keras.InputSpec(shape=shape, dtype="float32")]
    model.export(output, format="tf_saved_model", input_signature=signature, verbose=False)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(output) for f in files)
