"""Sequencer2D the keras-hub way: an image converter equal to timm's eval transform, a preprocessor, a classifier.

Needs keras-hub (`pip install "keras-sequencer[hub]"`); the rest of the package
does not. Importing `keras_sequencer` registers the classes with Keras, so
keras-hub's own loaders find them:

>>> import keras_sequencer, keras_hub
>>> classifier = keras_hub.models.ImageClassifier.from_preset("./sequencer2d_s_imagenet")
>>> classifier.predict(raw_uint8_images)  # resized, cropped and normalised by the preprocessor

`classifier(x)` on already preprocessed images skips the preprocessor, as
with every keras-hub task; `fit`, `predict` and `evaluate` apply it.
"""

import importlib.util

import keras
from keras import ops
import numpy as np

from keras_sequencer.models.backbone import KERAS_HUB_AVAILABLE, Sequencer2DBackbone
from keras_sequencer.models.sequencer2d_model import CompiledPredict, prepare_optimizer
from keras_sequencer.presets import IMAGENET_EVAL

if not KERAS_HUB_AVAILABLE:
    raise ImportError(
        "keras_sequencer.hub needs keras-hub: pip install 'keras-sequencer[hub]'. The rest of keras_sequencer "
        "(models, presets through keras_sequencer.load_preset) works without it."
    )

import keras_hub  # noqa: E402

_SCALE, _OFFSET = IMAGENET_EVAL.scale_offset
# keras-hub batches NumPy arrays with grain where grain is installed, else with tf.data.
KERAS_HUB_BATCHES_WITH_TF_DATA = (
    importlib.util.find_spec("grain") is None and importlib.util.find_spec("tensorflow") is not None
)


def _check_square(image_size):
    if image_size is not None and (len(tuple(image_size)) != 2 or image_size[0] != image_size[1]):
        raise ValueError(
            "Sequencer2DImageConverter makes square crops, as timm's eval transform does (short side, then a "
            f"centre crop): image_size must be (n, n). Received: image_size={image_size!r}"
        )


