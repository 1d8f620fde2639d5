"""The Python binding of libsgmv.so: it describes tensors and leaves every rule to the C library.

No torch, no triton, no JIT: torch tensors are read through their methods, other arrays through
__cuda_array_interface__. What Python checks is only what C cannot see: that arguments are
arrays, and that all of them are CUDA arrays of one device. The library checks the rest and its
status comes back as ValueError (SGMV_ERROR_INVALID_ARGUMENT), TypeError
(SGMV_ERROR_UNSUPPORTED_DTYPE) or SgmvError, with the library's message.
"""
import struct
import sys
import threading

from . import capi

# sgmv_dtype_t
_DTYPE_NAMES = {"float16": 0, "bfloat16": 1, "float32": 2, "int32": 3, "int64": 4}
# __cuda_array_interface__ typestrs (bfloat16 has none; torch tensors are read directly).
_TYPESTR = {"<f2": 0, "<f4": 2, "<i4": 3, "<i8": 4}
_ITEMSIZE = {"<f2": 2, "<f4": 4, "<i4": 4, "<i8": 8}
_torch_dtypes = {}  # torch.dtype -> sgmv_dtype_t (or -1), filled as dtypes are seen


def _struct(ctype, fields):
    """A struct.Struct that packs `ctype` from values for `fields` (sgmv_tensor_t fields expand to
    data, dtype, ndim, shape[4], strides[4]), laid out as cffi computed from sgmv.h: one
    pack_into per call instead of dozens of cffi attribute writes."""
    ffi, fmt, pos = capi.ffi, "<", 0

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
        fmt += {8: "q", 4: "i"}[size] if t.kind in ("primitive", "enum") else "Q"
        pos = offset + size

    t = ffi.typeof(ctype)
    if [name for name, _ in t.fields] != list(fields):
        raise ImportError(f"sgmv.h's {ctype} does not match this binding ({list(fields)})")
    for _, f in t.fields:
        add(f.offset, f.type)
    return struct.Struct(fmt + "x" * (ffi.sizeof(t) - pos))


_TENSORS = _struct("sgmv_expand_tensors_t", ("struct_size", "inputs", "weights", "output", "seq_start", "seq_len",
                                             "lora_indices", "batches", "max_seq_length", "add_inputs", "stream",
                                             "batch_plan", "batch_plan_bytes"))
_PLAN = _struct("sgmv_batch_plan_args_t", ("struct_size", "plan", "plan_bytes", "seq_start", "seq_len",
                                           "lora_indices", "batches", "total_tokens", "num_loras", "stream"))
_NAMES = ("inputs", "lora_b_weights", "output_tensor", "b_seq_start_loc", "seq_len_tensor", "lora_indices_tensor")


