"""`python -m keras_sequencer bench` at a toy size: it runs timm and this backend and writes its files.

Speed is never asserted (a benchmark, not a timed test); the checks are that
every engine ran, and that the table's ratios are the JSON's own timings
and MAC counts.
"""

import json
import platform

from conftest import run_cli
import pytest

from keras_sequencer.analysis import count_macs

BACKEND = "torch"  # the fastest worker to start; the command spawns its own processes whatever runs pytest


def _onednn_rate(gemm) -> set:
    """The ceiling's entry for oneDNN's linear in torch: present on a CPU where the PyTorch backend uses it."""
    from keras_sequencer.layers.eager_torch import onednn_linear

    return {"torch (oneDNN linear)"} if gemm["device"] == "cpu" and onednn_linear() else set()


@pytest.mark.backend_agnostic
def test_bench_writes_table_json_and_png(tmp_path):
    """By default timm is timed before and after the engine, and each ratio is to the mean of both runs."""
    result = run_cli(
        "bench", "--backends", BACKEND, "--paths", "auto", "--batch-sizes", "1", "2", "--size", "28",
        "--memory-size", "42", "--runs", "1", "--warmup", "1", "--gemm-size", "256", "--no-tflite",
        "--output", tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads((tmp_path / "bench.json").read_text())
    rows, gemm = found["rows"], found["machine"]["fp32_gemm"]
    assert gemm["size"] == 256 and gemm["flops_per_s"] > 1e8
    import torch

    assert gemm["device"] == (torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    assert set(gemm["rates"]) == {"torch"} | _onednn_rate(gemm)  # the one engine here
    assert gemm["flops_per_s"] == max(gemm["rates"].values()) == gemm["rates"][gemm["engine"]]
    # "auto" on PyTorch runs torch.lstm for inference and training; the rows say so
    assert {r["chosen_path"] for r in rows if r["engine"] == f"keras-{BACKEND}"} == {"torch"}
    on_gpu = gemm["device"] != "cpu"  # host-RSS memory rows are skipped there
    assert {r["device"] for r in rows if r["engine"] == f"keras-{BACKEND}"} == {"accelerator" if on_gpu else "cpu"}
    engines = {(r["engine"], r["path"], r["task"], r["batch"]) for r in rows}
    for path in ("auto",):
        tasks = [("inference", 1), ("inference", 2), ("train_step", 2), ("first_train_step", 2)]
        tasks += [("first_inference", 1), ("first_inference", 2)]
        for task, batch in tasks + ([] if on_gpu else [("memory", 1)]):
            assert (f"keras-{BACKEND}", path, task, batch) in engines
            assert ("timm", "-", task, batch) in engines
    timm = {(r["task"], r["batch"], r["timm_run"]): r for r in rows if r["engine"] == "timm"}
    timed = {(task, batch) for task, batch in tasks}
    assert {key for key in timm if key[:2] in timed} == {(*key, run) for key in timed for run in (0, 1)}

    def timm_mean(task, batch):
        return (timm[(task, batch, 0)]["seconds"] + timm[(task, batch, 1)]["seconds"]) / 2

    # The warm figure needs a resettable peak RSS (/proc/self/clear_refs): every engine has it, or none.
    warm = {(r["engine"], r["path"]) for r in rows if r["task"] == "memory_warm"}
    assert warm in (set(), {(e, p) for e, p, task, _ in engines if task == "memory"})
    for row in rows:
        if row["task"].startswith("memory"):
            if row["task"] == "memory":  # a first call allocates; a warm one may need nothing new
                assert row["peak_bytes"] > 0
            assert row["size"] == 42
            reference = timm[(row["task"], 1, 0)]["peak_bytes"]  # measured once
            expected = None if reference == 0 else row["peak_bytes"] / reference
            assert row["vs_timm"] == pytest.approx(expected, abs=1e-9)
            continue
        assert row["timm_runs"] == [0, 1] if row["engine"] != "timm" else row["timm_run"] in (0, 1)
        assert row["vs_timm"] == pytest.approx(timm_mean(row["task"], row["batch"]) / row["seconds"], rel=1e-9)
        if row["engine"] == "timm":
            assert f"| timm | run {row['timm_run'] + 1} |" in result.stdout
        if row["task"] in ("first_train_step", "first_inference"):  # compilation included: seconds, no ceiling
            assert row["seconds"] > 0
            assert "of_fp32_ceiling" not in row
            assert f"| {row['seconds']:.1f} s | {row['vs_timm']:.2f}x | - |" in result.stdout
        else:
            assert abs(row["images_per_s"] - row["batch"] / row["seconds"]) < 1e-9
            flops = 2 * count_macs("s", 28) * (3 if row["task"] == "train_step" else 1)
            assert abs(row["of_fp32_ceiling"] - row["images_per_s"] * flops / gemm["flops_per_s"]) < 1e-9
            assert f"| {row['vs_timm']:.2f}x | {row['of_fp32_ceiling']:.0%} |" in result.stdout
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    assert (tmp_path / "bench.md").read_text().strip() in result.stdout


@pytest.mark.backend_agnostic
def test_bench_reports_a_failing_engine_and_keeps_the_others(tmp_path):
    """An engine that cannot run (the PyTorch-only path asked of JAX) is named with its error and makes the
    command fail; the engines after it still run, and bench.json holds their rows. An allocator setting in the
    environment, which moves every engine's timings, is printed and recorded with the machine, and so is
    `--keep-freed-memory` (glibc only), which every engine's process applies first. With `--timm-once` timm runs
    once, first, and every ratio is to that run."""
    keep = ["--keep-freed-memory"] if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" else []
    result = run_cli(
        "bench", "--backends", "jax", "torch", "--paths", "torch", "--batch-sizes", "1", "--size", "28", "--runs",
        "1", "--warmup", "0", "--gemm-size", "64", "--no-train", "--no-memory", "--no-tflite", "--timm-once",
        *keep, "--output", tmp_path, env={"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000000000"},
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    assert "keras-jax (torch) failed:" in result.stdout and "needs the PyTorch backend" in result.stdout
    found = json.loads((tmp_path / "bench.json").read_text())
    assert found["complete"] is True
    assert [(f["engine"], f["path"]) for f in found["failures"]] == [("keras-jax", "torch")]
    assert {(r["engine"], r["path"], r["task"]) for r in found["rows"]} == {
        (engine, path, task) for engine, path in (("timm", "-"), ("keras-torch", "torch"))
        for task in ("inference", "first_inference")}  # fmt: skip
    assert "1 engine(s) failed" in result.stderr
    timm = {(r["task"], r["timm_run"]): r["seconds"] for r in found["rows"] if r["engine"] == "timm"}
    assert set(timm) == {("inference", 0), ("first_inference", 0)}
    for row in found["rows"]:
        if row["engine"] != "timm":
            assert row["timm_runs"] == [0]
            assert row["vs_timm"] == pytest.approx(timm[(row["task"], 0)] / row["seconds"], rel=1e-9)
    # On a CPU the ceiling is the faster matmul of torch's and JAX's, each timed in its own process.
    gemm = found["machine"]["fp32_gemm"]
    assert set(gemm["rates"]) == ({"torch", "jax"} if gemm["device"] == "cpu" else {"torch"}) | _onednn_rate(gemm)
    assert gemm["flops_per_s"] == max(gemm["rates"].values()) == gemm["rates"][gemm["engine"]]
    assert f"the ceiling is {gemm['engine']}'s" in result.stdout
    for row in found["rows"]:
        if row["task"] == "inference":
            flops = 2 * count_macs("s", 28)
            assert row["of_fp32_ceiling"] == pytest.approx(row["images_per_s"] * flops / gemm["flops_per_s"], rel=1e-9)
    assert found["machine"]["environment"]["GLIBC_TUNABLES"] == "glibc.malloc.trim_threshold=1000000000"
    assert "GLIBC_TUNABLES=glibc.malloc.trim_threshold=1000000000 (every engine's process inherits it)" in result.stdout
    assert found["settings"]["keep_freed_memory"] is bool(keep)
    assert ("glibc keeps freed memory in every engine's process" in result.stdout) is bool(keep)


@pytest.mark.backend_agnostic
def test_bench_refuses_float16_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: mixed_float16 is a valid comparison here")
    result = run_cli("bench", "--dtype-policy", "mixed_float16", "--gemm-size", "64", "--output", tmp_path)
    assert result.returncode != 0
    assert "'mixed_float16'` is for GPUs and PyTorch sees none here" in result.stderr
    assert "mixed_bfloat16" in result.stderr
    assert not (tmp_path / "bench.json").exists()


@pytest.mark.backend_agnostic
def test_bench_input_times_the_recipe_pipeline_per_thread_count():
    from keras_sequencer import bench_input

    # The recipe without augmentation layers keeps this quick; the timing code is the same for every recipe.
    rows = bench_input.measure("fashion_mnist", batch_size=2, batches=1, threads=(1, 2))
    assert [(r["size"], r["threads"]) for r in rows] == [(224, 1), (224, 2)]
    for row in rows:
        assert row["images_per_s"] > 0
        assert row["images_per_s_per_thread"] == pytest.approx(row["images_per_s"] / row["threads"])
    table = bench_input.format_table(rows).splitlines()
    assert len(table) == 4 and table[2].startswith("| fashion_mnist | 224 | 1 | ")


@pytest.mark.backend_agnostic
def test_bench_input_refuses_non_positive_counts():
    result = run_cli("bench-input", "--threads", "0")
    assert result.returncode == 2 and "argument --threads: must be an integer >= 1, not '0'" in result.stderr
    assert "Traceback" not in result.stderr
