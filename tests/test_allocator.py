"""`keep_freed_memory`: glibc reuses freed blocks instead of mapping them afresh; checked by page-fault counts
in fresh processes, against the same allocations in a process without it."""

import json
import os
import platform

from conftest import run_python
import pytest

import keras_sequencer as ks

ON_GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" and not os.environ.get("LD_PRELOAD")
NOT_GLIBC = "keep_freed_memory sets glibc's malloc parameters: no glibc here, or LD_PRELOAD replaces its malloc"

# A worker thread fills a 256-MiB block from malloc three times (each freed before the next). Prints the minor page
# faults of each fill, whether keep_freed_memory() warned, and the malloc arenas at the end.
_FILLS = """
import ctypes, json, resource, sys, threading, warnings
import keras_sequencer as ks

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "late":  # a thread that allocates before the call gets an arena of its own
    worker = threading.Thread(target=lambda: libc.free(libc.malloc(1 << 20)))
    worker.start()
    worker.join()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    complete = ks.keep_freed_memory() if sys.argv[1] != "default" else None
faults = []

def fill():
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(1 << 28)  # 256 MiB, every page written
        ctypes.memset(block, 1, 1 << 28)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        libc.free(block)

worker = threading.Thread(target=fill)
worker.start()
worker.join()
warned = [str(w.message) for w in caught if w.category is RuntimeWarning]
print(json.dumps({"faults": faults, "complete": complete, "warnings": warned, "arenas": ks.allocator.malloc_arenas()}))
"""


def _fills(mode):
    # glibc's defaults in the child, whatever tunables the caller runs the tests with
    output = run_python(_FILLS.replace("sys.argv[1]", repr(mode)), env={"GLIBC_TUNABLES": ""})
    return json.loads(output.strip().splitlines()[-1])


@pytest.mark.skipif(not ON_GLIBC, reason=NOT_GLIBC)
def test_keep_freed_memory_reuses_freed_blocks():
    """By default every fill of the 256-MiB block faults in its 65,536 pages again; after the call the second and
    third fills reuse the first one's memory, from a thread started after the call (the main arena)."""
    pages = (1 << 28) // 4096
    default = _fills("default")
    assert all(count > 0.9 * pages for count in default["faults"]), default
    kept = _fills("kept")
    assert kept["faults"][0] > 0.9 * pages and max(kept["faults"][1:]) < 0.02 * pages, kept
    assert kept["warnings"] == [] and kept["arenas"] == 1 and kept["complete"] is True, kept


@pytest.mark.skipif(not ON_GLIBC, reason=NOT_GLIBC)
def test_keep_freed_memory_warns_when_threads_have_their_own_arenas():
    """Called after another thread allocated, it says that threads' arenas are beyond its reach."""
    late = _fills("late")
    assert len(late["warnings"]) == 1 and "arena(s) besides the main one exist" in late["warnings"][0], late
    assert late["arenas"] >= 2 and late["complete"] is False, late


def test_keep_freed_memory_refuses_without_glibc(monkeypatch):
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    with pytest.raises(RuntimeError, match="needs Linux with glibc; this Python runs on Darwin"):
        ks.keep_freed_memory()
