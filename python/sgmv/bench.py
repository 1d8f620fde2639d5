"""`sgmv bench`: the shape suites, every provider in one run, against the memory-bandwidth floor.

GPU time per launch is CUDA-graph replay (20 launches per graph) over buffer sets rotated so
that each launch finds its operands outside the L2 cache. The floor of a case is the bytes it
must move (inputs, the distinct adapters' weights, output rows read when add_inputs and
written) over the device-to-device copy bandwidth measured in the same run.

Suites: `expand` (the serving batches of the performance issue), `shrink` (LoRA A, bf16 in,
fp32 out), `qkv` (one fused three-slice expand against three calls), `ranks` (adapters of
ranks 8/16/64 stored padded to 64: lora_ranks against reading the padding) and `layer` (the
whole delta of a layer, sgmv.Layer, against sgmv_shrink then sgmv_expand) and `fp8` (expand
and shrink with fp8 e4m3 weights and per-channel scales against the same call with bf16 weights,
decode and mixed batches of 16 or more adapters at ranks 32 and 64, and prefill). The last five
run on the expand suite's batches: same segments, same adapters.
"""
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name, layout, hidden, rank, adapters, dtype, add_inputs. The first twelve are the serving
# batches of the performance issue (same names; peers measured there on the same H100 kind).
SUITE = [
    ("decode 256x1 N4096 r16, 4 adapters", "decode:256", 4096, 16, 4, "bf16", True),
    ("decode 64x1 N14336 r64, 8", "decode:64", 14336, 64, 8, "bf16", True),
    ("decode 128x1 N8192 r32, 64", "decode:128", 8192, 32, 64, "bf16", True),
    ("decode 512x1 N4096 r16, 32", "decode:512", 4096, 16, 32, "bf16", True),
    ("spec 64x4 N4096 r16, 8", "uniform:64:4", 4096, 16, 8, "bf16", True),
    ("mixed 2048+64x1 N4096 r16, 8", "chunked:2048:64", 4096, 16, 8, "bf16", True),
    ("mixed 512+192x1 N6144 r32, 16", "chunked:512:192", 6144, 32, 16, "bf16", True),
    ("mixed 3x700+100x1 N14336 r16, 8", "chunked:700,700,700:100", 14336, 16, 8, "bf16", True),
    ("skewed 4000+8x10 N4096 r16, 4", "skewed:4000:8:10", 4096, 16, 4, "bf16", True),
    ("prefill 8x1024 N4096 r64, 8", "uniform:8:1024", 4096, 64, 8, "bf16", True),
    ("prefill 16x4096 N4096 r32, 4", "uniform:16:4096", 4096, 32, 4, "bf16", True),
    ("prefill 2x4096 N28672 r8, 1", "uniform:2:4096", 28672, 8, 1, "bf16", True),
    ("prefill 4x2048 N14336 r16, 2", "uniform:4:2048", 14336, 16, 2, "bf16", True),
    ("zipf 64 segs N8192 r16, 8 fp16", "zipf:64:16384", 8192, 16, 8, "fp16", True),
    ("decode 256x1 N4096 r16, 4 fp16 noadd", "decode:256", 4096, 16, 4, "fp16", False),
]
# The peers' figures from the issue (us; vLLM lora_expand, SGLang csgmv), H100, same method.
PEERS = {
    "decode 256x1 N4096 r16, 4 adapters": (6.9, 6.2), "decode 64x1 N14336 r64, 8": (15.1, 27.5),
    "decode 128x1 N8192 r32, 64": (22.6, 26.2), "decode 512x1 N4096 r16, 32": (17.1, 11.7),
    "spec 64x4 N4096 r16, 8": (7.1, 6.4), "mixed 2048+64x1 N4096 r16, 8": (21.8, 24.5),
    "mixed 512+192x1 N6144 r32, 16": (18.6, 24.7), "mixed 3x700+100x1 N14336 r16, 8": (68.2, 76.6),
    "skewed 4000+8x10 N4096 r16, 4": (31.8, 46.2), "prefill 8x1024 N4096 r64, 8": (72.7, 368.4),
    "prefill 16x4096 N4096 r32, 4": (472.1, 1076.8), "prefill 2x4096 N28672 r8, 1": (581.9, 518.9),
}
PROVIDERS = ("plan", "aot", "aot-c-plan", "aot-c", "jit-plan", "torch")

# The expand suite's batches by the start of their case name ("decode 256x1"): (the case whose
# name seeds the draw, layout, adapters). The other suites draw from the same seed, so their
# segments and adapters are the expand case's.
LAYOUTS = {}
for _c in SUITE:
    LAYOUTS.setdefault(_c[0].split(" N")[0], (_c[0], _c[1], _c[4]))

SHRINK_LAYOUTS = ("decode 256x1", "decode 512x1", "spec 64x4", "mixed 512+192x1", "mixed 3x700+100x1",
                  "prefill 16x4096", "prefill 4x2048", "prefill 8x1024")
