"""The README's two commands in a fresh clone (slow: a new virtualenv and the pinned requirements).

Run with ``scripts/test.sh --slow``. The product command is started on a free port with its own Redis on
another free port, so nothing of the machine's is touched; the test waits for the URL it prints, logs in
with the first user it created, and stops it with Ctrl-C (SIGINT), checking every child went away.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    dest = tmp_path_factory.mktemp("fresh") / "repo"
    subprocess.run(["git", "clone", "-q", ROOT, str(dest)], check=True, timeout=300)
    return dest


def test_run_command_starts_the_product(clone):
    port, redis_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO", "PYTEST", "DATABASE", "REDIS"))}
    env.update(PORT=str(port), REDIS_URL=f"redis://127.0.0.1:{redis_port}/0")
    proc = subprocess.Popen(
        ["bash", "scripts/run.sh"],
        cwd=clone,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    out = []
    try:
        deadline = time.time() + 1800  # the first run installs the requirements
        url = None
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            out.append(line)
            m = re.search(r"running:\s+(http://\S+)", line)
            if m:
                url = m.group(1)
                break
        assert url == f"http://127.0.0.1:{port}/", "".join(out[-40:])
        with urllib.request.urlopen(url + "accounts/login/", timeout=30) as r:
            assert r.status == 200 and b"password" in r.read().lower()
        assert (clone / "var" / "first_user.txt").exists()
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        subprocess.run(
            ["redis-cli", "-p", str(redis_port), "shutdown", "nosave"], capture_output=True, timeout=30
        )
    # nothing of it keeps running
    left = subprocess.run(["pgrep", "-f", f"-p {port} webapp.asgi"], capture_output=True, text=True)
    assert left.stdout.strip() == ""


def test_test_command_runs_the_suite(clone):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO", "PYTEST"))}
    res = subprocess.run(
        ["bash", "scripts/test.sh", "tests/test_engine.py", "-q", "-k", "policy"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert re.search(r"\d+ passed", res.stdout)
