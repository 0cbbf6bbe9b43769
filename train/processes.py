"""The multi-process flags of `python -m train` and joining the run they describe.

These flags say how this process takes part in a job, not what the job trains, so they are not
training settings: they are neither saved with the run nor compared on --resume, and a run
saved by N processes resumes on any number of processes.
"""

import argparse
from typing import Any

from hpllm import distributed

PROCESS_FLAGS = ("coordinator", "num_processes", "process_id", "distributed", "init_timeout",
                 "heartbeat_timeout")

DESCRIPTION = (
    "Several processes (several hosts, or `python -m train launch` on one machine) train one "
    "model on JAX's distributed runtime. A process joins a multi-process run when given "
    "--coordinator, --num-processes and --process-id; or when the environment describes one: "
    "JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID), a SLURM step with "
    "SLURM_NTASKS > 1, an Open MPI job; or with --distributed (JAX's own detection, e.g. on TPU "
    "pods). Every process gets the same training flags; --out must be a folder every process "
    "can read (a shared filesystem); process 0 writes the logs, metrics and checkpoints. On CPU "
    "the processes exchange gradients with gloo over TCP.")


def add_process_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multi-process runs", DESCRIPTION)
    group.add_argument("--coordinator", metavar="HOST:PORT",
                       help="address of process 0, which every process connects to "
                            "(default: none, one process)")
    group.add_argument("--num-processes", dest="num_processes", type=int, metavar="N",
                       help="number of processes in the run (default: 1)")
    group.add_argument("--process-id", dest="process_id", type=int, metavar="I",
                       help="this process's id, 0..N-1; 0 is the primary (default: 0)")
    group.add_argument("--distributed", action="store_true",
                       help="join a multi-process run that JAX detects from the cluster "
                            "(SLURM, Open MPI, TPU pods) (default: only when flags or "
                            "environment describe one)")
    group.add_argument("--init-timeout", dest="init_timeout", type=int, metavar="S",
                       help=f"seconds to wait for every process to join before failing "
                            f"(default: {distributed.INIT_TIMEOUT_S})")
    group.add_argument("--heartbeat-timeout", dest="heartbeat_timeout", type=int, metavar="S",
                       help=f"a process silent this long is lost; the others stop with exit "
                            f"status {distributed.LOST_PROCESS_STATUS} "
                            f"(default: {distributed.HEARTBEAT_TIMEOUT_S})")


def pop_process_flags(given: dict[str, Any]) -> dict[str, Any]:
    """Remove the multi-process flags from the parsed flags and return them."""
    return {name: given.pop(name) for name in PROCESS_FLAGS if name in given}


def join_if_asked(flags: dict[str, Any]) -> bool:
    """Join the multi-process run that the flags or the environment describe; True if joined.
    Must run before any other JAX call of the process."""
    explicit = any(flags.get(name) is not None for name in ("coordinator", "process_id")) \
        or (flags.get("num_processes") or 1) > 1
    auto = bool(flags.get("distributed"))
    if not (explicit or auto or distributed.environment_job()):
        return False
    if flags.get("num_processes") == 1 and flags.get("coordinator") is None and not auto:
        return False
    distributed.join(flags.get("coordinator"), flags.get("num_processes"),
                     flags.get("process_id"), auto=auto,
                     init_timeout=flags.get("init_timeout") or distributed.INIT_TIMEOUT_S,
                     heartbeat_timeout=(flags.get("heartbeat_timeout")
                                        or distributed.HEARTBEAT_TIMEOUT_S))
    return True
