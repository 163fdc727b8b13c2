"""Eager PyTorch inference in float32 without Keras' per-layer calls.

PyTorch runs a model eagerly, so Keras' per-call work (input conversion,
call context, autocast and mask handling) and the dtype checks of every
`keras.ops` call repeat on every forward pass. Its cost is more than its
~35 us of Python per layer: the pause lets PyTorch's OpenMP threads go
idle, and the next matmul pays for waking them (a 0.4 ms matmul took
~70 us longer right after a layer call; `benchmarks/README.md`). Without
autograd, in float32:

- `Sequencer2DBlock` and `PatchEmbed` call torch's own functions on their
  variables, the functions Keras' layers call (`runs_torch_functions`);
- the Sequencer2D models run the layers of their chain by each layer's
  `call` (`layer_chain`, `call_chain`): what `Layer.__call__` adds to `call`
  has nothing to do there.

The results are the same to the bit. Anything else (autograd on, a 16-bit
policy, quantized layers, rematerialisation, activity regularizers; and
TensorFlow and JAX, which trace a model once) keeps Keras' calls.
"""

import weakref

import keras

_LINEAR = keras.activations.get(None)


def runs_torch_functions(x, layers) -> bool:
    """Whether a layer may compute `x` with torch's functions on the variables of `layers` (itself and the
    sublayers it would call): PyTorch backend, autograd off, a float32 tensor, float32 layers as built.

    Dense-like sublayers (`Dense`, `Conv2D`) must have no activation, quantization or LoRA.
    """
    if keras.backend.backend() != "torch":
        return False
    import torch

    if torch.is_grad_enabled() or not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        return False
    for layer in layers:
        if layer.dtype_policy.name != "float32" or layer._remat_mode is not None or layer.activity_regularizer:
            return False
        if isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D)) and (
            layer.quantization_mode is not None
            or getattr(layer, "lora_enabled", False)
            or getattr(layer, "activation", _LINEAR) is not _LINEAR
        ):
            return False
    return True


def calls_directly(layer) -> bool:
    """Whether `layer.__call__(x)` is `layer.call(x)` for a float32 tensor without a mask: float32 variables and
    computation, no quantization (which calls `quantized_call`), rematerialisation or activity regularizer."""
    policy = layer.dtype_policy
    return (
        policy.compute_dtype == "float32"
        and policy.variable_dtype == "float32"
        and policy.quantization_mode is None
        and layer._remat_mode is None
        and not layer.activity_regularizer
    )


# model -> its layers in order (None: not a chain); weak: dies with the model. A functional graph is fixed.
_CHAINS = weakref.WeakKeyDictionary()


def layer_chain(model) -> list | None:
    """The layers of a functional `model` in order when they form a chain (one input, one output, each layer
    called once on its predecessor's output alone, nothing else in the graph); otherwise None."""
    if model not in _CHAINS:
        _CHAINS[model] = _find_chain(model)
    return _CHAINS[model]


def _find_chain(model):
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        return None
    chain, tensor, start = [], model.outputs[0], model.inputs[0]
    while tensor is not start:
        layer, node_index, _ = tensor._keras_history
        node = layer._inbound_nodes[node_index]
        if node.arguments.args != (node.input_tensors[0],) or len(node.input_tensors) != 1 or node.arguments.kwargs:
            return None
        chain.append(layer)
        tensor = node.input_tensors[0]
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if len({id(layer) for layer in chain}) != len(chain) or {id(layer) for layer in layers} != {id(x) for x in chain}:
        return None
    return chain[::-1]


def call_chain(chain, x):
    """`x` through `chain` by each layer's `call`, `training=False` where it takes one; see `layer_chain`."""
    for layer in chain:
        x = layer.call(x, training=False) if layer._call_has_training_arg else layer.call(x)
    return x
