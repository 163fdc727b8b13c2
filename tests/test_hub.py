"""Presets and keras-hub: Sequencer2D through keras-hub's own loaders, against timm, on every backend.

keras-hub is an optional extra: scripts/test.sh runs these (marked `hub`) in
passes of their own after installing it; every other test runs without it.
"""

import json
import os
import shutil

from conftest import (
    BACKEND,
    TINY,
    evaluated,
    global_image_data_format,
    normalise,
    record_traced_batches,
    run_cli,
    run_python,
    timm_logits,
    timm_model,
    tiny_model,
    to_numpy,
)
import keras
import numpy as np
import pytest

import keras_sequencer as ks

pytestmark = pytest.mark.hub


@pytest.fixture(scope="module")
def keras_hub():
    return pytest.importorskip("keras_hub", reason="keras-hub is an optional extra: pip install -e '.[hub]'")


PHOTOS = ("chelsea", "astronaut", "coffee", "rocket", "stereo_motorcycle", "hubble_deep_field")


def _photos(names=PHOTOS) -> list[np.ndarray]:
    """Real RGB photos of several sizes and aspect ratios (scikit-image ships them)."""
    from skimage import data

    photos = [getattr(data, name)() for name in names]
    return [(photo[0] if isinstance(photo, tuple) else photo)[..., :3] for photo in photos]


@pytest.fixture(scope="module")
def s_preset(tmp_path_factory, keras_hub):
    """A preset of Sequencer2D-S converted from a perturbed timm checkpoint (`convert --preset`'s function)."""
    from safetensors.numpy import save_file

    folder = tmp_path_factory.mktemp("s_preset")
    checkpoint = folder / "model.safetensors"
    save_file({k: v.numpy().copy() for k, v in timm_model("s").state_dict().items()}, checkpoint)
    return ks.convert_to_preset(str(checkpoint), "s", folder / "sequencer2d_s")


def _timm_features(images_nhwc):
    import torch

    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
        return timm_model("s").forward_features(x).numpy()


def test_preset_from_timm_equals_timm_through_keras_hub_and_this_package(s_preset, keras_hub):
    images = np.random.RandomState(1).randint(0, 256, (2, 56, 70, 3)).astype(np.uint8)
    expected = timm_logits("s", normalise(images))

    classifier = keras_hub.models.ImageClassifier.from_preset(s_preset)
    assert type(classifier).__name__ == "Sequencer2DImageClassifier"
    # Called directly a keras-hub task skips its preprocessor: the network alone, on normalised images.
    np.testing.assert_allclose(to_numpy(classifier(normalise(images))), expected, rtol=0, atol=1e-5)

    backbone = keras_hub.models.Backbone.from_preset(s_preset)
    assert isinstance(backbone, ks.Sequencer2DBackbone)
    np.testing.assert_allclose(to_numpy(backbone(normalise(images))), _timm_features(normalise(images)), atol=1e-5)
    stages = ks.feature_extractor(backbone)(normalise(images))
    assert [tuple(v.shape[1:]) for v in stages.values()] == [(8, 10, 192), (4, 5, 384), (4, 5, 384), (4, 5, 384)]

    model = ks.load_preset(s_preset, classifier_activation=None)  # this package's own loader
    np.testing.assert_allclose(to_numpy(model.predict_on_batch(images.astype("float32"))), expected, atol=1e-5)

    card = open(os.path.join(s_preset, "README.md")).read()
    # Keras' LSTM has one bias where PyTorch's has two that add up (bias_ih + bias_hh): one fewer per gate.
    timm_params = sum(p.numel() for name, p in timm_model("s").named_parameters() if "bias_hh" not in name)
    assert f"| Parameters | {timm_params:,} |" in card and "| Weights | from `model.safetensors` |" in card
    assert "ImageNet-1k top-1" not in card  # a perturbed file is not the published checkpoint
    metadata = json.load(open(os.path.join(s_preset, "metadata.json")))
    assert metadata["keras_sequencer"]["variant"] == "s" and not metadata["keras_sequencer"]["published_weights"]
    assert metadata["parameter_count"] == timm_params - 1000 * 385


