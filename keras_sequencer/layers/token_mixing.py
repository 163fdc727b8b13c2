"""Every forward path of `BiLSTM2D`'s token mixing, and the one place that chooses among them.

A path maps a channels-last feature map `(batch, height, width, channels)` to
the mixed tokens `[v_fwd, v_bwd, h_fwd, h_bwd]` before the output projection.
All paths read the same Keras variables (those of the layer's
`Bidirectional(LSTM)` sublayers), so every checkpoint and `.keras` file runs
on each of them:

- `"keras"`: the `Bidirectional(LSTM)` sublayers as composed Keras layers
  (cuDNN on a GPU with TensorFlow or PyTorch); the only path for the
  paper's ablation options (GRU, forward-only, `union="add"`, ...).
- `"unrolled"`: the fused recurrence: one matmul projects the input of all
  four directional LSTMs, then they advance together, one batched recurrent
  matmul per step, unrolled in Python. Backend-neutral (`keras.ops`).
- `"scan"`: the same recurrence in one loop. On TensorFlow and JAX it has a
  hand-written backward pass (`mix_scan_trainable`): it trains, under XLA
  too, and builds its training graph in about half the time of the Keras
  LSTMs; it steps as fast on a JAX CPU (what "auto" trains through on JAX)
  and slower on a TensorFlow CPU; TensorFlow inference (`training=False`)
  keeps the projected `ops.scan`, which XLA compiles fast. On PyTorch it is
  the projected `ops.scan`.
- `"torch"`: PyTorch's own LSTM kernel (`torch.lstm`: a C++ loop on a CPU,
  cuDNN on a GPU), what timm runs. PyTorch backend only; differentiable.
- `"tensorflow"`: TensorFlow's own LSTM kernel (`BlockLSTMV2`: one op per
  direction, a C++ loop over the steps, and one op for its gradient), any
  height and width. TensorFlow backend only, not under XLA. Builds the
  training graph of S in less than half the time of Keras' LSTM loops and
  steps as fast.
- `"tflite_unrolled"` (export only, via `use_path`): the recurrence written
  out step by step in TensorFlow ops laid out for TFLite's XNNPACK delegate:
  per step one `BATCH_MATMUL` for the four directions (for each pair on
  non-square maps), no per-step slicing (see `mix_tflite_unrolled`);
  `"tflite_unrolled_int8"`: the same with one `FULLY_CONNECTED` per
  direction, for full-int8 files.
- `"tflite_lstm"` (export only, via `use_path`): one TensorFlow function per
  direction carrying the interface attributes that TensorFlow's TFLite
  converter fuses into `UNIDIRECTIONAL_SEQUENCE_LSTM` kernels.

`implementation=` of the layer names a path, or `"fused"` (`"scan"` for
inference on TensorFlow, else `"unrolled"`), or `"auto"` (see `choose_path`).
Exporters select a lowering for a whole model with `use_path`.
"""

import contextlib
import contextvars
import functools
import uuid

import keras
from keras import ops
import numpy as np

from keras_sequencer.layers import eager_torch

PATHS = ("keras", "unrolled", "scan", "torch", "tensorflow")
EXPORT_PATHS = ("tflite_unrolled", "tflite_unrolled_int8", "tflite_lstm")
IMPLEMENTATIONS = ("auto", "fused", *PATHS)
# Paths that run one backend's own LSTM kernel, named after that backend: path -> the framework's name.
NATIVE_PATHS = {"torch": "PyTorch", "tensorflow": "TensorFlow"}

_FORCED_PATH = contextvars.ContextVar("keras_sequencer_token_mixing_path", default=None)


@contextlib.contextmanager
def use_path(path: str):
    """Within this block every `BiLSTM2D` mixes tokens with `path` (one of `PATHS` or `EXPORT_PATHS`).

    For exporters tracing a model: the layers' own `implementation` is
    ignored; layers with an ablation option, which only the `"keras"` path
    implements, keep that path.
    """
    if path not in PATHS + EXPORT_PATHS:
        raise ValueError(f"`path` must be one of {PATHS + EXPORT_PATHS}. Received: path={path!r}")
    if path in NATIVE_PATHS:
        check_implementation(path)  # one backend only
    token = _FORCED_PATH.set(path)
    try:
        yield
    finally:
        _FORCED_PATH.reset(token)


@functools.cache  # asked on every call of every block; the answer is fixed per process
def jax_on_accelerator() -> bool:
    """Whether this process runs Keras on JAX with a GPU or TPU as JAX's default device."""
    from keras_sequencer.precision import on_accelerator

    return keras.backend.backend() == "jax" and on_accelerator("jax")


@functools.cache  # asked on every call of every block; the answer is fixed per process
def gpu_backs_keras_lstm() -> bool:
    """Whether Keras' own LSTM would run on cuDNN here (TensorFlow or PyTorch with a visible GPU).

    On a JAX GPU Keras 3.15 calls cuDNN too (through `jax.experimental.rnn`), but JAX answers False: its
    inference keeps the unrolled fused steps there and training takes the scan (`jax_on_accelerator`); how
    the unrolled steps compare with cuDNN for inference on a GPU is not measured yet."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_logical_devices("GPU"))
    if backend == "torch":
        import torch

        return torch.cuda.is_available()
    return False


def check_implementation(implementation: str, standard: bool = True, runs_here: bool = True) -> None:
    """Raises a ValueError naming the problem unless `implementation` is valid (and, with `runs_here`, can run
    on this process' backend).

    `standard`: whether the mixer is the paper's (bidirectional LSTMs,
    union "cat", with the output projection); the fused paths implement
    only that one. Layers and the backbone pass `runs_here=False`: a `.keras` file saved with
    `implementation="torch"` (or `"tensorflow"`) still loads elsewhere (and
    exports, which choose their own path); calling it there raises.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"`implementation` must be one of {IMPLEMENTATIONS}. Received: implementation={implementation!r}"
        )
    if runs_here and implementation in NATIVE_PATHS and keras.backend.backend() != implementation:
        name = NATIVE_PATHS[implementation]
        raise ValueError(
            f"implementation={implementation!r} runs {name}'s LSTM kernel and needs the {name} backend "
            f"(KERAS_BACKEND={implementation}); this process uses {keras.backend.backend()!r}. "
            f"Use 'auto' on any backend. Received: implementation={implementation!r}"
        )
    if implementation not in ("auto", "keras") and not standard:
        raise ValueError(
            f"implementation={implementation!r} implements the paper's mixer (bidirectional LSTMs, union='cat', "
            "with_fc=True); use 'auto' or 'keras' for the ablation options. "
            f"Received: implementation={implementation!r}"
        )


