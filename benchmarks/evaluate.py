"""TensorFlow `evaluate` with and without this package's XLA test step, in alternating fresh processes.

On CPU-only TensorFlow a Sequencer2D model compiles `evaluate`'s step with XLA and batches NumPy arrays
with a tf.data pipeline without autotuning (`CompiledPredict.make_test_function`, `_evaluate_array`);
`model.xla_evaluate_on_cpu = False` gives Keras' defaults (no XLA, Keras' array pipeline). This script
times both on two workloads, each setting in a fresh process, the processes alternated `--rounds` times:

- `s`: Sequencer2D-S (random weights) at 224², `evaluate` of `--images` random NumPy images and labels at
  batch size 16 (sparse cross-entropy and accuracy);
- `demo`: the demo model (`keras_sequencer.demo`) on the 10,000 Fashion-MNIST test images through the demo's
  own test pipeline (batches of 500), with the demo's TensorFlow threads; needs the data
  (`bash scripts/fashion_mnist.sh`).

Each process times its first call (compilation and tracing included) and then `--calls` more. It prints a
markdown table: the first calls, the later calls' median and range, and the ratio of the medians.

Usage: python benchmarks/evaluate.py [--workloads s demo] [--rounds 2] [--calls 6] [--images 64]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def measure(workload: str, xla: bool, calls: int, images: int) -> list[float]:
    """Seconds of each `evaluate` call, the first included; runs in the child process."""
    import tensorflow as tf

    from keras_sequencer import data, demo

    if workload == "demo":
        demo.run_small_ops_side_by_side()
    import keras
    import numpy as np

    if workload == "s":
        import keras_sequencer as ks

        model = ks.Sequencer2DS(weights=None, classifier_activation=None)
        rng = np.random.RandomState(0)
        arguments = (rng.uniform(0, 255, (images, 224, 224, 3)).astype("float32"), rng.randint(0, 1000, images))
        options = {"batch_size": 16}
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    else:
        model = demo.build_demo_model()
        _, (x_test, y_test) = data.load_fashion_mnist()
        test = tf.data.Dataset.from_tensor_slices((x_test, y_test))
        arguments = (data.make_dataset(test, num_classes=10, batch_size=500, training=False),)
        options = {}
        loss = keras.losses.CategoricalCrossentropy(from_logits=True)
    model.xla_evaluate_on_cpu = xla
    model.compile(loss=loss, metrics=["accuracy"])
    seconds = []
    for _ in range(calls + 1):
        start = time.perf_counter()
        model.evaluate(*arguments, verbose=0, **options)
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=["s", "demo"], choices=("s", "demo"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--calls", type=int, default=6)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--child", nargs=2, metavar=("WORKLOAD", "XLA"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        workload, xla = args.child
        print(json.dumps(measure(workload, xla == "1", args.calls, args.images)))
        return

    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    results = {}
    for workload in args.workloads:
        for _ in range(args.rounds):
            for xla in (False, True):
                command = [sys.executable, __file__, "--child", workload, str(int(xla)),
                           "--calls", str(args.calls), "--images", str(args.images)]  # fmt: skip
                done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
                results.setdefault((workload, xla), []).append(json.loads(done.stdout.strip().splitlines()[-1]))
    print("| workload | `evaluate` step | first calls, s | later calls: median (range), s | speed-up |")
    print("|---|---|---|---|---|")
    for workload in args.workloads:
        medians = {}
        for xla in (False, True):
            runs = results[(workload, xla)]
            later = [seconds for run in runs for seconds in run[1:]]
            medians[xla] = statistics.median(later)
            label = "XLA (the default)" if xla else "Keras' default (`xla_evaluate_on_cpu = False`)"
            firsts = ", ".join(f"{run[0]:.1f}" for run in runs)
            spread = f"{medians[xla]:.2f} ({min(later):.2f}–{max(later):.2f})"
            gain = f"{medians[False] / medians[True]:.2f}x" if xla else "1.00x"
            print(f"| {workload} | {label} | {firsts} | {spread} | {gain} |")


if __name__ == "__main__":
    main()
