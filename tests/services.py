"""Real services for tests: a Redis server on a free port, Celery worker subprocesses and a daphne server,
all pointed at the test database (a file, so other processes see it) and at per-test directories.

The machine's Redis (6379) is never touched: every test that needs Redis gets its own ``redis-server``.
Use from a test (the fixtures are registered by ``tests/conftest_services.py``)::

    @pytest.mark.services
    def test_x(services, celery_worker):   # services: Redis + settings pointed at it; a worker running
        ...

``services.start_worker()`` starts more workers, ``services.redis.restart()`` restarts Redis on the same
port, ``worker.kill()`` SIGKILLs a worker's whole process group (main process and pool children), like a
machine losing power. ``live_server_url`` / ``live_stack`` start daphne for browser and websocket tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Timings used by the fault tests: heartbeats every 0.5 s, a worker silent for 3 s is presumed dead, and
# Redis hands an unacknowledged task to another worker after 5 s.
TEST_HEARTBEAT_S = 0.5
TEST_STALE_S = 3.0
TEST_VISIBILITY_TIMEOUT_S = 5


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts connections on the port."""
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex((host, port)) == 0


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.1):
    """Poll until ``predicate()`` is truthy; fail the test with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class RedisServer:
    """A ``redis-server`` of our own on a free port, without persistence (like a Redis that restarts)."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def ping(self) -> bool:
        """True when the server answers PING."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def start(self) -> RedisServer:
        """Start (or start again on the same port) and wait until it answers."""
        exe = shutil.which("redis-server")
        if not exe:
            raise AssertionError(
                "redis-server is not installed; scripts/test.sh installs it (apt-get install redis-server)"
            )
        log = open(self.workdir / "redis.log", "ab")
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--daemonize",
                "no",
            ],  # fmt: skip
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        wait_for(self.ping, 10, f"redis-server on port {self.port}", 0.05)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server (SIGKILL with ``sig=signal.SIGKILL``)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self, down_s: float = 0.0) -> None:
        """Kill it (all data lost, as after a crash without persistence), wait ``down_s``, start it again."""
        self.stop(signal.SIGKILL)
        time.sleep(down_s)
        self.start()


class ServiceProcess:
    """A subprocess in its own process group with its output in a log file."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.cmd = cmd
        self.env = env
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None

    def start(self) -> ServiceProcess:
        """Start the process (output appended to its log)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        """The main process id."""
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        """Whether the main process still runs."""
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        """Everything the process wrote so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, text: str, timeout: float = 60.0) -> None:
        """Wait until ``text`` appears in the output (fails early if the process dies)."""

        def seen() -> bool:
            if text in self.log_text():
                return True
            if not self.alive:
                raise AssertionError(f"{self.name} exited before '{text}':\n{self.log_text()[-3000:]}")
            return False

        wait_for(seen, timeout, f"'{text}' from {self.name}")

    def kill(self) -> None:
        """SIGKILL the whole process group (the main process and its pool children)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            self._reap_group()
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self._reap_group()

    def _reap_group(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


def database_url() -> str:
    """The URL of the database the test process uses right now (the test database)."""
    from django.db import connection

    d = connection.settings_dict
    engine = d["ENGINE"]
    if engine.endswith("sqlite3"):
        name = str(d["NAME"])
        if name == ":memory:" or name.startswith("file:"):
            raise AssertionError(
                "the test database is in memory, invisible to worker processes; settings.py gives SQLite "
                "a file test database: do not override DATABASES['default']['TEST']['NAME']"
            )
        return f"sqlite:///{name}"
    if "postgresql" in engine:
        user = d.get("USER") or ""
        password = f":{d['PASSWORD']}" if d.get("PASSWORD") else ""
        auth = f"{user}{password}@" if user else ""
        host = d.get("HOST") or "127.0.0.1"
        port = f":{d['PORT']}" if d.get("PORT") else ""
        return f"postgres://{auth}{host}{port}/{d['NAME']}"
    raise AssertionError(f"no URL form for database engine {engine}")


@dataclass
class Services:
    """Redis, the directories and the environment that worker and web subprocesses share with the test."""

    redis: RedisServer
    workdir: Path
    env: dict[str, str]
    processes: list[ServiceProcess] = field(default_factory=list)

    def start_worker(
        self, queues: str = "celery,quick", name: str | None = None, wait: bool = True, **env: str
    ) -> ServiceProcess:
        """A Celery worker subprocess (prefork, concurrency 1) on the test database and this Redis."""
        n = len(self.processes)
        name = name or f"w{n}"
        cmd = [
            sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-Q", queues, "-c", "1",
            "-P", "prefork", "-n", f"{name}@%h", "--without-gossip", "--without-mingle", "--without-heartbeat",
            "-l", "info",
        ]  # fmt: skip
        proc = ServiceProcess(name, cmd, {**self.env, **env}, self.workdir / "logs" / f"{name}.log").start()
        self.processes.append(proc)
        if wait:
            proc.wait_for_log(" ready.", timeout=90)
        return proc

    def start_web(self, port: int | None = None) -> tuple[ServiceProcess, str]:
        """A daphne server (the product's ASGI app) on a free port; returns it and its base URL."""
        port = port or free_port()
        cmd = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "webapp.asgi:application"]
        proc = ServiceProcess(
            f"web{port}", cmd, dict(self.env), self.workdir / "logs" / f"web{port}.log"
        ).start()
        self.processes.append(proc)

        def up() -> bool:
            if not proc.alive:
                raise AssertionError(f"daphne exited:\n{proc.log_text()[-3000:]}")
            return port_open(port)

        wait_for(up, 60, f"daphne on port {port}")
        return proc, f"http://127.0.0.1:{port}"

    def stop_all(self) -> None:
        """Stop every process started here (workers first, so nothing writes while the database is reset)."""
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()

    def log_tail(self, chars: int = 4000) -> str:
        """The end of every process's log (for assertion messages)."""
        return "\n".join(f"--- {p.name} ---\n{p.log_text()[-chars:]}" for p in self.processes)


