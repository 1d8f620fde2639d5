"""sgmv_expand through libsgmv.so: no torch, no triton, no JIT."""
import sys

from . import _contract, capi

_DTYPE = {"float16": 0, "bfloat16": 1, "float32": 2, "int32": 3, "int64": 4}


def _current_stream(output_tensor):
    """Torch's or CuPy's current stream for the output's device, else the legacy default stream."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(output_tensor, torch.Tensor):
        return torch.cuda.current_stream(output_tensor.device).cuda_stream
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
    lib = capi.lib
    a = capi.ffi.new("sgmv_expand_args_t *")
    a.struct_size = capi.ffi.sizeof("sgmv_expand_args_t")
    a.inputs = capi.ffi.cast("void *", c.x.ptr)
    a.inputs_dtype = _DTYPE[c.x.dtype]
    a.inputs_row_stride = c.x_stride
    a.weights = capi.ffi.cast("void *", c.w.ptr)
    a.weights_dtype = _DTYPE[c.w.dtype]
    a.weights_lora_stride = c.w_lora_stride
    a.weights_row_stride = c.w_row_stride
    a.output = capi.ffi.cast("void *", c.out.ptr)
    a.output_dtype = _DTYPE[c.out.dtype]
    a.output_row_stride = c.out_stride
    a.total_tokens = c.total_tokens
    a.hidden = c.hidden
    a.rank = c.rank
    a.num_loras = c.num_loras
    a.seq_start = capi.ffi.cast("void *", c.seq_start.ptr)
    a.seq_len = capi.ffi.cast("void *", c.seq_len.ptr)
    a.lora_indices = capi.ffi.cast("void *", c.lora_idx.ptr)
    a.metadata_dtype = _DTYPE[c.seq_start.dtype]
    a.batches = c.batches
    a.max_seq_length = c.max_seq_length
    a.add_inputs = add_inputs
    a.stream = capi.ffi.cast("sgmv_stream_t", _current_stream(output_tensor) if stream is None
                             else _stream_handle(stream))
    capi.check(lib.sgmv_expand(a))
    return output_tensor
