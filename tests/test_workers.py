"""The Celery tasks: the glue around the engine (with a stand-in search, in this process), then the real
thing through a real Celery worker subprocess and Redis: inspect, train, benchmark, health check and an
end-to-end search."""

from __future__ import annotations

import csv
import json
import threading
import time
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.core.files.base import ContentFile
from django.utils import timezone

from tests.services import wait_for
from webapp.models import Benchmark, Dataset, Episode, Run, RunArtifact, RunLog, Target, UploadedModel
from workers import dispatch, lease, tasks

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def owner(request, db, settings, tmp_path):
    from webapp.models import ensure_builtin_rows

    ensure_builtin_rows()
    if "services" not in request.fixturenames:  # in-process glue tests: own directories, quick lease timings
        settings.RUNS_ROOT = tmp_path / "runs"
        settings.PRIVATE_MEDIA_ROOT = tmp_path / "media"
        settings.RUN_HEARTBEAT_S = 0.2
        settings.RUN_STALE_S = 1.0
    return get_user_model().objects.create_user("alice", password=None)


def make_run(owner, model: UploadedModel | None = None, target: str = "analytic", **config) -> Run:
    model = model or UploadedModel.objects.create(owner=owner, name="m", kind="zoo", zoo_arch="small_cnn")
    cfg = {"model": "ignored", "agent": "amc", "objective": "macs", "episodes": 6, "checkpoint_every": 2}
    cfg.update(config)
    return Run.objects.create(
        owner=owner,
        name="test run",
        model=model,
        dataset=Dataset.objects.get(name="digits", owner=None),
        target=Target.objects.get(name=target),
        agent=cfg["agent"],
        config=cfg,
        episodes_total=cfg["episodes"],
    )


def result(number: int, reward: float) -> dict:
    return {
        "episode": number,
        "reward": reward,
        "accuracy": 0.5 + reward / 10,
        "latency_ms": None,
        "macs": 1000 - number,
        "bops": 64000,
        "params": 100,
        "bytes": 400.0,
        "cost_ratio": 0.5,
        "meets_budget": True,
        "policy": {"layers": {"conv1": {"keep_ratio": 0.5, "w_bits": 8}}},
        "raw_actions": [[0.2]],
        "enforced_actions": [[0.2]],
        "wall_time_s": 0.01,
        "timings": {},
        "is_best": False,
        "stage": "search",
    }


class FakeEngine:
    """Stands in for compression.search.loop.run_search in the glue tests: calls the hooks in the same
    order, writes the same files, checkpoints, honours should_stop, and can replay or fail."""

    def __init__(
        self, rewards=(0.1, 0.3, 0.2, 0.5, 0.4, 0.45), fail_with=None, replay_from=None, delay=0.0, chosen=4
    ):
        self.rewards = rewards
        self.chosen = chosen  # the episode the finalize step exports
        self.fail_with = fail_with
        self.replay_from = replay_from
        self.delay = delay
        self.calls = []

    def __call__(self, config, out_dir, callbacks, resume=True):
        from compression.search.results import EpisodeResult

        self.calls.append((config, out_dir, resume))
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (cb,) = callbacks
        cb.on_start({"original_accuracy": 0.9, "setup_s": 0.1, "warnings": ["a warning"], "resumed_from": 0})
        cb.on_phase("search", {})
        import logging

        logging.getLogger("compression.search").info("engine says hello")
        best = None
        numbers = list(range(1, len(self.rewards) + 1))
        if self.replay_from:
            numbers = numbers[: self.replay_from] + numbers[self.replay_from - 2 :]  # re-emit two episodes
        for n in numbers:
            if cb.should_stop():
                return {"status": "cancelled", "episodes_done": n - 1, "episodes_total": len(self.rewards)}
            if self.fail_with and n == 3:
                raise self.fail_with
            time.sleep(self.delay)
            d = result(n, self.rewards[n - 1])
            if best is None or d["reward"] > best:
                best, d["is_best"] = d["reward"], True
            with open(out / "episodes.jsonl", "a") as f:
                f.write(json.dumps(d) + "\n")
            cb.on_episode(EpisodeResult.from_dict(d))
            if n % config.checkpoint_every == 0:
                (out / "checkpoint.pt").write_bytes(b"ckpt")
                cb.on_checkpoint(n, str(out / "checkpoint.pt"))
        cb.on_phase("finalize", {"candidates": [4]})
        (out / "model.pt2").write_bytes(b"x" * 1234)
        (out / "model.onnx").write_bytes(b"y" * 99)
        (out / "best_policy.json").write_text("{}")
        report = {
            "status": "finished",
            "best_episode": self.chosen,
            "accuracy": {"compressed_test": 0.8},
            "files": [
                {
                    "path": str(out / "model.pt2"),
                    "bytes": 1234,
                    "format": "pt2",
                    "note": "n",
                    "how": "torch.export.load",
                },
                {"path": "model.onnx", "bytes": 99, "format": "onnx", "note": "o", "how": "ort"},
            ],
        }
        (out / "report.json").write_text(json.dumps(report))
        cb.on_finish(report)
        return report


