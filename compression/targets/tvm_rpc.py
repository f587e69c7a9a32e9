"""Remote TVM devices through an RPC tracker, with deadlines that hold.

The tracker (``python -m tvm.exec.rpc_tracker``) queues requests per device key; each device runs
``python -m tvm.exec.rpc_server --tracker=HOST:PORT --key KEY``. That queue is what serialises
measurements on a device: a request waits until the device is free.

TVM's own client (``tvm.rpc.connect_tracker(...).request(key)``) waits for ever when no device under the
key is free or registered, retries a down tracker for 60 s, and cannot be interrupted from Python. So the
tracker protocol (a length-prefixed JSON exchange, see ``tvm.rpc.base``) is spoken here over a socket
with timeouts, and the remote session itself runs on a helper thread joined with the remaining deadline.
Every way of not answering (tracker down, not a tracker, no server under the key, all devices busy, a
device killed mid-session, a device that stops answering) ends in a ``TargetError`` within the timeout.
A session that overran is abandoned: its server drops it when the ``session_timeout`` given at connect
time passes (the server kills the session process), so the device returns to the queue by itself.
"""

from __future__ import annotations

import gc
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from compression.errors import TargetError

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 60.0
_CONNECT_TIMEOUT_S = 5.0


def _addr(host: str, port: int) -> str:
    return f"{host}:{port}"


def _open_tracker(host: str, port: int, timeout_s: float) -> socket.socket:
    """A socket to the tracker after the magic handshake; TargetError when it is not reachable."""
    from tvm.rpc import base

    try:
        sock = socket.create_connection((host, port), timeout=min(timeout_s, _CONNECT_TIMEOUT_S))
    except OSError as exc:
        raise TargetError(
            f"the TVM RPC tracker at {_addr(host, port)} is not reachable ({exc.strerror or exc})",
            "start it (python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port PORT) or fix the target's rpc host/port",
        ) from exc
    try:
        sock.settimeout(min(timeout_s, _CONNECT_TIMEOUT_S))
        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        magic = struct.unpack("<i", _recv_exact(sock, 4))[0]
    except (OSError, ConnectionError) as exc:
        sock.close()
        raise TargetError(
            f"{_addr(host, port)} did not answer as a TVM RPC tracker ({exc})",
            "check that rpc host/port point at python -m tvm.exec.rpc_tracker, not at a device's rpc_server",
        ) from exc
    if magic != base.RPC_TRACKER_MAGIC:
        sock.close()
        raise TargetError(
            f"{_addr(host, port)} is not a TVM RPC tracker (wrong handshake)",
            "point rpc host/port at python -m tvm.exec.rpc_tracker",
        )
    return sock


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise ConnectionError("connection closed by the tracker")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _exchange(sock: socket.socket, message: list[Any]) -> Any:
    from tvm.rpc import base

    base.sendjson(sock, message)
    size = struct.unpack("<i", _recv_exact(sock, 4))[0]
    import json

    return json.loads(_recv_exact(sock, size).decode("utf-8"))


def tracker_summary(host: str, port: int, timeout_s: float = 10.0) -> dict[str, Any]:
    """The tracker's queue per key (``{"queue_info": {key: {"free", "pending"}}, "server_info": [...]}``)."""
    from tvm.rpc import base

    sock = _open_tracker(host, port, timeout_s)
    try:
        sock.settimeout(timeout_s)
        value = _exchange(sock, [base.TrackerCode.SUMMARY])
    except (OSError, ConnectionError, ValueError) as exc:
        raise TargetError(
            f"the TVM RPC tracker at {_addr(host, port)} did not return its summary ({exc})"
        ) from exc
    finally:
        sock.close()
    if not (isinstance(value, list) and value and value[0] == base.TrackerCode.SUCCESS):
        raise TargetError(
            f"the TVM RPC tracker at {_addr(host, port)} refused the summary request: {value!r}"
        )
    return value[1]


def servers_for_key(summary: dict[str, Any], key: str) -> int:
    """How many device servers are registered under ``key`` in a tracker summary."""
    n = 0
    for info in summary.get("server_info", []):
        # servers register as "server:<key>" (plus a random suffix in some versions)
        parts = str(info.get("key", "")).split(":")
        if len(parts) >= 2 and parts[0] == "server" and parts[1] == key:
            n += 1
    return n


def _describe_queue(host: str, port: int, key: str) -> str:
    try:
        summary = tracker_summary(host, port, timeout_s=3.0)
    except TargetError:
        return "the tracker did not answer a summary request either"
    n = servers_for_key(summary, key)
    if n == 0:
        return f"no device server is registered under key {key!r}"
    q = summary.get("queue_info", {}).get(key, {})
    return f"{n} device(s) registered under {key!r}, free={q.get('free', '?')}, pending requests={q.get('pending', '?')}"


