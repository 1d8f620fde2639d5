"""SGMV shrink (LoRA A): the JIT path (Triton's interpreter on the CPU, fp16 only there) and the
torch reference against a float64 expectation computed here (sgmv.testing.expected_lora), over
odd shapes, skipped segments, both metadata dtypes, scaling, per-adapter scales and ranks, fused
slices, split-K through a workspace and the batch plan. On a GPU: the library (AOT) against the
JIT bit for bit, and a whole LoRA step in a CUDA graph."""
import json
from pathlib import Path

import pytest
import torch

import sgmv
import sgmv.jit
import sgmv.reference
from sgmv import capi
from sgmv.capi import ffi
from sgmv.testing import (CORRUPT, LoraCase, build_lora, check, expected_lora, lora_needs_bf16_dot,
                          make_lora_cases)
from conftest import DEVICE, HAS_GPU

L = capi.lib
DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.int32: 3, torch.int64: 4}
TABLE = json.loads((Path(__file__).resolve().parent.parent / "aot" / "tiles.json").read_text())
FEW_ROWS = TABLE["split"][2]  # shrink splits hidden for at most this many rows (API.md: 512)


def bits(t):
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def workspace(nbytes, device=DEVICE):
    """A float32 workspace of nbytes (rounded down to whole floats), poisoned with NaN so that a
    partial sum read before it is written shows up."""
    return torch.full((nbytes // 4,), float("nan"), dtype=torch.float32, device=device)


def workspace_for(out, device=DEVICE):
    """The workspace sgmv.shrink_workspace_bytes asks for this output."""
    return workspace(sgmv.shrink_workspace_bytes(out.shape[0], out.shape[1]), device)


def no_workspace(device=DEVICE):
    """An empty workspace: no split (a workspace too small only reduces the split)."""
    return workspace(0, device)


def plan_for(args, make=sgmv.jit.batch_plan):
    x, w, _, starts, lens, idx, batches, *_ = args
    w0 = w[0] if isinstance(w, (tuple, list)) else w
    return make(starts, lens, idx, batches, x.shape[0], w0.shape[0])


def call_args(op, args, kw):
    """sgmv_shrink_args_t or sgmv_expand_args_t of a call (op "shrink" or "expand"), filled here
    from the tensors (not by the binding), for the planner (sgmv_*_config)."""
    x, w, out, starts, lens, idx, batches, max_seq, last = args
    ws = list(w) if isinstance(w, (tuple, list)) else [w]
    a = ffi.new(f"sgmv_{op}_args_t *")
    getattr(L, f"sgmv_{op}_args_init")(a)
    ptr = lambda t: ffi.cast("void *", t.data_ptr())  # noqa: E731
    a.inputs, a.inputs_dtype, a.inputs_row_stride = ptr(x), DTYPE_CODES[x.dtype], x.stride(0)
    a.weights, a.weights_dtype = ptr(ws[0]), DTYPE_CODES[ws[0].dtype]
    a.weights_lora_stride, a.weights_row_stride = ws[0].stride(0), ws[0].stride(-2)
    a.output, a.output_dtype, a.output_row_stride = ptr(out), DTYPE_CODES[out.dtype], out.stride(0)
    a.total_tokens, a.num_loras = x.shape[0], ws[0].shape[0]
    a.seq_start, a.seq_len, a.lora_indices = ptr(starts), ptr(lens), ptr(idx)
    a.metadata_dtype, a.batches, a.max_seq_length = DTYPE_CODES[starts.dtype], batches, max_seq
    if op == "shrink":
        a.hidden, a.rank, a.scaling = x.shape[1], ws[0].shape[-2], last
    else:
        a.hidden, a.rank, a.add_inputs = ws[0].shape[-2], ws[0].shape[-1], last
    a.num_slices = len(ws)
    for s, t in enumerate(ws[1:]):
        a.slices[s].weights, a.slices[s].lora_stride = ptr(t), t.stride(0)
        a.slices[s].row_stride, a.slices[s].rows = t.stride(-2), t.shape[-2]
    for name in ("lora_ranks", "lora_scales"):
        if kw.get(name) is not None:
            setattr(a, name, ptr(kw[name]))
    if kw.get("batch_plan") is not None:
        a.batch_plan, a.batch_plan_bytes = ptr(kw["batch_plan"]), kw["batch_plan"].numel() * 4
    if kw.get("workspace") is not None and kw["workspace"].numel():
        a.workspace, a.workspace_bytes = ptr(kw["workspace"]), kw["workspace"].numel() * 4
    return a


def launch_config(op, args, kw, arch=90):
    """The planner's launch for the call."""
    c = ffi.new("sgmv_launch_config_t *")
    capi.check(getattr(L, f"sgmv_{op}_config")(call_args(op, args, kw), arch, c))
    return c


def split_of(args, kw):
    return launch_config("shrink", args, kw).split


class Prepared:
    """A case's fresh inputs, its poisoned output buffer and its float64 expectation, built once
    for every path run on it."""

    def __init__(self, case, device=DEVICE):
        self.case, self.device = case, device
        self.args, self.kw, self.buf = build_lora(case, device)
        self.before = self.buf.clone()
        self.exp, self.written, self.slack = expected_lora(case.op, self.args, self.kw)

    def run(self, fn, plan=None, workspace=None, what=None):
        """fn on the case from the poisoned buffer, checked; returns (worst error / tolerance, a
        copy of the buffer, the keyword arguments used). plan: a batch_plan function or None;
        workspace: None (the call's default), "split" (the size sgmv.shrink_workspace_bytes asks
        for) or "none" (empty: no split)."""
        self.buf.copy_(self.before)
        kw = dict(self.kw)
        if plan is not None:
            kw["batch_plan"] = plan_for(self.args, plan)
        if workspace == "split":
            kw["workspace"] = workspace_for(self.args[2], self.device)
        elif workspace == "none":
            kw["workspace"] = no_workspace(self.device)
        fn(*self.args, **kw)
        if self.device == "cuda":
            torch.cuda.synchronize()
        err = check(self.args, self.before, self.buf, self.exp, self.written, what or f"{fn.__module__} {self.case}",
                    self.slack)
        return err, self.buf.clone(), kw


def run(fn, case, device=DEVICE, plan=None, workspace=None, what=None):
    """Builds the case and runs fn on it, checked: (worst error / tolerance, buffer, args, kwargs)."""
    p = Prepared(case, device)
    err, buf, kw = p.run(fn, plan, workspace, what)
    return err, buf, p.args, kw


def aot_matches_jit(case, with_plan, workspace=None):
    """The case through the library (AOT) and the JIT on the GPU, each checked against the float64
    expectation, then against each other bit for bit (with an AOT-built plan for both, or none);
    returns the Prepared case and the AOT call's keyword arguments."""
    p = Prepared(case, "cuda")
    plan = sgmv.batch_plan if with_plan else None
    _, aot, kw = p.run(getattr(sgmv, f"sgmv_{case.op}"), plan, workspace, f"aot {case}")
    _, jit, _ = p.run(getattr(sgmv.jit, f"sgmv_{case.op}"), plan, workspace, f"jit {case}")
    diff = (bits(aot) != bits(jit)).nonzero()
    assert not len(diff), f"{case}: AOT and JIT differ in {len(diff)} elements, first at {diff[0].tolist()}"
    return p, kw


def skip_bf16_on_cpu(case):
    if not HAS_GPU and lora_needs_bf16_dot(case):
        pytest.skip("Triton's interpreter does not support bfloat16 tl.dot (triton issue 11584): GPU only")


CPU_CASES = [c for c in make_lora_cases(gpu=False) if c.op == "shrink"]  # GPU_CASES: the big ones

# Named corners, each poking one rule (fp16 unless said; hidden and rows kept small for the interpreter).
I32, I64 = torch.int32, torch.int64
CORNERS = [
    # One row; block_k wider than hidden; rank 64 over 3 slices of hidden 6.
    LoraCase("one-row", "shrink", 64, [6] * 3, [1], [0], 1, "fp16", I32, seed=1),
    # A 200-row segment beside decode rows, rank 1, int64 metadata, scaling.
    LoraCase("long-and-short", "shrink", 1, [42], [200, 1, 1, 0, 1], [1, 0, 1, 0, 2], 3, "fp16-fp32out", I64,
             scaling=0.75, seed=2),
    # Skipped: -1, an index past num_loras, zero length, a rank-0 and a negative-rank adapter; rows in
    # gaps and past the last segment; segments out of order.
    LoraCase("skips-and-gaps", "shrink", 16, [123, 123], [4, 3, 0, 5, 2, 6, 3], [0, -1, 1, 7, 2, 3, 1], 4,
             "fp16", I32, lora_ranks=[16, 9, 0, -3], starts=[30, 0, 5, 12, 3, 20, 40], total_tokens=48, seed=3),
    # Ranks above rank and partial, scales (one of them 0: its rows are written, as zeros).
    LoraCase("ranks-and-scales", "shrink", 24, [431], [3, 7, 1, 9], [2, 0, 1, 2], 3, "fp16-fp32out", I64,
             scaling=-0.5, lora_ranks=[30, 5, 1], lora_scales=[0.0, 1.5, -0.25], seed=4),
    # Strided inputs, a column-slice output, 4-D weights, three slices, lora_ranks longer than num_loras.
    LoraCase("views", "shrink", 8, [64] * 3, [5, 2, 6], [1, 0, 1], 2, "fp16", I64, lora_ranks=[8, 3],
             strided_inputs=True, out_slice=True, weights_4d=True, seed=5),
    # max_seq_length below the real longest segment: only the tile changes.
    LoraCase("max-seq-too-small", "shrink", 16, [128], [70, 2], [0, 1], 2, "fp16", I32, max_seq_length=1, seed=6),
]
CORNERS[4].lora_ranks = CORNERS[4].lora_ranks + [99, 99]  # >= num_loras entries: only the first are read


@pytest.mark.parametrize("case", CPU_CASES + CORNERS, ids=str)
def test_reference_matches_float64(case):
    run(sgmv.reference.sgmv_shrink, case, "cpu")


@pytest.mark.parametrize("case", CPU_CASES, ids=str)
def test_jit(case):
    skip_bf16_on_cpu(case)
    run(sgmv.jit.sgmv_shrink, case)


@pytest.mark.parametrize("case", CORNERS, ids=str)
def test_jit_corners(case):
    run(sgmv.jit.sgmv_shrink, case)


@pytest.mark.parametrize("with_plan", [False, True], ids=["no-plan", "plan"])
@pytest.mark.parametrize("case", CPU_CASES + CORNERS, ids=str)
def test_jit_split(case, with_plan):
    """With the workspace sgmv.shrink_workspace_bytes asks for: split where the planner likes."""
    skip_bf16_on_cpu(case)
    run(sgmv.jit.sgmv_shrink, case, plan=sgmv.jit.batch_plan if with_plan else None, workspace="split")


@pytest.mark.parametrize("case", CPU_CASES + CORNERS, ids=str)
def test_jit_with_a_plan(case):
    skip_bf16_on_cpu(case)
    run(sgmv.jit.sgmv_shrink, case, plan=sgmv.jit.batch_plan)


TILES = TABLE["tiles"]
SHRINK_TILES = sorted({r[2] for rules in ("shrink_rules", "shrink_grouped_rules") for arch in TABLE[rules].values()
                       for r in arch} | {"unaligned"})


@pytest.mark.parametrize("tile", SHRINK_TILES)
def test_jit_every_tile(tile):
    """Every tile shrink's rules may pick computes the same shrink, split too."""
    case = LoraCase("every-tile", "shrink", 24, [200] * 2, [9, 1, 0, 6, 1], [1, 0, 2, 1, -1], 3, "fp16-fp32out", I64,
                    scaling=0.5, lora_ranks=[24, 11, 0], lora_scales=[1.0, -0.5, 2.0], out_slice=True, seed=20)
    p = Prepared(case)
    for split in ("none", "split"):
        p.run(lambda *a, **kw: sgmv.jit.sgmv_shrink(*a, **kw, tile=tuple(TILES[tile])), workspace=split,
              what=f"tile {tile} workspace {split}")


@pytest.mark.parametrize("meta_dtype", [I32, I64], ids=str)
@pytest.mark.parametrize("name,starts,lens,idx", CORRUPT, ids=[c[0] for c in CORRUPT])
def test_corrupt_metadata_writes_nothing_outside_valid_rows(name, starts, lens, idx, meta_dtype):
    case = LoraCase(name, "shrink", 16, [96], lens, idx, 2, "fp16", meta_dtype, starts=starts, total_tokens=40,
                    max_seq_length=max(0, max(lens)), seed=600)
    run(sgmv.jit.sgmv_shrink, case)


# ---- split-K -------------------------------------------------------------------------------------

SPLIT = [  # few rows, long hidden: the planner splits hidden when given a workspace
    LoraCase("decode", "shrink", 16, [4096], [1, 1, 1], [0, 1, 0], 2, "fp16", I32, seed=10),
    LoraCase("qkv-ranks-scales", "shrink", 8, [2048] * 3, [2, 1], [1, 0], 2, "fp16-fp32out", I64, scaling=0.5,
             lora_ranks=[8, 5], lora_scales=[1.0, -2.0], seed=11),
]


@pytest.mark.parametrize("with_plan", [False, True], ids=["no-plan", "plan"])
@pytest.mark.parametrize("case", SPLIT, ids=str)
def test_split_k_is_within_tolerance_and_deterministic(case, with_plan):
    """With a workspace the planner splits (split > 1): the result is within tolerance, and the
    same call again, on a re-poisoned output and workspace, gives the same bits."""
    p = Prepared(case)
    plan = sgmv.jit.batch_plan if with_plan else None
    _, first, kw = p.run(sgmv.jit.sgmv_shrink, plan, "split")
    assert split_of(p.args, kw) > 1
    _, second, _ = p.run(sgmv.jit.sgmv_shrink, plan, "split")
    assert torch.equal(bits(first), bits(second)), "split-K shrink gave different bits for the same call"


def test_no_split_without_a_workspace():
    """The same call with an empty workspace: not split, and right too."""
    p = Prepared(SPLIT[0])
    _, _, kw = p.run(sgmv.jit.sgmv_shrink, workspace="none")
    assert split_of(p.args, kw) == 1


def test_a_smaller_workspace_only_reduces_the_split():
    case = SPLIT[0]
    args, kw, buf = build_lora(case, DEVICE)
    full = sgmv.shrink_workspace_bytes(args[2].shape[0], args[2].shape[1])
    splits = []
    for n in (full, full // 2, full // 4, 4, 0):
        kw["workspace"] = workspace(n)
        splits.append(split_of(args, kw))
    assert splits[0] > 1 and splits[-1] == 1 and splits == sorted(splits, reverse=True), splits
    # The middle size still computes the right thing.
    kw["workspace"] = workspace(full // 2)
    before = buf.clone()
    exp, written, slack = expected_lora("shrink", args, {k: v for k, v in kw.items() if k != "workspace"})
    sgmv.jit.sgmv_shrink(*args, **kw)
    check(args, before, buf, exp, written, "half workspace", slack)


def test_no_split_for_many_rows():
    """Above FEW_ROWS rows nothing splits, however large the workspace."""
    case = LoraCase("many-rows", "shrink", 16, [4096], [FEW_ROWS + 1], [0], 1, "fp16", I32, seed=12)
    args, kw, _ = build_lora(case, "cpu")
    kw["workspace"] = torch.empty(1 << 22, dtype=torch.float32)
    assert split_of(args, kw) == 1


def test_workspace_bytes_python_matches_c():
    for t, c in ((1, 16), (4, 48), (64, 192), (512, 768), (513, 16), (8192, 64)):
        assert sgmv.shrink_workspace_bytes(t, c) == L.sgmv_shrink_workspace_bytes(t, c)


# ---- on a GPU: the library against the JIT, bit for bit --------------------------------------------

GPU_CASES = [c for c in make_lora_cases(gpu=True) if c.op == "shrink"]


@pytest.mark.gpu
@pytest.mark.parametrize("split", ["split", "none"])
@pytest.mark.parametrize("with_plan", [False, True], ids=["no-plan", "plan"])
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_aot_matches_jit_bitwise_and_float64(case, with_plan, split):
    """sgmv.sgmv_shrink and sgmv.jit.sgmv_shrink launch the planner's choice alike: the same bits,
    both within tolerance, split or not, with a plan or not (AOT-built plan for both)."""
    p, kw = aot_matches_jit(case, with_plan, split)
    if split == "none":
        assert split_of(p.args, kw) == 1


@pytest.mark.gpu
def test_default_workspace_is_allocated_and_splits_like_an_explicit_one():
    """workspace=None with torch tensors: the binding allocates one, so decode splits as with an
    explicit workspace of shrink_workspace_bytes: the same bits."""
    p = Prepared(SPLIT[0], "cuda")
    _, explicit, kw = p.run(sgmv.sgmv_shrink, workspace="split")
    assert split_of(p.args, kw) > 1
    _, default, _ = p.run(sgmv.sgmv_shrink)
    assert torch.equal(bits(explicit), bits(default))


@pytest.mark.gpu
def test_lora_step_in_a_cuda_graph_with_changing_metadata():
    """A step as a server runs it: plan, shrink (3 slices, per-adapter ranks and scales, split-K
    into a preallocated workspace) and fused-slice expand captured once, replayed after the
    metadata change in place; each replay is checked against float64."""
    T, H, R, La, B = 64, 2048, 16, 4, 24
    outs_h = [512, 256, 256]
    g = torch.Generator().manual_seed(9)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16).cuda()
    wa = tuple((torch.randn(La, R, H, generator=g) / H ** 0.5).to(torch.bfloat16).cuda() for _ in outs_h)
    wb = tuple((torch.randn(La, h, R, generator=g) / R ** 0.5).to(torch.bfloat16).cuda() for h in outs_h)
    ranks = torch.tensor([16, 8, 0, 3], dtype=torch.int32, device="cuda")
    scales = torch.tensor([1.0, 0.5, 2.0, -1.0], dtype=torch.float32, device="cuda")
    y = torch.empty(T, 3 * R, dtype=torch.float32, device="cuda")
    out = torch.empty(T, sum(outs_h), dtype=torch.bfloat16, device="cuda")
    starts, lens, idx = (torch.zeros(B, dtype=torch.int32, device="cuda") for _ in range(3))
    plan = torch.empty(sgmv.batch_plan_bytes(B, T) // 4, dtype=torch.int32, device="cuda")
    ws = torch.empty(sgmv.shrink_workspace_bytes(T, 3 * R) // 4, dtype=torch.float32, device="cuda")
    assert ws.numel() > 0
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        sgmv.batch_plan(starts, lens, idx, B, T, La, out=plan)
        sgmv.sgmv_shrink(x, wa, y, starts, lens, idx, B, 4, 0.5, lora_ranks=ranks, lora_scales=scales,
                         batch_plan=plan, workspace=ws)
        sgmv.sgmv_expand(y, wb, out, starts, lens, idx, B, 4, add_inputs=True, batch_plan=plan, lora_ranks=ranks)
    rng = torch.Generator().manual_seed(4)
    for step in range(4):
        n = torch.randint(0, 5, (B,), generator=rng)
        n[n.cumsum(0) > T] = 0
        st = torch.cat([torch.zeros(1, dtype=torch.long), n.cumsum(0)[:-1]])
        ix = torch.randint(-1, La + 1, (B,), generator=rng)
        starts.copy_(st), lens.copy_(n), idx.copy_(ix)
        y.fill_(float("nan"))
        out.copy_(torch.randn(T, sum(outs_h), generator=rng).to(torch.bfloat16))
        out0 = out.clone()
        graph.replay()
        torch.cuda.synchronize()
        meta = (st.int(), n.int(), ix.int())
        ys, yw, yslack = expected_lora("shrink", (x, wa, y, *meta, B, 4, 0.5), dict(lora_ranks=ranks,
                                                                                   lora_scales=scales))
        check((x, wa, y), torch.full_like(y, float("nan")), y, ys, yw, f"graph step {step} shrink", yslack)
        # Expand from the shrink's own (checked) output: the columns past an adapter's rank are NaN.
        oe, ow, _ = expected_lora("expand", (y, wb, out0, *meta, B, 4, True), dict(lora_ranks=ranks))
        check((y, wb, out), out0, out, oe, ow, f"graph step {step} expand")
