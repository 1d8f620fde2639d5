"""fp8 (e4m3, torch.float8_e4m3fn) LoRA weights with float32 scales per adapter or per adapter and
output channel, per slice (issue 19): shrink, fused-slice expand and the layer call against a
float64 expectation of the dequantized weights (sgmv.testing), through the reference and the JIT
(Triton's interpreter on the CPU, fp16 activations there: it has no bfloat16 dot), the planner's
fp8 rules and their archs, corrupt arguments (a clear error, nothing written), the C structs'
growth (old sizes still accepted, through the fake driver too), and on a GPU the library against
the JIT bit for bit."""
import dataclasses
import re

import pytest
import torch

import sgmv
import sgmv.jit
import sgmv.reference
from sgmv import capi
from sgmv.capi import ffi
from sgmv.testing import (LAYER_CASES, LayerCase, LoraCase, bitwise_equal, build_layer, expected_lora,
                          jit_matches_build)
from conftest import aot_variants
from test_capi import fill_tensors, shrink_args
from test_layer import run_layer
from test_planner import args as planner_args
from test_shrink import Prepared, aot_matches_jit, bits, run, skip_bf16_on_cpu

L = capi.lib
S = {name: getattr(L, name) for name in dir(L) if name.startswith("SGMV_")}
I32, I64 = torch.int32, torch.int64
ARCHS = [int(a) for a in ffi.string(L.sgmv_archs()).decode().split(",")]
FP8_ARCHS = sorted(aot_variants.FP8_RULES["expand"])

SHRINK = [
    # Decode rows, per-channel scales, a skipped (-1) segment.
    LoraCase("decode", "shrink", 16, [64], [1] * 6, [0, 1, 2, -1, 1, 0], 3, "fp8-fp16", I32,
             weight_scales="channel", seed=1),
    # Per-adapter weight scales beside LoRA's own scaling and lora_scales (all three multiply).
    LoraCase("alpha-and-scales", "shrink", 32, [128], [5, 3, 7], [1, 0, 1], 2, "fp8-fp16-fp32out", I64,
             scaling=0.5, lora_scales=[1.5, -0.25], weight_scales="adapter", seed=2),
    # Three fused slices, each with its own per-channel scales; per-adapter ranks (one of them 0).
    LoraCase("qkv-ranks", "shrink", 16, [96] * 3, [4, 2, 6], [0, 1, 2], 3, "fp8-fp16", I32,
             lora_ranks=[16, 5, 0], weight_scales="channel", seed=3),
    # hidden and rank off 16 bytes (the unaligned tile), strided inputs, a column-slice output, 4-D weights.
    LoraCase("unaligned-views", "shrink", 7, [42, 42], [3, 5], [1, 0], 2, "fp8-fp16-fp32out", I32,
             weight_scales="adapter", strided_inputs=True, out_slice=True, weights_4d=True, seed=4),
    # Few rows, a long hidden: split over hidden with a workspace (the scales apply to the sum).
    LoraCase("few-rows-long-hidden", "shrink", 16, [1024], [2, 1], [0, 1], 2, "fp8-fp16", I32,
             weight_scales="channel", seed=5),
]
EXPAND = [
    # Decode (the short path: several adapters in one tile, each with its own scales), add_inputs.
    LoraCase("decode", "expand", 16, [128], [1] * 8, [0, 1, 2, 1, -1, 0, 2, 2], 3, "fp8-fp16", I32,
             add_inputs=True, weight_scales="channel", seed=11),
    # Three slices of different widths, per-adapter ranks, fp32 output, int64 metadata.
    LoraCase("qkv-ranks", "expand", 16, [64, 32, 48], [3, 4, 1], [1, 0, 1], 2, "fp8-fp16-fp32out", I64,
             add_inputs=True, lora_ranks=[16, 7], weight_scales="channel", seed=12),
    # Per-adapter scales, 4-D weights, views.
    LoraCase("adapter-views", "expand", 32, [64], [6, 2], [0, 1], 2, "fp8-fp16", I32, weight_scales="adapter",
             weights_4d=True, out_slice=True, strided_inputs=True, seed=13),
    # rank 8: K is half of 16 fp8 bytes (the unaligned tile).
    LoraCase("rank-8", "expand", 8, [40, 24], [5, 3], [1, 0], 2, "fp8-fp16", I64, weight_scales="adapter", seed=14),
    # A long segment beside decode rows (the flat path).
    LoraCase("long-and-short", "expand", 64, [64], [100, 1, 1], [0, 1, 0], 2, "fp8-fp16", I32, add_inputs=True,
             weight_scales="channel", seed=15),
]
CASES = SHRINK + EXPAND
BF16 = [dataclasses.replace(c, dtypes=c.dtypes.replace("fp16", "bf16"), seed=c.seed + 100) for c in CASES]