def test_raw_photos_through_the_preprocessor_give_timms_top5(s_preset, keras_hub):
    """keras-hub's `predict` on raw uint8 photos (its preprocessor) against timm's eval transform and model."""
    from PIL import Image
    import timm.data
    import torch

    reference = timm_model("s")
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=reference))
    classifier = keras_hub.models.ImageClassifier.from_preset(s_preset)
    converter = classifier.preprocessor.image_converter
    for photo in _photos():
        pixels = transform(Image.fromarray(photo))
        # The converter is torchvision's resize, crop and normalisation up to the resampling kernels' rounding.
        difference = np.abs(to_numpy(converter(photo[None]))[0] - pixels.numpy().transpose(1, 2, 0))
        assert difference.mean() < 0.01 and difference.max() < 0.2, (photo.shape, difference.mean(), difference.max())
        with torch.no_grad():
            expected = reference(pixels[None]).numpy()[0]
        logits = to_numpy(classifier.predict(photo[None], verbose=0))[0]
        assert list(np.argsort(-logits)[:5]) == list(np.argsort(-expected)[:5]), photo.shape
        np.testing.assert_allclose(logits, expected, atol=0.05 * np.abs(expected).max())


def test_fit_on_real_photos_lowers_the_loss(tmp_path, keras_hub):
    model = tiny_model(classes=3)
    preset = ks.save_preset(model, tmp_path / "tiny")
    classifier = keras_hub.models.ImageClassifier.from_preset(preset, num_classes=4)  # a new head, the same body
    classifier.preprocessor.image_size = (32, 32)
    photos = np.stack([photo[:200, :240] for photo in _photos()[:4]])  # raw uint8, resized by the preprocessor
    labels = np.arange(4)
    classifier.compile(optimizer=keras.optimizers.Adam(3e-3),
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))  # fmt: skip
    history = classifier.fit(photos, labels, batch_size=4, epochs=15, verbose=0)
    assert history.history["loss"][-1] < 0.5 * history.history["loss"][0]
    np.testing.assert_array_equal(to_numpy(classifier.predict(photos, verbose=0)).argmax(-1), labels)


def test_a_tasks_predict_is_this_packages_compiled_predict(tmp_path, keras_hub, monkeypatch, xla_requests):
    """The task's `predict` is this package's models': XLA-compiled on TensorFlow without a GPU (Keras would
    not), and where each batch shape is compiled (there and on JAX) 65 raw photos at batch size 4 reach
    keras-hub's `predict` as the first 64 and then the last one with 3 copies, whose outputs are dropped: one
    batch shape compiled. Neither on PyTorch, nor on TensorFlow with `xla_predict_on_cpu` off. On every
    backend, where keras-hub would batch them with tf.data (no grain), the photos reach it batched by a
    tf.data pipeline without autotuning. The outputs equal the network called on the preprocessed photos."""
    classifier = keras_hub.models.ImageClassifier.from_preset(ks.save_preset(tiny_model(classes=3), tmp_path / "t"))
    classifier.preprocessor.image_size = (32, 32)
    photos = np.stack([photo[:120, :160] for photo in _photos()])[np.arange(65) % len(PHOTOS)]  # raw uint8
    expected = to_numpy(classifier(classifier.preprocessor(photos), training=False))

    given, autotuned, jit_requests = [], [], xla_requests
    hub_predict = keras_hub.models.ImageClassifier.predict

    def recording_predict(self, images, *args, **kwargs):
        batched = hasattr(images, "element_spec")  # a tf.data pipeline
        given.append(sum(len(batch) for batch in images) if batched else len(images))
        autotuned.append(images.options().autotune.enabled if batched else None)
        return hub_predict(self, images, *args, **kwargs)

    monkeypatch.setattr(keras_hub.models.ImageClassifier, "predict", recording_predict)
    traced = record_traced_batches(monkeypatch, classifier)

    jit_requests.clear()  # from here on: the requests of `predict`
    got = classifier.predict(photos, batch_size=4, verbose=0)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert given == ([64, 4] if BACKEND in ("jax", "tensorflow") else [65]), given
    from keras_sequencer import hub

    # keras-hub batches arrays with tf.data unless grain is installed: then it keeps its own batching
    assert autotuned == [False if hub.KERAS_HUB_BATCHES_WITH_TF_DATA else None] * len(given), autotuned
    if BACKEND == "jax":
        assert traced == [4], traced
    if BACKEND == "tensorflow":
        assert jit_requests and not classifier.jit_compile  # predict compiled; training keeps Keras' default
        classifier.xla_predict_on_cpu = False  # the next `predict` builds its step again
        given.clear(), jit_requests.clear()
        np.testing.assert_allclose(classifier.predict(photos, batch_size=4, verbose=0), expected, rtol=0, atol=1e-5)
        assert given == [65] and not jit_requests


