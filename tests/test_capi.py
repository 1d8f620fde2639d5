"""libsgmv.so and its C ABI, without a GPU: loading, validation statuses, the no-driver path,
the header in C and C++, a C program linked against it, exported and imported symbols, and
the cubin inventory."""
import ctypes.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import sgmv
from sgmv import capi
from sgmv.capi import ffi

from conftest import HAS_GPU, aot_variants

LIB = capi.library_path()
HERE = Path(__file__).resolve().parent
S = {name: getattr(capi.lib, name) for name in dir(capi.lib) if name.startswith("SGMV_")}


def nvidia_tool(name):
    import triton.backends.nvidia as nv
    return str(Path(nv.__file__).parent / "bin" / name)


def valid_args(**over):
    """Arguments that pass validation (fake device addresses: the call must stop before using them)."""
    a = ffi.new("sgmv_expand_args_t *")
    capi.lib.sgmv_expand_args_init(a)
    fields = dict(
        inputs=0x10000, inputs_dtype=S["SGMV_DTYPE_FLOAT16"],
        inputs_row_stride=16, weights=0x20000, weights_dtype=S["SGMV_DTYPE_FLOAT16"], weights_lora_stride=64 * 16,
        weights_row_stride=16, output=0x30000, output_dtype=S["SGMV_DTYPE_FLOAT16"], output_row_stride=64,
        total_tokens=10, hidden=64, rank=16, num_loras=2, seq_start=0x40000, seq_len=0x50000,
        lora_indices=0x60000, metadata_dtype=S["SGMV_DTYPE_INT32"], batches=2, max_seq_length=5, add_inputs=1)
    fields.update(over)
    for k, v in fields.items():
        setattr(a, k, ffi.cast("void *", v) if k in ("inputs", "weights", "output", "seq_start", "seq_len",
                                                       "lora_indices") else v)
    return a


def call(a):
    status = capi.lib.sgmv_expand(a)
    return status, ffi.string(capi.lib.sgmv_last_error()).decode()


def test_loads_and_reports_inventory():
    assert capi.lib.sgmv_version() == S["SGMV_VERSION"] == 10000 * S["SGMV_VERSION_MAJOR"] + \
        100 * S["SGMV_VERSION_MINOR"] + S["SGMV_VERSION_PATCH"]
    archs = ffi.string(capi.lib.sgmv_archs()).decode()
    assert archs == ",".join(map(str, aot_variants.ARCHS))
    assert capi.lib.sgmv_num_variants() == len(list(aot_variants.variants()))
    for status in range(8):
        assert ffi.string(capi.lib.sgmv_status_string(status)).decode() != "unknown status"
    assert ffi.string(capi.lib.sgmv_status_string(99)).decode() == "unknown status"


BAD = [  # (field overrides, expected status, a word of the message)
    (dict(struct_size=8), "SGMV_ERROR_INVALID_ARGUMENT", "struct_size"),
    (dict(inputs=0), "SGMV_ERROR_INVALID_ARGUMENT", "must not be NULL"),
    (dict(weights=0), "SGMV_ERROR_INVALID_ARGUMENT", "must not be NULL"),
    (dict(output=0), "SGMV_ERROR_INVALID_ARGUMENT", "must not be NULL"),
    (dict(seq_start=0), "SGMV_ERROR_INVALID_ARGUMENT", "must not be NULL"),
    (dict(seq_len=0), "SGMV_ERROR_INVALID_ARGUMENT", "must not be NULL"),
    (dict(lora_indices=0), "SGMV_ERROR_INVALID_ARGUMENT", "must not be NULL"),
    (dict(total_tokens=-1), "SGMV_ERROR_INVALID_ARGUMENT", "total_tokens"),
    (dict(hidden=0), "SGMV_ERROR_INVALID_ARGUMENT", "hidden"),
    (dict(hidden=-5), "SGMV_ERROR_INVALID_ARGUMENT", "hidden"),
    (dict(rank=0), "SGMV_ERROR_INVALID_ARGUMENT", "rank"),
    (dict(rank=257, inputs_row_stride=257, weights_row_stride=257, weights_lora_stride=64 * 257),
     "SGMV_ERROR_INVALID_ARGUMENT", "rank"),
    (dict(num_loras=0), "SGMV_ERROR_INVALID_ARGUMENT", "num_loras"),
    (dict(batches=-1), "SGMV_ERROR_INVALID_ARGUMENT", "batches"),
    (dict(max_seq_length=-1), "SGMV_ERROR_INVALID_ARGUMENT", "max_seq_length"),
    (dict(inputs_row_stride=8), "SGMV_ERROR_INVALID_ARGUMENT", "inputs_row_stride"),
    (dict(weights_row_stride=8), "SGMV_ERROR_INVALID_ARGUMENT", "weights_row_stride"),
    (dict(weights_lora_stride=100), "SGMV_ERROR_INVALID_ARGUMENT", "weights_lora_stride"),
    (dict(output_row_stride=32), "SGMV_ERROR_INVALID_ARGUMENT", "output_row_stride"),
    (dict(output_row_stride=2**62), "SGMV_ERROR_INVALID_ARGUMENT", "overflow"),
    (dict(weights_lora_stride=2**62), "SGMV_ERROR_INVALID_ARGUMENT", "overflow"),
    (dict(weights_dtype=2), "SGMV_ERROR_UNSUPPORTED_DTYPE", "weights float32"),
    (dict(inputs_dtype=1), "SGMV_ERROR_UNSUPPORTED_DTYPE", "inputs bfloat16"),
    (dict(output_dtype=3), "SGMV_ERROR_UNSUPPORTED_DTYPE", "output int32"),
    (dict(metadata_dtype=0), "SGMV_ERROR_UNSUPPORTED_DTYPE", "metadata float16"),
    (dict(metadata_dtype=77), "SGMV_ERROR_UNSUPPORTED_DTYPE", "metadata unknown"),
]


