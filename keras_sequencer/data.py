"""tf.data input pipelines: tfds datasets, image folders, in-memory arrays, and the paper's transforms.

Every pipeline yields `(images, labels)` batches: images float32 RGB (or
grey) in [0, 255], channels last, for a model built with
`include_preprocessing=True`; labels are one-hot (soft, after smoothing and
mixing) float32 vectors, for `keras.losses.CategoricalCrossentropy`.

The training transforms follow the authors' ImageNet recipe (timm 0.5.4
`train.py`): RandomResizedCrop (scale 0.08-1, ratio
3/4-4/3, bilinear or bicubic at random), horizontal flip, RandAugment,
random erasing 0.25, Mixup 0.8 / CutMix 1.0 (one or the other per batch,
switch 0.5) and label smoothing 0.1. Evaluation resizes the short side to
`size / crop_pct` (bicubic) and takes the centre crop. The pipelines run on
TensorFlow's tf.data whatever the Keras backend: `model.fit` accepts a
`tf.data.Dataset` on JAX and PyTorch too.
"""

import dataclasses
import gzip
import os
import warnings

import numpy as np

from keras_sequencer.presets import IMAGENET_EVAL

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
DATASET_SPECS = ("tfds:NAME", "folder:PATH", "fashion_mnist")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Augment:
    """Training-time augmentation settings; the defaults are the paper's ImageNet recipe.

    Attributes:
        scale, ratio: RandomResizedCrop area fraction and aspect-ratio ranges.
        hflip: probability of a horizontal flip.
        rand_augment: RandAugment magnitude in [0, 1] (timm's m9 is 0.9); 0 disables it.
        rand_augment_ops: RandAugment operations per image.
        erasing: probability of random erasing (per image); 0 disables it.
        mixup_alpha: Mixup Beta(alpha, alpha); 0 disables Mixup.
        cutmix_alpha: CutMix Beta(alpha, alpha); 0 disables CutMix.
        switch_prob: with both enabled, probability of CutMix (else Mixup) for a batch.
        label_smoothing: smoothing of the one-hot labels, applied before mixing.
        pad_crop: for small images instead of RandomResizedCrop: pad by this many
            pixels and crop back at a random offset (0 disables it).
    """

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    rand_augment: float = 0.9
    rand_augment_ops: int = 2
    erasing: float = 0.25
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1
    pad_crop: int = 0


NO_AUGMENT = Augment(
    scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, rand_augment=0.0, erasing=0.0,
    mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0,
)  # fmt: skip


# === Raw data ===


def _read_idx(path: str) -> np.ndarray:
    """Reads an IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(data_dir: str | None = None):
    """Fashion-MNIST as uint8 arrays: `((x_train, y_train), (x_test, y_test))`, images `(N, 28, 28, 1)`.

    Reads the original IDX files from `data_dir` (default: Debian's
    `dataset-fashion-mnist` package, `/usr/share/datasets/fashion-mnist`),
    so no network is needed; without them falls back to
    `keras.datasets.fashion_mnist`, which downloads.
    """
    directory = data_dir or FASHION_MNIST_DIR
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    paths = []
    for name in names:
        found = [
            os.path.join(directory, name + ext)
            for ext in (".gz", "")
            if os.path.exists(os.path.join(directory, name + ext))
        ]
        paths.append(found[0] if found else None)
    if all(paths):
        x_train, y_train, x_test, y_test = (_read_idx(p) for p in paths)
    elif data_dir is not None:
        raise ValueError(
            f"`data_dir` must hold the four Fashion-MNIST IDX files ({', '.join(names)}, optionally .gz). "
            f"Received: data_dir={data_dir!r}"
        )
    else:
        import keras

        (x_train, y_train), (x_test, y_test) = keras.datasets.fashion_mnist.load_data()
    return (x_train[..., None], y_train.astype(np.int64)), (x_test[..., None], y_test.astype(np.int64))


# === Per-image transforms (TensorFlow ops, inside tf.data) ===


def eval_transform(image, size: int = IMAGENET_EVAL.input_size, crop_pct: float = IMAGENET_EVAL.crop_pct):
    """Resize the short side to `int(size / crop_pct)` (bicubic), then centre-crop `size x size`.

    timm's evaluation transform (`keras_sequencer.presets.EvalConfig`) as TensorFlow ops.
    """
    import tensorflow as tf

    shape = tf.shape(image)
    height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    short = float(int(size / crop_pct))
    scale = short / tf.minimum(height, width)
    new_h = tf.maximum(tf.cast(height * scale, tf.int32), int(short))
    new_w = tf.maximum(tf.cast(width * scale, tf.int32), int(short))
    image = tf.image.resize(
        tf.cast(image, tf.float32), (new_h, new_w), method=IMAGENET_EVAL.interpolation, antialias=True
    )
    top, left = (new_h - size) // 2, (new_w - size) // 2
    image = tf.image.crop_to_bounding_box(image, top, left, size, size)
    return tf.clip_by_value(image, 0.0, 255.0)


def random_resized_crop(image, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Inception-style crop: a random area fraction and aspect ratio, resized to `size x size`
    with bilinear or bicubic interpolation at random (timm's `--train-interpolation random`)."""
    import tensorflow as tf

    begin, crop_size, _ = tf.image.sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        min_object_covered=0.0,
        aspect_ratio_range=ratio,
        area_range=scale,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    crop = tf.slice(tf.cast(image, tf.float32), begin, crop_size)
    bicubic = tf.random.uniform(()) < 0.5
    resized = tf.cond(
        bicubic,
        lambda: tf.image.resize(crop, (size, size), method="bicubic"),
        lambda: tf.image.resize(crop, (size, size), method="bilinear"),
    )
    resized.set_shape((size, size, image.shape[-1]))  # tf.slice loses the static channel count
    return tf.clip_by_value(resized, 0.0, 255.0)


