"""The Sequencer2D builder, the S/M/L variants and every registered model by name."""

import os

import keras

from keras_sequencer.models import preset_io
from keras_sequencer.models.backbone import Sequencer2DBackbone, validate_architecture
from keras_sequencer.models.sequencer2d_model import Sequencer2DModel
from keras_sequencer.models.weights import load_weights
from keras_sequencer.presets import ABLATIONS, CHECKPOINTS, VARIANTS, variant_config
from keras_sequencer.pretrained import check_weights_path

_REFERENCE = (
    "Reference: Tatsunami & Taki, 'Sequencer: Deep LSTM for Image "
    "Classification', NeurIPS 2022 (https://arxiv.org/abs/2205.01972)."
)


def _validate(
    *,
    architecture,
    include_top,
    weights,
    input_shape,
    pooling,
    classes,
    classifier_activation,
    variant,
    implementation,
    layer_norm_epsilon,
    name,
):
    """Checks every argument before a weight is built or a file is fetched."""
    validate_architecture(
        **{key: architecture[key] for key in ("layers", "patch_sizes", "embed_dims", "hidden_sizes", "mlp_ratios")},
        layer_norm_epsilon=layer_norm_epsilon,
        implementation=implementation,
        image_shape=input_shape,
    )
    if pooling not in (None, "avg", "max"):
        raise ValueError(f"`pooling` must be one of None, 'avg' or 'max'. Received: pooling={pooling!r}")
    if not isinstance(classes, int) or isinstance(classes, bool) or classes <= 0:
        raise ValueError(f"`classes` must be a positive int. Received: classes={classes!r}")

    if weights == "imagenet":
        if variant is None:
            raise ValueError(
                "`weights='imagenet'` needs a named variant: use Sequencer2DS, Sequencer2DM "
                "or Sequencer2DL, or pass a checkpoint path. Received: weights='imagenet'"
            )
        if include_top and classes != 1000:
            raise ValueError(
                "With `weights='imagenet'` and `include_top=True`, `classes` must be 1000 "
                "(the ImageNet head). For another number of classes, pass include_top=False "
                f"and add your own head. Received: classes={classes}"
            )
        if include_top and classifier_activation not in (None, "softmax"):
            raise ValueError(
                "With `weights='imagenet'` and `include_top=True`, `classifier_activation` "
                f"must be None or 'softmax'. Received: classifier_activation={classifier_activation!r}"
            )
    elif preset_io.is_preset(weights):
        preset_io.check_architecture(preset_io.read_preset(weights), architecture, name)
    elif weights is not None:
        check_weights_path(weights)

    if weights == "imagenet" and input_shape is not None and tuple(input_shape)[-1] != 3:
        raise ValueError(
            f"With `weights='imagenet'` the input must have 3 (RGB) channels. Received: input_shape={input_shape}"
        )
    if classifier_activation is not None:
        keras.activations.get(classifier_activation)  # raises on an unknown name


