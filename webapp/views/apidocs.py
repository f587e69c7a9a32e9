"""A readable page of the JSON API, generated from the OpenAPI schema (the schema is the one source)."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from webapp.openapi import schema


@login_required
def api_docs(request: HttpRequest) -> HttpResponse:
    """Every endpoint with its method, summary and parameters, and how to authenticate from a script."""
    spec = schema()
    ops = []
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method.startswith("x-") or method == "parameters":
                continue
            params = [p["name"] for p in item.get("parameters", []) + op.get("parameters", [])]
            body = op.get("requestBody", {}).get("content", {})
            ops.append(
                {
                    "method": method.upper(),
                    "path": path,
                    "summary": op.get("summary", ""),
                    "params": params,
                    "body": ", ".join(body.keys()),
                    "tag": (op.get("tags") or [""])[0],
                }
            )
    base = request.build_absolute_uri("/").rstrip("/")
    return render(request, "api_docs.html", {"ops": ops, "spec": spec, "base": base})
