"""The paper's ablations: exact against PyTorch references, trainable, serialisable, correctly sized.

References: timm's `LSTM2d` (its `bidirectional` / `union` / `with_fc` options),
the same module with PyTorch's `nn.GRU` / `nn.RNN` put in place of its LSTMs
(as the authors' GRU2D / RNN2D do), and PyTorch's `nn.LSTM` over the flattened
tokens for the Vanilla Sequencer's 1-D mixer.
"""

import os

from conftest import to_numpy
import keras
import numpy as np
import pytest

import keras_sequencer as ks
from keras_sequencer.layers import BiLSTM1D, BiLSTM2D
from keras_sequencer.models import ABLATIONS

GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def _torch_rnn(kind, channels, units, bidirectional):
    import torch

    cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[kind]
    return cls(channels, units, batch_first=True, bidirectional=bidirectional)


def _copy_rnn(keras_rnn, torch_rnn, kind):
    """PyTorch RNN weights -> a Keras RNN / Bidirectional layer, from the documented layouts.

    LSTM: gates [i, f, g, o] in both, one Keras bias = b_ih + b_hh. GRU: PyTorch
    gates [r, z, n], Keras [z, r, h] with reset_after=True keeping the two
    biases as rows. SimpleRNN: one bias = b_ih + b_hh.
    """
    sd = {k: v.detach().numpy() for k, v in torch_rnn.state_dict().items()}
    cells = [keras_rnn.forward_layer.cell, keras_rnn.backward_layer.cell] if hasattr(keras_rnn, "forward_layer") else [
        keras_rnn.cell
    ]  # fmt: skip
    for cell, suffix in zip(cells, ("", "_reverse"), strict=False):
        w_ih, w_hh = sd[f"weight_ih_l0{suffix}"], sd[f"weight_hh_l0{suffix}"]
        b_ih, b_hh = sd[f"bias_ih_l0{suffix}"], sd[f"bias_hh_l0{suffix}"]
        if kind == "gru":
            u = w_hh.shape[1]
            order = np.concatenate([np.arange(u, 2 * u), np.arange(u), np.arange(2 * u, 3 * u)])  # r,z,n -> z,r,n
            w_ih, w_hh, b_ih, b_hh = w_ih[order], w_hh[order], b_ih[order], b_hh[order]
            cell.bias.assign(np.stack([b_ih, b_hh]))
        else:
            cell.bias.assign(b_ih + b_hh)
        cell.kernel.assign(w_ih.T)
        cell.recurrent_kernel.assign(w_hh.T)


def _perturb(module, seed):
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return module.eval()


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
                setattr(module, name, _torch_rnn(rnn_type, 12, hidden, bidirectional))
    _perturb(module, seed=hidden)
    x = np.random.RandomState(1).randn(2, 3, 5, 12).astype("float32")  # H != W: directions cannot hide
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()

    layer = BiLSTM2D(hidden, rnn_type=rnn_type, bidirectional=bidirectional, union=union, with_fc=with_fc)
    layer.build(x.shape)
    for name in ("rnn_v", "rnn_h"):
        keras_rnn, torch_rnn = getattr(layer, name), getattr(module, name)
        assert (keras_rnn is None) == (not isinstance(torch_rnn, torch.nn.RNNBase)), name
        if keras_rnn is not None:
            _copy_rnn(keras_rnn, torch_rnn, rnn_type)
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


@pytest.mark.parametrize("rnn_type,bidirectional", [("lstm", True), ("gru", True), ("lstm", False)])
def test_bilstm1d_matches_pytorch_over_flattened_tokens(rnn_type, bidirectional):
    import torch

    hidden = 6 if bidirectional else 12
    rnn = _perturb(_torch_rnn(rnn_type, 12, hidden, bidirectional), seed=7)
    x = np.random.RandomState(2).randn(2, 3, 4, 12).astype("float32")
    with torch.no_grad():  # the authors' RNNBase: tokens in row-major order, one sequence per image
        expected = rnn(torch.from_numpy(x).reshape(2, 12, 12))[0].reshape(2, 3, 4, 12).numpy()
    layer = BiLSTM1D(hidden, rnn_type=rnn_type, bidirectional=bidirectional)
    layer.build(x.shape)
    _copy_rnn(layer.rnn, rnn, rnn_type)
    np.testing.assert_allclose(to_numpy(layer(x)), expected, rtol=0, atol=2e-6)


