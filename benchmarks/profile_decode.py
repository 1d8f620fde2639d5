"""One AOT decode launch (256 segments of 1 token, hidden 4096, rank 16, 4 adapters, bf16,
add_inputs) for ncu: `ncu --clock-control none -k regex:sgmv --launch-skip 5 --launch-count 1 ...`."""
import torch

import sgmv

T, N, R, L = 256, 4096, 16, 4
x = torch.randn(T, R, dtype=torch.bfloat16, device="cuda")
w = torch.randn(L, N, R, dtype=torch.bfloat16, device="cuda")
out = torch.randn(T, N, dtype=torch.bfloat16, device="cuda")
starts = torch.arange(T, dtype=torch.int32, device="cuda")
lens = torch.ones(T, dtype=torch.int32, device="cuda")
idx = torch.randint(0, L, (T,), dtype=torch.int32, device="cuda")
for _ in range(8):
    sgmv.sgmv_expand(x, w, out, starts, lens, idx, T, 1, add_inputs=True)
torch.cuda.synchronize()
