"""The Triton kernels of libsgmv: SGMV shrink and expand (one kernel) and the per-step batch plan.

    expand: out[start_b + m, :] (+)= x[start_b + m, :K] @ W[idx_b, :, :K]^T      (N = hidden, K = rank)
    shrink: out[start_b + m, :]    = scale * x[start_b + m, :K] @ W[idx_b, :, :K]^T (N = rank, K = hidden)

Weights are fp16, bf16 or fp8 e4m3 (FP8, from the weights' dtype): fp8 weights are converted to the
inputs' dtype in the product and each output column's fp32 sum is multiplied by its scale (slice s's
scales at ws{s}_ptr, per adapter and column through two runtime strides; column stride 0: one
scale per adapter).

Both are the same grouped GEMM with a small side (rank) and a large one (hidden); what differs is
the SHRINK constexpr (which side a per-adapter rank limits, the scales, and the split of K over
programs for shrink's few rows with a large hidden) and where each fused slice reads its inputs
(x_slice_step). Expand's variants hold no shrink code: every mask an output store uses stays
provably constant over 8 columns, so stores stay 16-byte wide. Up to three fused slices: column tiles of slice 0, then 1, then 2 along
grid axis 1; slice s reads weights w{s}, inputs columns from s * x_slice_step and writes output
columns after slice s - 1's.

This file imports triton only: the AOT build executes it on a machine without a GPU or torch.
Nothing here chooses a tile, a grid or a path: csrc/planner.c does (sgmv_expand_config,
sgmv_shrink_config), for the AOT launch and for the JIT alike. The generator (aot/generate.py)
takes the launcher's argument layout from these signatures and the types in SIGNATURES.

Paths of sgmv_kernel (PATH, a constexpr; the grid the planner gives each):
  ROWS    without a plan, by segment or flat (`flat`, a runtime argument):
          by segment (batches, column tiles, row-tile programs): program (g, n, z) covers segment
          g's row tiles z, z + num_programs(2), ...: uniform prefill;
          flat (cdiv(total_tokens, BLOCK_M) + batches, column tiles, split): program g computes the
          g-th row tile of all segments' row tiles, found by a prefix search: a long segment
          beside many short ones;
  SHORT   (cdiv(batches, BLOCK_M), column tiles, adapter slots): row j of BLOCK_M segments,
          one pass per distinct adapter: decode without a plan (expand only);
  GROUPED (tiles of the plan's slots, column tiles, split): program g computes the BLOCK_M rows of
          one adapter in slots g * BLOCK_M ..., grouped by the batch plan (sgmv_plan_kernel).
Split K (k_split < K, flat and GROUPED only): program z sums K range [z * k_split, ...) into the
fp32 workspace at step 0; at step 1 (a second launch) program z == 0 adds the partial sums in
order of z and stores. Results do not depend on scheduling.
Every row of every valid segment is written once, whatever max_seq_length says (it only picks
the tile), provided segments do not overlap.
"""
import triton
import triton.language as tl

PATH_ROWS, PATH_SHORT, PATH_GROUPED = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)

# The batch plan, in int32 words (csrc/planner.c sizes it): a header, `capacity` row slots (-1:
# none), the adapter of each PLAN_ALIGN slots, then a table of 4 x batches for its construction.
# Each adapter's rows start at a multiple of PLAN_ALIGN, so a tile of BLOCK_M slots (a divisor of
# PLAN_ALIGN) holds one adapter's rows.
PLAN_HEADER = tl.constexpr(4)  # [0] slots used, [1] batches, [2] capacity, [3] 0
PLAN_ALIGN = tl.constexpr(64)
PLAN_TABLE = tl.constexpr(4)  # words per segment of the construction table: key, length, ahead, grows
# What the aligned variants assume, in bytes (csrc/planner.c checks it, is_aligned): every data
# pointer (and the workspace) aligned to it, and every column count, column offset and row stride
# a multiple of it in bytes, i.e. of ALIGN_BYTES / element size elements of its tensor (the
# "unaligned" tile serves the rest). It makes loads and stores along columns 16 bytes wide.
ALIGN_BYTES = tl.constexpr(16)
# Most programs a split of K uses (aot/tiles.json's split rule stays within it): step 1 adds
# the partial sums of a tile in a loop unrolled this far.
MAX_SPLIT = tl.constexpr(8)

