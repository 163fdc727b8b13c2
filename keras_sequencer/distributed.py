"""Multi-process training: joining a job described by Keras' environment variables, and the roles in it.

A job is N copies of the same program, one per host (or per accelerator group), started with

    KERAS_DISTRIBUTION_JOB_ADDRESSES=host0:port[,host1:port,...]   (the first is the coordinator)
    KERAS_DISTRIBUTION_NUM_PROCESSES=N
    KERAS_DISTRIBUTION_PROCESS_ID=0..N-1

the variables `keras.distribution.initialize()` reads. Only the JAX backend runs such jobs: Keras 3
has no multi-process route on PyTorch, and its TensorFlow trainer does not run
`tf.distribute.MultiWorkerMirroredStrategy` (see `refuse_tf_config`).

Process 0 is the chief: it alone writes checkpoints, logs and reports (`is_chief`). Every process reads
the same files when it resumes, so `output_dir` must be on a filesystem all hosts share; `check_agreement`
turns a host that sees different files into an error instead of a silently diverging run.
"""

import dataclasses
import os
import sys
import threading

import keras

ADDRESSES = "KERAS_DISTRIBUTION_JOB_ADDRESSES"
NUM_PROCESSES = "KERAS_DISTRIBUTION_NUM_PROCESSES"
PROCESS_ID = "KERAS_DISTRIBUTION_PROCESS_ID"
ENVIRONMENT = (ADDRESSES, NUM_PROCESSES, PROCESS_ID)
TIMEOUT_ENV = "KERAS_SEQUENCER_JOIN_TIMEOUT"
DEFAULT_TIMEOUT = 60


@dataclasses.dataclass(frozen=True)
class Job:
    """One process's view of a multi-process job.

    Attributes:
        coordinator: `host:port` of process 0's coordination service.
        num_processes: processes in the job.
        process_id: this process's index, 0 for the chief.
    """

    coordinator: str
    num_processes: int
    process_id: int


def _positive_int(name: str, text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}. Received: {name}={text!r}")
    return value


def job_from_environment(environ=None) -> Job | None:
    """The job the Keras variables describe, or None when they are unset (a single-process run).

    Raises:
        ValueError: when only some of the variables are set or one is malformed.
    """
    environ = os.environ if environ is None else environ
    present = [name for name in ENVIRONMENT if environ.get(name, "").strip()]
    if not present:
        return None
    missing = [name for name in ENVIRONMENT if name not in present]
    if missing:
        raise ValueError(
            f"A multi-process job needs all of {', '.join(ENVIRONMENT)}; {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set. Received: "
            + ", ".join(f"{name}={environ[name]!r}" for name in present)
        )
    num_processes = _positive_int(NUM_PROCESSES, environ[NUM_PROCESSES], 1)
    process_id = _positive_int(PROCESS_ID, environ[PROCESS_ID], 0)
    if process_id >= num_processes:
        raise ValueError(
            f"{PROCESS_ID} must be in [0, {NUM_PROCESSES}). "
            f"Received: {PROCESS_ID}={process_id}, {NUM_PROCESSES}={num_processes}"
        )
    addresses = [a.strip() for a in environ[ADDRESSES].split(",")]
    if len(addresses) > 1 and len(addresses) != num_processes:
        raise ValueError(
            f"{ADDRESSES} lists {len(addresses)} addresses but {NUM_PROCESSES} is {num_processes}: give one "
            f"address per process, or only the coordinator's. Received: {ADDRESSES}={environ[ADDRESSES]!r}"
        )
    host, _, port = addresses[0].rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(
            f"{ADDRESSES} must start with the coordinator's host:port (process 0's address). "
            f"Received: {ADDRESSES}={environ[ADDRESSES]!r}"
        )
    return Job(addresses[0], num_processes, process_id)


