"""The token-mixing seam: which path runs, exporters' choice, and the paths' backend limits."""

from conftest import (
    BACKEND,
    TINY,
    global_dtype_policy,
    load_timm_lstm2d,
    loss_and_gradients,
    timm_lstm2d_gradients,
    tiny_model,
    to_numpy,
)
import keras
import numpy as np
import pytest

import keras_sequencer as ks
from keras_sequencer.layers import BiLSTM2D, token_mixing


def _layer_and_input(implementation="auto", seed=0):
    layer = BiLSTM2D(3, implementation=implementation)
    x = np.random.RandomState(seed).randn(2, 4, 5, 6).astype("float32")
    layer.build(x.shape)
    return layer, keras.ops.convert_to_tensor(x)


def test_every_path_gives_the_same_tokens():
    """Each path of `PATHS` this backend can run, forced with `use_path`, mixes like the Keras layers."""
    layer, x = _layer_and_input()
    expected = to_numpy(token_mixing.mix_keras(layer, x))
    for path in token_mixing.PATHS:
        if path in token_mixing.NATIVE_PATHS and path != BACKEND:
            continue
        with token_mixing.use_path(path):
            np.testing.assert_allclose(to_numpy(token_mixing.mix(layer, x)), expected, atol=2e-6, err_msg=path)


def test_use_path_overrides_the_implementation_and_keeps_ablations_on_keras(monkeypatch):
    """Inside `use_path` every standard layer runs the forced path whatever its `implementation`; a layer
    with an ablation option runs the only path that implements it."""
    ran = []
    for name in ("mix_keras", "mix_fused"):
        real = getattr(token_mixing, name)
        monkeypatch.setattr(token_mixing, name, lambda layer, x, *a, _real=real, _name=name, **k: ran.append(_name)
                            or _real(layer, x, *a, **k))  # fmt: skip
    layer, x = _layer_and_input(implementation="keras")
    with token_mixing.use_path("unrolled"):
        token_mixing.mix(layer, x)
    gru = BiLSTM2D(3, rnn_type="gru")
    gru.build(x.shape)
    with token_mixing.use_path("unrolled"):
        token_mixing.mix(gru, x)
    token_mixing.mix(layer, x)  # outside the block: the layer's own choice again
    assert ran == ["mix_fused", "mix_keras", "mix_keras"]
    with pytest.raises(ValueError, match=r"`path` must be one of .*Received: path='cudnn'"):
        with token_mixing.use_path("cudnn"):
            pass


@pytest.mark.skipif(
    BACKEND != "jax",
    reason="the scan rule for training is JAX's; PyTorch trains on "
    "torch.lstm and TensorFlow on its own LSTM paths whatever the device",
)
@pytest.mark.parametrize("default_backend", ["cpu", "gpu", "tpu"])
def test_auto_trains_through_the_scan_on_jax(monkeypatch, default_backend):
    """On JAX, "auto" trains through the hand-written scan whatever JAX's default device, and its backward
    pass forms the weights' gradients step by step on a CPU only; inference keeps the unrolled steps. What it
    computes is the Keras layers' result whatever the choice."""
    import jax

    with monkeypatch.context() as patch:  # only while asking: Keras' own LSTM asks JAX too (cuDNN on a GPU)
        patch.setattr(jax, "default_backend", lambda: default_backend)
        accelerator = token_mixing.jax_on_accelerator.__wrapped__()
    assert accelerator == (default_backend != "cpu")
    monkeypatch.setattr(token_mixing, "jax_on_accelerator", lambda: accelerator)
    ran = []
    for name in ("mix_keras", "mix_fused", "mix_scan_trainable"):
        real = getattr(token_mixing, name)
        monkeypatch.setattr(token_mixing, name, lambda layer, x, *a, _real=real, _name=name, **k: ran.append(_name)
                            or _real(layer, x, *a, **k))  # fmt: skip
    layer, x = _layer_and_input()
    expected = to_numpy(token_mixing.mix_keras(layer, x))
    ran.clear()
    trained = to_numpy(token_mixing.mix(layer, x, training=True))
    inferred = to_numpy(token_mixing.mix(layer, x, training=False))
    assert ran == ["mix_scan_trainable", "mix_fused"]
    assert token_mixing._weight_gradients_per_step() == (default_backend == "cpu")
    np.testing.assert_allclose(trained, expected, atol=2e-6)
    np.testing.assert_allclose(inferred, expected, atol=2e-6)


