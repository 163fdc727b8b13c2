"""Command line: `python -m keras_sequencer COMMAND ...` (run with --help for the list)."""

import argparse
import json
import math
import os
import sys

from keras_sequencer.presets import IMAGENET_EVAL, variant_config


def _int_at_least(minimum: int, why: str = ""):
    """An argparse type: an integer >= `minimum` (argparse turns the error into one line and exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}{why}, not {text!r}")
        return value

    parse.__name__ = "integer"
    return parse


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], not {text!r}")
    return value


_COUNT = _int_at_least(1)
# The variants' smallest image: the product of their patch sizes (the same for S, M and L).
_MIN_SIDE = min(math.prod(variant_config(v)["patch_sizes"]) for v in ("s", "m", "l"))
_SIDE = _int_at_least(_MIN_SIDE, " (the product of the patch sizes)")


def _convert(args) -> int:
    import keras_sequencer as ks
    from keras_sequencer.models.weights import save_weights

    if (args.out is None) == (args.preset is None):
        raise ValueError("Give one of --out FILE.weights.h5 (Keras weights) or --preset DIR (a keras-hub preset).")
    if args.out is not None and not args.out.endswith(".weights.h5"):
        raise ValueError(f"--out must end with .weights.h5 (Keras' weights format). Received: --out {args.out}")
    target = args.out or args.preset
    folder = os.path.dirname(os.path.abspath(target))
    if args.out is not None and (os.path.isdir(args.out) or not os.path.isdir(folder)):
        problem = "is a folder" if os.path.isdir(args.out) else f"is in {folder}, which does not exist"
        raise ValueError(f"--out must be a file path in an existing folder; {args.out} {problem}.")
    if args.preset is not None:
        if not os.path.isdir(folder):
            raise ValueError(f"--preset {args.preset} is in {folder}, which does not exist; create it first.")
        if os.path.exists(args.preset) and (not os.path.isdir(args.preset) or os.listdir(args.preset)):
            raise ValueError(f"--preset {args.preset} already exists and is not an empty folder; choose another.")
    if args.source != "imagenet" and not os.path.isfile(args.source):
        raise ValueError(f"The checkpoint {args.source} does not exist (or is a folder). Received: {args.source!r}")
    if args.preset is not None:
        from keras_sequencer.models.backbone import KERAS_HUB_AVAILABLE

        if not KERAS_HUB_AVAILABLE:  # checked before the conversion: the preset is written by keras-hub's saver
            raise ValueError("--preset writes through keras-hub: pip install 'keras-sequencer[hub]'.")
        path = ks.convert_to_preset(args.source, args.variant, args.preset)
        print(f"converted Sequencer2D-{args.variant.upper()} -> preset {path} (model card: {path}/README.md)")
        return 0
    # Building the variant with the checkpoint converts it strictly: every tensor used once, shapes checked.
    model = ks.create_model(f"sequencer2d_{args.variant}", weights=args.source, classifier_activation=None)
    save_weights(model, args.out, variant_config(args.variant))
    print(f"converted {len(model.weights)} variables of Sequencer2D-{args.variant.upper()} -> {args.out}")
    return 0


# The `predict` command calls the model directly for at most this many files (on CPU-only TensorFlow).
_DIRECT_AT_MOST = 32


def _classify(model, images):
    """Class probabilities of the image files of one command. On CPU-only TensorFlow, where `predict` first
    compiles its step with XLA (`CompiledPredict`), a few files go through one direct call of the model
    instead: S on a 2-core CPU, one image: 1.8 s for the first direct call against 5.9 s for the first
    `predict`, though 1.6 s against 0.1 s for each call after it (benchmarks/README.md). Larger inputs, other
    backends (JAX compiles a direct call op by op, PyTorch runs eagerly either way) and GPUs keep `predict`."""
    import keras

    if len(images) > _DIRECT_AT_MOST or not model._xla_on_cpu_tensorflow():
        return model.predict(images, verbose=0)
    return keras.ops.convert_to_numpy(model(images, training=False))


def _keep_compiled_programs(args) -> None:
    """On JAX, unless --no-compilation-cache or JAX's cache is switched off in its own settings: the programs
    this command compiles kept on disk for its next run (`compilation_cache.enable_compilation_cache`: JAX's
    configured folder, else one in Keras' folder). A folder that cannot be written costs only the speed-up: a
    warning, and the command runs."""
    if args.no_compilation_cache:
        return
    import keras

    if keras.backend.backend() != "jax":
        return
    import jax

    from keras_sequencer.compilation_cache import WRITABLE_FOLDER_ADVICE, enable_compilation_cache

    if not jax.config.jax_enable_compilation_cache:  # JAX_ENABLE_COMPILATION_CACHE=false: the user's choice
        return
    try:
        enable_compilation_cache()
    except ValueError as e:
        problem = str(e).replace(WRITABLE_FOLDER_ADVICE, "")  # that advice is for Python callers
        print(f"warning: {problem} Compiling as usual; set KERAS_HOME or JAX_COMPILATION_CACHE_DIR to a "
              "writable folder, or pass --no-compilation-cache.", file=sys.stderr)  # fmt: skip


def _predict(args) -> int:
    import numpy as np

    import keras_sequencer as ks
    from keras_sequencer.imagenet import load_image

    for path in args.images:  # before the model is built (tens of seconds): a typo costs nothing
        if not os.path.isfile(path):
            kind = "a folder" if os.path.isdir(path) else "not found"
            raise ValueError(f"Each image must be an image file; {path} is {kind}. Received: {path!r}")
    images = np.stack([load_image(path, size=args.size) for path in args.images])
    _keep_compiled_programs(args)
    model = ks.create_model(f"sequencer2d_{args.variant}", weights=args.weights)
    for path, row in zip(args.images, ks.decode_predictions(_classify(model, images), top=args.top), strict=True):
        print(path)
        for wnid, name, score in row:
            print(f"  {score:7.4f}  {name} ({wnid})")
    return 0


def _demo(args) -> int:
    from keras_sequencer.demo import run_demo, run_small_ops_side_by_side

    run_small_ops_side_by_side()  # a fresh process: TensorFlow's threads can still be set
    _keep_compiled_programs(args)
    metrics = run_demo(args.output, epochs=args.epochs, batch_size=args.batch_size, data_dir=args.data_dir,
                       limit=args.limit, seed=args.seed)  # fmt: skip
    print(f"Fashion-MNIST test accuracy: {metrics['test_accuracy']:.4f} "
          f"({metrics['test_images']} images; {metrics['epochs']} epochs in {metrics['train_seconds']:.0f} s "
          f"on {metrics['backend']}). Report: {args.output}/")  # fmt: skip
    return 0


def _keep_freed_memory() -> None:
    """`allocator.keep_freed_memory()` before anything is built (its errors as one-line errors)."""
    from keras_sequencer.allocator import keep_freed_memory

    try:
        complete = keep_freed_memory()  # warns where it is not
    except RuntimeError as e:
        raise ValueError(f"--keep-freed-memory: {e}") from e
    if complete:
        print("glibc keeps the memory this process frees (--keep-freed-memory)", file=sys.stderr)


def _train(args) -> int:
    if args.keep_freed_memory:  # before anything allocates on another thread
        _keep_freed_memory()
    _keep_compiled_programs(args)
    from keras_sequencer.checkpointing import save_model
    from keras_sequencer.train import run

    weights = None if args.weights == "none" else args.weights
    model, history = run(
        args.dataset, variant=args.variant, recipe=args.recipe, weights=weights, batch_size=args.batch_size,
        epochs=args.epochs, output_dir=args.output, data_dir=args.data_dir, train_split=args.train_split,
        eval_split=args.eval_split, mixed_precision=args.mixed_precision, devices=args.devices,
        steps_per_epoch=args.steps_per_epoch, image_size=args.image_size,
    )  # fmt: skip
    save_model(model, os.path.join(args.output, "model.keras"))
    print(f"final: { ({k: round(v[-1], 4) for k, v in history.history.items()}) }; model: {args.output}/model.keras")
    return 0


def _export(args) -> int:
    from keras_sequencer import pretrained
    from keras_sequencer.export import export, load_calibration

    calibration = None
    if args.calibration and not os.path.exists(args.calibration):
        raise ValueError(
            "--calibration must be a .npy array of images (n, H, W, 3) or a folder of images; "
            f"{args.calibration} does not exist."
        )
    pretrained.check_keras_file(args.model)
    if args.calibration:
        size = tuple(args.input_size) if args.input_size else None
        if size is None and os.path.isdir(args.calibration):
            size = tuple(pretrained.load_keras_model(args.model).input_shape[1:3])
        calibration = load_calibration(args.calibration, size)
    report = export(args.model, args.output, format=args.format, input_size=args.input_size,
                    batch_size=args.batch, quantize=args.quantize, calibration=calibration,
                    lstm=args.lstm)  # fmt: skip
    if args.json:
        print(json.dumps(report))
    else:
        print(f"wrote {report['path']} ({report['format']}, {report['bytes'] / 2**20:.2f} MiB, input "
              f"{tuple(report['input_shape'])})")  # fmt: skip
        for op, count in report.get("ops", {}).items():
            print(f"  {count:5d}  {op}")
    return 0


def _bench_input(args) -> int:
    from keras_sequencer.bench_input import format_table, measure

    print(format_table(measure(args.recipe, args.batch_size, args.batches, args.threads)))
    return 0


def _bench(args) -> int:
    from keras_sequencer.bench import run

    result = run(variants=args.variants, backends=args.backends, paths=args.paths, batch_sizes=args.batch_sizes,
                 size=args.size, runs=args.runs, warmup=args.warmup, train=not args.no_train,
                 memory=not args.no_memory, memory_size=args.memory_size, tflite=not args.no_tflite,
                 gemm_size=args.gemm_size, dtype_policy=args.dtype_policy, timm_between=not args.timm_once,
                 keep_freed_memory=args.keep_freed_memory, output=args.output)  # fmt: skip
    print(f"wrote {args.output}/bench.json, bench.md, bench.png")
    if result["failures"]:
        print(f"error: {len(result['failures'])} engine(s) failed (above; their errors are in bench.json)",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _research_model(args):
    import keras_sequencer as ks
    from keras_sequencer import pretrained

    if args.model:
        return pretrained.load_keras_model(args.model)
    weights = None if args.weights == "none" else args.weights
    return ks.create_model(f"sequencer2d_{args.variant}", weights=weights, input_shape=(None, None, 3))


def _eval_resolution(args) -> int:
    from keras_sequencer import data
    from keras_sequencer.analysis import evaluate_resolutions, plot_resolution_curve

    source, _ = data.load_split(args.dataset, args.split, args.data_dir)
    if args.limit:
        source = source.take(args.limit)
    model = _research_model(args)
    if model.input_shape[-1] == 3:
        source = data.as_rgb(source)
    result = evaluate_resolutions(model, source, args.resolutions, crop_pct=args.crop_pct,
                                  batch_size=args.batch_size)  # fmt: skip
    os.makedirs(args.output, exist_ok=True)
    plot_resolution_curve(result, os.path.join(args.output, "resolution.png"), trained_at=args.trained_at)
    for size, accuracy in zip(result["resolutions"], result["accuracy"], strict=True):
        print(f"  {size:5d}px  top-1 {100 * accuracy:6.2f} %")
    print(f"{result['images']} images; wrote {args.output}/resolution.png and resolution.json")
    return 0


def _erf(args) -> int:
    import numpy as np

    from keras_sequencer.analysis import effective_receptive_field, erf_area_ratios, plot_erf
    from keras_sequencer.data import IMAGE_EXTENSIONS, list_images
    from keras_sequencer.imagenet import load_image

    paths = []
    for item in args.images:
        paths += list_images(item) if os.path.isdir(item) else [item]
    if not paths:
        raise ValueError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) found in {args.images}")
    images = np.stack([load_image(p, size=args.size) for p in paths])
    erf = effective_receptive_field(_research_model(args), images, stage=args.stage)
    plot_erf(erf, args.output, title=f"ERF, stage {args.stage}, {len(paths)} images")
    print(f"wrote {args.output} (+ .npy); high-contribution area ratios: {erf_area_ratios(erf)}")
    return 0


def _grad_cam(args) -> int:
    import numpy as np

    from keras_sequencer.analysis import grad_cam, plot_grad_cam
    from keras_sequencer.imagenet import decode_predictions, load_image

    image = load_image(args.image, size=args.size)  # the file is checked before the model is built
    if os.path.dirname(os.path.abspath(args.output)) and not os.path.isdir(
        os.path.dirname(os.path.abspath(args.output))
    ):
        raise ValueError(f"--output {args.output} is in a folder that does not exist; create it first.")
    model = _research_model(args)
    cam, index = grad_cam(model, image.astype(np.float32), class_index=args.class_index, stage=args.stage)
    label = str(index)
    if model.outputs[0].shape[-1] == 1000:
        one_hot = np.zeros((1, 1000), np.float32)
        one_hot[0, index] = 1.0
        label = f"{index} {decode_predictions(one_hot, top=1)[0][0][1]}"
    plot_grad_cam(image, cam, args.output, title=f"Grad-CAM, class {label}, stage {args.stage}")
    np.save(os.path.splitext(args.output)[0] + ".npy", cam)
    print(f"wrote {args.output} (+ .npy): class {label}")
    return 0


def _manifest(args) -> int:
    from keras_sequencer.presets import manifest

    print(json.dumps(manifest(), indent=2))
    return 0


def _add_compilation_cache_flag(parser) -> None:
    parser.add_argument(
        "--no-compilation-cache",
        action="store_true",
        help="on JAX: do not keep the compiled programs for the next run (default: kept in "
        "$KERAS_HOME/cache/keras_sequencer/jax; a JAX_COMPILATION_CACHE_DIR of JAX's own is used instead, and "
        "stays in use with this flag, for the programs JAX itself keeps)",
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keras_sequencer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("demo", help="train a small Sequencer2D on Fashion-MNIST offline, write a report")
    p.add_argument("--output", default="reports/demo")
    p.add_argument("--epochs", type=_COUNT, default=None, help="default: the fashion_mnist recipe's")
    p.add_argument("--batch-size", type=_COUNT, default=256)
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX files (default: Debian's package)")
    p.add_argument("--limit", type=_COUNT, default=None, help="use only this many images (quick check)")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="seed of weights, shuffling and augmentation")
    _add_compilation_cache_flag(p)
    p.set_defaults(run=_demo)

    p = commands.add_parser("train", help="train / fine-tune on a tfds dataset or an image folder")
    p.add_argument("--dataset", required=True,
                   help="tfds:NAME (prepared), folder:PATH (PATH/<split>/<class>/...), or fashion_mnist with "
                        "--eval-split test")  # fmt: skip
    p.add_argument("--variant", default="s", choices=["s", "m", "l"])
    p.add_argument("--recipe", default="imagenet", help="imagenet | finetune392 | cifar_transfer | fashion_mnist")
    p.add_argument("--weights", default="none", help="none | imagenet | PATH")
    p.add_argument("--batch-size", type=_COUNT, default=64)
    p.add_argument("--epochs", type=_COUNT, default=None)
    p.add_argument("--steps-per-epoch", type=_COUNT, default=None)
    p.add_argument("--image-size", type=_SIDE, default=None, help="training side; default: the recipe's (or 224)")
    p.add_argument("--output", default="runs/train")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--train-split", default="train")
    p.add_argument("--eval-split", default="validation")
    p.add_argument("--mixed-precision", default=None, choices=["mixed_float16", "mixed_bfloat16"])
    p.add_argument("--devices", type=_COUNT, default=None)
    _add_compilation_cache_flag(p)
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="Linux with glibc: glibc keeps the memory the process frees for reuse (faster steps on JAX "
                        "and PyTorch; the process holds its peak memory)")  # fmt: skip
    p.set_defaults(run=_train)

    p = commands.add_parser("convert", help="convert a timm / authors' checkpoint to a .weights.h5 or a preset")
    p.add_argument("source", help="checkpoint: .safetensors, or .pth/.bin (needs torch)")
    p.add_argument("--variant", required=True, choices=["s", "m", "l"])
    p.add_argument("--out", default=None, help="output path, ending in .weights.h5")
    p.add_argument("--preset", default=None, help="or: a new folder for a keras-hub preset with its model card")
    p.set_defaults(run=_convert)

    p = commands.add_parser("predict", help="top-k ImageNet classes of image files")
    p.add_argument("images", nargs="+")
    p.add_argument("--variant", default="s", choices=["s", "m", "l"])
    p.add_argument("--weights", default="imagenet", help="'imagenet' or a weights / checkpoint path")
    p.add_argument("--size", type=_SIDE, default=IMAGENET_EVAL.input_size,
                   help="centre-crop size (resize to size/crop_pct first)")  # fmt: skip
    p.add_argument("--top", type=_COUNT, default=5)
    _add_compilation_cache_flag(p)
    p.set_defaults(run=_predict)

    p = commands.add_parser("export", help="export a .keras model to TFLite (builtin ops), ONNX or a SavedModel")
    p.add_argument("model", help="a .keras file (from any backend; conversion runs on TensorFlow)")
    p.add_argument("--format", choices=("tflite", "onnx", "saved_model"), default="tflite")
    p.add_argument("--output", required=True, help=".tflite / .onnx file, or SavedModel folder")
    p.add_argument("--input-size", type=_COUNT, nargs=2, metavar=("H", "W"), default=None,
                   help="export size; required when the model takes any size")  # fmt: skip
    p.add_argument("--batch", type=_COUNT, default=1, help="TFLite's fixed batch (ONNX/SavedModel: any batch)")
    p.add_argument("--quantize", choices=("float16", "dynamic", "int8"), default=None, help="TFLite only")
    p.add_argument("--calibration", default=None, help="int8: a .npy of images (n, H, W, 3) or an image folder")
    p.add_argument("--lstm", choices=("auto", "while", "unrolled", "fused"), default="auto",
                   help="TFLite lowering of the LSTMs (fused: stateful LSTM kernels)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the report as one JSON line")
    p.set_defaults(run=_export)

    p = commands.add_parser("bench", help="time ours against timm (every backend and path), table/JSON/PNG")
    from keras_sequencer import bench  # standard library only at import time

    p.add_argument("--variants", nargs="+", choices=bench.VARIANTS, default=["s"])
    p.add_argument("--backends", nargs="+", choices=bench.BACKENDS, default=None,
                   help="default: every installed backend")  # fmt: skip
    p.add_argument("--paths", nargs="+", choices=bench.PATHS, default=list(bench.DEFAULT_PATHS),
                   help="implementation= values; auto is the default users get")  # fmt: skip
    p.add_argument("--batch-sizes", type=_COUNT, nargs="+", default=[1, 16])
    p.add_argument("--size", type=_SIDE, default=224)
    p.add_argument("--runs", type=_COUNT, default=5)
    p.add_argument("--warmup", type=_int_at_least(0), default=2)
    p.add_argument("--memory-size", type=_SIDE, default=448)
    p.add_argument("--gemm-size", type=_COUNT, default=2048, help="side of the fp32 matmul that sets the ceiling")
    p.add_argument("--dtype-policy", choices=bench.DTYPE_POLICIES, default="float32",
                   help="Keras dtype policy of our model; timm runs under torch.autocast, same dtype")  # fmt: skip
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-tflite", action="store_true")
    p.add_argument("--timm-once", action="store_true",
                   help="time timm once, first (default: again after every engine, each engine's ratios to the "
                        "timm runs before and after it)")  # fmt: skip
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="Linux with glibc: every engine's process, timm's too, keeps the memory it frees (as "
                        "`train --keep-freed-memory`): engines compared without per-step page faults")  # fmt: skip
    p.add_argument("--output", default="benchmarks/results")
    p.set_defaults(run=_bench)

    p = commands.add_parser("bench-input", help="images/s the CPU prepares with a recipe's training transforms")
    p.add_argument("--recipe", default="imagenet", help="imagenet | finetune392 | cifar_transfer | fashion_mnist")
    p.add_argument("--batch-size", type=_COUNT, default=64)
    p.add_argument("--batches", type=_COUNT, default=10, help="timed batches (after one warm-up batch)")
    p.add_argument("--threads", type=_COUNT, nargs="+", default=[1, os.cpu_count()])
    p.set_defaults(run=_bench_input)

    for command, helptext in (("eval-resolution", "accuracy of one checkpoint at several test resolutions (PNG)"),
                              ("erf", "effective receptive field of a stage, averaged over images (PNG)"),
                              ("grad-cam", "Grad-CAM of a class on a token map, over the image (PNG)")):  # fmt: skip
        p = commands.add_parser(command, help=helptext)
        p.add_argument("--model", default=None, help="a .keras file (taking any size); else --variant/--weights")
        p.add_argument("--variant", choices=("s", "m", "l"), default="s")
        p.add_argument("--weights", default="imagenet", help="imagenet, none, or a checkpoint path")
        if command == "erf":
            p.add_argument("--stage", type=int, default=-1, help="stage index (-1: the last)")
            p.add_argument("--images", nargs="+", required=True, help="image files or folders")
            p.add_argument("--size", type=_COUNT, default=IMAGENET_EVAL.input_size)
            p.add_argument("--output", default="reports/erf.png")
            p.set_defaults(run=_erf)
        if command == "grad-cam":
            p.add_argument("image", help="an image file")
            p.add_argument("--class-index", type=int, default=None, help="class to explain (default: the top one)")
            p.add_argument("--stage", type=int, default=-1, help="stage index (-1: the last)")
            p.add_argument("--size", type=_COUNT, default=IMAGENET_EVAL.input_size)
            p.add_argument("--output", default="reports/grad_cam.png")
            p.set_defaults(run=_grad_cam)
        if command == "eval-resolution":
            p.add_argument("--dataset", required=True, help="tfds:NAME (prepared), folder:PATH or fashion_mnist")
            p.add_argument("--split", default=None,
                           help="tfds: required (e.g. validation); folder: a sub-folder of PATH (default: PATH "
                                "itself); fashion_mnist: train or test (default)")  # fmt: skip
            p.add_argument("--data-dir", default=None)
            p.add_argument("--resolutions", type=_COUNT, nargs="+", default=[160, 192, 224, 256, 288, 320, 384, 448])
            p.add_argument("--crop-pct", type=_fraction, default=IMAGENET_EVAL.crop_pct)
            p.add_argument("--batch-size", type=_COUNT, default=64)
            p.add_argument("--limit", type=_COUNT, default=None, help="only the first N images")
            p.add_argument("--trained-at", type=_COUNT, default=224, help="marked on the plot")
            p.add_argument("--output", default="reports/resolution")
            p.set_defaults(run=_eval_resolution)

    p = commands.add_parser("manifest", help="print the pretrained-weights registry as JSON")
    p.set_defaults(run=_manifest)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ValueError as e:  # our errors say what to do; no traceback needed
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
