"""The AOT generator's register fit (aot/generate.py register_limit): a variant whose registers
alone keep one more program off an SM is compiled under the limit that fits it."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _generate():
    spec = importlib.util.spec_from_file_location("sgmv_aot_generate", ROOT / "aot" / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


G = _generate()


@pytest.mark.parametrize("registers, warps, shared, programs", [
    (166, 4, 0, 3), (168, 4, 0, 3), (169, 4, 0, 2), (176, 4, 0, 2), (255, 4, 0, 2), (128, 4, 0, 4),
    (80, 4, 0, 6), (32, 4, 0, 16), (24, 2, 0, 32), (166, 4, 100_000, 2), (64, 8, 0, 4)])
def test_programs_per_sm_by_registers_shared_memory_and_warps(registers, warps, shared, programs):
    assert G._programs_per_sm(registers, warps, shared) == programs


@pytest.mark.parametrize("registers, warps, shared, limit", [
    (176, 4, 0, 168),      # 0.5.0's bf16 prefill_r16 expand: 2 programs, 3 at 168
    (214, 4, 0, 168),      # the fp32-output shrink_p64 rows tile: 2 programs, 3 at 168
    (255, 4, 0, 168),
    (166, 4, 0, 128),      # fits 3; 4 at 128
    (132, 4, 0, 128),
    (176, 4, 100_000, None),  # shared memory allows only 2 anyway
])
def test_register_limit(registers, warps, shared, limit):
    assert G.register_limit(registers, warps, shared) == limit


def test_the_prefill_expand_is_fitted_to_three_programs_per_sm_and_an_unfitted_tile_is_not():
    """The variant whose 0.5.0 compile had 176 registers (2 programs per SM, 12 % slower on
    prefill than 0.4.0's 166) now fits 3 programs without spilling, with whichever triton is here;
    a shrink_s64 variant, whose tile tiles.json lists in unfitted_tiles, keeps ptxas's registers
    (2 programs: the fit to 3 made decode 512x1 10 % slower), and so does a variant for sm_80. Compiled in a process of its own:
    this one runs Triton's interpreter."""
    pytest.importorskip("triton")
    assert "shrink_s64" in G.V.UNFITTED_TILES and "prefill_r16" not in G.V.UNFITTED_TILES
    script = f"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("g", {str(ROOT / "aot" / "generate.py")!r})
G = importlib.util.module_from_spec(spec); spec.loader.exec_module(G)
import triton
# (variant, the register limit its cubin must have been compiled under: None for ptxas's own choice)
for arch, tile, op, out, limit in ((90, "prefill_r16", "expand", "bf16", 168), (90, "shrink_s64", "shrink", "fp32", None),
                                   (80, "prefill_r16", "expand", "bf16", None)):
    v = dict(kernel="sgmv_kernel", arch=arch, op=op, x="bf16", w="bf16", out=out, even_k=True, tile=tile, path="rows",
             aligned=True)
    name, cubin, shared, warps, _ = G.compile_variant(v)
    # The fit runs ptxas alone; its cubin is what a whole compile under the same limit gives.
    src, target, options = G.source(v)
    same = cubin == triton.compile(src, target=target, options=dict(options, maxnreg=limit)).asm["cubin"]
    print(json.dumps([name, *G._resources(cubin), shared, warps, same]))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (name, registers, spilled, shared, warps, same), unfitted, sm80 = [json.loads(line)
                                                                       for line in r.stdout.splitlines()[-3:]]
    assert name == "sgmv_sm90_expand_bf16_bf16_bf16_k1_prefill_r16_rows"
    assert spilled == 0 and G._programs_per_sm(registers, warps, shared) >= 3, (registers, shared)
    assert same, "the fitted cubin differs from triton.compile(maxnreg=168)'s"
    name, registers, spilled, shared, warps, same = unfitted
    assert name == "sgmv_sm90_shrink_bf16_bf16_fp32_k1_shrink_s64_rows" and same
    # ptxas's own choice (192 registers with triton 3.6) is over the 168 a third program needs.
    assert G.register_limit(registers, warps, shared) is not None, (registers, shared)
    name, registers, spilled, shared, warps, same = sm80
    assert name == "sgmv_sm80_expand_bf16_bf16_bf16_k1_prefill_r16_rows" and same  # the fit is for sm_90 only
