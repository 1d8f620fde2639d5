"""SGMV shrink and expand in plain torch, accumulated in fp32: the reference the kernels are
tested against. The library checks the arguments (the same contract as sgmv.sgmv_*)."""
import torch

from . import binding, capi


def _segments(a, seq_start, seq_len, lora_indices, ranks, rank):
    """(rows, adapter, rank used) of every segment the kernels compute."""
    starts, lens, idxs = (t[:a.batches].tolist() for t in (seq_start, seq_len, lora_indices))
    ranks = None if ranks is None else ranks.tolist()
    for start, length, idx in zip(starts, lens, idxs):
        end = min(start + length, a.total_tokens)
        # int64 entries outside int32 are skipped, as the kernel does (it reads int32 words).
        fits = all(-2 ** 31 <= v < 2 ** 31 for v in (start, length, idx))
        if not fits or not (0 <= idx < a.num_loras) or start < 0 or end <= start:
            continue
        r = rank if ranks is None else min(rank, ranks[idx])
        if r > 0:
            yield slice(start, end), idx, r


def _check(config_fn, args):
    """The library's whole check of the call (dtype matrix, pointers, ranges), without a launch, on
    the first of the build's archs that serves the call (fp8 weights have variants on some only)."""
    c = capi.ffi.new("sgmv_launch_config_t *")
    status = 0
    for arch in capi.ffi.string(capi.lib.sgmv_archs()).decode().split(","):
        c.struct_size = capi.ffi.sizeof("sgmv_launch_config_t")
        status = config_fn(args, int(arch), c)
        if status != capi.STATUS["SGMV_ERROR_UNSUPPORTED_ARCH"]:
            break
    capi.check(status)


def _dequantized(stacks, weight_scales):
    """fp8 weight stacks (num_loras, rows, cols) times their scales, in float64; others as they are."""
    if stacks[0].dtype != torch.float8_e4m3fn:
        return stacks
    scales = binding._slices(weight_scales, "weight_scales")
    return [w.double() * sc.double().reshape(w.shape[0], -1)[:, :, None] for w, sc in zip(stacks, scales)]


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, add_inputs=False, batch_plan=None, *, lora_ranks=None, weight_scales=None):
    """Same contract as sgmv.sgmv_expand, on any device; batch_plan changes nothing here. fp8
    weights are dequantized and multiplied in float64."""
    tensors, _ = binding.expand_tensors(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                                        lora_indices_tensor, batches, max_seq_length, add_inputs, 0, None, lora_ranks,
                                        allow_cpu=True, weight_scales=weight_scales)
    a = capi.ffi.new("sgmv_expand_args_t *")
    capi.check(capi.lib.sgmv_expand_args_from_tensors(tensors, a))
    _check(capi.lib.sgmv_expand_config, a)
    stacks = [w.reshape(a.num_loras, w.shape[-2], a.rank) for w in binding._slices(lora_b_weights, "weights")]
    fp8 = stacks[0].dtype == torch.float8_e4m3fn
    stacks = _dequantized(stacks, weight_scales)
    for rows, idx, r in _segments(a, b_seq_start_loc, seq_len_tensor, lora_indices_tensor, lora_ranks, a.rank):
        col = 0
        for s, w in enumerate(stacks):
            # fp32 inputs are rounded to the weights' dtype first, as the kernel does.
            x = inputs[rows, s * a.rank:s * a.rank + r]
            x = x.double() if fp8 else x.to(w.dtype).float()
            cols = slice(col, col + w.shape[1])
            acc = x @ w[idx, :, :r].to(x.dtype).T
            if add_inputs:
                acc += output_tensor[rows, cols].float()
            output_tensor[rows, cols] = acc.to(output_tensor.dtype)
            col += w.shape[1]
    return output_tensor


def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, scaling=1.0, *, lora_ranks=None, lora_scales=None, batch_plan=None,
                workspace=None, weight_scales=None):
    """Same contract as sgmv.sgmv_shrink, on any device; batch_plan and workspace change nothing
    here. fp8 weights are dequantized and multiplied in float64."""
    tensors, _ = binding.shrink_tensors(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                                        lora_indices_tensor, batches, max_seq_length, scaling, lora_ranks,
                                        lora_scales, None, None, 0, allow_cpu=True, weight_scales=weight_scales)
    a = capi.ffi.new("sgmv_shrink_args_t *")
    capi.check(capi.lib.sgmv_shrink_args_from_tensors(tensors, a))
    _check(capi.lib.sgmv_shrink_config, a)
    stacks = [w.reshape(a.num_loras, a.rank, a.hidden) for w in binding._slices(lora_a_weights, "weights")]
    fp8 = stacks[0].dtype == torch.float8_e4m3fn
    stacks = _dequantized(stacks, weight_scales)
    scales = None if lora_scales is None else lora_scales.tolist()
    for rows, idx, r in _segments(a, b_seq_start_loc, seq_len_tensor, lora_indices_tensor, lora_ranks, a.rank):
        # The kernel's scale: scaling times the adapter's scale, in fp32.
        scale = torch.tensor(a.scaling, dtype=torch.float32)
        if scales is not None:
            scale = scale * torch.tensor(scales[idx], dtype=torch.float32)
        x = inputs[rows].double() if fp8 else inputs[rows].float()
        for s, w in enumerate(stacks):
            acc = x @ w[idx, :r].to(x.dtype).T
            output_tensor[rows, s * a.rank:s * a.rank + r] = (acc * scale.to(acc.device)).to(output_tensor.dtype)
    return output_tensor


def layer_apply(layer, x, out, step, *, add_inputs=True):
    """Same as layer(x, out, step): the shrink into an intermediate of the weights' dtype (as the
    library keeps it), then the expand from it, on any device."""
    seq_start, seq_len, lora_indices, mapping = step._keep
    if mapping is not None:  # a row per segment
        lora_indices = mapping[:step.total_tokens]
        seq_start = torch.arange(step.total_tokens, dtype=mapping.dtype, device=mapping.device)
        seq_len = torch.ones_like(seq_start)
    # The intermediate: the weights' dtype, or for fp8 weights the inputs'.
    mid = x.dtype if layer.dtype == torch.float8_e4m3fn else layer.dtype
    y = torch.zeros(step.total_tokens, layer.num_slices * layer.rank, dtype=mid, device=x.device)
    a = layer.lora_a if layer.num_slices > 1 else layer.lora_a[0]
    b = layer.lora_b if layer.num_slices > 1 else layer.lora_b[0]
    sgmv_shrink(x, a, y, seq_start, seq_len, lora_indices, step.batches, step.max_seq_length, layer.scaling,
                lora_ranks=layer.lora_ranks, lora_scales=layer.lora_scales, weight_scales=layer.lora_a_scales)
    return sgmv_expand(y, b, out, seq_start, seq_len, lora_indices, step.batches, step.max_seq_length, add_inputs,
                       lora_ranks=layer.lora_ranks, weight_scales=layer.lora_b_scales)
