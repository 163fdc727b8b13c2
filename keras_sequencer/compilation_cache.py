"""Keeping JAX's compiled programs on disk, so that the next process loads them instead of compiling again.

On JAX every new process compiles with XLA what it runs: the variables' initialisers when a model is built,
`predict`'s step, `fit`'s training step. For Sequencer2D-S on a 2-core CPU that is most of the first call: in
fresh processes, building S took 4.1 s, the first `predict_on_batch` at batch 16 6.9 s and the first
`train_on_batch` 25.8 s; a process that found the same programs on disk took 1.5, 3.6 and 16.1 s
(`benchmarks/README.md`, "JAX: compiled programs kept on disk"). What is left is Python tracing and the
lowering JAX needs to look a program up, and the step's own run.

JAX has that store built in (its persistent compilation cache); `enable_compilation_cache()` points it at a
folder and has it keep every program, small ones included. An entry is keyed by the program, the JAX version,
the device kind and XLA's options, so a changed model, batch shape or JAX version compiles afresh and adds an
entry; nothing stale is ever run. The default folder also carries a fingerprint of the host CPU, because code
compiled for one CPU's instruction set may not run on another's (a home folder shared between machines).

TensorFlow and PyTorch get no such cache here. On CPU-only TensorFlow the XLA compilation is the smaller part
of `predict`'s first call (7.0 s, 5.8 s with TensorFlow's own `--tf_xla_persistent_cache_directory`, whose
every load logs a CPU-feature error), the rest being TensorFlow's tracing and graph building; PyTorch compiles
nothing ahead of time.
"""

import hashlib
import os
import platform

# Where `enable_compilation_cache()` keeps programs by default, under Keras' base folder.
CACHE_SUBDIR = os.path.join("cache", "keras_sequencer")


def _host_fingerprint() -> str:
    """A short hash of what decides which machine code runs here: the architecture and, on Linux, the CPU
    model and its instruction-set flags as the kernel reports them."""
    parts = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part"):
                    parts.append(line.strip())
                if not line.strip() and len(parts) > 2:  # the first processor's block is enough
                    break
    except OSError:
        pass  # not Linux: the architecture and processor name above
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def default_directory() -> str:
    """The folder `enable_compilation_cache()` uses when given none:
    `$KERAS_HOME/cache/keras_sequencer/jax-<JAX version>-<CPU fingerprint>`."""
    import jax

    from keras_sequencer.pretrained import _keras_home

    return os.path.join(_keras_home(), CACHE_SUBDIR, f"jax-{jax.__version__}-{_host_fingerprint()}")


def enable_compilation_cache(directory: str | None = None) -> str:
    """Makes JAX keep every program it compiles from now on in `directory` and load it from there in later
    processes (module docstring). Call it once per process, before building or running models; programs
    compiled before the call are not kept. JAX backend only.

    `directory`: the folder (created if needed). Default: one that JAX is already configured with
    (`jax_compilation_cache_dir`), else `default_directory()`. Share a folder only between machines with the
    same CPU. JAX never evicts entries by default; the folder can be deleted at any time.

    Two of JAX's process-wide settings change: `jax_compilation_cache_dir`, and
    `jax_persistent_cache_min_compile_time_secs` becomes 0 (JAX's default, 1 s, would skip the initialisers'
    many small programs, 2.6 s of building S). JAX reports a cache it cannot read or write as a warning and
    compiles as before.

    Returns the folder's absolute path. Raises `RuntimeError` on another Keras backend and `ValueError` when
    the folder cannot be created or written.
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

    configured = jax.config.jax_compilation_cache_dir
    if directory is None:
        directory = configured or default_directory()
    directory = os.path.abspath(os.path.expanduser(os.fspath(directory)))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise ValueError(
            f"Cannot keep compiled programs in {directory}: {e.strerror}. Pass a writable folder as "
            "enable_compilation_cache(directory=...)."
        ) from e
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(
            f"Cannot keep compiled programs in {directory}: the folder is not writable. Pass a writable folder "
            "as enable_compilation_cache(directory=...)."
        )
    if configured is None or os.path.abspath(os.path.expanduser(configured)) != directory:
        jax.config.update("jax_compilation_cache_dir", directory)
        compilation_cache.reset_cache()  # a cache JAX already opened keeps its folder until it is reset
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return directory
