"""The RNN sublayers: built correctly inside Keras' `.keras` loading scope, and without importing TensorFlow."""

import json

from conftest import BACKEND, ONE_BLOCK, run_python
import pytest

from keras_sequencer.layers import BiLSTM2D


def test_bilstm2d_survives_keras_object_sharing_scope():
    """Regression: built inside the scope Keras uses while loading a `.keras` file,
    Bidirectional used to resolve a freed template's recycled id() to another LSTM."""
    from keras.src.saving.serialization_lib import ObjectSharingScope

    with ObjectSharingScope():
        for _ in range(100):
            layer = BiLSTM2D(2)
            for bidirectional in (layer.rnn_v, layer.rnn_h):
                assert bidirectional.backward_layer.go_backwards
                assert not bidirectional.forward_layer.go_backwards


_WITHOUT_TENSORFLOW = """
import json, os, sys
import numpy as np, keras
import keras_sequencer as ks

def build():  # unseeded: Keras' `set_random_seed` seeds TensorFlow too, importing it
    return ks.Sequencer2D(**json.loads({arch!r}), classes=4, input_shape=(16, 24, 3), classifier_activation=None)

x = np.random.RandomState(0).uniform(0, 255, (2, 16, 24, 3)).astype("float32")
model = build()
model.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
model.train_on_batch(x, np.array([0, 3]))
logits = keras.ops.convert_to_numpy(model.predict_on_batch(x))
weights = os.path.join({folder!r}, "m.weights.h5")
model.save_weights(weights)
print("TENSORFLOW IMPORTED", "tensorflow" in sys.modules)

import tensorflow as tf  # from here on Keras' serialiser recognises its types again
from keras.src.saving import serialization_lib

assert serialization_lib.serialize_keras_object(tf.TensorShape([2, 3])) == [2, 3]
again = build()
assert again.get_config() == model.get_config()
again.load_weights(weights)
np.testing.assert_array_equal(keras.ops.convert_to_numpy(again.predict_on_batch(x)), logits)
print("SAME AFTER IMPORTING TENSORFLOW")
"""


@pytest.mark.skipif(BACKEND == "tensorflow", reason="on the TensorFlow backend Keras imports TensorFlow itself")
def test_a_model_builds_predicts_and_trains_without_importing_tensorflow(tmp_path):
    """Keras' `Bidirectional` serialises its template layer, and Keras' serialiser imports TensorFlow to ask
    whether a value is one of its types; the sublayers are built so that a JAX or PyTorch process that never
    uses TensorFlow builds, runs, trains and saves the weights of a model without it (a fresh process: here
    other tests have imported it). Once TensorFlow is imported the serialiser answers as before, and a model
    built then takes the saved weights and gives the same outputs."""
    out = run_python(_WITHOUT_TENSORFLOW.format(arch=json.dumps(ONE_BLOCK), folder=str(tmp_path)))
    assert "TENSORFLOW IMPORTED False" in out, out
    assert "SAME AFTER IMPORTING TENSORFLOW" in out, out
