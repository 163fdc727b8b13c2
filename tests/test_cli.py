"""`python -m keras_sequencer ...` in a subprocess, checked against timm."""

import os
import subprocess
import sys

from conftest import BACKEND, REPO, normalise, timm_logits, timm_state_dict, to_numpy
import numpy as np

import keras_sequencer as ks


def _cli(*args):
    env = {**os.environ, "KERAS_BACKEND": BACKEND, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-m", "keras_sequencer", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )


def test_convert_then_predict(tmp_path):
    from PIL import Image
    from safetensors.numpy import save_file

    save_file(timm_state_dict("s"), tmp_path / "model.safetensors")
    out = tmp_path / "s.weights.h5"
    result = _cli("convert", tmp_path / "model.safetensors", "--variant", "s", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "Sequencer2D-S" in result.stdout

    model = ks.Sequencer2DS(weights=str(out), classifier_activation=None)
    image = np.random.RandomState(0).randint(0, 256, (1, 224, 224, 3)).astype(np.uint8)
    np.testing.assert_allclose(
        to_numpy(model.predict_on_batch(image.astype("float32"))), timm_logits("s", normalise(image)), atol=1e-5
    )

    Image.fromarray(image[0]).save(tmp_path / "img.png")
    result = _cli("predict", tmp_path / "img.png", "--weights", out, "--top", "3")
    assert result.returncode == 0, result.stderr
    from keras_sequencer.imagenet import load_image

    # predict applies the eval transform (resize to 256, centre crop 224) first.
    cropped = load_image(tmp_path / "img.png")[None].astype(np.uint8)
    expected = ks.decode_predictions(timm_logits("s", normalise(cropped)), top=3)[0]
    printed = [line.split()[1] for line in result.stdout.splitlines()[1:]]
    assert printed == [name for _, name, _ in expected]


def test_convert_reports_a_wrong_variant(tmp_path):
    from safetensors.numpy import save_file

    save_file(timm_state_dict("s"), tmp_path / "model.safetensors")
    result = _cli("convert", tmp_path / "model.safetensors", "--variant", "m", "--out", tmp_path / "m.weights.h5")
    assert result.returncode == 2
    assert "It looks like sequencer2d_s" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "m.weights.h5").exists()


def test_manifest_command_prints_the_registry():
    import json

    from keras_sequencer.pretrained import manifest

    result = _cli("manifest")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == manifest()
