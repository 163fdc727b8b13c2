"""Sequencer2DBlock: layer contract, gradients through both residual branches, and timm's block."""

import warnings

from conftest import (
    BACKEND,
    keras_calls_without_autograd,
    load_timm_lstm2d,
    loss_and_gradients,
    run_layer_test,
    timm_lstm2d_gradients,
    to_numpy,
)
import keras
import numpy as np
import pytest

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


def _block_and_timms():
    """A Sequencer2DBlock carrying the weights of a perturbed timm Sequencer2dBlock (8 channels, hidden size 3)."""
    from timm.models.sequencer import Sequencer2dBlock
    import torch

    torch.manual_seed(3)
    module = Sequencer2dBlock(8, 3, mlp_ratio=3.0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    block = Sequencer2DBlock(3, mlp_ratio=3.0)
    block.build((2, 4, 3, 8))
    sd = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    load_timm_lstm2d(block.rnn_tokens, module.rnn_tokens)
    for norm in ("norm1", "norm2"):
        getattr(block, norm).gamma.assign(sd[f"{norm}.weight"])
        getattr(block, norm).beta.assign(sd[f"{norm}.bias"])
    for fc in ("fc1", "fc2"):
        getattr(block, fc).kernel.assign(sd[f"mlp_channels.{fc}.weight"].T)
        getattr(block, fc).bias.assign(sd[f"mlp_channels.{fc}.bias"])
    return block, module


def test_sequencer2d_block_matches_timm_block():
    import torch

    block, module = _block_and_timms()
    x = np.random.RandomState(2).randn(2, 4, 3, 8).astype("float32")
    with torch.no_grad():
        expected = module.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(to_numpy(block(x)), expected, rtol=0, atol=5e-6)


def _direct_calls(monkeypatch):
    """A list that grows by one whenever a block computes by `_torch_inference`."""
    direct = []
    real = Sequencer2DBlock._torch_inference
    monkeypatch.setattr(Sequencer2DBlock, "_torch_inference", lambda self, x: direct.append(1) or real(self, x))
    return direct


def _without_autograd(block, x, training=None):
    import torch

    with torch.no_grad():
        return block(x, training=training).float().numpy()


@pytest.mark.skipif(BACKEND != "torch", reason="PyTorch runs eagerly; the other backends trace a block into a graph")
def test_torch_inference_skips_the_sublayer_calls_to_the_same_bit(monkeypatch):
    """Without autograd a float32 block on PyTorch runs torch's functions on its variables directly: the sublayers'
    calls' output without autograd to the bit (with it, within PyTorch's LSTM kernels' last bit), timm's block
    within float32 rounding, the input untouched. Training, autograd, `torch.autocast`, forward hooks, float16
    policies, LoRA and quantized layers keep the sublayers' calls."""
    import torch

    from keras_sequencer.layers import eager_torch

    monkeypatch.setattr(eager_torch, "onednn_linear", lambda: False)  # torch's matmul: Keras' calls' bits
    block, module = _block_and_timms()
    x = torch.from_numpy(np.random.RandomState(2).randn(2, 4, 3, 8).astype("float32"))
    original = x.clone()
    direct = _direct_calls(monkeypatch)

    def runs_direct(block, training=None):
        before = len(direct)
        _without_autograd(block, x, training)
        return len(direct) > before

    out = _without_autograd(block, x)
    assert direct == [1] and torch.equal(x, original)
    with keras_calls_without_autograd():
        np.testing.assert_array_equal(out, block(x).numpy())
    np.testing.assert_allclose(out, block(x).detach().numpy(), rtol=0, atol=1e-6)  # autograd on: the same calls
    assert direct == [1]
    with torch.no_grad():
        np.testing.assert_allclose(out, module.eval()(x).numpy(), rtol=0, atol=5e-6)
    assert not runs_direct(block, training=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not runs_direct(block)
    fired = []
    hook = block.fc1.register_forward_hook(lambda *args: fired.append(1))
    assert not runs_direct(block) and fired == [1]
    hook.remove()
    assert runs_direct(block)

    half = Sequencer2DBlock(3, mlp_ratio=3.0, dtype="mixed_float16")  # Keras' matmul: float16 in float32 on a CPU
    half.build(x.shape)
    assert not runs_direct(half)
    with torch.no_grad():
        assert eager_torch.runs_torch_functions(x, block._sublayers())
        assert not eager_torch.runs_torch_functions(x.bfloat16(), block._sublayers())  # not the block's dtype
    block.fc2.enable_lora(2)
    assert not runs_direct(block)
    block, _ = _block_and_timms()
    block.rnn_tokens.fc.quantize("int8")
    assert not runs_direct(block)


@pytest.mark.skipif(BACKEND != "torch", reason="PyTorch runs eagerly; the other backends trace a block into a graph")
def test_torch_inference_with_onednn_linears_matches_the_sublayer_calls_and_timm(monkeypatch):
    """Where oneDNN's linear is used for the blocks' float32 `Dense` matmuls (AMD CPUs with AVX-512 from Zen 5
    on), the block's eager output equals the sublayers' calls and timm's block within float32 rounding, every
    `Dense` matmul of the block goes through it, and the input is untouched. The rule is checked on given CPUs."""
    import torch

    from keras_sequencer.layers import eager_torch

    assert eager_torch.onednn_pays(("AuthenticAMD", 26), frozenset({"avx2", "avx512f"}))
    assert not eager_torch.onednn_pays(("AuthenticAMD", 25), frozenset({"avx2", "avx512f"}))  # Zen 4: not measured
    assert not eager_torch.onednn_pays(("AuthenticAMD", 26), frozenset({"avx2"}))
    assert not eager_torch.onednn_pays(("GenuineIntel", 6), frozenset({"avx2", "avx512f"}))  # MKL's own CPUs
    assert not eager_torch.onednn_pays(None, frozenset({"avx512f"}))
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        pytest.skip("this torch build has no oneDNN linear (torch.ops.mkldnn._linear_pointwise)")
    monkeypatch.setattr(eager_torch, "onednn_linear", lambda: True)
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *args: calls.append(1) or real(*args))
    block, module = _block_and_timms()
    x = torch.from_numpy(np.random.RandomState(2).randn(2, 5, 3, 8).astype("float32") * 2.0)
    original = x.clone()
    direct = _direct_calls(monkeypatch)
    out = _without_autograd(block, x)
    assert direct == [1] and len(calls) == 3 and torch.equal(x, original)  # the mixer's fc, fc1, fc2
    with keras_calls_without_autograd():
        np.testing.assert_allclose(out, block(x).numpy(), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        np.testing.assert_allclose(out, module.eval()(x).numpy(), rtol=0, atol=5e-6)
    calls.clear()
    with warnings.catch_warnings(), torch.backends.mkldnn.flags(enabled=False):  # switched off: torch's matmul
        warnings.simplefilter("ignore")  # the flags' note on Intel GPUs' TF32
        np.testing.assert_allclose(_without_autograd(block, x), out, rtol=1e-6, atol=1e-6)
    assert direct == [1, 1] and not calls


@pytest.mark.skipif(BACKEND != "torch", reason="torch.autocast is PyTorch's")
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_torch_autocast_block_equals_timms_under_the_same_autocast(grad):
    """Under `torch.autocast("cpu", bfloat16)` a block (Keras' calls, `torch.lstm` in bfloat16) gives timm's
    block's output under the same autocast within bfloat16 rounding, with and without autograd. The input is
    bfloat16, as a stem's convolution gives it under autocast (a float32 one reaches timm's `nn.LSTM` as float32,
    which oneDNN refuses under autocast on CPUs without AVX512-BF16; our block casts it)."""
    import torch

    block, module = _block_and_timms()
    x = torch.from_numpy(np.random.RandomState(2).randn(2, 4, 3, 8).astype("float32"))
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = block(x.bfloat16()), module.eval()(x.bfloat16())
    out, expected = out.detach().float().numpy(), expected.detach().float().numpy()
    with torch.no_grad():
        exact = module(x).numpy()
    tolerance = 0.01 * np.abs(exact).max()  # bfloat16 keeps 8 bits of mantissa: ~0.4 % per rounding
    np.testing.assert_allclose(out, expected, rtol=0, atol=tolerance)
    np.testing.assert_allclose(out, exact, rtol=0, atol=tolerance)


@pytest.mark.skipif(BACKEND != "torch", reason="PyTorch runs eagerly; the other backends trace a block into a graph")
@pytest.mark.parametrize(
    "options", [{"with_fc": False}, {"union": "add"}, {"rnn_type": "gru"}, {"bidirectional": False}], ids=str
)
def test_torch_inference_of_the_ablations_equals_the_sublayer_calls(monkeypatch, options):
    """The paper's ablation options mix through Keras' layers; the rest of the block still runs directly."""
    block = Sequencer2DBlock(3, mlp_ratio=2.0, **options)
    x = np.random.RandomState(0).randn(2, 4, 5, 12).astype("float32")
    block.build(x.shape)
    rng = np.random.default_rng(1)
    block.set_weights([w + rng.normal(0, 0.2, w.shape).astype("float32") for w in block.get_weights()])
    direct = _direct_calls(monkeypatch)
    out = _without_autograd(block, x)
    assert direct == [1]
    np.testing.assert_array_equal(out, to_numpy(block(x)))


# `tf.function` (how `fit` runs a step) is TensorFlow's; JAX's case is jitted, PyTorch's eager.
_MODES = {"eager": False, "tf_function": True} if BACKEND == "tensorflow" else {BACKEND: False}


@pytest.mark.parametrize("graph", _MODES.values(), ids=_MODES.keys())
def test_training_gradients_equal_timms_autograd(graph):
    """In training mode (TensorFlow: the GELU and the layer norms with their written-out gradients, eagerly and in
    a `tf.function`) the block's gradients w.r.t. its input and every weight equal PyTorch autograd through timm's
    block."""
    import torch

    block, module = _block_and_timms()
    x = np.random.RandomState(2).randn(2, 4, 3, 8).astype("float32") * 2.0
    weights = np.random.RandomState(4).randn(*x.shape).astype("float32")
    x_torch = torch.tensor(x, requires_grad=True)
    expected_loss = (module.train()(x_torch) * torch.from_numpy(weights)).sum()
    expected_loss.backward()
    loss, d_x, d_values = loss_and_gradients(block, x, weights, graph=graph)
    assert loss == pytest.approx(float(expected_loss), abs=1e-4)
    np.testing.assert_allclose(d_x, x_torch.grad.numpy(), atol=1e-5, rtol=1e-5)
    grads = {name: p.grad.numpy() for name, p in module.named_parameters()}
    found = {v.path: d for v, d in zip(block.trainable_variables, d_values, strict=True)}
    expected = {}
    for norm in ("norm1", "norm2"):
        layer = getattr(block, norm)
        expected[layer.gamma.path], expected[layer.beta.path] = grads[f"{norm}.weight"], grads[f"{norm}.bias"]
    for fc in ("fc1", "fc2"):
        layer = getattr(block, fc)
        expected[layer.kernel.path] = grads[f"mlp_channels.{fc}.weight"].T
        expected[layer.bias.path] = grads[f"mlp_channels.{fc}.bias"]
    expected.update(timm_lstm2d_gradients(block.rnn_tokens, grads, prefix="rnn_tokens."))
    assert found.keys() == expected.keys()
    for path, gradient in expected.items():
        np.testing.assert_allclose(found[path], gradient, atol=1e-5, rtol=1e-5, err_msg=path)


@pytest.mark.skipif(BACKEND != "torch", reason="PyTorch runs eagerly; the other backends trace a block into a graph")
def test_torch_bfloat16_inference_skips_the_sublayer_calls_to_the_same_bit(monkeypatch):
    """Under "mixed_bfloat16" a block on PyTorch without autograd runs torch's functions too (matmuls in bfloat16
    on kept copies of the weights, layer norms in float32): the sublayers' calls' output to the bit, before and
    after the weights change, for a bfloat16 input and a float32 one (cast as Keras casts a layer's input)."""
    import torch

    block, _ = _block_and_timms()
    half = Sequencer2DBlock(3, mlp_ratio=3.0, dtype="mixed_bfloat16")
    half.build((2, 4, 3, 8))
    half.set_weights(block.get_weights())
    direct = _direct_calls(monkeypatch)
    x = torch.from_numpy(np.random.RandomState(2).randn(2, 4, 3, 8).astype("float32"))
    for step in range(2):
        for inputs in (x.bfloat16(), x):
            out = _without_autograd(half, inputs)
            with keras_calls_without_autograd():
                np.testing.assert_array_equal(out, half(inputs).float().numpy())
        assert len(direct) == 2 * (step + 1)
        half.set_weights([w * 1.5 + 0.01 for w in half.get_weights()])  # in place: the kept copies must follow
