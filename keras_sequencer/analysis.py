"""Research tools: accuracy against test resolution, and effective receptive fields.

- `evaluate_resolutions` / `python -m keras_sequencer eval-resolution`: one
  model (weights trained at one size) evaluated at several test resolutions
  with the evaluation crop (bicubic resize to `size / crop_pct`, centre crop),
  as in the paper's resolution-adaptability study; JSON + PNG.
- `effective_receptive_field` / `python -m keras_sequencer erf`: how much each
  input pixel moves the centre token of a stage's output, as the authors'
  `generate_erf.py` does it (after RepLKNet): for every image, the gradient of
  `sum_c relu(F[centre, c])` with respect to the input, rectified and summed
  over input channels, averaged over images; plotted as `log10(erf + 1)`
  scaled to [0, 1]. Gradients use each backend's own autodiff.
- `count_macs`: multiply-accumulates of one forward pass, with or without the
  LSTMs (the paper's "FLOPs" count them, timm's GMACs do not); the benchmark
  turns it into an fp32 ceiling for the machine it runs on.
"""

import json
import operator
import os

import keras
import numpy as np

from keras_sequencer.data import eval_transform
from keras_sequencer.models.features import stage_info
from keras_sequencer.presets import IMAGENET_EVAL, PAPER_MIXER, variant_config

# ---------------------------------------------------------------------------- cost


def count_macs(variant="s", image_size: int = 224, include_lstm: bool = True, num_classes: int = 1000) -> int:
    """Multiply-accumulates of one forward pass of a Sequencer2D (one image).

    Counts the matmuls and convolutions: patch embeddings, the input and
    recurrent matmuls of the four directional LSTMs of every block, the
    BiLSTM2D output projection, the MLP and the classifier. Elementwise work
    (gates, LayerNorm, GELU) is left out. With `include_lstm=True` this is the
    paper's "FLOPs" (8.4G / 11.1G / 16.6G for S / M / L at 224); with `False`
    it is what timm's profiler reports (4.96 / 6.55 / 9.74 GMACs), which does
    not see `aten::lstm` — about 40 % of the real cost.

    Args:
        variant: `"s"`, `"m"`, `"l"` (or `"sequencer2d_s"` etc.), or a config
            dict with `layers`, `patch_sizes`, `embed_dims`, `hidden_sizes`
            and `mlp_ratios` (the paper's bidirectional LSTM mixer).
        image_size: int, side of the square input.
        include_lstm: bool, count the LSTMs' matmuls.
        num_classes: int, classifier width (0: headless).

    Returns:
        int, multiply-accumulates (one MAC = two floating-point operations).
    """
    config = variant_config(variant) if isinstance(variant, str) else dict(variant)
    changed = {k: config[k] for k, default in PAPER_MIXER.items() if config.get(k, default) != default}
    if changed:
        raise ValueError(f"count_macs covers the paper's BiLSTM2D mixer only. Received options: {changed}")
    side, channels, macs = int(image_size), 3, 0
    for depth, patch, dim, hidden, ratio in zip(config["layers"], config["patch_sizes"], config["embed_dims"],
                                                config["hidden_sizes"], config["mlp_ratios"], strict=True):  # fmt: skip
        if side % patch:
            raise ValueError(f"image_size={image_size} does not divide into the patch sizes {config['patch_sizes']}.")
        side //= patch
        tokens = side * side
        macs += tokens * patch * patch * channels * dim  # patch embedding
        lstm = 4 * (dim + hidden) * 4 * hidden  # 4 directions x 4 gates: input and recurrent matmuls
        per_token = (lstm if include_lstm else 0) + 4 * hidden * dim + 2 * dim * int(dim * ratio)
        macs += depth * tokens * per_token
        channels = dim
    return macs + channels * num_classes


# ---------------------------------------------------------------------------- resolution


