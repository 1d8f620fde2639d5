"""The layer call (sgmv.Layer, sgmv.Step, sgmv_layer_apply): the whole LoRA delta of a layer,
out (+)= B (scaling * lora_scales * A x), for LoRAX's segments and vLLM's per-token mapping, against
a float64 expectation computed here; the JIT path (Triton's interpreter on the CPU) and on a GPU the
library against the JIT bit for bit. The cases and their expectation are sgmv.testing's (LayerCase,
build_layer, expected_layer), shared with `sgmv check`."""
import dataclasses
import re

import pytest
import torch

import sgmv
import sgmv.jit
import sgmv.reference
from sgmv.testing import (GPU_LAYER_CASES as GPU_CASES, LAYER_CASES as CASES, TOL, LayerCase, bitwise_equal, check,
                          jit_matches_build)
from sgmv.testing import build_layer, expected_layer as expected
from conftest import DEVICE, HAS_GPU

I32, I64 = torch.int32, torch.int64


def build(case, device=DEVICE):
    return build_layer(case, device)


def skip_bf16_on_cpu(case, device=DEVICE):
    if device == "cpu" and case.dtype == "bf16":
        pytest.skip("Triton's interpreter has no bfloat16 dot (shared/NOTES-triton-aot.md)")


def run_layer(case, plan, apply, device=DEVICE):
    layer, step, x, out, buf, rows = build(case, device)
    before = buf.clone()
    pad = (buf.shape[1] - out.shape[1]) // 2
    prior = before[:, pad:pad + out.shape[1]]
    plan(step)
    apply(layer, x, out, step, add_inputs=case.add_inputs)
    e, written, slack = expected(case, layer, x, prior, rows)
    check((x, None, out), before, buf, e, written, f"{case}", slack=slack)
    return buf


def jit_plan(step):
    sgmv.jit.step_plan(step)


def aot_plan(step):
    step.plan()


def aot_apply(layer, x, out, step, add_inputs):
    layer(x, out, step, add_inputs=add_inputs)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_jit(case):
    skip_bf16_on_cpu(case)
    run_layer(case, jit_plan, sgmv.jit.layer_apply)


@pytest.mark.parametrize("case", [dataclasses.replace(c, dtype="bf16") for c in CASES[:3]] + CASES, ids=str)
def test_reference(case):
    run_layer(case, lambda step: None, sgmv.reference.layer_apply, device="cpu")


