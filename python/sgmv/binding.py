"""The Python binding of libsgmv.so: it describes tensors and leaves every rule to the C library.

No torch, no triton, no JIT: torch tensors are read through their methods, other arrays through
__cuda_array_interface__. What Python checks is only what C cannot see: that arguments are
arrays, and that all of them are CUDA arrays of one device. The library checks the rest and its
status comes back as ValueError (SGMV_ERROR_INVALID_ARGUMENT), TypeError
(SGMV_ERROR_UNSUPPORTED_DTYPE) or SgmvError, with the library's message. What the binding refuses
itself is an sgmv.SgmvError too (capi.InvalidArgument, a ValueError, or capi.ArgumentTypeError, a
TypeError), so `except sgmv.SgmvError` catches every refusal.
"""
import struct
import sys
import threading

from . import capi

# sgmv_dtype_t by torch's dtype name (torch.float16 -> "float16"), from sgmv.h's SGMV_DTYPE_* names.
_DTYPE_NAMES = {name[len("SGMV_DTYPE_"):].lower(): value for name, value in capi.DTYPE.items()}
_INT32, _FLOAT32 = capi.DTYPE["SGMV_DTYPE_INT32"], capi.DTYPE["SGMV_DTYPE_FLOAT32"]
# __cuda_array_interface__ typestrs (bfloat16 has none; torch tensors are read directly).
_TYPESTR = {"<f2": _DTYPE_NAMES["float16"], "<f4": _FLOAT32, "<i4": _INT32, "<i8": _DTYPE_NAMES["int64"]}
_invalid, _type_error = capi.invalid_argument, capi.argument_type_error
_ITEMSIZE = {"<f2": 2, "<f4": 4, "<i4": 4, "<i8": 8}
_torch_dtypes = {}  # torch.dtype -> sgmv_dtype_t (or -1), filled as dtypes are seen


def _struct(ctype, fields, start=0):
    """A struct.Struct that packs fields `fields` of `ctype` (sgmv_tensor_t fields expand to data,
    dtype, ndim, shape[4], strides[4]) from byte `start`, laid out as cffi computed from sgmv.h:
    pack_into calls instead of dozens of cffi attribute writes."""
    ffi, fmt, pos = capi.ffi, "<", start

    def add(offset, t):
        nonlocal fmt, pos
        fmt += "x" * (offset - pos)
        if t.kind == "struct":
            for _, f in t.fields:
                add(offset + f.offset, f.type)
            return
        if t.kind == "array":
            for i in range(t.length):
                add(offset + i * ffi.sizeof(t.item), t.item)
            return
        size = ffi.sizeof(t)
        if t.kind == "primitive" and t.cname == "float":
            fmt += "f"
        else:
            fmt += {8: "q", 4: "i"}[size] if t.kind in ("primitive", "enum") else "Q"
        pos = offset + size

    t = ffi.typeof(ctype)
    names = [name for name, _ in t.fields]
    if names[names.index(fields[0]):][:len(fields)] != list(fields):
        raise ImportError(f"sgmv.h's {ctype} does not match this binding ({list(fields)})")
    for name, f in t.fields:
        if name in fields:
            add(f.offset, f.type)
    return struct.Struct(fmt)


def _offset(ctype, field):
    return dict(capi.ffi.typeof(ctype).fields)[field].offset


_TENSOR = _struct("sgmv_tensor_t", ("data", "dtype", "ndim", "shape", "strides"))
_NO_TENSOR = (0,) * 11  # data NULL: an optional tensor not given
_TENSORS = ("inputs", "weights", "output", "seq_start", "seq_len", "lora_indices")
_MAX_SLICES = dict(capi.ffi.typeof("sgmv_expand_tensors_t").fields)["slice_weights"].type.length + 1
_EXPAND_OFFSETS = [_offset("sgmv_expand_tensors_t", f) for f in _TENSORS]
_EXPAND_TAIL = _struct("sgmv_expand_tensors_t", ("batches", "max_seq_length", "add_inputs", "stream", "batch_plan",
                                                 "batch_plan_bytes", "num_slices"),
                       _offset("sgmv_expand_tensors_t", "batches"))
_EXPAND_TAIL_AT = _offset("sgmv_expand_tensors_t", "batches")
_EXPAND_SLICES_AT = _offset("sgmv_expand_tensors_t", "slice_weights")
_EXPAND_RANKS_AT = _offset("sgmv_expand_tensors_t", "lora_ranks")
_EXPAND_SCALES_AT = _offset("sgmv_expand_tensors_t", "weight_scales")
_SHRINK_OFFSETS = [_offset("sgmv_shrink_tensors_t", f) for f in _TENSORS]
_SHRINK_TAIL = _struct("sgmv_shrink_tensors_t", ("batches", "max_seq_length", "scaling", "num_slices"),
                       _offset("sgmv_shrink_tensors_t", "batches"))
