"""Formatting for the dashboard's templates: numbers, sizes, durations, status pills, nav state.

Pure presentation: no database access and nothing from the engine.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from django import template
from django.utils import timezone
from django.utils.html import format_html

register = template.Library()


def _num(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


@register.filter
def pct(value: Any, digits: int = 1) -> str:
    """0.9123 -> '91.2%' (a fraction shown as a percentage); '—' when missing."""
    f = _num(value)
    return "—" if f is None else f"{100 * f:.{int(digits)}f}%"


@register.filter
def ms(value: Any) -> str:
    """Milliseconds with a precision that suits the magnitude; '—' when missing."""
    f = _num(value)
    if f is None:
        return "—"
    if f >= 100:
        return f"{f:.0f} ms"
    if f >= 1:
        return f"{f:.2f} ms"
    return f"{f * 1000:.0f} µs"


@register.filter
def si(value: Any, digits: int = 2) -> str:
    """1234567 -> '1.23M' (counts like MACs and parameters)."""
    f = _num(value)
    if f is None:
        return "—"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(f) >= scale:
            return f"{f / scale:.{int(digits)}f}{unit}"
    return f"{f:.0f}" if float(f).is_integer() else f"{f:.{int(digits)}f}"


@register.filter
def bytesize(value: Any) -> str:
    """A byte count in binary units: 1536 -> '1.5 KiB'."""
    f = _num(value)
    if f is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(f) < 1024 or unit == "GiB":
            return f"{f:.0f} {unit}" if unit == "B" else f"{f:.1f} {unit}"
        f /= 1024
    return f"{f:.1f} GiB"


@register.filter
def num(value: Any, digits: int = 3) -> str:
    """A float with ``digits`` decimals, '—' when missing."""
    f = _num(value)
    return "—" if f is None else f"{f:.{int(digits)}f}"


@register.filter
def times(value: Any) -> str:
    """A ratio as a speed-up: 2.345 -> '2.35×'."""
    f = _num(value)
    return "—" if f is None else f"{f:.2f}×"


@register.filter
def duration(value: Any) -> str:
    """Seconds (or a timedelta) as '1h 02m', '3m 05s' or '12.3s'."""
    if isinstance(value, dt.timedelta):
        value = value.total_seconds()
    f = _num(value)
    if f is None:
        return "—"
    s = int(round(f))
    if f < 60:
        return f"{f:.1f}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {(s % 3600) // 60:02d}m"


@register.filter
def since(start: Any, end: Any = None) -> str:
    """Elapsed time from ``start`` to ``end`` (or now) as a duration."""
    if not isinstance(start, dt.datetime):
        return "—"
    stop = end if isinstance(end, dt.datetime) else timezone.now()
    return duration((stop - start).total_seconds())


@register.filter
def pill(status: Any) -> str:
    """A status word as a coloured pill."""
    text = str(status or "unknown")
    return format_html('<span class="pill {}">{}</span>', text.lower().replace(" ", "-"), text)


@register.filter
def yesno_tag(value: Any) -> str:
    """True/False as a small green/grey tag."""
    return format_html('<span class="tag {}">{}</span>', "yes" if value else "no", "yes" if value else "no")


@register.filter
def get(mapping: Any, key: Any) -> Any:
    """``mapping|get:key`` for dict lookups with a variable key."""
    if isinstance(mapping, dict):
        return mapping.get(key)
    return None


@register.filter
def shape(value: Any) -> str:
    """[3, 32, 32] -> '3×32×32'."""
    if isinstance(value, (list, tuple)) and value:
        return "×".join(str(v) for v in value)
    return "—"


@register.simple_tag(takes_context=True)
def nav_active(context: dict, prefix: str, exact: bool = False) -> str:
    """'active' when the current path is (or starts with) ``prefix``: highlights the sidebar entry."""
    request = context.get("request")
    path = getattr(request, "path", "")
    hit = path == prefix if exact else path.startswith(prefix)
    return "active" if hit else ""


@register.filter
def fields_with_errors(form: Any) -> list[Any]:
    """The visible bound fields of ``form`` that have errors, in the form's order (the error summary's list)."""
    return [f for f in form.visible_fields() if f.errors]


@register.filter
def measured(result: Any) -> str:
    """A stored measurement's median in its unit: a device's time (``ms``), or the analytic target's cost in its
    own unit (GBOPs, ...), which is not a time; a noisy time (std/mean over 0.3) says so."""
    if not isinstance(result, dict) or _num(result.get("median_ms")) is None:
        return "—"
    details = result.get("details") or {}
    if details.get("analytic"):
        return f"{float(result['median_ms']):.4g} {details.get('unit', '')} (analytic, not a time)"
    text = ms(result["median_ms"])
    mean, std = _num(result.get("mean_ms")), _num(result.get("std_ms"))
    if mean and std is not None and std / mean > NOISY_CV:
        text += f" (noisy: std {std / mean:.0%} of the mean)"
    return text


NOISY_CV = 0.3  # as the latency table's (compression.targets.table.NOISY_CV): flagged, not hidden
