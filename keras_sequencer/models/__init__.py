"""Sequencer2D models."""

from keras_sequencer.models.presets import ABLATIONS, VARIANTS, variant_config
from keras_sequencer.models.registry import create_model, feature_extractor, list_models, stage_info
from keras_sequencer.models.sequencer2d import Sequencer2D, Sequencer2DL, Sequencer2DM, Sequencer2DS
from keras_sequencer.models.sequencer2d_model import Sequencer2DModel

__all__ = [
    "ABLATIONS",
    "create_model",
    "feature_extractor",
    "list_models",
    "stage_info",
    "VARIANTS",
    "Sequencer2D",
    "Sequencer2DL",
    "Sequencer2DM",
    "Sequencer2DModel",
    "Sequencer2DS",
    "variant_config",
]
