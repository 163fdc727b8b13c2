"""Eager PyTorch inference without Keras' per-layer calls.

PyTorch runs a model eagerly, so Keras' per-call work (input conversion,
call context, autocast and mask handling) and the dtype checks of every
`keras.ops` call repeat on every forward pass. Its cost is more than its
~35 us of Python per layer: the pause lets PyTorch's OpenMP threads go
idle, and the next matmul pays for waking them (a 0.4 ms matmul took
~70 us longer right after a layer call; `benchmarks/README.md`). Without
autograd:

- `Sequencer2DBlock` and `PatchEmbed` call torch's own functions on their
  variables, the functions Keras' layers call, in float32 and under
  `"mixed_bfloat16"` (`runs_torch_functions`); in bfloat16 the weights'
  16-bit copies, which Keras' autocasting makes on every call, are kept
  (`values_as`);
- float32 Sequencer2D models run the layers of their chain by each layer's
  `call` (`layer_chain`, `call_chain`): for those layers in float32 without
  hooks, what `Layer.__call__` adds to `call` has nothing to do there.

The tests find the results equal to Keras' calls without autograd to the bit
on a CPU (with autograd, `torch.lstm` runs another kernel: on an AVX2 CPU
its outputs differ in the last bit), except where `onednn_linear` holds: there
the blocks' float32 `Dense` matmuls run in oneDNN, whose sums round in
another order.
Anything else keeps Keras' calls: autograd on, `torch.autocast`, forward
hooks, float16 policies (Keras' matmul computes float16 in float32 on a
CPU), quantized layers, rematerialisation, activity regularizers, LoRA on a
block's sublayers (a LoRA head runs its own `call`), graphs that are not a
chain of the known layers; and TensorFlow and JAX, which trace a model once.
"""

import contextlib
import functools
import weakref

import keras

from keras_sequencer.precision import cpu_flags, cpu_identity

_LINEAR = keras.activations.get(None)


def onednn_pays(identity, flags) -> bool:
    """Whether float32 linear layers run faster in oneDNN than in torch's matmul on a CPU of this `identity`
    (vendor, family) and x86 `flags`: AMD CPUs from the Zen 5 generation on (family 26) with AVX-512. On a
    Zen 5 CPU torch's float32 matmul (MKL) reached 196-213 GFLOP/s and oneDNN's linear 462-489 at 2048² and
    two of the blocks' shapes (134 against 205 at the third), and S's eager inference ran 1.5x faster with
    the blocks' `Dense` matmuls in oneDNN (benchmarks/README.md, "PyTorch inference: the blocks' matmuls in
    oneDNN"). Elsewhere, not measured or not faster, torch's matmul stays."""
    if identity is None or flags is None:
        return False
    vendor, family = identity
    return vendor == "AuthenticAMD" and family >= 26 and "avx512f" in flags


@functools.cache  # asked on every block's call; fixed per process
def onednn_linear() -> bool:
    """Whether eager float32 inference runs the blocks' `Dense` matmuls through oneDNN's linear
    (`torch.ops.mkldnn._linear_pointwise`, the op torch.compile's CPU weight freezing uses) instead of
    torch's matmul: on CPUs where `onednn_pays`, with a torch built with oneDNN. Same float32 math, summed
    in another order (last-bit differences from Keras' calls)."""
    import torch

    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._linear_pointwise  # noqa: B018  (an op a torch build may lack)
    except (AttributeError, RuntimeError):
        return False
    return onednn_pays(cpu_identity(), cpu_flags())


def linear(x, kernel, bias):
    """`x @ kernel + bias` for a `Dense` layer's variables in eager inference: oneDNN's linear for float32 on a
    CPU where `onednn_linear` and oneDNN is not switched off (`torch.backends.mkldnn.flags(enabled=False)`),
    else torch's matmul with the bias added in place."""
    import torch

    if x.dtype == torch.float32 and x.device.type == "cpu" and onednn_linear() and torch.backends.mkldnn.enabled:
        # oneDNN takes the weight as (out, in): the kernel's transposed view, no copy.
        return torch.ops.mkldnn._linear_pointwise(x, kernel.t(), bias, "none", [], "")
    return x.matmul(kernel).add_(bias)


# Compute dtypes whose layers may run torch's functions directly (`runs_torch_functions`).
DIRECT_DTYPES = ("float32", "bfloat16")


def eager_inference(x, dtypes=("float32",)) -> bool:
    """Whether `x` is a torch tensor of one of `dtypes` in eager PyTorch inference: the PyTorch backend,
    autograd off, no `torch.autocast`, no global forward hooks (which every layer call would run)."""
    if keras.backend.backend() != "torch":
        return False
    import torch
    from torch.nn.modules import module

    if torch.is_grad_enabled() or not isinstance(x, torch.Tensor) or x.is_meta:
        return False
    if keras.backend.standardize_dtype(x.dtype) not in dtypes:
        return False
    if autocast_dtype(x.device.type) is not None:
        return False
    return not (getattr(module, "_global_forward_hooks", None) or getattr(module, "_global_forward_pre_hooks", None))


def autocast_dtype(device_type: str):
    """The torch dtype `torch.autocast` computes in on `device_type`, or None where it is off. (torch < 2.4,
    whose calls take no device type, and a device type without autocast: the CPU's autocast, else the GPU's.)"""
    import torch

    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except (TypeError, RuntimeError, AttributeError):
        if torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


def plain(layer, compute_dtype="float32") -> bool:
    """Whether `layer.__call__` would compute nothing but `layer.call` on a tensor of `compute_dtype` without a
    mask: that compute dtype, not quantized, no rematerialisation, activity regularizer or forward hooks. (In
    float32 `call` alone gives the same result; a mixed policy's `__call__` also casts the variables.)"""
    policy = layer.dtype_policy
    return (
        policy.compute_dtype == compute_dtype
        and policy.quantization_mode is None
        and getattr(layer, "_remat_mode", None) is None
        and layer.activity_regularizer is None
        and not layer._forward_hooks
        and not layer._forward_pre_hooks
    )


