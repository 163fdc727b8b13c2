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


def test_load_image_scales_16_bit_and_float_grey_and_applies_exif_rotation(tmp_path):
    from PIL import Image

    yy, xx = np.mgrid[0:120, 0:90]
    grey16 = (xx * 700 + yy * 20).astype(np.uint16)  # 0 .. 64680: Pillow's own RGB conversion clips it to white
    reference = np.round(grey16 / 257.0).astype(np.uint8)
    Image.fromarray(reference, mode="L").save(tmp_path / "grey8.png")
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as opened:
        assert opened.mode.startswith("I")
    Image.fromarray((reference / 255.0).astype(np.float32), mode="F").save(tmp_path / "float.tiff")
    expected = load_image(tmp_path / "grey8.png", size=64)
    assert expected.std() > 20  # a real gradient, not a white square
    for name in ("grey16.png", "float.tiff"):
        np.testing.assert_allclose(load_image(tmp_path / name, size=64), expected, atol=1, err_msg=name)

    # A phone photo stored sideways with EXIF orientation 6 ("rotate 90 clockwise to view") loads upright.
    upright = np.stack([xx * 2, yy * 2, np.full_like(xx, 90)], -1).astype(np.uint8)
    Image.fromarray(upright).save(tmp_path / "upright.png")
    sideways = Image.fromarray(np.rot90(upright))  # what the camera wrote
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways.save(tmp_path / "phone.jpg", exif=exif, quality=100)
    np.testing.assert_allclose(
        load_image(tmp_path / "phone.jpg", size=64), load_image(tmp_path / "upright.png", size=64),
        atol=12,
    )  # fmt: skip
