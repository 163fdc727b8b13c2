"""Export Sequencer2D-S to TFLite, run it in LiteRT, compare with Keras.

    python examples/export_tflite.py                          # random weights, 224x224, every variant
    python examples/export_tflite.py --weights imagenet       # the converted ImageNet weights (downloads)
    python examples/export_tflite.py --weights model.safetensors --size 160

For each TFLite variant it prints the file size, the op histogram, the median
latency in the LiteRT interpreter (`ai-edge-litert`) and the largest difference
from the Keras model's logits on the same image. Offline, it uses random
weights (exact numerics are the same; only the predictions are meaningless).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

# Timed in a fresh interpreter process: in the exporting process TensorFlow's thread pools compete with
# LiteRT's and slow it down (benchmarks/README.md).
_TIMING = """
import json, sys, time
import numpy as np
from keras_sequencer.export import run_tflite, tflite_interpreter
path, threads, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
interpreter = tflite_interpreter(path, num_threads=threads)
image = np.load(sys.argv[4])
logits = run_tflite(interpreter, image)
times = []
for _ in range(runs):
    started = time.perf_counter()
    run_tflite(interpreter, image)
    times.append(time.perf_counter() - started)
print(json.dumps({"median_s": float(np.median(times)), "logits": logits.tolist()}))
"""


def _time_in_fresh_process(path, image_path, threads, runs):
    result = subprocess.run([sys.executable, "-c", _TIMING, path, str(threads), str(runs), image_path],
                            capture_output=True, text=True, check=True)  # fmt: skip
    timed = json.loads(result.stdout.strip().splitlines()[-1])
    return timed["median_s"], np.asarray(timed["logits"], dtype="float32")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=None, help="None (random), 'imagenet' or a checkpoint path")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["float32", "float16", "dynamic", "int8", "fused"],
        help="float32, float16, dynamic, int8 (unrolled LSTMs) and fused (float32, TFLite LSTM kernels)",
    )
    parser.add_argument("--output", default=None, help="folder for the .tflite files (default: a temp folder)")
    args = parser.parse_args()

    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras_sequencer as ks
    from keras_sequencer.export import export

    model = ks.Sequencer2DS(weights=args.weights, input_shape=(args.size, args.size, 3), classifier_activation=None)
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, (1, args.size, args.size, 3)).astype("float32")
    calibration = rng.uniform(0, 255, (8, args.size, args.size, 3)).astype("float32")  # use real images in practice
    expected = np.asarray(model.predict(image, verbose=0))
    output = args.output or tempfile.mkdtemp(prefix="sequencer_tflite_")
    image_path = os.path.join(output, "image.npy")
    np.save(image_path, image)

    rows = []
    for variant in args.variants:
        quantize = None if variant in ("float32", "fused") else variant
        lstm = "fused" if variant == "fused" else "auto"
        path = os.path.join(output, f"sequencer2d_s_{args.size}_{variant}.tflite")
        started = time.perf_counter()
        report = export(model, path, quantize=quantize, lstm=lstm,
                        calibration=calibration if quantize == "int8" else None)  # fmt: skip
        convert_s = time.perf_counter() - started
        median_s, logits = _time_in_fresh_process(path, image_path, args.threads, args.runs)
        rows.append((variant, report["lstm"], report["bytes"] / 2**20, 1000 * median_s, convert_s,
                     float(np.abs(logits - expected).max()), int(logits.argmax() == expected.argmax())))  # fmt: skip
        print(f"\n{variant}: {path}")
        print("  ops: " + ", ".join(f"{op} x{n}" for op, n in report["ops"].items()))

    print(f"\nSequencer2D-S, {args.size}x{args.size}, batch 1, LiteRT with {args.threads} threads")
    header = ("variant", "lstm", "MiB", "median ms", "convert s", "max |diff|", "same top-1")
    print("{:<9} {:<9} {:>7} {:>10} {:>10} {:>11} {:>10}".format(*header))
    for variant, lstm, mib, ms, convert_s, diff, same in rows:
        same = "yes" if same else "no"
        print(f"{variant:<9} {lstm:<9} {mib:7.1f} {ms:10.1f} {convert_s:10.1f} {diff:11.2e} {same:>10}")


if __name__ == "__main__":
    main()
