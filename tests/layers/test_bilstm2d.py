"""BiLSTM2D: every forward path and every option against PyTorch references (timm's LSTM2d and nn.LSTM/GRU/RNN).

References: timm's `LSTM2d` (its `bidirectional` / `union` / `with_fc` options),
the same module with PyTorch's `nn.GRU` / `nn.RNN` put in place of its LSTMs
(as the authors' GRU2D / RNN2D do).
"""

from conftest import BACKEND, copy_torch_rnn, load_timm_lstm2d, perturb_torch, run_layer_test, to_numpy, torch_rnn
import keras
import numpy as np
import pytest

from keras_sequencer.layers import BiLSTM2D, token_mixing

# Every path this backend can run ("torch" and "tensorflow" need their own backends).
IMPLEMENTATIONS = [i for i in token_mixing.IMPLEMENTATIONS if i not in token_mixing.NATIVE_PATHS or i == BACKEND]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("height,width", [(5, 5), (3, 7), (9, 2)])
def test_bilstm2d_matches_timm_lstm2d(height, width, implementation):
    from timm.models.sequencer import LSTM2d
    import torch

    torch.manual_seed(height * 10 + width)
    module = LSTM2d(12, 5, bidirectional=True, union="cat", with_fc=True).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = np.random.RandomState(1).randn(2, height, width, 12).astype("float32")
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()  # timm's LSTM2d is channels-last too

    layer = BiLSTM2D(5, implementation=implementation)
    layer.build(x.shape)
    load_timm_lstm2d(layer, module)
    np.testing.assert_allclose(to_numpy(layer(x)), expected, rtol=0, atol=2e-6)
    np.testing.assert_allclose(to_numpy(layer(x, training=False)), expected, rtol=0, atol=2e-6)


def test_bilstm2d_layer_contract():
    layer, _, _ = run_layer_test(BiLSTM2D, {"hidden_size": 3, "implementation": "fused"}, (2, 4, 6, 8), (2, 4, 6, 8))
    # Two independent BiLSTMs (4 directions x kernel, recurrent kernel, bias) + fc.
    assert len(layer.trainable_weights) == 4 * 3 + 2
    assert layer.count_params() == 4 * (8 * 12 + 3 * 12 + 12) + (12 * 8 + 8)


def test_bilstm2d_direction_order():
    """The concatenation order is [v_fwd, v_bwd, h_fwd, h_bwd]: at the edge where a direction starts, its
    channel block is that direction's LSTM run over that one token."""
    layer = BiLSTM2D(2)
    x = np.random.RandomState(0).randn(1, 3, 4, 6).astype("float32")
    layer(x)
    mixed = to_numpy(token_mixing.mix(layer, keras.ops.convert_to_tensor(x)))
    assert mixed.shape == (1, 3, 4, 8)

    def one_token(lstm, tokens):  # (n, 6) tokens, each a sequence of length 1
        return to_numpy(lstm(tokens[:, None, :]))[:, 0, :]

    # vertical: the forward LSTM starts at the first row, the backward one at the last
    np.testing.assert_allclose(mixed[0, 0, :, 0:2], one_token(layer.rnn_v.forward_layer, x[0, 0]), atol=1e-6)
    np.testing.assert_allclose(mixed[0, -1, :, 2:4], one_token(layer.rnn_v.backward_layer, x[0, -1]), atol=1e-6)
    # horizontal: the forward LSTM starts at the first column, the backward one at the last
    np.testing.assert_allclose(mixed[0, :, 0, 4:6], one_token(layer.rnn_h.forward_layer, x[0, :, 0]), atol=1e-6)
    np.testing.assert_allclose(mixed[0, :, -1, 6:8], one_token(layer.rnn_h.backward_layer, x[0, :, -1]), atol=1e-6)


