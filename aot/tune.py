"""Offline tuner: on a GPU, time candidate tiles per shape class through the JIT path and write
the winners into aot/tiles.json, the tile table that the AOT build and the JIT path both read.

    python aot/tune.py [--out aot/tiles.json]      (needs torch, triton and an installed sgmv)

A shape class is a rule of the table: (largest max_seq_length, largest rank). Each class is
timed on a few representative shapes (bf16, add_inputs on, operands rotated past the L2) and
gets the candidate with the lowest geometric-mean time. Only the measured arch's rules change;
other archs reuse its choices unless they list their own.
"""
import argparse
import json
import math
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (max_seq, max_rank, name): the classes, in rule order; shapes as in sgmv.bench (layout, hidden, rank, adapters)
CLASSES = [
    (1, None, "decode", [("decode:256", 4096, 16, 4), ("decode:64", 4096, 8, 4), ("decode:32", 14336, 64, 8),
                         ("decode:128", 8192, 32, 64), ("decode:256", 4096, 64, 16)]),
    (8, None, "spec", [("spec:64:4", 4096, 16, 8), ("spec:32:2-8", 5120, 64, 16)]),
    (64, None, "short", [("uniform:128:16", 4096, 16, 8), ("uniform:64:32", 8192, 32, 8)]),
    (None, 16, "prefill_r16", [("uniform:4:512", 4096, 16, 4), ("skewed:4000:8:10", 4096, 16, 4),
                               ("uniform:4:2048", 14336, 16, 2), ("uniform:2:4096", 28672, 8, 1)]),
    (None, 64, "prefill_r64", [("uniform:8:1024", 4096, 64, 8), ("uniform:16:4096", 4096, 32, 4),
                               ("zipf:32:8192", 4096, 32, 16), ("skewed:8000:32:1", 14336, 64, 8)]),
    (None, None, "prefill_r256", [("uniform:8:1024", 8192, 128, 8), ("uniform:4:1024", 4096, 256, 4)]),
]
SHORT = [(bm, bn, 16, True, 4, 2) for bm in (16, 32, 64) for bn in (64, 128, 256)]
REGULAR = [(16, 128, 16, False, 4, 2), (16, 256, 16, False, 4, 2), (32, 128, 16, False, 4, 2),
           (32, 256, 16, False, 8, 2), (64, 128, 16, False, 4, 2), (64, 128, 32, False, 4, 2),
           (64, 256, 16, False, 8, 2), (64, 256, 32, False, 8, 2), (128, 128, 32, False, 8, 2),
           (128, 256, 32, False, 8, 2), (64, 128, 64, False, 4, 2), (64, 128, 32, False, 4, 3)]
CANDIDATES = {"decode": SHORT + REGULAR[:4], "spec": SHORT + REGULAR[:4], "short": SHORT[3:] + REGULAR[:7]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE / "tiles.json")
    ap.add_argument("--classes", nargs="*", help="only these classes (default: all)")
    args = ap.parse_args()

    import torch
    from sgmv import bench, jit
    from sgmv._variants import Tile

    table = json.loads((HERE / "tiles.json").read_text())
    major, minor = torch.cuda.get_device_capability()
    arch = 80 if major == 8 else major * 10 + minor
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    chosen, report = {}, []
    for max_seq, max_rank, cls, shapes in CLASSES:
        if args.classes and cls not in args.classes:
            continue
        cases = [bench.Case(f"{cls} {layout} N{h} r{r}", layout, h, r, a, "bf16", True) for layout, h, r, a in shapes]
        data = [bench.make_sets(torch, c, l2) for c in cases]
        best = None
        for cand in CANDIDATES.get(cls, REGULAR):
            name = "tune_" + "_".join(str(int(v)) for v in cand)
            jit.TILES[name] = Tile(*cand)
            times = []
            for case, (sets, meta) in zip(cases, data):
                fns = [lambda s=s, case=case, meta=meta: jit.sgmv_expand(
                    *s, *meta, len(case.lens), max(case.lens), True, tile=name) for s in sets]
                times.append(bench.graph_time_us(torch, fns))
            gm = math.exp(sum(map(math.log, times)) / len(times))
            report.append(f"{cls:13} {str(cand):32} geomean {gm:8.2f} us  " + " ".join(f"{t:.1f}" for t in times))
            print(report[-1], file=sys.stderr, flush=True)
            if best is None or gm < best[0]:
                best = (gm, cand, times)
        chosen[cls] = best
        del data
        torch.cuda.empty_cache()

    names = {}  # class -> tile name; a tile chosen by several classes is compiled once
    for cls, (gm, cand, times) in chosen.items():
        names[cls] = next((n for n, t in table["tiles"].items() if t == list(cand) and n in names.values()), cls)
        table["tiles"][names[cls]] = list(cand)
        print(f"{cls}: {cand} geomean {gm:.2f} us ({', '.join(f'{t:.1f}' for t in times)})")
    table["rules"][str(arch)] = [[s, r, names[n]] for s, r, n, _ in CLASSES if n in names]
    table["note"] = (f"The tile table. Written by aot/tune.py on {torch.cuda.get_device_name()} (sm_{arch}); "
                     "read by aot/variants.py. See benchmarks/NOTES.md.")
    text = json.dumps(table, indent=1)
    args.out.write_text(re.sub(r"\[\n\s+([^\[\]]*?)\n\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
