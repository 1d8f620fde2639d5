"""The Python binding on the CPU: what Python itself refuses (non-arrays, non-int counts, arrays
not on one CUDA device), and each library status as the exception Python raises, with C's message.
Tensors here are stand-ins with torch's methods at fake device addresses: no kernel runs."""
import re
from pathlib import Path

import pytest

import sgmv
from sgmv import binding, capi

from conftest import HAS_GPU

S = {name: getattr(capi.lib, name) for name in dir(capi.lib) if name.startswith("SGMV_")}


class Fake:
    """A tensor as the binding reads it (torch's methods), on CUDA device `device`."""

    def __init__(self, shape, dtype="float16", device=0, ptr=0x100000, strides=None):
        self.shape, self.dtype, self._device, self._ptr = tuple(shape), f"torch.{dtype}", device, ptr
        if strides is None:
            strides, s = [], 1
            for n in reversed(self.shape):
                strides.insert(0, s)
                s *= n
        self._strides = tuple(strides)

    def data_ptr(self):
        return self._ptr

    def stride(self):
        return self._strides

    def get_device(self):
        return self._device


def call(**over):
    a = dict(inputs=Fake((10, 16)), lora_b_weights=Fake((2, 64, 16)), output_tensor=Fake((10, 64)),
             b_seq_start_loc=Fake((2,), "int32"), seq_len_tensor=Fake((2,), "int32"),
             lora_indices_tensor=Fake((2,), "int32"), batches=2, max_seq_length=5, add_inputs=True, stream=0)
    a.update(over)
    return sgmv.sgmv_expand(**a)


@pytest.mark.parametrize("over,exc,words", [
    (dict(inputs=[[1.0]]), TypeError, "inputs must be a torch tensor or an array with __cuda_array_interface__"),
    (dict(batches=2.0), TypeError, "batches must be an int"),
    (dict(batches=True), TypeError, "batches must be an int"),
    (dict(max_seq_length="5"), TypeError, "max_seq_length must be an int"),
    (dict(add_inputs=1), TypeError, "add_inputs must be a bool"),
    (dict(stream=1.5), TypeError, "stream must be an int handle"),
    (dict(output_tensor=Fake((10, 64), device=-1)), ValueError, "CUDA tensors on one device"),
    (dict(lora_indices_tensor=Fake((2,), "int32", device=1)), ValueError, "lora_indices_tensor: cuda:1"),
    (dict(inputs=Fake((1, 2, 3, 4, 5))), ValueError, "at most 4"),
])
def test_python_side_errors(over, exc, words):
    with pytest.raises(exc) as e:
        call(**over)
    assert words in str(e.value)
    # raised by the binding before the library is called, as the library's own errors are: one except catches all
    assert isinstance(e.value, sgmv.SgmvError) and e.value.status == capi.STATUS["SGMV_ERROR_INVALID_ARGUMENT"]


@pytest.mark.parametrize("over,status,exc,words", [
    (dict(inputs=Fake((10, 8))), "SGMV_ERROR_INVALID_ARGUMENT", ValueError, "inputs has rank 8"),
    (dict(output_tensor=Fake((9, 64))), "SGMV_ERROR_INVALID_ARGUMENT", ValueError, "output must be"),
    (dict(lora_b_weights=Fake((2, 3, 64, 16))), "SGMV_ERROR_INVALID_ARGUMENT", ValueError, "weights must be"),
    (dict(lora_b_weights=Fake((2, 64, 300)), inputs=Fake((10, 300))), "SGMV_ERROR_INVALID_ARGUMENT", ValueError,
     "rank must be in [1, 256]"),
    (dict(output_tensor=Fake((10, 64), strides=(64, 2))), "SGMV_ERROR_INVALID_ARGUMENT", ValueError, "unit stride"),
    (dict(seq_len_tensor=Fake((1,), "int32")), "SGMV_ERROR_INVALID_ARGUMENT", ValueError, "fewer than batches"),
    (dict(max_seq_length=-1), "SGMV_ERROR_INVALID_ARGUMENT", ValueError, "max_seq_length must be >= 0"),
    (dict(batches=-1), "SGMV_ERROR_INVALID_ARGUMENT", ValueError, "batches must be in [0, 2^30)"),
    (dict(inputs=Fake((10, 16), "bfloat16")), "SGMV_ERROR_UNSUPPORTED_DTYPE", TypeError, "unsupported dtypes"),
    (dict(lora_b_weights=Fake((2, 64, 16), "float32")), "SGMV_ERROR_UNSUPPORTED_DTYPE", TypeError, "weights_dtype float32"),
    (dict(seq_len_tensor=Fake((2,), "int64")), "SGMV_ERROR_UNSUPPORTED_DTYPE", TypeError, "share one dtype"),
    (dict(b_seq_start_loc=Fake((2,), "float32")), "SGMV_ERROR_UNSUPPORTED_DTYPE", TypeError, "int32 or int64"),
])
def test_library_statuses_as_python_exceptions(over, status, exc, words):
    with pytest.raises(exc) as e:
        call(**over)
    assert isinstance(e.value, sgmv.SgmvError) and e.value.status == S[status]
    assert words in str(e.value) and str(e.value).startswith("sgmv_expand: ")


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU: the no-driver path cannot be observed")
def test_valid_call_reaches_the_driver_status():
    with pytest.raises(sgmv.SgmvError) as e:
        call()
    assert e.value.status in (S["SGMV_ERROR_NO_DRIVER"], S["SGMV_ERROR_NO_DEVICE"])
    assert not isinstance(e.value, (ValueError, TypeError))


