"""Private file storage: uploads and run outputs live outside the web root and have no public URL.

Every download goes through a view that checks the owner (or staff) and streams the file.
"""

from __future__ import annotations

import os
import re
import uuid

from django.conf import settings
from django.core.files.storage import FileSystemStorage


class PrivateStorage(FileSystemStorage):
    """A FileSystemStorage at ``settings.PRIVATE_MEDIA_ROOT`` (read on every use, so tests and deployments
    that change the setting are followed) whose files have no URL."""

    def __init__(self) -> None:
        super().__init__(base_url=None)

    @property
    def base_location(self) -> str:  # type: ignore[override]
        """The setting, read now (FileSystemStorage would cache it)."""
        return str(settings.PRIVATE_MEDIA_ROOT)

    @property
    def location(self) -> str:  # type: ignore[override]
        """Absolute form of ``base_location``."""
        return os.path.abspath(self.base_location)

    def url(self, name: str | None) -> str:
        """Refuse: private files are only served by permission-checked views."""
        raise ValueError("private files have no public URL; serve them through a view that checks the owner")


_storage = PrivateStorage()


def private_storage() -> PrivateStorage:
    """The storage every FileField of the app uses (a callable, so migrations do not record a path)."""
    return _storage


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_filename(name: str, default: str = "upload") -> str:
    """A file name safe on any file system, keeping the full extension (``.tar.gz`` stays ``.tar.gz``)."""
    base = os.path.basename(name or "").strip().replace(" ", "_")
    base = _UNSAFE.sub("_", base).lstrip(".")[:120]
    return base or default


def upload_path(kind: str, owner_id: int | None, filename: str) -> str:
    """``<kind>/<owner>/<random>/<safe name>``: one directory per upload, so names never collide and the
    engine sees the original extension (it picks the reader by extension)."""
    return f"{kind}/{owner_id or 'shared'}/{uuid.uuid4().hex[:16]}/{safe_filename(filename)}"


def model_upload_to(instance, filename: str) -> str:
    """upload_to for model graphs and weights."""
    return upload_path("models", getattr(instance, "owner_id", None), filename)


def dataset_upload_to(instance, filename: str) -> str:
    """upload_to for dataset files."""
    return upload_path("datasets", getattr(instance, "owner_id", None), filename)
