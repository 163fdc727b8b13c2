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


# The authors' ablation and option models (okojoalg/sequencer, models/two_dim_sequencer.py and
# models/vanilla_sequencer.py), under their registered names. None has published weights.
_S = VARIANTS["s"]
_H2X = (96, 192, 192, 192)
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
        "layers": (4, 3, 8, 3),
        "patch_sizes": (14, 1, 1, 1),
        "embed_dims": (384, 384, 384, 384),
        "hidden_sizes": (192, 192, 192, 192),
        "mlp_ratios": (3.0, 3.0, 3.0, 3.0),
        "mixer": "1d",
    },
    "v_sequencer_s_h": {
        "layers": (4, 3, 8, 3),
        "patch_sizes": (7, 2, 1, 1),
        "embed_dims": (192, 384, 384, 384),
        "hidden_sizes": (96, 192, 192, 192),
        "mlp_ratios": (3.0, 3.0, 3.0, 3.0),
        "mixer": "1d",
    },
}
