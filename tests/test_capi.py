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
    (dict(inputs=0), "SGMV_ERROR_INVALID_ARGUMENT", "is NULL"),
    (dict(weights=0), "SGMV_ERROR_INVALID_ARGUMENT", "is NULL"),
    (dict(output=0), "SGMV_ERROR_INVALID_ARGUMENT", "is NULL"),
    (dict(seq_start=0), "SGMV_ERROR_INVALID_ARGUMENT", "is NULL"),
    (dict(seq_len=0), "SGMV_ERROR_INVALID_ARGUMENT", "is NULL"),
    (dict(lora_indices=0), "SGMV_ERROR_INVALID_ARGUMENT", "is NULL"),
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
    (dict(weights_dtype=2), "SGMV_ERROR_UNSUPPORTED_DTYPE", "weights_dtype float32"),
    (dict(inputs_dtype=1), "SGMV_ERROR_UNSUPPORTED_DTYPE", "inputs_dtype bfloat16"),
    (dict(output_dtype=3), "SGMV_ERROR_UNSUPPORTED_DTYPE", "output_dtype int32"),
    (dict(metadata_dtype=0), "SGMV_ERROR_UNSUPPORTED_DTYPE", "metadata_dtype is float16"),
    (dict(metadata_dtype=77), "SGMV_ERROR_UNSUPPORTED_DTYPE", "metadata_dtype is unknown"),
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
    """Nothing to do is success, and needs neither a driver nor data pointers (only the weights)."""
    assert call(valid_args(batches=0, inputs=0, output=0))[0] == 0
    assert call(valid_args(batches=0, weights=0)) == (S["SGMV_ERROR_INVALID_ARGUMENT"], "sgmv_expand: args->weights is NULL")
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
        assert ".text.sgmv_kernel" in out or ".text.sgmv_plan_kernel" in out
    want = {}
    for v in aot_variants.variants():
        want[v["arch"]] = want.get(v["arch"], 0) + 1
    assert per_arch == want


# ---- 0.3: shrink, fused slices, per-adapter ranks ------------------------------------------------

def shrink_args(**over):
    """A valid shrink at fake addresses: fp16, 10 tokens, hidden 64, rank 16, two adapters."""
    a = ffi.new("sgmv_shrink_args_t *")
    capi.lib.sgmv_shrink_args_init(a)
    fields = dict(
        inputs=0x10000, inputs_dtype=S["SGMV_DTYPE_FLOAT16"], inputs_row_stride=64, weights=0x20000,
        weights_dtype=S["SGMV_DTYPE_FLOAT16"], weights_lora_stride=16 * 64, weights_row_stride=64, output=0x30000,
        output_dtype=S["SGMV_DTYPE_FLOAT16"], output_row_stride=16, total_tokens=10, hidden=64, rank=16,
        num_loras=2, seq_start=0x40000, seq_len=0x50000, lora_indices=0x60000, metadata_dtype=S["SGMV_DTYPE_INT32"],
        batches=2, max_seq_length=5)
    slices = over.pop("slices", [])
    fields.update(over)
    for k, v in fields.items():
        ftype = dict(ffi.typeof("sgmv_shrink_args_t").fields)[k].type
        setattr(a, k, ffi.cast(ftype, v) if ftype.kind == "pointer" else v)
    return set_slices(a, slices)


def set_slices(a, slices):
    """Sets a's slices[i] fields from dicts (weights: an address)."""
    for i, sl in enumerate(slices):
        for k, v in sl.items():
            setattr(a.slices[i], k, ffi.cast("void *", v) if k == "weights" else v)
    return a


def slice_of(weights=0x90000, rows=16, row_stride=64, lora_stride=16 * 64):
    return dict(weights=weights, rows=rows, row_stride=row_stride, lora_stride=lora_stride)


def call_shrink(a):
    """(status, message) of sgmv_shrink, and the planner's status for the same arguments."""
    status = capi.lib.sgmv_shrink(a)
    msg = ffi.string(capi.lib.sgmv_last_error()).decode()
    c = ffi.new("sgmv_launch_config_t *")
    planned = capi.lib.sgmv_shrink_config(a, 90, c)
    return status, msg, planned


