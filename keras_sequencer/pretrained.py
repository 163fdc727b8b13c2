"""Published checkpoints: fetched, cached, verified and read.

`fetch_checkpoint(variant)` downloads a variant's reference checkpoint with
`keras.utils.get_file` (progress bar, cache, sha256 where one is pinned in
`keras_sequencer.presets.CHECKPOINTS`) into
`$KERAS_HOME/models/keras_sequencer`, falling back to the authors' release
when the hub is unreachable and torch is installed. Set
`KERAS_SEQUENCER_HUB_URL` to serve the checkpoints from a mirror (or a local
server) with the Hugging Face layout `{base}/{repo}/resolve/main/model.safetensors`.
`read_checkpoint(path)` turns a `.safetensors` / `.pth` file into NumPy arrays.
Nothing here knows the model: `keras_sequencer.convert` maps the names and
`keras_sequencer.models.weights` loads them.
"""

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
import zipfile

import keras
import numpy as np

from keras_sequencer.presets import CHECKPOINTS, Checkpoint

CACHE_SUBDIR = os.path.join("models", "keras_sequencer")
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


# === Reading files ===


def check_weights_path(weights) -> None:
    """Raises a clear ValueError unless `weights` names a loadable file."""
    text = os.fspath(weights) if isinstance(weights, os.PathLike) else weights
    if not isinstance(text, str):
        raise ValueError(
            f"`weights` must be None, 'imagenet' or the path to a weights file. Received: weights={weights!r}"
        )
    if os.path.isdir(text):
        raise ValueError(
            f"The folder {text} has no config.json, so it is not a preset; pass a preset folder or a weights file. "
            f"Received: weights={weights!r}"
        )
    if not (text.endswith(".weights.h5") or text.endswith(CHECKPOINT_SUFFIXES)):
        raise ValueError(
            "`weights` must be None, 'imagenet', or a path to a Keras `.weights.h5` file, a "
            f"timm / authors' checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}) or a preset folder. "
            f"Received: weights={weights!r}"
        )
    if not os.path.isfile(text):
        raise ValueError(f"The weights file does not exist. Received: weights={weights!r}")


def check_keras_file(path) -> str:
    """Raises a clear ValueError unless `path` is a whole model file; returns it with `~` expanded.

    A `.keras` file is a zip archive: a truncated or damaged one is named as
    such (Keras itself reports it as "File not found").
    """
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise ValueError(f"The model file {path} does not exist (a .keras file is expected).")
    if path.endswith(".keras"):
        damaged = None
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            if bad is not None:
                damaged = f"its member {bad} fails its checksum"
        except (zipfile.BadZipFile, EOFError, OSError) as e:
            damaged = f"it is not a whole zip archive ({e})"
        if damaged:
            raise ValueError(
                f"The model file {path} is truncated or damaged: {damaged}. Save the model again, or copy it "
                "again from where it was saved."
            )
    return path


def load_keras_model(path):
    """`keras.saving.load_model(path)` after `check_keras_file(path)`."""
    return keras.saving.load_model(check_keras_file(path))