@pytest.mark.skipif(BACKEND == "torch", reason="the scan's own backward pass exists on TensorFlow and JAX")
def test_scan_trains_under_mixed_float16():
    """Under mixed_float16 (what "auto" trains through on a JAX GPU) the scan computes in float16, and its output
    and gradients equal those of Keras' own LSTM layers in float32 to float16's precision (one percent of each
    tensor's largest value). The reference is float32 because Keras' layers cannot compile in float16 on a JAX
    GPU."""
    x = np.random.RandomState(1).randn(2, 4, 4, 6).astype("float32")
    weights = np.random.RandomState(2).randn(2, 4, 4, 6).astype("float32")
    found = {}
    for implementation, policy in (("keras", "float32"), ("scan", "mixed_float16")):
        with global_dtype_policy(policy):
            layer = BiLSTM2D(3, implementation=implementation)
            layer.build(x.shape)
            if implementation == "keras":
                values = layer.get_weights()
            else:
                layer.set_weights(values)
            out = layer(x, training=True)
            found[implementation] = (to_numpy(out).astype("float32"), *loss_and_gradients(layer, x, weights)[1:])
    assert keras.backend.standardize_dtype(out.dtype) == "float16"
    (out, d_x, d_values), (ref_out, ref_d_x, ref_d_values) = found["scan"], found["keras"]
    for got, expected in zip([out, d_x, *d_values], [ref_out, ref_d_x, *ref_d_values], strict=True):
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, expected, atol=1e-2 * np.abs(expected).max())


