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
import itertools
import random

import torch

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
# parts of valid segments may change (python/sgmv/kernels.py clips and skips the rest).
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


def check(args, buf_before, buf_after, exp, written, what):
    """Raises CheckFailed unless every element of the written rows of the output view lies within
    TOL of the float64 result `exp` and every other element of the buffer is bitwise unchanged.
    Returns the worst written element's error as a fraction of its tolerance (below 1; 0.0 when
    nothing is written)."""
    out = args[2]
    before, after = buf_before.cpu(), buf_after.cpu()
    pad = (after.shape[1] - out.shape[1]) // 2
    cols = slice(pad, pad + out.shape[1])
    # Bitwise: rows no segment writes, and the columns outside the view.
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
    rows = written.nonzero()[:, 0]
    got, e = after[:, cols][rows].double(), exp[rows]
    atol, rtol = TOL[out.dtype]
    tol = atol + rtol * e.abs()
    err = (got - e).abs()
    bad = ~(err <= tol)  # NaN and inf fail here
    if bool(bad.any()):
        nonfinite = ~torch.isfinite(got)  # named first: unwritten poison (NaN) shows up here
        i, c = _first(nonfinite if bool(nonfinite.any()) else bad)
        raise CheckFailed(f"{what}: {int(bad.sum())} of {bad.numel()} written elements wrong, "
                          f"{int(nonfinite.sum())} of them non-finite (allowed: |got - expected| <= {atol:g} + "
                          f"{rtol:.3g} * |expected| for {_name(out.dtype)}); first at output ({int(rows[i])}, {c}): "
                          f"got {got[i, c].item()!r}, expected {e[i, c].item()!r}, tolerance {tol[i, c].item():.3g}")
    return (err / tol).max().item()


def _first(mask):
    return tuple(int(v) for v in mask.nonzero()[0])


def _where(written, r, c, cols):
    if c < cols.start or c >= cols.stop:
        return ", a column outside the output view"
    return ", a row no segment writes" if not bool(written[r]) else ""


def _name(dtype):
    return str(dtype).replace("torch.", "")


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])
