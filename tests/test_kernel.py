"""The kernel's semantics: the JIT path (the interpreter on CPU) and the torch reference against
a float64 expectation, on the randomized suite of sgmv.testing; and that oracle's own teeth."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import sgmv.jit
import sgmv.reference
from sgmv.testing import (CORRUPT, DTYPES, TOL, Case, CheckFailed, build, check, corrupt_case, expected, make_cases,
                          needs_bf16_dot)
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


TILES = json.loads((Path(__file__).resolve().parent.parent / "aot" / "tiles.json").read_text())["tiles"]


@pytest.mark.parametrize("tile", sorted(t for t in TILES if not t.startswith("shrink_")))
def test_jit_every_tile(tile):
    """Each expand tile of the table computes the same function (the rules pick only some);
    decode's on the short-segment path, as its rule has it. (Shrink's: tests/test_shrink.py.)"""
    case = Case("every-tile", 24, 1000, [37, 1, 0, 5, 1, 20], [1, 0, 2, -1, 1, 0], 3, "fp32in-fp16",
                torch.int64, True, out_slice=True, seed=200)
    run(sgmv.jit.sgmv_expand, case, tile=tuple(TILES[tile]) + ((True,) if tile == "decode" else ()))


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
    exp = x.double() @ w[0].double().T
    atol, rtol = TOL[torch.float16]
    assert bool(((out.double() - exp).abs() <= atol + rtol * exp.abs()).all())
    # The two written rows, and nothing else of the NaN poison.
    changed = buf.view(torch.int16) != torch.tensor(float("nan"), dtype=torch.float16).view(torch.int16)
    assert int(changed.sum()) == 128 and bool(changed[:64].all()) and bool(changed[n:n + 64].all())


# ---- the oracle itself: each kind of wrong output must fail the check --------------------------

def _oracle_run(dtypes, add_inputs=True):
    """A correct 160 x 4096 result (the reference path) in a column slice of a wider buffer, with
    a skipped segment (rows 100..119): (args, buffer before, buffer after, expectation, written)."""
    case = Case("oracle", 16, 4096, [100, 20, 40], [0, -1, 1], 2, dtypes, torch.int32, add_inputs,
                out_slice=True, seed=700)
    args, buf = build(case, "cpu")
    before = buf.clone()
    exp, written = expected(args)
    sgmv.reference.sgmv_expand(*args)
    assert written.sum() == 140 and not written[100:120].any()
    used = check(args, before, buf, exp, written, "oracle")
    assert 0 < used < 1, used  # a correct result passes, and does not match the float64 result exactly
    return args, before, buf, exp, written


@pytest.mark.parametrize("dtypes", ["fp16", "bf16", "fp32in-fp16-fp32out"])
def test_oracle_catches_one_wrong_element(dtypes):
    args, before, buf, exp, written = _oracle_run(dtypes)
    out, (row, col) = args[2], (137, 1234)
    atol, rtol = TOL[DTYPES[dtypes][2]]
    tol = atol + rtol * abs(exp[row, col].item())
    out[row, col] = exp[row, col].item() + 3 * tol
    got, e = out[written].double(), exp[written]
    old_tol = 1e-5 if out.dtype == torch.float32 else 1e-2  # the relative-norm check this oracle replaced
    assert (got - e).norm() / e.norm() < old_tol  # would have passed it
    with pytest.raises(CheckFailed, match=rf"oracle: 1 of {140 * 4096} written elements wrong, 0 of them "
                                          rf"non-finite .* first at output \({row}, {col}\)"):
        check(args, before, buf, exp, written, "oracle")


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=str)
def test_oracle_catches_non_finite_in_a_written_row(value):
    args, before, buf, exp, written = _oracle_run("fp16")
    args[2][3, 0] = value
    with pytest.raises(CheckFailed, match=r"1 of them non-finite .* first at output \(3, 0\): got (nan|inf)"):
        check(args, before, buf, exp, written, "oracle")


@pytest.mark.parametrize("add_inputs", [True, False], ids=["random-old-values", "nan-poison"])
@pytest.mark.parametrize("where", ["unwritten-row", "column-beside-the-view"])
def test_oracle_catches_one_changed_bit_outside_the_written_part(where, add_inputs):
    """One bit of one element flipped: also a NaN turned into another NaN, equal as a value."""
    args, before, buf, exp, written = _oracle_run("fp16", add_inputs)
    row, col = (110, 5 + 77) if where == "unwritten-row" else (12, 4)
    bits = buf.view(torch.int16)
    bits[row, col] ^= 1
    assert (buf[row, col].isnan() and before[row, col].isnan()) != add_inputs
    label = "a row no segment writes" if where == "unwritten-row" else "a column outside the output view"
    with pytest.raises(CheckFailed, match=rf"1 elements outside the written part changed; first at buffer "
                                          rf"\({row}, {col}\), {label}"):
        check(args, before, buf, exp, written, "oracle")



def test_jit_launches_what_c_describes(monkeypatch):
    """sgmv.jit passes each kernel exactly the arguments of C's launch description: every
    parameter of the kernel (runtime and constexpr) by name, in every launch, in stream order (a
    split shrink: step 0 then step 1); the results stay right."""
    seen = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(**kw):
                seen.append((self.kernel, kw))
                return self.kernel[grid](**kw)
            return launch

    for name in ("sgmv_kernel", "sgmv_plan_kernel"):
        monkeypatch.setattr(sgmv.jit.kernels, name, Recorder(getattr(sgmv.jit.kernels, name)))
    case = Case("described", 24, 1000, [37, 1, 0, 5], [1, 0, 2, -1], 3, "fp32in-fp16", torch.int64, True, seed=201)
    args, buf = build(case, DEVICE)
    before = buf.clone()
    exp, written = expected(args)
    plan = sgmv.jit.batch_plan(*args[3:7], args[2].shape[0], case.num_loras)
    sgmv.jit.sgmv_expand(*args, batch_plan=plan)
    check(args, before, buf, exp, written, "jit expand with a plan")
    plan_launches = len(seen) - 1
    assert plan_launches >= 1 and seen[-1][0] is sgmv.jit.kernels.sgmv_kernel.kernel

    g = torch.Generator().manual_seed(202)
    x = torch.randn(3, 512, generator=g).half().to(DEVICE)
    a = torch.randn(2, 16, 512, generator=g).half().to(DEVICE)
    y = torch.full((3, 16), float("nan"), device=DEVICE)
    meta = [torch.tensor(v, dtype=torch.int32, device=DEVICE) for v in ([0, 1], [1, 2], [0, 1])]
    work = torch.empty(sgmv.shrink_workspace_bytes(3, 16) // 4, dtype=torch.float32, device=DEVICE)
    sgmv.jit.sgmv_shrink(x, a, y, *meta, 2, 2, 0.5, workspace=work, tile=(16, 16, 32, 4, 1), split=4)
    split = seen[plan_launches + 1:]
    assert [kw["step"] for _, kw in split] == [0, 1]  # the split shrink's two launches, in order
    assert split[0][1]["work_ptr"].data_ptr() == work.data_ptr()
    for kernel, kw in seen:
        assert sorted(set(kw) - {"num_warps", "num_stages"}) == sorted(kernel.arg_names), kernel.arg_names
    want = torch.stack([x.double()[r] @ a.double()[i].T for r, i in ((0, 0), (1, 1), (2, 1))]) * 0.5
    torch.testing.assert_close(y.double(), want, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("field", [0, 1, 2], ids=["start", "length", "index"])
def test_int64_metadata_outside_int32_is_skipped_by_kernel_and_reference(field):
    """An int64 start, length or adapter index that does not fit in int32 skips its segment in
    the kernel (it reads int32 words) and in the reference alike; the other segment is written."""
    g = torch.Generator().manual_seed(203 + field)
    x = torch.randn(4, 16, generator=g).half().to(DEVICE)
    w = torch.randn(2, 64, 16, generator=g).half().to(DEVICE)
    meta = [[0, 2], [2, 2], [1, 0]]
    meta[field][0] += 2 ** 32
    meta = [torch.tensor(v, dtype=torch.int64, device=DEVICE) for v in meta]
    outs = []
    for fn in (sgmv.jit.sgmv_expand, sgmv.reference.sgmv_expand):
        out = torch.full((4, 64), 7.0, dtype=torch.float16, device=DEVICE)
        fn(x, w, out, *meta, 2, 2, False)
        outs.append(out.cpu())
    want = (x.double()[2:] @ w.double()[0].T).cpu()
    for out in outs:
        assert torch.equal(out[:2], torch.full((2, 64), 7.0, dtype=torch.float16))  # skipped: untouched
        torch.testing.assert_close(out[2:].double(), want, atol=2e-2, rtol=1e-2)


def test_jit_specialises_only_the_aligned_pointers():
    """The JIT compiles the AOT build's code: Triton specialises none of the kernels' integers (on 1
    or on multiples of 16) and no pointer but those an aligned variant assumes aligned, so that a
    new parameter cannot bring shape-dependent specialisation (a compile per shape) back. Read
    from the compiled-mode decorators, in a process without TRITON_INTERPRET."""
    import os
    import subprocess
    import sys
    src = Path(__file__).resolve().parent.parent / "kernels" / "sgmv.py"
    code = ("import importlib.util, json, sys; s = importlib.util.spec_from_file_location('k', sys.argv[1]); "
            "k = importlib.util.module_from_spec(s); s.loader.exec_module(k); print(json.dumps({n: [p.name for p in "
            "getattr(k, n).params if not p.is_constexpr and not p.do_not_specialize] for n in k.SIGNATURES})); "
            "print(json.dumps(list(k.ALIGNED_POINTERS)))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code, str(src)], capture_output=True, text=True, env=env, check=True)
    specialised, aligned = (json.loads(line) for line in out.stdout.splitlines())
    assert specialised == {"sgmv_kernel": aligned, "sgmv_plan_kernel": []}


def _addresses_read(monkeypatch):
    """The byte addresses of every element the interpreter loads from here on (a list of arrays)."""
    from triton.runtime import interpreter
    builder, read = interpreter.InterpreterBuilder, []
    masked, plain = builder.create_masked_load, builder.create_load

    def create_masked_load(self, ptrs, mask, *rest):
        read.append(ptrs.data[mask.data.astype(bool)].astype(np.uint64).ravel())
        return masked(self, ptrs, mask, *rest)

    def create_load(self, ptrs, *rest):
        read.append(ptrs.data.astype(np.uint64).ravel())
        return plain(self, ptrs, *rest)

    monkeypatch.setattr(builder, "create_masked_load", create_masked_load)
    monkeypatch.setattr(builder, "create_load", create_load)
    return read


@pytest.mark.parametrize("plan", [False, True], ids=["rows", "plan"])
def test_ranks_read_whole_groups_and_ignore_what_lies_past_them(plan, monkeypatch):
    """Per-adapter ranks that end inside a 16-byte group (3, 13) and on one (8, 16): the aligned
    variants load the weights' group whole, so the weights' padding past each rank is filled with
    inf here, and the inputs' columns past it with NaN; nothing of them may reach the result.
    Checked against float64. The inputs' columns past a rank are not even read: a shrink leaves
    them unwritten, and initcheck counted such reads as errors on the GPU. Under the interpreter
    every address the kernel loads is seen."""
    read = _addresses_read(monkeypatch) if DEVICE == "cpu" else None
    g = torch.Generator().manual_seed(301)
    ranks = [3, 8, 13, 16]
    T, K, N, L = 12, 16, 64, len(ranks)
    x = torch.randn(T, K, generator=g).half()
    w = torch.randn(L, N, K, generator=g).half()
    seq_start, seq_len, idx = [0, 3, 6, 9], [3, 3, 3, 3], [2, 0, 3, 1]
    for s, n, i in zip(seq_start, seq_len, idx):
        x[s:s + n, ranks[i]:] = float("nan")
        w[i, :, ranks[i]:] = float("inf")
    base = torch.randn(T, N, generator=g).half()
    want = base.double().clone()
    for s, n, i in zip(seq_start, seq_len, idx):
        r = ranks[i]
        want[s:s + n] += x[s:s + n, :r].double() @ w[i, :, :r].double().T
    meta = [torch.tensor(v, dtype=torch.int32, device=DEVICE) for v in (seq_start, seq_len, idx)]
    r = torch.tensor(ranks, dtype=torch.int32, device=DEVICE)
    out = base.to(DEVICE)
    batch_plan = sgmv.jit.batch_plan(*meta, L, T, L) if plan else None
    sgmv.jit.sgmv_expand(x.to(DEVICE), w.to(DEVICE), out, *meta, L, 3, True, batch_plan, lora_ranks=r)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.cpu().double(), want, atol=2e-2, rtol=1e-2)
    if read is not None:  # every element of x up to its rank was read (the watch sees x), none past it
        seen = np.concatenate(read)
        for within, cols in ((True, lambda r: range(r)), (False, lambda r: range(r, K))):
            addresses = np.array([x.data_ptr() + 2 * (row * K + col) for s, n, i in zip(seq_start, seq_len, idx)
                                  for row in range(s, s + n) for col in cols(ranks[i])], dtype=np.uint64)
            read_here = np.isin(addresses, seen)
            if within and not read_here.all():
                raise AssertionError(f"the watch missed {int((~read_here).sum())} elements of x the kernel needs")
            if not within and read_here.any():
                raise AssertionError(f"{int(read_here.sum())} elements of x past a rank were read")
    tensors, _ = sgmv.binding.expand_tensors(x, w, out, *meta, L, 3, True, 0, batch_plan, r, allow_cpu=DEVICE == "cpu")
    args = sgmv.capi.ffi.new("sgmv_expand_args_t *")
    sgmv.capi.check(sgmv.capi.lib.sgmv_expand_args_from_tensors(tensors, args))
    d = sgmv.jit._launches(sgmv.capi.lib.sgmv_expand_launches, args, 90, sgmv.capi.ffi.NULL)
    ran = sgmv.capi.ffi.string(d.launches[d.num_launches - 1].variant).decode()
    assert "unaligned" not in ran and "_k0_" in ran, ran  # an aligned variant, K ended by the ranks


@pytest.mark.parametrize("op", ["expand", "shrink"])
def test_reference_refuses_what_the_library_refuses(op):
    """The reference holds the library's whole contract (its dtype matrix too): fp32 weights are
    served by neither op, fp32 inputs not by shrink; the output is untouched."""
    x = torch.randn(4, 64 if op == "shrink" else 16)
    w = torch.randn(2, 16, 64) if op == "shrink" else torch.randn(2, 64, 16)
    out = torch.full((4, 16 if op == "shrink" else 64), 3.0)
    meta = [torch.tensor(v, dtype=torch.int32) for v in ([0, 2], [2, 2], [0, 1])]
    fn = getattr(sgmv.reference, f"sgmv_{op}")
    with pytest.raises(sgmv.SgmvError, match="unsupported dtypes"):
        fn(x, w, out, *meta, 2, 2)
    assert (out == 3.0).all()
