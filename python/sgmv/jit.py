"""SGMV expand through Triton's JIT: the same kernel source and tile table as libsgmv.so.

On a machine without a GPU, set TRITON_INTERPRET=1 before importing this module to run the
kernel on CPU tensors under Triton's interpreter (which does not support bfloat16 dots).
"""
import contextlib
import os

import torch

from . import _contract
from ._kernel import sgmv_expand_kernel
from ._variants import ARCHS, TILES, grid, select_tile

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def cubin_arch(device):
    """The arch family whose tile rules apply on `device` (as the C dispatcher picks cubins)."""
    if device.type != "cuda":
        return 90  # the interpreter: use the H100's tiles
    major, minor = torch.cuda.get_device_capability(device)
    arch = 80 if major == 8 else major * 10 + minor
    return arch if arch in ARCHS else 90


def launch_config(call, arch, tile=None):
    """(tile, grid) for a validated call: the C dispatcher computes the same."""
    t = TILES[tile or select_tile(arch, call.max_seq_length, call.rank, call.aligned)]
    g = grid(t, call.batches, call.hidden, call.total_tokens, call.num_loras, call.max_seq_length)
    if g[1] > 65535:
        raise ValueError(f"hidden {call.hidden} needs {g[1]} column tiles of {t.block_n}, more than CUDA's 65535")
    return t, g


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, add_inputs=False, tile=None):
    """Same contract as sgmv.sgmv_expand. `tile` names an entry of the tile table to force it."""
    devices = ("cuda", "cpu") if INTERPRETED else ("cuda",)
    c = _contract.check(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                        lora_indices_tensor, batches, max_seq_length, add_inputs, devices=devices)
    if tile is not None and tile not in TILES:
        raise ValueError(f"tile must be one of {sorted(TILES)}, got {tile!r}")
    if c.noop:
        return output_tensor
    t, grid = launch_config(c, cubin_arch(output_tensor.device), tile)
    with torch.cuda.device(output_tensor.device) if output_tensor.is_cuda else contextlib.nullcontext():
        # Metadata goes in as int32 words; int64 entries are word pairs (meta_shift 1).
        meta = [m if m.dtype == torch.int32 else m.view(torch.int32)
                for m in (b_seq_start_loc, seq_len_tensor, lora_indices_tensor)]
        sgmv_expand_kernel[grid](
            inputs, lora_b_weights, output_tensor, *meta, c.batches, c.num_loras, c.total_tokens, c.hidden, c.rank,
            int(c.seq_start.dtype == "int64"), c.x_stride, c.w_lora_stride, c.w_row_stride, c.out_stride,
            BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, SHORT=t.short,
            EVEN_K=c.rank % t.block_k == 0, ADD_INPUTS=add_inputs,
            num_warps=t.num_warps, num_stages=t.num_stages)
    return output_tensor

