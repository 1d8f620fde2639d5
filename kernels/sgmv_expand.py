"""SGMV expand: out[start_b + m, :] (+)= x[start_b + m, :K] @ W[idx_b, :, :K]^T.

The one kernel source of libsgmv. It imports triton only: the AOT build executes this file
on a machine without a GPU or torch. Tiles and dtypes are chosen by the caller (aot/variants.py).

Grid: (segment groups, cdiv(N, BLOCK_N), m_programs); segments on axis 0 lift CUDA's 65535
limit on y/z. Program (g, n, p) writes output columns of tile n for
  - SHORT=False: segment g, its row tiles p, p + m_programs, ...;
  - SHORT=True: segments g*BLOCK_M .. g*BLOCK_M + BLOCK_M - 1, their rows p, p + m_programs, ...
Every row is reached whatever m_programs is: max_seq_length (which sizes it) is only a hint.
"""
import triton
import triton.language as tl


@triton.jit
def sgmv_expand_kernel(
    x_ptr,  # (total_tokens, K) rows, unit stride along K
    w_ptr,  # (num_loras, N, K), unit stride along K
    out_ptr,  # (total_tokens, N) rows, unit stride along N
    seq_start_ptr,  # (batches,) int32 or int64
    seq_len_ptr,  # (batches,) int32 or int64
    lora_idx_ptr,  # (batches,) int32 or int64
    batches,
    num_loras,
    total_tokens,
    N,
    K,
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
    pid_g = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_m = tl.program_id(2)
    m_programs = tl.num_programs(2)

    # All addresses are formed in int64: 87k tokens x 12288 columns already overflows int32.
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_cols = offs_n[None, :] * w_stride_n + offs_k[:, None]  # (BLOCK_K, BLOCK_N)

    if SHORT:
        # Short segments (decode, speculative): the BLOCK_M rows of a tile are BLOCK_M segments,
        # row j of each; one pass per distinct adapter among them, so an adapter's weight tile is
        # read once per program however many of its segments the program holds.
        segs = pid_g.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        s_mask = segs < batches
        lora = tl.load(lora_idx_ptr + segs, mask=s_mask, other=-1).to(tl.int64)
        start = tl.load(seq_start_ptr + segs, mask=s_mask, other=0).to(tl.int64)
        end = tl.minimum(start + tl.load(seq_len_ptr + segs, mask=s_mask, other=0).to(tl.int64), total_tokens)
        # Metadata is not trusted: unknown adapters, negative starts or lengths are skipped,
        # and a segment running past the last token is clipped.
        valid = s_mask & (lora >= 0) & (lora < num_loras) & (start >= 0) & (end > start)
        rows = tl.max(tl.where(valid, end - start, 0), axis=0)
        for j in range(pid_m, rows, m_programs):
            offs_m = start + j
            m_mask = valid & (offs_m < end)
            todo = m_mask
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            while tl.max(todo.to(tl.int32), axis=0) > 0:
                adapter = tl.min(tl.where(todo, lora, num_loras), axis=0)
                rows_a = todo & (lora == adapter)
                todo = todo & (lora != adapter)
                acc = _accumulate(acc, x_ptr, w_ptr + adapter * w_stride_l, offs_m, rows_a, x_stride_m, w_cols,
                                  n_mask, offs_k, K, BLOCK_K, EVEN_K)
            _store(acc, out_ptr, offs_m, m_mask, offs_n, n_mask, out_stride_m, ADD_INPUTS)
    else:
        # One segment per program; its row tiles pid_m, pid_m + m_programs, ...
        seg = pid_g
        if seg < batches:
            lora = tl.load(lora_idx_ptr + seg).to(tl.int64)
            start = tl.load(seq_start_ptr + seg).to(tl.int64)
            end = tl.minimum(start + tl.load(seq_len_ptr + seg).to(tl.int64), total_tokens)
            if (lora >= 0) & (lora < num_loras) & (start >= 0):
                for m0 in range(start + pid_m * BLOCK_M, end, m_programs * BLOCK_M):
                    offs_m = m0 + tl.arange(0, BLOCK_M)
                    m_mask = offs_m < end
                    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                    acc = _accumulate(acc, x_ptr, w_ptr + lora * w_stride_l, offs_m, m_mask, x_stride_m, w_cols,
                                      n_mask, offs_k, K, BLOCK_K, EVEN_K)
                    _store(acc, out_ptr, offs_m, m_mask, offs_n, n_mask, out_stride_m, ADD_INPUTS)


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
def _store(acc, out_ptr, offs_m, m_mask, offs_n, n_mask, out_stride_m, ADD_INPUTS: tl.constexpr):
    out_ptrs = out_ptr + offs_m[:, None] * out_stride_m + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if ADD_INPUTS:
        # Added in fp32, rounded once.
        acc += tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
