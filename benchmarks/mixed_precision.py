"""float32 against Keras' mixed policies on this machine, per backend: inference of S and the demo's training step.

Each backend runs in a fresh process; inside it the policies' models are timed in interleaved rounds.
Prints a markdown table with each policy's time as a ratio to float32 in the same process, and whether
`keras_sequencer` warns (`PrecisionWarning`) about that policy here.

Usage: python benchmarks/mixed_precision.py [--backends tensorflow jax torch] [--rounds 4]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")


def worker(rounds: int) -> dict:
    import warnings

    import keras
    import numpy as np

    from keras_sequencer import PrecisionWarning, Sequencer2DS
    from keras_sequencer.demo import build_demo_model

    rng = np.random.default_rng(0)
    images = rng.standard_normal((4, 224, 224, 3)).astype("float32")
    digits = rng.standard_normal((128, 28, 28, 1)).astype("float32")
    labels = rng.integers(0, 10, 128)
    models, demos, warned = {}, {}, {}
    for policy in POLICIES:
        keras.config.set_dtype_policy(policy)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            models[policy] = Sequencer2DS(weights=None)
            demos[policy] = build_demo_model()
        warned[policy] = any(issubclass(w.category, PrecisionWarning) for w in caught)
        keras.config.set_dtype_policy("float32")
        demos[policy].compile("adamw", "sparse_categorical_crossentropy")
        models[policy].predict_on_batch(images)  # first calls: tracing and compilation
        demos[policy].train_on_batch(digits, labels)
        demos[policy].train_on_batch(digits, labels)
    predict = {p: [] for p in POLICIES}
    train = {p: [] for p in POLICIES}
    for _ in range(rounds):
        for policy in POLICIES:
            start = time.perf_counter()
            models[policy].predict_on_batch(images)
            predict[policy].append(time.perf_counter() - start)
            start = time.perf_counter()
            for _ in range(3):
                demos[policy].train_on_batch(digits, labels)
            train[policy].append((time.perf_counter() - start) / 3)
    return {
        p: {"predict": statistics.median(predict[p]), "train": statistics.median(train[p]), "warns": warned[p]}
        for p in POLICIES
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["tensorflow", "jax", "torch"])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.rounds)))
        return
    rows = [
        "| backend | policy | S 224² batch 4 `predict_on_batch` ms | vs float32 | demo `train_on_batch` (128) ms "
        "| vs float32 | PrecisionWarning |",
        "|---|---|---|---|---|---|---|",
    ]
    for backend in args.backends:
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
        command = [sys.executable, __file__, "--worker", "--rounds", str(args.rounds)]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"The {backend} worker failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        base = result["float32"]
        for policy in POLICIES:
            r = result[policy]
            rows.append(
                f"| {backend} | {policy} | {r['predict'] * 1e3:.0f} | {base['predict'] / r['predict']:.2f}x "
                f"| {r['train'] * 1e3:.0f} | {base['train'] / r['train']:.2f}x | {'yes' if r['warns'] else 'no'} |"
            )
    print("\n".join(rows))
    print("vs float32: float32's time over the policy's (above 1.00x the policy is faster).")


if __name__ == "__main__":
    main()
