"""Faults, with a real Redis, real Celery worker subprocesses and the real search engine:

- a worker SIGKILLed mid-search (whole process group, like a machine losing power) and a new one started:
  the run finishes with every episode recorded exactly once, equal to the engine's episodes.jsonl;
- a worker killed before the first checkpoint: the run fails with a reason, not "running" forever;
- Redis killed and restarted (all its data lost) mid-run: the run completes;
- cancel: the run stops within seconds and the worker takes the next task;
- a second worker receiving the same task (Redis redelivery) does not run it twice;
- a dead device: the run fails with the engine's clear message.

Timings printed (``-s``) are the numbers quoted in docs/operations.md.
"""

from __future__ import annotations

import fcntl
import json
import os
import time

import pytest
from django.contrib.auth import get_user_model

from tests.services import TEST_STALE_S, wait_for
from webapp.models import Dataset, Episode, Run, RunLog, Target, UploadedModel
from workers import dispatch
from workers.tasks import NO_CHECKPOINT_MESSAGE

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

WORKER_QUEUES = "celery,quick"


@pytest.fixture
def owner(services):
    return get_user_model().objects.create_user("faulty", password=None)


def search_run(owner, target: str = "analytic", model: UploadedModel | None = None, **overrides) -> Run:
    """A small real search, by default small_cnn (fresh weights, 3x32x32) on digits: episodes of a few
    tenths of a second, so a test can act mid-search; no fine-tuning."""
    if model is None:
        model = UploadedModel.objects.create(owner=owner, name="small_cnn", kind="zoo", zoo_arch="small_cnn")
    config = {
        "model": "set by the worker",
        "dataset": "digits",
        "agent": "amc",
        "target": target,
        "objective": "macs",
        "budget": 0.5,
        "episodes": 20,
        "seed": 0,
        "val_samples": 50,
        "calib_samples": 32,
        "top_k": 1,
        "fine_tune_epochs": 0,
        "checkpoint_every": 5,
        "export_formats": ["pt2"],
    }
    config.update(overrides)
    return Run.objects.create(
        owner=owner,
        name="fault test",
        model=model,
        dataset=Dataset.objects.get(name="digits", owner=None),
        target=Target.objects.get(name=target),
        agent=config["agent"],
        config=config,
        episodes_total=config["episodes"],
    )


def assert_db_matches_jsonl(run: Run, n: int) -> None:
    """Episodes 1..n each exactly once in the database, and identical to the engine's episodes.jsonl."""
    run.refresh_from_db()
    numbers = list(Episode.objects.filter(run=run).order_by("number").values_list("number", flat=True))
    assert numbers == list(range(1, n + 1))
    lines = (run.out_path / "episodes.jsonl").read_text().splitlines()
    on_disk = [json.loads(line) for line in lines if line.strip()]
    assert [d["episode"] for d in on_disk] == numbers
    for d, e in zip(on_disk, Episode.objects.filter(run=run).order_by("number"), strict=True):
        assert (e.reward, e.accuracy, e.macs, e.cost_ratio, e.policy) == (
            d["reward"],
            d["accuracy"],
            d["macs"],
            d["cost_ratio"],
            d["policy"],
        ), f"episode {e.number} differs from episodes.jsonl"


def wait_run(run: Run, statuses, timeout: float, services) -> float:
    """Wait for a status; returns the seconds it took."""
    t0 = time.monotonic()

    def reached():
        run.refresh_from_db()
        return run.status in statuses

    try:
        wait_for(reached, timeout, f"run {run.pk} to reach {statuses}", 0.2)
    except AssertionError:
        log = "\n".join(RunLog.objects.filter(run=run).values_list("message", flat=True))
        raise AssertionError(
            f"run is {run.status} ({run.error})\nrun log:\n{log}\n{services.log_tail()}"
        ) from None
    return time.monotonic() - t0


def wait_episodes(run: Run, n: int, timeout: float, services) -> None:
    try:
        wait_for(
            lambda: Episode.objects.filter(run=run).count() >= n,
            timeout,
            f"{n} episodes of run {run.pk}",
            0.1,
        )
    except AssertionError:
        run.refresh_from_db()
        raise AssertionError(f"run is {run.status} ({run.error})\n{services.log_tail()}") from None