def runs_torch_functions(x, layers) -> bool:
    """Whether a layer may compute `x` with torch's functions on the variables of `layers` (itself and the
    sublayers it would call): `eager_inference(x)` for one of `DIRECT_DTYPES`, every layer `plain` in
    `x`'s dtype; `Dense` and `Conv2D` ones exactly those classes, without activation or LoRA;
    `LayerNormalization` exactly that, centred and scaled, without RMS scaling."""
    if not eager_inference(x, DIRECT_DTYPES):
        return False
    dtype = keras.backend.standardize_dtype(x.dtype)
    dense, norm = (keras.layers.Dense, keras.layers.Conv2D), keras.layers.LayerNormalization
    for layer in layers:
        if not plain(layer, dtype):
            return False
        if isinstance(layer, dense) and (
            type(layer) not in dense or getattr(layer, "lora_enabled", False) or layer.activation is not _LINEAR
        ):
            return False
        if isinstance(layer, norm) and (
            type(layer) is not norm or layer.rms_scaling or not (layer.center and layer.scale)
        ):
            return False
    return True


@contextlib.contextmanager
def stored_values():
    """Within it a variable's `.value` is the tensor as stored: inside a mixed-precision layer's call Keras
    would give a 16-bit copy instead, and Keras' layer norm computes with the float32 values."""
    from keras.src.backend.common.variables import AutocastScope, get_autocast_scope

    if get_autocast_scope() is None:
        yield
        return
    with AutocastScope(None):
        yield


# owner -> (stamp, the source tensors, what was made from them); weak: dies with the owner. The entry holds
# the tensors, so the ids in its stamp cannot be reused while it lives.
_KEPT = weakref.WeakKeyDictionary()


def kept(owner, key, sources, make):
    """`make(*sources)`, made once for `owner` and `key` and reused while `sources` are the same tensors, unchanged.

    Keras writes a variable in place (`assign`), which bumps the tensor's
    version counter, part of the stamp; a new tensor has a new id. One
    entry per owner: another `key` replaces it.
    """
    stamp = (key, *(id(t) for t in sources), *(t._version for t in sources))
    cached = _KEPT.get(owner)
    if cached is None or cached[0] != stamp:
        cached = (stamp, sources, make(*sources))
        _KEPT[owner] = cached
    return cached[2]


def values_as(layer, names, dtype):
    """The values of `layer`'s variables `names` in torch dtype `dtype`, read inside `stored_values`: the
    tensors themselves where they have it, else copies kept by `kept` (the cast Keras' autocasting makes on
    every call)."""
    sources = tuple(getattr(layer, name).value for name in names)
    if all(t.dtype == dtype for t in sources):
        return sources
    return kept(layer, dtype, sources, lambda *tensors: tuple(t.to(dtype) for t in tensors))


# model -> its layers in order (None: not a chain); weak: dies with the model. A functional graph is fixed.
_CHAINS = weakref.WeakKeyDictionary()


def layer_chain(model, types) -> list | None:
    """The layers of a functional `model` in order when they form a chain: one input, one output, each layer
    of one of `types` (exactly) and called once on its predecessor's output alone, nothing else in the graph;
    otherwise None. `types`: layer classes whose `call` treats `training=None` as inference and takes no
    other call-context argument; one tuple per model (the answer is kept)."""
    if model not in _CHAINS:
        _CHAINS[model] = _find_chain(model, types)
    return _CHAINS[model]


def _find_chain(model, types):
    outputs = getattr(model, "_outputs_struct", None)
    if isinstance(outputs, (list, tuple)) and len(outputs) == 1:
        outputs = outputs[0]
    if len(model.inputs) != 1 or not keras.backend.is_keras_tensor(outputs):
        return None
    chain, tensor, start = [], outputs, model.inputs[0]
    while tensor is not start:
        layer, node_index, _ = tensor._keras_history
        node = layer._inbound_nodes[node_index]
        inputs, (args, kwargs) = node.input_tensors, (node.arguments.args, node.arguments.kwargs)
        if type(layer) not in types or len(inputs) != 1 or len(args) != 1 or args[0] is not inputs[0] or kwargs:
            return None
        chain.append(layer)
        tensor = inputs[0]
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if len({id(layer) for layer in chain}) != len(chain) or {id(layer) for layer in layers} != {id(x) for x in chain}:
        return None
    return chain[::-1]


def call_chain(chain, x):
    """`x` through `chain` by each layer's `call`, `training=False` where it takes one; see `layer_chain`."""
    for layer in chain:
        x = layer.call(x, training=False) if layer._call_has_training_arg else layer.call(x)
    return x


def run_model_chain(model, inputs, types):
    """`model`'s output by `call_chain`, or None where its layers must run through Keras' calls: another
    backend, autograd on, a model or layer that is not `plain`, a graph that is not a chain of `types` (see
    `layer_chain`), an input that is not a float32 tensor once converted as Keras' functional models convert
    it."""
    if keras.backend.backend() != "torch":
        return None
    import numpy as np
    import torch

    if torch.is_grad_enabled() or not plain(model):
        return None
    chain = layer_chain(model, types)
    if chain is None or not all(map(plain, chain)):
        return None
    x = inputs
    if isinstance(inputs, (np.ndarray, torch.Tensor)):  # to the input's dtype and Keras' device
        x = keras.ops.convert_to_tensor(inputs, dtype=model.inputs[0].dtype)
    return call_chain(chain, x) if eager_inference(x) else None
