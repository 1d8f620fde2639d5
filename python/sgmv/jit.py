"""SGMV shrink and expand through Triton's JIT: the same kernel source as libsgmv.so, launched
with the configuration the library's planner gives (sgmv_expand_config, sgmv_shrink_config), so
both paths choose alike and give the same bits.

On a machine without a GPU, set TRITON_INTERPRET=1 before importing this module to run the
kernel on CPU tensors under Triton's interpreter (which does not support bfloat16 dots); the
interpreter is given sm_90's launch configuration.
"""
import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import torch

from . import binding, capi


def _kernel_source():
    """kernels/sgmv.py, the kernel source the AOT build compiled: inside the installed package
    (sgmv/kernels/), or at the top of a source checkout. Loaded by path: there is no second copy."""
    here = Path(os.path.abspath(__file__)).parent
    for path in (here / "kernels" / "sgmv.py", here.parent.parent / "kernels" / "sgmv.py"):
        if path.is_file():
            spec = importlib.util.spec_from_file_location("sgmv._kernels", path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = mod
            spec.loader.exec_module(mod)
            return mod
    raise ImportError(f"sgmv.jit: kernels/sgmv.py is neither in {here} nor in the source tree")


kernels = _kernel_source()
sgmv_kernel, sgmv_plan_kernel = kernels.sgmv_kernel, kernels.sgmv_plan_kernel

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def cubin_arch(device):
    """The cubin family whose launch configuration applies on `device` (0: none)."""
    if device < 0:
        return 90  # the interpreter
    major, minor = torch.cuda.get_device_capability(device)
    return capi.lib.sgmv_cubin_arch(major * 10 + minor)


def _config(fn, args, device, tile=None, split=None):
    cfg = capi.ffi.new("sgmv_launch_config_t *")
    if tile is not None:  # a tuner's tile: (block_m, block_n, block_k, num_warps, num_stages[, short])
        cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages = tile[:5]
        cfg.path = capi.lib.SGMV_PATH_SHORT if tile[5:] == (True,) else capi.lib.SGMV_PATH_ROWS
        cfg.split = split or 0
    capi.check(fn(args, cubin_arch(device), cfg))
    return cfg


def _words(m):
    """Metadata as int32 words: int64 entries are word pairs (the kernel's meta_shift 1)."""
    return m if m.dtype == torch.int32 else m.view(torch.int32)


def _on(device):
    return torch.cuda.device(device) if device >= 0 else contextlib.nullcontext()


def launch_config(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                  batches, max_seq_length, add_inputs=False, batch_plan=None, tile=None, lora_ranks=None):
    """(sgmv_expand_args_t, sgmv_launch_config_t, device) the library gives this expand call."""
    tensors, device = binding.expand_tensors(inputs, lora_b_weights, output_tensor, b_seq_start_loc,
                                             seq_len_tensor, lora_indices_tensor, batches, max_seq_length,
                                             add_inputs, 0, batch_plan, lora_ranks, allow_cpu=INTERPRETED)
    a = capi.ffi.new("sgmv_expand_args_t *")
    capi.check(capi.lib.sgmv_expand_args_from_tensors(tensors, a))
    return a, _config(capi.lib.sgmv_expand_config, a, device, tile), device


def shrink_launch_config(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                         batches, max_seq_length, scaling=1.0, lora_ranks=None, lora_scales=None, batch_plan=None,
                         workspace=None, tile=None, split=None):
    """(sgmv_shrink_args_t, sgmv_launch_config_t, device) the library gives this shrink call."""
    tensors, device = binding.shrink_tensors(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                                             lora_indices_tensor, batches, max_seq_length, scaling, lora_ranks,
                                             lora_scales, batch_plan, workspace, 0, allow_cpu=INTERPRETED)
    a = capi.ffi.new("sgmv_shrink_args_t *")
    capi.check(capi.lib.sgmv_shrink_args_from_tensors(tensors, a))
    return a, _config(capi.lib.sgmv_shrink_config, a, device, tile, split), device


def _launch(a, c, device, x, weights, out, meta, plan, ranks, scales, work, add_inputs, scaling):
    """sgmv_kernel with the planner's configuration `c`, its steps in order, with the parameters
    csrc/sgmv.c (fill_call) gives the AOT launch."""
    stacks = binding._slices(weights, "weights")
    n = len(stacks)
    w = [stacks[i if i < n else 0] for i in range(3)]  # absent slices: slice 0's (0 columns: never read)
    rows = [a.hidden if c.op == 0 else a.rank] + [a.slices[i - 1].rows if i < n else 0 for i in (1, 2)]
    strides = [(a.weights_lora_stride, a.weights_row_stride)] + [
        (a.slices[i - 1].lora_stride, a.slices[i - 1].row_stride) if i < n else (a.weights_lora_stride,
                                                                                  a.weights_row_stride)
        for i in (1, 2)]
    meta = [_words(m) for m in meta]
    f32 = torch.empty(1, dtype=torch.float32, device=out.device)  # absent fp32 arrays (never read)
    with _on(device):
        for step in range(c.steps):
            sgmv_kernel[tuple(c.grid)](
                x_ptr=x, w_ptr=w[0], w1_ptr=w[1], w2_ptr=w[2], out_ptr=out, seq_start_ptr=meta[0],
                seq_len_ptr=meta[1], lora_idx_ptr=meta[2], plan_ptr=meta[0] if plan is None else plan,
                ranks_ptr=meta[0] if ranks is None else ranks, scales_ptr=f32 if scales is None else scales,
                work_ptr=f32 if work is None else work.view(torch.float32), batches=a.batches,
                num_loras=a.num_loras, total_tokens=a.total_tokens, N=rows[0], N1=rows[1], N2=rows[2],
                K=a.rank if c.op == 0 else a.hidden, x_slice_step=c.x_slice_step,
                has_ranks=int(ranks is not None), has_scales=int(scales is not None), scaling=scaling,
                meta_shift=c.meta_shift, add_inputs=int(add_inputs), flat=c.flat, plan_capacity=c.plan_capacity,
                k_split=c.k_split, step=step, x_stride_m=a.inputs_row_stride, w_stride_l=strides[0][0],
                w_stride_n=strides[0][1], w1_stride_l=strides[1][0], w1_stride_n=strides[1][1],
                w2_stride_l=strides[2][0], w2_stride_n=strides[2][1], out_stride_m=a.output_row_stride,
                BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, PATH=c.path, EVEN_K=bool(c.even_k),
                SHRINK=c.op == 1, num_warps=c.num_warps, num_stages=c.num_stages)


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, add_inputs=False, batch_plan=None, tile=None, *, lora_ranks=None):
    """Same contract as sgmv.sgmv_expand, on torch's current stream. `tile` (block_m, block_n,
    block_k, num_warps, num_stages[, short]) runs another tile than the library's rules pick,
    with the planner's path and grid for it (aot/tune.py, tests)."""
    a, c, device = launch_config(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                                 lora_indices_tensor, batches, max_seq_length, add_inputs, batch_plan, tile, lora_ranks)
    if not c.noop:
        _launch(a, c, device, inputs, lora_b_weights, output_tensor,
                (b_seq_start_loc, seq_len_tensor, lora_indices_tensor), batch_plan, lora_ranks, None, None,
                add_inputs, 1.0)
    return output_tensor


def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, scaling=1.0, *, lora_ranks=None, lora_scales=None, batch_plan=None,
                workspace=None, tile=None, split=None):
    """Same contract as sgmv.sgmv_shrink, on torch's current stream (`tile` as in sgmv_expand;
    with it, `split` asks for a split of hidden over that many programs)."""
    if workspace is None and output_tensor.dim() == 2 and output_tensor.is_cuda:
        workspace = binding.new_workspace(output_tensor, *output_tensor.shape)
    a, c, device = shrink_launch_config(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                                        lora_indices_tensor, batches, max_seq_length, scaling, lora_ranks,
                                        lora_scales, batch_plan, workspace, tile, split)
    if not c.noop:
        _launch(a, c, device, inputs, lora_a_weights, output_tensor,
                (b_seq_start_loc, seq_len_tensor, lora_indices_tensor), batch_plan, lora_ranks, lora_scales,
                workspace, False, a.scaling)
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
