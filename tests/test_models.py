"""The builder: resolution independence, heads, pooling, and argument errors."""

from conftest import TINY, global_dtype_policy, to_numpy
import keras
import numpy as np
import pytest

import keras_sequencer as ks
from keras_sequencer.layers import Sequencer2DBlock


def _tiny(**kwargs):
    return ks.Sequencer2D(**TINY, **kwargs)


@pytest.mark.parametrize(
    "include_top,pooling,expected",
    [
        (True, None, (2, 7)),
        (False, None, (2, 3, 5, 24)),  # stride 8: 24 x 40 -> 3 x 5
        (False, "avg", (2, 24)),
        (False, "max", (2, 24)),
    ],
)
def test_any_resolution_with_and_without_top(include_top, pooling, expected):
    model = _tiny(include_top=include_top, pooling=pooling, classes=7, input_shape=(None, None, 3))
    x = np.random.RandomState(0).uniform(0, 255, (2, 24, 40, 3)).astype("float32")
    y = to_numpy(model.predict(x, verbose=0))
    assert y.shape == expected
    # The same weights run at another (square) size too.
    other = to_numpy(model(np.random.RandomState(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")))
    assert other.shape[0] == 2 and other.shape[-1] == expected[-1]


def test_pooling_matches_direct_reduction():
    features = _tiny(include_top=False, input_shape=(16, 24, 3))
    pooled_avg = _tiny(include_top=False, pooling="avg", input_shape=(16, 24, 3))
    pooled_max = _tiny(include_top=False, pooling="max", input_shape=(16, 24, 3))
    for m in (pooled_avg, pooled_max):
        m.set_weights(features.get_weights())
    x = np.random.RandomState(2).uniform(0, 255, (3, 16, 24, 3)).astype("float32")
    fmap = to_numpy(features(x))
    np.testing.assert_allclose(to_numpy(pooled_avg(x)), fmap.mean(axis=(1, 2)), atol=1e-5)
    np.testing.assert_allclose(to_numpy(pooled_max(x)), fmap.max(axis=(1, 2)), atol=1e-5)


def test_softmax_head_is_softmax_of_logits():
    probs = _tiny(classes=5)
    logits = _tiny(classes=5, classifier_activation=None)
    logits.set_weights(probs.get_weights())
    x = np.random.RandomState(3).uniform(0, 255, (2, 16, 16, 3)).astype("float32")
    z = to_numpy(logits(x))
    expected = np.exp(z - z.max(1, keepdims=True))
    np.testing.assert_allclose(to_numpy(probs(x)), expected / expected.sum(1, keepdims=True), atol=1e-6)


def test_preprocessing_is_imagenet_normalisation():
    with_pre = _tiny(classifier_activation=None)
    without = _tiny(classifier_activation=None, include_preprocessing=False)
    without.set_weights(with_pre.get_weights())
    x = np.random.RandomState(4).uniform(0, 255, (2, 16, 16, 3)).astype("float32")
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    normalised = ((x / 255.0 - mean) / std).astype("float32")
    np.testing.assert_allclose(to_numpy(with_pre(x)), to_numpy(without(normalised)), atol=1e-5)
    assert ks.preprocess_input(x) is x


def test_input_tensor_is_used():
    tensor = keras.Input((32, 48, 3))
    model = _tiny(input_tensor=tensor, include_top=False)
    assert model.inputs[0] is tensor
    assert tuple(model.output.shape) == (None, 4, 6, 24)


def test_drop_path_follows_the_authors_linear_ramp():
    model = _tiny(drop_path_rate=0.3)
    rates = [layer.drop_path_rate for layer in model.layers if isinstance(layer, Sequencer2DBlock)]
    n = sum(TINY["layers"])
    np.testing.assert_allclose(rates, [0.3 * i / (n - 1) for i in range(n)])
    # Stochastic depth changes training outputs only.
    x = np.random.RandomState(5).uniform(0, 255, (4, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(to_numpy(model(x)), to_numpy(model(x, training=False)), atol=0)


def test_variants_have_the_papers_depths():
    for builder, depths in ((ks.Sequencer2DS, (4, 3, 8, 3)), (ks.Sequencer2DM, (4, 3, 14, 3))):
        assert builder.__name__ in builder.__doc__
        assert ks.models.variant_config(builder.__name__[-1].lower())["layers"] == depths


# === Errors: each names the argument and ends with "Received: ..." ===

ERROR_CASES = [
    (dict(weights="imagenet_v2"), r"Received: weights='imagenet_v2'$"),
    (dict(weights="/nowhere/model.safetensors"), r"does not exist. Received: weights='/nowhere/model.safetensors'$"),
    (dict(weights="imagenet", classes=10), r"`classes` must be 1000.*Received: classes=10$"),
    (dict(weights="imagenet", classifier_activation="sigmoid"), r"Received: classifier_activation='sigmoid'$"),
    (
        dict(weights="imagenet", input_shape=(224, 224, 1)),
        r"3 \(RGB\) channels. Received: input_shape=\(224, 224, 1\)$",
    ),
    (dict(weights=None, input_shape=(10, 224, 3)), r"at least 14x14.*Received: input_shape=\(10, 224, 3\)$"),
    (dict(weights=None, pooling="mean"), r"`pooling` must be one of.*Received: pooling='mean'$"),
    (dict(weights=None, input_shape=(224, 224)), r"Received: input_shape=\(224, 224\)$"),
]


@pytest.mark.parametrize("kwargs,message", ERROR_CASES)
def test_bad_arguments_fail_before_anything_is_built(kwargs, message, monkeypatch):
    # Any download attempt would be a bug: validation comes first.
    monkeypatch.setattr(keras.utils, "get_file", lambda *a, **k: pytest.fail("download attempted"))
    with pytest.raises(ValueError, match=message):
        ks.Sequencer2DS(**kwargs)


def test_imagenet_needs_a_named_variant():
    with pytest.raises(ValueError, match="Received: weights='imagenet'$"):
        _tiny(weights="imagenet")


def test_mismatched_stage_lists():
    with pytest.raises(ValueError, match=r"one entry per stage. Received: layers=\(2, 1, 1\)"):
        ks.Sequencer2D(**{**TINY, "hidden_sizes": (4, 6)})


@pytest.mark.parametrize(
    "shape,message",
    [
        ((16, 16, 3), r"add a batch axis.*Received: inputs.shape=\(16, 16, 3\)"),
        ((1, 6, 30, 3), r"at least 8x8 pixels.*Received: inputs.shape=\(1, 6, 30, 3\)"),
    ],
)
def test_bad_images_at_call_time(shape, message):
    model = _tiny()
    with pytest.raises(ValueError, match=message):
        model(np.zeros(shape, "float32"))
    with pytest.raises(ValueError, match=message):
        model.predict(np.zeros(shape, "float32"), verbose=0)


def test_predict_matches_eager_calls_and_uses_xla_on_cpu_tensorflow(monkeypatch):
    """`predict` equals a direct call; on CPU-only TensorFlow Keras is asked to XLA-compile its predict step
    (Keras alone would not on a CPU) unless `xla_predict_on_cpu` is turned off."""
    model = _tiny(input_shape=(24, 40, 3), classifier_activation=None)
    x = np.random.RandomState(0).uniform(0, 255, (2, 24, 40, 3)).astype("float32")
    eager = to_numpy(model(x, training=False))
    tensorflow = keras.backend.backend() == "tensorflow"
    jit_requests = []
    if tensorflow:
        import tensorflow as tf

        assert not tf.config.list_logical_devices("GPU"), "this check is for CPU-only TensorFlow"
        real_function = tf.function

        def spy(*args, **kwargs):  # records which functions are asked to be XLA-compiled
            if kwargs.get("jit_compile"):
                jit_requests.append(getattr(args[0], "__name__", None) if args else None)
            return real_function(*args, **kwargs)

        monkeypatch.setattr(tf, "function", spy)
    np.testing.assert_allclose(to_numpy(model.predict_on_batch(x)), eager, rtol=0, atol=1e-5)
    if tensorflow:
        assert "one_step_on_data" in jit_requests  # Keras' predict step
        assert not model.jit_compile  # training keeps Keras' CPU default
        jit_requests.clear()
    model.xla_predict_on_cpu = False
    model.compile(loss="mse")  # a new predict function
    np.testing.assert_allclose(to_numpy(model.predict_on_batch(x)), eager, rtol=0, atol=1e-5)
    if tensorflow:
        assert "one_step_on_data" not in jit_requests
    # Nor under a bfloat16 policy (XLA's CPU bfloat16 is slower than TensorFlow's kernels).
    with global_dtype_policy("mixed_bfloat16"):
        mixed = _tiny(input_shape=(24, 40, 3), classifier_activation=None)
    mixed.set_weights(model.get_weights())
    np.testing.assert_allclose(to_numpy(mixed.predict_on_batch(x)), eager, rtol=0, atol=0.05 * np.abs(eager).max())
    if tensorflow:
        assert "one_step_on_data" not in jit_requests
