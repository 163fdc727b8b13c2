"""Keeping JAX's compiled programs on disk, so that the next process loads them instead of compiling again.

On JAX every new process compiles with XLA what it runs: the variables' initialisers when a model is built,
`predict`'s step, `fit`'s training step. For Sequencer2D-S on a 2-core CPU that is most of the first calls: in
fresh processes at batch 16, building S took 4.17 s, the first `predict_on_batch` 7.08 s and the first
`train_on_batch` 25.31 s; a process that found the same programs on disk took 1.52, 3.65 and 16.39 s
(`benchmarks/README.md`, "JAX: compiled programs kept on disk"). What is left is Python tracing, the lowering
JAX needs to look a program up, and the step's own run.

JAX has that store built in (its persistent compilation cache); `enable_compilation_cache()` points it at a
folder and has it keep every program, small ones included. JAX keys an entry by the lowered program, its own
version, the devices (for a CPU, XLA's target-machine options, which follow the instruction set) and XLA's
options, so a changed model, batch shape, JAX or CPU compiles afresh and adds an entry; nothing stale runs.

TensorFlow and PyTorch get no such cache here. On CPU-only TensorFlow the XLA compilation is the smaller part
of `predict`'s first call (7.0 s, 5.8 s with TensorFlow's own `--tf_xla_persistent_cache_directory`, whose
every load logs a CPU-feature error), the rest being TensorFlow's tracing and graph building; PyTorch compiles
nothing ahead of time.
"""

import os

# Where `enable_compilation_cache()` keeps programs by default, under Keras' base folder.
CACHE_SUBDIR = os.path.join("cache", "keras_sequencer", "jax")
# The advice that ends the `ValueError` for a folder that cannot be used (the command line gives its own).
WRITABLE_FOLDER_ADVICE = " Pass a writable folder as enable_compilation_cache(directory=...)."


def default_directory() -> str:
    """The folder `enable_compilation_cache()` uses when given none and JAX has none configured:
    `$KERAS_HOME/cache/keras_sequencer/jax`."""
    from keras_sequencer.pretrained import _keras_home

    return os.path.join(_keras_home(), CACHE_SUBDIR)


def enable_compilation_cache(directory: str | None = None) -> str:
    """Makes JAX keep every program it compiles from now on in `directory` and load it from there in later
    processes (module docstring). Call it once per process, before building or running models; programs
    compiled before the call are not kept. JAX backend only.

    `directory`: the folder (created if needed; a remote one such as `gs://...` is passed to JAX as it is).
    Default: the one JAX is already configured with (`JAX_COMPILATION_CACHE_DIR` or
    `jax_compilation_cache_dir`, used as it is), else `default_directory()`. JAX's size limit stays as
    configured (by default none: S's programs at one batch size take about 2 MB); the folder can be deleted at
    any time.

    JAX's process-wide settings change: `jax_compilation_cache_dir` when the folder is not the configured
    one, and `jax_persistent_cache_min_compile_time_secs` becomes 0 in every case (JAX's default, 1 s, would
    skip the initialisers' many small programs: 2.6 of the 4.2 s of building S). JAX reports a folder it
    cannot read or write, or an entry another process is still writing, as a warning and compiles as before.

    Returns the folder. Raises `RuntimeError` on another Keras backend or when JAX's cache is switched off
    (`JAX_ENABLE_COMPILATION_CACHE=false`), and `ValueError` when the folder cannot be created or written.
    """
    import keras

    backend = keras.backend.backend()
    if backend != "jax":
        raise RuntimeError(
            "enable_compilation_cache() keeps JAX's compiled programs; the Keras backend here is "
            f"{backend!r}. On TensorFlow most of a first call is tracing and graph building, which no cache "
            "keeps; PyTorch compiles nothing ahead of time. Call it only when keras.backend.backend() == 'jax'."
        )
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    if not jax.config.jax_enable_compilation_cache:
        raise RuntimeError(
            "JAX's compilation cache is switched off in this process (jax_enable_compilation_cache is False, "
            "e.g. JAX_ENABLE_COMPILATION_CACHE=false), so no compiled program would be kept. Unset that "
            "setting to keep them."
        )
    configured = jax.config.jax_compilation_cache_dir
    if directory is None and configured:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        return configured
    directory = os.fspath(default_directory() if directory is None else directory)
    if "://" not in directory:  # a local folder: made here, so that a mistake is an error now
        directory = os.path.abspath(os.path.expanduser(directory))
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise ValueError(
                f"Cannot keep compiled programs in {directory}: {e.strerror}.{WRITABLE_FOLDER_ADVICE}"
            ) from e
        if not os.access(directory, os.W_OK | os.X_OK):
            raise ValueError(
                f"Cannot keep compiled programs in {directory}: the folder is not writable.{WRITABLE_FOLDER_ADVICE}"
            )
    if configured != directory:
        jax.config.update("jax_compilation_cache_dir", directory)
        compilation_cache.reset_cache()  # a cache JAX already opened keeps its folder until it is reset
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return directory