# Every runtime parameter's type, in signature order: scalars i32, i64 or fp32; pointers "*" and
# their element type, fixed or the call's dtype of that tensor (*inputs, *weights, *output).
# aot/generate.py checks these against the signatures and generates the C launch's parameter
# list (sgmv_params.h) from them; the C library describes each launch by these names.
SIGNATURES = {
    "sgmv_kernel": {
        "x_ptr": "*inputs", "w_ptr": "*weights", "w1_ptr": "*weights", "w2_ptr": "*weights", "out_ptr": "*output",
        "seq_start_ptr": "*i32", "seq_len_ptr": "*i32", "lora_idx_ptr": "*i32", "plan_ptr": "*i32",
        "ranks_ptr": "*i32", "scales_ptr": "*fp32", "work_ptr": "*fp32",
        "batches": "i32", "num_loras": "i32", "total_tokens": "i64", "N": "i32", "N1": "i32", "N2": "i32",
        "K": "i32", "x_slice_step": "i64", "out_slice_step": "i64", "has_ranks": "i32", "has_scales": "i32",
        "scaling": "fp32", "meta_shift": "i32", "per_token": "i32", "add_inputs": "i32", "flat": "i32", "plan_capacity": "i64",
        "k_split": "i32", "step": "i32", "x_stride_m": "i64", "w_stride_l": "i64", "w_stride_n": "i64",
        "w1_stride_l": "i64", "w1_stride_n": "i64", "w2_stride_l": "i64", "w2_stride_n": "i64",
        "out_stride_m": "i64", "ws_ptr": "*fp32", "ws1_ptr": "*fp32", "ws2_ptr": "*fp32", "ws_stride_l": "i64",
        "ws_stride_n": "i64", "ws1_stride_l": "i64", "ws1_stride_n": "i64", "ws2_stride_l": "i64", "ws2_stride_n": "i64",
    },
    "sgmv_plan_kernel": {
        "plan_ptr": "*i32", "seq_start_ptr": "*i32", "seq_len_ptr": "*i32", "lora_idx_ptr": "*i32",
        "batches": "i32", "num_loras": "i32", "total_tokens": "i64", "meta_shift": "i32", "per_token": "i32",
        "plan_capacity": "i64", "step": "i32",
    },
}


# The data pointers an aligned variant assumes ALIGN_BYTES-aligned (aot/generate.py tells the
# compiler). The JIT specialises on nothing else the AOT build does not: no integer (Triton would
# on 1 and on multiples of 16) and no other pointer (on 16-byte alignment); what an aligned
# variant knows of its sizes and strides, ALIGNED states in the kernel itself. So the JIT compiles
# one kernel per variant, the AOT build's code, however the shapes vary.
ALIGNED_POINTERS = ("x_ptr", "w_ptr", "w1_ptr", "w2_ptr", "out_ptr", "work_ptr")


def _unspecialised(kernel):
    return [name for name in SIGNATURES[kernel] if name not in ALIGNED_POINTERS]


