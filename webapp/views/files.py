"""Files: a run's artifacts and a model's uploaded file, streamed after a permission check, and the local
Plotly.js (from the installed ``plotly`` package: no CDN, no copy in the repository)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from django.contrib.auth.decorators import login_required
from django.http import FileResponse, Http404, HttpRequest, HttpResponse
from django.views.decorators.cache import cache_control
from django.views.decorators.gzip import gzip_page
from django.views.decorators.http import condition

from webapp.models import RunArtifact, UploadedModel
from webapp.permissions import get_visible_or_404


def open_artifact(request: HttpRequest, run_pk: int, pk: int) -> FileResponse:
    """The artifact as an attachment if the user may see its run; 404 otherwise or when the file is gone."""
    art = get_visible_or_404(RunArtifact, request.user, pk=pk, run_id=run_pk)
    try:
        path = art.abspath
    except ValueError:
        raise Http404("artifact path is invalid") from None
    if not path.is_file():
        raise Http404(f"{art.filename} is no longer on disk")
    resp = FileResponse(open(path, "rb"), as_attachment=True, filename=art.filename)
    resp["X-Content-Type-Options"] = "nosniff"
    return resp


@login_required
def artifact_download(request: HttpRequest, run_pk: int, pk: int) -> FileResponse:
    """Download a run's file (the page's links)."""
    return open_artifact(request, run_pk, pk)


@login_required
def model_file(request: HttpRequest, pk: int) -> FileResponse:
    """Download the model's own file (the uploaded or trained ``.pt2``, or the zoo weights)."""
    m = get_visible_or_404(UploadedModel, request.user, pk=pk)
    f = m.file or m.weights_file
    if not f or not Path(f.path).is_file():
        raise Http404("this model has no file")
    return FileResponse(open(f.path, "rb"), as_attachment=True, filename=Path(f.name).name)


def plotly_path() -> Path:
    """``plotly.min.js`` inside the installed plotly package (found without importing plotly)."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        raise Http404("the plotly package is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise Http404("plotly.min.js is missing from the plotly package")
    return path


def _plotly_etag(request: HttpRequest) -> str:
    p = plotly_path()
    st = p.stat()
    return f"{st.st_size}-{int(st.st_mtime)}"


@gzip_page
@condition(etag_func=_plotly_etag)
@cache_control(max_age=86400, public=True)
def plotly_js(request: HttpRequest) -> FileResponse:
    """Serve Plotly.js from the installed package (cached a day; revalidated by ETag; gzipped for a browser that
    accepts it: 4.8 MB become about 1.4 MB)."""
    return FileResponse(open(plotly_path(), "rb"), content_type="text/javascript; charset=utf-8")


# The page icon. base.html links it, and browsers ask for /favicon.ico on their own: a 404 there would fill the
# server's log and the browser's console.
FAVICON_SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
    '<rect width="16" height="16" rx="4" fill="#4f8cff"/></svg>'
)


@cache_control(max_age=86400, public=True)
def favicon(request: HttpRequest) -> HttpResponse:
    """The page icon as SVG (what browsers fetch from /favicon.ico when a page does not stop them)."""
    return HttpResponse(FAVICON_SVG, content_type="image/svg+xml")
