"""First calls on JAX with and without `enable_compilation_cache`, in alternating fresh processes.

Each round runs three processes one after another: without the cache, with the cache on an empty folder
(compiles and keeps what it compiled), and with the cache on that same folder (loads it). Each process times:
building `--variant` with random weights (the variables' initialisers are compiled), its first
`predict_on_batch` at `--batch-size`, its first `train_on_batch` at that batch size (AdamW, sparse
cross-entropy; tracing, compilation and the step) and the step after it. It prints a markdown table: medians
over the rounds, and each setting's first calls against those without the cache.

Usage: python benchmarks/compilation_cache.py [--variant s] [--batch-size 16] [--size 224] [--rounds 2]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

SETTINGS = ("no cache", "cache, empty folder", "cache, filled folder")
COLUMNS = ("build", "first predict", "first training step", "next training step")


def measure(variant: str, batch_size: int, size: int, folder: str | None) -> dict:
    """Seconds of each first call; runs in the child process."""
    import keras
    import numpy as np

    import keras_sequencer as ks

    if folder is not None:
        ks.enable_compilation_cache(folder)
    times = {}
    start = time.perf_counter()
    model = ks.create_model(f"sequencer2d_{variant}", weights=None, input_shape=(size, size, 3),
                            classifier_activation=None)  # fmt: skip
    times["build"] = time.perf_counter() - start
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (batch_size, size, size, 3)).astype("float32")
    y = rng.integers(0, 1000, batch_size)
    start = time.perf_counter()
    keras.ops.convert_to_numpy(model.predict_on_batch(x))
    times["first predict"] = time.perf_counter() - start
    model.compile(optimizer=keras.optimizers.AdamW(1e-4, weight_decay=0.05),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))  # fmt: skip
    for key in ("first training step", "next training step"):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        times[key] = time.perf_counter() - start
    return times


def _child(args, folder: str | None) -> dict:
    command = [sys.executable, __file__, "--child", folder or "", "--variant", args.variant,
               "--batch-size", str(args.batch_size), "--size", str(args.size)]  # fmt: skip
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"}
    for name in ("DIR", "MAX_SIZE"):  # JAX's own cache settings: the "no cache" process has none
        env.pop(f"JAX_COMPILATION_CACHE_{name}", None)
    env.pop("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", None)
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"the child process failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=("s", "m", "l"), default="s")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.variant, args.batch_size, args.size, args.child or None)))
        return
    runs = {setting: [] for setting in SETTINGS}
    for round_ in range(args.rounds):
        with tempfile.TemporaryDirectory() as folder:
            for setting in SETTINGS:
                runs[setting].append(_child(args, None if setting == "no cache" else folder))
                print(f"round {round_ + 1}, {setting}: {runs[setting][-1]}", file=sys.stderr, flush=True)
    medians = {s: {c: statistics.median(run[c] for run in runs[s]) for c in COLUMNS} for s in SETTINGS}
    print(f"Sequencer2D-{args.variant.upper()} at {args.size}², batch {args.batch_size}, JAX; seconds, median of "
          f"{args.rounds} fresh processes per setting (x: against no cache)\n")  # fmt: skip
    print("| setting | " + " | ".join(COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for setting in SETTINGS:
        cells = []
        for column in COLUMNS:
            value, base = medians[setting][column], medians["no cache"][column]
            ratio = "" if setting == "no cache" or column == "next training step" else f" ({base / value:.2f}x)"
            cells.append(f"{value:.2f}{ratio}")
        print(f"| {setting} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