@triton.jit(do_not_specialize=_unspecialised("sgmv_kernel"))
def sgmv_kernel(
    x_ptr,  # (total_tokens, K per slice) rows, unit stride along K
    w_ptr,  # slice 0: (num_loras, N, K), unit stride along K
    w1_ptr,  # slice 1 (N1 > 0), same dtype
    w2_ptr,  # slice 2 (N2 > 0)
    out_ptr,  # (total_tokens, N + N1 + N2) rows, unit stride along columns
    seq_start_ptr,  # (batches,) int32, or int64 read as pairs of int32 words (meta_shift 1)
    seq_len_ptr,  # (batches,) likewise
    lora_idx_ptr,  # (batches,) likewise
    plan_ptr,  # int32 batch plan (GROUPED), else unused
    ranks_ptr,  # int32 (num_loras,) per-adapter ranks (has_ranks), else unused
    scales_ptr,  # fp32 (num_loras,) per-adapter scales (has_scales), else unused
    work_ptr,  # fp32 (split, total_tokens, N + N1 + N2) partial sums (k_split < K), else unused
    batches,
    num_loras,
    total_tokens,
    N,  # columns of slice 0
    N1,  # columns of slice 1 (0: none)
    N2,  # columns of slice 2 (0: none)
    K,
    x_slice_step,  # inputs elements between slices (expand: K, or a slice plane; shrink: 0)
    out_slice_step,  # shrink: output elements between slices (K columns, or a slice plane); expand: unused
    has_ranks,
    has_scales,
    scaling,  # fp32, multiplies the product
    meta_shift,  # 0: int32 metadata, 1: int64 (one kernel serves both)
    per_token,  # 1: lora_idx_ptr maps each row to its adapter (segment b is row b), no seq_start / seq_len
    add_inputs,  # nonzero: out += product
    flat,  # PATH_ROWS: 0 by segment, 1 flat
    plan_capacity,  # row slots of the plan
    k_split,  # K per split program, a multiple of BLOCK_K (>= K: no split)
    step,  # split K: 0 partial sums, 1 their sum stored
    x_stride_m,
    w_stride_l,
    w_stride_n,
    w1_stride_l,
    w1_stride_n,
    w2_stride_l,
    w2_stride_n,
    out_stride_m,
    ws_ptr,  # fp8 weights: fp32 scales of slice 0, scale of adapter l, column n at l * ws_stride_l + n * ws_stride_n
    ws1_ptr,  # slice 1's scales (fp8 weights), else unused
    ws2_ptr,  # slice 2's scales
    ws_stride_l,
    ws_stride_n,  # 0: one scale per adapter
    ws1_stride_l,
    ws1_stride_n,
    ws2_stride_l,
    ws2_stride_n,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PATH: tl.constexpr,  # PATH_*
    EVEN_K: tl.constexpr,
    SHRINK: tl.constexpr,  # shrink: a per-adapter rank limits each slice's columns, scales, split K
    ALIGNED: tl.constexpr,  # every size and stride a multiple of 16 bytes of its tensor's elements (the planner checks)
):
    # Elements of 16 bytes of the weights: K (a multiple of it where ALIGNED) is read in whole groups.
    EW: tl.constexpr = ALIGN_BYTES * 8 // w_ptr.dtype.element_ty.primitive_bitwidth
    VEC: tl.constexpr = 1 + (EW - 1) * ALIGNED
    # fp8 weights (the weights' dtype, not a constexpr of its own): each slice's fp32 scales
    # multiply the fp32 sums of products of the weights as stored, per output column.
    FP8: tl.constexpr = w_ptr.dtype.element_ty.primitive_bitwidth == 8
    if ALIGNED:
        # (v // E) * E == v here; it tells the compiler that v is a multiple of E (a hint on an
        # argument would not reach it), so that accesses along columns are 16 bytes wide.
        EX: tl.constexpr = ALIGN_BYTES * 8 // x_ptr.dtype.element_ty.primitive_bitwidth
        EO: tl.constexpr = ALIGN_BYTES * 8 // out_ptr.dtype.element_ty.primitive_bitwidth
        N, N1, N2, K = N // EO * EO, N1 // EO * EO, N2 // EO * EO, K // EW * EW
        out_slice_step, out_stride_m = out_slice_step // EO * EO, out_stride_m // EO * EO
        x_slice_step, x_stride_m = x_slice_step // EX * EX, x_stride_m // EX * EX
        w_stride_l, w_stride_n = w_stride_l // EW * EW, w_stride_n // EW * EW
        w1_stride_l, w1_stride_n = w1_stride_l // EW * EW, w1_stride_n // EW * EW
        w2_stride_l, w2_stride_n = w2_stride_l // EW * EW, w2_stride_n // EW * EW
    pid_g = tl.program_id(0).to(tl.int64)
    # The column tile's slice and its weights, columns and inputs.
    pid_n = tl.program_id(1)
    tiles0 = tl.cdiv(N, BLOCK_N)
    tiles1 = tl.cdiv(N1, BLOCK_N)
    in1 = pid_n >= tiles0
    in2 = pid_n >= tiles0 + tiles1
    w_base = tl.where(in2, w2_ptr, tl.where(in1, w1_ptr, w_ptr))
    stride_l = tl.where(in2, w2_stride_l, tl.where(in1, w1_stride_l, w_stride_l))
    stride_n = tl.where(in2, w2_stride_n, tl.where(in1, w1_stride_n, w_stride_n))
    n_len = tl.where(in2, N2, tl.where(in1, N1, N))
    col0 = tl.where(in2, N + N1, tl.where(in1, N, 0)).to(tl.int64)
    tile_n = pid_n - tl.where(in2, tiles0 + tiles1, tl.where(in1, tiles0, 0))
    ws_base = tl.where(in2, ws2_ptr, tl.where(in1, ws1_ptr, ws_ptr))
    ws_l = tl.where(in2, ws2_stride_l, tl.where(in1, ws1_stride_l, ws_stride_l))
    ws_n = tl.where(in2, ws2_stride_n, tl.where(in1, ws1_stride_n, ws_stride_n))
    x_base = x_ptr + (in1.to(tl.int64) + in2.to(tl.int64)) * x_slice_step
    out_base = out_ptr + col0
    if SHRINK:  # every slice has K columns; the slices may lie in planes (slices, total_tokens, rank)
        out_base = out_ptr + (in1.to(tl.int64) + in2.to(tl.int64)) * out_slice_step
    work_base = work_ptr + col0
    work_stride_m = tl.zeros((), tl.int64) + N + N1 + N2  # (the JIT may pass these as constants)

    # All addresses are formed in int64: 87k tokens x 12288 columns already overflows int32.
    offs_n = tile_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_len
    offs_k = tl.arange(0, BLOCK_K)
    w_cols = offs_n[None, :] * stride_n + offs_k[:, None]  # (BLOCK_K, BLOCK_N)
    ws_cols = offs_n * ws_n

    if PATH == PATH_GROUPED:  # the plan lists, per tile, BLOCK_M rows of one adapter
        p0 = pid_g * BLOCK_M
        if p0 < tl.load(plan_ptr):
            rows = tl.load(plan_ptr + PLAN_HEADER + p0 + tl.arange(0, BLOCK_M)).to(tl.int64)
            lora = tl.load(plan_ptr + PLAN_HEADER + plan_capacity + p0 // PLAN_ALIGN).to(tl.int64)
            # The plan is not trusted further than the metadata: rows and adapter are bounded here.
            m_mask = (rows >= 0) & (rows < total_tokens)
            if (lora >= 0) & (lora < num_loras) & (tl.max(m_mask.to(tl.int32), axis=0) > 0):
                _tile(x_base, w_base + lora * stride_l, out_base, work_base, lora, rows, m_mask, x_stride_m,
                      out_stride_m, work_stride_m, w_cols, offs_n, n_mask, offs_k, K, k_split, step, total_tokens,
                      ranks_ptr, has_ranks, scales_ptr, has_scales, scaling, add_inputs, ws_base + lora * ws_l,
                      ws_cols, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, SHRINK, VEC, FP8)
    elif PATH == PATH_SHORT:
        # The BLOCK_M rows of a tile are BLOCK_M segments, row j of each. Program z takes the
        # adapters a with a % num_programs(2) == z, one pass per adapter present, so an adapter's
        # weight tile is read once per program however many of its segments use it. Expand only:
        # no split, no scales, ranks limit K.
        segs = pid_g * BLOCK_M + tl.arange(0, BLOCK_M)
        loras, starts, ends, valid = _segments(segs, seq_start_ptr, seq_len_ptr, lora_idx_ptr, meta_shift, per_token,
                                               batches, num_loras, total_tokens)
        ranks = tl.full((BLOCK_M,), K, tl.int32)
        if has_ranks != 0:
            ranks = tl.minimum(tl.load(ranks_ptr + loras, mask=valid, other=0), K)
        mine = valid & (ranks > 0) & (loras % tl.num_programs(2) == tl.program_id(2))
        for j in range(0, tl.max(tl.where(mine, ends - starts, 0), axis=0)):
            offs_m = starts + j
            m_mask = mine & (offs_m < ends)
            out_ptrs, out_mask, prior = _load_prior(out_base, offs_m, m_mask, offs_n, n_mask, out_stride_m,
                                                    add_inputs)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            todo = m_mask
            while tl.max(todo.to(tl.int32), axis=0) > 0:
                adapter = tl.min(tl.where(todo, loras, num_loras), axis=0)
                k_end = tl.max(tl.where(todo & (loras == adapter), ranks, 0), axis=0)
                rows = todo & (loras == adapter)
                if FP8:  # this adapter's products scaled by its column scales, its rows only
                    scales = _col_scales(ws_base + adapter * ws_l, ws_cols, n_mask, FP8)
                    part = _accumulate(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), x_base,
                                       w_base + adapter * stride_l, offs_m, rows, x_stride_m, w_cols, n_mask, offs_k,
                                       0, k_end, BLOCK_K, EVEN_K, VEC, 1, FP8)
                    part = _dequant(part, scales, FP8)
                    acc += tl.where(rows[:, None], part, 0.0)
                else:
                    acc = _accumulate(acc, x_base, w_base + adapter * stride_l, offs_m, rows, x_stride_m, w_cols,
                                      n_mask, offs_k, 0, k_end, BLOCK_K, EVEN_K, VEC, 1, FP8)
                todo = todo & (loras != adapter)
            _store(acc, prior, out_ptrs, out_mask, add_inputs)
    elif flat == 0:  # PATH_ROWS by segment: program (g, n, z) covers segment g's row tiles z, z + num_programs(2), ...
        lora, start, end, valid = _segments(pid_g, seq_start_ptr, seq_len_ptr, lora_idx_ptr, meta_shift, per_token,
                                            batches, num_loras, total_tokens)
        if valid:
            for row0 in range(start + tl.program_id(2) * BLOCK_M, end, tl.num_programs(2) * BLOCK_M):
                offs_m = row0 + tl.arange(0, BLOCK_M)
                _tile(x_base, w_base + lora * stride_l, out_base, work_base, lora, offs_m, offs_m < end, x_stride_m,
                      out_stride_m, work_stride_m, w_cols, offs_n, n_mask, offs_k, K, k_split, step, total_tokens,
                      ranks_ptr, has_ranks, scales_ptr, has_scales, scaling, add_inputs, ws_base + lora * ws_l,
                      ws_cols, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, SHRINK, VEC, FP8)
    else:  # PATH_ROWS, flat
        # Program g computes the g-th row tile of the list of all segments' row tiles, found by a
        # prefix sum over the segments, _SEARCH at a time; programs past the last tile idle.
        found = tl.zeros((), tl.int32)
        lora = tl.zeros((), tl.int64)
        row0 = tl.zeros((), tl.int64)
        end = tl.zeros((), tl.int64)
        tiles_before = tl.zeros((), tl.int64)
        b0 = tl.zeros((), tl.int64)
        while (b0 < batches) & (found == 0):
            segs = b0 + tl.arange(0, _SEARCH)
            loras, starts, ends, valid = _segments(segs, seq_start_ptr, seq_len_ptr, lora_idx_ptr, meta_shift,
                                                   per_token, batches, num_loras, total_tokens)
            tiles = tl.where(valid, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
            last = tiles_before + tl.cumsum(tiles, axis=0)
            hit = (pid_g >= last - tiles) & (pid_g < last)  # at most one segment
            # The hit segment's fields, taken from the vectors already loaded (no second round trip).
            found = tl.max(hit.to(tl.int32), axis=0)
            lora = tl.sum(tl.where(hit, loras, 0), axis=0)
            row0 = tl.sum(tl.where(hit, starts + (pid_g - (last - tiles)) * BLOCK_M, 0), axis=0)
            end = tl.sum(tl.where(hit, ends, 0), axis=0)
            tiles_before += tl.sum(tiles, axis=0)
            b0 += _SEARCH
        if found != 0:
            offs_m = row0 + tl.arange(0, BLOCK_M)
            _tile(x_base, w_base + lora * stride_l, out_base, work_base, lora, offs_m, offs_m < end, x_stride_m,
                  out_stride_m, work_stride_m, w_cols, offs_n, n_mask, offs_k, K, k_split, step, total_tokens,
                  ranks_ptr, has_ranks, scales_ptr, has_scales, scaling, add_inputs, ws_base + lora * ws_l, ws_cols,
                  BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, SHRINK, VEC, FP8)


@triton.jit(do_not_specialize=_unspecialised("sgmv_plan_kernel"))
def sgmv_plan_kernel(
    plan_ptr,  # int32: header, plan_capacity row slots, an adapter per PLAN_ALIGN slots, 4 x batches
    seq_start_ptr,
    seq_len_ptr,
    lora_idx_ptr,
    batches,
    num_loras,
    total_tokens,
    meta_shift,
    per_token,
    plan_capacity,  # a multiple of PLAN_ALIGN
    step,  # 0, then 1 (two launches: step 1 needs every segment's step-0 result)
    SEGS: tl.constexpr,
    SCAN: tl.constexpr,
    ROWS: tl.constexpr,
):
    """Groups the step's rows by adapter: segments sorted by (adapter, index), each adapter's rows
    in consecutive slots from a multiple of PLAN_ALIGN. Program (c, y) takes segments c * SEGS ...
    and, at step 1, rows y * ROWS, (y + num_programs(1)) * ROWS, ... of each. No sort: a segment's
    place is a count over the segments sorted before it, SCAN at a time.
      step 0: rows of the same adapter before each segment (`ahead`), and the slots it adds to its
              adapter's padded group (`grows`; summed over an adapter: its rows rounded up to
              PLAN_ALIGN), kept in the plan's segment table;
      step 1: first slot = grows of the adapters sorted before + ahead; rows, holes and adapters
              written. Invalid segments get no slots; slots past the capacity (only overlapping
              segments can need them) are dropped."""
    table = plan_ptr + PLAN_HEADER + plan_capacity + plan_capacity // PLAN_ALIGN  # key, length, ahead, grows
    mine = tl.program_id(0) * SEGS + tl.arange(0, SEGS)
    in_batch = mine < batches
    lora, start, end, valid = _segments(mine, seq_start_ptr, seq_len_ptr, lora_idx_ptr, meta_shift, per_token,
                                        batches, num_loras, total_tokens)
    length = tl.where(valid, end - start, 0).to(tl.int32)  # < 2^30
    key = tl.where(valid, lora, num_loras).to(tl.int32)  # invalid segments: one empty group, last
    if step == 0:
        if tl.program_id(1) == 0:
            ahead = tl.zeros((SEGS,), tl.int64)
            for j0 in range(0, batches, SCAN):
                other = j0 + tl.arange(0, SCAN)
                o_lora, o_start, o_end, o_valid = _segments(other, seq_start_ptr, seq_len_ptr, lora_idx_ptr,
                                                            meta_shift, per_token, batches, num_loras, total_tokens)
                same = (tl.where(o_valid, o_lora, num_loras).to(tl.int32)[None, :] == key[:, None]) & \
                    (other[None, :] < mine[:, None])
                ahead += tl.sum(tl.where(same, tl.where(o_valid, o_end - o_start, 0)[None, :], 0), axis=1)
            ahead = tl.minimum(ahead, plan_capacity)
            grows = tl.where(length > 0, _round_up(ahead + length) - _round_up(ahead), 0)
            tl.store(table + mine, key, mask=in_batch)
            tl.store(table + batches + mine, length, mask=in_batch)
            tl.store(table + 2 * batches + mine, ahead.to(tl.int32), mask=in_batch)
            tl.store(table + 3 * batches + mine, grows.to(tl.int32), mask=in_batch)
    else:
        ahead = tl.load(table + 2 * batches + mine, mask=in_batch, other=0).to(tl.int64)
        begin = tl.zeros((SEGS,), tl.int64)  # the first slot of this segment's adapter group
        behind = tl.zeros((SEGS,), tl.int64)  # rows of the same adapter after this segment
        used = tl.zeros((), tl.int64)
        for j0 in range(0, batches, SCAN):
            other = j0 + tl.arange(0, SCAN)
            o_in = other < batches
            o_key = tl.load(table + other, mask=o_in, other=-1)
            o_length = tl.load(table + batches + other, mask=o_in, other=0)
            o_grows = tl.load(table + 3 * batches + other, mask=o_in, other=0).to(tl.int64)
            begin += tl.sum(tl.where(o_key[None, :] < key[:, None], o_grows[None, :], 0), axis=1)
            after = (o_key[None, :] == key[:, None]) & (other[None, :] > mine[:, None])
            behind += tl.sum(tl.where(after, o_length[None, :], 0).to(tl.int64), axis=1)
            used += tl.sum(o_grows, axis=0)
        used = tl.minimum(used, plan_capacity)
        first = begin + ahead
        rows_ptr = plan_ptr + PLAN_HEADER
        lora_ptr = plan_ptr + PLAN_HEADER + plan_capacity
        r = tl.arange(0, ROWS)
        for r0 in range(tl.program_id(1) * ROWS, tl.max(length, axis=0), tl.num_programs(1) * ROWS):
            slot = first[:, None] + r0 + r[None, :]
            mask = (r0 + r[None, :] < length[:, None]) & (slot < used)
            tl.store(rows_ptr + slot, (start[:, None] + r0 + r[None, :]).to(tl.int32), mask=mask)
        if tl.program_id(1) == 0:
            # The group's adapter, once per PLAN_ALIGN slots this segment touches; and after the
            # group's last segment, empty slots up to the next multiple of PLAN_ALIGN.
            blocks = tl.where(length > 0, (first + length + PLAN_ALIGN - 1) // PLAN_ALIGN - first // PLAN_ALIGN, 0)
            a = tl.arange(0, ROWS)
            for b0 in range(0, tl.max(blocks, axis=0), ROWS):
                block = first[:, None] // PLAN_ALIGN + b0 + a[None, :]
                mask = (b0 + a[None, :] < blocks[:, None]) & (block * PLAN_ALIGN < used)
                tl.store(lora_ptr + block, (lora[:, None] + 0 * a[None, :]).to(tl.int32), mask=mask)
            last = (length > 0) & (behind == 0)
            h = tl.arange(0, PLAN_ALIGN)
            hole = first[:, None] + length[:, None] + h[None, :]
            tl.store(rows_ptr + hole, -1, mask=last[:, None] & (hole < _round_up(first + length)[:, None]) &
                     (hole < used))
            if tl.program_id(0) == 0:
                tl.store(plan_ptr + 1, batches)
                tl.store(plan_ptr + 2, plan_capacity)
                tl.store(plan_ptr + 3, 0)
                tl.store(plan_ptr, used)


@triton.jit
def _round_up(n):
    return (n + PLAN_ALIGN - 1) // PLAN_ALIGN * PLAN_ALIGN


@triton.jit
def _tile(x_base, w_base, out_base, work_base, lora, offs_m, m_mask, x_stride_m, out_stride_m, work_stride_m, w_cols,
          offs_n, n_mask, offs_k, K, k_split, step, total_tokens, ranks_ptr, has_ranks, scales_ptr, has_scales,
          scaling, add_inputs, ws_row, ws_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, SHRINK: tl.constexpr, VEC: tl.constexpr,
          FP8: tl.constexpr):
    """Rows offs_m (where m_mask) of adapter `lora`, whose weights are at w_base. Per-adapter
    values are scalars chosen in branches; vector masks are never (a mask that passes through a
    branch loses what the compiler knows of it, and with it 16-byte accesses). FP8: ws_row is the
    adapter's scales, ws_cols each column's offset in it."""
    if SHRINK:
        rank = K  # with ranks, columns >= rank[lora] are neither read nor written (rank 0: nothing)
        if has_ranks != 0:
            rank = tl.load(ranks_ptr + lora)
        w_mask = tl.where(has_ranks == 0, n_mask, n_mask & (offs_n < rank))
        if tl.max(w_mask.to(tl.int32), axis=0) > 0:
            scale = scaling
            if has_scales != 0:
                scale = scale * tl.load(scales_ptr + lora)
            z = tl.program_id(2)
            out_mask = m_mask[:, None] & w_mask[None, :]
            out_ptrs = out_base + offs_m[:, None] * out_stride_m + offs_n[None, :]
            # Partial sums: whole rows of the tile (wide accesses); columns past the rank hold zeros.
            part_mask = m_mask[:, None] & n_mask[None, :]
            partial = work_base + offs_m[:, None] * work_stride_m + offs_n[None, :]  # split z's at + z * plane
            plane = total_tokens * work_stride_m
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if k_split >= K:
                scales = _col_scales(ws_row, ws_cols, w_mask, FP8)
                acc = _accumulate(acc, x_base, w_base, offs_m, m_mask, x_stride_m, w_cols, w_mask, offs_k, 0, K,
                                  BLOCK_K, EVEN_K, VEC, VEC, FP8)
                acc = _dequant(acc, scales, FP8)
                tl.store(out_ptrs, (acc * scale).to(out_ptrs.dtype.element_ty), mask=out_mask)
            elif step == 0:
                k_lo = tl.multiple_of(z * k_split, BLOCK_K)  # the planner makes k_split a multiple of BLOCK_K
                acc = _accumulate(acc, x_base, w_base, offs_m, m_mask, x_stride_m, w_cols, w_mask, offs_k, k_lo,
                                  tl.minimum(k_lo + k_split, K), BLOCK_K, EVEN_K, VEC, VEC, FP8)
                tl.store(partial + z * plane, acc, mask=part_mask)
            elif z == 0:  # step 1: the partial sums in order of z (independent loads, issued together)
                scales = _col_scales(ws_row, ws_cols, w_mask, FP8)
                for j in tl.static_range(MAX_SPLIT):
                    acc += tl.load(partial + j * plane, mask=tl.where(j * k_split < K, part_mask, False), other=0.0)
                acc = _dequant(acc, scales, FP8)
                tl.store(out_ptrs, (acc * scale).to(out_ptrs.dtype.element_ty), mask=out_mask)
    else:
        out_ptrs, out_mask, prior = _load_prior(out_base, offs_m, m_mask, offs_n, n_mask, out_stride_m, add_inputs)
        k_end = K  # a per-adapter rank ends K early (rank 0: nothing written)
        if has_ranks != 0:
            k_end = tl.minimum(tl.load(ranks_ptr + lora), K)
        scales = _col_scales(ws_row, ws_cols, n_mask, FP8)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc = _accumulate(acc, x_base, w_base, offs_m, m_mask, x_stride_m, w_cols, n_mask, offs_k, 0, k_end,
                          BLOCK_K, EVEN_K, VEC, 1, FP8)
        acc = _dequant(acc, scales, FP8)
        _store(acc, prior, out_ptrs, tl.where(k_end > 0, out_mask, False), add_inputs)


_SEARCH = tl.constexpr(256)


@triton.jit
def _segments(segs, seq_start_ptr, seq_len_ptr, lora_idx_ptr, meta_shift, per_token, batches, num_loras,
              total_tokens):
    """Adapter, first row, end row and validity of segments `segs` (per_token: segment b is row b).
    Metadata is not trusted: unknown adapters, negative starts or lengths, int64 values outside
    int32 are skipped, and a segment past the last token is clipped."""
    in_range = segs < batches
    by_segment = tl.where(per_token != 0, False, in_range)
    lora, lora_ok = _metadata(lora_idx_ptr, segs, in_range, meta_shift)
    start, start_ok = _metadata(seq_start_ptr, segs, by_segment, meta_shift)
    length, length_ok = _metadata(seq_len_ptr, segs, by_segment, meta_shift)
    start = tl.where(per_token != 0, segs.to(tl.int64), start)
    length = tl.where(per_token != 0, 1, length)
    end = tl.minimum(start + length, total_tokens)
    valid = in_range & lora_ok & start_ok & length_ok & (lora >= 0) & (lora < num_loras) & (start >= 0) & (end > start)
    return lora, start, end, valid


@triton.jit
def _metadata(ptr, segs, mask, meta_shift):
    """Entries `segs` of an int32 array (meta_shift 0) or of an int64 one read as int32 words
    (meta_shift 1: low word, and the high word only to check that the value fits in int32)."""
    lo = tl.load(ptr + (segs << meta_shift), mask=mask, other=0)
    hi = tl.load(ptr + (segs << meta_shift) + 1, mask=tl.where(meta_shift != 0, mask, False), other=0)
    return lo.to(tl.int64), tl.where(meta_shift == 0, True, hi == (lo >> 31))


@triton.jit
def _load_prior(out_ptr, offs_m, m_mask, offs_n, n_mask, out_stride_m, add_inputs):
    """The output tile's addresses and mask, and with add_inputs its old values, loaded before
    the products so that the load overlaps them."""
    out_ptrs = out_ptr + offs_m[:, None] * out_stride_m + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    prior = tl.load(out_ptrs, mask=tl.where(add_inputs != 0, out_mask, False), other=0.0)
    return out_ptrs, out_mask, prior


@triton.jit
def _accumulate(acc, x_ptr, w_base, offs_m, m_mask, x_stride_m, w_cols, n_mask, offs_k, k_lo, k_hi,
                BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, VEC: tl.constexpr, X_VEC: tl.constexpr,
                FP8: tl.constexpr):
    """acc += x[offs_m, k_lo:k_hi] @ w_base[cols, k_lo:k_hi]^T over the rows in m_mask (others add
    zero). EVEN_K: k_hi - k_lo is a multiple of BLOCK_K. VEC, X_VEC: see _load_k, for w and x (the
    expand passes X_VEC 1: x's columns past an adapter's rank are left unwritten by a shrink, the
    layer's own included, and reading them is an uninitialised read)."""
    x_rows = x_ptr + offs_m[:, None] * x_stride_m
    for k0 in range(k_lo, k_hi, BLOCK_K):
        x = _load_k(x_rows + (k0 + offs_k)[None, :], m_mask[:, None], offs_k[None, :], k_hi - k0, EVEN_K, X_VEC)
        w = _load_k(w_base + w_cols + k0, n_mask[None, :], offs_k[:, None], k_hi - k0, EVEN_K, VEC)
        acc = _dot(acc, x, w, FP8)
    return acc


@triton.jit
def _dot(acc, x, w, FP8: tl.constexpr):
    """acc + x @ w in fp32. fp32 inputs are rounded to the weight dtype first, as LoRAX does; fp8
    weights are converted to the inputs' dtype (fp16 or bf16: exact), their scales applied later."""
    if FP8:
        acc += tl.dot(x, w.to(x.dtype))
    else:
        acc += tl.dot(x.to(w.dtype), w)
    return acc


@triton.jit
def _col_scales(ws_row, ws_cols, n_mask, FP8: tl.constexpr):
    """fp8 weights: each column's scale (ws_row + ws_cols: the adapter's row of scales; one per
    adapter where the column stride is 0), loaded before the products so that the load overlaps
    them (after them it is one more round trip in each program)."""
    if FP8:
        return tl.load(ws_row + ws_cols, mask=n_mask, other=0.0)
    else:
        return tl.zeros((), tl.float32)


@triton.jit
def _dequant(acc, scales, FP8: tl.constexpr):
    """fp8 weights: the fp32 products of the weights as stored times each column's scale."""
    if FP8:
        acc = acc * scales[None, :]
    return acc


@triton.jit
def _load_k(ptrs, mask, offs_k, k_left, EVEN_K: tl.constexpr, VEC: tl.constexpr):
    """A block of x or w along K, where mask and (unless EVEN_K) offs_k < k_left. With VEC > 1
    (aligned variants: K a multiple of VEC, and the block's start too) the columns up to k_left
    rounded up to VEC are loaded, still inside K, in whole 16-byte groups, then those past k_left
    zeroed: a per-adapter rank ends K anywhere without narrowing the loads."""
    if EVEN_K:
        v = tl.load(ptrs, mask=mask, other=0.0)
    elif VEC == 1:
        v = tl.load(ptrs, mask=mask & (offs_k < k_left), other=0.0)
    else:
        v = tl.load(ptrs, mask=mask & (offs_k < (k_left + VEC - 1) // VEC * VEC), other=0.0)
        v = tl.where(offs_k < k_left, v, tl.zeros_like(v))
    return v


@triton.jit
def _store(acc, prior, out_ptrs, out_mask, add_inputs):
    # The old value is added in fp32 to the finished product, and the sum rounded once; without
    # add_inputs the product is stored as is (keeping the sign of a zero).
    acc = tl.where(add_inputs != 0, acc + prior.to(tl.float32), acc)
    tl.store(out_ptrs, acc.to(out_ptrs.dtype.element_ty), mask=out_mask)
