"""On a GPU: libsgmv.so (AOT) against the JIT path, bit for bit at the same tile, and both against
the float64 expectation, over the randomized suite; a C program on its own streams and in two
contexts; first calls from many threads at once; tensors past 2^31 elements."""
import subprocess
import threading
from pathlib import Path

import pytest
import torch

import sgmv
import sgmv.jit
from sgmv import capi
from sgmv.testing import CORRUPT, Case, build, check, corrupt_case, expected, make_cases


pytestmark = pytest.mark.gpu
HERE = Path(__file__).resolve().parent
CASES = make_cases(gpu=True)


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("case", CASES, ids=str)
def test_aot_matches_jit_bitwise_and_reference(case):
    args, buf = build(case, "cuda")
    before = buf.clone()
    exp, written = expected(args)
    sgmv.sgmv_expand(*args)
    torch.cuda.synchronize()
    check(args, before, buf, exp, written, f"aot {case}")
    aot = buf.clone()
    buf.copy_(before)
    sgmv.jit.sgmv_expand(*args)  # the same tile: both apply the rules of aot/variants.py
    torch.cuda.synchronize()
    diff = (_bits(aot) != _bits(buf)).nonzero()
    if len(diff):
        r, c = diff[0].tolist()
        pad = (buf.shape[1] - args[2].shape[1]) // 2
        raise AssertionError(f"{case}: AOT and JIT differ in {len(diff)} elements, first at ({r}, {c}): aot "
                             f"{aot[r, c].item()!r} jit {buf[r, c].item()!r} float64 {exp[r, c - pad].item()!r} "
                             f"before {before[r, c].item()!r}")


@pytest.mark.parametrize("tile", sorted(sgmv.jit.TILES))
def test_every_tile_through_aot_rules(tile):
    """Each tile of the table, run through the JIT (AOT reaches each through its rules above)."""
    case = Case("every-tile", 24, 1000, [37, 1, 0, 5, 1, 20], [1, 0, 2, -1, 1, 0], 3, "fp32in-bf16",
                torch.int64, True, out_slice=True, seed=300)
    args, buf = build(case, "cuda")
    before = buf.clone()
    exp, written = expected(args)
    sgmv.jit.sgmv_expand(*args, tile=tile)
    torch.cuda.synchronize()
    check(args, before, buf, exp, written, f"jit tile {tile}")


@pytest.mark.parametrize("meta_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("name,starts,lens,idx", CORRUPT, ids=[c[0] for c in CORRUPT])
@pytest.mark.parametrize("path", ["aot", "jit"])
def test_corrupt_metadata_writes_nothing_outside_valid_rows(path, name, starts, lens, idx, meta_dtype):
    case = corrupt_case(name, starts, lens, idx, meta_dtype, "bf16")
    args, buf = build(case, "cuda")
    before = buf.clone()
    exp, written = expected(args)
    (sgmv.sgmv_expand if path == "aot" else sgmv.jit.sgmv_expand)(*args)
    torch.cuda.synchronize()
    check(args, before, buf, exp, written, f"{path} {name}")


@pytest.mark.parametrize("program", ["gpu_expand", "gpu_threads"])
def test_c_program(tmp_path, program):
    """gpu_expand: own streams, the primary context and a second one, against a host reference.
    gpu_threads: 16 threads' first calls at the same moment, each on its own stream."""
    import triton.backends.nvidia as nv
    cuda_inc = Path(nv.__file__).parent / "include"
    lib = capi.library_path()
    exe = tmp_path / program
    subprocess.run(["gcc", "-std=c99", "-O2", "-I", str(capi.INCLUDE_DIR), "-I", str(cuda_inc),
                    str(HERE / "c" / f"{program}.c"), "-L", str(lib.parent), f"-l:{lib.name}",
                    f"-Wl,-rpath,{lib.parent}", "-lcuda", "-lm", "-lpthread", "-o", str(exe)], check=True)
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    print(r.stdout)
    assert r.returncode == 0 and f"{program}: ok" in r.stdout, r.stdout + r.stderr


def test_first_calls_from_16_threads_at_once():
    """Sixteen threads, each on its own stream, make their first call at the same moment."""
    n_threads = 16
    barrier = threading.Barrier(n_threads)
    errors, results = [], {}
    case = Case("threads", 16, 512, [30, 2, 17], [1, 0, 2], 3, "bf16", torch.int32, True, seed=400)

    def worker(i):
        try:
            args, buf = build(case, "cuda")
            before = buf.clone()
            exp, written = expected(args)
            stream = torch.cuda.Stream()
            torch.cuda.synchronize()
            barrier.wait()
            with torch.cuda.stream(stream):
                sgmv.sgmv_expand(*args)
            stream.synchronize()
            results[i] = check(args, before, buf, exp, written, f"thread {i}")
        except Exception as e:  # reported below
            errors.append(f"thread {i}: {e!r}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == n_threads


def test_output_and_weights_past_2_31_elements():
    """A 70,000 x 32,768 bf16 output (2.29e9 elements) and a weight stack of 2^31 + 2^20 elements,
    checked on sampled rows against the reference."""
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2**30:
        pytest.skip(f"needs 12 GB of free device memory, {free / 2**30:.1f} GB free")
    g = torch.Generator(device="cuda").manual_seed(5)
    T, N, R = 70_000, 32_768, 16
    out = torch.empty(T, N, dtype=torch.bfloat16, device="cuda")
    out.normal_(generator=g)
    x = torch.randn(T, R, dtype=torch.bfloat16, device="cuda", generator=g)
    L = 2**31 // (N * R) + 2  # 4098 adapters: the last ones start past 2^31 elements
    w = torch.randn(L, N, R, dtype=torch.bfloat16, device="cuda", generator=g) * 0.25
    assert out.numel() > 2**31 and w.numel() > 2**31
    starts = torch.tensor([0, 30_000, 69_990], dtype=torch.int64, device="cuda")
    lens = torch.tensor([30_000, 39_990, 10], dtype=torch.int64, device="cuda")
    idx = torch.tensor([L - 1, 7, L - 2], dtype=torch.int64, device="cuda")
    rows = torch.tensor([0, 29_999, 30_000, 50_000, 69_989, 69_990, 69_999], device="cuda")
    before = out[rows].clone()
    sgmv.sgmv_expand(x, w, out, starts, lens, idx, 3, 39_990, add_inputs=True)
    torch.cuda.synchronize()
    seg_of = [0, 0, 1, 1, 1, 2, 2]
    ref = torch.stack([(x[r].double() @ w[idx[s]].double().T + before[i].double())
                       for i, (r, s) in enumerate(zip(rows.tolist(), seg_of))])
    got = out[rows].double()
    err = ((got - ref).norm() / ref.norm()).item()
    assert err < 1e-2, err