_SHRINK_TAIL_AT = _offset("sgmv_shrink_tensors_t", "batches")
_SHRINK_SLICES_AT = _offset("sgmv_shrink_tensors_t", "slice_weights")
_SHRINK_RANKS_AT = _offset("sgmv_shrink_tensors_t", "lora_ranks")
_SHRINK_SCALES_AT = _offset("sgmv_shrink_tensors_t", "lora_scales")
_SHRINK_WSCALES_AT = _offset("sgmv_shrink_tensors_t", "weight_scales")
_SHRINK_END = _struct("sgmv_shrink_tensors_t", ("stream", "batch_plan", "batch_plan_bytes", "workspace",
                                                "workspace_bytes"), _offset("sgmv_shrink_tensors_t", "stream"))
_SHRINK_END_AT = _offset("sgmv_shrink_tensors_t", "stream")
_PLAN_HEAD = _struct("sgmv_batch_plan_args_t", ("plan", "plan_bytes"), _offset("sgmv_batch_plan_args_t", "plan"))
_PLAN_OFFSETS = [_offset("sgmv_batch_plan_args_t", f) for f in ("seq_start", "seq_len", "lora_indices")]
_PLAN_TAIL = _struct("sgmv_batch_plan_args_t", ("batches", "total_tokens", "num_loras", "stream"),
                     _offset("sgmv_batch_plan_args_t", "batches"))
_NAMES = ("inputs", "lora_b_weights", "output_tensor", "b_seq_start_loc", "seq_len_tensor", "lora_indices_tensor")
_SHRINK_NAMES = ("inputs", "lora_a_weights", "output_tensor", "b_seq_start_loc", "seq_len_tensor",
                 "lora_indices_tensor")
_PADS = [(0,) * (4 - n) for n in range(5)]


def _pack(mem, offset, a, name):
    """Writes a tensor's sgmv_tensor_t at `offset` of `mem`; returns its device index (-1: not
    a CUDA array)."""
    fields, device = describe(a, name)
    _TENSOR.pack_into(mem, offset, *fields)
    return device