def describe(a, name):
    """(data, dtype, ndim, shape[4], strides[4]) of a tensor as sgmv_tensor_t, and its device
    index (-1: not a CUDA array)."""
    try:  # torch, without importing it (the hot path: keep it lean)
        dt = _torch_dtypes.get(a.dtype)
        if dt is None:
            dt = _torch_dtypes.setdefault(a.dtype, _DTYPE_NAMES.get(str(a.dtype)[6:], -1))
        shape, strides = a.shape, a.stride()
        n = len(shape)
        if n > 4:
            raise ValueError(f"{name} has {n} dimensions (at most 4)")
        pad = (0,) * (4 - n)
        return (a.data_ptr(), dt, n, *shape, *pad, *strides, *pad), a.get_device()
    except AttributeError:
        pass
    cai = getattr(a, "__cuda_array_interface__", None)
    if cai is None:
        raise TypeError(f"{name} must be a torch tensor or an array with __cuda_array_interface__, "
                        f"got {type(a).__name__}")
    shape, ts = tuple(cai["shape"]), cai["typestr"]
    if len(shape) > 4:
        raise ValueError(f"{name} has {len(shape)} dimensions (at most 4)")
    if cai.get("strides") is None:  # C-contiguous
        strides, s = [], 1
        for n in reversed(shape):
            strides.insert(0, s)
            s *= n
    else:
        size = _ITEMSIZE.get(ts, 1)
        if any(s % size for s in cai["strides"]):
            raise ValueError(f"{name} has strides that are not a multiple of its element size")
        strides = [s // size for s in cai["strides"]]
    pad = (0,) * (4 - len(shape))
    device = _cai_device(cai["data"][0])
    return (cai["data"][0], _TYPESTR.get(ts, -1), len(shape), *shape, *pad, *strides, *pad), device


def _cai_device(ptr):
    """The device of a __cuda_array_interface__ pointer (CuPy and Numba arrays are CUDA arrays;
    the interface does not name the device, so the current one is assumed)."""
    cupy = sys.modules.get("cupy")
    return cupy.cuda.Device().id if cupy is not None else 0


def _int(value, name):
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value.__index__()


def _one_device(devices, names, allow_cpu=False):
    """All arrays on one CUDA device (or, for the interpreter, all on the CPU); returns it."""
    first = devices[0]
    for d, n in zip(devices, names):
        if d != first or (d < 0 and not allow_cpu):
            where = ", ".join(f"{m}: {'cuda:%d' % e if e >= 0 else 'not CUDA'}" for m, e in zip(names, devices))
            raise ValueError(f"all tensors must be CUDA tensors on one device, got {where}")
    return first


def current_stream(device, array):
    """Torch's or CuPy's current stream on `device` for a torch or CuPy array, else the legacy
    default stream (0)."""
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
    raise TypeError(f"stream must be an int handle or a torch/CuPy/Numba stream, got {type(stream).__name__}")


def _plan_ref(batch_plan):
    """(address, bytes) of a batch plan array, (0, 0) for None."""
    if batch_plan is None:
        return 0, 0, None
    (ptr, dt, ndim, *rest), device = describe(batch_plan, "batch_plan")
    if dt != 3 or ndim != 1 or (rest[0] > 1 and rest[4] != 1):
        raise ValueError("batch_plan must be a contiguous 1-D int32 array (see sgmv.batch_plan_bytes)")
    return ptr, rest[0] * 4, device


_local = threading.local()


def _buffer(ctype):
    """This thread's reusable argument struct of type ctype."""
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    buf = bufs.get(ctype)
    if buf is None:
        buf = bufs[ctype] = capi.ffi.new(ctype + " *")
    return buf


def expand_tensors(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                   batches, max_seq_length, add_inputs, stream, batch_plan, allow_cpu=False):
    """This thread's sgmv_expand_tensors_t for the call, filled; and the device."""
    described = [describe(t, n) for t, n in zip((inputs, lora_b_weights, output_tensor, b_seq_start_loc,
                                                 seq_len_tensor, lora_indices_tensor), _NAMES)]
    batches = _int(batches, "batches")
    max_seq_length = _int(max_seq_length, "max_seq_length")
    if not isinstance(add_inputs, bool):
        raise TypeError(f"add_inputs must be a bool, got {type(add_inputs).__name__}")
    plan_ptr, plan_bytes, plan_device = _plan_ref(batch_plan)
    devices = [d for _, d in described] + ([plan_device] if batch_plan is not None else [])
    device = _one_device(devices, _NAMES + ("batch_plan",), allow_cpu)
    s = current_stream(device, output_tensor) if stream is None else stream_handle(stream)
    buf = _buffer("sgmv_expand_tensors_t")
    _TENSORS.pack_into(capi.ffi.buffer(buf), 0, _TENSORS.size, *described[0][0], *described[1][0], *described[2][0],
                       *described[3][0], *described[4][0], *described[5][0], batches, max_seq_length, add_inputs, s,
                       plan_ptr, plan_bytes)
    return buf, device


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, add_inputs=False, stream=None, batch_plan=None):
    """out[start_b + m, :] (+)= inputs[start_b + m, :] @ lora_b_weights[idx_b]^T, in place; returns output_tensor.

    Launched asynchronously on `stream` (default: torch's or CuPy's current stream). With
    `batch_plan` (from sgmv.batch_plan, built from the same metadata) every program computes a
    dense tile of one adapter's rows. Raises ValueError/TypeError for arguments outside the
    contract, sgmv.SgmvError for a failed call.
    """
    buf, _ = expand_tensors(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                            lora_indices_tensor, batches, max_seq_length, add_inputs, stream, batch_plan)
    capi.check(capi.lib.sgmv_expand_tensors(buf))
    return output_tensor


def batch_plan_bytes(max_batches, max_tokens):
    """Device bytes of a plan for up to max_batches segments and max_tokens rows."""
    n = capi.lib.sgmv_batch_plan_bytes(_int(max_batches, "max_batches"), _int(max_tokens, "max_tokens"))
    if n == 0:
        raise ValueError(f"no plan serves max_batches = {max_batches} and max_tokens = {max_tokens} "
                         "(both in [0, 2^30))")
    return n


def plan_args(seq_start, seq_len, lora_indices, batches, total_tokens, num_loras, out, stream, allow_cpu=False):
    """This thread's sgmv_batch_plan_args_t, filled; and the device."""
    described = [describe(t, n) for t, n in zip((seq_start, seq_len, lora_indices), _NAMES[3:])]
    plan_ptr, plan_bytes, plan_device = _plan_ref(out)
    device = _one_device([d for _, d in described] + [plan_device], _NAMES[3:] + ("out",), allow_cpu)
    s = current_stream(device, out) if stream is None else stream_handle(stream)
    buf = _buffer("sgmv_batch_plan_args_t")
    _PLAN.pack_into(capi.ffi.buffer(buf), 0, _PLAN.size, plan_ptr, plan_bytes, *described[0][0], *described[1][0],
                    *described[2][0], _int(batches, "batches"), _int(total_tokens, "total_tokens"),
                    _int(num_loras, "num_loras"), s)
    return buf, device


def new_plan(like, batches, total_tokens, max_batches, max_tokens):
    """A torch int32 plan buffer on like's device, for up to max_batches and max_tokens."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(like, torch.Tensor):
        raise TypeError("pass out= (a 1-D int32 array of sgmv.batch_plan_bytes() bytes) when not using torch")
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
