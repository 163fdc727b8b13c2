"""Export a Sequencer2D to TFLite (LiteRT), ONNX or a TensorFlow SavedModel.

All three formats are produced by TensorFlow's converters, so the conversion
itself always runs on the TensorFlow backend. `export()` works from every
backend: on JAX or PyTorch it saves the model to a temporary `.keras` file and
converts it in a TensorFlow subprocess (the `.keras` format is backend
independent), so the result is the same file.

TFLite (`format="tflite"`):
- builtin ops only: the converter is never allowed Flex (SELECT_TF_OPS) or
  custom ops, and the result is checked for them;
- a static input shape, `(batch_size, height, width, 3)`;
- quantisation: `None` (float32), `"float16"` (float16 weights), `"dynamic"`
  (int8 weights, float activations), `"int8"` (int8 weights and activations
  calibrated on `calibration` images; float32 input and output tensors);
- three lowerings of the LSTMs (`lstm=`), measured for Sequencer2D-S at
  224x224, batch 1, LiteRT with 2 threads on a 2-core CPU:

  | lstm       | graph                                  | latency | stateless | int8 |
  |------------|----------------------------------------|---------|-----------|------|
  | "while"    | one builtin WHILE loop per direction   | 148 ms  | yes       | TF's quantiser crashes |
  | "unrolled" | flat: one batched matmul per step      | 186 ms  | yes       | yes  |
  | "fused"    | `UNIDIRECTIONAL_SEQUENCE_LSTM` kernels | 330 ms  | NO        | yes  |

  `"auto"` picks `"while"` for float32 and `"unrolled"` when quantising.
  `"fused"` leads the converter to TFLite's own LSTM kernel, one per
  direction (the LSTMs run through a TF function carrying the interface
  attributes the converter recognises as a Keras LSTM, which is how tf-keras
  2.x LSTMs got there; Keras 3 LSTMs never do). That kernel keeps its final
  state in variable tensors and starts the next `invoke()` from it, so every
  call after the first is wrong unless the caller runs
  `interpreter.reset_all_variables()` before each `invoke()` (`run_tflite`
  does). It is also the slowest here, hence not the default.

ONNX (`format="onnx"`): tf2onnx on the Keras `Bidirectional(LSTM)` path, which
it maps to native ONNX `LSTM` ops; the batch axis is dynamic.

SavedModel (`format="saved_model"`): Keras' `model.export(format=
"tf_saved_model")` for TF Serving, signature `serve`, dynamic batch.
"""

import contextlib
import functools
import json
import os
import subprocess
import sys
import tempfile
import uuid

import keras
import numpy as np

from keras_sequencer.layers.bilstm2d import mix_override

FORMATS = ("tflite", "onnx", "saved_model")
LOWERINGS = ("auto", "while", "unrolled", "fused")
QUANTIZATIONS = (None, "float16", "dynamic", "int8")


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
        model: a `keras.Model`, or the path of a `.keras` file.
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
        lstm: TFLite only, how each BiLSTM2D is lowered: `"while"` (a builtin
            WHILE loop per direction), `"unrolled"` (a flat graph, one batched
            step per time step), `"fused"` (`UNIDIRECTIONAL_SEQUENCE_LSTM`
            kernels; STATEFUL, see the module docstring) or `"auto"`: `"while"`
            for float32, `"unrolled"` when quantising.

    Returns:
        A dict: `path`, `format`, `bytes`, `input_shape`, and for TFLite
        `ops` (op name -> count) and `quantize`.

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
        return _export_in_tensorflow(model, output, format, input_size, batch_size, quantize, calibration, lstm)

    if isinstance(model, str | os.PathLike):
        model = keras.saving.load_model(model)
    height, width, channels = _input_size(model, input_size)
    if calibration is not None and calibration.shape[1:] != (height, width, channels):
        raise ValueError(
            f"`calibration` images must be {height}x{width}x{channels} (the export size). "
            f"Received: shape={calibration.shape}"
        )
    if model.dtype_policy.compute_dtype != "float32":
        raise ValueError(
            f"Export a float32 model (this one computes in {model.dtype_policy.compute_dtype}); "
            "TFLite quantisation is chosen with `quantize`. Rebuild the model with "
            "keras.config.set_dtype_policy('float32') and load its weights."
        )
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    if format == "tflite":
        shape = (batch_size, height, width, channels)
        if lstm == "auto":
            lstm = "while" if quantize is None else "unrolled"
        blob = _to_tflite(model, shape, quantize, calibration, lstm)
        ops = op_histogram(blob)
        _write_atomic(output, blob)
        return {"path": output, "format": format, "bytes": len(blob), "input_shape": list(shape),
                "ops": ops, "quantize": quantize, "lstm": lstm}  # fmt: skip
    shape = (None, height, width, channels)
    if format == "onnx":
        _to_onnx(model, shape, output)
        size = os.path.getsize(output)
    else:
        signature = [keras.InputSpec(shape=shape, dtype="float32")]
        model.export(output, format="tf_saved_model", input_signature=signature, verbose=False)
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(output) for f in files)
    return {"path": output, "format": format, "bytes": size, "input_shape": list(shape)}


