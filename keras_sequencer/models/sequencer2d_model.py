"""Sequencer2DModel, the functional model `Sequencer2D` returns, and the input checks it shares with the backbone."""

import contextlib
import math
import warnings

import keras
import numpy as np

from keras_sequencer.layers import PatchEmbed, Sequencer2DBlock, eager_torch
from keras_sequencer.layers.token_mixing import gpu_backs_keras_lstm
from keras_sequencer.precision import warn_if_slower_than_float32

# The layers of the Sequencer2D models, which may run as a chain without Keras' calls
# (`eager_torch.layer_chain`): their `call` treats `training=None` as inference and takes no other
# call-context argument.
_CHAIN_TYPES = (
    PatchEmbed,
    Sequencer2DBlock,
    keras.layers.Normalization,
    keras.layers.Rescaling,
    keras.layers.LayerNormalization,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalMaxPooling2D,
    keras.layers.Dropout,
    keras.layers.Dense,
    keras.layers.Activation,
)


# `predict` fills a partial last batch only where the added rows are at most 1/PAD_AT_MOST of the images.
PAD_AT_MOST = 16


def prepare_optimizer(model: keras.Model) -> None:
    """On TensorFlow without a tf.distribute strategy, readies a compiled model's optimizer for `fit` and
    `train_on_batch`: it is built now, eagerly, and its updates are traced in fewer ops.

    Keras' TensorFlow trainer otherwise builds the optimizer inside the first
    traced train step; its variables then make TensorFlow trace the step a
    second time, and creating them inside the traced graph is slow (for S,
    816 slots: about half the time to the first step, benchmarks/README.md).
    With a strategy Keras builds it itself. Keras' Adam and AdamW then get one
    fused update op per variable (`fuse_adam_updates`) unless
    `model.fused_adam_on_tensorflow` is False, and decoupled weight decay reads
    the learning rate once per step (`decay_at_one_learning_rate`).
    """
    optimizer = getattr(model, "optimizer", None)
    if (
        keras.backend.backend() == "tensorflow"
        and getattr(model, "_distribute_strategy", None) is None
        and optimizer is not None
    ):
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        if getattr(model, "fused_adam_on_tensorflow", True):
            fuse_adam_updates(optimizer)
        decay_at_one_learning_rate(optimizer)


def decay_at_one_learning_rate(optimizer) -> bool:
    """On TensorFlow, gives Keras' decoupled weight decay (AdamW, or any optimizer's `weight_decay`) one read of
    the learning rate per step.

    Keras' TensorFlow optimizer reads `optimizer.learning_rate` once for
    every decayed variable, so a `LearningRateSchedule` is traced into the
    training step once per variable: for S under this package's recipes
    (warmup and cosine), about 200 copies of the schedule (one per kernel)
    for TensorFlow to trace and then optimise. Read once per step and cast
    once per dtype, the decay is the same arithmetic on the same values,
    `variable - variable * weight_decay * learning_rate`, so the weights are
    Keras' to the bit; S's first training step under the ImageNet recipe
    came ~7 s sooner (benchmarks/README.md, "TensorFlow: the learning rate
    read once for the weight decay"). Keras' PyTorch optimizers read it once
    already; on JAX, where XLA merges the copies, the first step was no
    sooner, and Keras' code stays, as it does for an optimizer class with a
    weight decay of its own. Call it without a tf.distribute strategy
    (Keras' version updates each variable through the strategy).

    Returns:
        Whether the optimizer (a LossScaleOptimizer's inner one) now decays this way.
    """
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    if keras.backend.backend() != "tensorflow":
        return False
    if getattr(optimizer._apply_weight_decay, "_one_learning_rate", False):
        return True
    if type(optimizer)._apply_weight_decay is not keras.optimizers.Optimizer._apply_weight_decay:
        return False

    def apply_weight_decay(variables):
        if optimizer.weight_decay is None:
            return
        factors = {}  # per variable dtype: the learning rate and the weight decay cast to it
        for variable in variables:
            if optimizer._use_weight_decay(variable):
                if variable.dtype not in factors:
                    factors[variable.dtype] = (
                        keras.ops.cast(optimizer.learning_rate, variable.dtype),
                        keras.ops.cast(optimizer.weight_decay, variable.dtype),
                    )
                learning_rate, weight_decay = factors[variable.dtype]
                variable.assign_sub(variable * weight_decay * learning_rate)

    apply_weight_decay._one_learning_rate = True
    optimizer._apply_weight_decay = apply_weight_decay
    return True