@pytest.mark.parametrize("path", sorted(token_mixing.NATIVE_PATHS))
def test_native_paths_need_their_backend(path):
    """`implementation="torch"` / `"tensorflow"` run one backend's own LSTM kernel: there they mix like the Keras
    layers; elsewhere the builder refuses them at once, and a layer restored from another backend's config loads
    (so the file can be exported) but refuses to run."""
    layer, x = _layer_and_input(implementation=path)
    if BACKEND == path:
        np.testing.assert_allclose(to_numpy(layer(x)), to_numpy(layer.fc(token_mixing.mix_keras(layer, x))), atol=2e-6)
        return
    name = token_mixing.NATIVE_PATHS[path]
    message = rf"needs the {name} backend.*Received: implementation='{path}'"
    with pytest.raises(ValueError, match=message):
        layer(x)
    with pytest.raises(ValueError, match=message):
        ks.Sequencer2D(**TINY, implementation=path)
    with pytest.raises(ValueError, match=f"needs the {name} backend"), token_mixing.use_path(path):
        pass
    # So does a backbone saved on that backend.
    config = ks.Sequencer2DBackbone(**TINY).get_config() | {"implementation": path}
    restored = ks.Sequencer2DBackbone.from_config(config)
    assert restored.get_config() == config
    with pytest.raises(ValueError, match=message):
        restored(np.zeros((1, 32, 32, 3), "float32"))
    # Exporters choose their own path for every layer, whatever the layer's implementation.
    with token_mixing.use_path("keras"):
        np.testing.assert_allclose(to_numpy(token_mixing.mix(layer, x)), to_numpy(token_mixing.mix_keras(layer, x)))


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's own LSTM kernel and XLA's limits are TensorFlow's")
def test_tensorflow_trains_on_its_lstm_kernel_without_loops_except_under_xla(monkeypatch):
    """On TensorFlow without a GPU, "auto" trains through TensorFlow's LSTM kernel: the training step's graph
    holds one `BlockLSTMV2` op per direction and one gradient op each, and no while-loop (what makes S's graph
    slow to build), at unknown sizes and sequences longer than Keras' path would unroll too. In float32 only, and
    not where a GPU backs Keras' LSTM (cuDNN). Under XLA, which has no such kernel, "auto" keeps Keras' layers
    and an explicit `implementation="tensorflow"` says what to change."""
    import tensorflow as tf

    monkeypatch.setattr(token_mixing, "gpu_backs_keras_lstm", lambda: False)

    def op_types(implementation, jit_compile=False, shape=(2, 4, 5, 6)):
        layer = BiLSTM2D(3, implementation=implementation)
        layer.build((None, None, None, 6))

        def step(x):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(layer(x, training=True) ** 2)
            return tape.gradient(loss, layer.trainable_variables)

        function = tf.function(step, jit_compile=jit_compile)
        graph = function.get_concrete_function(tf.TensorSpec(shape, tf.float32)).graph
        types = [op.type for op in graph.get_operations()]
        for f in graph._functions.values():  # the custom gradient's and loops' bodies
            types += [node.op for node in f.cached_definition.node_def]
        return types

    for shape in [(2, 4, 5, 6), (2, 3, token_mixing.MAX_UNROLLED_STEPS + 1, 6), (2, None, None, 6)]:
        types = op_types("auto", shape=shape)
        assert types.count("BlockLSTMV2") == 4 and types.count("BlockLSTMGradV2") == 4, shape
        assert not {"While", "StatelessWhile"} & set(types), shape
    assert {"While", "StatelessWhile"} & set(op_types("keras", shape=(2, None, None, 6)))  # what the check sees
    types = op_types("auto", jit_compile=True)
    assert "BlockLSTMV2" not in types
    with global_dtype_policy("mixed_bfloat16"):  # the kernel computes in float32: 16-bit policies keep Keras' layers
        assert "BlockLSTMV2" not in op_types("auto")
    monkeypatch.setattr(token_mixing, "gpu_backs_keras_lstm", lambda: True)
    assert "BlockLSTMV2" not in op_types("auto")  # cuDNN through Keras' layers
    with pytest.raises(ValueError, match=r"XLA cannot compile; call it outside `tf.function\(jit_compile=True\)`"):
        op_types("tensorflow", jit_compile=True)
    # A model holding the explicit path is compiled without XLA (Keras warns), and trains.
    model = keras.Sequential([keras.Input((4, 5, 6)), BiLSTM2D(3, implementation="tensorflow")])
    with pytest.warns(UserWarning, match="doesn't support `jit_compile=True`"):
        model.compile(optimizer="sgd", loss="mse", jit_compile=True)
    assert model.jit_compile is False
    x = np.random.RandomState(0).randn(2, 4, 5, 6).astype("float32")
    assert np.isfinite(model.train_on_batch(x, x))


@pytest.mark.skipif(BACKEND != "torch", reason="the torch path, and its weight copies, exist on PyTorch only")
def test_torch_path_reuses_its_weight_copies_only_while_the_weights_stay():
    """Inference on the torch path keeps the LSTM weights in torch's layout between calls; after
    `set_weights` or an optimizer step the next call mixes with the new weights, as Keras' own LSTMs do."""
    import torch

    layer, x = _layer_and_input(implementation="torch")
    cell = layer.rnn_h.backward_layer.cell
    with torch.no_grad():
        first = to_numpy(token_mixing.mix(layer, x))
        copies = token_mixing._torch_lstm_weights(cell, torch.float32)
        assert token_mixing._torch_lstm_weights(cell, torch.float32) is copies
        np.testing.assert_array_equal(to_numpy(token_mixing.mix(layer, x)), first)
    with torch.enable_grad():  # autograd: fresh copies that carry the gradient to the variables
        assert token_mixing._torch_lstm_weights(cell, torch.float32)[0].requires_grad

    layer.set_weights([w * 1.5 + 0.1 for w in layer.get_weights()])
    with torch.no_grad():
        after_set = to_numpy(token_mixing.mix(layer, x))
    assert np.abs(after_set - first).max() > 1e-2
    np.testing.assert_allclose(after_set, to_numpy(token_mixing.mix_keras(layer, x)), atol=2e-6)

    variables = layer.trainable_variables
    keras.optimizers.SGD(0.05).apply([keras.ops.ones_like(v) for v in variables], variables)
    with torch.no_grad():
        after_step = to_numpy(token_mixing.mix(layer, x))
    assert np.abs(after_step - after_set).max() > 1e-3
    np.testing.assert_allclose(after_step, to_numpy(token_mixing.mix_keras(layer, x)), atol=2e-6)