def test_a_tasks_evaluate_is_this_packages_compiled_evaluate(tmp_path, keras_hub, monkeypatch, xla_requests):
    """The task's `evaluate` of raw photos, labels and sample weights (positional, in keras-hub's order) gives
    the loss and accuracy computed here from the network called on the preprocessed photos; it is XLA-compiled
    on TensorFlow without a GPU (Keras would not) and, where keras-hub would batch the arrays with tf.data (no
    grain), they reach it batched by a tf.data pipeline without autotuning."""
    classifier = keras_hub.models.ImageClassifier.from_preset(ks.save_preset(tiny_model(classes=3), tmp_path / "t"))
    classifier.preprocessor.image_size = (32, 32)
    photos = np.stack([photo[:120, :160] for photo in _photos()])[np.arange(10) % len(PHOTOS)]  # raw uint8
    labels = np.arange(10) % 3
    weights = np.random.RandomState(0).uniform(0.5, 2.0, 10).astype("float32")
    logits = to_numpy(classifier(classifier.preprocessor(photos), training=False))
    loss, accuracy = evaluated(logits, labels, weights, batch_size=4)

    autotuned, hub_evaluate = [], keras_hub.models.ImageClassifier.evaluate

    def recording_evaluate(self, data=None, *args, **kwargs):
        autotuned.append(data.options().autotune.enabled if hasattr(data, "element_spec") else None)
        return hub_evaluate(self, data, *args, **kwargs)

    monkeypatch.setattr(keras_hub.models.ImageClassifier, "evaluate", recording_evaluate)
    classifier.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                       weighted_metrics=["accuracy"])  # fmt: skip
    xla_requests.clear()
    # keras-hub's order of the positional arguments: x, y, batch_size, sample_weight
    got = classifier.evaluate(photos, labels, 4, weights, verbose=0, return_dict=True)
    np.testing.assert_allclose([got["loss"], got["accuracy"]], [loss, accuracy], rtol=1e-5)
    from keras_sequencer import hub

    assert autotuned == [False if hub.KERAS_HUB_BATCHES_WITH_TF_DATA else None], autotuned
    assert bool(xla_requests) == (BACKEND == "tensorflow")


@pytest.mark.backend_agnostic
def test_a_task_from_a_preset_has_every_layer_built(tmp_path, keras_hub):
    """Keras' JAX trainer runs a whole eager forward pass before the first `predict` when any layer of a model
    is unbuilt; the weightless preprocessor and its resizing layer count too."""
    preset = ks.save_preset(tiny_model(classes=3), tmp_path / "tiny")
    for task in (keras_hub.models.ImageClassifier.from_preset(preset),
                 keras_hub.models.ImageClassifier.from_preset(preset, num_classes=4),
                 keras_hub.models.Backbone.from_preset(preset)):  # fmt: skip
        assert [layer.name for layer in task._flatten_layers() if not layer.built] == [], type(task).__name__


