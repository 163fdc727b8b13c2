"""Reading presets: directories in keras-hub's layout, without keras-hub.

A preset holds `config.json` (the serialised `Sequencer2DBackbone`),
`model.weights.h5` (its weights), and for a classifier `task.json` and
`task.weights.h5` (the head), `preprocessor.json` / `image_converter.json`
(the eval transform) and `metadata.json`, to which this package adds a
`keras_sequencer` entry (format version, variant, source checkpoint).
`README.md` is the model card. keras-hub reads every file; this module reads
what a Keras model of this package needs, so presets load without keras-hub.
"""

import dataclasses
import json
import os

import h5py
import keras
import numpy as np

from keras_sequencer.models.backbone import Sequencer2DBackbone
from keras_sequencer.presets import PAPER_MIXER

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"
TASK_FILE = "task.json"
TASK_WEIGHTS_FILE = "task.weights.h5"
METADATA_FILE = "metadata.json"
PREPROCESSOR_FILE = "preprocessor.json"
CARD_FILE = "README.md"

# The layout this package writes; a preset written by a newer release with a higher number is refused.
FORMAT_VERSION = 1
METADATA_KEY = "keras_sequencer"

# What a backbone config holds beyond the architecture, and what must match for weights to mean the same.
ARCHITECTURE_FIELDS = ("layers", "patch_sizes", "embed_dims", "hidden_sizes", "mlp_ratios")
OPTION_FIELDS = tuple(PAPER_MIXER)


@dataclasses.dataclass(frozen=True)
class Preset:
    """What a preset directory holds, read and checked.

    Attributes:
        path: the directory.
        backbone_config: the backbone's config (`Sequencer2DBackbone.get_config()`).
        num_classes: classes of the head, or None for a backbone-only preset.
        head_activation: the head's activation (keras-hub's default: None, logits).
        variant: the registry's variant ("s", "m", "l") or None.
        metadata: the whole `metadata.json`.
        eval: the image converter's config (`image_size`, `crop_pct`, `scale`, `offset`, ...) or None.
    """

    path: str
    backbone_config: dict
    num_classes: int | None
    head_activation: str | None
    variant: str | None
    metadata: dict
    eval: dict | None

    @property
    def architecture(self) -> dict:
        """`layers`, `patch_sizes`, `embed_dims`, `hidden_sizes`, `mlp_ratios` and the mixer options."""
        config = self.backbone_config
        arch = {key: tuple(config[key]) for key in ARCHITECTURE_FIELDS}
        arch.update({key: config.get(key, PAPER_MIXER[key]) for key in OPTION_FIELDS})
        return arch


def is_preset(path) -> bool:
    """True when `path` is a directory with a `config.json` (what keras-hub calls a preset)."""
    path = os.fspath(path) if isinstance(path, os.PathLike) else path
    return isinstance(path, str) and os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE))


def _read_json(path: str, file: str, required: bool = True) -> dict | None:
    full = os.path.join(path, file)
    if not os.path.isfile(full):
        if required:
            raise ValueError(f"The preset {path} has no {file}: it is incomplete; copy or download it again.")
        return None
    try:
        with open(full, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{full} is not valid JSON ({error}); copy or download the preset again.") from None


def read_preset(path) -> Preset:
    """Reads and checks a preset directory; every problem is a ValueError that says what to do."""
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isdir(path):
        raise ValueError(f"The preset {path} is not a directory (a preset is a folder with config.json).")
    metadata = _read_json(path, METADATA_FILE, required=False) or {}
    ours = metadata.get(METADATA_KEY, {})
    version = ours.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"The preset {path} was written by keras-sequencer {ours.get('version', '?')} in preset format "
            f"{version}; this keras-sequencer reads format {FORMAT_VERSION} and older. Upgrade it: "
            "pip install -U keras-sequencer"
        )
    config = _read_json(path, CONFIG_FILE)
    name = config.get("registered_name") or config.get("class_name")
    if name not in ("keras_sequencer>Sequencer2DBackbone", "Sequencer2DBackbone"):
        raise ValueError(
            f"The preset {path} holds a {name!r} backbone, not a Sequencer2DBackbone: it is not a Sequencer preset."
        )
    backbone_config = config.get("config", {})
    missing = [key for key in ARCHITECTURE_FIELDS if key not in backbone_config]
    if missing:
        raise ValueError(f"{os.path.join(path, CONFIG_FILE)} lacks {missing}: copy or download the preset again.")
    if not os.path.isfile(os.path.join(path, WEIGHTS_FILE)):
        raise ValueError(
            f"The preset {path} has no {WEIGHTS_FILE} (the backbone's weights): it is incomplete; copy or "
            "download it again."
        )
    task = _read_json(path, TASK_FILE, required=False)
    num_classes = activation = None
    if task is not None:
        num_classes = task.get("config", {}).get("num_classes")
        activation = task.get("config", {}).get("activation")
    converter = _read_json(path, "image_converter.json", required=False)
    return Preset(
        path=path,
        backbone_config=backbone_config,
        num_classes=num_classes,
        head_activation=activation,
        variant=ours.get("variant"),
        metadata=metadata,
        eval=converter.get("config") if converter else None,
    )


