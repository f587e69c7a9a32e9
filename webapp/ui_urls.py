"""Dashboard pages (namespace ``ui``): sign-in, models, datasets, targets, runs, compare, downloads."""

from django.urls import path

from webapp.views import apidocs, compare, datasets, files, home, models, runs, targets

app_name = "ui"

urlpatterns = [
    path("", home.home, name="home"),
    path("models/", models.model_list, name="models"),
    path("models/<int:pk>/", models.model_detail, name="model"),
    path("models/<int:pk>/file/", files.model_file, name="model-file"),
    path("models/<int:pk>/delete/", models.model_delete, name="model-delete"),
    path("datasets/", datasets.dataset_list, name="datasets"),
    path("datasets/<int:pk>/", datasets.dataset_detail, name="dataset"),
    path("datasets/<int:pk>/delete/", datasets.dataset_delete, name="dataset-delete"),
    path("targets/", targets.target_list, name="targets"),
    path("targets/<str:name>/", targets.target_detail, name="target"),
    path("targets/<str:name>/check/", targets.target_check, name="target-check"),
    path("targets/<str:name>/delete/", targets.target_delete, name="target-delete"),
    path("benchmarks/new/", targets.benchmark_new, name="benchmark-new"),
    path("benchmarks/<int:pk>/", targets.benchmark_detail, name="benchmark"),
    path("runs/", runs.run_list, name="runs"),
    path("runs/new/", runs.run_new, name="run-new"),
    path("runs/compare/", compare.compare, name="compare"),
    path("runs/<int:pk>/", runs.run_detail, name="run"),
    path("runs/<int:pk>/cancel/", runs.run_cancel, name="run-cancel"),
    path("runs/<int:pk>/resume/", runs.run_resume, name="run-resume"),
    path("runs/<int:pk>/episodes.csv", runs.run_episodes_csv, name="run-episodes-csv"),
    path("runs/<int:run_pk>/files/<int:pk>/", files.artifact_download, name="artifact"),
    path("api-docs/", apidocs.api_docs, name="api-docs"),
    path("vendor/plotly.min.js", files.plotly_js, name="plotly"),
    path("favicon.ico", files.favicon, name="favicon"),
]
