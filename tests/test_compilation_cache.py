"""`enable_compilation_cache`: JAX's compiled programs kept on disk, checked against a process without them."""

import glob
import json
import os

from conftest import BACKEND, NO_JAX_CACHE_SETTINGS, TINY, run_python
import numpy as np
import pytest

import keras_sequencer as ks

# Builds the tiny model from a seed and runs `predict_on_batch`, one `train_on_batch` and `predict_on_batch` again:
# run by this process (without the folder under test) and by fresh ones (conftest, which imports PyTorch, stays
# out of those).
_RUN_TINY_MODEL = f"""
import keras, numpy as np
import keras_sequencer as ks

def run_tiny_model():
    keras.utils.set_random_seed(0)
    model = ks.Sequencer2D(**{TINY}, weights=None, classes=10, classifier_activation=None)
    rng = np.random.RandomState(0)
    x, y = rng.uniform(0, 255, (4, 16, 16, 3)).astype("float32"), np.arange(4) % 10
    before = np.asarray(model.predict_on_batch(x)).tolist()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss=loss)
    loss = float(model.train_on_batch(x, y))
    return {{"before": before, "loss": loss, "after": np.asarray(model.predict_on_batch(x)).tolist()}}
"""

# The same in a fresh process with the cache on, with JAX's counts of programs found in and missing from it.
_PROCESS = (
    _RUN_TINY_MODEL
    + """
import collections, json
import jax

events = collections.Counter()
jax.monitoring.register_event_listener(lambda name, **kwargs: events.update([name.rsplit("/", 1)[-1]]))
folder = ks.enable_compilation_cache()
outputs = run_tiny_model()
print(json.dumps({"folder": folder, "hits": events["cache_hits"], "misses": events["cache_misses"], **outputs}))
"""
)


@pytest.mark.skipif(BACKEND != "jax", reason="the cache keeps JAX's programs; other backends refuse it (below)")
def test_a_second_process_loads_the_first_ones_programs_and_computes_the_same(tmp_path):
    """The first process compiles and keeps its programs in Keras' folder. The second, whose JAX is already
    configured with that folder (and whose Keras folder is elsewhere), keeps to it, finds every program there
    and compiles nothing. Both give exactly the outputs, loss and trained outputs of this process, which
    compiles them without that folder."""

    def run(env):
        return json.loads(run_python(_PROCESS, backend="jax", env={**NO_JAX_CACHE_SETTINGS, **env}).splitlines()[-1])

    first = run({"KERAS_HOME": str(tmp_path / "home")})
    assert first["folder"] == str(tmp_path / "home" / "cache" / "keras_sequencer" / "jax"), first["folder"]
    second = run({"KERAS_HOME": str(tmp_path / "elsewhere"), "JAX_COMPILATION_CACHE_DIR": first["folder"]})
    assert second["folder"] == first["folder"] and not (tmp_path / "elsewhere" / "cache").exists(), second["folder"]
    namespace = {}
    exec(_RUN_TINY_MODEL, namespace)
    uncached = namespace["run_tiny_model"]()

    kept = glob.glob(os.path.join(first["folder"], "*-cache"))  # (with a size limit JAX adds other files)
    assert first["misses"] > 0 and len(kept) == first["misses"], first
    # (a program compiled twice in one process is a hit the second time, in the first process too)
    assert second["misses"] == 0 and second["hits"] == first["hits"] + first["misses"], second
    for result in (first, second):
        for key in ("before", "loss", "after"):
            np.testing.assert_array_equal(result[key], uncached[key], err_msg=key)
    assert not np.allclose(uncached["before"], uncached["after"])  # the step trained


@pytest.mark.skipif(BACKEND == "jax", reason="on JAX the cache works (the tests around)")
def test_other_backends_refuse_the_cache_and_say_why():
    with pytest.raises(RuntimeError, match=f"keeps JAX's compiled programs; the Keras backend here is '{BACKEND}'"):
        ks.enable_compilation_cache()


@pytest.mark.backend_agnostic
def test_a_folder_given_after_compiling_elsewhere_takes_over_and_mistakes_are_clear(tmp_path):
    """With a folder configured in JAX, the call keeps to it and keeps small programs there too (JAX's own
    threshold would not); a folder given in a later call takes over for the programs compiled after it; a
    folder that cannot be made, and JAX's cache switched off, are clear errors."""
    configured, given, blocked = (str(tmp_path / name) for name in ("configured", "given", "file/cache"))
    code = f"""
import os
import jax, jax.numpy as jnp
import keras_sequencer as ks

assert ks.enable_compilation_cache() == {configured!r}
jax.jit(lambda x: x * 3.0 + 1.0)(jnp.ones(5)).block_until_ready()  # compiles in milliseconds
before = set(os.listdir({configured!r}))
print(ks.enable_compilation_cache({given!r}))
jax.jit(lambda x: x * 5.0 - 2.0)(jnp.ones(7)).block_until_ready()
print(len(before), len(set(os.listdir({configured!r})) - before), len(os.listdir({given!r})))
for folder in ({blocked!r}, None):
    if folder is None:
        jax.config.update("jax_enable_compilation_cache", False)
    try:
        ks.enable_compilation_cache(folder)
    except (ValueError, RuntimeError) as e:
        print(type(e).__name__, e)
"""
    (tmp_path / "file").write_text("")
    env = {**NO_JAX_CACHE_SETTINGS, "JAX_COMPILATION_CACHE_DIR": configured}
    lines = run_python(code, backend="jax", env=env).strip().splitlines()[-4:]
    assert lines[0] == given, lines
    kept_before, kept_after_elsewhere, kept_given = map(int, lines[1].split())
    assert kept_before > 0 and kept_after_elsewhere == 0 and kept_given > 0, lines
    assert lines[2].startswith(f"ValueError Cannot keep compiled programs in {blocked}: "), lines
    assert "Pass a writable folder" in lines[2], lines
    assert lines[3].startswith("RuntimeError JAX's compilation cache is switched off in this process"), lines
