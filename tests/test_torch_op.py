"""torch.ops.sgmv.expand and batch_plan: registered by importing sgmv (not by every torch start-up),
traceable with fake tensors, and on a GPU compiled by torch.compile without a graph break and
captured in a CUDA graph."""
import subprocess
import sys

import pytest
import torch

from sgmv.testing import Case, build, check, expected


def test_importing_sgmv_registers_the_ops_and_torch_alone_does_not():
    code = ("import torch\ntry:\n    torch.ops.sgmv.expand\n    print('before: yes')\nexcept (AttributeError, "
            "RuntimeError):\n    print('before: no')\nimport sgmv\nprint(torch.ops.sgmv.expand, torch.ops.sgmv.batch_plan)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "before: no" in r.stdout and "sgmv.expand" in r.stdout and "sgmv.batch_plan" in r.stdout, r.stdout


def test_fake_tensors_trace():
    import sgmv.torch_ops  # noqa: F401
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(8, 16, dtype=torch.bfloat16, device="cuda")
        w = torch.empty(2, 64, 16, dtype=torch.bfloat16, device="cuda")
        out = torch.empty(8, 64, dtype=torch.bfloat16, device="cuda")
        meta = torch.empty(2, dtype=torch.int32, device="cuda")
        assert torch.ops.sgmv.expand(x, w, out, meta, meta, meta, 2, 4, True) is None


def _case():
    return Case("op", 16, 4096, [30, 1, 0, 12], [1, 0, 2, -1], 3, "bf16", torch.int32, True, seed=500)


@pytest.mark.gpu
def test_compiles_without_graph_break_and_matches():
    import sgmv.torch_ops  # noqa: F401
    args, buf = build(_case(), "cuda")
    before = buf.clone()
    exp, written = expected(args)

    def layer(x, w, out, s, n, i):
        torch.ops.sgmv.expand(x, w, out, s, n, i, args[6], args[7], True)
        return out * 1  # something after the op, in the same graph

    compiled = torch.compile(layer, fullgraph=True)  # fullgraph: a graph break is an error
    res = compiled(*args[:6])
    torch.cuda.synchronize()
    check(args, before, buf, exp, written, "torch.compile")
    assert torch.equal(res, args[2])


@pytest.mark.gpu
def test_opcheck():
    import sgmv.torch_ops  # noqa: F401
    args, _ = build(_case(), "cuda")
    torch.library.opcheck(torch.ops.sgmv.expand.default, args)


@pytest.mark.gpu
def test_cuda_graph_replay_after_metadata_changes():
    """Captured once; the segment table's contents change between replays; each replay is right."""
    import sgmv.torch_ops  # noqa: F401
    args, buf = build(_case(), "cuda")
    x, w, out, starts, lens, idx, batches, max_len, add = args
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.ops.sgmv.expand(x, w, out, starts, lens, idx, batches, 64, add)  # warm-up (loads the module)
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        torch.ops.sgmv.expand(x, w, out, starts, lens, idx, batches, 64, add)
    for new_lens, new_idx in (([10, 5, 3, 20], [2, 2, 0, 1]), ([0, 30, 0, 13], [0, 1, -1, 2])):
        lens.copy_(torch.tensor(new_lens, dtype=lens.dtype))
        idx.copy_(torch.tensor(new_idx, dtype=idx.dtype))
        starts.copy_(torch.tensor([0, 10, 35, 40], dtype=starts.dtype))
        before = buf.clone()
        exp, written = expected(args)
        g.replay()
        torch.cuda.synchronize()
        check(args, before, buf, exp, written, f"graph replay lens={new_lens}")
