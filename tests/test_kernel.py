"""The kernel's semantics: the JIT path (the interpreter on CPU) and the torch reference against
a float64 expectation, on the randomized suite of tests/cases.py."""
import pytest
import torch

import sgmv.jit
import sgmv.reference
from sgmv.testing import CORRUPT, Case, build, check, corrupt_case, expected, make_cases, needs_bf16_dot
from conftest import DEVICE, HAS_GPU

CASES = make_cases(gpu=HAS_GPU)


def run(fn, case, **kw):
    args, buf = build(case, DEVICE)
    before = buf.clone()
    exp, written = expected(args)
    fn(*args, **kw)
    if HAS_GPU:
        torch.cuda.synchronize()
    return check(args, before, buf, exp, written, f"{fn.__module__} {case}")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference(case):
    run(sgmv.reference.sgmv_expand, case)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_jit(case):
    if not HAS_GPU and needs_bf16_dot(case):
        pytest.skip("Triton's interpreter does not support bfloat16 tl.dot (triton issue 11584): GPU only")
    run(sgmv.jit.sgmv_expand, case)


@pytest.mark.parametrize("tile", sorted(sgmv.jit.TILES))
def test_jit_every_tile(tile):
    """Each tile config of the table computes the same function (the rules pick only some)."""
    case = Case("every-tile", 24, 1000, [37, 1, 0, 5, 1, 20], [1, 0, 2, -1, 1, 0], 3, "fp32in-fp16",
                torch.int64, True, out_slice=True, seed=200)
    run(sgmv.jit.sgmv_expand, case, tile=tile)


@pytest.mark.parametrize("meta_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("name,starts,lens,idx", CORRUPT, ids=[c[0] for c in CORRUPT])
def test_corrupt_metadata_writes_nothing_outside_valid_rows(name, starts, lens, idx, meta_dtype):
    run(sgmv.jit.sgmv_expand, corrupt_case(name, starts, lens, idx, meta_dtype, "fp16"))


def test_large_offsets_are_int64():
    """Row offsets past 2^31 elements: a 1-row output whose row stride is 2^31 + 8."""
    if HAS_GPU and torch.cuda.get_device_properties(0).total_memory < 12 * 2**30:
        pytest.skip("needs about 5 GB of device memory")
    # A strided view of a small buffer cannot reach 2^31 without allocating it; the GPU size
    # tests of tests/test_gpu.py cover real tensors. Here: the address arithmetic, via the
    # stride of a 2-row output whose second row lies 2^31 + 64 elements further.
    n = 2**31 + 64
    if not HAS_GPU:
        pytest.skip("allocating 4 GB under the interpreter is too slow for CI; run on the GPU")
    buf = torch.full((n + 64,), float("nan"), dtype=torch.float16, device=DEVICE)
    out = buf.as_strided((2, 64), (n, 1))
    x = torch.randn(2, 16, dtype=torch.float16, device=DEVICE)
    w = torch.randn(1, 64, 16, dtype=torch.float16, device=DEVICE)
    meta = [torch.tensor(v, dtype=torch.int32, device=DEVICE) for v in ([0], [2], [0])]
    sgmv.jit.sgmv_expand(x, w, out, *meta, 1, 2)
    ref = (x.float() @ w[0].float().T).half()
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
