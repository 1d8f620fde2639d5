"""fp8 tiles for the fp8 suite's decode and mixed cases (issue 19; benchmarks/NOTES.md round 14):
each case timed through sgmv.jit with every candidate tile (as aot/tune.py does for bf16), with
the table's tile, through the AOT library, and as the same call with bf16 weights. GPU only.

    PYTHONPATH=python SGMV_LIBRARY=... python benchmarks/fp8_tiles.py warm I N   # compile: every
                                           # N-th (case, tile) from I, run once (N processes at once)
    PYTHONPATH=python SGMV_LIBRARY=... python benchmarks/fp8_tiles.py time OUT.json [SECONDS]
"""
import json
import sys
import time

import torch

from sgmv import batch_plan, bench, binding, jit

CASES = [c for c in bench.suite_cases("fp8") if not c.name.split()[2].startswith("prefill")]
EXPAND = [(bm, bn, bk, w, 2) for bm in (16, 32) for bn in (64, 128, 256) for bk in (16, 32, 64) for w in (4, 8)
          if w == 4 or bn == 256]
SHRINK = [(16, 0, bk, w, st) for bk in (128, 256, 512) for w in (4, 8) for st in (2, 3, 4)]


def tiles(c):
    """None (the table's) and the candidates for case c: shrink's block_n is the rank (or 32 at 64)."""
    if c.op == "shrink":
        return [None] + [(t[0], c.rank, *t[2:]) for t in SHRINK] + [(t[0], 32, *t[2:]) for t in SHRINK if c.rank == 64]
    return [None] + [t for t in EXPAND if t[2] <= c.rank]


def launchers(c, sets, meta, plan, tile, how="jit"):
    """One callable per buffer set: the case through the JIT with `tile`, the AOT library, or bf16."""
    b, ml = len(c.lens), max(c.lens)
    if c.op == "shrink":
        ws = binding.new_workspace(sets[0][2], c.tokens, c.rank)
        if how == "bf16":
            return [lambda s=s: binding.sgmv_shrink(*s[:3], *meta, b, ml, 0.5, batch_plan=plan, workspace=ws)
                    for s in sets]
        fn = binding.sgmv_shrink if how == "aot" else lambda *a, **k: jit.sgmv_shrink(*a, **k, tile=tile)
        return [lambda s=s: fn(s[0], s[3], s[2], *meta, b, ml, 0.5, batch_plan=plan, workspace=ws,
                               weight_scales=s[4]) for s in sets]
    if how == "bf16":
        return [lambda s=s: binding.sgmv_expand(*s[:3], *meta, b, ml, True, batch_plan=plan) for s in sets]
    fn = binding.sgmv_expand if how == "aot" else lambda *a, **k: jit.sgmv_expand(*a, **k, tile=tile)
    return [lambda s=s: fn(s[0], s[3], s[2], *meta, b, ml, True, batch_plan=plan, weight_scales=s[4]) for s in sets]


def setup(c, l2):
    sets, meta = bench.make_sets(torch, c, l2)
    return sets, meta, batch_plan(*meta, len(c.lens), c.tokens, c.adapters)


def name(t):
    return "table" if t is None else "m{}n{}k{}w{}s{}".format(*t)


def main():
    if sys.argv[1] == "warm":
        i, n = int(sys.argv[2]), int(sys.argv[3])
        for c, t in [(c, t) for c in CASES for t in tiles(c)][i::n]:
            sets, meta, plan = setup(c, 1)
            try:
                launchers(c, sets[:1], meta, plan, t)[0]()
            except Exception as e:  # a tile that does not compile (shared memory) is left out
                print(c.name, name(t), type(e).__name__, str(e)[:100])
        torch.cuda.synchronize()
        return
    out, budget = sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else float("inf")
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    t0, res = time.time(), {}
    for c in CASES:
        sets, meta, plan = setup(c, l2)
        r = {"bf16": bench.graph_time_us(torch, launchers(c, sets, meta, plan, None, "bf16")),
             "aot-fp8": bench.graph_time_us(torch, launchers(c, sets, meta, plan, None, "aot"))}
        for t in tiles(c):
            if time.time() - t0 > budget:
                break
            try:
                r[name(t)] = bench.graph_time_us(torch, launchers(c, sets, meta, plan, t))
            except Exception as e:
                print(c.name, name(t), type(e).__name__, str(e)[:100], flush=True)
        best = min((k for k in r if k.startswith("m")), key=r.get, default=None)
        print(f"{c.name}: bf16 {r['bf16']:.2f} aot-fp8 {r['aot-fp8']:.2f} jit-table {r.get('table', float('nan')):.2f}"
              f" best {best} {r.get(best, float('nan')):.2f} -> fp8/bf16 {r.get(best, float('nan')) / r['bf16']:.2f}",
              flush=True)
        res[c.name] = r
        del sets, plan
        torch.cuda.empty_cache()
        with open(out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