def evaluate_resolutions(
    model, dataset, resolutions, crop_pct: float = IMAGENET_EVAL.crop_pct, batch_size: int = 64
) -> dict:
    """Top-1 accuracy of `model` on `dataset` at each square test resolution.

    Args:
        model: a classifier taking any image size (`input_shape=(None, None, C)`),
            on the same pixel scale as the dataset's images.
        dataset: a `tf.data.Dataset` of `(image, label)` (any image size), e.g.
            from `keras_sequencer.data.load_split`.
        resolutions: test sizes, e.g. `(160, 192, 224, 256, 288, 320, 384, 448)`.

    Returns:
        `{"resolutions": [...], "accuracy": [...], "images": n}`.
    """
    import tensorflow as tf

    _, height, width, _ = model.input_shape
    if height is not None or width is not None:
        raise ValueError(
            f"The model takes only {height}x{width} images; evaluating other resolutions needs one built with "
            "input_shape=(None, None, channels) (Sequencer weights are size independent: load them into it)."
        )
    minimum = getattr(model, "min_image_size", 1)
    if min(resolutions) < minimum:
        raise ValueError(f"Resolution {min(resolutions)} is below the model's minimum {minimum}.")
    accuracies = []
    for size in resolutions:
        batches = (
            dataset.map(
                lambda image, label, s=size: (eval_transform(image, s, crop_pct), label),
                num_parallel_calls=tf.data.AUTOTUNE,
            )  # fmt: skip
            .batch(batch_size)
            .prefetch(tf.data.AUTOTUNE)
        )
        correct = count = 0
        for images, labels in batches.as_numpy_iterator():
            predictions = keras.ops.convert_to_numpy(model.predict_on_batch(images)).argmax(-1)
            correct += int((predictions == labels).sum())
            count += len(labels)
        accuracies.append(correct / max(count, 1))
    return {"resolutions": [int(r) for r in resolutions], "accuracy": accuracies, "images": count}