def pad_and_crop(images, pad: int):
    """Pads each image of a batch by `pad` pixels (zeros) and crops it back at its own random offset.

    Vectorised over the batch (two gathers) rather than mapped per image,
    which costs less of the CPU that training shares.
    """
    import tensorflow as tf

    shape = tf.shape(images)
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    offsets = tf.random.uniform((shape[0], 2), 0, 2 * pad + 1, dtype=tf.int32)
    rows = offsets[:, :1] + tf.range(shape[1])[None]  # (batch, height) source rows
    cols = offsets[:, 1:] + tf.range(shape[2])[None]
    cropped = tf.gather(tf.gather(padded, rows, axis=1, batch_dims=1), cols, axis=2, batch_dims=1)
    return tf.reshape(cropped, shape)  # the gathers lose the static shape


def random_flip(images, probability: float):
    """Flips each image of a batch left-right with `probability`, independently."""
    import tensorflow as tf

    flip = tf.random.uniform((tf.shape(images)[0], 1, 1, 1)) < probability
    return tf.where(flip, tf.reverse(images, [2]), images)


# === Batch-level mixing ===


def smooth_labels(labels, num_classes: int, smoothing: float):
    """One-hot labels with timm's smoothing: `1 - s + s/K` on the class, `s/K` elsewhere."""
    import tensorflow as tf

    off = smoothing / num_classes
    return tf.one_hot(labels, num_classes, on_value=1.0 - smoothing + off, off_value=off)


