"""tf.data pipelines: tfds (mock ImageNet), image folders, dataset specs, and the paper's mixing and smoothing."""

import dataclasses
import os

from conftest import global_dtype_policy, global_image_data_format
import numpy as np
import pytest
import tensorflow as tf

from keras_sequencer import data
from keras_sequencer.imagenet import load_image

pytestmark = pytest.mark.backend_agnostic  # tf.data runs TensorFlow whatever the Keras backend


def test_imagenet_pipeline_on_tfds_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=12):
        source, num_classes = data.tfds_source("imagenet2012", "train")
        assert num_classes == 1000
        train = data.make_dataset(source, num_classes, batch_size=4, training=True, image_size=64, seed=0)
        images, labels = next(iter(train))
        evaluation = data.make_dataset(source, num_classes, batch_size=4, training=False, image_size=64)
        eval_images, eval_labels = next(iter(evaluation))

    assert images.shape == (4, 64, 64, 3) and images.dtype == tf.float32
    assert labels.shape == (4, 1000) and labels.dtype == tf.float32
    assert 0.0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 255.0
    # Smoothing and mixing keep each target a distribution; smoothing leaves no zero.
    np.testing.assert_allclose(tf.reduce_sum(labels, -1), 1.0, atol=1e-5)
    assert float(tf.reduce_min(labels)) >= 0.1 / 1000 - 1e-7
    assert eval_images.shape == (4, 64, 64, 3)
    np.testing.assert_array_equal(tf.reduce_max(eval_labels, -1), 1.0)
    np.testing.assert_allclose(tf.reduce_sum(eval_labels, -1), 1.0)


@pytest.mark.parametrize("training", [True, False])
def test_pipelines_run_without_autotuning_and_give_the_autotuned_batches(training):
    """`make_dataset` turns tf.data's autotuning off unless asked (its iterators' deletion stalled `fit` at
    epoch ends) and yields exactly the batches of the autotuned pipeline, parallel steps and all."""
    rng = np.random.RandomState(0)
    source = tf.data.Dataset.from_tensor_slices((rng.randint(0, 256, (40, 20, 24, 3)).astype("uint8"),
                                                 rng.randint(0, 5, 40)))  # fmt: skip
    # The demo's recipe for training (a seeded shuffle, smoothed labels; random augmentations would differ
    # between any two pipelines), the evaluation transform otherwise.
    augment = dataclasses.replace(data.NO_AUGMENT, label_smoothing=0.1)
    options = dict(num_classes=5, batch_size=8, training=training, image_size=None if training else 16,
                   augment=augment, seed=3)  # fmt: skip
    plain = data.make_dataset(source, **options)
    tuned = data.make_dataset(source, **options, autotune=True)
    assert plain.options().autotune.enabled is False
    assert tuned.options().autotune.enabled is True
    batches = [list(pipeline.as_numpy_iterator()) for pipeline in (plain, tuned)]
    assert len(batches[0]) == len(batches[1]) == 5
    for (images, labels), (tuned_images, tuned_labels) in zip(*batches, strict=True):
        np.testing.assert_array_equal(images, tuned_images)
        np.testing.assert_array_equal(labels, tuned_labels)


def test_smoothing_matches_timm():
    from timm.data.mixup import mixup_target
    import torch

    labels = np.array([3, 0, 7])
    ours = data.smooth_labels(tf.constant(labels), 10, 0.1).numpy()
    # lam=1 is smoothing alone (timm mixes with the flipped batch otherwise).
    expected = mixup_target(torch.from_numpy(labels), 10, lam=1.0, smoothing=0.1).numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-7)


@pytest.mark.parametrize("mixup,cutmix", [(0.8, 0.0), (0.0, 1.0)])
def test_mixed_targets_equal_the_mixed_pixels(mixup, cutmix):
    """Image i is the constant i and class i; its partner is the reversed batch. The share
    of the partner in the pixels must equal the share of its class in the target."""
    tf.random.set_seed(3)
    n = 6
    images = tf.constant(np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((1, 16, 20, 3), np.float32))
    targets = tf.one_hot(tf.range(n), n)
    shares = []
    for _ in range(5):
        mixed, mixed_targets = data.mix_batch(images, targets, mixup, cutmix)
        mixed, mixed_targets = mixed.numpy(), mixed_targets.numpy()
        for i in range(n):
            partner = n - 1 - i
            # Mixup: every pixel is lam*i + (1-lam)*partner; CutMix: a box of partner pixels.
            share = (mixed[i].mean() - i) / (partner - i)
            np.testing.assert_allclose(mixed_targets[i, partner], share, atol=1e-5)
            np.testing.assert_allclose(mixed_targets[i].sum(), 1.0, atol=1e-6)
            shares.append(share)
    assert max(shares) > 0.05, shares  # the batch was mixed (a CutMix box may be empty in one draw, not in all)


