"""Sequencer2D models."""

from keras_sequencer.models.presets import VARIANTS, variant_config
from keras_sequencer.models.sequencer2d import Sequencer2D, Sequencer2DL, Sequencer2DM, Sequencer2DS

__all__ = ["VARIANTS", "Sequencer2D", "Sequencer2DL", "Sequencer2DM", "Sequencer2DS", "variant_config"]
