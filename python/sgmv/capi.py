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


_HEADER_TEXT = HEADER.read_text()
ffi = cffi.FFI()
ffi.cdef(cdef_from_header(_HEADER_TEXT))


def _enum(ctype):
    """{name: value} of one of sgmv.h's enums, as cffi parsed it (no library needed)."""
    return dict(ffi.typeof(ctype).relements)


# The header's enums and version, read from sgmv.h itself (never retyped here).
STATUS = _enum("sgmv_status_t")
DTYPE = _enum("sgmv_dtype_t")
PATH = _enum("sgmv_path_t")
ARG_KIND = _enum("sgmv_arg_kind_t")


def _define(name):
    m = re.search(rf"^#define\s+{name}\s+(\d+)\s*$", _HEADER_TEXT, re.MULTILINE)
    if m is None:
        raise ImportError(f"{HEADER} does not define {name}")
    return int(m.group(1))


VERSION_MAJOR, VERSION_MINOR, VERSION_PATCH = (_define(f"SGMV_VERSION_{p}") for p in ("MAJOR", "MINOR", "PATCH"))
VERSION = f"{VERSION_MAJOR}.{VERSION_MINOR}.{VERSION_PATCH}"


class SgmvError(RuntimeError):
    """Every error libsgmv and its binding raise for a call: `.status` is the sgmv_status_t value,
    the message sgmv_last_error() (or the binding's own, for what it checks before calling C).
    Bad arguments are also ValueError (InvalidArgument) or TypeError (ArgumentTypeError,
    UnsupportedDtype)."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class InvalidArgument(SgmvError, ValueError):
    """SGMV_ERROR_INVALID_ARGUMENT: an argument outside the contract."""


class ArgumentTypeError(SgmvError, TypeError):
    """An argument of the wrong Python type (not an array, a float for a count), found by the
    binding before calling the library; .status is SGMV_ERROR_INVALID_ARGUMENT."""


class UnsupportedDtype(SgmvError, TypeError):
    """SGMV_ERROR_UNSUPPORTED_DTYPE: a dtype or dtype combination the library does not serve."""


def invalid_argument(message):
    """The binding's own InvalidArgument (ValueError), for what it checks before calling C."""
    return InvalidArgument(STATUS["SGMV_ERROR_INVALID_ARGUMENT"], message)


def argument_type_error(message):
    """The binding's own ArgumentTypeError (TypeError)."""
    return ArgumentTypeError(STATUS["SGMV_ERROR_INVALID_ARGUMENT"], message)


_ERRORS = {STATUS["SGMV_ERROR_INVALID_ARGUMENT"]: InvalidArgument,
           STATUS["SGMV_ERROR_UNSUPPORTED_DTYPE"]: UnsupportedDtype}


def version_string(version):
    """sgmv_version()'s MAJOR * 10000 + MINOR * 100 + PATCH as "MAJOR.MINOR.PATCH"."""
    return f"{version // 10000}.{version // 100 % 100}.{version % 100}"


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
            if version // 10000 != VERSION_MAJOR:
                raise OSError(f"{path} is libsgmv {version_string(version)}, but this binding's header is "
                              f"{VERSION_MAJOR}.x: major versions must match")
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
        status = int(status)
        message = (ffi.string(lib.sgmv_last_error()).decode(errors="replace")
                   or ffi.string(lib.sgmv_status_string(status)).decode())
        cls = _ERRORS.get(status)
        raise (cls or SgmvError)(status, message)


def build_info():
    """What the loaded library says about its build, as a dict: "triton" (the Triton version that
    compiled its cubins), "archs", "variants", and whatever else sgmv_build_info() lists
    ("key=value" items separated by ";"). "triton" is None for a library that does not say."""
    lib = _lib or _load()
    info = {"triton": None, "archs": ffi.string(lib.sgmv_archs()).decode(), "variants": lib.sgmv_num_variants()}
    try:
        fn = lib.sgmv_build_info
    except AttributeError:  # a header or a library from before sgmv_build_info()
        return info
    info.update(parse_build_info(ffi.string(fn()).decode()))
    return info


def parse_build_info(text):
    """sgmv_build_info()'s "key=value;key=value" string as a dict."""
    items = (item.partition("=") for item in text.split(";") if item.strip())
    return {k.strip(): v.strip() for k, _, v in items}
