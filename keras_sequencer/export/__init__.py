"""Export a Sequencer2D to TFLite (LiteRT), ONNX or a TensorFlow SavedModel.

All three formats are produced by TensorFlow's converters, so the conversion
itself runs on the TensorFlow backend. `export()` works from every backend:
on JAX or PyTorch it hands the model (as a `.keras` file, which is backend
independent) to a TensorFlow subprocess (`worker.py`), so the result is the
same file.

- TFLite (`tflite.py`): builtin ops only (never Flex or custom ops, checked);
  a static input shape `(batch_size, height, width, 3)`; quantisation `None`
  (float32), `"float16"` (float16 weights), `"dynamic"` (int8 weights, float
  activations) or `"int8"` (int8 weights and activations calibrated on
  `calibration` images; float32 input and output tensors); three lowerings of
  the LSTMs (`lstm=`), see `tflite.py`. `litert.py` runs the files.
- ONNX (`onnx.py`): native ONNX `LSTM` ops; the batch axis is dynamic.
- SavedModel (`saved_model.py`): for TF Serving, signature `serve`, dynamic batch.
"""

import numbers
import os

import keras
import numpy as np

from keras_sequencer import pretrained
from keras_sequencer.export.litert import op_histogram, run_tflite, tflite_interpreter
from keras_sequencer.export.onnx import to_onnx
from keras_sequencer.export.saved_model import to_saved_model
from keras_sequencer.export.tflite import LOWERINGS, QUANTIZATIONS, load_calibration, resolve_lowering, to_tflite
from keras_sequencer.export.worker import export_in_tensorflow

FORMATS = ("tflite", "onnx", "saved_model")
__all__ = ["FORMATS", "LOWERINGS", "QUANTIZATIONS", "export", "load_calibration", "op_histogram", "run_tflite",
           "tflite_interpreter"]  # fmt: skip


def export(
    model,
    output: str,
    format: str = "tflite",
    input_size=None,
    batch_size: int = 1,
    quantize: str | None = None,
    calibration=None,
    lstm: str = "auto",
) -> dict:
    """Exports a Sequencer2D (or any Keras model built from this package's layers).

    Args:
        model: a `keras.Model`, or the path of a `.keras` file. A model built
            under a mixed policy (`mixed_float16`, `mixed_bfloat16`) is
            exported computing in float32, over its float32 variables.
        output: file to write (`.tflite`, `.onnx`) or folder (`saved_model`).
        format: `"tflite"`, `"onnx"` or `"saved_model"`.
        input_size: `(height, width)` of the exported input. Required when the
            model was built with `input_shape=(None, None, 3)`; when the
            model has a fixed size it must match (or be left out).
        batch_size: the fixed batch of a TFLite model (ONNX and SavedModel
            take any batch).
        quantize: TFLite only: `None`, `"float16"`, `"dynamic"` or `"int8"`.
        calibration: `"int8"` only: images `(n, height, width, 3)` as the model
            takes them (RGB, 0-255 for a model with preprocessing), at least 8.
        lstm: TFLite only, how each BiLSTM2D is lowered: `"unrolled"` (a
            flat graph for XNNPACK: per time step one batched
            matmul for all four directions, or per pair on non-square
            maps), `"while"` (a builtin WHILE loop per
            direction), `"fused"` (`UNIDIRECTIONAL_SEQUENCE_LSTM` kernels;
            STATEFUL, see `keras_sequencer.export.tflite`) or `"auto"`
            (`"unrolled"`).

    Returns:
        A dict: `path`, `format`, `bytes`, `input_shape`, and for TFLite
        `ops` (op name -> count), `quantize` and the `lstm` lowering used.

    Raises:
        ValueError: an unknown format or quantisation, a missing or
            mismatched input size, missing calibration data, or a TFLite
            graph that would need Flex/custom ops.
    """
    if format not in FORMATS:
        raise ValueError(f"`format` must be one of {FORMATS}. Received: format={format!r}")
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"`quantize` must be one of {QUANTIZATIONS}. Received: quantize={quantize!r}")
    if quantize is not None and format != "tflite":
        raise ValueError(f"`quantize` applies to TFLite only. Received: format={format!r}, quantize={quantize!r}")
    if lstm not in LOWERINGS:
        raise ValueError(f"`lstm` must be one of {LOWERINGS}. Received: lstm={lstm!r}")
    if lstm != "auto" and format != "tflite":
        raise ValueError(f"`lstm` chooses the TFLite lowering. Received: format={format!r}, lstm={lstm!r}")
    if input_size is not None:
        if len(input_size) != 2 or not all(isinstance(s, numbers.Integral) and s > 0 for s in input_size):
            raise ValueError(f"`input_size` must be (height, width), positive ints. Received: {input_size!r}")
        input_size = (int(input_size[0]), int(input_size[1]))  # NumPy integers too
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int. Received: batch_size={batch_size!r}")
    if quantize == "int8":
        if calibration is None:
            raise ValueError(
                "quantize='int8' calibrates activations on real inputs: pass `calibration`, an array of "
                "images shaped (n, height, width, 3) as the model takes them (n >= 8)."
            )
        calibration = np.asarray(calibration, dtype="float32")
        if calibration.ndim != 4 or calibration.shape[0] < 8:
            raise ValueError(
                "`calibration` must be images shaped (n, height, width, channels) with n >= 8. "
                f"Received: shape={calibration.shape}"
            )
    if keras.backend.backend() != "tensorflow":
        if isinstance(model, keras.Model):
            _input_size(model, input_size)  # its errors here, before a subprocess starts
        else:
            pretrained.check_keras_file(model)
        return export_in_tensorflow(
            model, output, format=format, input_size=input_size, batch_size=batch_size, quantize=quantize,
            calibration=calibration, lstm=lstm,
        )  # fmt: skip

    if isinstance(model, str | os.PathLike):
        model = pretrained.load_keras_model(model)
    height, width, channels = _input_size(model, input_size)
    if calibration is not None and calibration.shape[1:] != (height, width, channels):
        raise ValueError(
            f"`calibration` images must be {height}x{width}x{channels} (the export size). "
            f"Received: shape={calibration.shape}"
        )
    model = _computing_in_float32(model)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    if format == "tflite":
        shape = (batch_size, height, width, channels)
        lstm = resolve_lowering(lstm, quantize)
        blob = to_tflite(model, shape, quantize, calibration, lstm)
        _write_atomic(output, blob)
        return {"path": output, "format": format, "bytes": len(blob), "input_shape": list(shape),
                "ops": op_histogram(blob), "quantize": quantize, "lstm": lstm}  # fmt: skip
    shape = (None, height, width, channels)
    if format == "onnx":
        size = to_onnx(model, shape, output)
    else:
        size = to_saved_model(model, shape, output)
    return {"path": output, "format": format, "bytes": size, "input_shape": list(shape)}


