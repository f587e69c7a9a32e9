"""Dashboard pages: each view parses the request, calls one thing (a query, a form's ``save``, a dispatch
call) and renders a template. No engine import at request time (pages must stay fast; see docs/dashboard.md).

Modules: ``home``, ``models``, ``datasets``, ``targets``, ``runs`` (list, new, live page, cancel/resume),
``compare``, ``files`` (permission-checked downloads and the local Plotly.js), ``apidocs``; ``runinfo``
shapes stored run data for display (shared with the API).
"""
