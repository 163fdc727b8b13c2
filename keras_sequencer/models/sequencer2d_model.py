"""Sequencer2DModel: the functional model `Sequencer2D` returns."""

import math

import keras

from keras_sequencer.layers import PatchEmbed


@keras.saving.register_keras_serializable(package="keras_sequencer")
class Sequencer2DModel(keras.Model):
    """A functional Keras model that checks its images before running them.

    Built by `Sequencer2D` and the variant functions; it behaves like any
    functional `keras.Model` (`fit`, `predict`, `save`, `.keras` files), and
    additionally turns a wrong input rank or an image smaller than the
    network's total patch size into a `ValueError` that says what to pass.
    """

    # The functional signature: Keras then saves the layer graph in `.keras`
    # files and rebuilds this class from it.
    def __init__(self, inputs, outputs, name=None, **kwargs):
        super().__init__(inputs=inputs, outputs=outputs, name=name, **kwargs)
        # The smallest side every stage can still cut into patches; derived from
        # the graph so `.keras` files need no extra config.
        self.min_image_size = math.prod(layer.patch_size for layer in self.layers if isinstance(layer, PatchEmbed))

    def call(self, inputs, training=None, mask=None):
        shape = tuple(getattr(inputs, "shape", ()))
        if len(shape) != 4:
            raise ValueError(
                f"Model '{self.name}' takes a batch of images shaped (batch, height, width, "
                "channels); for a single image add a batch axis (`image[None]`). "
                f"Received: inputs.shape={shape}"
            )
        if any(side is not None and side < self.min_image_size for side in shape[1:3]):
            raise ValueError(
                f"Model '{self.name}' needs images of at least {self.min_image_size}x"
                f"{self.min_image_size} pixels (the product of its patch sizes); resize or pad "
                f"smaller images. Received: inputs.shape={shape}"
            )
        return super().call(inputs, training=training, mask=mask)