def test_a_task_pools_channels_last_whatever_the_global_image_data_format(tmp_path, keras_hub):
    """keras-hub's classifier pools the backbone's output over the axes the backbone names (`data_format`)."""
    preset = ks.save_preset(tiny_model(classes=3), tmp_path / "tiny")
    images = np.random.RandomState(5).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    expected = to_numpy(keras_hub.models.ImageClassifier.from_preset(preset).predict(images, verbose=0))
    with global_image_data_format("channels_first"):
        classifier = keras_hub.models.ImageClassifier.from_preset(preset)
        np.testing.assert_allclose(to_numpy(classifier.predict(images, verbose=0)), expected, rtol=0, atol=1e-6)


def test_a_rejected_input_leaves_the_classifier_whole(tmp_path, keras_hub):
    classifier = keras_hub.models.ImageClassifier.from_preset(ks.save_preset(tiny_model(classes=3), tmp_path / "t"))
    images = np.random.RandomState(4).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    expected = to_numpy(classifier.predict(images, verbose=0))
    classifier.preprocessor = None  # images go to the backbone as given
    for bad in (images[:, :5, :5], images[0], images[..., :2]):
        with pytest.raises(ValueError, match="Model '.*' (needs images of at least 8x8|takes)"):
            classifier.predict(bad, verbose=0)
    converter = keras_hub.models.ImageClassifier.from_preset(str(tmp_path / "t")).preprocessor.image_converter
    np.testing.assert_allclose(to_numpy(classifier.predict(to_numpy(converter(images)), verbose=0)), expected,
                               atol=1e-5)  # fmt: skip


@pytest.mark.backend_agnostic
def test_a_preset_survives_save_load_save_byte_stable(tmp_path, keras_hub):
    first = ks.save_preset(tiny_model(classes=3), tmp_path / "first")
    second = ks.save_preset(keras_hub.models.ImageClassifier.from_preset(first), tmp_path / "second")
    for file in ("config.json", "task.json", "preprocessor.json", "image_converter.json"):
        with open(os.path.join(first, file), "rb") as a, open(os.path.join(second, file), "rb") as b:
            assert a.read() == b.read(), file
    third = ks.load_preset(second, classifier_activation=None)
    images = np.random.RandomState(2).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(
        to_numpy(third.predict_on_batch(images)),
        to_numpy(tiny_model(classes=3).predict_on_batch(images)),
        atol=1e-6,
    )


@pytest.mark.backend_agnostic
def test_a_presets_files_do_not_depend_on_what_the_process_made_before(tmp_path, keras_hub):
    from keras_sequencer import hub

    ks.save_preset(tiny_model(), tmp_path / "first")
    hub.Sequencer2DImageClassifierPreprocessor(hub.Sequencer2DImageConverter())  # takes Keras' default names
    ks.save_preset(tiny_model(), tmp_path / "second")
    for file in ("config.json", "task.json", "preprocessor.json", "image_converter.json"):
        assert (tmp_path / "first" / file).read_bytes() == (tmp_path / "second" / file).read_bytes(), file


