"""SGMV expand with fused slices (QKV, gate/up: 1 to 3 output slices of different widths) and
per-adapter ranks: the JIT path (Triton's interpreter on the CPU) and the torch reference against
the float64 expectation of sgmv.testing.expected_lora; on a GPU, the library against the JIT bit
for bit. With per-adapter ranks, the inputs columns past an adapter's rank hold NaN: reading one
would show."""
import pytest
import torch

import sgmv
import sgmv.jit
import sgmv.reference
from sgmv.testing import LoraCase, build_lora, check, expected_lora, make_lora_cases
from conftest import DEVICE, HAS_GPU
from test_shrink import aot_matches_jit, bits, launch_config, run, skip_bf16_on_cpu

I32, I64 = torch.int32, torch.int64
CPU_CASES = [c for c in make_lora_cases(gpu=False) if c.op == "expand"]  # GPU_CASES: the big ones

CORNERS = [
    # One slice, ranks: 0 (skipped even without add_inputs: NaN poison stays), above rank, negative.
    LoraCase("one-slice-ranks", "expand", 16, [72], [3, 4, 2, 5], [0, 1, 2, 3], 4, "fp16", I32,
             lora_ranks=[0, 20, -1, 7], seed=1),
    # Three slices, the middle one narrow and odd, fp32 inputs and output, add_inputs, int64.
    LoraCase("qkv-odd", "expand", 8, [64, 5, 130], [6, 1, 3], [1, 0, 1], 2, "fp32in-fp16-fp32out", I64,
             add_inputs=True, lora_ranks=[8, 3], seed=2),
    # Skips and gaps with two slices; rank 1; a column-slice output, strided inputs, 4-D weights.
    LoraCase("skips-and-views", "expand", 1, [40, 24], [4, 0, 3, 5, 2], [1, -1, 0, 9, 1], 2, "fp16", I32,
             add_inputs=True, starts=[10, 0, 2, 20, 30], total_tokens=34, out_slice=True, strided_inputs=True,
             weights_4d=True, seed=3),
    # A long segment beside decode rows (the flat path), two slices, rank 64, partial ranks.
    LoraCase("long-and-short", "expand", 64, [64, 64], [150, 1, 1, 1], [0, 1, 0, 1], 2, "fp16-fp32out", I64,
             lora_ranks=[64, 17], seed=4),
]


def with_list_weights(fn):
    """The same call with the weights as a list (the API takes a tensor, a tuple or a list)."""
    def call(x, w, *rest, **kw):
        return fn(x, list(w) if isinstance(w, tuple) else [w], *rest, **kw)
    call.__module__ = fn.__module__
    return call


@pytest.mark.parametrize("case", CPU_CASES + CORNERS, ids=str)
def test_reference_matches_float64(case):
    run(sgmv.reference.sgmv_expand, case, "cpu")


@pytest.mark.parametrize("case", CPU_CASES + CORNERS, ids=str)
def test_jit(case):
    skip_bf16_on_cpu(case)
    run(sgmv.jit.sgmv_expand, case)


@pytest.mark.parametrize("case", CPU_CASES + CORNERS, ids=str)
def test_jit_with_a_plan(case):
    skip_bf16_on_cpu(case)
    run(sgmv.jit.sgmv_expand, case, plan=sgmv.jit.batch_plan)


def test_weights_as_a_list():
    run(with_list_weights(sgmv.jit.sgmv_expand), CORNERS[0])
    run(with_list_weights(sgmv.jit.sgmv_expand), CORNERS[1])


def test_ranks_at_or_above_rank_compute_what_no_ranks_do():
    """lora_ranks of rank (or more) for every adapter is no lora_ranks: same float64 expectation,
    and the JIT gives both the same bits."""
    case = LoraCase("full-ranks", "expand", 16, [64, 32], [5, 3, 4], [0, 1, 0], 2, "fp16", I32, seed=5)
    _, plain, _, _ = run(sgmv.jit.sgmv_expand, case)
    case.lora_ranks = [16, 40]
    _, ranked, _, _ = run(sgmv.jit.sgmv_expand, case)
    assert torch.equal(bits(plain), bits(ranked))


def test_the_planner_sees_these_calls_as_fused():
    """The calls above are single launches over all slices (grid[1] spans every slice's column
    tiles), not one call per slice."""
    args, kw, _ = build_lora(CORNERS[1], "cpu")
    c = launch_config("expand", args, kw)
    assert c.grid[1] == sum(-(-h // c.block_n) for h in CORNERS[1].hiddens)


# ---- on a GPU -----------------------------------------------------------------------------------

GPU_CASES = [c for c in make_lora_cases(gpu=True) if c.op == "expand"]


@pytest.mark.gpu
@pytest.mark.parametrize("with_plan", [False, True], ids=["no-plan", "plan"])
@pytest.mark.parametrize("case", GPU_CASES + CORNERS, ids=str)
def test_aot_matches_jit_bitwise_and_float64(case, with_plan):
    aot_matches_jit(case, with_plan)
