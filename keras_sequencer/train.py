"""Training through `model.fit`: the paper's recipes, schedules, callbacks and multi-device scopes."""

import contextlib
import dataclasses
import os

import keras

from keras_sequencer import data, distributed
from keras_sequencer.checkpointing import TrainingState
from keras_sequencer.data import NO_AUGMENT, Augment
from keras_sequencer.models import Sequencer2D
from keras_sequencer.presets import variant_config


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A training recipe (the authors' hyper-parameters where they published them).

    Learning rates are for `base_batch` and scale linearly with the actual
    global batch size.

    Attributes:
        epochs: training epochs (warmup included).
        lr: peak learning rate at `base_batch`.
        base_batch: the global batch the recipe's `lr` was set for.
        weight_decay: AdamW decoupled weight decay (not applied to biases and norms).
        warmup_epochs: linear warmup from `warmup_lr`.
        warmup_lr, min_lr: start of the warmup, floor of the cosine decay.
        drop_path_rate: stochastic depth of the last block (linear ramp from 0).
        image_size: training / evaluation side.
        clip_norm: global gradient-norm clipping, None for none.
        augment: the training transforms.
    """

    epochs: int
    lr: float
    base_batch: int
    weight_decay: float
    warmup_epochs: float
    warmup_lr: float = 1e-6
    min_lr: float = 1e-6
    drop_path_rate: float = 0.1
    image_size: int | None = 224
    clip_norm: float | None = None
    augment: Augment = Augment()


RECIPES: dict[str, Recipe] = {
    # ImageNet-1k from scratch: AdamW 2e-3 at global batch 2048, wd 0.05, 300 epochs, cosine, 20 warmup.
    "imagenet": Recipe(epochs=300, lr=2e-3, base_batch=2048, weight_decay=0.05, warmup_epochs=20),
    # The authors' ↑392 fine-tune of a 224 checkpoint: 30 epochs, lr 5e-5 at 512, no warmup, drop path 0.4.
    "finetune392": Recipe(
        epochs=30, lr=5e-5, base_batch=512, weight_decay=1e-8, warmup_epochs=0, drop_path_rate=0.4, image_size=392
    ),
    # The authors' CIFAR transfer: 200 epochs, lr 1e-4 at 512, wd 1e-4, 5 warmup, clip 1, no random erasing.
    "cifar_transfer": Recipe(
        epochs=200,
        lr=1e-4,
        base_batch=512,
        weight_decay=1e-4,
        warmup_epochs=5,
        clip_norm=1.0,
        augment=dataclasses.replace(Augment(), erasing=0.0),
    ),
    # The offline demo: a small Sequencer2D on 28x28 Fashion-MNIST. No geometric augmentation: with 4x4
    # patches, pad-and-crop and flip lowered the demo model's test accuracy (docs/design.md); smoothing 0.1
    # and a little drop path stay. 18 epochs rather than 15: +0.20 and +0.33 point at seeds 0 and 1
    # (benchmarks/README.md, "Demo: batches in parts").
    "fashion_mnist": Recipe(
        epochs=18,
        lr=2e-3,
        base_batch=128,
        weight_decay=0.05,
        warmup_epochs=1,
        drop_path_rate=0.05,
        image_size=None,
        augment=dataclasses.replace(NO_AUGMENT, label_smoothing=0.1),
    ),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"`recipe` must be one of {sorted(RECIPES)}. Received: recipe={name!r}")
    return RECIPES[name]


def learning_rate_schedule(recipe: Recipe, global_batch: int, steps_per_epoch: int, epochs: int | None = None):
    """Linear warmup from `warmup_lr` to the scaled peak, then cosine decay to `min_lr`, per step."""
    epochs = epochs or recipe.epochs
    peak = recipe.lr * global_batch / recipe.base_batch
    warmup_steps = int(recipe.warmup_epochs * steps_per_epoch)
    decay_steps = max(epochs * steps_per_epoch - warmup_steps, 1)
    if warmup_steps == 0:
        return keras.optimizers.schedules.CosineDecay(peak, decay_steps, alpha=min(recipe.min_lr / peak, 1.0))
    return keras.optimizers.schedules.CosineDecay(
        recipe.warmup_lr,
        decay_steps,
        alpha=min(recipe.min_lr / peak, 1.0),
        warmup_target=peak,
        warmup_steps=warmup_steps,
    )


def make_optimizer(recipe: Recipe, global_batch: int, steps_per_epoch: int, epochs: int | None = None):
    """AdamW with the recipe's schedule; biases and LayerNorm parameters get no weight decay (as timm)."""
    optimizer = keras.optimizers.AdamW(
        learning_rate=learning_rate_schedule(recipe, global_batch, steps_per_epoch, epochs),
        weight_decay=recipe.weight_decay,
        global_clipnorm=recipe.clip_norm,
    )
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    return optimizer


@contextlib.contextmanager
def distribution_scope(devices: int | None = None, auto_shard_dataset: bool = True):
    """Data parallelism over this machine's devices or, on JAX, over every device of a multi-process job.

    - JAX: `keras.distribution.DataParallel`, set globally for the duration.
      When Keras' variables `KERAS_DISTRIBUTION_JOB_ADDRESSES`,
      `KERAS_DISTRIBUTION_NUM_PROCESSES` and `KERAS_DISTRIBUTION_PROCESS_ID`
      describe a job of several processes, the process first joins it
      (`distributed.initialize`: gloo collectives between CPUs) and the
      distribution spans the devices of all processes. With
      `auto_shard_dataset=True` every process builds the same global-batch
      pipeline and Keras feeds each its own slice of every batch; with False
      each process's pipeline yields only its share (`distributed.local_share`),
      which saves the decoding and augmentation of the other shares. Enter the
      scope before building models or datasets: joining must precede the first
      JAX computation.
    - TensorFlow: `tf.distribute.MirroredStrategy` over local devices (build
      and compile inside the scope).
    - PyTorch: one device; Keras 3 has no data parallelism for its torch
      backend (train many devices with the JAX backend, or with torchrun and
      DistributedDataParallel in a training loop of your own).
    A `TF_CONFIG` cluster of several tasks is refused on every backend
    (`distributed.refuse_tf_config`). With one device this is a no-op.
    """
    backend = keras.backend.backend()
    distributed.refuse_tf_config()  # on every backend: ignoring it would train independent copies
    job = distributed.job_from_environment()
    if job is not None and job.num_processes > 1 and backend != "jax":
        raise ValueError(
            f"{distributed.ADDRESSES} and {distributed.NUM_PROCESSES}={job.num_processes} describe a multi-process "
            f"job, which this package trains on the JAX backend only; this process runs the {backend} backend. "
            "Set KERAS_BACKEND=jax on every process (README, 'Training on many machines')."
        )
    if backend == "tensorflow":
        import tensorflow as tf

        visible = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        names = [d.name for d in visible][: devices or len(visible)]
        if len(names) <= 1:
            yield None
            return
        strategy = tf.distribute.MirroredStrategy(names)
        with strategy.scope():
            yield strategy
    elif backend == "jax":
        if job is not None and job.num_processes > 1:
            if devices is not None:
                raise ValueError(
                    "In a multi-process job every device of every process trains; `devices` must be None. "
                    f"Received: devices={devices}"
                )
            distributed.initialize(job)
        available = keras.distribution.list_devices()
        chosen = available[: devices or len(available)]
        if len(chosen) <= 1:
            yield None
            return
        previous = keras.distribution.distribution()
        distribution = keras.distribution.DataParallel(devices=chosen, auto_shard_dataset=auto_shard_dataset)
        keras.distribution.set_distribution(distribution)
        try:
            yield distribution
        finally:
            keras.distribution.set_distribution(previous)
    else:
        if devices not in (None, 1):
            raise ValueError(
                "Multi-device training is supported on the TensorFlow (MirroredStrategy) and JAX "
                f"(DataParallel) backends; the {backend} backend trains on one device. Received: devices={devices}"
            )
        yield None


def _data_parallel_devices() -> int:
    """Devices the current JAX distribution splits each batch over (1 without one)."""
    distribution = keras.distribution.distribution() if keras.backend.backend() == "jax" else None
    if distribution is None:
        return 1
    return int(distribution.device_mesh.devices.size)


def even_validation_batches(dataset, batch_size: int, size: int | None = None):
    """Re-batches a validation set into full batches that give the same loss and accuracy as the original.

    A multi-process job splits every batch evenly between processes, so the
    last, short batch of a validation set cannot be evaluated as it is. This
    pads it with zero-weight samples and weights the real samples by
    `padded / size`, so that Keras' mean loss (sum over each batch / batch
    size, averaged over batches by size) and its weighted accuracy both equal
    the unpadded means. Returns `(images, targets, weights)` batches.

    Args:
        dataset: batched `(images, targets)` with fully known per-sample shapes.
        batch_size: the global batch size of the result.
        size: number of samples (counted with one pass over `dataset` if None).
    """
    import tensorflow as tf

    samples = dataset.unbatch()
    known = int(samples.cardinality())
    if size is None:
        size = known if known >= 0 else int(samples.reduce(tf.constant(0, tf.int64), lambda count, *_: count + 1))
    elif known >= 0 and known != size:
        raise ValueError(f"The validation set holds {known} samples, not {size}. Received: validation_size={size}")
    if size <= 0:
        raise ValueError(f"The validation set is empty. Received: size={size}")
    batches = -(-size // batch_size)
    padding = batches * batch_size - size
    scale = batches * batch_size / size
    specs = samples.element_spec
    if not all(spec.shape.is_fully_defined() for spec in tf.nest.flatten(specs)):
        raise ValueError(
            f"Validation samples must have fully known shapes to be split between processes. Received: {specs}"
        )
    weighted = samples.map(lambda *sample: (*sample, tf.constant(scale, tf.float32)))
    zeros = tuple(tf.zeros(spec.shape, spec.dtype) for spec in specs)
    filler = tf.data.Dataset.from_tensors((*zeros, tf.constant(0.0, tf.float32))).repeat(padding)
    return weighted.concatenate(filler).batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def fit(
    model: keras.Model,
    train_data,
    validation_data,
    recipe: Recipe,
    global_batch: int,
    steps_per_epoch: int,
    output_dir: str,
    epochs: int | None = None,
    verbose="auto",
    callbacks=(),
    optimizer=None,
    validation_size: int | None = None,
):
    """Compiles `model` for the recipe and trains it with checkpoints that survive a kill.

    Writes into `output_dir` (see `checkpointing.TrainingState`): `backup/`
    (a re-run resumes after the last finished epoch, and a finished run
    trains nothing), `last.keras`, `log.csv` and, when the `tensorboard`
    package is installed, `tensorboard/`. In a multi-process job (see
    `distribution_scope`) process 0 alone writes them and every process
    resumes from the same backup, so `output_dir` must be shared by all hosts.
    The model must output logits (`classifier_activation=None`); labels are
    one-hot / soft. `callbacks` run after these.

    Args:
        train_data: batches of the global batch size or, in a job whose
            scope was entered with `auto_shard_dataset=False`, this process's
            share of each (`distributed.local_share`).
        validation_data: global batches, evaluated over every device.
        global_batch: the batch size summed over all devices and processes;
            it scales the recipe's learning rate.
        optimizer: replaces the recipe's AdamW (e.g. plain SGD for exact
            comparisons between device layouts).
        validation_size: number of validation samples; only needed when the
            batch is split over several devices (otherwise counted once).

    Returns:
        The `keras.callbacks.History`.
    """
    epochs = recipe.epochs if epochs is None else epochs
    for name, value, minimum in (("global_batch", global_batch, 1), ("steps_per_epoch", steps_per_epoch, 1),
                                 ("epochs", epochs, 0)):  # fmt: skip
        if not isinstance(value, int) or value < minimum:
            raise ValueError(f"`{name}` must be an integer >= {minimum}. Received: {name}={value!r}")
    devices = _data_parallel_devices()
    if global_batch % devices:
        raise ValueError(
            f"The global batch size must be divisible by the {devices} devices it is split over. "
            f"Received: global_batch={global_batch}"
        )
    if validation_data is not None and devices > 1:
        validation_data = even_validation_batches(validation_data, global_batch, validation_size)
        distribution = keras.distribution.distribution()
        if distributed.process_count() > 1 and not distribution.auto_shard_dataset:
            count = distributed.process_count()  # this process's slice of every global batch
            validation_data = validation_data.rebatch(global_batch // count).shard(count, distributed.process_index())
    if distributed.is_chief():
        os.makedirs(output_dir, exist_ok=True)
    model.compile(
        optimizer=optimizer or make_optimizer(recipe, global_batch, steps_per_epoch, epochs),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
        # Weighted, so that the sample weights of `even_validation_batches` count.
        weighted_metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )
    standard = [TrainingState(output_dir)]
    if _has_tensorboard() and distributed.is_chief():
        standard.append(keras.callbacks.TensorBoard(os.path.join(output_dir, "tensorboard")))
    return model.fit(
        train_data,
        validation_data=validation_data,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        callbacks=standard + list(callbacks),
        verbose=verbose if distributed.is_chief() else 0,
        shuffle=False,  # the tf.data pipeline shuffles
    )


def run(
    dataset: str,
    variant: str = "s",
    recipe: str = "imagenet",
    weights: str | None = None,
    batch_size: int = 64,
    epochs: int | None = None,
    output_dir: str = "runs/train",
    data_dir: str | None = None,
    train_split: str = "train",
    eval_split: str = "validation",
    mixed_precision: str | None = None,
    devices: int | None = None,
    steps_per_epoch: int | None = None,
    seed: int = 0,
    image_size: int | None = None,
):
    """Trains or fine-tunes a Sequencer2D variant on a tfds dataset or an image folder.

    Args:
        dataset: a spec for `data.load_split`: `"tfds:NAME"` (prepared in
            `data_dir`; nothing is downloaded), `"folder:PATH"`
            (PATH/<train_split>/<class>/..., PATH/<eval_split>/<class>/...)
            or `"fashion_mnist"` (splits "train" and "test").
        variant: "s", "m" or "l", or a dict of `Sequencer2D` architecture
            arguments (`layers`, `embed_dims`, ...) for a model of another size
            (trained from scratch: `weights` must be None).
        recipe: a key of `RECIPES`.
        weights: None (from scratch), "imagenet" or a path; with weights the head
            is replaced when the class count is not 1000.
        batch_size: global batch size (the recipe's learning rate scales with it).
        epochs: default: the recipe's.
        output_dir: checkpoints and logs (see `fit`); re-running resumes.
        data_dir: tfds data directory.
        train_split, eval_split: split names (tfds) or sub-folder names (folder).
        mixed_precision: None, "mixed_float16" or "mixed_bfloat16".
        devices: devices to train on (see `distribution_scope`).
        steps_per_epoch: default: one pass over the training split.
        seed: seed of weights, shuffling and augmentation.
        image_size: training / evaluation side; default: the recipe's
            (224 for recipes without one).

    Returns:
        `(model, history)`.
    """
    rec = get_recipe(recipe)
    if isinstance(variant, dict):
        if weights is not None:
            raise ValueError(
                "Pretrained weights belong to the variants 's', 'm' and 'l'; a model built from an architecture "
                f"dict trains from scratch. Received: variant={variant!r}, weights={weights!r}"
            )
        config, variant = dict(variant), None
    else:
        config = variant_config(variant)
    checks = (("batch_size", batch_size), ("epochs", epochs), ("steps_per_epoch", steps_per_epoch),
              ("image_size", image_size))  # fmt: skip
    for name, value in checks:
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    train_source, num_classes = data.load_split(dataset, train_split, data_dir)
    if num_classes < 2:
        raise ValueError(
            f"The training split of {dataset} has {num_classes} class; a classifier needs at least 2 (it would "
            f"reach a loss of 0 learning nothing). Received: dataset={dataset!r}, train_split={train_split!r}"
        )
    eval_source = data.as_rgb(data.load_split(dataset, eval_split, data_dir, labels_from=train_split)[0])
    if steps_per_epoch is None:
        count = int(train_source.cardinality())
        if count <= 0:
            raise ValueError(f"The size of {dataset} is unknown; pass steps_per_epoch. Received: dataset={dataset!r}")
        steps_per_epoch = max(count // batch_size, 1)

    keras.utils.set_random_seed(seed)
    if mixed_precision:
        keras.mixed_precision.set_global_policy(mixed_precision)
    size = image_size or rec.image_size or 224
    eval_size = int(eval_source.cardinality())
    # The scope comes first: joining a multi-process JAX job must precede the first JAX computation, and
    # the pipelines' Keras augmentation layers already create variables.
    with distribution_scope(devices, auto_shard_dataset=False):
        # Each process decodes and augments only its share of the data (a different seed per process).
        shard, local_batch = distributed.local_share(train_source, batch_size)
        shard = data.as_rgb(shard)  # grayscale sources (Fashion-MNIST, MNIST-like tfds sets)
        seed_here = seed + distributed.process_index()
        train_ds = data.make_dataset(shard.repeat(), num_classes, local_batch, True, size, rec.augment, seed=seed_here)
        eval_ds = data.make_dataset(eval_source, num_classes, batch_size, False, size)
        if weights is not None and num_classes != 1000:
            backbone = Sequencer2D(
                **config, weights=weights, include_top=False, pooling="avg", input_shape=(size, size, 3),
                drop_path_rate=rec.drop_path_rate, variant=variant,
            )  # fmt: skip
            outputs = keras.layers.Dense(num_classes, name="predictions", dtype="float32")(backbone.output)
            model = keras.Model(backbone.input, outputs, name=f"sequencer2d_{variant}")
        else:
            model = Sequencer2D(
                **config, weights=weights, classes=num_classes, classifier_activation=None,
                input_shape=(size, size, 3), drop_path_rate=rec.drop_path_rate, variant=variant,
            )  # fmt: skip
        history = fit(
            model, train_ds, eval_ds, rec, batch_size, steps_per_epoch, output_dir, epochs=epochs,
            validation_size=eval_size if eval_size > 0 else None,
        )  # fmt: skip
    return model, history
