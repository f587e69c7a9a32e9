"""A TVM RPC tracker and device servers on loopback: this CPU, reached the way a board on the network is.

``LoopbackFarm`` starts ``python -m tvm.exec.rpc_tracker`` on a free port and, per ``add_server(key)``, one
``python -m tvm.exec.rpc_server`` registered under that key, and waits until the tracker lists it. Every
process runs in a session (process group) of its own: ``rpc_server`` serves each client from a child
process, and signalling the group is what stops a device, or kills it outright (``kill``, used to test a
device dying mid-measurement). ``close`` stops every group and reaps it.

It is what the RPC tests and the RPC throughput benchmark run against, and a way to try an RPC target
without a board::

    with LoopbackFarm(Path("var/rpc")) as farm:
        farm.add_server("my-cpu")
        spec = farm.spec("try-rpc", "my-cpu")   # a TargetSpec measuring through the tracker
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from compression.errors import TargetError
from compression.targets.base import TargetSpec
from compression.targets.tvm_rpc import servers_for_key, tracker_summary

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on loopback that nothing listens on (at the time of asking)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def kill(proc: subprocess.Popen) -> None:
    """Kill a farm process and its children at once (SIGKILL to its group): a device dying, not stopping."""
    _signal_group(proc, signal.SIGKILL)


def stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop a farm process: SIGTERM to its group, SIGKILL after ``grace_s``; then reap it."""
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        pass
    # the group's children (the server's session process) may outlive the leader
    _signal_group(proc, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait(grace_s)


def wait_for_server(port: int, key: str, present: bool = True, timeout_s: float = 90.0) -> None:
    """Wait until a device under ``key`` is registered at the tracker on loopback ``port`` (or, with
    ``present=False``, until none is); ``TargetError`` after ``timeout_s``."""
    end = time.monotonic() + timeout_s
    while True:
        try:
            if (servers_for_key(tracker_summary(HOST, port, 2.0), key) > 0) == present:
                return
        except TargetError:
            pass
        if time.monotonic() > end:
            state = "never registered" if present else "never left"
            raise TargetError(
                f"device {key!r} {state} at the tracker on {HOST}:{port} within {timeout_s:.0f} s"
            )
        time.sleep(0.3)


class LoopbackFarm:
    """A tracker on a free loopback port (started at construction) and the device servers added to it.

    Logs go to ``log_dir/tracker.log`` and ``log_dir/server-<key>.log``."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.procs: list[subprocess.Popen] = []
        self.tracker = self._spawn(
            [
                "tvm.exec.rpc_tracker",
                "--host",
                HOST,
                "--port",
                str(self.port),
                "--port-end",
                str(self.port + 1),
            ],
            "tracker.log",
        )

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log_dir / log_name, "wb") as f:
            proc = subprocess.Popen(
                [sys.executable, "-m", *args],
                stdout=f,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def add_server(self, key: str, timeout_s: float = 90.0) -> subprocess.Popen:
        """Start a device server under ``key`` and wait until the tracker lists it (``TargetError`` naming
        its log if it does not within ``timeout_s``)."""
        port = free_port()
        proc = self._spawn(
            [
                "tvm.exec.rpc_server",
                "--host",
                HOST,
                "--port",
                str(port),
                "--port-end",
                str(port + 20),
                f"--tracker={HOST}:{self.port}",
                "--key",
                key,
            ],
            f"server-{key}.log",
        )
        try:
            wait_for_server(self.port, key, present=True, timeout_s=timeout_s)
        except TargetError as exc:
            raise TargetError(f"{exc} (see {self.log_dir / f'server-{key}.log'})") from None
        return proc

    def rpc(self, key: str, timeout_s: float = 60.0) -> dict[str, Any]:
        """The ``rpc`` block of a target spec that measures on the device under ``key``."""
        return {"host": HOST, "port": self.port, "key": key, "timeout_s": timeout_s}

    def spec(self, name: str, key: str, timeout_s: float = 60.0, **options: Any) -> TargetSpec:
        """A TVM target spec measuring on the device under ``key`` (``options`` go beside the ``rpc`` block)."""
        return TargetSpec(name, "tvm", {**options, "rpc": self.rpc(key, timeout_s)})

    def close(self) -> None:
        """Stop every process, servers before the tracker."""
        for proc in reversed(self.procs):
            stop(proc)
        self.procs.clear()

    def __enter__(self) -> LoopbackFarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
