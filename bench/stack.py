"""The product's processes for the web benchmarks: a Redis of our own, a SQLite database in a work
directory, daphne (the ASGI app) and a Celery search worker, all pointed at each other.

This process becomes a Django client of the same database (to create users, models and runs, log in and
enqueue), exactly as the web process would. The helpers of ``tests/services.py`` start and stop the
processes; the machine's own Redis (port 6379) is never touched.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path
from typing import Any

from bench.common import ROOT, Context, fresh_dir, log


class Stack:
    """Redis + database + (optionally) daphne and a search worker, in ``work_dir``."""

    def __init__(self, ctx: Context, name: str, threads: int = 2) -> None:
        self.ctx = ctx
        self.dir = fresh_dir(ctx.work_dir / name / "stack")
        self.threads = threads
        self.redis = None
        self.web = None
        self.worker = None
        self.url = ""
        self.env: dict[str, str] = {}

    def check(self) -> list[str]:
        """What is missing for the stack to run (empty when everything is there)."""
        import shutil

        missing = []
        for rel in (
            "webapp/models.py",
            "webapp/asgi.py",
            "workers/tasks.py",
            "workers/celery_app.py",
            "tests/services.py",
        ):
            if not (ROOT / rel).exists():
                missing.append(rel)
        if not shutil.which("redis-server"):
            missing.append("redis-server (apt-get install redis-server)")
        return missing

    def start(self, web: bool = True, worker: bool = True) -> Stack:
        """Start Redis, migrate the database, then daphne and a worker as asked."""
        from tests.services import RedisServer

        self.redis = RedisServer(self.dir / "redis").start()
        dirs = {n: self.dir / n for n in ("runs", "media", "logs", "var")}
        for d in dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        self.env = {
            "DJANGO_SETTINGS_MODULE": "webapp.settings",
            "PYTHONPATH": str(ROOT),
            "DATABASE_URL": f"sqlite:///{self.dir / 'db.sqlite3'}",
            "REDIS_URL": self.redis.url,
            "CELERY_BROKER_URL": self.redis.url,
            "CHANNEL_LAYER": "redis",
            "SECRET_KEY": secrets.token_hex(32),
            "VAR_DIR": str(dirs["var"]),
            "RUNS_ROOT": str(dirs["runs"]),
            "PRIVATE_MEDIA_ROOT": str(dirs["media"]),
            "LOG_DIR": str(dirs["logs"]),
            "COMPRESSION_CACHE_DIR": os.environ.get("COMPRESSION_CACHE_DIR", str(self.dir / "cache")),
            "OMP_NUM_THREADS": str(self.threads),
            "DEBUG": "0",
            "LOG_LEVEL": "WARNING",
        }
        os.environ.update(self.env)
        import django

        django.setup()
        from django.core.management import call_command

        from webapp.models import ensure_builtin_rows

        call_command("migrate", verbosity=0, interactive=False)
        ensure_builtin_rows()
        if web:
            self.start_web()
        if worker:
            self.start_worker()
        return self

    def start_web(self):
        """daphne on a free port; returns the ``ServiceProcess``."""
        from tests.services import ServiceProcess, free_port, port_open, wait_for

        port = free_port()
        cmd = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "webapp.asgi:application"]
        self.web = ServiceProcess(
            "web", cmd, {**os.environ, **self.env}, self.dir / "logs" / "web.log"
        ).start()

        def up() -> bool:
            if not self.web.alive:
                raise RuntimeError(f"daphne exited:\n{self.web.log_text()[-2000:]}")
            return port_open(port)

        wait_for(up, 120, f"daphne on port {port}")
        self.url = f"http://127.0.0.1:{port}"
        log(self.ctx, f"daphne up at {self.url} (pid {self.web.pid})")
        return self.web

    def start_worker(self):
        """A Celery search worker (prefork, concurrency 1), as ``scripts/run.sh`` starts it."""
        from tests.services import ServiceProcess

        cmd = [
            sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-Q", "celery,quick", "-c", "1",
            "-P", "prefork", "-n", "bench@%h", "--without-gossip", "--without-mingle", "-l", "info",
        ]  # fmt: skip
        self.worker = ServiceProcess(
            "worker", cmd, {**os.environ, **self.env}, self.dir / "logs" / "worker.log"
        )
        self.worker.start()
        self.worker.wait_for_log("ready", timeout=180)
        log(self.ctx, f"search worker ready (pid {self.worker.pid})")
        return self.worker

    def user(self, name: str = "bench"):
        """A user (created once)."""
        from django.contrib.auth import get_user_model

        User = get_user_model()
        u = User.objects.filter(username=name).first()
        return u or User.objects.create_user(name, password=None)

    def cookie(self, user) -> str:
        """A session cookie header value for ``user`` (what a signed-in browser sends)."""
        from django.test import Client

        c = Client()
        c.force_login(user)
        return f"sessionid={c.cookies['sessionid'].value}"

    def uploaded_model(self, user, pt2: str, name: str = "bench model"):
        """An ``UploadedModel`` row for a ``.pt2`` file (copied into the private media storage)."""
        from django.core.files.base import ContentFile

        from webapp.models import UploadedModel

        m = UploadedModel.objects.create(owner=user, name=name, kind="pt2", status="ready")
        m.file.save(Path(pt2).name, ContentFile(Path(pt2).read_bytes()))
        return m

    def run_row(self, user, model, config: dict[str, Any], target: str):
        """A ``Run`` row with a search configuration (not queued yet)."""
        from webapp.models import Dataset, Run, Target

        return Run.objects.create(
            owner=user,
            name=config.get("name", "bench run"),
            model=model,
            dataset=Dataset.objects.get(name="digits", owner=None),
            target=Target.objects.get(name=target),
            agent=config["agent"],
            config={k: v for k, v in config.items() if k != "name"},
            episodes_total=config["episodes"],
        )

    def stop(self) -> None:
        """Stop the worker, daphne and Redis (only the processes started here)."""
        import signal

        for proc in (self.worker, self.web):
            if proc is not None:
                proc.stop()
        if self.redis is not None:
            self.redis.stop(signal.SIGKILL)