def test_option_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match="must equal the input's 12 channels"):
        BiLSTM2D(4, with_fc=False).build((None, 3, 3, 12))
    with pytest.raises(ValueError, match="`union` must be one of"):
        BiLSTM2D(4, union="mul")
    with pytest.raises(ValueError, match="implementation='fused' implements the paper's mixer"):
        BiLSTM2D(4, implementation="fused", rnn_type="gru")
    with pytest.raises(ValueError, match="no output projection"):
        BiLSTM1D(4).build((None, 3, 3, 12))
    with pytest.raises(ValueError, match="Unknown model 'sequencer2d_xl'"):
        ks.create_model("sequencer2d_xl")
    with pytest.raises(ValueError, match="no published ImageNet weights"):
        ks.create_model("gru_sequencer2d_s", weights="imagenet")


def _expected_params(config, classes=1000, channels_in=3) -> int:
    """Parameter count implied by the config, written from the definitions (Keras bias convention)."""
    rnn_type = config.get("rnn_type", "lstm")
    dirs = 2 if config.get("bidirectional", True) else 1
    union, with_fc, mixer = config.get("union", "cat"), config.get("with_fc", True), config.get("mixer", "2d")
    total, previous = 0, channels_in
    for depth, patch, c, u, ratio in zip(config["layers"], config["patch_sizes"], config["embed_dims"],
                                         config["hidden_sizes"], config["mlp_ratios"], strict=True):  # fmt: skip
        total += patch * patch * previous * c + c  # patch embedding conv
        per_direction = GATES[rnn_type] * (c * u + u * u + u) + (3 * u if rnn_type == "gru" else 0)
        if mixer == "1d":
            mixer_params = dirs * per_direction
        else:
            scans = 2 if union in ("cat", "add") else 1
            mixed = dirs * u * (2 if union == "cat" else 1)
            mixer_params = scans * dirs * per_direction + ((mixed * c + c) if with_fc else 0)
        hidden = int(ratio * c)
        total += depth * (4 * c + mixer_params + (c * hidden + hidden) + (hidden * c + c))
        previous = c
    return total + 2 * previous + (previous * classes + classes)


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_named_ablations_have_the_size_their_definition_implies(name):
    model = ks.create_model(name, weights=None, input_shape=(56, 56, 3))
    assert model.count_params() == _expected_params(ABLATIONS[name]), name
    assert model.name == name


def test_defaults_are_the_papers_model():
    # Same parameter count formula and same weight layout as the foundation's S.
    default = ks.Sequencer2DS(weights=None)
    assert default.count_params() == _expected_params(ks.models.VARIANTS["s"])
    named = ks.create_model("sequencer2d_s", weights=None)
    assert [w.path for w in named.weights] == [w.path for w in default.weights]


SMALL = {"layers": (1, 1), "patch_sizes": (4, 2), "embed_dims": (16, 24), "mlp_ratios": (2.0, 2.0)}
SMALL_OPTIONS = {
    "unidirectional": {"hidden_sizes": (4, 6), "bidirectional": False},
    "add": {"hidden_sizes": (4, 6), "union": "add"},
    "without_fc": {"hidden_sizes": (4, 6), "with_fc": False},
    "vertical": {"hidden_sizes": (8, 12), "union": "vertical", "with_fc": False},
    "horizontal": {"hidden_sizes": (8, 12), "union": "horizontal", "with_fc": False},
    "gru": {"hidden_sizes": (4, 6), "rnn_type": "gru"},
    "rnn": {"hidden_sizes": (4, 6), "rnn_type": "rnn"},
    "vanilla": {"hidden_sizes": (8, 12), "mixer": "1d"},
}


@pytest.mark.parametrize("option", sorted(SMALL_OPTIONS))
def test_each_option_trains_and_survives_saving(option, tmp_path):
    config = {**SMALL, **SMALL_OPTIONS[option]}
    keras.utils.set_random_seed(0)
    model = ks.Sequencer2D(**config, input_shape=(16, 24, 3), classes=5, classifier_activation=None)
    assert model.count_params() == _expected_params(config, classes=5)
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 255, (4, 16, 24, 3)).astype("float32"), rng.integers(0, 5, 4)
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = [to_numpy(w).copy() for w in model.trainable_weights]
    losses = [float(model.train_on_batch(x, y)) for _ in range(3)]
    assert all(np.isfinite(losses))
    changed = [not np.array_equal(a, to_numpy(b)) for a, b in zip(before, model.trainable_weights, strict=True)]
    assert all(changed), "every weight gets a gradient"
    path = os.path.join(tmp_path, f"{option}.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    np.testing.assert_allclose(to_numpy(reloaded.predict_on_batch(x)), to_numpy(model.predict_on_batch(x)), atol=1e-6)
