"""The RNN sublayers: built correctly inside Keras' `.keras` loading scope."""

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
