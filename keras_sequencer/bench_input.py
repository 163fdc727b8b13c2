"""`python -m keras_sequencer bench-input`: how many training images per second the CPU can prepare.

Every accelerator of a job needs its host to decode and augment images as
fast as it trains on them. This times `data.make_dataset` with a recipe's
training transforms at its image size (the paper's: JPEG decode,
RandomResizedCrop, horizontal flip, RandAugment, random erasing, Mixup /
CutMix, label smoothing) over a stream of JPEG files encoded from a photo-
sized image (500×375, ImageNet's typical size), with tf.data's thread pool
limited to each requested thread count. Divide a model's training images/s
per accelerator (`bench`) by the images/s per thread printed here to get the
CPU threads each accelerator needs. It is a benchmark, never a test.
"""

import os
import time


def _jpeg_stream(count: int, height: int, width: int, seed: int):
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    files = []
    for _ in range(count):  # smooth gradients plus texture: compresses like a photo, not like noise
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([(x * rng.uniform(0.2, 0.6) + y * rng.uniform(0.2, 0.6)) % 256] * 3, axis=-1)
        image = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype("uint8")
        files.append(tf.io.encode_jpeg(image, quality=90).numpy())
    return files


def measure(recipe: str = "imagenet", batch_size: int = 64, batches: int = 10, threads=(1, None), seed: int = 0):
    """Rows of `(threads, images/s, images/s per thread)` for the recipe's training pipeline.

    Args:
        recipe: a key of `train.RECIPES`.
        batch_size: images per batch (the transforms are per batch after the crop).
        batches: batches timed after one warm-up batch.
        threads: tf.data thread-pool sizes to time; None means all cores.
    """
    import tensorflow as tf

    from keras_sequencer import data
    from keras_sequencer.train import get_recipe

    rec = get_recipe(recipe)
    size = rec.image_size or 224
    files = _jpeg_stream(16, 375, 500, seed)
    source = tf.data.Dataset.from_tensor_slices((files, [i % 10 for i in range(len(files))])).repeat()
    source = source.map(lambda encoded, label: (tf.io.decode_jpeg(encoded, channels=3), label))
    rows = []
    for count in threads:
        count = count or os.cpu_count()
        # A small shuffle buffer: the default 10,000 decoded photos would take minutes and gigabytes to
        # fill before the first batch, and once full it costs one decode per image either way.
        pipeline = data.make_dataset(
            source, 1000, batch_size, True, size, rec.augment, shuffle_buffer=4 * batch_size, seed=seed
        )
        options = tf.data.Options()
        options.threading.private_threadpool_size = count
        options.threading.max_intra_op_parallelism = 1
        iterator = iter(pipeline.with_options(options))
        next(iterator)  # warm-up: tracing and the first fill of the prefetch buffers
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        seconds = time.perf_counter() - start
        rate = batches * batch_size / seconds
        rows.append({"recipe": recipe, "size": size, "threads": count, "images_per_s": rate,
                     "images_per_s_per_thread": rate / count})  # fmt: skip
    return rows


def format_table(rows) -> str:
    lines = ["| recipe | size | threads | images/s | images/s per thread |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['recipe']} | {r['size']} | {r['threads']} | {r['images_per_s']:.1f} | "
            f"{r['images_per_s_per_thread']:.1f} |"
        )
    return "\n".join(lines)
