"""The demo model with its batches in parts (`batch_parts`), TensorFlow, in alternating fresh processes.

`model.batch_parts = k` cuts every batch into k slices that TensorFlow can run side by side. This script
times, for each k in `--parts`, the demo model (`keras_sequencer.demo`, the `fashion_mnist` recipe's AdamW
and loss) on real Fashion-MNIST images (`bash scripts/fashion_mnist.sh`):

- `train_on_batch` at batch 256: the first call (tracing included), then the median of `--steps` more;
- `evaluate` of the 10,000 test images through the demo's test pipeline (batches of 500): the first call,
  then the median of `--calls` more (whole batches are compiled with XLA, parts are not).

`--threads demo` gives TensorFlow the demo's threads (one per op, two ops at a time,
`demo.run_small_ops_side_by_side`, which needs at most 2 cores); `--threads default` keeps TensorFlow's.
Every setting runs in a fresh process; the settings are alternated `--rounds` times. Prints a markdown
table with each round's medians and the speed of the medians' median against k = 1.

Usage: python benchmarks/batch_parts.py [--parts 1 2 4 8] [--threads demo] [--rounds 2] [--steps 30] [--calls 3]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def measure(parts: int, threads: str, steps: int, calls: int) -> dict:
    """Seconds of the first and later training steps and `evaluate` calls; runs in the child process."""
    from keras_sequencer import data, demo, train

    if threads == "demo" and not demo.run_small_ops_side_by_side():
        raise SystemExit("The demo's threads could not be set (more than 2 cores, or threads set already).")
    import keras
    import numpy as np
    import tensorflow as tf

    recipe = train.get_recipe("fashion_mnist")
    (x_train, y_train), (x_test, y_test) = data.load_fashion_mnist()
    model = demo.build_demo_model(drop_path_rate=recipe.drop_path_rate)
    model.batch_parts = parts
    model.compile(
        optimizer=train.make_optimizer(recipe, global_batch=256, steps_per_epoch=len(x_train) // 256),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )
    x = x_train[:256].astype("float32")
    y = np.eye(10, dtype="float32")[y_train[:256]]
    test = data.make_dataset(tf.data.Dataset.from_tensor_slices((x_test, y_test)), num_classes=10, batch_size=500,
                             training=False)  # fmt: skip

    def timed(function, count):
        seconds = []
        for _ in range(count + 1):
            start = time.perf_counter()
            function()
            seconds.append(time.perf_counter() - start)
        return seconds

    return {
        "train": timed(lambda: model.train_on_batch(x, y), steps),
        "evaluate": timed(lambda: model.evaluate(test, verbose=0), calls),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--threads", choices=("demo", "default"), default="demo")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.threads, args.steps, args.calls)))
        return

    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    if args.threads == "demo":  # `run_small_ops_side_by_side` leaves threads chosen by the user alone
        env.pop("TF_NUM_INTRAOP_THREADS", None), env.pop("TF_NUM_INTEROP_THREADS", None)
    results = {}
    for _ in range(args.rounds):
        for parts in args.parts:
            command = [sys.executable, __file__, "--child", str(parts), "--threads", args.threads,
                       "--steps", str(args.steps), "--calls", str(args.calls)]  # fmt: skip
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"k={parts} failed:\n{done.stderr[-3000:]}")
            results.setdefault(parts, []).append(json.loads(done.stdout.strip().splitlines()[-1]))

    def medians(parts, key):
        return [statistics.median(run[key][1:]) for run in results[parts]]

    base = {key: statistics.median(medians(args.parts[0], key)) for key in ("train", "evaluate")}
    print(f"TensorFlow threads: {args.threads}; speed against k = {args.parts[0]}")
    print("| k | first step, s | step, ms (each round) | speed "
          "| first `evaluate`, s | `evaluate`, s (each round) | speed |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for parts in args.parts:
        runs = results[parts]
        step, evaluate = medians(parts, "train"), medians(parts, "evaluate")
        first_steps = ", ".join(f"{run['train'][0]:.1f}" for run in runs)
        first_evaluations = ", ".join(f"{run['evaluate'][0]:.1f}" for run in runs)
        steps = ", ".join(f"{1000 * seconds:.0f}" for seconds in step)
        evaluations = ", ".join(f"{seconds:.2f}" for seconds in evaluate)
        step_speed = base["train"] / statistics.median(step)
        evaluate_speed = base["evaluate"] / statistics.median(evaluate)
        print(f"| {parts} | {first_steps} | {steps} | {step_speed:.2f}x | {first_evaluations} | {evaluations} "
              f"| {evaluate_speed:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