def check_architecture(preset: Preset, expected: dict, model_name: str) -> None:
    """Raises a ValueError naming the first difference between the preset's architecture and `expected`."""
    have = preset.architecture
    for key in (*ARCHITECTURE_FIELDS, *OPTION_FIELDS):
        if key not in expected:
            continue
        want = expected[key]
        want = tuple(float(v) for v in want) if key == "mlp_ratios" else want
        got = tuple(float(v) for v in have[key]) if key == "mlp_ratios" else have[key]
        if isinstance(want, list | tuple):
            want, got = tuple(want), tuple(got)
        if want != got:
            described = f"Sequencer2D-{preset.variant.upper()}" if preset.variant else "a Sequencer2D"
            raise ValueError(
                f"The preset {preset.path} is {described} with {key}={got}; model '{model_name}' has "
                f"{key}={want}. Load it with keras_sequencer.load_preset({preset.path!r}) or the builder of "
                "its variant."
            )


def read_head(preset: Preset) -> tuple[np.ndarray, np.ndarray]:
    """The classifier head's kernel and bias from `task.weights.h5` (keras-hub's task weights)."""
    path = os.path.join(preset.path, TASK_WEIGHTS_FILE)
    if preset.num_classes is None:
        raise ValueError(
            f"The preset {preset.path} holds a backbone only (no task.json): build the model with "
            "include_top=False, or add your own head."
        )
    if not os.path.isfile(path):
        raise ValueError(
            f"The preset {preset.path} has no {TASK_WEIGHTS_FILE} (the head's weights): it is incomplete; copy or "
            "download it again, or load it with include_top=False."
        )
    with h5py.File(path, "r") as f:
        layers = f.get("layers", {})
        dense = [name for name in layers if "vars" in layers[name] and len(layers[name]["vars"]) == 2]
        if len(dense) != 1:
            raise ValueError(f"{path} does not hold one Dense head (found {dense}); copy or download it again.")
        variables = f["layers"][dense[0]]["vars"]
        kernel, bias = np.asarray(variables["0"]), np.asarray(variables["1"])
    if kernel.ndim != 2 or bias.shape != (kernel.shape[1],) or kernel.shape[1] != preset.num_classes:
        raise ValueError(
            f"{path} holds a head of shapes {kernel.shape} and {bias.shape}, not one for the "
            f"{preset.num_classes} classes of task.json; copy or download the preset again."
        )
    return kernel, bias


def load_into(model: keras.Model, preset: Preset, include_top: bool) -> None:
    """Loads a preset's weights into a model built by `Sequencer2D` with the preset's architecture.

    The backbone file loads into a backbone rebuilt from `config.json` (Keras
    checks every variable against it), whose weights are then copied layer by
    layer into the model by name; the head comes from `task.weights.h5`.
    """
    config = {**preset.backbone_config, "include_preprocessing": False, "implementation": "auto", "dtype": None}
    config.pop("image_shape", None)
    backbone = Sequencer2DBackbone.from_config(config)
    try:
        backbone.load_weights(os.path.join(preset.path, WEIGHTS_FILE))
    except (ValueError, OSError, KeyError) as error:
        raise ValueError(
            f"{os.path.join(preset.path, WEIGHTS_FILE)} does not hold the weights config.json describes ({error}); "
            "copy or download the preset again."
        ) from None
    for layer in backbone.layers:
        if layer.weights:
            model.get_layer(layer.name).set_weights(layer.get_weights())
    if include_top:
        kernel, bias = read_head(preset)
        head = model.get_layer("predictions")
        if tuple(head.kernel.shape) != kernel.shape:
            raise ValueError(
                f"The preset {preset.path} has a head for {kernel.shape[1]} classes; model '{model.name}' has "
                f"{head.kernel.shape[1]}. Pass classes={kernel.shape[1]}, or include_top=False and add your own head."
            )
        head.set_weights([kernel, bias])
