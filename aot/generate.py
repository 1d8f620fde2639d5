"""AOT generator: compiles kernels/sgmv.py for every variant of aot/variants.py with
Triton's compiler (no GPU needed) and writes, into an output folder:

  cubins/<name>.cubin     one per variant
  sgmv_cubins.S           embeds them (.incbin), hidden symbols
  sgmv_variants.c         the dispatch table that csrc/sgmv.c searches, and the tile rules
  sgmv_params.h           each kernel's parameters in signature order, for the C launch
  sgmv_rules.h            the rules csrc/ shares with the kernel and the table (#defines)

Usage: python aot/generate.py OUT_DIR [--jobs N] [--arch 90 ...]
"""
import argparse
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
KERNELS = HERE.parent / "kernels" / "sgmv.py"
sys.path.insert(0, str(HERE))
import variants as V  # noqa: E402

C_DTYPE = {"fp16": "SGMV_DTYPE_FLOAT16", "bf16": "SGMV_DTYPE_BFLOAT16", "fp32": "SGMV_DTYPE_FLOAT32",
           V.FP8: "SGMV_DTYPE_FLOAT8_E4M3FN"}
C_SCALAR = {"i32": "int32_t", "i64": "int64_t", "fp32": "float"}
# A parameter's type as csrc/variant.h's sgmv_param_type_t names it (the launch description).
C_TYPE = {"i32": "SGMV_PARAM_I32", "i64": "SGMV_PARAM_I64", "fp32": "SGMV_PARAM_FP32",
          "inputs": "SGMV_PARAM_INPUTS", "weights": "SGMV_PARAM_WEIGHTS", "output": "SGMV_PARAM_OUTPUT"}


