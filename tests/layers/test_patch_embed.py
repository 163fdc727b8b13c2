"""PatchEmbed: the stem and downsampling convolution."""

from conftest import BACKEND, run_layer_test
import numpy as np
import pytest

from keras_sequencer.layers import PatchEmbed


def test_patch_embed_layer_contract():
    run_layer_test(PatchEmbed, {"filters": 5, "patch_size": 3}, (2, 9, 11, 4), (2, 3, 3, 5))


def test_patch_embed_rejects_small_input():
    with pytest.raises(ValueError, match=r"height of at least 7.*Received: input shape=\(1, 5, 9, 3\)"):
        PatchEmbed(4, 7)(np.zeros((1, 5, 9, 3), "float32"))


@pytest.mark.skipif(BACKEND != "torch", reason="PyTorch runs eagerly; the other backends trace the layer into a graph")
def test_torch_inference_convolves_channels_last_views_to_the_same_bit(monkeypatch):
    """Without autograd PatchEmbed on PyTorch convolves a channels-last view of its input: the output of Keras'
    convolution to the bit (sides not a multiple of the patch floor-truncated), for a contiguous input and for a
    permuted channels-first one; the input untouched."""
    import torch

    direct = []
    real = PatchEmbed._torch_inference
    monkeypatch.setattr(PatchEmbed, "_torch_inference", lambda self, x: direct.append(1) or real(self, x))
    layer = PatchEmbed(5, 3)
    images = torch.from_numpy(np.random.RandomState(0).randn(2, 4, 10, 11).astype("float32"))
    layer.build((2, 10, 11, 4))
    layer.proj.bias.assign(np.arange(5, dtype="float32"))
    for x in (images.permute(0, 2, 3, 1).contiguous(), images.permute(0, 2, 3, 1)):
        original = x.clone()
        with torch.no_grad():
            out = layer(x)
        expected = layer.proj(x).detach()  # autograd on: Keras' convolution
        assert out.shape == (2, 3, 3, 5) and torch.equal(x, original)
        np.testing.assert_array_equal(out.numpy(), expected.numpy())
        with torch.no_grad():
            np.testing.assert_allclose(out.numpy(), _convolve(x.numpy(), layer), rtol=0, atol=1e-5)
    assert direct == [1, 1]


def _convolve(x, layer):
    """Non-overlapping patches times the kernel, in NumPy."""
    size, kernel = layer.patch_size, layer.proj.kernel.numpy()
    rows, cols = x.shape[1] // size, x.shape[2] // size
    patches = x[:, : rows * size, : cols * size].reshape(len(x), rows, size, cols, size, -1).transpose(0, 1, 3, 2, 4, 5)
    return patches.reshape(len(x), rows, cols, -1) @ kernel.reshape(-1, kernel.shape[-1]) + layer.proj.bias.numpy()
