"""Resume or fail runs whose worker is gone, and re-send queued runs whose task message was lost."""

from __future__ import annotations

import time

from django.core.management.base import BaseCommand
from django.db import close_old_connections


class Command(BaseCommand):
    help = "Reap runs whose worker stopped (resume from checkpoint, or fail with a reason). --every N loops."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--every", type=float, default=0.0, help="repeat every N seconds (0: once)")
        parser.add_argument(
            "--grace", type=float, default=60.0, help="seconds before a lost queued task is re-sent"
        )

    def handle(self, *args, every: float, grace: float, **options) -> None:
        from workers.reaper import reap_runs

        while True:
            close_old_connections()
            try:
                for line in reap_runs(grace_s=grace):
                    self.stdout.write(f"[reaper] {line}")
            except Exception as exc:  # a database or broker hiccup: try again next round
                self.stderr.write(f"[reaper] pass failed: {exc}")
                if not every:
                    raise
            if not every:
                return
            self.stdout.flush()
            time.sleep(every)