def fn(module, case):
    return getattr(module, f"sgmv_{case.op}")


@pytest.mark.parametrize("case", CASES + BF16, ids=str)
def test_reference_matches_float64(case):
    run(fn(sgmv.reference, case), case, "cpu")


@pytest.mark.parametrize("with_plan", [False, True], ids=["no-plan", "plan"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_jit(case, with_plan):
    skip_bf16_on_cpu(case)
    run(fn(sgmv.jit, case), case, plan=sgmv.jit.batch_plan if with_plan else None)


@pytest.mark.parametrize("case", SHRINK, ids=str)
def test_jit_split(case):
    run(sgmv.jit.sgmv_shrink, case, workspace="split")


def test_per_adapter_scales_are_per_channel_scales_of_stride_0():
    """Per-adapter scales as (num_loras,) and as (num_loras, 1), and the same values repeated per
    channel ((num_loras, N): the one code path with a channel stride): the same bits."""
    p = Prepared(dataclasses.replace(EXPAND[0], weight_scales="adapter"))
    sc = p.kw["weight_scales"]
    outs = []
    for scales in (sc, sc[:, None], sc[:, None].expand(-1, 128).contiguous()):
        p.kw["weight_scales"] = scales
        outs.append(p.run(sgmv.jit.sgmv_expand)[1])
    assert bitwise_equal(outs[0], outs[1]) and bitwise_equal(outs[0], outs[2])


def test_a_scale_moves_only_its_adapter_s_channel():
    """Doubling one adapter's scale of one output channel doubles exactly that column of that
    adapter's rows (the scale multiplies the fp32 sum: exact for a power of two)."""
    case = dataclasses.replace(EXPAND[0], add_inputs=False)
    p = Prepared(case)
    _, base, _ = p.run(sgmv.jit.sgmv_expand)
    p.kw["weight_scales"] = p.kw["weight_scales"].clone()
    p.kw["weight_scales"][1, 5] *= 2
    p.exp, p.written, p.slack = expected_lora(case.op, p.args, p.kw)
    _, doubled, _ = p.run(sgmv.jit.sgmv_expand)
    rows = torch.tensor([i == 1 for n, i in zip(case.lens, case.idx) for _ in range(n)])
    changed = (bits(base) != bits(doubled)).nonzero().tolist()
    assert changed and all(rows[r] and c == 5 for r, c in changed), changed
    assert torch.equal(doubled[rows, 5], 2 * base[rows, 5])


@pytest.mark.parametrize("case", [SHRINK[2], EXPAND[1]], ids=str)
def test_torch_op_bodies_forward_the_scales(case, monkeypatch):
    """torch.ops.sgmv.shrink / expand's bodies hand weight_scales (a list, one per slice) to the
    binding: here the binding's calls are the reference's, on the CPU."""
    from sgmv import torch_ops
    monkeypatch.setattr(sgmv.binding, f"sgmv_{case.op}", getattr(sgmv.reference, f"sgmv_{case.op}"))

    def op(x, w, out, st, ln, ix, b, ms, last, lora_ranks=None, lora_scales=None, weight_scales=None, **_):
        if case.op == "shrink":
            torch_ops.shrink(x, w[0], out, st, ln, ix, b, ms, last, lora_ranks, lora_scales, None, None, list(w[1:]),
                             list(weight_scales))
        else:
            torch_ops.expand(x, w[0], out, st, ln, ix, b, ms, last, None, lora_ranks, list(w[1:]), list(weight_scales))
    op.__module__ = "torch_ops"
    run(op, case, "cpu")


# ---- the planner: fp8 rules, archs, dtypes --------------------------------------------------------

def expand_args(**over):
    """test_planner's valid expand (bf16 inputs and output, decode, hidden 4096, rank 16, 4 adapters)
    with fp8 weights and per-channel scales at a fake address (or `scales`)."""
    scales = over.pop("scales", [dict(scales=0x70000, lora_stride=4096, channel_stride=1)])
    a = planner_args(**{"weights_dtype": S["SGMV_DTYPE_FLOAT8_E4M3FN"], **over})
    for i, sc in enumerate(scales):
        a.weight_scales[i].scales = ffi.cast("void *", sc["scales"])
        a.weight_scales[i].lora_stride, a.weight_scales[i].channel_stride = sc["lora_stride"], sc["channel_stride"]
    return a


def config(a, arch=FP8_ARCHS[0] if FP8_ARCHS else 90):
    c = ffi.new("sgmv_launch_config_t *")
    status = L.sgmv_expand_config(a, arch, c)
    return status, c, ffi.string(L.sgmv_last_error()).decode()


def test_fp8_is_a_new_dtype_value_at_the_end():
    assert S["SGMV_DTYPE_FLOAT8_E4M3FN"] == 5 == max(capi.DTYPE.values())
    assert sgmv.binding._DTYPE_NAMES["float8_e4m3fn"] == 5  # torch's name: the binding's one rule


def test_build_info_names_the_built_archs_with_fp8_variants():
    """sgmv_build_info()'s fp8_archs (shown by `sgmv info`): the built archs aot/variants.py gives fp8 rules."""
    want = ",".join(str(a) for a in ARCHS if a in FP8_ARCHS) or "none"
    assert sgmv.build_info()["fp8_archs"] == want


def test_fp8_dtype_matrix_is_the_variant_table_s():
    """With scales, exactly the (inputs, fp8, output) of aot/variants.py DTYPES are served."""
    names = {"fp16": "SGMV_DTYPE_FLOAT16", "bf16": "SGMV_DTYPE_BFLOAT16", "fp32": "SGMV_DTYPE_FLOAT32"}
    assert config(expand_args())[0] == 0
    for x in names:
        for o in names:
            status, _, msg = config(expand_args(inputs_dtype=S[names[x]], output_dtype=S[names[o]]))
            want = (x, aot_variants.FP8, o) in aot_variants.DTYPES["expand"]
            assert (status == 0) == want, (x, o, msg)
            if not want:
                assert status == S["SGMV_ERROR_UNSUPPORTED_DTYPE"] and "float8_e4m3fn" in msg, msg


@pytest.mark.skipif(not FP8_ARCHS, reason="the tile table has no fp8 rules")
def test_fp8_takes_its_own_rules():
    """fp8 weights get the tiles of the fp8 rules (their own subset), fp16 weights the usual ones."""
    arch = FP8_ARCHS[0]
    for max_seq, rank in ((1, 16), (5, 16), (300, 16), (300, 64)):
        a = expand_args(max_seq_length=max_seq, rank=rank, inputs_row_stride=rank, weights_row_stride=rank,
                        weights_lora_stride=4096 * rank)
        status, c, msg = config(a, arch)
        assert status == 0, msg
        want = next(r for r in aot_variants.FP8_RULES["expand"][arch]
                    if (r[0] is None or max_seq <= r[0]) and (r[1] is None or rank <= r[1]))
        assert ffi.string(c.tile).decode() == want[2], (max_seq, rank)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in FP8_ARCHS] or [80])
