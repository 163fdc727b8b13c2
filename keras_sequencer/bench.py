"""`python -m keras_sequencer bench`: our Sequencer2D against timm's, in one run.

Every engine runs in its own fresh process (a Keras backend is fixed per
process, and TensorFlow's thread pools slow anything sharing its process):
timm (PyTorch), Keras on each requested backend with each forward path
(`implementation="auto"` (the default: what a user gets) / `"keras"` / `"fused"`), and optionally the float32 TFLite
export in the LiteRT interpreter. Each process times, per variant and batch
size, inference (`predict_on_batch` / `torch.no_grad()` forward) and one
training step (forward + backward + AdamW), after the first call and warm-up
calls, as the median of `runs` calls, and the first call of each
(`first_inference`, per batch size, as XLA compiles per input shape;
`first_train_step`: tracing, graph building and compilation included, in
seconds); a separate process per engine measures the peak memory of
inference at `memory_size`: the rise of the process' peak RSS over its RSS
just before the call, for the first call (`memory`: compilation
included, e.g. XLA) and for a second one (`memory_warm`: the growth beyond
what the process already holds after the first call, allocator pools
included; Linux only, where the peak can be reset).

Every speed is also set against the machine's fp32 ceiling: the rate of a
large float32 matmul (2048², default threads) divided by the model's matmul
work (`analysis.count_macs`, LSTMs included; a training step counted as 3x
the forward pass). On a CPU the matmul is timed in torch and in every
backend benchmarked, each in its own process, and the fastest sets the
ceiling: the engines' matmul libraries differ by machine (on an AMD Zen 5
CPU with AVX-512, torch's reached 180 GFLOP/s, JAX's and TensorFlow's 400),
and a ceiling below what an engine reaches would let rows pass 100 %. No
exact float32 implementation can pass 100 %.

With `dtype_policy="mixed_bfloat16"` our model runs under that Keras policy and timm under
`torch.autocast(device, torch.bfloat16)`: same compute dtype on both sides (the ceiling stays the fp32 one,
so bfloat16 rows can pass 100 % on CPUs with AVX512-BF16 or AMX). `"mixed_float16"` (timm: float16 autocast,
AMP) needs a GPU.

On a machine where PyTorch sees a CUDA GPU, timm and the matmul ceiling (torch's alone) run on it, and Keras on whatever
device its backend picks (JAX's and PyTorch's GPU builds take the GPU; TensorFlow needs its own); each Keras
row records whether it ran on an accelerator. timm's calls end with `torch.cuda.synchronize()`, and Keras'
`predict_on_batch` / `train_on_batch` return host values, so every time includes the device's work. The
memory rows measure host memory and are skipped there. float32 on a GPU is not one precision everywhere:
the ceiling's matmul has TF32 off (PyTorch's default for matmuls), while cuDNN's LSTM and convolutions (timm,
the torch path) and JAX's default matmul precision allow TF32, so float32 rows can pass 100 % of the ceiling.
The `path` column shows, for `"auto"`, which path it chose for that task on that machine.

Processes on a shared CPU drift apart over minutes, so timm is timed again after every engine and each
engine's ratio is to the mean of the timm runs just before and after it (`timm_between`; the timm rows,
one per run, show the drift). Timing each engine call by call against a timm process kept up was worse:
the two processes slow each other through memory (docs/design.md).

The result: a table with images/s, the ratio to timm (same machine, same
run) and the share of the ceiling, a JSON file with every number and the
versions, and a PNG chart.
bench.json is rewritten after every engine (`"complete": false` until the end), so a run stopped midway
keeps what it measured; an engine whose process fails is logged with its error, listed under `"failures"`,
and the others still run (the command then exits with 1).
It is a benchmark, never a test: absolute figures mean little on a shared CPU.
"""

import json
import os
import platform
import subprocess
import sys
import tempfile
import time