def join_timeout() -> int:
    """Seconds to wait for the coordinator and every peer: $KERAS_SEQUENCER_JOIN_TIMEOUT, default 60."""
    text = os.environ.get(TIMEOUT_ENV, "")
    return _positive_int(TIMEOUT_ENV, text, 1) if text.strip() else DEFAULT_TIMEOUT


def tf_config_tasks(environ=None) -> int:
    """Number of tasks in the cluster that $TF_CONFIG describes (0 when unset)."""
    import json

    text = (os.environ if environ is None else environ).get("TF_CONFIG", "").strip()
    if not text:
        return 0
    try:
        cluster = json.loads(text).get("cluster", {})
        return sum(len(tasks) for tasks in cluster.values())
    except (ValueError, AttributeError, TypeError) as error:
        raise ValueError(
            f"TF_CONFIG is not a JSON cluster description ({error}). Received: TF_CONFIG={text!r}"
        ) from error


def refuse_tf_config() -> None:
    """Raises a ValueError when TF_CONFIG describes a cluster of several tasks, which this package does not run.

    Keras 3's TensorFlow trainer does not train under
    `tf.distribute.MultiWorkerMirroredStrategy` (its first step fails inside
    the strategy's distributed iterator; see docs/design.md), and no other
    backend reads TF_CONFIG, so such a cluster is refused instead of being
    ignored, which would train independent copies writing the same files.
    A single-task TF_CONFIG (some managed services set one) is accepted.
    """
    tasks = tf_config_tasks()
    if tasks > 1:
        raise ValueError(
            f"TF_CONFIG describes a cluster of {tasks} tasks, but multi-worker training "
            "(tf.distribute.MultiWorkerMirroredStrategy) does not work with Keras 3's TensorFlow trainer. Train on "
            f"many machines with the JAX backend: KERAS_BACKEND=jax and {', '.join(ENVIRONMENT)} on every host "
            "(README, 'Training on many machines'); or unset TF_CONFIG to train on this machine's devices."
        )


def _jax_initialized() -> bool:
    import jax

    return jax.distributed.is_initialized()


JOIN_FAILED = 3  # exit status of a process that could not join its job


def initialize(job: Job, timeout: int | None = None) -> None:
    """Joins `job` on the JAX backend: CPU collectives over gloo, then `jax.distributed.initialize`.

    Must run before the process's first JAX computation. When the coordinator
    cannot be reached, or not every peer registers, within `timeout` seconds
    (default `join_timeout()`), the process prints what it waited for and
    exits with status `JOIN_FAILED`: JAX aborts the process in that case
    (there is no exception to catch), so this says why first. Processes that
    disagree on the number of processes raise a ValueError. Calling it
    again for the same job does nothing.
    """
    import jax

    timeout = join_timeout() if timeout is None else timeout
    if _jax_initialized():
        if (jax.process_count(), jax.process_index()) != (job.num_processes, job.process_id):
            raise RuntimeError(
                f"This process already belongs to a job of {jax.process_count()} processes as process "
                f"{jax.process_index()}; it cannot join {job}."
            )
        return
    # gloo carries cross-process collectives between CPU devices; GPU and TPU devices use their own.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    waited_for = (
        f"the other {job.num_processes - 1} process(es) to register"
        if job.process_id == 0
        else "the coordinator and the other processes"
    )
    message = (
        f"Could not join the job at {job.coordinator} as process {job.process_id} of {job.num_processes}: "
        f"gave up waiting for {waited_for} after {timeout} s. Check that process 0 runs at {job.coordinator} "
        f"and is reachable from here, that all {job.num_processes} processes were started with the same "
        f"{ADDRESSES} and {NUM_PROCESSES} and distinct {PROCESS_ID}s, or raise {TIMEOUT_ENV}.\n"
    )
    joined = threading.Event()

    def watchdog():
        if not joined.wait(timeout):
            sys.stderr.write(message)
            sys.stderr.flush()
            os._exit(JOIN_FAILED)

    threading.Thread(target=watchdog, name="join-watchdog", daemon=True).start()
    try:
        # JAX's own limit comes later than the watchdog's, so the clear message wins.
        jax.distributed.initialize(
            coordinator_address=job.coordinator,
            num_processes=job.num_processes,
            process_id=job.process_id,
            initialization_timeout=timeout + 30,
        )
    except RuntimeError as error:
        text = str(error)
        if "before any JAX" in text or "must be called before" in text:
            raise RuntimeError(
                "Joining a multi-process job must come before the first JAX computation: enter "
                "train.distribution_scope() before building models, optimizers or datasets that use Keras "
                f"layers. ({text.splitlines()[0]})"
            ) from error
        raise RuntimeError(message.strip() + f" ({text.splitlines()[0] if text else type(error).__name__})") from error
    finally:
        joined.set()
    check_agreement(NUM_PROCESSES, job.num_processes)
    if jax.process_count() != job.num_processes:
        raise ValueError(
            f"The job has {jax.process_count()} processes but this one was told {NUM_PROCESSES}="
            f"{job.num_processes}; start every process with the same value."
        )
    _agree_on_seed()


