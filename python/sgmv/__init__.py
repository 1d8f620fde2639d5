"""libsgmv: SGMV expand for multi-LoRA serving.

sgmv.sgmv_expand   the kernel compiled ahead of time, through libsgmv.so (needs neither torch nor triton)
sgmv.batch_plan    a step's rows grouped by adapter, built on the device, for every expand call of the step
sgmv.jit           the same kernels through Triton's JIT
sgmv.reference     plain torch, fp32 accumulation
sgmv.capi          the raw C API (ffi, lib)

Where torch is installed, importing sgmv registers torch.ops.sgmv.expand and
torch.ops.sgmv.batch_plan.
"""
import importlib.util

from .binding import batch_plan, batch_plan_bytes, sgmv_expand
from .capi import SgmvError

__version__ = "0.2.0"
__all__ = ["sgmv_expand", "batch_plan", "batch_plan_bytes", "SgmvError", "__version__"]

if importlib.util.find_spec("torch") is not None:
    from . import torch_ops  # noqa: F401