def Sequencer2D(
    layers,
    patch_sizes,
    embed_dims,
    hidden_sizes,
    mlp_ratios=None,
    include_top: bool = True,
    weights: str | None = None,
    input_tensor=None,
    input_shape=None,
    pooling: str | None = None,
    classes: int = 1000,
    classifier_activation="softmax",
    include_preprocessing: bool = True,
    drop_path_rate: float = 0.0,
    layer_norm_epsilon: float = 1e-6,
    name: str = "sequencer2d",
    variant: str | None = None,
    implementation: str = "auto",
    rnn_type: str = "lstm",
    bidirectional: bool = True,
    union: str = "cat",
    with_fc: bool = True,
    mixer: str = "2d",
) -> keras.Model:
    """Builds a Sequencer2D image classifier (or feature extractor).

    The image goes through a patch-embedding stem, then stages of
    `Sequencer2DBlock`s (BiLSTM2D token mixing + MLP), each stage after the
    first opening with a patch-merging projection; a final LayerNorm, global
    pooling and a Dense head follow. Every weight is independent of the image
    size, so the model runs at any resolution, square or not.

    Args:
        layers: blocks per stage, e.g. `(4, 3, 8, 3)`.
        patch_sizes: patch side of the stem and of each stage's downsampling.
        embed_dims: channels of each stage.
        hidden_sizes: LSTM units (per direction) of each stage.
        mlp_ratios: MLP width multiple of each stage; default 3 everywhere.
        include_top: whether to add the pooling and classification head.
        weights: None (random init), `"imagenet"` (variants only), or a path
            to a Keras `.weights.h5` file, a timm / authors' checkpoint
            (`.safetensors`; `.pth`/`.bin` when torch is installed) or a
            preset directory of the same architecture (`load_preset` builds
            whatever a preset holds).
        input_tensor: optional Keras tensor to use as the model input.
        input_shape: `(height, width, 3)`; the default `(None, None, 3)`
            accepts any size of at least the product of `patch_sizes` (14).
        pooling: with `include_top=False`, None returns the normalised feature
            map `(batch, H/14, W/14, channels)`; "avg" or "max" pool it.
        classes: number of classes of the head.
        classifier_activation: activation of the head; None for logits.
        include_preprocessing: if True the model takes RGB in [0, 255] and
            normalises with the ImageNet mean and std itself; if False it
            expects already normalised input.
        drop_path_rate: stochastic-depth rate of the last block, ramped
            linearly from 0 at the first block (the authors' schedule).
        layer_norm_epsilon: epsilon of every LayerNorm.
        name: model name.
        variant: name of the preset this config is ("s", "m", "l"), used to
            find its pretrained weights.
        implementation: forward path of every `BiLSTM2D`: `"auto"`,
            `"keras"` (Bidirectional LSTM layers, cuDNN on GPU), `"fused"`
            (all four directions batched; `"unrolled"` / `"scan"` name its
            step loops), `"torch"` (PyTorch backend only) or `"tensorflow"`
            (TensorFlow backend only); same weights, same results. See
            `BiLSTM2D`.
        rnn_type, bidirectional, union, with_fc: the paper's ablations of the
            token mixer (`"lstm"`/`"gru"`/`"rnn"`; forward-only; `"cat"`/
            `"add"`/`"vertical"`/`"horizontal"`; without the output Dense);
            see `BiLSTM2D`. The defaults are the paper's model.
        mixer: `"2d"` (Sequencer2D) or `"1d"`: one bidirectional RNN over the
            flattened tokens, the paper's Vanilla Sequencer (`BiLSTM1D`).
        Named ablation configs: `keras_sequencer.create_model(name)`.

    Returns:
        A `Sequencer2DModel` (a functional `keras.Model`).

    Example:
    >>> model = Sequencer2D(
    ...     layers=(2, 2), patch_sizes=(4, 2), embed_dims=(32, 64),
    ...     hidden_sizes=(8, 16), input_shape=(28, 28, 1), classes=10,
    ...     include_preprocessing=False)
    >>> model.predict(np.zeros((1, 28, 28, 1)), verbose=0).shape
    (1, 10)
    """
    num_stages = len(layers) if isinstance(layers, (list, tuple)) else 0
    if isinstance(weights, os.PathLike) or (isinstance(weights, str) and weights != "imagenet"):
        weights = os.path.expanduser(os.fspath(weights))  # "~/weights/s.weights.h5" as a shell would read it
    if mlp_ratios is None:
        mlp_ratios = (3.0,) * num_stages
    architecture = {
        "layers": layers,
        "patch_sizes": patch_sizes,
        "embed_dims": embed_dims,
        "hidden_sizes": hidden_sizes,
        "mlp_ratios": mlp_ratios,
        "rnn_type": rnn_type,
        "bidirectional": bidirectional,
        "union": union,
        "with_fc": with_fc,
        "mixer": mixer,
    }
    _validate(
        architecture=architecture,
        include_top=include_top,
        weights=weights,
        input_shape=input_shape,
        pooling=pooling,
        classes=classes,
        classifier_activation=classifier_activation,
        variant=variant,
        implementation=implementation,
        layer_norm_epsilon=layer_norm_epsilon,
        name=name,
    )

    # === Backbone === (its layers become this model's layers: the same names and weights layout)
    backbone = Sequencer2DBackbone(
        **architecture,
        image_shape=input_shape,
        include_preprocessing=include_preprocessing,
        drop_path_rate=drop_path_rate,
        layer_norm_epsilon=layer_norm_epsilon,
        implementation=implementation,
        input_tensor=input_tensor,
        name=f"{name}_backbone",
    )
    x = backbone.output

    # === Head ===
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(data_format="channels_last", name="avg_pool")(x)
        # Under a mixed policy (e.g. "mixed_bfloat16") the head computes in float32, as Keras' mixed-precision
        # guide advises for the last layer: logits and probabilities keep float32 resolution.
        policy = keras.config.dtype_policy()
        head_dtype = "float32" if policy.compute_dtype != policy.variable_dtype else None
        x = keras.layers.Dense(classes, activation=classifier_activation, name="predictions", dtype=head_dtype)(x)
    elif pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(data_format="channels_last", name="avg_pool")(x)
    elif pooling == "max":
        x = keras.layers.GlobalMaxPooling2D(data_format="channels_last", name="max_pool")(x)

    # === Functional Model ===
    model = Sequencer2DModel(backbone.input, x, name=name)

    # === Weights ===
    if weights is not None:
        load_weights(
            model,
            weights,
            config={
                "layers": tuple(layers),
                "patch_sizes": tuple(patch_sizes),
                "embed_dims": tuple(embed_dims),
                "hidden_sizes": tuple(hidden_sizes),
            },
            variant=variant,
            include_top=include_top,
        )
    return model