def _input_size(model, input_size):
    shape = tuple(model.input_shape)
    if len(shape) != 4:
        raise ValueError(f"Expected a model taking (batch, height, width, channels). Received: {shape}")
    _, height, width, channels = shape
    if input_size is not None:
        if len(input_size) != 2 or not all(isinstance(s, int) and s > 0 for s in input_size):
            raise ValueError(f"`input_size` must be (height, width), positive ints. Received: {input_size!r}")
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


# ---------------------------------------------------------------------------- TFLite


@functools.cache
def _fusable_lstm():
    """A TF function with Keras' LSTM interface that the TFLite converter fuses.

    Arguments and results follow tf-keras' `standard_lstm` (the converter reads
    them by position): `(inputs, init_h, init_c, kernel, recurrent_kernel,
    bias) -> (last_output, outputs, h, c, runtime)`, batch-major, gates
    `[i, f, c, o]`. The body computes the same LSTM, for any runtime that does
    not fuse it.
    """
    import tensorflow as tf

    attributes = {"api_implements": f"lstm_{uuid.uuid4().hex}", "time_major": False, "go_backwards": False}

    @tf.function(experimental_attributes=attributes, autograph=False)
    def lstm(inputs, init_h, init_c, kernel, recurrent_kernel, bias):
        projected = tf.transpose(tf.einsum("btc,cg->btg", inputs, kernel) + bias, (1, 0, 2))

        def step(state, z):
            h, c = state
            i, f, g, o = tf.split(z + tf.matmul(h, recurrent_kernel), 4, axis=-1)
            c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
            return tf.sigmoid(o) * tf.tanh(c), c

        hs, cs = tf.scan(step, projected, initializer=(init_h, init_c))
        outputs = tf.transpose(hs, (1, 0, 2))
        return outputs[:, -1], outputs, hs[-1], cs[-1], tf.constant(0.0)

    return lstm


def _is_standard_lstm(cell) -> bool:
    return (
        isinstance(cell, keras.layers.LSTMCell)
        and cell.activation is keras.activations.tanh
        and cell.recurrent_activation is keras.activations.sigmoid
        and cell.use_bias
    )


