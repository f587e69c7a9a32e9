"""Create the first user (``admin``, staff + superuser) with a generated password, once.

The password is printed once and kept in ``var/first_user.txt`` (mode 0600) so the person who ran
``scripts/run.sh`` can find it again; when any user exists already, the command only says how to add one.
"""

from __future__ import annotations

import os
import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Create an 'admin' superuser with a generated password if no user exists (printed once)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--username", default=os.environ.get("FIRST_USER", "admin"))

    def handle(self, *args, username: str, **options) -> None:
        User = get_user_model()
        note = settings.VAR_DIR / "first_user.txt"
        if User.objects.exists():
            if note.exists():
                self.stdout.write(f"[users] first user's login is in {note}")
            self.stdout.write(
                "[users] users exist; add one with: .venv/bin/python manage.py createsuperuser "
                "(or in the admin at /admin/)"
            )
            return
        password = os.environ.get("FIRST_USER_PASSWORD") or secrets.token_urlsafe(12)
        User.objects.create_superuser(username=username, email="", password=password)
        fd = os.open(note, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"username: {username}\npassword: {password}\n")
        self.stdout.write(self.style.SUCCESS(f"[users] created user '{username}' with password: {password}"))
        self.stdout.write(f"[users] (saved in {note}; change it after logging in)")