def describe(a, name):
    """(data, dtype, ndim, shape[4], strides[4]) of a tensor as sgmv_tensor_t, and its device
    index (-1: not a CUDA array)."""
    try:  # torch, without importing it (the hot path: keep it lean)
        ptr, shape, strides, device = a.data_ptr(), a.shape, a.stride(), a.get_device()
    except AttributeError:
        ptr = None
    if ptr is not None:
        dt = _torch_dtypes.get(a.dtype)
        if dt is None:
            dt = _torch_dtypes.setdefault(a.dtype, _DTYPE_NAMES.get(str(a.dtype)[6:], -1))
        n = len(shape)
        if n > 4:
            raise _invalid(f"{name} has {n} dimensions (at most 4)")
        pad = _PADS[n]
        return (ptr, dt, n, *shape, *pad, *strides, *pad), device
    cai = getattr(a, "__cuda_array_interface__", None)
    if cai is None:
        raise _type_error(f"{name} must be a torch tensor or an array with __cuda_array_interface__, "
                        f"got {type(a).__name__}")
    shape, ts = tuple(cai["shape"]), cai["typestr"]
    if len(shape) > 4:
        raise _invalid(f"{name} has {len(shape)} dimensions (at most 4)")
    if cai.get("strides") is None:  # C-contiguous
        strides, s = [], 1
        for n in reversed(shape):
            strides.insert(0, s)
            s *= n
    else:
        size = _ITEMSIZE.get(ts, 1)
        if any(s % size for s in cai["strides"]):
            raise _invalid(f"{name} has strides that are not a multiple of its element size")
        strides = [s // size for s in cai["strides"]]
    pad = (0,) * (4 - len(shape))
    device = _cai_device(cai["data"][0])
    return (cai["data"][0], _TYPESTR.get(ts, -1), len(shape), *shape, *pad, *strides, *pad), device


def _cai_device(ptr):
    """The device of a __cuda_array_interface__ pointer (CuPy and Numba arrays are CUDA arrays;
    the interface does not name the device, so the current one is assumed)."""
    cupy = sys.modules.get("cupy")
    return cupy.cuda.Device().id if cupy is not None else 0


def _one_device(devices, names, allow_cpu=False):
    """All arrays on one CUDA device (or, for the interpreter, all on the CPU); returns it."""
    first = devices[0]
    if any(d != first for d in devices) or (first < 0 and not allow_cpu):
        where = ", ".join(f"{m}: {'cuda:%d' % e if e >= 0 else 'not CUDA'}" for m, e in zip(names, devices))
        raise _invalid(f"all tensors must be CUDA tensors on one device, got {where}")
    return first


def current_stream(device, array):
    """Torch's or CuPy's current stream on `device` for a torch or CuPy array, else the legacy
    default stream (0)."""
    if device < 0:
        return 0
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(array, torch.Tensor):
        return torch._C._cuda_getCurrentRawStream(device)
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(array, cupy.ndarray):
        return cupy.cuda.get_current_stream().ptr
    return 0


def stream_handle(stream):
    if isinstance(stream, int):
        return stream
    for attr in ("cuda_stream", "ptr", "handle"):  # torch.cuda.Stream, CuPy, Numba
        h = getattr(stream, attr, None)
        if h is not None:
            return int(h)
    raise _type_error(f"stream must be an int handle or a torch/CuPy/Numba stream, got {type(stream).__name__}")


def _plan_ref(batch_plan):
    """(address, bytes) of a batch plan array, (0, 0) for None."""
    if batch_plan is None:
        return 0, 0, None
    (ptr, dt, ndim, *rest), device = describe(batch_plan, "batch_plan")
    if dt != _INT32 or ndim != 1 or (rest[0] > 1 and rest[4] != 1):
        raise _invalid("batch_plan must be a contiguous 1-D int32 array (see sgmv.batch_plan_bytes)")
    return ptr, rest[0] * 4, device


_local = threading.local()


def _buffer(ctype):
    """This thread's reusable argument struct of type ctype (struct_size set), and its bytes."""
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    got = bufs.get(ctype)
    if got is None:
        buf = capi.ffi.new(ctype + " *")
        buf.struct_size = capi.ffi.sizeof(ctype)
        got = bufs[ctype] = (buf, capi.ffi.buffer(buf))
    return got


def _count(value, name):
    if type(value) is int:
        return value
    if type(value) is bool or not hasattr(value, "__index__"):
        raise _type_error(f"{name} must be an int, got {type(value).__name__}")
    return value.__index__()


def _slices(weights, name):
    """The weight stacks of a call: one array, or a tuple/list of up to SGMV_MAX_SLICES (fused slices)."""
    if isinstance(weights, (tuple, list)):
        if not 1 <= len(weights) <= _MAX_SLICES:
            raise _invalid(f"{name} must be an array or 1 to {_MAX_SLICES} arrays (fused slices), "
                             f"got {len(weights)}")
        return weights
    return (weights,)


def _pack_optional(mem, offset, a, name):
    """An optional tensor (None: data NULL); returns its device, or None if absent."""
    if a is None:
        _TENSOR.pack_into(mem, offset, *_NO_TENSOR)
        return None
    return _pack(mem, offset, a, name)


def _pack_common(mem, offsets, names, tensors, slices_at, optional):
    """The six tensors (weights: one stack or a tuple of slices), the further slices and optional
    per-adapter arrays; returns (devices, number of slices)."""
    stacks = _slices(tensors[1], names[1])
    devices = [_pack(mem, offsets[i], stacks[0] if i == 1 else tensors[i], names[i]) for i in range(6)]
    size = _TENSOR.size
    for i in range(1, _MAX_SLICES):
        if i < len(stacks) and stacks[i] is None:  # None means "absent" only for optional tensors
            raise _type_error(f"{names[1]}[{i}] must be an array, got None")
        d = _pack_optional(mem, slices_at + (i - 1) * size, stacks[i] if i < len(stacks) else None,
                           f"{names[1]}[{i}]")
        if d is not None:
            devices.append(d)
    for at, a, name in optional:
        d = _pack_optional(mem, at, a, name)
        if d is not None:
            devices.append(d)
    return devices, len(stacks)


def _pack_scales(mem, at, scales, name, devices):
    """fp8 weights' scales: None, one array (one slice) or a tuple of one per slice, into the
    SGMV_MAX_SLICES sgmv_tensor_t at `at` (absent ones data NULL); their devices join `devices`."""
    stacks = () if scales is None else _slices(scales, name)
    for i in range(_MAX_SLICES):
        d = _pack_optional(mem, at + i * _TENSOR.size, stacks[i] if i < len(stacks) else None, f"{name}[{i}]")
        if d is not None:
            devices.append(d)


def _call_device(devices, names, allow_cpu):
    device = devices[0]
    if devices.count(device) != len(devices) or (device < 0 and not allow_cpu):
        _one_device(devices, names + ("others",) * (len(devices) - len(names)), allow_cpu)
    return device


def expand_tensors(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                   batches, max_seq_length, add_inputs, stream, batch_plan, lora_ranks=None, allow_cpu=False,
                   weight_scales=None):
    """This thread's sgmv_expand_tensors_t for the call, filled; and the device."""
    buf, mem = _buffer("sgmv_expand_tensors_t")
    devices, n = _pack_common(mem, _EXPAND_OFFSETS, _NAMES, (inputs, lora_b_weights, output_tensor, b_seq_start_loc,
                                                             seq_len_tensor, lora_indices_tensor),
                              _EXPAND_SLICES_AT, ((_EXPAND_RANKS_AT, lora_ranks, "lora_ranks"),))
    _pack_scales(mem, _EXPAND_SCALES_AT, weight_scales, "weight_scales", devices)
    if type(add_inputs) is not bool:
        raise _type_error(f"add_inputs must be a bool, got {type(add_inputs).__name__}")
    plan_ptr, plan_bytes = 0, 0
    if batch_plan is not None:
        plan_ptr, plan_bytes, plan_device = _plan_ref(batch_plan)
        devices.append(plan_device)
    device = _call_device(devices, _NAMES, allow_cpu)
    s = current_stream(device, output_tensor) if stream is None else stream_handle(stream)
    _EXPAND_TAIL.pack_into(mem, _EXPAND_TAIL_AT, _count(batches, "batches"), _count(max_seq_length, "max_seq_length"),
                           add_inputs, s, plan_ptr, plan_bytes, n)
    return buf, device


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, add_inputs=False, batch_plan=None, *, lora_ranks=None, weight_scales=None,
                stream=None):
    """out[start_b + m, :] (+)= inputs[start_b + m, :] @ lora_b_weights[idx_b]^T, in place; returns output_tensor.

    Positionally the same parameters as sgmv.jit.sgmv_expand, sgmv.reference.sgmv_expand and
    torch.ops.sgmv.expand. Launched asynchronously on `stream` (keyword only; default: torch's
    or CuPy's current stream). With
    `batch_plan` (from sgmv.batch_plan, built from the same metadata) every program computes a
    dense tile of one adapter's rows. `lora_b_weights` may be a tuple of up to three stacks
    (fused slices: slice s reads inputs columns [s * rank, (s + 1) * rank) and writes its
    columns after slice s - 1's). `lora_ranks` (int32, per adapter): adapter a reads only its
    first lora_ranks[a] columns of each slice; 0 skips it. fp8 weights (torch.float8_e4m3fn, with
    fp16 or bf16 inputs) need `weight_scales`: float32, per slice (a tuple for several), (num_loras,)
    per adapter or (num_loras, hidden_s) per output column. Raises sgmv.SgmvError: also a
    ValueError/TypeError for arguments outside the contract.
    """
    buf, _ = expand_tensors(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                            lora_indices_tensor, batches, max_seq_length, add_inputs, stream, batch_plan, lora_ranks,
                            weight_scales=weight_scales)
    status = (_lib or _library()).sgmv_expand_tensors(buf)
    if status:
        capi.check(status)
    return output_tensor