def choose_path(implementation: str, standard: bool, static: bool, training, compute_dtype: str = "float32") -> str:
    """The path a layer runs: the exporter's choice, else its `implementation`, else what "auto" picks.

    "auto", for the paper's mixer: `"torch"` on the PyTorch backend (inference
    and training); elsewhere the fused recurrence for inference when the height
    and width are known and no GPU backs Keras' LSTM (`"scan"` on TensorFlow,
    `"unrolled"` on JAX); for training at a known size `"scan"` on JAX (one
    loop of batched matmuls for all four directions, its own backward pass:
    2.9x Keras' LSTM per step of S on an H200; on a CPU as fast per step for S
    and M and 1.2-1.4x faster for L, S's first step ~8 s sooner and ~0.4 GiB
    lower at its peak); for training in float32 on TensorFlow without a GPU
    `"tensorflow"`, unless XLA compiles the call (S's first training step in
    less than half the time, steps as fast; the kernel computes in float32, so
    16-bit policies keep Keras' layers); and `"keras"` otherwise (cuDNN on
    GPUs). Inference graphs keep standard TensorFlow ops (TFLite and ONNX
    converters take them; they have no counterpart of TensorFlow's LSTM op),
    and XLA `predict` beat it. benchmarks/README.md has the measurements behind
    each choice.
    `training is False` (predict, evaluate), not `None`, selects the scan: a
    direct call inside a user's XLA-compiled GradientTape loop may leave
    `training` unset.
    """
    forced = _FORCED_PATH.get()
    if forced is not None:
        return forced if standard else "keras"
    tensorflow = keras.backend.backend() == "tensorflow"
    if implementation == "fused":
        return "scan" if tensorflow and training is False else "unrolled"
    if implementation != "auto":
        return implementation
    if not standard:
        return "keras"
    if keras.backend.backend() == "torch":
        return "torch"
    if static and not training and not gpu_backs_keras_lstm():
        return "scan" if tensorflow and training is False else "unrolled"
    if static and training and keras.backend.backend() == "jax":
        return "scan"
    if tensorflow and training and compute_dtype == "float32" and not gpu_backs_keras_lstm() and not in_xla_context():
        return "tensorflow"
    return "keras"


def _is_meta(x) -> bool:
    """Whether `x` is a PyTorch "meta" tensor: a shape and a dtype without data."""
    return keras.backend.backend() == "torch" and getattr(getattr(x, "device", None), "type", None) == "meta"


def in_xla_context() -> bool:
    """Whether TensorFlow is tracing for XLA (`jit_compile=True`) here, where its own LSTM kernel cannot run."""
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf
    from tensorflow.python.ops import control_flow_util

    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


def mix(layer, x, training=None):
    """Mixes the tokens of `x` with `layer`'s sublayers on the path `choose_path` picks."""
    if _is_meta(x):
        # Keras' PyTorch trainer runs the model once on data-less "meta" tensors before the first `fit`,
        # `train_on_batch` or `evaluate` step (`compute_output_spec`). LSTMs have no meta kernels there and
        # decompose into Python per step: ~10 s of S's first training step on a CPU through `torch.lstm`.
        return x.new_empty((*x.shape[:3], layer.mixed_channels))
    static = x.shape[1] is not None and x.shape[2] is not None
    path = choose_path(layer.implementation, layer.standard, static, training, layer.compute_dtype)
    if path in ("unrolled", "scan", *EXPORT_PATHS) and not static:
        raise ValueError(
            f"Layer '{layer.name}' runs the {path!r} path, which needs the height and width when the model is "
            "traced; give the model a fixed input_shape or use implementation='auto'. "
            f"Received: input shape={tuple(x.shape)}"
        )
    if path == "keras":
        return mix_keras(layer, x, unroll=_unrolls_keras_lstms)
    if path in NATIVE_PATHS:
        check_implementation(path)  # one backend only
    if path == "torch":
        return mix_torch(layer, x)
    if path == "tensorflow":
        return mix_tensorflow(layer, x)
    if path == "tflite_lstm":
        return mix_tflite_lstm(layer, x)
    if path in ("tflite_unrolled", "tflite_unrolled_int8"):
        return mix_tflite_unrolled(layer, x, per_direction=path == "tflite_unrolled_int8")
    if path == "scan" and _trainable_scan(layer, training):
        return mix_scan_trainable(layer, x)
    return mix_fused(layer, x, scan=path == "scan")


# === "keras": the Bidirectional(LSTM) sublayers ===


# The longest sequence whose Keras LSTM steps TensorFlow runs unrolled (see `_unrolls_keras_lstms`).
MAX_UNROLLED_STEPS = 8


