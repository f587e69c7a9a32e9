"""Celery app and tasks: thin wrappers that call ``compression/`` and write results to the database.

May import ``compression`` (lazily, inside tasks: the worker's main process and the web process never load
torch) and ``webapp`` models. See README.md for the tasks, queues and fault handling.
"""
