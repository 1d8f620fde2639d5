"""libsgmv.so's driver path without a GPU: the installed library, called through the binding, in a
subprocess whose dlopen("libcuda.so.1") finds a fake driver (tests/fake_cuda/fake_cuda.c, built
here) through LD_LIBRARY_PATH, also on a machine with a real one. The fake counts every call,
checks the handles it issued and the context push/pop balance, and fails the functions it is told
to; tests/fake_cuda/scenario.py runs the steps of one scenario and reports the fake's counters.

Each injected fault must give its status and the CUDA error's name in sgmv_last_error(), launch
nothing, leak nothing, and leave the next call working."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sgmv import capi

FAKE = Path(__file__).resolve().parent / "fake_cuda"
S = {name: getattr(capi.lib, name) for name in dir(capi.lib) if name.startswith("SGMV_")}


def build_fake(folder, *defines):
    """Compiles fake_cuda.c to folder/libcuda.so.1; returns folder."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-fvisibility=hidden",
                    *defines, "-Wl,-soname,libcuda.so.1", "-o", str(folder / "libcuda.so.1"),
                    str(FAKE / "fake_cuda.c"), "-pthread"], check=True)
    return folder


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return build_fake(tmp_path_factory.mktemp("fake_cuda"))


def scenario(fake_dir, steps, **env):
    """Runs the steps in a fresh process; returns one report per library call."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_CUDA_")}
    e.update(LD_LIBRARY_PATH=os.pathsep.join(filter(None, [str(fake_dir), os.environ.get("LD_LIBRARY_PATH")])),
             FAKE_CUDA_DIR=str(fake_dir), **env)
    r = subprocess.run([sys.executable, str(FAKE / "scenario.py"), json.dumps(steps)], capture_output=True,
                       text=True, env=e, timeout=120)
    assert r.returncode == 0, f"scenario exited {r.returncode}\n{r.stdout}{r.stderr}"
    return json.loads(r.stdout.splitlines()[-1])


_DT = {"fp16": "SGMV_DTYPE_FLOAT16", "bf16": "SGMV_DTYPE_BFLOAT16", "fp32": "SGMV_DTYPE_FLOAT32"}


def shape(hidden=64, rank=16, tokens=10, batches=2, max_seq=5, dtypes=("fp16", "fp16", "fp16"), **over):
    """Fields of a valid call: dense (tokens, rank) inputs, (2, hidden, rank) weights, (tokens, hidden) output."""
    x, w, o = (_DT[d] for d in dtypes)
    return dict(inputs_dtype=x, weights_dtype=w, output_dtype=o, hidden=hidden, rank=rank, inputs_row_stride=rank,
                weights_row_stride=rank, weights_lora_stride=hidden * rank, output_row_stride=hidden,
                total_tokens=tokens, batches=batches, max_seq_length=max_seq, **over)


def launches(report):
    """Launches that the fake accepted so far."""
    return report["calls"]["cuLaunchKernel"] - report["failures"]["cuLaunchKernel"]


def loads(report):
    return report["calls"]["cuLibraryLoadData"] - report["failures"]["cuLibraryLoadData"]


def assert_balanced(report):
    assert report["context_pushes"] == report["context_pops"] and report["context_depth"] == 0, report


def assert_planned_launch(report, call):
    """The launch is the one the planner gives this call (sgmv_expand_config or
    sgmv_batch_plan_config at sm_90), within the device's limits, on the call's stream."""
    launch, planned = report["last_launch"], report["planned"]
    assert planned["status"] == 0 and not planned["noop"], planned
    assert launch["grid"] == planned["grid"] and launch["block"] == planned["block"], (launch, planned)
    assert all(launch["grid"]) and max(launch["grid"][1:]) <= 65535 and launch["block"][0] <= 1024, launch
    assert 0 < launch["shared"] <= 232448, launch
    assert launch["params"] and not launch["extra"], launch
    assert launch["stream"] == call.get("stream", 0), launch


CALLS = {  # name: (step, fields)
    "fp16-h64-decode": ("call", shape(max_seq=1)),
    "fp16-h64-spec": ("call", shape()),
    "fp16-h4096-prefill": ("call", shape(hidden=4096, tokens=1000, batches=4, max_seq=500)),
    "fp32in-fp16-r256-prefill": ("call", shape(rank=256, tokens=1000, max_seq=500, dtypes=("fp32", "fp16", "fp16"))),
    "bf16-fp32out-h4097-unaligned": ("call", shape(hidden=4097, rank=7, dtypes=("bf16", "bf16", "fp32"))),
    "fp32in-bf16-fp32out-int64-own-stream": ("call", shape(dtypes=("fp32", "bf16", "fp32"), add_inputs=0,
                                                           metadata_dtype="SGMV_DTYPE_INT64", stream=0x5150)),
    "bf16-with-a-plan": ("call", shape(tokens=200, batches=40, max_seq=5, dtypes=("bf16",) * 3, with_plan=True)),
    "plan-build": ("plan", shape(tokens=200, batches=40)),
    "plan-build-int64-own-stream": ("plan", shape(metadata_dtype="SGMV_DTYPE_INT64", stream=0x5150)),
}


@pytest.mark.parametrize("name", CALLS)
def test_a_call_launches_once(fake, name):
    step, call = CALLS[name]
    first, second = scenario(fake, [{step: call}, {step: call}])
    assert first["status"] == 0 and second["status"] == 0, (first["error"], second["error"])
    per_call = 2 if step == "plan" else 1  # a plan is built in two launches (sgmv_launch_config_t.steps)
    assert launches(first) == per_call and launches(second) == 2 * per_call
    assert_planned_launch(first, call)
    assert second["last_launch"] == first["last_launch"]
    # Loaded once, on first use, and kept.
    assert first["calls"]["cuLibraryLoadData"] == second["calls"]["cuLibraryLoadData"] == 1
    assert second["live_libraries"] == 1 and second["calls"]["cuInit"] == 1
    assert_balanced(second)


def test_each_variant_loads_once(fake):
    """Every dtype combination, tile and add_inputs twice over: the second sweep loads nothing."""
    calls = [shape(rank=r, tokens=1000, max_seq=m, dtypes=(x, w, o), add_inputs=a)
             for w in ("fp16", "bf16") for x in (w, "fp32") for o in (w, "fp32")
             for r in (16, 64, 256) for m in (1, 8, 64, 500) for a in (0, 1)]
    reports = scenario(fake, [{"call": c} for c in calls * 2])
    assert all(r["status"] == 0 for r in reports), [r["error"] for r in reports if r["status"]]
    half = reports[len(calls) - 1]
    assert loads(half) == half["live_libraries"] == reports[-1]["live_libraries"] == loads(reports[-1])
    assert loads(half) >= 8 * 2 * 2  # dtypes x add_inputs x at least two tiles
    assert launches(reports[-1]) == 2 * len(calls)


def _fault_then_recovery(fake, fail, call=None, code=0, step="call", **env):
    call = call or shape()
    broken, fixed = scenario(fake, [{"fail": fail, "code": code}, {step: call}, {step: call}], **env)
    # The fault: reported, nothing launched, the context stack as it was.
    assert broken["failures"][fail] == 1, broken
    assert launches(broken) == 0
    assert_balanced(broken)
    # The next call works, and launches once (a plan build: its two steps).
    assert fixed["status"] == 0, fixed["error"]
    assert launches(fixed) == (2 if step == "plan" else 1)
    assert_planned_launch(fixed, call)
    assert_balanced(fixed)
    return broken, fixed


@pytest.mark.parametrize("code,error", [(0, "CUDA_ERROR_INVALID_IMAGE"), (2, "CUDA_ERROR_OUT_OF_MEMORY")])
def test_failing_library_load(fake, code, error):
    broken, fixed = _fault_then_recovery(fake, "cuLibraryLoadData", code=code)
    assert broken["status"] == S["SGMV_ERROR_CUDA"]
    assert "cuLibraryLoadData" in broken["error"] and error in broken["error"], broken["error"]
    assert broken["live_libraries"] == 0
    assert fixed["live_libraries"] == loads(fixed) == 1


def test_failing_kernel_lookup(fake):
    """Nothing half published: the next call gets a kernel, not a NULL one."""
    broken, fixed = _fault_then_recovery(fake, "cuLibraryGetKernel")
    assert broken["status"] == S["SGMV_ERROR_CUDA"]
    assert "cuLibraryGetKernel" in broken["error"] and "CUDA_ERROR_NOT_FOUND" in broken["error"], broken["error"]
    assert fixed["calls"]["cuLibraryGetKernel"] == 2


def test_failing_kernel_lookup_unloads_its_library(fake):
    broken, fixed = _fault_then_recovery(fake, "cuLibraryGetKernel")
    assert broken["live_libraries"] == 0, broken
    assert fixed["live_libraries"] == 1, fixed


@pytest.mark.parametrize("step", ["call", "plan"], ids=["expand", "plan-build"])
@pytest.mark.parametrize("context", ["current", "pushed"])
def test_failing_launch(fake, context, step):
    """With a current context (default stream), and with none current (a stream's context pushed
    for the call and popped after it, the failure too); of sgmv_expand and sgmv_batch_plan_build."""
    env = {"FAKE_CUDA_NO_CONTEXT": "1"} if context == "pushed" else {}
    call = shape(stream=0x5150) if context == "pushed" else shape()
    broken, fixed = _fault_then_recovery(fake, "cuLaunchKernel", call, step=step, **env)
    assert broken["status"] == S["SGMV_ERROR_CUDA"]
    assert "cuLaunchKernel" in broken["error"] and "CUDA_ERROR_LAUNCH_FAILED" in broken["error"], broken["error"]
    assert loads(fixed) == fixed["live_libraries"] == 1  # the failed launch reloads nothing
    assert (fixed["context_pushes"] > 0) == (context == "pushed"), fixed


def test_fault_injected_through_the_environment(fake):
    """FAKE_CUDA_FAIL=name:count:code: two launches run out of resources, the third goes."""
    reports = scenario(fake, [{"call": shape()}] * 3, FAKE_CUDA_FAIL="cuLaunchKernel:2:701")
    assert [r["status"] for r in reports] == [S["SGMV_ERROR_CUDA"]] * 2 + [0]
    assert all("CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES" in r["error"] for r in reports[:2]), reports[0]["error"]
    assert launches(reports[-1]) == 1


CONTEXT_FAULTS = [  # (function, status as csrc/sgmv.c maps it, environment)
    ("cuStreamGetCtx", "SGMV_ERROR_NO_DEVICE", {}),
    ("cuCtxGetId", "SGMV_ERROR_CUDA", {}),
    ("cuCtxGetDevice", "SGMV_ERROR_CUDA", {}),
    ("cuCtxPushCurrent", "SGMV_ERROR_CUDA", {"FAKE_CUDA_NO_CONTEXT": "1"}),
]


@pytest.mark.parametrize("fail,status,env", CONTEXT_FAULTS, ids=["cuStreamGetCtx", "cuCtxGetId", "cuCtxGetDevice",
                                                                   "cuCtxPushCurrent"])
def test_failing_context_query(fake, fail, status, env):
    call = shape(stream=0x5150) if env else shape()
    broken, fixed = _fault_then_recovery(fake, fail, call, **env)
    assert broken["status"] == S[status], broken["error"]
    assert fail in broken["error"] and "CUDA_ERROR_INVALID_CONTEXT" in broken["error"], broken["error"]
    assert broken["calls"]["cuLibraryLoadData"] == 0  # stopped before any loading


def test_default_stream_without_a_current_context(fake):
    (report,) = scenario(fake, [{"call": shape()}], FAKE_CUDA_NO_CONTEXT="1")
    assert report["status"] == S["SGMV_ERROR_NO_DEVICE"], report["error"]
    assert "context" in report["error"] and launches(report) == 0
    assert_balanced(report)


DRIVER_FAULTS = [  # (environment, status, words of the message)
    ({"FAKE_CUDA_FAIL": "cuInit:1:100"}, "SGMV_ERROR_NO_DEVICE", ["cuInit", "CUDA_ERROR_NO_DEVICE"]),
    ({"FAKE_CUDA_FAIL": "cuInit:1:999"}, "SGMV_ERROR_CUDA", ["cuInit", "CUDA_ERROR_UNKNOWN"]),
    ({"FAKE_CUDA_VERSION": "11080"}, "SGMV_ERROR_NO_DRIVER", ["too old", "11.8"]),
    ({"FAKE_CUDA_CC": "75"}, "SGMV_ERROR_UNSUPPORTED_ARCH", ["7.5"]),
]


@pytest.mark.parametrize("env,status,words", DRIVER_FAULTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items())
                         if isinstance(v, dict) else None)
def test_driver_and_device_faults(fake, env, status, words):
    (report,) = scenario(fake, [{"call": shape()}], **env)
    assert report["status"] == S[status], report["error"]
    assert all(w in report["error"] for w in words), report["error"]
    assert launches(report) == 0 and report["calls"]["cuLibraryLoadData"] == 0


def test_driver_without_the_library_api(tmp_path):
    """A driver before CUDA 12.0 (no cuLibraryLoadData): NO_DRIVER, naming what is missing."""
    (report,) = scenario(build_fake(tmp_path / "cuda11", "-DFAKE_CUDA_11"), [{"call": shape()}])
    assert report["status"] == S["SGMV_ERROR_NO_DRIVER"], report["error"]
    assert "cuLibrary" in report["error"] and "12.0" in report["error"], report["error"]


def test_device_arch(fake):
    good, bad = scenario(fake, [{"device_arch": 0}, {"device_arch": 1}])
    assert good["status"] == 0 and (good["compute_capability"], good["cubin_arch"]) == (90, 90)
    assert bad["status"] == S["SGMV_ERROR_CUDA"] and "CUDA_ERROR_INVALID_DEVICE" in bad["error"], bad["error"]



_BINDING_CALL = """
import json, sys
import sgmv
from sgmv import capi