def test_pad_crop_and_flip_act_per_image():
    """Each image of the batch must be its own zero-padded copy cropped at one offset
    (found here by search), optionally mirrored; offsets and flips must vary."""
    tf.random.set_seed(5)
    pad, n = 2, 64
    images = np.random.RandomState(0).uniform(1, 255, (n, 9, 7, 2)).astype(np.float32)
    padded = np.pad(images, [(0, 0), (pad, pad), (pad, pad), (0, 0)])
    cropped = data.pad_and_crop(tf.constant(images), pad).numpy()
    assert cropped.shape == images.shape
    offsets = set()
    for i in range(n):
        found = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if np.array_equal(cropped[i], padded[i, dy : dy + 9, dx : dx + 7])
        ]
        assert len(found) == 1, i
        offsets |= set(found)
    assert len(offsets) > 10

    flipped = data.random_flip(tf.constant(images), 0.5).numpy()
    mirrored = [np.array_equal(f, x[:, ::-1]) for f, x in zip(flipped, images, strict=True)]
    kept = [np.array_equal(f, x) for f, x in zip(flipped, images, strict=True)]
    assert all(m != k for m, k in zip(mirrored, kept, strict=True))  # each image: one or the other
    assert 16 < sum(mirrored) < 48


def _write_folder(root, sizes):
    from PIL import Image

    rng = np.random.RandomState(0)
    for cls, (w, h) in zip(("cat", "dog"), sizes, strict=True):
        (root / cls).mkdir(parents=True)
        for k in range(3):
            yy, xx = np.mgrid[0:h, 0:w]
            rgb = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy + k * 40) % 256], -1)
            Image.fromarray((rgb + rng.randint(0, 20, rgb.shape)).clip(0, 255).astype(np.uint8)).save(
                root / cls / f"{k}.png"
            )


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_the_paper_pipeline_stays_float32_under_a_mixed_policy(policy):
    images = np.random.RandomState(0).randint(0, 256, (8, 40, 40, 3)).astype(np.uint8)
    source = tf.data.Dataset.from_tensor_slices((images, np.arange(8) % 4))
    with global_dtype_policy(policy):  # as `train --mixed-precision` sets it before building the pipelines
        ds = data.make_dataset(source, 4, 4, True, 32, data.Augment(), seed=0)
        batch, targets = next(iter(ds))
    assert batch.dtype == tf.float32 and targets.dtype == tf.float32 and batch.shape == (4, 32, 32, 3)
    assert np.all(np.isfinite(batch.numpy())) and np.allclose(targets.numpy().sum(-1), 1.0, atol=1e-5)


def test_the_paper_pipeline_augments_channels_last_whatever_the_global_image_data_format():
    """RandAugment and random erasing read the batches as they are, (batch, height, width, 3), also when Keras'
    global `image_data_format` is "channels_first" (they would take the height for the channels)."""
    images = np.random.RandomState(0).randint(0, 256, (8, 40, 40, 3)).astype(np.uint8)
    source = tf.data.Dataset.from_tensor_slices((images, np.arange(8) % 4))
    with global_image_data_format("channels_first"):
        augment = data.Augment(erasing=1.0)  # every image erased, on top of the paper's RandAugment
        batch, _ = next(iter(data.make_dataset(source, 4, 4, True, 32, augment, seed=0)))
    assert batch.shape == (4, 32, 32, 3) and 0.0 <= float(tf.reduce_min(batch)) <= float(tf.reduce_max(batch)) <= 255


def test_image_folder_pipeline_and_eval_transform(tmp_path):
    _write_folder(tmp_path, [(300, 200), (180, 260)])
    source, names = data.folder_source(str(tmp_path))
    assert names == ["cat", "dog"]
    ds = data.make_dataset(source, 2, batch_size=6, training=False, image_size=64)
    images, labels = next(iter(ds))
    assert images.shape == (6, 64, 64, 3)
    np.testing.assert_array_equal(labels.numpy().argmax(-1), [0, 0, 0, 1, 1, 1])
    # The TensorFlow eval transform is timm's (resize short side to 73, centre crop 64),
    # as load_image does with PIL; the two bicubic kernels differ by a few grey levels.
    expected = np.stack([load_image(tmp_path / c / f"{k}.png", size=64) for c in names for k in range(3)])
    assert np.abs(images.numpy() - expected).mean() < 3.0

    train = data.make_dataset(source, 2, batch_size=4, training=True, image_size=48, seed=1)
    images, labels = next(iter(train))
    assert images.shape == (4, 48, 48, 3)
    np.testing.assert_allclose(labels.numpy().sum(-1), 1.0, atol=1e-5)


def test_folder_without_classes_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="one sub-folder of images per class"):
        data.folder_source(str(tmp_path))


def test_fashion_mnist_reader(tmp_path):
    """The IDX reader against a file written here, and the real files when installed."""
    import gzip

    images = np.random.RandomState(0).randint(0, 256, (5, 28, 28)).astype(np.uint8)
    header = bytes([0, 0, 8, 3]) + b"".join(int(d).to_bytes(4, "big") for d in images.shape)
    with gzip.open(tmp_path / "x.gz", "wb") as f:
        f.write(header + images.tobytes())
    np.testing.assert_array_equal(data._read_idx(str(tmp_path / "x.gz")), images)
    with pytest.raises(ValueError, match="Received: data_dir="):
        data.load_fashion_mnist(str(tmp_path))


