"""Sequencer2DModel: input checks, XLA predict and evaluate on CPU TensorFlow, saving / reloading across backends."""

import contextlib
import dataclasses
import io
import json

from conftest import (
    BACKEND,
    ONE_BLOCK,
    TINY,
    evaluated,
    global_dtype_policy,
    keras_calls_without_autograd,
    perturb_weights,
    record_traced_batches,
    run_python,
    tiny_model,
    to_numpy,
)
import keras
import numpy as np
import pytest

import keras_sequencer as ks


def _tiny(**kwargs):
    return ks.Sequencer2D(**TINY, **kwargs)


@pytest.mark.parametrize(
    "shape,message",
    [
        ((16, 16, 3), r"add a batch axis.*Received: inputs.shape=\(16, 16, 3\)"),
        ((1, 6, 30, 3), r"at least 8x8 pixels.*Received: inputs.shape=\(1, 6, 30, 3\)"),
    ],
)
def test_bad_images_at_call_time(shape, message):
    model = _tiny()
    with pytest.raises(ValueError, match=message):
        model(np.zeros(shape, "float32"))
    with pytest.raises(ValueError, match=message):
        model.predict(np.zeros(shape, "float32"), verbose=0)


def test_a_rejected_predict_leaves_the_model_whole():
    model = _tiny(input_shape=(None, None, 3))
    images = np.random.RandomState(0).uniform(0, 255, (2, 16, 16, 3)).astype("float32")
    expected = model.predict(images, verbose=0)
    weights = [to_numpy(w) for w in model.get_weights()]
    bad = {
        "too small": (np.zeros((1, 6, 6, 3), "float32"), "at least 8x8 pixels"),
        "rank 3": (images[0], "add a batch axis"),
        "RGBA": (np.zeros((1, 16, 16, 4), "float32"), "with 3 channels"),
        "channels first": (np.zeros((1, 3, 16, 16), "float32"), "with 3 channels"),
        "empty batch": (np.zeros((0, 16, 16, 3), "float32"), "empty batch"),
    }
    for _, (x, message) in bad.items():  # every call, not only the first, and after a predict at 16x16
        for call in (lambda x: model.predict(x, verbose=0), model.predict_on_batch):
            with pytest.raises(ValueError, match=message):
                call(x)
    for got, want in zip(model.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(to_numpy(got), want)
    np.testing.assert_allclose(model.predict(images, verbose=0), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(to_numpy(model(images)), expected, rtol=0, atol=1e-5)


def test_predict_matches_eager_calls_and_uses_xla_on_cpu_tensorflow(xla_requests):
    """`predict` equals a direct call; on CPU-only TensorFlow Keras is asked to XLA-compile its predict step
    (Keras alone would not on a CPU) unless `xla_predict_on_cpu` is turned off, which the next call follows."""
    model = _tiny(input_shape=(24, 40, 3), classifier_activation=None)
    x = np.random.RandomState(0).uniform(0, 255, (2, 24, 40, 3)).astype("float32")
    eager = to_numpy(model(x, training=False))
    tensorflow = keras.backend.backend() == "tensorflow"
    jit_requests = xla_requests
    jit_requests.clear()  # from here on: the requests of `predict_on_batch`
    np.testing.assert_allclose(to_numpy(model.predict_on_batch(x)), eager, rtol=0, atol=1e-5)
    if tensorflow:
        assert jit_requests and model._predict_compiled  # predict's step function was asked to be XLA-compiled
        assert not model.jit_compile  # training keeps Keras' CPU default
        jit_requests.clear()
    model.xla_predict_on_cpu = False  # no `compile`, no `force`: the next call builds its step again
    np.testing.assert_allclose(to_numpy(model.predict_on_batch(x)), eager, rtol=0, atol=1e-5)
    if tensorflow:
        assert not jit_requests and not model._predict_compiled
    # Nor under a bfloat16 policy (XLA's CPU bfloat16 is slower than TensorFlow's kernels).
    with global_dtype_policy("mixed_bfloat16"):
        mixed = _tiny(input_shape=(24, 40, 3), classifier_activation=None)
    mixed.set_weights(model.get_weights())
    np.testing.assert_allclose(to_numpy(mixed.predict_on_batch(x)), eager, rtol=0, atol=0.05 * np.abs(eager).max())
    if tensorflow:
        assert not jit_requests


def test_predict_fills_a_partial_last_batch_where_each_shape_is_compiled(monkeypatch):
    """On JAX and TensorFlow's XLA predict, 65 NumPy images at batch size 4 reach Keras as the first 64 and
    then a batch of the last image and 3 copies (their outputs dropped), so one batch shape is compiled (on
    JAX: one trace of the step); the outputs equal direct calls. Not for backend tensors, nor where the
    copies would add more than a sixteenth of the work, nor on PyTorch or TensorFlow without XLA."""
    model = tiny_model(input_shape=(16, 16, 3))
    x = np.random.RandomState(0).uniform(0, 255, (65, 16, 16, 3)).astype("float32")
    reference = to_numpy(model(x, training=False))
    given, kinds = [], []
    keras_predict = keras.Model.predict

    def recording_predict(self, images, *args, **kwargs):  # TensorFlow's XLA predict: batched by tf.data
        batched = hasattr(images, "element_spec")
        kinds.append("dataset" if batched else "array")
        given.append(sum(len(b) for b in images) if batched else int(images.shape[0]))
        return keras_predict(self, images, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "predict", recording_predict)
    traced = record_traced_batches(monkeypatch, model)

    def check(images, calls):
        given.clear()
        got = model.predict(images, batch_size=4, verbose=0)
        assert got.shape == (len(images), 10)
        np.testing.assert_allclose(got, reference[: len(images)], rtol=0, atol=1e-5)
        assert given == calls, given

    padded = BACKEND in ("jax", "tensorflow")
    check(x, [64, 4] if padded else [65])
    if BACKEND == "jax":
        assert traced == [4], traced
    check(keras.ops.convert_to_tensor(x), [65])
    check(x[:33], [33])  # 3 copies would add more than a sixteenth: the last batch stays partial
    check(x.astype("float64"), [64, 4] if padded else [65])
    if BACKEND == "tensorflow":  # NumPy arrays through a tf.data pipeline without autotuning, tensors as given
        assert kinds == ["dataset", "dataset", "array", "dataset", "dataset", "dataset"], kinds
        model.xla_predict_on_cpu = False  # without XLA a partial batch costs no compilation: left as it is
        model.compile(loss="mse")
        kinds.clear()
        check(x, [65])
        assert kinds == ["array"], kinds


def test_evaluate_equals_the_logits_and_uses_xla_on_cpu_tensorflow(monkeypatch, xla_requests):
    """`evaluate` of NumPy images, labels and sample weights (a partial last batch included) gives the loss and
    accuracy computed here from the model's direct calls. On CPU-only TensorFlow its step is XLA-compiled
    (Keras alone would not) and the arrays reach Keras as one tf.data pipeline without autotuning; with
    `xla_evaluate_on_cpu` off (which the next call follows), or on JAX and PyTorch, Keras gets the arrays as
    given. `fit`'s validation runs through the same step."""
    model = tiny_model(input_shape=(16, 16, 3))
    rng = np.random.RandomState(0)
    x = rng.uniform(0, 255, (10, 16, 16, 3)).astype("float32")
    y = rng.randint(0, 10, 10)
    weights = rng.uniform(0.5, 2.0, 10).astype("float32")
    loss, accuracy = evaluated(to_numpy(model(x, training=False)), y, weights, batch_size=4)

    kinds, keras_evaluate = [], keras.Model.evaluate

    def recording_evaluate(self, data=None, *args, **kwargs):
        kinds.append(data.options().autotune.enabled if hasattr(data, "element_spec") else type(data).__name__)
        return keras_evaluate(self, data, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "evaluate", recording_evaluate)

    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), weighted_metrics=["accuracy"])

    def check(xla: bool, arrays_batched_here: bool):
        kinds.clear(), xla_requests.clear()
        got = model.evaluate(x, y, batch_size=4, sample_weight=weights, verbose=0, return_dict=True)
        np.testing.assert_allclose([got["loss"], got["accuracy"]], [loss, accuracy], rtol=1e-5)
        assert bool(xla_requests) == xla
        assert kinds == ([False] if arrays_batched_here else ["ndarray"]), kinds

    tensorflow = BACKEND == "tensorflow"
    check(xla=tensorflow, arrays_batched_here=tensorflow)
    assert model.jit_compile == (BACKEND == "jax")  # training keeps Keras' CPU default
    model.xla_evaluate_on_cpu = False  # no `compile`: the next `evaluate` builds its step again
    check(xla=False, arrays_batched_here=False)
    if tensorflow:  # elsewhere `xla_requests` records nothing, and training a model here would check nothing
        model.xla_evaluate_on_cpu = True
        model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        xla_requests.clear()
        model.fit(x, y, batch_size=4, epochs=1, validation_data=(x, y), verbose=0)  # validation: the XLA step
        assert len(xla_requests) == 1  # the test step's, not the training step's


