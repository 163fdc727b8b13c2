"""`python -m keras_sequencer ...` in a subprocess, checked against timm, LiteRT and the registry.

The commands run on the TensorFlow backend (the first pass); the models they
build are checked on every backend by the models' own tests.
"""

import glob
import os
import platform
import zipfile

from conftest import (
    BACKEND,
    NO_JAX_CACHE_SETTINGS,
    TINY,
    normalise,
    run_cli,
    timm_logits,
    timm_state_dict,
    tiny_model,
    to_numpy,
)
import numpy as np
import pytest

import keras_sequencer as ks
from keras_sequencer.export import run_tflite, tflite_interpreter

pytestmark = pytest.mark.backend_agnostic


def test_convert_then_predict(tmp_path):
    from PIL import Image
    from safetensors.numpy import save_file

    save_file(timm_state_dict("s"), tmp_path / "model.safetensors")
    out = tmp_path / "s.weights.h5"
    result = run_cli("convert", tmp_path / "model.safetensors", "--variant", "s", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "Sequencer2D-S" in result.stdout

    model = ks.Sequencer2DS(weights=str(out), classifier_activation=None)
    image = np.random.RandomState(0).randint(0, 256, (1, 224, 224, 3)).astype(np.uint8)
    np.testing.assert_allclose(to_numpy(model(image.astype("float32"))), timm_logits("s", normalise(image)), atol=1e-5)

    Image.fromarray(image[0]).save(tmp_path / "img.png")
    result = run_cli("predict", tmp_path / "img.png", "--weights", out, "--top", "3")
    assert result.returncode == 0, result.stderr
    from keras_sequencer.imagenet import load_image

    # predict applies the eval transform (resize to 256, centre crop 224) first.
    cropped = load_image(tmp_path / "img.png")[None].astype(np.uint8)
    expected = ks.decode_predictions(timm_logits("s", normalise(cropped)), top=3)[0]
    printed = [line.split()[1] for line in result.stdout.splitlines()[1:]]
    assert printed == [name for _, name, _ in expected]

    # On JAX the command keeps its compiled programs in Keras' folder for its next run, unless told not to
    # (at --size 64, a smaller program to compile than 224's).
    small = load_image(tmp_path / "img.png", size=64)[None].astype(np.uint8)
    small_top3 = [name for _, name, _ in ks.decode_predictions(timm_logits("s", normalise(small)), top=3)[0]]
    for flags, kept in (([], True), (["--no-compilation-cache"], False)):
        home = tmp_path / f"home{len(flags)}"
        result = run_cli("predict", tmp_path / "img.png", "--weights", out, "--top", "3", "--size", "64", *flags,
                         backend="jax", env={"KERAS_HOME": str(home), **NO_JAX_CACHE_SETTINGS})  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        assert [line.split()[1] for line in result.stdout.splitlines()[1:]] == small_top3
        programs = glob.glob(str(home / "cache" / "keras_sequencer" / "jax" / "*-cache"))
        assert bool(programs) is kept, programs


def test_the_predict_command_calls_the_model_directly_for_a_few_files(monkeypatch):
    """The `predict` command's probabilities equal `model.predict`'s; on CPU-only TensorFlow (where `predict`
    compiles with XLA) up to `_DIRECT_AT_MOST` files go through one direct call of the model, more through
    `predict` (this module runs on TensorFlow)."""
    from keras_sequencer import __main__ as cli

    model = tiny_model(input_shape=(16, 16, 3), classifier_activation="softmax")
    images = np.random.RandomState(0).uniform(0, 255, (5, 16, 16, 3)).astype("float32")  # as `load_image` gives
    expected = model.predict(images, verbose=0)
    calls, real_call, real_predict = [], type(model).__call__, model.predict

    def recording_call(self, x, **kwargs):
        calls.append(("call", x.shape[0]))
        return real_call(self, x, **kwargs)

    def recording_predict(x, **kwargs):
        calls.append(("predict", len(x)))
        return real_predict(x, **kwargs)

    monkeypatch.setattr(type(model), "__call__", recording_call)
    monkeypatch.setattr(model, "predict", recording_predict)
    for at_most, way in ((5, "call"), (4, "predict")):
        monkeypatch.setattr(cli, "_DIRECT_AT_MOST", at_most)
        calls.clear()
        np.testing.assert_allclose(cli._classify(model, images), expected, rtol=0, atol=1e-6)
        assert calls[0] == ((way, 5) if BACKEND == "tensorflow" else ("predict", 5)), calls


def test_convert_reports_a_wrong_variant(tmp_path):
    from safetensors.numpy import save_file

    save_file(timm_state_dict("s"), tmp_path / "model.safetensors")
    result = run_cli("convert", tmp_path / "model.safetensors", "--variant", "m", "--out", tmp_path / "m.weights.h5")
    assert result.returncode == 2
    assert "It looks like sequencer2d_s" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "m.weights.h5").exists()


