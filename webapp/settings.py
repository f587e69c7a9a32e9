"""Settings, all from the environment (one module; every value below names its variable).

Defaults make ``scripts/run.sh`` work on a fresh machine: SQLite in ``var/db.sqlite3``, a local Redis at
``redis://127.0.0.1:6379/0``, uploads in ``var/media`` and run outputs in ``var/runs`` (both outside any
static or web root; they are served only through permission-checked views). See docs/operations.md.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool = False) -> bool:
    """A boolean environment variable: 1/true/yes/on (any case) is True."""
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def env_list(name: str, default: str) -> list[str]:
    """A comma-separated environment variable as a list (blanks dropped)."""
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


def env_float(name: str, default: float) -> float:
    """A number from the environment."""
    value = os.environ.get(name, "").strip()
    return float(value) if value else default


def env_int(name: str, default: int) -> int:
    """An integer from the environment."""
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


# VAR_DIR holds everything the running product writes: database, secret key, uploads, runs, logs.
VAR_DIR = Path(os.environ.get("VAR_DIR") or BASE_DIR / "var").resolve()
VAR_DIR.mkdir(parents=True, exist_ok=True)


def _secret_key() -> str:
    """SECRET_KEY from the environment, else one generated once into ``var/secret_key`` (mode 0600)."""
    key = os.environ.get("SECRET_KEY", "").strip()
    if key:
        return key
    path = VAR_DIR / "secret_key"
    if path.exists():
        return path.read_text().strip()
    key = secrets.token_urlsafe(50)
    # O_EXCL: when the web and worker processes start together, only one writes; the other reads it.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


SECRET_KEY = _secret_key()
DEBUG = env_bool("DEBUG", False)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "127.0.0.1,localhost,[::1],testserver")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")

INSTALLED_APPS = [
    "daphne",  # first: its runserver replaces Django's with an ASGI one
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "webapp.apps.WebappConfig",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "webapp.urls"
ASGI_APPLICATION = "webapp.asgi.application"
WSGI_APPLICATION = "webapp.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- database -------------------------------------------------------------------------------------------
DATABASE_URL = os.environ.get("DATABASE_URL") or f"sqlite:///{VAR_DIR / 'db.sqlite3'}"
_db = dj_database_url.parse(DATABASE_URL, conn_max_age=env_int("DB_CONN_MAX_AGE", 0), conn_health_checks=True)
if _db["ENGINE"] == "django.db.backends.sqlite3":
    # The web process and the worker processes write concurrently: WAL lets readers run beside the one
    # writer, IMMEDIATE transactions take the write lock up front (no deadlock-prone lock upgrades), and
    # the timeout makes a writer wait for the lock instead of failing with "database is locked".
    _db["OPTIONS"] = {
        "timeout": env_float("SQLITE_TIMEOUT_S", 30.0),
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    # Tests need a file (not an in-memory) test database: the Celery worker subprocess they start must see
    # it. One file per test process, so two test runs on one machine do not share it.
    _db["TEST"] = {
        "NAME": os.environ.get("TEST_DATABASE_NAME") or str(VAR_DIR / "test" / f"db-{os.getpid()}.sqlite3")
    }
    Path(_db["TEST"]["NAME"]).parent.mkdir(parents=True, exist_ok=True)
elif os.environ.get("TEST_DATABASE_NAME"):
    _db["TEST"] = {"NAME": os.environ["TEST_DATABASE_NAME"]}
DATABASES = {"default": _db}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = os.environ.get("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

# --- static files ---------------------------------------------------------------------------------------
# Served by Django's staticfiles handler wrapped around the ASGI app (webapp/asgi.py), in DEBUG and not:
# it needs no extra package and no collectstatic; the files are small (CSS, JS, the local plotly.min.js).
STATIC_URL = "/static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = VAR_DIR / "staticfiles"

# --- private files --------------------------------------------------------------------------------------
# Uploads and run outputs live outside the web root; views check permissions and stream them.
PRIVATE_MEDIA_ROOT = Path(os.environ.get("PRIVATE_MEDIA_ROOT") or VAR_DIR / "media").resolve()
RUNS_ROOT = Path(os.environ.get("RUNS_ROOT") or VAR_DIR / "runs").resolve()
LOG_DIR = Path(os.environ.get("LOG_DIR") or VAR_DIR / "logs").resolve()
for _d in (PRIVATE_MEDIA_ROOT, RUNS_ROOT, LOG_DIR):
    _d.mkdir(parents=True, exist_ok=True)
MEDIA_URL = None  # nothing under PRIVATE_MEDIA_ROOT has a public URL

MAX_MODEL_UPLOAD_BYTES = env_int("MAX_MODEL_UPLOAD_MB", 200) * 1024 * 1024
MAX_WEIGHTS_UPLOAD_BYTES = env_int("MAX_WEIGHTS_UPLOAD_MB", 200) * 1024 * 1024
MAX_DATASET_UPLOAD_BYTES = env_int("MAX_DATASET_UPLOAD_MB", 500) * 1024 * 1024
# Larger uploads stream to disk (not memory) in FILE_UPLOAD_TEMP_DIR.
FILE_UPLOAD_MAX_MEMORY_SIZE = 2_621_440
FILE_UPLOAD_TEMP_DIR = str(VAR_DIR / "upload-tmp")
Path(FILE_UPLOAD_TEMP_DIR).mkdir(parents=True, exist_ok=True)
DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("DATA_UPLOAD_MAX_MEMORY_MB", 10) * 1024 * 1024
FILE_UPLOAD_PERMISSIONS = 0o640

# --- Redis: Celery broker and the Channels layer --------------------------------------------------------
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
if os.environ.get("CHANNEL_LAYER", "redis") == "memory":
    # For unit tests of consumers only: the in-memory layer does not cross processes.
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
else:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            # socket_timeout None: redis-py 8 defaults to 5 s, shorter than channels_redis's 5 s blocking
            # read, which killed every websocket consumer every few seconds (django/channels_redis#422)
            "CONFIG": {
                "hosts": [{"address": REDIS_URL, "socket_timeout": None}],
                "capacity": 1500,
                "expiry": 60,
            },
        }
    }

# Celery reads every CELERY_* setting (workers/celery_app.py: namespace="CELERY").
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", REDIS_URL)
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_TRANSPORT_OPTIONS = {
    # A task not acknowledged within this many seconds is handed to another worker (Redis has no
    # connection-bound delivery like AMQP). Searches run far longer than this; the per-run lease in
    # workers/lease.py stops a second copy from running while the first worker is alive.
    "visibility_timeout": env_int("CELERY_VISIBILITY_TIMEOUT_S", 3600),
    # How often a worker looks for such messages (kombu scans every interval x throttle seconds).
    "unacked_restore_interval": env_int("CELERY_UNACKED_RESTORE_INTERVAL_S", 10),
    "unacked_restore_throttle": env_int("CELERY_UNACKED_RESTORE_THROTTLE", 10),
}
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_IGNORE_RESULT = True  # the database is the source of truth; no result backend
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = False  # a Redis restart must not kill searches
CELERY_TASK_DEFAULT_QUEUE = "celery"
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

# Runs: the worker holding a run refreshes its heartbeat every RUN_HEARTBEAT_S; a run whose heartbeat is
# older than RUN_STALE_S has lost its worker (killed, crashed, machine gone) and is resumed or failed.
RUN_HEARTBEAT_S = env_float("RUN_HEARTBEAT_S", 5.0)
RUN_STALE_S = env_float("RUN_STALE_S", 45.0)
# Benchmarks and health checks go to a queue per target named DEVICE_QUEUE_PREFIX + target name; a worker
# with concurrency 1 consumes each (docs/operations.md, "Device workers").
DEVICE_QUEUE_PREFIX = "device."
# Episodes sent in one websocket history message at most; longer runs are downsampled for the overview.
STREAM_HISTORY_MAX = env_int("STREAM_HISTORY_MAX", 2000)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {
        "django": {"handlers": ["console"], "level": "INFO", "propagate": False},
        "daphne": {"level": "WARNING"},
    },
}