def make_services(tmp: Path, settings) -> Services:
    """Start a Redis and point this test process's settings (channel layer, Celery broker, directories,
    heartbeat timings) and the environment of future subprocesses at it. ``settings`` is pytest-django's
    fixture (changes are undone after the test)."""
    from workers.celery_app import use_broker

    redis = RedisServer(tmp / "redis").start()
    dirs = {name: tmp / name for name in ("runs", "media", "logs", "var", "locks", "cache")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    settings.REDIS_URL = redis.url
    settings.CELERY_BROKER_URL = redis.url
    settings.CHANNEL_LAYERS = {
        "default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [redis.url]}}
    }
    settings.RUNS_ROOT = dirs["runs"]
    settings.PRIVATE_MEDIA_ROOT = dirs["media"]
    settings.LOG_DIR = dirs["logs"]
    settings.RUN_HEARTBEAT_S = TEST_HEARTBEAT_S
    settings.RUN_STALE_S = TEST_STALE_S
    # The Celery app read its configuration when first used: point it at this Redis.
    use_broker(redis.url, {"visibility_timeout": TEST_VISIBILITY_TIMEOUT_S})
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "webapp.settings",
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": database_url(),
        "REDIS_URL": redis.url,
        "CELERY_BROKER_URL": redis.url,
        "CHANNEL_LAYER": "redis",
        "SECRET_KEY": settings.SECRET_KEY,
        "VAR_DIR": str(dirs["var"]),
        "RUNS_ROOT": str(dirs["runs"]),
        "PRIVATE_MEDIA_ROOT": str(dirs["media"]),
        "LOG_DIR": str(dirs["logs"]),
        "RUN_HEARTBEAT_S": str(TEST_HEARTBEAT_S),
        "RUN_STALE_S": str(TEST_STALE_S),
        "CELERY_VISIBILITY_TIMEOUT_S": str(TEST_VISIBILITY_TIMEOUT_S),
        "CELERY_UNACKED_RESTORE_INTERVAL_S": "1",
        "CELERY_UNACKED_RESTORE_THROTTLE": "1",
        "COMPRESSION_LOCK_DIR": str(dirs["locks"]),
        "COMPRESSION_CACHE_DIR": str(dirs["cache"]),
        "OMP_NUM_THREADS": "1",
        "DEBUG": "0",
    }
    return Services(redis=redis, workdir=tmp, env=env)


def close_services(services: Services) -> None:
    """Stop the processes and Redis, and drop the Celery app's connections to it."""
    from django.conf import settings

    from workers.celery_app import use_broker

    services.stop_all()
    services.redis.stop(signal.SIGKILL)
    use_broker(settings.CELERY_BROKER_URL)
