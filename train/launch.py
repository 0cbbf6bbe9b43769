"""`python -m train launch --num-processes N [--devices-per-process K] -- TRAIN-FLAGS...`

Starts N processes of `python -m train TRAIN-FLAGS --coordinator 127.0.0.1:PORT
--num-processes N --process-id I` on this machine (PORT: a free one) and waits for them. This is
the multi-host path on one machine, for trying it and for the tests; on real hosts, start one
process per host yourself (README, "Multi-host").

- On CPU every process gets K virtual devices (`--xla_force_host_platform_device_count`).
- Each line a process prints is prefixed with `[I] `, its id.
- The exit status is 0 when every process succeeded, else that of the first process that failed
  (128 + the signal for a process killed by one). When one fails, the others are given time to
  notice and stop on their own (they do, within their heartbeat timeout); any still running
  after that is killed, so the launcher never hangs.
- With N = 1 the one process runs without joining a distributed runtime: the single-process
  reference that the multi-process runs are compared with.
"""

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, NoReturn

from hpllm.distributed import HEARTBEAT_TIMEOUT_S

# After one process fails, the others get this long to notice and exit by themselves.
GRACE_S = HEARTBEAT_TIMEOUT_S + 45


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (another program could take it before we bind it; the
    processes then fail to start, clearly, and a relaunch picks another)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(devices: int) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    return env


def pump(stream: IO[str], prefix: str, out: IO[str], lock: threading.Lock) -> None:
    for line in stream:
        with lock:
            out.write(prefix + line if line.endswith("\n") else prefix + line + "\n")
            out.flush()


def status_of(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit status {code}"


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ours, train_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) \
        if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(
        prog="python -m train launch",
        description="Start N local processes of one multi-process training run on 127.0.0.1 "
                    "(on CPU with gloo collectives): python -m train launch --num-processes 2 "
                    "-- --preset tiny --steps 20 --out runs/mp. Output lines are prefixed with "
                    "the process id; the exit status is non-zero if any process fails.",
        epilog="Flags after -- go to every process of `python -m train` (see its --help).")
    parser.add_argument("--num-processes", type=int, required=True, metavar="N",
                        help="processes to start")
    parser.add_argument("--devices-per-process", type=int, default=1, metavar="K",
                        help="virtual CPU devices of each process (default: 1)")
    parser.add_argument("--port", type=int, default=None,
                        help="coordinator port on 127.0.0.1 (default: a free one)")
    args = parser.parse_args(ours)
    if args.num_processes < 1:
        fail(f"--num-processes must be at least 1, got {args.num_processes}")
    if args.devices_per_process < 1:
        fail(f"--devices-per-process must be at least 1, got {args.devices_per_process}")
    taken = {"--coordinator", "--num-processes", "--process-id"} & {
        arg.split("=")[0] for arg in train_args}
    if taken:
        fail(f"{', '.join(sorted(taken))} after --: the launcher sets these itself")
    return args, train_args


def main(argv: list[str]) -> int:
    args, train_args = parse(argv)
    n = args.num_processes
    port = args.port or free_port()
    env = child_env(args.devices_per_process)
    command = [sys.executable, "-m", "train", *train_args]
    lock = threading.Lock()
    children: list[subprocess.Popen] = []
    pumps = []
    try:
        for i in range(n):
            joining = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n),
                       "--process-id", str(i)] if n > 1 else []
            child = subprocess.Popen(command + joining, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)
            children.append(child)
            with lock:
                print(f"launch: process {i} started (pid {child.pid})", file=sys.stderr,
                      flush=True)
            for stream, out in ((child.stdout, sys.stdout), (child.stderr, sys.stderr)):
                thread = threading.Thread(target=pump, args=(stream, f"[{i}] ", out, lock),
                                          daemon=True)
                thread.start()
                pumps.append(thread)
        return wait(children, lock)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
        for thread in pumps:
            thread.join(timeout=5)


def wait(children: list[subprocess.Popen], lock: threading.Lock) -> int:
    """Wait for every process; the exit status of the first to fail, or 0."""
    first_failure: int | None = None
    deadline: float | None = None
    reported: set[int] = set()
    while True:
        try:
            for i, child in enumerate(children):
                code = child.poll()
                if code is None or i in reported:
                    continue
                reported.add(i)
                if code != 0:
                    with lock:
                        print(f"launch: process {i} failed ({status_of(code)})",
                              file=sys.stderr, flush=True)
                    if first_failure is None:
                        first_failure = 128 - code if code < 0 else code
                        deadline = time.monotonic() + GRACE_S
            if len(reported) == len(children):
                return first_failure or 0
            if deadline is not None and time.monotonic() > deadline:
                for i, child in enumerate(children):
                    if child.poll() is None:
                        with lock:
                            print(f"launch: process {i} still running {GRACE_S} s after "
                                  f"another failed; killing it", file=sys.stderr, flush=True)
                        child.kill()
                deadline = None
            time.sleep(0.2)
        except KeyboardInterrupt:
            # Ctrl-C also reached the processes (same process group): each saves a checkpoint
            # and stops; keep waiting for them.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            continue
