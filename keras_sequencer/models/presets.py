"""The Sequencer2D variants as data: one row per registered model."""

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


def variant_config(variant: str) -> dict:
    """Returns the architecture config of a variant ("s", "m" or "l")."""
    key = str(variant).lower().removeprefix("sequencer2d_").removeprefix("sequencer2d")
    if key not in VARIANTS:
        raise ValueError(
            f"`variant` must be one of {sorted(VARIANTS)} (or 'sequencer2d_s' etc.). Received: variant={variant!r}"
        )
    return dict(VARIANTS[key])
