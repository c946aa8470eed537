"""Import imgaug 0.4.0 on NumPy >= 1.24, whose removed aliases it still uses.

imgaug (the library NNoculation's own augment.py uses for its noise) refers to
``np.bool``, ``np.complex`` and, on NumPy 2, ``np.sctypes``. We restore exactly those
aliases, only where missing, and only when imgaug is wanted, before importing it.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

_ALIASES = {"bool": bool, "complex": complex, "float": float, "int": int, "object": object}


def import_augmenters() -> ModuleType:
    """``imgaug.augmenters``, importable on this project's NumPy."""
    for name, value in _ALIASES.items():
        if name not in np.__dict__:
            setattr(np, name, value)
    if "sctypes" not in np.__dict__:
        np.sctypes = {
            "int": [np.int8, np.int16, np.int32, np.int64],
            "uint": [np.uint8, np.uint16, np.uint32, np.uint64],
            "float": [np.float16, np.float32, np.float64],
            "complex": [np.complex64, np.complex128],
            "others": [bool, object, bytes, str, np.void],
        }
    import imgaug.augmenters as iaa

    return iaa