def _float(value, name):
    if type(value) is bool or not isinstance(value, (int, float)):
        raise _type_error(f"{name} must be a float, got {type(value).__name__}")
    return float(value)


def shrink_tensors(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                   batches, max_seq_length, scaling, lora_ranks, lora_scales, batch_plan, workspace, stream,
                   allow_cpu=False, weight_scales=None):
    """This thread's sgmv_shrink_tensors_t for the call, filled; and the device."""
    buf, mem = _buffer("sgmv_shrink_tensors_t")
    devices, n = _pack_common(mem, _SHRINK_OFFSETS, _SHRINK_NAMES, (inputs, lora_a_weights, output_tensor,
                                                                    b_seq_start_loc, seq_len_tensor,
                                                                    lora_indices_tensor), _SHRINK_SLICES_AT,
                              ((_SHRINK_RANKS_AT, lora_ranks, "lora_ranks"),
                               (_SHRINK_SCALES_AT, lora_scales, "lora_scales")))
    _pack_scales(mem, _SHRINK_WSCALES_AT, weight_scales, "weight_scales", devices)
    plan_ptr, plan_bytes = 0, 0
    if batch_plan is not None:
        plan_ptr, plan_bytes, plan_device = _plan_ref(batch_plan)
        devices.append(plan_device)
    work_ptr, work_bytes = 0, 0
    if workspace is not None:
        (work_ptr, dt, ndim, *rest), work_device = describe(workspace, "workspace")
        if ndim != 1 or (rest[0] > 1 and rest[4] != 1) or dt not in (_FLOAT32, _INT32):
            raise _invalid("workspace must be a contiguous 1-D float32 or int32 array "
                             "(see sgmv.shrink_workspace_bytes)")
        work_bytes = rest[0] * 4
        devices.append(work_device)
    device = _call_device(devices, _SHRINK_NAMES, allow_cpu)
    s = current_stream(device, output_tensor) if stream is None else stream_handle(stream)
    _SHRINK_TAIL.pack_into(mem, _SHRINK_TAIL_AT, _count(batches, "batches"), _count(max_seq_length, "max_seq_length"),
                           _float(scaling, "scaling"), n)
    _SHRINK_END.pack_into(mem, _SHRINK_END_AT, s, plan_ptr, plan_bytes, work_ptr, work_bytes)
    return buf, device


