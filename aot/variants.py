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

_TABLE = json.loads((Path(__file__).resolve().parent / "tiles.json").read_text())
TILES = {name: Tile(*v) for name, v in _TABLE["tiles"].items()}
# Per arch, rules tried in order; None: any.
RULES = {int(arch): [tuple(r) for r in rules] for arch, rules in _TABLE["rules"].items()}
GROUPED_RULES = {int(arch): [tuple(r) for r in rules] for arch, rules in _TABLE["grouped_rules"].items()}
PLAN_SIZE = PlanSize(*_TABLE["plan"])
ARCHS = tuple(RULES)

# (inputs, weights, output): inputs and output are the weight dtype or fp32.
DTYPES = [(i, w, o) for w in ("fp16", "bf16") for i in (w, "fp32") for o in (w, "fp32")]

# Row alignment the aligned variants assume, in elements: every data pointer 16-byte aligned,
# and N and every row stride a multiple of this ("unaligned" serves the rest).
ALIGN_ELEMS = 8
# The short path's target program count, which sets its adapter slots.
SHORT_PROGRAMS = 4096


def check(plan_align):
    """The table's invariants, which the planner relies on."""
    if min(t.block_n for t in TILES.values()) < 64:
        raise ValueError("tiles narrower than 64 columns would let hidden exceed CUDA's grid limit")
    if any(plan_align % t.block_m for t in TILES.values()):
        raise ValueError(f"every block_m must divide the plan's alignment ({plan_align})")
    if set(GROUPED_RULES) != set(RULES) or "unaligned" not in TILES:
        raise ValueError("every arch needs rules with and without a plan, and an 'unaligned' tile")
    for rules in list(RULES.values()) + list(GROUPED_RULES.values()):
        if rules[-1][0] is not None or rules[-1][1] is not None:
            raise ValueError("every rule list must end with a catch-all")


# The kernel's PATH constexpr (python/sgmv/kernels.py, csrc/include/sgmv.h sgmv_path_t).
PATHS = {"rows": 0, "short": 1, "grouped": 2}


def tiles_for_arch(arch):
    """(tile, path) pairs the rules of arch can select."""
    pairs = [(r[2], r[3]) for r in RULES[arch]] + [(r[2], "grouped") for r in GROUPED_RULES[arch]]
    return list(dict.fromkeys(pairs + [("unaligned", "rows"), ("unaligned", "grouped")]))


def variants():
    """Every specialisation the AOT build compiles, as dicts."""
    for arch in ARCHS:
        for (tile, path), (x, w, o), even_k in product(tiles_for_arch(arch), DTYPES, (False, True)):
            yield dict(kernel="sgmv_expand_kernel", arch=arch, tile=tile, path=path, x=x, w=w, out=o, even_k=even_k,
                       aligned=tile != "unaligned")
        yield dict(kernel="sgmv_plan_kernel", arch=arch)
