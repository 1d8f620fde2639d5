#!/usr/bin/env python3
"""A fixed, short list of SGMV calls covering every kernel path, for compute-sanitizer
(tests/gpu_sanitizers.sh runs it under memcheck, racecheck, initcheck and synccheck).

Every case runs through the AOT library (sgmv.sgmv_expand / sgmv_shrink / batch_plan) and, unless
left out, once more through the JIT (sgmv.jit) with the same inputs. Valid inputs are checked
against the float64 expectation of sgmv.testing (written elements within tolerance, every other
element bitwise unchanged); corrupt inputs (overlapping segments, a plan of arbitrary words) are
checked for what the contract still promises: nothing outside the segments' rows (overlap), or
nothing outside the output view (plan), is written. What each case is for (path, flat, split-K,
tile) is asserted against the planner's own choice (sgmv_*_config at sm_90), so a change of the
tile table cannot silently drop a path from the list. Launches are counted from the C launch
description (sgmv_*_launches): the number of kernel launches the sanitizer checked.

    python tests/gpu_sanitizer_cases.py [--set full|race|quick] [--jit all|some|none] [--json FILE]
    python tests/gpu_sanitizer_cases.py --dry      # on the CPU: the cases, the planner's choices and
                                                   # the expectations against sgmv.reference; no GPU

Last line printed: `sanitizer-cases: {json}` with calls, launches, failures, paths and variants
covered. Exit status 0 only if every check passed.
"""
import argparse
import dataclasses
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))  # noqa: E402 (PYTHONPATH may say so too)
import sgmv  # noqa: E402
import sgmv.reference  # noqa: E402
from sgmv import binding, capi  # noqa: E402
from sgmv.testing import (CORRUPT, CheckFailed, LayerCase, LoraCase, build_layer, build_lora, check,  # noqa: E402
                          expected_layer, expected_lora)

I32, I64 = torch.int32, torch.int64
ARCH = 90  # the H200's cubin family: the planner's choices asserted below are sm_90's
PATHS = {0: "rows", 1: "short", 2: "grouped"}


@dataclasses.dataclass
class Spec:
    """One case: a LoraCase and how it is called and checked.
    plan: None, "build" (sgmv.batch_plan / sgmv.jit.batch_plan from the call's metadata), "random" (uniform
          32-bit words), "edges" (words near 0, total_tokens and num_loras, the header saying 2^31 - 1 slots
          used), "stale" (built from other metadata of the same sizes);
    workspace (shrink): "none" (empty: no split), "split" (NaN-poisoned, the size shrink_workspace_bytes asks
          for), "empty" (torch.empty of that size: initcheck sees any read of a partial sum never written);
    verify: "exact" (tolerance and untouched elements), "rows" (overlap: only elements no segment may write
          must be unchanged), "view" (arbitrary plan: only the columns outside the output view);
    expect: what the planner must choose at sm_90: path ("rows", "short", "grouped"), flat (0/1), split
          (True: > 1, False: 1), tile (a name of aot/tiles.json);
    sets: the case lists it belongs to besides "full" ("race": racecheck's short list, "quick": smoke);
    jit: also run through sgmv.jit with --jit some."""
    name: str
    case: LoraCase
    plan: str = None
    workspace: str = "none"
    verify: str = "exact"
    expect: dict = dataclasses.field(default_factory=dict)
    sets: tuple = ()
    jit: bool = False


def E(name, rank, hiddens, lens, idx, loras, dtypes, meta, **kw):
    opts = {k: kw.pop(k) for k in ("plan", "workspace", "verify", "expect", "sets", "jit") if k in kw}
    kw.setdefault("add_inputs", True)
    return Spec(name, LoraCase(name, "expand", rank, hiddens, lens, idx, loras, dtypes, meta, **kw), **opts)


def S(name, rank, hidden, slices, lens, idx, loras, dtypes, meta, **kw):
    opts = {k: kw.pop(k) for k in ("plan", "workspace", "verify", "expect", "sets", "jit") if k in kw}
    return Spec(name, LoraCase(name, "shrink", rank, [hidden] * slices, lens, idx, loras, dtypes, meta, **kw),
                **opts)