@keras.saving.register_keras_serializable(package="keras_sequencer")
class Sequencer2DImageConverter(keras_hub.layers.ImageConverter):
    """timm's eval transform as a keras-hub image converter, on any backend and inside tf.data.

    Resizes each image so that its short side is `int(size / crop_pct)` and
    the long side keeps the aspect ratio, takes the central `image_size` crop
    and maps [0, 255] RGB to `(x / 255 - mean) / std`: torchvision's
    `Resize`, `CenterCrop` and `Normalize` as timm evaluates Sequencer2D
    (resize 256 bicubic, centre crop 224, ImageNet mean and std). 8-bit images
    are rounded to 8 bits after resizing, as PIL does. Setting `image_size`
    keeps `crop_pct`.

    Args:
        image_size: `(height, width)` of the output, or None to leave the size
            (then no resize and no crop).
        crop_pct: fraction of the resized image the crop keeps.
        scale, offset, interpolation, antialias: as in keras-hub's
            `ImageConverter`; the defaults are the ImageNet normalisation and
            antialiased bicubic resizing (what PIL does for timm).
    """

    backbone_cls = Sequencer2DBackbone

    def __init__(
        self,
        image_size=(IMAGENET_EVAL.input_size, IMAGENET_EVAL.input_size),
        crop_pct: float = IMAGENET_EVAL.crop_pct,
        scale=_SCALE,
        offset=_OFFSET,
        interpolation: str = IMAGENET_EVAL.interpolation,
        antialias: bool = True,
        **kwargs,
    ):
        if not isinstance(crop_pct, int | float) or not 0 < crop_pct <= 1:
            raise ValueError(f"`crop_pct` must be in (0, 1]. Received: crop_pct={crop_pct!r}")
        kwargs.pop("crop_to_aspect_ratio", None)  # the short side sets the scale; the crop does the rest
        kwargs["data_format"] = "channels_last"  # what the backbone takes, whatever Keras' global setting
        _check_square(image_size)
        super().__init__(
            image_size=image_size,
            scale=scale,
            offset=offset,
            interpolation=interpolation,
            antialias=antialias,
            crop_to_aspect_ratio=False,
            **kwargs,
        )
        self.crop_pct = float(crop_pct)
        # Weightless, like the converter (which keras-hub marks built); docs/design.md, "Every layer built".
        self.resizing.built = True

    @property
    def image_size(self):
        """Settable `(n, n)`: the side of the centre crop; the resize before it follows `crop_pct`."""
        return keras_hub.layers.ImageConverter.image_size.fget(self)

    @image_size.setter
    def image_size(self, value):
        _check_square(value)
        keras_hub.layers.ImageConverter.image_size.fset(self, value)

    def _call_python(self, inputs):
        if isinstance(inputs, dict):
            raise ValueError(
                "Sequencer2DImageConverter takes images only (a batch, one image or a list of images); "
                "bounding boxes are not supported."
            )
        if isinstance(inputs, (list, tuple)):
            try:
                inputs = np.stack([np.asarray(image) for image in inputs])
            except ValueError:  # images of different sizes: one at a time
                return [self._call_python(image) for image in inputs]
        if type(inputs).__module__.startswith("tensorflow"):  # inside tf.data, whatever the backend
            return self._convert_tf(inputs)
        x = ops.convert_to_tensor(inputs)
        if self.image_size is not None:
            x = self._resize_and_crop(x)
        return self._normalise(ops.cast(x, self.compute_dtype))

    def _normalise(self, x):
        if self.scale is not None:
            scale = self._expand_non_channel_dims(self.scale, x)
            x, scale = self._convert_types(x, scale, x.dtype)
            x = x * scale
        if self.offset is not None:
            offset = self._expand_non_channel_dims(self.offset, x)
            x, offset = self._convert_types(x, offset, x.dtype)
            x = x + offset
        return x

    def _output_size(self, height, width):
        """torchvision's `Resize(int(size / crop_pct))`: the short side to that length, the aspect ratio kept."""
        short = int(min(self.image_size) / self.crop_pct)
        if height <= width:
            return short, int(short * width / height)
        return int(short * height / width), short

    def _resize_and_crop(self, x):
        """`Resize` then `CenterCrop` as timm evaluates, in Keras ops on the backend."""
        channels_first = self.data_format == "channels_first"
        height_axis = -2 if channels_first else -3
        size = self._output_size(x.shape[height_axis], x.shape[height_axis + 1])
        integer = "int" in str(x.dtype)
        x = ops.image.resize(
            ops.cast(x, "float32"),
            size,
            interpolation=self.interpolation,
            antialias=self.antialias,
            data_format=self.data_format,
        )
        if integer:  # PIL resizes 8-bit images to 8 bits: rounded and clipped
            x = ops.clip(ops.round(x), 0, 255)
        crop_height, crop_width = self.image_size
        top = int(round((size[0] - crop_height) / 2.0))  # CenterCrop's rounding
        left = int(round((size[1] - crop_width) / 2.0))
        if channels_first:
            return x[..., top : top + crop_height, left : left + crop_width]
        return x[..., top : top + crop_height, left : left + crop_width, :]

    def _convert_tf(self, x):
        """The same in TensorFlow ops, inside tf.data, where an image's size may be known only when it runs."""
        import tensorflow as tf

        if isinstance(x, tf.RaggedTensor):
            raise ValueError(
                "Sequencer2DImageConverter got images of different sizes in one batch; pass them one at a time "
                "(or a tf.data pipeline of single images) and batch after the converter."
            )
        if self.image_size is not None:
            integer = x.dtype.is_integer
            crop_height, crop_width = self.image_size
            height, width = x.shape[-3], x.shape[-2]
            if height is not None and width is not None:
                size = self._output_size(height, width)
                top = int(round((size[0] - crop_height) / 2.0))
                left = int(round((size[1] - crop_width) / 2.0))
            else:
                short = int(min(self.image_size) / self.crop_pct)
                dynamic = tf.cast(tf.shape(x), tf.float64)
                height, width = dynamic[-3], dynamic[-2]
                long_side = tf.cast(tf.floor(short * tf.maximum(height, width) / tf.minimum(height, width)), tf.int32)
                size = tf.where(height <= width, tf.stack([short, long_side]), tf.stack([long_side, short]))
                # tf.round rounds half to even, as Python's round does in the static case
                top = tf.cast(tf.round(tf.cast(size[0] - crop_height, tf.float64) / 2.0), tf.int32)
                left = tf.cast(tf.round(tf.cast(size[1] - crop_width, tf.float64) / 2.0), tf.int32)
            x = tf.image.resize(tf.cast(x, tf.float32), size, method=self.interpolation, antialias=self.antialias)
            if integer:
                x = tf.clip_by_value(tf.round(x), 0.0, 255.0)
            x = x[..., top : top + crop_height, left : left + crop_width, :]
        return self._normalise(tf.cast(x, self.compute_dtype))

    def get_config(self):
        config = super().get_config()
        config["crop_pct"] = self.crop_pct
        config.pop("crop_to_aspect_ratio", None)
        return config


