import importlib.util
import os
from pathlib import Path

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    # Without a GPU the JIT path runs under Triton's interpreter; it must be chosen before
    # triton.jit decorates the kernel, i.e. before sgmv.jit is imported.
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = "cuda" if HAS_GPU else "cpu"

# Under pytest-xdist each worker is a process: torch's default of one CPU thread per core in each
# of them oversubscribes the cores many times over (the float64 expectations run on the CPU).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_report_header(config):
    from sgmv.testing import triton_versions, jit_matches_build
    jit, build = triton_versions()
    how = "bit for bit" if jit_matches_build() else "within tolerance only (not the build's triton)"
    return f"sgmv: JIT triton {jit}, cubins' triton {build}: AOT against JIT {how}"


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU: none is visible to torch")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip)


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# The build's variant table (aot/variants.py, plain Python), for inventory checks.
aot_variants = _load(Path(__file__).resolve().parent.parent / "aot" / "variants.py", "sgmv_aot_variants")