@pytest.mark.skipif(BACKEND != "torch", reason="meta tensors are PyTorch's")
def test_meta_tensors_get_the_real_shape_without_running_a_recurrence(monkeypatch):
    """Keras infers outputs on data-less "meta" tensors (the first `fit`, `train_on_batch` or `evaluate` call
    runs the model so): every path answers them with the shape and dtype of a real call, float32 and bfloat16,
    without running its LSTMs, which have no meta kernels and decompose into Python per step. A model's first
    training step still runs `torch.lstm` on the real batch only."""
    import torch

    devices, real_lstm = [], torch.lstm
    monkeypatch.setattr(torch, "lstm", lambda x, *args: devices.append(x.device.type) or real_lstm(x, *args))
    keras_calls, real_mix_keras = [], token_mixing.mix_keras
    monkeypatch.setattr(token_mixing, "mix_keras", lambda layer, x, *a, **k: keras_calls.append(x.device.type)
                        or real_mix_keras(layer, x, *a, **k))  # fmt: skip
    x = keras.ops.convert_to_tensor(np.random.RandomState(0).randn(2, 4, 5, 6).astype("float32"))
    for policy, dtype in (("float32", torch.float32), ("mixed_bfloat16", torch.bfloat16)):
        with global_dtype_policy(policy):  # a layer's inputs arrive in its compute dtype
            layers = [BiLSTM2D(3, implementation=path) for path in ("torch", "keras")]
            layers.append(BiLSTM2D(3, bidirectional=False, union="add", rnn_type="gru"))  # an ablation
        for layer in layers:
            layer.build(x.shape)
            real = token_mixing.mix(layer, x.to(dtype))
            inferred = token_mixing.mix(layer, torch.empty(x.shape, dtype=dtype, device="meta"))
            assert (inferred.device.type, inferred.shape, inferred.dtype) == ("meta", real.shape, real.dtype)
    assert len(devices) == 4 and "meta" not in devices, devices  # two BiLSTMs per real call of the torch path
    assert len(keras_calls) == 4 and "meta" not in keras_calls, keras_calls

    model = tiny_model(input_shape=(16, 16, 3))  # "auto": the torch path
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    devices.clear()
    model.train_on_batch(np.zeros((2, 16, 16, 3), "float32"), np.zeros(2, "int32"))
    assert devices and "meta" not in devices, devices


@pytest.mark.parametrize("path", token_mixing.EXPORT_PATHS)
def test_export_paths_compute_the_lstm_on_tensorflow_only(path):
    """The export-only paths build TensorFlow graphs: the same tokens there, on non-square and square maps at
    batch 1 and 2 (the unrolled path lays each out differently), and a clear error elsewhere."""
    layer, x = _layer_and_input()
    with token_mixing.use_path(path):
        if BACKEND != "tensorflow":
            with pytest.raises(ValueError, match="needs the TensorFlow backend"):
                token_mixing.mix(layer, x)
            return
        for shape in ((2, 4, 5, 6), (2, 5, 5, 6), (1, 5, 5, 6), (1, 3, 7, 6)):
            x = keras.ops.convert_to_tensor(np.random.RandomState(sum(shape)).randn(*shape).astype("float32"))
            expected = to_numpy(token_mixing.mix_keras(layer, x))
            np.testing.assert_allclose(to_numpy(token_mixing.mix(layer, x)), expected, atol=2e-6, err_msg=str(shape))