@keras.saving.register_keras_serializable(package="keras_sequencer")
class Sequencer2DImageClassifierPreprocessor(keras_hub.models.ImageClassifierPreprocessor):
    """keras-hub's image-classifier preprocessor with `Sequencer2DImageConverter` (timm's eval transform)."""

    backbone_cls = Sequencer2DBackbone
    image_converter_cls = Sequencer2DImageConverter

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.built = True  # weightless, run by tf.data; docs/design.md, "Every layer built"


@keras.saving.register_keras_serializable(package="keras_sequencer")
class Sequencer2DImageClassifier(CompiledPredict, keras_hub.models.ImageClassifier):
    """A keras-hub `ImageClassifier` on a `Sequencer2DBackbone`: average pooling and a Dense head (logits).

    The same computation as `Sequencer2D(..., classifier_activation=None)`
    with timm's eval transform in front when a preprocessor is set, and the
    same `predict` and `evaluate` (`CompiledPredict`): XLA-compiled on
    TensorFlow without a GPU (`xla_predict_on_cpu`, `predict_on_batch` too;
    `xla_evaluate_on_cpu`, `test_on_batch` and `fit`'s validation too),
    for `predict` a partial last batch of a NumPy array filled up where each
    batch shape is compiled (TensorFlow's XLA, JAX), and NumPy arrays that
    keras-hub would batch with tf.data batched without tf.data's autotuning.

    Example (S from scratch with a 10-class head, trained on raw uint8 images of any size):
    >>> import keras_sequencer
    >>> from keras_sequencer import hub
    >>> backbone = keras_sequencer.Sequencer2DBackbone(**keras_sequencer.presets.variant_config("s"))
    >>> preprocessor = hub.Sequencer2DImageClassifierPreprocessor(image_converter=hub.Sequencer2DImageConverter())
    >>> classifier = hub.Sequencer2DImageClassifier(backbone, num_classes=10, preprocessor=preprocessor)
    >>> classifier.fit(raw_images, labels)  # keras-hub compiles its tasks: Adam, cross-entropy from logits
    """

    backbone_cls = Sequencer2DBackbone
    preprocessor_cls = Sequencer2DImageClassifierPreprocessor

    # Without a preprocessor the images reach the backbone as given: check them before Keras runs anything, as
    # this package's models do (a check failing inside JAX's predict would leave the model without variables).
    def _check_raw(self, x):
        if self.preprocessor is None:
            self.backbone._check_input(x)

    def fit(self, *args, **kwargs):
        prepare_optimizer(self)  # as this package's models: on TensorFlow the training step is traced once
        return super().fit(*args, **kwargs)

    def train_on_batch(self, *args, **kwargs):
        prepare_optimizer(self)
        return super().train_on_batch(*args, **kwargs)

    def _batches_arrays_itself(self, step: str) -> bool:
        # Where keras-hub would batch NumPy arrays with an autotuned tf.data pipeline (any backend, without
        # grain), ours without autotuning avoids that pipeline's stalls (`CompiledPredict._predict_array`).
        return KERAS_HUB_BATCHES_WITH_TF_DATA

    def predict(self, x, batch_size=None, verbose="auto", steps=None, callbacks=None):
        self._check_raw(x)
        return self._predict_filled(x, batch_size, verbose, steps, callbacks)

    def predict_on_batch(self, x):
        self._check_raw(x)
        return super().predict_on_batch(x)

    def evaluate(self, x=None, y=None, batch_size=None, sample_weight=None, **kwargs):
        # keras-hub's order of the positional arguments (`PipelineModel.evaluate`), not Keras'.
        self._check_raw(x)
        return self._evaluate_array(x, y, batch_size=batch_size, sample_weight=sample_weight, **kwargs)
