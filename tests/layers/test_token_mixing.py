"""The token-mixing seam: which path runs, exporters' choice, and the paths' backend limits."""

from conftest import BACKEND, TINY, to_numpy
import keras
import numpy as np
import pytest

import keras_sequencer as ks
from keras_sequencer.layers import BiLSTM2D, token_mixing


def _layer_and_input(implementation="auto", seed=0):
    layer = BiLSTM2D(3, implementation=implementation)
    x = np.random.RandomState(seed).randn(2, 4, 5, 6).astype("float32")
    layer.build(x.shape)
    return layer, keras.ops.convert_to_tensor(x)


def test_every_path_gives_the_same_tokens():
    """Each path of `PATHS` this backend can run, forced with `use_path`, mixes like the Keras layers."""
    layer, x = _layer_and_input()
    expected = to_numpy(token_mixing.mix_keras(layer, x))
    for path in token_mixing.PATHS:
        if path == "torch" and BACKEND != "torch":
            continue
        with token_mixing.use_path(path):
            np.testing.assert_allclose(to_numpy(token_mixing.mix(layer, x)), expected, atol=2e-6, err_msg=path)


def test_use_path_overrides_the_implementation_and_keeps_ablations_on_keras(monkeypatch):
    """Inside `use_path` every standard layer runs the forced path whatever its `implementation`; a layer
    with an ablation option runs the only path that implements it."""
    ran = []
    for name in ("mix_keras", "mix_fused"):
        real = getattr(token_mixing, name)
        monkeypatch.setattr(token_mixing, name, lambda layer, x, *a, _real=real, _name=name, **k: ran.append(_name)
                            or _real(layer, x, *a, **k))  # fmt: skip
    layer, x = _layer_and_input(implementation="keras")
    with token_mixing.use_path("unrolled"):
        token_mixing.mix(layer, x)
    gru = BiLSTM2D(3, rnn_type="gru")
    gru.build(x.shape)
    with token_mixing.use_path("unrolled"):
        token_mixing.mix(gru, x)
    token_mixing.mix(layer, x)  # outside the block: the layer's own choice again
    assert ran == ["mix_fused", "mix_keras", "mix_keras"]
    with pytest.raises(ValueError, match=r"`path` must be one of .*Received: path='cudnn'"):
        with token_mixing.use_path("cudnn"):
            pass


def test_torch_path_needs_the_torch_backend():
    """`implementation="torch"` runs on PyTorch only: elsewhere the builder refuses it at once, and a layer
    restored from a PyTorch user's config loads (so the file can be exported) but refuses to run."""
    layer, x = _layer_and_input(implementation="torch")
    if BACKEND == "torch":
        np.testing.assert_allclose(to_numpy(layer(x)), to_numpy(layer.fc(token_mixing.mix_keras(layer, x))), atol=2e-6)
        return
    message = r"needs the PyTorch backend.*Received: implementation='torch'"
    with pytest.raises(ValueError, match=message):
        layer(x)
    with pytest.raises(ValueError, match=message):
        ks.Sequencer2D(**TINY, implementation="torch")
    with pytest.raises(ValueError, match="needs the PyTorch backend"), token_mixing.use_path("torch"):
        pass
    # Exporters choose their own path for every layer, whatever the layer's implementation.
    with token_mixing.use_path("keras"):
        np.testing.assert_allclose(to_numpy(token_mixing.mix(layer, x)), to_numpy(token_mixing.mix_keras(layer, x)))


@pytest.mark.parametrize("path", token_mixing.EXPORT_PATHS)
def test_export_paths_compute_the_lstm_on_tensorflow_only(path):
    """The export-only paths build TensorFlow graphs: the same tokens there, on non-square and square maps at
    batch 1 and 2 (the unrolled path lays each out differently), and a clear error elsewhere."""
    layer, x = _layer_and_input()
    with token_mixing.use_path(path):
        if BACKEND != "tensorflow":
            with pytest.raises(ValueError, match="needs the TensorFlow backend"):
                token_mixing.mix(layer, x)
            return
        for shape in ((2, 4, 5, 6), (2, 5, 5, 6), (1, 5, 5, 6), (1, 3, 7, 6)):
            x = keras.ops.convert_to_tensor(np.random.RandomState(sum(shape)).randn(*shape).astype("float32"))
            expected = to_numpy(token_mixing.mix_keras(layer, x))
            np.testing.assert_allclose(to_numpy(token_mixing.mix(layer, x)), expected, atol=2e-6, err_msg=str(shape))
