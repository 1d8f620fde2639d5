"""SGMV expand: out[start_b + m, :] (+)= x[start_b + m, :K] @ W[idx_b, :, :K]^T.

The one kernel source of libsgmv. It imports triton only: the AOT build executes this file
on a machine without a GPU or torch. Tiles and dtypes are chosen by the caller (aot/variants.py).

Grid (aot/variants.py, grid()): axis 0 is never limited to 65535, axis 1 is the column tile.
  - SHORT=False, by segment: (batches, column tiles, row-tile programs): program (g, n, z) covers
    segment g's row tiles z, z + num_programs(2), ...;
  - SHORT=False, flat: (cdiv(total_tokens, BLOCK_M) + batches, column tiles, 1): program g
    computes the g-th row tile of all segments' row tiles (at most that many exist);
  - SHORT=True: (cdiv(batches, BLOCK_M), column tiles, adapter slots): program (g, n, z) covers
    every row of segments g*BLOCK_M .. g*BLOCK_M + BLOCK_M - 1 whose adapter is z modulo the slots.
Every row of every valid segment is written once, whatever max_seq_length says (it only picks
the tile), provided segments do not overlap.
"""
import triton
import triton.language as tl


# K is not specialised when it is 1: the AOT variants serve every rank with one code path, and
# the JIT must run the same code to give the same bits.
@triton.jit(do_not_specialize=["K"])
def sgmv_expand_kernel(
    x_ptr,  # (total_tokens, K) rows, unit stride along K
    w_ptr,  # (num_loras, N, K), unit stride along K
    out_ptr,  # (total_tokens, N) rows, unit stride along N
    seq_start_ptr,  # (batches,) int32, or int64 read as pairs of int32 words (meta_shift 1)
    seq_len_ptr,  # (batches,) likewise
    lora_idx_ptr,  # (batches,) likewise
    batches,
    num_loras,
    total_tokens,
    N,
    K,
    meta_shift,  # 0: int32 metadata, 1: int64 (one kernel serves both: half the variants)
    x_stride_m,
    w_stride_l,
    w_stride_n,
    out_stride_m,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SHORT: tl.constexpr,
    EVEN_K: tl.constexpr,
    ADD_INPUTS: tl.constexpr,
):
    pid_g = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)

    # All addresses are formed in int64: 87k tokens x 12288 columns already overflows int32.
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_cols = offs_n[None, :] * w_stride_n + offs_k[:, None]  # (BLOCK_K, BLOCK_N)

    if SHORT:
        # Short segments (decode, speculative): the BLOCK_M rows of a tile are BLOCK_M segments,
        # row j of each. Program z takes the adapters a with a % num_programs(2) == z, one pass
        # per adapter present, so an adapter's weight tile is read once per program however
        # many of the program's segments use it, and programs with different adapters run side by side.
        segs = pid_g * BLOCK_M + tl.arange(0, BLOCK_M)
        lora, start, end, valid = _segments(segs, seq_start_ptr, seq_len_ptr, lora_idx_ptr, meta_shift, batches,
                                            num_loras, total_tokens)
        mine = valid & (lora % tl.num_programs(2) == tl.program_id(2))
        for j in range(0, tl.max(tl.where(mine, end - start, 0), axis=0)):
            offs_m = start + j
            m_mask = mine & (offs_m < end)
            out_ptrs, out_mask, prior = _load_prior(out_ptr, offs_m, m_mask, offs_n, n_mask, out_stride_m, ADD_INPUTS)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            todo = m_mask
            while tl.max(todo.to(tl.int32), axis=0) > 0:
                adapter = tl.min(tl.where(todo, lora, num_loras), axis=0)
                acc = _accumulate(acc, x_ptr, w_ptr + adapter * w_stride_l, offs_m, todo & (lora == adapter),
                                  x_stride_m, w_cols, n_mask, offs_k, K, BLOCK_K, EVEN_K)
                todo = todo & (lora != adapter)
            _store(acc, prior, out_ptrs, out_mask, ADD_INPUTS)
    elif tl.num_programs(0) == batches:
        # By segment: program (g, n, z) covers segment g's row tiles z, z + num_programs(2), ...
        # The host picks this grid when segments are of similar length (little of it idles).
        lora, start, end, valid = _segments(pid_g, seq_start_ptr, seq_len_ptr, lora_idx_ptr, meta_shift, batches,
                                            num_loras, total_tokens)
        if valid:
            for row0 in range(start + tl.program_id(2) * BLOCK_M, end, tl.num_programs(2) * BLOCK_M):
                _row_tile(x_ptr, w_ptr + lora * w_stride_l, out_ptr, row0, end, x_stride_m, out_stride_m, w_cols,
                          offs_n, n_mask, offs_k, K, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, ADD_INPUTS)
    else:
        # Flat: program g computes the g-th row tile of the list of all segments' row tiles, found
        # by a prefix sum over the segments, _SEARCH at a time. The grid is sized by the token
        # count (cdiv(total_tokens, BLOCK_M) + batches > batches), not by max_seq_length x
        # batches, so a long segment beside many short ones launches no idle programs.
        found = tl.zeros((), tl.int32)
        lora = tl.zeros((), tl.int64)
        row0 = tl.zeros((), tl.int64)
        end = tl.zeros((), tl.int64)
        tiles_before = tl.zeros((), tl.int64)
        b0 = tl.zeros((), tl.int64)
        while (b0 < batches) & (found == 0):
            segs = b0 + tl.arange(0, _SEARCH)
            loras, starts, ends, valid = _segments(segs, seq_start_ptr, seq_len_ptr, lora_idx_ptr, meta_shift,
                                                   batches, num_loras, total_tokens)
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
            _row_tile(x_ptr, w_ptr + lora * w_stride_l, out_ptr, row0, end, x_stride_m, out_stride_m, w_cols,
                      offs_n, n_mask, offs_k, K, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, ADD_INPUTS)


