"""Sharing models as presets: keras-hub's directory layout, a model card, and loading without keras-hub.

- `save_preset(model, path)` writes a classifier (a model of this package or a
  `keras_sequencer.hub.Sequencer2DImageClassifier`) as a preset: keras-hub's
  own files (through its saver, so keras-hub must be installed), this
  package's entry in `metadata.json` and a model card, `README.md`.
- `load_preset(path)` builds the Keras model a preset holds with this package
  alone; `keras_hub.models.ImageClassifier.from_preset(path)` and
  `keras_hub.models.Backbone.from_preset(path)` load the same preset.
- `convert_to_preset(source, variant, path)` makes a preset from a timm or
  authors' checkpoint (`python -m keras_sequencer convert SOURCE --variant s --preset DIR`).

Uploading is keras-hub's (`keras_hub.upload_preset("hf://USER/NAME", path)`,
or `"kaggle://USER/MODEL/keras/NAME"`); nothing here touches the network.
"""

import importlib.metadata
import json
import os
import shutil
import tempfile

import keras
import numpy as np

from keras_sequencer import pretrained
from keras_sequencer.analysis import count_macs
from keras_sequencer.layers import PatchEmbed, Sequencer2DBlock
from keras_sequencer.models import Sequencer2D, Sequencer2DBackbone, create_model, preset_io
from keras_sequencer.models.backbone import KERAS_HUB_AVAILABLE
from keras_sequencer.presets import CHECKPOINTS, IMAGENET_EVAL, PAPER_MIXER, VARIANTS, EvalConfig

_PAPER = "https://arxiv.org/abs/2205.01972"


def _package_version() -> str:
    try:
        return importlib.metadata.version("keras-sequencer")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "unknown"


def _hub():
    """The keras-hub task classes, or an ImportError that says how to get them."""
    if not KERAS_HUB_AVAILABLE:
        raise ImportError(
            "Writing a preset uses keras-hub's saver: pip install 'keras-sequencer[hub]'. Reading one "
            "(keras_sequencer.load_preset) works without it."
        )
    from keras_sequencer import hub

    return hub


# === Loading ===


def load_preset(
    preset,
    *,
    include_top: bool = True,
    classifier_activation="softmax",
    include_preprocessing: bool = True,
    input_shape=None,
    implementation: str = "auto",
    name: str | None = None,
) -> keras.Model:
    """The Keras model a preset directory holds, built by this package alone (keras-hub is not needed).

    The model is the one `Sequencer2D` builds for the preset's architecture
    (S, M, L, an ablation or any other), with the preset's weights. As every
    model of this package it takes RGB in [0, 255] and normalises inside
    (`include_preprocessing=True`); resizing and cropping are the caller's
    (`keras_sequencer.imagenet.load_image` does timm's eval transform).
    keras-hub's `ImageClassifier.from_preset(path)` is the same network with
    keras-hub's preprocessor in front and logits out.

    Args:
        preset: a preset directory (keras-hub layout).
        include_top: with the preset's head (a classifier preset), or
            headless (any preset; then `pooling` is None).
        classifier_activation: activation of the head; None for logits.
        include_preprocessing: normalise [0, 255] RGB inside the model with
            the preset's mean and std.
        input_shape: optional `(height, width, 3)`.
        implementation: BiLSTM2D forward path (see `BiLSTM2D`).
        name: model name; default from the preset's variant.

    Returns:
        A `Sequencer2DModel`.
    """
    info = preset_io.read_preset(preset)
    if include_top and info.num_classes is None:
        raise ValueError(
            f"The preset {info.path} holds a backbone only (no task.json): pass include_top=False, or add your "
            "own head."
        )
    if include_preprocessing and info.eval is not None:
        scale, offset = info.eval.get("scale"), info.eval.get("offset")
        imagenet_scale, imagenet_offset = IMAGENET_EVAL.scale_offset
        if (
            scale is not None
            and offset is not None
            and not (np.allclose(scale, imagenet_scale, rtol=1e-6) and np.allclose(offset, imagenet_offset, rtol=1e-6))
        ):
            raise ValueError(
                f"The preset {info.path} normalises images as x * {scale} + {offset}, not with the ImageNet mean "
                "and std this package builds in; pass include_preprocessing=False and normalise that way."
            )
    config = info.backbone_config
    return Sequencer2D(
        **info.architecture,
        include_top=include_top,
        weights=info.path,
        input_shape=input_shape,
        classes=info.num_classes or 1000,
        classifier_activation=classifier_activation,
        include_preprocessing=include_preprocessing,
        layer_norm_epsilon=config.get("layer_norm_epsilon", 1e-6),
        implementation=implementation,
        name=name or (f"sequencer2d_{info.variant}" if info.variant else "sequencer2d"),
    )


