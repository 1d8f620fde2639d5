"""The installed package as C/C++ users take it: the folders `sgmv --*-dir` print, the
README's pkg-config commands as printed, the examples under examples/ built with
find_package(sgmv CONFIG) and with pkg-config, a moved copy of the package, and the built
programs run (on a GPU: correct results; without one: a clean failure, since there is no driver)."""
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import sgmv
from sgmv import capi

from conftest import HAS_GPU

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TIMEOUT = 60


def sgmv_cli(*args):
    """The installed `sgmv` command (the script beside this interpreter, else `python -m sgmv`)."""
    script = Path(sys.executable).with_name("sgmv")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "sgmv"]
    r = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.strip()


def run(cmd, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=TIMEOUT, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}\n{r.stdout}\n{r.stderr}"
    return r.stdout


@pytest.fixture(scope="module")
def cuda_toolkit(tmp_path_factory):
    """(include dirs, library dir) of the CUDA toolkit, as CMake's FindCUDAToolkit finds it."""
    if not shutil.which("cmake"):
        pytest.skip("cmake is not on PATH")
    src = tmp_path_factory.mktemp("find_cuda")
    (src / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.18)\nproject(find_cuda LANGUAGES C)\nfind_package(CUDAToolkit)\n"
        "if(CUDAToolkit_FOUND)\n  message(STATUS \"INC=${CUDAToolkit_INCLUDE_DIRS}\")\n"
        "  message(STATUS \"LIB=${CUDAToolkit_LIBRARY_DIR}\")\nendif()\n")
    out = run(["cmake", "-S", src, "-B", src / "build"])
    found = dict(line.split("-- ", 1)[1].split("=", 1) for line in out.splitlines()
                 if line.startswith(("-- INC=", "-- LIB=")))
    if not found.get("INC") or not found.get("LIB"):
        pytest.skip("no CUDA toolkit found by CMake's FindCUDAToolkit (the examples need cuda_runtime.h and "
                    "libcudart; put nvcc on PATH or set CUDAToolkit_ROOT)")
    return found["INC"].split(";"), found["LIB"]


def cmake_build(example, build_dir, *defines, target="expand"):
    """Configures examples/<example> out of tree and builds one target; returns the program."""
    run(["cmake", "-S", EXAMPLES / example, "-B", build_dir, *defines])
    run(["cmake", "--build", build_dir, "--target", target])
    exe = build_dir / target
    assert exe.is_file()
    return exe


def check_run(exe, env=None):
    """On a GPU the example must pass; without one it must fail cleanly (no driver): exit 1
    with its message, not a crash or a loader error."""
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=TIMEOUT, env=env)
    out = r.stdout + r.stderr
    if HAS_GPU:
        assert r.returncode == 0 and "expand: ok" in r.stdout, out
    else:
        assert r.returncode == 1 and "expand:" in r.stderr and "failed" in r.stderr.lower(), out


def test_cli_prints_existing_folders():
    folders = {flag: Path(sgmv_cli(flag)) for flag in ("--include-dir", "--lib-dir", "--cmake-dir", "--pkgconfig-dir")}
    assert folders["--include-dir"] == capi.INCLUDE_DIR and (capi.INCLUDE_DIR / "sgmv.h").is_file()
    assert folders["--lib-dir"] == capi.LIB_DIR and capi.LIBRARY.is_file()
    assert folders["--cmake-dir"] == capi.CMAKE_DIR
    assert (capi.CMAKE_DIR / "sgmvConfig.cmake").is_file() and (capi.CMAKE_DIR / "sgmvConfigVersion.cmake").is_file()
    assert folders["--pkgconfig-dir"] == capi.PKGCONFIG_DIR and (capi.PKGCONFIG_DIR / "sgmv.pc").is_file()