def new_workspace(like, total_tokens, output_columns):
    """A float32 split-K workspace on like's device for the call (torch), or None if the call
    cannot split or like is not a torch tensor."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(like, torch.Tensor) or not like.is_cuda:
        return None
    n = (_lib or _library()).sgmv_shrink_call_workspace_bytes(total_tokens, output_columns)
    if not n:  # a call of this size never splits
        return None
    return torch.empty(n // 4, dtype=torch.float32, device=like.device)


def _shape(a):
    # .shape first: torch raises KeyError, not AttributeError, from __cuda_array_interface__ of
    # an fp8 tensor (it has no typestr for it).
    try:
        return tuple(a.shape)
    except AttributeError:
        return tuple(a.__cuda_array_interface__["shape"])


def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, scaling=1.0, *, lora_ranks=None, lora_scales=None, batch_plan=None,
                workspace=None, weight_scales=None, stream=None):
    """output[start_b + m, s*rank + r] = scaling * lora_scales[idx_b] * inputs[start_b + m, :] . A_s[idx_b, r, :]
    (LoRA A), written in place; returns output_tensor.

    `lora_a_weights`: (num_loras, rank, hidden) or (num_loras, 1, rank, hidden), or a tuple of
    up to three (fused slices, one launch). `lora_ranks` (int32): adapter a writes only columns
    r < lora_ranks[a] of each slice; `lora_scales` (float32): a per-adapter factor. Few rows with
    a large hidden are split over hidden with `workspace` (default with torch: one allocated per
    call when the call can split). fp8 weights: `weight_scales` as in sgmv_expand, per rank column
    ((num_loras, rank)) or per adapter; they multiply with scaling and lora_scales. Same launch and
    error rules as sgmv_expand.
    """
    if workspace is None:
        shape = _shape(output_tensor)
        if len(shape) == 2:
            workspace = new_workspace(output_tensor, shape[0], shape[1])
    buf, _ = shrink_tensors(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                            lora_indices_tensor, batches, max_seq_length, scaling, lora_ranks, lora_scales,
                            batch_plan, workspace, stream, weight_scales=weight_scales)
    status = (_lib or _library()).sgmv_shrink_tensors(buf)
    if status:
        capi.check(status)
    return output_tensor


def shrink_workspace_bytes(max_tokens, output_columns):
    """Bytes of a shrink workspace that allows every split for calls of up to max_tokens rows and
    output_columns (num_slices * rank) columns; 0 when such calls never split."""
    return capi.lib.sgmv_shrink_workspace_bytes(_count(max_tokens, "max_tokens"),
                                                _count(output_columns, "output_columns"))


_lib = None


def _library():
    """capi.lib, kept here: the module attribute goes through capi's __getattr__ on every access."""
    global _lib
    _lib = capi.lib
    return _lib


def batch_plan_bytes(max_batches, max_tokens):
    """Device bytes of a plan for up to max_batches segments and max_tokens rows."""
    n = capi.lib.sgmv_batch_plan_bytes(_count(max_batches, "max_batches"), _count(max_tokens, "max_tokens"))
    if n == 0:
        raise _invalid(f"no plan serves max_batches = {max_batches} and max_tokens = {max_tokens} "
                         "(both in [0, 2^30))")
    return n


def plan_args(seq_start, seq_len, lora_indices, batches, total_tokens, num_loras, out, stream, allow_cpu=False):
    """This thread's sgmv_batch_plan_args_t, filled; and the device."""
    buf, mem = _buffer("sgmv_batch_plan_args_t")
    o = _PLAN_OFFSETS
    devices = [_pack(mem, o[0], seq_start, "seq_start"), _pack(mem, o[1], seq_len, "seq_len"),
               _pack(mem, o[2], lora_indices, "lora_indices")]
    plan_ptr, plan_bytes, plan_device = _plan_ref(out)
    device = _one_device(devices + [plan_device], ("seq_start", "seq_len", "lora_indices", "out"), allow_cpu)
    s = current_stream(device, out) if stream is None else stream_handle(stream)
    _PLAN_HEAD.pack_into(mem, _offset("sgmv_batch_plan_args_t", "plan"), plan_ptr, plan_bytes)
    _PLAN_TAIL.pack_into(mem, _offset("sgmv_batch_plan_args_t", "batches"), _count(batches, "batches"),
                         _count(total_tokens, "total_tokens"), _count(num_loras, "num_loras"), s)
    return buf, device


