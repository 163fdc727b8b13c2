"""The converter, on its own: both published layouts, strictness, and errors that name the key."""

from conftest import authors_layout, timm_state_dict
import numpy as np
import pytest

import keras_sequencer as ks
from keras_sequencer.convert import to_timm_layout
from keras_sequencer.presets import variant_config

pytestmark = pytest.mark.backend_agnostic


@pytest.mark.parametrize("variant", ["s", "m", "l"])
def test_both_layouts_convert_identically(variant):
    config = variant_config(variant)
    sd = timm_state_dict(variant)
    a = ks.convert_state_dict(sd, config)
    b = ks.convert_state_dict(authors_layout(sd, config["layers"]), config)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_authors_layout_renames_to_timms():
    sd = timm_state_dict("s")
    layers = variant_config("s")["layers"]
    assert to_timm_layout(authors_layout(sd, layers), layers).keys() == sd.keys()


def test_missing_extra_and_misshapen_tensors_are_named():
    config = variant_config("s")
    sd = timm_state_dict("s")
    with pytest.raises(ValueError, match=r"1 missing \(first: \['norm.weight'\]\)"):
        ks.convert_state_dict({k: v for k, v in sd.items() if k != "norm.weight"}, config)
    with pytest.raises(ValueError, match=r"1 unexpected \(first: \['extra.weight'\]\)"):
        ks.convert_state_dict({**sd, "extra.weight": np.zeros(1)}, config)
    with pytest.raises(ValueError, match=r"'stem.proj.bias' has shape \(7,\).*It looks like sequencer2d_s"):
        ks.convert_state_dict({**sd, "stem.proj.bias": np.zeros(7)}, config)
    # Without the head, its tensors are accepted and left unused; a `module.` prefix is removed.
    converted = ks.convert_state_dict({f"module.{k}": v for k, v in sd.items()}, config, include_top=False)
    assert not any(k.startswith("predictions") for k in converted)
