"""libsgmv: the LoRA kernels of multi-LoRA serving (SGMV shrink and expand).

sgmv.sgmv_shrink   LoRA A: x @ A^T, scaled (fused slices, per-adapter rank and scale), ahead-of-time compiled
sgmv.sgmv_expand   LoRA B: out (+)= y @ B^T (fused slices, per-adapter rank), through libsgmv.so (needs
                   neither torch nor triton)
sgmv.batch_plan    a step's rows grouped by adapter, built on the device, for every call of the step
sgmv.jit           the same kernels through Triton's JIT
sgmv.reference     plain torch, fp32 accumulation
sgmv.capi          the raw C API (ffi, lib)

Where torch is installed, importing sgmv registers torch.ops.sgmv.shrink, torch.ops.sgmv.expand
and torch.ops.sgmv.batch_plan.
"""
import importlib.util

from .binding import batch_plan, batch_plan_bytes, sgmv_expand, sgmv_shrink, shrink_workspace_bytes
from .capi import SgmvError

__version__ = "0.3.0"
__all__ = ["sgmv_shrink", "sgmv_expand", "batch_plan", "batch_plan_bytes", "shrink_workspace_bytes", "SgmvError",
           "__version__"]

if importlib.util.find_spec("torch") is not None:
    from . import torch_ops  # noqa: F401