def mix_batch(images, targets, mixup_alpha: float, cutmix_alpha: float, switch_prob: float = 0.5):
    """Mixup or CutMix on a batch (one of them per batch, as timm's `mode='batch'`).

    The batch is mixed with its reverse; the targets are mixed with the
    same weight, which for CutMix is the exact fraction of pasted pixels.
    """
    import tensorflow as tf

    def beta(alpha):
        a = tf.random.gamma((), alpha)
        b = tf.random.gamma((), alpha)
        return a / (a + b)

    flipped_images, flipped_targets = tf.reverse(images, [0]), tf.reverse(targets, [0])

    def mixup():
        lam = beta(mixup_alpha)
        return lam * images + (1 - lam) * flipped_images, lam

    def cutmix():
        lam = beta(cutmix_alpha)
        height, width = tf.shape(images)[1], tf.shape(images)[2]
        cut = tf.sqrt(1.0 - lam)
        cut_h = tf.cast(tf.cast(height, tf.float32) * cut, tf.int32)
        cut_w = tf.cast(tf.cast(width, tf.float32) * cut, tf.int32)
        cy = tf.random.uniform((), 0, height, dtype=tf.int32)
        cx = tf.random.uniform((), 0, width, dtype=tf.int32)
        y0, y1 = tf.clip_by_value(cy - cut_h // 2, 0, height), tf.clip_by_value(cy + cut_h // 2, 0, height)
        x0, x1 = tf.clip_by_value(cx - cut_w // 2, 0, width), tf.clip_by_value(cx + cut_w // 2, 0, width)
        rows = tf.logical_and(tf.range(height) >= y0, tf.range(height) < y1)
        cols = tf.logical_and(tf.range(width) >= x0, tf.range(width) < x1)
        box = tf.cast(tf.logical_and(rows[:, None], cols[None, :]), images.dtype)[None, :, :, None]
        lam_exact = 1.0 - tf.cast((y1 - y0) * (x1 - x0), tf.float32) / tf.cast(height * width, tf.float32)
        return images * (1 - box) + flipped_images * box, lam_exact

    if mixup_alpha > 0 and cutmix_alpha > 0:
        mixed, lam = tf.cond(tf.random.uniform(()) < switch_prob, cutmix, mixup)
    elif cutmix_alpha > 0:
        mixed, lam = cutmix()
    else:
        mixed, lam = mixup()
    return mixed, lam * targets + (1 - lam) * flipped_targets


# === Pipelines ===


def as_rgb(source):
    """`source` (a dataset of `(image, label)`, images channels-last) with RGB images, as the models and their
    pretrained weights take: one channel repeated to three, gray-and-alpha's gray repeated, RGBA's alpha
    dropped (decided per image where the channel count is unknown). Three-channel sources are returned as
    they are (the folder reader already decodes every image to RGB)."""
    import tensorflow as tf

    channels = source.element_spec[0].shape[-1] if source.element_spec[0].shape.rank else None
    if channels not in (None, 1, 2, 4):
        return source

    def rgb(image, label):
        image = tf.cond(tf.shape(image)[-1] < 3, lambda: tf.image.grayscale_to_rgb(image[..., :1]),
                        lambda: image[..., :3])  # fmt: skip
        return tf.ensure_shape(image, [None, None, 3]), label

    return source.map(rgb, num_parallel_calls=tf.data.AUTOTUNE)


def make_dataset(
    source,
    num_classes: int,
    batch_size: int,
    training: bool,
    image_size: int | None = None,
    augment: Augment | None = None,
    crop_pct: float = IMAGENET_EVAL.crop_pct,
    shuffle_buffer: int = 10_000,
    seed: int | None = None,
    drop_remainder: bool | None = None,
    autotune: bool = False,
):
    """Batches a `tf.data.Dataset` of `(image, integer label)` for `model.fit` / `evaluate`.

    tf.data's autotuning is off unless `autotune=True`: with it, TensorFlow 2.21 sometimes deleted the
    iterator at the end of an epoch by waiting on one of tf.data's background threads, every core idle. The
    demo's 15 epochs lost ~176 s that way (29-39 s in each of 5 epochs); with autotuning off none stalled and
    the steps ran as fast (benchmarks/README.md, "Demo: Fashion-MNIST"). Without it the parallel steps
    (`num_parallel_calls=AUTOTUNE`) run on as many threads as TensorFlow's thread pool has, every core:
    TensorFlow takes the smaller of that and `initial_parallelism`, set here to at least the core count (its
    default, 16, would cap larger machines).

    Args:
        source: dataset of `(image uint8/float HxWxC, int label)` pairs.
        num_classes: number of classes (for one-hot labels).
        batch_size: global batch size.
        training: shuffle, augment and mix (else the evaluation transform).
        image_size: output side; None keeps the source size (no crop/resize).
        augment: training transforms (default: the paper's recipe, `Augment()`).
        crop_pct: evaluation centre-crop fraction (timm's 0.875).
        shuffle_buffer: shuffle buffer size, in images.
        seed: seed of the shuffle and the augmentations.
        drop_remainder: drop the last incomplete batch (default: when training).
        autotune: tf.data's autotuning of the pipeline (see above).

    Returns:
        A prefetched `tf.data.Dataset` of `(float32 images in [0, 255], float32 soft labels)`.
    """
    import keras
    import tensorflow as tf

    augment = augment or Augment()
    auto = tf.data.AUTOTUNE  # as a parallelism or buffer size: tuned, or every core when tuning is off
    drop_remainder = training if drop_remainder is None else drop_remainder

    if training:
        ds = source.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)

        if image_size is not None:  # the one per-image transform: crops differ in size before resizing
            ds = ds.map(
                lambda image, label: (
                    random_resized_crop(tf.cast(image, tf.float32), image_size, augment.scale, augment.ratio),
                    label,
                ),
                num_parallel_calls=auto,
            )
        ds = ds.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=auto)
        color_ops = []
        if augment.rand_augment > 0:
            color_ops.append(
                keras.layers.RandAugment(
                    value_range=(0, 255),
                    num_ops=augment.rand_augment_ops,
                    factor=augment.rand_augment,
                    seed=seed,
                    data_format="channels_last",  # the batches' layout, whatever Keras' global setting
                    dtype="float32",
                )  # fmt: skip
            )
        if augment.erasing > 0:
            color_ops.append(
                keras.layers.RandomErasing(
                    factor=(augment.erasing, augment.erasing),
                    value_range=(0, 255),
                    seed=seed,
                    data_format="channels_last",
                    dtype="float32",
                )
            )

        def per_batch(images, labels):
            images = tf.cast(images, tf.float32)
            if augment.pad_crop:
                images = pad_and_crop(images, augment.pad_crop)
            if augment.hflip > 0:
                images = random_flip(images, augment.hflip)
            for op in color_ops:  # float32 whatever the global policy: the pipeline feeds any model
                images = tf.cast(op(images, training=True), tf.float32)
            targets = smooth_labels(labels, num_classes, augment.label_smoothing)
            if augment.mixup_alpha > 0 or augment.cutmix_alpha > 0:
                images, targets = mix_batch(
                    images, targets, augment.mixup_alpha, augment.cutmix_alpha, augment.switch_prob
                )
            return tf.clip_by_value(images, 0.0, 255.0), targets

        ds = ds.map(per_batch, num_parallel_calls=auto)
    else:

        def per_image(image, label):
            image = tf.cast(image, tf.float32)
            if image_size is not None:
                image = eval_transform(image, image_size, crop_pct)
            return image, tf.one_hot(label, num_classes)

        ds = source.map(per_image, num_parallel_calls=auto)
        ds = ds.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=auto)
    options = tf.data.Options()
    options.autotune.enabled = bool(autotune)
    if not autotune:  # what AUTOTUNE parallelism means without tuning: min(this, the thread pool's size)
        options.autotune.initial_parallelism = max(16, os.cpu_count() or 1)
    return ds.prefetch(auto).with_options(options)


