"""Running TFLite files in the LiteRT interpreter (`ai-edge-litert`): interpreters, inference, op counts."""

import os

import numpy as np


def tflite_interpreter(model, delegate: bool = True, num_threads: int | None = None):
    """A LiteRT interpreter for a `.tflite` path or flatbuffer bytes, tensors allocated.

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
    """Runs a float-input TFLite classifier on a batch that matches its input shape.

    Every call starts from zero LSTM state: a file with TFLite's own LSTM
    kernels (`lstm="fused"`) keeps its last state in variable tensors, which
    are reset first.
    """
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    images = np.asarray(images, dtype=inp["dtype"])
    if tuple(images.shape) != tuple(inp["shape"]):
        raise ValueError(f"The TFLite model takes input shape {tuple(inp['shape'])}. Received: {images.shape}")
    interpreter.set_tensor(inp["index"], images)
    interpreter.reset_all_variables()
    interpreter.invoke()
    return interpreter.get_tensor(out["index"])


def op_histogram(blob: bytes) -> dict[str, int]:
    """Op name -> count in a TFLite flatbuffer, as the interpreter lists them (XNNPACK off)."""
    interpreter = tflite_interpreter(blob, delegate=False)
    counts: dict[str, int] = {}
    for op in interpreter._get_ops_details():  # the only op listing LiteRT exposes
        counts[op["op_name"]] = counts.get(op["op_name"], 0) + 1
    return dict(sorted(counts.items()))
