"""The sgmv command: `sgmv info`, `sgmv check`, `sgmv bench`, and where the C files are.

`sgmv check` on a GPU runs every case through libsgmv.so (AOT), the Triton JIT and the torch
reference against a float64 expectation, with GPU timings. Without a usable GPU it cannot launch
libsgmv.so's kernels: it checks that the library loads and rejects a bad argument, and runs the
JIT kernel under Triton's interpreter (its times are interpreter times); its last line says what
was not checked.

Exit codes: 0 every check that ran passed; 1 a check failed; 2 the kernel could not be checked
(libsgmv.so did not load, or torch and triton are missing), or `sgmv bench` has nothing to time
(no torch or no GPU).
"""
import argparse
import os
import sys
import time

from . import __version__, capi
from .capi import ffi

OK, FAILED, UNAVAILABLE = 0, 1, 2


def _str(p):
    return ffi.string(p).decode()


def device_report():
    """(lines describing driver and GPU, True if a GPU the library can use was found)."""
    lib = capi.lib
    count = ffi.new("int *")
    status = lib.sgmv_device_count(count)
    if status:
        return [f"driver: {_str(lib.sgmv_last_error())}"], False
    if count[0] == 0:
        return ["driver: loaded; no CUDA device found"], False
    lines, usable = [f"driver: loaded; {count[0]} CUDA device(s)"], False
    cc, arch = ffi.new("int *"), ffi.new("int *")
    for d in range(count[0]):
        if lib.sgmv_device_arch(d, cc, arch):
            lines.append(f"  device {d}: {_str(lib.sgmv_last_error())}")
            continue
        family = f"uses the sm_{arch[0]} cubins" if arch[0] else "has no cubin family in this build"
        lines.append(f"  device {d}: compute capability {cc[0] // 10}.{cc[0] % 10}, {family}")
        usable |= arch[0] != 0
    return lines, usable


def version_line():
    """`sgmv --version`: the package's version and the loaded library's (no torch, no triton)."""
    try:
        lib = capi.lib
    except OSError as e:
        return f"sgmv {__version__} (python); libsgmv not loaded: {e}"
    return f"sgmv {__version__} (python), libsgmv {capi.version_string(lib.sgmv_version())} at {capi.library_path()}"


def cmd_info(_args):
    lib = capi.lib
    info = capi.build_info()
    print(version_line())
    print(f"ABI: sgmv.h major version {capi.VERSION_MAJOR}, SONAME libsgmv.so.{capi.VERSION_MAJOR}")
    print(f"cubins: {info['variants']} variants for sm {info['archs']}, compiled by triton "
          f"{info['triton'] or 'unknown (this libsgmv does not record it)'}")
    if "fp8_archs" in info:
        print(f"fp8 weights: sm {info['fp8_archs']}")
    lines, _ = device_report()
    print("\n".join(lines))
    return OK


def _check_error_path():
    """A call with a bad rank must come back as its status and message, changing nothing. Every
    other argument is valid, so that the rank check is the one reached: the pointers are fake
    (never read: the call is refused before any launch), distinct and 256-byte aligned."""
    a = ffi.new("sgmv_expand_args_t *")
    a.struct_size = ffi.sizeof("sgmv_expand_args_t")
    bf16, i32 = capi.DTYPE["SGMV_DTYPE_BFLOAT16"], capi.DTYPE["SGMV_DTYPE_INT32"]
    for i, name in enumerate(("inputs", "weights", "output", "seq_start", "seq_len", "lora_indices")):
        setattr(a, name, ffi.cast("void *", 0x10000 * (i + 1)))
    a.inputs_dtype = a.weights_dtype = a.output_dtype = bf16
    a.metadata_dtype = i32
    a.total_tokens = a.num_loras = a.batches = a.max_seq_length = 1
    a.hidden = 64
    a.rank = 0
    a.inputs_row_stride = a.weights_row_stride = 16
    a.weights_lora_stride = 64 * 16
    a.output_row_stride = 64
    status = capi.lib.sgmv_expand(a)
    msg = _str(capi.lib.sgmv_last_error())
    return status == capi.STATUS["SGMV_ERROR_INVALID_ARGUMENT"] and "rank" in msg, msg


