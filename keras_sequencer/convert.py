"""timm / authors' Sequencer2D checkpoints -> Keras variables, in pure NumPy.

Both published layouts are accepted:

- timm (Hugging Face hub, timm >= 0.9): `stages.{s}.blocks.{j}.*`,
  `stages.{s}.downsample.down.*`, `head.fc.*`;
- the authors' GitHub release: `blocks.{s}.{j}.*`, the downsample being the
  last module of the previous stage (`blocks.{s}.{depth_s}.down.*`), `head.*`.

The result maps Keras variable paths (as built by `Sequencer2D`) to arrays.
Every source tensor is used exactly once; anything missing, extra or of the
wrong shape raises a `ValueError` that names the key.
"""

from collections.abc import Mapping
import re

import numpy as np

from keras_sequencer.presets import VARIANTS

_LSTM_DIRECTIONS = (("", "forward_lstm"), ("_reverse", "backward_lstm"))


def _guess_variant(keys) -> str | None:
    """Names the preset whose block counts match a timm-layout key set."""
    depths = {}
    for key in keys:
        m = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", key)
        if m:
            stage, block = int(m.group(1)), int(m.group(2))
            depths[stage] = max(depths.get(stage, 0), block + 1)
    found = tuple(depths.get(s, 0) for s in range(len(depths)))
    for name, cfg in VARIANTS.items():
        if tuple(cfg["layers"]) == found:
            return f"sequencer2d_{name}"
    return f"a model with blocks per stage {found}" if found else None


def to_timm_layout(state_dict: Mapping[str, np.ndarray], layers) -> dict[str, np.ndarray]:
    """Renames an authors'-layout state_dict to timm's; a timm one passes through.

    `layers` (blocks per stage) locates the authors' downsample modules, which
    sit at index `depth` of the previous stage's block list.
    """
    if any(k.startswith("stages.") for k in state_dict):
        return dict(state_dict)
    out = {}
    for key, value in state_dict.items():
        m = re.match(r"blocks\.(\d+)\.(\d+)\.(.*)$", key)
        if m:
            stage, index, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            if stage < len(layers) and index == layers[stage] and rest.startswith("down."):
                key = f"stages.{stage + 1}.downsample.{rest}"
            else:
                key = f"stages.{stage}.blocks.{index}.{rest}"
        elif key.startswith("head.") and not key.startswith("head.fc."):
            key = "head.fc." + key[len("head.") :]
        out[key] = value
    return out


def _conv(w):  # torch (out, in, kh, kw) -> keras (kh, kw, in, out)
    return np.transpose(w, (2, 3, 1, 0))


def _linear(w):  # torch (out, in) -> keras (in, out)
    return np.transpose(w)


