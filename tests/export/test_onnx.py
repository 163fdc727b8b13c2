"""ONNX export checked in onnxruntime: native LSTM ops, a dynamic batch, Keras' numbers."""

import collections

from conftest import IN_PROCESS_CONVERTERS, TINY, random_images, tiny_model, to_numpy
import numpy as np

from keras_sequencer.export import export

pytestmark = IN_PROCESS_CONVERTERS


def test_onnx_has_native_lstms_and_a_dynamic_batch(tmp_path):
    import onnx
    import onnxruntime

    model = tiny_model(input_shape=(32, 32, 3))
    path = str(tmp_path / "model.onnx")
    export(model, path, format="onnx")
    graph = onnx.load(path).graph
    kinds = collections.Counter(node.op_type for node in graph.node)
    assert kinds["LSTM"] >= 2 * sum(TINY["layers"]) and not kinds.keys() & {"Loop", "Scan"}, kinds
    runtime = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in runtime.get_inputs()]
    for batch in (1, 3):
        images = random_images(batch, 32, seed=batch)
        got = runtime.run(None, {name: images})[0]
        np.testing.assert_allclose(got, to_numpy(model.predict_on_batch(images)), rtol=0, atol=1e-4)
    # An empty batch gives an empty answer; before, onnxruntime's LSTM aborted the process (exit 134).
    assert runtime.run(None, {name: random_images(0, 32)})[0].shape == (0, 10)
