"""The Keras RNN sublayers of the token mixers (`BiLSTM2D`, `BiLSTM1D`)."""

import contextlib
import sys

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


@contextlib.contextmanager
def _tensorflow_left_unimported():
    """Builds Keras' `Bidirectional` without importing TensorFlow where nothing else has.

    `Bidirectional.__init__` serialises its template layer, and Keras'
    serialiser asks whether each value is a TensorFlow shape, dtype or type
    spec, importing TensorFlow to answer (Keras 3.15). While TensorFlow is not
    imported no object can be one of its types, so the answer is no without
    the import: on the JAX and PyTorch backends a process that never uses
    TensorFlow then builds, calls, trains and saves the weights of a model
    without it (for S on a 2-core CPU: 3.0-3.5 s and about 400 MB less). The
    answer holds only while the wrappers are built (their templates are LSTM
    layers, never TensorFlow values) and is cleared afterwards, so later
    questions import TensorFlow as Keras does. On the TensorFlow backend it is
    imported already.
    """
    lazy = None
    if "tensorflow" not in sys.modules:
        try:
            from keras.src.utils import module_utils

            lazy = module_utils.tensorflow
        except (ImportError, AttributeError):  # a Keras without the internal module: nothing to answer
            pass
    if lazy is None or getattr(lazy, "_available", True) is not None:  # answered already, or another Keras
        yield
        return
    lazy._available = False
    try:
        yield
    finally:
        lazy._available = None


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
    with _outside_object_sharing(), _tensorflow_left_unimported():
        cls = getattr(keras.layers, _RNN_LAYERS[rnn_type])
        # The class, not an instance: the cell makes it in Keras' own order, so unseeded initializers draw
        # their seeds from `keras.utils.set_random_seed` as they did before.
        kwargs = {"return_sequences": True, "dtype": dtype, "recurrent_initializer": Float32Orthogonal}
        if not bidirectional:
            return cls(units, name=name, **kwargs)
        rnn = cls(units, name=rnn_type, **kwargs)
        return keras.layers.Bidirectional(rnn, merge_mode="concat", name=name, dtype=dtype)