@pytest.mark.parametrize("implementation", ["scan", "scan_batched_gradients", "keras", "auto"])
@pytest.mark.parametrize("shape", [(2, 4, 4, 6), (1, 3, 5, 6)], ids=["square", "non-square"])
def test_training_path_gradients_equal_timms(shape, implementation, monkeypatch):
    """The training paths' gradients equal PyTorch autograd through timm's LSTM2d, with respect to the input and
    to every LSTM and projection weight: the `"scan"` path (hand-written on TensorFlow and JAX) on square maps
    (all four directions in one loop) and non-square ones (two pairs), the `"keras"` path (on TensorFlow
    these short sequences run unrolled), and what "auto" trains through (TensorFlow's LSTM kernel with its
    gradient op on TensorFlow, torch.lstm on PyTorch). On JAX on a CPU the scan's backward pass forms the
    weights' gradients step by step; `scan_batched_gradients` checks the batched form that JAX keeps on GPUs
    and TPUs."""
    from timm.models.sequencer import LSTM2d
    import torch

    if implementation == "scan_batched_gradients":
        if not token_mixing._weight_gradients_per_step():
            pytest.skip("only JAX on a CPU forms the scan's weight gradients step by step; `scan` checks this form")
        monkeypatch.setattr(token_mixing, "_weight_gradients_per_step", lambda: False)
        implementation = "scan"

    torch.manual_seed(0)
    module = LSTM2d(shape[-1], 3)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = np.random.RandomState(1).randn(*shape).astype("float32")
    weights = np.random.RandomState(2).randn(*shape).astype("float32")
    x_torch = torch.tensor(x, requires_grad=True)
    expected_loss = (module(x_torch) * torch.from_numpy(weights)).sum()
    expected_loss.backward()
    grads = {name: p.grad.numpy() for name, p in module.named_parameters()}

    layer = BiLSTM2D(3, implementation=implementation)
    layer.build(shape)
    load_timm_lstm2d(layer, module)
    loss, d_x, d_values = loss_and_gradients(layer, x, weights)
    assert loss == pytest.approx(float(expected_loss), abs=1e-5)
    np.testing.assert_allclose(d_x, x_torch.grad.numpy(), atol=1e-5, rtol=1e-5)
    found = {v.path: d for v, d in zip(layer.trainable_variables, d_values, strict=True)}
    expected = timm_lstm2d_gradients(layer, grads)
    assert found.keys() == expected.keys()
    for path, gradient in expected.items():
        np.testing.assert_allclose(found[path], gradient, atol=1e-5, rtol=1e-5, err_msg=path)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="unrolling the Keras LSTMs' steps is TensorFlow's choice only")
def test_tensorflow_unrolls_short_keras_lstm_loops_except_for_exporters():
    """The "keras" path traces a direction without while-loops when its side of the map is known and at most
    `MAX_UNROLLED_STEPS`, with loops beyond it, and always under an exporter's `use_path("keras")`; the layer's
    config keeps the loops."""
    import tensorflow as tf

    layer = BiLSTM2D(3, implementation="keras")
    layer.build((None, None, None, 6))

    def loops(shape, forced=False):
        spec = tf.TensorSpec(shape, tf.float32)
        function = tf.function(lambda x: layer(x, training=True))
        if forced:
            with token_mixing.use_path("keras"):
                graph = function.get_concrete_function(spec).graph
        else:
            graph = function.get_concrete_function(spec).graph
        return sum(op.type in ("While", "StatelessWhile") for op in graph.get_operations())

    limit = token_mixing.MAX_UNROLLED_STEPS
    assert loops((2, limit, 3, 6)) == 0
    assert loops((2, limit + 1, 3, 6)) == 2  # the vertical pair (forward and backward) loops, rows are unrolled
    assert loops((2, 3, limit + 1, 6)) == 2
    assert loops((2, None, None, 6)) == 4
    assert loops((2, 3, 5, 6), forced=True) == 4
    assert not layer.rnn_v.forward_layer.unroll and not layer.rnn_v.forward_layer.get_config()["unroll"]
