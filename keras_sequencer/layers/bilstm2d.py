"""BiLSTM2D: the token mixer of Sequencer2D."""

import contextlib
import contextvars
import functools

import keras
from keras import ops

_SHARING_KEYS = ("shared_objects/id_to_obj_map", "shared_objects/id_to_config_map")
IMPLEMENTATIONS = ("auto", "keras", "fused")
RNN_TYPES = ("lstm", "gru", "rnn")
UNIONS = ("cat", "add", "vertical", "horizontal")
_RNN_LAYERS = {"lstm": "LSTM", "gru": "GRU", "rnn": "SimpleRNN"}

# Set only by exporters (`keras_sequencer.export`) while they trace a model: a
# function `(layer, x) -> mixed` that replaces `_mix` for every BiLSTM2D, or
# "keras" to force the Bidirectional(LSTM) sublayers. None: the layer decides.
_MIX_OVERRIDE = contextvars.ContextVar("keras_sequencer_mix_override", default=None)


@contextlib.contextmanager
def mix_override(override):
    """Within this block every BiLSTM2D mixes tokens with `override` (see `_MIX_OVERRIDE`)."""
    token = _MIX_OVERRIDE.set(override)
    try:
        yield
    finally:
        _MIX_OVERRIDE.reset(token)


@functools.cache  # asked on every call of every block; the answer is fixed per process
def _gpu_backs_keras_lstm() -> bool:
    """Whether Keras' own LSTM would run on cuDNN here (TensorFlow or PyTorch on a GPU)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_logical_devices("GPU"))
    if backend == "torch":
        import torch

        return torch.cuda.is_available()
    return False


@contextlib.contextmanager
def _outside_object_sharing():
    """Builds Keras' `Bidirectional` outside a `.keras` loading scope.

    `Bidirectional.__init__` serialises and deserialises its template layer.
    Inside Keras' object-sharing scope (active while a `.keras` file loads)
    that records the template's `id()`; once the template is freed, a later
    template at the same address is resolved to an earlier LSTM, so forward
    and backward LSTMs get mixed up (Keras 3.15: "Forward layer and backward
    layer should have different `go_backwards` value", at random). Nothing
    here is shared, so suspending the scope is safe.
    """
    try:
        from keras.src.backend.common import global_state
    except ImportError:  # a Keras without the internal module: nothing to suspend
        yield
        return
    saved = [global_state.get_global_attribute(key) for key in _SHARING_KEYS]
    for key in _SHARING_KEYS:
        global_state.set_global_attribute(key, None)
    try:
        yield
    finally:
        for key, value in zip(_SHARING_KEYS, saved, strict=True):
            global_state.set_global_attribute(key, value)


def sequence_layer(rnn_type: str, units: int, bidirectional: bool, name: str, dtype=None):
    """A Keras LSTM / GRU / SimpleRNN returning sequences, wrapped in Bidirectional when asked.

    Explicit names keep variable paths stable (`rnn_v/forward_lstm/lstm_cell/kernel`)
    whatever else the process has built; the converter relies on them.
    """
    with _outside_object_sharing():
        cls = getattr(keras.layers, _RNN_LAYERS[rnn_type])
        if not bidirectional:
            return cls(units, return_sequences=True, name=name, dtype=dtype)
        rnn = cls(units, return_sequences=True, name=rnn_type, dtype=dtype)
        return keras.layers.Bidirectional(rnn, merge_mode="concat", name=name, dtype=dtype)


@keras.saving.register_keras_serializable(package="keras_sequencer")
class BiLSTM2D(keras.layers.Layer):
    """Mixes tokens of a 2-D feature map with a vertical and a horizontal BiLSTM.

    Every column of the `(batch, height, width, channels)` input is read as a
    sequence of length `height` by one bidirectional LSTM (`rnn_v`), every row
    as a sequence of length `width` by another (`rnn_h`). The two outputs are
    concatenated channel-wise in the order `[v_fwd, v_bwd, h_fwd, h_bwd]`
    (`4 * hidden_size` channels) and projected back to `channels` by a Dense
    layer (`fc`). The two LSTMs share no weights; every sequence starts from a
    zero state. Any height and width work, square or not.

    Reference: Tatsunami & Taki, "Sequencer: Deep LSTM for Image
    Classification", NeurIPS 2022 (https://arxiv.org/abs/2205.01972).

    Two forward paths compute the same function from the same variables
    (those of the `Bidirectional(LSTM)` sublayers, so every checkpoint and
    `.keras` file works with both):

    - `"keras"`: the four LSTMs run as `Bidirectional(LSTM)` layers (cuDNN
      on a GPU with the TensorFlow or PyTorch backend).
    - `"fused"`: one matmul projects the input for all four directional
      LSTMs at every position, then the recurrences advance together, one
      batched recurrent matmul per step (all four directions when the map is
      square, vertical and horizontal pairs otherwise), unrolled over the
      sequence (a scan for inference on TensorFlow, where it compiles faster
      under XLA; XLA cannot take the scan's gradient).
      Needs the height and width to be known when the model is traced (a
      fixed `input_shape`, or eager calls).
    - `"auto"` (default): `"fused"` for inference when the height and width
      are known and no GPU is visible to the TensorFlow or PyTorch backend,
      else `"keras"`. Measured on a 2-core CPU (Sequencer2D-S, 224x224,
      `predict`): fused vs keras 8.0 vs 7.0 img/s at batch 1 on JAX, 8.3 vs
      4.4 on TensorFlow (XLA), 4.3 vs 3.7 on PyTorch; but the fused path is
      about 2x slower to train (its loop differentiates worse than Keras'
      LSTM loop), so training keeps `"keras"`. On the PyTorch backend,
      `"auto"` instead runs both BiLSTMs on `torch.lstm` (PyTorch's own LSTM
      kernel, as timm: C++ on a CPU, cuDNN on a GPU) for inference and
      training, from the same variables (S, 224, 2 cores: 0.81x timm at
      batch 1, 0.90x at 16, training step 0.94x; Keras' LSTM steps in Python
      on a CPU).

    The paper's ablations (authors' `RNN2DBase`, timm's `RNN2dBase`) are
    options; the defaults are the paper's mixer:
    - `rnn_type`: `"lstm"`, `"gru"` (Keras GRU, `reset_after=True`, i.e.
      PyTorch's formulation) or `"rnn"` (tanh SimpleRNN);
    - `bidirectional=False`: forward-only RNNs (`hidden_size` channels each);
    - `union`: `"cat"` (concatenate vertical and horizontal), `"add"` (sum
      them), `"vertical"` or `"horizontal"` (that scan only);
    - `with_fc=False`: no output projection; the mixed width must then equal
      the input's channels.
    Only the defaults have the fused path ("auto" uses "keras" otherwise).

    Args:
        hidden_size: int, units of each directional RNN.
        implementation: `"auto"`, `"keras"` or `"fused"` (see above).
        rnn_type: `"lstm"`, `"gru"` or `"rnn"`.
        bidirectional: bool, forward and backward RNNs (True) or forward only.
        union: `"cat"`, `"add"`, `"vertical"` or `"horizontal"`.
        with_fc: bool, whether a Dense layer projects back to the input width.
        **kwargs: standard `keras.layers.Layer` arguments.

    Example:
    >>> layer = BiLSTM2D(hidden_size=48)
    >>> y = layer(keras.ops.ones((2, 8, 12, 192)))
    >>> tuple(y.shape)
    (2, 8, 12, 192)
    """

    def __init__(
        self,
        hidden_size: int,
        implementation: str = "auto",
        rnn_type: str = "lstm",
        bidirectional: bool = True,
        union: str = "cat",
        with_fc: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(
                "`hidden_size` must be a positive int, the units of each "
                f"directional LSTM. Received: hidden_size={hidden_size}"
            )
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"`implementation` must be one of {IMPLEMENTATIONS}. Received: implementation={implementation!r}"
            )
        if rnn_type not in RNN_TYPES:
            raise ValueError(f"`rnn_type` must be one of {RNN_TYPES}. Received: rnn_type={rnn_type!r}")
        if union not in UNIONS:
            raise ValueError(f"`union` must be one of {UNIONS}. Received: union={union!r}")
        self.hidden_size = hidden_size
        self.implementation = implementation
        self.rnn_type = rnn_type
        self.bidirectional = bool(bidirectional)
        self.union = union
        self.with_fc = bool(with_fc)
        # The paper's mixer; the fused path implements exactly this one.
        self._standard = (rnn_type, self.bidirectional, union, self.with_fc) == ("lstm", True, "cat", True)
        if implementation == "fused" and not self._standard:
            raise ValueError(
                "implementation='fused' implements the paper's mixer (bidirectional LSTMs, union='cat', "
                "with_fc=True); use 'auto' or 'keras' for other options. Received: "
                f"rnn_type={rnn_type!r}, bidirectional={bidirectional}, union={union!r}, with_fc={with_fc}"
            )
        self.input_spec = keras.layers.InputSpec(ndim=4)
        args = (rnn_type, hidden_size, self.bidirectional)
        self.rnn_v = None if union == "horizontal" else sequence_layer(*args, name="rnn_v", dtype=self.dtype_policy)
        self.rnn_h = None if union == "vertical" else sequence_layer(*args, name="rnn_h", dtype=self.dtype_policy)
        self.fc = None  # its width is the input's channel count, known in build()

    @property
    def mixed_channels(self) -> int:
        """Channels after mixing, before `fc`: directions x units, x2 for union='cat'."""
        return (2 if self.bidirectional else 1) * self.hidden_size * (2 if self.union == "cat" else 1)

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None:
            raise ValueError(f"BiLSTM2D needs a known channel count (last axis). Received: input_shape={input_shape}")
        if not self.with_fc and self.mixed_channels != channels:
            raise ValueError(
                f"With with_fc=False the mixer's output ({self.mixed_channels} channels: union={self.union!r}, "
                f"bidirectional={self.bidirectional}, hidden_size={self.hidden_size}) must equal the input's "
                f"{channels} channels."
            )
        sequence_shape = (None, None, channels)
        for rnn in (self.rnn_v, self.rnn_h):
            if rnn is not None:
                rnn.build(sequence_shape)
        if self.with_fc:
            self.fc = keras.layers.Dense(channels, name="fc", dtype=self.dtype_policy)
            self.fc.build((None, None, None, self.mixed_channels))
        self.input_spec = keras.layers.InputSpec(ndim=4, axes={-1: channels})

    def call(self, inputs, training=None):
        mixed = self._mix(inputs, training=training)
        return self.fc(mixed) if self.fc is not None else mixed

    def _mix(self, x, training=None):
        """The two BiLSTM scans, concatenated as [v_fwd, v_bwd, h_fwd, h_bwd]."""
        override = _MIX_OVERRIDE.get()
        if override == "keras":
            return self._mix_keras(x)
        if override is not None:
            return override(self, x)
        if self._standard and self.implementation == "auto" and keras.backend.backend() == "torch":
            return self._mix_torch(x)
        static = x.shape[1] is not None and x.shape[2] is not None
        if self.implementation == "fused" and not static:
            raise ValueError(
                f"Layer '{self.name}' with implementation='fused' needs the height and width "
                "at trace time; give the model a fixed input_shape or use implementation='auto'. "
                f"Received: input shape={tuple(x.shape)}"
            )
        use_fused = self.implementation == "fused" or (
            self._standard and self.implementation == "auto" and static and not training and not _gpu_backs_keras_lstm()
        )
        if not use_fused:
            return self._mix_keras(x)
        # TensorFlow inference: a scan (a while loop) compiles ~3x faster under XLA than the unrolled steps and
        # runs within 3% of them (Sequencer2D-S, 224, 2 cores: first call 5.7 s vs 16.6 s; 8.46 vs 8.75 img/s).
        # Not for training: the gradient of Keras' TF scan keeps per-step lists of unbounded size, which
        # `jit_compile=True` refuses ("XLA compilation requires a fixed tensor list size").
        # JAX keeps the unrolled steps (faster than lax.scan at batch 1: 1.02x vs 0.95x timm); torch is eager.
        # `training is False` (predict, evaluate), not `None`: a direct call inside a user's XLA-compiled
        # GradientTape loop may leave `training` unset.
        return self._mix_fused(x, scan=keras.backend.backend() == "tensorflow" and training is False)

    def _mix_fused(self, x, scan=False):
        """All four directional LSTMs from one input projection and batched recurrent steps.

        `scan`: step with `ops.scan` instead of Python-unrolled steps (same math).
        """
        height, width, units = x.shape[1], x.shape[2], self.hidden_size
        batch = ops.shape(x)[0]
        cells = [
            self.rnn_v.forward_layer.cell,
            self.rnn_v.backward_layer.cell,
            self.rnn_h.forward_layer.cell,
            self.rnn_h.backward_layer.cell,
        ]
        # `.value`: backend tensors (tf.stack rejects Keras variables).
        kernel = ops.concatenate([cell.kernel.value for cell in cells], axis=-1)  # (C, 4 directions x 4 gates x u)
        bias = ops.concatenate([cell.bias.value for cell in cells], axis=-1)
        proj = ops.reshape(ops.matmul(x, kernel) + bias, (-1, height, width, 4, 4 * units))
        # Time-major sequences: vertical (H steps, one per column), horizontal (W steps, one per row).
        v_in = ops.reshape(ops.transpose(proj[..., :2, :], (1, 3, 0, 2, 4)), (height, 2, -1, 4 * units))
        h_in = ops.reshape(ops.transpose(proj[..., 2:, :], (2, 3, 0, 1, 4)), (width, 2, -1, 4 * units))
        recurrent = ops.stack([cell.recurrent_kernel.value for cell in cells])  # (4, u, 4u)
        if height == width:  # B*W == B*H sequences: all four directions in one loop
            out = self._recur(ops.concatenate([v_in, h_in], axis=1), recurrent, cells[0], scan)
            v_out, h_out = out[:, :2], out[:, 2:]
        else:
            v_out = self._recur(v_in, recurrent[:2], cells[0], scan)
            h_out = self._recur(h_in, recurrent[2:], cells[0], scan)
        # (T, 2, N, u) -> channels-last maps ordered [fwd, bwd].
        v = ops.reshape(ops.transpose(v_out, (2, 0, 1, 3)), (batch, width, height, 2 * units))
        v = ops.transpose(v, (0, 2, 1, 3))
        h = ops.reshape(ops.transpose(h_out, (2, 0, 1, 3)), (batch, height, width, 2 * units))
        return ops.concatenate([v, h], axis=-1)

    @staticmethod
    def _recur(inputs, recurrent, cell, scan=False):
        """LSTM steps for D directions at once, with Keras' LSTMCell math; unrolled or as a scan.

        `inputs` is `(T, D, N, 4u)` (projected input + bias), directions
        alternating forward / backward: odd directions read the sequence in
        reverse and write their outputs back in the original order. Returns
        `(T, D, N, u)`.
        """
        steps, directions = inputs.shape[0], inputs.shape[1]
        # Backward directions read time-reversed input; their outputs are flipped back at the end.
        inputs = ops.stack(
            [ops.flip(inputs[:, d], axis=0) if d % 2 else inputs[:, d] for d in range(directions)], axis=1
        )
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
        return ops.stack(
            [ops.flip(outputs[:, d], axis=0) if d % 2 else outputs[:, d] for d in range(directions)], axis=1
        )

    def _mix_torch(self, x):
        """PyTorch backend only: both BiLSTMs on torch's own LSTM kernel (`torch.lstm`: one C++ loop
        on a CPU, cuDNN on a GPU), reading the same Keras variables; differentiable.

        Keras' LSTM on the torch backend steps in Python on a CPU; this is what timm runs.
        """
        import torch  # `_mix` calls this on the torch backend only

        batch, height, width, channels = (int(d) for d in x.shape)
        units = self.hidden_size

        def bilstm(bidirectional, sequences):
            weights = []
            for cell in (bidirectional.forward_layer.cell, bidirectional.backward_layer.cell):
                # Keras: kernel (C, 4u), recurrent (u, 4u), one bias; torch: transposed, two biases.
                bias = cell.bias.value.to(sequences.dtype)
                weights += [cell.kernel.value.to(sequences.dtype).T.contiguous(),
                            cell.recurrent_kernel.value.to(sequences.dtype).T.contiguous(),
                            bias, torch.zeros_like(bias)]  # fmt: skip
            zeros = sequences.new_zeros((2, sequences.shape[0], units))
            # (input, (h0, c0), weights, has_biases, num_layers, dropout, train, bidirectional, batch_first)
            return torch.lstm(sequences, (zeros, zeros), weights, True, 1, 0.0, False, True, True)[0]

        x = torch.as_tensor(x)
        columns = x.permute(0, 2, 1, 3).reshape(batch * width, height, channels)
        v = bilstm(self.rnn_v, columns).reshape(batch, width, height, 2 * units).permute(0, 2, 1, 3)
        h = bilstm(self.rnn_h, x.reshape(batch * height, width, channels)).reshape(batch, height, width, 2 * units)
        return torch.cat([v, h], dim=-1)

    def _mix_keras(self, x):
        """The recurrent sublayers as composed Keras layers (any option)."""
        batch, height, width = ops.shape(x)[0], ops.shape(x)[1], ops.shape(x)[2]
        channels = x.shape[-1]
        units = (2 if self.bidirectional else 1) * self.hidden_size
        v = h = None
        if self.rnn_v is not None:  # vertical: one sequence of length `height` per column
            columns = ops.reshape(ops.transpose(x, (0, 2, 1, 3)), (-1, height, channels))
            v = ops.transpose(ops.reshape(self.rnn_v(columns), (batch, width, height, units)), (0, 2, 1, 3))
        if self.rnn_h is not None:  # horizontal: one sequence of length `width` per row
            rows = ops.reshape(x, (-1, width, channels))
            h = ops.reshape(self.rnn_h(rows), (batch, height, width, units))
        if v is None or h is None:
            return h if v is None else v
        return ops.concatenate([v, h], axis=-1) if self.union == "cat" else v + h

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_size": self.hidden_size,
                "implementation": self.implementation,
                "rnn_type": self.rnn_type,
                "bidirectional": self.bidirectional,
                "union": self.union,
                "with_fc": self.with_fc,
            }
        )
        return config
