"""Copy the engine registry's settings of the built-in targets into their rows (for display)."""

from __future__ import annotations

from django.core.management.base import BaseCommand

from webapp.models import BUILTIN_TARGETS, Target


class Command(BaseCommand):
    help = "Refresh the built-in targets' settings, round_to and description from compression.targets."

    def handle(self, *args, **options) -> None:
        try:
            from compression.targets import get_target
        except Exception as exc:  # the engine's targets package is optional for the web side
            self.stderr.write(f"[targets] registry not available ({exc}); built-in rows unchanged")
            return
        for name, (_backend, description) in BUILTIN_TARGETS.items():
            try:
                spec = get_target(name)
            except Exception as exc:
                self.stderr.write(f"[targets] {name}: {exc}")
                continue
            Target.objects.update_or_create(
                name=name,
                defaults={
                    "owner": None,
                    "backend": spec.backend,
                    "settings": spec.settings or {},
                    "round_to": spec.round_to or 1,
                    "description": spec.description or description,
                },
            )
        self.stdout.write(f"[targets] built-in targets: {', '.join(BUILTIN_TARGETS)}")
