"""weights="imagenet" end to end against a local file server, and weights from paths.

The server on 127.0.0.1 stands in for the Hugging Face hub (same URL layout,
`KERAS_SEQUENCER_HUB_URL`), so download, sha256 check, conversion and cache
run exactly as for users. The served checkpoints are perturbed random timm
models, so every check is against timm's own logits.
"""

import dataclasses
import functools
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading

from conftest import BACKEND, REPO, TINY, authors_layout, normalise, timm_logits, timm_model, timm_state_dict, to_numpy
import keras
import numpy as np
import pytest

import keras_sequencer as ks
from keras_sequencer import pretrained


@functools.cache
def _safetensors_bytes(variant: str) -> bytes:
    from safetensors.numpy import save

    return save(timm_state_dict(variant))


class _Hub:
    def __init__(self, root):
        self.root = root
        self.requests = []
        hub = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self):
                hub.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def publish(self, variant: str, data: bytes) -> str:
        path = self.root / pretrained.CHECKPOINTS[variant].hub_repo / "resolve" / "main" / "model.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return hashlib.sha256(data).hexdigest()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    server = _Hub(tmp_path / "hub")
    monkeypatch.setenv(pretrained.HUB_URL_ENV, server.url)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    # No test may reach the authors' GitHub release either.
    for variant, c in list(pretrained.CHECKPOINTS.items()):
        fallback = f"{server.url}/release/{os.path.basename(c.fallback_url)}"
        monkeypatch.setitem(pretrained.CHECKPOINTS, variant, dataclasses.replace(c, fallback_url=fallback))
    yield server
    server.server.shutdown()


def _pin(monkeypatch, variant, sha256):
    c = pretrained.CHECKPOINTS[variant]
    monkeypatch.setitem(pretrained.CHECKPOINTS, variant, dataclasses.replace(c, sha256=sha256))


def _cache_files():
    d = pretrained.cache_dir()
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def _images(h=56, w=84, n=2, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (n, h, w, 3)).astype(np.uint8)


def test_imagenet_weights_download_verify_convert_cache(hub, monkeypatch):
    _pin(monkeypatch, "s", hub.publish("s", _safetensors_bytes("s")))
    images = _images()

    model = ks.Sequencer2DS(weights="imagenet", classifier_activation=None)
    np.testing.assert_allclose(
        to_numpy(model.predict_on_batch(images.astype("float32"))), timm_logits("s", normalise(images)), atol=1e-5
    )
    assert len(hub.requests) == 1
    files = _cache_files()
    assert "sequencer2d_s.in1k.safetensors" in files
    assert any(f.startswith("sequencer2d_s.in1k-") and f.endswith(".weights.h5") for f in files)

    # Second use: from the cache, no request; a headless model loads the same weights.
    features = ks.Sequencer2DS(weights="imagenet", include_top=False, pooling="avg")
    assert len(hub.requests) == 1
    import torch

    with torch.no_grad():
        x = torch.from_numpy(normalise(images).transpose(0, 3, 1, 2).copy())
        tm = timm_model("s")
        expected = tm.forward_head(tm.forward_features(x), pre_logits=True).numpy()
    np.testing.assert_allclose(to_numpy(features.predict_on_batch(images.astype("float32"))), expected, atol=1e-5)


def test_wrong_hash_is_rejected_and_removed(hub, monkeypatch):
    hub.publish("s", _safetensors_bytes("s"))
    _pin(monkeypatch, "s", "0" * 64)
    with pytest.raises(ValueError, match="failed its sha256 check.*removed from the cache"):
        ks.Sequencer2DS(weights="imagenet")
    assert _cache_files() == []