def fuse_adam_updates(optimizer) -> bool:
    """On TensorFlow, gives Keras' `Adam` or `AdamW` one fused update op per float32 variable.

    Keras' Adam update is about a dozen graph ops per variable, five of them
    the same scalars (step, beta powers, step size) rebuilt for every
    variable; TensorFlow traces each of them into the training step and then
    optimises the graph. TensorFlow's own `ResourceApplyAdam` kernel applies
    the same formula (Keras' `Adam.update_step`; AdamW's decoupled weight
    decay is applied before it, by Keras, unchanged) in one op, and the
    scalars are built once per traced step. For S the first training step
    came about twice as soon at 64x64 (benchmarks/README.md, "TensorFlow: the
    first training step with a fused Adam"). The results agree with Keras'
    ops to float32 rounding, not bit for bit: the kernel forms `1 - beta` in
    float32. Only exactly `keras.optimizers.Adam` / `AdamW` without `amsgrad`
    are changed, and variables of other dtypes keep Keras' update; set
    `model.fused_adam_on_tensorflow = False` before `fit` for Keras' ops.

    Returns:
        Whether the optimizer now uses the fused update.
    """
    adam = type(optimizer) in (keras.optimizers.Adam, keras.optimizers.AdamW)
    if keras.backend.backend() != "tensorflow" or not adam or optimizer.amsgrad:
        return False
    if getattr(optimizer.update_step, "_fused_adam", False):
        return True
    import tensorflow as tf

    keras_update = optimizer.update_step
    scalars = {}  # per traced graph: the step's learning rate, beta powers and constants

    def update_step(gradient, variable, learning_rate):
        if variable.dtype != tf.float32:
            return keras_update(gradient, variable, learning_rate)
        graph = None if tf.executing_eagerly() else tf.compat.v1.get_default_graph()
        if scalars.get("graph") is not graph or graph is None:
            step = tf.cast(optimizer.iterations + 1, tf.float32)
            beta_1, beta_2 = tf.constant(optimizer.beta_1, tf.float32), tf.constant(optimizer.beta_2, tf.float32)
            scalars.clear()
            scalars.update(graph=graph, lr=tf.cast(learning_rate, tf.float32), beta_1=beta_1, beta_2=beta_2,
                           beta_1_power=tf.pow(beta_1, step), beta_2_power=tf.pow(beta_2, step),
                           epsilon=tf.constant(optimizer.epsilon, tf.float32))  # fmt: skip
        index = optimizer._get_variable_index(variable)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle,
            m=optimizer._momentums[index].value.handle,
            v=optimizer._velocities[index].value.handle,
            beta1_power=scalars["beta_1_power"],
            beta2_power=scalars["beta_2_power"],
            lr=scalars["lr"],
            beta1=scalars["beta_1"],
            beta2=scalars["beta_2"],
            epsilon=scalars["epsilon"],
            grad=tf.cast(gradient, tf.float32),
        )

    update_step._fused_adam = True
    optimizer.update_step = update_step
    return True


