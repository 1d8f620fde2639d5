"""sgmv_expand through libsgmv.so: no torch, no triton, no JIT."""
import struct
import sys

from . import _contract, capi

_DTYPE = {"float16": 0, "bfloat16": 1, "float32": 2, "int32": 3, "int64": 4}
_FIELDS = ("struct_size", "inputs", "inputs_dtype", "inputs_row_stride", "weights", "weights_dtype",
           "weights_lora_stride", "weights_row_stride", "output", "output_dtype", "output_row_stride",
           "total_tokens", "hidden", "rank", "num_loras", "seq_start", "seq_len", "lora_indices", "metadata_dtype",
           "batches", "max_seq_length", "add_inputs", "stream")


def _struct_format():
    """A struct.pack format for sgmv_expand_args_t, from the layout cffi computed from sgmv.h:
    one pack_into per call instead of two dozen cffi attribute writes."""
    ffi, t = capi.ffi, capi.ffi.typeof("sgmv_expand_args_t")
    fields = dict(t.fields)
    if tuple(fields) != _FIELDS:
        raise ImportError("sgmv.h's sgmv_expand_args_t does not match this binding (aot._FIELDS)")
    fmt, pos = "<", 0
    for name in _FIELDS:
        f = fields[name]
        fmt += "x" * (f.offset - pos)
        size = ffi.sizeof(f.type)
        fmt += {8: "q", 4: "i"}[size] if f.type.kind in ("primitive", "enum") else "Q"
        pos = f.offset + size
    return struct.Struct(fmt + "x" * (ffi.sizeof(t) - pos))


_ARGS = _struct_format()


def _current_stream(output_tensor):
    """Torch's or CuPy's current stream for the output's device, else the legacy default stream."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(output_tensor, torch.Tensor):
        return torch._C._cuda_getCurrentRawStream(output_tensor.get_device())
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(output_tensor, cupy.ndarray):
        return cupy.cuda.get_current_stream().ptr
    return 0


def _stream_handle(stream):
    if isinstance(stream, int):
        return stream
    for attr in ("cuda_stream", "ptr", "handle"):  # torch.cuda.Stream, CuPy, Numba
        h = getattr(stream, attr, None)
        if h is not None:
            return int(h)
    raise TypeError(f"stream must be an int handle or a torch/CuPy/Numba stream, got {type(stream).__name__}")


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, add_inputs=False, stream=None):
    """out[start_b + m, :] (+)= inputs[start_b + m, :] @ lora_b_weights[idx_b]^T, in place; returns output_tensor.

    Launched asynchronously on `stream` (default: torch's or CuPy's current stream). Raises
    ValueError/TypeError for arguments outside the contract, sgmv.SgmvError for a failed call.
    """
    c = _contract.check(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                        lora_indices_tensor, batches, max_seq_length, add_inputs)
    s = _current_stream(output_tensor) if stream is None else _stream_handle(stream)
    args = capi.ffi.new("sgmv_expand_args_t *")
    _ARGS.pack_into(capi.ffi.buffer(args), 0, _ARGS.size, c.x.ptr, _DTYPE[c.x.dtype], c.x_stride, c.w.ptr,
                    _DTYPE[c.w.dtype], c.w_lora_stride, c.w_row_stride, c.out.ptr, _DTYPE[c.out.dtype],
                    c.out_stride, c.total_tokens, c.hidden, c.rank, c.num_loras, c.seq_start.ptr, c.seq_len.ptr,
                    c.lora_idx.ptr, _DTYPE[c.seq_start.dtype], c.batches, c.max_seq_length, add_inputs, s)
    capi.check(capi.lib.sgmv_expand(args))
    return output_tensor
