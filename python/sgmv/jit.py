"""SGMV shrink and expand through Triton's JIT: the same kernel source as libsgmv.so, launched
exactly as the library describes the call (sgmv_expand_launches, sgmv_shrink_launches,
sgmv_batch_plan_launches: every argument of every launch, filled by the C planner), so both
paths choose alike and give the same bits. Nothing about the launch is decided here.

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

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_ffi = capi.ffi


# sgmv_dtype_t -> torch dtype, by the header's names the binding reads (SGMV_DTYPE_BFLOAT16 -> torch.bfloat16).
_DTYPES = {value: getattr(torch, name) for name, value in binding._DTYPE_NAMES.items()}
_POINTER, _FLOAT = capi.ARG_KIND["SGMV_ARG_POINTER"], capi.ARG_KIND["SGMV_ARG_FLOAT"]


def cubin_arch(device):
    """The cubin family whose launch configuration applies on `device` (0: none)."""
    if device < 0:
        return 90  # the interpreter
    major, minor = torch.cuda.get_device_capability(device)
    return capi.lib.sgmv_cubin_arch(major * 10 + minor)


def _want(tile, split):
    """A tuner's tile (block_m, block_n, block_k, num_warps, num_stages[, short]) as the
    sgmv_launch_config_t the planner takes, or NULL for the tile table's choice."""
    if tile is None:
        return _ffi.NULL
    cfg = _ffi.new("sgmv_launch_config_t *")
    cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages = tile[:5]
    cfg.path = capi.lib.SGMV_PATH_SHORT if tile[5:] == (True,) else capi.lib.SGMV_PATH_ROWS
    cfg.split = split or 0
    return cfg


def _launches(fn, args, *rest):
    out = _ffi.new("sgmv_launches_t *")
    out.struct_size = _ffi.sizeof("sgmv_launches_t")
    capi.check(fn(args, *rest, out))
    return out


def _run(launches, tensors, device):
    """Each described launch, its pointers resolved to the caller's tensors (viewed as the
    dtype the kernel reads them as), NULL to a one-element tensor (never read)."""
    tensors = [t for t in tensors if t is not None]
    by_address = {t.data_ptr(): t for t in reversed(tensors)}
    where = tensors[0].device
    unused = {}
    with torch.cuda.device(device) if device >= 0 else contextlib.nullcontext():
        for d in launches.launches[0:launches.num_launches]:
            kw = {}
            for a in d.args[0:d.num_args]:
                name = _ffi.string(a.name).decode()
                if a.kind == _POINTER:
                    dt = _DTYPES[a.dtype]
                    if a.value == 0:
                        t = unused.get(dt)
                        if t is None:
                            t = unused[dt] = torch.empty(1, dtype=dt, device=where)
                    else:
                        t = by_address.get(a.value)
                        if t is None:
                            t = _inside(tensors, a.value, dt)
                        if t is None:
                            raise capi.SgmvError(capi.lib.SGMV_ERROR_INTERNAL,
                                                 f"sgmv.jit: {name} points at no tensor of the call")
                        if t.dtype != dt:
                            t = t.view(dt)
                    kw[name] = t
                else:
                    kw[name] = a.fvalue if a.kind == _FLOAT else a.value
            kernel = getattr(kernels, _ffi.string(d.kernel).decode())
            kernel[tuple(d.grid)](**kw, num_warps=d.num_warps, num_stages=d.num_stages)


