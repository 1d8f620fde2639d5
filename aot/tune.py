"""Offline tuner for the tile table's adapter-grouped rules (aot/tiles.json, "grouped_rules"): on
a GPU, times candidate tiles per class through the JIT with a batch plan, each launched with the
path and grid the library's planner gives that tile (sgmv_expand_config with a requested tile),
and writes the winners and their tiles into the table.

    PYTHONPATH=python SGMV_LIBRARY=build/libsgmv.so.0 python aot/tune.py [--table T ...] [--out aot/tiles.json]

It uses the source tree's sgmv (the JIT and the bench's timing) and an already built library
for the planner; it does not patch either. A class is a grouped rule: (largest rows per adapter,
largest rank); its shapes are serving batches (decode, speculative, mixed, many adapters). Each
class gets the candidate with the lowest geometric-mean time (bf16, add_inputs, operands rotated
past the L2, CUDA-graph replay). Only the measured arch's rules change; sm_80 copies sm_90's.

--table picks the rules tuned: grouped_rules (the default, above), rules (expand's prefill rules:
uniform long segments, which tile by segment with or without a plan) and shrink_rules (shrink's
prefill rules). Each prints every candidate's times, so a run is also the record of why.
"""
import argparse
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))

# (max rows per adapter, max rank, shapes as in sgmv.bench: layout, hidden, rank, adapters)
CLASSES = [
    (32, None, [("decode:256", 4096, 16, 32), ("decode:512", 4096, 16, 32), ("decode:128", 8192, 32, 64),
                ("uniform:64:4", 4096, 16, 8)]),
    (None, 16, [("decode:256", 4096, 16, 4), ("chunked:2048:64", 4096, 16, 8),
                ("chunked:700,700,700:100", 14336, 16, 8), ("skewed:4000:8:10", 4096, 16, 4)]),
    (None, 64, [("decode:64", 14336, 64, 8), ("chunked:512:192", 6144, 32, 16), ("zipf:32:8192", 4096, 32, 16)]),
    (None, None, [("decode:64", 4096, 128, 8), ("chunked:1024:64", 8192, 128, 8)]),
]
# (block_m, block_n, block_k, num_warps, num_stages); block_k is capped by the rank below.
CANDIDATES = [(bm, bn, bk, 8 if bm * bn >= 64 * 256 else 4, 2) for bm in (16, 32, 64) for bn in (64, 128, 256)
              for bk in (16, 32, 64)]
# Prefill (item 6 of issue 17: 50-70 % of the H200's floor with the H100's tiles): more rows and
# columns per program and deeper pipelines, to keep more bytes in flight; the same tests of
# block_k against the rank. Rules: (max max_seq_length, max rank): the rule whose tile is replaced.
PREFILL_CLASSES = [
    ((None, 16), [("uniform:4:2048", 14336, 16, 2), ("uniform:2:4096", 28672, 8, 1), ("uniform:4:512", 4096, 16, 4)]),
    ((None, 64), [("uniform:16:4096", 4096, 32, 4), ("uniform:8:1024", 4096, 64, 8)]),
    ((None, None), [("uniform:8:1024", 4096, 128, 8), ("uniform:4:2048", 4096, 256, 4)]),
]
PREFILL_CANDIDATES = [(bm, bn, bk, w, st) for bm in (64, 128) for bn in (64, 128, 256) for bk in (16, 32, 64)
                      for w in (4, 8) for st in (2, 3) if bm * bn <= 128 * 128 or w == 8]
# Shrink: block_n is the rank (capped at 64); block_k runs along hidden.
SHRINK_CLASSES = [
    ((None, 16), [("uniform:16:4096", 4096, 16, 4), ("uniform:4:2048", 8192, 16, 2)]),
    ((None, 32), [("uniform:16:4096", 4096, 32, 4), ("uniform:8:1024", 4096, 32, 8)]),
    ((None, None), [("uniform:8:1024", 4096, 64, 8), ("uniform:16:4096", 4096, 64, 4)]),
]
SHRINK_CANDIDATES = [(bm, 0, bk, w, st) for bm in (32, 64, 128) for bk in (64, 128, 256) for w in (4, 8)
                     for st in (2, 3, 4) if bm * bk <= 64 * 256]


def tile_name(t):
    return "m{}n{}k{}w{}s{}".format(*t)


def fits(t, rank, op):
    """Whether candidate t is tried for a shape of this rank: expand's block_k runs along the rank
    (no wider than it, 16 below 32, at least 32 from rank 128); shrink's block_n is the rank."""
    if op == "shrink":
        return True
    return not (t[2] > max(16, min(rank, 32)) or (t[2] < 32 and rank >= 128) or (t[2] == 64 and rank < 128))


