"""Export Sequencer2D to TFLite in every variant, run each file in LiteRT, print one table.

    python examples/export_tflite.py                          # S, random weights, 224x224, every variant
    python examples/export_tflite.py --weights imagenet       # the converted ImageNet weights (downloads)
    python examples/export_tflite.py --fashion-model reports/demo/model.keras   # + accuracy of each variant

For each file: size, op count, median latency in the LiteRT interpreter
(`ai-edge-litert`, XNNPACK, each file timed in a fresh process, the files
interleaved round by round), the largest difference from the Keras model's
logits, and how often its top-1 class agrees with the Keras float32 model's on
real photos (scikit-image's sample photos; scikit-image is required). With
random weights the numerics are the same as with trained ones; only the
classes mean nothing.

When `litert-torch` is installed (`pip install litert-torch`, or pass the
Python of another environment with `--litert-torch-python`), timm's model with
the same weights goes through it too and gets a row: the PyTorch route to the
same runtime. Converting S that way takes several minutes.

`--fashion-model` (the main job's `reports/demo/model.keras`) also exports that
model in each variant and reports top-1 accuracy on the 10,000 Fashion-MNIST
test images against float32.
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

VARIANTS = {  # name -> (quantize, lstm)
    "float32": (None, "unrolled"),
    "float16": ("float16", "unrolled"),
    "dynamic": ("dynamic", "unrolled"),
    "int8": ("int8", "unrolled"),
    "while": (None, "while"),
    "fused": (None, "fused"),
}

# Timed in fresh interpreter processes: in the exporting process TensorFlow's thread pools compete with
# LiteRT's and slow it down (benchmarks/README.md). One process per file, started round by round.
_TIMING = """
import json, sys, time
import numpy as np
from ai_edge_litert.interpreter import Interpreter
path, threads, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
interpreter = Interpreter(model_path=path, num_threads=threads)
interpreter.allocate_tensors()
(inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
images = np.load(sys.argv[4]).astype(np.float32)
outputs = []
for image in images:  # reset: a "fused" file keeps its LSTM state between calls
    interpreter.set_tensor(inp["index"], image[None])
    interpreter.reset_all_variables()
    interpreter.invoke()
    outputs.append(interpreter.get_tensor(out["index"])[0].copy())
times = []
for _ in range(runs):
    interpreter.set_tensor(inp["index"], images[:1])
    interpreter.reset_all_variables()
    started = time.perf_counter()
    interpreter.invoke()
    times.append(time.perf_counter() - started)
print(json.dumps({"times": times, "logits": np.stack(outputs).tolist()}))
"""

# timm's model through litert-torch, in its own process (torch before anything else). It takes what ours
# takes: NHWC RGB in [0, 255], normalised inside the graph as timm's eval transform normalises.
_LITERT_TORCH = """
import json, sys, time
import torch, timm, litert_torch
from safetensors.torch import load_file, save_file
variant, checkpoint, size, output, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
mean, std = json.loads(sys.argv[6])
torch.manual_seed(0)
model = timm.create_model(f"sequencer2d_{variant}", pretrained=False, img_size=size).eval()
if mode == "save":  # timm's random initialisation, saved for the Keras model to load
    with torch.no_grad():  # timm zeroes the head: every logit would be 0 and every top-1 agree
        for name, tensor in model.named_parameters():
            if name.startswith("head") and not tensor.any():
                tensor.normal_(0.0, 0.02)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, checkpoint)
elif checkpoint.endswith(".safetensors"):
    model.load_state_dict(load_file(checkpoint))
else:  # the authors' .pth
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)

class Pixels(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).reshape(1, 3, 1, 1))

    def forward(self, images):
        return self.model((images.permute(0, 3, 1, 2) / 255 - self.mean) / self.std)

