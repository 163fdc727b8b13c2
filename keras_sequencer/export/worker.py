"""Exports from the JAX and PyTorch backends: the conversion runs in a TensorFlow subprocess.

TensorFlow's converters need the TensorFlow backend, which is fixed per
process. The model travels as a `.keras` file (backend independent); the
request and the result travel as JSON files, so errors come back as their
type and message, not as text scraped from stderr.
"""

import json
import os
import subprocess
import sys
import tempfile
import traceback

import keras
import numpy as np

_ENTRY = (
    "import sys; from keras_sequencer.export import export; from keras_sequencer.export.worker import serve; "
    "sys.exit(serve(sys.argv[1], sys.argv[2], export))"
)


def export_in_tensorflow(model, output: str, **options) -> dict:
    """Runs `keras_sequencer.export.export(model, output, **options)` in a TensorFlow process; returns its report.

    A `ValueError` raised there (a bad request) is raised here with the same
    message; anything else becomes a `RuntimeError` carrying the error and the
    subprocess' last output.
    """
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(model, keras.Model):
            path = os.path.join(tmp, "model.keras")
            model.save(path)
        else:
            path = os.fspath(model)
        if options.get("calibration") is not None:
            np.save(os.path.join(tmp, "calibration.npy"), options["calibration"])
            options = {**options, "calibration": os.path.join(tmp, "calibration.npy")}
        request, result_path = os.path.join(tmp, "request.json"), os.path.join(tmp, "result.json")
        with open(request, "w") as f:
            json.dump({"model": path, "output": os.path.abspath(output), "options": options}, f)
        env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
        process = subprocess.run([sys.executable, "-c", _ENTRY, request, result_path], capture_output=True,
                                 text=True, env=env)  # fmt: skip
        result = None
        if os.path.exists(result_path):
            with open(result_path) as f:
                result = json.load(f)
    if result is not None and result["ok"]:
        return result["report"]
    if result is not None and result["error"] == "ValueError":
        raise ValueError(result["message"])
    said = f"{result['error']}: {result['message']}" if result else f"exit status {process.returncode}"
    raise RuntimeError(
        f"Export runs TensorFlow's converters; the TensorFlow subprocess (this process uses the "
        f"{keras.backend.backend()} backend) failed with {said}\n{process.stderr[-4000:]}"
    )


def serve(request_path: str, result_path: str, export) -> int:
    """The subprocess' side: reads the request, runs `export`, writes `{"ok": true, "report": ...}` or the error."""
    with open(request_path) as f:
        request = json.load(f)
    options = dict(request["options"])
    if options.get("input_size") is not None:
        options["input_size"] = tuple(options["input_size"])
    if options.get("calibration") is not None:
        options["calibration"] = np.load(options["calibration"])
    try:
        result = {"ok": True, "report": export(request["model"], request["output"], **options)}
    except Exception as error:  # reported to the parent, which re-raises it
        traceback.print_exc()
        result = {"ok": False, "error": type(error).__name__, "message": str(error)}
    with open(result_path, "w") as f:
        json.dump(result, f)
    return 0 if result["ok"] else 1