def _tflite_mix(layer, x):
    """BiLSTM2D token mixing with one fusable LSTM call per direction (TensorFlow)."""
    import tensorflow as tf

    if not layer._standard:
        return layer._mix_keras(x)  # an ablation option: builtin WHILE loops
    wrappers = (layer.rnn_v, layer.rnn_h)
    cells = [cell for w in wrappers for cell in (w.forward_layer.cell, w.backward_layer.cell)]
    if not all(_is_standard_lstm(cell) for cell in cells):
        return layer._mix_keras(x)  # not the converter's LSTM: a builtin WHILE loop instead
    batch, height, width, channels = x.shape
    lstm = _fusable_lstm()

    def run(sequences, cell):
        zeros = tf.zeros((sequences.shape[0], cell.units), sequences.dtype)
        # Constants, not variable reads: the converter's LSTM fusion needs the weights folded
        # (TF 2.21 crashes on resource reads there).
        with tf.init_scope():  # eager, inside the trace
            values = [w.numpy() for w in (cell.kernel, cell.recurrent_kernel, cell.bias)]
        weights = [tf.constant(v) for v in values]
        return lstm(sequences, zeros, zeros, *weights)[1]

    def bidirectional(sequences, wrapper):
        forward = run(sequences, wrapper.forward_layer.cell)
        backward = tf.reverse(run(tf.reverse(sequences, [1]), wrapper.backward_layer.cell), [1])
        return tf.concat([forward, backward], axis=-1)

    units = 2 * layer.hidden_size
    columns = tf.reshape(tf.transpose(x, (0, 2, 1, 3)), (batch * width, height, channels))
    v = tf.transpose(tf.reshape(bidirectional(columns, layer.rnn_v), (batch, width, height, units)), (0, 2, 1, 3))
    h = tf.reshape(bidirectional(tf.reshape(x, (batch * height, width, channels)), layer.rnn_h),
                   (batch, height, width, units))  # fmt: skip
    return tf.concat([v, h], axis=-1)


def _unrolled_mix(layer, x):
    if not layer._standard:
        return layer._mix_keras(x)  # an ablation option: builtin WHILE loops
    return layer._mix_fused(x)  # static sizes here: the Python-unrolled batched recurrence


_TFLITE_MIX = {"while": "keras", "unrolled": _unrolled_mix, "fused": _tflite_mix}


def _to_tflite(model, shape, quantize, calibration, lstm) -> bytes:
    import tensorflow as tf

    if lstm == "while" and quantize == "int8":
        # TF 2.21's quantiser crashes the process (SIGSEGV) on WHILE bodies; refuse before it can.
        raise ValueError("quantize='int8' cannot use lstm='while' (TensorFlow's quantiser crashes on it); "
                         "use lstm='unrolled' (the default for quantised exports) or 'fused'.")  # fmt: skip

    @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32, name="images")])
    def serve(images):
        return model(images, training=False)

    with mix_override(_TFLITE_MIX[lstm]):
        concrete = serve.get_concrete_function()
        holder = tf.Module()  # gives the converter the variables (its SavedModel path keeps the LSTM functions)
        holder.serve = serve
        holder.variables_ = [v.value for v in model.variables]  # tracked, so the SavedModel path is taken
        converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], holder)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        converter.allow_custom_ops = False
        if quantize is not None:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantize == "float16":
            converter.target_spec.supported_types = [tf.float16]
        elif quantize == "int8":
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]

            def representative():
                for image in calibration:
                    yield [np.repeat(image[None], shape[0], axis=0)]

            converter.representative_dataset = representative
        blob = converter.convert()
    bad = sorted(op for op in op_histogram(blob) if op.startswith("Flex") or op in ("CUSTOM", "DELEGATE"))
    if bad:
        raise ValueError(f"The TFLite graph needs non-builtin ops {bad}; please report this with the model config.")
    return blob


def op_histogram(blob: bytes) -> dict[str, int]:
    """Op name -> count in a TFLite flatbuffer, read by the LiteRT interpreter (`ai-edge-litert`)."""
    interpreter = tflite_interpreter(blob, delegate=False)
    counts: dict[str, int] = {}
    for op in interpreter._get_ops_details():  # the only op listing LiteRT exposes
        counts[op["op_name"]] = counts.get(op["op_name"], 0) + 1
    return dict(sorted(counts.items()))


def tflite_interpreter(model, delegate: bool = True, num_threads: int | None = None):
    """A LiteRT interpreter (`ai_edge_litert`) for a `.tflite` path or flatbuffer bytes, tensors allocated.

    `delegate=False` turns XNNPACK off, so the op list is the model's own.
    """
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    except ImportError as error:
        raise ImportError("Running TFLite models needs the LiteRT interpreter: pip install ai-edge-litert") from error
    kwargs = {"model_content": model} if isinstance(model, bytes) else {"model_path": os.fspath(model)}
    if not delegate:
        kwargs["experimental_op_resolver_type"] = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    interpreter = Interpreter(num_threads=num_threads, **kwargs)
    interpreter.allocate_tensors()
    return interpreter


