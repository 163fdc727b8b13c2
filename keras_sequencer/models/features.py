"""Multi-scale features of a Sequencer model: every stage's output map."""

import keras

from keras_sequencer.layers import PatchEmbed, Sequencer2DBlock


def feature_extractor(model: keras.Model) -> keras.Model:
    """A multi-output model giving every stage's output feature map.

    Outputs, one per stage, are the last block's output (before the final
    LayerNorm), channels last: `(batch, H / stride, W / stride, channels)`,
    with stride the product of the patch sizes so far (7, 14, 14, 14 and
    channels 192, 384, 384, 384 for Sequencer2D-S/M/L; sizes are floored).
    The extractor shares the model's layers and weights. `stage_info(model)`
    lists `name`, `stride` and `channels` of each output.

    Args:
        model: a model of this package (classifier, headless model or
            `Sequencer2DBackbone`, built here or loaded from a file) or a
            keras-hub task whose `backbone` is a `Sequencer2DBackbone`.

    Example:
    >>> backbone = Sequencer2DS(include_top=False)
    >>> c1, c2, c3, c4 = feature_extractor(backbone)(images)
    """
    model = _graph(model)
    info = stage_info(model)
    outputs = {i["name"]: model.get_layer(i["layer"]).output for i in info}
    return keras.Model(model.input, outputs, name=f"{model.name}_features")


def _graph(model: keras.Model) -> keras.Model:
    """The functional model whose layers are the blocks: a keras-hub task's backbone, else the model itself."""
    backbone = getattr(model, "backbone", None)
    return backbone if isinstance(backbone, keras.Model) else model


def stage_info(model: keras.Model) -> list[dict]:
    """`[{"name": "stage0", "layer": ..., "stride": 7, "channels": 192}, ...]` for a Sequencer model.

    Read from the graph's structure: every `PatchEmbed` opens a stage, whose
    output is its last `Sequencer2DBlock`. Layer names play no part, so it
    holds for renamed layers and for models loaded from `.keras` files.
    """
    stride, stages = 1, []
    for layer in _graph(model).layers:
        if isinstance(layer, PatchEmbed):
            stride *= layer.patch_size
            stages.append(None)
        elif isinstance(layer, Sequencer2DBlock) and stages:
            stages[-1] = {"name": f"stage{len(stages) - 1}", "layer": layer.name, "stride": stride,
                          "channels": layer.output.shape[-1]}  # fmt: skip
    if not stages or None in stages:
        raise ValueError(
            f"Model {model.name!r} is not a Sequencer model: it has no stages of PatchEmbed followed by "
            "Sequencer2DBlock layers."
        )
    return stages
