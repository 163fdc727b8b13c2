"""Research tools: effective receptive fields and accuracy against resolution on real images, MAC counts."""

import json

from conftest import TINY, run_cli, to_numpy
import keras
import numpy as np
import pytest

import keras_sequencer as ks
from keras_sequencer.analysis import count_macs, effective_receptive_field, erf_for_display
from keras_sequencer.presets import VARIANTS


def _photos(size):
    """Two real photographs shipped with scikit-image, resized, normalised to about [-1, 1]."""
    import skimage.data
    from skimage.transform import resize

    photos = [skimage.data.chelsea(), skimage.data.coffee()]
    return np.stack([resize(p, (size, size), anti_aliasing=True) * 2 - 1 for p in photos]).astype("float32")


def test_erf_equals_finite_differences_on_photos():
    keras.utils.set_random_seed(1)
    model = ks.Sequencer2D(**TINY, weights=None, include_preprocessing=False, include_top=False)
    images = _photos(16)
    erf = effective_receptive_field(model, images, stage=-1)
    assert erf.shape == (16, 16) and erf.max() > 0

    # Direct: central differences of sum_c relu(F[centre]) for every input value, one image at a time.
    stage = keras.Model(model.inputs, model.get_layer(ks.stage_info(model)[-1]["layer"]).output)
    eps, expected = 1e-2, np.zeros((16, 16))
    for image in images.astype("float64"):
        steps = np.eye(image.size).reshape(image.size, *image.shape) * eps
        batch = np.concatenate([image + steps, image - steps]).astype("float32")
        features = to_numpy(stage.predict(batch, batch_size=256, verbose=0))
        centre = np.maximum(features[:, features.shape[1] // 2, features.shape[2] // 2, :], 0).sum(-1)
        gradient = ((centre[: image.size] - centre[image.size :]) / (2 * eps)).reshape(image.shape)
        expected += np.maximum(gradient, 0).sum(-1)
    expected /= len(images)
    np.testing.assert_allclose(erf, expected, rtol=0, atol=5e-3 * expected.max())  # float32 FD noise
    assert erf_for_display(erf).max() == pytest.approx(1.0)


@pytest.mark.backend_agnostic
def test_erf_command_writes_the_plot_of_its_numbers(tmp_path):
    from PIL import Image
    import skimage.data

    from keras_sequencer.imagenet import load_image

    for name in ("astronaut", "rocket"):
        Image.fromarray(getattr(skimage.data, name)()).save(tmp_path / f"{name}.png")
    keras.utils.set_random_seed(2)
    model = ks.Sequencer2D(**TINY, weights=None, include_top=False)
    model.save(tmp_path / "tiny.keras")
    result = run_cli("erf", "--model", tmp_path / "tiny.keras", "--images", tmp_path, "--size", 32, "--stage", 1,
                  "--output", tmp_path / "erf.png")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "erf.png").stat().st_size > 5_000
    plotted = np.load(tmp_path / "erf.npy")
    images = np.stack([load_image(str(tmp_path / f"{n}.png"), size=32) for n in ("astronaut", "rocket")])
    np.testing.assert_allclose(plotted, effective_receptive_field(model, images, stage=1), rtol=1e-4, atol=1e-7)


@pytest.mark.backend_agnostic
def test_eval_resolution_on_fashion_mnist_matches_a_direct_count(tmp_path):
    from keras_sequencer.data import eval_transform, load_fashion_mnist

    (x_train, y_train), (x_test, y_test) = load_fashion_mnist()
    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 1))
    model = ks.Sequencer2D(layers=(1, 1), patch_sizes=(4, 1), embed_dims=(32, 32), hidden_sizes=(8, 8),
                           input_tensor=keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs),
                           include_preprocessing=False, classes=10, weights=None)  # fmt: skip
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit(x_train[:3000].astype("float32"), y_train[:3000], batch_size=64, epochs=1, verbose=0)
    model.save(tmp_path / "fm.keras")

    result = run_cli("eval-resolution", "--model", tmp_path / "fm.keras", "--dataset", "fashion_mnist", "--limit", 200,
                  "--resolutions", 20, 28, 40, "--trained-at", 28, "--output", tmp_path / "out")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "resolution.png").stat().st_size > 5_000
    plotted = json.loads((tmp_path / "out" / "resolution.json").read_text())
    assert plotted["resolutions"] == [20, 28, 40] and plotted["images"] == 200
    for size, accuracy in zip(plotted["resolutions"], plotted["accuracy"], strict=True):
        images = np.stack([eval_transform(image, size).numpy() for image in x_test[:200]])
        direct = (to_numpy(model.predict(images, verbose=0)).argmax(-1) == y_test[:200]).mean()
        assert accuracy == pytest.approx(direct, abs=1e-9), size
    assert plotted["accuracy"][1] > 0.4  # at the training resolution: far above chance (0.1)