def _unrolls_keras_lstms(steps) -> bool:
    """Whether the "keras" path unrolls the steps of LSTMs over `steps` tokens: on TensorFlow without a GPU,
    when `steps` is known and at most `MAX_UNROLLED_STEPS`, and no exporter chose the path.

    A TensorFlow graph runs each step of a `while_loop` (and of its gradient) through its executor's frame
    machinery; for short sequences copies of the step cost less: the demo model (7 steps) trained ~18 % faster
    (it now trains through TensorFlow's kernel; this applies where training keeps Keras' layers: XLA, 16-bit
    policies, the ablation options, an explicit `"keras"`).
    Longer sequences gain less per step and cost more to trace (S at 224, all loops unrolled: 8 % faster
    steps, 60 s more before the first; benchmarks/README.md). On JAX unrolling doubled the compile time for
    ~10 %, and the ONNX export needs the loops (tf2onnx maps them to ONNX `LSTM` ops).
    """
    return (
        keras.backend.backend() == "tensorflow"
        and _FORCED_PATH.get() is None
        and isinstance(steps, int)
        and steps <= MAX_UNROLLED_STEPS
        and not gpu_backs_keras_lstm()
    )


@contextlib.contextmanager
def _steps_unrolled(sequence_layer, unroll: bool):
    """`sequence_layer` (an RNN, or a Bidirectional of two) runs with `unroll` inside the block.

    Set per call, not in the layers' configs: a saved model keeps the loops, and each backend and call
    chooses again.
    """
    rnns = [sequence_layer.forward_layer, sequence_layer.backward_layer] if hasattr(
        sequence_layer, "forward_layer"
    ) else [sequence_layer]  # fmt: skip
    saved = [rnn.unroll for rnn in rnns]
    for rnn in rnns:
        rnn.unroll = unroll
    try:
        yield
    finally:
        for rnn, value in zip(rnns, saved, strict=True):
            rnn.unroll = value


def mix_keras(layer, x, unroll=None):
    """The recurrent sublayers as composed Keras layers (any option of the mixer); `unroll(steps)` says whether
    to unroll the steps of a direction over `steps` tokens (`_unrolls_keras_lstms`; by default never)."""
    batch, height, width = ops.shape(x)[0], ops.shape(x)[1], ops.shape(x)[2]
    channels = x.shape[-1]
    units = (2 if layer.bidirectional else 1) * layer.hidden_size
    v = h = None
    if layer.rnn_v is not None:  # vertical: one sequence of length `height` per column
        columns = ops.reshape(ops.transpose(x, (0, 2, 1, 3)), (-1, height, channels))
        with _steps_unrolled(layer.rnn_v, unroll is not None and unroll(x.shape[1])):
            v_tokens = layer.rnn_v(columns)
        v = ops.transpose(ops.reshape(v_tokens, (batch, width, height, units)), (0, 2, 1, 3))
    if layer.rnn_h is not None:  # horizontal: one sequence of length `width` per row
        rows = ops.reshape(x, (-1, width, channels))
        with _steps_unrolled(layer.rnn_h, unroll is not None and unroll(x.shape[2])):
            h = ops.reshape(layer.rnn_h(rows), (batch, height, width, units))
    if v is None or h is None:
        return h if v is None else v
    return ops.concatenate([v, h], axis=-1) if layer.union == "cat" else v + h


# === "unrolled" and "scan": the fused recurrence ===


def _cells(layer):
    """The four LSTM cells in output order: v forward, v backward, h forward, h backward."""
    return [
        layer.rnn_v.forward_layer.cell,
        layer.rnn_v.backward_layer.cell,
        layer.rnn_h.forward_layer.cell,
        layer.rnn_h.backward_layer.cell,
    ]


def mix_fused(layer, x, scan: bool = False):
    """All four directional LSTMs from one input projection and batched recurrent steps.

    One batched recurrent matmul per step covers all four directions when the
    map is square (as many columns as rows), the vertical and horizontal
    pairs separately otherwise. `scan`: step with `ops.scan` instead of
    Python-unrolled steps (same math).
    """
    height, width, units = x.shape[1], x.shape[2], layer.hidden_size
    batch = ops.shape(x)[0]
    cells = _cells(layer)
    # `.value`: backend tensors (tf.stack rejects Keras variables).
    kernel = ops.concatenate([cell.kernel.value for cell in cells], axis=-1)  # (C, 4 directions x 4 gates x u)
    bias = ops.concatenate([cell.bias.value for cell in cells], axis=-1)
    proj = ops.reshape(ops.matmul(x, kernel) + bias, (-1, height, width, 4, 4 * units))
    # Time-major sequences: vertical (H steps, one per column), horizontal (W steps, one per row).
    v_in = ops.reshape(ops.transpose(proj[..., :2, :], (1, 3, 0, 2, 4)), (height, 2, -1, 4 * units))
    h_in = ops.reshape(ops.transpose(proj[..., 2:, :], (2, 3, 0, 1, 4)), (width, 2, -1, 4 * units))
    recurrent = ops.stack([cell.recurrent_kernel.value for cell in cells])  # (4, u, 4u)
    if height == width:  # B*W == B*H sequences: all four directions in one loop
        out = _recur(ops.concatenate([v_in, h_in], axis=1), recurrent, cells[0], scan)
        v_out, h_out = out[:, :2], out[:, 2:]
    else:
        v_out = _recur(v_in, recurrent[:2], cells[0], scan)
        h_out = _recur(h_in, recurrent[2:], cells[0], scan)
    # (T, 2, N, u) -> channels-last maps ordered [fwd, bwd].
    v = ops.reshape(ops.transpose(v_out, (2, 0, 1, 3)), (batch, width, height, 2 * units))
    v = ops.transpose(v, (0, 2, 1, 3))
    h = ops.reshape(ops.transpose(h_out, (2, 0, 1, 3)), (batch, height, width, 2 * units))
    return ops.concatenate([v, h], axis=-1)


