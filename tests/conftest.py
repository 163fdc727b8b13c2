"""Shared test helpers: the timm reference, layout conversion, small models, images, subprocess runs.

The suite runs once per backend (`KERAS_BACKEND=tensorflow|jax|torch pytest`);
tests marked `backend_agnostic` do not depend on the Keras backend of the
process (pure NumPy, tf.data, TensorFlow's converters, or subprocesses that
choose their own backend), and `scripts/test.sh` runs them in the first pass
only. timm's PyTorch model is the independent reference everywhere.
"""

# isort: off
# timm pulls in torchvision and triton, whose LLVM crashes the process when it
# loads after TensorFlow's (torch 2.14 / TF 2.21); loaded first, both work.
import timm  # noqa: F401
# isort: on

import contextlib
import functools
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

BACKEND = keras.backend.backend()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _float32_matmuls_on_gpus():
    """On a GPU, the suite compares float32 results with timm on the CPU at float32 tolerances: TF32 tensor-core
    arithmetic, which PyTorch's cuDNN calls and JAX's default matmul precision allow there, is switched off
    (TensorFlow's GPU build, which allows it too, is not handled: no GPU run of the TensorFlow pass yet)."""
    import torch

    if torch.cuda.is_available():
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    if BACKEND == "jax":  # set without asking for the device: that would start JAX's backends in every worker
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")  # a GPU's default allows TF32


_float32_matmuls_on_gpus()

# Tests of TensorFlow's converters run in-process: backend-independent, but the process must be TensorFlow's.
IN_PROCESS_CONVERTERS = [
    pytest.mark.backend_agnostic,
    pytest.mark.skipif(
        BACKEND != "tensorflow",
        reason="TensorFlow's converters run in-process on the TensorFlow backend only (scripts/test.sh runs these "
        "in its TensorFlow pass; tests/export/test_export.py covers the other backends' route)",
    ),
]

# Tests that take minutes (real process groups, whole training runs, scripts): collected first, so that the
# pytest-xdist workers start them early instead of one worker finishing them alone at the end.
_LONG_FIRST = ("test_distributed.py", "kill_and_resume", "test_examples.py", "mirrored_strategy", "test_bench.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not any(part in item.nodeid for part in _LONG_FIRST))  # stable: order kept within


# Small architecture for tests that exercise plumbing rather than the paper's sizes.
TINY = {
    "layers": (2, 1, 1),
    "patch_sizes": (4, 2, 1),
    "embed_dims": (16, 24, 24),
    "hidden_sizes": (4, 6, 6),
    "mlp_ratios": (3.0, 3.0, 3.0),
}

# One block: for tests of the training plumbing (processes, devices, resume), where the architecture is not what
# is checked. Its training step traces and compiles in about a third of TINY's time, and those tests start
# dozens of fresh processes.
ONE_BLOCK = {
    "layers": (1,),
    "patch_sizes": (4,),
    "embed_dims": (16,),
    "hidden_sizes": (4,),
    "mlp_ratios": (2.0,),
}


@functools.cache
def timm_model(variant: str, seed: int = 0, **kwargs):
    """A timm Sequencer2D with EVERY parameter perturbed, so no swap can hide.

    Random init leaves LayerNorm gammas at 1, betas and several biases at 0 and
    the head at 0; each tensor gets its own noise so any two tensors differ.
    """
    import torch

    torch.manual_seed(seed)
    model = timm.create_model(f"sequencer2d_{variant}", pretrained=False, **kwargs).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.2 if ("norm" in name or "bias" in name) else 0.05
            p.add_(torch.randn_like(p) * scale)
    return model


def timm_state_dict(variant: str, **kwargs) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in timm_model(variant, **kwargs).state_dict().items()}


def timm_logits(variant: str, images_nhwc: np.ndarray, **kwargs) -> np.ndarray:
    """timm's logits for already-normalised NHWC float images."""
    import torch

    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
        return timm_model(variant, **kwargs)(x).float().numpy()  # float(): float32 also under torch.autocast


@contextlib.contextmanager
def _global_setting(read, write, value):
    previous = read()
    write(value)
    try:
        yield
    finally:
        write(previous)


def global_dtype_policy(name: str):
    """Keras' global dtype policy set to `name` inside the block, restored after it."""
    return _global_setting(keras.config.dtype_policy, keras.mixed_precision.set_global_policy, name)


