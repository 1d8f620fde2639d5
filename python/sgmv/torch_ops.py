"""torch.ops.sgmv.shrink, expand, batch_plan, step_plan and layer: the AOT kernels as torch ops, for
torch.compile and CUDA graphs. Registered when sgmv is imported where torch is installed.

Each op writes its output argument (marked `(a!)` in the schema, so that torch.compile functionalizes
the call) on torch's current stream and returns nothing. The ops are registered through
torch.library.Library rather than the torch.library.custom_op decorator: the same schema and fake
kernel, but the decorator's dispatch costs tens of microseconds a call (benchmarks/NOTES.md). What
the decorator did besides, bumping the written tensors' version counters (so that autograd refuses
a tensor it saved and we overwrote), the kernels do themselves.
A fused layer passes slice 0's weights as `weights` and the further slices as `slice_weights`.
The layer call: `step_plan` once per step (the step's metadata and a scratch buffer of
sgmv.step_scratch_bytes() bytes), then `layer` per layer application with the same step arguments.
"""
import torch

from . import binding

_written = torch.autograd.graph.increment_version

_lib = torch.library.Library("sgmv", "DEF")  # kept: the ops live as long as this object

_lib.define("shrink(Tensor inputs, Tensor weights, Tensor(a!) output, Tensor seq_start, Tensor seq_len, "
            "Tensor lora_indices, SymInt batches, SymInt max_seq_length, float scaling=1.0, "
            "Tensor? lora_ranks=None, Tensor? lora_scales=None, Tensor? batch_plan=None, "
            "Tensor(b!)? workspace=None, Tensor[]? slice_weights=None, Tensor[]? weight_scales=None) -> ()")
_lib.define("expand(Tensor inputs, Tensor weights, Tensor(a!) output, Tensor seq_start, Tensor seq_len, "
            "Tensor lora_indices, SymInt batches, SymInt max_seq_length, bool add_inputs, "
            "Tensor? batch_plan=None, Tensor? lora_ranks=None, Tensor[]? slice_weights=None, "
            "Tensor[]? weight_scales=None) -> ()")
_lib.define("batch_plan(Tensor seq_start, Tensor seq_len, Tensor lora_indices, SymInt batches, "
            "SymInt total_tokens, SymInt num_loras, Tensor(a!) plan) -> ()")
# The layer call: step_plan once per step into its scratch, then layer per layer (sgmv.Layer, sgmv.Step).
_STEP = ("Tensor? seq_start, Tensor? seq_len, Tensor? lora_indices, Tensor? token_lora_mapping, SymInt batches, "
         "SymInt max_seq_length, SymInt total_tokens, SymInt num_loras")
_lib.define(f"step_plan({_STEP}, Tensor(a!) scratch) -> ()")
_lib.define(f"layer(Tensor inputs, Tensor(a!) output, Tensor[] lora_a, Tensor[] lora_b, {_STEP}, Tensor(b!) scratch, "
            "bool add_inputs=True, float scaling=1.0, Tensor? lora_ranks=None, Tensor? lora_scales=None, "
            "Tensor[]? lora_a_scales=None, Tensor[]? lora_b_scales=None) -> ()")


def shrink(inputs, weights, output, seq_start, seq_len, lora_indices, batches, max_seq_length, scaling=1.0,
           lora_ranks=None, lora_scales=None, batch_plan=None, workspace=None, slice_weights=None, weight_scales=None):
    """sgmv.sgmv_shrink into `output`. Without a workspace the binding takes one from torch's caching
    allocator when the call splits over hidden (inside a CUDA graph capture: the graph's pool).
    fp8 weights: weight_scales, one per slice."""
    binding.sgmv_shrink(inputs, (weights, *slice_weights) if slice_weights else weights, output, seq_start,
                        seq_len, lora_indices, batches, max_seq_length, scaling, lora_ranks=lora_ranks,
                        lora_scales=lora_scales, batch_plan=batch_plan, workspace=workspace,
                        weight_scales=tuple(weight_scales) if weight_scales else None)
    _written(output if workspace is None else (output, workspace))


