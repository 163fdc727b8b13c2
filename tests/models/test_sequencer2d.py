"""The Sequencer2D builder: parity with timm, resolution independence, heads, options, named models, errors.

Parity: every timm parameter is perturbed (`conftest.timm_model`), the
state_dict goes through `keras_sequencer.convert_state_dict` in both published
layouts, and the logits must agree with timm's on this backend.
"""

import os

from conftest import (
    BACKEND,
    TINY,
    authors_layout,
    global_dtype_policy,
    global_image_data_format,
    normalise,
    random_images,
    timm_logits,
    timm_model,
    timm_state_dict,
    to_numpy,
)
import keras
import numpy as np
import pytest

import keras_sequencer as ks
from keras_sequencer.layers import PatchEmbed, Sequencer2DBlock
from keras_sequencer.models.weights import assign
from keras_sequencer.presets import ABLATIONS, VARIANTS, variant_config

# === Parity with timm ===

BUILDERS = {"s": ks.Sequencer2DS, "m": ks.Sequencer2DM, "l": ks.Sequencer2DL}
ATOL = 1e-5  # 10x inside the 1e-4 a port may differ by


def _images(height, width, batch=2, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (batch, height, width, 3)).astype(np.uint8)


def _check(variant, layout, height, width, include_preprocessing, implementation="auto", predict=True):
    """Logits of the converted model against timm's: through `predict_on_batch` (XLA-compiled on TensorFlow and
    JAX), or with `predict=False` through a direct call (on TensorFlow eager, without the ~20 s of compiling L)."""
    sd = timm_state_dict(variant)
    if layout == "authors":
        sd = authors_layout(sd, variant_config(variant)["layers"])
    model = BUILDERS[variant](
        weights=None,
        classifier_activation=None,
        include_preprocessing=include_preprocessing,
        implementation=implementation,
    )
    assign(model, ks.convert_state_dict(sd, variant_config(variant)))
    images = _images(height, width)
    expected = timm_logits(variant, normalise(images))
    x = images.astype(np.float32) if include_preprocessing else normalise(images)
    got = to_numpy(model.predict_on_batch(x) if predict else model(x, training=False))
    assert got.shape == expected.shape
    assert np.abs(expected).max() > 0.5  # logits of a meaningful size, not a degenerate head
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize(
    "layout,height,width,include_preprocessing,implementation",
    [
        ("timm", 224, 224, True, "auto"),
        ("authors", 112, 196, False, "keras"),
        ("authors", 112, 196, False, "fused"),
        ("timm", 98, 70, True, "scan"),
        ("timm", 98, 70, True, "unrolled"),
    ],
)
def test_sequencer2d_s_matches_timm(layout, height, width, include_preprocessing, implementation):
    """The default path at the paper's size (torch.lstm on PyTorch), and Keras' layers and each fused loop at
    non-square sizes, in both layouts. TensorFlow's own LSTM kernel, a training path, is compared with timm's
    layer in tests/layers."""
    _check("s", layout, height, width, include_preprocessing, implementation)


@pytest.mark.slow
@pytest.mark.parametrize("variant,layout", [("m", "timm"), ("l", "authors")])
def test_sequencer2d_m_l_match_timm(variant, layout):
    """M and L differ from S in depths and widths only: their conversion is what is checked here; `predict`'s
    compiled paths are S's tests'."""
    _check(variant, layout, 56, 84, include_preprocessing=False, predict=False)


@pytest.mark.parametrize("implementation", ["auto", "keras"])
def test_mixed_bfloat16_is_as_close_to_timm_as_timms_own_autocast(implementation):
    """Keras' "mixed_bfloat16" policy (bfloat16 compute, float32 variables): our logits stay as close to timm's
    float32 logits as timm's under `torch.autocast(bfloat16)` do, the top-1 classes agree, and the head
    computes in float32 (so logits and probabilities come back float32)."""
    import torch

    with global_dtype_policy("mixed_bfloat16"):
        model = ks.Sequencer2DS(weights=None, classifier_activation=None, implementation=implementation)
    assign(model, ks.convert_state_dict(timm_state_dict("s"), variant_config("s")))
    images = _images(112, 112, batch=4)
    expected = timm_logits("s", normalise(images))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = timm_logits("s", normalise(images))
    got = to_numpy(model.predict_on_batch(images.astype(np.float32)))
    assert model.get_layer("stage0_block0").compute_dtype == "bfloat16"
    assert got.dtype == np.float32
    ours, theirs = np.abs(got - expected).max(), np.abs(autocast - expected).max()
    assert theirs > 1e-3  # bfloat16 really ran in the reference (float32 agreement is 1e-5)
    assert ours < 2 * theirs, (ours, theirs)
    np.testing.assert_array_equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.backend_agnostic
