"""TFLite (LiteRT) export: builtin ops only, a static input shape, optional quantisation.

The LSTMs are lowered one of three ways (`lstm=`), each a token-mixing path
of `keras_sequencer.layers.token_mixing`:

| lstm       | token-mixing path   | graph                                               | stateless |
|------------|---------------------|-----------------------------------------------------|-----------|
| "unrolled" | "tflite_unrolled"   | flat: per step one `BATCH_MATMUL` (4 directions)    | yes       |
|            | (int8: "..._int8")  | full int8: one `FULLY_CONNECTED` per direction      | yes       |
| "while"    | "keras"             | one builtin WHILE loop per direction                | yes       |
| "fused"    | "tflite_lstm"       | `UNIDIRECTIONAL_SEQUENCE_LSTM` kernels              | NO        |

`"auto"` is `"unrolled"`: XNNPACK (LiteRT's default CPU delegate) runs the
flat graph's ops, while WHILE bodies and TFLite's LSTM kernel run on the
interpreter's own kernels, one small op at a time (docs/design.md, "TFLite lowerings";
latencies: benchmarks/README.md).

`"fused"` leads the converter to TFLite's own LSTM kernel (the LSTMs run
through a TF function carrying the interface attributes the converter
recognises as a Keras LSTM, which is how tf-keras 2.x LSTMs got there; Keras 3
LSTMs never do). That kernel keeps its final state in variable tensors and
starts the next `invoke()` from it, so every call after the first is wrong
unless the caller runs `interpreter.reset_all_variables()` first
(`run_tflite` does).
"""

import os

import keras
import numpy as np

from keras_sequencer.data import IMAGE_EXTENSIONS, list_images
from keras_sequencer.export.litert import op_histogram
from keras_sequencer.layers import token_mixing

LOWERINGS = ("auto", "while", "unrolled", "fused")
QUANTIZATIONS = (None, "float16", "dynamic", "int8")
_PATHS = {"while": "keras", "unrolled": "tflite_unrolled", "fused": "tflite_lstm"}


def resolve_lowering(lstm: str, quantize: str | None) -> str:
    """`"auto"` -> `"unrolled"` (the fastest in LiteRT, float or quantised); refuses int8 WHILE loops."""
    if lstm == "auto":
        return "unrolled"
    if lstm == "while" and quantize == "int8":
        # TF 2.21's quantiser crashes the process (SIGSEGV) on WHILE bodies; refuse before it can.
        raise ValueError("quantize='int8' cannot use lstm='while' (TensorFlow's quantiser crashes on it); "
                         "use lstm='unrolled' (the default) or 'fused'.")  # fmt: skip
    return lstm


def to_tflite(model: keras.Model, shape: tuple, quantize: str | None, calibration, lstm: str) -> bytes:
    """Converts `model` for a static `shape` input; `lstm` is a resolved lowering (`resolve_lowering`)."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32, name="images")])
    def serve(images):
        return model(images, training=False)

    # XNNPACK has int8 fully-connected kernels but no int8 batch matmul (docs/design.md, "TFLite lowerings").
    path = "tflite_unrolled_int8" if lstm == "unrolled" and quantize == "int8" else _PATHS[lstm]
    with token_mixing.use_path(path):
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


def load_calibration(path: str, size) -> np.ndarray:
    """Calibration images from a `.npy` array or a folder of images (resized to `size`, 0-255 RGB)."""
    if not os.path.isdir(path):
        return np.load(path).astype("float32")
    import tensorflow as tf

    files = list_images(path)
    if not files:
        raise ValueError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) in calibration folder {path}")
    images = [
        tf.image.resize(tf.io.decode_image(tf.io.read_file(f), channels=3, expand_animations=False), size,
                        method="bicubic")
        for f in files
    ]  # fmt: skip
    return np.clip(np.stack([np.asarray(i) for i in images]), 0, 255).astype("float32")
