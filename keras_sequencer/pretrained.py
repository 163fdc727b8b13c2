"""Pretrained checkpoints: where they live, how they are fetched, verified and loaded.

`weights="imagenet"` downloads the reference checkpoint with
`keras.utils.get_file` (progress bar, cache, sha256 where known), converts it
once with `keras_sequencer.convert`, caches the converted Keras
`.weights.h5` beside it and loads that. Set `KERAS_SEQUENCER_HUB_URL` to serve
the checkpoints from a mirror (or a local server) with the Hugging Face layout
`{base}/{repo}/resolve/main/model.safetensors`.
"""

import dataclasses
import hashlib
import os
import tempfile
import warnings

import h5py
import keras
import numpy as np

from keras_sequencer.convert import convert_state_dict
from keras_sequencer.models.presets import variant_config

HUB_URL = "https://huggingface.co"
HUB_URL_ENV = "KERAS_SEQUENCER_HUB_URL"
CACHE_SUBDIR = os.path.join("models", "keras_sequencer")
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One published checkpoint of a variant."""

    variant: str
    tag: str  # timm's pretrained tag
    hub_repo: str  # Hugging Face repository holding model.safetensors
    sha256: str | None  # of model.safetensors; None where no hash was published
    fallback_url: str  # the authors' GitHub release (.pth, needs torch)
    license: str = "apache-2.0"
    top1: float | None = None  # ImageNet-1k top-1 at 224, timm's evaluation

    def url(self, base: str | None = None) -> str:
        base = (base or os.environ.get(HUB_URL_ENV) or HUB_URL).rstrip("/")
        return f"{base}/{self.hub_repo}/resolve/main/model.safetensors"

    @property
    def filename(self) -> str:
        return f"{self.tag}.safetensors"


_RELEASE = "https://github.com/okojoalg/sequencer/releases/download/weights"

CHECKPOINTS: dict[str, Checkpoint] = {
    "s": Checkpoint(
        "s",
        "sequencer2d_s.in1k",
        "timm/sequencer2d_s.in1k",
        "ef70ff18ff4f615c53009fde2ffe2f00e47376858d6da329fca2017baaffa946",
        f"{_RELEASE}/sequencer2d_s.pth",
        top1=82.336,
    ),
    "m": Checkpoint(
        "m",
        "sequencer2d_m.in1k",
        "timm/sequencer2d_m.in1k",
        None,  # only the hash of pytorch_model.bin is known; keys and shapes are still checked
        f"{_RELEASE}/sequencer2d_m.pth",
        top1=82.836,
    ),
    "l": Checkpoint(
        "l",
        "sequencer2d_l.in1k",
        "timm/sequencer2d_l.in1k",
        "4104172887d330aec2e0ab09705e09962fa2a77a475a7792e36e0d6065f231a2",
        f"{_RELEASE}/sequencer2d_l.pth",
        top1=83.406,
    ),
}


def manifest() -> dict:
    """The registry as plain data (what `weights/manifest.json` holds)."""
    return {
        "checkpoints": [
            {
                "variant": c.variant,
                "tag": c.tag,
                "url": c.url(HUB_URL),
                "sha256": c.sha256,
                "fallback_url": c.fallback_url,
                "license": c.license,
                "imagenet_top1": c.top1,
            }
            for c in CHECKPOINTS.values()
        ]
    }


# === Reading files ===


def check_weights_path(weights) -> None:
    """Raises a clear ValueError unless `weights` names a loadable file."""
    text = os.fspath(weights) if isinstance(weights, os.PathLike) else weights
    if not isinstance(text, str):
        raise ValueError(
            f"`weights` must be None, 'imagenet' or the path to a weights file. Received: weights={weights!r}"
        )
    if not (text.endswith(".weights.h5") or text.endswith(CHECKPOINT_SUFFIXES)):
        raise ValueError(
            "`weights` must be None, 'imagenet', or a path to a Keras `.weights.h5` file or a "
            f"timm / authors' checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}). Received: weights={weights!r}"
        )
    if not os.path.isfile(text):
        raise ValueError(f"The weights file does not exist. Received: weights={weights!r}")


def read_checkpoint(path: str) -> dict[str, np.ndarray]:
    """Reads a timm / authors' checkpoint into name -> NumPy array.

    `.safetensors` needs only the `safetensors` package. `.pth`/`.pt`/`.bin`
    are pickles: they need PyTorch and are opened with `weights_only=True`.
    """
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        try:
            return load_file(path)
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"Could not read '{path}' as safetensors ({e}); the file is corrupt or truncated.") from e
    try:
        import torch
    except ImportError as e:
        raise ValueError(
            f"Reading the PyTorch checkpoint '{path}' needs torch (pip install torch), or convert it "
            "to .safetensors first. Received: weights=" + repr(path)
        ) from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"Could not read '{path}' as a PyTorch checkpoint ({e}).") from e
    for key in ("state_dict", "model"):  # training-script wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    return {k: v.detach().float().numpy() for k, v in obj.items() if hasattr(v, "numpy")}


def assign(model: keras.Model, variables: dict[str, np.ndarray]) -> None:
    """Assigns converted arrays to `model`, strictly: every variable exactly once."""
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


def load_weights(model: keras.Model, weights: str, config: dict, variant: str | None, include_top: bool) -> None:
    """Loads `weights` ("imagenet" or a path) into a freshly built Sequencer2D."""
    if weights == "imagenet":
        _load_keras_weights(model, imagenet_weights_path(variant), include_top)
        return
    path = os.fspath(weights)
    if path.endswith(".weights.h5"):
        _load_keras_weights(model, path, include_top)
        return
    assign(model, convert_state_dict(read_checkpoint(path), config, include_top=include_top))


# === Downloading ===


def _keras_home() -> str:
    """Keras' own base folder: `$KERAS_HOME`, else `~/.keras` (Keras' choice, where readable)."""
    if os.environ.get("KERAS_HOME"):
        return os.path.expanduser(os.environ["KERAS_HOME"])
    try:  # not public API (keras.config has no keras_home in 3.15); it knows Keras' /tmp fallback
        from keras.src.backend.config import keras_home
    except ImportError:
        return os.path.expanduser(os.path.join("~", ".keras"))
    return os.path.expanduser(keras_home())


def cache_dir() -> str:
    """Where downloads and converted files are kept (`$KERAS_HOME/models/keras_sequencer`)."""
    return os.path.join(_keras_home(), CACHE_SUBDIR)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _remove(path: str) -> None:
    if os.path.exists(path):
        os.remove(path)


def _offline_error(checkpoint: Checkpoint, cause: Exception) -> ValueError:
    return ValueError(
        f"Could not download the ImageNet weights of Sequencer2D-{checkpoint.variant.upper()} "
        f"({cause}). Without network access, fetch\n  {checkpoint.url()}\n"
        f"(or {checkpoint.fallback_url}) on another machine, copy it here and pass its path: "
        f"Sequencer2D{checkpoint.variant.upper()}(weights='/path/to/model.safetensors'). "
        f"Kaggle: attach it as a dataset. Received: weights='imagenet'"
    )


def fetch_checkpoint(variant: str) -> str:
    """Downloads (or finds in the cache) a variant's reference checkpoint; returns its path.

    The file is verified against the pinned sha256 where one is known. A file
    that fails verification is removed from the cache before the error.
    """
    checkpoint = CHECKPOINTS[variant]
    directory = cache_dir()
    # get_file falls back to /tmp when the cache folder does not exist yet.
    os.makedirs(directory, exist_ok=True)
    try:
        return keras.utils.get_file(
            checkpoint.filename,
            checkpoint.url(),
            file_hash=checkpoint.sha256,
            hash_algorithm="sha256",
            cache_dir=_keras_home(),
            cache_subdir=CACHE_SUBDIR,
        )
    except ValueError as e:  # raised by get_file on a hash mismatch
        _remove(os.path.join(directory, checkpoint.filename))
        raise ValueError(
            f"The downloaded checkpoint {checkpoint.url()} failed its sha256 check (expected "
            f"{checkpoint.sha256}); it was truncated or replaced, and has been removed from the "
            "cache. Try again, or pass a verified local file as `weights=`."
        ) from e
    except Exception as e:
        # get_file turns network errors (no route, HTTP errors, short reads)
        # into a plain Exception("URL fetch failure ...").
        if isinstance(e, OSError) or "URL fetch failure" in str(e):
            fallback = _fetch_fallback(checkpoint)
            if fallback is not None:
                return fallback
            raise _offline_error(checkpoint, e) from e
        raise


def _fetch_fallback(checkpoint: Checkpoint) -> str | None:
    """The authors' GitHub release, when torch is there to read it."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return None
    try:
        return keras.utils.get_file(
            os.path.basename(checkpoint.fallback_url),
            checkpoint.fallback_url,
            cache_dir=_keras_home(),
            cache_subdir=CACHE_SUBDIR,
        )
    except Exception:
        return None


