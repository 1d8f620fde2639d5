"""The planner (csrc/planner.c) on the CPU: the tile, path and grid of every kind of call, the
batch plan's size, the arch family, and that the JIT path launches what the library decides.
Expected values are computed here from aot/tiles.json, independently of the C code."""
import json
from pathlib import Path

import pytest

from sgmv import capi
from sgmv.capi import ffi

ROOT = Path(__file__).resolve().parent.parent
TABLE = json.loads((ROOT / "aot" / "tiles.json").read_text())
TILES = TABLE["tiles"]
L = capi.lib
S = {name: getattr(L, name) for name in dir(L) if name.startswith("SGMV_")}
HEADER, ALIGN = 4, 64  # python/sgmv/kernels.py PLAN_HEADER, PLAN_ALIGN


def cdiv(a, b):
    return -(-a // b)


def args(**over):
    """Valid aligned arguments at fake addresses (the planner never dereferences them)."""
    a = ffi.new("sgmv_expand_args_t *")
    L.sgmv_expand_args_init(a)
    f = dict(inputs=0x10000, inputs_dtype=S["SGMV_DTYPE_BFLOAT16"], inputs_row_stride=16, weights=0x20000,
             weights_dtype=S["SGMV_DTYPE_BFLOAT16"], weights_lora_stride=4096 * 16, weights_row_stride=16,
             output=0x30000, output_dtype=S["SGMV_DTYPE_BFLOAT16"], output_row_stride=4096, total_tokens=256,
             hidden=4096, rank=16, num_loras=4, seq_start=0x40000, seq_len=0x50000, lora_indices=0x60000,
             metadata_dtype=S["SGMV_DTYPE_INT32"], batches=256, max_seq_length=1, add_inputs=1)
    f.update(over)
    for k, v in f.items():
        ptr = k in ("inputs", "weights", "output", "seq_start", "seq_len", "lora_indices", "batch_plan")
        setattr(a, k, ffi.cast("void *", v) if ptr else v)
    return a


def config(a, arch=90):
    c = ffi.new("sgmv_launch_config_t *")
    status = L.sgmv_expand_config(a, arch, c)
    return status, c, ffi.string(L.sgmv_last_error()).decode()


def rule(max_seq, rank, arch="90"):
    for ms, mr, name, path in TABLE["rules"][arch]:
        if (ms is None or max_seq <= ms) and (mr is None or rank <= mr):
            return name, path


def grouped_rule(rows, rank, arch="90"):
    for mx, mr, name in TABLE["grouped_rules"][arch]:
        if (mx is None or rows <= mx) and (mr is None or rank <= mr):
            return name


def check_tile(c, name):
    bm, bn, bk, warps, stages = TILES[name]
    assert ffi.string(c.tile).decode() == name
    assert (c.block_m, c.block_n, c.block_k, c.num_warps, c.num_stages) == (bm, bn, bk, warps, stages)
    return bm, bn, bk


@pytest.mark.parametrize("arch", ffi.string(L.sgmv_archs()).decode().split(","))
def test_decode_takes_the_short_path(arch):
    status, c, msg = config(args(), int(arch))
    assert status == 0, msg
    name, path = rule(1, 16, arch)
    bm, bn, _ = check_tile(c, name)
    assert path == "short" and c.path == S["SGMV_PATH_SHORT"]
    groups, n_tiles = cdiv(256, bm), cdiv(4096, bn)
    slots = min(4, max(1, 4096 // (groups * n_tiles)))  # aot/variants.py SHORT_PROGRAMS
    assert tuple(c.grid) == (groups, n_tiles, slots)


def test_uniform_prefill_goes_by_segment_and_mixed_flat():
    status, c, msg = config(args(total_tokens=4096, batches=4, max_seq_length=1024, rank=64, inputs_row_stride=64,
                                 weights_row_stride=64, weights_lora_stride=4096 * 64))
    assert status == 0, msg
    bm, bn, bk = check_tile(c, rule(1024, 64)[0])
    assert (c.path, c.flat, c.even_k) == (S["SGMV_PATH_ROWS"], 0, int(64 % bk == 0))
    assert tuple(c.grid) == (4, cdiv(4096, bn), cdiv(1024, bm))
    # One 2048-row segment beside 64 single rows: by segment would idle most programs.
    status, c, msg = config(args(total_tokens=2112, batches=65, max_seq_length=2048))
    assert status == 0, msg
    bm, bn, _ = check_tile(c, rule(2048, 16)[0])
    assert (c.path, c.flat) == (S["SGMV_PATH_ROWS"], 1)
    assert tuple(c.grid) == (cdiv(2112, bm) + 65, cdiv(4096, bn), 1)


@pytest.mark.parametrize("tokens,batches,loras", [(256, 256, 4), (704, 193, 16), (65536, 16, 4), (2200, 103, 8)])
def test_a_plan_gives_adapter_grouped_tiles(tokens, batches, loras):
    plan_bytes = L.sgmv_batch_plan_bytes(batches, tokens)
    status, c, msg = config(args(total_tokens=tokens, batches=batches, num_loras=loras, max_seq_length=tokens,
                                 batch_plan=0x70000, batch_plan_bytes=plan_bytes))
    assert status == 0, msg
    bm, bn, _ = check_tile(c, grouped_rule(cdiv(tokens, min(batches, loras)), 16))
    assert c.path == S["SGMV_PATH_GROUPED"]
    capacity = (plan_bytes // 4 - HEADER - 4 * batches) // (ALIGN + 1) * ALIGN
    assert c.plan_capacity == capacity >= (cdiv(tokens, ALIGN) + batches) * ALIGN
    slots = (cdiv(tokens, ALIGN) + min(batches, loras)) * ALIGN  # every adapter padded to ALIGN
    assert tuple(c.grid) == (cdiv(min(slots, capacity), bm), cdiv(4096, bn), 1)


def test_uniform_long_segments_tile_by_segment_even_with_a_plan():
    tokens = 8192
    status, c, msg = config(args(total_tokens=tokens, batches=8, max_seq_length=1024, num_loras=8,
                                 batch_plan=0x70000, batch_plan_bytes=L.sgmv_batch_plan_bytes(8, tokens)))
    assert status == 0, msg
    bm, bn, _ = check_tile(c, rule(1024, 16)[0])
    assert (c.path, c.flat, tuple(c.grid)) == (S["SGMV_PATH_ROWS"], 0, (8, cdiv(4096, bn), cdiv(1024, bm)))


def test_unaligned_operands_get_the_unaligned_tile():
    for over in (dict(inputs=0x10002), dict(hidden=4097, output_row_stride=4097, weights_lora_stride=4097 * 16), dict(output_row_stride=4100)):
        status, c, msg = config(args(**over))
        assert status == 0, msg
        check_tile(c, "unaligned")


def test_nothing_to_do_is_a_noop_at_any_arch():
    for over in (dict(batches=0), dict(total_tokens=0)):
        status, c, msg = config(args(**over), 75)
        assert status == 0 and c.noop == 1, msg


def test_arch_family_and_unknown_arch():
    archs = {int(a) for a in ffi.string(L.sgmv_archs()).decode().split(",")}
    for cc in (80, 86, 89, 90, 100, 120, 75, 91, 0):
        family = 80 if cc // 10 == 8 else cc
        assert L.sgmv_cubin_arch(cc) == (family if family in archs else 0)
    status, _, msg = config(args(), 75)
    assert status == S["SGMV_ERROR_UNSUPPORTED_ARCH"] and "sm_75" in msg


def test_config_checks_like_expand():
    """The same statuses and messages as sgmv_expand (tests/test_capi.py lists them all)."""
    status, _, msg = config(args(rank=0))
    assert status == S["SGMV_ERROR_INVALID_ARGUMENT"] and msg.startswith("sgmv_expand: rank must be in [1, 256]")
    status, _, msg = config(args(batch_plan=0x70000, batch_plan_bytes=64))
    assert status == S["SGMV_ERROR_INVALID_ARGUMENT"] and "batch_plan_bytes 64" in msg
    assert L.sgmv_expand_config(args(), 90, ffi.NULL) == S["SGMV_ERROR_INVALID_ARGUMENT"]


def test_batch_plan_bytes():
    for b, t in ((0, 0), (1, 1), (256, 256), (4096, 1 << 20), (100000, 100000)):
        cap = (cdiv(t, ALIGN) + b) * ALIGN
        assert L.sgmv_batch_plan_bytes(b, t) == 4 * (HEADER + cap + cap // ALIGN + 4 * b)
    for b, t in ((-1, 1), (1 << 30, 1), (1, -1), (1, 1 << 30)):
        assert L.sgmv_batch_plan_bytes(b, t) == 0


def plan_args(batches, tokens=100, **over):
    p = ffi.new("sgmv_batch_plan_args_t *")
    p.struct_size = ffi.sizeof("sgmv_batch_plan_args_t")
    for i, t in enumerate((p.seq_start, p.seq_len, p.lora_indices)):
        t.data, t.dtype, t.ndim = ffi.cast("void *", 0x1000 * (i + 1)), S["SGMV_DTYPE_INT32"], 1
        t.shape[0], t.strides[0] = batches, 1
    p.plan, p.plan_bytes = ffi.cast("void *", 0x9000), L.sgmv_batch_plan_bytes(batches, tokens)
    p.batches, p.total_tokens, p.num_loras = batches, tokens, 4
    for k, v in over.items():
        setattr(p, k, v)
    return p


def test_plan_grid_follows_batches_and_tokens():
    segs, scan, rows, warps = TABLE["plan"]
    for batches, tokens in ((0, 0), (1, 100), (64, 64), (65, 4097), (512, 512), (16, 65536), (5000, 300000)):
        c = ffi.new("sgmv_launch_config_t *")
        assert L.sgmv_batch_plan_config(plan_args(batches, tokens), 90, c) == 0, ffi.string(L.sgmv_last_error())
        grid = (max(1, cdiv(batches, segs)), min(64, max(1, cdiv(tokens, 4096))), 1)
        assert (c.block_b, c.scan, c.rows, c.num_warps, tuple(c.grid)) == (segs, scan, rows, warps, grid)
        assert c.steps == 2
        assert ffi.string(c.kernel) == b"sgmv_plan_kernel"


@pytest.mark.parametrize("over,status,word", [
    (dict(batches=-1), "SGMV_ERROR_INVALID_ARGUMENT", "batches must be in [0, 2^30)"),
    (dict(plan_bytes=16), "SGMV_ERROR_INVALID_ARGUMENT", "plan_bytes 16"),
    (dict(plan=ffi.cast("void *", 0x9002)), "SGMV_ERROR_INVALID_ARGUMENT", "4-byte aligned"),
    (dict(num_loras=0), "SGMV_ERROR_INVALID_ARGUMENT", "num_loras"),
    (dict(total_tokens=-1), "SGMV_ERROR_INVALID_ARGUMENT", "total_tokens"),
    (dict(struct_size=8), "SGMV_ERROR_INVALID_ARGUMENT", "struct_size"),
])
def test_plan_arguments_checked(over, status, word):
    p = plan_args(over.pop("batches", 8), **over)
    c = ffi.new("sgmv_launch_config_t *")
    got = L.sgmv_batch_plan_config(p, 90, c)
    msg = ffi.string(L.sgmv_last_error()).decode()
    assert got == S[status] and word in msg, msg
    assert L.sgmv_batch_plan_build(p) == S[status]


def test_plan_metadata_rules():
    p = plan_args(8)
    p.seq_len.dtype = S["SGMV_DTYPE_INT64"]
    assert L.sgmv_batch_plan_build(p) == S["SGMV_ERROR_UNSUPPORTED_DTYPE"]
    assert "share one dtype" in ffi.string(L.sgmv_last_error()).decode()
    p = plan_args(8)
    p.lora_indices.shape[0] = 7
    assert L.sgmv_batch_plan_build(p) == S["SGMV_ERROR_INVALID_ARGUMENT"]
    assert "lora_indices has 7 entries, fewer than batches = 8" in ffi.string(L.sgmv_last_error()).decode()