DECODE = [1] * 40
DECODE_IDX = [(i * 7) % 5 - 1 for i in range(40)]  # -1 .. 3 of 4 adapters
SKEWED = [200] + [1] * 20
SKEWED_IDX = [0] + [i % 3 for i in range(20)]
MIXED = [5, 1, 1, 9, 0, 3, 1, 12]
MIXED_IDX = [0, 1, -1, 2, 1, 3, 0, 1]

SPECS = [
    # ---- expand, every path and tile of the sm_90 rules ----
    E("e-short-decode", 16, [256], DECODE, DECODE_IDX, 4, "fp16", I32, add_inputs=False,
      expect=dict(path="short", tile="decode"), sets=("race", "quick"), jit=True),
    E("e-grouped-decode", 16, [256], DECODE, DECODE_IDX, 4, "bf16", I64, plan="build",
      expect=dict(path="grouped", tile="spec"), sets=("race", "quick"), jit=True),
    E("e-rows-segment-prefill", 16, [256], [96, 80, 0, 70], [1, 0, 1, -1], 2, "bf16", I64,
      expect=dict(path="rows", flat=0, tile="prefill_r16"), sets=("race",), jit=True),
    E("e-rows-flat-skewed", 64, [128], SKEWED, SKEWED_IDX, 3, "fp16-fp32out", I32,
      expect=dict(path="rows", flat=1, tile="prefill_r64"), sets=("race",), jit=True),
    E("e-grouped-skewed-r64", 64, [128], SKEWED, SKEWED_IDX, 3, "fp32in-fp16", I32, plan="build",
      expect=dict(path="grouped", tile="grouped_r64"), sets=("race",)),
    E("e-grouped-r256", 128, [64], [40, 3, 1, 30], [0, 1, 0, 1], 2, "bf16-fp32out", I64, plan="build",
      expect=dict(path="grouped", tile="grouped_r256"), sets=("race",)),
    E("e-rows-spec-3slices-ranks", 16, [128, 64, 64], MIXED, MIXED_IDX, 4, "fp32in-bf16", I64,
      lora_ranks=[16, 8, 0, -2], expect=dict(path="rows", tile="spec"), sets=("race",), jit=True),
    E("e-grouped-3slices-ranks", 16, [128, 64, 64], MIXED, MIXED_IDX, 4, "fp32in-bf16", I32,
      lora_ranks=[16, 8, 0, -2], plan="build", expect=dict(path="grouped"), sets=("race",)),
    E("e-unaligned-2slices", 7, [123, 40], [9, 0, 4, 17], [1, 0, 1, 0], 2, "fp16-fp32out", I64,
      out_slice=True, strided_inputs=True, expect=dict(path="rows", tile="unaligned"), sets=("race",), jit=True),
    E("e-unaligned-2slices-plan", 7, [123, 40], [9, 0, 4, 17], [1, 0, 1, 0], 2, "fp16", I32, plan="build",
      lora_ranks=[3, 7], expect=dict(path="grouped", tile="unaligned")),
    E("e-uniform-prefill-plan-r256", 256, [64], [256, 256], [1, 0], 2, "bf16", I32, plan="build",
      expect=dict(path="rows", flat=0, tile="prefill_r256"), sets=("race",)),
    E("e-short-4d-ranks", 24, [192], [1] * 24, [i % 3 for i in range(24)], 3, "fp32in-fp16-fp32out", I64,
      weights_4d=True, lora_ranks=[24, 5, 30], expect=dict(path="short", tile="decode")),
    E("e-one-row", 8, [64], [1], [0], 1, "fp16", I32, expect=dict(path="short"), jit=True),
    # ---- shrink: by segment, flat, split-K (both steps), grouped, every tile of the sm_90 rules ----
    S("s-rows-segment-p16", 16, 512, 1, [70, 3, 30], [1, 0, 1], 2, "fp16", I32,
      expect=dict(path="rows", flat=0, split=False, tile="shrink_p16"), sets=("race", "quick"), jit=True),
    S("s-flat-split-decode-scales", 16, 4096, 1, [1] * 8, [0, 1, 0, -1, 1, 0, 1, 1], 2, "fp16-fp32out", I32,
      lora_scales=[0.5, -2.0], scaling=0.75, workspace="split",
      expect=dict(path="rows", flat=1, split=True, tile="shrink_s16"), sets=("race", "quick"), jit=True),
    S("s-grouped-split-3slices", 16, 2048, 3, [2, 1, 1, 3], [1, 0, 2, 1], 3, "bf16-fp32out", I64,
      lora_ranks=[16, 5, 0], lora_scales=[1.0, -0.5, 2.0], plan="build", workspace="split",
      expect=dict(path="grouped", split=True), sets=("race", "quick"), jit=True),
    S("s-grouped-unaligned", 32, 431, 1, [30, 2, 17], [0, 1, 0], 2, "fp16", I32, plan="build",
      expect=dict(path="grouped", split=False, tile="unaligned"), sets=("race",)),
    S("s-flat-nosplit-small-k", 32, 64, 2, [3, 5, 1], [1, 0, 1], 2, "bf16", I64, workspace="split",
      expect=dict(path="rows", flat=1, split=False, tile="shrink_s32"), sets=("race",)),
    S("s-grouped-split-uninit-ws-2slices", 64, 4096, 2, [3, 1, 2], [0, 1, 1], 2, "bf16", I32, plan="build",
      workspace="empty", lora_ranks=[64, 33], expect=dict(path="grouped", split=True, tile="shrink_s64"),
      sets=("race",), jit=True),
    S("s-rows-p32", 32, 256, 1, [100, 7], [0, 1], 2, "fp16-fp32out", I64,
      expect=dict(path="rows", tile="shrink_p32")),
    S("s-rows-p64-4d", 64, 256, 3, [90, 2], [1, 0], 2, "bf16", I32, weights_4d=True,
      expect=dict(path="rows", tile="shrink_p64")),
    S("s-rank256-split", 256, 1024, 1, [2, 1], [0, 1], 2, "fp16", I64, workspace="split",
      expect=dict(split=True)),
    # ---- fp8 weights (e4m3, float32 scales per channel or per adapter): the short, grouped, split and
    # unaligned paths of the fp8 rules ----
    E("e-fp8-short-decode-channel", 16, [256], DECODE, DECODE_IDX, 4, "fp8-fp16", I32, weight_scales="channel",
      expect=dict(path="short", tile="decode"), sets=("race", "quick"), jit=True),
    E("e-fp8-grouped-3slices-ranks-adapter", 32, [128, 64, 64], MIXED, MIXED_IDX, 4, "fp8-bf16-fp32out", I64,
      lora_ranks=[32, 8, 0, -2], weight_scales="adapter", plan="build", expect=dict(path="grouped", tile="grouped_r64"),
      sets=("race",), jit=True),
    E("e-fp8-rows-flat-prefill-r64", 64, [128], SKEWED, SKEWED_IDX, 3, "fp8-bf16", I64, weight_scales="channel",
      expect=dict(path="rows", flat=1, tile="prefill_r64"), sets=("race",), jit=True),
    E("e-fp8-rows-segment-prefill-r32", 32, [256], [96, 80, 0, 70], [1, 0, 1, -1], 2, "fp8-fp16-fp32out", I32,
      weight_scales="adapter", expect=dict(path="rows", flat=0), jit=True),
    S("s-fp8-grouped-split-3slices", 16, 2048, 3, [2, 1, 1, 3], [1, 0, 2, 1], 3, "fp8-fp16-fp32out", I64,
      lora_scales=[1.0, -0.5, 2.0], scaling=0.5, plan="build", workspace="split", weight_scales="channel",
      expect=dict(path="grouped", split=True, tile="shrink_s32"), sets=("race",), jit=True),
    S("s-fp8-rows-unaligned", 7, 431, 1, [30, 2, 17], [0, 1, 0], 2, "fp8-bf16", I32, weight_scales="adapter",
      expect=dict(path="rows", tile="unaligned")),
    # ---- corrupt metadata: what the contract tolerates (kernels/sgmv.py clips and skips) ----
    *[E(f"e-corrupt-{n}", 16, [512], lens, idx, 2, "bf16", (I32, I64)[k % 2], starts=st, total_tokens=40,
        max_seq_length=max(0, max(lens)), plan="build" if k % 2 else None, sets=("race",) if k == 0 else (),
        jit=k < 2)
      for k, (n, st, lens, idx) in enumerate(CORRUPT)],
    *[S(f"s-corrupt-{n}", 16, 1024, 2, lens, idx, 2, "fp16", (I64, I32)[k % 2], starts=st, total_tokens=40,
        max_seq_length=max(0, max(lens)), plan="build" if k % 2 == 0 else None, workspace="split",
        sets=("race",) if k == 1 else (), jit=k < 2)
      for k, (n, st, lens, idx) in enumerate(CORRUPT)],
    # int64 values outside int32 (the kernel reads the high word and skips them)
    E("e-corrupt-int64-wide", 16, [256], [8, 2**40, 5, 6], [0, 1, 2**33, 1], 2, "fp16", I64,
      starts=[0, 10, 20, -2**40 + 30], total_tokens=40, max_seq_length=8, plan="build", jit=True),
    S("s-corrupt-int64-wide", 16, 512, 1, [8, 2**40, 5, 6], [0, 1, 2**33, 1], 2, "bf16", I64,
      starts=[0, 10, 20, 2**32 + 30], total_tokens=40, max_seq_length=8, workspace="split"),
    # overlapping segments: undefined which wins, but nothing outside the segments' rows is written
    E("e-overlap", 16, [256], [10, 10, 8], [0, 1, 0], 2, "fp16", I32, starts=[0, 5, 12], total_tokens=24,
      verify="rows", out_slice=True, sets=("race",)),
    E("e-overlap-plan", 16, [256], [10, 10, 8, 1], [0, 1, 0, 1], 2, "bf16", I64, starts=[0, 5, 12, 3],
      total_tokens=24, verify="rows", out_slice=True, plan="build", jit=True),
    S("s-overlap-plan-split", 16, 2048, 1, [10, 10, 8], [0, 1, 0], 2, "fp16", I32, starts=[0, 5, 12],
      total_tokens=24, verify="rows", out_slice=True, plan="build", workspace="split"),
    # ---- a plan of arbitrary words: nothing outside the buffers (memcheck), nothing outside the view ----
    E("e-plan-random", 16, [256], MIXED, MIXED_IDX, 4, "fp16", I32, plan="random", verify="view", out_slice=True,
      sets=("race",), jit=True),
    E("e-plan-edges", 64, [128, 64], SKEWED, SKEWED_IDX, 3, "bf16", I64, plan="edges", verify="view",
      out_slice=True),
    E("e-plan-stale", 16, [256], MIXED, MIXED_IDX, 4, "bf16", I32, plan="stale", verify="view", out_slice=True),
    S("s-plan-random-split", 16, 2048, 2, [2, 1, 3], [1, 0, 1], 2, "fp16", I64, plan="random", workspace="split",
      verify="view", out_slice=True, sets=("race",), jit=True),
    S("s-plan-edges", 32, 256, 1, MIXED, MIXED_IDX, 4, "bf16-fp32out", I32, plan="edges", verify="view",
      out_slice=True),
    S("s-plan-stale-split", 16, 4096, 1, [1] * 8, [0, 1, 0, -1, 1, 0, 1, 1], 2, "fp16", I32, plan="stale",
      workspace="split", verify="view", out_slice=True),
    # ---- the plan kernel alone: no segments, and more segments than one program scans ----
    E("e-plan-zero-batches", 16, [64], [], [], 2, "fp16", I32, total_tokens=8, max_seq_length=0, plan="build"),
    E("e-plan-300-segments", 8, [64], [1] * 300, [i % 4 - 1 for i in range(300)], 3, "fp16", I64, plan="build",
      jit=True),
]