def expand(inputs, weights, output, seq_start, seq_len, lora_indices, batches, max_seq_length, add_inputs,
           batch_plan=None, lora_ranks=None, slice_weights=None, weight_scales=None):
    """sgmv.sgmv_expand into `output` (fp8 weights: weight_scales, one per slice)."""
    binding.sgmv_expand(inputs, (weights, *slice_weights) if slice_weights else weights, output, seq_start,
                        seq_len, lora_indices, batches, max_seq_length, add_inputs, batch_plan,
                        lora_ranks=lora_ranks, weight_scales=tuple(weight_scales) if weight_scales else None)
    _written(output)


def batch_plan(seq_start, seq_len, lora_indices, batches, total_tokens, num_loras, plan):
    """sgmv.batch_plan into `plan` (int32, sgmv.batch_plan_bytes() bytes)."""
    binding.batch_plan(seq_start, seq_len, lora_indices, batches, total_tokens, num_loras, out=plan)
    _written(plan)


_layers, _steps = {}, {}  # described once per distinct set of tensors (pointers, shapes, strides, dtypes)


def _key(*tensors):
    return tuple(None if t is None else (t.data_ptr(), t.dtype, *t.shape, *t.stride()) for t in tensors)


def _cached(cache, key, make):
    got = cache.get(key)
    if got is None:
        if len(cache) >= 4096:  # bounded: an engine has a few hundred layers and step shapes
            cache.clear()
        got = cache[key] = make()
    return got


def _step(seq_start, seq_len, lora_indices, token_lora_mapping, batches, max_seq_length, total_tokens, num_loras,
          scratch):
    key = (_key(seq_start, seq_len, lora_indices, token_lora_mapping, scratch), batches, max_seq_length,
           total_tokens, num_loras)
    seg = token_lora_mapping is None
    return _cached(_steps, key, lambda: binding.Step(
        *((seq_start, seq_len, lora_indices, batches, max_seq_length) if seg else ()),
        token_lora_mapping=token_lora_mapping, total_tokens=total_tokens, num_loras=num_loras, scratch=scratch,
        plan=False))


def step_plan(seq_start, seq_len, lora_indices, token_lora_mapping, batches, max_seq_length, total_tokens, num_loras,
              scratch):
    """sgmv.Step(...).plan() into `scratch` (uint8, sgmv.step_scratch_bytes() bytes)."""
    _step(seq_start, seq_len, lora_indices, token_lora_mapping, batches, max_seq_length, total_tokens, num_loras,
          scratch).plan()
    _written(scratch)


def layer(inputs, output, lora_a, lora_b, seq_start, seq_len, lora_indices, token_lora_mapping, batches,
          max_seq_length, total_tokens, num_loras, scratch, add_inputs=True, scaling=1.0, lora_ranks=None,
          lora_scales=None, lora_a_scales=None, lora_b_scales=None):
    """sgmv.Layer(lora_a, lora_b, ...)(inputs, output, step) with the step whose plan step_plan built in scratch."""
    a_scales = tuple(lora_a_scales) if lora_a_scales else None
    b_scales = tuple(lora_b_scales) if lora_b_scales else None
    key = (_key(*lora_a, *lora_b, lora_ranks, lora_scales, *(a_scales or ()), *(b_scales or ())), scaling)
    lay = _cached(_layers, key, lambda: binding.Layer(tuple(lora_a), tuple(lora_b), lora_ranks=lora_ranks,
                                                      lora_scales=lora_scales, scaling=scaling,
                                                      lora_a_scales=a_scales, lora_b_scales=b_scales))
    lay(inputs, output, _step(seq_start, seq_len, lora_indices, token_lora_mapping, batches, max_seq_length,
                              total_tokens, num_loras, scratch), add_inputs=add_inputs)
    _written((output, scratch))


def _fake(*args, **kwargs):
    """Under fake tensors and torch.compile: the ops only write arguments that already have their shape."""
    return None


for _op in (shrink, expand, batch_plan, step_plan, layer):
    _lib.impl(_op.__name__, _op, "CUDA")
    torch.library.register_fake("sgmv::" + _op.__name__, _fake, lib=_lib)
