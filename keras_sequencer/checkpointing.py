"""Training state that survives a kill at any moment, written by one process of a multi-process job.

`TrainingState` replaces Keras' `BackupAndRestore`, `ModelCheckpoint` and
`CSVLogger` for `train.fit`. What it writes under `output_dir`:

- `backup/epoch-NNNN.weights.h5`: model and optimizer variables after epoch NNNN
  (written to a temporary name and renamed, so a file under its final name is complete);
- `backup/state.json`: the last finished epoch and its file (also written by rename);
  the previous epoch's file is kept until the next one is complete;
- `log.csv`: one row per finished epoch, rewritten by rename;
- `last.keras`: the whole model after the last finished epoch, also by rename.

On a re-run it loads the newest complete backup (a damaged one is reported and the
previous one used), drops log rows of epochs that never reached a backup, and
resumes at the next epoch; a run that already finished trains nothing and says so.
"""

import csv
import glob
import json
import os
import tempfile
import warnings

import keras

from keras_sequencer import distributed
from keras_sequencer.pretrained import replace_atomically

STATE = "state.json"


def _write_text(path: str, text: str) -> None:
    def write(temporary):
        with open(temporary, "w", newline="") as handle:
            handle.write(text)

    replace_atomically(path, write)


class TrainingState(keras.callbacks.Callback):
    """Backs up, logs and saves every epoch atomically, and resumes a killed run where it stopped.

    Every process of a job loads the same backup (the output directory must
    be shared by all hosts; `distributed.check_agreement` turns a host that
    sees other files into an error). Only the chief writes.

    Args:
        output_dir: directory of `backup/`, `log.csv` and `last.keras`.
        save_model: also write `last.keras` every epoch.
    """

    def __init__(self, output_dir: str, save_model: bool = True):
        super().__init__()
        self.output_dir = output_dir
        self.backup_dir = os.path.join(output_dir, "backup")
        self.log_path = os.path.join(output_dir, "log.csv")
        self.model_path = os.path.join(output_dir, "last.keras")
        self.save_model = save_model
        self._complete = None

    # === Reading ===

    def _read_state(self) -> dict | None:
        path = os.path.join(self.backup_dir, STATE)
        if not os.path.exists(path):
            return None
        try:
            with open(path) as handle:
                state = json.load(handle)
            return state if isinstance(state, dict) and isinstance(state.get("epoch"), int) else None
        except (OSError, ValueError):
            return None

    def _choose(self) -> tuple[int, str | None]:
        """The newest backup that reads back whole: `(finished epochs, file name)`, `(0, None)` without one.

        Decided from the files alone, before any variable is touched, so that
        the processes of a job can agree on it before loading (loading is a
        step they take together).
        """
        state = self._read_state()
        if state is None:
            return 0, None
        candidates = [(state["epoch"], state.get("weights"))]
        if state.get("previous"):
            candidates.append((state["epoch"] - 1, state["previous"]))
        for finished, name in candidates:
            path = os.path.join(self.backup_dir, name or "")
            try:
                _read_whole(path)
                return finished, name
            except Exception as error:  # noqa: BLE001 (any failure to read the file means: not usable)
                warnings.warn(
                    f"The training backup {path} cannot be read ({type(error).__name__}: {error}); "
                    "trying an older one.",
                    stacklevel=3,
                )
        warnings.warn(
            f"No training backup in {self.backup_dir} can be read; training starts from epoch 0.", stacklevel=3
        )
        return 0, None

    def _log_rows(self) -> list[dict]:
        if not os.path.exists(self.log_path):
            return []
        with open(self.log_path, newline="") as handle:
            return list(csv.DictReader(handle))

    # === Callback ===

    def on_train_begin(self, logs=None):
        finished, name = self._choose()
        shared = "They must all read the same output directory: put it on a filesystem every host shares."
        distributed.check_agreement(f"the number of finished epochs in {self.backup_dir}", finished, hint=shared)
        if name is not None:
            if self.model.optimizer is not None and not self.model.optimizer.built:
                self.model.optimizer.build(self.model.trainable_variables)  # its variables are in the backup
            self.model.load_weights(os.path.join(self.backup_dir, name))
        self._complete = name  # the newest complete backup, kept until the next one is complete
        self.model._initial_epoch = finished  # what BackupAndRestore sets: fit starts at this epoch
        epochs = self.params.get("epochs") if self.params else None
        if distributed.is_chief():
            os.makedirs(self.backup_dir, exist_ok=True)
            for leftover in glob.glob(os.path.join(self.backup_dir, "*.tmp-*")) + glob.glob(
                os.path.join(self.output_dir, "*.tmp-*")
            ):
                os.remove(leftover)  # left by a process killed while writing
            rows = self._log_rows()
            kept = [row for row in rows if int(row["epoch"]) < finished]
            if len(kept) != len(rows):  # epochs logged but never backed up are trained again
                self._write_log(kept)
        if epochs is not None and finished >= epochs:
            print(
                f"{self.output_dir}: all {epochs} epochs are already trained; nothing to do (raise the number "
                "of epochs to continue, or use another output directory to start over)."
            )

    def on_train_end(self, logs=None):
        self.model._initial_epoch = None  # a later plain `fit` of this model starts where it is asked to

    def on_epoch_end(self, epoch, logs=None):
        name = f"epoch-{epoch:04d}.weights.h5"
        if not distributed.is_chief():
            # Saving reads every variable, which in a multi-process job is a step all processes take
            # together (a `device_put` checked across processes); the others write to a scratch file.
            with tempfile.TemporaryDirectory() as scratch:
                self.model.save_weights(os.path.join(scratch, name))
            if self.save_model:
                save_model(self.model, self.model_path)
            return
        # Order matters for a kill at any point: the log row and the files come first, and state.json,
        # written last, is what makes this epoch count as finished.
        self._write_log([*(r for r in self._log_rows() if int(r["epoch"]) < epoch), {"epoch": epoch, **(logs or {})}])
        replace_atomically(os.path.join(self.backup_dir, name), self.model.save_weights)
        if self.save_model:
            save_model(self.model, self.model_path)
        previous = self._complete if self._complete != name else None
        state = {"epoch": epoch + 1, "weights": name, "previous": previous}
        _write_text(os.path.join(self.backup_dir, STATE), json.dumps(state))
        self._complete = name
        for old in glob.glob(os.path.join(self.backup_dir, "epoch-*.weights.h5")):
            if os.path.basename(old) not in (name, previous):
                os.remove(old)

    def _write_log(self, rows: list[dict]) -> None:
        keys = ["epoch"] + sorted({key for row in rows for key in row} - {"epoch"})

        def write(temporary):
            with open(temporary, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=keys)
                writer.writeheader()
                for row in rows:
                    writer.writerow({key: _plain(row.get(key, "")) for key in keys})

        replace_atomically(self.log_path, write)


