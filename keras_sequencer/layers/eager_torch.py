"""When a layer may skip its sublayers' Keras calls: eager PyTorch inference in float32.

PyTorch runs a model eagerly, so Keras' per-call work (input conversion,
call context, autocast and mask handling: about 50 us per layer on a CPU)
and the dtype checks of every `keras.ops` call repeat on every forward pass.
At batch 1 they made Sequencer2D-S's forward pass several percent slower
than timm's (`benchmarks/README.md`). `Sequencer2DBlock` and `PatchEmbed`
then call torch's own functions on their variables, the functions Keras'
layers call; anything else (autograd on, a 16-bit policy, quantized or LoRA
layers, rematerialisation, activity regularizers, TensorFlow and JAX, which
trace once) keeps the sublayers' calls.
"""

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
