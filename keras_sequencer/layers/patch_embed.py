"""PatchEmbed: non-overlapping patch projection (stem and downsampling)."""

import keras

from keras_sequencer.layers import eager_torch


@keras.saving.register_keras_serializable(package="keras_sequencer")
class PatchEmbed(keras.layers.Layer):
    """Projects non-overlapping `patch_size x patch_size` patches to `filters` channels.

    A strided convolution with kernel = stride = `patch_size` and no padding on
    a channels-last map. Sequencer2D uses it as the stem (7x7 patches of the
    image) and between stages (2x2 patch merging, or a 1x1 "pointwise linear"
    projection). A side that is not a multiple of `patch_size` is floor-
    truncated, as in the reference.

    Args:
        filters: int, output channels.
        patch_size: int, side of a patch.
        **kwargs: standard `keras.layers.Layer` arguments.

    Example:
    >>> stem = PatchEmbed(filters=192, patch_size=7)
    >>> tuple(stem(keras.ops.ones((1, 224, 224, 3))).shape)
    (1, 32, 32, 192)
    """

    def __init__(self, filters: int, patch_size: int, **kwargs):
        super().__init__(**kwargs)
        for arg, value in (("filters", filters), ("patch_size", patch_size)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{arg}` must be a positive int. Received: {arg}={value}")
        self.filters = filters
        self.patch_size = patch_size
        self.input_spec = keras.layers.InputSpec(ndim=4)
        # Channels-last whatever Keras' global `image_data_format`: the models take channels-last images, and a
        # file saved under one setting must load and compute the same under the other.
        self.proj = keras.layers.Conv2D(
            filters,
            patch_size,
            strides=patch_size,
            padding="valid",
            data_format="channels_last",
            name="proj",
            dtype=self.dtype_policy,
        )

    def _check_size(self, shape):
        for axis, side in (("height", shape[1]), ("width", shape[2])):
            if side is not None and side < self.patch_size:
                raise ValueError(
                    f"Layer '{self.name}' needs a {axis} of at least {self.patch_size} "
                    f"(its patch size). Received: input shape={tuple(shape)}"
                )

    def build(self, input_shape):
        self._check_size(input_shape)
        self.proj.build(input_shape)

    def call(self, inputs):
        self._check_size(inputs.shape)
        if eager_torch.runs_torch_functions(inputs, (self, self.proj)):
            return self._torch_inference(inputs)
        return self.proj(inputs)

    def _torch_inference(self, x):
        """`proj(x)` as torch's convolution on a channels-last view (see `eager_torch`).

        Keras' convolution on PyTorch copies a channels-last input to
        channels-first and back to channels-last memory; a permuted view of a
        contiguous input already is that memory, without the two copies.
        """
        import torch
        from torch.nn import functional

        names = ("kernel", "bias") if self.proj.use_bias else ("kernel",)
        with eager_torch.stored_values():
            kernel, *bias = eager_torch.values_as(self.proj, names, x.dtype)  # bfloat16: kept copies
        kernel = kernel.permute(3, 2, 0, 1)  # (h, w, in, out) -> (out, in, h, w)
        x = x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)  # a copy only if x is not contiguous
        out = functional.conv2d(x, kernel, stride=self.patch_size).permute(0, 2, 3, 1)
        return out.add_(bias[0]) if bias else out  # the bias added apart, as Keras does (bfloat16 rounds twice)

    def compute_output_shape(self, input_shape):
        self._check_size(input_shape)
        return self.proj.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update({"filters": self.filters, "patch_size": self.patch_size})
        return config