# ---- the layer call (sgmv.Layer, sgmv.Step): the step's plan (segments or a per-token mapping),
# then the shrink into the step's scratch and the expand from it ----
LAYER_SPECS = [
    LayerCase("l-decode-qkv-tokens", 256, 16, (256, 64, 64), DECODE, DECODE_IDX, 4, per_token=True, seed=61),
    LayerCase("l-decode-qkv-segments", 256, 16, (256, 64, 64), DECODE, DECODE_IDX, 4, dtype="bf16", meta=I64,
              seed=62),
    LayerCase("l-split-k-ranks-scales", 2048, 16, (128, 128), [2, 1, 3], [1, 0, 2], 3, ranks=[16, 5, 0],
              scales=True, fp32_out=True, seed=63),
    LayerCase("l-prefill-tokens-column-slice", 256, 32, (192,), [150, 2], [1, 0], 2, per_token=True,
              add_inputs=False, out_slice=True, dtype="bf16", seed=64),
    LayerCase("l-skewed-tokens-int64", 128, 64, (128,), SKEWED, SKEWED_IDX, 3, per_token=True, meta=I64, seed=65),
    LayerCase("l-fp8-decode-qkv-tokens", 256, 16, (256, 64, 64), DECODE, DECODE_IDX, 4, per_token=True, fp8="channel",
              seed=66),
]


