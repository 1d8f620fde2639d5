"""libsgmv: the LoRA kernels of multi-LoRA serving (SGMV shrink and expand).

sgmv.sgmv_shrink   LoRA A: x @ A^T, scaled (fused slices, per-adapter rank and scale), ahead-of-time compiled
sgmv.sgmv_expand   LoRA B: out (+)= y @ B^T (fused slices, per-adapter rank), through libsgmv.so (needs
                   neither torch nor triton)
sgmv.batch_plan    a step's rows grouped by adapter, built on the device, for every call of the step
sgmv.Layer         one LoRA layer's A and B (up to 3 slices, ranks, scales), described once:
                   layer(x, out, step) is the whole delta, shrink and expand, in one call
sgmv.Step          one step's rows (segments or a per-token adapter mapping), plan and scratch, for
                   every layer call of the step
sgmv.jit           the same kernels through Triton's JIT
sgmv.reference     plain torch, fp32 accumulation
sgmv.capi          the raw C API (ffi, lib)
sgmv.build_info()  what the loaded libsgmv.so says about its build (the Triton that compiled it)

`import sgmv` imports neither torch nor triton. The torch ops (torch.ops.sgmv.shrink, expand and
batch_plan) are registered as soon as both sgmv and torch are imported, in either order: at
`import sgmv` if torch is already imported, else when the program first imports torch.
"""
import sys

from . import capi
from .binding import (Layer, Step, batch_plan, batch_plan_bytes, sgmv_expand, sgmv_shrink, shrink_workspace_bytes,
                      step_scratch_bytes)
from .capi import SgmvError, build_info

__version__ = capi.VERSION  # sgmv.h's SGMV_VERSION_MAJOR/MINOR/PATCH, as the wheel's version
__all__ = ["Layer", "Step", "step_scratch_bytes", "sgmv_shrink", "sgmv_expand", "batch_plan", "batch_plan_bytes",
           "shrink_workspace_bytes", "SgmvError", "build_info", "__version__"]


def _register_torch_ops():
    from . import torch_ops  # noqa: F401  (registers the ops on import)


class _WhenTorchIsImported:
    """A sys.meta_path finder (the protocol of importlib.abc.MetaPathFinder,
    whose import costs more than sgmv's own):
    it registers the torch ops right after `import torch` has executed torch, then leaves sys.meta_path."""

    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = None
        for finder in list(sys.meta_path):  # the other finders, as the import system asks them
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                break
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            exec_module = spec.loader.exec_module

            def exec_then_register(module):
                exec_module(module)
                _register_torch_ops()

            spec.loader.exec_module = exec_then_register
        return spec


if sys.modules.get("torch") is not None:  # (None: a blocked import)
    _register_torch_ops()
elif not any(isinstance(f, _WhenTorchIsImported) for f in sys.meta_path):
    sys.meta_path.insert(0, _WhenTorchIsImported())
