"""The Django project: settings, models (runs, episodes, targets, artifacts), views, API, Channels consumers.

It stores, schedules and shows; it computes no compression itself. Pages never import torch (the engine is
imported only inside Celery tasks in ``workers/``, and lazily by a few management commands).
"""