THREE = dict(num_slices=3, output_row_stride=48, slices=[slice_of(), slice_of(0xA0000)])
BAD_SHRINK = [  # (field overrides, expected status, a word of the message)
    (dict(struct_size=8), "SGMV_ERROR_INVALID_ARGUMENT", "struct_size"),
    *[({name: 0}, "SGMV_ERROR_INVALID_ARGUMENT", "NULL")
      for name in ("inputs", "weights", "output", "seq_start", "seq_len", "lora_indices")],
    (dict(THREE, slices=[slice_of(), slice_of(0)]), "SGMV_ERROR_INVALID_ARGUMENT", "slice.*NULL|NULL.*slice"),
    (dict(total_tokens=-1), "SGMV_ERROR_INVALID_ARGUMENT", "total_tokens"),
    (dict(hidden=0), "SGMV_ERROR_INVALID_ARGUMENT", "hidden"),
    (dict(hidden=(1 << 20) + 1, inputs_row_stride=(1 << 20) + 1, weights_row_stride=(1 << 20) + 1,
          weights_lora_stride=16 * ((1 << 20) + 1)), "SGMV_ERROR_INVALID_ARGUMENT", "hidden"),
    (dict(rank=0), "SGMV_ERROR_INVALID_ARGUMENT", "rank"),
    (dict(rank=257, output_row_stride=257, weights_lora_stride=257 * 64), "SGMV_ERROR_INVALID_ARGUMENT", "rank"),
    (dict(num_loras=0), "SGMV_ERROR_INVALID_ARGUMENT", "num_loras"),
    (dict(batches=-1), "SGMV_ERROR_INVALID_ARGUMENT", "batches"),
    (dict(max_seq_length=-1), "SGMV_ERROR_INVALID_ARGUMENT", "max_seq_length"),
    (dict(num_slices=4, output_row_stride=64), "SGMV_ERROR_INVALID_ARGUMENT", "num_slices"),
    (dict(num_slices=-1), "SGMV_ERROR_INVALID_ARGUMENT", "num_slices"),
    (dict(THREE, slices=[slice_of(), slice_of(0xA0000, rows=8)]), "SGMV_ERROR_INVALID_ARGUMENT", r"slice.*(rows|rank)"),
    (dict(THREE, slices=[slice_of(row_stride=32), slice_of(0xA0000)]), "SGMV_ERROR_INVALID_ARGUMENT",
     r"slice.*row.stride"),
    (dict(THREE, slices=[slice_of(), slice_of(0xA0000, lora_stride=100)]), "SGMV_ERROR_INVALID_ARGUMENT",
     r"slice.*lora.stride"),
    (dict(THREE, output_row_stride=32), "SGMV_ERROR_INVALID_ARGUMENT", "output_row_stride"),
    (dict(inputs_row_stride=32), "SGMV_ERROR_INVALID_ARGUMENT", "inputs_row_stride"),
    (dict(weights_row_stride=32), "SGMV_ERROR_INVALID_ARGUMENT", "weights.row.stride"),
    (dict(weights_lora_stride=100), "SGMV_ERROR_INVALID_ARGUMENT", "weights.lora.stride"),
    (dict(output_row_stride=8), "SGMV_ERROR_INVALID_ARGUMENT", "output_row_stride"),
    (dict(output_row_stride=2**62), "SGMV_ERROR_INVALID_ARGUMENT", "overflow"),
    (dict(batch_plan=0x70000, batch_plan_bytes=64), "SGMV_ERROR_INVALID_ARGUMENT", "batch_plan_bytes"),
    (dict(weights_dtype=2, inputs_dtype=2), "SGMV_ERROR_UNSUPPORTED_DTYPE", "float32"),
    (dict(inputs_dtype=2), "SGMV_ERROR_UNSUPPORTED_DTYPE", "inputs_dtype float32"),
    (dict(inputs_dtype=1), "SGMV_ERROR_UNSUPPORTED_DTYPE", "inputs_dtype bfloat16"),
    (dict(output_dtype=1), "SGMV_ERROR_UNSUPPORTED_DTYPE", "output_dtype bfloat16"),
    (dict(output_dtype=3), "SGMV_ERROR_UNSUPPORTED_DTYPE", "output_dtype int32"),
    (dict(metadata_dtype=0), "SGMV_ERROR_UNSUPPORTED_DTYPE", "metadata_dtype is float16"),
    (dict(metadata_dtype=77), "SGMV_ERROR_UNSUPPORTED_DTYPE", "metadata_dtype is unknown"),
]


