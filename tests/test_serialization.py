"""Saved models and weights reload in a fresh process, on every backend."""

import json

from conftest import BACKEND, TINY, run_python, to_numpy
import numpy as np
import pytest

import keras_sequencer as ks

_RELOAD = """
import json, sys
import numpy as np, keras
import keras_sequencer as ks
x = np.load({x!r})
if {kind!r} == "keras":
    model = keras.models.load_model({path!r})
else:
    model = ks.Sequencer2D(**json.loads({config!r}), classes=5, classifier_activation=None, drop_path_rate=0.1)
    model.load_weights({path!r})
np.save({out!r}, keras.ops.convert_to_numpy(model.predict_on_batch(x)))
print(type(model).__name__, model.min_image_size)
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("saved")
    # drop_path_rate > 0 gives the blocks random state; it must not disturb reloading.
    model = ks.Sequencer2D(**TINY, classes=5, classifier_activation=None, drop_path_rate=0.1)
    x = np.random.RandomState(0).uniform(0, 255, (2, 24, 40, 3)).astype("float32")
    np.save(d / "x.npy", x)
    model.save(d / "model.keras")
    model.save_weights(d / "model.weights.h5")
    return d, to_numpy(model.predict_on_batch(x))


@pytest.mark.parametrize("target", ["tensorflow", "jax", "torch"])
@pytest.mark.parametrize("kind", ["keras", "weights"])
def test_reload_in_a_fresh_process_on_every_backend(saved, kind, target):
    d, expected = saved
    path = d / ("model.keras" if kind == "keras" else "model.weights.h5")
    out = d / f"out_{kind}_{target}.npy"
    code = _RELOAD.format(x=str(d / "x.npy"), kind=kind, path=str(path), config=json.dumps(TINY), out=str(out))
    stdout = run_python(code, backend=target)
    assert "Sequencer2DModel 8" in stdout  # the model class and its input check survive
    np.testing.assert_allclose(np.load(out), expected, rtol=0, atol=1e-5, err_msg=f"{BACKEND} -> {target}")


def test_config_round_trip_rebuilds_the_same_graph():
    model = ks.Sequencer2D(**TINY, include_top=False, pooling="max", include_preprocessing=False)
    clone = ks.models.Sequencer2DModel.from_config(model.get_config())
    assert type(clone) is ks.models.Sequencer2DModel
    assert [layer.get_config() for layer in clone.layers] == [layer.get_config() for layer in model.layers]
    assert clone.count_params() == model.count_params()
