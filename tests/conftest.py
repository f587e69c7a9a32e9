"""Shared test setup.

Torch runs on one thread in tests: on a 2-core machine that is also running a Redis, a Celery worker and
other test processes, torch's default thread pool spin-waits against them and gets many times slower.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402


def _train(tmp_path_factory, arch: str, shape: tuple[int, int, int], epochs: int) -> dict:
    from compression.pipeline import train_baseline

    out = tmp_path_factory.mktemp(f"trained-{arch}") / f"{arch}.pt2"
    res = train_baseline(arch, "digits", str(out), epochs=epochs, input_shape=shape, seed=0)
    return {
        "pt2": str(out),
        "weights": res["weights"],
        "weights_spec": f"zoo:{arch}@{res['weights']}",
        "test_top1": res["test"]["top1"],
    }


@pytest.fixture(scope="session")
def trained_small_cnn(tmp_path_factory):
    """A small CNN trained on digits at 1x8x8 (a few seconds): .pt2, weights and the zoo spec."""
    return _train(tmp_path_factory, "small_cnn", (1, 8, 8), epochs=4)


# Service fixtures (own Redis on a free port, real Celery workers, a live daphne): tests/conftest_services.py
# (``import *`` skips names with a leading underscore: the autouse guard that keeps every other test off the
# machine's Redis is imported by name, or it would silently not exist)
from tests.conftest_services import *  # noqa: E402, F401, F403
from tests.conftest_services import _keep_off_the_machines_redis  # noqa: E402, F401
