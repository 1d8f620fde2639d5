"""Randomized SGMV cases, their float64 expectation, and the check every path must pass
(used by tests/ and by `sgmv check`; needs torch).

Each case draws fresh inputs from its own seed. Outputs start poisoned (NaN, or random data when
add_inputs is on, so the old value matters); rows no segment may write, and the columns around
a column-slice output view, must come back bit-for-bit unchanged.
"""
import dataclasses
import itertools
import random

import torch

RANKS = (1, 7, 8, 16, 24, 64, 128, 256)
HIDDENS = (1, 64, 4096, 4097)
LAYOUTS = ("uniform", "zipf", "skewed", "decode")
DTYPES = {  # (inputs, weights, output)
    "fp16": (torch.float16, torch.float16, torch.float16),
    "bf16": (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    "fp32in-fp16": (torch.float32, torch.float16, torch.float16),
    "fp32in-bf16": (torch.float32, torch.bfloat16, torch.bfloat16),
    "fp16-fp32out": (torch.float16, torch.float16, torch.float32),
    "bf16-fp32out": (torch.bfloat16, torch.bfloat16, torch.float32),
}
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


class CheckFailed(Exception):
    """A path's output is wrong (what `sgmv check` catches). Placeholder on this branch: the
    oracle rewrite raises it from check(), which still uses assert here."""


@dataclasses.dataclass
class Case:
    name: str
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
        return self.name


def _lens(layout, rng, scale):
    if layout == "uniform":
        lens = [rng.randint(1, 8) * scale] * rng.randint(2, 4)
    elif layout == "zipf":
        lens = [max(1, int(scale * 24 / (r + 1) ** 1.2)) for r in range(rng.randint(3, 6))]
        rng.shuffle(lens)
    elif layout == "skewed":
        lens = [40 * scale] + [1] * rng.randint(4, 9)
    else:  # decode
        lens = [1] * rng.randint(8, 33) * scale
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


def make_cases(gpu):
    """The randomized suite: every rank x hidden pair, with layouts, dtypes, metadata dtypes,
    add_inputs and output views rotating through them. On the GPU segments are longer and
    bfloat16 is included."""
    rng = random.Random(20261124)
    dtypes = itertools.cycle(DTYPES)
    scale = 4 if gpu else 1
    cases = []
    for n, (rank, hidden) in enumerate(itertools.product(RANKS, HIDDENS)):
        layout = LAYOUTS[(n + n // len(HIDDENS)) % len(LAYOUTS)]
        if hidden >= 4096 and not gpu and layout == "decode":
            layout = "uniform"  # keeps the interpreter's grid small
        lens = _lens(layout, rng, scale)
        num_loras = rng.randint(1, 4)
        cases.append(Case(
            name=f"r{rank}-h{hidden}-{layout}-{n}", rank=rank, hidden=hidden, lens=lens,
            idx=_indices(len(lens), num_loras, rng), num_loras=num_loras, dtypes=next(dtypes),
            meta_dtype=(torch.int32, torch.int64)[n % 2], add_inputs=n % 3 != 0,
            out_slice=n % 5 == 2, seed=n))
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
        Case("slice-fp32-out", 64, 200, [7, 9], [1, 0], 2, "fp16-fp32out", torch.int64, True, out_slice=True, seed=105),
        Case("bf16-basic", 16, 256, [9, 1, 4], [0, 1, 0], 2, "bf16", torch.int32, True, seed=106),
        Case("bf16-fp32in-odd", 7, 4097, [3, 5], [1, 0], 2, "fp32in-bf16", torch.int64, False, seed=107),
    ]
    for c in cases:
        if c.idx is None:
            c.idx = _indices(len(c.lens), c.num_loras, random.Random(c.seed))
    return cases


# Metadata that lies, as (name, starts, lens, idx) over 40 tokens: only the rows of the valid
# parts of valid segments may change (kernels/sgmv_expand.py clips and skips the rest).
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
    """Written rows within tolerance of the float64 result; every other element of the buffer unchanged."""
    out = args[2]
    before, after = buf_before.cpu(), buf_after.cpu()
    pad = (after.shape[1] - out.shape[1]) // 2
    cols = slice(pad, pad + out.shape[1])
    # Bitwise: rows no segment writes, and the columns outside the view.
    untouched = before.clone()
    untouched[:, cols][written] = after[:, cols][written]
    same = _bits(untouched) == _bits(after)
    assert bool(same.all()), f"{what}: {int((~same).sum())} elements outside the written rows changed"
    got = after[:, cols]
    if written.any():
        g, e = got[written].double(), exp[written]
        assert bool(torch.isfinite(g).all()), f"{what}: non-finite values in written rows (unwritten poison?)"
        err = ((g - e).norm() / e.norm().clamp_min(1e-30)).item()
        tol = TOL[out.dtype]
        assert err < tol, f"{what}: relative error {err:.3g} >= {tol}"
        return err
    return 0.0


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])