def sm90_tiles():
    """Every tile the sm_90 rules of aot/tiles.json may pick (and the unaligned one)."""
    table = json.loads((Path(__file__).resolve().parent.parent / "aot" / "tiles.json").read_text())
    rules = ("rules", "grouped_rules", "shrink_rules", "shrink_grouped_rules")
    return sorted({r[2] for k in rules for r in table[k][str(ARCH)]} | {"unaligned"})


def select(which):
    return [s for s in SPECS if which == "full" or which in s.sets]


# ---- the C library's view of a call (no driver needed) ------------------------------------------

def _new(ctype):
    p = capi.ffi.new(ctype + " *")
    p.struct_size = capi.ffi.sizeof(ctype)
    return p


def c_args(op, args, kw):
    """The sgmv_{op}_args_t the library makes of the call (through the binding, as sgmv.sgmv_* does)."""
    x, w, out, st, ln, ix, b, ms, last = args
    lib, ffi = capi.lib, capi.ffi
    if op == "expand":
        t, _ = binding.expand_tensors(x, w, out, st, ln, ix, b, ms, last, 0, kw.get("batch_plan"),
                                      kw.get("lora_ranks"), allow_cpu=True, weight_scales=kw.get("weight_scales"))
        a = ffi.new("sgmv_expand_args_t *")
        capi.check(lib.sgmv_expand_args_from_tensors(t, a))
    else:
        t, _ = binding.shrink_tensors(x, w, out, st, ln, ix, b, ms, last, kw.get("lora_ranks"), kw.get("lora_scales"),
                                      kw.get("batch_plan"), kw.get("workspace"), 0, allow_cpu=True,
                                      weight_scales=kw.get("weight_scales"))
        a = ffi.new("sgmv_shrink_args_t *")
        capi.check(lib.sgmv_shrink_args_from_tensors(t, a))
    return a


