"""BiLSTM1D: the token mixer of the paper's Vanilla Sequencer."""

import keras
from keras import ops

from keras_sequencer.layers.rnn import RNN_TYPES, sequence_layer


@keras.saving.register_keras_serializable(package="keras_sequencer")
class BiLSTM1D(keras.layers.Layer):
    """Reads all tokens of a feature map as ONE sequence with a bidirectional RNN.

    The `(batch, height, width, channels)` map is flattened row by row into
    `height * width` tokens, run through `Bidirectional(LSTM)` (or a GRU /
    SimpleRNN, or forward only) and reshaped back; there is no output
    projection, so `(2 if bidirectional else 1) * hidden_size` must equal the
    channel count. This is the Vanilla Sequencer ablation of the paper (the
    authors' `VanillaSequencerBlock` with their `LSTM` module).

    Args:
        hidden_size: int, units of each directional RNN.
        rnn_type: `"lstm"`, `"gru"` or `"rnn"`.
        bidirectional: bool.
        **kwargs: standard `keras.layers.Layer` arguments.
    """

    def __init__(self, hidden_size: int, rnn_type: str = "lstm", bidirectional: bool = True, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(f"`hidden_size` must be a positive int. Received: hidden_size={hidden_size}")
        if rnn_type not in RNN_TYPES:
            raise ValueError(f"`rnn_type` must be one of {RNN_TYPES}. Received: rnn_type={rnn_type!r}")
        self.hidden_size = hidden_size
        self.rnn_type = rnn_type
        self.bidirectional = bool(bidirectional)
        self.input_spec = keras.layers.InputSpec(ndim=4)
        self.rnn = sequence_layer(rnn_type, hidden_size, self.bidirectional, name="rnn", dtype=self.dtype_policy)

    def build(self, input_shape):
        channels = input_shape[-1]
        out = (2 if self.bidirectional else 1) * self.hidden_size
        if channels != out:
            raise ValueError(
                f"BiLSTM1D has no output projection: its {out} output channels (hidden_size={self.hidden_size}, "
                f"bidirectional={self.bidirectional}) must equal the input's {channels}."
            )
        self.rnn.build((None, None, channels))

    def call(self, inputs, training=None):
        batch, height, width = ops.shape(inputs)[0], ops.shape(inputs)[1], ops.shape(inputs)[2]
        channels = inputs.shape[-1]
        tokens = self.rnn(ops.reshape(inputs, (batch, -1, channels)), training=training)
        return ops.reshape(tokens, (batch, height, width, channels))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"hidden_size": self.hidden_size, "rnn_type": self.rnn_type, "bidirectional": self.bidirectional})
        return config
