"""PatchEmbed: the stem and downsampling convolution."""

from conftest import run_layer_test
import numpy as np
import pytest

from keras_sequencer.layers import PatchEmbed


def test_patch_embed_layer_contract():
    run_layer_test(PatchEmbed, {"filters": 5, "patch_size": 3}, (2, 9, 11, 4), (2, 3, 3, 5))


def test_patch_embed_rejects_small_input():
    with pytest.raises(ValueError, match=r"height of at least 7.*Received: input shape=\(1, 5, 9, 3\)"):
        PatchEmbed(4, 7)(np.zeros((1, 5, 9, 3), "float32"))