def new_plan(like, batches, total_tokens, max_batches, max_tokens):
    """A torch int32 plan buffer on like's device, for up to max_batches and max_tokens."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(like, torch.Tensor):
        raise _type_error("pass out= (a 1-D int32 array of sgmv.batch_plan_bytes() bytes) when not using torch")
    n = batch_plan_bytes(batches if max_batches is None else max_batches,
                         total_tokens if max_tokens is None else max_tokens)
    return torch.empty(n // 4, dtype=torch.int32, device=like.device)


def batch_plan(seq_start, seq_len, lora_indices, batches, total_tokens, num_loras, out=None, max_batches=None,
               max_tokens=None, stream=None):
    """Groups a step's rows by adapter, on the device (one small launch, capturable in a CUDA
    graph): returns the plan (`out`, or a new int32 tensor sized for max_batches and max_tokens,
    default batches and total_tokens) to pass as batch_plan= to every expand call of the step."""
    if out is None:
        out = new_plan(seq_start, batches, total_tokens, max_batches, max_tokens)
    buf, _ = plan_args(seq_start, seq_len, lora_indices, batches, total_tokens, num_loras, out, stream)
    capi.check(capi.lib.sgmv_batch_plan_build(buf))
    return out


# ---- the layer call: a step described once per step, a layer once at model load -----------------

_SIZEOF_TENSOR = _TENSOR.size
_STEP_META_AT = [_offset("sgmv_step_args_t", f) for f in ("seq_start", "seq_len", "lora_indices",
                                                           "token_lora_mapping")]
_STEP_TAIL = _struct("sgmv_step_args_t", ("batches", "max_seq_length", "total_tokens", "num_loras", "scratch",
                                          "scratch_bytes"), _offset("sgmv_step_args_t", "batches"))
_STEP_TAIL_AT = _offset("sgmv_step_args_t", "batches")
_STEP_NAMES = ("seq_start", "seq_len", "lora_indices", "token_lora_mapping")
_DEFAULT_COLUMNS = 3 * 256  # the widest layer: SGMV_MAX_SLICES slices of rank 256


def step_scratch_bytes(max_batches, max_tokens, max_columns=_DEFAULT_COLUMNS):
    """Device bytes of a Step's scratch buffer: up to max_batches segments (with a token mapping,
    max_tokens) and max_tokens rows, for layers of up to max_columns = num_slices * rank."""
    n = (_lib or _library()).sgmv_step_scratch_bytes(_count(max_batches, "max_batches"),
                                                     _count(max_tokens, "max_tokens"),
                                                     _count(max_columns, "max_columns"))
    if n == 0:
        raise _invalid(f"no step serves max_batches = {max_batches}, max_tokens = {max_tokens} (both in [0, 2^30)) "
                       f"and max_columns = {max_columns} (in [1, {_DEFAULT_COLUMNS}])")
    return n


def _scratch_ref(scratch):
    """(address, bytes, device) of a step's scratch array (contiguous, any dtype)."""
    try:  # torch
        ptr, nbytes, device, dense = scratch.data_ptr(), scratch.nbytes, scratch.get_device(), scratch.is_contiguous()
    except AttributeError:
        (ptr, dt, ndim, *rest), device = describe(scratch, "scratch")
        cai = scratch.__cuda_array_interface__
        nbytes = rest[0] * _ITEMSIZE.get(cai["typestr"], 1) if ndim == 1 else 0
        dense = ndim == 1 and (rest[0] <= 1 or rest[4] == 1)
    if not dense:
        raise _invalid("scratch must be a contiguous array (see sgmv.step_scratch_bytes)")
    return ptr, nbytes, device


