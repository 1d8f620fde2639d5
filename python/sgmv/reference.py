"""SGMV expand in plain torch, accumulated in fp32: the reference the kernel is tested against."""
import torch

from . import binding, capi


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, add_inputs=False, batch_plan=None):
    """Same contract as sgmv.sgmv_expand (checked by the library), on any device; batch_plan
    changes nothing here."""
    tensors, _ = binding.expand_tensors(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                                        lora_indices_tensor, batches, max_seq_length, add_inputs, 0, None,
                                        allow_cpu=True)
    a = capi.ffi.new("sgmv_expand_args_t *")
    capi.check(capi.lib.sgmv_expand_args_from_tensors(tensors, a))
    w = lora_b_weights.reshape(a.num_loras, a.hidden, a.rank)
    starts, lens, idxs = (t[:a.batches].tolist() for t in (b_seq_start_loc, seq_len_tensor, lora_indices_tensor))
    for start, length, idx in zip(starts, lens, idxs):
        end = min(start + length, a.total_tokens)
        if not (0 <= idx < a.num_loras) or start < 0 or end <= start:
            continue
        # fp32 inputs are rounded to the weights' dtype first, as the kernel does.
        x = inputs[start:end].to(w.dtype).float()
        acc = x @ w[idx].float().T
        if add_inputs:
            acc += output_tensor[start:end].float()
        output_tensor[start:end] = acc.to(output_tensor.dtype)
    return output_tensor