def save_converted(state_dict: dict, variant: str, target: str) -> int:
    """Converts a variant's timm / authors' state_dict and writes it as a Keras `.weights.h5`.

    The file is written to a temporary name and renamed, so `target` never
    holds a half-written file. Returns the number of converted variables.
    """
    from keras_sequencer.models.sequencer2d import Sequencer2D

    config = variant_config(variant)
    converted = convert_state_dict(state_dict, config)
    reference = Sequencer2D(**config, weights=None, classifier_activation=None, name=f"sequencer2d_{variant}")
    assign(reference, converted)
    fd, tmp = tempfile.mkstemp(suffix=".weights.h5", dir=os.path.dirname(os.path.abspath(target)))
    os.close(fd)
    try:
        reference.save_weights(tmp)
        os.replace(tmp, target)
    finally:
        _remove(tmp)
    return len(converted)


def imagenet_weights_path(variant: str) -> str:
    """Path of the converted `.weights.h5` of a variant, fetching and converting once."""
    source = fetch_checkpoint(variant)
    digest = _sha256(source)
    target = os.path.join(os.path.dirname(source), f"{CHECKPOINTS[variant].tag}-{digest[:12]}.weights.h5")
    if os.path.exists(target):
        return target
    try:
        save_converted(read_checkpoint(source), variant, target)
    except ValueError as e:
        _remove(source)  # a corrupt or foreign file must not stay in the cache
        raise ValueError(
            f"The checkpoint downloaded for Sequencer2D-{variant.upper()} cannot be used and was "
            f"removed from the cache: {e}"
        ) from e
    return target
