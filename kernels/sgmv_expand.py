"""SGMV expand: out[start_b + m, :] (+)= x[start_b + m, :K] @ W[idx_b, :, :K]^T.

The one kernel source of libsgmv. It imports triton only: the AOT build executes this file
on a machine without a GPU or torch. Tiles and dtypes are chosen by the caller (aot/variants.py).

Grid: (cdiv(batches, SEGS), cdiv(N, BLOCK_N), m_programs). Program (g, n, p) handles
segments g*SEGS .. g*SEGS+SEGS-1, output columns of tile n, and the row tiles p, p+m_programs,
... of each of those segments. Correctness therefore does not depend on max_seq_length, which
only sizes m_programs; segments on axis 0 lift CUDA's 65535 limit on y/z.
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
    SEGS: tl.constexpr,
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

    for i in range(SEGS):
        seg = pid_g * SEGS + i
        if seg < batches:
            lora = tl.load(lora_idx_ptr + seg).to(tl.int64)
            start = tl.load(seq_start_ptr + seg).to(tl.int64)
            length = tl.load(seq_len_ptr + seg).to(tl.int64)
            # Metadata is not trusted: unknown adapters, negative starts or lengths are skipped,
            # and a segment running past the last token is clipped.
            end = tl.minimum(start + length, total_tokens)
            if (lora >= 0) & (lora < num_loras) & (start >= 0):
                w_base = w_ptr + lora * w_stride_l
                for m0 in range(start + pid_m * BLOCK_M, end, m_programs * BLOCK_M):
                    offs_m = m0 + tl.arange(0, BLOCK_M)
                    m_mask = offs_m < end
                    x_rows = x_ptr + offs_m[:, None] * x_stride_m
                    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
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
                    out_ptrs = out_ptr + offs_m[:, None] * out_stride_m + offs_n[None, :]
                    out_mask = m_mask[:, None] & n_mask[None, :]
                    if ADD_INPUTS:
                        # Added in fp32, rounded once.
                        acc += tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)
                    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
