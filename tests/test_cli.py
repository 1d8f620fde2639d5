"""`sgmv check`, `sgmv bench` and the Python examples as a user meets them, each in its
own process: what `sgmv check` says on a machine without a GPU, a wrong result caught under
`python -O` (which strips every `assert`), and the one-line refusals when torch or a GPU is missing."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HAS_GPU

TIMEOUT = 600
# sgmv check chooses the interpreter itself: run it as a user would, without the tests' setting.
USER_ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
NO_TORCH = "import sys; sys.modules['torch'] = None  # `import torch` now raises ImportError\n"
WRONG_REFERENCE = """\
import sgmv.reference
def wrong(real):
    def call(*args, **kw):
        real(*args, **kw)
        args[2].add_(1)  # every element of the output view off by one
    return call
sgmv.reference.sgmv_expand = wrong(sgmv.reference.sgmv_expand)
sgmv.reference.sgmv_shrink = wrong(sgmv.reference.sgmv_shrink)
"""


def sgmv(tmp_path, *args, prelude="", python_flags=()):
    """Runs `sgmv ARGS` in a fresh interpreter after `prelude` (a change to what the user has)."""
    driver = tmp_path / "driver.py"
    driver.write_text(prelude + "import sys\nfrom sgmv.__main__ import main\nsys.exit(main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, *python_flags, str(driver), *args], capture_output=True, text=True,
                       timeout=TIMEOUT, env=USER_ENV)
    return r.returncode, r.stdout + r.stderr


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU: sgmv check runs everything here")
def test_check_without_gpu_says_what_it_did_not_check(tmp_path):
    rc, out = sgmv(tmp_path, "check")
    lines = out.strip().splitlines()
    assert rc == 0, out
    assert "Traceback" not in out and "all passed" not in out, out
    assert "libsgmv.so's kernels are NOT launched here" in out and "interpreter" in out, out
    assert "interp time" in out, out  # the time column is not a GPU time
    assert "err/tol" in out and "rel err" not in out, out  # the column is a fraction of the tolerance
    assert "AOT vs JIT: not compared here" in out, out
    assert lines[-1].startswith("check: passed what this machine can run"), out
    assert "not checked: libsgmv.so's kernel launches" in lines[-1] and "bfloat16" in lines[-1], out
    rows = [line for line in lines if line.split()[1:2] in (["reference"], ["jit"])]
    assert rows and all(line.endswith(" ok") or "not checked" in line for line in rows), out
    assert not any(line.split()[1] == "aot" for line in rows), out


@pytest.mark.gpu
def test_check_on_gpu_passes_every_path(tmp_path):
    rc, out = sgmv(tmp_path, "check")
    assert rc == 0 and out.strip().splitlines()[-1] == "check: all passed", out
    assert " aot " in out and "not checked" not in out, out


def test_check_fails_on_a_wrong_result_under_python_O(tmp_path):
    rc, out = sgmv(tmp_path, "check", prelude=WRONG_REFERENCE, python_flags=["-O"])
    rows = [line for line in out.splitlines() if line.split()[1:2] in (["reference"], ["jit"])]
    assert rc == 1 and out.strip().splitlines()[-1] == "check: FAILED", out
    assert all("FAILED" in line for line in rows if line.split()[1] == "reference"), out
    assert all("FAILED" not in line for line in rows if line.split()[1] == "jit"), out


def test_check_without_torch_names_a_command_that_works_from_a_checkout(tmp_path):
    rc, out = sgmv(tmp_path, "check", prelude=NO_TORCH)
    assert rc == 2 and "Traceback" not in out, out
    assert 'pip install torch "triton>=3.6" "numpy<2.4"' in out and "sgmv[jit]" not in out, out


@pytest.mark.parametrize("suites", [[], ["--suite", "shrink", "qkv", "ranks"]], ids=["default", "new-suites"])
@pytest.mark.parametrize("prelude", ["", NO_TORCH], ids=["with-torch", "without-torch"])
def test_bench_without_gpu_or_torch_refuses_in_one_line(tmp_path, prelude, suites):
    if HAS_GPU and not prelude:
        pytest.skip("this machine has a GPU: sgmv bench would run")
    rc, out = sgmv(tmp_path, "bench", "--out", str(tmp_path / "bench"), *suites, prelude=prelude)
    assert rc == 2 and len(out.strip().splitlines()) == 1 and "Traceback" not in out, out
    assert "GPU" in out, out


def example(name):
    """Runs examples/<name> as `python examples/<name>`."""
    path = Path(__file__).resolve().parent.parent / "examples" / name
    return subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=TIMEOUT, env=USER_ENV)


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU: the example would run")
def test_tensor_parallel_example_without_gpu_exits_2():
    r = example("tensor_parallel.py")
    assert r.returncode == 2 and "needs at least one CUDA GPU" in r.stderr and "ok" not in r.stdout, r


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU: the example would run")
def test_lora_layer_example_without_gpu_exits_2():
    r = example("lora_layer.py")
    assert r.returncode == 2 and not r.stdout and len(r.stderr.splitlines()) == 1, r
    assert r.stderr.startswith("lora_layer: needs a CUDA GPU") and "nothing was run" in r.stderr, r


@pytest.mark.gpu
def test_lora_layer_example_runs_on_gpu():
    r = example("lora_layer.py")
    assert r.returncode == 0 and r.stdout.endswith("lora_layer: ok\n"), r


def test_check_error_path_reaches_the_rank_check():
    """`sgmv check`'s C error-path call: every argument valid (fake aligned pointers) but the rank,
    so the library's refusal names the rank, not a NULL pointer or a dtype."""
    from sgmv.__main__ import _check_error_path
    ok, msg = _check_error_path()
    assert ok and "rank" in msg, msg


NO_TORCH_IMPORTED = ("import sys\nbad = [m for m in ('torch', 'triton') if m in sys.modules]\n"
                     "sys.exit(f'imported {bad}' if bad else 0)\n")


@pytest.mark.parametrize("flag", ["--version", "--include-dir", "--lib-dir", "--cmake-dir", "--pkgconfig-dir"])
def test_path_commands_import_neither_torch_nor_triton(tmp_path, flag):
    """The commands a C build runs: quick, so without torch or triton (both installed here)."""
    driver = tmp_path / "driver.py"
    driver.write_text("import sys\nfrom sgmv.__main__ import main\nrc = main(sys.argv[1:])\n" + NO_TORCH_IMPORTED)
    r = subprocess.run([sys.executable, str(driver), flag], capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0 and r.stdout.strip(), r.stdout + r.stderr


def test_version_prints_both_versions(tmp_path):
    from sgmv import __version__
    rc, out = sgmv(tmp_path, "--version")
    assert rc == 0 and out.startswith(f"sgmv {__version__} (python), libsgmv {__version__} at "), out
