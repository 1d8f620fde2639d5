"""SGMV expand through Triton's JIT: the same kernel source as libsgmv.so, launched with the
configuration the library's planner gives (sgmv_expand_config), so both paths choose alike.

On a machine without a GPU, set TRITON_INTERPRET=1 before importing this module to run the
kernel on CPU tensors under Triton's interpreter (which does not support bfloat16 dots); the
interpreter is given sm_90's launch configuration.
"""
import contextlib
import os

import torch

from . import binding, capi
from .kernels import sgmv_expand_kernel, sgmv_plan_kernel

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def cubin_arch(device):
    """The cubin family whose launch configuration applies on `device` (0: none)."""
    if device < 0:
        return 90  # the interpreter
    major, minor = torch.cuda.get_device_capability(device)
    return capi.lib.sgmv_cubin_arch(major * 10 + minor)


def _config(fn, args, device, tile=None):
    cfg = capi.ffi.new("sgmv_launch_config_t *")
    if tile is not None:  # a tuner's tile: (block_m, block_n, block_k, num_warps, num_stages[, short])
        cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages = tile[:5]
        cfg.path = capi.lib.SGMV_PATH_SHORT if tile[5:] == (True,) else capi.lib.SGMV_PATH_ROWS
    capi.check(fn(args, cubin_arch(device), cfg))
    return cfg


def _words(m):
    """Metadata as int32 words: int64 entries are word pairs (the kernel's meta_shift 1)."""
    return m if m.dtype == torch.int32 else m.view(torch.int32)


def _on(device):
    return torch.cuda.device(device) if device >= 0 else contextlib.nullcontext()


def launch_config(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                  batches, max_seq_length, add_inputs=False, batch_plan=None, tile=None):
    """(sgmv_expand_args_t, sgmv_launch_config_t, device) the library gives this call."""
    tensors, device = binding.expand_tensors(inputs, lora_b_weights, output_tensor, b_seq_start_loc,
                                             seq_len_tensor, lora_indices_tensor, batches, max_seq_length,
                                             add_inputs, 0, batch_plan, allow_cpu=INTERPRETED)
    a = capi.ffi.new("sgmv_expand_args_t *")
    capi.check(capi.lib.sgmv_expand_args_from_tensors(tensors, a))
    return a, _config(capi.lib.sgmv_expand_config, a, device, tile), device


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, add_inputs=False, batch_plan=None, tile=None):
    """Same contract as sgmv.sgmv_expand, on torch's current stream. `tile` (block_m, block_n,
    block_k, num_warps, num_stages[, short]) runs another tile than the library's rules pick,
    with the planner's path and grid for it (aot/tune.py, tests)."""
    a, c, device = launch_config(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                                 lora_indices_tensor, batches, max_seq_length, add_inputs, batch_plan, tile)
    if c.noop:
        return output_tensor
    meta = [_words(m) for m in (b_seq_start_loc, seq_len_tensor, lora_indices_tensor)]
    with _on(device):
        sgmv_expand_kernel[tuple(c.grid)](
            x_ptr=inputs, w_ptr=lora_b_weights, out_ptr=output_tensor, seq_start_ptr=meta[0], seq_len_ptr=meta[1],
            lora_idx_ptr=meta[2], plan_ptr=meta[0] if batch_plan is None else batch_plan, batches=a.batches,
            num_loras=a.num_loras, total_tokens=a.total_tokens, N=a.hidden, K=a.rank, meta_shift=c.meta_shift,
            add_inputs=int(a.add_inputs), flat=c.flat, plan_capacity=c.plan_capacity, x_stride_m=a.inputs_row_stride,
            w_stride_l=a.weights_lora_stride, w_stride_n=a.weights_row_stride, out_stride_m=a.output_row_stride,
            BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, PATH=c.path, EVEN_K=bool(c.even_k),
            num_warps=c.num_warps, num_stages=c.num_stages)
    return output_tensor


def batch_plan(seq_start, seq_len, lora_indices, batches, total_tokens, num_loras, out=None, max_batches=None,
               max_tokens=None):
    """Same contract as sgmv.batch_plan, on torch's current stream."""
    if out is None:
        out = binding.new_plan(seq_start, batches, total_tokens, max_batches, max_tokens)
    args, device = binding.plan_args(seq_start, seq_len, lora_indices, batches, total_tokens, num_loras, out, 0,
                                     allow_cpu=INTERPRETED)
    c = _config(capi.lib.sgmv_batch_plan_config, args, device)
    meta = [_words(m) for m in (seq_start, seq_len, lora_indices)]
    with _on(device):
        for step in range(c.steps):
            sgmv_plan_kernel[tuple(c.grid)](
                plan_ptr=out, seq_start_ptr=meta[0], seq_len_ptr=meta[1], lora_idx_ptr=meta[2], batches=args.batches,
                num_loras=args.num_loras, total_tokens=args.total_tokens, meta_shift=c.meta_shift,
                plan_capacity=c.plan_capacity, step=step, SEGS=c.block_b, SCAN=c.scan, ROWS=c.rows,
                num_warps=c.num_warps, num_stages=1)
    return out