def test_nothing_to_do_succeeds_without_a_driver():
    out = Fake((0, 64))
    assert call(inputs=Fake((0, 16)), output_tensor=out) is out
    assert call(batches=0) is not None


def test_plan_argument_errors():
    with pytest.raises(ValueError, match="batch_plan must be a contiguous 1-D int32 array"):
        call(batch_plan=Fake((100,), "float32"))
    with pytest.raises(ValueError, match="batch_plan_bytes 400 is smaller"):
        call(batch_plan=Fake((100,), "int32"))
    with pytest.raises(ValueError, match="no plan serves max_batches = 5 and max_tokens = -1"):
        sgmv.batch_plan_bytes(5, -1)
    with pytest.raises(TypeError, match="pass out="):
        sgmv.batch_plan(Fake((2,), "int32"), Fake((2,), "int32"), Fake((2,), "int32"), 2, 10, 2)


def test_every_status_has_a_string():
    for status in range(8):
        assert capi.ffi.string(capi.lib.sgmv_status_string(status)).decode() != "unknown status"


def test_enums_and_version_come_from_the_header():
    """capi's enums are sgmv.h's (parsed by cffi, no retyped number), and agree with the library."""
    for table, prefix in ((capi.STATUS, "SGMV_SUCCESS"), (capi.DTYPE, "SGMV_DTYPE_"), (capi.PATH, "SGMV_PATH_"),
                          (capi.ARG_KIND, "SGMV_ARG_")):
        assert table and all(getattr(capi.lib, name) == value for name, value in table.items()), prefix
    assert capi.STATUS["SGMV_ERROR_INVALID_ARGUMENT"] == S["SGMV_ERROR_INVALID_ARGUMENT"]
    assert binding._DTYPE_NAMES == {"float16": capi.lib.SGMV_DTYPE_FLOAT16, "bfloat16": capi.lib.SGMV_DTYPE_BFLOAT16,
                                    "float32": capi.lib.SGMV_DTYPE_FLOAT32, "int32": capi.lib.SGMV_DTYPE_INT32,
                                    "int64": capi.lib.SGMV_DTYPE_INT64,
                                    "float8_e4m3fn": capi.lib.SGMV_DTYPE_FLOAT8_E4M3FN}
    assert capi.VERSION == sgmv.__version__
    v = capi.lib.sgmv_version()
    assert (capi.VERSION_MAJOR, capi.VERSION_MINOR, capi.VERSION_PATCH) == (v // 10000, v // 100 % 100, v % 100)
    sources = "".join((Path(binding.__file__).parent / f).read_text() for f in ("binding.py", "capi.py"))
    assert not re.search(r"_DTYPE_NAMES = \{\"float16\": 0|_ERRORS = \{1:", sources)


def test_every_refusal_is_an_sgmv_error():
    """One `except sgmv.SgmvError` catches what the binding and the library refuse alike."""
    for over in (dict(batches=2.0), dict(output_tensor=Fake((10, 64), device=-1)), dict(inputs=Fake((10, 8))),
                 dict(inputs=Fake((10, 16), "bfloat16"))):
        with pytest.raises(sgmv.SgmvError):
            call(**over)
    with pytest.raises(sgmv.SgmvError):
        sgmv.batch_plan_bytes(5, -1)


def test_build_info_parses_the_library_string():
    assert capi.parse_build_info("triton=3.6.0; archs=80,90 ;line_info=0") == {
        "triton": "3.6.0", "archs": "80,90", "line_info": "0"}
    info = sgmv.build_info()
    assert set(info) >= {"triton", "archs", "variants"} and info["variants"] == capi.lib.sgmv_num_variants()