def request_device(
    host: str,
    port: int,
    key: str,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    priority: int = 1,
    session_timeout_s: float | None = None,
) -> Any:
    """Ask the tracker for a device under ``key`` and connect to it; an ``RPCSession``.

    Waits at most ``timeout_s`` for the tracker to hand out a device (the tracker queues the request
    while every device under the key is busy). ``session_timeout_s`` is passed to the device server, which
    ends the session after that long (0 or None: no limit).
    """
    from tvm import rpc
    from tvm.rpc import base

    deadline = time.monotonic() + timeout_s
    sock = _open_tracker(host, port, timeout_s)
    try:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        value = _exchange(sock, [base.TrackerCode.REQUEST, key, "", int(priority)])
    except TimeoutError:
        raise TargetError(
            f"no device under key {key!r} became free at tracker {_addr(host, port)} within {timeout_s:g} s "
            f"({_describe_queue(host, port, key)})",
            f"start python -m tvm.exec.rpc_server --tracker={_addr(host, port)} --key {key} on the device, "
            "or raise rpc timeout_s if the device is busy with other measurements",
        ) from None
    except (OSError, ConnectionError, ValueError) as exc:
        raise TargetError(
            f"the TVM RPC tracker at {_addr(host, port)} dropped the request for {key!r} ({exc})"
        ) from exc
    finally:
        # closing the socket withdraws a request still queued at the tracker
        sock.close()
    if not (isinstance(value, list) and len(value) == 2 and value[0] == base.TrackerCode.SUCCESS):
        raise TargetError(
            f"the TVM RPC tracker at {_addr(host, port)} refused the request for {key!r}: {value!r}"
        )
    url, dev_port, matchkey = value[1]

    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TargetError(
            f"the tracker handed out a device for {key!r} only after the {timeout_s:g} s timeout"
        )

    def connect() -> Any:
        return rpc.connect(url, int(dev_port), matchkey, session_timeout=session_timeout_s or 0)

    try:
        return call_with_deadline(connect, remaining, f"connecting to device {key!r} at {url}:{dev_port}")
    except TargetError:
        raise
    except Exception as exc:  # TVM raises its own error types for refused/broken RPC connections
        raise TargetError(
            f"the device under key {key!r} at {url}:{dev_port} did not accept the session "
            f"({type(exc).__name__}: {_first_line(exc)})",
            "the device server may have died after registering; restart its rpc_server",
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # TVM errors put the useful line last (after a traceback); keep it short either way
    return (lines[-1] if lines else type(exc).__name__)[:300]


def call_with_deadline(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """Run ``fn`` on a helper thread; its result, its exception, or a ``TargetError`` after ``timeout_s``.

    A call that overruns is abandoned (Python cannot interrupt a blocked socket call in TVM's C++ RPC);
    it ends when its session times out on the device side.
    """
    box: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc
        finally:
            done.set()

    t = threading.Thread(target=target, name="compression-tvm-rpc", daemon=True)
    t.start()
    if not done.wait(max(0.0, timeout_s)):
        raise TargetError(
            f"{what} did not finish within {timeout_s:g} s",
            "the device is too slow for this model or stopped answering; raise rpc timeout_s or check the device",
        )
    if "error" in box:
        raise box["error"]
    return box["value"]


def run_on_device(
    rpc_settings: dict[str, Any],
    fn: Callable[[Any], T],
    *,
    timeout_s: float | None = None,
    what: str = "remote measurement",
) -> T:
    """Request a device from the tracker and run ``fn(session)`` on it, all within ``timeout_s``.

    ``timeout_s`` defaults to the target's ``rpc.timeout_s``. Errors of the remote work become
    ``TargetError``s that name the device.
    """
    host, port, key = str(rpc_settings["host"]), int(rpc_settings["port"]), str(rpc_settings["key"])
    timeout = float(timeout_s if timeout_s is not None else rpc_settings.get("timeout_s", DEFAULT_TIMEOUT_S))
    session_timeout = float(rpc_settings.get("session_timeout_s", timeout + 30.0))
    deadline = time.monotonic() + timeout
    session = request_device(
        host,
        port,
        key,
        timeout_s=timeout,
        priority=int(rpc_settings.get("priority", 1)),
        session_timeout_s=session_timeout,
    )
    remaining = deadline - time.monotonic()
    # the device stays reserved until the last reference to its session is gone: hold it in one place,
    # drop it when done and collect, so the next request for the key finds the device free at once
    holder = [session]
    del session
    try:
        return call_with_deadline(lambda: fn(holder[0]), remaining, f"{what} on device {key!r}")
    except TargetError:
        raise
    except Exception as exc:
        raise TargetError(
            f"{what} on device {key!r} failed: {type(exc).__name__}: {_first_line(exc)}",
            "the device server may have died or cannot load the library (wrong cross-compile target or cc?)",
        ) from exc
    finally:
        holder.clear()
        gc.collect()
