"""One fault-injection scenario, in its own process, against the installed libsgmv.so and the fake
libcuda.so.1 (fake_cuda.c) that LD_LIBRARY_PATH must make dlopen find first.

    python scenario.py '<steps as JSON>'

Steps, in order:
    {"fail": name, "count": n, "code": c}   the fake's `name` fails its next n calls (default 1) with
                                             code c (default: that function's usual error)
    {"call": {field: value, ...}}           sgmv_expand on valid arguments with these fields changed
    {"plan": {field: value, ...}}           sgmv_batch_plan_build for the metadata of those arguments
    {"shrink": {field: value, ...}}         sgmv_shrink on valid arguments (SHRINK) with these fields
                                             changed ("with_workspace": the workspace it may split into)
    {"layer": {"tokens": t, "stream": s, "fail_after_plan": name}}
                                             sgmv_layer_create, sgmv_step_create, sgmv_step_plan and
                                             sgmv_layer_apply (fp16, hidden 64, rank 16, 2 slices,
                                             two segments); the status is the first failure's
    {"device_arch": ordinal}                 sgmv_device_arch
Prints one JSON line: for each step that calls the library, its status, sgmv_last_error(), the
launch the planner gives that call at sm_90 (sgmv_expand_config, sgmv_batch_plan_config) and the
fake's counters right after it. Fake device addresses are safe: the fake never reads them.
"""
import ctypes
import importlib.util
import json
import os
import sys
from pathlib import Path


def _capi():
    """sgmv.capi without the package's __init__, which imports torch where installed (seconds a
    scenario); the package itself where capi.py cannot stand alone."""
    try:
        where = Path(importlib.util.find_spec("sgmv").submodule_search_locations[0]) / "capi.py"
        spec = importlib.util.spec_from_file_location("sgmv_capi_alone", where)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    except ImportError:
        from sgmv import capi
        return capi


capi = _capi()
ffi = capi.ffi

# The driver calls libsgmv makes; the counters of each are reported after every step.
DRIVER_CALLS = ("cuInit", "cuDriverGetVersion", "cuDeviceGetAttribute", "cuCtxGetCurrent", "cuCtxPushCurrent",
                "cuCtxPopCurrent", "cuCtxGetDevice", "cuCtxGetId", "cuStreamGetCtx", "cuLibraryLoadData",
                "cuLibraryGetKernel", "cuLibraryUnload", "cuKernelSetAttribute", "cuKernelGetFunction",
                "cuLaunchKernel", "cuLaunchKernelEx", "cuMemsetD32Async")

# Arguments that pass validation: 10 tokens of fp16, rank 16, hidden 64, two adapters, two segments.
VALID = dict(inputs=0x10000, inputs_dtype="SGMV_DTYPE_FLOAT16", inputs_row_stride=16, weights=0x20000,
             weights_dtype="SGMV_DTYPE_FLOAT16", weights_lora_stride=64 * 16, weights_row_stride=16,
             output=0x30000, output_dtype="SGMV_DTYPE_FLOAT16", output_row_stride=64, total_tokens=10,
             hidden=64, rank=16, num_loras=2, seq_start=0x40000, seq_len=0x50000, lora_indices=0x60000,
             metadata_dtype="SGMV_DTYPE_INT32", batches=2, max_seq_length=5, add_inputs=1)


PLAN = 0x70000  # a fake device address for the batch plan
WORKSPACE = 0x80000  # and for a shrink's workspace

# A valid shrink: 10 tokens of fp16, hidden 64, rank 16, two adapters, two segments, scaling 1.
SHRINK = dict(inputs=0x10000, inputs_dtype="SGMV_DTYPE_FLOAT16", inputs_row_stride=64, weights=0x20000,
              weights_dtype="SGMV_DTYPE_FLOAT16", weights_lora_stride=16 * 64, weights_row_stride=64,
              output=0x30000, output_dtype="SGMV_DTYPE_FLOAT16", output_row_stride=16, total_tokens=10,
              hidden=64, rank=16, num_loras=2, seq_start=0x40000, seq_len=0x50000, lora_indices=0x60000,
              metadata_dtype="SGMV_DTYPE_INT32", batches=2, max_seq_length=5, scaling=1.0)


