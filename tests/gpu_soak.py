#!/usr/bin/env python3
"""A soak of libsgmv on a GPU: randomized calls (expand, shrink and the layer call with segments or a
per-token mapping, fp16/bf16, decode/prefill/mixed layouts, plan or not, 1 to 3 slices, per-adapter
ranks and scales, split-K, int32/int64 metadata, torch ops) from several host threads sharing 2 CUDA streams, with bad arguments mixed in (each must
raise sgmv.SgmvError, ValueError or TypeError), 1 call in --sample checked against float64 (the
buffer reset, the call, a stream sync), and CUDA graphs (plan + shrink + expand) replayed from the
main thread with the metadata changed in place in between, checked each time. Host RSS and GPU
memory (torch.cuda.memory_allocated, mem_get_info, cuMemGetInfo) at the start, after a warm-up and
at the end. Last line: `soak: {json}`; exit 0 only if failures == 0 and nothing grew.

    python tests/gpu_soak.py [--calls 100000] [--threads 4] [--streams 2] [--sample 200]
    python tests/gpu_soak.py --dry --calls 400      # CPU: sgmv.reference instead of the library
"""
import argparse
import ctypes
import gc
import json
import random
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))  # noqa: E402
import sgmv  # noqa: E402
import sgmv.reference  # noqa: E402
from sgmv.testing import LayerCase, LoraCase, build_layer, build_lora, check, expected_layer, expected_lora  # noqa: E402

LAYOUTS = {"decode": lambda r: [1] * r.randint(1, 24), "prefill": lambda r: [r.randint(8, 40) for _ in range(r.randint(1, 3))],
           "mixed": lambda r: [r.randint(5, 30)] + [1] * r.randint(1, 12)}


def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return -1.0


def gpu_mem(dry):
    if dry:
        return {}
    free, total = torch.cuda.mem_get_info()
    f, t = ctypes.c_size_t(), ctypes.c_size_t()
    try:
        ctypes.CDLL("libcuda.so.1").cuMemGetInfo_v2(ctypes.byref(f), ctypes.byref(t))
    except OSError:
        pass
    return {"allocated_mib": torch.cuda.memory_allocated() / 2**20, "reserved_mib": torch.cuda.memory_reserved() / 2**20,
            "used_mib": (total - free) / 2**20, "cu_used_mib": (t.value - f.value) / 2**20}


def snapshot(dry):
    gc.collect()
    if not dry:
        torch.cuda.synchronize()
    return dict(rss_mib=rss_mib(), **gpu_mem(dry))