def describe_call(op, args, kw):
    """(launch config, number of launches, variant names) of the call at sm_90."""
    lib, ffi = capi.lib, capi.ffi
    a = c_args(op, args, kw)
    cfg = ffi.new("sgmv_launch_config_t *")
    capi.check(getattr(lib, f"sgmv_{op}_config")(a, ARCH, cfg))
    d = _new("sgmv_launches_t")
    capi.check(getattr(lib, f"sgmv_{op}_launches")(a, ARCH, ffi.NULL, d))
    names = [ffi.string(d.launches[i].variant).decode() for i in range(d.num_launches)]
    return cfg, d.num_launches, names


def plan_launches(st, ln, ix, b, total, loras, plan):
    buf, _ = binding.plan_args(st, ln, ix, b, total, loras, plan, 0, allow_cpu=True)
    d = _new("sgmv_launches_t")
    capi.check(capi.lib.sgmv_batch_plan_launches(buf, ARCH, d))
    return d.num_launches, [capi.ffi.string(d.launches[i].variant).decode() for i in range(d.num_launches)]


# ---- running a case ----------------------------------------------------------------------------------

def _fits32(v):
    return -2**31 <= v < 2**31


def expectation(op, args, kw):
    """expected_lora, with segments the kernel skips for int64 values outside int32 marked skipped (-1)."""
    st, ln, ix = args[3:6]
    if st.dtype == I64:
        bad = [not (_fits32(a) and _fits32(b) and _fits32(c)) for a, b, c in zip(st.tolist(), ln.tolist(), ix.tolist())]
        if any(bad):
            ix = torch.tensor([-1 if f else v for f, v in zip(bad, ix.tolist())], dtype=I64, device=ix.device)
            args = args[:5] + (ix,) + args[6:]
    return expected_lora(op, args, kw)


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def check_unchanged(before, after, out, keep, what):
    """Elements of the buffer outside the output view, and inside it where `keep` (a mask of the view,
    or None for none), must be bitwise unchanged."""
    before, after = before.cpu(), after.cpu()
    pad = (after.shape[1] - out.shape[1]) // 2
    changed = _bits(before) != _bits(after)
    inside = changed[:, pad:pad + out.shape[1]].clone()
    changed[:, pad:pad + out.shape[1]] = inside & keep if keep is not None else False
    if bool(changed.any()):
        r, c = (int(v) for v in changed.nonzero()[0])
        raise CheckFailed(f"{what}: {int(changed.sum())} elements that no segment may write changed; first at "
                          f"buffer ({r}, {c}): {after[r, c].item()!r}, was {before[r, c].item()!r}")