def test_manifest_command_prints_the_registry():
    import json

    from keras_sequencer.presets import manifest

    result = run_cli("manifest")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == manifest()


def test_cli_exports_a_keras_file(tmp_path):
    model = tiny_model(input_shape=(None, None, 3))
    model.save(tmp_path / "model.keras")

    def cli(*args):
        return run_cli("export", tmp_path / "model.keras", *args)

    result = cli("--output", str(tmp_path / "m.tflite"))
    assert result.returncode == 2 and "--input-size" in result.stderr, result.stderr[-2000:]
    result = cli("--input-size", "32", "40", "--lstm", "fused", "--output", str(tmp_path / "m.tflite"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{4 * sum(TINY['layers'])}  UNIDIRECTIONAL_SEQUENCE_LSTM" in result.stdout, result.stdout
    images = np.random.default_rng(0).uniform(0, 255, (1, 32, 40, 3)).astype("float32")
    got = run_tflite(tflite_interpreter(str(tmp_path / "m.tflite")), images)
    np.testing.assert_allclose(got, to_numpy(model.predict_on_batch(images)), rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["train", "--dataset", "fashion_mnist", "--epochs", "0"],
            "argument --epochs: must be an integer >= 1, not '0'",
        ),
        (["train", "--dataset", "fashion_mnist", "--epochs", "-1"], "argument --epochs: must be an integer >= 1"),
        (["train", "--dataset", "fashion_mnist", "--steps-per-epoch", "0"], "argument --steps-per-epoch: must be"),
        (["train", "--dataset", "fashion_mnist", "--batch-size", "0"], "argument --batch-size: must be"),
        (["demo", "--batch-size", "two"], "argument --batch-size: must be an integer >= 1, not 'two'"),
        (["predict", "cat.jpg", "--size", "10"], "argument --size: must be an integer >= 14 (the product of the"),
        (["predict", "cat.jpg", "--top", "0"], "argument --top: must be an integer >= 1"),
        (["bench", "--runs", "0"], "argument --runs: must be an integer >= 1"),
        (["demo", "--seed", "-1"], "argument --seed: must be an integer >= 0, not '-1'"),
        (["eval-resolution", "--dataset", "fashion_mnist", "--crop-pct", "1.5"], "argument --crop-pct: must be a"),
    ],
)
def test_numbers_out_of_range_are_one_line_errors(argv, message, capsys):
    from keras_sequencer.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error and "Traceback" not in error, error


