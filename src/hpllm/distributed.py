"""Joining a multi-process run on JAX's distributed runtime, and what to do when it breaks.

One training job may span several processes (several hosts, or several processes on one
machine). Each runs the same program; `join` calls `jax.distributed.initialize` before any other
JAX call, after which `jax.devices()` lists the devices of every process and the mesh of
`hpllm.sharding` spans them all. Process 0 ("the primary") also hosts the coordination service
that the others connect to.

Where the job is described:
- explicitly: `join(coordinator="HOST:PORT", num_processes=N, process_id=I)`;
- by the environment (`environment_job()`): `JAX_COORDINATOR_ADDRESS` (with `JAX_NUM_PROCESSES`
  and `JAX_PROCESS_ID`), a SLURM step of several tasks, an Open MPI job; JAX's own cluster
  detection then fills in what is missing (`join(auto=True)` also asks it on TPU pods).

On CPU the processes' collectives (the all-reduces and all-gathers of the train step) run over
TCP with gloo (`jax_cpu_collectives_implementation="gloo"`); on GPU and TPU the platform's own
collectives are used and that setting is ignored.

Failures are bounded in time:
- start-up: a process that cannot reach the coordinator, or a coordinator that does not hear
  from every process, gives up after `init_timeout` seconds;
- a lost process (killed, crashed, host down): a collective with it fails at once when its
  connections close (kill -9), and the coordination service declares it dead when its
  heartbeats stop for `heartbeat_timeout` seconds. `lost_processes` asks the service which
  processes are still alive (`multihost_utils.live_devices`), so the error names the lost one.
  The runtime runs in its "recoverable" mode (`jax_enable_recoverability`): the service then
  does not abort the survivors itself, which lets them say what happened in one line and exit
  (`abandon`) instead of dying in a C++ abort with a page of log.
"""

import hashlib
import os
import sys
import threading
from typing import NoReturn

import jax
import numpy as np

from hpllm.errors import UserError

CPU_COLLECTIVES = "gloo"
# A process that can't reach the coordinator (or a coordinator that misses a process) gives up
# after this long; generous, because the processes of a real job start seconds apart.
INIT_TIMEOUT_S = 60
# JAX's own start-up deadline is set this much later than ours, so ours fires first.
INIT_GRACE_S = 30
# A process whose heartbeats stop this long is dead. Short enough that the survivors of a lost
# process exit within about a minute; long enough not to misfire on a loaded machine.
HEARTBEAT_TIMEOUT_S = 20
# At a normal exit every process waits for the others at JAX's shutdown barrier; they arrive
# together (the program ends with a barrier of its own), so this bound is rarely approached.
SHUTDOWN_TIMEOUT_S = 60
# Exit status of a process that gave up because another process of the run was lost.
LOST_PROCESS_STATUS = 3


class DistributedError(UserError):
    """A multi-process run that cannot start (bad process id, unreachable coordinator,
    processes that disagree); the message says what to fix."""


