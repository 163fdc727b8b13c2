"""Feature maps: every stage's output with its stride and channels."""

from conftest import TINY, random_images, to_numpy
import numpy as np
import pytest

import keras_sequencer as ks


@pytest.mark.backend_agnostic
def test_stage_info_of_the_variants():
    """Strides and channels as timm's `feature_info` lists them for S (the graph alone: no call runs)."""
    import timm

    reference = timm.create_model("sequencer2d_s").feature_info
    info = ks.stage_info(ks.Sequencer2DS(weights=None, include_top=False))
    assert [(i["name"], i["stride"], i["channels"]) for i in info] == [
        (f"stage{k}", stage["reduction"], stage["num_chs"]) for k, stage in enumerate(reference)
    ]


@pytest.mark.parametrize("size", [(32, 32), (16, 40)])
def test_feature_extractor_gives_every_stage_with_its_stride(size):
    backbone = ks.Sequencer2D(**TINY, weights=None, include_top=False)
    info = ks.stage_info(backbone)
    assert [(i["name"], i["stride"], i["channels"]) for i in info] == [
        ("stage0", 4, 16), ("stage1", 8, 24), ("stage2", 8, 24)
    ]  # fmt: skip
    extractor = ks.feature_extractor(backbone)
    images = random_images(1, *size)
    features = {k: to_numpy(v) for k, v in extractor.predict_on_batch(images).items()}
    for entry in info:
        assert features[entry["name"]].shape == (1, size[0] // entry["stride"], size[1] // entry["stride"],
                                                 entry["channels"])  # fmt: skip
    # The last stage, through the model's final LayerNorm, is the headless model's output.
    normed = to_numpy(backbone.get_layer("norm")(features["stage2"]))
    np.testing.assert_allclose(normed, to_numpy(backbone.predict_on_batch(images)), rtol=0, atol=1e-5)


def test_stage_info_rejects_other_models():
    import keras

    inputs = keras.Input((8, 8, 3))
    with pytest.raises(ValueError, match="not a Sequencer model"):
        ks.stage_info(keras.Model(inputs, keras.layers.Dense(2)(inputs)))