def _kernels():
    """The kernel source, loaded by path: the generator does not import the package it builds."""
    spec = importlib.util.spec_from_file_location("sgmv_kernels_src", KERNELS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def parameters(mod, kernel_name):
    """(name, type) of a kernel's runtime parameters in signature order, from kernels.SIGNATURES,
    which must name every runtime parameter, in order: "*<dtype>" or "*<role>" for pointers,
    else a scalar type."""
    fn = getattr(mod, kernel_name)
    types = mod.SIGNATURES[kernel_name]
    names = [p.name for p in fn.params if not p.is_constexpr]
    if names != list(types):
        raise ValueError(f"kernels.SIGNATURES[{kernel_name!r}] lists {list(types)}, the signature has {names}")
    bad = [n for n, t in types.items() if t.lstrip("*") not in C_TYPE]
    if bad:
        raise ValueError(f"kernels.SIGNATURES[{kernel_name!r}]: unknown types for {bad}")
    return list(types.items())


def constexprs(mod, kernel_name):
    return [p.name for p in getattr(mod, kernel_name).params if p.is_constexpr]


def pointer_type(t, v):
    """A pointer parameter's Triton type in variant v: its fixed dtype, or the dtype of its role."""
    t = t[1:]
    return "*" + {"inputs": v.get("x"), "weights": v.get("w"), "output": v.get("out")}.get(t, t)


def path_value(mod, path):
    """The kernel's PATH constexpr for a path of the tile table ("rows", "short", "grouped")."""
    return getattr(mod, "PATH_" + path.upper()).value


def variant_name(v):
    if v["kernel"] == "sgmv_plan_kernel":
        return "sgmv_sm{arch}_plan".format(**v)
    return "sgmv_sm{arch}_{op}_{x}_{w}_{out}_k{ek}_{tile}_{path}".format(ek=int(v["even_k"]), **v)


def source(v):
    """What triton.compile takes for one variant: (source, target, options)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod = _kernels()
    kernel = getattr(mod, v["kernel"])
    params = parameters(mod, v["kernel"])
    attrs = {}
    if v["kernel"] == "sgmv_plan_kernel":
        size = V.PLAN_SIZE
        constexprs = {"SEGS": size.segs, "SCAN": size.scan, "ROWS": size.rows}
        options = {"num_warps": size.num_warps, "num_stages": 1}
    else:
        tile = V.TILES[v["tile"]]
        constexprs = {"BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n, "BLOCK_K": tile.block_k,
                      "PATH": path_value(mod, v["path"]), "EVEN_K": v["even_k"], "SHRINK": v["op"] == "shrink",
                      "ALIGNED": v["aligned"]}
        options = {"num_warps": tile.num_warps, "num_stages": tile.num_stages}
        if v["aligned"]:
            # What the planner checks before it picks an aligned variant (csrc/planner.c, is_aligned):
            # data pointers aligned to ALIGN_BYTES (the sizes and strides: the kernel's ALIGNED). The
            # JIT specialises the same pointers on 16-byte alignment, and nothing else.
            names = list(kernel.arg_names)
            for a in mod.ALIGNED_POINTERS:
                attrs[(names.index(a),)] = [["tt.divisibility", mod.ALIGN_BYTES.value]]
    signature = {n: pointer_type(t, v) if t[0] == "*" else t for n, t in params}
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    return ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs), \
        GPUTarget("cuda", v["arch"], 32), options


def compile_variant(v):
    """Compile one variant; returns (name, cubin bytes, shared bytes, num_warps, kernel name)."""
    import triton

    src, target, options = source(v)
    ck = triton.compile(src, target=target, options=options)
    md = ck.metadata
    if getattr(md, "global_scratch_size", 0) or getattr(md, "profile_scratch_size", 0):
        raise RuntimeError(f"{variant_name(v)} needs scratch memory, which the launcher does not provide")
    cubin = ck.asm["cubin"]
    if v["kernel"] == "sgmv_kernel" and v["arch"] == FIT_ARCH and v["tile"] not in V.UNFITTED_TILES:
        cubin = _fit_one_more_program(ck, target, options, fit_spill_bytes(v))
    return variant_name(v), cubin, md.shared, md.num_warps, md.name


# One SM of sm_90, the arch whose cubins the register fit is for (it was measured there; other
# archs have less shared memory or fewer warps per SM, where a limit computed from these could
# constrain ptxas for no program more), and the unit registers are given in.
FIT_ARCH = 90
SM_REGISTERS, SM_SHARED, SM_MAX_WARPS, SM_MAX_PROGRAMS, REGISTER_UNIT = 65536, 228 * 1024, 64, 32, 8


def _resources(cubin):
    """Registers per thread and spilled bytes (stack and local) of a cubin's kernel (cuobjdump)."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    field = lambda name: int(re.search(name + r":(\d+)", out).group(1))  # noqa: E731
    return field("REG"), field("STACK") + field("LOCAL")


def _programs_per_sm(registers, warps, shared):
    by_registers = SM_REGISTERS // (-(-registers // REGISTER_UNIT) * REGISTER_UNIT * 32 * warps)
    return min(by_registers, SM_SHARED // (shared + 1024), SM_MAX_WARPS // warps, SM_MAX_PROGRAMS)


def register_limit(registers, warps, shared):
    """The most registers per thread at which one more program fits on an SM, where registers
    alone keep it off; else None."""
    now = _programs_per_sm(registers, warps, shared)
    limit = SM_REGISTERS // ((now + 1) * warps * 32) // REGISTER_UNIT * REGISTER_UNIT
    if limit <= 0 or _programs_per_sm(limit, warps, shared) <= now:
        return None
    return limit


def fit_spill_bytes(v):
    """Bytes of spill the register fit may leave in variant v: aot/tiles.json's allowance in fp8
    expands (their column scales cost registers), none elsewhere."""
    return V.FP8_EXPAND_FIT_SPILL_BYTES if v["w"] == V.FP8 and v["op"] == "expand" else 0


def _fit_one_more_program(ck, target, options, spill=0):
    """ptxas spends registers freely, and a few past a step cost a whole program per SM (a
    third of the occupancy at 3 programs: 0.5.0's prefill expand lost 12 % so, benchmarks/NOTES.md
    round 9). Where register_limit gives a limit and the kernel compiles under it spilling at
    most `spill` bytes (none but in fp8 expands: aot/tiles.json), the limited compile is kept,
    however far over the step ptxas's own choice was (round 11: prefill 11 to 19 % faster than
    within 6 % of the step only). Not for the tiles aot/tiles.json lists in unfitted_tiles.
    Returns the cubin kept.

    The limited compile is ptxas alone, run by Triton's backend on the kernel's PTX with the
    `.maxnreg` directive that triton.compile(maxnreg=...) would add (the only difference in its
    PTX): the same cubin, byte for byte, for a seventh of the time of compiling it all again."""
    from triton.compiler.compiler import make_backend

    cubin = ck.asm["cubin"]
    limit = register_limit(_resources(cubin)[0], options["num_warps"], ck.metadata.shared)
    if limit is None:
        return cubin
    ptx, found = re.subn(r"^(\.reqntid .*)$", rf"\1\n.maxnreg {limit}", ck.asm["ptx"], count=1, flags=re.M)
    if found != 1:
        raise RuntimeError(f"{ck.metadata.name}: no .reqntid directive in the PTX to put .maxnreg after "
                           "(this triton is not the build's)")
    backend = make_backend(target)
    fitted = backend.make_cubin(ptx, {}, backend.parse_options(options), target.arch)
    return fitted if _resources(fitted)[1] <= spill else cubin


def _worker_init(cache_dir):
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ.setdefault("TRITON_DISABLE_LINE_INFO", "1")


def params_header(mod):
    """X-macros of each kernel's runtime parameters in signature order, X(name, C type, is pointer,
    sgmv_param_type_t), and of its constexprs, Y(name): the C launch builds its argument array and
    its launch description from these, so the order is written only in kernels/sgmv.py."""
    h = ["/* generated by aot/generate.py from kernels/sgmv.py: do not edit */", "#include <stdint.h>", ""]
    for kernel in mod.SIGNATURES:
        stem = kernel.upper()[:-len('_KERNEL')]
        items = " ".join(f"X({n}, {'const void *' if t[0] == '*' else C_SCALAR[t]}, {int(t[0] == '*')}, "
                         f"{C_TYPE[t.lstrip('*')]})" for n, t in parameters(mod, kernel))
        h.append(f"#define {stem}_KERNEL_PARAMS(X) {items}")
        h.append(f"#define {stem}_KERNEL_CONSTEXPRS(Y) {' '.join(f'Y({n})' for n in constexprs(mod, kernel))}")
    return "\n".join(h) + "\n"


def rules_header(mod):
    """The rules csrc/ shares with kernels/sgmv.py and aot/variants.py, as #defines: each has its
    source there, and C reads it from here (csrc/planner.c asserts that sgmv.h's enums agree)."""
    d = lambda name, value: f"#define SGMV_{name} {value}"  # noqa: E731
    h = ["/* generated by aot/generate.py from kernels/sgmv.py and aot/variants.py: do not edit */", ""]
    h += [d(f"OP_{op.upper()}", i) for i, op in enumerate(V.OPS)]
    h += [d(f"KERNEL_PATH_{p.upper()}", path_value(mod, p)) for p in ("rows", "short", "grouped")]
    h += ["/* the batch plan's layout in int32 words, and split-K's most programs (the kernel's) */",
          d("PLAN_HEADER", mod.PLAN_HEADER.value), d("PLAN_ALIGN", mod.PLAN_ALIGN.value),
          d("PLAN_TABLE", mod.PLAN_TABLE.value), d("MAX_SPLIT", mod.MAX_SPLIT.value),
          "/* what aligned variants assume (bytes), expand's narrowest column tile */",
          d("ALIGN_BYTES", mod.ALIGN_BYTES.value), d("MIN_EXPAND_BLOCK_N", V.MIN_EXPAND_BLOCK_N),
          "/* the served dtypes: X(op, inputs, weights, output) */"]
    rows = [f"X(SGMV_OP_{op.upper()}, {C_DTYPE[x]}, {C_DTYPE[w]}, {C_DTYPE[o]})"
            for op in V.OPS for x, w, o in V.DTYPES[op]]
    h.append("#define SGMV_DTYPE_MATRIX(X) " + " ".join(rows))
    return "\n".join(h) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--arch", type=int, action="append", help="only these archs (default: all)")
    args = ap.parse_args()

    mod = _kernels()
    V.check(mod.PLAN_ALIGN.value, mod.MAX_SPLIT.value)
    out = args.out_dir.resolve()
    (out / "cubins").mkdir(parents=True, exist_ok=True)
    archs = args.arch or V.ARCHS
    todo = [v for v in V.variants() if v["arch"] in archs]
    t0 = time.time()
    cache = str(out / "triton-cache")
    with ProcessPoolExecutor(args.jobs, initializer=_worker_init, initargs=(cache,)) as pool:
        results = list(pool.map(compile_variant, todo, chunksize=4))

    asm = ["/* generated by aot/generate.py: do not edit */", '.section .rodata, "a"']
    for name, cubin, *_ in results:
        (out / "cubins" / f"{name}.cubin").write_bytes(cubin)
        asm += [".balign 16", f".globl {name}", f".hidden {name}", f"{name}:",
                f'.incbin "{out}/cubins/{name}.cubin"', f".globl {name}_end", f".hidden {name}_end", f"{name}_end:"]
    asm.append('.section .note.GNU-stack, "", @progbits')
    (out / "sgmv_cubins.S").write_text("\n".join(asm) + "\n")
    (out / "sgmv_params.h").write_text(params_header(mod))
    (out / "sgmv_rules.h").write_text(rules_header(mod))

    tile_names = list(V.TILES)
    c = ["/* generated by aot/generate.py: do not edit */", '#include "variant.h"', ""]
    for name, *_ in results:
        c.append(f"extern const unsigned char {name}[], {name}_end[];")
    c += ["", "const sgmv_tile_t sgmv_tiles[] = {"]
    for name in tile_names:
        t = V.TILES[name]
        c.append(f'  {{"{name}", {t.block_m}, {t.block_n}, {t.block_k}, {t.num_warps}, {t.num_stages}}},')
    c += ["};", "", "const sgmv_rule_t sgmv_rules[] = {"]
    opt = lambda v: -1 if v is None else v  # noqa: E731
    # Each rule's fp8 field: 1 for the rules of fp8 weights (V.FP8_RULES, V.FP8_GROUPED_RULES).
    rules = [(op, arch, fp8, r) for fp8, table in ((0, V.RULES), (1, V.FP8_RULES)) for op in V.OPS
             for arch, rs in table[op].items() for r in rs]
    for op, arch, fp8, (max_seq, max_rank, name, path) in rules:
        c.append(f"  {{{V.OPS.index(op)}, {arch}, {opt(max_seq)}, {opt(max_rank)}, {tile_names.index(name)}, "
                 f"{int(path == 'short')}, {fp8}}},")
    c += ["};", f"const int sgmv_num_rules = {len(rules)};", "", "const sgmv_grouped_rule_t sgmv_grouped_rules[] = {"]
    rules = [(op, arch, fp8, r) for fp8, table in ((0, V.GROUPED_RULES), (1, V.FP8_GROUPED_RULES)) for op in V.OPS
             for arch, rs in table[op].items() for r in rs]
    for op, arch, fp8, (max_rows, max_rank, name) in rules:
        c.append(f"  {{{V.OPS.index(op)}, {arch}, {opt(max_rows)}, {opt(max_rank)}, {tile_names.index(name)}, {fp8}}},")
    c += ["};", f"const int sgmv_num_grouped_rules = {len(rules)};", "",
          f"const sgmv_plan_size_t sgmv_plan_size = {{{V.PLAN_SIZE.segs}, {V.PLAN_SIZE.scan}, {V.PLAN_SIZE.rows}, "
          f"{V.PLAN_SIZE.num_warps}}};",
          f"const sgmv_split_rule_t sgmv_split_rule = {{{V.SPLIT.programs}, {V.SPLIT.max_split}, {V.SPLIT.max_tokens}}};",
          f"const int sgmv_unaligned_tile = {tile_names.index('unaligned')};",
          "const sgmv_tuning_t sgmv_tuning = {" + ", ".join(f".{k} = {v}" for k, v in V.PLANNER.items()) + "};",
          f'const char sgmv_archs_list[] = "{",".join(str(a) for a in V.ARCHS if a in archs)}";', "",
          "sgmv_variant_t sgmv_variants[] = {"]
    for v, (name, cubin, shared, warps, kname) in zip(todo, results):
        if v["kernel"] == "sgmv_plan_kernel":
            key = f'{v["arch"]}, SGMV_KERNEL_PLAN, 0, 0, 0, 0, 0, 0'
        else:
            key = (f'{v["arch"]}, SGMV_KERNEL_{v["op"].upper()}, {tile_names.index(v["tile"])}, {path_value(mod, v["path"])}, {C_DTYPE[v["x"]]}, '
                   f'{C_DTYPE[v["w"]]}, {C_DTYPE[v["out"]]}, {int(v["even_k"])}')
        c.append(f'  {{{{{key}}}, "{name}", "{kname}", {name}, {name}_end, {shared}, {warps}, NULL, NULL, 0}},')
    c += ["};", f"const int sgmv_num_variants_total = {len(results)};", ""]
    (out / "sgmv_variants.c").write_text("\n".join(c))
    size = sum(len(r[1]) for r in results)
    print(f"aot: {len(results)} variants, {size / 2**20:.1f} MiB of cubins, "
          f"{time.time() - t0:.0f} s on {args.jobs} jobs -> {out}")


if __name__ == "__main__":
    main()
