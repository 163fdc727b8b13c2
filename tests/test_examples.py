"""The examples run end to end, offline: the transfer-learning notebook and the TFLite export table."""

import os

from conftest import REPO, run_subprocess, timm_state_dict
import numpy as np
import pytest


@pytest.mark.backend_agnostic
def test_transfer_learning_notebook_runs_offline(tmp_path, monkeypatch):
    from nbclient import NotebookClient
    import nbformat
    from PIL import Image
    from safetensors.numpy import save_file

    # A local checkpoint instead of the download, and a small image folder instead of tfds.
    save_file(timm_state_dict("s"), tmp_path / "model.safetensors")
    rng = np.random.RandomState(0)
    for cls in ("daisy", "tulip"):
        (tmp_path / "images" / cls).mkdir(parents=True)
        for k in range(6):
            Image.fromarray(rng.randint(0, 256, (70, 90, 3)).astype(np.uint8)).save(
                tmp_path / "images" / cls / f"{k}.png"
            )
    settings = {
        # The notebook runs on any backend; PyTorch's eager steps need no graph building or compilation.
        "KERAS_BACKEND": "torch",
        "TL_DATASET": f"folder:{tmp_path / 'images'}",
        "TL_WEIGHTS": str(tmp_path / "model.safetensors"),
        "TL_IMAGE_SIZE": "56",
        "TL_BATCH_SIZE": "4",
        "TL_EPOCHS": "1",
        "TL_STEPS": "2",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PYTHONPATH": os.pathsep.join([os.path.join(REPO, "examples"), REPO]),
    }
    for key, value in settings.items():
        monkeypatch.setenv(key, value)

    notebook = nbformat.read(os.path.join(REPO, "examples", "transfer_learning.ipynb"), as_version=4)
    NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    text = "\n".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    )
    assert "validation accuracy:" in text
    assert "reloaded ok" in text
    assert (tmp_path / "sequencer2d_s_transfer.keras").exists()


@pytest.mark.backend_agnostic
def test_example_script_prints_its_table(tmp_path):
    result = run_subprocess(
        ["examples/export_tflite.py", "--size", "32", "--variants", "float32", "--runs", "1", "--rounds", "1",
         "--threads", "1", "--no-litert-torch", "--output", tmp_path], backend="tensorflow",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = [line.split() for line in result.stdout.splitlines() if line.startswith("float32 ")]
    assert row[1] == "unrolled" and row[5] == "1.00x" and float(row[7]) <= 1e-4, result.stdout
    agree, photos = (int(n) for n in row[8].split("/"))
    assert agree == photos >= 5, result.stdout  # real photos, the same top-1 as Keras on each
    assert "BATCH_MATMUL x" in result.stdout and "WHILE" not in result.stdout