def test_worker_sigkilled_mid_search_resumes_and_records_each_episode_once(services, owner):
    first = services.start_worker(WORKER_QUEUES, name="first")
    run = search_run(owner, episodes=30, checkpoint_every=5)
    dispatch.enqueue_run(run)
    wait_episodes(run, 12, 240, services)
    first.kill()
    t_kill = time.monotonic()
    run.refresh_from_db()
    seen, checkpoint = run.episodes_done, run.checkpoint_episode
    assert run.status == "running" and checkpoint and checkpoint < 30
    services.start_worker(WORKER_QUEUES, name="second")
    t_started = time.monotonic()
    # resumed: the new worker holds the run and records episodes again
    wait_for(
        lambda: Run.objects.filter(pk=run.pk, attempts=2).exclude(lease="").exists(),
        120,
        "the run to be resumed",
    )
    t_resumed = time.monotonic()
    wait_run(run, ("finished", "failed"), 300, services)
    assert run.status == "finished", run.error
    assert run.attempts == 2
    assert_db_matches_jsonl(run, 30)
    messages = list(RunLog.objects.filter(run=run).values_list("message", flat=True))
    assert any(m.startswith("resuming on second@") for m in messages), messages
    assert any(f"resumed from the checkpoint at episode {checkpoint}" in m for m in messages), messages
    print(
        f"\nSIGKILL after episode {seen} (checkpoint {checkpoint}): new worker up in {t_started - t_kill:.1f} s, "
        f"run taken over {t_resumed - t_kill:.1f} s after the kill"
    )


def test_worker_killed_before_the_first_checkpoint_fails_the_run_with_a_reason(services, owner):
    first = services.start_worker(WORKER_QUEUES, name="first")
    run = search_run(owner, episodes=400, checkpoint_every=1000)
    dispatch.enqueue_run(run)
    wait_episodes(run, 3, 240, services)
    first.kill()
    t_kill = time.monotonic()
    services.start_worker(WORKER_QUEUES, name="second")
    took = wait_run(run, ("failed", "finished"), 60, services)
    assert run.status == "failed" and run.error == NO_CHECKPOINT_MESSAGE
    assert not (run.out_path / "checkpoint.pt").exists()
    print(
        f"\nrun without checkpoint marked failed {time.monotonic() - t_kill:.1f} s after the kill ({took:.1f})"
    )


def test_reaper_alone_fails_an_orphaned_run(services, owner):
    """No worker comes back: the reaper (manage.py reap_runs) still tells the user what happened."""
    from django.core.management import call_command

    first = services.start_worker(WORKER_QUEUES, name="first")
    run = search_run(owner, episodes=400, checkpoint_every=1000)
    dispatch.enqueue_run(run)
    wait_episodes(run, 2, 240, services)
    first.kill()
    time.sleep(TEST_STALE_S + 0.5)
    call_command("reap_runs")
    run.refresh_from_db()
    assert run.status == "failed" and run.error == NO_CHECKPOINT_MESSAGE


def test_redis_restarted_mid_run_the_run_completes(services, owner):
    """Redis killed (its data lost) and started again while a search runs: the run goes on and completes.

    The run is long enough (300 episodes of a few tenths of a second) that it is still running when Redis
    is back, which the test checks instead of assuming it (an earlier version with 20 episodes could finish
    during the outage on a quiet machine, and then proved nothing).
    """
    episodes = 300
    services.start_worker(WORKER_QUEUES, name="w")
    run = search_run(owner, episodes=episodes, checkpoint_every=25)
    dispatch.enqueue_run(run)
    wait_episodes(run, 4, 240, services)
    at_kill = Episode.objects.filter(run=run).count()
    services.redis.restart(down_s=3)
    run.refresh_from_db()
    at_return = Episode.objects.filter(run=run).count()
    assert run.status == "running" and at_return < episodes, (
        f"the run was not running any more when Redis came back ({run.status}, {at_return} episodes)"
    )
    wait_run(run, ("finished", "failed", "cancelled"), 600, services)
    assert run.status == "finished", run.error
    assert Episode.objects.filter(run=run).count() > at_return >= at_kill  # episodes kept coming after it
    assert_db_matches_jsonl(run, episodes)
    # the worker is still connected to the new Redis: it takes the next task
    model = UploadedModel.objects.create(owner=owner, name="next", kind="zoo", zoo_arch="small_cnn")
    dispatch.enqueue_inspect(model)
    wait_for(
        lambda: UploadedModel.objects.get(pk=model.pk).status == "ready", 120, "the next task after a restart"
    )