@pytest.mark.parametrize("variant", ["s", "m", "l"])
def test_parameter_count_matches_timm(variant):
    """Keras folds PyTorch's second LSTM bias into the first: 4 directions x 4*hidden
    fewer parameters per block. Everything else is the same tensor for tensor."""
    config = variant_config(variant)
    timm_count = sum(p.numel() for p in timm_model(variant).parameters())
    folded = sum(depth * 4 * 4 * h for depth, h in zip(config["layers"], config["hidden_sizes"], strict=True))
    model = BUILDERS[variant](weights=None)
    assert model.count_params() == timm_count - folded


# === The builder ===


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
    """A model built for any image size runs at two sizes with each head, through `predict` and
    `predict_on_batch`. On TensorFlow, where they compile a program per image size with XLA and eager ops
    compile nothing, only the model with the classifier goes through them, the others through direct calls
    (the heads are the same Keras layers either way)."""
    model = _tiny(include_top=include_top, pooling=pooling, classes=7, input_shape=(None, None, 3))
    x = np.random.RandomState(0).uniform(0, 255, (2, 24, 40, 3)).astype("float32")
    square = np.random.RandomState(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    if include_top or BACKEND != "tensorflow":
        y, other = to_numpy(model.predict(x, verbose=0)), to_numpy(model.predict_on_batch(square))
    else:
        y, other = to_numpy(model(x, training=False)), to_numpy(model(square, training=False))
    assert y.shape == expected
    # The same weights run at another (square) size too.
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
    model = _tiny(drop_path_rate=0.3, classifier_activation=None)
    rates = [layer.drop_path_rate for layer in model.layers if isinstance(layer, Sequencer2DBlock)]
    n = sum(TINY["layers"])
    np.testing.assert_allclose(rates, [0.3 * i / (n - 1) for i in range(n)])
    # Stochastic depth is active in training only: training calls drop branches (and differ from each
    # other), inference calls are deterministic and are the default.
    x = random_images(8, 16, seed=5)
    inference = to_numpy(model(x, training=False))
    np.testing.assert_array_equal(to_numpy(model(x)), inference)
    trained = [to_numpy(model(x, training=True)) for _ in range(2)]
    scale = np.abs(inference).max()
    assert np.abs(trained[0] - inference).max() > 1e-2 * scale and np.abs(trained[0] - trained[1]).max() > 1e-2 * scale


@pytest.mark.backend_agnostic
@pytest.mark.parametrize("variant", ["s", "m", "l"])
def test_variants_have_timms_depths_and_widths(variant):
    """The variant table against timm's own models: blocks, channels and LSTM width per stage."""
    import timm

    reference = timm.create_model(f"sequencer2d_{variant}")
    config = variant_config(variant)
    assert tuple(len(stage.blocks) for stage in reference.stages) == config["layers"]
    assert tuple(stage.blocks[0].norm1.normalized_shape[0] for stage in reference.stages) == config["embed_dims"]
    assert tuple(stage.blocks[0].rnn_tokens.rnn_v.hidden_size for stage in reference.stages) == config["hidden_sizes"]
    builder = {"s": ks.Sequencer2DS, "m": ks.Sequencer2DM, "l": ks.Sequencer2DL}[variant]
    assert builder.__name__ in builder.__doc__ and str(config["layers"]) in builder.__doc__


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
    (dict(weights=None, implementation="cudnn"), r"Received: implementation='cudnn'$"),
]


@pytest.mark.backend_agnostic
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


@pytest.mark.backend_agnostic
@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"layers": (0, 0, 0)}, r"`layers` must hold positive ints.*Received: layers=\(0, 0, 0\)$"),
        ({"embed_dims": (16, 24.5, 24)}, r"Received: embed_dims=\(16, 24.5, 24\)$"),
        ({"mlp_ratios": (3.0, -1.0, 3.0)}, r"Received: mlp_ratios=\(3.0, -1.0, 3.0\)$"),
        ({"layer_norm_epsilon": -1}, r"`layer_norm_epsilon` must be a positive number.*layer_norm_epsilon=-1$"),
        ({"classes": True}, r"Received: classes=True$"),
        ({"bidirectional": "no"}, r"`bidirectional` must be True or False. Received: bidirectional='no'$"),
        ({"with_fc": 1}, r"Received: with_fc=1$"),
    ],
)
def test_nonsense_architecture_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ks.Sequencer2D(**{**TINY, **kwargs})