def test_no_fp8_variants_is_a_clear_status(arch):
    """An arch without fp8 variants (sm_80: no fp8 conversions) refuses fp8 weights by name, never
    picks a variant of another dtype."""
    status, _, msg = config(expand_args(), arch)
    assert status == S["SGMV_ERROR_UNSUPPORTED_ARCH"], msg
    assert f"sm_{arch}" in msg and (arch not in ARCHS or "float8_e4m3fn" in msg), msg
    assert config(expand_args(weights_dtype=S["SGMV_DTYPE_BFLOAT16"], scales=[]), arch)[0] == \
        (0 if arch in ARCHS else S["SGMV_ERROR_UNSUPPORTED_ARCH"])


def test_launch_description_carries_the_scales():
    """sgmv_expand_launches names the weights fp8 and passes each slice's scales and strides."""
    a = expand_args(num_slices=2, scales=[dict(scales=0x70000, lora_stride=4096, channel_stride=1),
                                          dict(scales=0x78000, lora_stride=1, channel_stride=0)])
    a.slices[0].weights, a.slices[0].rows = ffi.cast("void *", 0x90000), 32
    a.slices[0].lora_stride, a.slices[0].row_stride = 32 * 16, 16
    a.inputs_row_stride, a.output_row_stride = 32, 4096 + 32
    d = ffi.new("sgmv_launches_t *")
    d.struct_size = ffi.sizeof("sgmv_launches_t")
    assert L.sgmv_expand_launches(a, FP8_ARCHS[0] if FP8_ARCHS else 90, ffi.NULL, d) == 0, \
        ffi.string(L.sgmv_last_error())
    got = {ffi.string(x.name).decode(): x for x in d.launches[0].args[0:d.launches[0].num_args]}
    assert got["w_ptr"].dtype == got["w1_ptr"].dtype == S["SGMV_DTYPE_FLOAT8_E4M3FN"]
    assert (got["ws_ptr"].value, got["ws1_ptr"].value) == (0x70000, 0x78000)
    assert got["ws_ptr"].dtype == S["SGMV_DTYPE_FLOAT32"]
    assert [got[n].value for n in ("ws_stride_l", "ws_stride_n", "ws1_stride_l", "ws1_stride_n")] == [4096, 1, 1, 0]
    assert "fp8e4nv" in ffi.string(d.launches[0].variant).decode()