_RELOAD = """
import json, os
import numpy as np, keras
import keras_sequencer as ks
x = np.load({x!r})
for kind in ("keras", "weights"):
    if kind == "keras":
        model = keras.models.load_model(os.path.join({directory!r}, "model.keras"))
    else:
        model = ks.Sequencer2D(**json.loads({config!r}), classes=5, classifier_activation=None, drop_path_rate=0.1)
        model.load_weights(os.path.join({directory!r}, "model.weights.h5"))
    y = keras.ops.convert_to_numpy(model.predict_on_batch(x))
    np.save(os.path.join({directory!r}, f"out_{{kind}}_{target}.npy"), y)
    print(kind, type(model).__name__, model.min_image_size)
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("saved")
    # drop_path_rate > 0 gives the blocks random state; it must not disturb reloading.
    model = ks.Sequencer2D(**TINY, classes=5, classifier_activation=None, drop_path_rate=0.1)
    x = np.random.RandomState(0).uniform(0, 255, (2, 24, 40, 3)).astype("float32")
    np.save(d / "x.npy", x)
    model.save(d / "model.keras")
    model.save_weights(d / "model.weights.h5")
    return d, to_numpy(model.predict_on_batch(x))


@pytest.mark.parametrize("target", ["tensorflow", "jax", "torch"])
def test_reload_on_every_backend(saved, target):
    """A `.keras` file and a `.weights.h5` saved on this backend give the same outputs on `target`: in a fresh
    process for the other backends (every class found again by its registered name), in this one for its own."""
    d, expected = saved
    code = _RELOAD.format(x=str(d / "x.npy"), directory=str(d), config=json.dumps(TINY), target=target)
    if target == BACKEND:
        with contextlib.redirect_stdout(io.StringIO()) as stdout:
            exec(code, {})
        stdout = stdout.getvalue()
    else:
        stdout = run_python(code, backend=target)
    for kind in ("keras", "weights"):
        assert f"{kind} Sequencer2DModel 8" in stdout  # the model class and its input check survive
        np.testing.assert_allclose(np.load(d / f"out_{kind}_{target}.npy"), expected, rtol=0, atol=1e-5,
                                   err_msg=f"{kind}: {BACKEND} -> {target}")  # fmt: skip


@pytest.mark.skipif(BACKEND != "torch", reason="PyTorch runs eagerly; the other backends trace the model once")
def test_torch_inference_runs_the_layer_chain_to_the_same_bit(monkeypatch, tmp_path):
    """Without autograd a float32 Sequencer2D on PyTorch runs its layers by their `call` (no Keras call per
    layer): `model(x)` and `predict_on_batch` give the output of Keras' calls without autograd to the bit (with
    it, within PyTorch's LSTM kernels' last bit), for float32 and uint8 images, and so does the model reloaded
    from a `.keras` file. Training, 16-bit policies, quantized layers, forward hooks and graphs that are not a
    chain keep Keras' calls."""
    import torch

    from keras_sequencer.layers import eager_torch
    from keras_sequencer.models import sequencer2d_model

    monkeypatch.setattr(eager_torch, "onednn_linear", lambda: False)  # torch's matmul: Keras' calls' bits
    chained = []
    real = eager_torch.call_chain
    monkeypatch.setattr(eager_torch, "call_chain", lambda chain, x: chained.append(len(chain)) or real(chain, x))
    model = tiny_model(include_preprocessing=True, classifier_activation="softmax")
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 40, 3)).astype("uint8")
    with keras_calls_without_autograd():
        expected = to_numpy(model(images.astype("float32"))).copy()
    assert chained == []
    with torch.no_grad():
        np.testing.assert_array_equal(to_numpy(model(images.astype("float32"))), expected)
    np.testing.assert_allclose(to_numpy(model(images.astype("float32"))), expected, rtol=0, atol=1e-6)  # autograd
    np.testing.assert_array_equal(model.predict_on_batch(images), expected)
    assert chained == [len(model.layers) - 1] * 2  # every layer but the input
    model.save(tmp_path / "model.keras")
    np.testing.assert_array_equal(keras.saving.load_model(tmp_path / "model.keras").predict_on_batch(images), expected)
    assert len(chained) == 3

    with torch.no_grad():
        model(images, training=True)
    hook = model.get_layer("norm").register_forward_hook(lambda *args: chained.append("hook"))
    model.predict_on_batch(images)
    assert chained[3:] == ["hook"]
    hook.remove()
    hook = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    model.predict_on_batch(images)
    hook.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.predict_on_batch(images)
    assert len(chained) == 4
    backbone = perturb_weights(ks.Sequencer2DBackbone(**TINY))
    with keras_calls_without_autograd():
        expected = to_numpy(backbone(images.astype("float32")))
    np.testing.assert_array_equal(backbone.predict_on_batch(images), expected)
    assert len(chained) == 5 and chained[-1] == len(backbone.layers) - 1
    # The output's structure is kept.
    named = sequencer2d_model.Sequencer2DModel(model.inputs, {"logits": model.outputs[0]})
    kinds = sequencer2d_model._CHAIN_TYPES
    assert eager_torch.layer_chain(named, kinds) is None and set(named.predict_on_batch(images)) == {"logits"}
    assert eager_torch.layer_chain(ks.feature_extractor(model), kinds) is None  # several outputs
    with global_dtype_policy("mixed_bfloat16"):
        half = tiny_model()
    half.predict_on_batch(images)
    model.quantize("int8")
    model.predict_on_batch(images)
    assert len(chained) == 5