class CompiledPredict:
    """`predict` and `evaluate` for models whose inference step is compiled per batch shape: shared by this
    package's functional models and its keras-hub task.

    On TensorFlow without a GPU the predict and test steps are compiled with XLA (`make_predict_function`,
    `make_test_function`), a NumPy array whose last batch would be partial runs as whole batches only
    (`_predict_filled`) there and on JAX, and a NumPy array that goes through tf.data goes through a pipeline
    without tf.data's autotuning (`_predict_array`). Mixed into `keras.Model` subclasses before the Keras
    class; it defines no `predict` or `evaluate` of its own, so a subclass's `super()` calls stay Keras' (or
    keras-hub's).
    """

    # TensorFlow without a GPU: compile `predict` with XLA (see `make_predict_function`).
    xla_predict_on_cpu = True
    # TensorFlow without a GPU: compile `evaluate`'s step (and `fit`'s validation) with XLA (`make_test_function`).
    xla_evaluate_on_cpu = True
    # TensorFlow: Keras' Adam and AdamW update each variable with one fused op (`fuse_adam_updates`).
    fused_adam_on_tensorflow = True
    # What each step was last built for: its XLA switch and `_batch_parts_held()`.
    _predict_built_for = _test_built_for = _train_built_for = None

    def make_predict_function(self, force=False):
        """Keras' predict function; on TensorFlow without a GPU it is compiled with XLA.

        Keras leaves XLA off on CPU-only TensorFlow; for this model XLA makes
        inference markedly faster there, for a few seconds of compilation on
        the first call per input shape (benchmarks/README.md). `predict` and
        `predict_on_batch` use it unless `model.xla_predict_on_cpu = False`
        (the next `predict` builds its step again) or a `tf.distribute` strategy
        holds the model (Keras' own rule), or the model computes in another
        dtype than float32 (e.g. under "mixed_bfloat16", which XLA on a CPU
        runs slower than TensorFlow's own kernels), or the model runs its
        batches in parts (`batch_parts` > 1).
        Training and direct calls `model(x)` keep Keras' defaults
        (`compile(jit_compile=...)`); `evaluate` has its own switch
        (`make_test_function`).
        """
        built_for = (self.xla_predict_on_cpu, self._batch_parts_held())
        if self.predict_function is not None and not force and self._predict_built_for == built_for:
            return self.predict_function
        with self._xla_on_cpu_tensorflow_if(self.xla_predict_on_cpu):
            self._predict_compiled = not self.run_eagerly and bool(self.jit_compile)
            self._predict_built_for = built_for
            return super().make_predict_function(force=True)

    def make_test_function(self, force=False):
        """Keras' test function (`evaluate`, and the validation of `fit`); on TensorFlow without a GPU it is
        compiled with XLA, as `predict` is (`make_predict_function`), under the same conditions.

        On a 2-core CPU S's `evaluate` of NumPy arrays at batch 16 ran 1.56x faster (about 1.4x from XLA, the
        rest from `_evaluate_array`), its first call about a second slower; the demo model's over the 10,000
        Fashion-MNIST test images 1.48x faster, its first call too (benchmarks/README.md, "TensorFlow
        `evaluate`"). `test_on_batch` uses the same function. Each new batch shape costs a compilation: a
        partial last batch is a second one, which within `fit` is paid once. Keras' own metrics and losses
        compile; one that XLA cannot compile (a `tf.numpy_function`, say) fails at the first call: set
        `model.xla_evaluate_on_cpu = False` (the next `evaluate` builds its step again).
        """
        built_for = (self.xla_evaluate_on_cpu, self._batch_parts_held())
        if self.test_function is not None and not force and self._test_built_for == built_for:
            return self.test_function
        with self._xla_on_cpu_tensorflow_if(self.xla_evaluate_on_cpu):
            self._test_compiled = not self.run_eagerly and bool(self.jit_compile)
            self._test_built_for = built_for
            return super().make_test_function(force=True)

    def make_train_function(self, force=False):
        """Keras' train function, traced again at its next use when `batch_parts` (the model's own or, in a
        keras-hub task, its backbone's) has changed since it was traced."""
        built_for = self._batch_parts_held()
        if self.train_function is not None and not force and self._train_built_for == built_for:
            return self.train_function
        self._train_built_for = built_for
        return super().make_train_function(force=True)

    def _batch_parts_held(self) -> tuple:
        """`batch_parts` of this model and, in a keras-hub task, of its backbone: the slicing its steps trace."""
        held = (self, getattr(self, "backbone", None))
        return tuple(getattr(model, "batch_parts", 1) for model in held if model is not None)

    @contextlib.contextmanager
    def _xla_on_cpu_tensorflow_if(self, switch: bool):
        """Within the block `jit_compile` is True where `switch` is on and `_xla_on_cpu_tensorflow()`, so that
        Keras' function builders compile with XLA; the model's own setting (training's) is restored after."""
        if not (switch and self._xla_on_cpu_tensorflow()):
            yield
            return
        saved = self.jit_compile
        with warnings.catch_warnings():  # a model with a layer XLA cannot take stays without it
            warnings.simplefilter("ignore")
            self.jit_compile = True
        try:
            yield
        finally:
            self.jit_compile = saved

    def _xla_on_cpu_tensorflow(self) -> bool:
        """Whether inference steps are compiled with XLA by this class (`make_predict_function`'s docstring):
        TensorFlow, no GPU, no `tf.distribute` strategy, float32 throughout, whole batches."""
        if keras.backend.backend() != "tensorflow":
            return False
        distributed = getattr(self, "_distribute_strategy", None) is not None
        # On TensorFlow, "a GPU backs Keras' LSTM" is "a GPU is visible" (the layer's own cached check).
        float32 = all(layer.compute_dtype == "float32" for layer in self.layers)
        # XLA would run the slices of `batch_parts` (a task's backbone's too) as one program on one thread.
        whole = all(parts == 1 for parts in self._batch_parts_held())
        return not distributed and not gpu_backs_keras_lstm() and float32 and whole

    def _compiles_predict_per_shape(self) -> bool:
        """Whether each new batch shape costs `predict` a compilation: JAX's jitted step, or TensorFlow's when
        XLA compiles it (ours on a CPU, or `jit_compile=True`), as the predict function was built."""
        if keras.backend.backend() not in ("jax", "tensorflow"):
            return False
        self.make_predict_function()  # Keras' own first step of `predict`; built once
        return getattr(self, "_predict_compiled", False)

    def _split_partial_batch(self, x, batch_size, steps, callbacks):
        """`(whole, tail, remainder)` for a NumPy array of more than `batch_size` images whose last batch would
        be partial: the number of images in whole batches, and the last `remainder` images with copies of the
        last one up to a whole batch. Else None. A compiled predict step then runs one batch shape instead of
        two: on a CPU a second XLA compilation of S took 2–16 s (`benchmarks/README.md`). The copies are
        computed on every call while a compilation is paid once per shape, so only where they add at most
        1/PAD_AT_MOST to the work. Not for backend tensors (a slice may copy them, on an accelerator too),
        nor with `steps` or callbacks (which would see the copies)."""
        batch_size = 32 if batch_size is None else batch_size  # Keras' default
        if steps is not None or callbacks or not isinstance(batch_size, int) or batch_size < 1:
            return None
        if not isinstance(x, np.ndarray) or x.ndim != 4:
            return None
        count = x.shape[0]
        remainder = count % batch_size
        if count <= batch_size or remainder == 0 or (batch_size - remainder) * PAD_AT_MOST > count:
            return None
        if not self._compiles_predict_per_shape():
            return None
        whole = count - remainder
        tail = np.concatenate([x[whole:], np.repeat(x[-1:], batch_size - remainder, axis=0)])
        return whole, tail, remainder

    def _predict_filled(self, x, batch_size=None, verbose="auto", steps=None, callbacks=None):
        """`_predict_array(x, ...)`; where each batch shape is compiled (JAX, XLA on TensorFlow), a NumPy array whose
        last batch would be partial, and whose copies would add at most a sixteenth to the work, runs as its
        whole batches and then a last batch filled up with copies of its last image, whose outputs are
        dropped: one compilation instead of two, the same outputs (two progress bars where `verbose` shows
        them)."""
        predict = self._predict_array
        split = self._split_partial_batch(x, batch_size, steps, callbacks)
        if split is None:
            return predict(x, batch_size=batch_size, verbose=verbose, steps=steps, callbacks=callbacks)
        whole, tail, remainder = split
        head = predict(x[:whole], batch_size=batch_size, verbose=verbose)
        last = predict(tail, batch_size=batch_size, verbose=verbose)
        return keras.tree.map_structure(lambda a, b: np.concatenate([a, b[:remainder]]), head, last)

    def _batches_arrays_itself(self, step: str) -> bool:
        """Whether `_predict_array` (`step="predict"`) or `_evaluate_array` (`"test"`) hands NumPy arrays to
        Keras as their own tf.data pipeline: on TensorFlow where that step is XLA-compiled, as the function
        was built (subclasses may widen this)."""
        if keras.backend.backend() != "tensorflow":
            return False
        if step == "predict":
            return self._compiles_predict_per_shape()
        self.make_test_function()  # Keras' own first step of `evaluate`; built once
        return getattr(self, "_test_compiled", False)

    def _predict_array(self, x, batch_size=None, verbose="auto", steps=None, callbacks=None):
        """The next class's `predict` (Keras', keras-hub's). Where `_batches_arrays_itself`, a NumPy array goes
        in batched by a plain tf.data pipeline with tf.data's autotuning off (`_unautotuned_batches`). With
        autotuning on, deleting the pipeline's iterator at the end of a call waits for a background thread of
        tf.data's with both cores idle: S's predict of 112 images on 2 cores took 20.5-20.9 s in 9 of 11 calls
        through Keras' array pipeline, against 12.0-14.4 s in 10 of 10 this way (`benchmarks/README.md`)."""
        if (
            isinstance(x, np.ndarray)
            and steps is None
            and _batch_size_or_default(batch_size)
            and self._batches_arrays_itself("predict")
        ):
            batches = _unautotuned_batches((x,), batch_size)
            return super().predict(batches, verbose=verbose, callbacks=callbacks)
        return super().predict(x, batch_size=batch_size, verbose=verbose, steps=steps, callbacks=callbacks)

    def _evaluate_array(self, x=None, y=None, batch_size=None, verbose="auto", sample_weight=None, steps=None,
                        callbacks=None, return_dict=False, **kwargs):  # fmt: skip
        """The next class's `evaluate` (Keras', keras-hub's). Where `_batches_arrays_itself`, NumPy images,
        labels and sample weights of one length go in batched by a plain tf.data pipeline without autotuning,
        as `_predict_array` does: with the XLA step fed by Keras' array pipeline, 3 of 6 `evaluate` calls of S
        (64 images) took 10.3 s instead of 6.1-6.4 s (`benchmarks/README.md`). Anything else (tensors,
        datasets, `steps`, `fit`'s cached validation data) goes to Keras as given, and so do arrays where the
        step is not compiled. On TensorFlow with a GPU Keras compiles it itself (`jit_compile="auto"`), and
        arrays then come this way too, as they do for `predict`."""
        given = (x, y, sample_weight)
        arrays = given[: 3 if sample_weight is not None else 2 if y is not None else 1]
        if (
            not kwargs
            and steps is None
            and _batch_size_or_default(batch_size)
            and all(isinstance(array, np.ndarray) and array.ndim > 0 for array in arrays)
            and len({len(array) for array in arrays}) == 1
            and self._batches_arrays_itself("test")
        ):
            batches = _unautotuned_batches(arrays, batch_size)
            return super().evaluate(batches, verbose=verbose, callbacks=callbacks, return_dict=return_dict)
        return super().evaluate(x, y, batch_size=batch_size, verbose=verbose, sample_weight=sample_weight,
                                steps=steps, callbacks=callbacks, return_dict=return_dict, **kwargs)  # fmt: skip


