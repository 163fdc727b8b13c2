"""Loading weights into a built model: checkpoints in every format, Keras files, strictness."""

from conftest import TINY, authors_layout, normalise, timm_logits, timm_state_dict, to_numpy
import numpy as np
import pytest

import keras_sequencer as ks
from keras_sequencer.models.weights import assign
from keras_sequencer.presets import variant_config
from keras_sequencer.pretrained import read_checkpoint


def _images(h=56, w=84, n=2, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (n, h, w, 3)).astype(np.uint8)


def test_checkpoint_and_keras_weights_files_load(tmp_path):
    """A timm `.safetensors` (given as a PathLike) gives timm's logits; its `.weights.h5` reloads every array."""
    from safetensors.numpy import save_file

    save_file(timm_state_dict("s"), tmp_path / "timm.safetensors")
    images = _images(seed=1)
    from_safetensors = ks.Sequencer2DS(weights=tmp_path / "timm.safetensors", classifier_activation=None)
    np.testing.assert_allclose(
        to_numpy(from_safetensors.predict_on_batch(images.astype("float32"))),
        timm_logits("s", normalise(images)),
        atol=1e-5,
    )
    from_safetensors.save_weights(tmp_path / "s.weights.h5")
    from_h5 = ks.Sequencer2DS(weights=str(tmp_path / "s.weights.h5"), classifier_activation=None)
    for a, b in zip(from_h5.weights, from_safetensors.weights, strict=True):
        assert a.path == b.path
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b), err_msg=a.path)


@pytest.mark.backend_agnostic
def test_pytorch_checkpoint_in_the_authors_layout_reads_like_the_safetensors(tmp_path):
    """The authors' `.pth` release (wrapped in {"model": ...}, `blocks.*` keys) converts to the same arrays."""
    from safetensors.numpy import save_file
    import torch

    sd = timm_state_dict("s")
    config = variant_config("s")
    save_file(sd, tmp_path / "timm.safetensors")
    wrapped = {"model": {k: torch.from_numpy(v) for k, v in authors_layout(sd, config["layers"]).items()}}
    torch.save(wrapped, tmp_path / "a.pth")
    from_pth = ks.convert_state_dict(read_checkpoint(tmp_path / "a.pth"), config)
    from_safetensors = ks.convert_state_dict(read_checkpoint(str(tmp_path / "timm.safetensors")), config)
    assert from_pth.keys() == from_safetensors.keys()
    for key in from_pth:
        np.testing.assert_array_equal(from_pth[key], from_safetensors[key], err_msg=key)


def test_weights_file_of_another_architecture_is_rejected(tmp_path):
    source = ks.Sequencer2D(**TINY, classes=5)
    source.save_weights(tmp_path / "tiny.weights.h5")
    path = str(tmp_path / "tiny.weights.h5")
    # Keras alone would load a prefix of a deeper model's file without a word.
    for layers in ((3, 1, 1), (1, 1, 1)):
        with pytest.raises(ValueError, match="another architecture"):
            ks.Sequencer2D(**{**TINY, "layers": layers}, classes=5, weights=path)
    with pytest.raises(ValueError, match="another architecture"):
        ks.Sequencer2D(**TINY, classes=6, weights=path)
    # A headless model takes the file's body and leaves the head.
    headless = ks.Sequencer2D(**TINY, include_top=False, weights=path)
    for a, b in zip(headless.weights, source.weights[: len(headless.weights)], strict=True):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


def test_weights_file_of_the_same_shapes_in_another_order_is_rejected(tmp_path):
    from keras_sequencer.models.weights import save_weights

    # Stages 1 and 2 of TINY have equal widths: depths (2, 1, 2) and (2, 2, 1) give the same multiset of shapes.
    source = ks.Sequencer2D(**{**TINY, "layers": (2, 1, 2)}, classes=5)
    source.save_weights(tmp_path / "plain.weights.h5")  # Keras' own file: layer order and shapes only
    with pytest.raises(ValueError, match=r"another architecture.*'layers/sequencer2d_block_1/.*' is \(16,"):
        ks.Sequencer2D(**{**TINY, "layers": (1, 2, 2)}, classes=5, weights=str(tmp_path / "plain.weights.h5"))
    # The same shapes in the same order: only the file's recorded architecture tells them apart.
    save_weights(source, str(tmp_path / "ours.weights.h5"), {**TINY, "layers": (2, 1, 2)})
    with pytest.raises(
        ValueError, match=r"saved from a Sequencer2D with layers=\(2, 1, 2\); model .* layers=\(2, 2, 1\)"
    ):
        ks.Sequencer2D(**{**TINY, "layers": (2, 2, 1)}, classes=5, weights=str(tmp_path / "ours.weights.h5"))
    same = ks.Sequencer2D(**{**TINY, "layers": (2, 1, 2)}, classes=5, weights=str(tmp_path / "ours.weights.h5"))
    for a, b in zip(same.weights, source.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


def test_a_weights_path_starting_with_a_tilde_is_the_home_folder(tmp_path, monkeypatch):
    source = ks.Sequencer2D(**TINY, classes=5)
    source.save_weights(tmp_path / "tiny.weights.h5")
    monkeypatch.setenv("HOME", str(tmp_path))
    loaded = ks.Sequencer2D(**TINY, classes=5, weights="~/tiny.weights.h5")
    for a, b in zip(loaded.weights, source.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


def test_assign_is_strict():
    model = ks.Sequencer2D(**TINY, classes=5)
    variables = {v.path: np.zeros(v.shape, "float32") for v in model.weights}
    first = next(iter(variables))
    with pytest.raises(ValueError, match=r"missing \['" + first):
        assign(model, {k: v for k, v in variables.items() if k != first})
    with pytest.raises(ValueError, match=r"unexpected \['extra/kernel'\]"):
        assign(model, {**variables, "extra/kernel": np.zeros(1, "float32")})
    with pytest.raises(ValueError, match=f"Weight '{first}' .* the checkpoint gives \\(1,\\)"):
        assign(model, {**variables, first: np.zeros(1, "float32")})
