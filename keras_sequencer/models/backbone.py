"""Sequencer2DBackbone: the architecture from images to the normalised token map, as one config-serialisable model.

Every model of the package is built on it: `Sequencer2D` (and so the S/M/L
functions and the ablations) adds its pooling and head to a backbone's output,
`feature_extractor` reads the stage outputs a backbone records, and presets
store a backbone's config. When keras-hub is installed the class is a
`keras_hub.models.Backbone`, so keras-hub's `from_preset`, `save_to_preset` and
`ImageClassifier` take it; without keras-hub it is a plain functional
`keras.Model` with the same config and weights layout.
"""

import importlib.util
import math
import warnings

import keras

from keras_sequencer.layers import PatchEmbed, Sequencer2DBlock, token_mixing
from keras_sequencer.models.sequencer2d_model import SequencerInputs
from keras_sequencer.presets import IMAGENET_EVAL


def _keras_hub_backbone():
    """keras-hub's Backbone class when keras-hub is installed and imports, else None."""
    if importlib.util.find_spec("keras_hub") is None:
        return None
    try:
        from keras_hub.models import Backbone
    except ImportError:  # hidden or half installed: the core package works without it
        return None
    except Exception as error:  # noqa: BLE001 (a broken install must not break this package's import)
        warnings.warn(
            f"keras-hub is installed but does not import ({type(error).__name__}: {error}); Sequencer2DBackbone is a "
            "plain keras.Model and keras_sequencer.hub is unavailable. Reinstall keras-hub to use them.",
            stacklevel=2,
        )
        return None
    return Backbone


_HubBackbone = _keras_hub_backbone()
KERAS_HUB_AVAILABLE = _HubBackbone is not None


