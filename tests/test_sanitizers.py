"""The library's C code under sanitizers, built from csrc/ with a fake variant table (no Triton,
no GPU, no installed sgmv): the C tests under ASan + UBSan (gcc), and a bounded libFuzzer run
over sgmv_expand's argument validation (clang). See tests/fuzz/."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
FUZZ = ROOT / "tests" / "fuzz"
# The library's C files, the fake table, and no_driver.c, which keeps libcuda out (-Wl,--wrap=dlopen):
# the tests pass fake device pointers, so no real driver may ever see them.
LIB_SOURCES = [str(p) for p in sorted(CSRC.glob("*.c"))] + [str(FUZZ / "fake_variants.c"), str(FUZZ / "no_driver.c")]
INCLUDES = ["-I", str(CSRC), "-I", str(CSRC / "include")]


@pytest.fixture(autouse=True)
def params_header(tmp_path, monkeypatch):
    """The generated sgmv_params.h and sgmv_rules.h (the kernels' parameter lists, the shared rules), made here as the build makes it:
    with Triton's JIT, not its interpreter (which tests/conftest.py turns on without a GPU), whose
    functions carry no parameter list."""
    import importlib.util
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    spec = importlib.util.spec_from_file_location("sgmv_generate", ROOT / "aot" / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    mod = gen._kernels()
    (tmp_path / "sgmv_params.h").write_text(gen.params_header(mod))
    (tmp_path / "sgmv_rules.h").write_text(gen.rules_header(mod))
    INCLUDES[4:] = ["-I", str(tmp_path)]
SANITIZE = ["-g", "-O1", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
# Any report aborts with a nonzero exit (UBSan too, through -fno-sanitize-recover); leaks are reports.
ENV = dict(os.environ, ASAN_OPTIONS="abort_on_error=1:detect_leaks=1:strict_string_checks=1",
           UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
FUZZ_SECONDS = 60


def run(cmd, timeout=300, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=ENV, timeout=timeout, **kw)


def build(cmd):
    r = run(cmd)
    assert r.returncode == 0, f"build failed: {' '.join(map(str, cmd))}\n{r.stdout}{r.stderr}"


def test_c_tests_under_asan_and_ubsan(tmp_path):
    lib = tmp_path / "libsgmv_san.so"
    # Built like libsgmv.so.0 (hidden symbols, the version script, thread-locals in a shared library).
    build(["gcc", *SANITIZE, "-Wall", "-Wextra", "-fPIC", "-fvisibility=hidden", "-shared", *INCLUDES, *LIB_SOURCES,
           f"-Wl,--version-script={CSRC / 'sgmv.map'}", "-Wl,--wrap=dlopen", "-pthread", "-ldl", "-o", lib])
    for name, src in [("abi_check", ROOT / "tests" / "c" / "abi_check.c"),
                      ("validation_cases", FUZZ / "validation_cases.c")]:
        exe = tmp_path / name
        build(["gcc", *SANITIZE, "-Wall", "-Wextra", "-I", CSRC / "include", src, "-L", tmp_path,
               f"-l:{lib.name}", f"-Wl,-rpath,{tmp_path}", "-pthread", "-o", exe])
        r = run([exe])
        print(r.stdout, end="")
        assert r.returncode == 0, f"{name} exited {r.returncode}\n{r.stdout}{r.stderr}"
        assert f"{name}: ok" in r.stdout, r.stdout
        assert "runtime error" not in r.stderr and "Sanitizer" not in r.stderr, r.stderr


def test_fuzz_expand(tmp_path):
    clang = shutil.which("clang")
    if not clang:
        # CI installs clang (.ci/run), so there a missing clang is a failure, not a skip.
        why = "clang is needed to build the libFuzzer harness tests/fuzz/fuzz_expand.c (apt-get install -y clang)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    exe = tmp_path / "fuzz_expand"
    build([clang, *SANITIZE, "-fsanitize=fuzzer", *INCLUDES, FUZZ / "fuzz_expand.c", *LIB_SOURCES,
           "-Wl,--wrap=dlopen", "-pthread", "-ldl", "-o", exe])
    # New inputs go to the first corpus folder, so that one is in tmp_path; the seeds are read only.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    r = run([exe, f"-max_total_time={FUZZ_SECONDS}", "-rss_limit_mb=2048", "-timeout=10", "-print_final_stats=1",
             f"-artifact_prefix={tmp_path}/", corpus, FUZZ / "corpus"], timeout=FUZZ_SECONDS + 240, cwd=tmp_path)
    log = r.stdout + r.stderr
    assert r.returncode == 0, f"fuzz_expand failed (crash input under {tmp_path}):\n{log[-6000:]}"
    done = re.search(r"Done (\d+) runs in (\d+) second", log)
    assert done, log[-3000:]
    runs, seconds = int(done.group(1)), int(done.group(2))
    print(f"fuzz_expand: {runs} runs in {seconds} s")
    assert runs > 1000, log[-3000:]


def test_driver_faults_under_asan_and_ubsan(tmp_path):
    """The library with the fake driver of tests/fake_cuda/ let in (no no_driver.c): loading, kernel
    lookup, launch and context faults each reported by name, the next call launching, under ASan
    (leaks detected) and UBSan. The fake loads the dummy cubins of fake_variants.c."""
    from test_faults import build_fake
    fake = build_fake(tmp_path / "fake_cuda")
    lib, exe = tmp_path / "libsgmv_faults.so", tmp_path / "faults_asan"
    sources = [s for s in LIB_SOURCES if not s.endswith("no_driver.c")]
    build(["gcc", *SANITIZE, "-Wall", "-Wextra", "-fPIC", "-fvisibility=hidden", "-shared", *INCLUDES, *sources,
           f"-Wl,--version-script={CSRC / 'sgmv.map'}", "-pthread", "-ldl", "-o", lib])
    build(["gcc", *SANITIZE, "-Wall", "-Wextra", "-I", CSRC / "include", ROOT / "tests" / "fake_cuda" / "faults_asan.c",
           "-L", tmp_path, f"-l:{lib.name}", "-L", fake, "-l:libcuda.so.1", f"-Wl,-rpath,{tmp_path}", "-pthread",
           "-o", exe])
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120,
                       env=dict(ENV, LD_LIBRARY_PATH=str(fake), FAKE_CUDA_ANY_IMAGE="1"))
    assert r.returncode == 0 and "faults_asan: ok" in r.stdout, r.stdout + r.stderr
    assert "runtime error" not in r.stderr and "Sanitizer" not in r.stderr, r.stderr


@pytest.mark.parametrize("cc", ["gcc", "clang"])
def test_c_sources_have_no_warnings(cc, tmp_path):
    """csrc/ under -Wall -Wextra -Werror at -O2 (where gcc's maybe-uninitialized analysis runs), as
    CMakeLists.txt builds it: a warning fails the build, so it fails here first."""
    if not shutil.which(cc):
        pytest.skip(f"{cc} is not installed")
    for src in sorted(CSRC.glob("*.c")):
        build([cc, "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-fPIC", *INCLUDES, "-c", src,
               "-o", tmp_path / (src.stem + ".o")])


def test_planner_needs_no_driver(tmp_path):
    """The planner is pure: planner.c with the statuses (errors.c) and a variant table links with
    no undefined symbol and without the driver file or libdl."""
    build(["gcc", "-std=c11", "-O1", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared", *INCLUDES, CSRC / "planner.c",
           CSRC / "errors.c", FUZZ / "fake_variants.c", "-Wl,--no-undefined", "-o", tmp_path / "libplanner.so"])
    undefined = run(["nm", "-D", "--undefined-only", tmp_path / "libplanner.so"]).stdout
    assert "dlopen" not in undefined and "cu" not in {w[:2] for w in undefined.split()}, undefined
