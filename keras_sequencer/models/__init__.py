"""Sequencer2D models: the builder, the variants, features and weight loading."""

from keras_sequencer.models.backbone import Sequencer2DBackbone
from keras_sequencer.models.features import feature_extractor, stage_info
from keras_sequencer.models.sequencer2d import (
    Sequencer2D,
    Sequencer2DL,
    Sequencer2DM,
    Sequencer2DS,
    create_model,
    list_models,
)
from keras_sequencer.models.sequencer2d_model import Sequencer2DModel

__all__ = [
    "Sequencer2DBackbone",
    "Sequencer2D",
    "Sequencer2DL",
    "Sequencer2DM",
    "Sequencer2DModel",
    "Sequencer2DS",
    "create_model",
    "feature_extractor",
    "list_models",
    "stage_info",
]