def _recur(inputs, recurrent, cell, scan=False):
    """LSTM steps for D directions at once, with Keras' LSTMCell math; unrolled or as a scan.

    `inputs` is `(T, D, N, 4u)` (projected input + bias), directions
    alternating forward / backward: odd directions read the sequence in
    reverse and write their outputs back in the original order. Returns
    `(T, D, N, u)`.
    """
    steps, directions = inputs.shape[0], inputs.shape[1]
    inputs = ops.stack([ops.flip(inputs[:, d], axis=0) if d % 2 else inputs[:, d] for d in range(directions)], axis=1)
    zeros = ops.zeros_like(inputs[0, :, :, : recurrent.shape[1]])

    def step(state, projected):
        state_h, state_c = state
        z = projected + ops.matmul(state_h, recurrent)
        i, f, g, o = ops.split(z, 4, axis=-1)
        state_c = cell.recurrent_activation(f) * state_c + cell.recurrent_activation(i) * cell.activation(g)
        state_h = cell.recurrent_activation(o) * cell.activation(state_c)
        return (state_h, state_c), state_h

    if scan:

        def scan_step(state, projected):
            # Carry and output are the same (2, D, N, u) tensor: Keras 3.15's TF `scan` gives the
            # per-step outputs the carry's structure and shape.
            (state_h, state_c), _ = step((state[0], state[1]), projected)
            state = ops.stack([state_h, state_c])
            return state, state

        _, states = ops.scan(scan_step, ops.stack([zeros, zeros]), inputs)
        outputs = states[:, 0]
    else:
        state, outputs = (zeros, zeros), []
        for t in range(steps):
            state, out = step(state, inputs[t])
            outputs.append(out)
        outputs = ops.stack(outputs)  # (T, D, N, u)
    return ops.stack([ops.flip(outputs[:, d], axis=0) if d % 2 else outputs[:, d] for d in range(directions)], axis=1)


# === "scan" for training on TensorFlow and JAX: one loop for all directions, differentiated by hand ===


def mix_scan_trainable(layer, x):
    """All four directional LSTMs in one loop (two on non-square maps), with a hand-written gradient.

    The `"scan"` path for training on TensorFlow and JAX (and for inference
    on JAX). Each step projects its own input, as Keras' LSTM does (on
    XLA:CPU these cache-sized matmuls ran faster than one projection of the
    whole map), and advances all directions with one batched matmul each for
    the input and the state. The backward pass is one reverse loop of
    elementwise work and one batched matmul per step; the gradients of the
    weights and of the input are batched matmuls over all steps afterwards,
    or, on JAX on a CPU, products formed step by step inside that loop
    (`_weight_gradients_per_step`).
    Automatic differentiation would instead build the gradient of a loop
    (TensorFlow: stacks of every intermediate, slow to build and to run) or of
    Keras' four loops per block. Gradients equal automatic differentiation
    of Keras' LSTM up to float rounding.
    """
    cells = _cells(layer)
    _, height, width, channels = x.shape
    batch = ops.shape(x)[0]  # may be unknown while tracing
    units = layer.hidden_size

    def weights(directions):
        def stacked(name):
            return ops.stack([ops.cast(getattr(cells[d], name).value, x.dtype) for d in directions])

        return stacked("kernel"), stacked("recurrent_kernel"), stacked("bias")

    # Time-major sequences: vertical (time = row, one per batch x column), horizontal (time = column).
    v = ops.reshape(ops.transpose(x, (1, 0, 2, 3)), (height, -1, channels))
    h = ops.reshape(ops.transpose(x, (2, 0, 1, 3)), (width, -1, channels))
    if height == width:
        out = _bilstm_loop(ops.stack([v, h], axis=1), *weights(range(4)))
        v_out, h_out = out[:, 0], out[:, 1]
    else:
        v_out = _bilstm_loop(ops.expand_dims(v, 1), *weights((0, 1)))[:, 0]
        h_out = _bilstm_loop(ops.expand_dims(h, 1), *weights((2, 3)))[:, 0]
    v_map = ops.transpose(ops.reshape(v_out, (height, batch, width, 2 * units)), (1, 0, 2, 3))
    h_map = ops.transpose(ops.reshape(h_out, (width, batch, height, 2 * units)), (1, 2, 0, 3))
    return ops.concatenate([v_map, h_map], axis=-1)


def _accumulate(step, initial, xs, reverse=False):
    """`step(carry, x) -> carry` over the leading axis of the tuple `xs`; every step's carry, stacked."""
    if keras.backend.backend() == "jax":
        import jax

        return jax.lax.scan(lambda carry, x: (step(carry, x),) * 2, initial, xs, reverse=reverse)[1]
    import tensorflow as tf

    return tf.scan(step, xs, initializer=initial, reverse=reverse)


def _interleaved(sequences):
    """(T, P, N, C) -> (T, D, N, C) in scan-step order: pair p read forwards (2p) and backwards (2p + 1)."""
    steps, pairs, n, c = sequences.shape
    return ops.reshape(ops.stack([sequences, ops.flip(sequences, 0)], axis=2), (steps, 2 * pairs, -1, c))