def test_cancel_stops_within_seconds_and_frees_the_worker(services, owner):
    services.start_worker(WORKER_QUEUES, name="w")
    run = search_run(owner, episodes=2000, checkpoint_every=10)
    dispatch.enqueue_run(run)
    wait_episodes(run, 3, 240, services)
    t0 = time.monotonic()
    dispatch.request_cancel(run)
    took = wait_run(run, ("cancelled", "failed", "finished"), 60, services)
    assert run.status == "cancelled", run.error
    assert took < 10, f"cancel took {took:.1f} s"
    assert run.episodes_done < 2000 and (run.out_path / "checkpoint.pt").exists()
    model = UploadedModel.objects.create(owner=owner, name="next", kind="zoo", zoo_arch="small_cnn")
    dispatch.enqueue_inspect(model)
    wait_for(lambda: UploadedModel.objects.get(pk=model.pk).status == "ready", 120, "the next task")
    freed = time.monotonic() - t0
    print(f"\ncancel: run cancelled {took:.2f} s after the request; next task done {freed:.1f} s after it")
    # resume continues from the checkpoint
    before = run.episodes_done
    Run.objects.filter(pk=run.pk).update(config={**run.config})
    dispatch.resume_run(run)
    wait_for(
        lambda: (
            Episode.objects.filter(run=run, number__gt=before).exists() or Run.objects.get(pk=run.pk).error
        ),
        120,
        "the resumed run to record new episodes",
    )
    dispatch.request_cancel(run)
    wait_run(run, ("cancelled",), 60, services)
    assert any(
        "resumed from the checkpoint" in m
        for m in RunLog.objects.filter(run=run).values_list("message", flat=True)
    )


def test_redelivered_task_is_not_executed_twice(services, owner):
    """With a 5 s visibility timeout Redis hands the running task to the second worker too; the run's
    lease makes that copy wait, see the first worker alive, and return."""
    services.start_worker(WORKER_QUEUES, name="first")
    run = search_run(owner, episodes=40, checkpoint_every=10)
    dispatch.enqueue_run(run)
    wait_episodes(run, 1, 240, services)
    second = services.start_worker(WORKER_QUEUES, name="second")
    wait_run(run, ("finished", "failed"), 400, services)
    assert run.status == "finished", run.error
    assert run.attempts == 1
    assert_db_matches_jsonl(run, 40)
    starts = RunLog.objects.filter(run=run, message__startswith="starting on").count()
    resumes = RunLog.objects.filter(run=run, message__startswith="resuming on").count()
    assert (starts, resumes) == (1, 0)
    # the copy answers once its lease wait ends: "being executed by first@..." while the first still held the run,
    # or "already finished" when the run ended during the wait (a fast machine); either way it ran nothing
    wait_for(
        lambda: (
            f"run {run.pk} is being executed by first@" in second.log_text()
            or f"run {run.pk} is already finished" in second.log_text()
        ),
        120,
        "the redelivered copy's answer",
    )


def test_dead_local_device_fails_the_run_with_a_clear_message(services, owner, monkeypatch):
    """A local device whose lock never frees (a hung measurement) and a 2 s wait: TargetError on the run."""
    lock_dir = services.env["COMPRESSION_LOCK_DIR"]
    Target.objects.create(
        owner=owner,
        name="stuck-cpu",
        backend="torch",
        settings={"threads": 1, "lock": "stuck-cpu", "wait_s": 2},
    )
    from compression.targets.measure import lock_path

    monkeypatch.setenv("COMPRESSION_LOCK_DIR", lock_dir)
    fd = os.open(lock_path("stuck-cpu"), os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        services.start_worker(WORKER_QUEUES, name="w")
        run = search_run(owner, target="stuck-cpu", objective="latency", episodes=4)
        dispatch.enqueue_run(run)
        wait_run(run, ("failed", "finished"), 240, services)
    finally:
        os.close(fd)
    assert run.status == "failed"
    assert "stuck-cpu" in run.error and "busy" in run.error and "Traceback" not in run.error
    print(f"\ndead local device: {run.error}")


def test_unreachable_rpc_tracker_fails_the_run_with_a_clear_message(services, owner):
    """A remote TVM device whose tracker port has nothing listening."""
    pytest.importorskip("compression.targets.tvm_backend")
    from tests.services import free_port

    Target.objects.create(
        owner=owner,
        name="gone-rpi",
        backend="tvm",
        settings={
            "target": {"kind": "llvm"},
            "rpc": {"host": "127.0.0.1", "port": free_port(), "key": "rpi4", "timeout_s": 3},
        },
    )
    services.start_worker(WORKER_QUEUES, name="w")
    run = search_run(owner, target="gone-rpi", objective="latency", episodes=4)
    dispatch.enqueue_run(run)
    wait_run(run, ("failed", "finished"), 240, services)
    assert run.status == "failed" and "Traceback" not in run.error
    assert "127.0.0.1" in run.error or "tracker" in run.error.lower(), run.error
    print(f"\nunreachable tracker: {run.error}")