# === The paper's ablations and the registered models ===

GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def _expected_params(config, classes=1000, channels_in=3) -> int:
    """Parameter count implied by the config, written from the definitions (Keras bias convention)."""
    rnn_type = config.get("rnn_type", "lstm")
    dirs = 2 if config.get("bidirectional", True) else 1
    union, with_fc, mixer = config.get("union", "cat"), config.get("with_fc", True), config.get("mixer", "2d")
    total, previous = 0, channels_in
    for depth, patch, c, u, ratio in zip(config["layers"], config["patch_sizes"], config["embed_dims"],
                                         config["hidden_sizes"], config["mlp_ratios"], strict=True):  # fmt: skip
        total += patch * patch * previous * c + c  # patch embedding conv
        per_direction = GATES[rnn_type] * (c * u + u * u + u) + (3 * u if rnn_type == "gru" else 0)
        if mixer == "1d":
            mixer_params = dirs * per_direction
        else:
            scans = 2 if union in ("cat", "add") else 1
            mixed = dirs * u * (2 if union == "cat" else 1)
            mixer_params = scans * dirs * per_direction + ((mixed * c + c) if with_fc else 0)
        hidden = int(ratio * c)
        total += depth * (4 * c + mixer_params + (c * hidden + hidden) + (hidden * c + c))
        previous = c
    return total + 2 * previous + (previous * classes + classes)


@pytest.mark.backend_agnostic
@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_named_ablations_have_the_size_their_definition_implies(name):
    model = ks.create_model(name, weights=None, input_shape=(56, 56, 3))
    assert model.count_params() == _expected_params(ABLATIONS[name]), name
    assert model.name == name


@pytest.mark.backend_agnostic
def test_defaults_are_the_papers_model():
    # Same parameter count formula and same weight layout as the registered S.
    default = ks.Sequencer2DS(weights=None)
    assert default.count_params() == _expected_params(VARIANTS["s"])
    named = ks.create_model("sequencer2d_s", weights=None)
    assert [w.path for w in named.weights] == [w.path for w in default.weights]


SMALL = {"layers": (1, 1), "patch_sizes": (4, 2), "embed_dims": (16, 24), "mlp_ratios": (2.0, 2.0)}
SMALL_OPTIONS = {
    "unidirectional": {"hidden_sizes": (4, 6), "bidirectional": False},
    "add": {"hidden_sizes": (4, 6), "union": "add"},
    "without_fc": {"hidden_sizes": (4, 6), "with_fc": False},
    "vertical": {"hidden_sizes": (8, 12), "union": "vertical", "with_fc": False},
    "horizontal": {"hidden_sizes": (8, 12), "union": "horizontal", "with_fc": False},
    "gru": {"hidden_sizes": (4, 6), "rnn_type": "gru"},
    "rnn": {"hidden_sizes": (4, 6), "rnn_type": "rnn"},
    "vanilla": {"hidden_sizes": (8, 12), "mixer": "1d"},
}


@pytest.mark.backend_agnostic
@pytest.mark.parametrize("option", sorted(SMALL_OPTIONS))
def test_each_option_model_has_the_size_its_definition_implies(option):
    config = {**SMALL, **SMALL_OPTIONS[option]}
    model = ks.Sequencer2D(**config, input_shape=(16, 24, 3), classes=5, classifier_activation=None)
    assert model.count_params() == _expected_params(config, classes=5)


@pytest.mark.backend_agnostic
def test_every_layer_is_built_with_the_model_and_after_reloading(tmp_path):
    """Every layer of each option model, of a model with drop path, of the backbone and of a model reloaded
    from a `.keras` file is built: Keras' JAX trainer runs a whole eager forward pass before the first
    `predict` / `predict_on_batch` when any layer is unbuilt (for S on a CPU that doubled the first call)."""

    def unbuilt(model):
        return sorted(f"{layer.name} ({type(layer).__name__})" for layer in model._flatten_layers() if not layer.built)

    models = {
        option: ks.Sequencer2D(**SMALL, **settings, input_shape=(16, 24, 3), classes=5, weights=None)
        for option, settings in SMALL_OPTIONS.items()
    }
    models["drop_path"] = ks.Sequencer2D(**TINY, drop_path_rate=0.1, weights=None)
    models["backbone"] = ks.Sequencer2DBackbone(**TINY)
    for name, model in models.items():
        assert not unbuilt(model), (name, unbuilt(model))
    models["drop_path"].save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")
    assert not unbuilt(reloaded), unbuilt(reloaded)


