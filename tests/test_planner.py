"""The planner (csrc/planner.c) on the CPU: the tile, path and grid of every kind of call, the
batch plan's size, the arch family, and that the JIT path launches what the library decides.
Expected values are computed here from aot/tiles.json, independently of the C code."""
import importlib.util
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

def _kernel_source():
    spec = importlib.util.spec_from_file_location("sgmv_kernels_for_planner", ROOT / "kernels" / "sgmv.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


KERNELS = _kernel_source()  # the plan's layout has its source there
HEADER, ALIGN, TABLE_WORDS = KERNELS.PLAN_HEADER.value, KERNELS.PLAN_ALIGN.value, KERNELS.PLAN_TABLE.value


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
    slots = min(4, max(1, TABLE["planner"]["short_programs"] // (groups * n_tiles)))
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
    capacity = (plan_bytes // 4 - HEADER - TABLE_WORDS * batches) // (ALIGN + 1) * ALIGN
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
    assert status == S["SGMV_ERROR_INVALID_ARGUMENT"] and msg.startswith("sgmv_expand: args->rank must be in [1, 256]")
    status, _, msg = config(args(batch_plan=0x70000, batch_plan_bytes=64))
    assert status == S["SGMV_ERROR_INVALID_ARGUMENT"] and "batch_plan_bytes 64" in msg
    assert L.sgmv_expand_config(args(), 90, ffi.NULL) == S["SGMV_ERROR_INVALID_ARGUMENT"]


def test_batch_plan_bytes():
    for b, t in ((0, 0), (1, 1), (256, 256), (4096, 1 << 20), (100000, 100000)):
        cap = (cdiv(t, ALIGN) + b) * ALIGN
        assert L.sgmv_batch_plan_bytes(b, t) == 4 * (HEADER + cap + cap // ALIGN + TABLE_WORDS * b)
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
        tune = TABLE["planner"]
        grid = (max(1, cdiv(batches, segs)), min(tune["plan_max_programs"],
                                                 max(1, cdiv(tokens, tune["plan_rows_per_program"]))), 1)
        assert (c.block_b, c.scan, c.rows, c.num_warps, tuple(c.grid)) == (segs, scan, rows, warps, grid)
        assert c.steps == 2
        assert ffi.string(c.kernel) == b"sgmv_plan_kernel"


@pytest.mark.parametrize("over,status,word", [
    (dict(batches=-1), "SGMV_ERROR_INVALID_ARGUMENT", "batches must be in [0, 2^30)"),
    (dict(plan_bytes=16), "SGMV_ERROR_INVALID_ARGUMENT", "plan_bytes 16"),
    (dict(plan=ffi.cast("void *", 0x9002)), "SGMV_ERROR_INVALID_ARGUMENT", "args->plan is not aligned to its element size (4 bytes)"),
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


# ---- 0.3: shrink, fused slices, per-adapter ranks ---------------------------------------------------

SPLIT_PROGRAMS, MAX_SPLIT, FEW_ROWS = TABLE["split"]  # shrink splits hidden only for calls of <= FEW_ROWS rows
BIG = 1 << 40  # a workspace larger than any split needs


def shrink(tokens=4, hidden=4096, rank=16, slices=1, batches=None, max_seq=1, workspace=0, plan=False, **over):
    """Valid aligned shrink arguments at fake addresses (the planner never dereferences them)."""
    a = ffi.new("sgmv_shrink_args_t *")
    L.sgmv_shrink_args_init(a)
    batches = tokens if batches is None else batches
    f = dict(inputs=0x10000, inputs_dtype=S["SGMV_DTYPE_BFLOAT16"], inputs_row_stride=hidden, weights=0x20000,
             weights_dtype=S["SGMV_DTYPE_BFLOAT16"], weights_lora_stride=rank * hidden, weights_row_stride=hidden,
             output=0x30000, output_dtype=S["SGMV_DTYPE_FLOAT32"], output_row_stride=slices * rank,
             total_tokens=tokens, hidden=hidden, rank=rank, num_loras=4, seq_start=0x40000, seq_len=0x50000,
             lora_indices=0x60000, metadata_dtype=S["SGMV_DTYPE_INT32"], batches=batches, max_seq_length=max_seq,
             num_slices=slices)
    if workspace:
        f.update(workspace=0x80000, workspace_bytes=workspace)
    if plan:
        f.update(batch_plan=0x70000, batch_plan_bytes=L.sgmv_batch_plan_bytes(batches, tokens))
    f.update(over)
    for k, v in f.items():
        ftype = dict(ffi.typeof("sgmv_shrink_args_t").fields)[k].type
        setattr(a, k, ffi.cast(ftype, v) if ftype.kind == "pointer" else v)
    for s in range(slices - 1):
        a.slices[s].weights = ffi.cast("void *", 0x90000 + 0x10000 * s)
        a.slices[s].lora_stride, a.slices[s].row_stride, a.slices[s].rows = rank * hidden, hidden, rank
    return a


def shrink_config(a, arch=90):
    c = ffi.new("sgmv_launch_config_t *")
    status = L.sgmv_shrink_config(a, arch, c)
    assert status == 0, ffi.string(L.sgmv_last_error()).decode()
    return c


def shrink_rule(max_seq, rank, arch="90"):
    for ms, mr, name, path in TABLE["shrink_rules"][arch]:
        if (ms is None or max_seq <= ms) and (mr is None or rank <= mr):
            assert path == "rows"
            return name


def shrink_grouped_rule(rows, rank, arch="90"):
    for mx, mr, name in TABLE["shrink_grouped_rules"][arch]:
        if (mx is None or rows <= mx) and (mr is None or rank <= mr):
            return name


def check_split(c, hidden):
    """The split rules of sgmv.h: grid[2] programs along hidden, each k_split of it (a multiple of
    block_k, the last one not empty); a second launch (steps 2) only to sum partials. Unsplit,
    k_split covers hidden and grid[2] keeps its path's meaning (by segment: row tiles)."""
    assert c.split >= 1 and c.steps == (2 if c.split > 1 else 1)
    assert c.split * c.k_split >= hidden > (c.split - 1) * c.k_split
    if c.split > 1:
        assert c.grid[2] == c.split and c.k_split % c.block_k == 0


SHRINK_SHAPES = [  # (tokens, batches, max_seq, hidden, rank, slices)
    (1, 1, 1, 4096, 16, 1), (4, 4, 1, 4096, 16, 3), (32, 32, 1, 8192, 64, 1), (64, 8, 8, 4096, 8, 2),
    (256, 256, 1, 4096, 16, 3), (512, 2, 256, 4096, 128, 1), (513, 3, 300, 4096, 16, 1), (4096, 4, 1024, 4096, 64, 3),
    (3, 3, 1, 64, 16, 1), (7, 2, 5, 100, 7, 2), (2, 1, 2, 1 << 20, 1, 1), (100, 100, 1, 14336, 256, 1),
]


@pytest.mark.parametrize("plan", [False, True], ids=["no-plan", "plan"])
@pytest.mark.parametrize("shape", SHRINK_SHAPES, ids=str)
def test_shrink_split_rules(shape, plan):
    tokens, batches, max_seq, hidden, rank, slices = shape
    kw = dict(tokens=tokens, batches=batches, max_seq=max_seq, hidden=hidden, rank=rank, slices=slices, plan=plan)
    none, big = shrink_config(shrink(**kw)), shrink_config(shrink(**kw, workspace=BIG))
    for c in (none, big):
        assert c.op == 1 and not c.noop and ffi.string(c.tile).decode() in TILES
        assert (c.block_m, c.block_n, c.block_k, c.num_warps, c.num_stages) == tuple(TILES[ffi.string(c.tile).decode()])
        check_split(c, hidden)
    assert none.split == 1  # no workspace, no split
    if tokens > FEW_ROWS:
        assert big.split == 1
    # The column tiles cover every slice's rank columns.
    assert none.grid[1] * none.block_n >= slices * rank or none.grid[1] >= slices * cdiv(rank, none.block_n)


@pytest.mark.parametrize("arch", ffi.string(L.sgmv_archs()).decode().split(","))
def test_shrink_tiles_and_grids_follow_the_table(arch):
    """Each kind of call gets its rule's tile, the column tiles of every slice's rank columns, and
    the rows of its path: decode by segment (one row tile each), flat when it may split, prefill
    by segment, and adapter-grouped tiles with a plan."""
    a = int(arch)
    # decode, 3 slices, no workspace: by segment, one row tile per segment
    c = shrink_config(shrink(tokens=256, rank=16, slices=3), a)
    bm, bn, _ = check_tile(c, shrink_rule(1, 16, arch))
    assert (c.path, c.flat, c.split) == (S["SGMV_PATH_ROWS"], 0, 1)
    assert tuple(c.grid) == (256, 3 * cdiv(16, bn), 1)
    # the same with a workspace: flat over all row tiles, split over hidden
    c = shrink_config(shrink(tokens=256, rank=16, slices=3, workspace=BIG), a)
    bm, bn, _ = check_tile(c, shrink_rule(1, 16, arch))
    assert (c.path, c.flat) == (S["SGMV_PATH_ROWS"], 1)
    assert tuple(c.grid[0:2]) == (cdiv(256, bm) + 256, 3 * cdiv(16, bn)) and c.grid[2] == c.split
    # prefill: 4 segments of 1024 rows, rank 64, by segment
    c = shrink_config(shrink(tokens=4096, batches=4, max_seq=1024, rank=64, slices=2, workspace=BIG), a)
    bm, bn, _ = check_tile(c, shrink_rule(1024, 64, arch))
    assert (c.path, c.flat, c.split) == (S["SGMV_PATH_ROWS"], 0, 1)
    assert tuple(c.grid) == (4, 2 * cdiv(64, bn), cdiv(1024, bm))
    # a plan: tiles of one adapter's rows (4 adapters, 64 rows each)
    c = shrink_config(shrink(tokens=256, rank=16, slices=2, plan=True), a)
    bm, bn, _ = check_tile(c, shrink_grouped_rule(cdiv(256, 4), 16, arch))
    slots = (cdiv(256, ALIGN) + 4) * ALIGN
    assert c.path == S["SGMV_PATH_GROUPED"] and tuple(c.grid) == (cdiv(min(slots, c.plan_capacity), bm),
                                                                  2 * cdiv(16, bn), 1)
    # rank 7 in two slices: 14-column output rows are off the 16-byte alignment
    c = shrink_config(shrink(tokens=8, rank=7, slices=2), a)
    check_tile(c, "unaligned")


def test_split_stays_within_the_table_and_the_workspace():
    for tokens in (1, 2, 7, 64, 300, FEW_ROWS):
        for slices, rank in ((1, 16), (3, 64), (2, 256)):
            cols = slices * rank
            for ws in (BIG, L.sgmv_shrink_workspace_bytes(tokens, cols), 3 * tokens * cols * 4 + 4):
                c = shrink_config(shrink(tokens=tokens, rank=rank, slices=slices, hidden=8192, workspace=ws))
                check_split(c, 8192)
                assert c.split <= MAX_SPLIT and c.split * tokens * cols * 4 <= ws


def test_decode_with_a_workspace_splits():
    for tokens in (1, 4, 16):
        c = shrink_config(shrink(tokens=tokens, workspace=BIG))
        assert c.split > 1, tokens
        check_split(c, 4096)


def test_workspace_bytes_allow_every_split_the_planner_uses():
    """sgmv_shrink_workspace_bytes(T, C) lets every call of up to T rows and C columns split as with
    an unlimited workspace; fewer bytes never raise the split."""
    for T in (1, 3, 16, 64, 200, 512):
        for C in (16, 48, 192, 768):
            n = L.sgmv_shrink_workspace_bytes(T, C)
            for t in sorted({1, max(1, T // 2), T}):
                for rank, slices in ((C, 1), (C // 3, 3), (16, 1)):
                    if rank > 256 or rank * slices > C:
                        continue
                    for hidden in (4096, 14336):
                        kw = dict(tokens=t, hidden=hidden, rank=rank, slices=slices)
                        want = shrink_config(shrink(**kw, workspace=BIG)).split
                        got = shrink_config(shrink(**kw, workspace=n)).split
                        assert got == want, (T, C, t, rank, slices, hidden, n, got, want)
                        if n > 1:
                            less = shrink_config(shrink(**kw, workspace=n // 2)).split
                            assert 1 <= less <= want


def test_shrink_grid_and_path_like_expand_rows():
    """Without a plan shrink takes a row path; with one (and not uniform prefill) the grouped path."""
    c = shrink_config(shrink(tokens=256, batches=256, plan=True))
    assert c.path == S["SGMV_PATH_GROUPED"] and c.plan_capacity > 0
    c = shrink_config(shrink(tokens=256, batches=256))
    assert c.path in (S["SGMV_PATH_ROWS"], S["SGMV_PATH_SHORT"])


def test_shrink_noop_and_arch():
    for over in (dict(batches=0), dict(tokens=0, batches=3)):
        c = ffi.new("sgmv_launch_config_t *")
        assert L.sgmv_shrink_config(shrink(**over), 75, c) == 0 and c.noop == 1
    c = ffi.new("sgmv_launch_config_t *")
    assert L.sgmv_shrink_config(shrink(), 75, c) == S["SGMV_ERROR_UNSUPPORTED_ARCH"]
    for arch in ffi.string(L.sgmv_archs()).decode().split(","):
        check_split(shrink_config(shrink(workspace=BIG), int(arch)), 4096)


def expand_slices(hiddens, rank=16, lora_ranks=False, **over):
    a = args(rank=rank, hidden=hiddens[0], inputs_row_stride=len(hiddens) * rank, weights_row_stride=rank,
             weights_lora_stride=hiddens[0] * rank, output_row_stride=sum(hiddens), **over)
    a.num_slices = len(hiddens)
    for s, h in enumerate(hiddens[1:]):
        a.slices[s].weights = ffi.cast("void *", 0x90000 + 0x100000 * s)
        a.slices[s].lora_stride, a.slices[s].row_stride, a.slices[s].rows = h * rank, rank, h
    if lora_ranks:
        a.lora_ranks = ffi.cast("void *", 0xB0000)
    return a


@pytest.mark.parametrize("hiddens", [[4096], [4096, 1024, 1024], [14336, 14336], [64, 5, 130], [8, 4096]], ids=str)
@pytest.mark.parametrize("max_seq", [1, 16, 1024])
def test_fused_slices_cover_every_slice(hiddens, max_seq):
    tokens = 1024 if max_seq == 1024 else 256
    batches = 1 if max_seq == 1024 else 256 // max_seq
    status, c, msg = config(expand_slices(hiddens, total_tokens=tokens, batches=batches, max_seq_length=max_seq))
    assert status == 0, msg
    assert c.grid[1] == sum(cdiv(h, c.block_n) for h in hiddens)
    assert c.op == 0 and c.split == 1 and c.steps == 1
    # Any slice off the alignment takes the unaligned tile, as one call of that shape would.
    aligned = all(h % 8 == 0 for h in hiddens)
    if not aligned:
        assert ffi.string(c.tile).decode() == "unaligned"
    else:
        status, one, _ = config(args(rank=16, hidden=hiddens[0], output_row_stride=hiddens[0], total_tokens=tokens,
                                     batches=batches, max_seq_length=max_seq, weights_lora_stride=hiddens[0] * 16))
        assert ffi.string(c.tile) == ffi.string(one.tile) and c.path == one.path


@pytest.mark.parametrize("rank", [16, 64, 7])
def test_lora_ranks_turn_even_k_off(rank):
    for plan in (False, True):
        over = dict(batch_plan=0x70000, batch_plan_bytes=L.sgmv_batch_plan_bytes(256, 256)) if plan else {}
        status, c, msg = config(expand_slices([4096, 1024], rank=rank, lora_ranks=True, **over))
        assert status == 0 and c.even_k == 0, msg
        status, c2, msg = config(expand_slices([4096, 1024], rank=rank, **over))
        assert status == 0 and c2.even_k == int(rank % c2.block_k == 0), msg


def test_call_workspace_bytes_is_the_split_rule():
    """sgmv_shrink_call_workspace_bytes(t, C) is 0 exactly where a call of t rows never splits,
    whatever its workspace; else it is what sgmv_shrink_workspace_bytes(t, C) allows."""
    for t in (1, 2, 64, FEW_ROWS, FEW_ROWS + 1, 4096):
        n = L.sgmv_shrink_call_workspace_bytes(t, 16)
        splits = shrink_config(shrink(tokens=t, batches=1, max_seq=t, workspace=BIG)).split > 1
        assert (n > 0) == splits and n in (0, L.sgmv_shrink_workspace_bytes(t, 16)), (t, n, splits)
    assert L.sgmv_shrink_call_workspace_bytes(0, 16) == L.sgmv_shrink_call_workspace_bytes(1, 0) == 0


@pytest.mark.parametrize("batches,tokens", [(1, 1), (7, 300), (40, 2000)])
def test_plan_kernel_fits_the_bytes_c_sizes(batches, tokens):
    """The plan kernel (kernels/sgmv.py, run by the interpreter through the JIT) writes only inside
    sgmv_batch_plan_bytes(batches, tokens): the layout C sizes is the one the kernel uses."""
    import torch
    import sgmv.jit
    words = L.sgmv_batch_plan_bytes(batches, tokens) // 4
    buf = torch.full((words + 4096,), -7, dtype=torch.int32)
    lens = [tokens // batches + (b < tokens % batches) for b in range(batches)]
    starts = [sum(lens[:b]) for b in range(batches)]
    meta = [torch.tensor(v, dtype=torch.int32) for v in (starts, lens, [b % 3 for b in range(batches)])]
    sgmv.jit.batch_plan(*meta, batches, tokens, 3, out=buf[:words])
    assert (buf[words:] == -7).all(), "the plan kernel wrote past the bytes C sized"
    assert int(buf[0]) > 0 and int(buf[1]) == batches


def test_dtype_matrix_is_the_variant_table_s():
    """C serves exactly aot/variants.py DTYPES (its one source, generated into sgmv_rules.h)."""
    import itertools
    from conftest import aot_variants
    names = {"fp16": "SGMV_DTYPE_FLOAT16", "bf16": "SGMV_DTYPE_BFLOAT16", "fp32": "SGMV_DTYPE_FLOAT32"}
    for x, w, o in itertools.product(names, repeat=3):
        f = dict(inputs_dtype=S[names[x]], weights_dtype=S[names[w]], output_dtype=S[names[o]])
        status, _, msg = config(args(**f))
        assert (status == 0) == ((x, w, o) in aot_variants.DTYPES["expand"]), (x, w, o, msg)
        c = ffi.new("sgmv_launch_config_t *")
        status = L.sgmv_shrink_config(shrink(**f), 90, c)
        assert (status == 0) == ((x, w, o) in aot_variants.DTYPES["shrink"]), (x, w, o)


@pytest.mark.parametrize("dtype,stride,aligned", [("BFLOAT16", 4100, False), ("BFLOAT16", 4104, True),
                                                  ("FLOAT32", 4100, True), ("FLOAT32", 4098, False)])
def test_alignment_is_per_element_size(dtype, stride, aligned):
    """A row stride is aligned when it is a multiple of ALIGN_BYTES in bytes: 8 bf16, 4 fp32."""
    status, c, msg = config(args(output_dtype=S["SGMV_DTYPE_" + dtype], output_row_stride=stride))
    assert status == 0, msg
    assert (ffi.string(c.tile).decode() != "unaligned") == aligned
    assert c.aligned == aligned  # the kernel's ALIGNED constexpr: what the aligned tiles assume


@pytest.mark.parametrize("arch", [int(a) for a in ffi.string(L.sgmv_archs()).decode().split(",")])
def test_no_arch_uses_grid_dependency_control(arch):
    """The kernels use no grid dependency control since 0.6.1 (benchmarks/NOTES.md round 9): the
    config's gdc, kept for the ABI, is 0 and no launch is programmatic."""
    status, c, msg = config(args(), arch)
    assert status == 0, msg
    assert c.gdc == 0 and shrink_config(shrink(), arch).gdc == 0
    assert not hasattr(KERNELS, "GDC_MIN_ARCH")
    d = ffi.new("sgmv_launches_t *")
    d.struct_size = ffi.sizeof("sgmv_launches_t")
    assert L.sgmv_expand_launches(args(), arch, ffi.NULL, d) == 0
    assert d.num_launches == 1 and d.launches[0].programmatic == 0