@pytest.mark.parametrize("case", CASES[:6:2] + CASES[7:12:2], ids=str)
def test_jit_layer_is_shrink_then_expand_bit_for_bit(case):
    """The layer call gives the bits of sgmv_shrink into an intermediate of the weights' dtype and
    sgmv_expand from it, with the same plan (it launches the same kernels with the same rules)."""
    skip_bf16_on_cpu(case)
    layer, step, x, out, buf, rows = build(case)
    T, R, S = x.shape[0], case.rank, len(case.outs)
    seq_start, seq_len, idx, mapping = step._keep
    if mapping is not None:
        seq_start = torch.arange(T, dtype=case.meta, device=DEVICE)
        seq_len, idx = torch.ones_like(seq_start), mapping
    batches, max_seq = (T, 1) if mapping is not None else (len(case.lens), max(case.lens))
    plan = sgmv.jit.batch_plan(seq_start, seq_len, idx, batches, T, case.num_loras)
    y = torch.full((T, S * R), float("nan"), dtype=layer.dtype, device=DEVICE)
    if case.ranks is not None:
        y.zero_()  # columns past an adapter's rank are neither written nor read
    a = layer.lora_a if S > 1 else layer.lora_a[0]
    b = layer.lora_b if S > 1 else layer.lora_b[0]
    sgmv.jit.sgmv_shrink(x, a, y, seq_start, seq_len, idx, batches, max_seq, case.scaling, lora_ranks=layer.lora_ranks,
                         lora_scales=layer.lora_scales, batch_plan=plan)
    two = buf.clone()
    sgmv.jit.sgmv_expand(y, b, two[:, (buf.shape[1] - out.shape[1]) // 2:][:, :out.shape[1]], seq_start, seq_len, idx,
                         batches, max_seq, case.add_inputs, plan, lora_ranks=layer.lora_ranks)
    sgmv.jit.step_plan(step)
    sgmv.jit.layer_apply(layer, x, out, step, add_inputs=case.add_inputs)
    assert bitwise_equal(buf, two)


def test_token_mapping_plans_like_one_row_segments():
    """A step of vLLM's per-token mapping builds the plan of the same rows given as segments of one row."""
    case = CASES[len(CASES) // 2]
    layer, step, *_ = build(case)
    T = step.total_tokens
    mapping = step._keep[3]
    seq_start = torch.arange(T, dtype=case.meta, device=DEVICE)
    plan = sgmv.jit.batch_plan(seq_start, torch.ones_like(seq_start), mapping, T, T, case.num_loras)
    sgmv.jit.step_plan(step)
    got = step.scratch[:plan.numel() * 4].view(torch.int32)
    used, capacity = plan[0].item(), plan[2].item()  # the plan's words the kernels read (kernels/sgmv.py)
    for part in (slice(0, 4 + used), slice(4 + capacity, 4 + capacity + used // 64)):
        assert torch.equal(got[part], plan[part])


def test_planar_slices_match_side_by_side():
    """vLLM's shrink buffer (num_slices, tokens, rank) gives the bits of (tokens, num_slices * rank),
    for sgmv_shrink's output and sgmv_expand's inputs."""
    g = torch.Generator().manual_seed(5)
    T, H, R, L, S = 9, 64, 16, 3, 3
    x = torch.randn(T, H, generator=g).half().to(DEVICE)
    a = tuple((torch.randn(L, R, H, generator=g) / 8).half().to(DEVICE) for _ in range(S))
    b = tuple((torch.randn(L, 64, R, generator=g) / 4).half().to(DEVICE) for _ in range(S))
    meta = [torch.tensor(v, dtype=I32, device=DEVICE) for v in ([0, 4, 5], [4, 1, 4], [2, 0, 1])]
    side = torch.full((T, S * R), float("nan"), dtype=torch.float16, device=DEVICE)
    planes = torch.full((S, T + 1, R), float("nan"), dtype=torch.float16, device=DEVICE)[:, 1:]  # a plane stride > T * R
    sgmv.jit.sgmv_shrink(x, a, side, *meta, 3, 4, 0.5)
    sgmv.jit.sgmv_shrink(x, a, planes, *meta, 3, 4, 0.5)
    assert bitwise_equal(planes.transpose(0, 1).reshape(T, S * R), side)
    out_side = torch.zeros(T, S * 64, dtype=torch.float16, device=DEVICE)
    out_planes = out_side.clone()
    sgmv.jit.sgmv_expand(side, b, out_side, *meta, 3, 4)
    sgmv.jit.sgmv_expand(planes, b, out_planes, *meta, 3, 4)
    assert bitwise_equal(out_planes, out_side)
    # The reference reads the same layouts.
    ref = torch.zeros_like(out_side)
    sgmv.reference.sgmv_expand(side, b, ref, *meta, 3, 4)
    assert (ref.float() - out_side.float()).abs().max().item() < 1e-2


def _layer_and_step(device=DEVICE, L=2, R=16, H=64, outs=(64, 32), T=6):
    a = tuple(torch.randn(L, R, H).half().to(device) for _ in outs)
    b = tuple(torch.randn(L, n, R).half().to(device) for n in outs)
    layer = sgmv.Layer(a, b, allow_cpu=device == "cpu")
    meta = dict(seq_start=torch.tensor([0, 3], dtype=I32, device=device),
                seq_len=torch.tensor([3, 3], dtype=I32, device=device),
                lora_indices=torch.tensor([1, 0], dtype=I32, device=device), total_tokens=T)
    step = sgmv.Step(**meta, num_loras=L, plan=False, allow_cpu=device == "cpu",
                     scratch=torch.empty(sgmv.step_scratch_bytes(2, T, len(outs) * R), dtype=torch.uint8,
                                         device=device))
    return layer, step, a, b, meta


LAYER_ERRORS = [  # (change to sgmv.Layer's arguments, exception, words of the message)
    (lambda a, b: ((a[0],), b), sgmv.SgmvError, "lora_a has 1 slices, lora_b 2"),
    (lambda a, b: (a, (b[0], b[1][:, :, :8])), ValueError, "lora_b[1]"),
    (lambda a, b: (a, (b[0], b[1].float())), TypeError, "lora_b[1] is float32"),
    (lambda a, b: ((a[0].float(), a[1].float()), (b[0].float(), b[1].float())), TypeError, "unsupported dtypes"),
    (lambda a, b: ((a[0], a[1][:1]), b), ValueError, "share num_loras, rank and hidden"),
    (lambda a, b: ((a[0].transpose(1, 2), a[1]), b), ValueError, "unit stride"),
    (lambda a, b: ((a[0][0], a[1]), b), ValueError, "lora_a[0] must be (num_loras, rank, hidden)"),
]


@pytest.mark.parametrize("change,exc,words", LAYER_ERRORS, ids=[w for _, _, w in LAYER_ERRORS])
def test_layer_refuses_bad_weights(change, exc, words):
    _, _, a, b, _ = _layer_and_step("cpu")
    with pytest.raises(exc, match=re.escape(words)) as e:
        sgmv.Layer(*change(a, b), allow_cpu=True)
    assert isinstance(e.value, sgmv.SgmvError)


def test_step_refuses_bad_metadata():
    _, _, _, _, meta = _layer_and_step("cpu")
    small = torch.empty(64, dtype=torch.uint8)
    cases = [
        (dict(meta, token_lora_mapping=meta["lora_indices"]), ValueError, "replaces seq_start"),
        (dict(meta, total_tokens=None), TypeError, "needs total_tokens"),
        (dict(meta, scratch=small), ValueError, "scratch_bytes 64 is smaller"),
        (dict(meta, seq_len=meta["seq_len"].long()), TypeError, "share one dtype"),
        (dict(meta, batches=3), ValueError, "fewer than batches"),
        (dict(token_lora_mapping=meta["lora_indices"].float(), scratch=small), TypeError, "int32 or int64"),
    ]
    for kw, exc, words in cases:
        kw.setdefault("scratch", torch.empty(1 << 16, dtype=torch.uint8))
        with pytest.raises(exc, match=words):
            sgmv.Step(**kw, num_loras=2, plan=False, allow_cpu=True)


def test_layer_call_refuses_bad_tensors_and_changes_nothing():
    layer, step, a, b, meta = _layer_and_step("cpu")
    T = step.total_tokens
    x, out = torch.randn(T, 64).half(), torch.randn(T, 96).half()
    wide = sgmv.Layer(tuple(torch.randn(2, 128, 64).half() for _ in range(2)),
                      tuple(torch.randn(2, 48, 128).half() for _ in range(2)), allow_cpu=True)
    other = sgmv.Step(**meta, num_loras=3, plan=False, allow_cpu=True)
    cases = [
        ((layer, x[:-1], out, step), ValueError, r"inputs must be \(total_tokens, hidden\) = \(6, 64\)"),
        ((layer, x, out[:, :-1], step), ValueError, r"output must be \(total_tokens, output columns\) = \(6, 96\)"),
        ((layer, x.float(), out, step), TypeError, "unsupported dtypes"),
        ((layer, x, out.to(torch.bfloat16), step), TypeError, "unsupported dtypes"),
        ((layer, x, out, other), ValueError, "num_loras 2, the step 3"),
        ((wide, x, torch.zeros(T, 96).half(), step), ValueError, "smaller than sgmv_step_scratch_bytes"),
        ((layer, x, out.t().contiguous().t(), step), ValueError, "unit stride"),
    ]
    for (lay, xx, oo, st), exc, words in cases:
        before = oo.clone()
        with pytest.raises(exc, match=words) as e:
            sgmv.jit.layer_apply(lay, xx, oo, st)
        assert isinstance(e.value, sgmv.SgmvError)
        assert bitwise_equal(oo, before)


def _constexpr(launch, name):
    return [a.value for a in launch.args[0:launch.num_args] if sgmv.capi.ffi.string(a.name) == name.encode()]


@pytest.mark.parametrize("arch", [int(a) for a in sgmv.capi.ffi.string(sgmv.capi.lib.sgmv_archs()).decode().split(",")])
def test_layer_call_describes_two_launches_per_call(arch):
    """The C description: the shrink (one launch, or two with split-K), then the expand, each a
    plain launch in stream order on every arch (0.5 to 0.6.0 launched the expand programmatically
    on sm_90: measured slower, benchmarks/NOTES.md round 9)."""
    layer, step, *_ = _layer_and_step("cpu")
    x, out = torch.randn(6, 64).half(), torch.randn(6, 96).half()
    pair = sgmv.capi.ffi.new("sgmv_tensor_t[2]")
    for i, t in enumerate((x, out)):
        fields, _ = sgmv.binding.describe(t, "t")
        sgmv.binding._TENSOR.pack_into(sgmv.capi.ffi.buffer(pair), i * sgmv.binding._SIZEOF_TENSOR, *fields)
    d = sgmv.jit._launches(sgmv.capi.lib.sgmv_layer_apply_launches, layer._h, step._h, pair, pair + 1, 1, arch)
    launches = list(d.launches[0:d.num_launches])
    assert d.num_launches in (2, 3) and _constexpr(launches[0], "SHRINK") == [1]
    assert _constexpr(launches[-1], "SHRINK") == [0]
    assert [_constexpr(ln, "GDC") for ln in launches] == [[]] * d.num_launches
    assert [ln.programmatic for ln in launches] == [0] * d.num_launches


# ---- on the GPU ---------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES + CASES, ids=str)
def test_aot_matches_jit_and_float64(case):
    aot = run_layer(case, aot_plan, aot_apply)
    jit = run_layer(case, jit_plan, sgmv.jit.layer_apply)
    if jit_matches_build():
        assert bitwise_equal(aot, jit), f"{case}: AOT and JIT differ"


@pytest.mark.gpu
@pytest.mark.parametrize("per_token", [False, True])
def test_graph_replays_with_metadata_changed_in_place(per_token):
    """One CUDA graph holds the step's plan and three layer calls; between replays the metadata
    change in place (adapters, lengths) and every replay is right."""
    base = LayerCase("graph", 256, 16, (256, 128), [3, 1, 1, 2, 1], [0, 1, 2, 1, 0], 3, per_token=per_token,
                     seed=20)
    layer, step, x, out, buf, rows = build(base)
    layers = [layer] + [build(dataclasses.replace(base, seed=21 + i))[0] for i in range(2)]
    start = buf.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step.plan()
        for lay in layers:
            lay(x, out, step)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step.plan()
        for lay in layers:
            lay(x, out, step)
    g = torch.Generator().manual_seed(3)
    for replay in range(4):
        lens = torch.randint(0, 3, (5,), generator=g).tolist()  # the first four add up to <= 8 rows
        lens[-1] = x.shape[0] - sum(lens[:-1])
        idx = torch.randint(-1, 3, (5,), generator=g).tolist()
        case = dataclasses.replace(base, lens=lens, idx=idx)
        new_rows = []
        for n, i in zip(lens, idx):
            new_rows += [i] * n
        new_rows += [-1] * (x.shape[0] - len(new_rows))
        if per_token:
            step._keep[3].copy_(torch.tensor(new_rows, dtype=I32))
        else:
            starts = [sum(lens[:i]) for i in range(5)]
            for t, v in zip(step._keep[:3], (starts, lens, idx)):
                t.copy_(torch.tensor(v, dtype=I32))
        buf.copy_(start)
        graph.replay()
        torch.cuda.synchronize()
        e = start.cpu().double()
        written = torch.zeros(out.shape[0], dtype=torch.bool)
        slack = torch.zeros(out.shape, dtype=torch.float64)
        for lay in layers:  # the three deltas, one after another (each output rounded: twice the tolerance)
            e, w, s = expected(case, lay, x, e, new_rows)
            written, slack = written | w, slack + s + TOL[out.dtype][1] * e.abs()
        check((x, None, out), start, buf, e, written, f"replay {replay}", slack=slack)


@pytest.mark.gpu
def test_torch_op_is_the_layer_call():
    case = GPU_CASES[0]
    layer, step, x, out, buf, rows = build(case)
    step.plan()
    want = buf.clone()
    layer(x, want[:, :out.shape[1]] if want.shape == out.shape else want, step)
    seq_start, seq_len, idx, mapping = step._keep
    torch.ops.sgmv.step_plan(seq_start, seq_len, idx, mapping, step.batches, step.max_seq_length, step.total_tokens,
                             step.num_loras, step.scratch)
    torch.ops.sgmv.layer(x, out, list(layer.lora_a), list(layer.lora_b), seq_start, seq_len, idx, mapping,
                         step.batches, step.max_seq_length, step.total_tokens, step.num_loras, step.scratch,
                         add_inputs=True, scaling=layer.scaling)
    assert bitwise_equal(buf, want)
