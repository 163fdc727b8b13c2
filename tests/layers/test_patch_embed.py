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
def test_torch_inference_convolves_channels_last_views_to_the_same_bit():
    """Without autograd PatchEmbed on PyTorch convolves permuted views of its input: the output of Keras'
    convolution to the bit (sides not a multiple of the patch floor-truncated), contiguous, input untouched."""
    import torch

    layer = PatchEmbed(5, 3)
    x = torch.from_numpy(np.random.RandomState(0).randn(2, 10, 11, 4).astype("float32"))
    layer.build(x.shape)
    layer.proj.bias.assign(np.arange(5, dtype="float32"))
    original = x.clone()
    with torch.no_grad():
        direct = layer(x)
    expected = layer.proj(x).detach()  # autograd on: Keras' convolution
    assert direct.shape == (2, 3, 3, 5) and direct.is_contiguous() and torch.equal(x, original)
    np.testing.assert_array_equal(direct.numpy(), expected.numpy())
    with torch.no_grad():
        np.testing.assert_allclose(direct.numpy(), _convolve(x.numpy(), layer), rtol=0, atol=1e-5)


def _convolve(x, layer):
    """Non-overlapping patches times the kernel, in NumPy."""
    size, kernel = layer.patch_size, layer.proj.kernel.numpy()
    rows, cols = x.shape[1] // size, x.shape[2] // size
    patches = x[:, : rows * size, : cols * size].reshape(len(x), rows, size, cols, size, -1).transpose(0, 1, 3, 2, 4, 5)
    return patches.reshape(len(x), rows, cols, -1) @ kernel.reshape(-1, kernel.shape[-1]) + layer.proj.bias.numpy()