def measure(torch, shapes, candidates, op, with_plan, l2):
    """{tile: geometric-mean us over the shapes} for the candidates that ran on every shape."""
    from sgmv import batch_plan, bench, jit
    times = {}
    for layout, hidden, rank, adapters in shapes:
        case = bench.Case(f"tune {layout} {hidden} {rank} {adapters}", layout, hidden, rank, adapters, "bf16",
                          op == "expand", op=op)
        sets, meta = bench.make_sets(torch, case, l2)
        plan = batch_plan(*meta, len(case.lens), case.tokens, case.adapters) if with_plan else None
        for t in candidates:
            if not fits(t, rank, op):
                continue
            if op == "shrink":
                t = (t[0], min(64, rank), *t[2:])
                fns = [lambda s=s: jit.sgmv_shrink(*s, *meta, len(case.lens), max(case.lens), 1.0, batch_plan=plan,
                                                   tile=t) for s in sets]
            else:
                fns = [lambda s=s: jit.sgmv_expand(*s, *meta, len(case.lens), max(case.lens), True, batch_plan=plan,
                                                   tile=t) for s in sets]
            try:
                us = bench.graph_time_us(torch, fns)
            except Exception as e:  # a tile that does not compile (shared memory) loses
                print(f"  {tile_name(t)}: {type(e).__name__}: {str(e)[:80]}", file=sys.stderr)
                continue
            key = t if op == "expand" else (t[0], 0, *t[2:])
            times.setdefault(key, []).append(us)
            print(f"  {case.name} {tile_name(t)} {us:.2f} us", file=sys.stderr)
        del sets, plan
        torch.cuda.empty_cache()
    n = max(len(v) for v in times.values())
    return {t: math.exp(sum(map(math.log, v)) / n) for t, v in times.items() if len(v) == n}


def tile_key(table, t):
    """The name of tile t in the table (added if new)."""
    name = next((k for k, v in table["tiles"].items() if tuple(v) == t), tile_name(t))
    table["tiles"][name] = list(t)
    return name


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", nargs="+", default=["grouped_rules"],
                    choices=["grouped_rules", "rules", "shrink_rules"])
    ap.add_argument("--out", type=Path, default=HERE / "tiles.json")
    args = ap.parse_args()

    import torch

    table = json.loads((HERE / "tiles.json").read_text())
    major, minor = torch.cuda.get_device_capability()
    arch = str(major * 10 + minor)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    print(f"{torch.cuda.get_device_name()} (sm_{arch})")
    for which in args.table:
        if which == "grouped_rules":
            rules = []
            for max_rows, max_rank, shapes in CLASSES:
                score = measure(torch, shapes, CANDIDATES, "expand", True, l2)
                best = min(score, key=score.get)
                print(f"rows <= {max_rows}, rank <= {max_rank}: {tile_name(best)} {score[best]:.2f} us "
                      f"(geomean over {len(shapes)} shapes; runner-up {sorted(score.values())[1]:.2f} us)")
                rules.append([max_rows, max_rank, tile_key(table, best)])
            table["grouped_rules"][arch] = rules
            continue
        # Prefill: replace the tile of the rule (max_seq_length cap, rank cap); block_n of a shrink
        # tile is the rule's rank cap (64 for none).
        op, classes, cands = (("shrink", SHRINK_CLASSES, SHRINK_CANDIDATES) if which == "shrink_rules" else
                              ("expand", PREFILL_CLASSES, PREFILL_CANDIDATES))
        rules = table[which][arch]
        for caps, shapes in classes:
            score = measure(torch, shapes, cands, op, False, l2)
            rule = next(r for r in rules if tuple(r[:2]) == caps)
            old = tuple(table["tiles"][rule[2]])
            best = min(score, key=score.get)
            best_us = score[best]
            if op == "shrink":
                best, old = (best[0], caps[1] or 64, *best[2:]), (old[0], 0, *old[2:])
            print(f"{which} {caps}: {tile_name(best)} {best_us:.2f} us; the table's {rule[2]} "
                  f"{score.get(old, float('nan')):.2f} us (geomean over {len(shapes)} shapes)")
            rule[2] = tile_key(table, best)
    if arch == "90":  # sm_80 runs sm_90's expand rules; its shrink keeps its two-tile subset (build size)
        for which in set(args.table) - {"shrink_rules"}:
            table[which]["80"] = table[which]["90"]
    used = {r[2] for key in table if key.endswith("rules") for rs in table[key].values() for r in rs} | {"unaligned"}
    table["tiles"] = {k: v for k, v in table["tiles"].items() if k in used}
    args.out.write_text(json.dumps(table, indent=1) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
