"""Randomized SGMV cases, their float64 expectation, and the check every path must pass
(used by tests/ and by `sgmv check`; needs torch).

Each case draws fresh inputs from its own seed. Outputs start poisoned (NaN, or random data when
add_inputs is on, so the old value matters). Every element a segment writes must lie within
atol + rtol * |expected| of the float64 result (TOL, per output dtype); every other element of the
buffer (rows no segment may write, the columns around a column-slice output view) must come back
bit for bit unchanged. A failure raises CheckFailed, never `assert` (`sgmv check` runs this code,
and python -O would strip asserts).
"""
import dataclasses
import importlib.metadata
import itertools
import random
import sys

import torch

from . import binding, capi

RANKS = (1, 7, 8, 16, 24, 64, 128, 256)
HIDDENS = (1, 64, 4096, 4097)
LAYOUTS = ("uniform", "zipf", "skewed", "decode")
# The four dtype patterns the library serves, for each weights dtype w: (w, w, w), (fp32, w, w),
# (w, w, fp32), (fp32, w, fp32), as (name, inputs is fp32, output is fp32).
_PATTERNS = (("{w}", False, False), ("fp32in-{w}", True, False), ("{w}-fp32out", False, True),
             ("fp32in-{w}-fp32out", True, True))
_WEIGHTS = {"fp16": torch.float16, "bf16": torch.bfloat16}
DTYPES = {  # name: (inputs, weights, output)
    p.format(w=wn): (torch.float32 if x32 else wd, wd, torch.float32 if o32 else wd)
    for wn, wd in _WEIGHTS.items() for p, x32, o32 in _PATTERNS
}

# fp8 weights (e4m3, torch.float8_e4m3fn, with float32 scales) take fp16 or bf16 inputs and write
# that dtype or fp32; the expectation multiplies the dequantized weights (stored value times scale,
# in float64): the kernel's products of fp8 and 16-bit values are exact in fp32 as well, and its one
# more rounding (the fp32 sum times the scale) lies within the fp32 budget below.
FP8 = torch.float8_e4m3fn
FP8_DTYPES = {f"fp8-{a}{o}": (ad, FP8, torch.float32 if o else ad)
              for a, ad in (("fp16", torch.float16), ("bf16", torch.bfloat16)) for o in ("", "-fp32out")}
_ALL_DTYPES = {**DTYPES, **FP8_DTYPES}

# Tolerances, (atol, rtol) by output dtype: |got - expected| <= atol + rtol * |expected|, element
# by element. The expectation is exact (float64 products of the operands after the kernel's own
# rounding of fp32 inputs to the weights' dtype: fp16 x fp16 and bf16 x bf16 products are exact in
# fp32), so only two errors remain:
#  - fp32 accumulation of <= 256 products and the old output value. The data are unit scale
#    (x ~ N(0, 1), weights ~ N(0, 1/rank), old output ~ N(0, 1)), so a row's sum of |terms| stays
#    below about 16 and the accumulated error, a few fp32 ulps (eps 1.2e-7) of that sum, well below
#    1e-5 in absolute terms; 1e-5 relative covers large results. This is the whole fp32 budget.
#  - one final rounding to the output dtype: at most half an ulp, eps/2 * |v|. The allowance is a
#    whole eps: the other half covers the accumulated error moving v across a rounding boundary.
#    fp16: eps 2^-10 = 9.8e-4 (subnormals below 6.1e-5 round by at most 3e-8, within atol);
#    bf16: eps 2^-7 = 7.8e-3.
# The 16-bit atol is twice fp32's, since the final rounding of a near-zero v adds up to half of v's
# own error again (|round(v) - ref| <= u |v| + |v - ref|).
_FP32_ATOL, _FP32_RTOL = 1e-5, 1e-5
TOL = {
    torch.float32: (_FP32_ATOL, _FP32_RTOL),
    torch.float16: (2 * _FP32_ATOL, _FP32_RTOL + 2.0**-10),
    torch.bfloat16: (2 * _FP32_ATOL, _FP32_RTOL + 2.0**-7),
}


class CheckFailed(Exception):
    """A path's output is wrong: check() raises it (explicitly, never by `assert`) naming the first
    bad element and the count; `sgmv check` catches it."""


@dataclasses.dataclass
class Case:
    name: str  # the shape or corner; str(case), the test id, adds the dtypes
    rank: int
    hidden: int
    lens: list
    idx: list
    num_loras: int
    dtypes: str
    meta_dtype: torch.dtype
    add_inputs: bool
    out_slice: bool = False  # output is a column slice of a wider buffer
    starts: list = None  # default: back to back
    max_seq_length: int = None  # default: max(lens)
    total_tokens: int = None  # default: sum(lens)
    seed: int = 0

    def __str__(self):
        return f"{self.dtypes}-{self.name}"


