"""Sequencer2D models."""

from keras_sequencer.models.presets import VARIANTS, variant_config
from keras_sequencer.models.sequencer2d import Sequencer2D, Sequencer2DL, Sequencer2DM, Sequencer2DS
from keras_sequencer.models.sequencer2d_model import Sequencer2DModel

__all__ = [
    "VARIANTS",
    "Sequencer2D",
    "Sequencer2DL",
    "Sequencer2DM",
    "Sequencer2DModel",
    "Sequencer2DS",
    "variant_config",
]