def test_readme_pkg_config_commands_build_an_app(tmp_path):
    """The README's pkg-config commands, copied as printed, build and link an app.c in a shell
    (the app only asks the library its version: no GPU or CUDA toolkit needed)."""
    if not shutil.which("pkg-config"):
        pytest.skip("pkg-config is not on PATH (apt-get install pkg-config)")
    script = Path(sys.executable).with_name("sgmv")
    if not script.exists():
        pytest.skip("no `sgmv` command beside this interpreter for the shell to find")
    line, = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("- pkg-config:")]
    commands = re.findall(r"`([^`]+)`", line)
    assert "gcc app.c" in commands[-1], line
    (tmp_path / "app.c").write_text(
        '#include <stdio.h>\n#include "sgmv.h"\n'
        "int main(void) {\n"
        '  printf("libsgmv %d\\n", sgmv_version());\n'
        "  return sgmv_version() != SGMV_VERSION_MAJOR * 10000 + SGMV_VERSION_MINOR * 100 + SGMV_VERSION_PATCH;\n"
        "}\n")
    env = dict(os.environ, PATH=f"{script.parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("PKG_CONFIG_PATH", None)  # the commands must set it themselves
    run(["bash", "-e", "-c", "\n".join(commands)], cwd=tmp_path, env=env)
    # libsgmv found through the rpath that pkg-config gave (it loads without a GPU or driver),
    # the same version as the header the app was compiled with.
    assert run([tmp_path / "a.out"]).startswith("libsgmv ")


def test_ci_runs_the_readme_commands_as_printed():
    """.ci/run must run what a reader copies: the install-and-check and the test commands."""
    commands = [line.strip() for line in (ROOT / "README.md").read_text().splitlines()
                if line.startswith("    python3 -m venv")]
    ci = (ROOT / ".ci" / "run").read_text()
    assert len(commands) == 2 and "sgmv check" in commands[0] and commands[1].endswith("pytest"), commands
    for command in commands:
        assert command in ci, f"{command!r} is not in .ci/run"


@pytest.mark.parametrize("example", ["c", "cpp"])
def test_example_builds_with_cmake(example, cuda_toolkit, tmp_path):
    exe = cmake_build(example, tmp_path / "build", f"-Dsgmv_DIR={sgmv_cli('--cmake-dir')}")
    dyn = run(["readelf", "-d", exe])
    assert "[libsgmv.so.0]" in dyn  # linked by SONAME, not by the file's path


def test_c_example_builds_with_pkg_config(cuda_toolkit, tmp_path):
    if not shutil.which("pkg-config"):
        pytest.skip("pkg-config is not on PATH (apt-get install pkg-config)")
    env = dict(os.environ, PKG_CONFIG_PATH=sgmv_cli("--pkgconfig-dir"))
    assert run(["pkg-config", "--modversion", "sgmv"], env=env).strip() == sgmv.__version__
    flags = run(["pkg-config", "--cflags", "--libs", "sgmv"], env=env).split()
    inc, libdir = cuda_toolkit
    exe = tmp_path / "expand"
    run(["gcc", "-std=c99", "-Wall", "-Wextra", "-Werror", EXAMPLES / "c" / "expand.c", *flags,
         *[f"-I{d}" for d in inc], f"-L{libdir}", "-lcudart", "-lm", "-o", exe])
    # libsgmv comes from the rpath pkg-config gave; libcudart (no rpath here) from the toolkit.
    check_run(exe, env=dict(os.environ, LD_LIBRARY_PATH=libdir))


def test_moved_package_is_found_where_it_lies(tmp_path):
    """Both files compute their paths from their own place: a copy of the package works."""
    if not shutil.which("cmake") or not shutil.which("pkg-config"):
        pytest.skip("needs cmake and pkg-config on PATH")
    moved = tmp_path / "elsewhere" / "sgmv"
    shutil.copytree(capi.INCLUDE_DIR, moved / "include")
    shutil.copytree(capi.LIB_DIR, moved / "lib")
    env = dict(os.environ, PKG_CONFIG_PATH=str(moved / "lib/pkgconfig"))
    pc = run(["pkg-config", "--cflags", "--libs", "sgmv"], env=env)
    assert str(moved / "lib/pkgconfig/../../include") in pc and str(capi.LIB_DIR) not in pc
    src = tmp_path / "src"
    src.mkdir()
    (src / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.18)\nproject(probe LANGUAGES NONE)\n"
        "find_package(sgmv 0.1 CONFIG REQUIRED)\n"
        "get_target_property(loc sgmv::sgmv IMPORTED_LOCATION)\n"
        "get_target_property(inc sgmv::sgmv INTERFACE_INCLUDE_DIRECTORIES)\n"
        "message(STATUS \"LOC=${loc}\")\nmessage(STATUS \"INC=${inc}\")\n"
        "find_package(sgmv 1 CONFIG QUIET)\nmessage(STATUS \"V1=${sgmv_FOUND}\")\n")
    out = run(["cmake", "-S", src, "-B", tmp_path / "build", f"-DCMAKE_PREFIX_PATH={moved}"])
    assert f"-- LOC={moved / 'lib/libsgmv.so.0'}" in out
    assert f"-- INC={moved / 'include'}" in out
    assert "-- V1=0" in out  # SameMajorVersion: 0.x does not satisfy 1


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU: the no-driver path cannot be observed")
@pytest.mark.parametrize("example", ["c", "cpp"])
def test_example_fails_cleanly_without_a_driver(example, cuda_toolkit, tmp_path):
    check_run(cmake_build(example, tmp_path / "build", f"-Dsgmv_DIR={sgmv_cli('--cmake-dir')}"))


@pytest.mark.gpu
@pytest.mark.parametrize("example", ["c", "cpp"])
def test_example_runs_on_gpu(example, cuda_toolkit, tmp_path):
    check_run(cmake_build(example, tmp_path / "build", f"-Dsgmv_DIR={sgmv_cli('--cmake-dir')}"))