@pytest.fixture
def fake_engine(monkeypatch):
    def install(**kw) -> FakeEngine:
        engine = FakeEngine(**kw)
        import compression.search.loop as loop

        monkeypatch.setattr(loop, "run_search", engine)
        return engine

    return install


def test_search_task_records_episodes_best_logs_and_artifacts(owner, fake_engine):
    engine = fake_engine()
    run = make_run(owner)
    assert tasks.run_search.run(run.pk) == "finished"
    run.refresh_from_db()
    assert run.status == "finished" and run.error == "" and run.lease == "" and run.attempts == 1
    assert run.episodes_done == 6 and run.checkpoint_episode == 6 and run.summary["best_episode"] == 4
    assert run.best["number"] == 4 and run.best["reward"] == 0.5
    assert run.started_at and run.finished_at and run.out_dir == f"run-{run.pk}"
    eps = list(run.episodes.order_by("number"))
    assert [e.number for e in eps] == [1, 2, 3, 4, 5, 6]
    assert [e.is_best for e in eps] == [True, True, False, True, False, False]
    config, out_dir, resume = engine.calls[0]
    assert config.model == "zoo:small_cnn" and config.dataset == "digits" and config.target == "analytic"
    assert out_dir == str(run.out_path) and resume is True
    messages = list(RunLog.objects.filter(run=run).order_by("seq").values_list("message", flat=True))
    assert any("original accuracy 0.9000" in m for m in messages)
    assert "a warning" in messages and "engine says hello" in messages and messages[-1] == "finished"
    arts = {a.path: a for a in RunArtifact.objects.filter(run=run)}
    assert set(arts) == {
        "model.pt2", "model.onnx", "report.json", "best_policy.json", "episodes.csv", "episodes.jsonl", "run.log",
    }  # fmt: skip
    assert arts["model.pt2"].kind == "pt2" and arts["model.pt2"].bytes == 1234
    assert arts["model.pt2"].how_to_load == "torch.export.load"
    assert arts["model.onnx"].bytes == 99 and arts["report.json"].kind == "report"
    with open(run.out_path / "episodes.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["number"]) for r in rows] == [1, 2, 3, 4, 5, 6] and rows[3]["reward"] == "0.5"
    assert arts["episodes.csv"].bytes == (run.out_path / "episodes.csv").stat().st_size
    assert "finished" in (run.out_path / "run.log").read_text()
    # idempotent: a redelivered task for a finished run does nothing
    assert tasks.run_search.run(run.pk) == f"run {run.pk} is already finished"
    assert len(engine.calls) == 1


def test_a_finished_runs_best_is_the_episode_it_exported(owner, fake_engine):
    """The device check dropped the highest reward (episode 4) as over the budget and episode 2 was exported: the
    run's best (its headline cards, the runs list, the compare view) is episode 2, marked chosen."""
    fake_engine(chosen=2)
    run = make_run(owner)
    assert tasks.run_search.run(run.pk) == "finished"
    run.refresh_from_db()
    assert run.best["number"] == 2 and run.best["chosen"] is True and run.best["highest_reward_episode"] == 4
    assert run.best["reward"] == 0.3 and run.best["policy"] is not None


def test_inspection_that_kills_the_worker_is_given_up_not_redelivered_for_ever(owner, monkeypatch):
    """A model whose inspection crashes the worker process comes back redelivered (acks_late): the second start
    after a lost one marks it failed, and inspecting it again from the page starts a fresh count."""
    from workers import dispatch

    m = UploadedModel.objects.create(owner=owner, name="crashes", kind="zoo", zoo_arch="small_cnn")
    started: list[int] = []
    import compression.pipeline as pipeline

    def dies(spec, **kw):  # what a native crash looks like from here: the task never returns
        started.append(1)
        raise SystemExit("worker lost")

    monkeypatch.setattr(pipeline, "inspect_model", dies)
    for _ in range(tasks.INSPECT_MAX_ATTEMPTS):
        with pytest.raises(SystemExit):
            tasks.inspect_model.run(m.pk)
    assert len(started) == tasks.INSPECT_MAX_ATTEMPTS
    result = tasks.inspect_model.run(m.pk)  # the redelivery after the last lost worker
    m.refresh_from_db()
    assert len(started) == tasks.INSPECT_MAX_ATTEMPTS and result.startswith("failed: ")
    assert m.status == "failed" and "the worker process died 2 times while inspecting this model" in m.error
    monkeypatch.setattr(dispatch, "send", lambda *a, **k: "task-id")
    dispatch.enqueue_inspect(m)  # the user asks again: a fresh count
    m.refresh_from_db()
    assert m.status == "pending" and "_inspect_attempts" not in (m.progress or {})


def test_training_progress_counts_epochs_not_optimiser_steps(owner, monkeypatch):
    """The engine reports steps (20 per run here); the page reads epoch of epochs (a UI review saw "epoch 1 ·
    epochs 20" for a 2-epoch training)."""
    import compression.pipeline as pipeline

    m = UploadedModel.objects.create(
        owner=owner, name="t", kind="zoo", zoo_arch="small_cnn", train_config={"epochs": 2}
    )
    seen: list[dict] = []

    def train(arch, dataset, out, input_shape=None, progress=None, **params):
        for step in (1, 10, 11, 20):
            progress(step, 20, {"epoch": 1 + (step - 1) // 10, "loss": 0.5})
            seen.append(dict(UploadedModel.objects.get(pk=m.pk).progress))
        raise pipeline.CompressionError("stop here")

    monkeypatch.setattr(pipeline, "train_baseline", train)
    tasks.train_baseline.run(m.pk)
    assert seen[0] == {"epoch": 1, "epochs": 2, "step": 1, "steps": 20, "loss": 0.5}
    assert seen[-1]["epoch"] == 2 and seen[-1]["epochs"] == 2 and seen[-1]["step"] == 20


def test_replayed_episodes_overwrite_themselves(owner, fake_engine):
    fake_engine(replay_from=4)
    run = make_run(owner)
    tasks.run_search.run(run.pk)
    numbers = list(Episode.objects.filter(run=run).values_list("number", flat=True))
    assert sorted(numbers) == [1, 2, 3, 4, 5, 6]


def test_engine_error_fails_the_run_with_its_message(owner, fake_engine):
    from compression.errors import TargetError

    fake_engine(fail_with=TargetError("device 'rpi4' does not answer", "check the tracker"))
    run = make_run(owner)
    out = tasks.run_search.run(run.pk)
    run.refresh_from_db()
    assert run.status == "failed" and run.error == "device 'rpi4' does not answer (check the tracker)"
    assert out == "failed: " + run.error and run.lease == ""
    assert RunLog.objects.filter(run=run, level="error", message=run.error).exists()
    assert run.episodes.count() == 2  # what was recorded before the failure stays
    # a device's error may pass once the device is back: the run can be resumed
    from webapp.views.runs import can_resume

    assert run.error_kind == "device" and can_resume(run)


def test_a_run_that_fails_on_its_input_cannot_be_resumed_and_keeps_what_it_found(owner, fake_engine):
    from compression.errors import DatasetError
    from compression.policy import Policy
    from webapp.views.runs import can_resume

    fake_engine(
        fail_with=DatasetError("the dataset has 3 classes, the model 10", "upload a matching dataset")
    )
    run = make_run(owner)
    tasks.run_search.run(run.pk)
    run.refresh_from_db()
    assert run.status == "failed" and run.error_kind == "input"
    assert not can_resume(run)  # the same input fails the same way: a new run with other settings instead
    # the best policy found before the failure (episode 2 of 2), every episode and the log are downloads
    files = {a.path: a for a in RunArtifact.objects.filter(run=run)}
    assert set(files) == {"best_policy.json", "episodes.csv", "episodes.jsonl", "run.log"}
    assert "the highest-reward policy within the budget so far (episode 2)" in files["best_policy.json"].note
    policy = Policy.from_json((run.out_path / "best_policy.json").read_text())
    assert policy.layers["conv1"].keep_ratio == 0.5 and policy.layers["conv1"].w_bits == 8
    assert "the dataset has 3 classes" in (run.out_path / "run.log").read_text()


def test_unexpected_error_is_reported_not_raised(owner, fake_engine):
    fake_engine(fail_with=ZeroDivisionError("boom"))
    run = make_run(owner)
    tasks.run_search.run(run.pk)
    run.refresh_from_db()
    assert run.status == "failed" and run.error == "internal error in the worker: ZeroDivisionError: boom"
    assert RunLog.objects.filter(run=run, message__contains="Traceback").exists()


def test_cancel_stops_between_episodes(owner, fake_engine, monkeypatch):
    fake_engine(rewards=tuple(0.01 * i for i in range(1, 201)), delay=0.02)
    run = make_run(owner, episodes=200)
    done = {}
    thread = threading.Thread(target=lambda: done.setdefault("out", tasks.run_search.run(run.pk)))
    thread.start()
    wait_for(lambda: Episode.objects.filter(run=run).count() >= 3, 30, "three episodes")
    t0 = time.monotonic()
    dispatch.request_cancel(run)
    thread.join(30)
    latency = time.monotonic() - t0
    run.refresh_from_db()
    assert done["out"] == "cancelled" and run.status == "cancelled" and latency < 5
    assert run.episodes.count() < 200
    # what it found so far is downloadable: the best policy, every episode, the log
    files = {a.path: a for a in RunArtifact.objects.filter(run=run)}
    assert {"best_policy.json", "episodes.csv", "episodes.jsonl", "run.log"} <= set(files)
    assert f"within the budget so far (episode {run.best['number']})" in files["best_policy.json"].note
    # a resume forgets them (the resumed run offers its own) but keeps the engine's files
    sent = []
    monkeypatch.setattr(
        dispatch, "send", lambda name, args, queue, kwargs=None: sent.append(name) or "task-2"
    )
    stale = Run.objects.get(pk=run.pk)  # a second click's request, loaded while the run was still cancelled
    dispatch.resume_run(run)
    dispatch.resume_run(stale)  # already queued: not queued twice, its stopped time not counted twice
    left = set(RunArtifact.objects.filter(run=run).values_list("path", flat=True))
    assert sent == ["workers.tasks.run_search"] and left == {"run.log"}  # the log goes on
    assert not (run.out_path / "best_policy.json").exists() and (run.out_path / "episodes.jsonl").exists()
    with open(run.out_path / "episodes.csv") as f:
        assert len(list(csv.reader(f))) == run.episodes.count() + 1


def test_resume_does_not_count_the_time_a_run_stood_stopped(owner, monkeypatch):
    sent = []
    monkeypatch.setattr(
        dispatch, "send", lambda name, args, queue, kwargs=None: sent.append(name) or "task-1"
    )
    now = timezone.now()
    run = make_run(owner)
    Run.objects.filter(pk=run.pk).update(
        status="cancelled",
        started_at=now - timezone.timedelta(seconds=1000),
        finished_at=now - timezone.timedelta(seconds=900),
    )
    run.refresh_from_db()
    assert 99 < run.elapsed_s() < 101
    dispatch.resume_run(run)
    run.refresh_from_db()
    assert run.status == "queued" and 899 < run.idle_s < 910 and sent == ["workers.tasks.run_search"]
    assert 99 < run.elapsed_s() < 110  # 100 s of work (plus the time since the resume), not 1000


def test_cancel_of_a_queued_run_is_immediate(owner, fake_engine):
    engine = fake_engine()
    run = make_run(owner)
    dispatch.request_cancel(run)
    run.refresh_from_db()
    assert run.status == "cancelled" and run.finished_at
    assert tasks.run_search.run(run.pk) == f"run {run.pk} is already cancelled" and not engine.calls


def test_a_run_held_by_a_live_worker_is_not_run_twice(owner, fake_engine, settings):
    engine = fake_engine()
    run = make_run(owner)
    token = lease.try_acquire(run.pk, "other-host:1")
    Run.objects.filter(pk=run.pk).update(status="running")
    with lease.Heartbeat(run.pk, token, interval_s=0.1):
        t0 = time.monotonic()
        out = tasks.run_search.run(run.pk)
        waited = time.monotonic() - t0
    assert out == f"run {run.pk} is being executed by other-host:1" and not engine.calls
    assert waited >= settings.RUN_STALE_S  # it waited to see whether the holder was alive


def test_a_stale_run_without_checkpoint_fails_with_a_reason(owner, fake_engine):
    engine = fake_engine()
    run = make_run(owner)
    Run.objects.filter(pk=run.pk).update(
        status="running",
        lease="dead",
        worker="gone:1",
        heartbeat_at=timezone.now() - timezone.timedelta(seconds=60),
    )
    out = tasks.run_search.run(run.pk)
    run.refresh_from_db()
    assert run.status == "failed" and run.error == tasks.NO_CHECKPOINT_MESSAGE and not engine.calls
    assert out == "failed: " + tasks.NO_CHECKPOINT_MESSAGE


def test_a_stale_run_with_checkpoint_resumes(owner, fake_engine):
    engine = fake_engine()
    run = make_run(owner)
    run.out_path.mkdir(parents=True)
    (run.out_path / "checkpoint.pt").write_bytes(b"ckpt")
    Run.objects.filter(pk=run.pk).update(
        status="running",
        lease="dead",
        attempts=1,
        heartbeat_at=timezone.now() - timezone.timedelta(seconds=60),
    )
    assert tasks.run_search.run(run.pk) == "finished"
    run.refresh_from_db()
    assert run.attempts == 2 and engine.calls[0][2] is True
    assert RunLog.objects.filter(run=run, message__startswith="resuming on").exists()


def test_lease_is_exclusive_and_lost_when_stolen(owner, settings):
    run = make_run(owner)
    a = lease.try_acquire(run.pk, "a")
    assert a and lease.try_acquire(run.pk, "b") is None
    lease.update_run(run.pk, a, episodes_done=1)
    Run.objects.filter(pk=run.pk).update(heartbeat_at=timezone.now() - timezone.timedelta(seconds=10))
    b = lease.try_acquire(run.pk, "b")  # a went stale: b takes over
    assert b and b != a
    with pytest.raises(lease.LeaseLost):
        lease.update_run(run.pk, a, episodes_done=2)
    hb = lease.Heartbeat(run.pk, a)
    hb.beat()
    assert hb.lost.is_set() and hb.stop_requested
    lease.release(run.pk, a)  # not ours any more: no effect
    assert Run.objects.get(pk=run.pk).lease == b


def test_reaper_fails_or_requeues_stale_runs(owner, monkeypatch):
    from workers import reaper

    sent = []
    monkeypatch.setattr(
        dispatch, "send", lambda name, args, queue, kwargs=None: sent.append((name, args)) or "tid"
    )
    old = timezone.now() - timezone.timedelta(seconds=60)
    no_ckpt = make_run(owner)
    with_ckpt = make_run(owner)
    fresh = make_run(owner)
    with_ckpt.out_path.mkdir(parents=True)
    (with_ckpt.out_path / "checkpoint.pt").write_bytes(b"c")
    Run.objects.filter(pk__in=[no_ckpt.pk, with_ckpt.pk]).update(
        status="running", heartbeat_at=old, lease="x"
    )
    Run.objects.filter(pk=fresh.pk).update(status="running", heartbeat_at=timezone.now(), lease="y")
    monkeypatch.setattr(reaper, "broker_task_ids", lambda: set())
    lines = reaper.reap_runs()
    assert len(lines) == 2
    no_ckpt.refresh_from_db()
    with_ckpt.refresh_from_db()
    fresh.refresh_from_db()
    assert no_ckpt.status == "failed" and no_ckpt.error == tasks.NO_CHECKPOINT_MESSAGE
    assert with_ckpt.status == "queued" and with_ckpt.lease == "" and with_ckpt.task_id == "tid"
    assert fresh.status == "running"
    assert sent == [("workers.tasks.run_search", [with_ckpt.pk])]
    assert reaper.reap_runs() == []  # nothing left to do; a second reaper pass changes nothing


def test_reaper_resends_queued_runs_whose_message_was_lost(owner, monkeypatch):
    from workers import reaper

    sent = []
    monkeypatch.setattr(
        dispatch, "send", lambda name, args, queue, kwargs=None: sent.append(args[0]) or "new"
    )
    old = timezone.now() - timezone.timedelta(seconds=600)
    lost = make_run(owner)
    present = make_run(owner)
    young = make_run(owner)
    Run.objects.filter(pk__in=[lost.pk, present.pk]).update(created_at=old)
    Run.objects.filter(pk=lost.pk).update(task_id="gone")
    Run.objects.filter(pk=present.pk).update(task_id="here")
    monkeypatch.setattr(reaper, "broker_task_ids", lambda: {"here"})
    reaper.reap_runs()
    assert sent == [lost.pk] and young.pk not in sent
    monkeypatch.setattr(reaper, "broker_task_ids", lambda: None)  # broker unreadable: send nothing
    sent.clear()
    reaper.reap_runs()
    assert sent == []


def test_tests_without_services_never_reach_the_machines_redis(settings):
    from tests.conftest_services import NO_REDIS
    from workers.celery_app import app

    assert settings.CELERY_BROKER_URL == settings.REDIS_URL == NO_REDIS
    assert app.conf.broker_url == NO_REDIS
    assert settings.CHANNEL_LAYERS["default"]["BACKEND"] == "channels.layers.InMemoryChannelLayer"


def test_dispatch_without_a_broker_says_so(owner):
    run = make_run(owner)
    t0 = time.monotonic()
    with pytest.raises(dispatch.BrokerUnavailable, match="does not answer"):
        dispatch.enqueue_run(run)
    assert time.monotonic() - t0 < 15
    run.refresh_from_db()
    assert run.status == "queued"  # the reaper sends it once Redis is back


# --------------------------------------------------------------------------------------------------------
# real worker, real engine
# --------------------------------------------------------------------------------------------------------
def wait_status(obj, statuses, timeout, services=None):
    def done():
        obj.refresh_from_db()
        return obj.status in statuses

    try:
        wait_for(done, timeout, f"{type(obj).__name__} {obj.pk} to reach {statuses}", 0.25)
    except AssertionError:
        raise AssertionError(
            f"{type(obj).__name__} {obj.pk} is {obj.status}: {getattr(obj, 'error', '')}\n"
            + (services.log_tail() if services else "")
        ) from None


@pytest.mark.services
def test_inspect_train_benchmark_and_health_through_a_worker(services, celery_worker, owner):
    # a zoo model with no weights: inspected by the worker
    zoo = UploadedModel.objects.create(
        owner=owner, name="zoo", kind="zoo", zoo_arch="small_cnn", num_classes=10, input_shape=[1, 8, 8]
    )
    dispatch.enqueue_inspect(zoo)
    wait_status(zoo, ("ready", "failed"), 120, services)
    assert zoo.status == "ready", zoo.error
    assert zoo.inspection["summary"]["params"] > 0 and zoo.inspection["input_shape"] == [1, 8, 8]
    assert any(row["prunable"] for row in zoo.inspection["layers"])
    # a broken upload: a clear error, not a crash
    bad = UploadedModel.objects.create(owner=owner, name="bad", kind="pt2")
    bad.file.save("bad.pt2", ContentFile(b"this is not a zip"))
    dispatch.enqueue_inspect(bad)
    wait_status(bad, ("ready", "failed"), 60, services)
    assert bad.status == "failed" and bad.error and "Traceback" not in bad.error
    # training a baseline writes a .pt2 + .pth into private storage, then inspects it
    trained = UploadedModel.objects.create(owner=owner, name="trained", kind="zoo", zoo_arch="small_cnn")
    dispatch.enqueue_train(trained, Dataset.objects.get(name="digits"), epochs=1, input_shape=[1, 8, 8])
    wait_status(trained, ("ready", "failed"), 240, services)
    assert trained.status == "ready", trained.error
    assert trained.kind == "pt2" and Path(trained.file.path).exists()
    assert trained.inspection["input_shape"] == [1, 8, 8] and trained.input_shape == [1, 8, 8]
    assert Path(trained.weights_file.path).exists() and trained.progress["epoch"] == 1
    assert trained.progress["result"]["test"]["top1"] > 0.1  # learned something in one epoch (chance: 0.1)
    # benchmark on a device queue, and a health check
    bench = Benchmark.objects.create(
        owner=owner,
        model=zoo,
        target=Target.objects.get(name="local-torch"),
        params={"warmup": 2, "repeats": 5, "timeout_s": 60},
    )
    dispatch.enqueue_benchmark(bench)
    wait_status(bench, ("finished", "failed"), 120, services)
    assert bench.status == "finished", bench.error
    assert bench.result["median_ms"] > 0 and bench.result["runs"] == 5
    target = Target.objects.get(name="analytic")
    dispatch.enqueue_check_target(target)
    wait_for(lambda: Target.objects.get(pk=target.pk).health.get("checked_at"), 60, "health check")
    assert Target.objects.get(pk=target.pk).health["reachable"] is True


@pytest.mark.services
def test_end_to_end_search_through_the_worker(services, celery_worker, owner, trained_small_cnn):
    """A tiny real search (small_cnn trained at 1x8x8 on digits, uploaded as .pt2; analytic target; 8
    episodes; no fine-tuning) via Redis and a Celery worker: every episode once in the database, equal to
    the engine's episodes.jsonl; the exported model loads and runs."""
    from tests.test_faults import assert_db_matches_jsonl, search_run

    model = UploadedModel.objects.create(owner=owner, name="tiny", kind="pt2")
    model.file.save("small_cnn-digits.pt2", ContentFile(Path(trained_small_cnn["pt2"]).read_bytes()))
    run = search_run(owner, model=model, episodes=8, checkpoint_every=4, export_formats=["pt2", "onnx"])
    t0 = time.monotonic()
    dispatch.enqueue_run(run)
    wait_status(run, ("finished", "failed", "cancelled"), 300, services)
    elapsed = time.monotonic() - t0
    assert run.status == "finished", run.error + services.log_tail()
    assert_db_matches_jsonl(run, 8)
    assert run.summary["status"] == "finished" and run.summary["episodes"] == 8
    kinds = {a.kind: a for a in run.artifacts.all()}
    assert {"pt2", "onnx", "report", "episodes.csv", "log", "policy"} <= set(kinds)
    for art in kinds.values():
        assert art.abspath.stat().st_size == art.bytes > 0
    import torch

    from compression.pipeline import read_model_meta

    shape = read_model_meta(str(kinds["pt2"].abspath))["input_shape"]
    module = torch.export.load(str(kinds["pt2"].abspath)).module()
    assert module(torch.zeros(2, *shape)).shape == (2, 10)
    print(f"end-to-end search: {elapsed:.1f} s")


def test_inspect_dataset_task(owner):
    import io

    import numpy as np

    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    np.savez(buf, x=rng.integers(0, 255, (40, 1, 8, 8), dtype=np.uint8), y=np.arange(40) % 4)
    ds = Dataset.objects.create(owner=owner, name="mine", kind="npz")
    ds.file.save("mine.npz", ContentFile(buf.getvalue()))
    assert tasks.inspect_dataset.run(ds.pk) == "ready"
    ds.refresh_from_db()
    assert ds.status == "ready" and ds.meta["num_classes"] == 4 and ds.meta["num_samples"] == 40
    assert ds.size_bytes == len(buf.getvalue())
    bad = Dataset.objects.create(owner=owner, name="bad", kind="npz")
    np.savez(buf := io.BytesIO(), images=np.zeros((2, 2)))
    bad.file.save("bad.npz", ContentFile(buf.getvalue()))
    assert tasks.inspect_dataset.run(bad.pk).startswith("failed: ")
    bad.refresh_from_db()
    assert bad.status == "failed" and "expected x and y" in bad.error