class Step:
    """One serving step's rows, described once for every layer call of the step: the metadata
    (LoRAX's segments, or vLLM's per-token adapter index), its batch plan built on the device,
    and the scratch buffer holding the plan, each layer's intermediate and the split-K workspace.

        step = sgmv.Step(seq_start, seq_len, lora_indices, total_tokens=T, num_loras=L)
        step = sgmv.Step(token_lora_mapping=mapping, num_loras=L)      # one adapter per row (-1: none)
        layer(x, out, step)                                            # for every layer of the step

    `batches` defaults to len(seq_start), `max_seq_length` to total_tokens (it only picks tiles).
    `scratch` (a contiguous device array of sgmv.step_scratch_bytes() bytes) is allocated with
    torch when not given, for layers of up to `max_columns` = num_slices * rank. The plan is built
    on `stream` (default: the current stream) unless plan=False; call step.plan() again after
    changing the metadata in place (in a CUDA graph: capture it with the layer calls)."""

    __slots__ = ("_h", "_keep", "total_tokens", "num_loras", "device", "scratch", "batches", "max_seq_length",
                 "__weakref__")

    def __init__(self, seq_start=None, seq_len=None, lora_indices=None, batches=None, max_seq_length=None, *,
                 token_lora_mapping=None, total_tokens=None, num_loras, scratch=None, max_columns=_DEFAULT_COLUMNS,
                 plan=True, stream=None, allow_cpu=False):
        buf, mem = _buffer("sgmv_step_args_t")
        per_token = token_lora_mapping is not None
        meta = (None, None, None, token_lora_mapping) if per_token else (seq_start, seq_len, lora_indices, None)
        if per_token and not (seq_start is None and seq_len is None and lora_indices is None):
            raise _invalid("token_lora_mapping replaces seq_start, seq_len and lora_indices: pass one or the other")
        if not per_token and (seq_start is None or seq_len is None or lora_indices is None):
            raise _type_error("sgmv.Step needs seq_start, seq_len and lora_indices, or token_lora_mapping")
        devices, n = [], 0
        for at, m, name in zip(_STEP_META_AT, meta, _STEP_NAMES):
            if m is None:
                _TENSOR.pack_into(mem, at, *_NO_TENSOR)
                continue
            fields, d = describe(m, name)
            _TENSOR.pack_into(mem, at, *fields)
            devices.append(d)
            n = n or (fields[3] if fields[2] else 0)  # the first array's length: the default batches
        first = meta[3] if per_token else meta[0]
        if total_tokens is None:
            if not per_token:
                raise _type_error("sgmv.Step with segments needs total_tokens (the rows of the step)")
            total_tokens = n
        total_tokens = _count(total_tokens, "total_tokens")
        batches = n if batches is None else _count(batches, "batches")
        max_seq_length = total_tokens if max_seq_length is None else _count(max_seq_length, "max_seq_length")
        if scratch is None:
            torch = sys.modules.get("torch")
            if torch is None or not isinstance(first, torch.Tensor):
                raise _type_error("pass scratch= (a 1-D device array of sgmv.step_scratch_bytes() bytes) when not "
                                  "using torch")
            size = step_scratch_bytes(total_tokens if per_token else batches, total_tokens, max_columns)
            scratch = torch.empty(size, dtype=torch.uint8, device=first.device)
        ptr, nbytes, d = _scratch_ref(scratch)
        devices.append(d)
        self.device = d
        if devices.count(d) != len(devices) or (d < 0 and not allow_cpu):
            _one_device(devices, _STEP_NAMES[3:] + ("scratch",) if per_token else _STEP_NAMES[:3] + ("scratch",),
                        allow_cpu)
        _STEP_TAIL.pack_into(mem, _STEP_TAIL_AT, batches, max_seq_length, total_tokens,
                             _count(num_loras, "num_loras"), ptr, nbytes)
        h = capi.ffi.new("sgmv_step_t **")
        capi.check((_lib or _library()).sgmv_step_create(buf, h))
        self._h = capi.ffi.gc(h[0], _lib.sgmv_step_destroy)
        self._keep = meta
        self.total_tokens, self.num_loras, self.scratch = total_tokens, num_loras, scratch
        self.batches, self.max_seq_length = (total_tokens, 1) if per_token else (batches, max_seq_length)
        if plan:
            self.plan(stream=stream)

    def plan(self, *, stream=None):
        """Builds the step's batch plan from its metadata (two small launches on `stream`)."""
        s = current_stream(self.device, self.scratch) if stream is None else stream_handle(stream)
        status = _lib.sgmv_step_plan(self._h, _streams.get(s) or _stream_ptr(s))
        if status:
            capi.check(status)
        return self


