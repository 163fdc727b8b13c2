"""Each layer on its own: shapes, serialisation, and the math against timm's modules."""

from conftest import BACKEND, run_layer_test, to_numpy
import keras
import numpy as np
import pytest

from keras_sequencer.layers import BiLSTM2D, PatchEmbed, Sequencer2DBlock, StochasticDepth


def _load_timm_lstm2d(layer: BiLSTM2D, module) -> None:
    """Copies timm LSTM2d weights into BiLSTM2D by stating the layout facts directly:
    Keras kernels are transposed, both frameworks order gates [i, f, g/c, o], and
    PyTorch's two biases add up to Keras' one."""
    sd = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    for rnn in ("rnn_v", "rnn_h"):
        bidir = getattr(layer, rnn)
        for suffix, cell in (("", bidir.forward_layer.cell), ("_reverse", bidir.backward_layer.cell)):
            cell.kernel.assign(sd[f"{rnn}.weight_ih_l0{suffix}"].T)
            cell.recurrent_kernel.assign(sd[f"{rnn}.weight_hh_l0{suffix}"].T)
            cell.bias.assign(sd[f"{rnn}.bias_ih_l0{suffix}"] + sd[f"{rnn}.bias_hh_l0{suffix}"])
    layer.fc.kernel.assign(sd["fc.weight"].T)
    layer.fc.bias.assign(sd["fc.bias"])


@pytest.mark.parametrize("implementation", ["keras", "fused", "auto"])  # auto on torch: torch.lstm
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
    _load_timm_lstm2d(layer, module)
    np.testing.assert_allclose(to_numpy(layer(x)), expected, rtol=0, atol=2e-6)
    if implementation == "fused":  # both step loops, whichever one `call` picks on this backend
        for scan in (False, True):
            mixed = layer.fc(layer._mix_fused(keras.ops.convert_to_tensor(x), scan=scan))
            np.testing.assert_allclose(to_numpy(mixed), expected, rtol=0, atol=2e-6, err_msg=f"scan={scan}")


def test_bilstm2d_layer_contract():
    layer, _, _ = run_layer_test(BiLSTM2D, {"hidden_size": 3, "implementation": "fused"}, (2, 4, 6, 8), (2, 4, 6, 8))
    # Two independent BiLSTMs (4 directions x kernel, recurrent kernel, bias) + fc.
    assert len(layer.trainable_weights) == 4 * 3 + 2
    assert layer.count_params() == 4 * (8 * 12 + 3 * 12 + 12) + (12 * 8 + 8)


def test_bilstm2d_direction_order():
    """The concatenation order is [v_fwd, v_bwd, h_fwd, h_bwd]: zeroing one LSTM
    direction's output kernel must silence exactly its channel block of `fc`'s input."""
    layer = BiLSTM2D(2)
    x = np.random.RandomState(0).randn(1, 3, 4, 6).astype("float32")
    layer(x)
    mixed = to_numpy(layer._mix(x))
    assert mixed.shape == (1, 3, 4, 8)
    # The vertical forward LSTM at row 0 has only seen row 0 of its column.
    column_only = to_numpy(layer.rnn_v.forward_layer(x[:, :1, :, :].transpose(0, 2, 1, 3).reshape(4, 1, 6)))
    np.testing.assert_allclose(mixed[0, 0, :, 0:2], column_only[:, 0, :], atol=1e-6)
    # The horizontal backward LSTM at the last column has only seen that column.
    last = to_numpy(layer.rnn_h.backward_layer(x[:, :, -1:, :].reshape(3, 1, 6)))
    np.testing.assert_allclose(mixed[0, :, -1, 6:8], last[:, 0, :], atol=1e-6)


@pytest.mark.parametrize("height,width", [(4, 4), (3, 5)])
def test_both_paths_train_identically(height, width):
    """One SGD step through each path from the same weights lands on the same weights: the fused
    path's gradients (and, on torch, those of "auto": torch.lstm) equal the Bidirectional(LSTM) layers'.
    On TensorFlow and JAX also under `jit_compile=True` (XLA once refused the gradient of TF's scan;
    on torch it would mean torch.compile, not what this test is about)."""
    x = np.random.RandomState(0).randn(3, height, width, 6).astype("float32")
    y = np.random.RandomState(1).randn(3, height, width, 6).astype("float32")
    setups = [("keras", "auto"), ("fused", "auto"), ("auto", "auto")]
    if BACKEND != "torch":
        setups += [("fused", True), ("keras", True)]
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
    """A traced graph with unknown height/width (e.g. TensorFlow relaxing shapes)
    cannot unroll: "fused" says so, "auto" takes the Keras layers."""
    symbolic = keras.KerasTensor((None, None, None, 4))
    layer = BiLSTM2D(2, implementation="fused")
    layer.build(symbolic.shape)
    with pytest.raises(ValueError, match="implementation='fused' needs the height and width"):
        layer._mix(symbolic)
    auto = BiLSTM2D(2)
    auto.build(symbolic.shape)
    assert auto.compute_output_spec(symbolic).shape == (None, None, None, 4)


