"""ImageNet-1k helpers that work offline: preprocessing and label decoding."""

import functools
import json
import os

import numpy as np

from keras_sequencer.presets import IMAGENET_EVAL

_CLASS_INDEX = os.path.join(os.path.dirname(__file__), "imagenet_class_index.json")


def preprocess_input(x, data_format=None):
    """A placeholder kept for `keras.applications` compatibility.

    Sequencer2D models built with `include_preprocessing=True` (the default)
    take RGB images with values in [0, 255] and normalise them inside the
    model, so this function returns its input unchanged.

    Args:
        x: images, RGB, values in [0, 255].
        data_format: ignored; accepted for API compatibility.

    Returns:
        `x`, unchanged.
    """
    return x


@functools.cache
def _class_index() -> dict[int, tuple[str, str]]:
    # WordNet ids in the standard ImageNet-1k order, each with its first lemma;
    # generated from timm's data/_info files so no download is ever needed.
    with open(_CLASS_INDEX) as f:
        return {int(k): tuple(v) for k, v in json.load(f).items()}


def decode_predictions(preds, top: int = 5) -> list[list[tuple[str, str, float]]]:
    """Decodes ImageNet-1k predictions into `(wordnet_id, name, score)` tuples.

    Works offline: the class index ships with the package.

    Args:
        preds: array of shape `(batch, 1000)`: probabilities or logits.
        top: how many of the best classes to return per image.

    Returns:
        One list per image of `top` tuples `(wordnet_id, class_name, score)`,
        best first.

    Example:
    >>> decode_predictions(np.eye(1000)[[1]], top=1)
    [[('n01443537', 'goldfish', 1.0)]]
    """
    preds = np.asarray(preds)
    if preds.ndim != 2 or preds.shape[1] != 1000:
        raise ValueError(
            "`decode_predictions` expects ImageNet predictions of shape (batch, 1000). "
            f"Received: preds.shape={preds.shape}"
        )
    if not isinstance(top, int) or not 1 <= top <= 1000:
        raise ValueError(f"`top` must be an int in [1, 1000]. Received: top={top!r}")
    index = _class_index()
    results = []
    for row in preds:
        best = np.argsort(row)[::-1][:top]
        results.append([(*index[int(i)], float(row[i])) for i in best])
    return results


def _to_rgb(image):
    """A Pillow image as 8-bit RGB, upright: EXIF rotation applied, 16-bit and float grey scaled, not clipped.

    Pillow's own `convert("RGB")` clips 16-bit and 32-bit grey (mode I;16, I)
    at 255, which turns most such images white, and maps float images (F) the
    same way; every other mode (L, P, RGBA, CMYK, ...) it converts correctly.
    """
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F" and values.size and np.nanmax(values) <= 1.0:
            values = values * 255.0  # float images in [0, 1]
        elif image.mode.startswith("I;16") or (image.mode == "I" and values.size and values.max() > 255):
            values = values / 257.0  # 16-bit range: 65535 -> 255
        grey = np.clip(np.nan_to_num(values), 0, 255).round().astype(np.uint8)
        image = Image.fromarray(grey, mode="L")
    return image.convert("RGB")


def load_image(path, size: int = IMAGENET_EVAL.input_size, crop_pct: float = IMAGENET_EVAL.crop_pct) -> np.ndarray:
    """Loads an image the way the reference evaluates ImageNet.

    Resizes the short side to `int(size / crop_pct)` (256 for 224) with bicubic
    interpolation, then takes the central `size x size` crop (timm's eval
    transform for Sequencer2D, `keras_sequencer.presets.EvalConfig`). Needs Pillow.

    Args:
        path: image file.
        size: side of the output crop.
        crop_pct: fraction of the resized short side kept by the crop.

    Returns:
        float32 array `(size, size, 3)`, RGB in [0, 255]: the input a
        Sequencer2D model with `include_preprocessing=True` expects.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        opened = Image.open(path)
        opened.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as error:
        if isinstance(error, FileNotFoundError | IsADirectoryError):
            raise ValueError(f"{path} is not an image file ({type(error).__name__}).") from error
        raise ValueError(
            f"{path} cannot be read as an image ({type(error).__name__}: {error}); it is empty, truncated, "
            "not an image, or too large for Pillow's safety limit."
        ) from error
    with opened as image:
        image = _to_rgb(image)
        short = int(size / crop_pct)
        width, height = image.size
        # torchvision's Resize(short): the long side is truncated, not rounded.
        if width <= height:
            new_size = (short, int(short * height / width))
        else:
            new_size = (int(short * width / height), short)
        image = image.resize(new_size, Image.Resampling[IMAGENET_EVAL.interpolation.upper()])
        width, height = image.size
        left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
        image = image.crop((left, top, left + size, top + size))
        return np.asarray(image, dtype=np.float32)
