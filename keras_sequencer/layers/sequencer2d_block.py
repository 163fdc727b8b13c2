"""Sequencer2DBlock: BiLSTM2D token mixing plus an MLP, both residual."""

import math

import keras
from keras import ops

from keras_sequencer.layers import eager_torch, token_mixing
from keras_sequencer.layers.bilstm1d import BiLSTM1D
from keras_sequencer.layers.bilstm2d import BiLSTM2D
from keras_sequencer.layers.stochastic_depth import StochasticDepth


def _gelu(x, training=None):
    """Exact (erf) GELU, as PyTorch's `nn.GELU()`.

    Written out rather than `ops.gelu(approximate=False)`: TensorFlow's
    version calls `erfc`, which tf2onnx cannot export, while this form becomes
    one GELU op in TFLite and Erf in ONNX. Same function, within float32 rounding.
    On the torch backend (eager, nothing fuses the five elementwise ops) it is
    torch's own one-kernel GELU; the exporters run on TensorFlow. TensorFlow's
    training steps take `_tf_gelu_with_gradient`, the same forward ops with a
    shorter gradient.
    """
    if keras.backend.backend() == "torch":
        return ops.gelu(x, approximate=False)
    if training and keras.backend.backend() == "tensorflow":
        return _tf_gelu_with_gradient(x)
    return 0.5 * x * (1.0 + ops.erf(x * _SQRT_HALF))


_SQRT_HALF = 1.0 / math.sqrt(2.0)
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _tf_gelu_with_gradient(x):
    """`x * Phi(x)` with its derivative `Phi(x) + x * phi(x)` written out (Phi, phi: the normal CDF and density).

    Without XLA TensorFlow runs each elementwise op of the MLP's widest tensor
    as a separate pass over memory; differentiating the written-out GELU takes
    about a dozen of them, this gradient seven (reusing `Phi(x)` from the
    forward pass). The demo model's training step is ~6 % faster on an AVX2
    CPU (`benchmarks/README.md`). Only for training: exporters and inference
    trace the plain form, which has no gradient override in its graph.
    """
    import tensorflow as tf

    @tf.custom_gradient
    def gelu(x):
        cdf = 0.5 * (1.0 + tf.math.erf(x * _SQRT_HALF))

        def grad(upstream):
            density = tf.exp(tf.square(x) * -0.5 - _LOG_SQRT_2PI)
            return upstream * (cdf + x * density)

        return x * cdf, grad

    return gelu(x)


def _layer_norm(layer, x, training=None):
    """`layer(x)` for a `LayerNormalization` over the last axis; TensorFlow's float32 training steps take
    `_tf_layer_norm_with_gradient`, the same function with a shorter gradient."""
    if training and keras.backend.backend() == "tensorflow" and layer.compute_dtype == "float32":
        return _tf_layer_norm_with_gradient(x, layer.gamma.value, layer.beta.value, layer.epsilon)
    return layer(x)


def _tf_layer_norm_with_gradient(x, gamma, beta, epsilon):
    """Layer normalisation over the last axis, computed as Keras' `LayerNormalization`, with its gradient
    written out.

    With `xhat = (x - mean) * rstd` and `g = upstream * gamma`, the input's gradient is
    `rstd * (g - mean(g) - xhat * mean(g * xhat))` (means over the channels); `gamma` gets
    `sum(upstream * xhat)` and `beta` `sum(upstream)` over the other axes. TensorFlow's autodiff of the
    moments and the affine ops runs more passes over the tensor, each a separate kernel without XLA. Only
    for training: inference and exporters call the Keras layer.
    """
    import tensorflow as tf

    # Read outside the custom gradient, whose inputs must be tensors; the reads are differentiated as usual.
    gamma, beta = tf.convert_to_tensor(gamma), tf.convert_to_tensor(beta)

    @tf.custom_gradient
    def layer_norm(x, gamma, beta):
        mean = tf.reduce_mean(x, axis=-1, keepdims=True)
        centred = x - mean
        rstd = tf.math.rsqrt(tf.reduce_mean(tf.square(centred), axis=-1, keepdims=True) + epsilon)
        xhat = centred * rstd

        def grad(upstream):
            batch_axes = list(range(len(x.shape) - 1))
            g = upstream * gamma
            dx = rstd * (g - tf.reduce_mean(g, axis=-1, keepdims=True)
                         - xhat * tf.reduce_mean(g * xhat, axis=-1, keepdims=True))  # fmt: skip
            return dx, tf.reduce_sum(upstream * xhat, axis=batch_axes), tf.reduce_sum(upstream, axis=batch_axes)

        return xhat * gamma + beta, grad

    return layer_norm(x, gamma, beta)