BAD_STRUCTS = [  # (overrides, status, words)
    (dict(scales=[]), "SGMV_ERROR_INVALID_ARGUMENT", r"weight_scales\[0\]\.scales is NULL"),
    (dict(scales=[dict(scales=0x70002, lora_stride=4096, channel_stride=1)]), "SGMV_ERROR_INVALID_ARGUMENT",
     "weight_scales.0. is not aligned"),
    (dict(scales=[dict(scales=0x70000, lora_stride=-1, channel_stride=1)]), "SGMV_ERROR_INVALID_ARGUMENT", ">= 0"),
    (dict(scales=[dict(scales=0x70000, lora_stride=2 ** 62, channel_stride=2 ** 62)]), "SGMV_ERROR_INVALID_ARGUMENT",
     "overflow"),
    (dict(weights_dtype=1), "SGMV_ERROR_INVALID_ARGUMENT", "scales are for float8_e4m3fn weights only"),
    (dict(inputs_dtype=2), "SGMV_ERROR_UNSUPPORTED_DTYPE", "float8_e4m3fn"),
    (dict(num_slices=2), "SGMV_ERROR_INVALID_ARGUMENT", "NULL"),
]


@pytest.mark.parametrize("over,status,words", BAD_STRUCTS, ids=[w for _, _, w in BAD_STRUCTS])
def test_bad_fp8_arguments_get_their_status_and_message(over, status, words):
    got, _, msg = config(expand_args(**over))
    assert got == S[status] and re.search(words, msg), msg
    a = expand_args(**over)
    assert L.sgmv_expand(a) == got  # the launch checks before touching the driver


def _sized(ctype, a, size):
    """A copy of *a in a buffer of `size` bytes with struct_size = size."""
    buf = ffi.new("char[]", max(size, ffi.sizeof(ctype)))
    ffi.memmove(buf, a, min(size, ffi.sizeof(ctype)))
    b = ffi.cast(ctype + " *", buf)
    b.struct_size = size
    return b, buf