class T:  # a tensor as the binding reads it (torch's methods), on CUDA device 0, at a fake address
    def __init__(self, shape, dtype, ptr):
        self.shape, self.dtype, self._ptr = shape, "torch." + dtype, ptr
    def data_ptr(self):
        return self._ptr
    def stride(self):  # contiguous
        strides, n = [], 1
        for d in reversed(self.shape):
            strides.insert(0, n)
            n *= d
        return tuple(strides)
    def get_device(self):
        return 0


args = (T((10, 16), "float16", 0x10000), T((2, 64, 16), "float16", 0x20000), T((10, 64), "float16", 0x30000),
        T((2,), "int32", 0x40000), T((2,), "int32", 0x50000), T((2,), "int32", 0x60000), 2, 5)
out = []
for _ in range(2):
    try:
        sgmv.sgmv_expand(*args, add_inputs=True, stream=0)
        out.append({"status": 0})
    except sgmv.SgmvError as e:
        out.append({"status": e.status, "type": type(e).__name__, "value_error": isinstance(e, ValueError),
                    "message": str(e)})
print(json.dumps(out))
"""


@pytest.mark.parametrize("env,status,words", [
    ({"FAKE_CUDA_FAIL": "cuLaunchKernel"}, "SGMV_ERROR_CUDA", "CUDA_ERROR_LAUNCH_FAILED"),
    ({"FAKE_CUDA_FAIL": "cuStreamGetCtx"}, "SGMV_ERROR_NO_DEVICE", "no CUDA context for the stream"),
    ({"FAKE_CUDA_CC": "75"}, "SGMV_ERROR_UNSUPPORTED_ARCH", "compute capability 7.5"),
    ({"FAKE_CUDA_VERSION": "11080"}, "SGMV_ERROR_NO_DRIVER", "CUDA 11.8"),
], ids=["cuda-error", "no-device", "unsupported-arch", "old-driver"])
def test_driver_statuses_through_the_python_binding(fake, env, status, words):
    """Each driver-side status as sgmv.sgmv_expand raises it: SgmvError with .status and the
    library's message, not a ValueError; a transient fault (one failing call) clears."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_CUDA_")}
    e.update(LD_LIBRARY_PATH=os.pathsep.join(filter(None, [str(fake), os.environ.get("LD_LIBRARY_PATH")])), **env)
    r = subprocess.run([sys.executable, "-c", _BINDING_CALL], capture_output=True, text=True, env=e, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    first, second = json.loads(r.stdout.splitlines()[-1])
    assert first["status"] == S[status] and first["type"] == "SgmvError" and not first["value_error"], first
    assert words in first["message"], first["message"]
    transient = "FAKE_CUDA_FAIL" in env
    assert (second["status"] == 0) == transient, second


def test_layer_call_plans_once_and_launches_shrink_then_expand(fake):
    """A step's plan is two launches; a layer call is the shrink and the expand, one context entry,
    both plain cuLaunchKernel launches in stream order (no programmatic launch since 0.6.1)."""
    first, second = scenario(fake, [{"layer": {}}, {"layer": {"stream": 0x5150}}])
    for r in (first, second):
        assert r["status"] == 0, r["error"]
        assert r["plan_launches"] == 2 and r["apply_launches"] == 2 and r["programmatic_launches"] == 0, r
        assert not r["last_launch"]["programmatic"] and r["last_launch"]["params"], r
        assert_balanced(r)
    assert second["last_launch"]["stream"] == 0x5150


def test_layer_call_launch_failure_names_the_call(fake):
    """A failing launch in the middle of a layer call: its status and the CUDA error, context balanced,
    and the next call works."""
    failed, after = scenario(fake, [{"layer": {"fail_after_plan": "cuLaunchKernel"}}, {"layer": {}}])
    assert failed["status"] == S["SGMV_ERROR_CUDA"] and "cuLaunchKernel" in failed["error"], failed
    assert failed["apply_launches"] == 1  # the shrink's launch failed: the expand was not made
    assert_balanced(failed)
    assert after["status"] == 0 and after["apply_launches"] == 2
