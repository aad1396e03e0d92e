"""A restricted unpickler for dataset files (``refs(unc).p``): plain containers only.

Downloaded pickles are untrusted input; ``pickle.load`` on them can run any code.
Lists, dicts, tuples, strings, numbers, bools and ``None`` need no global lookup, so
refusing every global except ``set``/``frozenset`` admits exactly the plain data.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

_ALLOWED = {
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("__builtin__", "set"),  # Python 2 pickles
    ("__builtin__", "frozenset"),
    ("_codecs", "encode"),  # how protocols 0-2 spell a bytes object; it only builds bytes
}


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asked for a global that plain data never needs."""


class _PlainDataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"refusing to load global {module}.{name}: dataset pickles may only hold plain containers"
        )


def load_plain_pickle(path: str | Path) -> Any:
    """Load a pickle that may only contain plain containers; raises :class:`UnsafePickleError`."""
    data = Path(path).read_bytes()
    # refCOCO's pickles were written by Python 2; their str objects are decoded as UTF-8.
    return _PlainDataUnpickler(io.BytesIO(data), encoding="utf-8").load()
