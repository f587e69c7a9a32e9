"""The data model: specs handed to the engine, uniqueness that makes the workers idempotent, logs, storage,
settings and the first-user command."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.core.files.base import ContentFile
from django.core.management import call_command
from django.db import IntegrityError, transaction

from webapp.models import (
    BUILTIN_TARGETS,
    Dataset,
    Episode,
    Run,
    RunArtifact,
    RunLog,
    Target,
    UploadedModel,
    ensure_builtin_rows,
)
from webapp.storage import private_storage, safe_filename, upload_path

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def media(settings, tmp_path):
    settings.PRIVATE_MEDIA_ROOT = tmp_path / "media"
    settings.RUNS_ROOT = tmp_path / "runs"
    return tmp_path


@pytest.fixture
def user(db):
    return get_user_model().objects.create_user("alice", password="pw-alice-123")


def make_run(user, **kw) -> Run:
    model = UploadedModel.objects.create(owner=user, name="m", kind="zoo", zoo_arch="small_cnn")
    return Run.objects.create(
        owner=user,
        model=model,
        dataset=Dataset.objects.get(name="digits", owner=None),
        target=Target.objects.get(name="analytic"),
        agent="amc",
        config={"episodes": 4},
        **kw,
    )


def episode_fields(number: int, reward: float = 0.5, **kw) -> dict:
    d = {
        "episode": number,
        "reward": reward,
        "accuracy": 0.9,
        "latency_ms": None,
        "macs": 1000,
        "bops": 64000,
        "params": 100,
        "bytes": 400.0,
        "cost_ratio": 0.5,
        "meets_budget": True,
        "policy": {"layers": {"conv1": {"keep": 0.5}}},
        "raw_actions": [[0.1]],
        "enforced_actions": [[0.1]],
        "wall_time_s": 0.2,
        "timings": {"eval_s": 0.1},
        "is_best": False,
        "stage": "search",
    }
    d.update(kw)
    return d


def test_builtins_exist_after_migrations(db):
    assert Dataset.objects.get(name="digits", owner=None).spec() == "digits"
    names = set(Target.objects.filter(owner=None).values_list("name", flat=True))
    assert names == set(BUILTIN_TARGETS)
    Target.objects.all().delete()
    ensure_builtin_rows()
    assert Target.objects.count() == len(BUILTIN_TARGETS)


def test_model_specs(user, media):
    zoo = UploadedModel.objects.create(
        owner=user, name="z", kind="zoo", zoo_arch="resnet20", num_classes=10, input_shape=[3, 32, 32]
    )
    assert zoo.spec() == "zoo:resnet20"
    assert zoo.engine_kwargs() == {"num_classes": 10, "input_shape": (3, 32, 32)}
    zoo.weights_file.save("my weights.pth", ContentFile(b"x"))
    assert zoo.spec().startswith("zoo:resnet20@" + str(media / "media"))
    assert zoo.spec().endswith("/my_weights.pth")
    pt2 = UploadedModel.objects.create(owner=user, name="p", kind="pt2")
    with pytest.raises(ValueError):
        pt2.spec()
    pt2.file.save("net.pt2", ContentFile(b"zip"))
    assert pt2.spec() == pt2.file.path and pt2.spec().endswith("net.pt2")
    assert pt2.engine_kwargs() == {"num_classes": None, "input_shape": None}


def test_uploads_keep_their_extension_and_never_collide(user, media):
    ds1 = Dataset.objects.create(owner=user, name="c", kind="cifar")
    ds2 = Dataset.objects.create(owner=user, name="c2", kind="cifar")
    ds1.file.save("cifar-10-python.tar.gz", ContentFile(b"a"))
    ds2.file.save("cifar-10-python.tar.gz", ContentFile(b"b"))
    assert ds1.spec().endswith("/cifar-10-python.tar.gz") and ds2.spec().endswith("/cifar-10-python.tar.gz")
    assert ds1.spec() != ds2.spec()
    assert Path(ds1.spec()).is_relative_to(media / "media")


def test_private_storage_has_no_urls_and_safe_names(media):
    with pytest.raises(ValueError, match="no public URL"):
        private_storage().url("x")
    assert safe_filename("../../etc/passwd") == "passwd"
    assert safe_filename("a b$c.tar.gz") == "a_b_c.tar.gz"
    assert safe_filename("...") == "upload"
    p = upload_path("models", 3, "../x.pt2")
    assert p.startswith("models/3/") and p.endswith("/x.pt2") and ".." not in p


def test_target_engine_spec(db):
    builtin = Target.objects.get(name="local-torch")
    assert builtin.is_builtin and builtin.engine_spec() == "local-torch"
    assert builtin.queue_name == "device.local-torch"
    custom = Target.objects.create(
        name="rpi4", backend="tvm", settings={"rpc": {"host": "h", "port": 9190, "key": "rpi4"}}, round_to=8
    )
    assert not custom.is_builtin
    assert custom.engine_spec() == {
        "name": "rpi4",
        "backend": "tvm",
        "settings": {"rpc": {"host": "h", "port": 9190, "key": "rpi4"}},
        "round_to": 8,
        "description": "",
    }


def test_episode_number_is_unique_per_run(user):
    run = make_run(user)
    Episode.objects.create(run=run, number=1, **Episode.defaults_from_result(episode_fields(1)))
    with pytest.raises(IntegrityError), transaction.atomic():
        Episode.objects.create(run=run, number=1, **Episode.defaults_from_result(episode_fields(1)))
    # update_or_create on (run, number) is how the worker writes: a replayed episode overwrites itself
    Episode.objects.update_or_create(
        run=run, number=1, defaults=Episode.defaults_from_result(episode_fields(1, reward=0.7))
    )
    assert run.episodes.get().reward == 0.7
    other = make_run(user)
    Episode.objects.create(run=other, number=1, **Episode.defaults_from_result(episode_fields(1)))


def test_episode_event_and_run_status(user):
    run = make_run(user)
    ep = Episode.objects.create(
        run=run, number=3, **Episode.defaults_from_result(episode_fields(3, is_best=True))
    )
    ev = ep.to_event()
    assert ev["number"] == 3 and ev["is_best"] and ev["policy"] == {"layers": {"conv1": {"keep": 0.5}}}
    assert "raw_actions" not in ev and ep.to_event(full=True)["raw_actions"] == [[0.1]]
    st = run.status_event()
    assert st["status"] == "queued" and st["id"] == run.pk and st["elapsed_s"] is None
    assert run.group_name == f"run-{run.pk}"


def test_run_log_sequence(user):
    run = make_run(user)
    lines = [run.log(f"line {i}") for i in range(5)]
    assert [line.seq for line in lines] == [1, 2, 3, 4, 5]
    assert RunLog.objects.filter(run=run).count() == 5
    assert lines[-1].to_event()["message"] == "line 4"
    other = make_run(user)
    assert other.log("first").seq == 1


def test_artifact_paths_stay_inside_the_run_dir(user, media):
    run = make_run(user)
    run.out_path.mkdir(parents=True)
    (run.out_path / "model.onnx").write_bytes(b"123")
    art = RunArtifact.objects.create(run=run, kind="onnx", path="model.onnx", bytes=3)
    assert art.abspath == (run.out_path / "model.onnx").resolve() and art.filename == "model.onnx"
    evil = RunArtifact.objects.create(run=run, kind="other", path="../../secret", bytes=0)
    with pytest.raises(ValueError, match="leaves the run directory"):
        _ = evil.abspath


def test_ensure_first_user_once(db, settings, tmp_path):
    settings.VAR_DIR = tmp_path
    out = io.StringIO()
    call_command("ensure_first_user", stdout=out)
    text = out.getvalue()
    assert "created user 'admin' with password:" in text
    password = text.split("password: ")[1].split()[0]
    note = tmp_path / "first_user.txt"
    assert f"password: {password}" in note.read_text()
    assert oct(note.stat().st_mode & 0o777) == "0o600"
    admin = get_user_model().objects.get(username="admin")
    assert admin.is_superuser and admin.is_staff and admin.check_password(password)
    out = io.StringIO()
    call_command("ensure_first_user", stdout=out)
    assert "users exist" in out.getvalue() and get_user_model().objects.count() == 1


def test_settings_from_environment(tmp_path):
    """A fresh process with only environment variables: generated secret key, DATABASE_URL, dirs."""
    env = {
        **os.environ,
        "VAR_DIR": str(tmp_path / "var"),
        "DATABASE_URL": "postgres://u:p@db.example:5433/studio",
        "ALLOWED_HOSTS": "studio.example,10.0.0.2",
        "DEBUG": "yes",
        "RUNS_ROOT": str(tmp_path / "runs"),
    }
    env.pop("SECRET_KEY", None)
    code = (
        "import django, os; os.environ['DJANGO_SETTINGS_MODULE']='webapp.settings';"
        "from django.conf import settings as s;"
        "d=s.DATABASES['default'];"
        "print(s.SECRET_KEY, s.DEBUG, ','.join(s.ALLOWED_HOSTS), d['ENGINE'], d['HOST'], d['PORT'], d['NAME'],"
        " s.RUNS_ROOT, s.PRIVATE_MEDIA_ROOT)"
    )
    out1 = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True
    )
    out2 = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True
    )
    key, debug, hosts, engine, host, port, name, runs, media = out1.stdout.split()
    assert len(key) >= 50 and out2.stdout.split()[0] == key  # generated once, then reused
    assert (tmp_path / "var" / "secret_key").read_text().strip() == key
    assert oct((tmp_path / "var" / "secret_key").stat().st_mode & 0o777) == "0o600"
    assert debug == "True" and hosts == "studio.example,10.0.0.2"
    assert engine == "django.db.backends.postgresql" and (host, port, name) == (
        "db.example",
        "5433",
        "studio",
    )
    assert runs == str(tmp_path / "runs") and media == str(tmp_path / "var" / "media")


def test_sqlite_is_configured_for_concurrent_writers(db):
    from django.db import connection

    if connection.vendor != "sqlite":
        pytest.skip("SQLite only")
    with connection.cursor() as c:
        c.execute("PRAGMA journal_mode")
        assert c.fetchone()[0].lower() == "wal"
    assert connection.settings_dict["OPTIONS"]["transaction_mode"] == "IMMEDIATE"
    assert connection.settings_dict["OPTIONS"]["timeout"] >= 10


def test_database_vendor_matches_database_url(db):
    """The child run of tests/test_postgres.py asserts it really runs on PostgreSQL."""
    from django.db import connection

    expected = os.environ.get("EXPECT_DATABASE_VENDOR")
    if expected:
        assert connection.vendor == expected
    else:
        assert connection.vendor in ("sqlite", "postgresql")


@pytest.mark.django_db
def test_the_migrations_match_the_models() -> None:
    """A model change without its migration fails here, not on a user's database."""
    out = io.StringIO()
    try:
        call_command("makemigrations", "--check", "--dry-run", stdout=out, stderr=out)
    except SystemExit as exc:  # --check exits 1 when a migration is missing
        raise AssertionError(
            f"models changed without a migration (run manage.py makemigrations):\n{out.getvalue()}"
        ) from exc
