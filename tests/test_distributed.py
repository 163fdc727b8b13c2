"""Multi-process training with real OS processes on 127.0.0.1: JAX jobs, resume after a kill, bad setups.

Every process is started in a process group of its own and killed, with its group, when the test ends.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

from conftest import ONE_BLOCK, REPO, run_python
import keras
import numpy as np
import pytest

from keras_sequencer import distributed

pytestmark = pytest.mark.backend_agnostic  # every job runs in subprocesses that choose their backend

# The same program for one process and for every process of a job: plain SGD with momentum and an unshuffled
# pipeline whose epochs are one pass over the data, so a 2-process job and a single process see the same global
# batches in the same order and must reach the same weights (up to summation order in the all-reduce).
_WORKER = """
import json, os, sys, time
import numpy as np, keras
import tensorflow as tf
import keras_sequencer as ks
from keras_sequencer import distributed, train

out, epochs, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
kill_at = int(os.environ.get("TEST_HANG_AT_EPOCH", "-1"))
keras.utils.set_random_seed(0)
rng = np.random.RandomState(0)
x = rng.uniform(0, 255, (64, 16, 16, 3)).astype("float32")
y = keras.utils.to_categorical(np.arange(64) % 4, 4)
vx = rng.uniform(0, 255, (40, 16, 16, 3)).astype("float32")  # 40 = 2 full batches of 16 and one of 8
vy = keras.utils.to_categorical(rng.randint(0, 4, 40), 4)


