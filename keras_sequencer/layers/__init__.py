"""The layers Sequencer2D is built from."""

from keras_sequencer.layers.bilstm1d import BiLSTM1D
from keras_sequencer.layers.bilstm2d import BiLSTM2D
from keras_sequencer.layers.patch_embed import PatchEmbed
from keras_sequencer.layers.sequencer2d_block import Sequencer2DBlock
from keras_sequencer.layers.stochastic_depth import StochasticDepth

__all__ = ["BiLSTM1D", "BiLSTM2D", "PatchEmbed", "Sequencer2DBlock", "StochasticDepth"]
