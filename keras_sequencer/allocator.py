"""glibc's malloc keeping the memory a process frees, for training on a Linux CPU.

XLA:CPU (JAX) asks for each training step's temporaries as one block of gigabytes from a worker thread, and
PyTorch's large tensors are separate blocks too. By default glibc serves such blocks with a fresh `mmap` and
unmaps them when they are freed, so every step faults the same memory in again: 1.4 million page faults per
step of Sequencer2D-S at batch 16 on JAX, a fifth to two fifths of the step in the kernel
(`benchmarks/README.md`, "glibc keeping the freed memory"). `keep_freed_memory()` makes glibc serve every
thread from its one main arena, which grows with `brk` and so holds a block of any size, with no separate
maps and no trimming: the first step's memory is reused by every later one.

The setting is process-wide and opt-in: the process keeps its peak memory until it exits, and every thread
allocates from one arena (XLA compiles a little slower). TensorFlow, which keeps its own pools, neither gains
nor loses.
"""

import ctypes
import os
import platform
import warnings

# mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def _libc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        raise RuntimeError(
            "keeping freed memory sets glibc's malloc parameters, so it needs Linux with glibc; this Python runs "
            f"on {platform.system()} with {platform.libc_ver()[0] or 'another C library'}. Leave it off here."
        )
    process, glibc = ctypes.CDLL(None), ctypes.CDLL("libc.so.6")
    if ctypes.cast(process.malloc, ctypes.c_void_p).value != ctypes.cast(glibc.malloc, ctypes.c_void_p).value:
        raise RuntimeError(
            "this process allocates through another malloc than glibc's (LD_PRELOAD="
            f"{os.environ.get('LD_PRELOAD', '')!r}), whose parameters glibc's mallopt does not set. Leave it off "
            "here; that allocator has its own settings."
        )
    glibc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    glibc.open_memstream.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_size_t)]
    glibc.open_memstream.restype = ctypes.c_void_p
    glibc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    glibc.fclose.argtypes = [ctypes.c_void_p]
    glibc.free.argtypes = [ctypes.c_void_p]
    return glibc


def malloc_arenas() -> int:
    """How many malloc arenas glibc has made in this process so far (the main one included): one until a
    thread other than the main one allocates while arenas may still be added."""
    libc = _libc()
    buffer, size = ctypes.c_void_p(), ctypes.c_size_t()
    stream = libc.open_memstream(ctypes.byref(buffer), ctypes.byref(size))
    if not stream:
        raise RuntimeError("glibc's open_memstream failed, so malloc_info could not be read")
    try:
        libc.malloc_info(0, stream)
    finally:
        libc.fclose(stream)  # sets buffer and size
    try:
        return ctypes.string_at(buffer, size.value).count(b"<heap nr=")
    finally:
        libc.free(buffer)


def keep_freed_memory() -> bool:
    """Makes glibc keep the memory this process frees for its own reuse, instead of returning large blocks to
    the kernel and faulting them in again on the next training step (module docstring). Linux with glibc only.

    Call it first thing, before building or running a model: a thread that has already allocated keeps its own
    arena, where glibc still maps and unmaps every block larger than the arena's 64 MiB heap, and later threads
    may be given such an arena too. If arenas other than the main one exist already, the call warns
    (`RuntimeWarning`) and returns False: the setting then helps only the allocations that land on the main
    arena. That is the case in a Jupyter kernel, whose own threads have made arenas before the
    first cell runs. Starting Python with
    `GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1000000000000`
    (for a Jupyter kernel: in the `env` of its kernel spec) has the same effect from the first allocation on.

    Returns True when every thread will allocate from the main arena. Raises `RuntimeError` on other
    platforms, where another malloc is preloaded, or if glibc refuses a parameter."""
    libc = _libc()
    # -1 becomes SIZE_MAX in glibc's size_t threshold: never trim (a positive int caps it at 2 GiB, less than
    # one step's temporaries of S).
    for name, parameter, value in (("M_ARENA_MAX", _M_ARENA_MAX, 1), ("M_MMAP_MAX", _M_MMAP_MAX, 0),
                                   ("M_TRIM_THRESHOLD", _M_TRIM_THRESHOLD, -1)):  # fmt: skip
        if libc.mallopt(parameter, value) != 1:
            raise RuntimeError(f"glibc refused mallopt({name}, {value}); freed memory is returned as before.")
    arenas = malloc_arenas()
    if arenas > 1:
        warnings.warn(
            f"keep_freed_memory() came after other threads had allocated: {arenas - 1} arena(s) besides the main "
            "one exist, and their large blocks are still mapped and unmapped per use. Call it right after "
            "importing keras_sequencer, before building or running a model, or start Python (a Jupyter kernel: "
            "the `env` of its kernel spec; its own threads have arenas before the first cell) with "
            "GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
            "glibc.malloc.trim_threshold=1000000000000.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True
