"""The variant table: the one place where tiles are chosen.

Read by the AOT generator (aot/generate.py, at build time), which compiles every variant below
and emits the C dispatch table, and by the JIT path (installed as sgmv/_variants.py), which
picks its tile with select_tile() exactly as the C dispatcher does from the generated rules.
Pure data and plain Python: no torch, no triton.
"""
import json
from collections import namedtuple
from itertools import product
from pathlib import Path

Tile = namedtuple("Tile", "block_m block_n block_k short num_warps num_stages")

# The tile table (aot/tiles.json, written by aot/tune.py). short=False: a program covers
# BLOCK_M rows of one segment; short=True: row j of BLOCK_M segments (decode and speculative
# batches), see kernels/sgmv_expand.py. "unaligned" serves operands whose rows are not 16-byte
# aligned (the other tiles' AOT variants assume they are).
_TABLE = json.loads((Path(__file__).resolve().parent / "tiles.json").read_text())
TILES = {name: Tile(*v) for name, v in _TABLE["tiles"].items()}
# Per arch, rules tried in order: (largest max_seq_length, largest rank, tile name); None: any.
RULES = {int(arch): [tuple(r) for r in rules] for arch, rules in _TABLE["rules"].items()}
ARCHS = tuple(RULES)

# (inputs, weights, output): inputs and output are the weight dtype or fp32.
DTYPES = [(i, w, o) for w in ("fp16", "bf16") for i in (w, "fp32") for o in (w, "fp32")]

# Row alignment the aligned variants assume, in elements: every data pointer 16-byte aligned,
# and N and every row stride a multiple of this.
ALIGN_ELEMS = 8
MAX_RANK = 256
# 65535 column tiles of the narrowest tile allowed (csrc/sgmv.c's SGMV_MAX_HIDDEN).
MAX_HIDDEN = 65535 * 64
if min(t.block_n for t in TILES.values()) < 64:
    raise ValueError("tiles narrower than 64 columns would let hidden exceed CUDA's grid limit")


def select_tile(arch, max_seq_length, rank, aligned):
    """Tile name for a call; the C dispatcher applies the same rules (generated from RULES)."""
    if not aligned:
        return "unaligned"
    for max_seq, max_rank, name in RULES[arch]:
        if (max_seq is None or max_seq_length <= max_seq) and (max_rank is None or rank <= max_rank):
            return name
    raise ValueError(f"RULES[{arch}] must end with a catch-all")


def grid(tile, batches, hidden, total_tokens, num_loras, max_seq_length):
    """The launch grid (see kernels/sgmv_expand.py); csrc/sgmv.c computes the same."""
    n_tiles = -(-hidden // tile.block_n)
    if tile.short:
        groups = -(-batches // tile.block_m)
        # Adapter slots: enough programs to fill the GPU, never more slots than adapters.
        slots = min(num_loras, max(1, SHORT_PROGRAMS // (groups * n_tiles)), 65535)
        return (groups, n_tiles, slots)
    flat = -(-total_tokens // tile.block_m) + batches  # > batches: how the kernel tells the grids apart
    row_tiles = min(max(-(-max_seq_length // tile.block_m), 1), 65535)
    if batches * row_tiles <= 2 * flat:
        return (batches, n_tiles, row_tiles)
    return (flat, n_tiles, 1)


# The short path's target program count, which sets its adapter slots.
SHORT_PROGRAMS = 4096


def tiles_for_arch(arch):
    names = list(dict.fromkeys(name for *_, name in RULES[arch]))
    return names + ["unaligned"]


def variants():
    """Every specialisation the AOT build compiles, as dicts."""
    for arch in ARCHS:
        for tile, (x, w, o), even_k, add in product(tiles_for_arch(arch), DTYPES, (False, True), (False, True)):
            yield dict(arch=arch, tile=tile, x=x, w=w, out=o, even_k=even_k, add_inputs=add,
                       aligned=tile != "unaligned")
