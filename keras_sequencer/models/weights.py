"""Loading weights into a built Sequencer2D: Keras `.weights.h5` files, timm / authors' checkpoints, "imagenet"."""

import json
import os
import tempfile
import warnings

import h5py
import keras
import numpy as np

from keras_sequencer import pretrained
from keras_sequencer.convert import convert_state_dict
from keras_sequencer.models import preset_io


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


# A root attribute of the `.weights.h5` files this package writes: the builder's architecture, as JSON.
# Keras' files record layer order and shapes only, and depths such as (4, 3, 8, 3) and (4, 3, 9, 2) with
# equal stage widths give identical files.
ARCHITECTURE_ATTR = "keras_sequencer_architecture"
ARCHITECTURE_KEYS = ("layers", "patch_sizes", "embed_dims", "hidden_sizes")


def _architecture(config: dict) -> dict:
    return {key: [int(v) for v in config[key]] for key in ARCHITECTURE_KEYS if key in config}


def save_weights(model: keras.Model, target: str, config: dict | None = None) -> None:
    """`model.save_weights(target)` through a temporary file and a rename: `target` is never half-written.

    With `config` (the builder's `layers`, `patch_sizes`, `embed_dims`,
    `hidden_sizes`) the file records the architecture, which loading checks.
    """

    def write(temporary):
        model.save_weights(temporary)
        if config is not None:
            with h5py.File(temporary, "a") as f:
                f.attrs[ARCHITECTURE_ATTR] = json.dumps(_architecture(config))

    pretrained.replace_atomically(target, write)


def _h5_arrays(path: str) -> dict[str, tuple]:
    """Every array of a `.weights.h5` file: its path in the file -> its shape."""
    arrays = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            arrays[name] = tuple(obj.shape)

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return arrays


def _h5_architecture(path: str) -> dict | None:
    with h5py.File(path, "r") as f:
        text = f.attrs.get(ARCHITECTURE_ATTR)
    return json.loads(text) if text is not None else None


def _check_structure(model: keras.Model, path: str, include_top: bool) -> None:
    """Compares the file's arrays with the model's, path by path (Keras' layer order), naming the first mismatch."""
    have = _h5_arrays(path)
    with tempfile.TemporaryDirectory() as scratch:
        mine = os.path.join(scratch, "model.weights.h5")
        model.save_weights(mine)
        want = _h5_arrays(mine)
    extra = set(have) - set(want)
    head = len(extra) == 2 and len({name.split("/")[:2][-1] for name in extra}) == 1
    if not include_top and head and sorted(len(have[name]) for name in extra) == [1, 2]:
        have = {name: shape for name, shape in have.items() if name not in extra}  # the head a headless model skips
    for name in sorted(set(want) | set(have)):
        if have.get(name) != want.get(name):
            if name not in have:
                detail = "is missing from the file"
            elif name not in want:
                detail = f"{have[name]} is in the file but not in the model"
            else:
                detail = f"is {have[name]} in the file but {want[name]} in the model"
            raise ValueError(
                f"The weights file '{path}' was saved from another architecture than model '{model.name}' "
                f"(variant, depths, classes or include_top): '{name}' {detail}. Received: weights={path!r}"
            )


def _load_keras_weights(model: keras.Model, path: str, include_top: bool, config: dict | None = None) -> None:
    """`model.load_weights`, after checking the file holds exactly this architecture.

    Keras matches layers by position and silently ignores extra layers in the
    file, so a file from a deeper variant would half-load. A file this package
    wrote records the builder's architecture, compared with `config`; every
    file's arrays are compared with the model's, path by path (a headless
    model may skip the file's head).
    """
    saved = _h5_architecture(path)
    if saved is not None and config is not None:
        expected = _architecture(config)
        differ = [key for key in ARCHITECTURE_KEYS if key in saved and key in expected and saved[key] != expected[key]]
        if differ:
            key = differ[0]
            raise ValueError(
                f"The weights file '{path}' was saved from a Sequencer2D with {key}={tuple(saved[key])}; model "
                f"'{model.name}' has {key}={tuple(expected[key])}. Build the model the file was saved from. "
                f"Received: weights={path!r}"
            )
    _check_structure(model, path, include_top)
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
        _load_keras_weights(model, cached, include_top, config)
        return
    try:
        assign(model, convert_state_dict(pretrained.read_checkpoint(source), config, include_top=include_top))
    except ValueError as e:
        try:
            pretrained.remove(source)  # a corrupt or foreign file must not stay in the cache
            fate = "was removed from the cache"
        except OSError:
            fate = f"sits in a read-only cache: delete {source}"
        raise ValueError(
            f"The checkpoint downloaded for Sequencer2D-{variant.upper()} cannot be used and {fate}: {e}"
        ) from e
    if include_top and all(v.dtype == "float32" for v in model.weights):
        if pretrained.cache_is_writable(os.path.dirname(cached)):
            save_weights(model, cached, config)
        else:
            warnings.warn(
                f"The weights cache {os.path.dirname(cached)} is read-only, so the conversion of the checkpoint "
                "is not kept and is repeated at every load (a few seconds). Point KERAS_HOME at a writable "
                "folder to keep it.",
                stacklevel=4,
            )


def load_weights(model: keras.Model, weights, config: dict, variant: str | None, include_top: bool) -> None:
    """Loads `weights` ("imagenet" or a path) into a freshly built Sequencer2D of architecture `config`."""
    if weights == "imagenet":
        _load_imagenet(model, variant, config, include_top)
        return
    path = os.fspath(weights)
    if preset_io.is_preset(path):
        preset_io.load_into(model, preset_io.read_preset(path), include_top)
        return
    if path.endswith(".weights.h5"):
        _load_keras_weights(model, path, include_top, config)
        return
    assign(model, convert_state_dict(pretrained.read_checkpoint(path), config, include_top=include_top))
