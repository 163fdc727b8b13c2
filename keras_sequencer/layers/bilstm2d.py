"""BiLSTM2D: the token mixer of Sequencer2D."""

import keras

from keras_sequencer.layers import token_mixing
from keras_sequencer.layers.rnn import RNN_TYPES, sequence_layer

UNIONS = ("cat", "add", "vertical", "horizontal")


@keras.saving.register_keras_serializable(package="keras_sequencer")
class BiLSTM2D(keras.layers.Layer):
    """Mixes tokens of a 2-D feature map with a vertical and a horizontal BiLSTM.

    Every column of the `(batch, height, width, channels)` input is read as a
    sequence of length `height` by one bidirectional LSTM (`rnn_v`), every row
    as a sequence of length `width` by another (`rnn_h`). The two outputs are
    concatenated channel-wise in the order `[v_fwd, v_bwd, h_fwd, h_bwd]`
    (`4 * hidden_size` channels) and projected back to `channels` by a Dense
    layer (`fc`). The two LSTMs share no weights; every sequence starts from a
    zero state. Any height and width work, square or not.

    Reference: Tatsunami & Taki, "Sequencer: Deep LSTM for Image
    Classification", NeurIPS 2022 (https://arxiv.org/abs/2205.01972).

    Several forward paths compute the same function from the same variables
    (those of the `Bidirectional(LSTM)` sublayers, so every checkpoint and
    `.keras` file runs on each); `implementation` chooses one:

    - `"keras"`: the four LSTMs run as `Bidirectional(LSTM)` layers (cuDNN
      on a GPU with the TensorFlow or PyTorch backend).
    - `"fused"`: one matmul projects the input for all four directional
      LSTMs, then the recurrences advance together, one batched recurrent
      matmul per step; `"unrolled"` and `"scan"` name its two step loops
      (`"fused"` takes the scan for inference on TensorFlow, where XLA
      compiles it faster). On TensorFlow and JAX `"scan"` has a hand-written
      gradient: its training graph builds in about half the time; on a CPU
      its steps run as fast on JAX and slower on TensorFlow. Needs the
      height and width when the model is
      traced (a fixed `input_shape`, or eager calls).
    - `"torch"`: PyTorch's own LSTM kernel (`torch.lstm`), PyTorch backend
      only.
    - `"tensorflow"`: TensorFlow's own LSTM kernel (`BlockLSTMV2`, one op
      per direction and one for its gradient), TensorFlow backend only, not
      under XLA.
    - `"auto"` (default): `"torch"` on the PyTorch backend; elsewhere the
      fused recurrence for inference when the size is known and no GPU backs
      Keras' LSTM; for training `"tensorflow"` on TensorFlow without a GPU,
      in float32 and outside XLA (its graph builds fastest), the scan on
      JAX when the size is known, else `"keras"` (cuDNN on GPUs).
      `keras_sequencer.layers.token_mixing` holds every path and the rule;
      benchmarks/README.md the measurements behind it.

    The paper's ablations (authors' `RNN2DBase`, timm's `RNN2dBase`) are
    options; the defaults are the paper's mixer:
    - `rnn_type`: `"lstm"`, `"gru"` (Keras GRU, `reset_after=True`, i.e.
      PyTorch's formulation) or `"rnn"` (tanh SimpleRNN);
    - `bidirectional=False`: forward-only RNNs (`hidden_size` channels each);
    - `union`: `"cat"` (concatenate vertical and horizontal), `"add"` (sum
      them), `"vertical"` or `"horizontal"` (that scan only);
    - `with_fc=False`: no output projection; the mixed width must then equal
      the input's channels.
    Only `"keras"` implements the options ("auto" picks it for them).

    Args:
        hidden_size: int, units of each directional RNN.
        implementation: `"auto"`, `"keras"`, `"fused"`, `"unrolled"`,
            `"scan"`, `"torch"` or `"tensorflow"` (see above).
        rnn_type: `"lstm"`, `"gru"` or `"rnn"`.
        bidirectional: bool, forward and backward RNNs (True) or forward only.
        union: `"cat"`, `"add"`, `"vertical"` or `"horizontal"`.
        with_fc: bool, whether a Dense layer projects back to the input width.
        **kwargs: standard `keras.layers.Layer` arguments.

    Example:
    >>> layer = BiLSTM2D(hidden_size=48)
    >>> y = layer(keras.ops.ones((2, 8, 12, 192)))
    >>> tuple(y.shape)
    (2, 8, 12, 192)
    """

    def __init__(
        self,
        hidden_size: int,
        implementation: str = "auto",
        rnn_type: str = "lstm",
        bidirectional: bool = True,
        union: str = "cat",
        with_fc: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(
                "`hidden_size` must be a positive int, the units of each "
                f"directional LSTM. Received: hidden_size={hidden_size}"
            )
        if rnn_type not in RNN_TYPES:
            raise ValueError(f"`rnn_type` must be one of {RNN_TYPES}. Received: rnn_type={rnn_type!r}")
        if union not in UNIONS:
            raise ValueError(f"`union` must be one of {UNIONS}. Received: union={union!r}")
        for name, value in (("bidirectional", bidirectional), ("with_fc", with_fc)):
            if not isinstance(value, bool):
                raise ValueError(f"`{name}` must be True or False. Received: {name}={value!r}")
        self.hidden_size = hidden_size
        self.implementation = implementation
        self.rnn_type = rnn_type
        self.bidirectional = bool(bidirectional)
        self.union = union
        self.with_fc = bool(with_fc)
        token_mixing.check_implementation(implementation, self.standard, runs_here=False)
        # XLA has no kernel for TensorFlow's LSTM op: Keras then compiles models holding this layer without it.
        self.supports_jit = implementation != "tensorflow"
        self.input_spec = keras.layers.InputSpec(ndim=4)
        args = (rnn_type, hidden_size, self.bidirectional)
        self.rnn_v = None if union == "horizontal" else sequence_layer(*args, name="rnn_v", dtype=self.dtype_policy)
        self.rnn_h = None if union == "vertical" else sequence_layer(*args, name="rnn_h", dtype=self.dtype_policy)
        self.fc = None  # its width is the input's channel count, known in build()

    @property
    def standard(self) -> bool:
        """Whether this is the paper's mixer (bidirectional LSTMs, union "cat", output projection)."""
        return (self.rnn_type, self.bidirectional, self.union, self.with_fc) == ("lstm", True, "cat", True)

    @property
    def mixed_channels(self) -> int:
        """Channels after mixing, before `fc`: directions x units, x2 for union='cat'."""
        return (2 if self.bidirectional else 1) * self.hidden_size * (2 if self.union == "cat" else 1)

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None:
            raise ValueError(f"BiLSTM2D needs a known channel count (last axis). Received: input_shape={input_shape}")
        if not self.with_fc and self.mixed_channels != channels:
            raise ValueError(
                f"With with_fc=False the mixer's output ({self.mixed_channels} channels: union={self.union!r}, "
                f"bidirectional={self.bidirectional}, hidden_size={self.hidden_size}) must equal the input's "
                f"{channels} channels."
            )
        sequence_shape = (None, None, channels)
        for rnn in (self.rnn_v, self.rnn_h):
            if rnn is not None:
                rnn.build(sequence_shape)
        if self.with_fc:
            self.fc = keras.layers.Dense(channels, name="fc", dtype=self.dtype_policy)
            self.fc.build((None, None, None, self.mixed_channels))
        self.input_spec = keras.layers.InputSpec(ndim=4, axes={-1: channels})

    def call(self, inputs, training=None):
        mixed = token_mixing.mix(self, inputs, training=training)
        return self.fc(mixed) if self.fc is not None else mixed

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_size": self.hidden_size,
                "implementation": self.implementation,
                "rnn_type": self.rnn_type,
                "bidirectional": self.bidirectional,
                "union": self.union,
                "with_fc": self.with_fc,
            }
        )
        return config