@pytest.mark.parametrize("ctype,fn", [("sgmv_expand_args_t", "expand"), ("sgmv_shrink_args_t", "shrink")])
def test_structs_before_0_6_are_still_accepted(ctype, fn):
    """A caller built against 0.5's header passes structs that end before weight_scales: they are
    accepted, their fp16 calls plan as before whatever lies past them, and fp8 weights then lack
    their scales (a clear error)."""
    old = ffi.offsetof(ctype, "weight_scales")
    a = expand_args(weights_dtype=S["SGMV_DTYPE_BFLOAT16"], scales=[]) if fn == "expand" else shrink_args()
    cfg = getattr(L, f"sgmv_{fn}_config")
    want = ffi.new("sgmv_launch_config_t *")
    assert cfg(a, 90, want) == 0, ffi.string(L.sgmv_last_error())
    a.weight_scales[0].scales = ffi.cast("void *", 0xDEAD0)  # junk past the old size
    b, keep = _sized(ctype, a, old)
    got = ffi.new("sgmv_launch_config_t *")
    assert cfg(b, 90, got) == 0, ffi.string(L.sgmv_last_error())
    assert ffi.buffer(got)[:] == ffi.buffer(want)[:]
    b.weights_dtype = S["SGMV_DTYPE_FLOAT8_E4M3FN"]
    assert cfg(b, FP8_ARCHS[0] if FP8_ARCHS else 90, got) == S["SGMV_ERROR_INVALID_ARGUMENT"]
    assert "weight_scales[0].scales is NULL" in ffi.string(L.sgmv_last_error()).decode()


def test_tensor_and_layer_structs_before_0_6_are_still_accepted():
    """sgmv_shrink_tensors_t and sgmv_layer_args_t of 0.5's size (they end before the scales)."""
    t = ffi.new("sgmv_shrink_tensors_t *")
    t.struct_size, t.scaling = ffi.sizeof("sgmv_shrink_tensors_t"), 1.0
    fill_tensors(t, (("inputs", (10, 64), 0), ("weights", (2, 16, 64), 0), ("output", (10, 16), 0),
                     ("seq_start", (2,), 3), ("seq_len", (2,), 3), ("lora_indices", (2,), 3)))
    t.batches, t.max_seq_length = 2, 5
    t.weight_scales[0].data = ffi.cast("void *", 0xDEAD0)  # junk past the old size
    b, keep = _sized("sgmv_shrink_tensors_t", t, ffi.offsetof("sgmv_shrink_tensors_t", "weight_scales"))
    a = ffi.new("sgmv_shrink_args_t *")
    assert L.sgmv_shrink_args_from_tensors(b, a) == 0, ffi.string(L.sgmv_last_error())
    assert a.weight_scales[0].scales == ffi.NULL
    assert L.sgmv_shrink_args_from_tensors(t, a) == S["SGMV_ERROR_UNSUPPORTED_DTYPE"]  # junk: int32 "scales"
    la = ffi.new("sgmv_layer_args_t *")
    la.struct_size, la.scaling, la.num_slices = ffi.sizeof("sgmv_layer_args_t"), 1.0, 1
    for w, shape, at in ((la.lora_a[0], (2, 16, 64), 0x100000), (la.lora_b[0], (2, 64, 16), 0x200000)):
        w.data, w.dtype, w.ndim = ffi.cast("void *", at), 0, 3
        w.shape[0:3], w.strides[0:3] = list(shape), [shape[1] * shape[2], shape[2], 1]
    la.lora_a_scales[0].data = ffi.cast("void *", 0xDEAD0)
    b, keep = _sized("sgmv_layer_args_t", la, ffi.offsetof("sgmv_layer_args_t", "lora_a_scales"))
    h = ffi.new("sgmv_layer_t **")
    assert L.sgmv_layer_create(b, h) == 0, ffi.string(L.sgmv_last_error())
    L.sgmv_layer_destroy(h[0])
    assert L.sgmv_layer_create(la, h) != 0  # the junk, read: scales for fp16 weights
    b, keep = _sized("sgmv_layer_args_t", la, ffi.offsetof("sgmv_layer_args_t", "scaling") + 2)
    assert L.sgmv_layer_create(b, h) == S["SGMV_ERROR_INVALID_ARGUMENT"]