def _ids(v):
    if not isinstance(v, dict):
        return str(v)
    return ",".join(f"{k}={x}" if k != "slices" else "slices" for k, x in v.items())


@pytest.mark.parametrize("over,status,word", BAD_SHRINK, ids=_ids)
def test_shrink_bad_argument_gets_its_status_and_message(over, status, word):
    got, msg, planned = call_shrink(shrink_args(**over))
    assert got == S[status], msg
    assert re.search(word, msg) and msg.startswith("sgmv_shrink"), msg
    assert planned == got  # the planner checks alike


def test_shrink_null_args_and_config():
    assert capi.lib.sgmv_shrink(ffi.NULL) == S["SGMV_ERROR_INVALID_ARGUMENT"]
    assert "NULL" in ffi.string(capi.lib.sgmv_last_error()).decode()
    assert capi.lib.sgmv_shrink_config(shrink_args(), 90, ffi.NULL) == S["SGMV_ERROR_INVALID_ARGUMENT"]


def _sized(ctype, a, size):
    """A copy of *a in a buffer of `size` bytes (zero-padded past the struct) with struct_size = size."""
    buf = ffi.new("char[]", max(size, ffi.sizeof(ctype)) + 64)
    ffi.memmove(buf, a, ffi.sizeof(ctype))
    b = ffi.cast(ctype + " *", buf)
    b.struct_size = size
    return b, buf


def test_shrink_struct_size_too_large_is_refused():
    """A caller built against a newer header (a larger struct) gets INVALID_ARGUMENT, not a guess."""
    b, keep = _sized("sgmv_shrink_args_t", shrink_args(), ffi.sizeof("sgmv_shrink_args_t") + 8)
    got, msg, planned = call_shrink(b)
    assert got == planned == S["SGMV_ERROR_INVALID_ARGUMENT"] and "struct_size" in msg, msg


def test_shrink_workspace_too_small_is_not_an_error():
    """A workspace too small (or none) only reduces the split: the call passes validation."""
    for ws, n in ((0, 0), (0x80000, 4), (0x80000, 1)):
        for tokens in (1, 10):
            a = shrink_args(total_tokens=tokens, batches=1, hidden=4096, inputs_row_stride=4096,
                            weights_row_stride=4096, weights_lora_stride=16 * 4096, workspace=ws, workspace_bytes=n)
            c = ffi.new("sgmv_launch_config_t *")
            assert capi.lib.sgmv_shrink_config(a, 90, c) == 0, ffi.string(capi.lib.sgmv_last_error())
            assert c.split == 1


def test_shrink_args_init_sets_scaling_one():
    a = ffi.new("sgmv_shrink_args_t *")
    ffi.memmove(a, b"\xab" * ffi.sizeof("sgmv_shrink_args_t"), ffi.sizeof("sgmv_shrink_args_t"))
    capi.lib.sgmv_shrink_args_init(a)
    assert a.struct_size == ffi.sizeof("sgmv_shrink_args_t") and a.scaling == 1.0
    assert a.num_slices == 0 and a.workspace == ffi.NULL and a.lora_ranks == ffi.NULL and a.rank == 0
    capi.lib.sgmv_shrink_args_init(ffi.NULL)  # no crash


def test_shrink_initialisers_in_c_and_cpp(tmp_path):
    """SGMV_SHRINK_ARGS_INIT and SGMV_SHRINK_TENSORS_INIT: struct_size set, scaling 1, the rest zero,
    in C99 and in C++ (where the header uses a template)."""
    body = ('sgmv_shrink_args_t a = SGMV_SHRINK_ARGS_INIT; sgmv_shrink_tensors_t t = SGMV_SHRINK_TENSORS_INIT; '
            'sgmv_expand_args_t e = SGMV_EXPAND_ARGS_INIT; '
            'return !(a.struct_size == sizeof(sgmv_shrink_args_t) && a.scaling == 1.0f && a.num_slices == 0 && '
            'a.rank == 0 && a.workspace == 0 && t.struct_size == sizeof(sgmv_shrink_tensors_t) && '
            't.scaling == 1.0f && t.batches == 0 && e.struct_size == sizeof(sgmv_expand_args_t) && '
            'e.num_slices == 0 && e.lora_ranks == 0);')
    inc = str(capi.INCLUDE_DIR)
    for lang, compiler, std in (("c", "gcc", "-std=c99"), ("cpp", "g++", "-std=c++11")):
        src = tmp_path / f"init.{lang}"
        src.write_text(f'#include "sgmv.h"\nint main({"void" if lang == "c" else ""}) {{ {body} }}\n')
        exe = tmp_path / f"init_{lang}"
        subprocess.run([compiler, std, "-Wall", "-Wextra", "-Werror", "-pedantic", "-I", inc, str(src), "-o",
                        str(exe)], check=True)
        r = subprocess.run([str(exe)])
        assert r.returncode == 0, f"{lang}: an initialiser left a field wrong"