def _in_sequence_order(states):
    """(T, D, N, u) per scan step -> (T, P, N, 2u): each pair's forward and backward states, in order."""
    steps, directions, _, units = states.shape
    states = ops.reshape(states, (steps, directions // 2, 2, -1, units))
    return ops.concatenate([states[:, :, 0], ops.flip(states[:, :, 1], 0)], axis=-1)


@ops.custom_gradient
def _bilstm_loop(sequences, kernel, recurrent, bias):
    """P pairs of bidirectional LSTMs over `sequences` (T, P, N, C) -> states (T, P, N, 2u).

    Pair p is read forwards by direction 2p and backwards by direction 2p + 1,
    whose weights are `kernel` (D, C, 4u), `recurrent` (D, u, 4u) and `bias`
    (D, 4u), in Keras' gate order `[i, f, g, o]` (sigmoid gates, tanh cell:
    Keras' `LSTMCell` defaults). The forward loop keeps every step's states and
    gate activations for the backward pass.
    """
    steps_inputs = _interleaved(sequences)  # (T, D, N, C)
    zeros = ops.zeros_like(steps_inputs[0, :, :, : recurrent.shape[1]])

    def step(carry, inputs):
        state_h, state_c, _ = carry
        z = ops.matmul(inputs, kernel) + ops.matmul(state_h, recurrent) + ops.expand_dims(bias, 1)
        i, f, g, o = ops.split(z, 4, axis=-1)
        i, f, g, o = ops.sigmoid(i), ops.sigmoid(f), ops.tanh(g), ops.sigmoid(o)
        state_c = f * state_c + i * g
        return o * ops.tanh(state_c), state_c, ops.concatenate([i, f, g, o], axis=-1)

    states_h, states_c, gates = _accumulate(step, (zeros, zeros, ops.concatenate([zeros] * 4, axis=-1)), steps_inputs)

    def gradient(d_outputs):
        # d_outputs in scan-step order, (T, D, N, u).
        d_forward, d_backward = ops.split(d_outputs, 2, axis=-1)
        d_states = ops.reshape(ops.stack([d_forward, ops.flip(d_backward, 0)], axis=2), ops.shape(states_h))
        first = ops.zeros_like(states_h[:1])
        previous_h = ops.concatenate([first, states_h[:-1]])
        previous_c = ops.concatenate([first, states_c[:-1]])
        recurrent_t = ops.swapaxes(recurrent, 1, 2)

        def step(carry, xs):
            d_h_next, d_c_next, _ = carry
            d_h, state_c, prev_c, gate = xs
            i, f, g, o = ops.split(gate, 4, axis=-1)
            tanh_c = ops.tanh(state_c)
            d_h = d_h + d_h_next
            d_c = d_c_next + d_h * o * (1 - tanh_c * tanh_c)
            d_z = ops.concatenate(
                [d_c * g * i * (1 - i), d_c * prev_c * f * (1 - f), d_c * i * (1 - g * g), d_h * tanh_c * o * (1 - o)],
                axis=-1,
            )
            return ops.matmul(d_z, recurrent_t), d_c * f, d_z

        steps, directions, _, channels = steps_inputs.shape
        if _weight_gradients_per_step():
            d_steps, d_kernel, d_recurrent, d_bias = _jax_gradients_per_step(
                step, zeros, gates, (d_states, states_c, previous_c), steps_inputs, previous_h, kernel
            )
        else:
            _, _, d_z = _accumulate(step, (zeros, zeros, ops.zeros_like(gates[0])),
                                    (d_states, states_c, previous_c, gates), reverse=True)  # fmt: skip
            d_steps = ops.einsum("tdng,dcg->tdnc", d_z, kernel)
            d_kernel = ops.einsum("tdnc,tdng->dcg", steps_inputs, d_z)
            d_recurrent = ops.einsum("tdnu,tdng->dug", previous_h, d_z)
            d_bias = ops.sum(d_z, axis=(0, 2))
        d_steps = ops.reshape(d_steps, (steps, directions // 2, 2, -1, channels))
        d_sequences = d_steps[:, :, 0] + ops.flip(d_steps[:, :, 1], 0)
        return d_sequences, d_kernel, d_recurrent, d_bias

    return _in_sequence_order(states_h), gradient


def _weight_gradients_per_step() -> bool:
    """Whether `_bilstm_loop`'s backward pass computes the input's and the weights' gradients step by step.

    On JAX on a CPU: there the batched matmuls over all steps afterwards (`einsum`s contracting the steps and
    the sequences) made XLA:CPU copy both operands of every map into another layout first; per step the same
    products stay cache-sized. Elsewhere (TensorFlow, GPUs and TPUs) the batched form stays: fewer, larger
    matmuls, and no extra matmuls inside the loop.
    """
    return keras.backend.backend() == "jax" and not jax_on_accelerator()


def _jax_gradients_per_step(step, zeros, gates, xs, steps_inputs, previous_h, kernel):
    """`_bilstm_loop`'s backward loop with the products of each step's `d_z` done inside it (JAX only).

    `step` is the backward step of the gate gradients, `xs` its per-step inputs before the gates. Returns the
    gradient of every step's input `(T, D, N, C)` and the gradients of `kernel`, `recurrent` and `bias`,
    summed over the steps in float32 (also under 16-bit policies) and returned in the weights' dtype.
    """
    import jax
    import jax.numpy as jnp

    kernel_t = jnp.swapaxes(kernel, 1, 2)  # (D, 4u, C)

    def reverse_step(carry, inputs):
        recurrence, d_kernel, d_recurrent, d_bias = carry
        *recurrent_inputs, x_t, previous_h_t = inputs
        d_h, d_c, d_z = step((*recurrence, None), recurrent_inputs)
        d_kernel += jnp.einsum("dnc,dng->dcg", x_t, d_z, preferred_element_type=jnp.float32)
        d_recurrent += jnp.einsum("dnu,dng->dug", previous_h_t, d_z, preferred_element_type=jnp.float32)
        d_bias += jnp.sum(d_z, axis=1, dtype=jnp.float32)
        return ((d_h, d_c), d_kernel, d_recurrent, d_bias), jnp.matmul(d_z, kernel_t)

    directions, units = previous_h.shape[1], previous_h.shape[-1]
    channels, gate_width = kernel.shape[1:]
    initial = (
        (zeros, zeros),
        jnp.zeros((directions, channels, gate_width), jnp.float32),
        jnp.zeros((directions, units, gate_width), jnp.float32),
        jnp.zeros((directions, gate_width), jnp.float32),
    )
    (_, d_kernel, d_recurrent, d_bias), d_steps = jax.lax.scan(
        reverse_step, initial, (*xs, gates, steps_inputs, previous_h), reverse=True
    )
    return d_steps, d_kernel.astype(kernel.dtype), d_recurrent.astype(kernel.dtype), d_bias.astype(kernel.dtype)


def _trainable_scan(layer, training) -> bool:
    """Whether the `"scan"` path runs `mix_scan_trainable`: on JAX, and on TensorFlow unless `training is False`
    (inference keeps the projected scan, which XLA compiles fast); standard LSTM cells only."""
    backend = keras.backend.backend()
    if backend not in ("jax", "tensorflow") or (backend == "tensorflow" and training is False):
        return False
    return all(_is_standard_lstm(cell) for cell in _cells(layer))


# === "torch": PyTorch's LSTM kernel ===


def mix_torch(layer, x):
    """Both BiLSTMs on `torch.lstm`, reading the same Keras variables; differentiable.

    Keras' LSTM on the torch backend steps in Python on a CPU; this runs
    PyTorch's own loop, as timm does. Under `torch.autocast` the sequences
    and weights go in autocast's dtype, as timm's LSTMs get them from the
    layers before them: on a CPU without AVX512-BF16, `torch.lstm` given
    float32 tensors under a bfloat16 autocast fails inside oneDNN, while
    bfloat16 tensors run.
    """
    import torch  # the PyTorch backend only (`check_implementation`)

    batch, height, width, channels = (int(d) for d in x.shape)
    units = layer.hidden_size
    x = torch.as_tensor(x)
    autocast = eager_torch.autocast_dtype(x.device.type)
    if autocast is not None:
        x = x.to(autocast)

    def bilstm(bidirectional, sequences):
        weights = []
        for cell in (bidirectional.forward_layer.cell, bidirectional.backward_layer.cell):
            weights += _torch_lstm_weights(cell, sequences.dtype)
        zeros = sequences.new_zeros((2, sequences.shape[0], units))
        # (input, (h0, c0), weights, has_biases, num_layers, dropout, train, bidirectional, batch_first)
        return torch.lstm(sequences, (zeros, zeros), weights, True, 1, 0.0, False, True, True)[0]

    columns = x.permute(0, 2, 1, 3).reshape(batch * width, height, channels)
    v = bilstm(layer.rnn_v, columns).reshape(batch, width, height, 2 * units).permute(0, 2, 1, 3)
    h = bilstm(layer.rnn_h, x.reshape(batch * height, width, channels)).reshape(batch, height, width, 2 * units)
    return torch.cat([v, h], dim=-1)


def _torch_lstm_weights(cell, dtype):
    """One LSTM cell's weights as `torch.lstm` takes them: `[W_ih, W_hh, b_ih, b_hh]`.

    Keras keeps kernel `(C, 4u)`, recurrent kernel `(u, 4u)` and one bias;
    torch wants them transposed and two biases. The transposes are copies,
    and at batch 1 copying S's 144 matrices on every call cost about 12 % of
    a forward pass. Without autograd (inference) the copies are kept and
    reused until a variable changes (`eager_torch.kept`). With autograd
    they are made per call, so gradients reach the variables.
    """
    import torch

    def layout(kernel, recurrent, bias):
        kernel, recurrent, bias = (t.to(dtype) for t in (kernel, recurrent, bias))
        return [kernel.T.contiguous(), recurrent.T.contiguous(), bias, torch.zeros_like(bias)]

    sources = (cell.kernel.value, cell.recurrent_kernel.value, cell.bias.value)
    if torch.is_grad_enabled():
        return layout(*sources)
    return eager_torch.kept(cell, dtype, sources, layout)


# === "tensorflow": TensorFlow's fused LSTM kernel ===


def mix_tensorflow(layer, x):
    """Both BiLSTMs on TensorFlow's own LSTM kernel (`BlockLSTMV2`), reading the same Keras variables.

    One graph op runs all steps of a direction (a C++ loop, as `"torch"` runs
    PyTorch's), and one op its gradient, where Keras' LSTM adds a `while_loop`
    per direction and another for its gradient: TensorFlow builds the
    training graph of S in a fraction of the time. Any height and width;
    computes in float32 (the kernel has no bfloat16 version; under a 16-bit
    policy the weights arrive already rounded to it). No second-order
    gradients (TensorFlow has none for the gradient op).
    """
    import tensorflow as tf

    if in_xla_context():
        raise ValueError(
            f"Layer '{layer.name}' runs implementation='tensorflow' (TensorFlow's BlockLSTM kernel), which XLA "
            "cannot compile; call it outside `tf.function(jit_compile=True)` and TPU replication, or use "
            "implementation='auto' (Keras' `compile` already leaves XLA off for this layer). "
            "Received: implementation='tensorflow' inside an XLA-compiled function"
        )
    if not all(_is_standard_lstm(cell) for cell in _cells(layer)):
        return mix_keras(layer, x, unroll=_unrolls_keras_lstms)
    channels, units = x.shape[-1], 2 * layer.hidden_size
    shape = tf.shape(x)
    batch, height, width = shape[0], shape[1], shape[2]
    dtype = x.dtype
    x = tf.cast(x, "float32")

    def bidirectional(sequences, wrapper):
        outputs = []
        for cell, reverse in ((wrapper.forward_layer.cell, False), (wrapper.backward_layer.cell, True)):
            steps = tf.reverse(sequences, [0]) if reverse else sequences
            weights = (tf.cast(w.value, "float32") for w in (cell.kernel, cell.recurrent_kernel, cell.bias))
            states = _block_lstm(steps, *weights)
            outputs.append(tf.reverse(states, [0]) if reverse else states)
        return tf.concat(outputs, axis=-1)

    # Time-major sequences: vertical (time = row, one per batch x column), horizontal (time = column).
    v = bidirectional(tf.reshape(tf.transpose(x, (1, 0, 2, 3)), (height, -1, channels)), layer.rnn_v)
    h = bidirectional(tf.reshape(tf.transpose(x, (2, 0, 1, 3)), (width, -1, channels)), layer.rnn_h)
    v = tf.transpose(tf.reshape(v, (height, batch, width, units)), (1, 0, 2, 3))
    h = tf.transpose(tf.reshape(h, (width, batch, height, units)), (1, 2, 0, 3))
    return tf.cast(tf.concat([v, h], axis=-1), dtype)


def _block_lstm(sequences, kernel, recurrent, bias):
    """One LSTM over time-major `sequences` (T, N, C) from a zero state -> every step's h (T, N, u).

    Keras' gate order `[i, f, g, o]` is the kernel's `IFCO` layout. The
    gradient calls `BlockLSTMGradV2` itself: TensorFlow registers the V1
    gradient (`ICFO` layout) for the V2 op, which gives wrong values.
    """
    import tensorflow as tf
    from tensorflow.python.ops import gen_rnn_ops

    @tf.custom_gradient
    def lstm(sequences, kernel, recurrent, bias):
        weights = tf.concat([kernel, recurrent], axis=0)
        zeros = tf.zeros(tf.stack([tf.shape(sequences)[1], recurrent.shape[0]]), sequences.dtype)
        no_peephole = tf.zeros(recurrent.shape[:1], sequences.dtype)
        common = dict(
            seq_len_max=tf.cast(tf.shape(sequences)[0], "int64"), x=sequences, cs_prev=zeros, h_prev=zeros,
            w=weights, wci=no_peephole, wcf=no_peephole, wco=no_peephole, b=bias, use_peephole=False,
        )  # fmt: skip
        # cell_clip 0: no clipping of the cell state.
        i, cs, f, o, ci, co, h = gen_rnn_ops.block_lstmv2(cell_clip=0.0, **common)

        def gradient(d_h):
            d_x, _, _, d_w, _, _, _, d_b = gen_rnn_ops.block_lstm_grad_v2(
                i=i, cs=cs, f=f, o=o, ci=ci, co=co, h=h, cs_grad=tf.zeros_like(cs), h_grad=d_h, **common
            )
            return d_x, d_w[: kernel.shape[0]], d_w[kernel.shape[0] :], d_b

        return h, gradient

    return lstm(sequences, kernel, recurrent, bias)


# === "tflite_unrolled": a flat graph for TFLite's XNNPACK delegate (export only) ===


def _tensorflow_only(path):
    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            f"The {path!r} path traces TensorFlow functions for the TFLite converter and needs the "
            f"TensorFlow backend. Received: backend={keras.backend.backend()!r}"
        )


def _constant(variable):
    """A variable's value as a NumPy array, read eagerly while a TF function is traced."""
    import tensorflow as tf

    with tf.init_scope():
        return variable.numpy()


def _sigmoid_gates_first(array):
    """Keras' gate order `[i, f, g, o]` -> `[i, f, o, g]` along the last axis."""
    i, f, g, o = np.split(array, 4, axis=-1)
    return np.concatenate([i, f, o, g], axis=-1)


def mix_tflite_unrolled(layer, x, per_direction=False):
    """The four directional LSTMs as a flat graph (no control flow) for TFLite's XNNPACK delegate.

    XNNPACK has no control flow and pays per op and for every copy
    (docs/design.md, "TFLite lowerings", has the measurements), so the
    graph is laid out once per layer and each step is a handful of ops:

    - two `FULLY_CONNECTED` project the input time-major, the vertical pair
      from the map (time = height), the horizontal pair from its transpose
      (time = width); the backward directions' steps are reversed once;
    - on a square map all four directions advance together (two pairs
      otherwise): per step one `BATCH_MATMUL` on the constant recurrent
      kernels, one `SPLIT` into gates and the gate arithmetic;
    - the per-step states are concatenated once and put back into the map.

    Stateless: every `invoke()` starts from zero state. The weights go in as
    constants (quantisers see them), in gate order `[i, f, o, g]`. Cells with
    other activations keep the `"keras"` path. `per_direction` (the
    `"tflite_unrolled_int8"` path): one `FULLY_CONNECTED` per direction and
    step instead of the batched matmul, which XNNPACK runs in int8.
    """
    _tensorflow_only("tflite_unrolled")
    import tensorflow as tf

    cells = _cells(layer)
    if not all(_is_standard_lstm(cell) for cell in cells):
        return mix_keras(layer, x)
    batch, height, width, channels = x.shape
    units = layer.hidden_size

    def weights(name, pair):
        return np.concatenate([_sigmoid_gates_first(_constant(getattr(cells[d], name))) for d in pair], axis=-1)

    def time_major(maps, pair):
        """`maps` (T, B, N', C) -> projected steps (T, 2, B*N', 4u), the backward direction reversed in time."""
        steps = maps.shape[0]
        projected = tf.matmul(tf.reshape(maps, (-1, channels)), weights("kernel", pair)) + weights("bias", pair)
        forward, backward = tf.split(tf.reshape(projected, (steps, 1, -1, 8 * units)), 2, axis=-1)
        return tf.concat([forward, tf.reverse(backward, [0])], axis=1)

    columns = x if batch == 1 else tf.transpose(x, (1, 0, 2, 3))
    v = time_major(tf.reshape(columns, (height, batch, width, channels)), (0, 1))
    h = time_major(tf.transpose(x, (2, 0, 1, 3)), (2, 3))
    recurrent = np.stack([_sigmoid_gates_first(_constant(cell.recurrent_kernel)) for cell in cells])
    if height == width:
        v_out, h_out = tf.split(_recur_flat(tf.concat([v, h], axis=1), recurrent, per_direction), 2, axis=1)
    else:
        v_out, h_out = _recur_flat(v, recurrent[:2], per_direction), _recur_flat(h, recurrent[2:], per_direction)

    def unreverse(outputs):
        """(T, 2, N, u) -> (T, N, 2u): forward and backward outputs side by side, in sequence order."""
        forward, backward = tf.split(outputs, 2, axis=1)
        return tf.reshape(tf.concat([forward, tf.reverse(backward, [0])], axis=-1), (outputs.shape[0], -1, 2 * units))

    v_map = tf.reshape(unreverse(v_out), (height, batch, width, 2 * units))
    v_map = tf.reshape(v_map, (batch, height, width, 2 * units)) if batch == 1 else tf.transpose(v_map, (1, 0, 2, 3))
    h_map = tf.transpose(tf.reshape(unreverse(h_out), (width, batch, height, 2 * units)), (1, 2, 0, 3))
    return tf.concat([v_map, h_map], axis=-1)


def _recur_flat(inputs, recurrent, per_direction=False):
    """Keras' LSTMCell steps written out: `inputs` (T, D, N, 4u), `recurrent` (D, u, 4u) -> states (T, D, N, u).

    Gates in order `[i, f, o, g]`; the first step skips the matmul on the zero state. `per_direction`: one
    `FULLY_CONNECTED` per direction instead of one `BATCH_MATMUL`, for full-int8 files (XNNPACK runs int8
    fully-connected layers, but not int8 batch matmuls: 4.1 against 12.6 ms for a 16x16 layer).
    """
    import tensorflow as tf

    directions, units = recurrent.shape[0], recurrent.shape[1]

    def matmul(state_h):
        if not per_direction:
            return tf.matmul(state_h, recurrent)
        parts = tf.split(state_h, directions, axis=1)
        return tf.concat([tf.reshape(tf.matmul(tf.reshape(part, (-1, units)), recurrent[d]), (1, 1, -1, 4 * units))
                          for d, part in enumerate(parts)], axis=1)  # fmt: skip

    state_h = state_c = None
    outputs = []
    for z in tf.split(inputs, inputs.shape[0], axis=0):  # (1, D, N, 4u) each
        if state_h is not None:
            z = z + matmul(state_h)
        i, f, o, g = tf.split(z, 4, axis=-1)
        i, f, o, g = tf.sigmoid(i), tf.sigmoid(f), tf.sigmoid(o), tf.tanh(g)
        state_c = i * g if state_c is None else f * state_c + i * g
        state_h = o * tf.tanh(state_c)
        outputs.append(state_h)
    return tf.concat(outputs, axis=0)


# === "tflite_lstm": TFLite's fused LSTM kernel (export only) ===


@functools.cache
def _fusable_lstm():
    """A TF function with Keras' LSTM interface that the TFLite converter fuses.

    Arguments and results follow tf-keras' `standard_lstm` (the converter reads
    them by position): `(inputs, init_h, init_c, kernel, recurrent_kernel,
    bias) -> (last_output, outputs, h, c, runtime)`, batch-major, gates
    `[i, f, c, o]`. The body computes the same LSTM, for any runtime that does
    not fuse it.
    """
    import tensorflow as tf

    attributes = {"api_implements": f"lstm_{uuid.uuid4().hex}", "time_major": False, "go_backwards": False}

    @tf.function(experimental_attributes=attributes, autograph=False)
    def lstm(inputs, init_h, init_c, kernel, recurrent_kernel, bias):
        projected = tf.transpose(tf.einsum("btc,cg->btg", inputs, kernel) + bias, (1, 0, 2))

        def step(state, z):
            h, c = state
            i, f, g, o = tf.split(z + tf.matmul(h, recurrent_kernel), 4, axis=-1)
            c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
            return tf.sigmoid(o) * tf.tanh(c), c

        hs, cs = tf.scan(step, projected, initializer=(init_h, init_c))
        outputs = tf.transpose(hs, (1, 0, 2))
        return outputs[:, -1], outputs, hs[-1], cs[-1], tf.constant(0.0)

    return lstm


def _is_standard_lstm(cell) -> bool:
    return (
        isinstance(cell, keras.layers.LSTMCell)
        and cell.activation is keras.activations.tanh
        and cell.recurrent_activation is keras.activations.sigmoid
        and cell.use_bias
    )


def mix_tflite_lstm(layer, x):
    """One fusable LSTM call per direction (TensorFlow tracing only).

    The weights go in as constants, not variable reads: the converter's LSTM
    fusion needs them folded (TensorFlow 2.21 crashes on resource reads there).
    Cells with other activations keep the `"keras"` path.
    """
    _tensorflow_only("tflite_lstm")
    import tensorflow as tf

    if not all(_is_standard_lstm(cell) for cell in _cells(layer)):
        return mix_keras(layer, x)
    batch, height, width, channels = x.shape
    lstm = _fusable_lstm()

    def run(sequences, cell):
        zeros = tf.zeros((sequences.shape[0], cell.units), sequences.dtype)
        values = [_constant(w) for w in (cell.kernel, cell.recurrent_kernel, cell.bias)]
        return lstm(sequences, zeros, zeros, *[tf.constant(v) for v in values])[1]

    def bidirectional(sequences, wrapper):
        forward = run(sequences, wrapper.forward_layer.cell)
        backward = tf.reverse(run(tf.reverse(sequences, [1]), wrapper.backward_layer.cell), [1])
        return tf.concat([forward, backward], axis=-1)

    units = 2 * layer.hidden_size
    columns = tf.reshape(tf.transpose(x, (0, 2, 1, 3)), (batch * width, height, channels))
    v = tf.transpose(tf.reshape(bidirectional(columns, layer.rnn_v), (batch, width, height, units)), (0, 2, 1, 3))
    h = tf.reshape(bidirectional(tf.reshape(x, (batch * height, width, channels)), layer.rnn_h),
                   (batch, height, width, units))  # fmt: skip
    return tf.concat([v, h], axis=-1)
