"""Offline tuner for the tile table's adapter-grouped rules (aot/tiles.json, "grouped_rules"): on
a GPU, times candidate tiles per class through the JIT with a batch plan, each launched with the
path and grid the library's planner gives that tile (sgmv_expand_config with a requested tile),
and writes the winners and their tiles into the table.

    PYTHONPATH=python SGMV_LIBRARY=build/libsgmv.so.0 python aot/tune.py [--out aot/tiles.json]

It uses the source tree's sgmv (the JIT and the bench's timing) and an already built library
for the planner; it does not patch either. A class is a grouped rule: (largest rows per adapter,
largest rank); its shapes are serving batches (decode, speculative, mixed, many adapters). Each
class gets the candidate with the lowest geometric-mean time (bf16, add_inputs, operands rotated
past the L2, CUDA-graph replay). Only the measured arch's rules change; sm_80 copies sm_90's.
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


def tile_name(t):
    return "m{}n{}k{}w{}s{}".format(*t)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE / "tiles.json")
    args = ap.parse_args()

    import torch
    from sgmv import batch_plan, bench, jit

    table = json.loads((HERE / "tiles.json").read_text())
    major, minor = torch.cuda.get_device_capability()
    arch = str(major * 10 + minor)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    rules = []
    for max_rows, max_rank, shapes in CLASSES:
        times = {}
        for layout, hidden, rank, adapters in shapes:
            case = bench.Case(f"tune {layout} {hidden} {rank} {adapters}", layout, hidden, rank, adapters, "bf16",
                              True)
            sets, meta = bench.make_sets(torch, case, l2)
            plan = batch_plan(*meta, len(case.lens), case.tokens, case.adapters)
            for t in CANDIDATES:
                if t[2] > max(16, min(rank, 32)) or (t[2] < 32 and rank >= 128) or (t[2] == 64 and rank < 128):
                    continue
                fns = [lambda s=s: jit.sgmv_expand(*s, *meta, len(case.lens), max(case.lens), True, batch_plan=plan,
                                                   tile=t) for s in sets]
                try:
                    times.setdefault(t, []).append(bench.graph_time_us(torch, fns))
                except Exception as e:  # a tile that does not compile (shared memory) loses
                    print(f"  {tile_name(t)}: {type(e).__name__}: {str(e)[:80]}", file=sys.stderr)
            del sets, plan
            torch.cuda.empty_cache()
        n = max(len(v) for v in times.values())
        score = {t: math.exp(sum(map(math.log, v)) / n) for t, v in times.items() if len(v) == n}
        best = min(score, key=score.get)
        print(f"rows <= {max_rows}, rank <= {max_rank}: {tile_name(best)} {score[best]:.2f} us "
              f"(geomean over {n} shapes; runner-up {sorted(score.values())[1]:.2f} us)")
        name = next((k for k, v in table["tiles"].items() if tuple(v) == best), tile_name(best))
        table["tiles"][name] = list(best)
        rules.append([max_rows, max_rank, name])
    table["grouped_rules"][arch] = rules
    if arch == "90":
        table["grouped_rules"]["80"] = rules
    used = {r[2] for rs in table["rules"].values() for r in rs} | {r[2] for rs in table["grouped_rules"].values()
                                                                   for r in rs} | {"unaligned"}
    table["tiles"] = {k: v for k, v in table["tiles"].items() if k in used}
    args.out.write_text(json.dumps(table, indent=1) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