VARIANTS = ("s", "m", "l")
BACKENDS = ("tensorflow", "jax", "torch")
PATHS = ("auto", "keras", "fused", "scan", "torch", "tensorflow")
DEFAULT_PATHS = ("auto", "keras", "fused")  # the others on request ("torch" and "tensorflow": their backend only)
# Keras' policy for our model -> the dtype of timm's torch.autocast (None: plain float32); float16 on GPUs only.
_AUTOCAST = {"float32": None, "mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}
DTYPE_POLICIES = tuple(_AUTOCAST)


def _torch_device():
    """timm's device and a function that waits for its queued work: the GPU where PyTorch sees one."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda"), torch.cuda.synchronize
    return torch.device("cpu"), lambda: None


def _median_seconds(fn, runs: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    times.sort()
    return times[len(times) // 2]


FIRST_CALLS = ("first_inference", "first_train_step")


def _first_call_row(task: str, call, variant: str, batch: int) -> dict:
    """The first call of `task` (one of `FIRST_CALLS`) at this shape, timed whole: tracing, graph building and
    compilation included."""
    started = time.perf_counter()
    call()
    return {"task": task, "variant": variant, "batch": batch, "seconds": time.perf_counter() - started}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _reset_peak_rss() -> bool:
    """Linux: sets the process' peak RSS (VmHWM) back to its current RSS; False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _memory_rows(call, variant: str, size: int) -> list:
    """Peak-RSS rise of a first call (compilation included) and, where the peak can be reset, of a second one."""
    rows = []
    for task in ("memory", "memory_warm"):
        resettable = _reset_peak_rss()
        if task == "memory_warm" and not resettable:
            break
        before = _rss_bytes()
        call()
        peak = _hwm_bytes() if resettable else _peak_rss_bytes()  # the latter: lifetime peak, build included
        rows.append({"task": task, "variant": variant, "batch": 1, "size": size, "peak_bytes": max(peak - before, 0),
                     "peak_source": "VmHWM reset" if resettable else "ru_maxrss"})  # fmt: skip
    return rows


def _gemm_worker(job):
    """A float32 matmul rate (FLOP/s), `job["gemm_size"]`², best of 5 after a warm-up, in the engine
    `job["engine"]`: torch on the device timm runs on (TF32 off: PyTorch's default for matmuls), or the
    process' Keras backend on the CPU (JAX: a jitted matmul; TensorFlow: its eager `MatMul` kernel, which
    runs synchronously on a CPU), each with its default threads."""
    n, engine = job["gemm_size"], job.get("engine", "torch")
    if engine == "torch":
        import torch

        device, sync = _torch_device()
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        threads = torch.get_num_threads()

        def product():
            a @ b
            sync()

        name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        extra = {}
        if device.type == "cpu":
            from keras_sequencer.layers.eager_torch import onednn_linear

            if onednn_linear():  # the PyTorch backend's blocks multiply in oneDNN here: its rate counts too

                def linear():
                    torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")

                linear()
                extra["onednn_flops_per_s"] = 2 * n**3 / min(_median_seconds(linear, 1, 0) for _ in range(5))
    else:
        import keras
        import numpy as np

        if keras.backend.backend() != engine:
            raise RuntimeError(f"the {engine} matmul needs KERAS_BACKEND={engine}; got {keras.backend.backend()}")
        values = np.random.default_rng(0).standard_normal((2, n, n)).astype("float32")
        threads, name, extra = None, "cpu", {}
        if engine == "jax":
            import jax

            cpu = jax.devices("cpu")[0]
            a, b = (jax.device_put(v, cpu) for v in values)
            multiply = jax.jit(lambda x, y: x @ y)

            def product():
                multiply(a, b).block_until_ready()

        else:
            import tensorflow as tf

            with tf.device("/CPU:0"):
                a, b = (tf.constant(v) for v in values)

            def product():
                with tf.device("/CPU:0"):
                    tf.linalg.matmul(a, b)

    product()
    best = min(_median_seconds(product, 1, 0) for _ in range(5))
    return {"engine": engine, "size": n, "flops_per_s": 2 * n**3 / best, "threads": threads, "device": name, **extra}


def measure_ceiling(gemm_size: int, backends, log=print) -> dict:
    """The fp32 ceiling: torch's matmul rate and, on a CPU, each backend's (its own process) and, where the
    PyTorch backend's blocks use it (`eager_torch.onednn_linear`), oneDNN's linear in torch; the fastest sets
    `flops_per_s` (`engine` names it, `rates` holds every engine's). On a GPU torch's alone, with TF32 off; the
    backends' float32 matmuls there may use TF32 and would not be a float32 rate."""
    gemm = _spawn("gemm", {"gemm_size": gemm_size, "engine": "torch"}, backend="torch")
    rates = {"torch": gemm["flops_per_s"]}
    onednn = gemm.pop("onednn_flops_per_s", None)
    if onednn is not None and "torch" in backends:
        rates["torch (oneDNN linear)"] = onednn
    for backend in backends if gemm["device"] == "cpu" else ():
        if backend != "torch":
            try:
                found = _spawn("gemm", {"gemm_size": gemm_size, "engine": backend}, backend=backend)
            except RuntimeError as error:  # that engine's own run reports it; the ceiling goes on without it
                log(f"  {backend}'s matmul failed, left out of the ceiling: {str(error).strip().splitlines()[-1]}")
                continue
            rates[backend] = found["flops_per_s"]
    fastest = max(rates, key=rates.get)
    measured = ", ".join(f"{engine} {rate / 1e9:.0f}" for engine, rate in rates.items())
    log(f"  {measured} GFLOP/s: the ceiling is {fastest}'s")
    threads = gemm["threads"] if fastest.startswith("torch") else None  # torch's thread count, where it is torch's
    return {**gemm, "engine": fastest, "flops_per_s": rates[fastest], "threads": threads, "rates": rates}


# ---------------------------------------------------------------------------- workers (one process each)


def _timm_worker(job):
    import contextlib

    import numpy as np
    import timm
    import torch

    autocast = _AUTOCAST[job["dtype_policy"]]  # timm's counterpart of Keras' mixed policy
    device, sync = _torch_device()

    def forward(model, x):  # autocast entered per call, as Keras casts its variables per call
        precision = torch.autocast(device.type, getattr(torch, autocast)) if autocast else contextlib.nullcontext()
        with precision:
            out = model(x)
        sync()
        return out

    rows = []
    for variant in job["variants"]:
        model = timm.create_model(f"sequencer2d_{variant}", pretrained=False).eval().to(device)
        if job["memory"]:
            side = job["memory_size"]
            x = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 3, side, side)).astype("float32")).to(device)
            with torch.no_grad():
                rows += _memory_rows(lambda model=model, x=x: forward(model, x), variant, side)
            continue
        for batch in job["batch_sizes"]:
            shape = (batch, 3, job["size"], job["size"])
            x = torch.from_numpy(np.random.default_rng(0).normal(size=shape).astype("float32")).to(device)
            with torch.no_grad():
                rows.append(_first_call_row("first_inference", lambda x=x, model=model: forward(model, x), variant,
                                            batch))  # fmt: skip
                seconds = _median_seconds(lambda x=x, model=model: forward(model, x), job["runs"], job["warmup"])
            rows.append({"task": "inference", "variant": variant, "batch": batch, "seconds": seconds})
        if job["train"]:
            batch = max(job["batch_sizes"])
            model.train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
            x = torch.randn(batch, 3, job["size"], job["size"], device=device)
            y = torch.randint(0, 1000, (batch,), device=device)
            # float16 gradients underflow without loss scaling: AMP's scaler, as Keras' LossScaleOptimizer
            scaler = torch.amp.GradScaler(device.type, enabled=autocast == "float16")

            def step(model=model, optimizer=optimizer, x=x, y=y, scaler=scaler):
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(torch.nn.functional.cross_entropy(forward(model, x).float(), y)).backward()
                scaler.step(optimizer)
                scaler.update()
                sync()

            rows.append(_first_call_row("first_train_step", step, variant, batch))
            rows.append({"task": "train_step", "variant": variant, "batch": batch,
                         "seconds": _median_seconds(step, job["runs"], job["warmup"])})  # fmt: skip
    return rows


