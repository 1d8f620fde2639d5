"""Per-adapter ranks against padding, taken apart (issue 17 item 4; benchmarks/NOTES.md, "Per-adapter
ranks against padding"): the ranks suite's expand batches padded to 64, with ranks 8/16/64, with
every adapter at rank 8 or 64 through lora_ranks, and with the weights stored at rank 8 or 16 (no
padding: the least a ranks scheme could read). GPU only.

    PYTHONPATH=python SGMV_LIBRARY=... python benchmarks/ranks_probe.py OUT.json
"""
import json
import sys

import torch

from sgmv import batch_plan, bench


def main():
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    res = {}
    for prefix in bench.RANKS_LAYOUTS:
        seed, layout, adapters = bench.LAYOUTS[prefix]
        row = {}
        for label, rank, ranks in (("padded64", 64, None),
                                   ("ranks8/16/64", 64, [bench.MIXED_RANKS[a % 3] for a in range(adapters)]),
                                   ("ranks8", 64, [8] * adapters), ("ranks64", 64, [64] * adapters),
                                   ("stored8", 8, None), ("stored16", 16, None)):
            c = bench.Case(f"{prefix} {label}", layout, 4096, rank, adapters, "bf16", True, op="expand", seed=seed,
                           ranks=ranks)
            sets, meta = bench.make_sets(torch, c, l2)
            plan = batch_plan(*meta, len(c.lens), c.tokens, c.adapters)
            for provider in ("ranks",) if ranks else ("plan", "aot"):
                fns = bench._launchers(torch, provider, c, sets, meta, None if provider == "aot" else plan)
                row[f"{label} {provider}"] = round(bench.graph_time_us(torch, fns), 2)
            del sets, plan
            torch.cuda.empty_cache()
        print(prefix, row, flush=True)
        res[prefix] = row
    with open(sys.argv[1], "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
