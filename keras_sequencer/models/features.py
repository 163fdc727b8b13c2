"""Multi-scale features of a Sequencer model: every stage's output map."""

import keras

from keras_sequencer.layers import PatchEmbed


def feature_extractor(model: keras.Model) -> keras.Model:
    """A multi-output model giving every stage's output feature map.

    Outputs, one per stage, are the last block's output (before the final
    LayerNorm), channels last: `(batch, H / stride, W / stride, channels)`,
    with stride the product of the patch sizes so far (7, 14, 14, 14 and
    channels 192, 384, 384, 384 for Sequencer2D-S/M/L; sizes are floored).
    The extractor shares the model's layers and weights. `stage_info(model)`
    lists `name`, `stride` and `channels` of each output.

    Example:
    >>> backbone = Sequencer2DS(include_top=False)
    >>> c1, c2, c3, c4 = feature_extractor(backbone)(images)
    """
    info = stage_info(model)
    outputs = {i["name"]: model.get_layer(i["layer"]).output for i in info}
    return keras.Model(model.inputs, outputs, name=f"{model.name}_features")


def stage_info(model: keras.Model) -> list[dict]:
    """`[{"name": "stage0", "layer": ..., "stride": 7, "channels": 192}, ...]` for a Sequencer model."""
    stride, stages = 1, []
    for layer in model.layers:
        if isinstance(layer, PatchEmbed):
            stride *= layer.patch_size
        if layer.name.startswith("stage") and "_block" in layer.name:
            stage = int(layer.name[len("stage") : layer.name.index("_block")])
            entry = {"name": f"stage{stage}", "layer": layer.name, "stride": stride,
                     "channels": layer.output.shape[-1]}  # fmt: skip
            if stages and stages[-1]["name"] == entry["name"]:
                stages[-1] = entry  # keep the stage's last block
            else:
                stages.append(entry)
    if not stages:
        raise ValueError(f"Model {model.name!r} has no 'stage{{s}}_block{{j}}' layers: not a Sequencer model.")
    return stages