# ---- corrupt tensors: a clear error, nothing written ----------------------------------------------

def _fp16_weights(p):
    w = p.args[1]
    return w.to(torch.float16) if not isinstance(w, tuple) else tuple(t.to(torch.float16) for t in w)


CORRUPT = [  # (name, change of (args, kw), exception, words)
    ("no-scales", lambda a, kw: kw.pop("weight_scales"), sgmv.capi.InvalidArgument, "scales is NULL"),
    ("fp16-scales", lambda a, kw: kw.update(weight_scales=kw["weight_scales"].half()), sgmv.capi.UnsupportedDtype,
     "must be float32"),
    ("too-few-adapters", lambda a, kw: kw.update(weight_scales=kw["weight_scales"][:1]), sgmv.capi.InvalidArgument,
     "num_loras"),
    ("too-many-channels", lambda a, kw: kw.update(weight_scales=torch.ones(3, 129)), sgmv.capi.InvalidArgument,
     "num_loras"),
    ("3-d-scales", lambda a, kw: kw.update(weight_scales=torch.ones(3, 128, 1)), sgmv.capi.InvalidArgument,
     "num_loras"),
    ("scales-for-a-missing-slice", lambda a, kw: kw.update(weight_scales=(kw["weight_scales"],) * 2),
     sgmv.capi.InvalidArgument, r"weight_scales\[1\] is given"),
    ("fp32-inputs", lambda a, kw: a.__setitem__(0, a[0].float()), sgmv.capi.UnsupportedDtype, "float8_e4m3fn"),
    ("bf16-output-of-fp16-inputs", lambda a, kw: a.__setitem__(2, a[2].bfloat16()), sgmv.capi.UnsupportedDtype,
     "float8_e4m3fn"),
    ("scales-of-fp16-weights", lambda a, kw: a.__setitem__(1, a[1].half()), sgmv.capi.InvalidArgument,
     "scales are for float8_e4m3fn weights only"),
]


@pytest.mark.parametrize("module", [sgmv.jit, sgmv.reference], ids=["jit", "reference"])
@pytest.mark.parametrize("name,change,exc,words", CORRUPT, ids=[c[0] for c in CORRUPT])
def test_corrupt_fp8_arguments_raise_and_change_nothing(module, name, change, exc, words):
    p = Prepared(EXPAND[0], "cpu")
    args, kw = list(p.args), dict(p.kw)
    change(args, kw)
    out = args[2]
    before = out.clone()
    with pytest.raises(exc, match=words):
        module.sgmv_expand(*args, **kw)
    assert bitwise_equal(out, before) and bitwise_equal(p.buf, p.before)


# ---- the layer call -------------------------------------------------------------------------------

LAYER = [dataclasses.replace(c, fp8=("channel", "adapter")[i % 2], seed=c.seed + 300)
         for i, c in enumerate(LAYER_CASES)]


@pytest.mark.parametrize("case", LAYER, ids=str)
def test_layer_jit(case):
    run_layer(case, sgmv.jit.step_plan, sgmv.jit.layer_apply)


@pytest.mark.parametrize("case", LAYER[:3] + [dataclasses.replace(c, dtype="bf16") for c in LAYER[:3]], ids=str)
def test_layer_reference(case):
    run_layer(case, lambda step: None, sgmv.reference.layer_apply, device="cpu")


def test_layer_takes_fp8_tensors_whose_array_interface_raises(monkeypatch):
    """A CUDA fp8 torch tensor raises KeyError (no typestr), not AttributeError, from
    __cuda_array_interface__; the binding must not ask it (this failed every fp8 layer on an H100)."""
    def no_typestr(self):
        raise KeyError(self.dtype)
    monkeypatch.setattr(torch.Tensor, "__cuda_array_interface__", property(no_typestr), raising=False)
    run_layer(LAYER[0], lambda step: None, sgmv.reference.layer_apply, device="cpu")