def validate_architecture(
    *,
    layers,
    patch_sizes,
    embed_dims,
    hidden_sizes,
    mlp_ratios,
    layer_norm_epsilon,
    implementation,
    image_shape,
    runs_here=True,
):
    """Raises a ValueError naming the argument unless these describe a Sequencer2D that can be built.

    `runs_here`: whether `implementation` must also run on this backend (see
    `token_mixing.check_implementation`). The builders check it; the backbone
    itself does not, so a config saved with another backend's native path
    still loads (and exports); calling such a model raises.
    """
    arch = {
        "layers": layers,
        "patch_sizes": patch_sizes,
        "embed_dims": embed_dims,
        "hidden_sizes": hidden_sizes,
        "mlp_ratios": mlp_ratios,
    }
    for arg, value in arch.items():
        if not isinstance(value, (list, tuple)) or len(value) == 0:
            raise ValueError(f"`{arg}` must be a non-empty list, one entry per stage. Received: {arg}={value!r}")
    for arg in ("layers", "patch_sizes", "embed_dims", "hidden_sizes"):
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in arch[arg]):
            raise ValueError(f"`{arg}` must hold positive ints, one per stage. Received: {arg}={arch[arg]!r}")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in mlp_ratios):
        raise ValueError(f"`mlp_ratios` must hold positive numbers. Received: mlp_ratios={mlp_ratios!r}")
    if not isinstance(layer_norm_epsilon, int | float) or not layer_norm_epsilon > 0:
        raise ValueError(
            f"`layer_norm_epsilon` must be a positive number. Received: layer_norm_epsilon={layer_norm_epsilon!r}"
        )
    lengths = {arg: len(value) for arg, value in arch.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(
            "`layers`, `patch_sizes`, `embed_dims`, `hidden_sizes` and `mlp_ratios` must all have "
            "one entry per stage. Received: " + ", ".join(f"{k}={v!r}" for k, v in arch.items())
        )
    token_mixing.check_implementation(implementation, runs_here=runs_here)
    if image_shape is not None:
        image_shape = tuple(image_shape)
        if len(image_shape) != 3:
            raise ValueError(
                "`input_shape` must be (height, width, channels), channels last; use None "
                f"for a size that may vary. Received: input_shape={image_shape}"
            )
        min_side = math.prod(patch_sizes)
        for side in image_shape[:2]:
            if side is not None and side < min_side:
                raise ValueError(
                    f"Images must be at least {min_side}x{min_side} pixels (the product of "
                    f"`patch_sizes`). Received: input_shape={image_shape}"
                )


@keras.saving.register_keras_serializable(package="keras_sequencer")
class Sequencer2DBackbone(SequencerInputs, _HubBackbone or keras.Model):
    """Sequencer2D without its head: images to the normalised token map `(batch, H/14, W/14, channels)`.

    The patch-embedding stem, the stages of `Sequencer2DBlock`s (each stage
    after the first opening with a patch-merging projection) and the final
    LayerNorm. Config-serialisable: `from_config(get_config())` rebuilds it,
    and a keras-hub preset stores exactly this config. While it is built it
    records every stage's output in `stage_outputs` (the last block of each
    stage, before the final LayerNorm).

    With keras-hub installed this is a `keras_hub.models.Backbone`: it loads
    through `keras_hub.models.Backbone.from_preset(path)` (after
    `import keras_sequencer`, which registers it) and is the backbone of
    `keras_sequencer.hub.Sequencer2DImageClassifier`.

    Args:
        layers, patch_sizes, embed_dims, hidden_sizes, mlp_ratios: the
            architecture, one entry per stage (see `Sequencer2D`).
        image_shape: `(height, width, channels)`; the default
            `(None, None, 3)` takes any size of at least the product of
            `patch_sizes`.
        include_preprocessing: if True the backbone takes RGB in [0, 255] and
            normalises with the ImageNet mean and std itself; if False (the
            keras-hub way, where the preprocessor normalises) it takes
            normalised images.
        drop_path_rate, layer_norm_epsilon, implementation, rnn_type,
            bidirectional, union, with_fc, mixer: as in `Sequencer2D`.
        input_tensor: optional Keras tensor to build on (not part of the
            config, as in `keras.applications`).
        dtype: dtype policy of every layer; None for the global policy.

    Example:
    >>> backbone = Sequencer2DBackbone(**keras_sequencer.presets.variant_config("s"))
    >>> backbone(np.zeros((1, 224, 224, 3))).shape
    (1, 16, 16, 384)
    """

    # Channels-last whatever Keras' global `image_data_format` (keras-hub's image tasks read this attribute to
    # pool the backbone's output over the right axes).
    data_format = "channels_last"

    def __init__(
        self,
        layers,
        patch_sizes,
        embed_dims,
        hidden_sizes,
        mlp_ratios=None,
        image_shape=(None, None, 3),
        include_preprocessing: bool = False,
        drop_path_rate: float = 0.0,
        layer_norm_epsilon: float = 1e-6,
        implementation: str = "auto",
        rnn_type: str = "lstm",
        bidirectional: bool = True,
        union: str = "cat",
        with_fc: bool = True,
        mixer: str = "2d",
        input_tensor=None,
        dtype=None,
        **kwargs,
    ):
        if mlp_ratios is None:
            mlp_ratios = (3.0,) * (len(layers) if isinstance(layers, (list, tuple)) else 0)
        validate_architecture(
            layers=layers,
            patch_sizes=patch_sizes,
            embed_dims=embed_dims,
            hidden_sizes=hidden_sizes,
            mlp_ratios=mlp_ratios,
            layer_norm_epsilon=layer_norm_epsilon,
            implementation=implementation,
            image_shape=image_shape,
            runs_here=False,
        )
        image_shape = (None, None, 3) if image_shape is None else tuple(image_shape)

        # === Input ===
        if input_tensor is None:
            inputs = keras.Input(shape=image_shape, name="images")
        elif keras.backend.is_keras_tensor(input_tensor):
            inputs = input_tensor
        else:
            inputs = keras.Input(tensor=input_tensor, shape=image_shape, name="images")

        # === Layers ===
        x = inputs
        if include_preprocessing:
            if x.shape[-1] != 3:
                raise ValueError(
                    "`include_preprocessing=True` normalises RGB images and needs 3 channels; "
                    f"pass include_preprocessing=False for other inputs. Received: input_shape={tuple(x.shape[1:])}"
                )
            x = keras.layers.Normalization(
                mean=[255.0 * m for m in IMAGENET_EVAL.mean],
                variance=[(255.0 * s) ** 2 for s in IMAGENET_EVAL.std],
                name="preprocessing",
                dtype=dtype,
            )(x)
        stage_outputs = {}
        total_blocks, block_index = sum(layers), 0
        for stage, depth in enumerate(layers):
            x = PatchEmbed(
                embed_dims[stage],
                patch_sizes[stage],
                name="stem" if stage == 0 else f"stage{stage}_downsample",
                dtype=dtype,
            )(x)
            for block in range(depth):
                # The authors' linear ramp; timm uses one rate for all blocks.
                rate = drop_path_rate * block_index / max(total_blocks - 1, 1)
                x = Sequencer2DBlock(
                    hidden_sizes[stage],
                    mlp_ratio=mlp_ratios[stage],
                    drop_path_rate=rate,
                    layer_norm_epsilon=layer_norm_epsilon,
                    implementation=implementation,
                    rnn_type=rnn_type,
                    bidirectional=bidirectional,
                    union=union,
                    with_fc=with_fc,
                    mixer=mixer,
                    name=f"stage{stage}_block{block}",
                    dtype=dtype,
                )(x)
                block_index += 1
            stage_outputs[f"stage{stage}"] = x
        x = keras.layers.LayerNormalization(epsilon=layer_norm_epsilon, name="norm", dtype=dtype)(x)

        # === Functional Model ===
        model_inputs = keras.utils.get_source_inputs(input_tensor) if input_tensor is not None else inputs
        super().__init__(inputs=model_inputs, outputs=x, **kwargs)
        if dtype is not None:  # what keras-hub's Backbone does with it; Keras' functional model ignores it
            self.dtype_policy = keras.dtype_policies.get(dtype)
        self._init_inputs()

        # === Config ===
        self._stage_outputs = stage_outputs
        self.layers_per_stage = tuple(layers)
        self.patch_sizes = tuple(patch_sizes)
        self.embed_dims = tuple(embed_dims)
        self.hidden_sizes = tuple(hidden_sizes)
        self.mlp_ratios = tuple(float(r) for r in mlp_ratios)
        self.image_shape = image_shape
        self.include_preprocessing = include_preprocessing
        self.drop_path_rate = drop_path_rate
        self.layer_norm_epsilon = layer_norm_epsilon
        self.implementation = implementation
        self.rnn_type = rnn_type
        self.bidirectional = bidirectional
        self.union = union
        self.with_fc = with_fc
        self.mixer = mixer

    @property
    def stage_outputs(self) -> dict:
        """`{"stage0": tensor, ...}`: each stage's last block output (symbolic), before the final LayerNorm."""
        return dict(self._stage_outputs)  # a plain dict (Keras tracks the attribute's own dict)

    @property
    def architecture(self) -> dict:
        """The five per-stage lists, as `Sequencer2D` and the registry (`presets.VARIANTS`) spell them."""
        return {
            "layers": self.layers_per_stage,
            "patch_sizes": self.patch_sizes,
            "embed_dims": self.embed_dims,
            "hidden_sizes": self.hidden_sizes,
            "mlp_ratios": self.mlp_ratios,
        }

    def get_config(self):
        if _HubBackbone is not None:
            config = super().get_config()  # name, trainable, dtype (keras-hub's fields)
        else:
            config = {
                "name": self.name,
                "trainable": self.trainable,
                "dtype": keras.dtype_policies.serialize(self.dtype_policy),
            }
        config.update(
            {
                **{k: list(v) for k, v in self.architecture.items()},
                "image_shape": list(self.image_shape),
                "include_preprocessing": self.include_preprocessing,
                "drop_path_rate": self.drop_path_rate,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "implementation": self.implementation,
                "rnn_type": self.rnn_type,
                "bidirectional": self.bidirectional,
                "union": self.union,
                "with_fc": self.with_fc,
                "mixer": self.mixer,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config.get("dtype"), dict):
            config["dtype"] = keras.dtype_policies.deserialize(config["dtype"])
        return cls(**config)
