"""SavedModel export: reloaded by TensorFlow, it serves any batch with Keras' numbers."""

from conftest import IN_PROCESS_CONVERTERS, random_images, tiny_model, to_numpy
import numpy as np

from keras_sequencer.export import export

pytestmark = IN_PROCESS_CONVERTERS


def test_saved_model_reloads_and_serves_any_batch(tmp_path):
    import tensorflow as tf

    model = tiny_model(input_shape=(32, 32, 3))
    export(model, str(tmp_path / "saved"), format="saved_model")
    reloaded = tf.saved_model.load(str(tmp_path / "saved"))
    for batch in (1, 4):
        images = random_images(batch, 32, seed=batch)
        np.testing.assert_allclose(
            reloaded.serve(images).numpy(), to_numpy(model.predict_on_batch(images)), rtol=0, atol=1e-5
        )
