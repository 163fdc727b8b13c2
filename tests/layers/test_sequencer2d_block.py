"""Sequencer2DBlock: layer contract, gradients through both residual branches, and timm's block."""

from conftest import load_timm_lstm2d, run_layer_test, to_numpy
import keras
import numpy as np

from keras_sequencer.layers import Sequencer2DBlock


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
    load_timm_lstm2d(block.rnn_tokens, module.rnn_tokens)
    for norm in ("norm1", "norm2"):
        getattr(block, norm).gamma.assign(sd[f"{norm}.weight"])
        getattr(block, norm).beta.assign(sd[f"{norm}.bias"])
    for fc in ("fc1", "fc2"):
        getattr(block, fc).kernel.assign(sd[f"mlp_channels.{fc}.weight"].T)
        getattr(block, fc).bias.assign(sd[f"mlp_channels.{fc}.bias"])
    np.testing.assert_allclose(to_numpy(block(x)), expected, rtol=0, atol=5e-6)