def test_layer_keeps_the_intermediate_in_the_inputs_dtype():
    """With fp8 weights the step's intermediate is the activations' dtype: the layer call gives the
    bits of sgmv_shrink into an fp16 intermediate, then sgmv_expand from it (same plan)."""
    case = LAYER[1]
    layer, step, x, out, buf, rows = build_layer(case, "cpu")
    seq_start, seq_len, idx, _ = step._keep
    T, R, n = x.shape[0], case.rank, len(case.outs)
    sgmv.jit.step_plan(step)
    before = buf.clone()
    sgmv.jit.layer_apply(layer, x, out, step, add_inputs=case.add_inputs)
    fused = buf.clone()
    buf.copy_(before)
    plan = sgmv.jit.batch_plan(seq_start, seq_len, idx, len(case.lens), T, case.num_loras)
    y = torch.full((T, n * R), float("nan"), dtype=x.dtype)
    sgmv.jit.sgmv_shrink(x, layer.lora_a, y, seq_start, seq_len, idx, len(case.lens), max(case.lens), case.scaling,
                         lora_ranks=layer.lora_ranks, lora_scales=layer.lora_scales, batch_plan=plan,
                         workspace=torch.empty(sgmv.shrink_workspace_bytes(T, n * R) // 4),
                         weight_scales=layer.lora_a_scales)
    sgmv.jit.sgmv_expand(y, layer.lora_b, out, seq_start, seq_len, idx, len(case.lens), max(case.lens),
                         case.add_inputs, plan, lora_ranks=layer.lora_ranks, weight_scales=layer.lora_b_scales)
    assert bitwise_equal(fused, buf)


@pytest.mark.parametrize("change,exc,words", [
    (dict(lora_a_scales=None), sgmv.capi.InvalidArgument, r"lora_a\[0\]|weight_scales\[0\]\.scales is NULL"),
    (dict(lora_b_scales="half"), sgmv.capi.UnsupportedDtype, "must be float32"),
    (dict(lora_a_scales="wide"), sgmv.capi.InvalidArgument, "num_loras"),
])
def test_layer_refuses_bad_scales(change, exc, words):
    layer, *_ = build_layer(LAYER[1], "cpu")
    kw = dict(lora_a_scales=layer.lora_a_scales, lora_b_scales=layer.lora_b_scales)
    for k, v in change.items():
        kw[k] = None if v is None else tuple(s.half() if v == "half" else torch.ones(s.shape[0], 999)
                                             for s in kw[k])
    with pytest.raises(exc, match=words):
        sgmv.Layer(layer.lora_a, layer.lora_b, lora_ranks=layer.lora_ranks, lora_scales=layer.lora_scales,
                   scaling=layer.scaling, allow_cpu=True, **kw)


def test_layer_call_refuses_fp32_inputs_and_changes_nothing():
    layer, step, x, out, buf, rows = build_layer(LAYER[0], "cpu")
    sgmv.jit.step_plan(step)
    before = buf.clone()
    with pytest.raises(sgmv.capi.UnsupportedDtype, match="float8_e4m3fn"):
        sgmv.jit.layer_apply(layer, x.float(), out, step)
    assert bitwise_equal(buf, before)


# ---- through the fake driver ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    from test_faults import build_fake
    return build_fake(tmp_path_factory.mktemp("fake_cuda"))


FP8_CALL = dict(weights_dtype="SGMV_DTYPE_FLOAT8_E4M3FN",
                weight_scales=[dict(scales=0x70000, lora_stride=64, channel_stride=1)])


@pytest.mark.skipif(not FP8_ARCHS or FP8_ARCHS[0] not in ARCHS, reason="this build has no fp8 variants")
def test_fake_driver_launches_fp8_and_old_structs(fake):
    """An fp8 call launches what the planner says; an expand struct of 0.5's size (fp16) still
    launches; fp8 without scales and fp8 on an sm_80 device launch nothing."""
    from test_faults import scenario
    old = ffi.offsetof("sgmv_expand_args_t", "weight_scales")
    steps = [{"call": FP8_CALL}, {"call": {"struct_size": old}}, {"call": {"weights_dtype": FP8_CALL["weights_dtype"]}}]
    fp8, old_size, no_scales = scenario(fake, steps, FAKE_CUDA_CC=str(FP8_ARCHS[0]))
    for r in (fp8, old_size):
        assert r["status"] == 0, r["error"]
        assert r["calls"]["cuLaunchKernel"] >= 1 and r["last_launch"]["grid"] == r["planned"]["grid"], r
    assert no_scales["status"] == S["SGMV_ERROR_INVALID_ARGUMENT"] and "scales is NULL" in no_scales["error"]
    assert no_scales["calls"]["cuLaunchKernel"] == old_size["calls"]["cuLaunchKernel"]
    (sm80,) = scenario(fake, [{"call": FP8_CALL}], FAKE_CUDA_CC="80")
    assert sm80["status"] == S["SGMV_ERROR_UNSUPPORTED_ARCH"], sm80
    assert re.search(r"sm_80|8\.0", sm80["error"]) and sm80["calls"]["cuLaunchKernel"] == 0 and sm80["calls"]["cuLaunchKernelEx"] == 0


# ---- on a GPU -------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("with_plan", [False, True], ids=["no-plan", "plan"])
@pytest.mark.parametrize("case", CASES + BF16, ids=str)
def test_aot_matches_jit_bitwise_and_float64(case, with_plan):
    aot_matches_jit(case, with_plan)


GPU_LAYER = [LayerCase("decode-256-qkv", 4096, 64, (4096, 1024, 1024), [1] * 256, [i % 16 for i in range(256)], 16,
                       fp8="channel", seed=401),
             LayerCase("mixed-2048+64", 4096, 32, (4096,), [2048] + [1] * 64, [0] + [1 + i % 15 for i in range(64)],
                       16, fp8="adapter", ranks=[32, 8, 16, 32] * 4, scales=True, seed=402)]
GPU_LAYER = [dataclasses.replace(c, dtype=d, per_token=t) for c in GPU_LAYER for d in ("fp16", "bf16")
             for t in (False, True)]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_LAYER + LAYER, ids=str)