def _keras_worker(job):
    import keras
    import numpy as np

    import keras_sequencer as ks
    from keras_sequencer.layers import token_mixing
    from keras_sequencer.precision import on_accelerator

    keras.mixed_precision.set_global_policy(job["dtype_policy"])
    builders = {"s": ks.Sequencer2DS, "m": ks.Sequencer2DM, "l": ks.Sequencer2DL}
    # the path each task runs (what "auto" chose here: it depends on the backend and the GPU)
    compute_dtype = keras.mixed_precision.Policy(job["dtype_policy"]).compute_dtype
    chosen = {task: token_mixing.choose_path(job["path"], True, True, training, compute_dtype)
              for task, training in (("inference", False), ("train_step", True))}  # fmt: skip
    chosen["first_train_step"], chosen["first_inference"] = chosen["train_step"], chosen["inference"]
    device = "accelerator" if on_accelerator(keras.backend.backend()) else "cpu"
    rows = []
    for variant in job["variants"]:
        size = job["memory_size"] if job["memory"] else job["size"]
        model = builders[variant](weights=None, input_shape=(size, size, 3), classifier_activation=None,
                                  implementation=job["path"])  # fmt: skip
        if job["memory"]:
            x = np.random.default_rng(0).uniform(0, 255, (1, size, size, 3)).astype("float32")
            rows += _memory_rows(lambda model=model, x=x: model.predict_on_batch(x), variant, size)
            continue
        for batch in job["batch_sizes"]:
            x = np.random.default_rng(0).uniform(0, 255, (batch, size, size, 3)).astype("float32")
            rows.append(_first_call_row("first_inference", lambda x=x, model=model: model.predict_on_batch(x), variant,
                                        batch))  # fmt: skip
            seconds = _median_seconds(lambda x=x, model=model: model.predict_on_batch(x), job["runs"], job["warmup"])
            rows.append({"task": "inference", "variant": variant, "batch": batch, "seconds": seconds})
        if job["train"]:
            batch = max(job["batch_sizes"])
            model.compile(optimizer=keras.optimizers.AdamW(1e-4, weight_decay=0.05),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))  # fmt: skip
            x = np.random.default_rng(1).uniform(0, 255, (batch, size, size, 3)).astype("float32")
            y = np.random.default_rng(2).integers(0, 1000, (batch,))
            rows.append(_first_call_row("first_train_step", lambda model=model, x=x, y=y: model.train_on_batch(x, y),
                                        variant, batch))  # fmt: skip
            seconds = _median_seconds(
                lambda model=model, x=x, y=y: model.train_on_batch(x, y), job["runs"], job["warmup"]
            )
            rows.append({"task": "train_step", "variant": variant, "batch": batch, "seconds": seconds})
    for row in rows:
        row["chosen_path"], row["device"] = chosen.get(row["task"], chosen["inference"]), device
    return rows