def make_plan(spec, args, device, jit):
    x, w, _, st, ln, ix, b, *_ = args
    w0 = w[0] if isinstance(w, (tuple, list)) else w
    T, L = x.shape[0], w0.shape[0]
    nbytes = sgmv.batch_plan_bytes(b, T)
    plan = torch.empty(nbytes // 4, dtype=I32, device=device)
    build = _reference_plan if device == "cpu" else (sgmv.jit.batch_plan if jit else sgmv.batch_plan)
    g = torch.Generator().manual_seed(spec.case.seed + 77)
    if spec.plan == "build":
        build(st, ln, ix, b, T, L, out=plan)
    elif spec.plan == "random":
        plan.copy_(torch.randint(-2**31, 2**31 - 1, plan.shape, generator=g, dtype=I64).to(I32))
    elif spec.plan == "edges":
        words = torch.randint(-3, max(T, L) + 4, plan.shape, generator=g, dtype=I64).to(I32)
        words[0] = 2**31 - 1
        plan.copy_(words)
    elif spec.plan == "stale":  # a real plan of other metadata: same sizes, rows and adapters shuffled
        perm = torch.randperm(b, generator=g)
        other = [m.cpu()[perm].to(device) for m in (st, ln)]
        build(other[0], other[1], ((ix.cpu() + 1) % L).to(device), b, T, L, out=plan)
    else:
        raise ValueError(spec.plan)
    return plan


def make_workspace(spec, out, device):
    n = sgmv.shrink_workspace_bytes(out.shape[0], out.shape[1]) // 4
    if spec.workspace == "split":
        return torch.full((n,), float("nan"), dtype=torch.float32, device=device)
    if spec.workspace == "empty":
        return torch.empty(n, dtype=torch.float32, device=device)
    return torch.empty(0, dtype=torch.float32, device=device)


class Runner:
    def __init__(self, device, dry):
        self.device, self.dry = device, dry
        self.calls = self.launches = 0
        self.paths, self.variants, self.failures = set(), set(), []

    def run(self, spec, jit):
        """One case on one path (AOT or JIT): returns nothing, records failures."""
        case, op = spec.case, spec.case.op
        what = f"{'jit' if jit else 'aot'} {spec.name} ({case.dtypes}, {str(case.meta_dtype)[6:]})"
        try:
            args, kw, buf = build_lora(case, self.device)
            before = buf.clone()
            exp, written, slack = expectation(op, args, kw)
            kw = dict(kw)
            plan_n = 0
            if spec.plan:
                # The plan kernel's launches: counted for built plans (the stale plan is built too).
                plan = make_plan(spec, args, self.device, jit)
                if spec.plan in ("build", "stale"):
                    n, names = plan_launches(*args[3:7], args[0].shape[0],
                                             (args[1][0] if isinstance(args[1], tuple) else args[1]).shape[0], plan)
                    plan_n = n
                    self.variants.update(names)
                    self.paths.add("plan-kernel")
                kw["batch_plan"] = plan
            if op == "shrink":
                kw["workspace"] = make_workspace(spec, args[2], self.device)
            cfg, n, names = describe_call(op, args, kw)
            self._expect(spec, cfg, names, what)
            fn = self._fn(op, jit)
            fn(*args, **kw)
            if self.device == "cuda":
                torch.cuda.synchronize()
            self.calls += 1 + (1 if plan_n else 0)
            self.launches += n + plan_n
            self.variants.update(names)
            if not cfg.noop:
                self.paths.add(f"{op}:{PATHS[cfg.path]}{':flat' if cfg.path == 0 and cfg.flat else ''}"
                               f"{':split' if cfg.split > 1 else ''}")
            if self.dry and spec.name.endswith("int64-wide"):
                pass  # sgmv.reference takes int64 values past int32 as they are; the kernel skips them
            elif spec.verify == "exact":
                check(args, before, buf, exp, written, what, slack)
            elif spec.verify == "rows":
                check_unchanged(before, buf, args[2], ~written, what)
            else:
                check_unchanged(before, buf, args[2], None, what)
        except Exception as e:  # recorded, the next case runs
            self.failures.append(f"{what}: {type(e).__name__}: {e}")
            traceback.print_exc()

    def run_layer(self, case, jit):
        """One layer case: the step's plan, then the layer call (AOT, JIT, or the reference when dry)."""
        what = f"{'jit' if jit else 'aot'} {case} ({str(case.meta)[6:]})"
        try:
            layer, step, x, out, buf, rows = build_layer(case, self.device)
            before = buf.clone()
            pad = (buf.shape[1] - out.shape[1]) // 2
            exp, written, slack = expected_layer(case, layer, x, before[:, pad:pad + out.shape[1]], rows)
            plan = capi.ffi.new("sgmv_launches_t *")
            plan.struct_size = capi.ffi.sizeof("sgmv_launches_t")
            capi.check(capi.lib.sgmv_step_plan_launches(step._h, ARCH, plan))
            pair = capi.ffi.new("sgmv_tensor_t[2]")
            for i, t in enumerate((x, out)):
                fields, _ = binding.describe(t, "t")
                binding._TENSOR.pack_into(capi.ffi.buffer(pair), i * binding._SIZEOF_TENSOR, *fields)
            calls = capi.ffi.new("sgmv_launches_t *")
            calls.struct_size = capi.ffi.sizeof("sgmv_launches_t")
            capi.check(capi.lib.sgmv_layer_apply_launches(layer._h, step._h, pair, pair + 1, int(case.add_inputs),
                                                          ARCH, calls))
            if self.dry:
                sgmv.reference.layer_apply(layer, x, out, step, add_inputs=case.add_inputs)
            elif jit:
                sgmv.jit.step_plan(step)
                sgmv.jit.layer_apply(layer, x, out, step, add_inputs=case.add_inputs)
            else:
                step.plan()
                layer(x, out, step, add_inputs=case.add_inputs)
            if self.device == "cuda":
                torch.cuda.synchronize()
            self.calls += 2
            self.launches += plan.num_launches + calls.num_launches
            for d in (plan, calls):
                self.variants.update(capi.ffi.string(d.launches[i].variant).decode() for i in range(d.num_launches))
            self.paths.add("layer:" + ("per-token" if case.per_token else "segments"))
            check((x, None, out), before, buf, exp, written, what, slack)
        except Exception as e:
            self.failures.append(f"{what}: {type(e).__name__}: {e}")
            traceback.print_exc()

    def _expect(self, spec, cfg, names, what):
        if cfg.noop:
            if spec.expect:
                raise CheckFailed(f"{what}: nothing to launch, but the case is written for {spec.expect}")
            return
        want, got = spec.expect, {"path": PATHS[cfg.path], "flat": cfg.flat, "split": cfg.split > 1,
                                  "tile": capi.ffi.string(cfg.tile).decode()}
        bad = {k: (v, got[k]) for k, v in want.items() if got[k] != v}
        if bad:
            raise CheckFailed(f"{what}: the planner no longer picks what this case is for: "
                              + ", ".join(f"{k} {v[1]} (case written for {v[0]})" for k, v in bad.items()))

    def _fn(self, op, jit):
        if self.dry:  # the reference on CPU tensors: checks the cases and the expectations, not the kernels
            return getattr(sgmv.reference, f"sgmv_{op}")
        if jit:
            return getattr(sgmv.jit, f"sgmv_{op}")
        return getattr(sgmv, f"sgmv_{op}")


def _reference_plan(st, ln, ix, b, total, loras, out=None, **_):
    """Dry mode: the plan's contents do not matter to the reference; the C checks of the plan
    arguments still run (plan_launches)."""
    out.fill_(-1)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", choices=("full", "race", "quick"), default="full", help="which cases (default full)")
    ap.add_argument("--jit", choices=("all", "some", "none"), default="all",
                    help="also through sgmv.jit: every case, the cases marked jit, or none (default all)")
    ap.add_argument("--dry", action="store_true", help="CPU only: sgmv.reference instead of the kernels")
    ap.add_argument("--list", action="store_true", help="print the cases and exit")
    ap.add_argument("--json", help="also write the summary here")
    opts = ap.parse_args(argv)
    specs = select(opts.set)
    if opts.list:
        for s in specs:
            print(f"{s.name:40s} {s.case.op:6s} plan={s.plan} ws={s.workspace} verify={s.verify} sets={s.sets} "
                  f"jit={s.jit} expect={s.expect}")
        for c in LAYER_SPECS:
            print(f"{c.name:40s} layer  per_token={c.per_token} slices={len(c.outs)} ranks={c.ranks is not None} "
                  f"scales={c.scales} dtype={c.dtype}")
        return 0
    device = "cpu" if opts.dry else "cuda"
    if not opts.dry:
        if not torch.cuda.is_available():
            print("gpu_sanitizer_cases: no CUDA GPU visible to torch (use --dry on the CPU)", file=sys.stderr)
            return 2
        importlib.import_module("sgmv.jit")  # triton; after the check above
    t0 = time.time()
    r = Runner(device, opts.dry)
    for spec in specs:
        r.run(spec, jit=False)
        if not opts.dry and (opts.jit == "all" or (opts.jit == "some" and spec.jit)):
            r.run(spec, jit=True)
    for case in LAYER_SPECS if opts.set != "quick" else LAYER_SPECS[:1]:
        if opts.dry and case.dtype == "bf16":
            case = dataclasses.replace(case, dtype="fp16")  # the reference runs either; keep the CPU run quick
        r.run_layer(case, jit=False)
        if not opts.dry and opts.jit != "none":
            r.run_layer(case, jit=True)
    if opts.set == "full":  # the full list runs every tile of the table (a variant name holds its tile)
        missing = [t for t in sm90_tiles() if not any(f"_{t}_" in v for v in r.variants)]
        if missing:
            r.failures.append(f"coverage: no case runs the sm_{ARCH} tiles {missing}")
    cases = len(specs) + (len(LAYER_SPECS) if opts.set != "quick" else 1)
    summary = dict(set=opts.set, jit=opts.jit, dry=opts.dry, cases=cases, calls=r.calls, launches=r.launches,
                   failures=len(r.failures), paths=sorted(r.paths), variants=len(r.variants),
                   variant_names=sorted(r.variants), wall_s=round(time.time() - t0, 1))
    for f in r.failures:
        print(f"FAILED {f}")
    if opts.json:
        Path(opts.json).write_text(json.dumps(summary, indent=1) + "\n")
    print("sanitizer-cases: " + json.dumps(summary))
    return 1 if r.failures else 0


if __name__ == "__main__":
    sys.exit(main())
