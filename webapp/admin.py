"""Everything in the Django admin."""

from django.contrib import admin

from webapp.models import Benchmark, Dataset, Episode, Run, RunArtifact, RunLog, Target, UploadedModel


@admin.register(UploadedModel)
class UploadedModelAdmin(admin.ModelAdmin):
    list_display = ("id", "name", "owner", "kind", "zoo_arch", "status", "size_bytes", "created_at")
    list_filter = ("kind", "status")
    search_fields = ("name", "zoo_arch", "owner__username")
    readonly_fields = ("created_at", "updated_at")


@admin.register(Dataset)
class DatasetAdmin(admin.ModelAdmin):
    list_display = ("id", "name", "owner", "kind", "status", "size_bytes", "created_at")
    list_filter = ("kind", "status")
    search_fields = ("name", "owner__username")


@admin.register(Target)
class TargetAdmin(admin.ModelAdmin):
    list_display = ("id", "name", "backend", "owner", "round_to", "created_at")
    list_filter = ("backend",)
    search_fields = ("name", "description")


class RunArtifactInline(admin.TabularInline):
    model = RunArtifact
    extra = 0
    readonly_fields = ("kind", "path", "bytes", "note", "how_to_load", "created_at")


@admin.register(Run)
class RunAdmin(admin.ModelAdmin):
    list_display = (
        "id", "name", "owner", "agent", "target", "status", "phase", "episodes_done", "episodes_total",
        "worker", "heartbeat_at", "created_at",
    )  # fmt: skip
    list_filter = ("status", "agent", "target")
    search_fields = ("name", "owner__username", "error")
    readonly_fields = (
        "created_at",
        "started_at",
        "finished_at",
        "heartbeat_at",
        "lease",
        "task_id",
        "attempts",
    )
    inlines = [RunArtifactInline]


@admin.register(Episode)
class EpisodeAdmin(admin.ModelAdmin):
    list_display = (
        "run",
        "number",
        "reward",
        "accuracy",
        "latency_ms",
        "cost_ratio",
        "meets_budget",
        "is_best",
    )
    list_filter = ("meets_budget", "is_best")
    search_fields = ("run__name",)
    raw_id_fields = ("run",)


@admin.register(RunArtifact)
class RunArtifactAdmin(admin.ModelAdmin):
    list_display = ("run", "kind", "path", "bytes", "created_at")
    list_filter = ("kind",)
    raw_id_fields = ("run",)


@admin.register(RunLog)
class RunLogAdmin(admin.ModelAdmin):
    list_display = ("run", "seq", "level", "message", "created_at")
    list_filter = ("level",)
    search_fields = ("message",)
    raw_id_fields = ("run",)


@admin.register(Benchmark)
class BenchmarkAdmin(admin.ModelAdmin):
    list_display = ("id", "owner", "model", "target", "status", "created_at", "finished_at")
    list_filter = ("status", "target")