def test_shrink_workspace_bytes():
    """Bytes for every call of up to max_tokens rows: > 0 at decode sizes, no fewer for more rows
    or columns, and no more past the rows any call splits (test_planner.py checks they suffice)."""
    ws = capi.lib.sgmv_shrink_workspace_bytes
    assert all(ws(t, 16) > 0 for t in (1, 2, 8, 64))  # decode sizes split
    assert ws(513, 16) == ws(8192, 16) == ws(1 << 20, 16) == ws(512, 16)  # calls past 512 rows never split
    assert ws(-1, 16) == ws(1, -16) == ws(1, 0) == ws(1, 769) == ws(1 << 30, 16) == 0
    for t in (1, 4, 64, 512):  # more columns, no fewer bytes
        got = [ws(t, c) for c in (1, 8, 16, 48, 64, 256, 768)]
        assert got == sorted(got), (t, got)
    for c in (16, 768):  # it covers every call of up to t rows: no fewer bytes for more rows
        got = [ws(t, c) for t in (1, 2, 3, 16, 100, 256, 512)]
        assert got == sorted(got), (c, got)


def test_shrink_tensors_rules():
    """sgmv_shrink_args_from_tensors: the shapes of inputs, weights (3-D and 4-D), output and
    slices, a slice of another dtype or shape, ranks and scales tensors."""
    def tensor(t, data, dtype, shape):
        t.data, t.dtype, t.ndim = ffi.cast("void *", data), S[dtype], len(shape)
        stride = 1
        for i in reversed(range(len(shape))):
            t.shape[i], t.strides[i] = shape[i], stride
            stride *= shape[i]

    def make(**over):
        t = ffi.new("sgmv_shrink_tensors_t *")
        t.struct_size, t.scaling = ffi.sizeof("sgmv_shrink_tensors_t"), 1.0
        spec = dict(inputs=((10, 64), "SGMV_DTYPE_FLOAT16"), weights=((2, 16, 64), "SGMV_DTYPE_FLOAT16"),
                    output=((10, 16), "SGMV_DTYPE_FLOAT16"), seq_start=((2,), "SGMV_DTYPE_INT32"),
                    seq_len=((2,), "SGMV_DTYPE_INT32"), lora_indices=((2,), "SGMV_DTYPE_INT32"))
        spec.update({k: v for k, v in over.items() if k in spec})
        for i, (name, (shape, dtype)) in enumerate(spec.items()):
            tensor(getattr(t, name), 0x10000 * (i + 1), dtype, shape)
        t.batches, t.max_seq_length = 2, 5
        t.num_slices = over.get("num_slices", 0)
        for i, (shape, dtype) in enumerate(over.get("slices", [])):
            tensor(t.slice_weights[i], 0xA0000 + 0x10000 * i, dtype, shape)
        for name in ("lora_ranks", "lora_scales"):
            if name in over:
                tensor(getattr(t, name), 0xF0000, *over[name][::-1])
        a = ffi.new("sgmv_shrink_args_t *")
        status = capi.lib.sgmv_shrink_args_from_tensors(t, a)
        return status, ffi.string(capi.lib.sgmv_last_error()).decode() if status else "", a

    status, msg, a = make()
    assert status == 0, msg
    assert (a.total_tokens, a.hidden, a.rank, a.num_loras, a.scaling) == (10, 64, 16, 2, 1.0)
    assert (a.inputs_row_stride, a.weights_lora_stride, a.weights_row_stride, a.output_row_stride) == (64, 1024, 64, 16)
    status, msg, a = make(weights=((2, 1, 16, 64), "SGMV_DTYPE_FLOAT16"))
    assert status == 0 and (a.rank, a.hidden, a.weights_row_stride) == (16, 64, 64), msg
    fp16 = "SGMV_DTYPE_FLOAT16"
    two = dict(num_slices=2, output=((10, 32), fp16))
    status, msg, a = make(**two, slices=[((2, 16, 64), fp16)])
    assert status == 0 and a.num_slices == 2 and a.slices[0].rows == 16, msg
    assert a.slices[0].lora_stride == 1024 and a.slices[0].row_stride == 64
    status, msg, a = make(lora_ranks=((2,), "SGMV_DTYPE_INT32"), lora_scales=((3,), "SGMV_DTYPE_FLOAT32"))
    assert status == 0 and a.lora_ranks != ffi.NULL and a.lora_scales != ffi.NULL, msg
    bad = [  # (overrides, status, pattern of the message)
        (dict(**two, slices=[((2, 16, 64), "SGMV_DTYPE_BFLOAT16")]), "SGMV_ERROR_UNSUPPORTED_DTYPE", "slice"),
        (dict(**two, slices=[((2, 8, 64), fp16)]), "SGMV_ERROR_INVALID_ARGUMENT", "rank"),
        (dict(**two, slices=[((2, 16, 32), fp16)]), "SGMV_ERROR_INVALID_ARGUMENT", "hidden"),
        (dict(**two, slices=[((3, 16, 64), fp16)]), "SGMV_ERROR_INVALID_ARGUMENT", "num_loras|adapters"),
        (dict(num_slices=2, slices=[((2, 16, 64), fp16)]), "SGMV_ERROR_INVALID_ARGUMENT", "output"),
        (dict(inputs=((10, 32), fp16)), "SGMV_ERROR_INVALID_ARGUMENT", "hidden"),
        (dict(output=((9, 16), fp16)), "SGMV_ERROR_INVALID_ARGUMENT", "output"),
        (dict(num_slices=4), "SGMV_ERROR_INVALID_ARGUMENT", "num_slices"),
        (dict(lora_ranks=((1,), "SGMV_DTYPE_INT32")), "SGMV_ERROR_INVALID_ARGUMENT", "lora_ranks"),
        (dict(lora_ranks=((2,), "SGMV_DTYPE_INT64")), "SGMV_ERROR_UNSUPPORTED_DTYPE", "lora_ranks"),
        (dict(lora_scales=((2,), "SGMV_DTYPE_FLOAT16")), "SGMV_ERROR_UNSUPPORTED_DTYPE", "lora_scales"),
        (dict(lora_scales=((1,), "SGMV_DTYPE_FLOAT32")), "SGMV_ERROR_INVALID_ARGUMENT", "lora_scales"),
    ]
    wrong = []
    for over, want, word in bad:
        status, msg, _ = make(**over)
        if not (status == S[want] and re.search(word, msg)):
            wrong.append((over, status, msg))
    assert not wrong, wrong


