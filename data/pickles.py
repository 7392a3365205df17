"""Reading pickle files from elsewhere without running their code.

A pickle is a program: unpickling calls whatever importable callable the file names (``os.system`` included).
`load_plain_pickle` reads pickles through an unpickler that resolves no global except the few that older
protocols use to build sets, complex numbers and bytes and the two numpy needs to rebuild a numeric scalar,
each replaced by a constructor that takes plain arguments only. What comes back is built only from plain
containers (dict, list, tuple, set, frozenset), numbers, str, bytes, bool and None, plus numpy scalars of a
numeric dtype. That is all the pickles
the ICMR 2021 authors publish hold (``cells_assignments.pkl``: {component: set of rows};
``initial_mu_kappa.pkl``: a list of (lat, lon) tuples of numpy float64). Anything else is refused with a
ValueError naming the file and the global it asked for.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any, Union

import numpy as np

# Where numpy 1.x and 2.x pickle the constructor of a scalar from (dtype, raw bytes).
_SCALAR_GLOBALS = {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}
_DTYPE_GLOBAL = ("numpy", "dtype")
# Numeric dtype kinds a scalar may have: bool, signed and unsigned integers, floats, complex numbers.
_NUMERIC_KINDS = "biufc"
MAX_PICKLE_BYTES = 1 << 30


def _numeric_dtype(spec: Any, *args: Any) -> np.dtype:
    """``numpy.dtype(spec, ...)`` for a numeric type code only (``'f8'``, ``'i4'``...)."""
    if not isinstance(spec, str):
        raise pickle.UnpicklingError(f"numpy.dtype({spec!r}) refused: only numeric type codes are admitted")
    try:
        dtype = np.dtype(spec)
    except TypeError as err:
        raise pickle.UnpicklingError(f"numpy.dtype({spec!r}) refused: {err}") from None
    if dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise pickle.UnpicklingError(f"numpy.dtype({spec!r}) refused: not a numeric scalar type")
    return dtype


def _numeric_scalar(dtype: Any, data: Any = None) -> np.generic:
    """The numpy scalar of ``dtype`` whose raw bytes are ``data``."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in _NUMERIC_KINDS:
        raise pickle.UnpicklingError(f"numpy scalar of {dtype!r} refused: not a numeric dtype")
    if data is None:
        return dtype.type(0)
    if isinstance(data, str):  # protocol 0-2 files store the bytes as latin-1 text
        data = data.encode("latin-1")
    if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
        raise pickle.UnpicklingError(
            f"numpy scalar of {dtype} refused: expected {dtype.itemsize} raw bytes, got {type(data).__name__}"
        )
    return np.frombuffer(bytes(data), dtype=dtype)[0]


def _plain_set(items: Any = ()) -> set:
    return set(_plain_iterable(items, "set"))


def _plain_frozenset(items: Any = ()) -> frozenset:
    return frozenset(_plain_iterable(items, "frozenset"))


def _plain_iterable(items: Any, what: str) -> Any:
    if not isinstance(items, (list, tuple, set, frozenset)):
        raise pickle.UnpicklingError(
            f"{what}() of a {type(items).__name__} refused: expected a list or tuple"
        )
    return items


def _plain_complex(real: Any = 0.0, imag: Any = 0.0) -> complex:
    if not all(isinstance(x, (int, float)) for x in (real, imag)):
        raise pickle.UnpicklingError("complex() refused: expected two numbers")
    return complex(real, imag)


def _latin1_bytes(text: Any, encoding: Any = "utf-8") -> bytes:
    """``_codecs.encode(text, 'latin1')``: how protocols 0-2 store bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode refused: only str to latin-1 bytes is admitted")
    return text.encode("latin-1")


# Globals protocols 0-3 use to build plain containers and numbers, mapped to constructors that accept only
# plain arguments.
_BUILTINS = {
    "set": _plain_set,
    "frozenset": _plain_frozenset,
    "complex": _plain_complex,
}


class _PlainUnpickler(pickle.Unpickler):
    """Resolves only the constructors of plain containers, numbers, bytes and numeric numpy scalars, each
    wrapped to accept plain arguments only; every other global raises."""

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name in _BUILTINS:
            return _BUILTINS[name]
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        if (module, name) in _SCALAR_GLOBALS:
            return _numeric_scalar
        if (module, name) == _DTYPE_GLOBAL:
            return _numeric_dtype
        raise _RefusedGlobal(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise _RefusedGlobal(f"persistent id {pid!r}")


class _RefusedGlobal(pickle.UnpicklingError):
    """A global (or persistent id) the file asked for that is not admitted."""


def loads_plain_pickle(data: bytes, *, source: str = "<bytes>") -> Any:
    """Unpickle ``data`` admitting only plain containers, numbers, str, bytes, bool, None and numeric numpy
    scalars.

    Args:
        data: the pickle's bytes.
        source: what to call the data in error messages (a file name).

    Raises:
        ValueError: the pickle names any other global (``os.system``, a class, ``numpy.ndarray``...), the
            message naming ``source`` and the refused global; or the data is not a valid pickle.
    """
    try:
        return _PlainUnpickler(io.BytesIO(data)).load()
    except _RefusedGlobal as err:
        raise ValueError(
            f"{source}: refused to unpickle the global {err}; only plain containers (dict, list, tuple, set, "
            "frozenset), numbers, str, bytes, bool, None and numeric numpy scalars are admitted"
        ) from None
    except pickle.UnpicklingError as err:
        raise ValueError(f"{source}: refused or malformed pickle ({err})") from None
    except (EOFError, IndexError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
        # What a truncated or corrupt pickle raises from inside the unpickler.
        raise ValueError(f"{source}: not a valid pickle ({type(err).__name__}: {err})") from None


def load_plain_pickle(path: Union[str, os.PathLike]) -> Any:
    """Read a pickle file through the restricted unpickler of `loads_plain_pickle`.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is larger than 1 GiB, is not a valid pickle, or names a global other than
            numpy's numeric-scalar constructors (the file and the global named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pickle file not found: {path}")
    size = path.stat().st_size
    if size > MAX_PICKLE_BYTES:
        raise ValueError(f"{path}: {size} bytes; pickles larger than {MAX_PICKLE_BYTES} bytes are not read")
    return loads_plain_pickle(path.read_bytes(), source=str(path))
