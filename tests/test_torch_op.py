"""torch.ops.sgmv.shrink, expand and batch_plan: registered by importing sgmv (not by every torch
start-up), with the schemas of the API; traceable with fake and meta tensors, so torch.compile takes
a LoRA layer's step in one graph; the op bodies hand their arguments to the binding and bump the
version of what they write. On a GPU: opcheck, torch.compile and CUDA graph replay, every written
element against sgmv.reference and every other element bitwise unchanged."""
import subprocess
import sys

import pytest
import torch

import sgmv
from sgmv import binding, torch_ops
from sgmv.testing import TOL


def test_importing_sgmv_registers_the_ops_and_torch_alone_does_not():
    code = ("import torch\ntry:\n    torch.ops.sgmv.expand\n    print('before: yes')\nexcept (AttributeError, "
            "RuntimeError):\n    print('before: no')\nimport sgmv\n"
            "print(torch.ops.sgmv.shrink, torch.ops.sgmv.expand, torch.ops.sgmv.batch_plan)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "before: no" in r.stdout, r.stdout
    assert all(f"sgmv.{op}" in r.stdout for op in ("shrink", "expand", "batch_plan")), r.stdout


def _run(code):
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.split()


def test_import_sgmv_imports_neither_torch_nor_triton():
    assert _run("import sgmv, sys; print('torch' in sys.modules, 'triton' in sys.modules)") == ["False", "False"]


@pytest.mark.parametrize("order", ["import sgmv, torch", "import torch, sgmv", "import sgmv; import torch.nn"])
def test_ops_registered_whichever_is_imported_first(order):
    """The rule: the ops exist once both sgmv and torch are imported, in either order."""
    assert _run(f"{order}\nimport torch\nprint(torch.ops.sgmv.expand, torch.ops.sgmv.shrink, "
                "torch.ops.sgmv.batch_plan)") == ["sgmv.expand", "sgmv.shrink", "sgmv.batch_plan"]


def test_torch_hook_leaves_meta_path_after_torch_is_imported():
    assert _run("import sys, sgmv\nn = len(sys.meta_path)\nimport torch\nprint(n - len(sys.meta_path))") == ["1"]


def _positional(params):
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


@pytest.mark.parametrize("other", ["reference", "jit"])
def test_expand_positional_parameters_agree(other):
    """sgmv.sgmv_expand, sgmv.jit.sgmv_expand and sgmv.reference.sgmv_expand take the same
    positional parameters (stream and the rest keyword only), and torch.ops.sgmv.expand's
    positional arguments start with them: a positional call means the same through each."""
    import inspect
    import importlib
    mod = importlib.import_module(f"sgmv.{other}")
    aot = _positional(inspect.signature(sgmv.sgmv_expand).parameters.values())
    assert aot[8:] == ["add_inputs", "batch_plan"] and "stream" not in aot
    assert _positional(inspect.signature(mod.sgmv_expand).parameters.values()) == aot
    schema = [a for a in torch.ops.sgmv.expand.default._schema.arguments if not a.kwarg_only]
    # the op names its tensors for the schema (weights, output, ...); from batches on, the same names
    assert [a.name for a in schema][6:len(aot)] == aot[6:] and len(schema) >= len(aot)


# (name, default or REQUIRED, written by the op), in schema order, as API.md gives them.
REQUIRED = object()
SCHEMAS = {
    "shrink": [("inputs", REQUIRED, False), ("weights", REQUIRED, False), ("output", REQUIRED, True),
               ("seq_start", REQUIRED, False), ("seq_len", REQUIRED, False), ("lora_indices", REQUIRED, False),
               ("batches", REQUIRED, False), ("max_seq_length", REQUIRED, False), ("scaling", 1.0, False),
               ("lora_ranks", None, False), ("lora_scales", None, False), ("batch_plan", None, False),
               ("workspace", None, True), ("slice_weights", None, False), ("weight_scales", None, False)],
    "expand": [("inputs", REQUIRED, False), ("weights", REQUIRED, False), ("output", REQUIRED, True),
               ("seq_start", REQUIRED, False), ("seq_len", REQUIRED, False), ("lora_indices", REQUIRED, False),
               ("batches", REQUIRED, False), ("max_seq_length", REQUIRED, False), ("add_inputs", REQUIRED, False),
               ("batch_plan", None, False), ("lora_ranks", None, False), ("slice_weights", None, False),
               ("weight_scales", None, False)],
    "batch_plan": [("seq_start", REQUIRED, False), ("seq_len", REQUIRED, False), ("lora_indices", REQUIRED, False),
                   ("batches", REQUIRED, False), ("total_tokens", REQUIRED, False), ("num_loras", REQUIRED, False),
                   ("plan", REQUIRED, True)],
}


@pytest.mark.parametrize("name", SCHEMAS)
def test_schema(name):
    """Argument order and defaults as documented; only the output (and shrink's workspace) marked
    written, which is what makes torch.compile functionalize the call; nothing returned."""
    schema = getattr(torch.ops.sgmv, name).default._schema
    got = [(a.name, a.default_value if a.has_default_value() else REQUIRED,
            a.alias_info is not None and a.alias_info.is_write) for a in schema.arguments]
    assert got == SCHEMAS[name], str(schema)
    assert len(schema.returns) == 0, str(schema)


def _meta(device):
    """A fused 3-slice LoRA layer's tensors on `device` (contents irrelevant: fake or meta)."""
    T, H, R, L = 12, 64, 8, 3
    e = dict(device=device)
    return dict(
        x=torch.empty(T, H, dtype=torch.float16, **e),
        a=[torch.empty(L, R, H, dtype=torch.float16, **e) for _ in range(3)],
        b=[torch.empty(L, h, R, dtype=torch.float16, **e) for h in (32, 16, 16)],
        y=torch.empty(T, 3 * R, dtype=torch.float32, **e), out=torch.empty(T, 64, dtype=torch.float16, **e),
        y1=torch.empty(T, R, dtype=torch.float32, **e), out1=torch.empty(T, 32, dtype=torch.float16, **e),
        meta=[torch.empty(4, dtype=torch.int32, **e) for _ in range(3)],
        ranks=torch.empty(L, dtype=torch.int32, **e), scales=torch.empty(L, dtype=torch.float32, **e),
        plan=torch.empty(256, dtype=torch.int32, **e), workspace=torch.empty(256, dtype=torch.float32, **e))


def test_fake_tensors_trace():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        t = _meta("cuda")
        x, a, b, y, out, plan = t["x"], t["a"], t["b"], t["y"], t["out"], t["plan"]
        assert torch.ops.sgmv.batch_plan(*t["meta"], 4, 12, 3, plan) is None
        assert torch.ops.sgmv.shrink(x, a[0], t["y1"], *t["meta"], 4, 5) is None
        assert torch.ops.sgmv.shrink(x, a[0], y, *t["meta"], 4, 5, 0.5, t["ranks"], t["scales"], plan,
                                     t["workspace"], a[1:]) is None
        assert torch.ops.sgmv.expand(t["y1"], b[0], t["out1"], *t["meta"], 4, 5, True) is None
        assert torch.ops.sgmv.expand(y, b[0], out, *t["meta"], 4, 5, False, plan, t["ranks"], b[1:]) is None
        assert out.shape == (12, 64) and y.shape == (12, 24)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_fullgraph_on_meta_tensors(dynamic):
    """A layer's step (plan, shrink, expand, then an ordinary op) is one graph: fullgraph makes a
    break an error; aot_eager functionalizes it by the schemas' write marks. Meta tensors run the
    fake kernels, so no GPU is needed."""
    from torch._dynamo.backends.registry import lookup_backend
    t = _meta("meta")
    a, b, ranks, scales = t["a"], t["b"], t["ranks"], t["scales"]
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    def step(x, out, starts, lens, idx):
        plan = torch.empty(256, dtype=torch.int32, device=x.device)
        torch.ops.sgmv.batch_plan(starts, lens, idx, 4, x.shape[0], 3, plan)
        y = torch.empty(x.shape[0], 24, dtype=torch.float32, device=x.device)
        torch.ops.sgmv.shrink(x, a[0], y, starts, lens, idx, 4, 5, 0.5, ranks, scales, plan, None, a[1:])
        torch.ops.sgmv.expand(y, b[0], out, starts, lens, idx, 4, 5, True, plan, ranks, b[1:])
        return out * 2, y

    res, y = torch.compile(step, fullgraph=True, dynamic=dynamic, backend=backend)(t["x"], t["out"], *t["meta"])
    assert (res.shape, res.dtype, y.shape, y.dtype) == ((12, 64), torch.float16, (12, 24), torch.float32)
    ops = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    sgmv_ops = [op for op in ops if str(op).startswith("sgmv.")]
    assert sgmv_ops == [torch.ops.sgmv.batch_plan, torch.ops.sgmv.shrink, torch.ops.sgmv.expand], ops


def test_op_bodies_forward_to_the_binding_and_bump_versions(monkeypatch):
    """The CUDA kernels' bodies, registered for the CPU here with the binding recorded instead of
    called: each forwards its arguments (the slices as one tuple) and bumps the version counter of
    what it wrote, as autograd expects of an in-place op."""
    calls = []
    for name in ("sgmv_shrink", "sgmv_expand", "batch_plan"):
        monkeypatch.setattr(binding, name, lambda *args, _name=name, **kwargs: calls.append((_name, args, kwargs)),
                            raising=False)
    t = _meta("cpu")
    x, a, b, y, out, plan, ws, ranks, scales = (t[k] for k in ("x", "a", "b", "y", "out", "plan", "workspace",
                                                               "ranks", "scales"))
    meta = t["meta"]
    y1, out1 = t["y1"], t["out1"]
    lib = torch.library.Library("sgmv", "IMPL")
    try:
        for name in ("shrink", "expand", "batch_plan"):
            lib.impl(name, getattr(torch_ops, name), "CPU")
        versions = [v._version for v in (y, out, plan, ws, y1, out1)]
        torch.ops.sgmv.batch_plan(*meta, 4, 12, 3, plan)
        torch.ops.sgmv.shrink(x, a[0], y, *meta, 4, 5, 0.5, ranks, scales, plan, ws, a[1:])
        torch.ops.sgmv.expand(y, b[0], out, *meta, 4, 5, True, plan, ranks, b[1:])
        torch.ops.sgmv.shrink(x, a[0], y1, *meta, 4, 5)
        torch.ops.sgmv.expand(y1, b[0], out1, *meta, 4, 5, False)
        assert [v._version - n for v, n in zip((y, out, plan, ws, y1, out1), versions)] == [1, 1, 1, 1, 1, 1]
    finally:
        lib._destroy()

    expect = [
        ("batch_plan", (*meta, 4, 12, 3), dict(out=plan)),
        ("sgmv_shrink", (x, tuple(a), y, *meta, 4, 5, 0.5),
         dict(lora_ranks=ranks, lora_scales=scales, batch_plan=plan, workspace=ws, weight_scales=None)),
        ("sgmv_expand", (y, tuple(b), out, *meta, 4, 5, True, plan), dict(lora_ranks=ranks, weight_scales=None)),
        ("sgmv_shrink", (x, a[0], y1, *meta, 4, 5, 1.0),
         dict(lora_ranks=None, lora_scales=None, batch_plan=None, workspace=None, weight_scales=None)),
        ("sgmv_expand", (y1, b[0], out1, *meta, 4, 5, False, None), dict(lora_ranks=None, weight_scales=None)),
    ]

    def same(got, want):  # tensors by identity, the slices' tuple element by element
        if isinstance(want, tuple):
            return isinstance(got, tuple) and len(got) == len(want) and all(map(same, got, want))
        return got is want if isinstance(want, torch.Tensor) or want is None else got == want

    assert [c[0] for c in calls] == [e[0] for e in expect]
    for (name, args, kwargs), (_, want_args, want_kwargs) in zip(calls, expect):
        assert same(args, want_args) and kwargs.keys() == want_kwargs.keys(), name
        assert all(same(kwargs[k], want_kwargs[k]) for k in kwargs), name


# ---- on a GPU -------------------------------------------------------------------------------------

def _bits(t):
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _check(what, got, before, want, written):
    """Every element of `written` within TOL of `want` (the reference); every other one bitwise `before`."""
    got, before, want, written = got.cpu(), before.cpu(), want.cpu().double(), written.cpu()
    changed = (_bits(got) != _bits(before)) & ~written
    assert not changed.any(), f"{what}: {int(changed.sum())} elements outside the written part changed, " \
                              f"first at {changed.nonzero()[0].tolist()}"
    assert written.any(), f"{what}: the case writes nothing"
    atol, rtol = TOL[got.dtype]
    g, w = got.double()[written], want[written]
    bad = ~((g - w).abs() <= atol + rtol * w.abs())  # NaN fails
    assert not bad.any(), f"{what}: {int(bad.sum())} of {bad.numel()} written elements wrong, first: got " \
                          f"{g[bad][0].item()!r}, reference {w[bad][0].item()!r}"


class Layer:
    """A fused 3-slice LoRA layer (QKV-like: slices of output widths 256, 64, 64) on the GPU, bf16,
    with per-adapter ranks and scales; fresh random data from `seed`. The metadata include a zero-length
    segment, index -1, an index past num_loras, an adapter of rank 0 (skipped), one of rank 5 < R
    and one of rank 40 > R (all R columns), and trailing rows no segment covers. |scaling * scale| <= 1
    keeps y (fp32, a sum of 4096 products) within fp32's tolerance of the reference's own sum."""
    T, H, R, L, OUTS = 32, 4096, 16, 4, (256, 64, 64)

    def __init__(self, seed):
        g = torch.Generator().manual_seed(seed)
        dt = torch.bfloat16

        def rand(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g) * scale).to(dt).cuda()

        self.x = rand(self.T, self.H)
        self.a = [rand(self.L, self.R, self.H, scale=self.H ** -0.5) for _ in self.OUTS]
        self.b = [rand(self.L, h, self.R, scale=self.R ** -0.5) for h in self.OUTS]
        self.y = torch.full((self.T, 3 * self.R), float("nan"), device="cuda")  # shrink writes: NaN poison
        # expand adds: random old values (they matter), in a wider buffer whose outer columns must stay
        self.buf = torch.randn(self.T, sum(self.OUTS) + 6, generator=g).to(dt).cuda()
        self.out = self.buf[:, 3:3 + sum(self.OUTS)]
        i32 = dict(dtype=torch.int32, device="cuda")
        self.starts, self.lens, self.idx = (torch.empty(6, **i32) for _ in range(3))
        self.ranks, self.scales = torch.empty(self.L, **i32), torch.empty(self.L, device="cuda")
        self.plan = torch.empty(sgmv.batch_plan_bytes(6, self.T) // 4, **i32)
        self.set_meta([0, 7, 7, 10, 22, 23], [7, 0, 3, 12, 1, 5], [1, 0, -1, 3, 2, 9], [16, 5, 0, 40],
                      [0.5, 1.0, 0.75, -0.5])

    def set_meta(self, starts, lens, idx, ranks, scales):
        for t, v in ((self.starts, starts), (self.lens, lens), (self.idx, idx), (self.ranks, ranks),
                     (self.scales, scales)):
            t.copy_(torch.tensor(v, dtype=t.dtype))

    def written(self):
        """Masks of what shrink writes in y and expand in out, from the metadata alone."""
        ys, outs = torch.zeros(self.y.shape, dtype=torch.bool), torch.zeros(self.out.shape, dtype=torch.bool)
        ranks = self.ranks.tolist()
        for s, n, i in zip(self.starts.tolist(), self.lens.tolist(), self.idx.tolist()):
            r = min(ranks[i], self.R) if 0 <= i < self.L else 0
            if s < 0 or n <= 0 or r <= 0:
                continue
            for k in range(len(self.OUTS)):
                ys[s:s + n, k * self.R:k * self.R + r] = True
            outs[s:s + n] = True
        return ys, outs

    def step(self, scaling):
        """batch_plan, shrink (workspace from the binding) and expand through torch.ops, as a model's
        layer makes them."""
        meta = (self.starts, self.lens, self.idx)
        torch.ops.sgmv.batch_plan(*meta, 6, self.T, self.L, self.plan)
        torch.ops.sgmv.shrink(self.x, self.a[0], self.y, *meta, 6, self.T, scaling, self.ranks, self.scales,
                              self.plan, None, self.a[1:])
        torch.ops.sgmv.expand(self.y, self.b[0], self.out, *meta, 6, self.T, True, self.plan, self.ranks,
                              self.b[1:])

    def check(self, y_before, buf_before, scaling, what):
        """y against sgmv.reference's shrink; out against its expand of the y the op wrote (so each
        op is held to its own tolerance). Unwritten y elements (NaN) become 0 for the reference:
        expand must not read them, which the kernel's own NaN input checks."""
        import sgmv.reference
        ys, outs = self.written()
        meta = (self.starts, self.lens, self.idx)
        want_y = y_before.clone()
        sgmv.reference.sgmv_shrink(self.x, tuple(self.a), want_y, *meta, 6, self.T, scaling, lora_ranks=self.ranks,
                                   lora_scales=self.scales)
        _check(f"{what}: shrink", self.y, y_before, want_y, ys)
        y_read = torch.where(ys.cuda(), self.y, 0.0)
        want_out = buf_before[:, 3:3 + self.out.shape[1]].clone()
        sgmv.reference.sgmv_expand(y_read, tuple(self.b), want_out, *meta, 6, self.T, add_inputs=True,
                                   lora_ranks=self.ranks)
        want = buf_before.clone()
        want[:, 3:3 + self.out.shape[1]] = want_out
        written = torch.zeros(self.buf.shape, dtype=torch.bool)
        written[:, 3:3 + self.out.shape[1]] = outs
        _check(f"{what}: expand", self.buf, buf_before, want, written)


@pytest.mark.gpu
@pytest.mark.parametrize("op,make", [
    ("shrink", lambda l: (l.x, l.a[0], l.y[:, :l.R], l.starts, l.lens, l.idx, 6, l.T)),
    ("shrink", lambda l: (l.x, l.a[0], l.y, l.starts, l.lens, l.idx, 6, l.T, 0.5, l.ranks, l.scales, l.plan,
                          torch.empty(sgmv.shrink_workspace_bytes(l.T, 3 * l.R) // 4, device="cuda"),
                          l.a[1:])),
    ("expand", lambda l: (l.y[:, :l.R], l.b[0], l.out[:, :256], l.starts, l.lens, l.idx, 6, l.T,
                          False)),
    ("expand", lambda l: (l.y, l.b[0], l.out, l.starts, l.lens, l.idx, 6, l.T, True, l.plan,
                          l.ranks, l.b[1:])),
    ("batch_plan", lambda l: (l.starts, l.lens, l.idx, 6, l.T, l.L, l.plan)),
], ids=["shrink", "shrink-slices-ranks-scales-plan-workspace", "expand", "expand-slices-ranks-plan", "batch_plan"])
def test_opcheck(op, make):
    layer = Layer(seed=700)
    layer.y.normal_()  # opcheck compares runs: no NaN poison here (the other tests check untouched elements)
    if op != "batch_plan":  # a plan built from the metadata, for the calls that pass one
        sgmv.batch_plan(layer.starts, layer.lens, layer.idx, 6, layer.T, layer.L, out=layer.plan)
    torch.library.opcheck(getattr(torch.ops.sgmv, op).default, make(layer))


@pytest.mark.gpu
def test_compiled_layer_step_matches_the_reference():
    """torch.compile, fullgraph, of plan + shrink + expand and an op after them."""
    layer = Layer(seed=701)
    y_before, buf_before = layer.y.clone(), layer.buf.clone()

    def step(x, y, out, starts, lens, idx, ranks, scales, plan):
        torch.ops.sgmv.batch_plan(starts, lens, idx, 6, x.shape[0], layer.L, plan)
        torch.ops.sgmv.shrink(x, layer.a[0], y, starts, lens, idx, 6, layer.T, 0.25, ranks, scales, plan, None,
                              layer.a[1:])
        torch.ops.sgmv.expand(y, layer.b[0], out, starts, lens, idx, 6, layer.T, True, plan, ranks, layer.b[1:])
        return out * 1  # something after the ops, in the same graph

    compiled = torch.compile(step, fullgraph=True)  # fullgraph: a graph break is an error
    res = compiled(layer.x, layer.y, layer.out, layer.starts, layer.lens, layer.idx, layer.ranks, layer.scales,
                   layer.plan)
    torch.cuda.synchronize()
    layer.check(y_before, buf_before, 0.25, "torch.compile")
    assert torch.equal(res, layer.out)


@pytest.mark.gpu
def test_cuda_graph_replay_after_metadata_changes():
    """Captured once (the binding takes shrink's split-K workspace inside the capture); the metadata,
    ranks and scales change between replays, the outputs are poisoned again; each replay is right."""
    layer = Layer(seed=702)
    assert sgmv.shrink_workspace_bytes(layer.T, 3 * layer.R) > 0, "the case is meant to split shrink over hidden"
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        layer.step(0.5)  # warm-up: loads the modules outside the capture
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        layer.step(0.5)
    gen = torch.Generator().manual_seed(703)
    for starts, lens, idx, ranks, scales in (
            ([0, 10, 15, 18, 30, 31], [10, 5, 3, 12, 1, 0], [2, 2, 0, 1, 3, -1], [16, 16, 3, 1],
             [1.0, 0.5, -0.25, 0.75]),
            ([5, 0, 20, 25, 26, 4], [15, 4, 0, 1, 6, 1], [0, 1, -1, 3, 1, 2], [0, 9, 16, 16], [0.5, 1.0, -1.0, 0.25]),
    ):
        layer.set_meta(starts, lens, idx, ranks, scales)
        layer.y.fill_(float("nan"))
        layer.buf.copy_(torch.randn(layer.buf.shape, generator=gen).to(layer.buf.dtype))
        y_before, buf_before = layer.y.clone(), layer.buf.clone()
        g.replay()
        torch.cuda.synchronize()
        layer.check(y_before, buf_before, 0.5, f"graph replay lens={lens}")
