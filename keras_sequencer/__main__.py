"""Command line: `python -m keras_sequencer {convert,predict,manifest} ...`."""

import argparse
import json
import sys


def _convert(args) -> int:
    import keras_sequencer as ks
    from keras_sequencer.models import variant_config
    from keras_sequencer.pretrained import assign, read_checkpoint

    if not args.out.endswith(".weights.h5"):
        raise SystemExit(f"--out must end with .weights.h5 (Keras' weights format). Received: --out {args.out}")
    config = variant_config(args.variant)
    converted = ks.convert_state_dict(read_checkpoint(args.source), config)
    model = ks.Sequencer2D(**config, weights=None, name=f"sequencer2d_{args.variant}", variant=args.variant)
    assign(model, converted)
    model.save_weights(args.out)
    print(f"converted {len(converted)} variables of Sequencer2D-{args.variant.upper()} -> {args.out}")
    return 0


def _predict(args) -> int:
    import numpy as np

    import keras_sequencer as ks
    from keras_sequencer.imagenet import load_image

    builder = {"s": ks.Sequencer2DS, "m": ks.Sequencer2DM, "l": ks.Sequencer2DL}[args.variant]
    model = builder(weights=args.weights)
    images = np.stack([load_image(path, size=args.size) for path in args.images])
    for path, row in zip(
        args.images, ks.decode_predictions(model.predict(images, verbose=0), top=args.top), strict=True
    ):
        print(path)
        for wnid, name, score in row:
            print(f"  {score:7.4f}  {name} ({wnid})")
    return 0


def _manifest(args) -> int:
    from keras_sequencer.pretrained import manifest

    print(json.dumps(manifest(), indent=2))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keras_sequencer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("convert", help="convert a timm / authors' checkpoint to a Keras .weights.h5")
    p.add_argument("source", help="checkpoint: .safetensors, or .pth/.bin (needs torch)")
    p.add_argument("--variant", required=True, choices=["s", "m", "l"])
    p.add_argument("--out", required=True, help="output path, ending in .weights.h5")
    p.set_defaults(run=_convert)

    p = commands.add_parser("predict", help="top-k ImageNet classes of image files")
    p.add_argument("images", nargs="+")
    p.add_argument("--variant", default="s", choices=["s", "m", "l"])
    p.add_argument("--weights", default="imagenet", help="'imagenet' or a weights / checkpoint path")
    p.add_argument("--size", type=int, default=224, help="centre-crop size (resize to size/0.875 first)")
    p.add_argument("--top", type=int, default=5)
    p.set_defaults(run=_predict)

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