@pytest.mark.parametrize("pinned", [True, False])
def test_truncated_download_is_rejected_and_removed(hub, monkeypatch, pinned):
    full = _safetensors_bytes("s")
    hub.publish("s", full[: len(full) // 2])
    _pin(monkeypatch, "s", hashlib.sha256(full).hexdigest() if pinned else None)
    message = "failed its sha256 check" if pinned else "corrupt or truncated"
    with pytest.raises(ValueError, match=message):
        ks.Sequencer2DS(weights="imagenet")
    assert _cache_files() == []


def test_checkpoint_of_another_variant_is_rejected_and_removed(hub, monkeypatch):
    hub.publish("s", _safetensors_bytes("m"))
    _pin(monkeypatch, "s", None)
    with pytest.raises(ValueError, match=r"It looks like sequencer2d_m.*layers=\(4, 3, 8, 3\)"):
        ks.Sequencer2DS(weights="imagenet")
    assert _cache_files() == []


def test_offline_fails_fast_naming_the_file(monkeypatch, tmp_path):
    # A closed local port refuses at once, as a machine without network does.
    monkeypatch.setenv(pretrained.HUB_URL_ENV, "http://127.0.0.1:9")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    c = pretrained.CHECKPOINTS["s"]
    monkeypatch.setitem(pretrained.CHECKPOINTS, "s", dataclasses.replace(c, fallback_url="http://127.0.0.1:9/s.pth"))
    with pytest.raises(ValueError) as info:
        ks.Sequencer2DS(weights="imagenet")
    message = str(info.value)
    assert "http://127.0.0.1:9/timm/sequencer2d_s.in1k/resolve/main/model.safetensors" in message
    assert "weights='/path/to/model.safetensors'" in message
    assert message.endswith("Received: weights='imagenet'")
    assert _cache_files() == []


def test_default_cache_is_under_keras_home_without_the_env_var(tmp_path):
    # The path most users take: no KERAS_HOME, so Keras' own base folder (~/.keras) holds the cache.
    code = (
        "import dataclasses, keras_sequencer as ks\n"
        "from keras_sequencer import pretrained\n"
        "c = pretrained.CHECKPOINTS['s']\n"
        "pretrained.CHECKPOINTS['s'] = dataclasses.replace(c, fallback_url='http://127.0.0.1:9/s.pth')\n"
        "print('CACHE', pretrained.cache_dir())\n"
        "try:\n"
        "    ks.Sequencer2DS(weights='imagenet')\n"
        "except ValueError as e:\n"
        "    print('OFFLINE', 'weights=' in str(e))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "KERAS_HOME"}
    env.update(HOME=str(tmp_path), KERAS_BACKEND=BACKEND, TF_CPP_MIN_LOG_LEVEL="3",
               **{pretrained.HUB_URL_ENV: "http://127.0.0.1:9"})  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    said = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.startswith(("CACHE", "OFFLINE")))
    assert said == {"CACHE": str(tmp_path / ".keras" / "models" / "keras_sequencer"), "OFFLINE": "True"}
    assert os.path.isdir(said["CACHE"])


def test_checkpoint_paths_in_every_format(tmp_path):
    from safetensors.numpy import save_file
    import torch

    sd = timm_state_dict("s")
    save_file(sd, tmp_path / "timm.safetensors")
    layers = ks.models.variant_config("s")["layers"]
    torch.save({"model": {k: torch.from_numpy(v) for k, v in authors_layout(sd, layers).items()}}, tmp_path / "a.pth")

    images = _images(seed=1)
    expected = timm_logits("s", normalise(images))
    from_safetensors = ks.Sequencer2DS(weights=str(tmp_path / "timm.safetensors"), classifier_activation=None)
    from_pth = ks.Sequencer2DS(weights=tmp_path / "a.pth", classifier_activation=None)
    from_safetensors.save_weights(tmp_path / "s.weights.h5")
    from_h5 = ks.Sequencer2DS(weights=str(tmp_path / "s.weights.h5"), classifier_activation=None)
    for model in (from_safetensors, from_pth, from_h5):
        np.testing.assert_allclose(to_numpy(model.predict_on_batch(images.astype("float32"))), expected, atol=1e-5)


def test_weights_file_of_another_architecture_is_rejected(tmp_path):
    source = ks.Sequencer2D(**TINY, classes=5)
    source.save_weights(tmp_path / "tiny.weights.h5")
    path = str(tmp_path / "tiny.weights.h5")
    # Keras alone would load a prefix of a deeper model's file without a word.
    for layers in ((3, 1, 1), (1, 1, 1)):
        with pytest.raises(ValueError, match="another architecture"):
            ks.Sequencer2D(**{**TINY, "layers": layers}, classes=5, weights=path)
    with pytest.raises(ValueError, match="another architecture"):
        ks.Sequencer2D(**TINY, classes=6, weights=path)
    # A headless model takes the file's body and leaves the head.
    headless = ks.Sequencer2D(**TINY, include_top=False, weights=path)
    for a, b in zip(headless.weights, source.weights[: len(headless.weights)], strict=True):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


class _Payload:
    """An arbitrary object: unpickling it would run code from the file."""


def test_pytorch_checkpoint_loads_with_weights_only(tmp_path):
    """A pickle that is not plain tensors is refused (torch.load(weights_only=True))."""
    import torch

    torch.save({"evil": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="Could not read .* as a PyTorch checkpoint"):
        pretrained.read_checkpoint(str(tmp_path / "evil.pth"))


def test_manifest_file_matches_the_registry():
    with open(os.path.join(REPO, "weights", "manifest.json")) as f:
        assert json.load(f) == pretrained.manifest()
    for c in pretrained.CHECKPOINTS.values():
        assert c.url(pretrained.HUB_URL).startswith("https://huggingface.co/timm/")
        assert c.sha256 is None or len(c.sha256) == 64


def test_keras_get_file_is_the_download_path(hub, monkeypatch):
    """The download goes through keras.utils.get_file (progress bar, cache)."""
    _pin(monkeypatch, "s", hub.publish("s", b"not a checkpoint"))
    calls = []
    original = keras.utils.get_file
    monkeypatch.setattr(keras.utils, "get_file", lambda *a, **k: calls.append(a) or original(*a, **k))
    with pytest.raises(ValueError, match="corrupt or truncated"):
        pretrained.imagenet_weights_path("s")
    assert calls and calls[0][0] == "sequencer2d_s.in1k.safetensors"
