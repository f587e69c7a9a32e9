"""Who may see and control what: owners see their own objects, staff see everything, others get a 404.

A 404 (not a 403) for somebody else's object, so that ids do not reveal what exists. Built-in datasets and
targets (owner null) are visible to every signed-in user, and only staff may change them.

The JSON API accepts the browser's session (with CSRF on unsafe methods, as the pages have) or HTTP Basic
credentials of a Django user (for scripts; no CSRF since no cookie is involved). Use HTTPS in production
when scripting with Basic auth.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

from django.contrib.auth import authenticate
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import Model, Q, QuerySet
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.csrf import csrf_exempt

from webapp.models import Benchmark, Dataset, Run, RunArtifact, Target, UploadedModel

M = TypeVar("M", bound=Model)

# Models whose rows belong to one user (the owner path from the row to its user).
_OWNER_FIELD: dict[type[Model], str] = {
    UploadedModel: "owner",
    Run: "owner",
    Benchmark: "owner",
    RunArtifact: "run__owner",
    Dataset: "owner",
    Target: "owner",
}
# Models with shared rows (owner null) that everybody may read.
_SHARED_WHEN_OWNERLESS = (Dataset, Target)


def visible(model: type[M], user: AbstractBaseUser | AnonymousUser) -> QuerySet[M]:
    """Rows of ``model`` that ``user`` may see: all for staff, else their own (plus shared built-ins)."""
    qs = model.objects.all()
    if not user.is_authenticated:
        return qs.none()
    if user.is_staff:
        return qs
    field = _OWNER_FIELD[model]
    cond = Q(**{field: user})
    if model in _SHARED_WHEN_OWNERLESS:
        cond |= Q(**{f"{field}__isnull": True})
    return qs.filter(cond)


def get_visible_or_404(model: type[M], user: AbstractBaseUser | AnonymousUser, **lookup: Any) -> M:
    """The row matching ``lookup`` if ``user`` may see it, else Http404 (also when it does not exist)."""
    try:
        return visible(model, user).get(**lookup)
    except model.DoesNotExist:
        raise Http404(f"no {model._meta.verbose_name} matches") from None


def can_change(obj: Model, user: AbstractBaseUser | AnonymousUser) -> bool:
    """May ``user`` modify or delete ``obj``: its owner, or staff; shared built-ins only by staff."""
    if not user.is_authenticated:
        return False
    if user.is_staff:
        return True
    owner_id = getattr(obj, "owner_id", None)
    if owner_id is None and isinstance(obj, RunArtifact):
        owner_id = obj.run.owner_id
    return owner_id is not None and owner_id == user.pk


def _basic_user(request: HttpRequest) -> AbstractBaseUser | None:
    header = request.META.get("HTTP_AUTHORIZATION", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    username, sep, password = decoded.partition(":")
    if not sep:
        return None
    user = authenticate(request, username=username, password=password)
    return user if user is not None and user.is_active else None


def api_error(status: int, message: str, **extra: Any) -> JsonResponse:
    """The API's one error shape: ``{"error": message, ...}`` with an HTTP status."""
    return JsonResponse({"error": message, **extra}, status=status)


def api_view(
    methods: tuple[str, ...],
) -> Callable[[Callable[..., HttpResponse]], Callable[..., HttpResponse]]:
    """Decorate a JSON API view: allowed methods, authentication (session or Basic), CSRF for sessions.

    Unauthenticated requests get 401 with a ``WWW-Authenticate`` header (scripts then retry with Basic
    credentials); Http404 raised inside becomes a JSON 404.
    """

    def decorate(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        @csrf_exempt  # checked below, only for cookie-authenticated requests
        @wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if request.method not in methods:
                resp = api_error(405, f"method {request.method} not allowed", allowed=list(methods))
                resp["Allow"] = ", ".join(methods)
                return resp
            if "HTTP_AUTHORIZATION" in request.META:
                user = _basic_user(request)
                if user is None:
                    return _unauthorized("invalid credentials")
                request.user = user
            elif request.user.is_authenticated:
                if request.method not in ("GET", "HEAD", "OPTIONS"):
                    reason = CsrfViewMiddleware(lambda r: HttpResponse()).process_view(request, None, (), {})
                    if reason is not None:
                        return api_error(
                            403, "CSRF check failed: send the X-CSRFToken header, or use Basic auth"
                        )
            else:
                return _unauthorized("authentication required")
            try:
                return view(request, *args, **kwargs)
            except Http404 as exc:
                return api_error(404, str(exc) or "not found")

        return wrapper

    return decorate


def _unauthorized(message: str) -> JsonResponse:
    resp = api_error(401, message + ": sign in, or send HTTP Basic credentials")
    resp["WWW-Authenticate"] = 'Basic realm="compression-studio", charset="UTF-8"'
    return resp