@pytest.fixture(scope="module")
def lora_layer(tmp_path_factory):
    """examples/c/lora_layer.c built with CMake as where no CUDA toolkit is installed (hidden from
    find_package here, should this machine have one)."""
    if not shutil.which("cmake"):
        pytest.skip("cmake is not on PATH")
    return cmake_build("c", tmp_path_factory.mktemp("lora_layer") / "build", f"-Dsgmv_DIR={sgmv_cli('--cmake-dir')}",
                       "-DCMAKE_DISABLE_FIND_PACKAGE_CUDAToolkit=ON", target="lora_layer")


def test_lora_layer_example_links_no_cuda_library(lora_layer, tmp_path):
    """It loads libcuda.so.1 itself: built anywhere, loadable anywhere (and warning-free C99)."""
    needed = re.findall(r"\(NEEDED\).*\[(.+)\]", run(["readelf", "-d", lora_layer]))
    assert "libsgmv.so.0" in needed and not [n for n in needed if "cuda" in n], needed
    run(["gcc", "-std=c99", "-Wall", "-Wextra", "-Wpedantic", "-Werror", f"-I{capi.INCLUDE_DIR}", "-c",
         EXAMPLES / "c" / "lora_layer.c", "-o", tmp_path / "lora_layer.o"])


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU: the example would run")
def test_lora_layer_example_without_gpu_exits_2(lora_layer):
    r = subprocess.run([str(lora_layer)], capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 2 and not r.stdout and len(r.stderr.splitlines()) == 1, r
    assert r.stderr.startswith("lora_layer: needs an NVIDIA GPU and its driver: ") and "nothing was run" in r.stderr, r


@pytest.mark.gpu
def test_lora_layer_example_runs_on_gpu(lora_layer):
    r = subprocess.run([str(lora_layer)], capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0 and r.stdout.endswith("lora_layer: ok\n") and not r.stderr, r


PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_version_has_one_source_the_header():
    """pyproject's version is sgmv.h's, through scikit-build-core's regex provider; the package's too."""
    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    rule = PYPROJECT["tool"]["scikit-build"]["metadata"]["version"]
    assert rule["provider"] == "scikit_build_core.metadata.regex" and rule["input"] == "csrc/include/sgmv.h"
    m = re.search(rule["regex"], (ROOT / rule["input"]).read_text(), re.MULTILINE)
    header = [int(re.search(rf"#define SGMV_VERSION_{p} (\d+)", (ROOT / rule["input"]).read_text()).group(1))
              for p in ("MAJOR", "MINOR", "PATCH")]
    assert rule["result"].format(**m.groupdict()) == "{}.{}.{}".format(*header) == sgmv.__version__
    assert not re.search(r"__version__ = ['\"]", (ROOT / "python/sgmv/__init__.py").read_text())


def test_extras_accept_every_triton_from_the_builds_on():
    """The AOT compiler is pinned; the JIT's triton and torch are not (they sit beside an engine's)."""
    from packaging.requirements import Requirement
    assert "triton==3.6.0" in PYPROJECT["build-system"]["requires"]
    for extra in ("jit", "test"):
        reqs = {r.name: r for r in map(Requirement, PYPROJECT["project"]["optional-dependencies"][extra])}
        assert all(reqs["triton"].specifier.contains(v) for v in ("3.6.0", "3.7.1", "3.9.0", "4.0.0")), extra
        assert not reqs["triton"].specifier.contains("3.5.1"), extra
        assert all(reqs["torch"].specifier.contains(v) for v in ("2.4.0", "2.13.0", "2.15.1")), extra


def test_license_and_description():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    description = PYPROJECT["project"]["description"]
    assert "shrink" in description and "expand" in description


def test_readme_names_the_header_where_it_is():
    readme = (ROOT / "README.md").read_text()
    assert "csrc/sgmv.h" not in readme and (ROOT / "csrc/include/sgmv.h").is_file()


def _installed_distribution():
    """The sgmv distribution this sgmv was imported from (a wheel install), else None."""
    try:
        dist = importlib.metadata.distribution("sgmv")
    except importlib.metadata.PackageNotFoundError:
        return None
    init = Path(sgmv.__file__).resolve()
    return dist if any(Path(dist.locate_file(f)).resolve() == init for f in dist.files or ()) else None


def test_wheel_carries_license_summary_and_version():
    """What the built wheel installed: LICENSE among its files, the summary naming shrink and expand,
    the header's version (CI runs the tests on the wheel its README commands install)."""
    dist = _installed_distribution()
    if dist is None:
        pytest.skip("sgmv is imported from the source tree, not from an installed wheel")
    licenses = [f for f in dist.files if f.name == "LICENSE"]
    assert licenses and "Apache License" in licenses[0].read_text(), dist.files
    assert "shrink" in dist.metadata["Summary"] and "expand" in dist.metadata["Summary"], dist.metadata["Summary"]
    assert dist.version == sgmv.__version__