# Expand's 0.3 fields.

def expand_with_slices(slices, **over):
    return set_slices(valid_args(**over), slices)


def expand_slice(weights=0x90000, rows=32, row_stride=16, lora_stride=32 * 16):
    return dict(weights=weights, rows=rows, row_stride=row_stride, lora_stride=lora_stride)


BAD_EXPAND_SLICES = [
    (dict(num_slices=4, inputs_row_stride=64), [], "num_slices"),
    (dict(num_slices=-1), [], "num_slices"),
    (dict(num_slices=2, inputs_row_stride=32, output_row_stride=96), [expand_slice(weights=0)],
     "slice.*NULL|NULL.*slice"),
    (dict(num_slices=2, inputs_row_stride=32, output_row_stride=96), [expand_slice(rows=0)],
     r"slice.*(rows|hidden)|hidden.*slice"),
    (dict(num_slices=2, inputs_row_stride=32, output_row_stride=96), [expand_slice(row_stride=8)],
     r"slice.*row.stride"),
    (dict(num_slices=2, inputs_row_stride=32, output_row_stride=96), [expand_slice(lora_stride=100)],
     r"slice.*lora.stride"),
    (dict(num_slices=2, inputs_row_stride=16, output_row_stride=96), [expand_slice()], "inputs_row_stride"),
    (dict(num_slices=2, inputs_row_stride=32, output_row_stride=64), [expand_slice()], "output_row_stride"),
]


