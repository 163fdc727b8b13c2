"""The data tables: the checkpoint registry against weights/manifest.json and timm's pretrained configs."""

import json
import os

from conftest import REPO
import pytest

from keras_sequencer.presets import CHECKPOINTS, HUB_URL, VARIANTS, manifest, variant_config

pytestmark = pytest.mark.backend_agnostic


def test_manifest_file_matches_the_registry():
    with open(os.path.join(REPO, "weights", "manifest.json")) as f:
        assert json.load(f) == manifest()
    for c in CHECKPOINTS.values():
        assert c.url(HUB_URL).startswith("https://huggingface.co/timm/")
        assert c.sha256 is None or len(c.sha256) == 64


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_eval_settings_and_licence_are_timms(variant):
    """Each checkpoint's evaluation transform is the one timm publishes with it."""
    import timm

    checkpoint = CHECKPOINTS[variant]
    cfg = timm.create_model(f"sequencer2d_{variant}", pretrained=False).pretrained_cfg
    assert cfg["tag"] == checkpoint.tag.split(".", 1)[1] and cfg["hf_hub_id"] == checkpoint.hub_repo
    assert checkpoint.eval.input_size == cfg["input_size"][-1]
    assert checkpoint.eval.crop_pct == cfg["crop_pct"]
    assert checkpoint.eval.interpolation == cfg["interpolation"]
    assert checkpoint.eval.mean == tuple(cfg["mean"]) and checkpoint.eval.std == tuple(cfg["std"])
    assert checkpoint.license == cfg["license"]


def test_variant_config_names_and_errors():
    assert variant_config("sequencer2d_m") == variant_config("M") == VARIANTS["m"]
    with pytest.raises(ValueError, match=r"Received: variant='xl'"):
        variant_config("xl")
