"""Training through model.fit: schedule, real-data learning, resume after a kill, many devices."""

import json
import os

from conftest import BACKEND, ONE_BLOCK, TINY, run_python, run_subprocess
import keras
import numpy as np
import pytest

from keras_sequencer import data, train

HAS_FASHION_MNIST = os.path.isdir(data.FASHION_MNIST_DIR)
needs_fashion_mnist = pytest.mark.skipif(
    not HAS_FASHION_MNIST,
    reason="Debian's dataset-fashion-mnist is not installed (scripts/test.sh installs it as root)",
)


@pytest.mark.backend_agnostic
def test_schedule_warms_up_peaks_and_decays():
    recipe = train.get_recipe("imagenet")
    steps = 10
    schedule = train.learning_rate_schedule(recipe, global_batch=1024, steps_per_epoch=steps)
    peak = recipe.lr * 1024 / 2048  # linear scaling from the recipe's global batch
    np.testing.assert_allclose(float(schedule(0)), recipe.warmup_lr, rtol=1e-4)
    np.testing.assert_allclose(float(schedule(recipe.warmup_epochs * steps)), peak, rtol=1e-4)
    np.testing.assert_allclose(float(schedule(recipe.epochs * steps)), recipe.min_lr, rtol=1e-3)
    halfway = (recipe.warmup_epochs + (recipe.epochs - recipe.warmup_epochs) / 2) * steps
    np.testing.assert_allclose(float(schedule(halfway)), (peak + recipe.min_lr) / 2, rtol=1e-3)


@pytest.mark.backend_agnostic
def test_unknown_recipe():
    with pytest.raises(ValueError, match="Received: recipe='cifar100'"):
        train.get_recipe("cifar100")


@pytest.mark.backend_agnostic
@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"steps_per_epoch": 0}, "`steps_per_epoch` must be a positive integer. Received: steps_per_epoch=0"),
        ({"epochs": 0}, "`epochs` must be a positive integer. Received: epochs=0"),
        ({"epochs": -1}, "Received: epochs=-1"),
        ({"batch_size": 0}, "`batch_size` must be a positive integer. Received: batch_size=0"),
        ({"image_size": 0}, "`image_size` must be a positive integer. Received: image_size=0"),
        ({"variant": {"layers": (1, 1)}, "weights": "imagenet"}, "a model built from an architecture dict trains"),
    ],
)
def test_run_refuses_counts_that_would_never_finish_or_train_nothing(kwargs, message):
    with pytest.raises(ValueError, match=message):
        train.run("fashion_mnist", recipe="fashion_mnist", **kwargs)
    with pytest.raises(ValueError, match="`steps_per_epoch` must be an integer >= 1"):
        train.fit(None, None, None, train.get_recipe("fashion_mnist"), 8, 0, "unused")


@pytest.mark.backend_agnostic
def test_run_refuses_a_single_class_dataset(tmp_path):
    from PIL import Image

    for split in ("train", "validation"):
        (tmp_path / split / "only").mkdir(parents=True)
        Image.new("RGB", (16, 16)).save(tmp_path / split / "only" / "0.png")
    with pytest.raises(ValueError, match="has 1 class; a classifier needs at least 2"):
        train.run(f"folder:{tmp_path}", recipe="fashion_mnist")


@needs_fashion_mnist
@pytest.mark.skipif(
    BACKEND != "torch",
    reason="labels come from the backend-independent tf.data pipeline; checked once, in the PyTorch pass",
)
def test_validation_accuracy_of_a_folder_run_equals_a_count_image_by_image(tmp_path):
    """A validation split lacking a training class: the accuracy `run` reports equals a direct count.

    Real images (Fashion-MNIST test photos) written as a folder dataset; each
    validation image's expected label is the index of its folder's name among
    the training split's sorted class names. Before, the validation split
    numbered its own classes, so "Pullover" was scored as the second class.
    """
    from PIL import Image
    import tensorflow as tf

    _, (images, labels) = data.load_fashion_mnist()
    names = ["Pullover", "Sandal", "Trouser"]  # training classes, sorted; validation lacks "Sandal"
    classes = {"Pullover": 2, "Sandal": 5, "Trouser": 1}
    for split, count, kept in (("train", 24, names), ("validation", 12, ["Pullover", "Trouser"])):
        for name in kept:
            (tmp_path / split / name).mkdir(parents=True)
            offset = 0 if split == "train" else 500
            for k, index in enumerate(np.flatnonzero(labels == classes[name])[offset : offset + count]):
                Image.fromarray(images[index].squeeze()).save(tmp_path / split / name / f"{k}.png")

    with pytest.warns(UserWarning, match=r"has no images of the classes \['Sandal'\]"):
        model, history = train.run(
            f"folder:{tmp_path}", variant=dict(TINY), recipe="fashion_mnist", batch_size=8, epochs=1,
            steps_per_epoch=4, image_size=32, output_dir=str(tmp_path / "run"),
        )  # fmt: skip
    batch, expected, alone = [], [], []
    for name in ("Pullover", "Trouser"):
        for file in sorted(os.listdir(tmp_path / "validation" / name)):
            image = tf.io.decode_image(tf.io.read_file(str(tmp_path / "validation" / name / file)), channels=3)
            batch.append(data.eval_transform(tf.cast(image, tf.float32), 32).numpy())
            expected.append(names.index(name))
            alone.append(["Pullover", "Trouser"].index(name))  # the label the validation split alone would give
    predicted = np.argmax(keras.ops.convert_to_numpy(model.predict_on_batch(np.stack(batch))), axis=-1)
    correct, shifted = np.sum(predicted == expected), np.sum(predicted == alone)
    assert correct != shifted, "the model must tell the classes apart for this check to mean anything"
    assert history.history["val_accuracy"][-1] == pytest.approx(correct / 24, abs=1e-6)


