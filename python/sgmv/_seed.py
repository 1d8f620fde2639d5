"""The seed kernel's scheme, reproduced for `sgmv bench`'s baseline only (never for results).

What the project started from: fixed 32 x 32 x 16 tiles, 4 warps; grid (cdiv(max_seq_length, 32)
* cdiv(N, 32), batches) with every program of a short segment idle; int32 offsets. Its defects
(zero-length segments, int32 overflow, double rounding with add_inputs) are kept out of the
benchmark's inputs, not fixed here.
"""
import triton
import triton.language as tl


@triton.jit
def _seed_kernel(x_ptr, w_ptr, out_ptr, N, K, seq_start_ptr, seq_len_ptr, lora_idx_ptr, x_stride_m, w_stride_l,
                 w_stride_n, out_stride_m, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 ADD_INPUTS: tl.constexpr):
    pid = tl.program_id(0)
    seg = tl.program_id(1)
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid_m = pid // n_tiles
    pid_n = pid % n_tiles
    M = tl.load(seq_len_ptr + seg)
    if pid_m * BLOCK_M >= M:
        return
    lora = tl.load(lora_idx_ptr + seg)
    if lora == -1:
        return
    start = tl.load(seq_start_ptr + seg)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_m % M
    cols = offs_n % N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k = k0 * BLOCK_K + offs_k
        x = tl.load(x_ptr + (start + rows)[:, None] * x_stride_m + k[None, :], mask=k[None, :] < K, other=0.0)
        w = tl.load(w_ptr + lora * w_stride_l + cols[None, :] * w_stride_n + k[:, None], mask=k[:, None] < K,
                    other=0.0)
        acc += tl.dot(x.to(w.dtype), w)
    out = out_ptr + (start + offs_m)[:, None] * out_stride_m + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    res = acc.to(out_ptr.dtype.element_ty)
    if ADD_INPUTS:
        res += tl.load(out, mask=mask)
    tl.store(out, res, mask=mask)


def seed_expand(x, w, out, starts, lens, idx, batches, max_seq_length, add_inputs):
    n, k = w.shape[-2], w.shape[-1]
    grid = (triton.cdiv(max_seq_length, 32) * triton.cdiv(n, 32), batches)
    _seed_kernel[grid](x, w, out, n, k, starts, lens, idx, x.stride(0), w.stride(0), w.stride(-2), out.stride(0),
                       BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, ADD_INPUTS=add_inputs, num_warps=4)
