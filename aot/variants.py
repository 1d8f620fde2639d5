"""The variant table, at build time: what aot/generate.py compiles and writes into the dispatch
table. The tile table itself is data (aot/tiles.json, written by hand or by aot/tune.py); which
tile and grid a call gets is decided in C (csrc/planner.c) from the rules generated here.
Plain Python: no torch, no triton, no import of the sgmv package.
"""
import json
from collections import namedtuple
from itertools import product
from pathlib import Path

Tile = namedtuple("Tile", "block_m block_n block_k num_warps num_stages")
PlanSize = namedtuple("PlanSize", "segs scan rows num_warps")
Split = namedtuple("Split", "programs max_split max_tokens")

_TABLE = json.loads((Path(__file__).resolve().parent / "tiles.json").read_text())
TILES = {name: Tile(*v) for name, v in _TABLE["tiles"].items()}
OPS = ("expand", "shrink")  # their index is SGMV_OP_* in the generated sgmv_rules.h


def _rules(key):
    return {int(arch): [tuple(r) for r in rules] for arch, rules in _TABLE[key].items()}


# Per op and arch, rules tried in order; None: any. FP8_RULES and FP8_GROUPED_RULES replace them
# for fp8 weights, and only the archs they list have fp8 variants (the planner refuses fp8 weights
# elsewhere, from the generated rules).
RULES = {"expand": _rules("rules"), "shrink": _rules("shrink_rules")}
GROUPED_RULES = {"expand": _rules("grouped_rules"), "shrink": _rules("shrink_grouped_rules")}
FP8_RULES = {"expand": _rules("fp8_rules"), "shrink": _rules("fp8_shrink_rules")}
FP8_GROUPED_RULES = {"expand": _rules("fp8_grouped_rules"), "shrink": _rules("fp8_shrink_grouped_rules")}
PLAN_SIZE = PlanSize(*_TABLE["plan"])
SPLIT = Split(*_TABLE["split"])
# Tiles aot/generate.py compiles as ptxas chooses, without its register fit (measured slower so).
UNFITTED_TILES = frozenset(_TABLE["unfitted_tiles"])
# Bytes of spill that fit may leave in an fp8 expand variant (the column scales cost registers).
FP8_EXPAND_FIT_SPILL_BYTES = int(_TABLE["fp8_expand_fit_spill_bytes"])
PLANNER = _TABLE["planner"]  # the planner's other tuning, by name (csrc/variant.h sgmv_tuning_t)
ARCHS = tuple(RULES["expand"])

# (inputs, weights, output): expand's inputs and output are the weight dtype or fp32; shrink's
# inputs are the weight dtype. fp8 (e4m3, Triton's fp8e4nv) weights take fp16 or bf16 inputs and
# write the inputs' dtype or fp32.
FP8 = "fp8e4nv"
DTYPES = {"expand": [(i, w, o) for w in ("fp16", "bf16") for i in (w, "fp32") for o in (w, "fp32")] +
          [(i, FP8, o) for i in ("fp16", "bf16") for o in (i, "fp32")],
          "shrink": [(w, w, o) for w in ("fp16", "bf16") for o in (w, "fp32")] +
          [(i, FP8, o) for i in ("fp16", "bf16") for o in (i, "fp32")]}

# Expand's narrowest column tile: 65535 column tiles of it bound hidden (CUDA's grid limit).
MIN_EXPAND_BLOCK_N = 64


def check(plan_align, max_split):
    """The table's invariants, which the planner and the kernel rely on."""
    if not 2 <= SPLIT.max_split <= max_split:
        raise ValueError(f"the split rule's max_split must be in [2, {max_split}] (kernels.MAX_SPLIT)")
    if min(TILES[t].block_n for arch in ARCHS for t, _ in tiles_for_arch(arch, "expand")) < MIN_EXPAND_BLOCK_N:
        raise ValueError(f"expand tiles narrower than {MIN_EXPAND_BLOCK_N} columns would let hidden exceed CUDA's "
                         "grid limit")
    if min(t.block_n for t in TILES.values()) < 16:
        raise ValueError("tl.dot needs tiles of at least 16 columns")
    if any(plan_align % t.block_m for t in TILES.values()):
        raise ValueError(f"every block_m must divide the plan's alignment ({plan_align})")
    if "unaligned" not in TILES or any(set(rules[op]) != set(ARCHS) for rules in (RULES, GROUPED_RULES) for op in OPS):
        raise ValueError("every op and arch needs rules with and without a plan, and an 'unaligned' tile")
    if not UNFITTED_TILES <= set(TILES):
        raise ValueError(f"unfitted_tiles names tiles that tiles.json lacks: {sorted(UNFITTED_TILES - set(TILES))}")
    fp8_archs = [set(rules[op]) for rules in (FP8_RULES, FP8_GROUPED_RULES) for op in OPS]
    if any(a != fp8_archs[0] for a in fp8_archs) or not fp8_archs[0] <= set(ARCHS):
        raise ValueError("fp8 rules must list the same archs, with and without a plan, for both ops, among ARCHS")
    if any(r[3] == "short" for table in (RULES, FP8_RULES) for rules in table["shrink"].values() for r in rules):
        raise ValueError("shrink has no short path")
    for rules in [r for op in OPS for table in (RULES, GROUPED_RULES, FP8_RULES, FP8_GROUPED_RULES)
                  for r in table[op].values()]:
        if rules[-1][0] is not None or rules[-1][1] is not None:
            raise ValueError("every rule list must end with a catch-all")


def tiles_for_arch(arch, op, fp8=False):
    """(tile, path) pairs the rules of op on arch can select (for fp8 weights: the fp8 rules)."""
    rules, grouped = (FP8_RULES, FP8_GROUPED_RULES) if fp8 else (RULES, GROUPED_RULES)
    if arch not in rules[op]:
        return []
    pairs = [(r[2], r[3]) for r in rules[op][arch]] + [(r[2], "grouped") for r in grouped[op][arch]]
    return list(dict.fromkeys(pairs + [("unaligned", "rows"), ("unaligned", "grouped")]))


def variants():
    """Every specialisation the AOT build compiles, as dicts."""
    for arch in ARCHS:
        for op in OPS:
            for (x, w, o) in DTYPES[op]:
                for (tile, path), even_k in product(tiles_for_arch(arch, op, w == FP8), (False, True)):
                    yield dict(kernel="sgmv_kernel", op=op, arch=arch, tile=tile, path=path, x=x, w=w, out=o,
                               even_k=even_k, aligned=tile != "unaligned")
        yield dict(kernel="sgmv_plan_kernel", arch=arch)