@keras.saving.register_keras_serializable(package="keras_sequencer")
class Sequencer2DBlock(keras.layers.Layer):
    """One Sequencer2D block on a channels-last feature map.

    Pre-norm with two residual branches:
    `x + drop_path(BiLSTM2D(LN(x)))`, then `x + drop_path(MLP(LN(x)))`, where
    the MLP is Dense(`mlp_ratio * channels`) -> exact (erf) GELU -> Dense.
    The output has the input's shape.

    Reference: Tatsunami & Taki, "Sequencer: Deep LSTM for Image
    Classification", NeurIPS 2022 (https://arxiv.org/abs/2205.01972).

    Args:
        hidden_size: int, units of each directional LSTM of the token mixer.
        mlp_ratio: float, hidden width of the MLP as a multiple of channels.
        drop_path_rate: float in `[0, 1)`, stochastic-depth rate of both
            residual branches.
        layer_norm_epsilon: float, epsilon of both LayerNorms.
        implementation: forward path of the token mixer (see `BiLSTM2D`);
            `"auto"` by default.
        rnn_type, bidirectional, union, with_fc: the token mixer's ablation
            options (see `BiLSTM2D`); `union` and `with_fc` apply to `"2d"`.
        mixer: `"2d"` (`BiLSTM2D`, Sequencer2D) or `"1d"` (`BiLSTM1D` over
            the flattened tokens, the paper's Vanilla Sequencer).
        **kwargs: standard `keras.layers.Layer` arguments.

    Example:
    >>> block = Sequencer2DBlock(hidden_size=48)
    >>> y = block(keras.ops.ones((1, 8, 8, 192)))
    """

    def __init__(
        self,
        hidden_size: int,
        mlp_ratio: float = 3.0,
        drop_path_rate: float = 0.0,
        layer_norm_epsilon: float = 1e-6,
        implementation: str = "auto",
        rnn_type: str = "lstm",
        bidirectional: bool = True,
        union: str = "cat",
        with_fc: bool = True,
        mixer: str = "2d",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if mixer not in ("2d", "1d"):
            raise ValueError(f"`mixer` must be '2d' or '1d'. Received: mixer={mixer!r}")
        if mlp_ratio <= 0:
            raise ValueError(f"`mlp_ratio` must be positive. Received: mlp_ratio={mlp_ratio}")
        self.hidden_size = hidden_size
        self.mlp_ratio = float(mlp_ratio)
        self.drop_path_rate = float(drop_path_rate)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.implementation = implementation
        self.rnn_type = rnn_type
        self.bidirectional = bool(bidirectional)
        self.union = union
        self.with_fc = bool(with_fc)
        self.mixer = mixer
        self.input_spec = keras.layers.InputSpec(ndim=4)

        dtype = self.dtype_policy
        self.norm1 = keras.layers.LayerNormalization(epsilon=layer_norm_epsilon, name="norm1", dtype=dtype)
        if mixer == "2d":
            self.rnn_tokens = BiLSTM2D(hidden_size, implementation, rnn_type=rnn_type, bidirectional=bidirectional,
                                       union=union, with_fc=with_fc, name="rnn_tokens", dtype=dtype)  # fmt: skip
        else:
            self.rnn_tokens = BiLSTM1D(hidden_size, rnn_type=rnn_type, bidirectional=bidirectional, name="rnn_tokens",
                                       dtype=dtype)  # fmt: skip
        self.norm2 = keras.layers.LayerNormalization(epsilon=layer_norm_epsilon, name="norm2", dtype=dtype)
        self.drop_path = StochasticDepth(drop_path_rate, name="drop_path", dtype=dtype)
        self.fc1 = None  # widths depend on the channel count, known in build()
        self.fc2 = None

    def build(self, input_shape):
        channels = input_shape[-1]
        dtype = self.dtype_policy
        self.norm1.build(input_shape)
        self.rnn_tokens.build(input_shape)
        self.norm2.build(input_shape)
        self.drop_path.build(input_shape)
        self.fc1 = keras.layers.Dense(int(channels * self.mlp_ratio), name="fc1", dtype=dtype)
        self.fc1.build(input_shape)
        self.fc2 = keras.layers.Dense(channels, name="fc2", dtype=dtype)
        self.fc2.build(tuple(input_shape[:-1]) + (self.fc1.units,))

    def call(self, inputs, training=None):
        if not training and self.mixer == "2d" and eager_torch.runs_torch_functions(inputs, self._sublayers()):
            return self._torch_inference(inputs)
        x = inputs
        x = x + self.drop_path(self.rnn_tokens(_layer_norm(self.norm1, x, training), training=training),
                               training=training)  # fmt: skip
        mlp = self.fc2(_gelu(self.fc1(_layer_norm(self.norm2, x, training)), training=training))
        return x + self.drop_path(mlp, training=training)

    def _sublayers(self):
        rnn = self.rnn_tokens
        fc = [rnn.fc] if rnn.fc is not None else []
        return [self, self.norm1, rnn, *fc, self.drop_path, self.norm2, self.fc1, self.fc2]

    def _torch_inference(self, x):
        """`call(x, training=False)` in PyTorch's own functions on the variables' tensors (see
        `eager_torch`): the functions Keras' layers call, in the same order and dtypes, so the result is
        the same (to the bit in the tests; on CPUs where `eager_torch.onednn_linear`, the `Dense` matmuls
        sum in oneDNN's order). In bfloat16 the layer norms compute in float32 with the
        float32 weights, as Keras' do, and the matmuls in bfloat16 with kept copies of the weights.

        Where a result is this function's own, the next elementwise op writes into it (`add_`, `gelu_`):
        each fresh feature-map-sized buffer costs page faults, and at batch 1 the out-of-place bias add of
        `fc1` took as long as its matmul. `x` itself is never written.
        """
        import torch
        from torch.nn import functional

        dtype = x.dtype

        def norm(layer, x):
            gamma, beta = eager_torch.values_as(layer, ("gamma", "beta"), torch.float32)
            return functional.layer_norm(x.float(), x.shape[-1:], gamma, beta, layer.epsilon).to(dtype)

        def dense(layer, x):
            kernel, bias = eager_torch.values_as(layer, ("kernel", "bias"), dtype)
            return eager_torch.linear(x, kernel, bias)

        rnn = self.rnn_tokens
        with eager_torch.stored_values():  # every weight as stored; `mix` keeps the LSTM cells' casts too
            mixed = token_mixing.mix(rnn, norm(self.norm1, x), training=False)
            x = dense(rnn.fc, mixed).add_(x) if rnn.fc is not None else x + mixed
            hidden = torch.ops.aten.gelu_(dense(self.fc1, norm(self.norm2, x)))
            return dense(self.fc2, hidden).add_(x)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_size": self.hidden_size,
                "mlp_ratio": self.mlp_ratio,
                "drop_path_rate": self.drop_path_rate,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "implementation": self.implementation,
                "rnn_type": self.rnn_type,
                "bidirectional": self.bidirectional,
                "union": self.union,
                "with_fc": self.with_fc,
                "mixer": self.mixer,
            }
        )
        return config