@needs_fashion_mnist
def test_fit_on_real_data_lowers_the_loss(tmp_path):
    import tensorflow as tf

    from keras_sequencer.demo import build_demo_model

    keras.utils.set_random_seed(0)
    (x, y), _ = data.load_fashion_mnist()
    x, y = x[:1024], y[:1024]
    recipe = train.get_recipe("fashion_mnist")
    ds = data.make_dataset(tf.data.Dataset.from_tensor_slices((x, y)), 10, 128, True, None, recipe.augment, seed=0)
    model = build_demo_model()
    history = train.fit(model, ds.repeat(), None, recipe, 128, 8, str(tmp_path), epochs=3, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < losses[0] - 0.3, losses
    assert os.path.exists(tmp_path / "last.keras") and os.path.exists(tmp_path / "log.csv")


@needs_fashion_mnist
@pytest.mark.backend_agnostic
def test_a_finished_demo_run_again_trains_nothing_and_reports_every_epoch(tmp_path, capsys):
    """The main job run twice into one folder: the second call trains nothing, restores the finished model
    (same test predictions) and reports both epochs from the run's log, not from its own empty history."""
    from keras_sequencer.demo import run_demo

    first = run_demo(str(tmp_path), epochs=2, limit=512, verbose=0)
    log = (tmp_path / "log.csv").read_text()
    os.remove(tmp_path / "curves.png")
    capsys.readouterr()
    second = run_demo(str(tmp_path), epochs=2, limit=512, verbose=0)
    assert "all 2 epochs are already trained; nothing to do" in capsys.readouterr().out
    assert (tmp_path / "log.csv").read_text() == log
    assert first["epochs"] == second["epochs"] == 2 and first["seed"] == 0
    assert second["test_accuracy"] == first["test_accuracy"]
    assert second["per_class_accuracy"] == first["per_class_accuracy"]
    assert json.loads((tmp_path / "metrics.json").read_text()) == second
    assert os.path.exists(tmp_path / "curves.png")


_RESUMABLE = """
import json, os, sys
import numpy as np, keras, tensorflow as tf
import keras_sequencer as ks
from keras_sequencer import train
keras.utils.set_random_seed(0)
out, kill_after = sys.argv[1], int(sys.argv[2])
x = np.random.RandomState(0).uniform(0, 255, (32, 16, 16, 3)).astype("float32")
y = keras.utils.to_categorical(np.arange(32) % 4, 4)
ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()
model = ks.Sequencer2D(**json.loads(sys.argv[3]), classes=4, classifier_activation=None)

class Killer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        print("EPOCH", epoch, flush=True)
    def on_epoch_end(self, epoch, logs=None):
        if epoch == kill_after:
            os._exit(3)  # no cleanup, like a SIGKILL between epochs

recipe = train.get_recipe("fashion_mnist")
train.fit(model, ds, None, recipe, 8, 4, out, epochs=4, verbose=0, callbacks=[Killer()])
print("ITERATIONS", int(keras.ops.convert_to_numpy(model.optimizer.iterations)))
"""


def test_kill_and_resume_continues_from_the_last_finished_epoch(tmp_path):
    first = run_subprocess(["-c", _RESUMABLE, tmp_path, "1", json.dumps(ONE_BLOCK)], timeout=600)
    assert first.returncode == 3, first.stderr[-3000:]
    assert [line for line in first.stdout.splitlines() if line.startswith("EPOCH")] == ["EPOCH 0", "EPOCH 1"]

    second = run_python(_RESUMABLE.replace("sys.argv[1]", repr(str(tmp_path))).replace(
        "int(sys.argv[2])", "-1").replace("sys.argv[3]", repr(json.dumps(ONE_BLOCK))))  # fmt: skip
    epochs = [line for line in second.splitlines() if line.startswith("EPOCH")]
    assert epochs == ["EPOCH 2", "EPOCH 3"], second
    # Nothing lost: the optimizer counts every step of all four epochs.
    assert "ITERATIONS 16" in second
    rows = open(tmp_path / "log.csv").read().splitlines()
    assert [row.split(",")[0] for row in rows if row[0].isdigit()] == ["0", "1", "2", "3"]
    finished_log = (tmp_path / "log.csv").read_bytes()
    if BACKEND != "tensorflow":
        return  # the file handling below is the same on every backend; loading and saving were checked above

    # A damaged newest backup (a disk fault: writes themselves go to a temporary name first) is reported and
    # the previous epoch's used; the run then finishes again and trains nothing more.
    state = json.loads((tmp_path / "backup" / "state.json").read_text())
    assert state["epoch"] == 4 and sorted(os.listdir(tmp_path / "backup")) == [
        "epoch-0002.weights.h5", "epoch-0003.weights.h5", "state.json",
    ]  # fmt: skip
    newest = tmp_path / "backup" / state["weights"]
    newest.write_bytes(newest.read_bytes()[:1000])
    third = run_subprocess(["-c", _RESUMABLE, tmp_path, "-1", json.dumps(ONE_BLOCK)], timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "cannot be read" in third.stderr and state["weights"] in third.stderr
    assert [line for line in third.stdout.splitlines() if line.startswith("EPOCH")] == ["EPOCH 3"]
    # The fallback stays the previous backup until the retrained epoch's file is complete.
    assert json.loads((tmp_path / "backup" / "state.json").read_text())["previous"] == "epoch-0002.weights.h5"
    assert sorted(os.listdir(tmp_path / "backup"))[:2] == ["epoch-0002.weights.h5", "epoch-0003.weights.h5"]

    fourth = run_subprocess(["-c", _RESUMABLE, tmp_path, "-1", json.dumps(ONE_BLOCK)], timeout=600)
    assert fourth.returncode == 0, fourth.stderr[-3000:]
    assert "all 4 epochs are already trained; nothing to do" in fourth.stdout
    assert not [line for line in fourth.stdout.splitlines() if line.startswith("EPOCH")]
    assert "ITERATIONS 16" in fourth.stdout
    assert (tmp_path / "log.csv").read_bytes().splitlines()[:-1] == finished_log.splitlines()[:-1]


_DISTRIBUTED = """
import json, sys
import numpy as np, keras
{setup}
import tensorflow as tf
import keras_sequencer as ks
from keras_sequencer import train
keras.utils.set_random_seed(0)
x = np.random.RandomState(0).uniform(0, 255, (64, 16, 16, 3)).astype("float32")
y = keras.utils.to_categorical(np.arange(64) % 4, 4)
ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16).repeat()
with train.distribution_scope() as scope:
    model = ks.Sequencer2D(**json.loads({arch!r}), classes=4, classifier_activation=None)
    history = train.fit(model, ds, None, train.get_recipe("fashion_mnist"), 16, 4, {out!r}, epochs=3, verbose=0)
print("REPLICAS", {replicas})
print("LOSSES", json.dumps(history.history["loss"]))
"""


@pytest.mark.backend_agnostic
def test_mirrored_strategy_on_two_logical_cpus(tmp_path):
    setup = (
        "import tensorflow as tf\n"
        "cpu = tf.config.list_physical_devices('CPU')[0]\n"
        "tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)"
    )
    code = _DISTRIBUTED.format(
        setup=setup, arch=json.dumps(ONE_BLOCK), out=str(tmp_path), replicas="scope.num_replicas_in_sync"
    )
    out = run_python(code, backend="tensorflow")
    assert "REPLICAS 2" in out
    losses = json.loads(out.split("LOSSES ")[1])
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


@pytest.mark.backend_agnostic
def test_jax_data_parallel_on_two_host_devices(tmp_path):
    code = _DISTRIBUTED.format(
        setup="", arch=json.dumps(ONE_BLOCK), out=str(tmp_path), replicas="len(scope.device_mesh.devices)"
    )
    out = run_python(code, backend="jax", env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert "REPLICAS 2" in out
    losses = json.loads(out.split("LOSSES ")[1])
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


@pytest.mark.backend_agnostic
def test_torch_backend_says_it_trains_on_one_device():
    code = (
        "from keras_sequencer import train\n"
        "try:\n"
        "    with train.distribution_scope(devices=2):\n"
        "        print('ENTERED')\n"
        "except ValueError as error:\n"
        "    print('REFUSED', error)\n"
    )
    out = run_python(code, backend="torch")
    assert out.startswith("REFUSED") and "trains on one device. Received: devices=2" in out, out


@needs_fashion_mnist
@pytest.mark.backend_agnostic
def test_run_trains_on_grayscale_fashion_mnist_as_rgb(tmp_path):
    """`run` on the single-channel `"fashion_mnist"` source: the images reach the RGB model as three equal
    channels, and the reported validation accuracy is that of the saved model on those images."""
    import tensorflow as tf

    source, _ = data.load_split("fashion_mnist", "test")
    gray, _ = next(iter(source.batch(4)))
    rgb, _ = next(iter(data.as_rgb(source).batch(4)))
    np.testing.assert_array_equal(rgb.numpy(), np.repeat(gray.numpy(), 3, axis=-1))
    assert data.as_rgb(data.as_rgb(source)).element_spec[0].shape[-1] == 3
    rgba = np.random.default_rng(0).integers(0, 255, (2, 5, 6, 4), dtype=np.uint8)
    gray_alpha = tf.data.Dataset.from_tensor_slices((rgba[..., :2], [0, 1]))
    unknown = tf.data.Dataset.from_generator(lambda: iter([(rgba[0], 0)]), output_signature=(
        tf.TensorSpec((None, None, None), tf.uint8), tf.TensorSpec((), tf.int32)))  # fmt: skip
    for found, expected in (
        (tf.data.Dataset.from_tensor_slices((rgba, [0, 1])), rgba[..., :3]),
        (gray_alpha, np.repeat(rgba[..., :1], 3, -1)),
        (unknown, rgba[:1, ..., :3]),
    ):
        images = [image.numpy() for image, _ in data.as_rgb(found)]
        np.testing.assert_array_equal(np.stack(images), expected)

    model, history = train.run(
        "fashion_mnist", variant=dict(TINY), recipe="fashion_mnist", batch_size=500, epochs=1, steps_per_epoch=2,
        image_size=28, eval_split="test", output_dir=str(tmp_path / "run"),
    )  # fmt: skip
    images, labels = data.load_fashion_mnist()[1]
    transform = tf.function(lambda batch: tf.map_fn(lambda image: data.eval_transform(image, 28), batch))
    rgb = np.concatenate([transform(tf.cast(np.repeat(images[i : i + 1000], 3, -1), tf.float32)).numpy()
                          for i in range(0, len(images), 1000)])  # fmt: skip
    predicted = np.argmax(keras.ops.convert_to_numpy(model.predict(rgb, batch_size=500, verbose=0)), -1)
    # two of 10,000 images may round to another class than in the pipeline's batches
    assert history.history["val_accuracy"][-1] == pytest.approx(np.mean(predicted == labels), abs=2e-4)


_THREADS = """
import json, sys
import tensorflow as tf
from keras_sequencer.demo import run_small_ops_side_by_side, side_by_side_parts, usable_cores
if sys.argv[1] == "started":
    tf.constant(1.0) + 1  # TensorFlow's runtime starts: its thread pools are fixed from here on
threading = tf.config.threading
before = [threading.get_intra_op_parallelism_threads(), threading.get_inter_op_parallelism_threads()]
done = run_small_ops_side_by_side()
after = [threading.get_intra_op_parallelism_threads(), threading.get_inter_op_parallelism_threads()]
print(json.dumps([done, usable_cores(), before, after, side_by_side_parts()]))
"""


@pytest.mark.backend_agnostic
@pytest.mark.parametrize(
    "backend, when, env",
    [
        ("tensorflow", "fresh", {}),
        ("tensorflow", "started", {}),
        ("tensorflow", "fresh", {"TF_NUM_INTEROP_THREADS": "3"}),
        ("jax", "fresh", {}),
    ],
)
def test_the_demo_runs_small_ops_side_by_side_only_where_it_may(backend, when, env):
    """One thread per op, two ops at a time: set in a fresh TensorFlow process on at most 2 cores; left alone
    where TensorFlow already runs, where the user chose threads, and on other backends. The demo model runs
    its batches in 4 parts exactly where the threads were set."""
    # No thread settings but the case's own (scripts/test.sh sets both for its workers).
    env = {"TF_NUM_INTRAOP_THREADS": "", "TF_NUM_INTEROP_THREADS": "", **env}
    result = run_subprocess(["-c", _THREADS, when], backend=backend, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    done, cores, before, after, parts = json.loads(result.stdout.strip().splitlines()[-1])
    expected = backend == "tensorflow" and when == "fresh" and not any(env.values()) and cores <= 2
    assert done == expected
    assert after == ([1, 2] if expected else before)
    assert parts == (4 if expected else 1)
