"""Shared test setup.

Torch runs on one thread in tests: on a 2-core machine that is also running a Redis, a Celery worker and
other test processes, torch's default thread pool spin-waits against them and gets many times slower.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
