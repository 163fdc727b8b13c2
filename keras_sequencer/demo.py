"""The offline main job: train a small Sequencer2D on Fashion-MNIST and write a report.

Real data with no network: Debian's `dataset-fashion-mnist` package (or
`keras.datasets.fashion_mnist` online). Same path as any training run:
`keras_sequencer.data.make_dataset` -> `keras_sequencer.train.fit` ->
`model.evaluate` on the official 10,000-image test split.
"""

import json
import os
import time

import keras
import numpy as np

from keras_sequencer import checkpointing, data, train
from keras_sequencer.models import Sequencer2D

# A Sequencer2D sized for 28x28 images and a CPU budget of minutes: 4x4 patches ->
# a 7x7 token grid, one stage of three blocks at 64 channels, hidden size a quarter
# of the channels as in the paper's S/M/L. At this budget more epochs beat more
# width (the comparison is in benchmarks/README.md).
DEMO_ARCH = {
    "layers": (3,),
    "patch_sizes": (4,),
    "embed_dims": (64,),
    "hidden_sizes": (16,),
    "mlp_ratios": (2.0,),
}
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


def build_demo_model(drop_path_rate: float = 0.0) -> keras.Model:
    """The demo network; it takes raw 28x28x1 pixels in [0, 255] and outputs logits."""
    images = keras.Input((28, 28, 1), name="images")
    x = keras.layers.Rescaling(
        1.0 / (255.0 * FASHION_MNIST_STD), offset=-FASHION_MNIST_MEAN / FASHION_MNIST_STD, name="normalise"
    )(images)
    return Sequencer2D(
        **DEMO_ARCH,
        input_tensor=x,
        classes=10,
        classifier_activation=None,
        include_preprocessing=False,
        drop_path_rate=drop_path_rate,
        name="sequencer2d_fashion_mnist",
    )


def _plots(output_dir, history, confusion, x_test, y_test, predictions):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.arange(1, len(history["loss"]) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(epochs, history["loss"], label="train (smoothed labels, drop path)")
    axes[0].plot(epochs, history["val_loss"], label="test")
    axes[0].set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
    axes[1].plot(epochs, history["accuracy"], label="train (drop path)")
    axes[1].plot(epochs, history["val_accuracy"], label="test")
    axes[1].set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "curves.png"), dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(confusion, cmap="Blues")
    names = data.FASHION_MNIST_CLASSES
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true", title="Confusion matrix (test)")
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.set_yticklabels(names)
    for i in range(10):
        for j in range(10):
            ax.text(j, i, confusion[i, j], ha="center", va="center", fontsize=7,
                    color="white" if confusion[i, j] > confusion.max() / 2 else "black")  # fmt: skip
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "confusion.png"), dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(4, 8, figsize=(12, 7))
    for k, ax in enumerate(axes.flat):
        ax.imshow(x_test[k, :, :, 0], cmap="gray")
        ok = predictions[k] == y_test[k]
        ax.set_title(f"{names[predictions[k]]}\n({names[y_test[k]]})" if not ok else names[predictions[k]],
                     fontsize=7, color="green" if ok else "red")  # fmt: skip
        ax.axis("off")
    fig.suptitle("Test predictions (red: wrong, true class in brackets)")
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "predictions.png"), dpi=120)
    plt.close(fig)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def run_small_ops_side_by_side() -> bool:
    """On TensorFlow with at most 2 cores, runs independent ops at once, one thread each.

    The demo model's ops are small (7-step LSTMs of 16 units, 64 channels), too small to gain from being
    split over two cores; the height and width LSTMs and their two directions are independent and can run
    side by side instead. On a 2-core CPU one thread per op with two ops at a time made the training step
    1.15x faster than TensorFlow's defaults (benchmarks/README.md, "Demo: Fashion-MNIST"). Larger machines
    keep TensorFlow's defaults, as do processes whose threads are already set (`TF_NUM_INTRAOP_THREADS`,
    `TF_NUM_INTEROP_THREADS`, `tf.config.threading`) or whose TensorFlow runtime already started.

    Returns:
        Whether the threads were set.
    """
    if keras.backend.backend() != "tensorflow" or usable_cores() > 2:
        return False
    if os.environ.get("TF_NUM_INTRAOP_THREADS") or os.environ.get("TF_NUM_INTEROP_THREADS"):
        return False
    import tensorflow as tf

    threading = tf.config.threading
    if threading.get_intra_op_parallelism_threads() or threading.get_inter_op_parallelism_threads():
        return False
    try:
        threading.set_intra_op_parallelism_threads(1)
        threading.set_inter_op_parallelism_threads(2)
    except RuntimeError:  # the runtime has started: its thread pools are fixed
        return False
    return True