def test_dataset_specs_are_parsed_in_one_place(tmp_path):
    assert data.parse_dataset_spec("tfds:imagenet2012") == ("tfds", "imagenet2012")
    assert data.parse_dataset_spec("folder:/data/x") == ("folder", "/data/x")
    assert data.parse_dataset_spec("fashion_mnist") == ("fashion_mnist", None)
    for bad in ("imagenet2012", "folder:", "hub:x"):
        with pytest.raises(ValueError, match=f"Received: dataset='{bad}'"):
            data.parse_dataset_spec(bad)
    # folder:PATH reads PATH/<split>/<class>/..., or PATH/<class>/... without a split.
    _write_folder(tmp_path / "train", [(40, 30), (30, 40)])
    (tmp_path / "train" / "notes.txt").write_text("not an image")
    source, classes = data.load_split(f"folder:{tmp_path}", "train")
    assert classes == 2 and int(source.cardinality()) == 6
    _, classes = data.load_split(f"folder:{tmp_path / 'train'}")
    assert classes == 2
    with pytest.raises(ValueError, match="which is not a folder"):
        data.load_split(f"folder:{tmp_path}", "validation")
    with pytest.raises(ValueError, match="needs a split name"):
        data.load_split("tfds:imagenet2012")
    assert [os.path.basename(p) for p in data.list_images(str(tmp_path / "train" / "cat"))] == [
        "0.png", "1.png", "2.png"
    ]  # fmt: skip


def test_every_folder_split_labels_a_class_as_the_training_split_does(tmp_path):
    from PIL import Image

    def write(split, classes):
        for name in classes:
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8), (ord(name[0]), 0, 0)).save(tmp_path / split / name / "0.png")

    write("train", ["a", "b", "c"])
    write("validation", ["a", "c"])  # no "b": "c" must keep label 2, not shift to 1
    write("test", ["a", "d"])
    with pytest.warns(UserWarning, match=r"has no images of the classes \['b'\]"):
        source, classes = data.load_split(f"folder:{tmp_path}", "validation", labels_from="train")
    pairs = sorted((int(image[0, 0, 0]), int(label)) for image, label in source.as_numpy_iterator())
    assert classes == 3 and pairs == [(ord("a"), 0), (ord("c"), 2)]
    with pytest.raises(ValueError, match=r"has classes the training split does not have: \['d'\]"):
        data.load_split(f"folder:{tmp_path}", "test", labels_from="train")


def test_files_a_folder_dataset_cannot_read_are_reported(tmp_path):
    _write_folder(tmp_path, [(20, 20), (20, 20)])
    (tmp_path / "cat" / "photo.webp").write_bytes(b"RIFF")
    (tmp_path / "dog" / "scan.tiff").write_bytes(b"II*")
    (tmp_path / "dog" / ".DS_Store").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"skipped 2 files .*\(1 \.tiff, 1 \.webp\); convert them"):
        source, names = data.folder_source(str(tmp_path))
    assert int(source.cardinality()) == 6 and names == ["cat", "dog"]


def test_undecodable_images_are_named_and_left_out_before_training(tmp_path):
    _write_folder(tmp_path, [(20, 20), (24, 20)])
    good = (tmp_path / "cat" / "0.png").read_bytes()
    (tmp_path / "cat" / "3.png").write_bytes(good[: len(good) // 2])  # truncated
    (tmp_path / "dog" / "3.jpg").write_bytes(b"<html>not an image</html>")  # renamed
    (tmp_path / "dog" / "4.jpg").write_bytes(b"")  # empty
    with pytest.warns(UserWarning, match="skipped 3 image files that cannot be decoded") as record:
        source, names = data.folder_source(str(tmp_path))
    message = str(record[0].message)
    for name in ("cat/3.png", "dog/3.jpg", "dog/4.jpg"):
        assert os.path.join(str(tmp_path), name) in message
    # What is left reads to the end; before, the first bad file stopped the iterator without a file name.
    pairs = [(image.shape, int(label)) for image, label in source.as_numpy_iterator()]
    assert pairs == [((20, 20, 3), 0)] * 3 + [((20, 24, 3), 1)] * 3
    for name in ("cat/0.png", "cat/1.png", "cat/2.png", "dog/0.png", "dog/1.png", "dog/2.png"):
        os.remove(tmp_path / name)
    (tmp_path / "cat" / "3.png").unlink()
    with pytest.raises(ValueError, match="none of its 2 image files can be decoded"):
        data.folder_source(str(tmp_path))


@pytest.mark.skipif(not os.path.isdir(data.FASHION_MNIST_DIR), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_spec_reads_the_real_files():
    (x_train, y_train), (x_test, y_test) = data.load_fashion_mnist()
    source, classes = data.load_split("fashion_mnist", "test")
    images, labels = next(iter(source.batch(5)))
    assert classes == 10 and int(source.cardinality()) == len(x_test) == 10_000
    np.testing.assert_array_equal(images.numpy(), x_test[:5])
    np.testing.assert_array_equal(labels.numpy(), y_test[:5])
    assert len(x_train) == len(y_train) == 60_000