@pytest.mark.parametrize("over,slices,word", BAD_EXPAND_SLICES, ids=lambda v: _ids(v) if isinstance(v, dict) else
                         None)
def test_expand_bad_slices(over, slices, word):
    a = expand_with_slices(slices, **over)
    got, msg = call(a)
    assert got == S["SGMV_ERROR_INVALID_ARGUMENT"] and re.search(word, msg) and msg.startswith("sgmv_expand"), msg
    c = ffi.new("sgmv_launch_config_t *")
    assert capi.lib.sgmv_expand_config(a, 90, c) == got


def test_expand_v02_struct_is_still_accepted():
    """A caller built against 0.2's header passes a shorter struct: the 0.3 fields it lacks take
    their defaults (one slice, no ranks) whatever lies in memory past it."""
    v02 = ffi.offsetof("sgmv_expand_args_t", "num_slices")
    full = valid_args()
    want = ffi.new("sgmv_launch_config_t *")
    assert capi.lib.sgmv_expand_config(full, 90, want) == 0
    junk = valid_args(num_slices=7)  # past the 0.2 size: must be ignored
    junk.lora_ranks = ffi.cast("void *", 0xDEAD0)
    b, keep = _sized("sgmv_expand_args_t", junk, v02)
    got = ffi.new("sgmv_launch_config_t *")
    assert capi.lib.sgmv_expand_config(b, 90, got) == 0, ffi.string(capi.lib.sgmv_last_error())
    assert ffi.buffer(got)[:] == ffi.buffer(want)[:]
    v01 = ffi.offsetof("sgmv_expand_args_t", "batch_plan")
    b, keep = _sized("sgmv_expand_args_t", junk, v01)
    assert capi.lib.sgmv_expand_config(b, 90, got) == 0, ffi.string(capi.lib.sgmv_last_error())
    b, keep = _sized("sgmv_expand_args_t", valid_args(), ffi.sizeof("sgmv_expand_args_t") + 8)
    status, msg = call(b)
    assert status == S["SGMV_ERROR_INVALID_ARGUMENT"] and "struct_size" in msg, msg


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU: the no-driver path cannot be observed")
def test_shrink_no_driver_status():
    status, msg, _ = call_shrink(shrink_args())
    if ctypes.util.find_library("cuda"):
        assert status in (S["SGMV_ERROR_NO_DEVICE"], S["SGMV_ERROR_NO_DRIVER"]), msg
    else:
        assert status == S["SGMV_ERROR_NO_DRIVER"] and "libcuda.so.1" in msg, msg


def test_shrink_nothing_to_do_needs_no_driver_nor_pointers():
    for over in (dict(batches=0, inputs=0, output=0), dict(total_tokens=0, seq_start=0, seq_len=0,
                                                                      lora_indices=0)):
        status, msg, planned = call_shrink(shrink_args(**over))
        assert status == planned == 0, msg


# Through the fake driver (tests/fake_cuda): an error touches no driver function and launches
# nothing; a valid call launches what the planner says.

@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    from test_faults import build_fake
    return build_fake(tmp_path_factory.mktemp("fake_cuda"))


def _scenario(fake, steps):
    from test_faults import scenario
    return scenario(fake, steps)


SHRINK_ERRORS = [dict(rank=0), dict(num_slices=4, output_row_stride=64), dict(inputs=0), dict(weights_dtype=2),
                 dict(struct_size=8)]


def test_shrink_errors_touch_no_driver(fake):
    reports = _scenario(fake, [{"shrink": over} for over in SHRINK_ERRORS])
    for over, r in zip(SHRINK_ERRORS, reports):
        assert r["status"] in (S["SGMV_ERROR_INVALID_ARGUMENT"], S["SGMV_ERROR_UNSUPPORTED_DTYPE"]), (over, r)
        assert sum(r["calls"].values()) == 0, (over, r["calls"])


