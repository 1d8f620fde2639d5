"""Decode-path exploration (JIT): short-path tiles x the adapter-slot target (SHORT_PROGRAMS).
Prints GPU us per launch (graph replay, rotated buffers) per case."""
import torch

import sgmv._variants as V
from sgmv import bench, jit

CASES = [("decode:256", 4096, 16, 4), ("decode:256", 4096, 64, 16), ("decode:64", 4096, 8, 4),
         ("decode:32", 14336, 64, 8), ("decode:128", 8192, 32, 64)]
TILES = [(16, 128, 16, True, 4, 2), (32, 64, 16, True, 4, 2), (32, 64, 16, True, 2, 2), (32, 128, 16, True, 8, 2),
         (64, 64, 16, True, 4, 2), (16, 64, 16, True, 2, 2), (16, 256, 16, True, 4, 2)]
l2 = torch.cuda.get_device_properties(0).L2_cache_size
cases = [bench.Case(f"{l} N{h} r{r} a{a}", l, h, r, a, "bf16", True) for l, h, r, a in CASES]
data = [bench.make_sets(torch, c, l2) for c in cases]
print("tile".ljust(34), "slots".rjust(6), "  ".join(c.name.rjust(24) for c in cases))
for t in TILES:
    name = "x_" + "_".join(map(str, map(int, t)))
    jit.TILES[name] = V.Tile(*t)
    for sp in (256, 1024, 4096, 16384):
        V.SHORT_PROGRAMS = sp
        times = []
        for c, (sets, meta) in zip(cases, data):
            fns = [lambda s=s, c=c, meta=meta: jit.sgmv_expand(*s, *meta, len(c.lens), 1, True, tile=name) for s in sets]
            times.append(bench.graph_time_us(torch, fns))
        print(str(t).ljust(34), str(sp).rjust(6), "  ".join(f"{v:24.1f}" for v in times), flush=True)