SHRINK_SCALING = 0.5
QKV_LAYOUTS = ("decode 256x1", "decode 512x1", "spec 64x4", "mixed 512+192x1", "mixed 2048+64x1")
QKV_SLICES = (4096, 1024, 1024)
RANKS_LAYOUTS = ("decode 256x1", "decode 512x1", "mixed 512+192x1")
MIXED_RANKS = (8, 16, 64)  # adapter a has rank MIXED_RANKS[a % 3], stored padded to the largest
LAYER_LAYOUTS = ("decode 256x1", "decode 512x1", "spec 64x4", "mixed 2048+64x1", "mixed 512+192x1",
                 "skewed 4000+8x10", "prefill 8x1024", "prefill 4x2048")
LAYER_SHAPES = {"qkv": (4096, 1024, 1024), "gate/up": (14336, 14336)}  # output columns per slice, hidden 4096
# fp8 weights against bf16 (issue 19): batches of 16 or more adapters (decode, mixed) where the
# weights are most of the bytes (target: fp8 / bf16 <= 0.65), and prefill (activation bound: <= 1.05).
FP8_LAYOUTS = ("decode 128x1", "decode 512x1", "mixed 512+192x1", "prefill 8x1024", "prefill 4x2048")

# Each suite's providers; in `qkv` and `ranks` the first over the second is the reported ratio.
SUITES = {
    "expand": PROVIDERS,
    "shrink": ("plan", "aot", "jit-plan", "torch"),
    "qkv": ("fused", "three-calls"),
    "ranks": ("ranks", "padded"),
    "layer": ("layer", "two-calls"),
    "fp8": ("fp8", "bf16"),
}


def segment_lengths(layout, rng):
    kind, *p = layout.split(":")
    if kind == "decode":
        return [1] * int(p[0])
    if kind == "spec":
        lo, _, hi = p[1].partition("-")
        return [rng.randint(int(lo), int(hi or lo)) for _ in range(int(p[0]))]
    if kind == "uniform":
        return [int(p[1])] * int(p[0])
    if kind == "chunked":
        return [int(v) for v in p[0].split(",")] + [1] * int(p[1])
    if kind == "skewed":
        return [int(p[0])] + [int(p[2])] * int(p[1])
    if kind == "zipf":
        n, total = int(p[0]), int(p[1])
        weights = [1 / (r + 1) ** 1.1 for r in range(n)]
        lens = [max(1, round(total * w / sum(weights))) for w in weights]
        rng.shuffle(lens)
        return lens
    raise ValueError(layout)