def _lens(layout, rng, gpu):
    """Segment lengths. Under the interpreter (gpu False) segments are shorter and fewer: its cost
    grows with the grid, segments x row tiles x column tiles (65 of them at hidden 4097)."""
    scale = 4 if gpu else 1
    if layout == "uniform":
        lens = [rng.randint(1, 8) * scale] * rng.randint(2, 4)
    elif layout == "zipf":
        lens = [max(1, int(scale * 24 / (r + 1) ** 1.2)) for r in range(rng.randint(3, 6))]
        rng.shuffle(lens)
    elif layout == "skewed":
        lens = [40 * scale] + [1] * (rng.randint(4, 9) if gpu else rng.randint(2, 4))
    else:  # decode
        lens = [1] * (rng.randint(32, 132) if gpu else rng.randint(3, 8))
    # Zero-length segments are legal and must touch nothing.
    for _ in range(rng.randint(0, 2)):
        lens.insert(rng.randrange(len(lens) + 1), 0)
    return lens


def _indices(n, num_loras, rng):
    idx = [rng.randrange(num_loras) for _ in range(n)]
    # -1 (no adapter), the last adapter and out-of-range indices, all in every case of 3+ segments.
    for i, v in zip(rng.sample(range(n), min(n, 3)), (-1, num_loras - 1, num_loras + rng.randint(0, 3))):
        idx[i] = v
    return idx