class Probe(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        print("EPOCH", epoch, flush=True)

    def on_train_batch_end(self, batch, logs=None):
        if self.epoch == kill_at and batch == 1:
            print("HANGING", flush=True)  # the test kills this process now
            time.sleep(600)


# "keras": every process builds the global batches and Keras slices them; "source": each process shards the
# samples first and batches its share (what train.run does).
sharding = os.environ.get("TEST_SHARDING", "keras")
with train.distribution_scope(auto_shard_dataset=sharding == "keras") as scope:
    source, local_batch = tf.data.Dataset.from_tensor_slices((x, y)), batch
    if sharding == "source":
        source, local_batch = distributed.local_share(source, batch)
    ds = source.batch(local_batch, drop_remainder=True).repeat()
    val = tf.data.Dataset.from_tensor_slices((vx, vy)).batch(batch)
    if scope is not None and sharding == "keras":  # the samples this process reads of each global batch
        index = tf.data.Dataset.range(64).batch(batch, drop_remainder=True)
        print("SHARD", json.dumps([int(i) for b in scope.distribute_dataset(index) for i in b.numpy()]))
    model = ks.Sequencer2D(**json.loads(sys.argv[4]), classes=4, classifier_activation=None, input_shape=(16, 16, 3))
    history = train.fit(
        model, ds, val, train.get_recipe("fashion_mnist"), batch, 64 // batch, out, epochs=epochs, verbose=0,
        callbacks=[Probe()], optimizer=keras.optimizers.SGD(0.05, momentum=0.9), validation_size=40,
    )
print("HISTORY", json.dumps({k: [float(v) for v in vs] for k, vs in history.history.items()}))
np.savez(os.path.join(out, f"weights-{distributed.process_index()}.npz"), *model.get_weights())
print("DONE", flush=True)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Job:
    """Processes of one job, each with its Keras job variables, output in files, killed on exit."""

    def __init__(self, tmp_path, name: str):
        self.tmp_path, self.name, self.procs, self.logs = tmp_path, name, [], []

    def start(self, args, process_id=None, num_processes=None, port=None, backend="jax", env=None):
        """Starts `python ARGS`; with `process_id`, as that process of a Keras job on 127.0.0.1:`port`."""
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("KERAS_DISTRIBUTION_")}
        full_env.update({"KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})})
        if process_id is not None:
            full_env[distributed.ADDRESSES] = f"127.0.0.1:{port}"
            full_env[distributed.NUM_PROCESSES] = str(num_processes)
            full_env[distributed.PROCESS_ID] = str(process_id)
        log = self.tmp_path / f"{self.name}-{len(self.procs)}.log"
        handle = open(log, "w")
        self.procs.append(
            subprocess.Popen(
                [sys.executable, *map(str, args)],
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=REPO,
                process_group=0,
            )  # fmt: skip
        )
        self.logs.append(log)
        handle.close()

    def output(self, i: int) -> str:
        return self.logs[i].read_text()

    def wait_for(self, i: int, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output(i):
            if self.procs[i].poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"process {i} never printed {text!r}:\n{self.output(i)[-4000:]}")
            time.sleep(0.2)

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"{self.name}: a process did not finish in {timeout} s:\n{self.output(0)[-3000:]}")
        return [proc.returncode for proc in self.procs]

    def kill(self, i: int | None = None) -> None:
        for proc in self.procs if i is None else [self.procs[i]]:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _train_job(tmp_path, name, out, epochs, sharding="keras", hang_process=None, hang_epoch=-1, outs=None):
    """Starts the worker in two processes; process `hang_process` stops (sleeps) in epoch `hang_epoch`."""
    port = _free_port()
    job = _Job(tmp_path, name)
    for i in range(2):
        out = outs[i] if outs else out
        env = {"TEST_SHARDING": sharding}
        if i == hang_process:
            env["TEST_HANG_AT_EPOCH"] = str(hang_epoch)
        job.start(["-c", _WORKER, out, epochs, 16, json.dumps(ONE_BLOCK)], i, 2, port, env=env)
    return job


EPOCHS = 3


@pytest.fixture(scope="session")
def single_process(tmp_path_factory):
    """The worker alone for EPOCHS epochs: its history and final weights, the reference every job must reach.

    Run once per pytest run: pytest-xdist's workers share the run's temporary folder (a lock makes the first
    one run it and the others wait for its files)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    out = root / "single-process"
    with FileLock(str(root / "single-process.lock")):
        if not (out / "history.json").exists():
            out.mkdir(exist_ok=True)
            stdout = run_python(
                _WORKER.replace("sys.argv[1]", repr(str(out))).replace("sys.argv[2]", str(EPOCHS))
                .replace("sys.argv[3]", "16").replace("sys.argv[4]", repr(json.dumps(ONE_BLOCK))),
                backend="jax",
            )  # fmt: skip
            (out / "history.json").write_text(stdout.split("HISTORY ")[1].splitlines()[0])
    return json.loads((out / "history.json").read_text()), np.load(out / "weights-0.npz")


def _history(output: str) -> dict:
    return json.loads(output.split("HISTORY ")[1].splitlines()[0])


def _assert_weights_equal(a, b, atol=1e-5):
    assert len(a.files) == len(b.files)
    for key in a.files:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=atol, err_msg=key)


def _epochs_logged(out) -> list[int]:
    rows = (out / "log.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,")
    return [int(row.split(",")[0]) for row in rows[1:]]


def test_two_processes_train_like_one_process_on_the_same_global_batches(tmp_path, single_process):
    single_history, single_weights = single_process
    job = _train_job(tmp_path, "job", tmp_path / "job", EPOCHS)
    try:
        assert job.wait(300) == [0, 0], job.output(0)[-3000:] + job.output(1)[-3000:]
    finally:
        job.kill()
    outputs = [job.output(i) for i in range(2)]
    shards = [json.loads(out.split("SHARD ")[1].splitlines()[0]) for out in outputs]
    assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == list(range(64)), shards
    weights = [np.load(tmp_path / "job" / f"weights-{i}.npz") for i in range(2)]
    _assert_weights_equal(weights[0], weights[1], atol=0)  # one set of replicated variables
    _assert_weights_equal(weights[0], single_weights)
    for out in outputs:  # metrics are global: every process reports the single process' numbers
        history = _history(out)
        np.testing.assert_allclose(history["val_accuracy"], single_history["val_accuracy"], atol=1e-6)
        np.testing.assert_allclose(history["val_loss"], single_history["val_loss"], rtol=1e-5)
        np.testing.assert_allclose(history["loss"], single_history["loss"], rtol=1e-5)
    assert _epochs_logged(tmp_path / "job") == list(range(EPOCHS))
    assert sorted(os.listdir(tmp_path / "job" / "backup")) == [  # the last two epochs' weights are kept
        "epoch-0001.weights.h5", "epoch-0002.weights.h5", "state.json",
    ]  # fmt: skip


def test_a_killed_job_resumes_at_the_epoch_it_lost(tmp_path, single_process):
    single_history, single_weights = single_process
    out = tmp_path / "job"
    # Each process shards the samples itself here (train.run's way); global batches are the same.
    job = _train_job(tmp_path, "killed", out, EPOCHS, sharding="source", hang_process=1, hang_epoch=2)
    try:
        job.wait_for(1, "HANGING", timeout=300)
        job.kill(1)  # SIGKILL in the middle of epoch 2; the scheduler then stops the survivor too
        time.sleep(1)
        job.kill()
    finally:
        job.kill()
    assert _epochs_logged(out) == [0, 1]

    rerun = _train_job(tmp_path, "rerun", out, EPOCHS, sharding="source")
    try:
        assert rerun.wait(300) == [0, 0], rerun.output(0)[-3000:] + rerun.output(1)[-3000:]
    finally:
        rerun.kill()
    for i in range(2):
        assert [line for line in rerun.output(i).splitlines() if line.startswith("EPOCH")] == ["EPOCH 2"]
    _assert_weights_equal(np.load(out / "weights-0.npz"), single_weights)
    for i in range(2):  # the validation set, sliced by fit for a pipeline that is this process' share
        resumed = _history(rerun.output(i))
        np.testing.assert_allclose(resumed["val_accuracy"], single_history["val_accuracy"][2:], atol=1e-6)
        np.testing.assert_allclose(resumed["val_loss"], single_history["val_loss"][2:], rtol=1e-5)
    assert _epochs_logged(out) == [0, 1, 2]
    for name in os.listdir(out / "backup"):  # every file left is whole
        if name.endswith(".h5"):
            model = keras.saving.load_model(out / "last.keras")
            model.load_weights(out / "backup" / name, skip_mismatch=False)
    assert json.loads((out / "backup" / "state.json").read_text())["epoch"] == 3

    # A host that does not see the shared output directory: every process stops with the reason.
    (tmp_path / "elsewhere").mkdir()
    split = _train_job(tmp_path, "split", out, EPOCHS, sharding="source", outs=[out, tmp_path / "elsewhere"])
    try:
        assert split.wait(300) == [1, 1]
    finally:
        split.kill()
    for i in range(2):
        assert "disagree on the number of finished epochs" in split.output(i), split.output(i)[-2000:]
        assert "[3, 0] (by process index)" in split.output(i) and "filesystem every host shares" in split.output(i)


# === Bad setups ===


def test_job_variables_are_read_and_checked():
    env = {distributed.ADDRESSES: "10.0.0.1:1234,10.0.0.2:1234", distributed.NUM_PROCESSES: "2"}
    assert distributed.job_from_environment({}) is None
    assert distributed.job_from_environment({**env, distributed.PROCESS_ID: "1"}) == distributed.Job(
        "10.0.0.1:1234", 2, 1
    )
    with pytest.raises(ValueError, match="KERAS_DISTRIBUTION_PROCESS_ID is not set"):
        distributed.job_from_environment(env)
    with pytest.raises(ValueError, match=r"must be in \[0, KERAS_DISTRIBUTION_NUM_PROCESSES\)"):
        distributed.job_from_environment({**env, distributed.PROCESS_ID: "2"})
    with pytest.raises(ValueError, match="lists 2 addresses but KERAS_DISTRIBUTION_NUM_PROCESSES is 3"):
        distributed.job_from_environment({**env, distributed.NUM_PROCESSES: "3", distributed.PROCESS_ID: "0"})
    with pytest.raises(ValueError, match="coordinator's host:port"):
        distributed.job_from_environment({**env, distributed.ADDRESSES: "10.0.0.1", distributed.PROCESS_ID: "0"})
    with pytest.raises(ValueError, match="Received: KERAS_DISTRIBUTION_NUM_PROCESSES='two'"):
        distributed.job_from_environment({**env, distributed.NUM_PROCESSES: "two", distributed.PROCESS_ID: "0"})


_JOIN = "from keras_sequencer import train\nwith train.distribution_scope() as scope:\n    print('JOINED', scope)\n"


def test_an_unreachable_coordinator_or_a_missing_peer_fails_fast_naming_the_address(tmp_path):
    job = _Job(tmp_path, "alone")
    timeout = {distributed.TIMEOUT_ENV: "10"}
    start = time.monotonic()
    try:
        job.start(["-c", _JOIN], 1, 2, _free_port(), env=timeout)  # nobody listens on the coordinator's port
        job.start(["-c", _JOIN], 0, 2, port := _free_port(), env=timeout)  # the coordinator, whose peer never comes
        codes = job.wait(120)
    finally:
        job.kill()
    assert time.monotonic() - start < 60
    assert codes == [distributed.JOIN_FAILED] * 2, [job.output(i)[-2000:] for i in range(2)]
    assert "gave up waiting for the coordinator and the other processes after 10 s" in job.output(0)
    assert f"Could not join the job at 127.0.0.1:{port} as process 0 of 2" in job.output(1)
    assert "gave up waiting for the other 1 process(es) to register" in job.output(1)


def test_processes_that_disagree_on_the_job_size_are_refused(tmp_path):
    job = _Job(tmp_path, "sizes")
    port = _free_port()
    try:
        job.start(["-c", _JOIN], 0, 2, port)
        job.start(["-c", _JOIN], 1, 3, port)
        codes = job.wait(120)
    finally:
        job.kill()
    assert codes == [1, 1]
    for i in range(2):
        assert "disagree on KERAS_DISTRIBUTION_NUM_PROCESSES: [2, 3]" in job.output(i), job.output(i)[-2000:]


def test_a_global_batch_that_does_not_split_over_the_devices_is_refused():
    code = (
        "import json, keras, numpy as np\n"
        "import keras_sequencer as ks\n"
        "from keras_sequencer import train\n"
        "with train.distribution_scope():\n"
        f"    model = ks.Sequencer2D(**{ONE_BLOCK!r}, classes=4, classifier_activation=None, input_shape=(16, 16, 3))\n"
        "    try:\n"
        "        train.fit(model, None, None, train.get_recipe('fashion_mnist'), 15, 1, 'unused')\n"
        "    except ValueError as error:\n"
        "        print('REFUSED', error)\n"
    )
    out = run_python(code, backend="jax", env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert "REFUSED The global batch size must be divisible by the 2 devices" in out, out
    assert "Received: global_batch=15" in out


_REFUSALS = """
import os, sys
from keras_sequencer import train
cluster = '{"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker", "index": 0}}'
cases = {
    "TF_CONFIG": {"TF_CONFIG": cluster},
    "SINGLE": {"TF_CONFIG": '{"cluster": {"chief": ["127.0.0.1:1"]}, "task": {"type": "chief", "index": 0}}'},
    "KERAS": {"KERAS_DISTRIBUTION_JOB_ADDRESSES": "127.0.0.1:1", "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
              "KERAS_DISTRIBUTION_PROCESS_ID": "0"},
}
for name in sys.argv[1:]:
    env = cases[name]
    os.environ.update(env)
    try:
        with train.distribution_scope():
            print(name, "ENTERED")
    except ValueError as error:
        print(name, "REFUSED", error)
    for key in env:
        del os.environ[key]
"""


@pytest.mark.parametrize("backend", ["tensorflow", "torch", "jax"])
def test_multi_worker_tf_config_and_keras_jobs_off_jax_are_refused_naming_the_jax_route(backend):
    cases = ["TF_CONFIG", "SINGLE"] + (["KERAS"] if backend != "jax" else [])  # JAX joins Keras' jobs
    result = subprocess.run(
        [sys.executable, "-c", _REFUSALS, *cases], capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.split()}
    assert lines["TF_CONFIG"].startswith("TF_CONFIG REFUSED") and "KERAS_BACKEND=jax" in lines["TF_CONFIG"]
    assert "cluster of 2 tasks" in lines["TF_CONFIG"]
    assert lines["SINGLE"] == "SINGLE ENTERED"  # a one-task TF_CONFIG, as managed services set, is no cluster
    if backend != "jax":
        assert lines["KERAS"].startswith("KERAS REFUSED") and "Set KERAS_BACKEND=jax" in lines["KERAS"]


# Keras 3's TensorFlow trainer under MultiWorkerMirroredStrategy: the reason TF_CONFIG is refused. When this
# test starts failing, Keras can train multi-worker on TensorFlow and `distribution_scope` should use it.
_MULTI_WORKER = """
import numpy as np, tensorflow as tf, keras
strategy = tf.distribute.MultiWorkerMirroredStrategy()
x = np.random.RandomState(0).rand(64, 4).astype("float32")
ds = tf.data.Dataset.from_tensor_slices((x, x.sum(1, keepdims=True))).batch(16).repeat()
with strategy.scope():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.1), "mse")
print("REPLICAS", strategy.num_replicas_in_sync, flush=True)
model.fit(ds, epochs=1, steps_per_epoch=2, verbose=0)
print("TRAINED", flush=True)
"""


def test_keras_tensorflow_trainer_cannot_train_under_multi_worker_mirrored_strategy(tmp_path):
    ports = [_free_port(), _free_port()]
    job = _Job(tmp_path, "multi-worker")
    try:
        for i in range(2):
            tf_config = {
                "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                "task": {"type": "worker", "index": i},
            }
            job.start(["-c", _MULTI_WORKER], i, 1, 0, backend="tensorflow", env={"TF_CONFIG": json.dumps(tf_config)})
        codes = job.wait(180)
    finally:
        job.kill()
    for i in range(2):
        output = job.output(i)
        assert "REPLICAS 2" in output and "TRAINED" not in output and codes[i] != 0, output[-3000:]
        assert "Attempt to convert a value (PerReplica:" in output, output[-3000:]