@pytest.mark.parametrize("height,width", [(4, 4), (3, 5)])
def test_both_paths_train_identically(height, width):
    """One SGD step through each path from the same weights lands on the same weights: the gradients of the
    fused loops ("fused" trains through the unrolled steps, "scan" through the scan with its own backward
    pass) and of "auto" (torch.lstm on torch, TensorFlow's LSTM kernel on TensorFlow, the scan on JAX)
    equal the Bidirectional(LSTM) layers'. On TensorFlow and JAX also under `jit_compile=True` (XLA once
    refused the gradient of TF's scan, and cannot compile TensorFlow's LSTM kernel, which "auto" then
    leaves; on torch it would mean torch.compile, not what this test is about)."""
    x = np.random.RandomState(0).randn(3, height, width, 6).astype("float32")
    y = np.random.RandomState(1).randn(3, height, width, 6).astype("float32")
    setups = [("keras", "auto"), ("fused", "auto"), ("scan", "auto"), ("auto", "auto")]
    if BACKEND != "torch":
        setups += [("fused", True), ("scan", True), ("keras", True), ("auto", True)]
    models = []
    for implementation, jit_compile in setups:
        model = keras.Sequential([keras.Input((height, width, 6)), BiLSTM2D(3, implementation=implementation)])
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse", jit_compile=jit_compile)
        if models:
            model.set_weights(models[0].get_weights())
        models.append(model)
    start = models[0].get_weights()
    losses = [float(m.train_on_batch(x, y)) for m in models]
    for other in range(1, len(models)):
        np.testing.assert_allclose(losses[0], losses[other], rtol=1e-5)
        for a, b in zip(models[0].get_weights(), models[other].get_weights(), strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert not np.allclose(models[0].get_weights()[1], start[1])  # weights moved


def test_fused_needs_a_static_size():
    """A traced graph with unknown height/width (e.g. TensorFlow relaxing shapes) cannot unroll: "fused" says
    so."""
    symbolic = keras.KerasTensor((None, None, None, 4))
    layer = BiLSTM2D(2, implementation="fused")
    layer.build(symbolic.shape)
    with pytest.raises(ValueError, match="'unrolled' path, which needs the height and width"):
        token_mixing.mix(layer, symbolic)


@pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="only TensorFlow traces a graph with unknown height and width (JAX traces each shape, PyTorch is eager)",
)
@pytest.mark.parametrize("training", [False, True])
def test_auto_mixes_a_map_of_unknown_size_in_a_traced_graph(training):
    """In a `tf.function` traced for any height and width, "auto" takes a path that needs no static size (Keras'
    layers, or TensorFlow's LSTM kernel in training) and mixes as the Keras layers do."""
    import tensorflow as tf

    layer = BiLSTM2D(2)
    x = np.random.RandomState(0).randn(2, 3, 5, 4).astype("float32")
    layer.build(x.shape)
    expected = to_numpy(token_mixing.mix_keras(layer, keras.ops.convert_to_tensor(x)))
    traced = tf.function(
        lambda t: token_mixing.mix(layer, t, training=training),
        input_signature=[tf.TensorSpec((None, None, None, 4))],
    )
    np.testing.assert_allclose(to_numpy(traced(x)), expected, rtol=0, atol=2e-6)


def test_bilstm2d_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"hidden_size.*Received: hidden_size=0"):
        BiLSTM2D(0)
    with pytest.raises(ValueError, match=r"Received: implementation='cudnn'"):
        BiLSTM2D(2, implementation="cudnn")
    with pytest.raises(ValueError, match="ndim=4"):
        BiLSTM2D(2)(np.zeros((2, 3, 4), "float32"))


MIXER_CASES = [
    # (rnn_type, bidirectional, union, with_fc, hidden) on 12 input channels
    ("lstm", False, "cat", True, 5),
    ("lstm", True, "add", True, 5),
    ("lstm", True, "cat", False, 3),
    ("lstm", True, "vertical", False, 6),
    ("lstm", True, "horizontal", True, 5),
    ("gru", True, "cat", True, 5),
    ("rnn", True, "cat", True, 5),
    ("gru", False, "add", True, 5),
]


@pytest.mark.parametrize("rnn_type,bidirectional,union,with_fc,hidden", MIXER_CASES)
def test_bilstm2d_options_match_pytorch(rnn_type, bidirectional, union, with_fc, hidden):
    from timm.models.sequencer import LSTM2d
    import torch

    module = LSTM2d(12, hidden, bidirectional=bidirectional, union=union, with_fc=with_fc)
    if rnn_type != "lstm":  # the authors' GRU2D / RNN2D: the same module around other PyTorch RNNs
        for name in ("rnn_v", "rnn_h"):
            if isinstance(getattr(module, name), torch.nn.LSTM):
                setattr(module, name, torch_rnn(rnn_type, 12, hidden, bidirectional))
    perturb_torch(module, seed=hidden)
    x = np.random.RandomState(1).randn(2, 3, 5, 12).astype("float32")  # H != W: directions cannot hide
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()

    layer = BiLSTM2D(hidden, rnn_type=rnn_type, bidirectional=bidirectional, union=union, with_fc=with_fc)
    layer.build(x.shape)
    for name in ("rnn_v", "rnn_h"):
        keras_rnn, reference = getattr(layer, name), getattr(module, name)
        assert (keras_rnn is None) == (not isinstance(reference, torch.nn.RNNBase)), name
        if keras_rnn is not None:
            copy_torch_rnn(keras_rnn, reference, rnn_type)
    if with_fc:
        layer.fc.kernel.assign(module.fc.weight.detach().numpy().T)
        layer.fc.bias.assign(module.fc.bias.detach().numpy())
    else:
        assert layer.fc is None and module.fc is None
    np.testing.assert_allclose(to_numpy(layer(x)), expected, rtol=0, atol=2e-6)
    assert layer.count_params() == sum(p.numel() for p in module.parameters()) - _torch_extra_biases(module)


def _torch_extra_biases(module) -> int:
    """PyTorch keeps two biases per LSTM / SimpleRNN direction where Keras keeps one (GRU keeps both)."""
    import torch

    extra = 0
    for rnn in module.modules():
        if isinstance(rnn, (torch.nn.LSTM, torch.nn.RNN)):
            extra += (2 if rnn.bidirectional else 1) * rnn.bias_hh_l0.numel()
    return extra


def test_option_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match="must equal the input's 12 channels"):
        BiLSTM2D(4, with_fc=False).build((None, 3, 3, 12))
    with pytest.raises(ValueError, match="`union` must be one of"):
        BiLSTM2D(4, union="mul")
    with pytest.raises(ValueError, match="implementation='fused' implements the paper's mixer"):
        BiLSTM2D(4, implementation="fused", rnn_type="gru")