@pytest.mark.parametrize("over", [
    dict(), dict(with_workspace=True, total_tokens=2, batches=1, hidden=4096, inputs_row_stride=4096,
                 weights_row_stride=4096, weights_lora_stride=16 * 4096),
    dict(with_plan=True, num_slices=2, output_row_stride=32, slices=[slice_of()]),
], ids=["plain", "split", "plan-two-slices"])
def test_shrink_launches_what_the_planner_says(fake, over):
    first, second = _scenario(fake, [{"shrink": over}, {"shrink": over}])
    assert first["status"] == 0 and second["status"] == 0, (first["error"], second["error"])
    planned = first["planned"]
    assert planned["status"] == 0 and not planned["noop"]
    launches = first["calls"]["cuLaunchKernel"]
    assert launches == planned["steps"] == (2 if planned["split"] > 1 else 1), (launches, planned)
    assert second["calls"]["cuLaunchKernel"] == 2 * launches
    if over.get("with_workspace"):
        assert planned["split"] > 1, planned
    else:  # one launch: exactly the planned one (a split's second launch sums the partials)
        assert first["last_launch"]["grid"] == planned["grid"], (first["last_launch"], planned)
        assert first["last_launch"]["block"] == planned["block"]


def fill_tensors(t, items):
    """Sets *t's sgmv_tensor_t fields of items (name, shape, dtype): contiguous, at fake addresses."""
    for i, (name, shape, dtype) in enumerate(items):
        d = getattr(t, name)
        d.data, d.dtype, d.ndim = ffi.cast("void *", 0x10000 * (i + 1)), dtype, len(shape)
        stride = 1
        for j in reversed(range(len(shape))):
            d.shape[j], d.strides[j] = shape[j], stride
            stride *= shape[j]


def test_expand_tensors_v02_struct_is_still_accepted():
    """sgmv_expand_tensors_t as 0.2's header had it: the slices and ranks it lacks default to one
    slice and none, whatever lies past it."""
    t = ffi.new("sgmv_expand_tensors_t *")
    t.struct_size = ffi.sizeof("sgmv_expand_tensors_t")
    fill_tensors(t, (("inputs", (10, 16), 0), ("weights", (2, 64, 16), 0), ("output", (10, 64), 0),
                     ("seq_start", (2,), 3), ("seq_len", (2,), 3), ("lora_indices", (2,), 3)))
    t.batches, t.max_seq_length = 2, 5
    t.num_slices = 3  # junk past the 0.2 struct
    t.lora_ranks.data = ffi.cast("void *", 0xDEAD0)
    b, keep = _sized("sgmv_expand_tensors_t", t, ffi.offsetof("sgmv_expand_tensors_t", "num_slices"))
    a = ffi.new("sgmv_expand_args_t *")
    assert capi.lib.sgmv_expand_args_from_tensors(b, a) == 0, ffi.string(capi.lib.sgmv_last_error())
    assert a.num_slices <= 1 and a.lora_ranks == ffi.NULL and (a.hidden, a.rank) == (64, 16)


def _header_version():
    text = (capi.INCLUDE_DIR / "sgmv.h").read_text()
    return tuple(int(re.search(rf"^#define SGMV_VERSION_{p} (\d+)$", text, re.M).group(1))
                 for p in ("MAJOR", "MINOR", "PATCH"))


def test_version_has_one_source():
    """sgmv.h's three lines are the version: SGMV_VERSION, sgmv_version() and the CMake package
    files of this build (beside the library in a build tree) agree with them."""
    major, minor, patch = _header_version()
    assert capi.lib.sgmv_version() == S["SGMV_VERSION"] == 10000 * major + 100 * minor + patch
    for pc in (LIB.parent / "sgmv.pc", LIB.parent / "pkgconfig" / "sgmv.pc"):
        if pc.exists():
            assert f"\nVersion: {major}.{minor}.{patch}\n" in pc.read_text()
    cfg = LIB.parent / "sgmvConfigVersion.cmake"
    if cfg.exists():
        assert f'set(PACKAGE_VERSION "{major}.{minor}.{patch}")' in cfg.read_text()


@pytest.mark.parametrize("cmd", [["gcc"], ["g++", "-x", "c++"]], ids=["gcc-default-std", "g++"])
def test_lora_layer_example_compiles_in_default_mode_and_as_cpp(cmd, tmp_path):
    """The README's `gcc app.c $(pkg-config ...)` uses gcc's default (GNU) mode, where <math.h>
    declares y0, y1 (Bessel functions): the example must not clash with them, nor fail as C++."""
    src = HERE.parent / "examples" / "c" / "lora_layer.c"
    subprocess.run([*cmd, "-Wall", "-Werror", "-I", str(capi.INCLUDE_DIR), "-c", str(src), "-o",
                    str(tmp_path / "lora_layer.o")], check=True)


