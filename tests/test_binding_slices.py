"""The binding's errors for 0.3's arguments, on the CPU: sgmv_shrink, fused slices (a tuple of weight
stacks), lora_ranks, lora_scales, scaling and the workspace. What Python refuses itself (the count of
slices, non-arrays, arrays not on the call's CUDA device, the workspace's form) comes before the
library; the shapes and dtypes come back from C as its status and message. Stand-in tensors at fake
device addresses (test_binding.Fake): no kernel runs."""
import pytest

import sgmv
from sgmv import capi

from conftest import HAS_GPU
from test_binding import S, Fake


def shrink(**over):
    """A valid 3-slice shrink: 10 rows, hidden 64, rank 16, 2 adapters; changed by `over`."""
    a = dict(inputs=Fake((10, 64)), lora_a_weights=(Fake((2, 16, 64)),) * 3, output_tensor=Fake((10, 48), "float32"),
             b_seq_start_loc=Fake((2,), "int32"), seq_len_tensor=Fake((2,), "int32"),
             lora_indices_tensor=Fake((2,), "int32"), batches=2, max_seq_length=5, scaling=0.5,
             lora_ranks=Fake((2,), "int32"), lora_scales=Fake((2,), "float32"), stream=0)
    a.update(over)
    return sgmv.sgmv_shrink(**a)


def expand(**over):
    """A valid 2-slice expand: rank 16, slices of hidden 64 and 32, 2 adapters; changed by `over`."""
    a = dict(inputs=Fake((10, 32)), lora_b_weights=[Fake((2, 64, 16)), Fake((2, 32, 16))],
             output_tensor=Fake((10, 96)), b_seq_start_loc=Fake((2,), "int32"), seq_len_tensor=Fake((2,), "int32"),
             lora_indices_tensor=Fake((2,), "int32"), batches=2, max_seq_length=5, add_inputs=True, stream=0,
             lora_ranks=Fake((2,), "int32"))
    a.update(over)
    return sgmv.sgmv_expand(**a)


CALLS = {"shrink": shrink, "expand": expand}


@pytest.mark.parametrize("op,over,exc,words", [
    ("shrink", dict(lora_a_weights=(Fake((2, 16, 64)),) * 4), ValueError,
     "lora_a_weights must be an array or 1 to 3 arrays (fused slices), got 4"),
    ("shrink", dict(lora_a_weights=()), ValueError, "got 0"),
    ("shrink", dict(lora_a_weights=(Fake((2, 16, 64)), [[1.0]])), TypeError,
     "lora_a_weights[1] must be a torch tensor or an array with __cuda_array_interface__"),
    ("shrink", dict(lora_a_weights=(Fake((2, 16, 64)), Fake((2, 16, 64), device=1), Fake((2, 16, 64)))),
     ValueError, "CUDA tensors on one device"),
    ("shrink", dict(lora_ranks=Fake((2,), "int32", device=1)), ValueError, "CUDA tensors on one device"),
    ("shrink", dict(lora_scales=Fake((2,), "float32", device=-1)), ValueError, "not CUDA"),
    ("shrink", dict(lora_ranks=[16, 16]), TypeError, "lora_ranks must be a torch tensor"),
    ("shrink", dict(scaling="0.5"), TypeError, "scaling must be a float"),
    ("shrink", dict(scaling=True), TypeError, "scaling must be a float"),
    ("shrink", dict(workspace=Fake((64,), "float16")), ValueError, "workspace must be a contiguous 1-D float32"),
    ("shrink", dict(workspace=Fake((8, 8), "float32")), ValueError, "workspace must be a contiguous 1-D float32"),
    ("shrink", dict(workspace=Fake((64,), "float32", device=1)), ValueError, "CUDA tensors on one device"),
    ("expand", dict(lora_b_weights=[Fake((2, 64, 16))] * 4), ValueError,
     "lora_b_weights must be an array or 1 to 3 arrays (fused slices), got 4"),
    ("expand", dict(lora_b_weights=[Fake((2, 64, 16)), None]), TypeError, "lora_b_weights[1] must be"),
    ("expand", dict(lora_ranks=Fake((2,), "int32", device=1)), ValueError, "CUDA tensors on one device"),
])
def test_python_side_errors(op, over, exc, words):
    with pytest.raises(exc) as e:
        CALLS[op](**over)
    assert words in str(e.value)
    # raised by the binding before the library is called, as the library's own errors are: one except catches all
    assert isinstance(e.value, sgmv.SgmvError) and e.value.status == capi.STATUS["SGMV_ERROR_INVALID_ARGUMENT"]