def global_image_data_format(name: str):
    """Keras' global `image_data_format` set to `name` inside the block, restored after it."""
    return _global_setting(keras.config.image_data_format, keras.config.set_image_data_format, name)


@contextlib.contextmanager
def keras_calls_without_autograd():
    """PyTorch without autograd, with a global no-op forward hook: layers and models run through Keras' calls
    (`eager_torch` keeps them wherever a forward hook may fire), on the kernels PyTorch picks for inference.
    The reference of the direct paths' bit-for-bit tests: with autograd on, `torch.lstm` takes another kernel
    than without it, and on some CPUs its outputs differ in the last bit."""
    import torch

    hook = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        with torch.no_grad():
            yield
    finally:
        hook.remove()


def authors_layout(state_dict: dict, layers) -> dict:
    """timm layout -> the authors' GitHub-release layout (inverse of timm's filter).

    Written independently of `keras_sequencer.convert`: blocks move to
    `blocks.{s}.{j}`, each downsample becomes the last entry of the previous
    stage's Sequential, and the head loses its `.fc`.
    """
    out = {}
    for key, value in state_dict.items():
        if m := re.match(r"stages\.(\d+)\.blocks\.(\d+)\.(.*)", key):
            key = f"blocks.{m[1]}.{m[2]}.{m[3]}"
        elif m := re.match(r"stages\.(\d+)\.downsample\.(.*)", key):
            stage = int(m[1]) - 1
            key = f"blocks.{stage}.{layers[stage]}.{m[2]}"
        elif key.startswith("head.fc."):
            key = "head." + key[len("head.fc.") :]
        out[key] = value
    return out


def to_numpy(x) -> np.ndarray:
    return keras.ops.convert_to_numpy(x)


def random_images(n: int, height: int, width: int | None = None, channels: int = 3, seed: int = 0) -> np.ndarray:
    """float32 RGB-like images with values in [0, 255)."""
    shape = (n, height, width or height, channels)
    return np.random.default_rng(seed).uniform(0, 255, shape).astype("float32")


def perturb_weights(model: keras.Model, seed: int = 0, scale: float = 0.05) -> keras.Model:
    """Adds noise to every weight: random init leaves LayerNorms and biases at 1 / 0, where swaps could hide."""
    rng = np.random.default_rng(seed)
    model.set_weights([w + rng.normal(0, scale, w.shape).astype(w.dtype) for w in model.get_weights()])
    return model


def tiny_model(seed: int = 0, **kwargs) -> keras.Model:
    """A `TINY` Sequencer2D (logits, 10 classes unless given) with every weight perturbed."""
    import keras_sequencer as ks

    keras.utils.set_random_seed(seed)
    options = {"weights": None, "classes": 10, "classifier_activation": None, **kwargs}
    return perturb_weights(ks.Sequencer2D(**TINY, **options), seed)


@pytest.fixture
def xla_requests(monkeypatch) -> list:
    """The functions handed to `tf.function(..., jit_compile=True)` from now on, in a list that fills as they
    are; on TensorFlow only (elsewhere it stays empty), which must see no GPU: it is for CPU-only checks."""
    requests = []
    if BACKEND == "tensorflow":
        import tensorflow as tf

        assert not tf.config.list_logical_devices("GPU"), "this check is for CPU-only TensorFlow"
        real_function = tf.function

        def spy(*args, **kwargs):
            if kwargs.get("jit_compile") and args:
                requests.append(args[0])
            return real_function(*args, **kwargs)

        monkeypatch.setattr(tf, "function", spy)
    return requests


def record_traced_batches(monkeypatch, model) -> list:
    """The batch sizes `model`'s predict step is traced for from now on, in a list that fills as it is (on JAX:
    once per compiled batch shape; on TensorFlow and PyTorch the step runs per batch)."""
    traced, real_step = [], model.predict_step

    def recording_step(*args):  # (data) or, on JAX, (state, data)
        traced.append(keras.tree.flatten(args[-1])[0].shape[0])
        return real_step(*args)

    monkeypatch.setattr(model, "predict_step", recording_step)
    return traced


