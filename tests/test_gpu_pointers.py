"""On a GPU: pointers the kernels cannot use are refused before any launch, with
SGMV_ERROR_INVALID_ARGUMENT (sgmv.capi.InvalidArgument, a ValueError) and a message naming the
argument: a data pointer that is not a multiple of its element size, a plan or a workspace not
aligned as sgmv.h documents (plan 4 bytes, workspace 16). After each refusal the next valid call in
the same process is correct. Misaligned addresses are described through __cuda_array_interface__
(torch cannot make a view at an odd byte offset). Before the real call, the library's own checks
are asked without a launch (sgmv_*_args_from_tensors, then sgmv_*_launches): a library that would
launch such a pointer fails the test without launching it, so the context stays usable."""
import pytest
import torch

import sgmv
from sgmv import binding, capi
from sgmv.testing import LoraCase, build_lora, check, expected_lora

pytestmark = pytest.mark.gpu
INVALID = 1  # SGMV_ERROR_INVALID_ARGUMENT


class Raw:
    """A device array at an arbitrary address (inside `keep`, which owns the memory)."""

    def __init__(self, keep, byte_offset, shape, typestr):
        self.keep = keep
        self.__cuda_array_interface__ = {"data": (keep.data_ptr() + byte_offset, False), "shape": tuple(shape),
                                         "typestr": typestr, "strides": None, "version": 3}


def raw_like(t, byte_offset):
    """t's values (fp16, fp32, int32 or int64) copied to an address byte_offset past a 256-byte aligned one."""
    ts = {torch.float16: "<f2", torch.float32: "<f4", torch.int32: "<i4", torch.int64: "<i8"}[t.dtype]
    nbytes = t.numel() * t.element_size()
    keep = torch.zeros(nbytes + 512, dtype=torch.uint8, device="cuda")
    keep[byte_offset:byte_offset + nbytes] = t.contiguous().view(-1).view(torch.uint8)
    return Raw(keep, byte_offset, t.shape, ts)


def case(op):
    if op == "expand":
        return LoraCase("ptr", "expand", 16, [64], [3, 1, 4], [0, 1, 0], 2, "fp16", torch.int32, add_inputs=True, seed=7)
    return LoraCase("ptr", "shrink", 16, [2048], [1, 1, 2], [0, 1, 0], 2, "fp16-fp32out", torch.int32, seed=8)


def fresh(op):
    args, kw, buf = build_lora(case(op), "cuda")
    return list(args), kw, buf


def would_launch(op, args, kw):
    """0 if the library's checks pass (it would launch), else the status it refuses with; no launch."""
    x, w, out, st, ln, ix, b, ms, last = args
    if op == "expand":
        t, _ = binding.expand_tensors(x, w, out, st, ln, ix, b, ms, last, 0, kw.get("batch_plan"), kw.get("lora_ranks"))
        a = capi.ffi.new("sgmv_expand_args_t *")
        status = capi.lib.sgmv_expand_args_from_tensors(t, a)
    else:
        t, _ = binding.shrink_tensors(x, w, out, st, ln, ix, b, ms, last, kw.get("lora_ranks"), kw.get("lora_scales"),
                                      kw.get("batch_plan"), kw.get("workspace"), 0)
        a = capi.ffi.new("sgmv_shrink_args_t *")
        status = capi.lib.sgmv_shrink_args_from_tensors(t, a)
    if status:
        return status
    d = capi.ffi.new("sgmv_launches_t *")
    d.struct_size = capi.ffi.sizeof("sgmv_launches_t")
    return getattr(capi.lib, f"sgmv_{op}_launches")(a, 90, capi.ffi.NULL, d)


def valid_call_is_correct(op):
    args, kw, buf = fresh(op)
    before = buf.clone()
    exp, written, slack = expected_lora(op, tuple(args), kw)
    getattr(sgmv, f"sgmv_{op}")(*args, **kw)
    torch.cuda.synchronize()
    check(tuple(args), before, buf, exp, written, f"valid {op} after a refused call", slack)