@triton.jit
def _row_tile(x_ptr, w_base, out_ptr, row0, end, x_stride_m, out_stride_m, w_cols, offs_n, n_mask, offs_k, K,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
              ADD_INPUTS: tl.constexpr):
    """Rows row0 .. min(row0 + BLOCK_M, end) - 1 of one segment, whose adapter's weights are at w_base."""
    offs_m = row0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < end
    out_ptrs, out_mask, prior = _load_prior(out_ptr, offs_m, m_mask, offs_n, n_mask, out_stride_m, ADD_INPUTS)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _accumulate(acc, x_ptr, w_base, offs_m, m_mask, x_stride_m, w_cols, n_mask, offs_k, K, BLOCK_K, EVEN_K)
    _store(acc, prior, out_ptrs, out_mask, ADD_INPUTS)


_SEARCH = tl.constexpr(256)


@triton.jit
def _segments(segs, seq_start_ptr, seq_len_ptr, lora_idx_ptr, meta_shift, batches, num_loras, total_tokens):
    """Adapter, first row, end row and validity of segments `segs`. Metadata is not trusted:
    unknown adapters, negative starts or lengths, int64 values outside int32 are skipped, and a
    segment past the last token is clipped."""
    in_range = segs < batches
    lora, lora_ok = _metadata(lora_idx_ptr, segs, in_range, meta_shift)
    start, start_ok = _metadata(seq_start_ptr, segs, in_range, meta_shift)
    length, length_ok = _metadata(seq_len_ptr, segs, in_range, meta_shift)
    end = tl.minimum(start + length, total_tokens)
    valid = in_range & lora_ok & start_ok & length_ok & (lora >= 0) & (lora < num_loras) & (start >= 0) & (end > start)
    return lora, start, end, valid


@triton.jit
def _metadata(ptr, segs, mask, meta_shift):
    """Entries `segs` of an int32 array (meta_shift 0) or of an int64 one read as int32 words
    (meta_shift 1: low word, and the high word only to check that the value fits in int32)."""
    lo = tl.load(ptr + (segs << meta_shift), mask=mask, other=0)
    hi = tl.load(ptr + (segs << meta_shift) + 1, mask=mask & (meta_shift != 0), other=0)
    return lo.to(tl.int64), (meta_shift == 0) | (hi == (lo >> 31))


@triton.jit
def _load_prior(out_ptr, offs_m, m_mask, offs_n, n_mask, out_stride_m, ADD_INPUTS: tl.constexpr):
    """The output tile's addresses and mask, and with ADD_INPUTS its old values, loaded before
    the products so that the load overlaps them."""
    out_ptrs = out_ptr + offs_m[:, None] * out_stride_m + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    prior = tl.load(out_ptrs, mask=out_mask & ADD_INPUTS, other=0.0)  # no load without ADD_INPUTS
    return out_ptrs, out_mask, prior


@triton.jit
def _accumulate(acc, x_ptr, w_base, offs_m, m_mask, x_stride_m, w_cols, n_mask, offs_k, K, BLOCK_K: tl.constexpr,
                EVEN_K: tl.constexpr):
    """acc += x[offs_m, :K] @ w_base[cols, :K]^T over the rows in m_mask (others add zero)."""
    x_rows = x_ptr + offs_m[:, None] * x_stride_m
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x_mask = m_mask[:, None]
            w_mask = n_mask[None, :]
        else:
            x_mask = m_mask[:, None] & (offs_k[None, :] < K - k0)
            w_mask = n_mask[None, :] & (offs_k[:, None] < K - k0)
        x = tl.load(x_rows + (k0 + offs_k)[None, :], mask=x_mask, other=0.0)
        w = tl.load(w_base + w_cols + k0, mask=w_mask, other=0.0)
        # fp32 inputs are rounded to the weight dtype first, as LoRAX does.
        acc += tl.dot(x.to(w.dtype), w)
    return acc


@triton.jit
def _store(acc, prior, out_ptrs, out_mask, ADD_INPUTS: tl.constexpr):
    if ADD_INPUTS:
        # The old value is added in fp32 to the finished product, and the sum rounded once.
        acc += prior.to(tl.float32)
    tl.store(out_ptrs, acc.to(out_ptrs.dtype.element_ty), mask=out_mask)