@pytest.mark.backend_agnostic
def test_bad_presets_say_what_is_wrong(s_preset, tmp_path):
    with pytest.raises(ValueError, match=r"is Sequencer2D-S with layers=\(4, 3, 8, 3\); model 'sequencer2d_m' has "):
        ks.Sequencer2DM(weights=s_preset)

    broken = shutil.copytree(s_preset, tmp_path / "no_weights")
    os.remove(broken / "model.weights.h5")
    with pytest.raises(ValueError, match="has no model.weights.h5 .*incomplete"):
        ks.load_preset(broken)

    newer = shutil.copytree(s_preset, tmp_path / "newer")
    metadata = json.load(open(newer / "metadata.json"))
    metadata["keras_sequencer"]["format_version"] = 99
    json.dump(metadata, open(newer / "metadata.json", "w"))
    with pytest.raises(ValueError, match="preset format 99; this keras-sequencer reads format 1 and older. Upgrade"):
        ks.load_preset(newer)

    with pytest.raises(ValueError, match="already exists and is not an empty folder"):
        ks.save_preset(tiny_model(), s_preset)
    # A model that does not normalise the way the preset's preprocessor will is refused, not saved wrong.
    with pytest.raises(ValueError, match=r"layers before the stem: none"):
        ks.save_preset(tiny_model(include_preprocessing=False), tmp_path / "unnormalised")
    inputs = keras.Input((32, 32, 3))
    rescaled = ks.Sequencer2D(**TINY, weights=None, input_tensor=keras.layers.Rescaling(1 / 255)(inputs))
    with pytest.raises(ValueError, match=r"layers before the stem: rescaling\w* \(Rescaling\), preprocessing"):
        ks.save_preset(rescaled, tmp_path / "rescaled")
    assert not os.path.exists(tmp_path / "unnormalised") and not os.path.exists(tmp_path / "rescaled")
    result = run_cli("convert", "x.safetensors", "--variant", "s", "--preset", s_preset)
    assert result.returncode == 2 and "already exists" in result.stderr and "Traceback" not in result.stderr
    # The command line writes the same preset as the function.
    result = run_cli("convert", os.path.join(os.path.dirname(s_preset), "model.safetensors"), "--variant", "s",
                     "--preset", tmp_path / "from_cli")  # fmt: skip
    assert result.returncode == 0 and "README.md" in result.stdout, result.stderr[-3000:]
    for file in ("config.json", "task.json", "preprocessor.json"):
        assert (tmp_path / "from_cli" / file).read_bytes() == open(os.path.join(s_preset, file), "rb").read()


@pytest.mark.backend_agnostic
def test_presets_load_without_keras_hub(tmp_path, keras_hub):
    """With keras-hub hidden, the package imports, loads a preset exactly, and says what writing needs."""
    model = tiny_model(classes=3)
    preset = ks.save_preset(model, tmp_path / "tiny")
    images = np.random.RandomState(3).uniform(0, 255, (2, 32, 36, 3)).astype("float32")
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "expected.npy", to_numpy(model.predict_on_batch(images)))
    code = f"""
import sys
sys.modules["keras_hub"] = None  # as if keras-hub were not installed
import numpy as np
import keras_sequencer as ks
assert not ks.models.backbone.KERAS_HUB_AVAILABLE and "tensorflow_text" not in sys.modules
model = ks.load_preset({preset!r}, classifier_activation=None)
np.testing.assert_allclose(np.asarray(model.predict_on_batch(np.load({str(tmp_path / "images.npy")!r}))),
                           np.load({str(tmp_path / "expected.npy")!r}), rtol=0, atol=1e-6)
for attempt in (lambda: __import__("keras_sequencer.hub"), lambda: ks.save_preset(model, {str(tmp_path / "x")!r})):
    try:
        attempt()
        raise AssertionError("no ImportError")
    except ImportError as error:
        assert "pip install 'keras-sequencer[hub]'" in str(error), error
print("ok")
"""
    assert run_python(code).strip().endswith("ok")


@pytest.mark.backend_agnostic
def test_the_card_cites_the_published_accuracy_only_for_the_published_file(s_preset, tmp_path, monkeypatch):
    import dataclasses

    from keras_sequencer import pretrained

    checkpoint = os.path.join(os.path.dirname(s_preset), "model.safetensors")
    # Pretend this file is the one published for S: its hash pinned in the registry.
    published = dataclasses.replace(ks.CHECKPOINTS["s"], sha256=pretrained.sha256_of(checkpoint))
    monkeypatch.setitem(ks.CHECKPOINTS, "s", published)
    card = open(os.path.join(ks.convert_to_preset(checkpoint, "s", tmp_path / "p"), "README.md")).read()
    assert f"| ImageNet-1k top-1 | {published.top1:.3f} % at 224x224" in card
    assert f"timm `{published.tag}` ({published.hub_repo})" in card and "license: apache-2.0" in card


