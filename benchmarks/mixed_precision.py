"""float32 against Keras' mixed policies on this machine, per backend: inference of S and the demo's training step.

Each backend runs in a fresh process; inside it the policies' models are timed in interleaved rounds.
Prints a markdown table with each policy's time as a ratio to float32 in the same process, and whether
`keras_sequencer` warns (`PrecisionWarning`) about that policy here.

Usage: python benchmarks/mixed_precision.py [--backends tensorflow jax torch] [--rounds 4] [--batch 4] [--train demo]

`--train s` times Sequencer2D-S's own training step at `--batch` (AdamW) instead of the demo model's: the
workload the warning rule is meant for, at about ten times the run time.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")


def worker(rounds: int, batch: int, train_model: str) -> dict:
    import warnings

    import keras
    import numpy as np

    from keras_sequencer import PrecisionWarning, Sequencer2DS
    from keras_sequencer.demo import build_demo_model

    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch, 224, 224, 3)).astype("float32")
    if train_model == "s":
        train_x, train_y = images, rng.integers(0, 1000, batch)
    else:
        train_x, train_y = rng.standard_normal((128, 28, 28, 1)).astype("float32"), rng.integers(0, 10, 128)
    models, demos, warned = {}, {}, {}
    for policy in POLICIES:
        keras.config.set_dtype_policy(policy)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            models[policy] = Sequencer2DS(weights=None)
            # S's training step runs on the model that `predict_on_batch` times: one S per policy, not two
            demos[policy] = models[policy] if train_model == "s" else build_demo_model()
        warned[policy] = any(issubclass(w.category, PrecisionWarning) for w in caught)
        keras.config.set_dtype_policy("float32")
        demos[policy].compile("adamw", "sparse_categorical_crossentropy")
        models[policy].predict_on_batch(images)  # first calls: tracing and compilation
        demos[policy].train_on_batch(train_x, train_y)
        demos[policy].train_on_batch(train_x, train_y)
    predict = {p: [] for p in POLICIES}
    train = {p: [] for p in POLICIES}
    for _ in range(rounds):
        for policy in POLICIES:
            start = time.perf_counter()
            models[policy].predict_on_batch(images)
            predict[policy].append(time.perf_counter() - start)
            start = time.perf_counter()
            repeats = 1 if train_model == "s" else 3
            for _ in range(repeats):
                demos[policy].train_on_batch(train_x, train_y)
            train[policy].append((time.perf_counter() - start) / repeats)
    return {
        p: {"predict": statistics.median(predict[p]), "train": statistics.median(train[p]), "warns": warned[p]}
        for p in POLICIES
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["tensorflow", "jax", "torch"])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4, help="batch size of S's inference (and of its training)")
    parser.add_argument(
        "--train", choices=["demo", "s"], default="demo", help="time the demo model's training step or S's"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.rounds, args.batch, args.train)))
        return
    trained = f"S `train_on_batch` ({args.batch})" if args.train == "s" else "demo `train_on_batch` (128)"
    rows = [
        f"| backend | policy | S 224² batch {args.batch} `predict_on_batch` ms | vs float32 | {trained} ms "
        "| vs float32 | PrecisionWarning |",
        "|---|---|---|---|---|---|---|",
    ]
    for backend in args.backends:
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
        command = [sys.executable, __file__, "--worker", "--rounds", str(args.rounds), "--batch", str(args.batch)]
        command += ["--train", args.train]
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