def tfds_source(name: str, split: str, data_dir: str | None = None, download: bool = False):
    """`(image, label)` pairs of a tensorflow-datasets image classification dataset, and its class count.

    `download=False` (the default) never touches the network: the dataset
    must already be prepared in `data_dir` (for ImageNet-1k, `imagenet2012`
    with the manual download placed as tfds documents).
    """
    import tensorflow_datasets as tfds

    ds, info = tfds.load(name, split=split, data_dir=data_dir, as_supervised=True, with_info=True, download=download)
    return ds, info.features["label"].num_classes


def folder_classes(directory: str) -> list[str]:
    """The class names of an image folder: its sub-folders, sorted."""
    return sorted(d for d in os.listdir(directory) if os.path.isdir(os.path.join(directory, d)))


def folder_source(directory: str, class_names: list[str] | None = None):
    """`(image, label)` pairs from `directory/<class_name>/<image files>`, and the class names.

    Args:
        directory: one sub-folder of images per class.
        class_names: the classes that define the labels (those of the
            training split, so that every split labels a class alike); default:
            this folder's own. A sub-folder not among them is an error; a
            class without a sub-folder here is a warning.
    """
    import tensorflow as tf

    found = folder_classes(directory)
    if not found:
        raise ValueError(
            f"`directory` must contain one sub-folder of images per class. Received: directory={directory!r}"
        )
    if class_names is None:
        class_names = found
    unknown = [name for name in found if name not in class_names]
    if unknown:
        raise ValueError(
            f"{directory} has classes the training split does not have: {unknown}. Every split must use the "
            f"training split's classes ({list(class_names)}); remove or rename those folders."
        )
    missing = [name for name in class_names if name not in found]
    if missing:
        warnings.warn(f"{directory} has no images of the classes {missing}.", stacklevel=2)
    paths, labels, skipped = [], [], {}
    for name in found:
        index = list(class_names).index(name)
        for file in sorted(os.listdir(os.path.join(directory, name))):
            if file.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.join(directory, name, file))
                labels.append(index)
            elif not file.startswith("."):
                extension = os.path.splitext(file)[1].lower() or file
                skipped[extension] = skipped.get(extension, 0) + 1
    if skipped:  # tf.io.decode_image reads only these formats; convert the others (e.g. WebP, TIFF) first
        counts = ", ".join(f"{count} {extension}" for extension, count in sorted(skipped.items()))
        warnings.warn(
            f"{directory}: skipped {sum(skipped.values())} files that are not {'/'.join(IMAGE_EXTENSIONS)} "
            f"images ({counts}); convert them to JPEG or PNG to use them.",
            stacklevel=2,
        )

    readable = _decodable(paths)
    if len(readable) < len(paths):
        bad = [path for i, path in enumerate(paths) if i not in readable]
        if not readable:
            raise ValueError(f"{directory}: none of its {len(paths)} image files can be decoded, e.g. {bad[0]}.")
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        warnings.warn(
            f"{directory}: skipped {len(bad)} image files that cannot be decoded (corrupt, truncated or "
            f"not what their extension says): {shown}.",
            stacklevel=2,
        )
        paths = [paths[i] for i in sorted(readable)]
        labels = [labels[i] for i in sorted(readable)]

    ds = tf.data.Dataset.from_tensor_slices((paths, labels))
    return ds.map(lambda path, label: (_decode(path), label), num_parallel_calls=tf.data.AUTOTUNE), class_names