A = Fake((2, 16, 64))
B64, B32 = Fake((2, 64, 16)), Fake((2, 32, 16))


@pytest.mark.parametrize("op,over,status,exc,words", [
    # slices
    ("shrink", dict(lora_a_weights=(A, Fake((2, 16, 64), "bfloat16"), A)), "UNSUPPORTED_DTYPE", TypeError,
     "slice_weights[0] must have weights' dtype float16, got bfloat16"),
    ("shrink", dict(lora_a_weights=(A, A, Fake((3, 16, 64)))), "INVALID_ARGUMENT", ValueError,
     "slice_weights[1] must match weights' dtype, adapters and hidden (float16, 2, 64), got (float16, 3, 64)"),
    ("shrink", dict(lora_a_weights=(A, Fake((2, 16, 32)), A)), "INVALID_ARGUMENT", ValueError,
     "got (float16, 2, 32)"),
    ("shrink", dict(lora_a_weights=(A, Fake((2, 8, 64)), A)), "INVALID_ARGUMENT", ValueError,
     "slice_weights[0] has rank 8, weights rank 16: slices share one rank"),
    ("shrink", dict(lora_a_weights=(A, Fake((2, 3, 16, 64)), A)), "INVALID_ARGUMENT", ValueError,
     "slice_weights[0] must be (num_loras, rank, hidden) or (num_loras, 1, rank, hidden)"),
    ("shrink", dict(lora_a_weights=(A, A, Fake((2, 16, 64), strides=(2048, 128, 2)))), "INVALID_ARGUMENT",
     ValueError, "unit stride in its last dimension"),
    ("shrink", dict(output_tensor=Fake((10, 32), "float32")), "INVALID_ARGUMENT", ValueError,
     "output must be (total_tokens, num_slices * rank) = (10, 48), got (10, 32)"),
    ("shrink", dict(lora_a_weights=(A, A)), "INVALID_ARGUMENT", ValueError,
     "output must be (total_tokens, num_slices * rank) = (10, 32), got (10, 48)"),
    ("shrink", dict(inputs=Fake((10, 32))), "INVALID_ARGUMENT", ValueError,
     "inputs has hidden 32 but weights have hidden 64"),
    ("expand", dict(lora_b_weights=(B64, Fake((2, 32, 16), "bfloat16"))), "UNSUPPORTED_DTYPE", TypeError,
     "slice_weights[0] must have weights' dtype float16, got bfloat16"),
    ("expand", dict(lora_b_weights=(B64, Fake((2, 32, 8)))), "INVALID_ARGUMENT", ValueError,
     "slice_weights[0] must match weights' dtype, adapters and rank (float16, 2, 16), got (float16, 2, 8)"),
    ("expand", dict(lora_b_weights=(B64, B32, B32)), "INVALID_ARGUMENT", ValueError,
     "inputs has 32 columns but 3 slice"),
    ("expand", dict(output_tensor=Fake((10, 64))), "INVALID_ARGUMENT", ValueError,
     "output must be (total_tokens, hidden) = (10, 96), got (10, 64)"),
    ("expand", dict(lora_b_weights=(B64, Fake((2, 1, 32, 16))), output_tensor=Fake((10, 97))), "INVALID_ARGUMENT",
     ValueError, "output must be (total_tokens, hidden) = (10, 96), got (10, 97)"),
    # dtypes the slices' shrink does not serve
    ("shrink", dict(inputs=Fake((10, 64), "float32")), "UNSUPPORTED_DTYPE", TypeError, "unsupported dtypes"),
    ("shrink", dict(output_tensor=Fake((10, 48), "bfloat16")), "UNSUPPORTED_DTYPE", TypeError, "unsupported dtypes"),
    # lora_ranks
    ("shrink", dict(lora_ranks=Fake((2,), "int64")), "UNSUPPORTED_DTYPE", TypeError,
     "lora_ranks must be int32, got int64"),
    ("shrink", dict(lora_ranks=Fake((1,), "int32")), "INVALID_ARGUMENT", ValueError,
     "lora_ranks must be a contiguous 1-D tensor of >= num_loras = 2 entries"),
    ("shrink", dict(lora_ranks=Fake((2, 1), "int32")), "INVALID_ARGUMENT", ValueError,
     "lora_ranks must be a contiguous 1-D tensor"),
    ("shrink", dict(lora_ranks=Fake((2,), "int32", strides=(2,))), "INVALID_ARGUMENT", ValueError,
     "lora_ranks must be a contiguous 1-D tensor"),
    ("expand", dict(lora_ranks=Fake((2,), "float32")), "UNSUPPORTED_DTYPE", TypeError,
     "lora_ranks must be int32, got float32"),
    ("expand", dict(lora_ranks=Fake((1,), "int32")), "INVALID_ARGUMENT", ValueError,
     "lora_ranks must be a contiguous 1-D tensor of >= num_loras = 2 entries"),
    # lora_scales
    ("shrink", dict(lora_scales=Fake((2,), "float16")), "UNSUPPORTED_DTYPE", TypeError,
     "lora_scales must be float32, got float16"),
    ("shrink", dict(lora_scales=Fake((1,), "float32")), "INVALID_ARGUMENT", ValueError,
     "lora_scales must be a contiguous 1-D tensor of >= num_loras = 2 entries"),
    # alignment of the per-adapter arrays and the workspace
    ("shrink", dict(lora_scales=Fake((2,), "float32", ptr=0x100002)), "INVALID_ARGUMENT", ValueError,
     "args->lora_scales is not aligned to its element size (4 bytes)"),
    ("shrink", dict(workspace=Fake((64,), "float32", ptr=0x100004)), "INVALID_ARGUMENT", ValueError,
     "args->workspace is not aligned to what the kernels assume (16 bytes)"),
])
def test_library_statuses_as_python_exceptions(op, over, status, exc, words):
    with pytest.raises(exc) as e:
        CALLS[op](**over)
    assert isinstance(e.value, sgmv.SgmvError) and e.value.status == S["SGMV_ERROR_" + status]
    assert words in str(e.value) and str(e.value).startswith(f"sgmv_{op}: "), str(e.value)


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU: the no-driver path cannot be observed")
@pytest.mark.parametrize("op,over", [
    ("shrink", {}), ("shrink", dict(lora_a_weights=Fake((2, 1, 16, 64)), output_tensor=Fake((10, 16), "float16"),
                                    lora_ranks=None, lora_scales=None)),
    ("shrink", dict(workspace=Fake((64,), "int32"))),
    ("expand", {}), ("expand", dict(lora_b_weights=(B64, Fake((2, 1, 32, 16))))),
])
def test_valid_calls_reach_the_driver_status(op, over):
    """The arguments above, unchanged, pass every check: the call fails only for want of a GPU."""
    with pytest.raises(sgmv.SgmvError) as e:
        CALLS[op](**over)
    assert e.value.status in (S["SGMV_ERROR_NO_DRIVER"], S["SGMV_ERROR_NO_DEVICE"]), str(e.value)
    assert not isinstance(e.value, (ValueError, TypeError))


def test_shrink_workspace_bytes():
    assert sgmv.shrink_workspace_bytes(16, 48) > 0
    assert sgmv.shrink_workspace_bytes(0, 48) == sgmv.shrink_workspace_bytes(16, 0) == 0
    with pytest.raises(TypeError, match="max_tokens must be an int"):
        sgmv.shrink_workspace_bytes(16.0, 48)
