"""SGMV expand in plain torch, accumulated in fp32: the reference the kernel is tested against."""
import torch

from . import _contract


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, add_inputs=False):
    """Same contract as sgmv.sgmv_expand; on any device."""
    c = _contract.check(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                        lora_indices_tensor, batches, max_seq_length, add_inputs,
                        devices=(output_tensor.device.type,))
    w = lora_b_weights.reshape(c.num_loras, c.hidden, c.rank) if lora_b_weights.dim() == 4 else lora_b_weights
    starts, lens, idxs = (t[:c.batches].tolist() for t in (b_seq_start_loc, seq_len_tensor, lora_indices_tensor))
    for start, length, idx in zip(starts, lens, idxs):
        end = min(start + length, c.total_tokens)
        if not (0 <= idx < c.num_loras) or start < 0 or end <= start:
            continue
        # fp32 inputs are rounded to the weights' dtype first, as the kernel does.
        x = inputs[start:end].to(w.dtype).float()
        acc = x @ w[idx].float().T
        if add_inputs:
            acc += output_tensor[start:end].float()
        output_tensor[start:end] = acc.to(output_tensor.dtype)
    return output_tensor
