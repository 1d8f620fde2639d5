"""libsgmv: SGMV expand for multi-LoRA serving.

sgmv.sgmv_expand   the kernel compiled ahead of time, through libsgmv.so (needs neither torch nor triton)
sgmv.jit           the same kernel through Triton's JIT
sgmv.reference     plain torch, fp32 accumulation
sgmv.capi          the raw C API (ffi, lib)
"""
from .aot import sgmv_expand
from .capi import SgmvError

__version__ = "0.1.0"
__all__ = ["sgmv_expand", "SgmvError", "__version__"]