def read_checkpoint(path: str) -> dict[str, np.ndarray]:
    """Reads a timm / authors' checkpoint into name -> NumPy array.

    `.safetensors` needs only the `safetensors` package. `.pth`/`.pt`/`.bin`
    are pickles: they need PyTorch and are opened with `weights_only=True`.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"The checkpoint '{path}' does not exist (or is a folder). Received: weights={path!r}")
    if not path.endswith(CHECKPOINT_SUFFIXES):
        raise ValueError(
            f"A checkpoint must be a timm / authors' file ending in {', '.join(CHECKPOINT_SUFFIXES)} (or a Keras "
            f".weights.h5 given as weights=). Received: weights={path!r}"
        )
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        try:
            return load_file(path)
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"Could not read '{path}' as safetensors ({e}); the file is corrupt or truncated.") from e
    try:
        import torch
    except ImportError as e:
        raise ValueError(
            f"Reading the PyTorch checkpoint '{path}' needs torch (pip install torch), or convert it "
            "to .safetensors first. Received: weights=" + repr(path)
        ) from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"Could not read '{path}' as a PyTorch checkpoint ({e}).") from e
    for key in ("state_dict", "model"):  # training-script wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    return {k: v.detach().float().numpy() for k, v in obj.items() if hasattr(v, "numpy")}


# === Downloading ===


def _keras_home() -> str:
    """Keras' own base folder: `$KERAS_HOME`, else `~/.keras` (Keras' choice, where readable)."""
    if os.environ.get("KERAS_HOME"):
        return os.path.expanduser(os.environ["KERAS_HOME"])
    try:  # not public API (keras.config has no keras_home in 3.15); it knows Keras' /tmp fallback
        from keras.src.backend.config import keras_home
    except ImportError:
        return os.path.expanduser(os.path.join("~", ".keras"))
    return os.path.expanduser(keras_home())


def cache_dir() -> str:
    """Where downloads and converted files are kept (`$KERAS_HOME/models/keras_sequencer`)."""
    return os.path.join(_keras_home(), CACHE_SUBDIR)


def sha256_of(path: str) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def replace_atomically(path: str, write) -> None:
    """Calls `write(temporary_path)`, then renames the result onto `path`: `path` is never half-written.

    The temporary file sits in the same folder and keeps `path`'s extensions
    (Keras checks them), with this process's id in its name.
    """
    directory, name = os.path.split(path)
    stem, dot, extension = name.partition(".")
    temporary = os.path.join(directory, f"{stem}.tmp-{os.getpid()}{dot}{extension}")
    try:
        write(temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def remove(path: str) -> None:
    """Deletes `path` if it exists (a cache entry that must not be used again)."""
    if os.path.exists(path):
        os.remove(path)


def _offline_error(checkpoint: Checkpoint, cause: Exception) -> ValueError:
    return ValueError(
        f"Could not download the ImageNet weights of Sequencer2D-{checkpoint.variant.upper()} "
        f"({cause}). Without network access, fetch\n  {checkpoint.url()}\n"
        f"(or {checkpoint.fallback_url}) on another machine, copy it here and pass its path: "
        f"Sequencer2D{checkpoint.variant.upper()}(weights='/path/to/model.safetensors'). "
        f"Kaggle: attach it as a dataset. Received: weights='imagenet'"
    )


def fetch_checkpoint(variant: str) -> str:
    """Downloads (or finds in the cache) a variant's reference checkpoint; returns its path.

    The file is verified against the pinned sha256 where one is known. A file
    that fails verification is removed from the cache before the error.
    """
    checkpoint = CHECKPOINTS[variant]
    try:
        return _download(checkpoint.filename, checkpoint.url(), checkpoint.sha256)
    except CacheNotWritableError:
        raise
    except ValueError as e:  # raised by get_file on a hash mismatch
        raise ValueError(
            f"The downloaded checkpoint {checkpoint.url()} failed its sha256 check (expected "
            f"{checkpoint.sha256}); it was truncated or replaced, and has been removed from the "
            "cache. Try again, or pass a verified local file as `weights=`."
        ) from e
    except Exception as e:
        # get_file turns network errors (no route, HTTP errors, short reads)
        # into a plain Exception("URL fetch failure ...").
        if isinstance(e, OSError) or "URL fetch failure" in str(e):
            fallback = _fetch_fallback(checkpoint)
            if fallback is not None:
                return fallback
            raise _offline_error(checkpoint, e) from e
        raise


class CacheNotWritableError(PermissionError, ValueError):
    """The weights cache cannot be written where a download or a conversion must go.

    A `PermissionError` (what the file system said) and a `ValueError` (a setting the user can change:
    the command-line tool reports it in one line).
    """


@contextlib.contextmanager
def _writing_to_cache(directory: str, purpose: str):
    """Turns a refused write in the cache into an error that says where and what to do."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        raise CacheNotWritableError(
            f"Cannot {purpose}: the weights cache {directory} is not writable ({e.strerror}). Set KERAS_HOME "
            "to a writable folder (the cache is $KERAS_HOME/models/keras_sequencer), or pass a local "
            "checkpoint file as `weights=`."
        ) from e


def cache_is_writable(directory: str) -> bool:
    """Whether a file can be created in `directory` (tried, since root ignores permission bits)."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False


def _download(filename: str, url: str, sha256: str | None) -> str:
    """`cache_dir()/filename`, downloaded with `keras.utils.get_file` unless a verified copy is there.

    The download goes to a folder of its own and is renamed into the cache
    only once complete and verified, so processes that fetch the same file
    at the same time each get a whole file and a failed download leaves
    nothing behind.
    """
    directory = cache_dir()
    final = os.path.join(directory, filename)
    if os.path.exists(final):
        if sha256 is None or sha256_of(final) == sha256:
            return final  # reading needs no write access: a read-only cache works
        with _writing_to_cache(directory, f"replace the damaged {filename}"):
            remove(final)  # replaced or damaged: fetch it again
    with _writing_to_cache(directory, f"download {filename}"):
        os.makedirs(directory, exist_ok=True)
        private = tempfile.mkdtemp(prefix=".download-", dir=directory)
    try:
        path = keras.utils.get_file(
            filename, url, file_hash=sha256, hash_algorithm="sha256", cache_dir=private, cache_subdir=private
        )
        os.replace(path, final)
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return final


def _fetch_fallback(checkpoint: Checkpoint) -> str | None:
    """The authors' GitHub release, when torch is there to read it."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return None
    try:
        return _download(os.path.basename(checkpoint.fallback_url), checkpoint.fallback_url, None)
    except Exception:
        return None


def converted_path(source: str, variant: str) -> str:
    """Where the Keras `.weights.h5` converted from the checkpoint file `source` is cached.

    The name carries the first 12 hex digits of the source's sha256, so a
    replaced source never reuses an old conversion.
    """
    digest = sha256_of(source)
    return os.path.join(os.path.dirname(source), f"{CHECKPOINTS[variant].tag}-{digest[:12]}.weights.h5")