def _agree_on_seed() -> None:
    """Every process must draw the same initial weights: without a user seed, all take process 0's."""
    from jax.experimental import multihost_utils
    from keras.src.utils import rng_utils
    import numpy as np

    seed = rng_utils.get_random_seed()
    candidate = seed if seed is not None else int(np.random.SeedSequence().generate_state(1)[0] % (2**31))
    # One all-gather of (seed set?, seed) so that every process decides the same way.
    gathered = np.asarray(multihost_utils.process_allgather(np.asarray([seed is not None, candidate], np.int64)))
    gathered = gathered.reshape(-1, 2)
    chosen = {int(value) for is_set, value in gathered if is_set}
    if len(chosen) > 1 or (chosen and not gathered[:, 0].all()):
        raise ValueError(
            "The processes of this job set different random seeds (by process index: "
            f"{[int(v) if s else None for s, v in gathered]}); their initial weights would differ. Give every "
            "process the same keras.utils.set_random_seed(...) value, or none."
        )
    if not chosen:
        keras.utils.set_random_seed(int(gathered[0, 1]))


def process_count() -> int:
    """Processes in the current job (1 without one, or off JAX)."""
    if keras.backend.backend() != "jax":
        return 1
    import jax

    return jax.process_count() if _jax_initialized() else 1


def process_index() -> int:
    """This process's index in the job (0 without one)."""
    if process_count() == 1:
        return 0
    import jax

    return jax.process_index()


def is_chief() -> bool:
    """Whether this process writes the job's files (process 0; every process of a single-process run)."""
    return process_index() == 0


def check_agreement(name: str, value: int, hint: str = "Start every process with the same settings.") -> None:
    """Raises, in every process, unless all processes of the job hold the same integer `value`."""
    if process_count() == 1:
        return
    from jax.experimental import multihost_utils
    import numpy as np

    values = np.asarray(multihost_utils.process_allgather(np.int64(value))).reshape(-1).tolist()
    if len(set(values)) > 1:
        raise ValueError(f"The processes of this job disagree on {name}: {values} (by process index). {hint}")


def local_share(source, global_batch: int):
    """This process's shard of an unbatched `tf.data` source, and its share of the global batch.

    Sharding the source before decoding and augmenting, rather than slicing
    finished global batches, keeps each process's input work at its own
    share. Use it with `distribution_scope(auto_shard_dataset=False)`, which
    takes each process's batches as its part of the global batch.

    Returns:
        `(shard, local_batch)`; in a single process, `(source, global_batch)`.
    """
    count, index = process_count(), process_index()
    if global_batch % count:
        raise ValueError(
            f"The global batch size must be divisible by the {count} processes of the job. "
            f"Received: global_batch={global_batch}"
        )
    if count == 1:
        return source, global_batch
    return source.shard(count, index), global_batch // count