# === Writing ===


def architecture_of(model: keras.Model) -> dict:
    """The `Sequencer2D` arguments of a model of this package, read from its layers (any file it was loaded from)."""
    stages, options = [], None
    for layer in model.layers:
        if isinstance(layer, PatchEmbed):
            stages.append({"patch": layer.patch_size, "dim": layer.filters, "blocks": []})
        elif isinstance(layer, Sequencer2DBlock) and stages:
            stages[-1]["blocks"].append(layer)
    if not stages or not all(stage["blocks"] for stage in stages):
        raise ValueError(f"Model {model.name!r} is not a Sequencer model (no PatchEmbed / Sequencer2DBlock stages).")
    first = stages[0]["blocks"][0].get_config()
    options = {key: first[key] for key in preset_io.OPTION_FIELDS}
    return {
        "layers": tuple(len(stage["blocks"]) for stage in stages),
        "patch_sizes": tuple(stage["patch"] for stage in stages),
        "embed_dims": tuple(stage["dim"] for stage in stages),
        "hidden_sizes": tuple(stage["blocks"][0].hidden_size for stage in stages),
        "mlp_ratios": tuple(float(stage["blocks"][0].mlp_ratio) for stage in stages),
        "layer_norm_epsilon": first["layer_norm_epsilon"],
        **options,
    }


def _hub_classifier(model: keras.Model, eval_config: EvalConfig):
    """A keras-hub classifier with `model`'s weights: a backbone without the normalisation, the same head."""
    hub = _hub()
    if isinstance(model, hub.Sequencer2DImageClassifier):
        return model
    try:
        head = model.get_layer("predictions")
    except ValueError:
        raise ValueError(
            f"Model {model.name!r} has no classification head ('predictions'); a preset of this package is a "
            "classifier. Save a headless backbone with Sequencer2DBackbone.save_to_preset (keras-hub)."
        ) from None
    if model.get_layer("norm").output is not model.get_layer("avg_pool").input:
        raise ValueError(f"Model {model.name!r} is not Sequencer2D's classifier (norm -> avg_pool -> predictions).")
    # The preset's preprocessor normalises with `eval_config`; the network must take exactly what that gives.
    before_stem = []
    for layer in model.layers:
        if isinstance(layer, PatchEmbed):
            break
        if not isinstance(layer, keras.layers.InputLayer):
            before_stem.append(layer)
    mean, std = np.asarray(eval_config.mean) * 255.0, np.asarray(eval_config.std) * 255.0
    normalises = (
        len(before_stem) == 1
        and isinstance(before_stem[0], keras.layers.Normalization)
        and np.allclose(np.ravel(keras.ops.convert_to_numpy(before_stem[0].mean)), mean, rtol=1e-6)
        and np.allclose(np.ravel(keras.ops.convert_to_numpy(before_stem[0].variance)), std**2, rtol=1e-6)
    )
    if not normalises:
        found = ", ".join(f"{layer.name} ({type(layer).__name__})" for layer in before_stem) or "none"
        raise ValueError(
            f"Model {model.name!r} must take [0, 255] RGB and normalise it with the mean and std of `eval_config` "
            f"(include_preprocessing=True), which the preset's preprocessor then does in its place; its layers "
            f"before the stem: {found}. Rebuild it that way (without input_tensor) and copy the weights, or pass "
            "the eval_config its inputs were normalised with."
        )
    backbone = Sequencer2DBackbone(**architecture_of(model), name=f"{model.name}_backbone")
    for layer in backbone.layers:
        if layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    scale, offset = eval_config.scale_offset
    converter = hub.Sequencer2DImageConverter(
        image_size=(eval_config.input_size, eval_config.input_size),
        crop_pct=eval_config.crop_pct,
        interpolation=eval_config.interpolation,
        scale=scale,
        offset=offset,
        name="sequencer2d_image_converter",
    )
    # Named, as the backbone is: Keras' default names count the layers made before in this process, and a
    # preset's files would then depend on what the process did first.
    preprocessor = hub.Sequencer2DImageClassifierPreprocessor(
        converter, name="sequencer2d_image_classifier_preprocessor"
    )
    classifier = hub.Sequencer2DImageClassifier(
        backbone, num_classes=head.units, preprocessor=preprocessor, name=model.name
    )
    classifier.output_dense.set_weights(head.get_weights())  # logits: keras-hub's classifiers end without softmax
    return classifier


