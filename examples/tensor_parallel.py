"""Tensor-parallel LoRA expand with libsgmv and NCCL: one process per GPU.

Column-parallel (QKV, gate/up): each rank holds a column shard (hidden / world) of every
adapter's B matrix, expands into its slice of the output, and an all-gather joins the slices.
Row-parallel (o_proj, down_proj): the shrink result is a partial sum on each rank; after an
all-reduce every rank expands with the full B matrices. Both are checked against one GPU.

    python examples/tensor_parallel.py            (world size = visible GPUs; 1 works too)

Exit status: 0 ok; 1 a rank's result differs; 2 no GPU (nothing was run).
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sgmv

TOKENS, HIDDEN, RANK, LORAS = 1024 + 64, 4096, 16, 4
LENS = [512, 512] + [1] * 64  # two prefill segments and 64 decode tokens
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on shared machines


def problem(device):
    g = torch.Generator(device="cpu").manual_seed(0)  # the same inputs on every rank
    x = torch.randn(TOKENS, RANK, generator=g).to(device, torch.bfloat16)
    w = (torch.randn(LORAS, HIDDEN, RANK, generator=g) * 0.25).to(device, torch.bfloat16)
    base = torch.randn(TOKENS, HIDDEN, generator=g).to(device, torch.bfloat16)
    starts = torch.tensor([sum(LENS[:i]) for i in range(len(LENS))], dtype=torch.int32, device=device)
    lens = torch.tensor(LENS, dtype=torch.int32, device=device)
    idx = torch.tensor([-1 if i % 7 == 6 else i % LORAS for i in range(len(LENS))], dtype=torch.int32,
                       device=device)  # every 7th segment has no adapter
    return x, w, base, starts, lens, idx


def run(rank, world):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    x, w, base, starts, lens, idx = problem("cuda")
    meta = (starts, lens, idx, len(LENS), max(LENS))

    full = base.clone()  # the single-GPU answer, on every rank
    sgmv.sgmv_expand(x, w, full, *meta, add_inputs=True)

    # Column-parallel: this rank's columns of W and of the output.
    shard = HIDDEN // world
    cols = slice(rank * shard, (rank + 1) * shard)
    local = base[:, cols].clone()  # a copy even when the shard is everything (world size 1)
    sgmv.sgmv_expand(x, w[:, cols].contiguous(), local, *meta, add_inputs=True)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    column = torch.cat(parts, dim=1)

    # Row-parallel: x arrives as per-rank partial sums of the shrink; all-reduce, then full expand.
    partial = (x.float() / world).to(torch.bfloat16)
    dist.all_reduce(partial)
    row = base.clone()
    sgmv.sgmv_expand(partial, w, row, *meta, add_inputs=True)
    torch.cuda.synchronize()

    col_ok = torch.equal(column, full)  # the same kernel on a column slice: the same bits
    row_err = ((row.float() - full.float()).norm() / full.float().norm()).item()
    print(f"rank {rank}/{world}: column-parallel identical to one GPU: {col_ok}; "
          f"row-parallel relative error {row_err:.2e}", flush=True)
    dist.destroy_process_group()
    if not col_ok or row_err > 1e-2:
        raise SystemExit(1)


if __name__ == "__main__":
    world = torch.cuda.device_count()
    if world == 0:  # mp.spawn of zero processes would "succeed" having run nothing
        print("tensor_parallel: needs at least one CUDA GPU; torch sees none (nothing was run)", file=sys.stderr)
        sys.exit(2)
    mp.spawn(run, args=(world,), nprocs=world)
    print(f"tensor_parallel: ok on {world} GPU(s)")
