"""Building Sequencer2D on JAX or PyTorch with and without TensorFlow imported by Keras' serialiser.

Keras' `Bidirectional` serialises its template layer, and Keras' serialiser imports TensorFlow to ask whether
a value is one of its types. The token mixers build their `Bidirectional` layers so that it does not
(`keras_sequencer.layers.rnn`); "imported" patches that guard out, as before it. Each row is a fresh process
(import, build, the first `predict_on_batch` at batch 1) and the two settings alternate, round after round, so
that a machine whose speed drifts moves both. JAX initialises variables asynchronously, so part of a build's
work can land in the first call: compare build + first call. Prints a markdown table.

Usage: python benchmarks/first_build.py [--backends jax torch] [--variant s] [--size 224] [--rounds 3]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

_CHILD = """
import contextlib, json, resource, sys, time
import numpy as np
import keras_sequencer as ks
from keras_sequencer.layers import rnn
if {imported}:
    rnn._tensorflow_left_unimported = contextlib.nullcontext
start = time.perf_counter()
model = ks.create_model("sequencer2d_{variant}", weights=None, input_shape=({size}, {size}, 3))
built = time.perf_counter()
model.predict_on_batch(np.zeros((1, {size}, {size}, 3), "float32"))
called = time.perf_counter()
print(json.dumps({{"build": built - start, "first_call": called - built, "tensorflow": "tensorflow" in sys.modules,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["jax", "torch"], choices=("jax", "torch"))
    parser.add_argument("--variant", default="s", choices=("s", "m", "l"))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    found = {}
    for _ in range(args.rounds):
        for backend in args.backends:
            for imported in (True, False):
                code = _CHILD.format(imported=imported, variant=args.variant, size=args.size)
                env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
                out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
                found.setdefault((backend, imported), []).append(json.loads(out.stdout.splitlines()[-1]))
    print(f"Sequencer2D-{args.variant.upper()} at {args.size}, batch 1; medians of {args.rounds} fresh processes\n")
    print("| backend | TensorFlow | build, s | first call, s | build + first call, s | peak RSS, MB |")
    print("|---|---|---|---|---|---|")
    for (backend, imported), runs in found.items():
        assert all(run["tensorflow"] is imported for run in runs), (backend, imported, runs)

        def median(key, runs=runs):
            return statistics.median(key(run) for run in runs)

        print(
            f"| {backend} | {'imported' if imported else 'not imported'} | {median(lambda r: r['build']):.2f} | "
            f"{median(lambda r: r['first_call']):.2f} | {median(lambda r: r['build'] + r['first_call']):.2f} | "
            f"{median(lambda r: r['peak_mb']):.0f} |"
        )


if __name__ == "__main__":
    main()