def test_channels_last_images_whatever_the_global_image_data_format(tmp_path):
    """The models take channels-last images; a global `image_data_format` of "channels_first" (set by code
    written for PyTorch-style models) changes neither how they are built nor how a saved file loads. Outputs
    come through `predict_on_batch`, but on TensorFlow through direct calls: there each of the models would
    compile its own XLA program, and the format acts when layers are built, not when they run."""
    images = np.random.RandomState(0).uniform(0, 255, (2, 32, 40, 3)).astype("float32")

    def run(model):
        return to_numpy(model(images, training=False) if BACKEND == "tensorflow" else model.predict_on_batch(images))

    model = ks.Sequencer2D(**TINY, classes=5, weights=None)
    backbone = ks.Sequencer2DBackbone(**TINY)
    expected, features = run(model), run(backbone)
    model.save(tmp_path / "m.keras")
    with global_image_data_format("channels_first"):
        rebuilt = ks.Sequencer2D(**TINY, classes=5, weights=None)
        rebuilt.set_weights(model.get_weights())
        rebuilt_backbone = ks.Sequencer2DBackbone(**TINY)
        rebuilt_backbone.set_weights(backbone.get_weights())
        reloaded = keras.saving.load_model(tmp_path / "m.keras")
        pooled = ks.Sequencer2D(**TINY, include_top=False, pooling="max", weights=None)
        np.testing.assert_allclose(run(rebuilt), expected, rtol=0, atol=1e-6)
        np.testing.assert_allclose(run(reloaded), expected, rtol=0, atol=1e-6)
        np.testing.assert_allclose(run(rebuilt_backbone), features, rtol=0, atol=1e-6)
        assert tuple(pooled.output.shape) == (None, TINY["embed_dims"][-1])


def test_every_option_trains_and_survives_saving(tmp_path):
    """One model with a block of each option (their first-stage sizes, 16 channels): one Adam step moves every
    weight (each option's gradient reaches all its weights), and the `.keras` file reloads to the same outputs."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 24, 3))
    x = PatchEmbed(SMALL["embed_dims"][0], SMALL["patch_sizes"][0], name="stem")(inputs)
    for option, settings in SMALL_OPTIONS.items():
        options = {k: v for k, v in settings.items() if k != "hidden_sizes"}
        x = Sequencer2DBlock(settings["hidden_sizes"][0], mlp_ratio=SMALL["mlp_ratios"][0], name=option, **options)(x)
    model = keras.Model(inputs, keras.layers.Dense(5)(keras.layers.GlobalAveragePooling2D()(x)))
    assert {layer.rnn_tokens.__class__.__name__ for layer in model.layers[2:-2]} == {"BiLSTM1D", "BiLSTM2D"}
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 255, (4, 16, 24, 3)).astype("float32"), rng.integers(0, 5, 4)
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = [to_numpy(w).copy() for w in model.trainable_weights]
    loss = float(model.train_on_batch(x, y))  # one Adam step moves every weight that has a gradient
    assert np.isfinite(loss)
    unchanged = [w.path for a, w in zip(before, model.trainable_weights, strict=True) if np.array_equal(a, to_numpy(w))]
    assert not unchanged, f"no gradient reached {unchanged}"
    path = os.path.join(tmp_path, "options.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    for option, settings in SMALL_OPTIONS.items():
        config = reloaded.get_layer(option).get_config()
        assert {k: config[k] for k in settings if k != "hidden_sizes"} == {
            k: v for k, v in settings.items() if k != "hidden_sizes"
        }, option
    np.testing.assert_allclose(to_numpy(reloaded.predict_on_batch(x)), to_numpy(model.predict_on_batch(x)), atol=1e-6)


def test_unknown_and_weightless_names_say_what_is_wrong():
    with pytest.raises(ValueError, match="Unknown model 'sequencer2d_xl'"):
        ks.create_model("sequencer2d_xl")
    with pytest.raises(ValueError, match="no published ImageNet weights"):
        ks.create_model("gru_sequencer2d_s", weights="imagenet")
