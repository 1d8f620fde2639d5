"""torch.ops.sgmv.expand: the AOT kernel as a torch custom op, for torch.compile and CUDA graphs.

Registered when this module is imported; torch imports it by itself at start-up through the
`torch.backends` entry point this package declares, so with sgmv installed the op exists as
soon as torch is imported.
"""
import torch

from . import aot


@torch.library.custom_op("sgmv::expand", mutates_args=("output",), device_types="cuda")
def expand(inputs: torch.Tensor, weights: torch.Tensor, output: torch.Tensor, seq_start: torch.Tensor,
           seq_len: torch.Tensor, lora_indices: torch.Tensor, batches: int, max_seq_length: int,
           add_inputs: bool) -> None:
    """sgmv.sgmv_expand on torch's current stream; updates `output` in place."""
    aot.sgmv_expand(inputs, weights, output, seq_start, seq_len, lora_indices, batches, max_seq_length, add_inputs)


@expand.register_fake
def _(inputs, weights, output, seq_start, seq_len, lora_indices, batches, max_seq_length, add_inputs):
    return None


def _autoload():
    """Entry point for torch's backend autoloading: importing this module registered the op."""
