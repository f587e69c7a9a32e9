"""PostgreSQL through DATABASE_URL: the model, consumer and worker tests' essentials run again, in a child
pytest, against a throwaway PostgreSQL database this test creates and drops.

Needs a PostgreSQL server at $POSTGRES_TEST_URL (default ``postgres://postgres@127.0.0.1:5432/postgres``,
a user allowed to create databases); skipped with the reason when none answers.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pytest

ROOT = Path(__file__).resolve().parent.parent
ADMIN_URL = os.environ.get("POSTGRES_TEST_URL", "postgres://postgres@127.0.0.1:5432/postgres")

# The essentials: every model test, the worker glue (in-process), the consumer tests (with a live daphne), and
# one real worker run (lease, heartbeat, episodes, cancel, resume from the checkpoint) on PostgreSQL.
CHILD_TESTS = [
    "tests/test_models.py",
    "tests/test_consumers.py",
    "tests/test_workers.py",
    "tests/test_faults.py::test_cancel_stops_within_seconds_and_frees_the_worker",
]


def _server_answers(url: str) -> bool:
    u = urlparse(url)
    try:
        with socket.create_connection((u.hostname or "127.0.0.1", u.port or 5432), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture
def throwaway_database():
    if not _server_answers(ADMIN_URL):
        pytest.skip(f"no PostgreSQL server answers at {ADMIN_URL} (set POSTGRES_TEST_URL to test PostgreSQL)")
    import psycopg

    name = f"studio_pgtest_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    try:
        admin = psycopg.connect(ADMIN_URL, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL at {ADMIN_URL} refused the connection: {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            u = urlparse(ADMIN_URL)
            yield u._replace(path=f"/{name}").geturl(), name
        finally:
            for db in (f"{name}_test", name):
                admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


@pytest.mark.services
def test_essentials_on_postgresql(throwaway_database):
    url, name = throwaway_database
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "TEST_DATABASE_NAME": f"{name}_test",
        "DJANGO_SETTINGS_MODULE": "webapp.settings",
        "EXPECT_DATABASE_VENDOR": "postgresql",
    }
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow and not browser"]
    # the real-worker tests of test_workers.py add a minute and nothing database-specific beyond the fault test
    cmd += ["-k", "not sqlite_is_configured and not through_a_worker and not through_the_worker"]
    if "conftest_services" not in (ROOT / "tests" / "conftest.py").read_text():
        cmd += ["-p", "tests.conftest_services"]
    proc = subprocess.run(cmd + CHILD_TESTS, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"tests on PostgreSQL failed:\n{tail}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.split("\n")[-2], tail
    print("\n" + proc.stdout.strip().splitlines()[-1])