def plot_resolution_curve(result: dict, path: str, title: str = "Accuracy against test resolution", trained_at=None):
    """Writes the accuracy-resolution curve as a PNG (and the numbers beside it as JSON)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(result["resolutions"], [100 * a for a in result["accuracy"]], marker="o")
    if trained_at:
        ax.axvline(trained_at, color="gray", linestyle=":", label=f"trained at {trained_at}")
        ax.legend()
    ax.set(xlabel="test resolution (pixels)", ylabel="top-1 accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(result, f, indent=1)


# ---------------------------------------------------------------------------- ERF


def _stage_model(model, stage):
    info = stage_info(model)
    try:
        chosen = info[stage]
    except IndexError:
        raise ValueError(f"`stage` must index one of {[i['name'] for i in info]}. Received: stage={stage}") from None
    return keras.Model(model.inputs, model.get_layer(chosen["layer"]).output)


def _centre_objective(features):
    """sum_c relu(F[:, H//2, W//2, c]): the centre token's response."""
    ops = keras.ops
    height, width = features.shape[1], features.shape[2]
    return ops.sum(ops.relu(features[:, height // 2, width // 2, :]))


def input_gradient(model, images) -> np.ndarray:
    """d objective / d images for `objective = _centre_objective(model(images))`, on any backend."""
    backend = keras.backend.backend()
    images = np.asarray(images, dtype="float32")
    if backend == "tensorflow":
        import tensorflow as tf

        x = tf.constant(images)
        with tf.GradientTape() as tape:
            tape.watch(x)
            objective = _centre_objective(model(x, training=False))
        return tape.gradient(objective, x).numpy()
    if backend == "torch":
        x = keras.ops.convert_to_tensor(images).detach().requires_grad_(True)  # on Keras' device
        _centre_objective(model(x, training=False)).backward()
        return x.grad.detach().cpu().numpy()
    if backend == "jax":
        import jax

        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]

        def objective(x):
            features, _ = model.stateless_call(trainable, non_trainable, x, training=False)
            return _centre_objective(features)

        return np.asarray(jax.grad(objective)(images))
    raise ValueError(f"input_gradient supports the tensorflow, jax and torch backends. Received: {backend}")


def effective_receptive_field(model, images, stage: int = -1) -> np.ndarray:
    """The ERF map `(height, width)` of a stage's centre token, averaged over `images`.

    Args:
        model: a Sequencer model (any of this package's builders or a `.keras` file of one).
        images: `(n, height, width, channels)` as the model takes them.
        stage: which stage's output (`stage_info(model)` order; -1 = last).
    """
    stage_model = _stage_model(model, stage)
    total = None
    for image in np.asarray(images, dtype="float32"):
        contribution = np.maximum(input_gradient(stage_model, image[None]), 0.0).sum(axis=(0, -1))
        total = contribution if total is None else total + contribution
    return total / len(images)


def erf_for_display(erf: np.ndarray) -> np.ndarray:
    """`log10(erf + 1)` scaled to [0, 1], the authors' display transform."""
    shown = np.log10(erf + 1.0)
    return shown / shown.max() if shown.max() > 0 else shown


def erf_area_ratios(erf: np.ndarray, thresholds=(0.2, 0.3, 0.5, 0.99)) -> dict:
    """Smallest centred square holding each fraction of the (display-scaled) ERF mass, as a share of the image."""
    shown = erf_for_display(erf)
    total = shown.sum()
    height, width = shown.shape
    ratios = {}
    for t in thresholds:
        for half in range(0, max(height, width)):
            top, left = max(height // 2 - half, 0), max(width // 2 - half, 0)
            window = shown[top : height // 2 + half + 1, left : width // 2 + half + 1]
            if window.sum() >= t * total:
                ratios[str(t)] = window.size / shown.size
                break
    return ratios


def plot_erf(erf: np.ndarray, path: str, title: str = "Effective receptive field"):
    """Writes the ERF heatmap as a PNG and its raw numbers as `.npy` beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4))
    shown = ax.imshow(erf_for_display(erf), cmap="RdYlGn", vmin=0, vmax=1)
    fig.colorbar(shown, ax=ax)
    ax.set(title=title, xticks=[], yticks=[])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    np.save(os.path.splitext(path)[0] + ".npy", erf)


# ---------------------------------------------------------------------------- Grad-CAM on token maps


def _layers_after(model, layer_name: str) -> list:
    """The layers that follow `layer_name` on the model's single path to its output (a Sequencer is a chain)."""
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    names = [layer.name for layer in layers]
    if layer_name not in names:
        raise ValueError(
            f"Model {model.name!r} holds its blocks inside a nested model (a keras-hub task?): pass a classifier of "
            "this package (keras_sequencer.load_preset gives one for a preset)."
        )
    if len(model.outputs) != 1 or len(model.outputs[0].shape) != 2:
        raise ValueError(
            f"Model {model.name!r} must end in one classifier output (batch, classes) for Grad-CAM; "
            "a headless model has no class score."
        )
    following = layers[names.index(layer_name) + 1 :]
    previous = model.get_layer(layer_name).output
    for layer in following:
        if layer.input is not previous:
            raise ValueError(
                f"Model {model.name!r} branches after {layer_name!r} (layer {layer.name!r}); Grad-CAM here follows "
                "Sequencer models, whose layers form one chain."
            )
        previous = layer.output
    if previous is not model.outputs[0]:
        raise ValueError(f"Model {model.name!r} must end in one classifier output for Grad-CAM.")
    return following


def token_gradient(model, image, class_index: int | None = None, stage: int = -1):
    """A stage's token map and the gradient of one class score with respect to it, on any backend.

    Args:
        model: a Sequencer classifier of this package (a `.keras` file of one too).
        image: one image `(height, width, channels)` as the model takes it.
        class_index: the class whose score (the head's logit: a softmax or
            other activation of the last Dense is left out, so saturated
            probabilities do not flatten the gradient) is differentiated; None
            for the model's top class.
        stage: which stage's output (`stage_info(model)` order; -1 = last).

    Returns:
        `(tokens, gradient, class_index)`: two `(h, w, channels)` arrays and the class.
    """
    info = stage_info(model)
    try:
        chosen = info[stage]
    except IndexError:
        raise ValueError(f"`stage` must index one of {[i['name'] for i in info]}. Received: stage={stage}") from None
    head_layers = _layers_after(model, chosen["layer"])
    tokens = keras.Model(model.input, model.get_layer(chosen["layer"]).output)(np.asarray(image, "float32")[None])
    tokens = keras.ops.convert_to_numpy(tokens)

    last = head_layers[-1]
    logits_of_dense = isinstance(last, keras.layers.Dense) and last.activation is not keras.activations.linear

    def head(x):
        for layer in head_layers[:-1] if logits_of_dense else head_layers:
            x = layer(x, training=False) if "training" in layer.call.__code__.co_varnames else layer(x)
        if logits_of_dense:  # the Dense without its activation: the logit
            x = keras.ops.matmul(x, last.kernel) + last.bias if last.use_bias else keras.ops.matmul(x, last.kernel)
        return x

    if class_index is None:
        class_index = int(np.argmax(keras.ops.convert_to_numpy(head(keras.ops.convert_to_tensor(tokens)))[0]))
    classes = last.output.shape[-1]
    given = class_index
    try:
        class_index = operator.index(class_index)  # ints, NumPy ints
    except TypeError:
        class_index = -1
    if not 0 <= class_index < classes:
        raise ValueError(f"`class_index` must be an int in [0, {classes}). Received: class_index={given!r}")

    def score(x):
        return keras.ops.sum(head(x)[:, class_index])

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        x = tf.constant(tokens)
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = score(x)
        gradient = tape.gradient(value, x).numpy()
    elif backend == "torch":
        import torch

        with torch.enable_grad():
            x = keras.ops.convert_to_tensor(tokens).detach().requires_grad_(True)
            (gradient,) = torch.autograd.grad(score(x), x)  # the token map's only: the parameters' stay untouched
        gradient = gradient.detach().cpu().numpy()
    elif backend == "jax":
        import jax

        gradient = np.asarray(jax.grad(score)(tokens))
    else:
        raise ValueError(f"token_gradient supports the tensorflow, jax and torch backends. Received: {backend}")
    return tokens[0], gradient[0], class_index


def grad_cam(model, image, class_index: int | None = None, stage: int = -1):
    """Grad-CAM of a Sequencer's token map: where in the image a class's evidence sits, at the stage's resolution.

    Each channel of the stage's token map is weighted by the mean gradient of
    the class score over the tokens; the weighted sum, through a ReLU and
    scaled to [0, 1], is the map (Selvaraju et al., 2017, on the token map in
    place of a CNN's last convolution). Works on every backend.

    Returns:
        `(cam, class_index)`: a `(h, w)` array in [0, 1] (h, w: the stage's
        token grid) and the class it explains.
    """
    tokens, gradient, class_index = token_gradient(model, image, class_index, stage)
    weights = gradient.mean(axis=(0, 1))
    cam = np.maximum((tokens * weights).sum(axis=-1), 0.0)
    peak = cam.max()
    return (cam / peak if peak > 0 else cam), class_index


def plot_grad_cam(image_uint8: np.ndarray, cam: np.ndarray, path: str, title: str = "Grad-CAM"):
    """Writes the image with the map over it (bilinear upsampling, 'jet', half transparent) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height, width = image_uint8.shape[:2]
    fig, ax = plt.subplots(figsize=(4.5, 4.5 * height / width))
    ax.imshow(image_uint8)
    ax.imshow(cam, cmap="jet", alpha=0.5, extent=(0, width, height, 0), interpolation="bilinear", vmin=0, vmax=1)
    ax.set(title=title, xticks=[], yticks=[])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
