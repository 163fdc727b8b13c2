"""The Sequencer2D variants, the authors' option models and the published checkpoints, as plain data.

This module imports nothing from the package: the builders, the converter,
the downloader and the data pipelines all read it, so the package's imports
flow one way (presets -> convert / pretrained -> models).
"""

import dataclasses
import os

# === Architectures ===

# Shared by every variant of the paper (Tatsunami & Taki 2022, Table 1; timm
# `sequencer2d_{s,m,l}`). The stem is a 7x7 patch embedding, stage 1 merges 2x2
# patches, stages 2 and 3 keep the resolution with a 1x1 projection.
_COMMON = {
    "patch_sizes": (7, 2, 1, 1),
    "embed_dims": (192, 384, 384, 384),
    "hidden_sizes": (48, 96, 96, 96),
    "mlp_ratios": (3.0, 3.0, 3.0, 3.0),
}

VARIANTS: dict[str, dict] = {
    "s": {"layers": (4, 3, 8, 3), **_COMMON},
    "m": {"layers": (4, 3, 14, 3), **_COMMON},
    "l": {"layers": (8, 8, 16, 4), **_COMMON},
}


# The paper's token mixer: the options of `Sequencer2D` / `BiLSTM2D` at their defaults (the ablations change them).
PAPER_MIXER = {"rnn_type": "lstm", "bidirectional": True, "union": "cat", "with_fc": True, "mixer": "2d"}


def variant_config(variant: str) -> dict:
    """Returns the architecture config of a variant ("s", "m" or "l"; "sequencer2d_s" works too)."""
    key = str(variant).lower().removeprefix("sequencer2d_").removeprefix("sequencer2d")
    if key not in VARIANTS:
        raise ValueError(
            f"`variant` must be one of {sorted(VARIANTS)} (or 'sequencer2d_s' etc.). Received: variant={variant!r}"
        )
    return dict(VARIANTS[key])


# The authors' ablation and option models (okojoalg/sequencer, models/two_dim_sequencer.py and
# models/vanilla_sequencer.py), under their registered names. None has published weights.
_S = VARIANTS["s"]
_H2X = (96, 192, 192, 192)
_VANILLA = {"layers": _S["layers"], "mlp_ratios": (3.0, 3.0, 3.0, 3.0), "mixer": "1d"}
ABLATIONS: dict[str, dict] = {
    "sequencer2d_s_unidirectional": {**_S, "bidirectional": False},
    "sequencer2d_s_add": {**_S, "union": "add"},
    "sequencer2d_s_h2x": {**_S, "hidden_sizes": _H2X},
    "sequencer2d_s_without_fc": {**_S, "with_fc": False},
    "sequencer2d_vertical": {**_S, "hidden_sizes": _H2X, "union": "vertical", "with_fc": False},
    "sequencer2d_s_horizontal": {**_S, "hidden_sizes": _H2X, "union": "horizontal", "with_fc": False},
    "gru_sequencer2d_s": {**_S, "rnn_type": "gru"},
    "rnn_sequencer2d_s": {**_S, "rnn_type": "rnn"},
    "sequencer2d_l_d4_3x": {
        **VARIANTS["l"],
        "embed_dims": (256, 512, 512, 512),
        "hidden_sizes": (64, 128, 128, 128),
    },
    # Vanilla Sequencer: one BiLSTM over the flattened tokens, no output projection.
    "v_sequencer_s": {
        **_VANILLA,
        "patch_sizes": (14, 1, 1, 1),
        "embed_dims": (384, 384, 384, 384),
        "hidden_sizes": (192, 192, 192, 192),
    },
    "v_sequencer_s_h": {
        **_VANILLA,
        **{k: _COMMON[k] for k in ("patch_sizes", "embed_dims")},
        "hidden_sizes": (96, 192, 192, 192),
    },
}

# === Evaluation settings ===


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """How a checkpoint is evaluated (timm's pretrained config): the single source for every eval transform.

    Images are resized so the short side is `int(input_size / crop_pct)`
    with `interpolation`, centre-cropped to `input_size`, scaled to [0, 1]
    and normalised with `mean` and `std` (per RGB channel).
    """

    input_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @property
    def scale_offset(self) -> tuple[list[float], list[float]]:
        """`(scale, offset)` with `x * scale + offset == (x / 255 - mean) / std` for RGB `x` in [0, 255]."""
        scale = [1.0 / (255.0 * s) for s in self.std]
        offset = [-m / s for m, s in zip(self.mean, self.std, strict=True)]
        return scale, offset


IMAGENET_EVAL = EvalConfig()

# === Checkpoints ===

HUB_URL = "https://huggingface.co"
HUB_URL_ENV = "KERAS_SEQUENCER_HUB_URL"
_RELEASE = "https://github.com/okojoalg/sequencer/releases/download/weights"


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One published checkpoint of a variant.

    Attributes:
        variant: the architecture, a key of `VARIANTS`.
        tag: timm's pretrained tag, also the cache file's name.
        hub_repo: the Hugging Face repository holding `model.safetensors`.
        sha256: of `model.safetensors`; None where no hash was published
            (keys and shapes are still checked on conversion).
        fallback_url: the authors' GitHub release (`.pth`, needs torch).
        license: the weights' licence.
        top1: ImageNet-1k top-1 at 224 as published by timm.
        eval: the evaluation transform the top-1 was measured with.
    """

    variant: str
    tag: str
    hub_repo: str
    sha256: str | None
    fallback_url: str
    license: str = "apache-2.0"
    top1: float | None = None
    eval: EvalConfig = IMAGENET_EVAL

    def url(self, base: str | None = None) -> str:
        """The file's URL on the hub, or on the mirror named by `$KERAS_SEQUENCER_HUB_URL`."""
        base = (base or os.environ.get(HUB_URL_ENV) or HUB_URL).rstrip("/")
        return f"{base}/{self.hub_repo}/resolve/main/model.safetensors"

    @property
    def filename(self) -> str:
        return f"{self.tag}.safetensors"


CHECKPOINTS: dict[str, Checkpoint] = {
    "s": Checkpoint(
        "s",
        "sequencer2d_s.in1k",
        "timm/sequencer2d_s.in1k",
        "ef70ff18ff4f615c53009fde2ffe2f00e47376858d6da329fca2017baaffa946",
        f"{_RELEASE}/sequencer2d_s.pth",
        top1=82.336,
    ),
    "m": Checkpoint(
        "m",
        "sequencer2d_m.in1k",
        "timm/sequencer2d_m.in1k",
        None,  # only the hash of pytorch_model.bin is known
        f"{_RELEASE}/sequencer2d_m.pth",
        top1=82.836,
    ),
    "l": Checkpoint(
        "l",
        "sequencer2d_l.in1k",
        "timm/sequencer2d_l.in1k",
        "4104172887d330aec2e0ab09705e09962fa2a77a475a7792e36e0d6065f231a2",
        f"{_RELEASE}/sequencer2d_l.pth",
        top1=83.406,
    ),
}


def manifest() -> dict:
    """The checkpoint registry as plain data (what `weights/manifest.json` holds)."""
    return {
        "checkpoints": [
            {
                "variant": c.variant,
                "tag": c.tag,
                "url": c.url(HUB_URL),
                "sha256": c.sha256,
                "fallback_url": c.fallback_url,
                "license": c.license,
                "imagenet_top1": c.top1,
            }
            for c in CHECKPOINTS.values()
        ]
    }