@pytest.mark.parametrize("over,status,word", BAD, ids=lambda v: str(v) if not isinstance(v, dict) else
                         ",".join(f"{k}={x}" for k, x in v.items()))
def test_bad_argument_gets_its_status_and_message(over, status, word):
    got, msg = call(valid_args(**over))
    assert got == S[status], msg
    assert word in msg and msg.startswith("sgmv_expand: ")


def test_null_args_pointer():
    status = capi.lib.sgmv_expand(ffi.NULL)
    assert status == S["SGMV_ERROR_INVALID_ARGUMENT"]
    assert "NULL" in ffi.string(capi.lib.sgmv_last_error()).decode()


def test_empty_calls_succeed_without_a_driver():
    """Nothing to do is success, and needs neither a driver nor pointers."""
    assert call(valid_args(batches=0, inputs=0, weights=0, output=0))[0] == 0
    assert call(valid_args(total_tokens=0, seq_start=0, seq_len=0, lora_indices=0))[0] == 0


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU: the no-driver path cannot be observed")
def test_no_driver_status():
    status, msg = call(valid_args())
    if ctypes.util.find_library("cuda"):
        assert status in (S["SGMV_ERROR_NO_DEVICE"], S["SGMV_ERROR_NO_DRIVER"]), msg
    else:
        assert status == S["SGMV_ERROR_NO_DRIVER"], msg
        assert "libcuda.so.1" in msg
    count = ffi.new("int *", -1)
    assert capi.lib.sgmv_device_count(count) in (0, S["SGMV_ERROR_NO_DRIVER"])
    assert count[0] == 0


def test_python_binding_raises_sgmv_error_with_status():
    """An array with __cuda_array_interface__ at fake addresses reaches the C library, whose
    status comes back as SgmvError (no driver here; on a GPU machine, a CUDA error)."""
    class Fake:
        def __init__(self, shape, typestr, ptr):
            self.__cuda_array_interface__ = dict(shape=shape, typestr=typestr, data=(ptr, False),
                                                 strides=None, version=3)
    args = (Fake((4, 16), "<f2", 0x1000), Fake((2, 64, 16), "<f2", 0x2000), Fake((4, 64), "<f2", 0x3000),
            Fake((1,), "<i4", 0x4000), Fake((1,), "<i4", 0x5000), Fake((1,), "<i4", 0x6000), 1, 4)
    if HAS_GPU:
        pytest.skip("fake device addresses on a real GPU would fault")
    with pytest.raises(sgmv.SgmvError) as e:
        sgmv.sgmv_expand(*args)
    assert e.value.status in (S["SGMV_ERROR_NO_DRIVER"], S["SGMV_ERROR_NO_DEVICE"])


