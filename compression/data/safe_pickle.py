"""Read the CIFAR-10 python batches without executing code.

The batches are pickles: a dict of byte strings, lists of ints and one numpy array. An ordinary
``pickle.load`` would call any global the file names (``os.system`` included), so this unpickler resolves
only the three globals a numpy array needs and refuses every other one before anything is called.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np

from compression.errors import DatasetError

try:  # numpy 2 moved the array internals to numpy._core; numpy 1 only has numpy.core
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct

# Both module spellings map to the objects imported above, so loading a numpy-1-era file never imports
# the deprecated ``numpy.core`` shim and never imports anything the file names.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")


def load_array_pickle(data: bytes, what: str) -> Any:
    """Unpickle ``data`` allowing only plain containers, numbers, strings and numpy arrays.

    ``what`` names the file in the error message. Python 2 strings (the CIFAR batches were written by
    Python 2) come back as ``bytes``. Raises ``DatasetError`` when the pickle names any other global,
    uses persistent ids, or is corrupt; nothing in the file is executed in either case.
    """
    try:
        return _ArrayOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        if "is not allowed" in str(exc):
            raise DatasetError(
                f"{what} is a pickle that would run code or build objects other than numpy arrays ({exc}); refused",
                "use the original CIFAR-10 python archive from https://www.cs.toronto.edu/~kriz/cifar.html",
            ) from None
        raise DatasetError(f"{what} is not a readable pickle ({exc})", "the file is corrupt") from None
    except Exception as exc:  # a hostile or damaged pickle can fail in many ways; all mean unreadable
        raise DatasetError(
            f"{what} is not a readable pickle ({type(exc).__name__}: {exc})",
            "the file is corrupt or truncated",
        ) from None
