"""BiLSTM2D: the token mixer of Sequencer2D."""

import contextlib

import keras
from keras import ops

_SHARING_KEYS = ("shared_objects/id_to_obj_map", "shared_objects/id_to_config_map")


@contextlib.contextmanager
def _outside_object_sharing():
    """Builds Keras' `Bidirectional` outside a `.keras` loading scope.

    `Bidirectional.__init__` serialises and deserialises its template layer.
    Inside Keras' object-sharing scope (active while a `.keras` file loads)
    that records the template's `id()`; once the template is freed, a later
    template at the same address is resolved to an earlier LSTM, so forward
    and backward LSTMs get mixed up (Keras 3.15: "Forward layer and backward
    layer should have different `go_backwards` value", at random). Nothing
    here is shared, so suspending the scope is safe.
    """
    try:
        from keras.src.backend.common import global_state
    except ImportError:  # a Keras without the internal module: nothing to suspend
        yield
        return
    saved = [global_state.get_global_attribute(key) for key in _SHARING_KEYS]
    for key in _SHARING_KEYS:
        global_state.set_global_attribute(key, None)
    try:
        yield
    finally:
        for key, value in zip(_SHARING_KEYS, saved, strict=True):
            global_state.set_global_attribute(key, value)


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

    Args:
        hidden_size: int, units of each directional LSTM.
        **kwargs: standard `keras.layers.Layer` arguments.

    Example:
    >>> layer = BiLSTM2D(hidden_size=48)
    >>> y = layer(keras.ops.ones((2, 8, 12, 192)))
    >>> tuple(y.shape)
    (2, 8, 12, 192)
    """

    def __init__(self, hidden_size: int, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(
                "`hidden_size` must be a positive int, the units of each "
                f"directional LSTM. Received: hidden_size={hidden_size}"
            )
        self.hidden_size = hidden_size
        self.input_spec = keras.layers.InputSpec(ndim=4)
        self.rnn_v = self._bidirectional_lstm("rnn_v")
        self.rnn_h = self._bidirectional_lstm("rnn_h")
        self.fc = None  # its width is the input's channel count, known in build()

    def _bidirectional_lstm(self, name):
        # Explicit names keep variable paths stable ("rnn_v/forward_lstm/..."),
        # whatever else the process has built; the converter relies on them.
        with _outside_object_sharing():
            lstm = keras.layers.LSTM(self.hidden_size, return_sequences=True, name="lstm", dtype=self.dtype_policy)
            return keras.layers.Bidirectional(lstm, merge_mode="concat", name=name, dtype=self.dtype_policy)

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None:
            raise ValueError(f"BiLSTM2D needs a known channel count (last axis). Received: input_shape={input_shape}")
        sequence_shape = (None, None, channels)
        self.rnn_v.build(sequence_shape)
        self.rnn_h.build(sequence_shape)
        self.fc = keras.layers.Dense(channels, name="fc", dtype=self.dtype_policy)
        self.fc.build((None, None, None, 4 * self.hidden_size))
        self.input_spec = keras.layers.InputSpec(ndim=4, axes={-1: channels})

    def call(self, inputs):
        return self.fc(self._mix(inputs))

    def _mix(self, x):
        """The two BiLSTM scans, concatenated as [v_fwd, v_bwd, h_fwd, h_bwd]."""
        batch, height, width = ops.shape(x)[0], ops.shape(x)[1], ops.shape(x)[2]
        channels = x.shape[-1]
        units = 2 * self.hidden_size
        # Vertical: one sequence of length `height` per column.
        columns = ops.reshape(ops.transpose(x, (0, 2, 1, 3)), (-1, height, channels))
        v = ops.reshape(self.rnn_v(columns), (batch, width, height, units))
        v = ops.transpose(v, (0, 2, 1, 3))
        # Horizontal: one sequence of length `width` per row.
        rows = ops.reshape(x, (-1, width, channels))
        h = ops.reshape(self.rnn_h(rows), (batch, height, width, units))
        return ops.concatenate([v, h], axis=-1)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"hidden_size": self.hidden_size})
        return config