def test_bilstm2d_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"hidden_size.*Received: hidden_size=0"):
        BiLSTM2D(0)
    with pytest.raises(ValueError, match=r"Received: implementation='cudnn'"):
        BiLSTM2D(2, implementation="cudnn")
    with pytest.raises(ValueError, match="ndim=4"):
        BiLSTM2D(2)(np.zeros((2, 3, 4), "float32"))


def test_sequencer2d_block_layer_contract_and_gradients():
    kwargs = {
        "hidden_size": 3,
        "mlp_ratio": 2.0,
        "drop_path_rate": 0.2,
        "layer_norm_epsilon": 1e-6,
        "implementation": "keras",
    }
    block, x, y = run_layer_test(Sequencer2DBlock, kwargs, (2, 3, 5, 8), (2, 3, 5, 8))
    assert block.fc1.units == 16
    # Every trainable weight receives a gradient through both residual branches
    # (without drop path, which could drop a whole branch for this small batch).
    block = Sequencer2DBlock(**{**kwargs, "drop_path_rate": 0.0})
    model = keras.Sequential([keras.Input((3, 5, 8)), block])
    model.compile(optimizer="sgd", loss="mse")
    before = [to_numpy(w).copy() for w in block.trainable_weights]
    model.train_on_batch(x, np.zeros_like(y))
    after = [to_numpy(w) for w in block.trainable_weights]
    assert all(not np.allclose(a, b) for a, b in zip(before, after, strict=True))


def test_sequencer2d_block_matches_timm_block():
    from timm.models.sequencer import Sequencer2dBlock
    import torch

    torch.manual_seed(3)
    module = Sequencer2dBlock(8, 3, mlp_ratio=3.0).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    x = np.random.RandomState(2).randn(2, 4, 3, 8).astype("float32")
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    block = Sequencer2DBlock(3)
    block.build(x.shape)
    sd = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    _load_timm_lstm2d(block.rnn_tokens, module.rnn_tokens)
    for norm in ("norm1", "norm2"):
        getattr(block, norm).gamma.assign(sd[f"{norm}.weight"])
        getattr(block, norm).beta.assign(sd[f"{norm}.bias"])
    for fc in ("fc1", "fc2"):
        getattr(block, fc).kernel.assign(sd[f"mlp_channels.{fc}.weight"].T)
        getattr(block, fc).bias.assign(sd[f"mlp_channels.{fc}.bias"])
    np.testing.assert_allclose(to_numpy(block(x)), expected, rtol=0, atol=5e-6)


def test_patch_embed_layer_contract():
    run_layer_test(PatchEmbed, {"filters": 5, "patch_size": 3}, (2, 9, 11, 4), (2, 3, 3, 5))


def test_patch_embed_rejects_small_input():
    with pytest.raises(ValueError, match=r"height of at least 7.*Received: input shape=\(1, 5, 9, 3\)"):
        PatchEmbed(4, 7)(np.zeros((1, 5, 9, 3), "float32"))


def test_stochastic_depth_is_identity_at_inference():
    x = np.random.RandomState(0).randn(8, 2, 2, 3).astype("float32")
    run_layer_test(StochasticDepth, {"rate": 0.5, "seed": 1}, x.shape, x.shape)
    np.testing.assert_array_equal(to_numpy(StochasticDepth(0.5)(x, training=False)), x)


def test_stochastic_depth_drops_whole_samples_at_the_rate():
    rate, n = 0.3, 4000
    x = np.ones((n, 2, 2, 3), "float32")
    y = to_numpy(StochasticDepth(rate, seed=7)(x, training=True))
    per_sample = y.reshape(n, -1)
    # Each sample is dropped whole or kept and scaled by 1 / (1 - rate).
    kept = np.all(np.isclose(per_sample, 1 / (1 - rate)), axis=1)
    dropped = np.all(per_sample == 0, axis=1)
    assert np.all(kept | dropped)
    # Binomial(4000, 0.3): the standard deviation of the rate is 0.0072.
    assert abs(dropped.mean() - rate) < 0.03


def test_stochastic_depth_rejects_bad_rate():
    with pytest.raises(ValueError, match=r"Received: rate=1.0"):
        StochasticDepth(1.0)


def test_bilstm2d_survives_keras_object_sharing_scope():
    """Regression: built inside the scope Keras uses while loading a `.keras` file,
    Bidirectional used to resolve a freed template's recycled id() to another LSTM."""
    from keras.src.saving.serialization_lib import ObjectSharingScope

    with ObjectSharingScope():
        for _ in range(100):
            layer = BiLSTM2D(2)
            for bidirectional in (layer.rnn_v, layer.rnn_h):
                assert bidirectional.backward_layer.go_backwards
                assert not bidirectional.forward_layer.go_backwards
