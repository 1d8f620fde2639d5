"""The argument contract of sgmv_expand, shared by the AOT, JIT and reference paths.

Works on torch tensors and on any object with __cuda_array_interface__ (CuPy, Numba), without
importing torch: the AOT path must not pay for it.
"""
from typing import NamedTuple

from ._variants import ALIGN_ELEMS, MAX_HIDDEN, MAX_RANK

FLOATS = ("float16", "bfloat16", "float32")
INTS = ("int32", "int64")
# __cuda_array_interface__ typestrs (bfloat16 has none; torch tensors are read directly).
_TYPESTR = {"<f2": "float16", "<f4": "float32", "<i4": "int32", "<i8": "int64"}
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "int32": 4, "int64": 8}


class Array(NamedTuple):
    ptr: int
    shape: tuple
    strides: tuple  # in elements
    dtype: str  # one of FLOATS + INTS, or the foreign name
    device: str  # "cuda", "cpu", ...


_torch_dtype_names = {}  # torch.dtype -> name, filled as dtypes are seen


def describe(a, name):
    """Shape, strides, dtype and address of a torch tensor or a CUDA array interface object."""
    try:  # torch, without importing it (the hot path: keep it lean)
        ptr = a.data_ptr()
        dt = _torch_dtype_names.get(a.dtype) or _torch_dtype_names.setdefault(a.dtype, str(a.dtype)[6:])
        return Array(ptr, a.shape, a.stride(), dt, "cuda" if a.is_cuda else a.device.type)
    except AttributeError:
        pass
    cai = getattr(a, "__cuda_array_interface__", None)
    if cai is None:
        raise TypeError(f"{name} must be a torch tensor or an array with __cuda_array_interface__, "
                        f"got {type(a).__name__}")
    dt = _TYPESTR.get(cai["typestr"], cai["typestr"])
    shape = tuple(cai["shape"])
    if cai.get("strides") is None:  # C-contiguous
        strides, s = [], 1
        for n in reversed(shape):
            strides.insert(0, s)
            s *= n
        strides = tuple(strides)
    else:
        size = _ITEMSIZE.get(dt, 1)
        if any(s % size for s in cai["strides"]):
            raise ValueError(f"{name} has strides that are not a multiple of its element size")
        strides = tuple(s // size for s in cai["strides"])
    return Array(cai["data"][0], shape, strides, dt, "cuda")


class Call(NamedTuple):
    """A validated call, in the terms of sgmv_expand_args_t."""
    x: Array
    w: Array
    out: Array
    seq_start: Array
    seq_len: Array
    lora_idx: Array
    total_tokens: int
    hidden: int
    rank: int
    num_loras: int
    x_stride: int
    w_lora_stride: int
    w_row_stride: int
    out_stride: int
    batches: int
    max_seq_length: int
    add_inputs: bool

    @property
    def noop(self):
        return self.batches == 0 or self.total_tokens == 0

    @property
    def aligned(self):
        """The aligned variants' assumption (aot/generate.py); the C dispatcher checks the same."""
        e = ALIGN_ELEMS
        return ((self.x.ptr | self.w.ptr | self.out.ptr) % 16 == 0 and self.hidden % e == 0
                and self.x_stride % e == 0 and self.w_lora_stride % e == 0 and self.w_row_stride % e == 0
                and self.out_stride % e == 0)


def _int(value, name):
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value.__index__()


def check(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
          batches, max_seq_length, add_inputs, devices=("cuda",)):
    x = describe(inputs, "inputs")
    w = describe(lora_b_weights, "lora_b_weights")
    out = describe(output_tensor, "output_tensor")
    meta = [describe(t, n) for t, n in ((b_seq_start_loc, "b_seq_start_loc"), (seq_len_tensor, "seq_len_tensor"),
                                         (lora_indices_tensor, "lora_indices_tensor"))]
    batches = _int(batches, "batches")
    max_seq_length = _int(max_seq_length, "max_seq_length")
    if not isinstance(add_inputs, bool):
        raise TypeError(f"add_inputs must be a bool, got {type(add_inputs).__name__}")

    if x.dtype not in FLOATS:
        raise TypeError(f"inputs must be float16, bfloat16 or float32, got {x.dtype}")
    if w.dtype not in ("float16", "bfloat16"):
        raise TypeError(f"lora_b_weights must be float16 or bfloat16, got {w.dtype}")
    if out.dtype not in FLOATS:
        raise TypeError(f"output_tensor must be float16, bfloat16 or float32, got {out.dtype}")
    if x.dtype not in (w.dtype, "float32"):
        raise TypeError(f"inputs must be float32 or the weights' dtype ({w.dtype}), got {x.dtype}")
    if out.dtype not in (w.dtype, "float32"):
        raise TypeError(f"output_tensor must be float32 or the weights' dtype ({w.dtype}), got {out.dtype}")
    if len(x.shape) != 2:
        raise ValueError(f"inputs must be 2-D (total_tokens, rank), got shape {x.shape}")
    if len(out.shape) != 2:
        raise ValueError(f"output_tensor must be 2-D (total_tokens, hidden), got shape {out.shape}")
    if len(w.shape) == 4:
        if w.shape[1] != 1:
            raise ValueError(f"4-D lora_b_weights must be (num_loras, 1, hidden, rank), got shape {w.shape}")
        w_shape, w_strides = (w.shape[0], w.shape[2], w.shape[3]), (w.strides[0], w.strides[2], w.strides[3])
    elif len(w.shape) == 3:
        w_shape, w_strides = w.shape, w.strides
    else:
        raise ValueError(f"lora_b_weights must be (num_loras, hidden, rank) or (num_loras, 1, hidden, rank), "
                         f"got shape {w.shape}")
    num_loras, hidden, rank = w_shape
    total_tokens = x.shape[0]
    if not 1 <= rank <= MAX_RANK:
        raise ValueError(f"rank must be in [1, {MAX_RANK}], got {rank}")
    if x.shape[1] != rank:
        raise ValueError(f"inputs has rank {x.shape[1]} but lora_b_weights has rank {rank}")
    if out.shape != (total_tokens, hidden):
        raise ValueError(f"output_tensor must be (total_tokens, hidden) = ({total_tokens}, {hidden}), got {out.shape}")
    if num_loras < 1 or hidden < 1:
        raise ValueError(f"lora_b_weights must have num_loras >= 1 and hidden >= 1, got shape {w.shape}")
    for a, n, last in ((x, "inputs", rank), (out, "output_tensor", hidden), (w, "lora_b_weights", rank)):
        if a.strides[-1] != 1 and last > 1:
            raise ValueError(f"{n} must have unit stride in its last dimension, got strides {a.strides}")
    if min(x.strides + out.strides + w_strides) < 0:
        raise ValueError("negative strides are not supported")

    for m, n in zip(meta, ("b_seq_start_loc", "seq_len_tensor", "lora_indices_tensor")):
        if m.dtype not in INTS:
            raise TypeError(f"{n} must be int32 or int64, got {m.dtype}")
        if len(m.shape) != 1 or (m.shape[0] > 1 and m.strides[0] != 1):
            raise ValueError(f"{n} must be a contiguous 1-D tensor, got shape {m.shape}")
        if m.shape[0] < batches:
            raise ValueError(f"{n} has {m.shape[0]} entries, fewer than batches = {batches}")
    if len({m.dtype for m in meta}) != 1:
        raise TypeError(f"b_seq_start_loc, seq_len_tensor and lora_indices_tensor must share one dtype, "
                        f"got {', '.join(m.dtype for m in meta)}")
    if not 0 <= batches < 2**30:
        raise ValueError(f"batches must be in [0, 2^30), got {batches}")
    if total_tokens >= 2**30:
        raise ValueError(f"total_tokens must be below 2^30, got {total_tokens}")
    if hidden > MAX_HIDDEN:
        raise ValueError(f"hidden must be at most {MAX_HIDDEN}, got {hidden}")
    if max_seq_length < 0:
        raise ValueError(f"max_seq_length must be >= 0, got {max_seq_length}")

    devs = {a.device for a in (x, w, out, *meta)}
    if len(devs) != 1 or not devs <= set(devices):
        raise ValueError(f"all tensors must be on one device of type {' or '.join(devices)}, got {sorted(devs)}")

    return Call(x, w, out, *meta, total_tokens, hidden, rank, num_loras, x.strides[0], w_strides[0], w_strides[1],
                out.strides[0], batches, max_seq_length, add_inputs)
