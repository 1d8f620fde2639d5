"""`sgmv bench`'s suites without a GPU: the cases' batches, floors and targets (pure Python), and
each provider's calls run once on small CPU tensors (the library's calls by the torch reference,
the JIT under Triton's interpreter) against a float64 expectation, so that a provider computing
something else than its case fails here rather than being timed."""
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

import sgmv.binding
import sgmv.jit
import sgmv.reference
from sgmv import bench
from conftest import DEVICE, HAS_GPU

ROOT = Path(__file__).resolve().parent.parent


def valid_rows(case):
    """{adapter: rows of its segments}, from the case's metadata."""
    got = Counter()
    for n, i in zip(case.lens, case.idx):
        if i >= 0:
            got[i] += n
    return got


def test_expand_suite_floors_are_those_of_the_committed_run():
    committed = json.loads((ROOT / "benchmarks" / "results" / "results.json").read_text())
    bw = committed["meta"]["copy_bandwidth_tbps"] * 1e12
    floors = {r["case"]: r["floor_us"] * bw / 1e6 for r in committed["results"]}
    cases = bench.suite_cases("expand")
    assert [c.name for c in cases] == [c[0] for c in bench.SUITE]
    for c in cases:
        assert c.floor_bytes() == pytest.approx(floors[c.name], rel=1e-9), c.name


LAYOUT_LENS = {
    "decode 256x1": [1] * 256, "decode 512x1": [1] * 512, "decode 128x1": [1] * 128, "spec 64x4": [4] * 64,
    "mixed 512+192x1": [512] + [1] * 192, "mixed 3x700+100x1": [700] * 3 + [1] * 100,
    "mixed 2048+64x1": [2048] + [1] * 64, "prefill 16x4096": [4096] * 16, "prefill 4x2048": [2048] * 4,
    "prefill 8x1024": [1024] * 8, "skewed 4000+8x10": [4000] + [10] * 8,
}