def _tflite_export_worker(job):
    """TensorFlow backend: writes the float32 TFLite files the timing worker will run."""
    import keras_sequencer as ks
    from keras_sequencer.export import export

    builders = {"s": ks.Sequencer2DS, "m": ks.Sequencer2DM, "l": ks.Sequencer2DL}
    files = []
    for variant in job["variants"]:
        model = builders[variant](weights=None, input_shape=(job["size"], job["size"], 3), classifier_activation=None)
        path = os.path.join(job["folder"], f"{variant}.tflite")
        report = export(model, path, batch_size=1)
        files.append({"variant": variant, "path": path, "lstm": report["lstm"]})
    return files


def _tflite_time_worker(job):
    from ai_edge_litert.interpreter import Interpreter
    import numpy as np

    rows = []
    for item in job["files"]:
        interpreter = Interpreter(model_path=item["path"], num_threads=os.cpu_count())
        interpreter.allocate_tensors()
        (inp,) = interpreter.get_input_details()
        x = np.random.default_rng(0).uniform(0, 255, inp["shape"]).astype("float32")

        def call(interpreter=interpreter, inp=inp, x=x):
            interpreter.set_tensor(inp["index"], x)
            interpreter.invoke()

        rows.append({"task": "inference", "variant": item["variant"], "batch": 1, "lstm": item["lstm"],
                     "seconds": _median_seconds(call, job["runs"], job["warmup"])})  # fmt: skip
    return rows


_WORKERS = {"timm": _timm_worker, "keras": _keras_worker, "gemm": _gemm_worker,
            "tflite_export": _tflite_export_worker, "tflite_time": _tflite_time_worker}  # fmt: skip


def _spawn(kind: str, job: dict, backend: str = "tensorflow"):
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    code = "import json, sys; from keras_sequencer.bench import _run_worker; _run_worker(sys.argv[1], sys.argv[2])"
    result = subprocess.run([sys.executable, "-c", code, kind, json.dumps(job)], capture_output=True, text=True,
                            env=env)  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"benchmark worker {kind} ({backend}) failed with exit status {result.returncode}:\n"
                           f"{result.stderr[-3000:]}")  # fmt: skip
    try:
        return json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError) as error:
        raise RuntimeError(f"benchmark worker {kind} ({backend}) printed no result ({error}):\n"
                           f"{result.stdout[-1500:]}\n{result.stderr[-1500:]}") from error  # fmt: skip