@pytest.mark.skipif(BACKEND != "torch", reason="PyTorch runs eagerly; the other backends trace the model once")
def test_torch_bfloat16_inference_runs_the_blocks_directly_to_the_same_bit(monkeypatch):
    """Under "mixed_bfloat16" the blocks and patch embeddings of a Sequencer2D on PyTorch run torch's functions
    without autograd while the model keeps Keras' calls for its other layers: `predict_on_batch` gives the
    output of Keras' calls without autograd to the bit."""
    from keras_sequencer.layers import PatchEmbed, Sequencer2DBlock

    direct = []
    for kind in (Sequencer2DBlock, PatchEmbed):
        real = kind._torch_inference
        monkeypatch.setattr(kind, "_torch_inference",
                            lambda self, x, real=real: direct.append(type(self).__name__) or real(self, x))  # fmt: skip
    with global_dtype_policy("mixed_bfloat16"):
        model = tiny_model(include_preprocessing=True, classifier_activation="softmax")
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 40, 3)).astype("uint8")
    with keras_calls_without_autograd():
        expected = to_numpy(model(images.astype("float32")))
    assert direct == []
    np.testing.assert_array_equal(model.predict_on_batch(images), expected)
    assert direct.count("Sequencer2DBlock") == sum(TINY["layers"])
    assert direct.count("PatchEmbed") == len(TINY["layers"])