def evaluated(logits: np.ndarray, labels: np.ndarray, weights: np.ndarray, batch_size: int) -> tuple[float, float]:
    """What Keras' `evaluate` reports for sparse cross-entropy from logits and a weighted accuracy, in NumPy:
    the loss is each batch's mean of the weighted losses (divided by the batch's size, not by its weights),
    averaged over batches by size; the accuracy is the weighted mean of the hits."""
    logits = logits.astype("float64")
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    losses = -log_probs[np.arange(len(labels)), labels] * weights
    batch_means = [losses[i : i + batch_size].mean() for i in range(0, len(labels), batch_size)]
    sizes = [len(losses[i : i + batch_size]) for i in range(0, len(labels), batch_size)]
    loss = float(np.dot(batch_means, sizes) / len(labels))
    accuracy = float(((logits.argmax(-1) == labels) * weights).sum() / weights.sum())
    return loss, accuracy


def normalise(images_uint8: np.ndarray) -> np.ndarray:
    """ImageNet normalisation the way timm's eval transform does it (its constants, written out here)."""
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    return ((images_uint8.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)


# JAX's own compilation-cache settings (scripts/test.sh sets some for the whole run), each given as None: as `env`
# of `run_subprocess`, a fresh process with JAX's defaults, as a user's would start.
NO_JAX_CACHE_SETTINGS = dict.fromkeys(
    ("JAX_COMPILATION_CACHE_DIR", "JAX_COMPILATION_CACHE_MAX_SIZE", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
     "JAX_ENABLE_COMPILATION_CACHE")
)  # fmt: skip


def run_subprocess(args, backend: str = BACKEND, env: dict | None = None, timeout: int = 900):
    """Runs `args` (after the Python interpreter) in a fresh process on `backend`; returns the CompletedProcess.
    A variable of `env` given as None is removed from the process' environment."""
    full_env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    full_env = {name: value for name, value in full_env.items() if value is not None}
    return subprocess.run(
        [sys.executable, *map(str, args)], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=REPO
    )


def run_cli(*args, backend: str = BACKEND, env: dict | None = None, timeout: int = 900):
    """`python -m keras_sequencer ARGS` in a fresh process (with `env` added); returns the CompletedProcess."""
    return run_subprocess(["-m", "keras_sequencer", *args], backend=backend, env=env, timeout=timeout)


def run_python(code: str, backend: str = BACKEND, env: dict | None = None, timeout: int = 600) -> str:
    """Runs `code` in a fresh interpreter on `backend`; returns stdout, fails on error."""
    result = run_subprocess(["-c", code], backend=backend, env=env, timeout=timeout)
    if result.returncode != 0:
        pytest.fail(f"subprocess on {backend} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result.stdout


def run_layer_test(layer_cls, init_kwargs: dict, input_shape: tuple, expected_output_shape: tuple, seed: int = 0):
    """Shared checks for every layer: output shape, symbolic shape, config round trip.

    The rebuilt layer, given the original's weights, must give the same output.
    """
    x = np.random.RandomState(seed).randn(*input_shape).astype("float32")
    layer = layer_cls(**init_kwargs)
    y = to_numpy(layer(x))
    assert y.shape == expected_output_shape
    symbolic = layer.compute_output_shape(input_shape)
    assert tuple(symbolic) == expected_output_shape
    config = layer.get_config()
    for key, value in init_kwargs.items():
        assert config[key] == value, f"get_config()[{key!r}] = {config[key]!r}, expected {value!r}"
    clone = layer_cls.from_config(config)
    clone(x)
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(to_numpy(clone(x)), y, rtol=0, atol=1e-6)
    # The registered name lets a .keras file find the class again.
    assert keras.saving.get_registered_object(keras.saving.get_registered_name(layer_cls)) is layer_cls
    return layer, x, y


# === PyTorch references for the layers ===


def load_timm_lstm2d(layer, module) -> None:
    """Copies timm LSTM2d weights into BiLSTM2D by stating the layout facts directly:
    Keras kernels are transposed, both frameworks order gates [i, f, g/c, o], and
    PyTorch's two biases add up to Keras' one."""
    sd = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    for rnn in ("rnn_v", "rnn_h"):
        bidir = getattr(layer, rnn)
        for suffix, cell in (("", bidir.forward_layer.cell), ("_reverse", bidir.backward_layer.cell)):
            cell.kernel.assign(sd[f"{rnn}.weight_ih_l0{suffix}"].T)
            cell.recurrent_kernel.assign(sd[f"{rnn}.weight_hh_l0{suffix}"].T)
            cell.bias.assign(sd[f"{rnn}.bias_ih_l0{suffix}"] + sd[f"{rnn}.bias_hh_l0{suffix}"])
    layer.fc.kernel.assign(sd["fc.weight"].T)
    layer.fc.bias.assign(sd["fc.bias"])


def timm_lstm2d_gradients(layer, grads, prefix="") -> dict:
    """timm's `LSTM2d` gradients in the layouts of `layer`'s (a `BiLSTM2D`) variables, keyed by their paths.

    `grads`: PyTorch parameter name -> gradient, the LSTM2d's names under `prefix` (e.g. "rnn_tokens.")."""
    expected = {layer.fc.kernel.path: grads[f"{prefix}fc.weight"].T, layer.fc.bias.path: grads[f"{prefix}fc.bias"]}
    for rnn in ("rnn_v", "rnn_h"):
        for suffix, cell in (("", getattr(layer, rnn).forward_layer.cell),
                             ("_reverse", getattr(layer, rnn).backward_layer.cell)):  # fmt: skip
            expected[cell.kernel.path] = grads[f"{prefix}{rnn}.weight_ih_l0{suffix}"].T
            expected[cell.recurrent_kernel.path] = grads[f"{prefix}{rnn}.weight_hh_l0{suffix}"].T
            expected[cell.bias.path] = grads[f"{prefix}{rnn}.bias_ih_l0{suffix}"]  # one Keras bias = b_ih + b_hh
    return expected


def loss_and_gradients(layer, x, weights, graph=False):
    """sum(layer(x) * weights) and its gradients w.r.t. the input and every trainable variable, on this backend.

    `graph`: on TensorFlow, inside a `tf.function` (as `fit` runs it) rather than eagerly."""
    variables = layer.trainable_variables
    if BACKEND == "jax":
        import jax

        def loss(values, x):
            out, _ = layer.stateless_call(values, [v.value for v in layer.non_trainable_variables], x, training=True)
            return (out * weights).sum()

        value, (d_values, d_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))([v.value for v in variables], x)
        return float(value), np.asarray(d_x), [np.asarray(d) for d in d_values]
    if BACKEND == "tensorflow":
        import tensorflow as tf

        def loss(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                value = tf.reduce_sum(layer(x, training=True) * weights)
            return value, tape.gradient(value, [x, *variables])

        value, (d_x, *d_values) = (tf.function(loss) if graph else loss)(tf.constant(x))
        return float(value), d_x.numpy(), [d.numpy() for d in d_values]
    import torch

    x = torch.tensor(x, requires_grad=True)
    out = layer(x, training=True)  # on the GPU where Keras sees one; the gradient flows back to `x` on the CPU
    value = (out * torch.from_numpy(weights).to(out.device)).sum()
    value.backward()
    return float(value.detach()), x.grad.numpy(), [v.value.grad.cpu().numpy() for v in variables]


def torch_rnn(kind, channels, units, bidirectional):
    import torch

    cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[kind]
    return cls(channels, units, batch_first=True, bidirectional=bidirectional)


def copy_torch_rnn(keras_rnn, torch_module, kind):
    """PyTorch RNN weights -> a Keras RNN / Bidirectional layer, from the documented layouts.

    LSTM: gates [i, f, g, o] in both, one Keras bias = b_ih + b_hh. GRU: PyTorch
    gates [r, z, n], Keras [z, r, h] with reset_after=True keeping the two
    biases as rows. SimpleRNN: one bias = b_ih + b_hh.
    """
    sd = {k: v.detach().numpy() for k, v in torch_module.state_dict().items()}
    cells = [keras_rnn.forward_layer.cell, keras_rnn.backward_layer.cell] if hasattr(keras_rnn, "forward_layer") else [
        keras_rnn.cell
    ]  # fmt: skip
    for cell, suffix in zip(cells, ("", "_reverse"), strict=False):
        w_ih, w_hh = sd[f"weight_ih_l0{suffix}"], sd[f"weight_hh_l0{suffix}"]
        b_ih, b_hh = sd[f"bias_ih_l0{suffix}"], sd[f"bias_hh_l0{suffix}"]
        if kind == "gru":
            u = w_hh.shape[1]
            order = np.concatenate([np.arange(u, 2 * u), np.arange(u), np.arange(2 * u, 3 * u)])  # r,z,n -> z,r,n
            w_ih, w_hh, b_ih, b_hh = w_ih[order], w_hh[order], b_ih[order], b_hh[order]
            cell.bias.assign(np.stack([b_ih, b_hh]))
        else:
            cell.bias.assign(b_ih + b_hh)
        cell.kernel.assign(w_ih.T)
        cell.recurrent_kernel.assign(w_hh.T)


def perturb_torch(module, seed):
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return module.eval()
