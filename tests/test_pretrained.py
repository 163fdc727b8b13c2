"""weights="imagenet" end to end against a local file server: download, verification, cache, offline errors.

The server on 127.0.0.1 stands in for the Hugging Face hub (same URL layout,
`KERAS_SEQUENCER_HUB_URL`), so download, sha256 check, conversion and cache
run exactly as for users. The served checkpoints are perturbed random timm
models, so every check is against timm's own logits.
"""

import contextlib
import dataclasses
import functools
import hashlib
import http.server
import os
import subprocess
import sys
import threading
import time
import warnings

from conftest import BACKEND, normalise, timm_logits, timm_model, timm_state_dict, to_numpy
import keras
import numpy as np
import pytest

import keras_sequencer as ks
from keras_sequencer import pretrained
from keras_sequencer.presets import CHECKPOINTS, HUB_URL_ENV


@functools.cache
def _safetensors_bytes(variant: str) -> bytes:
    from safetensors.numpy import save

    return save(timm_state_dict(variant))


class _Hub:
    def __init__(self, root):
        self.root = root
        self.requests = []
        self.together = None  # a threading.Barrier: hold each download until that many have started
        self.lock = threading.Lock()
        self.slow_after = None  # requests after this many start 3 s late and take about 4 s for 8 MiB
        hub = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self):
                with hub.lock:
                    self.slow = hub.slow_after is not None and len(hub.requests) >= hub.slow_after
                    hub.requests.append(self.path)
                if hub.together is not None:
                    hub.together.wait()
                if self.slow:
                    time.sleep(3)  # this response starts after the first download has finished
                super().do_GET()

            def copyfile(self, source, outputfile):
                if not self.slow:
                    return super().copyfile(source, outputfile)
                while chunk := source.read(1 << 18):
                    outputfile.write(chunk)
                    time.sleep(0.12)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def publish(self, variant: str, data: bytes) -> str:
        path = self.root / CHECKPOINTS[variant].hub_repo / "resolve" / "main" / "model.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return hashlib.sha256(data).hexdigest()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    server = _Hub(tmp_path / "hub")
    monkeypatch.setenv(HUB_URL_ENV, server.url)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    # No test may reach the authors' GitHub release either.
    for variant, c in list(CHECKPOINTS.items()):
        fallback = f"{server.url}/release/{os.path.basename(c.fallback_url)}"
        monkeypatch.setitem(CHECKPOINTS, variant, dataclasses.replace(c, fallback_url=fallback))
    yield server
    server.server.shutdown()


def _pin(monkeypatch, variant, sha256):
    c = CHECKPOINTS[variant]
    monkeypatch.setitem(CHECKPOINTS, variant, dataclasses.replace(c, sha256=sha256))


def _cache_files():
    d = pretrained.cache_dir()
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def _images(h=56, w=84, n=2, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (n, h, w, 3)).astype(np.uint8)