class Case:
    """One timed problem. op "expand" or "shrink"; slices: the output columns of each fused
    expand slice (default one, `hidden`); ranks: each adapter's rank, its weights stored padded
    to `rank`; seed: what draws the adapters (default the name); target: (what, limit), see
    evaluate(); ratio: the two providers whose GPU times are compared."""

    def __init__(self, name, layout, hidden, rank, adapters, dtype, add, op="expand", slices=None, ranks=None,
                 seed=None, target=None, ratio=None, main="plan", fp8=False):
        rng = random.Random(name if seed is None else seed)
        self.fp8 = fp8  # the sets hold fp8 copies of the weights too (provider "fp8")
        self.name, self.hidden, self.rank, self.adapters, self.dtype, self.add = name, hidden, rank, adapters, dtype, add
        self.op, self.slices, self.ranks = op, tuple(slices or (hidden,)), ranks
        self.target, self.ratio, self.main = target, ratio, main
        self.lens = segment_lengths(layout, rng)
        # Adapters drawn zipf-distributed; batches of 32 or more segments have 1/16 of them at -1.
        self.idx = rng.choices(range(adapters), weights=[1 / (a + 1) for a in range(adapters)], k=len(self.lens))
        if len(self.lens) >= 32:
            for i in rng.sample(range(len(self.lens)), len(self.lens) // 16):
                self.idx[i] = -1
        self.starts = [sum(self.lens[:i]) for i in range(len(self.lens))]
        self.tokens = sum(self.lens)

    def rank_of(self, a):
        return self.rank if self.ranks is None else min(self.ranks[a], self.rank)

    def floor_bytes(self):
        """Bytes that must move: the rows of segments with an adapter (inputs, output read with
        add_inputs and written) and each adapter's weights once, at the adapter's own rank.
        Shrink writes fp32; everything else is 2 bytes an element."""
        rows = {}  # adapter: rows of its segments
        for n, i in zip(self.lens, self.idx):
            if i >= 0:
                rows[i] = rows.get(i, 0) + n
        if self.op == "layer":  # x in, each adapter's A and B once, out read and written; y stays on chip
            x = sum(rows.values()) * self.hidden * 2
            w = sum(self.rank_of(a) * (len(self.slices) * self.hidden + sum(self.slices)) * 2 for a in rows)
            out = sum(rows.values()) * sum(self.slices) * 2 * 2
            return x + w + out
        if self.op == "shrink":
            x = sum(rows.values()) * self.hidden * 2
            w = sum(self.rank_of(a) * self.hidden * 2 for a in rows)
            out = sum(n * self.rank_of(a) * 4 for a, n in rows.items())
            return x + w + out
        x = sum(n * len(self.slices) * self.rank_of(a) * 2 for a, n in rows.items())
        w = sum(self.hidden * self.rank_of(a) * 2 for a in rows)  # hidden: all slices' columns
        out = sum(rows.values()) * self.hidden * 2 * (2 if self.add else 1)
        return x + w + out


def _on_layout(prefix, op, hidden, rank, **kw):
    """A case of another suite on the expand suite's batch `prefix`, bf16, add_inputs for expand."""
    seed, layout, adapters = LAYOUTS[prefix]
    h = "+".join(map(str, kw.get("slices") or (hidden,)))
    r = "/".join(map(str, MIXED_RANKS)) + f" pad {rank}" if kw.get("ranks") else rank
    name = f"{'qkv' if kw.get('slices') and op != 'layer' else op} {prefix} N{h} r{r}, {adapters}"
    return Case(name, layout, hidden, rank, adapters, "bf16", op != "shrink", op=op, seed=seed, **kw)


def suite_cases(suite):
    """The cases of one suite (SUITES' keys), with the issue's targets."""
    if suite == "expand":
        return [Case(*c) for c in SUITE]
    cases = []
    if suite == "shrink":
        # Hidden 4096 at ranks 16/32/64, and hidden 8192 once for decode (split-K's K) and prefill.
        shapes = [(p, 4096, r) for p in SHRINK_LAYOUTS for r in (16, 32, 64)]
        for prefix, hidden, rank in shapes + [("decode 256x1", 8192, 16), ("prefill 4x2048", 8192, 16)]:
            c = _on_layout(prefix, "shrink", hidden, rank)
            if c.tokens >= 4096:
                c.target = ("pct_floor", 80)
            if (prefix, hidden, rank) == ("decode 256x1", 4096, 16):
                c.target = ("gpu_us", 5)
            cases.append(c)
    if suite == "qkv":
        for prefix in QKV_LAYOUTS:
            cases.append(_on_layout(prefix, "expand", sum(QKV_SLICES), 16, slices=QKV_SLICES,
                                    target=("ratio", 0.7), ratio=SUITES["qkv"]))
    if suite == "ranks":
        for op in ("expand", "shrink"):
            for prefix in RANKS_LAYOUTS:
                ranks = [MIXED_RANKS[a % 3] for a in range(LAYOUTS[prefix][2])]
                target = ("ratio", 0.8) if op == "expand" else None  # issue 17 item 4: expand ranks <= 0.8x padded
                cases.append(_on_layout(prefix, op, 4096, max(MIXED_RANKS), ranks=ranks, target=target,
                                        ratio=SUITES["ranks"]))
    if suite == "layer":
        for shape, outs in LAYER_SHAPES.items():
            for prefix in LAYER_LAYOUTS:
                c = _on_layout(prefix, "layer", 4096, 16, slices=outs, ratio=SUITES["layer"], main="layer")
                c.name = f"{shape} " + c.name
                c.target = ("ratio", 0.75)
                if (shape, prefix) == ("qkv", "decode 256x1"):
                    c.target = ("gpu_us", 8)
                elif c.tokens >= 4096:
                    c.target = ("pct_floor", 85)
                cases.append(c)
        for prefix in ("decode 256x1", "mixed 512+192x1"):
            ranks = [MIXED_RANKS[a % 3] for a in range(LAYOUTS[prefix][2])]
            c = _on_layout(prefix, "layer", 4096, max(MIXED_RANKS), slices=LAYER_SHAPES["qkv"], ranks=ranks,
                           ratio=SUITES["layer"], main="layer")
            c.name = "qkv " + c.name
            cases.append(c)
    if suite == "fp8":
        for op in ("expand", "shrink"):
            for prefix in FP8_LAYOUTS:
                prefill = prefix.startswith("prefill")
                for rank in (32,) if prefill else (32, 64):
                    c = _on_layout(prefix, op, 4096, rank, ratio=SUITES["fp8"], main="fp8", fp8=True,
                                   target=("ratio", 1.05 if prefill else 0.65))
                    c.name = "fp8 " + c.name
                    cases.append(c)
    return cases


TARGET_TEXT = {"pct_floor": "{} >= {}% of floor", "gpu_us": "{} <= {} us", "ratio": "{} <= {}"}


def evaluate(case, by_provider):
    """The case's ratio (first over second of case.ratio) and target against its results
    ({provider: result}); value None where a provider has no time."""
    ev = {}
    if case.ratio:
        num, den = (by_provider.get(p, {}).get("gpu_us") for p in case.ratio)
        ev["ratio_of"] = "/".join(case.ratio)
        ev["ratio"] = num / den if num and den else None
    if case.target:
        what, limit = case.target
        value = ev["ratio"] if what == "ratio" else by_provider.get(case.main, {}).get(what)
        ev["what"] = what
        ev["target"] = TARGET_TEXT[what].format(ev["ratio_of"] if what == "ratio" else case.main, limit)
        ev["value"] = value
        ev["met"] = None if value is None else (value >= limit if what == "pct_floor" else value <= limit)
    return ev


def _copy_bandwidth(torch):
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")  # 1 GiB each way
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        e0.record()
        b.copy_(a)
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / 1e3)
    return 2 * a.numel() / sorted(times)[len(times) // 2]


def graph_time_us(torch, launches, per_graph=20, replays=20):
    """Median GPU time per launch, replaying a graph of `per_graph` launches cycling through `launches`."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in launches[:3]:
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(per_graph):
            launches[i % len(launches)]()
    for _ in range(3):
        g.replay()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3 / per_graph)
    del g
    return sorted(times)[len(times) // 2]


def host_time_us(torch, launches, calls=100, reps=10):
    """Best host time per call for calls enqueued back to back just after a sync."""
    best = math.inf
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(calls):
            launches[i % len(launches)]()
        best = min(best, (time.perf_counter() - t0) / calls)
    torch.cuda.synchronize()
    return best * 1e6


def host_call_us(torch, calls=2000, reps=3):
    """Host time per eager call on a tiny problem (4 single-row segments, hidden 64, rank 16): the
    best of `reps` runs of `calls` calls, for each way to call the library from Python."""
    from . import binding
    x = torch.randn(4, 16, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(2, 64, 16, dtype=torch.bfloat16, device="cuda")
    out = torch.randn(4, 64, dtype=torch.bfloat16, device="cuda")
    meta = [torch.tensor(v, dtype=torch.int32, device="cuda") for v in ([0, 1, 2, 3], [1] * 4, [0, 1, 0, 1])]
    plan = binding.batch_plan(*meta, 4, 4, 2)
    a = torch.randn(2, 16, 64, dtype=torch.bfloat16, device="cuda")
    xl, y = torch.randn(4, 64, dtype=torch.bfloat16, device="cuda"), torch.empty(4, 16, dtype=torch.bfloat16,
                                                                                  device="cuda")
    layer = binding.Layer(a, w)
    scratch = torch.empty(binding.step_scratch_bytes(4, 4, 16), dtype=torch.uint8, device="cuda")
    step = binding.Step(*meta, 4, 1, total_tokens=4, num_loras=2, scratch=scratch)
    op_args = (xl, out, [a], [w], *meta, None, 4, 1, 4, 2, scratch)
    torch.ops.sgmv.layer(*op_args)
    ways = {"sgmv.Layer call (shrink + expand)": lambda: layer(xl, out, step),
            "torch.ops.sgmv.layer": lambda: torch.ops.sgmv.layer(*op_args),
            "sgmv.Step (describe + plan)": lambda: binding.Step(*meta, 4, 1, total_tokens=4, num_loras=2,
                                                                scratch=scratch),
            "sgmv.sgmv_shrink + sgmv_expand, plan": lambda: (
                binding.sgmv_shrink(xl, a, y, *meta, 4, 1, batch_plan=plan),
                binding.sgmv_expand(y, w, out, *meta, 4, 1, True, batch_plan=plan)),
            "sgmv.sgmv_expand": lambda: binding.sgmv_expand(x, w, out, *meta, 4, 1, True),
            "sgmv.sgmv_expand, plan": lambda: binding.sgmv_expand(x, w, out, *meta, 4, 1, True, batch_plan=plan),
            "torch.ops.sgmv.expand": lambda: torch.ops.sgmv.expand(x, w, out, *meta, 4, 1, True),
            "sgmv.batch_plan": lambda: binding.batch_plan(*meta, 4, 4, 2, out=plan)}
    got = {}
    for name, fn in ways.items():
        best = math.inf
        for _ in range(reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            best = min(best, (time.perf_counter() - t0) / calls)
            torch.cuda.synchronize()
        got[name] = best * 1e6
    c = _c_layer_host()
    if c:
        got.update({"C sgmv_layer_apply": c["layer_apply_us"], "C sgmv_step_plan": c["step_plan_us"],
                    "C sgmv_shrink + sgmv_expand": c["shrink_expand_us"],
                    "C sgmv_layer_apply, best of 20 x 200 (queue never full)": c["layer_apply_200_us"],
                    "C cuLaunchKernel of an empty kernel (the host's floor per launch)": c["empty_launch_us"]})
    return got


def _c_tool(name):
    """benchmarks/c/<name>.c compiled here against the loaded library (None without its source or gcc)."""
    from . import capi
    src = Path(os.path.abspath(__file__)).parent / "bench_c" / f"{name}.c"
    if not src.exists():  # a source checkout
        src = Path(os.path.abspath(__file__)).parent.parent.parent / "benchmarks" / "c" / f"{name}.c"
    if not src.exists() or not shutil.which("gcc"):
        return None
    import triton.backends.nvidia as nv
    exe = Path(tempfile.gettempdir()) / f"sgmv_{name}_{os.getpid()}"
    if not exe.exists():
        lib = capi.library_path()
        subprocess.run(["gcc", "-std=c99", "-O2", "-D_POSIX_C_SOURCE=199309L", "-I", str(capi.INCLUDE_DIR),
                        "-I", str(Path(nv.__file__).parent / "include"), str(src), "-L", str(lib.parent),
                        f"-l:{lib.name}", f"-Wl,-rpath,{lib.parent}", "-lcuda", "-o", str(exe)], check=True)
    return exe


def _c_layer_host():
    exe = _c_tool("layer_host")
    if exe is None:
        return None
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    if r.returncode:
        raise RuntimeError(r.stderr.strip())
    return json.loads(r.stdout)


def make_sets(torch, case, l2_bytes, device="cuda"):
    """Buffer sets (x, weights, out) enough to overflow the L2 four times when cycled, and the
    metadata (seq_start, seq_len, lora_indices). Weights are a tuple of the slices' stacks for a
    fused case; with case.ranks the padding past an adapter's rank is zero."""
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[case.dtype]
    per_set = case.floor_bytes()
    n = min(64, max(2, math.ceil(4 * l2_bytes / per_set)))
    meta = [torch.tensor(v, dtype=torch.int32, device=device) for v in (case.starts, case.lens, case.idx)]
    sets = []
    for _ in range(n):
        if case.op == "layer":  # x, A and B stacks per slice, out
            x = torch.randn(case.tokens, case.hidden, dtype=dt, device=device)
            a = tuple(torch.randn(case.adapters, case.rank, case.hidden, dtype=dt, device=device) * 0.05
                      for _ in case.slices)
            b = tuple(torch.randn(case.adapters, h, case.rank, dtype=dt, device=device) * 0.1 for h in case.slices)
            out = torch.randn(case.tokens, sum(case.slices), dtype=dt, device=device)
            for r_ in range(len(case.ranks or ())):
                r = case.ranks[r_]
                for w in a:
                    w[r_, r:].zero_()
                for w in b:
                    w[r_, :, r:].zero_()
            sets.append((x, a, b, out))
            continue
        if case.op == "shrink":  # fp32 output, as LoRAX and vLLM keep it between shrink and expand
            x = torch.randn(case.tokens, case.hidden, dtype=dt, device=device)
            ws = [torch.randn(case.adapters, case.rank, case.hidden, dtype=dt, device=device) * 0.1]
            out = torch.randn(case.tokens, case.rank, dtype=torch.float32, device=device)
        else:
            x = torch.randn(case.tokens, len(case.slices) * case.rank, dtype=dt, device=device)
            ws = [torch.randn(case.adapters, h, case.rank, dtype=dt, device=device) * 0.1 for h in case.slices]
            out = torch.randn(case.tokens, case.hidden, dtype=dt, device=device)
        for w in ws:
            for a, r in enumerate(case.ranks or ()):
                (w[a, r:] if case.op == "shrink" else w[a, :, r:]).zero_()
        sets.append((x, ws[0] if len(ws) == 1 else tuple(ws), out))
        if case.fp8:  # the same weights in fp8 with a scale per adapter and output channel
            scale = (ws[0].abs().amax(dim=2).float() / 448).clamp_min(2.0 ** -30)
            sets[-1] += ((ws[0].float() / scale[:, :, None]).to(torch.float8_e4m3fn), scale)
    return sets, meta


def _c_bench(case, nsets, plan):
    """(gpu_us, host_us) from benchmarks/c/bench.c, compiled here against the installed library."""
    exe = _c_tool("bench")
    if exe is None:
        return None
    r = subprocess.run([str(exe), str(case.hidden), str(case.rank), str(case.adapters),
                        "1" if case.dtype == "bf16" else "0", str(int(case.add)), str(nsets),
                        ",".join(map(str, case.lens)), ",".join(map(str, case.idx)), str(int(plan))],
                       capture_output=True, text=True, timeout=120)
    if r.returncode:
        raise RuntimeError(r.stderr.strip())
    return json.loads(r.stdout)


def _launchers(torch, provider, case, sets, meta, plan):
    """One callable per buffer set: `provider`'s call of the case on that set."""
    from . import binding, jit
    batches, max_len = len(case.lens), max(case.lens)
    if provider == "plan-build":
        return [lambda: binding.batch_plan(*meta, batches, case.tokens, case.adapters, out=plan)]
    if provider == "torch":
        return _torch_launchers(torch, case, sets)
    if case.op == "layer":
        return _layer_launchers(torch, provider, case, sets, meta, plan)
    kw = {} if provider == "aot" else {"batch_plan": plan}
    if case.fp8:  # the library with the plan, on the fp8 copy of the weights or on the bf16 ones
        fn, last = (binding.sgmv_shrink, SHRINK_SCALING) if case.op == "shrink" else (binding.sgmv_expand, case.add)
        if case.op == "shrink":
            kw["workspace"] = binding.new_workspace(sets[0][2], case.tokens, case.rank)
        if provider == "fp8":
            return [lambda s=s: fn(s[0], s[3], s[2], *meta, batches, max_len, last, weight_scales=s[4], **kw)
                    for s in sets]
        return [lambda s=s: fn(*s[:3], *meta, batches, max_len, last, **kw) for s in sets]
    if provider == "ranks":
        kw["lora_ranks"] = torch.tensor(case.ranks, dtype=torch.int32, device=meta[0].device)
    if case.op == "shrink":
        # The binding's workspace, allocated once here as a caller does once per step (None: no split).
        kw["workspace"] = binding.new_workspace(sets[0][2], case.tokens, case.rank)
        fn = jit.sgmv_shrink if provider == "jit-plan" else binding.sgmv_shrink
        return [lambda s=s: fn(*s, *meta, batches, max_len, SHRINK_SCALING, **kw) for s in sets]
    fn = jit.sgmv_expand if provider == "jit-plan" else binding.sgmv_expand
    if provider == "three-calls":
        return [lambda v=_slice_views(case, s): [fn(*a, *meta, batches, max_len, case.add, **kw) for a in v]
                for s in sets]
    return [lambda s=s: fn(*s, *meta, batches, max_len, case.add, **kw) for s in sets]


def _layer_launchers(torch, provider, case, sets, meta, plan):
    """The whole delta of a layer: one sgmv.Layer call (the step described and planned once,
    outside the timing, as once per step), or sgmv_shrink into an fp32 intermediate (as LoRAX and
    vLLM keep it) then sgmv_expand, both with the plan."""
    from . import binding
    batches, max_len = len(case.lens), max(case.lens)
    ranks = None if case.ranks is None else torch.tensor(case.ranks, dtype=torch.int32, device=meta[0].device)
    cols = len(case.slices) * case.rank
    if provider == "layer":
        step = binding.Step(*meta, batches, max_len, total_tokens=case.tokens, num_loras=case.adapters,
                            max_columns=cols)
        layers = [binding.Layer(a, b, lora_ranks=ranks, scaling=SHRINK_SCALING) for _, a, b, _ in sets]
        return [lambda lay=lay, s=s: lay(s[0], s[3], step) for lay, s in zip(layers, sets)]
    y = torch.empty(case.tokens, cols, dtype=torch.float32, device=meta[0].device)
    ws = binding.new_workspace(y, case.tokens, cols)

    def two(x, a, b, out):
        binding.sgmv_shrink(x, a, y, *meta, batches, max_len, SHRINK_SCALING, lora_ranks=ranks, batch_plan=plan,
                            workspace=ws)
        binding.sgmv_expand(y, b, out, *meta, batches, max_len, True, plan, lora_ranks=ranks)
    return [lambda s=s: two(*s) for s in sets]


def _slice_views(case, s):
    """A fused expand's set as one (inputs, weights, output) per slice: column views."""
    x, ws, out = s
    views, col = [], 0
    for i, (w, h) in enumerate(zip(ws, case.slices)):
        views.append((x[:, i * case.rank:(i + 1) * case.rank], w, out[:, col:col + h]))
        col += h
    return views


def _torch_launchers(torch, case, sets):
    """Plain torch. Expand: an addmm per segment. Shrink: cuBLAS writing fp32 scaled (out_dtype,
    alpha), a GEMM per segment for up to 32 segments, else one GEMM against every adapter's A
    stacked, each valid row then taking its adapter's columns (the faster way for many short
    segments: 3 kernels instead of one per segment)."""
    # Segments at -1 are skipped: they have no adapter (w[-1] would be the last one's).
    segs = [(st, n, i) for st, n, i in zip(case.starts, case.lens, case.idx) if i >= 0]
    if case.op == "expand":
        def loop(x, w, out):
            for st, n, i in segs:
                o = out[st:st + n]
                if case.add:
                    o.addmm_(x[st:st + n], w[i].T)
                else:
                    torch.mm(x[st:st + n], w[i].T, out=o)
        return [lambda s=s: loop(*s) for s in sets]
    f32, scale, r = torch.float32, SHRINK_SCALING, case.rank
    if len(case.lens) <= 32:
        def per_segment(x, a, out):
            for st, n, i in segs:
                o = out[st:st + n]
                torch.addmm(o, x[st:st + n], a[i].T, beta=0, alpha=scale, out_dtype=f32, out=o)
        return [lambda s=s: per_segment(*s) for s in sets]
    dev, cols = sets[0][0].device, case.adapters * r
    rows = torch.tensor([st + m for st, n, _ in segs for m in range(n)], dtype=torch.int64, device=dev)
    row_adapter = torch.tensor([i for _, n, i in segs for _ in range(n)], dtype=torch.int64, device=dev)
    take = (rows * cols + row_adapter * r)[:, None] + torch.arange(r, device=dev)
    y = torch.empty(case.tokens, cols, dtype=f32, device=dev)

    def stacked(x, a, out):
        torch.addmm(y, x, a.view(cols, -1).T, beta=0, alpha=scale, out_dtype=f32, out=y)
        out.index_copy_(0, rows, torch.take(y, take))
    return [lambda s=s: stacked(*s) for s in sets]


SUITE_TITLES = {
    "expand": "Expand (LoRA B), the performance issue's batches",
    "shrink": f"Shrink (LoRA A): bf16 in, fp32 out, scaling {SHRINK_SCALING}; floor: input rows, distinct "
              "adapters' A, fp32 output written",
    "qkv": "Fused QKV expand (slices " + "/".join(map(str, QKV_SLICES)) + ", rank 16, bf16, add_inputs): one call "
           "against three on column views",
    "ranks": "Adapters of ranks " + "/".join(map(str, MIXED_RANKS)) + " stored padded to 64 (hidden 4096, bf16): "
             "lora_ranks against the same call reading the padding; floor at each adapter's rank",
    "fp8": "fp8 e4m3 weights with a float32 scale per adapter and output channel against bf16 weights (hidden 4096, "
           "bf16 activations; expand with add_inputs, shrink fp32 out), both with the plan; floor: the bf16 call's",
    "layer": "The whole LoRA delta of a layer (hidden 4096, bf16, add_inputs): one sgmv.Layer call against "
             "sgmv_shrink (fp32 out) then sgmv_expand, both with the plan; floor: x, each adapter's A and B, "
             "out read and written (the intermediate never leaving the chip)",
}


def run(out_dir, providers=None, cases=None, suites=None, progress=True):
    """Times `suites` (default all of SUITES), each with its providers that are in `providers`
    (default all), on the cases whose name contains one of `cases` (default all)."""
    try:
        import torch
    except ImportError:
        print("sgmv bench: needs torch (pip install torch) and a CUDA GPU")
        return 2
    from . import binding
    if not torch.cuda.is_available():
        print("sgmv bench: no CUDA GPU visible to torch: there is nothing to time on this machine.")
        return 2
    suites = list(SUITES) if suites is None else list(suites)
    work = []  # (suite, case, providers)
    for suite in suites:
        ps = [p for p in SUITES[suite] if providers is None or p in providers]
        work += [(suite, c, ps) for c in suite_cases(suite)
                 if ps and (cases is None or any(k in c.name for k in cases))]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    bw = _copy_bandwidth(torch)
    results, evaluations = [], []
    total, done = sum(len(ps) for _, _, ps in work), 0
    for suite, case, ps in work:
        sets, meta = make_sets(torch, case, l2)
        plan = binding.batch_plan(*meta, len(case.lens), case.tokens, case.adapters)
        floor_us = case.floor_bytes() / bw * 1e6
        build = _launchers(torch, "plan-build", case, sets, meta, plan)
        plan_build = dict(gpu_us=graph_time_us(torch, build), host_us=host_time_us(torch, build))
        by_provider = {}
        for provider in ps:
            if progress:  # a bar on a terminal, a line per step in a log
                bar = "#" * (30 * done // total)
                tty = sys.stderr.isatty()
                print(f"{chr(13) if tty else ''}[{bar:30}] {done}/{total} {case.name[:36]:36} {provider:6}",
                      end="" if tty else "\n", file=sys.stderr, flush=True)
            done += 1
            r = dict(case=case.name, provider=provider, floor_us=floor_us, tokens=case.tokens,
                     hidden=case.hidden, rank=case.rank, segments=len(case.lens), plan_build=plan_build,
                     suite=suite, op=case.op)
            try:
                if provider in ("aot-c", "aot-c-plan"):
                    got = _c_bench(case, len(sets), provider == "aot-c-plan")
                    if got is None:
                        continue
                    r.update(got)
                else:
                    fns = _launchers(torch, provider, case, sets, meta, plan)
                    r["gpu_us"] = graph_time_us(torch, fns)
                    r["host_us"] = host_time_us(torch, fns)
                r["pct_floor"] = 100 * floor_us / r["gpu_us"]
                r["gbps"] = case.floor_bytes() / r["gpu_us"] / 1e3
            except Exception as e:  # a provider that fails is reported, not fatal
                r["error"] = f"{type(e).__name__}: {e}"[:200]
            results.append(r)
            by_provider[provider] = r
        ev = evaluate(case, by_provider)
        if ev:
            evaluations.append(dict(suite=suite, case=case.name, **ev))
        del sets, plan
        torch.cuda.empty_cache()
    if progress:
        print(f"\r[{'#' * 30}] {total}/{total}" + " " * 50, file=sys.stderr)

    meta = dict(device=props.name, copy_bandwidth_tbps=bw / 1e12, l2_bytes=l2, torch=torch.__version__,
                command="sgmv bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 1 else "sgmv bench",
                suites=suites)
    host = host_call_us(torch) if "expand" in suites or "layer" in suites else {}
    (out_dir / "results.json").write_text(json.dumps(dict(meta=meta, results=results, host_call_us=host,
                                                          cases=evaluations), indent=1))
    tables = []
    for suite in suites:
        rs = [r for r in results if r["suite"] == suite]
        if rs:
            ps = [p for p in SUITES[suite] if providers is None or p in providers]
            table = (format_table(rs, ps) if suite == "expand" else
                     format_suite_table(rs, ps, [e for e in evaluations if e["suite"] == suite]))
            tables.append(f"{SUITE_TITLES[suite]}:\n\n{table}")
            _plot(rs, ps, out_dir / ("results.png" if suite == "expand" else f"results-{suite}.png"), props.name,
                  suite)
    host_lines = "\n".join(f"- {k}: {v:.1f} us" for k, v in host.items())
    host_md = f"\nHost time per eager Python call (tiny problem, best of 3 x 2000 calls):\n\n{host_lines}\n"
    (out_dir / "results.md").write_text(
        f"{props.name}, copy bandwidth {bw / 1e12:.2f} TB/s; GPU us per launch (% of floor)\n\n" +
        "\n\n".join(tables) + "\n" + (host_md if host else ""))
    print(f"{props.name}: copy bandwidth {bw / 1e12:.2f} TB/s; GPU us per launch (% of the floor)")
    print("\n\n".join(tables))
    if host:
        print("host time per eager call (tiny problem, best of 3 x 2000):", ", ".join(f"{k} {v:.1f} us"
                                                                                 for k, v in host.items()))
    _summary(results)
    for e in evaluations:
        if "target" in e:
            print(f"target: {e['case']:48} {e['target']:28} {_target_cell(e)}")
    print(f"written: {out_dir}/results.json, results.md, results*.png")
    return 0


def _time_cells(by_provider, providers):
    """'GPU us (% of floor)' for each provider, or the start of its error."""
    cells = []
    for p in providers:
        r = by_provider.get(p, {})
        cells.append(f"{r['gpu_us']:.1f} ({r['pct_floor']:.0f}%)" if "gpu_us" in r else r.get("error", "-")[:20])
    return cells


def format_table(results, providers):
    cases = list(dict.fromkeys(r["case"] for r in results))
    head = ("| case | floor us | " + " | ".join(providers) +
            " | vLLM / SGLang (issue) | plan build us (GPU / host) | host us (C / C plan / py / py plan) |")
    lines = [head, "|" + "---|" * (len(providers) + 5)]
    for c in cases:
        rs = {r["provider"]: r for r in results if r["case"] == c}
        cells = _time_cells(rs, providers)
        host = " / ".join(f"{rs[p]['host_us']:.1f}" if "host_us" in rs.get(p, {}) else "-"
                          for p in ("aot-c", "aot-c-plan", "aot", "plan"))
        first = next(iter(rs.values()))
        peers = " / ".join(f"{v:.1f}" for v in PEERS[c]) if c in PEERS else "-"
        build = first["plan_build"]
        lines.append(f"| {c} | {first['floor_us']:.1f} | " + " | ".join(cells) +
                     f" | {peers} | {build['gpu_us']:.1f} / {build['host_us']:.1f} | {host} |")
    return "\n".join(lines)


def _summary(results):
    """Each issue case: the plan path against the faster peer."""
    for r in results:
        if r["provider"] == "plan" and "gpu_us" in r and r["case"] in PEERS:
            best = min(PEERS[r["case"]])
            print(f"{r['case']:36} plan {r['gpu_us']:7.1f} us, faster peer {best:7.1f} us: "
                  f"{best / r['gpu_us']:.2f}x")


def _target_cell(e):
    """'value met' / 'value MISSED' / '-' for an evaluation with a target."""
    if e.get("met") is None:
        return "-"
    v = e["value"]
    shown = {"pct_floor": f"{v:.0f}%", "gpu_us": f"{v:.1f} us", "ratio": f"{v:.2f}"}[e["what"]]
    return f"{shown} {'met' if e['met'] else 'MISSED'}"


def format_suite_table(results, providers, evaluations):
    """A shrink, qkv or ranks table: GPU us (% of floor) per provider, the ratio where the suite
    has one, the target and its outcome."""
    cases = list(dict.fromkeys(r["case"] for r in results))
    evs = {e["case"]: e for e in evaluations}
    ratio_of = next((e["ratio_of"] for e in evaluations if "ratio_of" in e), None)
    head = ("| case | floor us | " + " | ".join(providers) + (f" | {ratio_of}" if ratio_of else "") +
            " | target | plan build us (GPU / host) |")
    lines = [head, "|" + "---|" * (len(providers) + 4 + bool(ratio_of))]
    for c in cases:
        rs = {r["provider"]: r for r in results if r["case"] == c}
        cells = _time_cells(rs, providers)
        e = evs.get(c, {})
        if ratio_of:
            cells.append("-" if e.get("ratio") is None else f"{e['ratio']:.2f}")
        cells.append(f"{e['target']}: {_target_cell(e)}" if "target" in e else "-")
        first = next(iter(rs.values()))
        build = first["plan_build"]
        lines.append(f"| {c} | {first['floor_us']:.1f} | " + " | ".join(cells) +
                     f" | {build['gpu_us']:.1f} / {build['host_us']:.1f} |")
    return "\n".join(lines)


def _plot(results, providers, path, device, suite="expand"):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib not installed: no {path.name}")
        return
    cases = list(dict.fromkeys(r["case"] for r in results))
    fig, ax = plt.subplots(figsize=(max(10, len(cases) * 0.6), 6))
    width = 0.8 / len(providers)
    for i, p in enumerate(providers):
        ys = [next((r.get("pct_floor", 0) for r in results if r["case"] == c and r["provider"] == p), 0) for c in cases]
        ax.bar([j + i * width for j in range(len(cases))], ys, width, label=p)
    ax.set_xticks([j + 0.4 for j in range(len(cases))])
    ax.set_xticklabels(cases, rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("% of the memory-bandwidth floor")
    ax.set_title(f"SGMV {suite}, {device}: GPU time per launch against the floor")
    ax.axhline(100, color="k", lw=0.5)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