def _decode(path):
    import tensorflow as tf

    return tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)


def _decodable(paths: list[str], progress_from: int = 5000) -> set[int]:
    """Indices of the files `_decode` reads without an error: every file decoded once, in parallel.

    Run before training so that a bad file is named and left out up front,
    instead of stopping an epoch half-way (tf.data's own error names no file).
    A progress bar is shown from `progress_from` files.
    """
    import keras
    import tensorflow as tf

    if not paths:
        return set()

    def check(index, path):
        image = _decode(path)
        return index, tf.shape(image)[0]

    ds = tf.data.Dataset.from_tensor_slices((np.arange(len(paths)), paths))
    ds = ds.map(check, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False).ignore_errors(log_warning=False)
    progress = keras.utils.Progbar(len(paths), unit_name="image") if len(paths) >= progress_from else None
    readable = set()
    for indices, _ in ds.batch(256).as_numpy_iterator():
        readable.update(indices.tolist())
        if progress is not None:
            progress.add(len(indices))
    if progress is not None:
        progress.update(len(paths), finalize=True)  # the skipped files count as checked
    return readable


def list_images(directory: str) -> list[str]:
    """The image files (`IMAGE_EXTENSIONS`) directly in `directory`, sorted by name."""
    return [os.path.join(directory, n) for n in sorted(os.listdir(directory)) if n.lower().endswith(IMAGE_EXTENSIONS)]


# === Dataset specs ===


def parse_dataset_spec(spec: str) -> tuple[str, str | None]:
    """Splits a dataset spec: `"tfds:NAME"`, `"folder:PATH"` or `"fashion_mnist"` -> `(kind, NAME | PATH | None)`."""
    kind, colon, location = str(spec).partition(":")
    if (kind in ("tfds", "folder") and colon and location) or (spec == "fashion_mnist"):
        return kind, location or None
    raise ValueError(
        f"`dataset` must be one of {', '.join(DATASET_SPECS)} (a tfds dataset already prepared in `data_dir`, "
        f"a folder of class sub-folders, or Fashion-MNIST from Debian's package). Received: dataset={spec!r}"
    )


def load_split(spec: str, split: str | None = None, data_dir: str | None = None, labels_from: str | None = None):
    """`(image, integer label)` pairs of one split of a dataset spec, and its class count.

    `labels_from` names the split whose classes define the labels (for
    folders, whose classes are their sub-folders: pass the training split when
    loading the validation split, so that a class means the same label in
    both). tfds and Fashion-MNIST labels are fixed by the dataset.

    - `"tfds:NAME"`: the tfds split `split` (required), prepared in `data_dir`;
      nothing is downloaded.
    - `"folder:PATH"`: `PATH/<split>/<class>/<images>`, or `PATH/<class>/<images>`
      when `split` is None.
    - `"fashion_mnist"`: `split` "train" or "test" (default), read from
      `data_dir` or Debian's `dataset-fashion-mnist`.
    """
    kind, location = parse_dataset_spec(spec)
    if kind == "tfds":
        if not split:
            raise ValueError(f"A tfds dataset needs a split name (e.g. 'validation'). Received: split={split!r}")
        return tfds_source(location, split, data_dir)
    if kind == "folder":
        directory = location if split is None else os.path.join(location, split)
        if not os.path.isdir(directory):
            raise ValueError(
                f"`folder:{location}` with split {split!r} reads {directory}, which is not a folder. "
                f"Received: dataset={spec!r}, split={split!r}"
            )
        names = None
        if labels_from is not None and labels_from != split:
            names = folder_classes(os.path.join(location, labels_from))
        source, names = folder_source(directory, names)
        return source, len(names)
    if split not in (None, "train", "test"):
        raise ValueError(f"Fashion-MNIST has the splits 'train' and 'test'. Received: split={split!r}")
    import tensorflow as tf

    (x_train, y_train), (x_test, y_test) = load_fashion_mnist(data_dir)
    images, labels = (x_train, y_train) if split == "train" else (x_test, y_test)
    return tf.data.Dataset.from_tensor_slices((images, labels)), len(FASHION_MNIST_CLASSES)
