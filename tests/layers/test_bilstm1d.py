"""BiLSTM1D (the Vanilla Sequencer's mixer) against PyTorch's nn.LSTM / nn.GRU over the flattened tokens."""

from conftest import copy_torch_rnn, perturb_torch, to_numpy, torch_rnn
import numpy as np
import pytest

from keras_sequencer.layers import BiLSTM1D


@pytest.mark.parametrize("rnn_type,bidirectional", [("lstm", True), ("gru", True), ("lstm", False)])
def test_bilstm1d_matches_pytorch_over_flattened_tokens(rnn_type, bidirectional):
    import torch

    hidden = 6 if bidirectional else 12
    rnn = perturb_torch(torch_rnn(rnn_type, 12, hidden, bidirectional), seed=7)
    x = np.random.RandomState(2).randn(2, 3, 4, 12).astype("float32")
    with torch.no_grad():  # the authors' RNNBase: tokens in row-major order, one sequence per image
        expected = rnn(torch.from_numpy(x).reshape(2, 12, 12))[0].reshape(2, 3, 4, 12).numpy()
    layer = BiLSTM1D(hidden, rnn_type=rnn_type, bidirectional=bidirectional)
    layer.build(x.shape)
    copy_torch_rnn(layer.rnn, rnn, rnn_type)
    np.testing.assert_allclose(to_numpy(layer(x)), expected, rtol=0, atol=2e-6)


def test_bilstm1d_needs_matching_channels():
    with pytest.raises(ValueError, match="no output projection"):
        BiLSTM1D(4).build((None, 3, 3, 12))
