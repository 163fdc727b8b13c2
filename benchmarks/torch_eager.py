"""PyTorch-backend inference with and without Keras' per-layer calls, against timm, in one process.

`keras_sequencer.layers.eager_torch` lets inference without autograd skip Keras' layer calls. This script
times `predict_on_batch` of one model with that on ("direct") and off ("Keras' calls": the check that allows
it, `eager_inference`, patched to answer no), and timm's model under `torch.no_grad()`, in interleaved rounds
(engines compared in separate processes drift apart on these machines). With `--dtype-policy
mixed_bfloat16` the model is built under that policy and timm runs under `torch.autocast` in bfloat16. It
prints a markdown table of medians and ratios to timm.

Usage: KERAS_BACKEND=torch python benchmarks/torch_eager.py [--variant s] [--batch-sizes 1 16] [--rounds 20]
       [--dtype-policy float32|mixed_bfloat16]
"""

import argparse
import contextlib
import os
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="s", choices=("s", "m", "l"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--dtype-policy", default="float32", choices=("float32", "mixed_bfloat16"))
    args = parser.parse_args()
    if os.environ.get("KERAS_BACKEND") != "torch":
        raise SystemExit("Run with KERAS_BACKEND=torch: this compares the PyTorch backend's inference paths.")

    import timm  # before TensorFlow (imported by keras_sequencer): the other order crashes
    import torch

    import keras_sequencer as ks
    from keras_sequencer.layers import eager_torch

    torch.manual_seed(0)
    import keras  # after timm, as keras_sequencer is

    keras.config.set_dtype_policy(args.dtype_policy)
    model = getattr(ks, f"Sequencer2D{args.variant.upper()}")(weights=None)
    half = args.dtype_policy == "mixed_bfloat16"
    reference = timm.create_model(f"sequencer2d_{args.variant}", pretrained=False).eval()
    allowed = eager_torch.eager_inference
    print(f"`{args.dtype_policy}`\n")
    print("| variant | batch | timm ms | Keras' calls ms | direct ms | Keras' calls vs timm | direct vs timm |")
    print("|---|---|---|---|---|---|---|")
    for batch in args.batch_sizes:
        images = torch.rand(batch, 224, 224, 3).mul(255).numpy()
        reference_images = torch.randn(batch, 3, 224, 224)

        def keras_calls(images=images):
            eager_torch.eager_inference = lambda *args: False
            try:
                return model.predict_on_batch(images)
            finally:
                eager_torch.eager_inference = allowed

        def timm_call(images=reference_images):
            autocast = torch.autocast("cpu", dtype=torch.bfloat16) if half else contextlib.nullcontext()
            with torch.no_grad(), autocast:
                return reference(images)

        def direct(images=images):
            return model.predict_on_batch(images)

        engines = {"timm": timm_call, "keras": keras_calls, "direct": direct}
        times = {name: [] for name in engines}
        for fn in engines.values():  # warm-up
            fn()
        for _ in range(args.rounds):
            for name, fn in engines.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        ms = {name: 1000 * statistics.median(values) for name, values in times.items()}
        print(
            f"| {args.variant.upper()} | {batch} | {ms['timm']:.1f} | {ms['keras']:.1f} | {ms['direct']:.1f} | "
            f"{ms['timm'] / ms['keras']:.2f}x | {ms['timm'] / ms['direct']:.2f}x |"
        )


if __name__ == "__main__":
    main()
