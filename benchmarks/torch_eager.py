"""PyTorch-backend inference with and without Keras' per-layer calls, against timm, in one process.

`keras_sequencer.layers.eager_torch` lets inference without autograd skip Keras' layer calls. This script
times `predict_on_batch` of one model with that on ("direct") and off ("Keras' calls": the check that allows
it, `eager_inference`, patched to answer no), and timm's model under `torch.no_grad()`, in interleaved rounds
(engines compared in separate processes drift apart on these machines). With `--dtype-policy
mixed_bfloat16` the model is built under that policy and timm runs under `torch.autocast` in bfloat16. It
prints a markdown table of medians and ratios to timm.

`--linears` (float32) times the direct path twice more, its blocks' `Dense` matmuls forced through torch's
matmul and through oneDNN's linear (`eager_torch.onednn_linear`, which the package answers per CPU; see
`eager_torch.onednn_pays`): the measurement behind that rule, to repeat on a CPU it does not cover yet.

Usage: KERAS_BACKEND=torch python benchmarks/torch_eager.py [--variant s] [--batch-sizes 1 16] [--rounds 20]
       [--dtype-policy float32|mixed_bfloat16] [--linears]
"""

import argparse
import contextlib
import functools
import os
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="s", choices=("s", "m", "l"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--dtype-policy", default="float32", choices=("float32", "mixed_bfloat16"))
    parser.add_argument("--linears", action="store_true", help="also time torch's matmul and oneDNN's linear")
    args = parser.parse_args()
    if os.environ.get("KERAS_BACKEND") != "torch":
        raise SystemExit("Run with KERAS_BACKEND=torch: this compares the PyTorch backend's inference paths.")
    if args.linears and args.dtype_policy != "float32":
        raise SystemExit("--linears compares float32 matmuls; drop --dtype-policy or --linears.")

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
    allowed, rule = eager_torch.eager_inference, eager_torch.onednn_linear
    linears = {"torch matmul": False, "oneDNN linear": True} if args.linears else {}
    if args.linears and not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        raise SystemExit("--linears: this torch has no oneDNN linear (torch.ops.mkldnn._linear_pointwise).")
    print(f"`{args.dtype_policy}`; this CPU's rule: oneDNN linear {'on' if rule() else 'off'}\n")
    extra = "".join(f" direct, {name} ms |" for name in linears)
    ratios = "".join(f" direct, {name} vs timm |" for name in linears)
    header = "| variant | batch | timm ms | Keras' calls ms | direct ms |"
    print(f"{header}{extra} Keras' calls vs timm | direct vs timm |{ratios}")
    print("|---|---|---|---|---|" + "---|" * (2 + 2 * len(linears)))
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

        def forced(onednn, images=images):
            eager_torch.onednn_linear = lambda: onednn
            try:
                return model.predict_on_batch(images)
            finally:
                eager_torch.onednn_linear = rule

        engines = {"timm": timm_call, "keras": keras_calls, "direct": direct}
        engines.update({name: functools.partial(forced, onednn) for name, onednn in linears.items()})
        times = {name: [] for name in engines}
        for fn in engines.values():  # warm-up
            fn()
        for _ in range(args.rounds):
            for name, fn in engines.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        ms = {name: 1000 * statistics.median(values) for name, values in times.items()}
        forced_ms = "".join(f" {ms[name]:.1f} |" for name in linears)
        forced_ratios = "".join(f" {ms['timm'] / ms[name]:.2f}x |" for name in linears)
        print(
            f"| {args.variant.upper()} | {batch} | {ms['timm']:.1f} | {ms['keras']:.1f} | {ms['direct']:.1f} |"
            f"{forced_ms} {ms['timm'] / ms['keras']:.2f}x | {ms['timm'] / ms['direct']:.2f}x |{forced_ratios}"
        )


if __name__ == "__main__":
    main()