def test_header_compiles_as_c99_and_cpp(tmp_path):
    src = tmp_path / "h.c"
    src.write_text('#include "sgmv.h"\nint main(void) { sgmv_expand_args_t a = SGMV_EXPAND_ARGS_INIT; '
                   'sgmv_expand_tensors_t t = SGMV_EXPAND_TENSORS_INIT; sgmv_batch_plan_args_t p = '
                   'SGMV_BATCH_PLAN_ARGS_INIT; (void)a; (void)t; (void)p; return 0; }\n')
    inc = str(capi.INCLUDE_DIR)
    subprocess.run(["gcc", "-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-I", inc, "-c", str(src),
                    "-o", str(tmp_path / "h.o")], check=True)
    cpp = tmp_path / "h.cpp"
    cpp.write_text('#include "sgmv.h"\nint main() { sgmv_expand_args_t a = SGMV_EXPAND_ARGS_INIT; (void)a; '
                   'return sgmv_version() > 0 ? 0 : 1; }\n')
    subprocess.run(["g++", "-std=c++11", "-Wall", "-Wextra", "-Werror", "-pedantic", "-I", inc, "-c", str(cpp),
                    "-o", str(tmp_path / "h2.o")], check=True)


def test_c_program_links_and_calls(tmp_path):
    exe = tmp_path / "abi_check"
    subprocess.run(["gcc", "-std=c99", "-Wall", "-Werror", "-I", str(capi.INCLUDE_DIR), str(HERE / "c" / "abi_check.c"),
                    "-L", str(LIB.parent), f"-l:{LIB.name}", f"-Wl,-rpath,{LIB.parent}", "-o", str(exe)], check=True)
    r = subprocess.run([str(exe)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "abi_check: ok" in r.stdout


def test_exports_only_sgmv_and_imports_no_exit_or_abort():
    defined = subprocess.run(["nm", "-D", "--defined-only", str(LIB)], capture_output=True, text=True,
                             check=True).stdout.split("\n")
    names = [line.split()[-1].split("@")[0] for line in defined if line.strip()]
    names = [n for n in names if n != "SGMV_0"]  # the version node
    assert names and all(n.startswith("sgmv_") for n in names), names
    undefined = subprocess.run(["nm", "-D", "--undefined-only", str(LIB)], capture_output=True, text=True,
                               check=True).stdout
    imported = {line.split()[-1].split("@")[0] for line in undefined.splitlines() if line.strip()}
    assert not imported & {"exit", "_exit", "abort", "printf", "puts", "fprintf", "perror", "putchar"}, imported


def test_no_link_time_dependency_on_libcuda_and_soname():
    dyn = subprocess.run(["readelf", "-d", str(LIB)], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\).*\[(.*)\]", dyn)
    assert not [n for n in needed if "cuda" in n], needed
    assert re.search(r"\(SONAME\).*\[libsgmv\.so\.%d\]" % S["SGMV_VERSION_MAJOR"], dyn), dyn


def _embedded_cubins(data):
    """Every CUDA ELF (e_machine 190) embedded in the library's bytes."""
    u = lambda off, n: int.from_bytes(data[off:off + n], "little")  # noqa: E731
    pos, found = 1, []
    while (pos := data.find(b"\x7fELF\x02", pos)) >= 0:
        if u(pos + 0x12, 2) != 190:
            pos += 4
            continue
        phoff, shoff = u(pos + 0x20, 8), u(pos + 0x28, 8)
        phentsize, phnum, shentsize, shnum = (u(pos + o, 2) for o in (0x36, 0x38, 0x3A, 0x3C))
        end = max(shoff + shentsize * shnum, phoff + phentsize * phnum)
        for i in range(shnum):  # section contents (NOBITS, type 8, occupy no bytes)
            sh = pos + shoff + i * shentsize
            if u(sh + 4, 4) != 8:
                end = max(end, u(sh + 0x18, 8) + u(sh + 0x20, 8))
        found.append(data[pos:pos + end])
        pos += end
    return found


def test_cubin_inventory_covers_every_arch_and_variant(tmp_path):
    cubins = _embedded_cubins(LIB.read_bytes())
    assert len(cubins) == capi.lib.sgmv_num_variants()
    per_arch = {}
    for i, c in enumerate(cubins):
        path = tmp_path / f"{i}.cubin"
        path.write_bytes(c)
        out = subprocess.run([nvidia_tool("cuobjdump"), "-elf", str(path)], capture_output=True, text=True,
                             check=True).stdout
        arch = re.search(r"sm=(\d+)", out).group(1)
        per_arch[int(arch)] = per_arch.get(int(arch), 0) + 1
        assert ".text.sgmv_expand_kernel" in out or ".text.sgmv_plan_kernel" in out
    want = {}
    for v in aot_variants.variants():
        want[v["arch"]] = want.get(v["arch"], 0) + 1
    assert per_arch == want
