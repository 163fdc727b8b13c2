"""Stochastic depth (drop path) on a residual branch."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_sequencer")
class StochasticDepth(keras.layers.Layer):
    """Drops a whole residual branch per sample while training.

    During training each sample's branch output is zeroed with probability
    `rate` and the survivors are scaled by `1 / (1 - rate)`, so the expected
    value is unchanged; at inference the layer is the identity. Every call
    draws a fresh mask, so one instance can serve several branches of a block.

    Reference: Huang et al., "Deep Networks with Stochastic Depth", ECCV 2016.

    Args:
        rate: float in `[0, 1)`, probability of dropping the branch.
        seed: optional int, seed of the random mask.
        **kwargs: standard `keras.layers.Layer` arguments.

    Example:
    >>> layer = StochasticDepth(0.1)
    >>> y = layer(keras.ops.ones((2, 4, 4, 8)), training=True)
    """

    def __init__(self, rate: float = 0.0, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= rate < 1.0:
            raise ValueError(
                "`rate` must be a float in [0, 1): the probability of dropping "
                f"a residual branch. Received: rate={rate}"
            )
        self.rate = float(rate)
        self.seed = seed
        # Only a layer that can drop anything owns random state, so models that
        # differ only in their drop-path rate keep identical weight files.
        self.seed_generator = keras.random.SeedGenerator(seed) if self.rate > 0 else None
        self.supports_masking = True

    def call(self, inputs, training=None):
        if not training or self.rate == 0.0:
            return inputs
        keep = 1.0 - self.rate
        shape = (ops.shape(inputs)[0],) + (1,) * (len(inputs.shape) - 1)
        noise = keras.random.uniform(shape, seed=self.seed_generator, dtype=inputs.dtype)
        return inputs * ops.floor(keep + noise) / keep

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"rate": self.rate, "seed": self.seed})
        return config