def _batch_size_or_default(batch_size) -> bool:
    """Whether `batch_size` is None (Keras' default, 32) or a positive int: else Keras gets it and says what's wrong."""
    return batch_size is None or (isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size > 0)


def _unautotuned_batches(arrays: tuple, batch_size):
    """`arrays` (one NumPy array, or the elements of one sample) in batches of `batch_size` (None: Keras' 32), by
    a tf.data pipeline with autotuning off; floats other than Keras' floatx cast to it, as Keras' own array
    pipeline does."""
    import tensorflow as tf

    floatx = keras.config.floatx()

    def cast(array):  # bfloat16 (ml_dtypes) too, which NumPy does not count as floating
        dtype = keras.backend.standardize_dtype(array.dtype)
        return array.astype(floatx) if keras.backend.is_float_dtype(dtype) and dtype != floatx else array

    arrays = tuple(cast(array) for array in arrays)
    options = tf.data.Options()
    options.autotune.enabled = False
    elements = arrays[0] if len(arrays) == 1 else arrays
    batches = tf.data.Dataset.from_tensor_slices(elements).batch(32 if batch_size is None else batch_size)
    return batches.with_options(options)


class SequencerInputs(CompiledPredict):
    """Input checks, shared by the classifier and the backbone, and `CompiledPredict`'s `predict`.

    Mixed into functional `keras.Model` subclasses: a wrong input rank, a
    wrong channel count, an empty batch or an image smaller than the
    network's total patch size becomes a `ValueError` that says what to pass,
    on every call and before Keras runs anything.
    """

    # TensorFlow: the number of independent parts each batch runs as (`batch_parts`).
    _batch_parts = 1

    @property
    def batch_parts(self) -> int:
        """TensorFlow: the number of parts each batch is cut into, so that TensorFlow can run them side by side.

        With `batch_parts = k` every call on a batch (`fit`'s training steps,
        `evaluate`, `predict`, `model(x)`) runs the network on k slices of the
        batch and concatenates the outputs. Every layer of Sequencer2D works on
        each image alone, so the outputs, losses and gradients are those of the
        whole batch; only drop path draws its random numbers per slice (a layer
        of your own that mixes images, a batch norm say, would see slices, and
        a batch of fewer than k images is padded with black images to k, so
        that no slice is empty; their outputs are dropped). The
        slices are independent graphs: where TensorFlow gives each op one thread
        and runs two ops at once (the demo's setting on a 2-core CPU,
        `keras_sequencer.demo.run_small_ops_side_by_side`), they keep both
        cores busy through the parts of a step that are one chain of small ops.
        On a 2-core CPU with one thread per op, the demo model's training step
        ran 1.3x faster with 4 parts, its `evaluate` 1.6x faster than whole
        batches with XLA; with TensorFlow's default threads the gain was smaller
        and came and went with k (benchmarks/README.md, "Demo: batches in
        parts"). While k > 1, `predict` and `evaluate` are not compiled with
        XLA, which would run the slices as one program on one thread. A new
        value makes the next `fit`, `evaluate` and `predict` rebuild their
        steps, a keras-hub task's too when it is its backbone's. JAX
        compiles each step as one XLA program and PyTorch runs ops one at a
        time, so on those backends only 1 is accepted.
        """
        return self._batch_parts

    @batch_parts.setter
    def batch_parts(self, parts: int) -> None:
        if isinstance(parts, bool) or not isinstance(parts, (int, np.integer)) or parts < 1:
            raise ValueError(f"`batch_parts` must be an integer >= 1. Received: batch_parts={parts!r}")
        if parts > 1 and keras.backend.backend() != "tensorflow":
            raise ValueError(
                "`batch_parts` > 1 lets TensorFlow run the slices of a batch side by side; on "
                f"{keras.backend.backend()} it would only add work. Use the TensorFlow backend "
                f"(KERAS_BACKEND=tensorflow) or leave it at 1. Received: batch_parts={parts}"
            )
        self._batch_parts = int(parts)  # steps traced with another value are rebuilt at their next use

    def _call_in_parts(self, inputs, training):
        """The network on `batch_parts` consecutive slices of `inputs` (TensorFlow), outputs concatenated."""
        import tensorflow as tf

        parts = self._batch_parts
        size = tf.shape(inputs)[0]
        # No slice may be empty: TensorFlow's oneDNN convolution (2.21, CPUs where it is on) returns an empty
        # batch in the shape of its input instead of its output, and the next layer fails. A batch of fewer
        # than `parts` images is padded with black ones to `parts`, whose outputs are dropped; a batch whose
        # static size is at least `parts` (a fixed batch size) needs no padding and gets none.
        padded = inputs
        if inputs.shape[0] is None or inputs.shape[0] < parts:
            missing = tf.maximum(parts - size, 0)
            padding = tf.zeros(tf.concat([[missing], tf.shape(inputs)[1:]], axis=0), inputs.dtype)
            padded = tf.concat([inputs, padding], axis=0)
        rows = tf.maximum(size, parts)
        bounds = [rows * i // parts for i in range(parts + 1)]
        outputs = [
            super(SequencerInputs, self).call(padded[start:stop], training=training)
            for start, stop in zip(bounds[:-1], bounds[1:], strict=True)
        ]
        whole = padded is inputs
        return keras.tree.map_structure(
            lambda *pieces: tf.concat(pieces, axis=0) if whole else tf.concat(pieces, axis=0)[:size], *outputs
        )

    def _init_inputs(self):
        # The smallest side every stage can still cut into patches; derived from
        # the graph so `.keras` files and presets need no extra config.
        self.min_image_size = math.prod(layer.patch_size for layer in self.layers if isinstance(layer, PatchEmbed))
        # A 16-bit policy that is slower than float32 on this machine (a CPU without the instructions) says so.
        for dtype in ("bfloat16", "float16"):
            if any(layer.compute_dtype == dtype for layer in self.layers):
                warn_if_slower_than_float32(dtype)

    def check_images(self, shape, batch: bool = False) -> None:
        """Raises a ValueError that says what to pass unless `shape` is a batch of images this model takes.

        Args:
            shape: the input's shape (None for unknown sizes).
            batch: the shape is a whole input to `predict` / `evaluate`, so an
                empty batch is an error too.
        """
        shape = tuple(shape)
        if len(shape) != 4:
            raise ValueError(
                f"Model '{self.name}' takes a batch of images shaped (batch, height, width, "
                "channels); for a single image add a batch axis (`image[None]`). "
                f"Received: inputs.shape={shape}"
            )
        channels = self.inputs[0].shape[-1] if self.inputs else None
        if channels is not None and shape[-1] is not None and shape[-1] != channels:
            raise ValueError(
                f"Model '{self.name}' takes channels-last images with {channels} channels (RGB); convert "
                "grayscale / RGBA images to RGB and move channels last. "
                f"Received: inputs.shape={shape}"
            )
        if any(side is not None and side < self.min_image_size for side in shape[1:3]):
            raise ValueError(
                f"Model '{self.name}' needs images of at least {self.min_image_size}x"
                f"{self.min_image_size} pixels (the product of its patch sizes); resize or pad "
                f"smaller images. Received: inputs.shape={shape}"
            )
        if batch and shape[0] == 0:
            raise ValueError(f"Model '{self.name}' was given an empty batch (0 images). Received: inputs.shape={shape}")

    def _check_input(self, x) -> None:
        # Checked before Keras runs anything: on JAX a check that fails inside `predict` would leave
        # the model without its variables, and on TensorFlow a traced function would fail in XLA instead.
        shape = getattr(x, "shape", None)
        if shape is None and hasattr(x, "element_spec"):  # a tf.data.Dataset of images or (images, ...)
            spec = x.element_spec
            spec = spec[0] if isinstance(spec, tuple) else spec
            if hasattr(spec, "shape") and spec.shape.rank is not None:
                self.check_images(spec.shape.as_list())
            return
        if shape is not None and not isinstance(x, dict):
            self.check_images([None if s is None else int(s) for s in shape], batch=True)

    def fit(self, *args, **kwargs):
        prepare_optimizer(self)
        return super().fit(*args, **kwargs)

    def train_on_batch(self, *args, **kwargs):
        prepare_optimizer(self)
        return super().train_on_batch(*args, **kwargs)

    def predict(self, x, batch_size=None, verbose="auto", steps=None, callbacks=None):
        """Keras' `predict`, with the images checked first, a partial last batch filled where each batch shape
        is compiled (`_predict_filled`), and under TensorFlow's XLA predict a NumPy array going in as a tf.data
        pipeline without autotuning (`_predict_array`)."""
        self._check_input(x)
        return self._predict_filled(x, batch_size, verbose, steps, callbacks)

    def predict_on_batch(self, x):
        self._check_input(x)
        return super().predict_on_batch(x)

    def evaluate(self, x=None, *args, **kwargs):
        """Keras' `evaluate`, with the images checked first and, where its step is XLA-compiled (by
        `make_test_function` on TensorFlow without a GPU), NumPy arrays going in as a tf.data pipeline without
        autotuning (`_evaluate_array`)."""
        self._check_input(x)
        return self._evaluate_array(x, *args, **kwargs)

    def call(self, inputs, training=None, mask=None):
        self.check_images(getattr(inputs, "shape", ()))
        if self._batch_parts > 1 and mask is None:
            return self._call_in_parts(inputs, training)
        if not training and mask is None:  # PyTorch inference without Keras' per-layer calls
            outputs = eager_torch.run_model_chain(self, inputs, _CHAIN_TYPES)
            if outputs is not None:
                return outputs
        return super().call(inputs, training=training, mask=mask)


@keras.saving.register_keras_serializable(package="keras_sequencer")
class Sequencer2DModel(SequencerInputs, keras.Model):
    """A functional Keras model that checks its images before running them.

    Built by `Sequencer2D` and the variant functions; it behaves like any
    functional `keras.Model` (`fit`, `predict`, `save`, `.keras` files), and
    additionally turns a wrong input rank or an image smaller than the
    network's total patch size into a `ValueError` that says what to pass.
    """

    # The functional signature: Keras then saves the layer graph in `.keras`
    # files and rebuilds this class from it.
    def __init__(self, inputs, outputs, name=None, **kwargs):
        super().__init__(inputs=inputs, outputs=outputs, name=name, **kwargs)
        self._init_inputs()
