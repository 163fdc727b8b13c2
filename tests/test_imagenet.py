"""ImageNet helpers against timm: class index, decoding, eval transform."""

from conftest import normalise
import numpy as np
import pytest

import keras_sequencer as ks
from keras_sequencer.imagenet import load_image

pytestmark = pytest.mark.backend_agnostic


def test_class_index_matches_timm():
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    eye = np.eye(1000)
    for i in (0, 1, 281, 500, 999):
        ((wnid, name, score),) = ks.decode_predictions(eye[[i]], top=1)[0]
        assert wnid == info.index_to_label_name(i)
        assert name.replace("_", " ") == info.index_to_description(i).split(",")[0]
        assert score == 1.0


def test_decode_predictions_orders_by_score():
    preds = np.random.RandomState(0).rand(3, 1000)
    decoded = ks.decode_predictions(preds, top=4)
    assert [len(row) for row in decoded] == [4, 4, 4]
    for row, p in zip(decoded, preds, strict=True):
        scores = [s for _, _, s in row]
        assert scores == sorted(p)[::-1][:4]


def test_decode_predictions_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"Received: preds.shape=\(2, 10\)"):
        ks.decode_predictions(np.zeros((2, 10)))


@pytest.mark.parametrize("width,height", [(400, 300), (300, 451), (224, 224)])
def test_load_image_is_timms_eval_transform(tmp_path, width, height):
    from PIL import Image
    import timm

    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([xx * 255 // width, yy * 255 // height, (xx * yy) % 256], -1)
    noise = np.random.RandomState(0).randint(0, 40, rgb.shape)
    Image.fromarray(np.clip(rgb + noise, 0, 255).astype(np.uint8)).save(tmp_path / "img.png")

    model = timm.create_model("sequencer2d_s", pretrained=False)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    with Image.open(tmp_path / "img.png") as image:
        expected = transform(image.convert("RGB")).numpy().transpose(1, 2, 0)
    ours = load_image(tmp_path / "img.png")
    assert ours.shape == (224, 224, 3)
    np.testing.assert_allclose(normalise(ours.astype(np.uint8)), expected, atol=1e-5)