class Layer:
    """One LoRA layer's adapters, described once (at model load): A and B of up to three fused
    slices (QKV, gate/up), per-adapter ranks and scales. A call applies the whole LoRA delta

        out[:, slice s] (+)= (scaling * lora_scales[idx] * x @ A_s[idx]^T) @ B_s[idx]^T

    for every row of the step: `layer(x, out, step)` (add_inputs=True: out += delta), one call in
    place of sgmv_shrink then sgmv_expand, on torch's current stream unless `stream` is given.

    lora_a: (num_loras, rank, hidden) or (num_loras, 1, rank, hidden), or a tuple of up to three;
    lora_b: (num_loras, hidden_s, rank) or (num_loras, 1, hidden_s, rank), as many; one dtype
    (float16 or bfloat16, or float8_e4m3fn with `lora_a_scales` and `lora_b_scales`, float32, one
    per slice, per adapter (num_loras,) or per output channel (num_loras, rank) and (num_loras,
    hidden_s); x is then fp16 or bf16, the intermediate's dtype). The tensors stay the caller's:
    the layer reads them where they lie."""

    __slots__ = ("_h", "_keep", "device", "dtype", "num_slices", "rank", "hidden", "out_columns", "lora_a",
                 "lora_b", "lora_ranks", "lora_scales", "scaling", "lora_a_scales", "lora_b_scales", "__weakref__")

    def __init__(self, lora_a, lora_b, *, lora_ranks=None, lora_scales=None, scaling=1.0, lora_a_scales=None,
                 lora_b_scales=None, allow_cpu=False):
        a_stacks, b_stacks = _slices(lora_a, "lora_a"), _slices(lora_b, "lora_b")
        if len(a_stacks) != len(b_stacks):
            raise _invalid(f"lora_a has {len(a_stacks)} slices, lora_b {len(b_stacks)}: one A and one B per slice")
        args = capi.ffi.new("sgmv_layer_args_t *")
        args.struct_size = capi.ffi.sizeof("sgmv_layer_args_t")
        mem = capi.ffi.buffer(args)
        devices = []
        for field, stacks in (("lora_a", a_stacks), ("lora_b", b_stacks)):
            at = _offset("sgmv_layer_args_t", field)
            for i, w in enumerate(stacks):
                if w is None:
                    raise _type_error(f"{field}[{i}] must be an array, got None")
                devices.append(_pack(mem, at + i * _SIZEOF_TENSOR, w, f"{field}[{i}]"))
        for field, a in (("lora_ranks", lora_ranks), ("lora_scales", lora_scales)):
            d = _pack_optional(mem, _offset("sgmv_layer_args_t", field), a, field)
            if d is not None:
                devices.append(d)
        for field, a in (("lora_a_scales", lora_a_scales), ("lora_b_scales", lora_b_scales)):
            _pack_scales(mem, _offset("sgmv_layer_args_t", field), a, field, devices)
        self.device = _call_device(devices, ("lora_a",), allow_cpu)
        args.num_slices = len(a_stacks)
        args.scaling = _float(scaling, "scaling")
        h = capi.ffi.new("sgmv_layer_t **")
        capi.check((_lib or _library()).sgmv_layer_create(args, h))
        self._h = capi.ffi.gc(h[0], _lib.sgmv_layer_destroy)
        self.lora_a, self.lora_b, self.lora_ranks, self.lora_scales = tuple(a_stacks), tuple(b_stacks), lora_ranks, \
            lora_scales
        self.scaling, self.num_slices = float(scaling), len(a_stacks)
        self.lora_a_scales = None if lora_a_scales is None else tuple(_slices(lora_a_scales, "lora_a_scales"))
        self.lora_b_scales = None if lora_b_scales is None else tuple(_slices(lora_b_scales, "lora_b_scales"))
        self.dtype = a_stacks[0].dtype
        self.rank, self.hidden = _shape(a_stacks[0])[-2:]
        self.out_columns = sum(_shape(b)[-2] for b in b_stacks)
        self._keep = (args,)

    def __call__(self, x, out, step, *, add_inputs=True, stream=None):
        """out (+)= the layer's LoRA delta of x for the step's rows; returns out."""
        t = _thread_tensors()
        xf, xd = describe(x, "x")
        of, od = describe(out, "out")
        if xd != od or od != self.device or step.device != od:
            _one_device([xd, od, self.device, step.device], ("x", "out", "layer", "step"), self.device < 0)
        if type(add_inputs) is not bool:
            raise _type_error(f"add_inputs must be a bool, got {type(add_inputs).__name__}")
        mem = t[1]
        _TENSOR.pack_into(mem, 0, *xf)
        _TENSOR.pack_into(mem, _SIZEOF_TENSOR, *of)
        s = current_stream(od, out) if stream is None else stream_handle(stream)
        status = _lib.sgmv_layer_apply(self._h, step._h, t[0], t[2], add_inputs, _streams.get(s) or _stream_ptr(s))
        if status:
            capi.check(status)
        return out


_streams = {}  # stream handle -> sgmv_stream_t cdata (a cast costs more than the lookup)


def _stream_ptr(handle):
    p = capi.ffi.cast("sgmv_stream_t", handle)
    if len(_streams) < 1024:
        _streams[handle] = p
    return p


def _thread_tensors():
    """This thread's pair of sgmv_tensor_t (a layer call's inputs and output): (first, buffer, second)."""
    got = getattr(_local, "pair", None)
    if got is None:
        arr = capi.ffi.new("sgmv_tensor_t[2]")
        got = _local.pair = (arr, capi.ffi.buffer(arr), arr + 1)
    return got