def _variant_builder(variant: str, display: str):
    config = variant_config(variant)

    def builder(
        include_top: bool = True,
        weights: str | None = "imagenet",
        input_tensor=None,
        input_shape=None,
        pooling: str | None = None,
        classes: int = 1000,
        classifier_activation="softmax",
        include_preprocessing: bool = True,
        drop_path_rate: float = 0.0,
        name: str = f"sequencer2d_{variant}",
        implementation: str = "auto",
    ) -> keras.Model:
        return Sequencer2D(
            **config,
            include_top=include_top,
            weights=weights,
            input_tensor=input_tensor,
            input_shape=input_shape,
            pooling=pooling,
            classes=classes,
            classifier_activation=classifier_activation,
            include_preprocessing=include_preprocessing,
            drop_path_rate=drop_path_rate,
            name=name,
            variant=variant,
            implementation=implementation,
        )

    builder.__name__ = builder.__qualname__ = display
    builder.__doc__ = f"""Instantiates {display} ({sum(config["layers"])} blocks, layers={config["layers"]}).

    The `keras.applications` signature; see `Sequencer2D` for the details.
    With `weights="imagenet"` the ImageNet-1k checkpoint published with the
    paper (timm `{CHECKPOINTS[variant].tag}`, top-1 {CHECKPOINTS[variant].top1:.2f} %) is downloaded once, verified,
    converted and cached. The model takes RGB images in [0, 255] at any size
    of at least 14x14 (trained at 224x224).

    {_REFERENCE}

    Args:
        include_top: whether to include the pooling and the 1000-class head.
        weights: "imagenet", None (random init), or a path to a `.weights.h5`
            file or a timm / authors' checkpoint.
        input_tensor: optional Keras tensor to use as the model input.
        input_shape: optional `(height, width, 3)`; default `(None, None, 3)`.
        pooling: None, "avg" or "max"; used when `include_top=False`.
        classes: number of classes; must be 1000 with ImageNet weights and
            a top.
        classifier_activation: "softmax" or None (logits) with ImageNet
            weights; any activation otherwise.
        include_preprocessing: normalise [0, 255] RGB inside the model.
        drop_path_rate: stochastic depth of the last block (for training).
        name: model name.
        implementation: BiLSTM2D forward path (see `BiLSTM2D`); "auto" by default.

    Returns:
        A `keras.Model`.

    Example:
    >>> model = keras_sequencer.{display}(weights="imagenet")
    >>> probs = model.predict(images)  # RGB uint8 or float in [0, 255]
    >>> keras_sequencer.decode_predictions(probs, top=3)
    """
    return builder


Sequencer2DS = _variant_builder("s", "Sequencer2DS")
Sequencer2DM = _variant_builder("m", "Sequencer2DM")
Sequencer2DL = _variant_builder("l", "Sequencer2DL")


def list_models() -> list[str]:
    """Registered names: `sequencer2d_{s,m,l}` and the authors' ablation / option models."""
    return [f"sequencer2d_{v}" for v in VARIANTS] + list(ABLATIONS)


def create_model(name: str, **kwargs) -> keras.Model:
    """Builds a registered model; keyword arguments go to `Sequencer2D`.

    `sequencer2d_s/m/l` take `weights="imagenet"`; the ablations
    (`sequencer2d_s_unidirectional`, `gru_sequencer2d_s`, `v_sequencer_s`, ...,
    see `list_models()`) have no published weights and start from random init.

    Example:
    >>> model = create_model("sequencer2d_s_add", input_shape=(224, 224, 3))
    """
    if name.startswith("sequencer2d_") and name.removeprefix("sequencer2d_") in VARIANTS:
        variant = name.removeprefix("sequencer2d_")
        return Sequencer2D(**VARIANTS[variant], variant=variant, **{"name": name, **kwargs})
    if name not in ABLATIONS:
        raise ValueError(f"Unknown model {name!r}. Registered: {', '.join(list_models())}")
    if kwargs.get("weights") == "imagenet":
        raise ValueError(f"{name} has no published ImageNet weights; pass weights=None or a file path.")
    return Sequencer2D(**ABLATIONS[name], **{"name": name, **kwargs})
