"""Sequencer2D ("Sequencer: Deep LSTM for Image Classification", NeurIPS 2022) for Keras 3.

Runs on the TensorFlow, JAX and PyTorch backends; pretrained ImageNet-1k
weights are converted from the reference timm checkpoints.
"""

from keras_sequencer import layers
from keras_sequencer.allocator import keep_freed_memory
from keras_sequencer.compilation_cache import enable_compilation_cache
from keras_sequencer.convert import convert_state_dict
from keras_sequencer.imagenet import decode_predictions, preprocess_input
from keras_sequencer.models import (
    Sequencer2D,
    Sequencer2DBackbone,
    Sequencer2DL,
    Sequencer2DM,
    Sequencer2DS,
    create_model,
    feature_extractor,
    list_models,
    stage_info,
)
from keras_sequencer.models.backbone import KERAS_HUB_AVAILABLE
from keras_sequencer.precision import PrecisionWarning
from keras_sequencer.presets import CHECKPOINTS
from keras_sequencer.sharing import convert_to_preset, load_preset, save_preset

if KERAS_HUB_AVAILABLE:  # keras-hub's loaders find the task classes once they are defined
    from keras_sequencer import hub  # noqa: F401

__version__ = "0.1.0"

__all__ = [
    "CHECKPOINTS",
    "PrecisionWarning",
    "Sequencer2D",
    "Sequencer2DBackbone",
    "Sequencer2DL",
    "Sequencer2DM",
    "Sequencer2DS",
    "convert_state_dict",
    "convert_to_preset",
    "create_model",
    "decode_predictions",
    "enable_compilation_cache",
    "feature_extractor",
    "keep_freed_memory",
    "layers",
    "list_models",
    "load_preset",
    "preprocess_input",
    "save_preset",
    "stage_info",
]