def read_log(output_dir: str) -> dict[str, list[float]]:
    """Every finished epoch's logs of the run in `output_dir`, shaped like `History.history`.

    From its `log.csv`, so a run resumed after a kill, or re-run when already
    finished (its `History` then holds only that call's epochs, or none), still
    reports all of its epochs. Empty without a log.
    """
    rows = sorted(TrainingState(output_dir)._log_rows(), key=lambda row: int(row["epoch"]))
    names = list(dict.fromkeys(name for row in rows for name in row if name not in ("epoch", None)))

    def number(value):
        try:
            return float(value)
        except (TypeError, ValueError):  # missing, or a value that is not a number
            return float("nan")

    return {name: [number(row.get(name)) for row in rows] for name in names}


def _read_whole(path: str) -> None:
    """Reads every dataset of a `.weights.h5` file; raises if any part of it is missing or damaged."""
    import h5py

    with h5py.File(path, "r") as handle:
        handle.visititems(lambda _, item: item[()] if isinstance(item, h5py.Dataset) else None)


def save_model(model: keras.Model, path: str) -> None:
    """`model.save(path)` by the chief of a job, atomically; the other processes take part and discard."""
    if distributed.is_chief():
        replace_atomically(path, model.save)
    else:
        with tempfile.TemporaryDirectory() as scratch:
            model.save(os.path.join(scratch, os.path.basename(path)))


def _plain(value):
    try:
        return float(value) if not isinstance(value, str | int) else value
    except (TypeError, ValueError):
        return value