def _inside(tensors, address, dtype):
    """The rest of a contiguous tensor from `address` on (a step's scratch holds the plan, the
    intermediate and the workspace), as dtype; None if no tensor holds it."""
    size = torch.empty((), dtype=dtype).element_size()
    for t in tensors:
        base, nbytes = t.data_ptr(), t.numel() * t.element_size()
        if t.is_contiguous() and base <= address < base + nbytes and (address - base) % size == 0:
            rest = t.reshape(-1).view(torch.uint8)[address - base:]
            return rest[:rest.numel() // size * size].view(dtype)
    return None


def _scales(weight_scales):
    """fp8 weights' scales as a tuple of tensors (None: none)."""
    return () if weight_scales is None else tuple(binding._slices(weight_scales, "weight_scales"))


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, add_inputs=False, batch_plan=None, *, lora_ranks=None, weight_scales=None,
                tile=None):
    """Same contract as sgmv.sgmv_expand, on torch's current stream. `tile` (block_m, block_n,
    block_k, num_warps, num_stages[, short]) runs another tile than the library's rules pick,
    with the planner's path and grid for it (aot/tune.py, tests)."""
    tensors, device = binding.expand_tensors(inputs, lora_b_weights, output_tensor, b_seq_start_loc,
                                             seq_len_tensor, lora_indices_tensor, batches, max_seq_length,
                                             add_inputs, 0, batch_plan, lora_ranks, allow_cpu=INTERPRETED,
                                             weight_scales=weight_scales)
    args = _ffi.new("sgmv_expand_args_t *")
    capi.check(capi.lib.sgmv_expand_args_from_tensors(tensors, args))
    launches = _launches(capi.lib.sgmv_expand_launches, args, cubin_arch(device), _want(tile, None))
    _run(launches, [inputs, *binding._slices(lora_b_weights, "lora_b_weights"), output_tensor, b_seq_start_loc,
                    seq_len_tensor, lora_indices_tensor, batch_plan, lora_ranks, *_scales(weight_scales)], device)
    return output_tensor


def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, scaling=1.0, *, lora_ranks=None, lora_scales=None, batch_plan=None,
                workspace=None, weight_scales=None, tile=None, split=None):
    """Same contract as sgmv.sgmv_shrink, on torch's current stream (`tile` as in sgmv_expand;
    with it, `split` asks for a split of hidden over that many programs)."""
    if workspace is None and output_tensor.dim() == 2 and output_tensor.is_cuda:
        workspace = binding.new_workspace(output_tensor, *output_tensor.shape)
    tensors, device = binding.shrink_tensors(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                                             lora_indices_tensor, batches, max_seq_length, scaling, lora_ranks,
                                             lora_scales, batch_plan, workspace, 0, allow_cpu=INTERPRETED,
                                             weight_scales=weight_scales)
    args = _ffi.new("sgmv_shrink_args_t *")
    capi.check(capi.lib.sgmv_shrink_args_from_tensors(tensors, args))
    launches = _launches(capi.lib.sgmv_shrink_launches, args, cubin_arch(device), _want(tile, split))
    _run(launches, [inputs, *binding._slices(lora_a_weights, "lora_a_weights"), output_tensor, b_seq_start_loc,
                    seq_len_tensor, lora_indices_tensor, batch_plan, lora_ranks, lora_scales, workspace,
                    *_scales(weight_scales)], device)
    return output_tensor


def batch_plan(seq_start, seq_len, lora_indices, batches, total_tokens, num_loras, out=None, max_batches=None,
               max_tokens=None):
    """Same contract as sgmv.batch_plan, on torch's current stream."""
    if out is None:
        out = binding.new_plan(seq_start, batches, total_tokens, max_batches, max_tokens)
    args, device = binding.plan_args(seq_start, seq_len, lora_indices, batches, total_tokens, num_loras, out, 0,
                                     allow_cpu=INTERPRETED)
    launches = _launches(capi.lib.sgmv_batch_plan_launches, args, cubin_arch(device))
    _run(launches, [out, seq_start, seq_len, lora_indices], device)
    return out


def step_plan(step):
    """Same as step.plan(), through the JIT, on torch's current stream (build the step with plan=False)."""
    launches = _launches(capi.lib.sgmv_step_plan_launches, step._h, cubin_arch(step.device))
    _run(launches, [step.scratch, *step._keep], step.device)
    return step


def layer_apply(layer, x, out, step, *, add_inputs=True):
    """Same as layer(x, out, step, add_inputs=...), through the JIT, on torch's current stream."""
    pair = capi.ffi.new("sgmv_tensor_t[2]")
    mem = capi.ffi.buffer(pair)
    for i, (t, name) in enumerate(((x, "x"), (out, "out"))):
        fields, _ = binding.describe(t, name)
        binding._TENSOR.pack_into(mem, i * binding._SIZEOF_TENSOR, *fields)
    launches = _launches(capi.lib.sgmv_layer_apply_launches, layer._h, step._h, pair, pair + 1, add_inputs,
                         cubin_arch(layer.device))
    _run(launches, [x, out, step.scratch, *step._keep, *layer.lora_a, *layer.lora_b, layer.lora_ranks,
                    layer.lora_scales, *_scales(layer.lora_a_scales), *_scales(layer.lora_b_scales)], layer.device)
    return out
