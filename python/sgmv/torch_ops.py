"""torch.ops.sgmv.expand and torch.ops.sgmv.batch_plan: the AOT kernels as torch custom ops, for
torch.compile and CUDA graphs. Registered when sgmv is imported where torch is installed."""
from typing import Optional

import torch

from . import binding


@torch.library.custom_op("sgmv::expand", mutates_args=("output",), device_types="cuda")
def expand(inputs: torch.Tensor, weights: torch.Tensor, output: torch.Tensor, seq_start: torch.Tensor,
           seq_len: torch.Tensor, lora_indices: torch.Tensor, batches: int, max_seq_length: int,
           add_inputs: bool, batch_plan: Optional[torch.Tensor] = None) -> None:
    """sgmv.sgmv_expand on torch's current stream; updates `output` in place."""
    binding.sgmv_expand(inputs, weights, output, seq_start, seq_len, lora_indices, batches, max_seq_length,
                        add_inputs, None, batch_plan)


@expand.register_fake
def _(inputs, weights, output, seq_start, seq_len, lora_indices, batches, max_seq_length, add_inputs,
      batch_plan=None):
    return None


@torch.library.custom_op("sgmv::batch_plan", mutates_args=("plan",), device_types="cuda")
def batch_plan(seq_start: torch.Tensor, seq_len: torch.Tensor, lora_indices: torch.Tensor, batches: int,
               total_tokens: int, num_loras: int, plan: torch.Tensor) -> None:
    """sgmv.batch_plan into `plan` (int32, sgmv.batch_plan_bytes() bytes) on torch's current stream."""
    binding.batch_plan(seq_start, seq_len, lora_indices, batches, total_tokens, num_loras, out=plan)


@batch_plan.register_fake
def _(seq_start, seq_len, lora_indices, batches, total_tokens, num_loras, plan):
    return None
