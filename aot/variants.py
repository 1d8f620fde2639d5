"""The variant table: the one place where tiles are chosen.

Read by the AOT generator (aot/generate.py, at build time), which compiles every variant below
and emits the C dispatch table, and by the JIT path (installed as sgmv/_variants.py), which
picks its tile with select_tile() exactly as the C dispatcher does from the generated rules.
Pure data and plain Python: no torch, no triton.
"""
from collections import namedtuple
from itertools import product

Tile = namedtuple("Tile", "block_m block_n block_k segs num_warps num_stages")

# Tile configs by name. segs: segments handled by one program (short segments share a program).
TILES = {
    "decode": Tile(16, 128, 16, 8, 4, 2),
    "short": Tile(16, 128, 16, 1, 4, 2),
    "prefill": Tile(64, 128, 16, 1, 4, 2),
    # For operands whose rows are not 16-byte aligned (odd ranks, odd column offsets): the AOT
    # variants of the other tiles assume aligned rows, this one assumes nothing.
    "unaligned": Tile(32, 64, 16, 1, 4, 2),
}

# Per arch, rules tried in order: (largest max_seq_length it serves, or None for any; tile name).
RULES = {
    80: [(1, "decode"), (16, "short"), (None, "prefill")],
    90: [(1, "decode"), (16, "short"), (None, "prefill")],
    100: [(16, "short"), (None, "prefill")],
    120: [(16, "short"), (None, "prefill")],
}
ARCHS = tuple(RULES)

# (inputs, weights, output): inputs and output are the weight dtype or fp32.
DTYPES = [(i, w, o) for w in ("fp16", "bf16") for i in (w, "fp32") for o in (w, "fp32")]
METADATA_DTYPES = ("i32", "i64")

# Row alignment the aligned variants assume, in elements: every data pointer 16-byte aligned,
# and N and every row stride a multiple of this.
ALIGN_ELEMS = 8
MAX_RANK = 256


def select_tile(arch, max_seq_length, aligned):
    """Tile name for a call; the C dispatcher applies the same rules (generated from RULES)."""
    if not aligned:
        return "unaligned"
    for limit, name in RULES[arch]:
        if limit is None or max_seq_length <= limit:
            return name
    raise AssertionError("RULES must end with a catch-all")


def tiles_for_arch(arch):
    names = [name for _, name in RULES[arch]]
    return names + ["unaligned"]


def variants():
    """Every specialisation the AOT build compiles, as dicts."""
    for arch in ARCHS:
        for tile, (x, w, o), meta, even_k, add in product(
                tiles_for_arch(arch), DTYPES, METADATA_DTYPES, (False, True), (False, True)):
            yield dict(arch=arch, tile=tile, x=x, w=w, out=o, meta=meta, even_k=even_k,
                       add_inputs=add, aligned=tile != "unaligned")
