"""The per-step batch plan (kernels/sgmv.py sgmv_plan_kernel) and the expand path that
uses it, through the JIT (Triton's interpreter on the CPU): the plan lists every valid row once,
under its adapter, and expand with a plan computes what expand without one does."""
import random

import pytest
import torch

import sgmv
import sgmv.jit
from sgmv.testing import CORRUPT, build, check, corrupt_case, expected, make_cases, needs_bf16_dot
from conftest import DEVICE, HAS_GPU

HEADER, ALIGN = sgmv.jit.kernels.PLAN_HEADER.value, sgmv.jit.kernels.PLAN_ALIGN.value  # the layout's one source


def plan_for(args):
    x, w, _, starts, lens, idx, batches, *_ = args
    return sgmv.jit.batch_plan(starts, lens, idx, batches, x.shape[0], w.shape[0])


def contents(plan, unique=True):
    """{row: adapter} listed by a plan, and the slots it says it uses."""
    plan = plan.cpu()
    used, capacity = int(plan[0]), int(plan[2])
    rows, adapters = plan[HEADER:HEADER + capacity], plan[HEADER + capacity:HEADER + capacity + capacity // ALIGN]
    listed = {}
    for p in range(used):
        r = int(rows[p])
        if r >= 0:
            assert not unique or r not in listed, f"row {r} listed twice"
            listed[r] = int(adapters[p // ALIGN])
        else:
            assert r == -1, f"slot {p} holds {r}"
    blocks = adapters[:used // ALIGN].tolist()
    assert blocks == sorted(blocks), "adapter groups not sorted"
    return listed, used, capacity


@pytest.mark.parametrize("seed", range(6))
def test_plan_lists_every_valid_row_once_under_its_adapter(seed):
    rng = random.Random(seed)
    n = rng.choice([1, 5, 40, 130, 300])
    lens = [rng.choice([0, 1, 1, 1, 3, 17, 70]) for _ in range(n)]
    loras = rng.randint(1, 9)
    idx = [rng.choice([-1, loras, loras + 5] + list(range(loras))) for _ in range(n)]
    starts = [sum(lens[:i]) for i in range(n)]
    total = sum(lens) - rng.randint(0, 3) if sum(lens) > 3 else sum(lens)  # clip the last segment sometimes
    meta_dtype = rng.choice([torch.int32, torch.int64])
    meta = [torch.tensor(v, dtype=meta_dtype, device=DEVICE) for v in (starts, lens, idx)]
    plan = sgmv.jit.batch_plan(*meta, n, total, loras)
    want = {r: i for s, k, i in zip(starts, lens, idx) if 0 <= i < loras for r in range(s, min(s + k, total))}
    listed, used, capacity = contents(plan)
    assert listed == want
    per_adapter = [sum(1 for a in want.values() if a == b) for b in range(loras)]
    assert used == sum(-(-n // ALIGN) * ALIGN for n in per_adapter) <= capacity


def test_corrupt_metadata_plan_stays_in_bounds():
    for _, starts, lens, idx in CORRUPT:
        meta = [torch.tensor(v, dtype=torch.int64, device=DEVICE) for v in (starts, lens, idx)]
        plan = sgmv.jit.batch_plan(*meta, len(lens), 40, 2)
        listed, _, _ = contents(plan)
        assert all(0 <= r < 40 and 0 <= a < 2 for r, a in listed.items())


def test_overlapping_segments_never_overflow_the_plan():
    """Segments that overlap (outside the contract) may need more slots than any plan has; the
    extra rows are dropped, nothing is written past the plan."""
    n, total = 64, 64
    meta = [torch.tensor(v, dtype=torch.int32, device=DEVICE) for v in ([0] * n, [total] * n, [0] * n)]
    size = sgmv.batch_plan_bytes(n, total) // 4
    guard = torch.full((size + 256,), 7, dtype=torch.int32, device=DEVICE)
    sgmv.jit.batch_plan(*meta, n, total, 1, out=guard[:size])
    assert bool((guard[size:] == 7).all())
    listed, used, capacity = contents(guard[:size], unique=False)
    assert used <= capacity and set(listed) <= set(range(total))


CASES = make_cases(gpu=HAS_GPU)


@pytest.mark.parametrize("case", CASES[::3], ids=str)
def test_expand_with_a_plan(case):
    if not HAS_GPU and needs_bf16_dot(case):
        pytest.skip("Triton's interpreter does not support bfloat16 tl.dot (triton issue 11584): GPU only")
    args, buf = build(case, DEVICE)
    before = buf.clone()
    exp, written = expected(args)
    sgmv.jit.sgmv_expand(*args, batch_plan=plan_for(args))
    check(args, before, buf, exp, written, f"jit with a plan {case}")


@pytest.mark.parametrize("name,starts,lens,idx", CORRUPT, ids=[c[0] for c in CORRUPT])
def test_expand_with_a_plan_on_corrupt_metadata(name, starts, lens, idx):
    args, buf = build(corrupt_case(name, starts, lens, idx, torch.int32, "fp16"), DEVICE)
    before = buf.clone()
    exp, written = expected(args)
    sgmv.jit.sgmv_expand(*args, batch_plan=plan_for(args))
    check(args, before, buf, exp, written, f"jit with a plan {name}")