def test_layer_aot_matches_jit_and_float64(case):
    aot = run_layer(case, lambda step: step.plan(), lambda l, x, o, s, add_inputs: l(x, o, s, add_inputs=add_inputs))
    jit = run_layer(case, sgmv.jit.step_plan, sgmv.jit.layer_apply)
    if jit_matches_build():
        assert bitwise_equal(aot, jit), f"{case}: AOT and JIT differ"


@pytest.mark.gpu
def test_torch_layer_op_is_the_layer_call():
    """torch.ops.sgmv.layer with fp8 weights and their scales gives sgmv.Layer's bits."""
    case = GPU_LAYER[0]
    layer, step, x, out, buf, rows = build_layer(case, "cuda")
    step.plan()
    before = buf.clone()
    layer(x, out, step)
    want = buf.clone()
    buf.copy_(before)
    seq_start, seq_len, idx, mapping = step._keep
    torch.ops.sgmv.layer(x, out, list(layer.lora_a), list(layer.lora_b), seq_start, seq_len, idx, mapping,
                         step.batches, step.max_seq_length, step.total_tokens, step.num_loras, step.scratch, True,
                         layer.scaling, layer.lora_ranks, layer.lora_scales, list(layer.lora_a_scales),
                         list(layer.lora_b_scales))
    torch.cuda.synchronize()
    assert bitwise_equal(buf, want)


@pytest.mark.gpu
def test_fp8_on_a_gpu_without_fp8_variants_is_refused():
    """On a GPU whose arch has no fp8 variants (sm_80), the AOT call raises and writes nothing;
    elsewhere it runs."""
    p = Prepared(EXPAND[0], "cuda")
    major, minor = torch.cuda.get_device_capability()
    arch = L.sgmv_cubin_arch(major * 10 + minor)
    if arch in FP8_ARCHS:
        p.run(sgmv.sgmv_expand)
        return
    with pytest.raises(sgmv.SgmvError, match="float8_e4m3fn|no cubin"):
        sgmv.sgmv_expand(*p.args, **p.kw)
    torch.cuda.synchronize()
    assert bitwise_equal(p.buf, p.before)