def test_config_round_trip_rebuilds_the_same_graph():
    model = ks.Sequencer2D(**TINY, include_top=False, pooling="max", include_preprocessing=False)
    clone = ks.models.Sequencer2DModel.from_config(model.get_config())
    assert type(clone) is ks.models.Sequencer2DModel
    assert [layer.get_config() for layer in clone.layers] == [layer.get_config() for layer in model.layers]
    assert clone.count_params() == model.count_params()


@pytest.mark.backend_agnostic
@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's fused Adam kernel (the TensorFlow pass)")
@pytest.mark.parametrize("optimizer", ["adam", "recipe"])
def test_tensorflow_fused_adam_moves_the_weights_as_keras_adam_does(monkeypatch, optimizer):
    """Keras' Adam, and AdamW as the recipes build it (a warmup-cosine schedule, weight decay with exclusions,
    clipping), update each variable with TensorFlow's fused kernel, one op per variable, and over three steps
    move the weights as Keras' own ops do (`fused_adam_on_tensorflow = False`) to float32 rounding."""
    import tensorflow as tf

    from keras_sequencer import train

    fused, real = [], tf.raw_ops.ResourceApplyAdam
    monkeypatch.setattr(tf.raw_ops, "ResourceApplyAdam", lambda **kwargs: fused.append(1) or real(**kwargs))
    models = tiny_model(input_shape=(16, 16, 3)), tiny_model(input_shape=(16, 16, 3))
    models[1].set_weights(models[0].get_weights())
    models[1].fused_adam_on_tensorflow = False
    recipe = dataclasses.replace(train.get_recipe("fashion_mnist"), clip_norm=1.0, warmup_epochs=1)
    rng = np.random.RandomState(0)
    x = rng.uniform(0, 255, (6, 16, 16, 3)).astype("float32")
    y = rng.randint(0, 10, 6)
    initial = models[0].get_weights()
    for model in models:
        made = keras.optimizers.Adam(0.01) if optimizer == "adam" else train.make_optimizer(recipe, 6, 2, epochs=2)
        model.compile(optimizer=made, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        for _ in range(3):
            model.train_on_batch(x, y)
        if model is models[0]:
            assert len(fused) == len(model.trainable_variables)  # one kernel per variable, traced once
    assert len(fused) == len(models[0].trainable_variables)  # none for Keras' ops
    # Adam moves every weight by about the learning rate, however small its gradient: where the gradient is
    # near zero the rounding of `1 - beta` shows, at most a thousandth of the three steps' size.
    size = 3 * float(keras.ops.convert_to_numpy(models[0].optimizer.learning_rate))
    for before, got, expected in zip(initial, models[0].get_weights(), models[1].get_weights(), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-3 * size)
        assert not np.allclose(expected, before, rtol=0, atol=1e-5), "every weight moves in three steps"


@pytest.mark.backend_agnostic
@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's traced weight decay (the TensorFlow pass)")
def test_tensorflow_weight_decay_reads_the_learning_rate_once_and_decays_to_keras_bit(monkeypatch):
    """The recipes' AdamW (a warmup-cosine schedule, weight decay with exclusions): in this package's
    `train_on_batch` the schedule is traced once per step for the decay, not once per decayed variable, and
    three steps leave the weights equal to the bit to those of Keras' own training step (a plain `keras.Model`
    over the same layers) from the same start."""
    from keras_sequencer import train

    schedule_class = type(train.learning_rate_schedule(train.get_recipe("fashion_mnist"), 6, 2, epochs=2))
    reads, keras_read = [0], schedule_class.__call__
    monkeypatch.setattr(
        schedule_class, "__call__", lambda *args: reads.__setitem__(0, reads[0] + 1) or keras_read(*args)
    )
    ours, other = (
        perturb_weights(
            ks.Sequencer2D(**ONE_BLOCK, weights=None, classes=10, classifier_activation=None, input_shape=(16, 16, 3))
        )
        for _ in range(2)
    )
    ours.fused_adam_on_tensorflow = False  # TensorFlow's fused Adam rounds differently; the decay is checked here
    other.set_weights(ours.get_weights())
    plain = keras.Model(other.inputs, other.outputs)  # Keras' training step and optimizer as they are
    recipe = dataclasses.replace(train.get_recipe("fashion_mnist"), warmup_epochs=1)
    rng = np.random.RandomState(0)
    x = rng.uniform(0, 255, (6, 16, 16, 3)).astype("float32")
    y = rng.randint(0, 10, 6)
    initial = ours.get_weights()
    counts = []
    for model in (ours, plain):
        model.compile(optimizer=train.make_optimizer(recipe, 6, 2, epochs=2),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))  # fmt: skip
        reads[0] = 0
        for _ in range(3):
            model.train_on_batch(x, y)
        counts.append(reads[0])
    for before, got, expected in zip(initial, ours.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_array_equal(got, expected)
        assert not np.array_equal(got, before)
    decayed = [v for v in ours.trainable_variables if plain.optimizer._use_weight_decay(v)]  # Keras' own rule
    assert len(decayed) >= 10
    # Traced once here (the optimizer is built first); Keras' step is traced twice while it builds it.
    assert counts[0] <= 2 and counts[1] >= len(decayed), (counts, len(decayed))


@pytest.mark.backend_agnostic
@pytest.mark.skipif(BACKEND != "tensorflow", reason="slices that TensorFlow runs side by side (the TensorFlow pass)")
def test_batches_in_parts_compute_what_whole_batches_do(xla_requests, monkeypatch):
    """`batch_parts`: direct calls and `predict` give the whole batch's outputs, `evaluate` the loss and
    accuracy computed here from them, and a training step the same loss and weights as whole batches, for
    batches the parts do not divide (7 in 3) and smaller than the parts (2 of them in `predict`'s last
    batch); `predict` and `evaluate` then run without XLA. No slice is empty (TensorFlow's oneDNN convolution
    gets an empty batch's shape wrong on some CPUs): a batch of fewer images than parts is padded."""
    from keras_sequencer.layers.patch_embed import PatchEmbed

    whole, parts = (
        ks.Sequencer2D(**ONE_BLOCK, weights=None, classes=10, classifier_activation=None, input_shape=(16, 16, 3))
        for _ in range(2)
    )  # one block: the slicing, not the architecture, is checked; it traces in a third of TINY's time
    parts.set_weights(perturb_weights(whole).get_weights())
    parts.batch_parts = 3
    rng = np.random.RandomState(0)
    x = rng.uniform(0, 255, (7, 16, 16, 3)).astype("float32")
    y = rng.randint(0, 10, 7)
    close = {"rtol": 1e-5, "atol": 1e-6}
    expected = to_numpy(whole(x, training=False))
    np.testing.assert_allclose(to_numpy(parts(x, training=False)), expected, **close)
    stems = []  # the batch size of every slice that reaches the stem, in eager calls
    real_call = PatchEmbed.call
    monkeypatch.setattr(
        PatchEmbed, "call", lambda self, inputs: stems.append(int(inputs.shape[0])) or real_call(self, inputs)
    )
    for count in (1, 2, 4):
        stems.clear()
        np.testing.assert_allclose(to_numpy(parts(x[:count], training=False)), expected[:count], **close)
        assert len(stems) >= 3 and 0 not in stems, (count, stems)
    monkeypatch.setattr(PatchEmbed, "call", real_call)
    for model in (whole, parts):
        model.compile(optimizer=keras.optimizers.SGD(0.5), metrics=["accuracy"],
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))  # fmt: skip
    xla_requests.clear()
    np.testing.assert_allclose(parts.predict(x, batch_size=5, verbose=0), expected, **close)
    got = parts.evaluate(x, y, batch_size=5, verbose=0)
    np.testing.assert_allclose(got, evaluated(expected, y, np.ones(7), batch_size=5), **close)
    assert not xla_requests, "predict and evaluate of a batch in parts are not compiled with XLA"
    initial = whole.get_weights()
    losses = [model.train_on_batch(x, y) for model in (whole, parts)]
    np.testing.assert_allclose(losses[1], losses[0], **close)
    moved = 0
    for before, after_whole, after_parts in zip(initial, whole.get_weights(), parts.get_weights(), strict=True):
        np.testing.assert_allclose(after_parts, after_whole, **close)
        moved += not np.allclose(after_whole, before, rtol=0, atol=1e-4)
    assert moved == len(initial), f"{len(initial) - moved} of {len(initial)} weights did not move in the step"