def test_the_demo_command_hands_its_arguments_to_run_demo(monkeypatch, capsys):
    """`demo`'s flags reach `run_demo` (the training itself: tests/test_train.py), `--seed` included."""
    from keras_sequencer import demo
    from keras_sequencer.__main__ import main

    calls = []
    metrics = {"test_accuracy": 0.5, "test_images": 8, "epochs": 1, "train_seconds": 1.0, "backend": "tensorflow"}
    monkeypatch.setattr(demo, "run_small_ops_side_by_side", lambda: False)
    monkeypatch.setattr(demo, "run_demo", lambda *args, **kwargs: calls.append((args, kwargs)) or metrics)
    for argv, seed in (([], 0), (["--seed", "7"], 7)):
        assert main(["demo", "--output", "out", "--epochs", "1", "--limit", "8", *argv]) == 0
        assert calls.pop() == (("out",), {"epochs": 1, "batch_size": 256, "data_dir": None, "limit": 8, "seed": seed})
    assert "Fashion-MNIST test accuracy: 0.5000 (8 images; 1 epochs" in capsys.readouterr().out


def test_file_mistakes_are_one_line_errors_before_any_model_is_built(tmp_path, capsys):
    from keras_sequencer.__main__ import main

    (tmp_path / "notes.jpg").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "weights.npz").write_bytes(b"PK")
    with zipfile.ZipFile(tmp_path / "whole.keras", "w") as archive:
        archive.writestr("config.json", "{}" * 4000)
        archive.writestr("model.weights.h5", os.urandom(20000))
    whole = (tmp_path / "whole.keras").read_bytes()
    (tmp_path / "cut.keras").write_bytes(whole[: len(whole) // 2])  # a copy that stopped half-way
    cases = [
        (["predict", str(tmp_path / "missing.jpg")], "missing.jpg is not found"),
        (["predict", str(tmp_path)], "is a folder"),
        (["predict", str(tmp_path / "notes.jpg")], "notes.jpg cannot be read as an image (UnidentifiedImageError"),
        (["predict", str(tmp_path / "empty.png")], "empty.png cannot be read as an image"),
        (["convert", str(tmp_path / "weights.npz"), "--variant", "s", "--out", str(tmp_path / "no" / "s.weights.h5")],
         "which does not exist"),
        (["convert", str(tmp_path / "weights.npz"), "--variant", "s", "--out", str(tmp_path / "s.weights.h5")],
         "a Keras `.weights.h5` file, a timm / authors' checkpoint (.safetensors"),
        (["export", str(tmp_path / "m.keras"), "--output", str(tmp_path / "m.tflite"), "--quantize", "int8",
          "--calibration", str(tmp_path / "missing.npy")], "missing.npy does not exist"),
        (["export", str(tmp_path / "m.keras"), "--output", str(tmp_path / "m.tflite")], "m.keras does not exist"),
        (["export", str(tmp_path / "cut.keras"), "--output", str(tmp_path / "m.tflite")],
         "cut.keras is truncated or damaged: it is not a whole zip archive"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main(argv) == 2, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in lines[0], (argv, lines)


@pytest.mark.skipif(
    not (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"),
    reason="--keep-freed-memory sets glibc's malloc parameters; this platform has no glibc",
)
def test_train_keep_freed_memory_then_runs_the_command(tmp_path):
    """The flag sets glibc's parameters in the process, says so, and then runs the command (here: a clear error
    about the dataset); without glibc it is a one-line error and nothing trains (the parameters themselves:
    tests/test_allocator.py)."""
    result = run_cli("train", "--dataset", f"folder:{tmp_path}", "--keep-freed-memory")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "glibc keeps the memory this process frees (--keep-freed-memory)" in result.stderr, result.stderr[-3000:]
    assert f"reads {tmp_path}/train, which is not a folder" in result.stderr.splitlines()[-1], result.stderr[-3000:]


def test_keep_freed_memory_refused_without_glibc(monkeypatch, capsys):
    from keras_sequencer.__main__ import main

    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    for argv in (["train", "--dataset", "fashion_mnist", "--keep-freed-memory"],
                 ["bench", "--keep-freed-memory", "--no-train"]):  # fmt: skip
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "needs Linux with glibc; this Python runs on Darwin" in lines[0], (argv, lines)