@pytest.mark.backend_agnostic
def test_the_converter_inside_tf_data_equals_the_direct_call(keras_hub):
    """In tf.data (keras-hub's route for fit / predict) image sizes may be unknown; the result is the same."""
    import tensorflow as tf

    from keras_sequencer.hub import Sequencer2DImageConverter

    converter = Sequencer2DImageConverter(image_size=(64, 64))
    photos = _photos()[:4]
    dataset = tf.data.Dataset.from_generator(
        lambda: iter(photos), output_signature=tf.TensorSpec((None, None, 3), tf.uint8)
    ).map(converter)
    for photo, converted in zip(photos, dataset, strict=True):
        np.testing.assert_allclose(converted.numpy(), to_numpy(converter(photo[None]))[0], rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match=r"square crops.*Received: image_size=\(64, 80\)"):
        converter.image_size = (64, 80)


@pytest.mark.backend_agnostic
@pytest.mark.skipif(BACKEND != "tensorflow", reason="a property of Keras' TensorFlow trainer (the TensorFlow pass)")
def test_a_tasks_training_step_is_traced_once_on_tensorflow(keras_hub, monkeypatch):
    """keras-hub's task builds its optimizer before the first step, as this package's models do: otherwise Keras'
    TensorFlow trainer builds it inside the traced step and traces the whole step twice."""
    from keras_sequencer import hub
    from keras_sequencer.layers import BiLSTM2D, token_mixing

    traced = []
    real = token_mixing.mix
    monkeypatch.setattr(token_mixing, "mix", lambda *args, **kwargs: traced.append(1) or real(*args, **kwargs))
    classifier = hub.Sequencer2DImageClassifier(ks.Sequencer2DBackbone(**TINY, image_shape=(32, 32, 3)), num_classes=5)
    classifier.compile(optimizer="adamw", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.RandomState(0).uniform(-2, 2, (8, 32, 32, 3)).astype("float32")
    traced.clear()
    classifier.fit(x, np.arange(8) % 5, epochs=2, batch_size=4, verbose=0)
    assert len(traced) == sum(isinstance(layer, BiLSTM2D) for layer in classifier._flatten_layers())
    assert classifier.optimizer.built


@pytest.mark.backend_agnostic
@pytest.mark.skipif(BACKEND != "tensorflow", reason="`batch_parts` > 1 is TensorFlow's (the TensorFlow pass)")
def test_a_tasks_steps_follow_its_backbones_batch_parts(keras_hub, monkeypatch, xla_requests):
    """A new `batch_parts` on the task's backbone makes the task's next `predict`, `evaluate` and training step
    trace again, in parts, and, as for this package's models, its `predict` and `evaluate` are then not
    compiled with XLA (which would run the slices as one program); outputs and loss stay the whole batch's."""
    from keras_sequencer import hub
    from keras_sequencer.models.backbone import Sequencer2DBackbone

    sliced, real = [], Sequencer2DBackbone._call_in_parts
    monkeypatch.setattr(Sequencer2DBackbone, "_call_in_parts", lambda *a, **k: sliced.append(1) or real(*a, **k))
    classifier = hub.Sequencer2DImageClassifier(ks.Sequencer2DBackbone(**TINY, image_shape=(32, 32, 3)), num_classes=5)
    classifier.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.RandomState(0).uniform(-2, 2, (6, 32, 32, 3)).astype("float32")
    y = np.arange(6) % 5
    classifier.train_on_batch(x, y)
    expected, loss = to_numpy(classifier.predict_on_batch(x)), classifier.test_on_batch(x, y)
    assert xla_requests and classifier._predict_compiled and classifier._test_compiled
    steps = (classifier.predict_function, classifier.test_function, classifier.train_function)

    classifier.backbone.batch_parts = 2
    sliced.clear(), xla_requests.clear()
    np.testing.assert_allclose(to_numpy(classifier.predict_on_batch(x)), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(classifier.test_on_batch(x, y), loss, rtol=1e-5)
    classifier.train_on_batch(x, y)
    rebuilt = (classifier.predict_function, classifier.test_function, classifier.train_function)
    assert all(new is not old for new, old in zip(rebuilt, steps, strict=True))
    assert len(sliced) == 3  # each step traced once, in parts
    assert not xla_requests and not classifier._predict_compiled and not classifier._test_compiled