def save_preset(
    model: keras.Model,
    path,
    *,
    variant: str | None = None,
    source: str | None = None,
    published: bool = False,
    eval_config: EvalConfig = IMAGENET_EVAL,
) -> str:
    """Writes a classifier as a preset directory (keras-hub layout, model card included); returns the path.

    The directory is written under a temporary name and renamed when
    complete, so an interrupted save leaves no half preset; an existing
    non-empty `path` is refused.

    Args:
        model: a classifier of this package (`Sequencer2D...`, a `.keras` file
            of one) or a `keras_sequencer.hub.Sequencer2DImageClassifier`.
        path: the preset directory to create.
        variant: "s", "m" or "l" when the model is that variant.
        source: where the weights came from (a checkpoint file name, a
            training run), for the card.
        published: the weights are the variant's published ImageNet
            checkpoint, verified (the card then cites its top-1 and licence).
        eval_config: the eval transform of the preprocessor, and the
            normalisation the model's own preprocessing layer must have.
            A keras-hub classifier keeps its own preprocessor.
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise ValueError(f"{path} already exists and is not an empty folder; remove it or choose another path.")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise ValueError(f"The folder {parent} (where the preset goes) does not exist; create it first.")
    classifier = _hub_classifier(model, eval_config)
    architecture = architecture_of(classifier.backbone)
    if published and variant is None:
        raise ValueError("`published=True` needs the `variant` whose checkpoint the weights are.")
    if variant is not None:
        variant = str(variant).lower().removeprefix("sequencer2d_")
        if variant not in VARIANTS:
            raise ValueError(f"`variant` must be one of {sorted(VARIANTS)} or None. Received: variant={variant!r}")
        expected = {key: tuple(value) for key, value in VARIANTS[variant].items()}
        actual = {key: tuple(architecture[key]) for key in expected}
        if actual != expected:
            raise ValueError(
                f"Model {model.name!r} is not Sequencer2D-{variant.upper()} (layers={actual['layers']}, "
                f"embed_dims={actual['embed_dims']}); pass the variant it is, or variant=None."
            )
    scratch = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.partial-", dir=parent)
    try:
        classifier.save_to_preset(scratch)
        metadata_file = os.path.join(scratch, preset_io.METADATA_FILE)
        with open(metadata_file, encoding="utf-8") as f:
            metadata = json.load(f)
        metadata[preset_io.METADATA_KEY] = {
            "format_version": preset_io.FORMAT_VERSION,
            "version": _package_version(),
            "variant": variant,
            "source": source,
            "published_weights": published,
        }
        with open(metadata_file, "w", encoding="utf-8") as f:
            f.write(json.dumps(metadata, indent=4))
        with open(os.path.join(scratch, preset_io.CARD_FILE), "w", encoding="utf-8") as f:
            f.write(model_card(classifier, architecture, variant=variant, source=source, published=published,
                               name=os.path.basename(path)))  # fmt: skip
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(scratch, 0o777 & ~umask)  # mkdtemp's folder is private; a preset is for sharing
        if os.path.isdir(path):
            os.rmdir(path)  # empty, checked above
        os.replace(scratch, path)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return path


def convert_to_preset(source: str, variant: str, path) -> str:
    """A preset from a timm or authors' checkpoint of a variant (`.safetensors`, or `.pth`/`.bin` with torch).

    The checkpoint is converted strictly (every tensor used once, shapes
    checked) into this package's classifier, which is then written by
    `save_preset` with its model card. Returns the preset's path.
    """
    variant = str(variant).lower().removeprefix("sequencer2d_")
    model = create_model(f"sequencer2d_{variant}", weights=source, classifier_activation=None)
    checkpoint = CHECKPOINTS[variant]
    # The card cites the published accuracy only for the published file: the one download verifies, or a local
    # copy with its sha256 (M's hash was never published, so a local M file is described by name only).
    published = source == "imagenet" or (
        checkpoint.sha256 is not None and pretrained.sha256_of(os.fspath(source)) == checkpoint.sha256
    )
    name = checkpoint.filename if source == "imagenet" else os.path.basename(os.fspath(source))
    return save_preset(model, path, variant=variant, source=name, published=published)


# === Model card ===


def _table(rows) -> str:
    return "\n".join(["| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows)])


def _eval_of(classifier) -> EvalConfig | None:
    """The eval transform a keras-hub classifier's preprocessor applies, or None without one."""
    converter = getattr(classifier.preprocessor, "image_converter", None)
    if converter is None or converter.image_size is None:
        return None
    std = [1.0 / (255.0 * s) for s in converter.scale]
    mean = [-o * d for o, d in zip(converter.offset, std, strict=True)]
    return EvalConfig(converter.image_size[0], converter.crop_pct, converter.interpolation, tuple(mean), tuple(std))