@pytest.mark.parametrize("field,over,size", [
    ("inputs", dict(inputs_dtype=S["SGMV_DTYPE_FLOAT32"]), 4), ("weights", {}, 2),
    ("output", dict(output_dtype=S["SGMV_DTYPE_FLOAT32"]), 4), ("seq_start", dict(metadata_dtype=S["SGMV_DTYPE_INT64"]), 8),
    ("lora_indices", {}, 4)])
def test_pointer_off_its_element_size_is_refused_by_name(field, over, size):
    base = dict(inputs=0x10000, weights=0x20000, output=0x30000, seq_start=0x40000, lora_indices=0x60000)[field]
    for offset in range(1, size):
        got, msg = call(valid_args(**over, **{field: base + offset}))
        assert (got, msg) == (S["SGMV_ERROR_INVALID_ARGUMENT"],
                              f"sgmv_expand: args->{field} is not aligned to its element size ({size} bytes)")
    a = valid_args(**over, **{field: base + size})  # a multiple of the element size: served (unaligned tile at worst)
    assert capi.lib.sgmv_expand_config(a, 90, ffi.new("sgmv_launch_config_t *")) == 0


def test_only_initialised_struct_names_the_null_weights():
    a = ffi.new("sgmv_expand_args_t *")
    capi.lib.sgmv_expand_args_init(a)
    assert call(a) == (S["SGMV_ERROR_INVALID_ARGUMENT"], "sgmv_expand: args->weights is NULL")
    a.batches, a.total_tokens = 1, 1
    status, msg = call(a)
    assert msg == ("sgmv_expand: args->inputs, args->weights, args->output, args->seq_start, args->seq_len, "
                   "args->lora_indices are NULL"), msg


def test_limits_documented_in_the_header_are_the_library_s():
    """sgmv.h's comments on sgmv_expand_args_t state hidden's and rank's ranges and the workspace's
    alignment: the library accepts exactly those."""
    text = (capi.INCLUDE_DIR / "sgmv.h").read_text()
    expand = text[text.index("typedef struct {\n  size_t struct_size;\n\n  const void *inputs;"):]
    hidden = int(re.search(r"int64_t hidden;\s*/\* 1 \.\. (\d+)", expand).group(1))
    rank = int(re.search(r"int64_t rank;\s*/\* 1 \.\. (\d+)", expand).group(1))
    ws_align = int(re.search(r"void \*workspace;.*\((\d+)-byte aligned\)", text).group(1))
    c = ffi.new("sgmv_launch_config_t *")
    cfg = lambda **o: capi.lib.sgmv_expand_config(valid_args(num_loras=1, **o), 90, c)  # noqa: E731
    assert cfg(hidden=hidden, output_row_stride=hidden) == 0
    assert cfg(hidden=hidden + 1, output_row_stride=hidden + 1) == S["SGMV_ERROR_INVALID_ARGUMENT"]
    assert cfg(rank=rank, inputs_row_stride=rank, weights_row_stride=rank) == 0
    assert cfg(rank=rank + 1, inputs_row_stride=rank + 1, weights_row_stride=rank + 1) == \
        S["SGMV_ERROR_INVALID_ARGUMENT"]
    for offset, want in ((ws_align // 2, S["SGMV_ERROR_INVALID_ARGUMENT"]), (ws_align, 0)):
        got = capi.lib.sgmv_shrink_config(shrink_args(workspace=0x80000 + offset, workspace_bytes=1 << 20), 90, c)
        assert got == want, ffi.string(capi.lib.sgmv_last_error())


def test_build_info_names_the_pinned_compiler():
    """sgmv_build_info() names the triton that compiled the cubins: the one pyproject.toml's
    build requirements pin (a build from pip), or the generator's interpreter's (a CMake build)."""
    info = dict(item.split("=", 1) for item in ffi.string(capi.lib.sgmv_build_info()).decode().split(";"))
    pin = re.search(r'"triton==([^"]+)"', (HERE.parent / "pyproject.toml").read_text().split("[project]")[0])
    assert pin and info["triton"] == pin.group(1), (info, pin)