@pytest.mark.parametrize("suite", ["shrink", "qkv", "ranks", "layer", "fp8"])
def test_new_suites_run_on_the_expand_suites_batches(suite):
    expand = {}
    for c in bench.suite_cases("expand"):  # the first case of each batch (the issue's)
        expand.setdefault(c.name.split(" N")[0], c)
    for c in bench.suite_cases(suite):
        prefix = next(p for p in LAYOUT_LENS if f" {p} N" in c.name)
        assert c.lens == LAYOUT_LENS[prefix], c.name
        assert c.starts == [sum(c.lens[:i]) for i in range(len(c.lens))] and c.tokens == sum(c.lens)
        same = expand[prefix]  # the same segments and adapters as the expand case of that batch
        assert (c.idx, c.adapters) == (same.idx, same.adapters), c.name
        assert c.idx.count(-1) == (len(c.lens) // 16 if len(c.lens) >= 32 else 0), c.name


def test_suite_contents_and_names():
    shrink, qkv, ranks = (bench.suite_cases(s) for s in ("shrink", "qkv", "ranks"))
    names = [c.name for s in bench.SUITES for c in bench.suite_cases(s)]
    assert len(names) == len(set(names))
    assert sorted((c.hidden, c.rank) for c in shrink) == sorted([(4096, r) for r in (16, 32, 64)] * 8 + [(8192, 16)] * 2)
    assert all(c.op == "shrink" and c.dtype == "bf16" and c.ranks is None for c in shrink)
    assert len(qkv) == 5 and all(c.slices == (4096, 1024, 1024) and c.hidden == 6144 and c.rank == 16 and c.add
                                 for c in qkv)
    assert [c.op for c in ranks] == ["expand"] * 3 + ["shrink"] * 3
    for c in ranks:
        assert c.rank == 64 and c.hidden == 4096 and c.ranks == [(8, 16, 64)[a % 3] for a in range(c.adapters)]
    assert all(c.ratio == ("fused", "three-calls") for c in qkv) and all(c.ratio == ("ranks", "padded") for c in ranks)


def test_fp8_suite_cases_and_targets():
    """Issue 19: expand and shrink with fp8 weights against bf16 on decode and mixed batches of 16
    or more adapters at ranks >= 32 (<= 0.65x), and on prefill (within 5 %)."""
    cases = bench.suite_cases("fp8")
    assert {c.op for c in cases} == {"expand", "shrink"} and all(c.fp8 and c.dtype == "bf16" for c in cases)
    assert all(c.ratio == ("fp8", "bf16") and c.main == "fp8" for c in cases)
    for c in cases:
        prefill = " prefill " in c.name
        assert c.target == ("ratio", 1.05 if prefill else 0.65), c.name
        if not prefill:
            assert c.adapters >= 16 and c.rank >= 32, c.name
    assert sum(" decode " in c.name or " mixed " in c.name for c in cases) == 12


def test_targets_are_the_issues():
    shrink = bench.suite_cases("shrink")
    targets = {c.name: c.target for c in shrink if c.target}
    assert targets.pop("shrink decode 256x1 N4096 r16, 4") == ("gpu_us", 5)
    prefill = [c.name for c in shrink if c.name.startswith("shrink prefill")]
    assert len(prefill) == 10 and targets == {n: ("pct_floor", 80) for n in prefill}
    assert all(c.target == ("ratio", 0.7) for c in bench.suite_cases("qkv"))
    ranks = bench.suite_cases("ranks")
    assert {c.name: c.target for c in ranks if c.target} == {
        c.name: ("ratio", 0.8) for c in ranks if c.name.startswith("expand")} and len(ranks) == 6


def test_layer_suite_cases_targets_and_floor():
    cases = bench.suite_cases("layer")
    assert len(cases) == 2 * len(bench.LAYER_LAYOUTS) + 2
    assert all(c.op == "layer" and c.hidden == 4096 and c.add and c.main == "layer" and
               c.ratio == ("layer", "two-calls") for c in cases)
    assert {c.slices for c in cases} == {(4096, 1024, 1024), (14336, 14336)}
    targets = {c.name: c.target for c in cases if c.target}
    assert targets.pop("qkv layer decode 256x1 N4096+1024+1024 r16, 4") == ("gpu_us", 8)
    big = {n: t for n, t in targets.items() if t[0] == "pct_floor"}
    assert big and all(t == ("pct_floor", 85) for t in big.values())
    assert all(t == ("ratio", 0.75) for n, t in targets.items() if n not in big)
    for c in cases:
        rows = valid_rows(c)
        t = sum(rows.values())
        r = {a: c.rank_of(a) for a in rows}
        want = (t * 4096 * 2 + sum(r[a] * (len(c.slices) * 4096 + sum(c.slices)) * 2 for a in rows) +
                t * sum(c.slices) * 2 * 2)
        assert c.floor_bytes() == want, c.name
    ev = bench.evaluate(cases[0], {"layer": {"gpu_us": 7.5}, "two-calls": {"gpu_us": 13.0}})
    assert ev["met"] is True and ev["target"] == "layer <= 8 us"


def test_shrink_floor():
    for c in bench.suite_cases("shrink"):
        rows = valid_rows(c)
        t = sum(rows.values())
        assert c.floor_bytes() == t * c.hidden * 2 + len(rows) * c.rank * c.hidden * 2 + t * c.rank * 4, c.name
    c = bench.suite_cases("shrink")[0]
    assert c.name == "shrink decode 256x1 N4096 r16, 4"
    # 240 rows (16 of 256 segments at -1), all 4 adapters drawn: inputs, A, fp32 output.
    assert c.floor_bytes() == 240 * 4096 * 2 + 4 * 16 * 4096 * 2 + 240 * 16 * 4 == 2505728


def test_qkv_floor():
    for c in bench.suite_cases("qkv"):
        rows = valid_rows(c)
        t = sum(rows.values())
        # inputs: 3 slices x rank 16; weights: 6144 x 16 per adapter; output read and written.
        assert c.floor_bytes() == t * 48 * 2 + len(rows) * 6144 * 16 * 2 + t * 6144 * 2 * 2, c.name


def test_mixed_ranks_floor_counts_each_adapters_own_rank():
    for c in bench.suite_cases("ranks"):
        rows = valid_rows(c)
        t = sum(rows.values())
        rank = {a: (8, 16, 64)[a % 3] for a in rows}
        if c.op == "expand":
            want = (sum(n * rank[a] * 2 for a, n in rows.items()) + sum(4096 * rank[a] * 2 for a in rows) +
                    t * 4096 * 2 * 2)
        else:
            want = t * 4096 * 2 + sum(rank[a] * 4096 * 2 for a in rows) + sum(n * rank[a] * 4 for a, n in rows.items())
        assert c.floor_bytes() == want, c.name


def test_evaluate_ratio_and_targets():
    qkv = bench.suite_cases("qkv")[0]
    ev = bench.evaluate(qkv, {"fused": {"gpu_us": 6.0}, "three-calls": {"gpu_us": 10.0}})
    assert ev["ratio"] == pytest.approx(0.6) and ev["met"] is True and ev["target"] == "fused/three-calls <= 0.7"
    ev = bench.evaluate(qkv, {"fused": {"gpu_us": 8.0}, "three-calls": {"gpu_us": 10.0}})
    assert ev["met"] is False
    ev = bench.evaluate(qkv, {"fused": {"error": "x"}, "three-calls": {"gpu_us": 10.0}})
    assert ev["ratio"] is None and ev["met"] is None
    shrink = {c.name: c for c in bench.suite_cases("shrink")}
    decode, prefill = shrink["shrink decode 256x1 N4096 r16, 4"], shrink["shrink prefill 16x4096 N4096 r32, 4"]
    assert bench.evaluate(decode, {"plan": {"gpu_us": 5.0, "pct_floor": 20}})["met"] is True
    assert bench.evaluate(decode, {"plan": {"gpu_us": 5.1}, "aot": {"gpu_us": 1.0}})["met"] is False
    assert bench.evaluate(prefill, {"plan": {"gpu_us": 1.0, "pct_floor": 79.9}})["met"] is False
    assert bench.evaluate(prefill, {"plan": {"gpu_us": 1.0, "pct_floor": 80}})["met"] is True
    assert bench.evaluate(shrink["shrink decode 512x1 N4096 r16, 32"], {"plan": {"gpu_us": 9.0}}) == {}


def test_suite_table_shows_ratio_and_target():
    c = bench.suite_cases("ranks")[0]
    results = [dict(case=c.name, provider=p, floor_us=1.5, gpu_us=t, pct_floor=150 / t,
                    plan_build=dict(gpu_us=7.0, host_us=20.0)) for p, t in (("ranks", 3.0), ("padded", 6.0))]
    ev = dict(case=c.name, **bench.evaluate(c, {r["provider"]: r for r in results}))
    table = bench.format_suite_table(results, ["ranks", "padded"], [ev]).splitlines()
    assert table[0] == "| case | floor us | ranks | padded | ranks/padded | target | plan build us (GPU / host) |"
    assert table[1].count("|") == table[0].count("|")
    assert table[2] == (f"| {c.name} | 1.5 | 3.0 (50%) | 6.0 (25%) | 0.50 | ranks/padded <= 0.8: 0.50 met "
                        "| 7.0 / 20.0 |")


# Small cases of each kind: 32 segments (2 at -1), fp16 (the interpreter has no bf16 dot).
SMALL = [
    dict(op="shrink"),
    dict(op="shrink", ranks=[4, 16, 8]),
    dict(op="expand"),
    dict(op="expand", slices=(64, 32, 16)),
    dict(op="expand", ranks=[4, 16, 8]),
    dict(op="shrink", fp8=True),
    dict(op="expand", fp8=True),
]


def small_case(kw):
    slices = kw.get("slices")
    hidden = sum(slices) if slices else 64
    return bench.Case(f"small {kw}", "chunked:9,5:30", hidden, 16, 3, "fp16", kw["op"] == "expand", **kw)


def expected(case, s, lora_ranks):
    """float64 result of the case on set s = (x, weights, out), and the mask of elements written."""
    x, ws, out = s
    ws = ws if isinstance(ws, tuple) else (ws,)
    want, written = out.double().clone(), torch.zeros(out.shape, dtype=torch.bool)
    for st, n, i in zip(case.starts, case.lens, case.idx):
        if i < 0:
            continue
        r = case.rank_of(i) if lora_ranks else case.rank
        rows = slice(st, st + n)
        if case.op == "shrink":
            want[rows, :r] = bench.SHRINK_SCALING * x[rows].double() @ ws[0][i, :r].double().T
            written[rows, :r] = True
            continue
        col = 0
        for k, (w, h) in enumerate(zip(ws, case.slices)):
            prod = x[rows, k * case.rank:k * case.rank + r].double() @ w[i, :, :r].double().T
            want[rows, col:col + h] = prod + (want[rows, col:col + h] if case.add else 0)
            written[rows, col:col + h] = True
            col += h
    return want, written


class CpuTorch:
    """torch, with addmm's out_dtype (cuBLAS only) done in fp32 on the CPU."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def addmm(inp, m1, m2, *, beta, alpha, out_dtype, out):
        assert beta == 0 and inp is out
        return torch.mm(m1.to(out_dtype), m2.to(out_dtype), out=out).mul_(alpha)


def run_provider(provider, case, monkeypatch, device=DEVICE):
    sets, meta = bench.make_sets(torch, case, 1, device=device)
    if provider == "ranks":  # padding that is read would change the result: lora_ranks must be passed
        for w in sets[1][1] if isinstance(sets[1][1], tuple) else (sets[1][1],):
            for a, r in enumerate(case.ranks):
                pad = w[a, r:] if case.op == "shrink" else w[a, :, r:]
                pad.copy_(torch.randn_like(pad))
    shim = torch
    if device == "cpu" and provider == "torch":
        shim = CpuTorch()
    elif device == "cpu":  # the library's launches by the torch reference (same contract, checked by C)
        monkeypatch.setattr(sgmv.binding, "sgmv_expand", sgmv.reference.sgmv_expand)
        monkeypatch.setattr(sgmv.binding, "sgmv_shrink", sgmv.reference.sgmv_shrink)
    plan = sgmv.jit.batch_plan(*meta, len(case.lens), case.tokens, case.adapters)
    fns = bench._launchers(shim, provider, case, sets, meta, plan)
    assert len(fns) == len(sets) >= 2
    s = sets[1]
    if case.op == "shrink":
        s[2].fill_(1234.5)  # poison: shrink writes, never reads, its output
    before = s[2].clone()
    fns[1]()
    # The fp8 provider's weights: the fp8 copy times its per-channel scales.
    w = s[3].double() * s[4].double()[:, :, None] if provider == "fp8" else s[1]
    want, written = expected(case, (s[0], w, before), provider == "ranks")
    got = s[2]
    assert torch.equal(got[~written], before[~written]), "an element outside the case was written"
    tol = 1e-3 if got.dtype == torch.float32 else 1e-2
    err = (got[written].double() - want[written]).abs() - tol * (1 + want[written].abs())
    assert err.max() <= 0, f"{provider}: off by {err.max():.3g} beyond tolerance"


def run_id(p, kw):
    return "-".join([p, kw["op"]] + [k for k in kw if k != "op"])


def providers_of(kw):
    if "fp8" in kw:
        return bench.SUITES["fp8"]
    if "slices" in kw:
        return bench.SUITES["qkv"]
    if "ranks" in kw:
        return bench.SUITES["ranks"]
    return [p for p in bench.SUITES[kw["op"]] if p not in ("aot-c", "aot-c-plan")]


CPU_RUNS = [(p, kw) for kw in SMALL for p in providers_of(kw)]


@pytest.mark.skipif(HAS_GPU, reason="the GPU test below runs the real library instead")
@pytest.mark.parametrize("provider,kw", CPU_RUNS, ids=[run_id(*r) for r in CPU_RUNS])
def test_provider_computes_its_case_on_cpu(provider, kw, monkeypatch):
    run_provider(provider, small_case(kw), monkeypatch, "cpu")


GPU_RUNS = [(p, kw) for kw in SMALL for p in providers_of(kw)]


@pytest.mark.gpu
@pytest.mark.parametrize("provider,kw", GPU_RUNS, ids=[run_id(*r) for r in GPU_RUNS])
def test_provider_computes_its_case_on_gpu(provider, kw, monkeypatch):
    run_provider(provider, small_case(kw), monkeypatch, "cuda")


def test_torch_shrink_many_segments(monkeypatch):
    # More than 32 segments: the stacked-GEMM way of the torch provider.
    case = bench.Case("many", "spec:40:1-5", 64, 16, 3, "fp16", False, op="shrink")
    run_provider("torch", case, monkeypatch)


@pytest.mark.gpu
def test_bench_run_times_every_new_provider(tmp_path):
    # A provider that fails is reported in the table rather than stopping the run: none may here.
    rc = bench.run(tmp_path, suites=["shrink", "qkv", "ranks"], progress=False,
                   cases=["shrink decode 256x1 N4096 r16,", "qkv decode 256x1", "pad 64, 4"])
    got = json.loads((tmp_path / "results.json").read_text())
    assert rc == 0 and got["meta"]["suites"] == ["shrink", "qkv", "ranks"]
    runs = {(r["suite"], r["provider"]) for r in got["results"]}
    assert runs == {(s, p) for s in ("shrink", "qkv", "ranks") for p in bench.SUITES[s]}
    assert all("error" not in r and r["gpu_us"] > 0 for r in got["results"]), got["results"]
    assert len(got["cases"]) == 4 and all(e.get("met") is not None for e in got["cases"] if "target" in e)
    assert all(e["ratio"] > 0 for e in got["cases"] if "ratio_of" in e)


@pytest.mark.gpu
@pytest.mark.parametrize("provider", bench.SUITES["layer"])
@pytest.mark.parametrize("ranks", [None, [4, 16, 8]])
def test_layer_providers_compute_the_delta(provider, ranks):
    case = bench.Case("small layer", "chunked:9,5:30", 64, 16, 3, "fp16", True, op="layer", slices=(64, 32),
                      ranks=ranks, main="layer")
    sets, meta = bench.make_sets(torch, case, 1, device="cuda")
    plan = sgmv.batch_plan(*meta, len(case.lens), case.tokens, case.adapters)
    fns = bench._launchers(torch, provider, case, sets, meta, plan)
    x, a, b, out = sets[1]
    before = out.clone()
    fns[1]()
    want, written = before.double().clone(), torch.zeros(out.shape[0], dtype=torch.bool)
    for st, n, i in zip(case.starts, case.lens, case.idx):
        if i < 0:
            continue
        r, rows, col = case.rank_of(i), slice(st, st + n), 0
        written[rows] = True
        for k, h in enumerate(case.slices):
            y = bench.SHRINK_SCALING * x[rows].double() @ a[k][i, :r].double().T
            want[rows, col:col + h] += y @ b[k][i, :, :r].double().T
            col += h
    assert torch.equal(out[~written], before[~written])
    err = (out[written].double() - want[written]).abs() - 1e-2 * (1 + want[written].abs())
    assert err.max() <= 0, f"{provider}: off by {err.max():.3g} beyond tolerance"