def model_card(classifier, architecture: dict, *, variant=None, source=None, published=False, name="preset") -> str:
    """The preset's README.md: what the model is, its size and cost, its accuracy where published, and usage."""
    checkpoint = CHECKPOINTS.get(variant) if variant and published else None
    title = f"Sequencer2D-{variant.upper()}" if variant else "Sequencer2D"
    eval_config = _eval_of(classifier)
    size = eval_config.input_size if eval_config else IMAGENET_EVAL.input_size
    params = classifier.count_params()
    paper_options = all(architecture[k] == v for k, v in PAPER_MIXER.items())
    rows = [
        ("Architecture", f"{title}: layers={tuple(architecture['layers'])}, embed_dims="
                         f"{tuple(architecture['embed_dims'])}, hidden_sizes={tuple(architecture['hidden_sizes'])}"),
        ("Parameters", f"{params:,}"),
    ]  # fmt: skip
    if paper_options:
        classes = classifier.num_classes
        with_lstm = count_macs(architecture, image_size=size, num_classes=classes) / 1e9
        without = count_macs(architecture, image_size=size, include_lstm=False, num_classes=classes) / 1e9
        rows.append((f"MACs at {size}x{size}", f"{with_lstm:.2f} G with the LSTMs ({without:.2f} G without them, "
                                              "what timm's profiler counts)"))  # fmt: skip
    if checkpoint is not None:
        rows.append(("ImageNet-1k top-1", f"{checkpoint.top1:.3f} % at {size}x{size} (as published by timm for "
                                          f"`{checkpoint.tag}`)"))  # fmt: skip
        rows.append(("Weights", f"timm `{checkpoint.tag}` ({checkpoint.hub_repo}), converted exactly; licence "
                                f"{checkpoint.license}"))  # fmt: skip
    elif source:
        rows.append(("Weights", f"from `{source}`"))
    side = int(np.prod(architecture["patch_sizes"]))
    if eval_config is None:
        rows += [
            ("Classes", f"{classifier.num_classes} (logits out)"),
            ("Input", f"normalised RGB of any size of at least {side}x{side}; no preprocessor is saved"),
        ]
    else:
        mean = tuple(round(m, 4) for m in eval_config.mean)
        std = tuple(round(s, 4) for s in eval_config.std)
        rows += [
            ("Classes", f"{classifier.num_classes} (logits out)"),
            (
                "Input",
                f"RGB images of any size; the preprocessor makes them {size}x{size}. The network itself "
                f"takes any size of at least {side}x{side}",
            ),
            (
                "Eval transform",
                f"resize the short side to {int(size / eval_config.crop_pct)} "
                f"({eval_config.interpolation}, antialiased), centre crop {size}x{size}, scale to "
                f"[0, 1], normalise with mean {mean} and std {std} (timm's eval transform)",
            ),
        ]
    rows.append(("Backends", "TensorFlow, JAX and PyTorch (Keras 3)"))  # fmt: skip
    licence = checkpoint.license if checkpoint else "apache-2.0"
    return f"""---
library_name: keras-hub
license: {licence}
pipeline_tag: image-classification
tags:
- image-classification
- keras
- keras-hub
- sequencer
- lstm
---

# {name}

{title}, the LSTM-based image classifier of "Sequencer: Deep LSTM for Image Classification" (Tatsunami & Taki,
NeurIPS 2022, {_PAPER}), as a keras-hub preset written by keras-sequencer {_package_version()}. Token mixing runs
bidirectional LSTMs along the height and the width of the token map.

{_table(rows)}

## Classification

```python
import keras_sequencer  # registers the Sequencer classes with Keras
import keras_hub

classifier = keras_hub.models.ImageClassifier.from_preset("{name}")
logits = classifier.predict(images)  # uint8 RGB, (batch, height, width, 3); resized and cropped for you
```

Without keras-hub, the same network as a Keras model that takes {size}x{size} RGB in [0, 255]:

```python
model = keras_sequencer.load_preset("{name}")  # softmax out; classifier_activation=None for logits
image = keras_sequencer.imagenet.load_image("photo.jpg")  # the eval transform above
probabilities = model.predict(image[None])
```

## Features

```python
backbone = keras_hub.models.Backbone.from_preset("{name}")  # the normalised token map, (batch, H/14, W/14, C)
stages = keras_sequencer.feature_extractor(backbone)  # every stage's output, strides {_strides(architecture)}
```

## Fine-tuning

```python
classifier = keras_hub.models.ImageClassifier.from_preset("{name}", num_classes=10)  # a new head
classifier.fit(images, labels, epochs=3)  # raw images: the preprocessor resizes, crops and normalises
```

`{name}` is a local folder here; after `keras_hub.upload_preset("hf://USER/{name}", "{name}")` (or
`"kaggle://USER/MODEL/keras/{name}"`) the same calls take that handle.
"""


def _strides(architecture: dict) -> str:
    strides, stride = [], 1
    for patch in architecture["patch_sizes"]:
        stride *= patch
        strides.append(str(stride))
    return ", ".join(strides)