started = time.perf_counter()
litert_torch.convert(Pixels().eval(), (torch.zeros(1, size, size, 3),)).export(output)
print(json.dumps({"convert_s": time.perf_counter() - started}))
"""


def _time_files(paths, images_path, threads, runs, rounds):
    """Median latency (over every round's calls) and the logits of `images_path`, per file."""
    times = {path: [] for path in paths}
    logits = {}
    for _ in range(rounds):
        for path in paths:
            result = subprocess.run(
                [sys.executable, "-c", _TIMING, path, str(threads), str(runs), images_path],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            timed = json.loads(result.stdout.strip().splitlines()[-1])
            times[path] += timed["times"]
            logits[path] = np.asarray(timed["logits"], dtype="float32")
    return {path: float(np.median(times[path])) for path in paths}, logits


def _photos(size):
    """scikit-image's sample photos, cropped and resized as timm evaluates (0-255 RGB)."""
    try:
        import skimage.data
    except ImportError as error:
        raise SystemExit("The photo comparison needs scikit-image: pip install scikit-image") from error

    from keras_sequencer.data import eval_transform

    names = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "hubble_deep_field", "immunohistochemistry")
    photos = []
    for name in names:
        image = getattr(skimage.data, name, None)
        if image is not None:
            photos.append(np.asarray(eval_transform(np.asarray(image())[..., :3], size=size)))
    return np.stack(photos).astype("float32")


def _fashion_accuracy(model_path, variants, output, threads):
    """Top-1 accuracy of each variant of the demo model on the 10,000 Fashion-MNIST test images."""
    from keras_sequencer import pretrained
    from keras_sequencer.data import load_fashion_mnist
    from keras_sequencer.export import export, run_tflite, tflite_interpreter

    (x_train, _), (x_test, y_test) = load_fashion_mnist()
    model = pretrained.load_keras_model(model_path)
    x_test = x_test.astype("float32")
    keras_top1 = np.asarray(model.predict(x_test, batch_size=500, verbose=0)).argmax(-1)
    rows = [("keras", float((keras_top1 == y_test).mean()), 1.0)]
    calibration = x_train[:200].astype("float32")
    for name in variants:
        quantize, lstm = VARIANTS[name]
        if name == "fused":
            continue
        path = os.path.join(output, f"fashion_{name}.tflite")
        export(model, path, quantize=quantize, lstm=lstm, calibration=calibration if quantize == "int8" else None)
        interpreter = tflite_interpreter(path, num_threads=threads)
        top1 = np.array([run_tflite(interpreter, image[None])[0].argmax() for image in x_test])
        rows.append((name, float((top1 == y_test).mean()), float((top1 == keras_top1).mean())))
    print(f"\nFashion-MNIST demo model ({model_path}), 10,000 test images")
    print("{:<9} {:>9} {:>22}".format("variant", "top-1", "agrees with Keras"))
    for name, accuracy, agreement in rows:
        print(f"{name:<9} {100 * accuracy:8.2f}% {100 * agreement:21.2f}%")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="s", choices=("s", "m", "l"))
    parser.add_argument("--weights", default=None,
                        help="None (random), 'imagenet' or a checkpoint (.safetensors / .pth)")  # fmt: skip
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--runs", type=int, default=5, help="timed calls per file per round")
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per file, interleaved")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--litert-torch-python", default=None,
                        help="Python with litert-torch and timm (default: this one, if it has them)")  # fmt: skip
    parser.add_argument("--no-litert-torch", action="store_true", help="skip timm's litert-torch row")
    parser.add_argument("--fashion-model", default=None, help="the demo's model.keras: accuracy of each variant")
    parser.add_argument("--output", default=None, help="folder for the files (default: a temporary folder)")
    args = parser.parse_args()

    output = args.output or tempfile.mkdtemp(prefix="sequencer_tflite_")
    os.makedirs(output, exist_ok=True)
    litert_python = args.litert_torch_python
    if litert_python is None and all(importlib.util.find_spec(m) for m in ("litert_torch", "timm")):
        litert_python = sys.executable
    with_timm = litert_python is not None and not args.no_litert_torch

    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras_sequencer as ks
    from keras_sequencer import pretrained
    from keras_sequencer.export import export, op_histogram
    from keras_sequencer.presets import IMAGENET_EVAL

    photos = _photos(args.size)
    photos_path = os.path.join(output, "photos.npy")
    np.save(photos_path, photos)
    checkpoint = pretrained.fetch_checkpoint(args.variant) if args.weights == "imagenet" else args.weights
    if with_timm and checkpoint is not None and not str(checkpoint).endswith((".safetensors", ".pth")):
        print(f"No litert-torch row: timm loads .safetensors or .pth checkpoints, not {checkpoint}")
        with_timm = False
    timm_row = None
    if with_timm:  # first: with random weights it writes timm's initialisation for the Keras model to load
        mode = "load" if checkpoint is not None else "save"
        if checkpoint is None:
            checkpoint = os.path.join(output, f"timm_sequencer2d_{args.variant}_random.safetensors")
        path = os.path.join(output, f"timm_sequencer2d_{args.variant}_{args.size}_litert_torch.tflite")
        normalisation = json.dumps([IMAGENET_EVAL.mean, IMAGENET_EVAL.std])
        print(f"timm's Sequencer2D-{args.variant.upper()} through litert-torch (minutes)...", flush=True)
        result = subprocess.run([litert_python, "-c", _LITERT_TORCH, args.variant, checkpoint, str(args.size),
                                 path, mode, normalisation], capture_output=True, text=True)  # fmt: skip
        if result.returncode != 0:
            print(f"No litert-torch row: the conversion failed:\n{result.stderr[-2000:]}")
            if mode == "save":
                checkpoint = None
        else:
            with open(path, "rb") as f:
                timm_row = {"name": "timm", "lstm": "litert-torch", "path": path, "ops": op_histogram(f.read()),
                            "convert_s": json.loads(result.stdout.strip().splitlines()[-1])["convert_s"]}  # fmt: skip

    build = {"s": ks.Sequencer2DS, "m": ks.Sequencer2DM, "l": ks.Sequencer2DL}[args.variant]
    model = build(weights=checkpoint, input_shape=(args.size, args.size, 3), classifier_activation=None)
    expected = np.asarray(model.predict(photos, batch_size=1, verbose=0))
    calibration = photos  # int8: real photos; pass a few hundred training images in practice

    rows, paths = [], []
    for name in args.variants:
        quantize, lstm = VARIANTS[name]
        path = os.path.join(output, f"sequencer2d_{args.variant}_{args.size}_{name}.tflite")
        started = time.perf_counter()
        report = export(model, path, quantize=quantize, lstm=lstm,
                        calibration=np.repeat(calibration, 2, axis=0) if quantize == "int8" else None)  # fmt: skip
        rows.append({"name": name, "lstm": report["lstm"], "path": path, "convert_s": time.perf_counter() - started,
                     "ops": report["ops"]})  # fmt: skip
        paths.append(path)
        print(f"{name}: {path}\n  ops: " + ", ".join(f"{op} x{n}" for op, n in report["ops"].items()), flush=True)
    if timm_row is not None:
        rows.append(timm_row)
        paths.append(timm_row["path"])

    medians, logits = _time_files(paths, photos_path, args.threads, args.runs, args.rounds)
    reference = medians[rows[0]["path"]] if args.variants[0] == "float32" else None
    print(f"\nSequencer2D-{args.variant.upper()}, {args.size}x{args.size}, batch 1, LiteRT (XNNPACK) with "
          f"{args.threads} threads; {len(photos)} photos; each file in a fresh process, {args.rounds} rounds x "
          f"{args.runs} calls")  # fmt: skip
    header = ("variant", "lstm", "MiB", "ops", "median ms", "vs float32", "convert s", "max |diff|", "top-1 agrees")
    print("{:<8} {:<12} {:>6} {:>6} {:>10} {:>10} {:>9} {:>10} {:>12}".format(*header))
    for row in rows:
        path = row["path"]
        mib = os.path.getsize(path) / 2**20
        ms = 1000 * medians[path]
        speed = f"{reference / medians[path]:.2f}x" if reference else "-"
        diff = float(np.abs(logits[path] - expected).max())
        agrees = f"{int((logits[path].argmax(-1) == expected.argmax(-1)).sum())}/{len(photos)}"
        print(f"{row['name']:<8} {row['lstm']:<12} {mib:6.1f} {sum(row['ops'].values()):6d} {ms:10.1f} {speed:>10} "
              f"{row['convert_s']:9.1f} {diff:10.2e} {agrees:>12}")  # fmt: skip

    if args.fashion_model:
        _fashion_accuracy(args.fashion_model, args.variants, output, args.threads)


if __name__ == "__main__":
    main()