class Problem:
    """One call's tensors, made once: the call is re-run many times, sampled runs start from `before`."""

    def __init__(self, rng, device, seed):
        op = rng.choice(("expand", "shrink", "layer"))
        layout = rng.choice(list(LAYOUTS))
        lens = LAYOUTS[layout](rng)
        L = rng.randint(1, 4)
        idx = [rng.randrange(-1, L) for _ in lens]
        idx[0] = 0
        rank = rng.choice((8, 16, 7, 32))
        slices = rng.randint(1, 3)
        wd = rng.choice(("fp16", "bf16"))
        ranks = [rng.choice((rank, max(1, rank // 2), 0)) for _ in range(L)] if rng.random() < 0.3 else None
        if ranks:
            ranks[0] = rank
        self.op = op
        if op == "layer":  # the layer call: a Step (segments or per-token) and a Layer of 1 to 3 slices
            c = LayerCase("soak-layer", rng.choice((64, 256, 1024)), rank, tuple(rng.choice((64, 128, 96))
                                                                               for _ in range(slices)),
                          lens, idx, L, dtype=wd, fp32_out=rng.random() < 0.3,
                          meta=rng.choice((torch.int32, torch.int64)), per_token=rng.random() < 0.5, ranks=ranks,
                          scales=rng.random() < 0.3, add_inputs=rng.random() < 0.7, out_slice=rng.random() < 0.3,
                          seed=seed)
            if device == "cpu" and wd == "bf16":
                c.dtype = "fp16"
            self.case = c
            self.layer, self.step, self.x, self.out, self.buf, rows = build_layer(c, device)
            self.before = self.buf.clone()
            pad = (self.buf.shape[1] - self.out.shape[1]) // 2
            self.exp, self.written, self.slack = expected_layer(c, self.layer, self.x,
                                                                self.before[:, pad:pad + self.out.shape[1]], rows)
            self.args = (self.x, None, self.out)
            return
        if op == "expand":
            hiddens = [rng.choice((64, 128, 96, 40)) for _ in range(slices)]
            dt = rng.choice((wd, f"fp32in-{wd}", f"{wd}-fp32out"))
            c = LoraCase("soak", op, rank, hiddens, lens, idx, L, dt, rng.choice((torch.int32, torch.int64)),
                         add_inputs=rng.random() < 0.5, lora_ranks=ranks, seed=seed)
        else:
            hidden = rng.choice((64, 256, 1024, 2048))
            c = LoraCase("soak", op, rank, [hidden] * slices, lens, idx, L, rng.choice((wd, f"{wd}-fp32out")),
                         rng.choice((torch.int32, torch.int64)), scaling=rng.choice((1.0, 0.5)), lora_ranks=ranks,
                         lora_scales=[rng.uniform(-1, 1) for _ in range(L)] if rng.random() < 0.3 else None, seed=seed)
        self.op, self.case = op, c
        self.args, self.kw, self.buf = build_lora(c, device)
        self.before = self.buf.clone()
        self.exp, self.written, self.slack = expected_lora(op, self.args, self.kw)
        x, w, out, st, ln, ix, b = self.args[:7]
        self.T, self.L = x.shape[0], (w[0] if isinstance(w, tuple) else w).shape[0]
        self.plan = torch.empty(sgmv.batch_plan_bytes(b, self.T) // 4, dtype=torch.int32, device=device)
        n = sgmv.shrink_workspace_bytes(out.shape[0], out.shape[1]) // 4 if op == "shrink" else 0
        self.work = torch.empty(n, dtype=torch.float32, device=device)


class Soak:
    def __init__(self, opts):
        self.o, self.dry = opts, opts.dry
        self.device = "cpu" if opts.dry else "cuda"
        self.lock = threading.Lock()
        self.n = dict(calls=0, checked=0, refusals=0, plans=0, graph_replays=0, graph_checked=0)
        self.failures = []
        self.streams = [None] * opts.streams if self.dry else [torch.cuda.Stream() for _ in range(opts.streams)]

    def fail(self, msg):
        with self.lock:
            if len(self.failures) < 50:
                self.failures.append(msg)

    def call(self, p, rng, plan):
        if p.op == "layer":
            if self.dry:
                return sgmv.reference.layer_apply(p.layer, p.x, p.out, p.step, add_inputs=p.case.add_inputs)
            return p.layer(p.x, p.out, p.step, add_inputs=p.case.add_inputs)
        kw = dict(p.kw)
        if plan is not None:
            kw["batch_plan"] = plan
        if self.dry:
            return getattr(sgmv.reference, f"sgmv_{p.op}")(*p.args, **{k: v for k, v in kw.items()})
        if p.op == "shrink":
            kw["workspace"] = p.work if rng.random() < 0.8 else None  # None: the binding allocates one
        if rng.random() < 0.1 and not isinstance(p.args[1], tuple):  # the torch op
            x, w, out, st, ln, ix, b, ms, last = p.args
            if p.op == "expand":
                torch.ops.sgmv.expand(x, w, out, st, ln, ix, b, ms, last, plan, kw.get("lora_ranks"))
            else:
                torch.ops.sgmv.shrink(x, w, out, st, ln, ix, b, ms, last, kw.get("lora_ranks"), kw.get("lora_scales"),
                                      plan, kw.get("workspace"))
            return
        getattr(sgmv, f"sgmv_{p.op}")(*p.args, **kw)

    def bad_call(self, p, rng):
        """A call outside the contract: it must raise one of the documented errors, launching nothing."""
        if p.op == "layer":
            fn = sgmv.reference.layer_apply if self.dry else (lambda lay, *a, **k: lay(*a, **k))
            bads = [lambda: fn(p.layer, p.x[:, :1], p.out, p.step),          # wrong inputs width
                    lambda: fn(p.layer, p.x, p.out[:, :1], p.step),          # wrong output width
                    lambda: fn(p.layer, p.x.float(), p.out, p.step)]         # inputs not the weights' dtype
            i = rng.randrange(len(bads))
            try:
                bads[i]()
            except (sgmv.SgmvError, ValueError, TypeError, RuntimeError):
                with self.lock:
                    self.n["refusals"] += 1
                return
            self.fail(f"bad layer argument {i} was accepted")
            return
        x, w, out, st, ln, ix, b, ms, last = p.args
        fn = getattr(sgmv.reference if self.dry else sgmv, f"sgmv_{p.op}")
        bads = [
            lambda: fn(x, w, out, st, ln, ix, -1, ms, last),                      # batches < 0
            lambda: fn(x, w, out, st.float(), ln, ix, b, ms, last),               # float metadata
            lambda: fn(x[:, :1], w, out, st, ln, ix, b, ms, last),                # wrong inputs width
            lambda: fn(x, w, out, st, ln, ix, 1.5, ms, last),                     # batches not an int
            lambda: fn(x, w, out, st, ln, ix, b, -3, last),                       # max_seq_length < 0
            lambda: fn(x, w, out[:1], st, ln, ix, b, ms, last),                   # output rows wrong
            lambda: fn(x, w, out, st, ln, ix, len(st) + 5, ms, last),             # batches > entries
        ]
        if not self.dry:
            bads.append(lambda: fn(x.cpu(), w, out, st, ln, ix, b, ms, last))    # a CPU tensor
            bads.append(lambda: fn(x, w, out, st, ln, ix, b, ms, last, batch_plan=p.plan[:4]))  # plan too small
        # sgmv.reference checks only what sgmv_*_args_from_tensors checks (shapes, dtypes), not the counts
        choices = [1, 2, 3, 5, 6] if self.dry else range(len(bads))
        i = rng.choice(list(choices))
        try:
            bads[i]()
        except (sgmv.SgmvError, ValueError, TypeError):
            with self.lock:
                self.n["refusals"] += 1
            return
        except Exception as e:
            self.fail(f"bad argument {i} ({p.op}): raised {type(e).__name__}: {e}")
            return
        self.fail(f"bad argument {i} ({p.op}) was accepted")

    def worker(self, k, calls, barrier):
        rng = random.Random(1000 + k)
        try:
            probs = [Problem(rng, self.device, 5000 + 100 * k + i) for i in range(self.o.problems)]
        except Exception as e:
            self.fail(f"thread {k}: setup: {e!r}")
            barrier.wait()
            return
        if not self.dry:
            torch.cuda.synchronize()
        barrier.wait()
        stream = self.streams[k % len(self.streams)]
        ctx = torch.cuda.stream(stream) if stream is not None else _Null()
        done = checked = plans = 0
        with ctx:
            for i in range(calls):
                p = probs[rng.randrange(len(probs))]
                try:
                    if rng.random() < self.o.bad_rate:
                        self.bad_call(p, rng)
                        continue
                    plan = None
                    if p.op == "layer":
                        if rng.random() < 0.2 or not getattr(p, "planned", False):  # the step's plan, on this stream
                            if not self.dry:
                                p.step.plan()
                            p.planned = True
                            plans += 1
                    elif rng.random() < 0.4:
                        plan = p.plan
                        if rng.random() < 0.2 or not getattr(p, "planned", False):
                            if self.dry:
                                plan.fill_(0)
                            else:
                                sgmv.batch_plan(*p.args[3:7], p.T, p.L, out=plan)
                            p.planned = True
                            plans += 1
                    sample = rng.randrange(self.o.sample) == 0
                    if sample:
                        p.buf.copy_(p.before)
                    self.call(p, rng, plan)
                    done += 1
                    if sample:
                        if stream is not None:
                            stream.synchronize()
                        dt = getattr(p.case, "dtypes", None) or p.case.dtype
                        check(p.args, p.before, p.buf, p.exp, p.written, f"thread {k} call {i} {p.op} {dt}",
                              p.slack)
                        checked += 1
                except Exception as e:
                    self.fail(f"thread {k} call {i}: {type(e).__name__}: {str(e)[:300]}")
        if stream is not None:
            stream.synchronize()
        with self.lock:
            self.n["calls"] += done
            self.n["checked"] += checked
            self.n["plans"] += plans

    def graphs(self, stop, captured):
        """Captured once: plan + 3-slice shrink (ranks, scales, split-K workspace) + expand; replayed with new
        metadata copied in place before each replay, every replay checked."""
        T, H, R, La, B = 48, 1024, 16, 3, 16
        g = torch.Generator().manual_seed(9)
        x = torch.randn(T, H, generator=g).to(torch.bfloat16).cuda()
        wa = tuple((torch.randn(La, R, H, generator=g) / H ** 0.5).to(torch.bfloat16).cuda() for _ in range(3))
        wb = tuple((torch.randn(La, h, R, generator=g) / R ** 0.5).to(torch.bfloat16).cuda() for h in (128, 64, 64))
        ranks = torch.tensor([16, 8, 0], dtype=torch.int32, device="cuda")
        scales = torch.tensor([1.0, 0.5, -1.0], dtype=torch.float32, device="cuda")
        y = torch.empty(T, 3 * R, dtype=torch.float32, device="cuda")
        out = torch.empty(T, 256, dtype=torch.bfloat16, device="cuda")
        meta = [torch.zeros(B, dtype=torch.int32, device="cuda") for _ in range(3)]
        plan = torch.empty(sgmv.batch_plan_bytes(B, T) // 4, dtype=torch.int32, device="cuda")
        ws = torch.empty(sgmv.shrink_workspace_bytes(T, 3 * R) // 4, dtype=torch.float32, device="cuda")
        graph, s = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        with torch.cuda.stream(s), torch.cuda.graph(graph, stream=s):
            sgmv.batch_plan(*meta, B, T, La, out=plan)
            sgmv.sgmv_shrink(x, wa, y, *meta, B, 4, 0.5, lora_ranks=ranks, lora_scales=scales, batch_plan=plan,
                             workspace=ws)
            sgmv.sgmv_expand(y, wb, out, *meta, B, 4, True, batch_plan=plan, lora_ranks=ranks)
        torch.cuda.synchronize()
        captured.set()  # the workers start only now: no other thread's CUDA call during the capture
        rng = torch.Generator().manual_seed(4)
        while not stop.is_set():
            n = torch.randint(0, 5, (B,), generator=rng)
            n[n.cumsum(0) > T] = 0
            st = torch.cat([torch.zeros(1, dtype=torch.long), n.cumsum(0)[:-1]])
            ix = torch.randint(-1, La + 1, (B,), generator=rng)
            out0 = torch.randn(T, 256, generator=rng).to(torch.bfloat16)
            try:
                with torch.cuda.stream(s):
                    for m, v in zip(meta, (st, n, ix)):
                        m.copy_(v)
                    y.fill_(float("nan"))
                    out.copy_(out0)
                    graph.replay()
                s.synchronize()
                self.n["graph_replays"] += 1
                m3 = tuple(v.int() for v in (st, n, ix))
                ys, yw, yslack = expected_lora("shrink", (x, wa, y, *m3, B, 4, 0.5),
                                               dict(lora_ranks=ranks, lora_scales=scales))
                check((x, wa, y), torch.full_like(y, float("nan")), y, ys, yw, "graph shrink", yslack)
                oe, ow, _ = expected_lora("expand", (y, wb, out0.cuda(), *m3, B, 4, True), dict(lora_ranks=ranks))
                check((y, wb, out), out0, out, oe, ow, "graph expand")
                self.n["graph_checked"] += 1
            except Exception as e:
                self.fail(f"graph replay {self.n['graph_replays']}: {type(e).__name__}: {str(e)[:300]}")
                return
            time.sleep(0.05)

    def _graphs(self, stop, captured):
        try:
            self.graphs(stop, captured)
        except Exception as e:
            self.fail(f"graphs: {type(e).__name__}: {str(e)[:300]}")
        finally:
            captured.set()

    def run(self):
        o = self.o
        t0 = time.time()
        mem = {"start": snapshot(self.dry)}
        # warm-up: a short round (first calls load cubins, torch pools form), then the measured one
        for phase, calls in (("warm", max(1, o.calls // 50)), ("main", o.calls)):
            per = calls // o.threads
            barrier = threading.Barrier(o.threads)
            stop, captured = threading.Event(), threading.Event()
            if phase == "main" and not self.dry:
                gt = threading.Thread(target=self._graphs, args=(stop, captured))
                gt.start()
                captured.wait(120)
            ts = [threading.Thread(target=self.worker, args=(k, per, barrier)) for k in range(o.threads)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            stop.set()
            if phase == "main" and not self.dry:
                gt.join()
            mem["after_warmup" if phase == "warm" else "end"] = snapshot(self.dry)
        growth = {k: round(mem["end"][k] - mem["after_warmup"][k], 1) for k in mem["end"]}
        leak = []
        if growth["rss_mib"] > o.max_rss_growth:
            leak.append(f"host RSS grew {growth['rss_mib']} MiB")
        if not self.dry and growth["allocated_mib"] > 0:
            leak.append(f"torch.cuda.memory_allocated grew {growth['allocated_mib']} MiB")
        if not self.dry and growth["cu_used_mib"] > o.max_gpu_growth:
            leak.append(f"device memory in use grew {growth['cu_used_mib']} MiB")
        if not self.dry and self.n["graph_checked"] == 0:
            self.failures.append("no CUDA-graph replay was checked")
        summary = dict(self.n, dry=self.dry, threads=o.threads, streams=o.streams, sample=o.sample,
                       failures=len(self.failures) + len(leak), leaks=leak,
                       memory={k: {a: round(b, 1) for a, b in v.items()} for k, v in mem.items()}, growth=growth,
                       wall_s=round(time.time() - t0, 1))
        for f in self.failures + leak:
            print("FAILED", f)
        return summary


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=100_000, help="calls in all, over the threads (default 1e5)")
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--streams", type=int, default=2)
    ap.add_argument("--sample", type=int, default=200, help="1 call in SAMPLE checked (default 200)")
    ap.add_argument("--problems", type=int, default=24, help="problems per thread (default 24)")
    ap.add_argument("--bad-rate", type=float, default=0.005, help="share of bad-argument calls (default 0.005)")
    ap.add_argument("--max-rss-growth", type=float, default=64.0, help="MiB of host RSS growth allowed")
    ap.add_argument("--max-gpu-growth", type=float, default=64.0, help="MiB of device memory growth allowed")
    ap.add_argument("--dry", action="store_true", help="CPU: sgmv.reference instead of the library")
    ap.add_argument("--json", help="also write the summary here")
    o = ap.parse_args(argv)
    if not o.dry and not torch.cuda.is_available():
        print("gpu_soak: no CUDA GPU visible to torch (use --dry on the CPU)", file=sys.stderr)
        return 2
    s = Soak(o).run()
    if o.json:
        Path(o.json).write_text(json.dumps(s, indent=1) + "\n")
    print("soak: " + json.dumps(s))
    return 1 if s["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