def test_batch_parts_takes_an_integer_and_more_than_one_on_tensorflow_only():
    """Bad values are refused with what to pass; more than 1 on JAX or PyTorch says to use TensorFlow; on
    TensorFlow a new value makes the next `predict` rebuild its step."""
    model = tiny_model(input_shape=(16, 16, 3))
    for bad in (0, -2, 1.5, "2", True):
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            model.batch_parts = bad
    x = np.zeros((2, 16, 16, 3), "float32")
    model.predict(x, verbose=0)
    if BACKEND != "tensorflow":
        with pytest.raises(ValueError, match="Use the TensorFlow backend"):
            model.batch_parts = 2
        assert model.batch_parts == 1 and model.predict_function is not None
    else:
        before = model.predict_function
        model.batch_parts = np.int64(2)
        assert model.batch_parts == 2 and type(model.batch_parts) is int
        model.predict(x, verbose=0)
        assert model.predict_function is not before and not model._predict_compiled
    model.batch_parts = 1


@pytest.mark.backend_agnostic
@pytest.mark.skipif(BACKEND != "tensorflow", reason="a property of Keras' TensorFlow trainer (the TensorFlow pass)")
def test_tensorflow_fit_traces_the_training_step_once(monkeypatch):
    """Without a tf.distribute strategy, Keras' TensorFlow trainer builds the optimizer inside the first
    traced step, whose new variables make TensorFlow trace it again (twice the graph building before the
    first step). The model builds its optimizer first: every token mixer is traced exactly once by `fit`."""
    from keras_sequencer.layers import BiLSTM2D, token_mixing

    traced = []
    real = token_mixing.mix
    monkeypatch.setattr(token_mixing, "mix", lambda *args, **kwargs: traced.append(1) or real(*args, **kwargs))
    model = ks.Sequencer2D(**TINY, input_shape=(32, 32, 3), classes=5)
    model.compile(optimizer="adamw", loss="sparse_categorical_crossentropy")
    x = np.random.RandomState(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    traced.clear()
    model.fit(x, np.arange(8) % 5, epochs=2, batch_size=4, verbose=0)
    assert len(traced) == sum(isinstance(layer, BiLSTM2D) for layer in model._flatten_layers())
    assert model.optimizer.built


def test_scan_path_trains_like_the_keras_path():
    """`fit` through the `"scan"` path (hand-written gradient on TensorFlow and JAX, compiled with XLA there)
    ends with the weights that `fit` through Keras' LSTM layers reaches from the same start."""
    x = np.random.RandomState(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    y = np.arange(8) % 5
    trained = {}
    for implementation in ("keras", "scan"):
        keras.utils.set_random_seed(1)
        model = ks.Sequencer2D(**TINY, input_shape=(32, 32, 3), classes=5, implementation=implementation)
        xla = implementation == "scan" and BACKEND != "torch"  # "auto": XLA on JAX, none on TensorFlow or PyTorch
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="sparse_categorical_crossentropy",
                      jit_compile=True if xla else "auto")  # fmt: skip
        model.fit(x, y, epochs=3, batch_size=4, shuffle=False, verbose=0)
        trained[implementation] = [to_numpy(w) for w in model.weights]
    for found, expected in zip(trained["scan"], trained["keras"], strict=True):
        np.testing.assert_allclose(found, expected, atol=1e-5, rtol=1e-5)
