"""Sequencer2DBackbone: config round trip, saved files, stage outputs, and the classifier built on it."""

from conftest import TINY, perturb_weights, random_images, to_numpy
import keras
import numpy as np
import pytest

import keras_sequencer as ks


def _backbone(**kwargs):
    keras.utils.set_random_seed(0)
    return perturb_weights(ks.Sequencer2DBackbone(**TINY, **kwargs))


def test_backbone_round_trips_through_its_config_and_a_keras_file(tmp_path):
    backbone = _backbone(include_preprocessing=True)
    images = random_images(2, 32, 40)
    expected = to_numpy(backbone.predict_on_batch(images))
    assert expected.shape == (2, 4, 5, 24)

    rebuilt = ks.Sequencer2DBackbone.from_config(backbone.get_config())
    rebuilt.set_weights(backbone.get_weights())
    np.testing.assert_array_equal(to_numpy(rebuilt.predict_on_batch(images)), expected)
    assert rebuilt.get_config() == backbone.get_config()

    backbone.save(tmp_path / "backbone.keras")
    loaded = keras.saving.load_model(tmp_path / "backbone.keras")
    assert type(loaded) is ks.Sequencer2DBackbone and loaded.architecture == backbone.architecture
    np.testing.assert_allclose(to_numpy(loaded.predict_on_batch(images)), expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"at least 8x8 pixels"):
        loaded.predict(random_images(1, 6, 40))


def test_stage_outputs_and_the_classifier_built_on_the_backbone():
    backbone = _backbone()
    images = random_images(1, 32)
    features = ks.feature_extractor(backbone).predict_on_batch(images)
    recorded = keras.Model(backbone.input, backbone.stage_outputs).predict_on_batch(images)
    assert list(features) == list(recorded) == ["stage0", "stage1", "stage2"]
    for name in features:
        np.testing.assert_array_equal(to_numpy(features[name]), to_numpy(recorded[name]))

    # Sequencer2D is the backbone plus a head: the same layer names, so the same weights give the same map.
    headless = ks.Sequencer2D(**TINY, weights=None, include_top=False, include_preprocessing=False)
    assert [layer.name for layer in headless.layers] == [layer.name for layer in backbone.layers]
    headless.set_weights(backbone.get_weights())
    np.testing.assert_array_equal(
        to_numpy(headless.predict_on_batch(images)), to_numpy(backbone.predict_on_batch(images))
    )


@pytest.mark.backend_agnostic
def test_backbone_refuses_what_cannot_be_built():
    with pytest.raises(ValueError, match="`layers` must hold positive ints"):
        ks.Sequencer2DBackbone(**{**TINY, "layers": (2, 0, 1)})
    with pytest.raises(ValueError, match="one entry per stage"):
        ks.Sequencer2DBackbone(**{**TINY, "hidden_sizes": (4, 6)})
    with pytest.raises(ValueError, match=r"at least 8x8 pixels"):
        ks.Sequencer2DBackbone(**TINY, image_shape=(4, 32, 3))