def _shapes(gpu):
    """(rank, hidden, layout, dtype names). On the GPU: every rank x hidden x layout, each in every
    dtype combination. Under the interpreter (CPU), whose cost is per program, a Latin square: each
    rank meets each hidden once, and every layout meets every rank once and every hidden twice; each
    shape runs in one dtype pattern for fp16 weights and the same pattern for bf16 weights (only the
    reference path runs bf16 there: the interpreter has no bf16 dot), the pattern rotating so that
    every layout meets all eight combinations, and every rank all four patterns."""
    if gpu:
        for rank, hidden, layout in itertools.product(RANKS, HIDDENS, LAYOUTS):
            yield rank, hidden, layout, list(DTYPES)
        return
    # Hidden of rank i in layout l: HIDDENS[(i + shift[l]) % 4]. The shifts, all different, make the
    # square; these ones give the big hiddens of decode and skewed, the dearest grids under the
    # interpreter, to small ranks (fewer K steps).
    shift = {"uniform": 0, "zipf": 3, "skewed": 1, "decode": 2}
    for l, layout in enumerate(LAYOUTS):
        for i, rank in enumerate(RANKS):
            pattern = _PATTERNS[(i // 2 + l) % len(_PATTERNS)][0]
            yield rank, HIDDENS[(i + shift[layout]) % len(HIDDENS)], layout, [pattern.format(w=w) for w in _WEIGHTS]


def make_cases(gpu):
    """The randomized suite, shapes crossed with dtypes (see _shapes), then the named corners.
    Metadata dtype, add_inputs and column-slice outputs rotate over the shapes; every dtype of a
    shape shares its segments, and each case draws its own data. On the GPU segments are longer."""
    rng = random.Random(20261124)
    cases = []
    for n, (rank, hidden, layout, dtypes) in enumerate(_shapes(gpu)):
        lens = _lens(layout, rng, gpu)
        num_loras = rng.randint(1, 4)
        idx = _indices(len(lens), num_loras, rng)
        for dt in dtypes:
            cases.append(Case(
                name=f"r{rank}-h{hidden}-{layout}", rank=rank, hidden=hidden, lens=lens, idx=idx,
                num_loras=num_loras, dtypes=dt, meta_dtype=(torch.int32, torch.int64)[n % 2],
                add_inputs=n % 3 != 0, out_slice=n % 5 == 2, seed=10000 + len(cases)))
    # Named corners.
    cases += [
        Case("one-token", 16, 64, [1], [0], 1, "fp16", torch.int32, True, seed=100),
        Case("all-skipped", 8, 64, [5, 3], [-1, 7], 2, "fp16", torch.int64, False, seed=101),
        Case("max-seq-length-too-small", 16, 128, [50, 3], [0, 1], 2, "fp16", torch.int32, True,
             max_seq_length=1, seed=102),
        Case("max-seq-length-lies-by-segment", 16, 128, [50, 3], [1, 0], 2, "fp16", torch.int64, True,
             max_seq_length=16, seed=108),
        Case("gaps-and-order", 24, 96, [6, 4, 5], [1, 0, 1], 2, "fp32in-fp16", torch.int64, True,
             starts=[20, 2, 10], total_tokens=30, seed=103),
        Case("many-segments", 8, 64, [1] * 300, None, 3, "fp16", torch.int32, False, seed=104),
        Case("slice", 64, 200, [7, 9], [1, 0], 2, "fp16-fp32out", torch.int64, True, out_slice=True, seed=105),
        Case("basic", 16, 256, [9, 1, 4], [0, 1, 0], 2, "bf16", torch.int32, True, seed=106),
        Case("odd-hidden", 7, 4097, [3, 5], [1, 0], 2, "fp32in-bf16", torch.int64, False, seed=107),
    ]
    for c in cases:
        if c.idx is None:
            c.idx = _indices(len(c.lens), c.num_loras, random.Random(c.seed))
    return cases


# Metadata that lies, as (name, starts, lens, idx) over 40 tokens: only the rows of the valid
# parts of valid segments may change (kernels/sgmv.py clips and skips the rest).
CORRUPT = [
    ("negative-lengths", [0, 10, 20], [10, -5, 7], [0, 1, 0]),
    ("negative-starts", [-4, 10, 20], [10, 5, 7], [0, 1, 0]),
    ("past-the-end", [0, 30, 1000000], [10, 100, 5], [1, 0, 1]),
    ("huge-values", [0, 2**30, 20], [10, 5, 2**30], [0, 1, 1]),
    ("bad-indices", [0, 10, 20], [10, 10, 10], [-7, 2, 1 << 30]),
]


def corrupt_case(name, starts, lens, idx, meta_dtype, dtypes):
    return Case(name, 16, 512, lens, idx, 2, dtypes, meta_dtype, True, starts=starts, total_tokens=40,
                max_seq_length=max(0, max(lens)), seed=600)


def needs_bf16_dot(case):
    return DTYPES[case.dtypes][1] == torch.bfloat16


def build(case, device):
    """Fresh inputs for a case: (args for sgmv_expand, the whole output buffer)."""
    g = torch.Generator().manual_seed(case.seed * 7919 + 1)
    xd, wd, od = DTYPES[case.dtypes]
    starts = case.starts
    if starts is None:
        starts = [sum(case.lens[:i]) for i in range(len(case.lens))]
    total = case.total_tokens if case.total_tokens is not None else sum(case.lens)
    x = torch.randn(total, case.rank, generator=g).to(xd)
    w = (torch.randn(case.num_loras, case.hidden, case.rank, generator=g) / case.rank ** 0.5).to(wd)
    pad = 5 if case.out_slice else 0
    if case.add_inputs:
        buf = torch.randn(total, case.hidden + 2 * pad, generator=g).to(od)
    else:
        buf = torch.full((total, case.hidden + 2 * pad), float("nan"), dtype=od)
    meta = [torch.tensor(v, dtype=case.meta_dtype) for v in (starts, case.lens, case.idx)]
    x, w, buf = x.to(device), w.to(device), buf.to(device)
    meta = [m.to(device) for m in meta]
    out = buf[:, pad:pad + case.hidden] if pad else buf
    max_seq = case.max_seq_length if case.max_seq_length is not None else max(case.lens, default=0)
    return (x, w, out, *meta, len(case.lens), max_seq, case.add_inputs), buf


def expected(args):
    """The float64 result and the mask of rows any segment writes, computed independently."""
    x, w, out, starts, lens, idx, batches, _, add = args
    exp = out.detach().cpu().double().clone()
    written = torch.zeros(out.shape[0], dtype=torch.bool)
    wd = w.dtype
    for s, n, i in zip(starts.tolist()[:batches], lens.tolist()[:batches], idx.tolist()[:batches]):
        e = min(s + n, out.shape[0])
        if 0 <= i < w.shape[0] and s >= 0 and e > s:
            prod = x[s:e].cpu().to(wd).double() @ w[i].cpu().double().T
            exp[s:e] = prod + (exp[s:e] if add else 0)
            written[s:e] = True
    return exp, written


# ---- shrink, fused slices and per-adapter ranks and scales -----------------------------------

# Shrink's inputs are the weights' dtype; its output is that dtype or fp32.
SHRINK_DTYPES = ("fp16", "fp16-fp32out", "bf16", "bf16-fp32out")
# Shrink sums `hidden` products (thousands), not <= 256: the fp32 budget above does not cover it.
# Each fp32 addition errs by at most 2^-24 of a partial sum, itself at most the sum of the
# products' magnitudes S = sum_k |x_k a_k|; these sums err like a random walk of a few ulps of S
# (about 1e-6 of S at hidden 4096), so 2^-18 * S (4e-6 S: 64 ulps of S) leaves room for the
# blocking and the split-K partials while still failing one missing or doubled product block.
_SHRINK_SLACK = 2.0**-18


@dataclasses.dataclass
class LoraCase:
    """A shrink or a (fused-slice) expand call. hiddens: one entry per slice: expand, each slice's
    output columns; shrink, the inputs' width (all equal). Shrink writes num_slices * rank
    columns, expand reads them."""
    name: str
    op: str  # "shrink" or "expand"
    rank: int
    hiddens: list
    lens: list
    idx: list
    num_loras: int
    dtypes: str
    meta_dtype: torch.dtype
    add_inputs: bool = False  # expand
    scaling: float = 1.0  # shrink
    lora_ranks: list = None  # per adapter (may be 0, negative or > rank), or None
    lora_scales: list = None  # shrink, per adapter, or None
    out_slice: bool = False  # output is a column slice of a wider buffer
    strided_inputs: bool = False  # inputs are a column slice of a wider buffer
    weights_4d: bool = False  # (num_loras, 1, rows, cols) weights
    weight_scales: str = None  # fp8 weights: "adapter" (one scale each) or "channel" (one per output channel)
    starts: list = None
    max_seq_length: int = None
    total_tokens: int = None
    seed: int = 0

    def __str__(self):
        return f"{self.op}-{self.dtypes}-{self.name}"


def _lora_ranks(rank, num_loras, lens, idx, rng):
    """Ranks per adapter, every kind: full, larger than rank, partial, 1, 0 (skipped), negative
    (skipped); the adapter of the longest segment gets a partial rank, so something is written."""
    kinds = [rank, rank + 3, max(1, rank // 2), 1, 0, -2]
    ranks = [rng.choice(kinds) for _ in range(num_loras)]
    longest = max((n, a) for n, a in zip(lens, idx) if 0 <= a < num_loras)[1]
    ranks[longest] = max(1, (rank + 1) // 2)
    return ranks


def _lora_scales(num_loras, rng):
    return [round(rng.uniform(-2, 2), 3) for _ in range(num_loras)]


# Shapes of the suite. Shrink: (rank, hidden, slices); expand: (rank, slice hiddens). On the GPU
# the model shapes too (QKV of an 8B model, gate/up, hidden 4096 and 14336).
_SHRINK_CPU = [(16, 6, 1), (7, 42, 2), (64, 123, 3), (1, 431, 1), (33, 4096, 2), (16, 4096, 1), (64, 431, 3),
               (8, 4096, 3), (24, 42, 1), (1, 123, 2)]
_SHRINK_GPU = [(r, h, s) for r in (1, 8, 16, 24, 64, 128, 256) for h, s in
               ((6, 1), (123, 3), (431, 2), (4096, 3), (4097, 1), (14336, 1), (4096, 2))]
_EXPAND_CPU = [(16, [96, 40]), (7, [128, 40, 24]), (64, [6, 123, 64]), (1, [200]), (24, [64, 64]),
               (33, [431, 8]), (8, [64, 32, 32]), (16, [4096])]
_EXPAND_GPU = [(r, hs) for r in (1, 8, 16, 24, 64, 128, 256) for hs in
               ([4096], [4096, 1024, 1024], [14336, 14336], [6, 123, 431], [4097, 64], [64, 4096, 8])]


def make_lora_cases(gpu):
    """Shrink and fused-slice expand cases: each shape in two dtype patterns (one per weights
    dtype), with the layout, metadata dtype, per-adapter ranks, scales, add_inputs and strided
    views rotating over the shapes; fresh data per case. Under the interpreter (gpu False), a few
    small shapes (its cost grows with grid x hidden)."""
    rng = random.Random(20261125)
    cases = []
    shrink = _SHRINK_GPU if gpu else _SHRINK_CPU
    expand = _EXPAND_GPU if gpu else _EXPAND_CPU
    for n, shape in enumerate([("shrink",) + s for s in shrink] + [("expand",) + s for s in expand]):
        op, rank = shape[0], shape[1]
        layout = LAYOUTS[n % len(LAYOUTS)]
        lens = _lens(layout, rng, gpu)
        num_loras = rng.randint(1, 4)
        idx = _indices(len(lens), num_loras, rng)
        if not any(n and 0 <= a < num_loras for n, a in zip(lens, idx)):  # something to write
            idx[lens.index(max(lens))] = 0
        if op == "shrink":
            hiddens = [shape[2]] * shape[3]
            patterns = [SHRINK_DTYPES[n % 2], SHRINK_DTYPES[2 + n % 2]]
        else:
            hiddens = shape[2]
            p = _PATTERNS[n % len(_PATTERNS)][0]
            patterns = [p.format(w=w) for w in _WEIGHTS]
        ranks = _lora_ranks(rank, num_loras, lens, idx, rng) if n % 3 != 1 else None
        scales = _lora_scales(num_loras, rng) if op == "shrink" and n % 2 == 0 else None
        for dt in patterns:
            cases.append(LoraCase(
                name=f"r{rank}-h{'+'.join(map(str, hiddens))}-{layout}{'-ranks' if ranks else ''}"
                     f"{'-scales' if scales else ''}",
                op=op, rank=rank, hiddens=hiddens, lens=lens, idx=idx, num_loras=num_loras, dtypes=dt,
                meta_dtype=(torch.int32, torch.int64)[n % 2], add_inputs=op == "expand" and n % 3 != 0,
                scaling=(1.0, 0.5, -1.25)[n % 3] if op == "shrink" else 1.0, lora_ranks=ranks,
                lora_scales=scales, out_slice=n % 4 == 2, strided_inputs=n % 5 == 3, weights_4d=n % 7 == 4,
                seed=30000 + len(cases)))
    return cases


# fp8 weights in `sgmv check`: a shrink with per-channel scales and fused slices, an expand with
# per-adapter scales and ranks (tests/test_fp8.py has the suite).
FP8_CHECK_CASES = [
    LoraCase("qkv-channel-scales", "shrink", 16, [96] * 3, [4, 1, 1, 6], [0, 1, 2, 1], 3, "fp8-fp16", torch.int32,
             scaling=0.5, weight_scales="channel", seed=501),
    LoraCase("ranks-adapter-scales", "expand", 32, [128, 64], [1, 1, 5, 1], [1, 0, 1, -1], 2, "fp8-fp16-fp32out",
             torch.int64, add_inputs=True, lora_ranks=[32, 9], weight_scales="adapter", seed=502),
]


def lora_needs_bf16_dot(case):
    x, w, _ = _ALL_DTYPES[case.dtypes]
    return torch.bfloat16 in (x, w)


def quantize_fp8(w, per, g):
    """fp8 weights and their float32 scales for a float weight stack (num_loras, rows, cols): per
    "adapter" a scale of shape (num_loras,), per "channel" (num_loras, rows); each maps the largest
    |w| it covers to between 224 and 448 (random), so that no value saturates."""
    L = w.shape[0]
    amax = w.abs().amax(dim=2) if per == "channel" else w.abs().reshape(L, -1).amax(dim=1)
    scale = ((amax / 448) * (1 + torch.rand(amax.shape, generator=g))).clamp_min(2.0 ** -20).float()
    q = (w / (scale[:, :, None] if per == "channel" else scale[:, None, None])).to(FP8)
    return q, scale


def dequantized(weights, weight_scales):
    """float64 weight stacks (num_loras, rows, cols) of a call: fp8 ones times their scales."""
    ws = [w.cpu().double() for w in (weights if isinstance(weights, (tuple, list)) else (weights,))]
    ws = [w.reshape(w.shape[0], w.shape[-2], w.shape[-1]) for w in ws]
    if weight_scales is None:
        return ws
    scs = weight_scales if isinstance(weight_scales, (tuple, list)) else (weight_scales,)
    return [w * sc.cpu().double().reshape(w.shape[0], -1)[:, :, None] for w, sc in zip(ws, scs)]


def build_lora(case, device):
    """Fresh inputs for a LoraCase: (positional args of sgmv_shrink / sgmv_expand, keyword args
    (lora_ranks, lora_scales), the whole output buffer). Weights are one tensor for one slice, a
    tuple for several. With per-adapter ranks, the inputs columns an expand must not read (past
    its adapter's rank, in each slice) hold NaN."""
    g = torch.Generator().manual_seed(case.seed * 7919 + 3)
    xd, wd, od = _ALL_DTYPES[case.dtypes]
    starts = case.starts if case.starts is not None else [sum(case.lens[:i]) for i in range(len(case.lens))]
    total = case.total_tokens if case.total_tokens is not None else sum(case.lens)
    S, R, L = len(case.hiddens), case.rank, case.num_loras
    shrink = case.op == "shrink"
    k = case.hiddens[0] if shrink else S * R  # inputs columns
    x = torch.randn(total, k + (3 if case.strided_inputs else 0), generator=g)
    if not shrink and case.lora_ranks is not None:
        for s0, n, i in zip(starts, case.lens, case.idx):
            if 0 <= i < L and case.lora_ranks[i] < R:
                for s in range(S):
                    x[max(s0, 0):max(s0 + n, 0), s * R + max(case.lora_ranks[i], 0):(s + 1) * R] = float("nan")
    x = x.to(xd)[:, :k]
    if shrink:  # (L, rank, hidden), unit-scale results
        ws = [torch.randn(L, R, case.hiddens[0], generator=g) / case.hiddens[0] ** 0.5 for _ in range(S)]
    else:
        ws = [torch.randn(L, h, R, generator=g) / R ** 0.5 for h in case.hiddens]
    scales = None
    if wd == FP8:
        qs = [quantize_fp8(w, case.weight_scales or "channel", g) for w in ws]
        ws, scales = [q for q, _ in qs], [sc.to(device) for _, sc in qs]
    ws = [w.to(wd).to(device) for w in ws]
    if case.weights_4d:
        ws = [w.unsqueeze(1) for w in ws]
    cols = S * R if shrink else sum(case.hiddens)
    pad = 5 if case.out_slice else 0
    if case.add_inputs:
        buf = torch.randn(total, cols + 2 * pad, generator=g).to(od)
    else:
        buf = torch.full((total, cols + 2 * pad), float("nan"), dtype=od)
    buf = buf.to(device)
    out = buf[:, pad:pad + cols] if pad else buf
    meta = [torch.tensor(v, dtype=case.meta_dtype, device=device) for v in (starts, case.lens, case.idx)]
    max_seq = case.max_seq_length if case.max_seq_length is not None else max(case.lens, default=0)
    weights = ws[0] if S == 1 else tuple(ws)
    last = case.scaling if shrink else case.add_inputs
    kw = {}
    if case.lora_ranks is not None:
        kw["lora_ranks"] = torch.tensor(case.lora_ranks, dtype=torch.int32, device=device)
    if case.lora_scales is not None:
        kw["lora_scales"] = torch.tensor(case.lora_scales, dtype=torch.float32, device=device)
    if scales is not None:
        kw["weight_scales"] = scales[0] if S == 1 else tuple(scales)
    return (x.to(device), weights, out, *meta, len(case.lens), max_seq, last), kw, buf


def expected_lora(op, args, kw):
    """(float64 result, mask of the elements written, slack or None), computed independently of
    the library from the call's own tensors. Shrink: scaling and lora_scales are the fp32 values
    the kernel multiplies by; slack is _SHRINK_SLACK * |scale| * sum_k |x_k a_k| per element."""
    x, weights, out, starts, lens, idx, batches, _, last = args
    ws = dequantized(weights, kw.get("weight_scales"))
    fp8 = _weights_dtype(weights) == FP8
    L, R = ws[0].shape[0], ws[0].shape[1] if op == "shrink" else ws[0].shape[2]
    ranks = kw.get("lora_ranks")
    ranks = ranks.tolist()[:L] if ranks is not None else [R] * L
    scales = kw.get("lora_scales")
    scales = scales.double().tolist()[:L] if scales is not None else [1.0] * L
    T = out.shape[0]
    exp = out.detach().cpu().double().clone()
    written = torch.zeros(out.shape, dtype=torch.bool)
    slack = torch.zeros(out.shape, dtype=torch.float64) if op == "shrink" else None
    xc = x.cpu()
    for s0, n, a in zip(starts.tolist()[:batches], lens.tolist()[:batches], idx.tolist()[:batches]):
        e = min(s0 + n, T)
        if not (0 <= a < L) or s0 < 0 or e <= s0 or ranks[a] <= 0:
            continue
        r = min(ranks[a], R)
        if op == "shrink":
            scale = torch.tensor(last, dtype=torch.float32).double().item() * scales[a]
            xs = xc[s0:e].double()
            for s, w in enumerate(ws):
                c = slice(s * R, s * R + r)
                exp[s0:e, c] = scale * (xs @ w[a, :r].T)
                slack[s0:e, c] = _SHRINK_SLACK * abs(scale) * (xs.abs() @ w[a, :r].abs().T)
                written[s0:e, c] = True
        else:
            # fp32 inputs: rounded first, as the kernel does (fp8 weights: 16-bit inputs, as they are)
            xs = xc[s0:e].double() if fp8 else xc[s0:e].to(_weights_dtype(weights)).double()
            col = 0
            for s, w in enumerate(ws):
                h = w.shape[1]
                prod = xs[:, s * R:s * R + r] @ w[a, :, :r].T
                exp[s0:e, col:col + h] = prod + (exp[s0:e, col:col + h] if last else 0)
                written[s0:e, col:col + h] = True
                col += h
    return exp, written, slack


def _weights_dtype(weights):
    return (weights[0] if isinstance(weights, (tuple, list)) else weights).dtype


def check(args, buf_before, buf_after, exp, written, what, slack=None):
    """Raises CheckFailed unless every written element of the output view lies within TOL of the
    float64 result `exp` and every other element of the buffer is bitwise unchanged. `written`
    masks rows (1-D) or elements (2-D: per-adapter ranks leave columns of a written row alone);
    `slack`, if given, adds a per-element allowance to atol (shrink's long sums, see
    expected_lora). Returns the worst written element's error as a fraction of its tolerance
    (below 1; 0.0 when nothing is written)."""
    out = args[2]
    before, after = buf_before.cpu(), buf_after.cpu()
    pad = (after.shape[1] - out.shape[1]) // 2
    cols = slice(pad, pad + out.shape[1])
    # Bitwise: elements no segment writes, and the columns outside the view.
    untouched = before.clone()
    untouched[:, cols][written] = after[:, cols][written]
    changed = _bits(untouched) != _bits(after)
    if bool(changed.any()):
        r, c = _first(changed)
        raise CheckFailed(f"{what}: {int(changed.sum())} elements outside the written part changed; first at "
                          f"buffer ({r}, {c}){_where(written, r, c, cols)}: {after[r, c].item()!r}, was "
                          f"{before[r, c].item()!r}")
    if not bool(written.any()):
        return 0.0
    if written.dim() == 1:
        rows = written.nonzero()[:, 0]
        got, e = after[:, cols][rows].double(), exp[rows]
        mask = torch.ones_like(got, dtype=torch.bool)
        slack = None if slack is None else slack[rows]
    else:
        rows = torch.arange(out.shape[0])
        got, e, mask = after[:, cols].double(), exp, written
    atol, rtol = TOL[out.dtype]
    tol = atol + rtol * e.abs() + (0 if slack is None else slack)
    err = (got - e).abs()
    bad = ~(err <= tol) & mask  # NaN and inf fail here
    if bool(bad.any()):
        nonfinite = ~torch.isfinite(got) & mask  # named first: unwritten poison (NaN) shows up here
        i, c = _first(nonfinite if bool(nonfinite.any()) else bad)
        raise CheckFailed(f"{what}: {int(bad.sum())} of {int(mask.sum())} written elements wrong, "
                          f"{int(nonfinite.sum())} of them non-finite (allowed: |got - expected| <= {atol:g} + "
                          f"{rtol:.3g} * |expected|{'' if slack is None else ' + slack'} for {_name(out.dtype)}); "
                          f"first at output ({int(rows[i])}, {c}): got {got[i, c].item()!r}, expected "
                          f"{e[i, c].item()!r}, tolerance {tol[i, c].item():.3g}")
    return (err / tol)[mask].max().item()


def _first(mask):
    return tuple(int(v) for v in mask.nonzero()[0])


def _where(written, r, c, cols):
    if c < cols.start or c >= cols.stop:
        return ", a column outside the output view"
    if not bool(written[r].any()):
        return ", a row no segment writes"
    return ", a column past its adapter's rank" if written.dim() == 2 else ""


def _name(dtype):
    return str(dtype).replace("torch.", "")


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def triton_versions():
    """(the version of the triton the JIT path uses, or None if none is installed; the version
    that compiled libsgmv.so's cubins, or None if the library does not record it)."""
    triton = sys.modules.get("triton")
    jit = getattr(triton, "__version__", None)
    if jit is None:
        try:
            jit = importlib.metadata.version("triton")
        except importlib.metadata.PackageNotFoundError:
            jit = None
    return jit, capi.build_info()["triton"]


def jit_matches_build():
    """True when the JIT path's triton is the one that compiled libsgmv.so's cubins: AOT and JIT
    results must then be bit for bit equal. Otherwise (another triton, or a library that does
    not say which compiled it) each is only held to the tolerance against the float64 result."""
    jit, build = triton_versions()
    return jit is not None and jit == build


def bitwise_equal(a, b):
    """True when two tensors of one shape and dtype hold the same bits (NaNs included)."""
    return a.shape == b.shape and a.dtype == b.dtype and bool((_bits(a) == _bits(b)).all())


# ---- the layer call (sgmv.Layer, sgmv.Step) --------------------------------------------------------
# The intermediate is kept in the weights' dtype (as the library documents), so the float64
# expectation allows one rounding of each intermediate element (`slack`).

_LAYER_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# One rounding of an intermediate element to the weights' dtype: at most an ulp, <= 2^-mantissa * |v|
# (plus the smallest subnormal step for fp16).
ULP = {torch.float16: (2.0 ** -10, 2.0 ** -24), torch.bfloat16: (2.0 ** -7, 0.0)}


@dataclasses.dataclass
class LayerCase:
    name: str
    hidden: int
    rank: int
    outs: tuple  # output columns of each slice
    lens: list
    idx: list
    num_loras: int
    dtype: str = "fp16"
    fp32_out: bool = False
    meta: torch.dtype = torch.int32
    per_token: bool = False
    ranks: list = None
    scales: bool = False
    add_inputs: bool = True
    scaling: float = 0.5
    out_slice: bool = False
    fp8: str = None  # fp8 weights with scales per "adapter" or "channel"; dtype: the activations'
    seed: int = 0

    def __str__(self):
        return f"{self.name}-{'fp8-' + self.fp8 + '-' if self.fp8 else ''}{self.dtype}{'-tokens' if self.per_token else ''}"


LAYER_CASES = [
    LayerCase("decode-qkv", 64, 16, (64, 32, 32), [1] * 12, [0, 1, 2, 3, -1, 1, 0, 2, 3, 3, 1, 0], 4, seed=1),
    LayerCase("spec-gateup", 96, 8, (128, 128), [4, 4, 4, 4], [1, 0, 1, 2], 3, scales=True, seed=2),
    LayerCase("mixed-ranks", 64, 16, (64,), [37, 1, 1, 1, 3], [0, 1, 2, 1, 0], 3, ranks=[16, 5, 0], scales=True,
              meta=torch.int64, seed=3),
    LayerCase("prefill-one", 128, 32, (96,), [70], [1], 2, add_inputs=False, out_slice=True, seed=4),
    LayerCase("split-k-few-rows", 2048, 16, (64, 64), [2, 1], [1, 0], 2, fp32_out=True, seed=5),
    LayerCase("skips", 64, 16, (64,), [3, 0, 4, 2], [-1, 0, 7, 1], 2, add_inputs=False, seed=6),
]
LAYER_CASES += [dataclasses.replace(c, per_token=True, seed=c.seed + 50) for c in LAYER_CASES]
GPU_LAYER_CASES = [
    LayerCase("decode-256-qkv", 4096, 16, (4096, 1024, 1024), [1] * 256, [i % 4 for i in range(256)], 4, seed=7),
    LayerCase("mixed-2048+64", 4096, 16, (4096,), [2048] + [1] * 64, [0] + [1 + i % 7 for i in range(64)], 8,
              seed=8),
    LayerCase("prefill-gateup", 4096, 16, (14336, 14336), [512, 512], [0, 1], 2, seed=9),
    LayerCase("ranks-8-16-64", 4096, 64, (4096,), [1] * 64, [i % 3 for i in range(64)], 3, ranks=[8, 16, 64],
              scales=True, seed=10),
]
GPU_LAYER_CASES = [dataclasses.replace(c, dtype=d, per_token=p) for c in GPU_LAYER_CASES for d in ("fp16", "bf16")
                   for p in (False, True)]
# fp8 weights in `sgmv check`'s layer calls (fp16 activations).
FP8_LAYER_CHECK_CASE = dataclasses.replace(LAYER_CASES[2], fp8="channel", seed=503)


def build_layer(case, device):
    """Fresh tensors: (layer, step, x, out view, whole buffer, rows' adapters)."""
    g = torch.Generator().manual_seed(case.seed * 7919 + 11)
    wd = _LAYER_DTYPES[case.dtype]
    L, R, H, T = case.num_loras, case.rank, case.hidden, sum(case.lens)
    a = [torch.randn(L, R, H, generator=g) / H ** 0.5 for _ in case.outs]
    b = [torch.randn(L, n, R, generator=g) / R ** 0.5 for n in case.outs]
    a_scales = b_scales = None
    if case.fp8:
        qa, qb = [quantize_fp8(w, case.fp8, g) for w in a], [quantize_fp8(w, case.fp8, g) for w in b]
        a, b = [q for q, _ in qa], [q for q, _ in qb]
        a_scales, b_scales = tuple(sc.to(device) for _, sc in qa), tuple(sc.to(device) for _, sc in qb)
    a = [w.to(FP8 if case.fp8 else wd).to(device) for w in a]
    b = [w.to(FP8 if case.fp8 else wd).to(device) for w in b]
    x = torch.randn(T, H, generator=g).to(wd).to(device)
    od = torch.float32 if case.fp32_out else wd
    pad = 5 if case.out_slice else 0
    cols = sum(case.outs)
    buf = (torch.randn(T, cols + 2 * pad, generator=g) if case.add_inputs else
           torch.full((T, cols + 2 * pad), float("nan"))).to(od).to(device)
    out = buf[:, pad:pad + cols]
    ranks = None if case.ranks is None else torch.tensor(case.ranks, dtype=torch.int32, device=device)
    scales = (torch.rand(L, generator=g) + 0.5).to(device) if case.scales else None
    layer = binding.Layer(tuple(a) if len(a) > 1 else a[0], tuple(b) if len(b) > 1 else b[0], lora_ranks=ranks,
                       lora_scales=scales, scaling=case.scaling, allow_cpu=device == "cpu", lora_a_scales=a_scales,
                       lora_b_scales=b_scales)
    starts = [sum(case.lens[:i]) for i in range(len(case.lens))]
    rows = []
    for n, i in zip(case.lens, case.idx):
        rows += [i] * n
    if case.per_token:
        meta = dict(token_lora_mapping=torch.tensor(rows, dtype=case.meta, device=device))
    else:
        meta = dict(seq_start=torch.tensor(starts, dtype=case.meta, device=device),
                    seq_len=torch.tensor(case.lens, dtype=case.meta, device=device),
                    lora_indices=torch.tensor(case.idx, dtype=case.meta, device=device),
                    max_seq_length=max(case.lens), total_tokens=T)
    step = binding.Step(**meta, num_loras=L, plan=False, max_columns=len(case.outs) * R, allow_cpu=device == "cpu",
                     scratch=None if device != "cpu" else torch.empty(
                         binding.step_scratch_bytes(T if case.per_token else len(case.lens), T, len(case.outs) * R),
                         dtype=torch.uint8))
    return layer, step, x, out, buf, rows


def expected_layer(case, layer, x, out, rows):
    """(float64 result, rows written, slack) from the layer's own tensors."""
    e = out.detach().cpu().double().clone()
    written = torch.zeros(out.shape[0], dtype=torch.bool)
    slack = torch.zeros(out.shape, dtype=torch.float64)
    rel, absolute = ULP[x.dtype]  # the intermediate's dtype: the weights', or with fp8 weights the inputs'
    xs = x.cpu().double()
    a_all, b_all = dequantized(layer.lora_a, layer.lora_a_scales), dequantized(layer.lora_b, layer.lora_b_scales)
    scales = layer.lora_scales.double().tolist() if layer.lora_scales is not None else [1.0] * case.num_loras
    scaling = torch.tensor(case.scaling, dtype=torch.float32).double().item()
    for m, i in enumerate(rows):
        if not 0 <= i < case.num_loras:
            continue
        r = case.rank if case.ranks is None else min(case.ranks[i], case.rank)
        if r <= 0:
            continue
        written[m] = True
        col = 0
        for s, n in enumerate(case.outs):
            a, b = a_all[s][i, :r], b_all[s][i, :, :r]
            scale = scaling * scales[i]
            y = scale * (xs[m] @ a.T)
            y_err = _SHRINK_SLACK * abs(scale) * (xs[m].abs() @ a.abs().T) + rel * y.abs() + absolute
            prior = e[m, col:col + n] if case.add_inputs else 0
            e[m, col:col + n] = prior + y @ b.T
            slack[m, col:col + n] = y_err @ b.abs().T
            col += n
    return e, written, slack
