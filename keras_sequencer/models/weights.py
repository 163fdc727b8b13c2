"""Loading weights into a built Sequencer2D: Keras `.weights.h5` files, timm / authors' checkpoints, "imagenet"."""

import os
import tempfile
import warnings

import h5py
import keras
import numpy as np

from keras_sequencer import pretrained
from keras_sequencer.convert import convert_state_dict


def assign(model: keras.Model, variables: dict[str, np.ndarray]) -> None:
    """Assigns converted arrays to `model`, strictly: every variable exactly once, shapes checked."""
    by_path = {v.path: v for v in model.weights}
    missing = sorted(set(by_path) - set(variables))
    extra = sorted(set(variables) - set(by_path))
    if missing or extra:
        raise ValueError(
            f"Converted weights do not fit model '{model.name}': missing {missing[:3]}, unexpected {extra[:3]}."
        )
    for path, value in variables.items():
        var = by_path[path]
        if tuple(var.shape) != value.shape:
            raise ValueError(
                f"Weight '{path}' of model '{model.name}' has shape {tuple(var.shape)}, "
                f"but the checkpoint gives {value.shape}."
            )
        var.assign(value)


def save_weights(model: keras.Model, target: str) -> None:
    """`model.save_weights(target)` through a temporary file and a rename: `target` is never half-written."""
    fd, tmp = tempfile.mkstemp(suffix=".weights.h5", dir=os.path.dirname(os.path.abspath(target)))
    os.close(fd)
    try:
        model.save_weights(tmp)
        os.replace(tmp, target)
    finally:
        pretrained.remove(tmp)


def _h5_shapes(path: str) -> list[tuple]:
    shapes = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda _, obj: shapes.append(tuple(obj.shape)) if isinstance(obj, h5py.Dataset) else None)
    return shapes


def _load_keras_weights(model: keras.Model, path: str, include_top: bool) -> None:
    """`model.load_weights`, after checking the file holds exactly this architecture.

    Keras matches layers by position and silently ignores extra layers in the
    file, so a file from a deeper variant would half-load. The multiset of
    array shapes is compared first; a headless model may skip the file's head.
    """
    have = sorted(_h5_shapes(path))
    want = sorted(tuple(v.shape) for v in model.weights)
    if have != want and not include_top:
        extra = list(have)
        for shape in want:
            if shape in extra:
                extra.remove(shape)
        is_head = len(extra) == 2 and sorted(len(s) for s in extra) == [1, 2] and len(have) == len(want) + 2
        if is_head:
            have = want
    if have != want:
        raise ValueError(
            f"The weights file '{path}' holds {len(have)} arrays that do not match the "
            f"{len(want)} weights of model '{model.name}': it was saved from another "
            "architecture (variant, classes or include_top). Received: weights=" + repr(path)
        )
    with warnings.catch_warnings():
        # A headless model skips the head's group; Keras warns about it.
        warnings.filterwarnings("ignore", message="Skipping nested container")
        model.load_weights(path)


def _load_imagenet(model: keras.Model, variant: str, config: dict, include_top: bool) -> None:
    """The variant's published checkpoint: fetched once, converted once, the conversion cached.

    The conversion is cached as a `.weights.h5` beside the download (named
    after the download's hash) when this model holds the whole network in
    float32, the form the cache needs; otherwise it is converted again from
    the cached download, which takes no network.
    """
    source = pretrained.fetch_checkpoint(variant)
    cached = pretrained.converted_path(source, variant)
    if os.path.exists(cached):
        _load_keras_weights(model, cached, include_top)
        return
    try:
        assign(model, convert_state_dict(pretrained.read_checkpoint(source), config, include_top=include_top))
    except ValueError as e:
        pretrained.remove(source)  # a corrupt or foreign file must not stay in the cache
        raise ValueError(
            f"The checkpoint downloaded for Sequencer2D-{variant.upper()} cannot be used and was "
            f"removed from the cache: {e}"
        ) from e
    if include_top and all(v.dtype == "float32" for v in model.weights):
        save_weights(model, cached)


def load_weights(model: keras.Model, weights, config: dict, variant: str | None, include_top: bool) -> None:
    """Loads `weights` ("imagenet" or a path) into a freshly built Sequencer2D of architecture `config`."""
    if weights == "imagenet":
        _load_imagenet(model, variant, config, include_top)
        return
    path = os.fspath(weights)
    if path.endswith(".weights.h5"):
        _load_keras_weights(model, path, include_top)
        return
    assign(model, convert_state_dict(pretrained.read_checkpoint(path), config, include_top=include_top))