# (op, what, position in args or a keyword, byte offset, name the message must hold)
BAD = [
    ("expand", "inputs", 0, 1, "inputs"),            # fp16 at an odd byte
    ("expand", "weights", 1, 1, "weights"),
    ("expand", "output", 2, 1, "output"),
    ("expand", "seq_start", 3, 2, "seq_start"),      # int32 at 2 bytes
    ("expand", "seq_len", 4, 2, "seq_len"),
    ("expand", "lora_indices", 5, 2, "lora_indices"),
    ("expand", "lora_ranks", "lora_ranks", 2, "lora_ranks"),
    ("expand", "batch_plan", "batch_plan", 2, "batch_plan"),
    ("shrink", "inputs", 0, 1, "inputs"),
    ("shrink", "output", 2, 2, "output"),            # fp32 at 2 bytes
    ("shrink", "lora_scales", "lora_scales", 2, "lora_scales"),
    ("shrink", "workspace", "workspace", 4, "workspace"),  # 4-byte aligned, not 16
    ("shrink", "workspace-8", "workspace", 8, "workspace"),
]


@pytest.mark.parametrize("op,what,where,offset,name", BAD, ids=[f"{b[0]}-{b[1]}" for b in BAD])
def test_misaligned_pointer_is_refused_and_the_next_call_is_right(op, what, where, offset, name):
    args, kw, _ = fresh(op)
    if where == "lora_ranks":
        kw["lora_ranks"] = torch.tensor([16, 9], dtype=torch.int32, device="cuda")
    if where == "lora_scales":
        kw["lora_scales"] = torch.tensor([1.0, 0.5], dtype=torch.float32, device="cuda")
    if where == "batch_plan":
        kw["batch_plan"] = sgmv.batch_plan(*args[3:7], args[0].shape[0], args[1].shape[0])
    if where == "workspace":
        kw["workspace"] = torch.zeros(sgmv.shrink_workspace_bytes(*args[2].shape) // 4, dtype=torch.float32,
                                      device="cuda")
    if isinstance(where, int):
        args[where] = raw_like(args[where], offset)
    else:
        kw[where] = raw_like(kw[where], offset)
    status = would_launch(op, args, kw)
    assert status == INVALID, (f"{op}: {what} at a misaligned address: the library's checks return {status} "
                               f"(0: it would launch it; not launched here)")
    with pytest.raises(ValueError) as e:
        getattr(sgmv, f"sgmv_{op}")(*args, **kw)
    assert isinstance(e.value, capi.InvalidArgument) and e.value.status == INVALID, repr(e.value)
    assert name in str(e.value), f"the message does not name {name}: {e.value}"
    torch.cuda.synchronize()  # nothing was launched: no sticky error either
    valid_call_is_correct(op)


def test_element_aligned_pointer_that_is_not_16_byte_aligned_is_served():
    """fp16 inputs 2 bytes past an aligned address are legal (the unaligned tile): not refused, correct."""
    args, kw, buf = fresh("expand")
    before = buf.clone()
    exp, written, slack = expected_lora("expand", tuple(args), kw)
    args[0] = raw_like(args[0], 2)
    assert would_launch("expand", args, kw) == 0
    sgmv.sgmv_expand(*args, **kw)
    torch.cuda.synchronize()
    check(tuple(args), before, buf, exp, written, "inputs at 2 bytes", slack)


def test_plan_build_refuses_a_misaligned_plan():
    args, kw, _ = fresh("expand")
    T, L = args[0].shape[0], args[1].shape[0]
    n = sgmv.batch_plan_bytes(args[6], T) // 4
    plan = raw_like(torch.zeros(n, dtype=torch.int32, device="cuda"), 2)
    with pytest.raises(ValueError) as e:
        sgmv.batch_plan(*args[3:7], T, L, out=plan)
    assert "plan" in str(e.value), str(e.value)
    valid_call_is_correct("expand")