@pytest.mark.backend_agnostic
@pytest.mark.parametrize("variant", ["s", "m", "l"])
def test_count_macs_equals_torch_flop_counter_on_timm_and_the_papers_flops(variant):
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    # Everything but the LSTMs, exactly: torch's FLOP counter on timm's model (it has no formula for aten::lstm).
    reference = timm.create_model(f"sequencer2d_{variant}").eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        reference(torch.zeros(1, 3, 112, 112))
    assert 2 * count_macs(variant, 112, include_lstm=False) == counter.get_total_flops()
    # With the LSTMs: the paper's "FLOPs" at 224 (Table 1: 8.4G / 11.1G / 16.6G, rounded; they are MACs).
    paper = {"s": 8.4e9, "m": 11.1e9, "l": 16.6e9}[variant]
    assert abs(count_macs(variant) / paper - 1) < 0.01
    with pytest.raises(ValueError, match="does not divide"):
        count_macs(variant, 230)
    with pytest.raises(ValueError, match="BiLSTM2D mixer only"):
        count_macs({**VARIANTS["s"], "rnn_type": "gru"})


def _photo_0_255(size):
    import skimage.data
    from skimage.transform import resize

    return (resize(skimage.data.chelsea(), (size, size), anti_aliasing=True) * 255).astype("float32")


@pytest.mark.parametrize("stage", [1, -1])
def test_grad_cam_gradient_equals_finite_differences_on_a_photo(stage):
    from conftest import tiny_model

    from keras_sequencer.analysis import grad_cam, token_gradient

    model = tiny_model(classes=5)
    image = _photo_0_255(32)
    tokens, gradient, index = token_gradient(model, image, stage=stage)
    logits = to_numpy(model.predict_on_batch(image[None]))[0]
    assert index == int(np.argmax(logits)) and tokens.shape == gradient.shape

    # The layers after the stage, applied in order, reproduce the model's logits from the token map.
    names = [layer.name for layer in model.layers]
    after = model.layers[names.index(ks.stage_info(model)[stage]["layer"]) + 1 :]

    def head(x):
        for layer in after:
            x = layer(x)
        return to_numpy(x)

    np.testing.assert_allclose(head(tokens[None])[0], logits, rtol=1e-5, atol=1e-5)
    # Central differences of the class score over every token entry, in float64 steps.
    eps = 1e-2
    steps = np.eye(tokens.size).reshape(tokens.size, *tokens.shape) * eps
    scores = head(np.concatenate([tokens + steps, tokens - steps]).astype("float32"))[:, index]
    expected = ((scores[: tokens.size] - scores[tokens.size :]) / (2 * eps)).reshape(tokens.shape)
    np.testing.assert_allclose(gradient, expected, rtol=0, atol=2e-3 * np.abs(expected).max())

    # A softmax head is differentiated at its logit: the same gradient as the logits model with these weights.
    softmax = tiny_model(classes=5, classifier_activation="softmax")
    np.testing.assert_allclose(token_gradient(softmax, image, stage=stage)[1], gradient, rtol=1e-5, atol=1e-7)

    cam, cam_index = grad_cam(model, image, stage=stage)
    direct = np.maximum((tokens * expected.mean(axis=(0, 1))).sum(-1), 0)
    assert cam_index == index and cam.shape == tokens.shape[:2] and cam.max() == pytest.approx(1.0)
    np.testing.assert_allclose(cam, direct / direct.max(), atol=1e-2)


@pytest.mark.backend_agnostic
def test_grad_cam_command_writes_the_overlay_of_its_numbers(tmp_path):
    from conftest import tiny_model
    from PIL import Image

    from keras_sequencer.analysis import grad_cam
    from keras_sequencer.imagenet import load_image

    Image.fromarray(_photo_0_255(48).astype("uint8")).save(tmp_path / "cat.png")
    model = tiny_model(classes=5)
    model.save(tmp_path / "tiny.keras")
    result = run_cli("grad-cam", tmp_path / "cat.png", "--model", tmp_path / "tiny.keras", "--size", 32,
                     "--class-index", 3, "--output", tmp_path / "cam.png")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "class 3" in result.stdout and (tmp_path / "cam.png").stat().st_size > 5_000
    expected, _ = grad_cam(model, load_image(str(tmp_path / "cat.png"), size=32).astype("float32"), class_index=3)
    np.testing.assert_allclose(np.load(tmp_path / "cam.npy"), expected, rtol=1e-4, atol=1e-6)
    bad = run_cli("grad-cam", tmp_path / "cat.png", "--model", tmp_path / "tiny.keras", "--size", 32,
                  "--class-index", 7, "--output", tmp_path / "cam.png")  # fmt: skip
    assert bad.returncode == 2 and "class_index` must be an int in [0, 5)" in bad.stderr
    assert "Traceback" not in bad.stderr