def _computing_in_float32(model):
    """`model`, or for a model built under a mixed policy its float32 twin over the same weights.

    Mixed policies keep every variable in float32 and only compute in
    float16 / bfloat16, which TFLite's builtin kernels do not take: the
    exported graph computes in float32, and a smaller file is asked for with
    `quantize`. A model whose variables are not float32 is refused.
    """
    found = set()

    def to_float32(node):
        if isinstance(node, dict):
            if node.get("class_name") == "DTypePolicy" and isinstance(node.get("config"), dict):
                found.add(node["config"].get("name"))
                return {**node, "config": {**node["config"], "name": "float32"}}
            return {key: to_float32(value) for key, value in node.items()}
        if isinstance(node, list):
            return [to_float32(value) for value in node]
        return node

    config = to_float32(keras.saving.serialize_keras_object(model))
    if found <= {"float32"} and model.dtype_policy.name == "float32":
        return model
    other = sorted({str(v.dtype) for v in model.weights} - {"float32"})
    if other:
        raise ValueError(
            f"Export takes a model with float32 variables; this one has {other} variables. Rebuild it under "
            "keras.config.set_dtype_policy('float32'), load its weights, and choose a smaller TFLite file "
            "with `quantize`."
        )
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")  # for layers that a layer creates itself
    try:
        twin = keras.saving.deserialize_keras_object(config)
    finally:
        keras.config.set_dtype_policy(policy)
    twin.set_weights(model.get_weights())
    return twin


def _input_size(model, input_size):
    shape = tuple(model.input_shape)
    if len(shape) != 4:
        raise ValueError(f"Expected a model taking (batch, height, width, channels). Received: {shape}")
    _, height, width, channels = shape
    if input_size is not None:
        for given, fixed, what in ((input_size[0], height, "height"), (input_size[1], width, "width")):
            if fixed is not None and given != fixed:
                raise ValueError(
                    f"The model was built for {what} {fixed}, but input_size asks for {given}. Leave "
                    "input_size out, or build the model with input_shape=(None, None, 3) (every "
                    "Sequencer2D weight is size independent) and load the same weights."
                )
        height, width = input_size
    if height is None or width is None:
        raise ValueError(
            f"The model takes any image size (input shape {shape}); exported graphs need one. "
            "Pass input_size=(height, width) (CLI: --input-size H W)."
        )
    minimum = getattr(model, "min_image_size", 1)
    if min(height, width) < minimum:
        raise ValueError(f"The export size {height}x{width} is below the model's minimum {minimum}x{minimum}.")
    return height, width, channels


def _write_atomic(path, blob: bytes):
    tmp = f"{path}.part"
    with open(tmp, "wb") as f:
        f.write(blob)
    os.replace(tmp, path)