def fill(ctype, values, into=None):
    """A struct filled by field name only (fields appended later stay zero), struct_size from the
    header this binding read, names of SGMV_ constants looked up, nested structs from dicts."""
    a = into if into is not None else ffi.new(f"{ctype} *")
    fields = dict(ffi.typeof(ctype).fields)
    if "struct_size" in fields:
        a.struct_size = ffi.sizeof(ctype)
    for name, value in values.items():
        ftype = fields[name].type
        if isinstance(value, dict):
            fill(ftype.cname, value, getattr(a, name))
            continue
        if isinstance(value, list) and value and isinstance(value[0], dict):  # an array of structs: slices
            for i, v in enumerate(value):
                fill(ftype.item.cname, v, getattr(a, name)[i])
            continue
        if isinstance(value, str):
            value = getattr(capi.lib, value)
        setattr(a, name, ffi.cast(ftype, value) if ftype.kind == "pointer" else value)
    return a


def expand_args(**over):
    values = {**VALID, **over}
    if values.pop("with_plan", False):
        values.update(batch_plan=PLAN, batch_plan_bytes=capi.lib.sgmv_batch_plan_bytes(values["batches"],
                                                                                         values["total_tokens"]))
    return fill("sgmv_expand_args_t", values)


def shrink_args(**over):
    values = {**SHRINK, **over}
    if values.pop("with_plan", False):
        values.update(batch_plan=PLAN, batch_plan_bytes=capi.lib.sgmv_batch_plan_bytes(values["batches"],
                                                                                         values["total_tokens"]))
    if values.pop("with_workspace", False):
        cols = max(1, values.get("num_slices", 1)) * values["rank"]
        values.update(workspace=WORKSPACE,
                      workspace_bytes=capi.lib.sgmv_shrink_workspace_bytes(values["total_tokens"], cols))
    return fill("sgmv_shrink_args_t", values)


def plan_args(**over):
    """sgmv_batch_plan_args_t for the metadata of expand_args(**over)."""
    e = {**VALID, **over}
    tensor = lambda ptr: dict(data=ptr, dtype=e["metadata_dtype"], ndim=1, shape=[e["batches"]],  # noqa: E731
                              strides=[1])
    return fill("sgmv_batch_plan_args_t", dict(
        plan=PLAN, plan_bytes=capi.lib.sgmv_batch_plan_bytes(e["batches"], e["total_tokens"]),
        seq_start=tensor(e["seq_start"]), seq_len=tensor(e["seq_len"]), lora_indices=tensor(e["lora_indices"]),
        batches=e["batches"], total_tokens=e["total_tokens"], num_loras=e["num_loras"], stream=e.get("stream", 0)))


def tensor(ptr, dtype, *shape):
    strides, n = [], 1
    for d in reversed(shape):
        strides.insert(0, n)
        n *= d
    return dict(data=ptr, dtype=dtype, ndim=len(shape), shape=list(shape), strides=strides)


def layer_call(fake, tokens=10, stream=0, fail_after_plan=None):
    """A layer and a step of fake addresses; (status, launches made by the plan, by the apply)."""
    f16, i32 = "SGMV_DTYPE_FLOAT16", "SGMV_DTYPE_INT32"
    la = fill("sgmv_layer_args_t", dict(num_slices=2, scaling=0.5,
                                        lora_a=[tensor(0x20000 + i * 0x10000, f16, 2, 16, 64) for i in range(2)],
                                        lora_b=[tensor(0x40000 + i * 0x10000, f16, 2, 64, 16) for i in range(2)]))
    layer, step = ffi.new("sgmv_layer_t **"), ffi.new("sgmv_step_t **")
    status = capi.lib.sgmv_layer_create(la, layer)
    nbytes = capi.lib.sgmv_step_scratch_bytes(2, tokens, 32)
    sa = fill("sgmv_step_args_t", dict(seq_start=tensor(0x60000, i32, 2), seq_len=tensor(0x61000, i32, 2),
                                       lora_indices=tensor(0x62000, i32, 2), batches=2, max_seq_length=5,
                                       total_tokens=tokens, num_loras=2, scratch=0x100000, scratch_bytes=nbytes))
    status = status or capi.lib.sgmv_step_create(sa, step)
    before = fake.fake_cuda_calls(b"cuLaunchKernel")
    status = status or capi.lib.sgmv_step_plan(step[0], ffi.cast("sgmv_stream_t", stream))
    planned_launches = fake.fake_cuda_calls(b"cuLaunchKernel") - before
    if fail_after_plan:
        fake.fake_cuda_fail(fail_after_plan.encode(), 1, 0)
    io = ffi.new("sgmv_tensor_t[2]")
    fill("sgmv_tensor_t", tensor(0x10000, f16, tokens, 64), io[0])
    fill("sgmv_tensor_t", tensor(0x90000, f16, tokens, 128), io[1])
    launches = lambda: [fake.fake_cuda_calls(n) for n in (b"cuLaunchKernel", b"cuLaunchKernelEx")]  # noqa: E731
    before = launches()
    status = status or capi.lib.sgmv_layer_apply(layer[0], step[0], io, io + 1, 1, ffi.cast("sgmv_stream_t", stream))
    plain, programmatic = (a - b for a, b in zip(launches(), before))
    capi.lib.sgmv_step_destroy(step[0])
    capi.lib.sgmv_layer_destroy(layer[0])
    return status, dict(plan_launches=planned_launches, apply_launches=plain + programmatic,
                        programmatic_launches=programmatic)


