"""The Keras RNN sublayers of the token mixers (`BiLSTM2D`, `BiLSTM1D`)."""

import contextlib

import keras

RNN_TYPES = ("lstm", "gru", "rnn")
_RNN_LAYERS = {"lstm": "LSTM", "gru": "GRU", "rnn": "SimpleRNN"}
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
class Float32Orthogonal(keras.initializers.Orthogonal):
    """Keras' orthogonal initializer computed in float32, then cast to the variable's dtype.

    The recurrent kernels' default initializer takes a QR decomposition, which
    has no bfloat16 or float16 kernel on a CPU in TensorFlow, JAX (LAPACK) or
    PyTorch: under a pure 16-bit dtype policy ("bfloat16", "float16", whose
    variables are 16-bit) Keras' own initializer cannot build the model. Other
    dtypes get `keras.initializers.Orthogonal`'s values unchanged (same seed,
    same values); 16-bit ones get its float32 values, rounded.
    """

    def __call__(self, shape, dtype=None):
        dtype = keras.backend.standardize_dtype(dtype)
        if dtype not in ("bfloat16", "float16"):
            return super().__call__(shape, dtype=dtype)
        return keras.ops.cast(super().__call__(shape, dtype="float32"), dtype)


def sequence_layer(rnn_type: str, units: int, bidirectional: bool, name: str, dtype=None):
    """A Keras LSTM / GRU / SimpleRNN returning sequences, wrapped in Bidirectional when asked.

    Explicit names keep variable paths stable (`rnn_v/forward_lstm/lstm_cell/kernel`)
    whatever else the process has built; the converter relies on them. The
    recurrent kernels start orthogonal, as Keras' default, computed in float32
    (`Float32Orthogonal`) so that 16-bit variables can be built.
    """
    with _outside_object_sharing():
        cls = getattr(keras.layers, _RNN_LAYERS[rnn_type])
        # The class, not an instance: the cell makes it in Keras' own order, so unseeded initializers draw
        # their seeds from `keras.utils.set_random_seed` as they did before.
        kwargs = {"return_sequences": True, "dtype": dtype, "recurrent_initializer": Float32Orthogonal}
        if not bidirectional:
            return cls(units, name=name, **kwargs)
        rnn = cls(units, name=rnn_type, **kwargs)
        return keras.layers.Bidirectional(rnn, merge_mode="concat", name=name, dtype=dtype)