def _run_worker(kind: str, job_json: str):
    job = json.loads(job_json)
    if job.get("keep_freed_memory"):  # before the engine allocates anything (timm's process too)
        import warnings

        from keras_sequencer.allocator import keep_freed_memory

        with warnings.catch_warnings():  # partly applied would compare engines under different allocators
            warnings.simplefilter("error", RuntimeWarning)
            keep_freed_memory()
    if kind == "timm":
        import timm  # noqa: F401  (before anything that loads TensorFlow; see README, Known issues)
    print(json.dumps(_WORKERS[kind](job)))


# ---------------------------------------------------------------------------- the run


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def run(
    variants=("s",),
    backends=None,
    paths=DEFAULT_PATHS,
    batch_sizes=(1, 16),
    size=224,
    runs=5,
    warmup=2,
    train=True,
    memory=True,
    memory_size=448,
    tflite=True,
    gemm_size=2048,
    dtype_policy="float32",
    timm_between=True,
    keep_freed_memory=False,
    output="benchmarks/results",
    log=print,
) -> dict:
    """Runs the benchmark; returns `{"rows", "failures", "complete", "machine", "settings"}` (what bench.json
    holds) and writes JSON, PNG and a table.

    `timm_between`: timm is timed again after every engine, and each engine's ratios are to the mean of the
    timm runs just before and after it (rows `timm_runs`), so a machine that drifts over minutes moves both
    sides of a ratio; the timm rows show that drift against the mean of all timm runs. Otherwise timm runs
    once, first. Peak memory does not drift: timm's is measured once.

    `keep_freed_memory`: every engine's process, timm's included, starts with
    `allocator.keep_freed_memory()` (Linux with glibc), so the engines compare without glibc's per-step page
    faults; the peak-memory rows then show memory that glibc keeps rather than returns."""
    if gemm_size < 64:
        raise ValueError(f"`gemm_size` must be at least 64 (2048 measures the rate). Received: gemm_size={gemm_size}")
    if keep_freed_memory:
        from keras_sequencer.allocator import malloc_arenas

        try:
            malloc_arenas()  # at once where glibc is missing, before any engine runs
        except RuntimeError as error:
            raise ValueError(f"`keep_freed_memory=True`: {error}") from error
    if dtype_policy not in DTYPE_POLICIES:
        raise ValueError(f"`dtype_policy` must be one of {DTYPE_POLICIES}. Received: dtype_policy={dtype_policy!r}")
    backends = [b for b in (backends or BACKENDS) if _installed(b)]
    job = {"variants": list(variants), "batch_sizes": list(batch_sizes), "size": size, "runs": runs,
           "warmup": warmup, "train": train, "memory": False, "memory_size": memory_size,
           "dtype_policy": dtype_policy, "keep_freed_memory": keep_freed_memory}  # fmt: skip
    rows, failures = [], []
    os.makedirs(output, exist_ok=True)

    def save(complete):  # after every engine: a run stopped midway keeps what it measured
        result = {"rows": _with_ratios(rows, size, gemm["flops_per_s"]), "failures": failures, "complete": complete,
                  "machine": {**_machine(), "fp32_gemm": gemm},
                  "settings": {**job, "paths": list(paths), "timm_between": timm_between}}  # fmt: skip
        path = os.path.join(output, "bench.json")
        with open(path + ".partial", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(path + ".partial", path)  # a run killed while writing keeps the previous file whole
        return result

    def measure(engine, path, kind, worker_job, backend, timings=True, **fields):
        """Runs one engine's worker and keeps its rows (`timings`, with `fields` added); a failing engine is
        reported, and the others still run."""
        try:
            found = _spawn(kind, worker_job, backend=backend)
        except RuntimeError as error:
            reason = str(error).strip().splitlines()[-1]
            log(f"  {engine} ({path}) failed: {reason}")
            failures.append({"engine": engine, "path": path, "kind": kind, "error": str(error)[-3000:]})
            save(complete=False)
            return None
        if timings:
            rows.extend({"engine": engine, "path": path, **row, **fields} for row in found)
            save(complete=False)
        return found

    for name, value in timing_environment().items():
        log(f"{name}={value} (every engine's process inherits it)")
    if keep_freed_memory:
        log("glibc keeps freed memory in every engine's process (keep_freed_memory)")
    log(f"fp32 matmul rate ({gemm_size}², torch and each backend on a CPU) ...")
    gemm = measure_ceiling(gemm_size, backends, log)
    on_gpu = gemm["device"] != "cpu"
    if dtype_policy == "mixed_float16" and not on_gpu:
        raise ValueError("`dtype_policy='mixed_float16'` is for GPUs and PyTorch sees none here; on a CPU compare "
                         "'mixed_bfloat16' (or 'float32').")  # fmt: skip
    if on_gpu:
        log(f"on {gemm['device']}: timm runs on the GPU, Keras where its backend puts it (column `device`)")
    timm_done = 0  # timm runs so far; each engine's rows name the runs its ratios use

    def time_timm():
        nonlocal timm_done
        log(f"timm (PyTorch){f', run {timm_done + 1}' if timm_between else ''} ...")
        measure("timm", "-", "timm", job, "torch", timm_run=timm_done)
        timm_done += 1

    def neighbours():  # the timm run before this engine, and the one after it when timm runs between
        return [timm_done - 1, timm_done] if timm_between else [0]

    time_timm()
    for backend in backends:
        for path in paths:
            log(f"keras on {backend}, implementation={path} ...")
            measure(f"keras-{backend}", path, "keras", {**job, "path": path}, backend, timm_runs=neighbours())
            if timm_between:
                time_timm()
    if memory and on_gpu:
        log("peak memory skipped: it is measured as host RSS, which says nothing of GPU memory")
    elif memory:
        log(f"peak memory at {memory_size}x{memory_size} ...")
        measure("timm", "-", "timm", {**job, "memory": True}, "torch", timm_run=0)  # memory does not drift
        for backend in backends:
            for path in paths:
                measure(f"keras-{backend}", path, "keras", {**job, "memory": True, "path": path}, backend)
    if tflite and dtype_policy != "float32":
        log("TFLite skipped: the export is float32 (its own quantisation options are `export`'s)")
    elif tflite and _installed("ai_edge_litert") and _installed("tensorflow"):
        log("TFLite float32 (LiteRT) ...")
        with tempfile.TemporaryDirectory() as folder:
            files = measure("tflite", "auto", "tflite_export", {**job, "folder": folder}, "tensorflow", False)
            if files is not None:
                measure("tflite", "auto", "tflite_time", {**job, "files": files}, "tensorflow",
                        timm_runs=neighbours())  # fmt: skip
                if timm_between:
                    time_timm()
    result = save(complete=True)
    table = format_table(result["rows"], dtype_policy)
    with open(os.path.join(output, "bench.md"), "w") as f:
        f.write(table + "\n")
    log(table)
    for failure in failures:
        log(f"FAILED: {failure['engine']} ({failure['path']}): {failure['error'].strip().splitlines()[-1]}")
    _plot(result["rows"], os.path.join(output, "bench.png"))
    return result


def _with_ratios(rows, size=None, gemm_flops_per_s=None):
    """Adds images/s and, for time rows, speed vs timm (>1 = faster) and the share of the fp32 ceiling
    (`size`: the timed rows' image side); memory rows get the ratio of bytes."""
    from keras_sequencer.analysis import count_macs

    reference = {}  # (task, variant, batch) -> {timm run: timm's row}
    for r in rows:
        if r["engine"] == "timm":
            reference.setdefault((r["task"], r["variant"], r["batch"]), {})[r.get("timm_run", 0)] = r
    for row in rows:
        runs = reference.get((row["task"], row["variant"], row["batch"]), {})
        # timm's own rows against the mean of all its runs (1.00x when it ran once); an engine against the
        # runs it names (`timm_runs`: the ones before and after it), else every run
        named = runs if row["engine"] == "timm" else {k: runs[k] for k in row.get("timm_runs", runs) if k in runs}
        base = named[min(named)] if named else None  # memory: timm's one measurement
        if "seconds" in row:
            row["images_per_s"] = row["batch"] / row["seconds"]
            timm_seconds = sum(r["seconds"] for r in named.values()) / len(named) if named else None
            row["vs_timm"] = None if timm_seconds is None else timm_seconds / row["seconds"]
            if gemm_flops_per_s and row["task"] not in FIRST_CALLS:
                flops = 2 * count_macs(row["variant"], size) * (3 if row["task"] == "train_step" else 1)
                row["of_fp32_ceiling"] = row["images_per_s"] * flops / gemm_flops_per_s
        else:
            row["vs_timm"] = row["peak_bytes"] / base["peak_bytes"] if base and base["peak_bytes"] > 0 else None
    return rows


def format_table(rows, dtype_policy="float32") -> str:
    autocast = _AUTOCAST[dtype_policy]
    lines = [f"dtype policy {dtype_policy} (timm: torch.autocast, {autocast})\n"] if autocast else []
    lines += ["| task | variant | batch | engine | path | images/s, s or peak MiB | vs timm | of fp32 ceiling |",
             "|---" * 8 + "|"]  # fmt: skip
    timm_runs = {}  # task -> the timm runs that measured it
    for row in rows:
        if row["engine"] == "timm":
            timm_runs.setdefault(row["task"], set()).add(row.get("timm_run", 0))
    for row in sorted(rows, key=lambda r: (r["task"], r["variant"], r["batch"], r["engine"] != "timm", r["engine"],
                                           r["path"], r.get("timm_run", 0))):  # fmt: skip
        ratio = "-" if row["vs_timm"] is None else f"{row['vs_timm']:.2f}x"
        ceiling = f"{row['of_fp32_ceiling']:.0%}" if row.get("of_fp32_ceiling") is not None else "-"
        if row["task"].startswith("memory"):
            value = f"{row['peak_bytes'] / 2**20:.0f} MiB @ {row['size']}²"
            ratio = ratio.replace("x", "x mem")
        elif row["task"] in FIRST_CALLS:  # compilation included: seconds, not a rate
            value = f"{row['seconds']:.1f} s"
        else:
            value = f"{row['images_per_s']:.2f}"
        chosen = row.get("chosen_path", row["path"])
        path = row["path"] if chosen == row["path"] else f"{row['path']} ({chosen})"
        if row["engine"] == "timm" and len(timm_runs.get(row["task"], ())) > 1:
            path = f"run {row['timm_run'] + 1}"
        lines.append(f"| {row['task']} | {row['variant'].upper()} | {row['batch']} | {row['engine']} | "
                     f"{path} | {value} | {ratio} | {ceiling} |")  # fmt: skip
    return "\n".join(lines)


def _plot(rows, path):
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if "seconds" in r and r["task"] not in FIRST_CALLS]
    groups = sorted({(r["task"], r["variant"], r["batch"]) for r in timed})
    if not groups:  # every timed engine failed
        return
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 4), squeeze=False)
    for ax, group in zip(axes[0], groups, strict=True):
        found = [r for r in timed if (r["task"], r["variant"], r["batch"]) == group]
        labels = [r["engine"] + ("" if r["path"] in ("-", "auto") else f"\n{r['path']}") for r in found]
        ax.bar(range(len(found)), [r["images_per_s"] for r in found],
               color=["tab:gray" if r["engine"] == "timm" else "tab:blue" for r in found])  # fmt: skip
        ax.set_xticks(range(len(found)), labels, rotation=60, fontsize=7)
        ax.set(title=f"{group[0]}, {group[1].upper()}, batch {group[2]}", ylabel="images/s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _machine() -> dict:
    import importlib.metadata as md

    versions = {}
    for package in ("keras", "tensorflow", "tensorflow-cpu", "jax", "torch", "timm", "ai-edge-litert"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "versions": versions, "environment": timing_environment()}  # fmt: skip


# Environment variables that move the timings (glibc's allocator, XLA, thread counts, preloaded libraries).
# Every engine's process inherits them, so one run compares the engines under the same settings.
TIMING_VARIABLES = ("GLIBC_TUNABLES", "LD_PRELOAD", "XLA_FLAGS", "OMP_NUM_THREADS", "TF_ENABLE_ONEDNN_OPTS",
                    "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")  # fmt: skip


def timing_environment() -> dict:
    """The `TIMING_VARIABLES` set in this process (bench.json records them beside the machine)."""
    return {name: os.environ[name] for name in TIMING_VARIABLES if name in os.environ}