@pytest.mark.backend_agnostic  # loading each file kind on every backend: models/test_weights.py
def test_imagenet_weights_download_verify_convert_cache(hub, monkeypatch):
    _pin(monkeypatch, "s", hub.publish("s", _safetensors_bytes("s")))
    images = _images()

    model = ks.Sequencer2DS(weights="imagenet", classifier_activation=None)
    np.testing.assert_allclose(
        to_numpy(model(images.astype("float32"))), timm_logits("s", normalise(images)), atol=1e-5
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


@pytest.mark.backend_agnostic
def test_wrong_hash_is_rejected_and_removed(hub, monkeypatch):
    hub.publish("s", _safetensors_bytes("s"))
    _pin(monkeypatch, "s", "0" * 64)
    with pytest.raises(ValueError, match="failed its sha256 check.*removed from the cache"):
        ks.Sequencer2DS(weights="imagenet")
    assert _cache_files() == []


@pytest.mark.backend_agnostic
@pytest.mark.parametrize("pinned", [True, False])
def test_truncated_download_is_rejected_and_removed(hub, monkeypatch, pinned):
    full = _safetensors_bytes("s")
    hub.publish("s", full[: len(full) // 2])
    _pin(monkeypatch, "s", hashlib.sha256(full).hexdigest() if pinned else None)
    message = "failed its sha256 check" if pinned else "corrupt or truncated"
    with pytest.raises(ValueError, match=message):
        ks.Sequencer2DS(weights="imagenet")
    assert _cache_files() == []


@pytest.mark.backend_agnostic
def test_checkpoint_of_another_variant_is_rejected_and_removed(hub, monkeypatch):
    hub.publish("s", _safetensors_bytes("m"))
    _pin(monkeypatch, "s", None)
    with pytest.raises(ValueError, match=r"It looks like sequencer2d_m.*layers=\(4, 3, 8, 3\)"):
        ks.Sequencer2DS(weights="imagenet")
    assert _cache_files() == []


@pytest.mark.backend_agnostic
def test_offline_fails_fast_naming_the_file(monkeypatch, tmp_path):
    # A closed local port refuses at once, as a machine without network does.
    monkeypatch.setenv(HUB_URL_ENV, "http://127.0.0.1:9")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    c = CHECKPOINTS["s"]
    monkeypatch.setitem(CHECKPOINTS, "s", dataclasses.replace(c, fallback_url="http://127.0.0.1:9/s.pth"))
    with pytest.raises(ValueError) as info:
        ks.Sequencer2DS(weights="imagenet")
    message = str(info.value)
    assert "http://127.0.0.1:9/timm/sequencer2d_s.in1k/resolve/main/model.safetensors" in message
    assert "weights='/path/to/model.safetensors'" in message
    assert message.endswith("Received: weights='imagenet'")
    assert _cache_files() == []


@pytest.mark.backend_agnostic
def test_default_cache_is_under_keras_home_without_the_env_var(tmp_path):
    # The path most users take: no KERAS_HOME, so Keras' own base folder (~/.keras) holds the cache.
    code = (
        "import dataclasses, keras_sequencer as ks\n"
        "from keras_sequencer import pretrained, presets\n"
        "c = presets.CHECKPOINTS['s']\n"
        "presets.CHECKPOINTS['s'] = dataclasses.replace(c, fallback_url='http://127.0.0.1:9/s.pth')\n"
        "print('CACHE', pretrained.cache_dir())\n"
        "try:\n"
        "    ks.Sequencer2DS(weights='imagenet')\n"
        "except ValueError as e:\n"
        "    print('OFFLINE', 'weights=' in str(e))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "KERAS_HOME"}
    env.update(HOME=str(tmp_path), KERAS_BACKEND=BACKEND, TF_CPP_MIN_LOG_LEVEL="3",
               **{HUB_URL_ENV: "http://127.0.0.1:9"})  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    said = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.startswith(("CACHE", "OFFLINE")))
    assert said == {"CACHE": str(tmp_path / ".keras" / "models" / "keras_sequencer"), "OFFLINE": "True"}
    assert os.path.isdir(said["CACHE"])


@contextlib.contextmanager
def _read_only(directory):
    """`directory` made read-only for this process: chmod, or for root (which ignores it) the immutable flag."""
    if os.geteuid() != 0:
        os.chmod(directory, 0o555)
        undo = ["chmod", "755", str(directory)]
    else:
        if subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode != 0:
            pytest.skip("running as root where `chattr +i` is refused: no way to make a folder read-only here")
        undo = ["chattr", "-i", str(directory)]
    try:
        yield
    finally:
        subprocess.run(undo, check=True)


@pytest.mark.backend_agnostic
def test_read_only_cache_empty_says_what_to_do_without_a_request(hub, monkeypatch, tmp_path):
    _pin(monkeypatch, "s", hub.publish("s", _safetensors_bytes("s")))
    home = tmp_path / "keras_home"
    home.mkdir()
    with _read_only(home), pytest.raises(PermissionError) as info:
        ks.Sequencer2DS(weights="imagenet")
    message = str(info.value)
    assert f"weights cache {home / 'models' / 'keras_sequencer'} is not writable" in message
    assert "Set KERAS_HOME to a writable folder" in message
    assert hub.requests == []  # nothing fetched that could not be kept
    assert isinstance(info.value, ValueError)  # a setting to change: the command-line tool prints one line


@pytest.mark.backend_agnostic
def test_read_only_filled_cache_is_used_offline(hub, monkeypatch):
    _pin(monkeypatch, "s", hub.publish("s", _safetensors_bytes("s")))
    images = _images(seed=3)
    expected = timm_logits("s", normalise(images))
    ks.Sequencer2DS(weights="imagenet")  # fills the cache: the download and its conversion
    cache = pretrained.cache_dir()
    converted = [f for f in _cache_files() if f.endswith(".weights.h5")]
    assert len(converted) == 1
    monkeypatch.setenv(HUB_URL_ENV, "http://127.0.0.1:9")  # offline from here on
    with _read_only(cache), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = ks.Sequencer2DS(weights="imagenet", classifier_activation=None)
    assert not [w for w in caught if "read-only" in str(w.message)]  # the cached conversion is read as it is
    np.testing.assert_allclose(to_numpy(model(images.astype("float32"))), expected, atol=1e-5)

    os.remove(os.path.join(cache, converted[0]))  # the download alone: converted at load, not kept
    with _read_only(cache), pytest.warns(UserWarning, match="is read-only, so the conversion"):
        model = ks.Sequencer2DS(weights="imagenet", classifier_activation=None)
    np.testing.assert_allclose(to_numpy(model(images.astype("float32"))), expected, atol=1e-5)
    assert _cache_files() == ["sequencer2d_s.in1k.safetensors"]
    assert len(hub.requests) == 1


class _Payload:
    """An arbitrary object: unpickling it would run code from the file."""


@pytest.mark.backend_agnostic
def test_pytorch_checkpoint_loads_with_weights_only(tmp_path):
    """A pickle that is not plain tensors is refused (torch.load(weights_only=True))."""
    import torch

    torch.save({"evil": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="Could not read .* as a PyTorch checkpoint"):
        pretrained.read_checkpoint(str(tmp_path / "evil.pth"))


@pytest.mark.backend_agnostic
def test_keras_get_file_is_the_download_path(hub, monkeypatch):
    """The download goes through keras.utils.get_file (progress bar, cache)."""
    _pin(monkeypatch, "s", hub.publish("s", b"not a checkpoint"))
    calls = []
    original = keras.utils.get_file
    monkeypatch.setattr(keras.utils, "get_file", lambda *a, **k: calls.append(a) or original(*a, **k))
    with pytest.raises(ValueError, match="cannot be used and was removed from the cache.*corrupt or truncated"):
        ks.Sequencer2DS(weights="imagenet")
    assert calls and calls[0][0] == "sequencer2d_s.in1k.safetensors"
    assert _cache_files() == []


@pytest.mark.backend_agnostic
def test_concurrent_downloads_into_one_fresh_cache_both_succeed(hub, tmp_path):
    data = np.random.RandomState(0).bytes(8 << 20)  # M has no pinned hash: any bytes are fetched as they are
    hub.publish("m", data)
    hub.together = threading.Barrier(2, timeout=120)  # both downloads are in flight at the same moment,
    hub.slow_after = 1  # the second starts writing after the first has finished and ends 4 s later
    code = (
        "import hashlib, time\n"
        "from keras_sequencer import pretrained\n"
        "path = pretrained.fetch_checkpoint('m')\n"
        "time.sleep(4)  # using the file (converting M takes seconds) while the other download is running\n"
        "print('PATH', path, hashlib.sha256(open(path, 'rb').read()).hexdigest())\n"
    )
    env = {**os.environ, "KERAS_BACKEND": "numpy", "KERAS_HOME": str(tmp_path / "keras_home"), HUB_URL_ENV: hub.url}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for _ in range(2)
    ]
    try:
        outputs = [proc.communicate(timeout=300) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
        path, digest = out.split("PATH ")[1].split()
        assert digest == hashlib.sha256(data).hexdigest()  # what the process read right after its fetch
        assert open(path, "rb").read() == data
    assert len(hub.requests) == 2
    assert _cache_files() == ["sequencer2d_m.in1k.safetensors"]  # no partial or temporary file left