def run_tflite(interpreter, images) -> np.ndarray:
    """Runs a float-input TFLite classifier on a batch that matches its input shape."""
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    images = np.asarray(images, dtype=inp["dtype"])
    if tuple(images.shape) != tuple(inp["shape"]):
        raise ValueError(f"The TFLite model takes input shape {tuple(inp['shape'])}. Received: {images.shape}")
    interpreter.set_tensor(inp["index"], images)
    # A fused TFLite LSTM keeps its last state in variable tensors: start every call from zero.
    interpreter.reset_all_variables()
    interpreter.invoke()
    return interpreter.get_tensor(out["index"])


# ---------------------------------------------------------------------------- ONNX


def _to_onnx(model, shape, output):
    try:
        import tf2onnx  # noqa: F401
    except ImportError as error:
        raise ImportError("ONNX export needs tf2onnx and onnx: pip install 'keras-sequencer[export]'") from error
    # The Bidirectional(LSTM) path: tf2onnx maps Keras' LSTM loop to native ONNX LSTM ops.
    with mix_override("keras"), _normalization_as_constants(model):
        model.export(output, format="onnx", input_signature=[keras.InputSpec(shape=shape, dtype="float32")],
                     verbose=False)  # fmt: skip
    import onnx

    inputs = [i.name for i in onnx.load(output, load_external_data=False).graph.input]
    if len(inputs) != 1:
        os.remove(output)
        raise ValueError(f"The ONNX graph has inputs {inputs}, expected only the image; please report this.")


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


# ---------------------------------------------------------------------------- other backends


def _export_in_tensorflow(model, output, format, input_size, batch_size, quantize, calibration, lstm) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(model, keras.Model):
            path = os.path.join(tmp, "model.keras")
            model.save(path)
        else:
            path = os.fspath(model)
        command = [sys.executable, "-m", "keras_sequencer", "export", path, "--format", format, "--output",
                   os.path.abspath(output), "--batch", str(batch_size), "--lstm", lstm, "--json"]  # fmt: skip
        if input_size is not None:
            command += ["--input-size", *map(str, input_size)]
        if quantize is not None:
            command += ["--quantize", quantize]
        if calibration is not None:
            np.save(os.path.join(tmp, "calibration.npy"), calibration)
            command += ["--calibration", os.path.join(tmp, "calibration.npy")]
        env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
        result = subprocess.run(command, capture_output=True, text=True, env=env)
    said = [line[len("error: ") :] for line in result.stderr.splitlines() if line.startswith("error: ")]
    if result.returncode == 2 and said:  # the CLI's way of reporting our ValueErrors
        raise ValueError(said[-1])
    if result.returncode != 0:
        raise RuntimeError(
            f"Export runs TensorFlow's converters; the TensorFlow subprocess (this process uses the "
            f"{keras.backend.backend()} backend) failed:\n{result.stderr[-4000:]}"
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


def load_calibration(path: str, size) -> np.ndarray:
    """Calibration images from a `.npy` array or a folder of images (resized to `size`, 0-255 RGB)."""
    if os.path.isdir(path):
        import tensorflow as tf

        names = sorted(n for n in os.listdir(path) if n.lower().endswith((".jpg", ".jpeg", ".png", ".bmp")))
        if not names:
            raise ValueError(f"No .jpg/.jpeg/.png/.bmp images in calibration folder {path}")
        images = [
            tf.image.resize(tf.io.decode_image(tf.io.read_file(os.path.join(path, n)), channels=3,
                                               expand_animations=False), size, method="bicubic")
            for n in names
        ]  # fmt: skip
        return np.clip(np.stack([np.asarray(i) for i in images]), 0, 255).astype("float32")
    return np.load(path).astype("float32")


def _write_atomic(path, blob: bytes):
    tmp = f"{path}.part"
    with open(tmp, "wb") as f:
        f.write(blob)
    os.replace(tmp, path)
