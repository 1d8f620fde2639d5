"""The raw C API of libsgmv.so through cffi (ABI mode).

The declarations are read from the installed sgmv.h itself, not from a hand-kept copy.
`ffi` is ready at import; `lib` is opened on first use, so that a library that cannot be loaded
fails the first call with a clear message rather than the import. SGMV_LIBRARY, if set, names
another libsgmv.so to load.
"""
import os
import re
import threading
from pathlib import Path

import cffi

_PKG = Path(os.path.abspath(__file__)).parent
INCLUDE_DIR = _PKG / "include"
LIB_DIR = _PKG / "lib"
# find_package(sgmv CONFIG) and pkg-config files for C/C++ builds.
CMAKE_DIR = LIB_DIR / "cmake" / "sgmv"
PKGCONFIG_DIR = LIB_DIR / "pkgconfig"
# Installed beside the package; in a source checkout, csrc/include.
HEADER = INCLUDE_DIR / "sgmv.h"
if not HEADER.exists():
    INCLUDE_DIR = _PKG.parent.parent / "csrc" / "include"
    HEADER = INCLUDE_DIR / "sgmv.h"
LIBRARY = LIB_DIR / "libsgmv.so.0"


def cdef_from_header(text):
    """sgmv.h without what cffi cannot parse: preprocessor lines (integer #defines excepted),
    the C++ guards and the export macro."""
    out, skipping = [], 0
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#ifdef __cplusplus"):
            skipping = 1
            continue
        if skipping:
            skipping = 0 if s.startswith("#endif") else 1
            continue
        if s.startswith("#"):
            if re.fullmatch(r"#define\s+SGMV_\w+\s+\d+", s):
                out.append(s)
            continue
        out.append(line.replace("SGMV_API ", ""))
    return "\n".join(out)


ffi = cffi.FFI()
ffi.cdef(cdef_from_header(HEADER.read_text()))


class SgmvError(RuntimeError):
    """A failed libsgmv call: `.status` is the sgmv_status_t value, the message sgmv_last_error()."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class InvalidArgument(SgmvError, ValueError):
    """SGMV_ERROR_INVALID_ARGUMENT: an argument outside the contract."""


class UnsupportedDtype(SgmvError, TypeError):
    """SGMV_ERROR_UNSUPPORTED_DTYPE: a dtype or dtype combination the library does not serve."""


_ERRORS = {1: InvalidArgument, 2: UnsupportedDtype}


def library_path():
    return Path(os.environ.get("SGMV_LIBRARY") or LIBRARY)


_lib = None
_lock = threading.Lock()


def _load():
    global _lib
    with _lock:
        if _lib is None:
            path = library_path()
            try:
                lib = ffi.dlopen(str(path))
            except OSError as e:
                raise OSError(f"cannot load libsgmv from {path}: {e} (set SGMV_LIBRARY to another libsgmv.so)") from e
            version = lib.sgmv_version()
            if version // 10000 != lib.SGMV_VERSION_MAJOR:
                raise OSError(f"{path} is libsgmv {version}, but this binding's header is "
                              f"{lib.SGMV_VERSION_MAJOR}.x: major versions must match")
            _lib = lib
    return _lib


def __getattr__(name):
    if name == "lib":
        return _lib or _load()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check(status):
    """Raises for a non-zero status, with this thread's last error message: ValueError and
    TypeError (as InvalidArgument, UnsupportedDtype) for bad arguments, else SgmvError."""
    if status:
        lib = _lib or _load()
        raise _ERRORS.get(int(status), SgmvError)(
            int(status), ffi.string(lib.sgmv_last_error()).decode(errors="replace")
            or ffi.string(lib.sgmv_status_string(status)).decode())