def planned(config_fn, args):
    """The launch the planner gives these arguments at sm_90."""
    c = ffi.new("sgmv_launch_config_t *")
    c.struct_size = ffi.sizeof("sgmv_launch_config_t")
    status = config_fn(args, 90, c)
    return dict(status=int(status), noop=c.noop, grid=list(c.grid), block=[32 * c.num_warps, 1, 1], steps=c.steps,
                split=c.split)


def fake_counters(fake):
    last = (ctypes.c_uint * 10)()
    stream = fake.fake_cuda_last_launch(last)
    ctx = (ctypes.c_int * 3)()
    fake.fake_cuda_context_stack(ctx)
    return dict(
        calls={n: fake.fake_cuda_calls(n.encode()) for n in DRIVER_CALLS},
        failures={n: fake.fake_cuda_failures(n.encode()) for n in DRIVER_CALLS},
        live_libraries=fake.fake_cuda_live_libraries(),
        context_pushes=ctx[0], context_pops=ctx[1], context_depth=ctx[2],
        last_launch=dict(grid=list(last[0:3]), block=list(last[3:6]), shared=last[6], params=bool(last[7]),
                         extra=bool(last[8]), programmatic=bool(last[9]), stream=stream or 0))


def main(steps):
    fake = ctypes.CDLL("libcuda.so.1")  # the same object libsgmv's dlopen("libcuda.so.1") gets
    fake.fake_cuda_last_launch.restype = ctypes.c_void_p
    maps = open("/proc/self/maps").read()
    where = [line.split()[-1] for line in maps.splitlines() if line.endswith("/libcuda.so.1")]
    if not where or any(os.path.dirname(p) != os.environ["FAKE_CUDA_DIR"] for p in where):
        raise SystemExit(f"the fake libcuda.so.1 is not the one loaded: {where}")
    results = []
    for step in steps:
        if "fail" in step:
            fake.fake_cuda_fail(step["fail"].encode(), step.get("count", 1), step.get("code", 0))
            continue
        if "call" in step:
            args = expand_args(**step["call"])
            status = capi.lib.sgmv_expand(args)
            extra = dict(planned=planned(capi.lib.sgmv_expand_config, args))
        elif "shrink" in step:
            args = shrink_args(**step["shrink"])
            status = capi.lib.sgmv_shrink(args)
            extra = dict(planned=planned(capi.lib.sgmv_shrink_config, args))
        elif "plan" in step:
            args = plan_args(**step["plan"])
            status = capi.lib.sgmv_batch_plan_build(args)
            extra = dict(planned=planned(capi.lib.sgmv_batch_plan_config, args))
        elif "layer" in step:
            status, extra = layer_call(fake, **step["layer"])
        else:
            cc, arch = ffi.new("int *", -1), ffi.new("int *", -1)
            status = capi.lib.sgmv_device_arch(step["device_arch"], cc, arch)
            extra = dict(compute_capability=cc[0], cubin_arch=arch[0])
        error = ffi.string(capi.lib.sgmv_last_error()).decode() if status else ""
        results.append(dict(status=int(status), error=error, **extra, **fake_counters(fake)))
    print(json.dumps(results))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
