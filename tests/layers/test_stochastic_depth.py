"""StochasticDepth: identity at inference, whole samples dropped at the rate in training."""

from conftest import run_layer_test, to_numpy
import numpy as np
import pytest

from keras_sequencer.layers import StochasticDepth


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