def side_by_side_parts() -> int:
    """The demo model's `batch_parts`: 4 where TensorFlow runs each op on one thread and several ops at once
    (as `run_small_ops_side_by_side` sets it), else 1.

    With one thread per op, the slices of a batch keep both cores of a 2-core CPU
    busy: 4 parts made the training step 1.3x and `evaluate` 1.6x faster
    there (benchmarks/README.md, "Demo: batches in parts").
    """
    if keras.backend.backend() != "tensorflow":
        return 1
    import tensorflow as tf

    threading = tf.config.threading
    one_thread_per_op = threading.get_intra_op_parallelism_threads() == 1
    return 4 if one_thread_per_op and threading.get_inter_op_parallelism_threads() >= 2 else 1


def run_demo(
    output_dir: str = "reports/demo",
    epochs: int | None = None,
    batch_size: int = 256,
    data_dir: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    verbose="auto",
) -> dict:
    """Trains the demo model on Fashion-MNIST, evaluates it on the test split, writes the report.

    Args:
        output_dir: report folder (curves, confusion matrix, prediction grid,
            metrics.json, the `.keras` model, training logs and checkpoints).
        epochs: default: the `fashion_mnist` recipe's.
        batch_size: global batch size.
        data_dir: folder with the Fashion-MNIST IDX files (default: Debian's).
        limit: use only this many training and test images (for quick checks).
        seed: seed of weights, shuffling and augmentation.
        verbose: Keras progress-bar setting.

    `python -m keras_sequencer demo` first calls `run_small_ops_side_by_side()`
    (TensorFlow's threads for the demo's small ops); in a fresh process of
    your own, call it before anything else runs TensorFlow. With those threads
    the model runs its batches in parts (`side_by_side_parts`).

    Returns:
        The metrics written to `metrics.json`. A re-run into the same
        `output_dir` resumes the run (or, finished, trains nothing) and
        writes the report of all its epochs; `train_seconds` counts this
        call's training only.
    """
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    recipe = train.get_recipe("fashion_mnist")
    epochs = epochs or recipe.epochs
    (x_train, y_train), (x_test, y_test) = data.load_fashion_mnist(data_dir)
    if limit:
        x_train, y_train, x_test, y_test = x_train[:limit], y_train[:limit], x_test[:limit], y_test[:limit]
    train_ds = data.make_dataset(
        tf.data.Dataset.from_tensor_slices((x_train, y_train)),
        num_classes=10,
        batch_size=batch_size,
        training=True,
        image_size=None,
        augment=recipe.augment,
        seed=seed,
    )
    test_ds = data.make_dataset(
        tf.data.Dataset.from_tensor_slices((x_test, y_test)), num_classes=10, batch_size=500, training=False
    )
    steps_per_epoch = len(x_train) // batch_size

    start = time.time()
    with train.distribution_scope():
        model = build_demo_model(drop_path_rate=recipe.drop_path_rate)
        model.batch_parts = side_by_side_parts()
        history = train.fit(
            model, train_ds, test_ds, recipe, batch_size, steps_per_epoch, output_dir, epochs=epochs, verbose=verbose
        )
    train_seconds = time.time() - start
    # Every epoch of the run, also when this call resumed it or found it finished (then `history` lacks some).
    log = checkpointing.read_log(output_dir) or history.history

    logits = model.predict(test_ds, verbose=0)
    predictions = logits.argmax(-1)
    accuracy = float((predictions == y_test).mean())
    confusion = np.zeros((10, 10), dtype=int)
    np.add.at(confusion, (y_test, predictions), 1)
    model.save(os.path.join(output_dir, "model.keras"))
    _plots(output_dir, log, confusion, x_test, y_test, predictions)
    metrics = {
        "dataset": "fashion_mnist",
        "train_images": len(x_train),
        "test_images": len(x_test),
        "test_accuracy": accuracy,
        "epochs": len(log["loss"]),
        "train_seconds": round(train_seconds, 1),
        "backend": keras.backend.backend(),
        "seed": seed,
        "batch_parts": model.batch_parts,
        "parameters": model.count_params(),
        "per_class_accuracy": {
            name: float(confusion[i, i] / max(confusion[i].sum(), 1))
            for i, name in enumerate(data.FASHION_MNIST_CLASSES)
        },
    }
    with open(os.path.join(output_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics
