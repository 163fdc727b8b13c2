"""Transfer learning with Sequencer2D-S, the way Kaggle notebooks do it.

ImageNet weights -> new head -> train the head with the backbone frozen ->
unfreeze and fine-tune everything at a low learning rate. The same steps are
in `transfer_learning.ipynb`.

    python examples/transfer_learning.py --dataset tfds:tf_flowers            # online / prepared tfds
    python examples/transfer_learning.py --dataset folder:/kaggle/input/flowers \\
        --weights /kaggle/input/sequencer2d-s/model.safetensors               # internet off

A folder dataset is `PATH/<class>/<images>`; a tenth of it is held out.
"""

import argparse

import keras

import keras_sequencer as ks
from keras_sequencer import data


def load_datasets(dataset: str, image_size: int, batch_size: int, data_dir=None):
    """Training and validation tf.data pipelines plus the class count."""
    kind, _ = data.parse_dataset_spec(dataset)
    if kind == "folder":  # one folder of class sub-folders: hold out a tenth
        source, num_classes = data.load_split(dataset)
        count = int(source.cardinality())
        source = source.shuffle(count, seed=0, reshuffle_each_iteration=False)
        val_src, train_src = source.take(max(count // 10, 1)), source.skip(max(count // 10, 1))
    else:
        train_src, num_classes = data.load_split(dataset, "train[:90%]", data_dir)
        val_src, _ = data.load_split(dataset, "train[90%:]", data_dir)
    train_src, val_src = data.as_rgb(train_src), data.as_rgb(val_src)  # the backbone takes RGB
    # Light augmentation for transfer (the ImageNet recipe's mixing is for training from scratch).
    augment = data.Augment(scale=(0.35, 1.0), rand_augment=0.0, erasing=0.0, mixup_alpha=0.0, cutmix_alpha=0.0)
    train = data.make_dataset(train_src, num_classes, batch_size, True, image_size, augment, seed=0)
    val = data.make_dataset(val_src, num_classes, batch_size, False, image_size)
    return train, val, num_classes


def build_classifier(num_classes: int, weights: str, image_size: int) -> tuple[keras.Model, keras.Model]:
    """A Sequencer2D-S backbone (pooled features) with a new softmax head."""
    backbone = ks.Sequencer2DS(
        weights=weights, include_top=False, pooling="avg", input_shape=(image_size, image_size, 3)
    )
    inputs = keras.Input((image_size, image_size, 3))
    features = backbone(inputs)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="head")(keras.layers.Dropout(0.2)(features))
    return keras.Model(inputs, outputs), backbone


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="tfds:tf_flowers")
    parser.add_argument("--weights", default="imagenet", help="'imagenet' or a checkpoint / .weights.h5 path")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--head-epochs", type=int, default=3)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="steps per epoch (default: the whole split)")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)

    train, val, num_classes = load_datasets(args.dataset, args.image_size, args.batch_size, args.data_dir)
    model, backbone = build_classifier(num_classes, args.weights, args.image_size)
    loss = keras.losses.CategoricalCrossentropy()

    # 1. Frozen backbone: only the new head learns.
    backbone.trainable = False
    model.compile(keras.optimizers.AdamW(1e-3), loss, metrics=["accuracy"])
    model.fit(train, validation_data=val, epochs=args.head_epochs, steps_per_epoch=args.steps, verbose=2)

    # 2. Unfrozen: everything fine-tunes at a low rate (recompile after changing `trainable`).
    backbone.trainable = True
    model.compile(keras.optimizers.AdamW(1e-5, weight_decay=1e-4), loss, metrics=["accuracy"])
    history = model.fit(train, validation_data=val, epochs=args.finetune_epochs, steps_per_epoch=args.steps, verbose=2)
    print(f"validation accuracy: {history.history['val_accuracy'][-1]:.4f}")
    return model, history


if __name__ == "__main__":
    main()