def environment_job() -> str | None:
    """What in the environment describes a multi-process job (for messages), or None.

    SLURM and Open MPI run single-process programs too; only a step of several tasks counts."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_STEP_NODELIST" in env:
        return "SLURM (SLURM_NTASKS > 1)"
    if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "Open MPI (OMPI_COMM_WORLD_SIZE > 1)"
    return None


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name}={value!r} is not an integer") from None


def join(coordinator: str | None = None, num_processes: int | None = None,
         process_id: int | None = None, *, auto: bool = False,
         init_timeout: int = INIT_TIMEOUT_S,
         heartbeat_timeout: int = HEARTBEAT_TIMEOUT_S) -> None:
    """Join the multi-process run; must come before any other JAX call of the process.

    The three values are taken from the arguments, else `JAX_COORDINATOR_ADDRESS`,
    `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`, else JAX's cluster detection (SLURM, Open MPI,
    TPU pods) fills them in. Raises DistributedError with a one-line reason."""
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None:
        num_processes = _env_int("JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _env_int("JAX_PROCESS_ID")
    explicit = None not in (coordinator, num_processes, process_id)
    if not explicit and not auto and environment_job() is None:
        raise DistributedError(
            "a multi-process run needs --coordinator HOST:PORT, --num-processes N and "
            "--process-id I (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
    if coordinator is not None and (":" not in coordinator
                                    or not coordinator.rsplit(":", 1)[1].isdigit()):
        raise DistributedError(f"--coordinator {coordinator!r}: expected HOST:PORT")
    if num_processes is not None and num_processes < 1:
        raise DistributedError(f"--num-processes must be at least 1, got {num_processes}")
    if process_id is not None and num_processes is not None \
            and not 0 <= process_id < num_processes:
        raise DistributedError(
            f"--process-id {process_id} is out of range: with --num-processes {num_processes} "
            f"the ids are 0..{num_processes - 1}, each given to exactly one process")

    jax.config.update("jax_cpu_collectives_implementation", CPU_COLLECTIVES)
    jax.config.update("jax_enable_recoverability", True)
    where = coordinator or "the coordinator"
    ids = f"0..{num_processes - 1}" if num_processes else "0..N-1"
    # A process that never hears from the others is aborted by JAX's C++ client with a page
    # of log when its own deadline passes; this watchdog fires first with one clear line.
    watchdog = threading.Timer(init_timeout, _give_up, args=(
        f"process {process_id} could not join the multi-process run at {where} within "
        f"{init_timeout} s: process 0 is not listening there, or not every process of "
        f"{ids} joined. Start every process with the same --coordinator (process 0's address, "
        f"reachable from here) and --num-processes, each with its own --process-id",))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator, num_processes, process_id,
            cluster_detection_method=None if auto or not explicit else "deactivate",
            initialization_timeout=init_timeout + INIT_GRACE_S,
            heartbeat_timeout_seconds=heartbeat_timeout,
            shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)
    except (ValueError, TypeError) as error:  # JAX's own checks of the three values
        raise DistributedError(f"cannot join the multi-process run: {first_line(error)}") \
            from None
    except jax.errors.JaxRuntimeError as error:
        raise DistributedError(
            f"process {process_id} could not join the multi-process run at {where} "
            f"({first_line(error)}); check --coordinator, --num-processes and --process-id") \
            from None
    finally:
        watchdog.cancel()


def _give_up(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(2)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def is_primary() -> bool:
    """True in process 0, the one that writes logs, metrics and checkpoints."""
    return jax.process_index() == 0


def process_index() -> int:
    return jax.process_index()


def finish(status: int) -> int:
    """End a process of a multi-process run that went well: wait for every process, then
    return `status` in the primary and exit with it at once elsewhere.

    In the recoverable mode JAX's exit-time shutdown does not wait for the other processes, so
    the primary (which hosts the coordination service) could leave first and make a slower
    process's own shutdown fail with an abort. Here the others leave first, right after the
    barrier, without the shutdown call; the primary then shuts the service down."""
    barrier("finish")
    if jax.process_index() != 0:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def barrier(name: str) -> None:
    """Wait until every process gets here (a no-op with one process). Collective."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def check_same(text: str, what: str) -> None:
    """Raise DistributedError in every process unless all processes passed the same `text`
    (compared by SHA-256). Collective: every process must call it at the same point."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), dtype=np.uint8)
    every = np.asarray(multihost_utils.process_allgather(digest))  # [process, 32]
    differ = [i for i in range(len(every)) if not np.array_equal(every[i], every[0])]
    if differ:
        raise DistributedError(
            f"{what} differ between processes: process(es) {', '.join(map(str, differ))} "
            f"disagree with process 0; start every process with the same flags and files")


def any_process(flag: bool) -> bool:
    """True in every process if `flag` is True in any (e.g. Ctrl-C seen by one). Collective."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray([flag], dtype=np.int32))
    return bool(np.any(np.asarray(flags)))


def lost_processes(timeout: float) -> list[int] | None:
    """The ids of the processes the coordination service has declared dead, or None if it
    could not tell within `timeout` seconds (for instance because the coordinator itself,
    process 0, is gone). Call only after a collective failed."""
    from jax.experimental import multihost_utils

    result: list[list[int]] = []

    def ask() -> None:
        try:
            with multihost_utils.live_devices(jax.devices()) as alive:
                live = {device.process_index for device in alive}
            result.append(sorted(set(range(jax.process_count())) - live))
        except Exception:  # noqa: BLE001 - the service is gone too: we can't tell who
            pass

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(timeout)
    return result[0] if result else None


def is_collective_failure(error: BaseException) -> bool:
    """True for the errors a step raises when another process of the run is gone."""
    if jax.process_count() == 1:
        return False
    text = str(error)
    return isinstance(error, jax.errors.JaxRuntimeError | ValueError) and any(
        marker in text for marker in ("Gloo", "gloo", "UNAVAILABLE", "heartbeat", "Connection"))


def abandon(error: BaseException, heartbeat_timeout: int = HEARTBEAT_TIMEOUT_S) -> NoReturn:
    """After a collective failed because a process is gone: one line naming the lost process,
    then exit with LOST_PROCESS_STATUS at once.

    `os._exit` skips JAX's exit-time shutdown barrier, which would wait for the dead process
    and then abort with a page of log. Everything this program writes is already complete on
    disk (atomic writes), so nothing is lost by skipping the rest of the interpreter's exit."""
    me = jax.process_index()
    lost = lost_processes(heartbeat_timeout + 15)
    if lost:
        who = "process " + ", ".join(map(str, lost))
    elif me != 0:
        who = "process 0 (the coordinator)"
    else:
        who = "another process"
    print(f"error: process {me}: lost {who} of the multi-process run ({first_line(error)}); "
          f"stopping. The last checkpoint is complete: relaunch every process with --resume",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(LOST_PROCESS_STATUS)