def _plan(config: Mapping, include_top: bool):
    """Yields (keras_path, [source keys], combine, expected source shapes)."""
    layers, patch_sizes = config["layers"], config["patch_sizes"]
    dims, hidden = config["embed_dims"], config["hidden_sizes"]
    mlp_ratios = config.get("mlp_ratios") or (3.0,) * len(layers)
    in_ch = 3
    for s, depth in enumerate(layers):
        c, h, p = dims[s], hidden[s], patch_sizes[s]
        src = "stem.proj" if s == 0 else f"stages.{s}.downsample.down"
        dst = "stem/proj" if s == 0 else f"stage{s}_downsample/proj"
        yield f"{dst}/kernel", [f"{src}.weight"], _conv, [(c, in_ch, p, p)]
        yield f"{dst}/bias", [f"{src}.bias"], None, [(c,)]
        hid_mlp = int(c * mlp_ratios[s])
        for j in range(depth):
            src, dst = f"stages.{s}.blocks.{j}", f"stage{s}_block{j}"
            for norm in ("norm1", "norm2"):
                yield f"{dst}/{norm}/gamma", [f"{src}.{norm}.weight"], None, [(c,)]
                yield f"{dst}/{norm}/beta", [f"{src}.{norm}.bias"], None, [(c,)]
            for rnn in ("rnn_v", "rnn_h"):
                for suffix, direction in _LSTM_DIRECTIONS:
                    s_rnn = f"{src}.rnn_tokens.{rnn}"
                    d_rnn = f"{dst}/rnn_tokens/{rnn}/{direction}/lstm_cell"
                    # Both frameworks order the gates [input, forget, cell, output].
                    yield f"{d_rnn}/kernel", [f"{s_rnn}.weight_ih_l0{suffix}"], _linear, [(4 * h, c)]
                    yield f"{d_rnn}/recurrent_kernel", [f"{s_rnn}.weight_hh_l0{suffix}"], _linear, [(4 * h, h)]
                    # PyTorch adds two biases where Keras has one.
                    yield (
                        f"{d_rnn}/bias",
                        [f"{s_rnn}.bias_ih_l0{suffix}", f"{s_rnn}.bias_hh_l0{suffix}"],
                        np.add,
                        [(4 * h,), (4 * h,)],
                    )
            yield f"{dst}/rnn_tokens/fc/kernel", [f"{src}.rnn_tokens.fc.weight"], _linear, [(c, 4 * h)]
            yield f"{dst}/rnn_tokens/fc/bias", [f"{src}.rnn_tokens.fc.bias"], None, [(c,)]
            yield f"{dst}/fc1/kernel", [f"{src}.mlp_channels.fc1.weight"], _linear, [(hid_mlp, c)]
            yield f"{dst}/fc1/bias", [f"{src}.mlp_channels.fc1.bias"], None, [(hid_mlp,)]
            yield f"{dst}/fc2/kernel", [f"{src}.mlp_channels.fc2.weight"], _linear, [(c, hid_mlp)]
            yield f"{dst}/fc2/bias", [f"{src}.mlp_channels.fc2.bias"], None, [(c,)]
        in_ch = c
    yield "norm/gamma", ["norm.weight"], None, [(in_ch,)]
    yield "norm/beta", ["norm.bias"], None, [(in_ch,)]
    if include_top:
        yield "predictions/kernel", ["head.fc.weight"], _linear, [(None, in_ch)]
        yield "predictions/bias", ["head.fc.bias"], None, [(None,)]


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray], config: Mapping, include_top: bool = True
) -> dict[str, np.ndarray]:
    """Converts a timm or authors' Sequencer2D state_dict to Keras variables.

    Args:
        state_dict: tensor name -> array (NumPy, or anything `np.asarray`
            takes), in either published layout; a `module.` prefix is removed.
        config: the architecture, with keys `layers`, `patch_sizes`,
            `embed_dims`, `hidden_sizes` (and optionally `mlp_ratios`), e.g.
            `keras_sequencer.presets.variant_config("s")`.
        include_top: whether to convert the classifier head. Without it the
            head tensors are accepted and left unused.

    Returns:
        Keras variable path (e.g. `"stage0_block0/norm1/gamma"`) -> float32 array.

    Raises:
        ValueError: a tensor is missing, unexpected or of the wrong shape.
    """
    sd = {k.removeprefix("module."): np.asarray(v) for k, v in state_dict.items()}
    sd = to_timm_layout(sd, config["layers"])
    unused = set(sd)
    if not include_top:
        unused -= {"head.fc.weight", "head.fc.bias"}
    out, missing = {}, []
    head_classes = None
    for path, keys, combine, shapes in _plan(config, include_top):
        absent = [k for k in keys if k not in sd]
        if absent:
            missing.extend(absent)
            continue
        arrays = []
        for key, expected in zip(keys, shapes, strict=True):
            value = sd[key]
            if key == "head.fc.weight":
                head_classes = value.shape[0]
            if key == "head.fc.bias":
                expected = (head_classes,)
            if len(value.shape) != len(expected) or any(
                e is not None and e != a for e, a in zip(expected, value.shape, strict=False)
            ):
                raise ValueError(
                    f"Checkpoint tensor '{key}' has shape {tuple(value.shape)}, but this "
                    f"architecture needs {tuple(expected)}. Is the checkpoint for another "
                    f"variant? It looks like {_guess_variant(sd) or 'an unknown model'}."
                )
            arrays.append(value.astype(np.float32))
            unused.discard(key)
        value = combine(*arrays) if combine is not None else arrays[0]
        out[path] = np.ascontiguousarray(value, dtype=np.float32)
    if missing or unused:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {sorted(missing)[:3]})")
        if unused:
            parts.append(f"{len(unused)} unexpected (first: {sorted(unused)[:3]})")
        raise ValueError(
            "The checkpoint does not match this Sequencer2D architecture: "
            + "; ".join(parts)
            + f". It looks like {_guess_variant(sd) or 'no Sequencer2D checkpoint'}; "
            f"the model has layers={tuple(config['layers'])}."
        )
    return out