# What the kernel checks and the benchmark need beyond the wheel's own dependencies; a command
# that works from a source checkout too (no extras of an installed distribution needed).
INSTALL_TORCH = 'pip install torch "triton>=3.6" "numpy<2.4"'


def _row(case, path, err="", dt="", result=""):
    print(f"{case:24} {path:10} {err:>9} {dt:>12}  {result}")


def cmd_check(args):
    try:
        capi.lib
    except OSError as e:
        print(f"sgmv check: FAILED: libsgmv.so did not load: {e}")
        return UNAVAILABLE
    cmd_info(args)
    _, gpu = device_report()
    ok, msg = _check_error_path()
    print(f"{'ok    ' if ok else 'FAILED'} error path: a bad argument returns its status ({msg})")
    failed = not ok
    try:
        import torch
        device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
        if device == "cpu":
            # The interpreter must be chosen before triton.jit decorates the kernel (sgmv.jit's import).
            os.environ["TRITON_INTERPRET"] = "1"
        from . import jit, reference, testing
    except ImportError as e:
        print(f"not checked: the kernel itself ({e}); to check it, install torch and triton: {INSTALL_TORCH}")
        return FAILED if failed else UNAVAILABLE
    not_checked = []
    if device == "cpu":
        why = "torch sees no CUDA device" if gpu else "no GPU the library can use"
        not_checked = ["libsgmv.so's kernel launches (the AOT cubins)",
                       "bfloat16 (the interpreter has no bf16 dot)", "GPU timings"]
        print(f"{why}: libsgmv.so's kernels are NOT launched here; the JIT kernel runs under Triton's "
              "interpreter against the float64 reference, and its times are interpreter times")
    bitwise = testing.jit_matches_build()
    jit_triton, build_triton = testing.triton_versions()
    why_not = f"the JIT's triton {jit_triton}, the cubins' {build_triton or 'unknown'}"
    if device == "cuda":
        print(f"AOT vs JIT: {'bit for bit' if bitwise else 'each within tolerance of the float64 result only'} "
              f"({why_not})")
    else:
        print(f"AOT vs JIT: not compared here (no AOT launch); on a GPU they would be compared "
              f"{'bit for bit' if bitwise else 'within tolerance only'} ({why_not})")
    suite = testing.make_cases(gpu=device == "cuda")
    cases = suite[::max(1, len(suite) // 8)]  # eight cases spread over the suite's shapes and dtypes

    def with_plan(expand, plan):
        def run(x, w, out, starts, lens, idx, batches, *rest):
            return expand(x, w, out, starts, lens, idx, batches, *rest,
                          batch_plan=plan(starts, lens, idx, batches, x.shape[0], w.shape[0]))
        return run

    paths = [("reference", reference.sgmv_expand), ("jit", jit.sgmv_expand),
             ("jit+plan", with_plan(jit.sgmv_expand, jit.batch_plan))]
    if device == "cuda":
        from . import binding
        paths += [("aot", binding.sgmv_expand), ("aot+plan", with_plan(binding.sgmv_expand, binding.batch_plan))]
    # err/tol: the worst written element's |got - expected| as a fraction of its tolerance (ok below 1).
    _row("case", "path", "err/tol", "time" if device == "cuda" else "interp time", "result")
    same = {"aot": "jit", "aot+plan": "jit+plan"}  # AOT outputs compared bit for bit with these JIT's

    def compare(case_name, outputs):
        nonlocal failed
        for aot, jit_name in same.items():
            if bitwise and aot in outputs and jit_name in outputs:
                equal = testing.bitwise_equal(outputs[aot], outputs[jit_name])
                failed |= not equal
                _row(case_name, aot, result=f"bit for bit equal to {jit_name}" if equal
                     else f"FAILED: differs from {jit_name} in some bits (same triton: must be equal)")
    for case in cases:
        if device == "cpu" and testing.needs_bf16_dot(case):
            _row(case.name, "jit", result="not checked (bf16 on the interpreter)")
            continue
        outputs = {}
        for name, fn in paths:
            call_args, buf = testing.build(case, device)
            before = buf.clone()
            exp, written = testing.expected(call_args)
            t0 = time.perf_counter()
            try:
                fn(*call_args)
                if device == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                err = testing.check(call_args, before, buf, exp, written, name)
                outputs[name] = buf
                _row(case.name, name, f"{err:.2f}", f"{dt * 1e3:.2f}ms", "ok")
            except testing.CheckFailed as e:
                failed = True
                _row(case.name, name, result=f"FAILED: {e}")
            except Exception as e:  # a path that raises has failed too: report it, check the rest
                failed = True
                _row(case.name, name, result=f"FAILED: {type(e).__name__}: {e}")
        compare(case.name, outputs)
    # Shrink, fused slices and per-adapter ranks and scales: eight calls spread over that suite.
    lora = testing.make_lora_cases(gpu=device == "cuda")
    for case in lora[::max(1, len(lora) // 8)] + testing.FP8_CHECK_CASES:
        if device == "cpu" and testing.lora_needs_bf16_dot(case):
            _row(str(case), "jit", result="not checked (bf16 on the interpreter)")
            continue
        op = "sgmv_" + case.op
        lora_paths = [("reference", getattr(reference, op)), ("jit", getattr(jit, op))]
        if device == "cuda":
            lora_paths.append(("aot", getattr(binding, op)))
        outputs = {}
        for name, fn in lora_paths:
            call_args, kw, buf = testing.build_lora(case, device)
            before = buf.clone()
            exp, written, slack = testing.expected_lora(case.op, call_args, kw)
            t0 = time.perf_counter()
            try:
                fn(*call_args, **kw)
                if device == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                err = testing.check(call_args, before, buf, exp, written, name, slack)
                outputs[name] = buf
                _row(str(case), name, f"{err:.2f}", f"{dt * 1e3:.2f}ms", "ok")
            except testing.CheckFailed as e:
                failed = True
                _row(str(case), name, result=f"FAILED: {e}")
            except capi.SgmvError as e:
                skip = _no_fp8_variants(e, case.weight_scales)
                failed |= not skip
                _row(str(case), name, result=f"{skip or 'FAILED'}: {type(e).__name__}: {e}")
            except Exception as e:
                failed = True
                _row(str(case), name, result=f"FAILED: {type(e).__name__}: {e}")
        compare(str(case), outputs)
    # The layer call (sgmv.Layer, sgmv.Step): four layers, segments and per-token mappings.
    for case in [testing.LAYER_CASES[i] for i in (0, 2, 9, 10)] + [testing.FP8_LAYER_CHECK_CASE]:
        if device == "cpu" and case.dtype == "bf16":
            _row(f"layer {case}", "jit", result="not checked (bf16 on the interpreter)")
            continue
        layer_paths = [("reference", lambda step: None, reference.layer_apply),
                       ("jit", jit.step_plan, jit.layer_apply)]
        if device == "cuda":
            layer_paths.append(("aot", lambda step: step.plan(),
                                lambda layer, x, out, step, add_inputs: layer(x, out, step, add_inputs=add_inputs)))
        outputs = {}
        for name, plan, apply in layer_paths:
            layer, step, x, out, buf, rows = testing.build_layer(case, device)
            before = buf.clone()
            pad = (buf.shape[1] - out.shape[1]) // 2
            exp, written, slack = testing.expected_layer(case, layer, x, before[:, pad:pad + out.shape[1]], rows)
            t0 = time.perf_counter()
            try:
                plan(step)
                apply(layer, x, out, step, add_inputs=case.add_inputs)
                if device == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                err = testing.check((x, None, out), before, buf, exp, written, name, slack)
                outputs[name] = buf
                _row(f"layer {case}", name, f"{err:.2f}", f"{dt * 1e3:.2f}ms", "ok")
            except testing.CheckFailed as e:
                failed = True
                _row(f"layer {case}", name, result=f"FAILED: {e}")
            except capi.SgmvError as e:
                skip = _no_fp8_variants(e, case.fp8)
                failed |= not skip
                _row(f"layer {case}", name, result=f"{skip or 'FAILED'}: {type(e).__name__}: {e}")
            except Exception as e:
                failed = True
                _row(f"layer {case}", name, result=f"FAILED: {type(e).__name__}: {e}")
        compare(f"layer {case}", outputs)
    if failed:
        print("check: FAILED")
        return FAILED
    if not_checked:
        print("check: passed what this machine can run (the JIT kernel under Triton's interpreter, the "
              f"library's load and error path); not checked: {', '.join(not_checked)}")
    else:
        print("check: all passed")
    return OK


def _no_fp8_variants(error, fp8):
    """What `sgmv check` says of an fp8 call refused for want of fp8 variants on this GPU (not a
    failure: the library says so by design), or "" for any other error."""
    arch = error.status == capi.STATUS["SGMV_ERROR_UNSUPPORTED_ARCH"]
    return "not checked (this GPU has no fp8 variants)" if fp8 and arch else ""


def cmd_bench(args):
    try:
        import torch  # noqa: F401  (bench imports it when it runs; here only to say what is missing)
    except ImportError as e:
        print(f"sgmv bench: needs torch and a CUDA GPU ({e}); to install torch and triton: {INSTALL_TORCH}",
              file=sys.stderr)
        return UNAVAILABLE
    from . import bench
    suites = None if args.suite is None or "all" in args.suite else args.suite
    return bench.run(args.out, providers=args.providers or None, cases=args.cases, suites=suites)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="sgmv", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="store_true", help="print the version of sgmv and of the libsgmv it loads")
    ap.add_argument("--include-dir", action="store_true", help="print the folder of sgmv.h")
    ap.add_argument("--lib-dir", action="store_true", help="print the folder of libsgmv.so")
    ap.add_argument("--cmake-dir", action="store_true", help="print the folder of sgmvConfig.cmake (sgmv_DIR)")
    ap.add_argument("--pkgconfig-dir", action="store_true", help="print the folder of sgmv.pc (PKG_CONFIG_PATH)")
    sub = ap.add_subparsers(dest="cmd")
    sub.add_parser("info", help="version, ABI, cubin archs and variants, driver and GPU")
    sub.add_parser("check", help="self-test: AOT vs JIT vs reference on a GPU, the interpreter without one")
    b = sub.add_parser("bench", help="time every provider on the shape suites against the bandwidth floor (GPU)")
    b.add_argument("--out", default="sgmv-bench", help="folder for results.json, results.md and results*.png")
    from . import bench  # the suites' names (bench imports neither torch nor the library at import)
    b.add_argument("--suite", nargs="+", default=None, choices=[*bench.SUITES, "all"],
                   help="suites to run (default all): expand, shrink (LoRA A), qkv (fused slices against "
                        "three calls), ranks (per-adapter ranks against padding), layer (the whole delta of a layer "
                        "in one call against shrink then expand)")
    b.add_argument("--providers", nargs="*", default=None, help="a subset of the suites' providers: " +
                   "; ".join(f"{k}: {' '.join(v)}" for k, v in bench.SUITES.items()))
    b.add_argument("--cases", nargs="*", default=None, help="only cases whose name contains one of these")
    args = ap.parse_args(argv)
    if args.version:
        print(version_line())
        return OK
    for flag, folder in [(args.include_dir, capi.INCLUDE_DIR), (args.lib_dir, capi.LIB_DIR),
                         (args.cmake_dir, capi.CMAKE_DIR), (args.pkgconfig_dir, capi.PKGCONFIG_DIR)]:
        if flag:
            print(folder)
            return OK
    if args.cmd is None:
        ap.print_help()
        return UNAVAILABLE
    try:
        return {"info": cmd_info, "check": cmd_check, "bench": cmd_bench}[args.cmd](args)
    except OSError as e:
        print(f"sgmv: {e}", file=sys.stderr)
        return UNAVAILABLE


if __name__ == "__main__":
    sys.exit(main())
