"""A fused QKV LoRA layer with libsgmv and torch, as a serving runtime runs it for one step.

y = F.linear(x, W0) (the base layer), then sgmv.sgmv_shrink with the q, k and v A stacks in one
launch, then sgmv.sgmv_expand with the three B stacks into y (add_inputs=True), over one batch plan.
Adapters of ranks 8, 16 and 64 share rank-64 stacks (lora_ranks: the padding is never read), each
scaled by alpha / rank (lora_scales); base-model rows (index -1), decode tokens and a prefill share
the batch. Checked element by element against the same layer in plain torch (float64).

    python examples/lora_layer.py

Exit status: 0 ok; 1 a wrong result; 2 no GPU (nothing was run).
"""
import sys

import torch
import torch.nn.functional as F

import sgmv

HIDDEN, SLICES, RANK = 256, (256, 64, 64), 64  # q, k, v output columns (grouped-query attention)
RANKS, ALPHAS = [8, 16, 64], [16, 16, 32]
LENS = [1] * 8 + [37]  # eight decode tokens, one prefill
INDICES = [0, -1, 2, 0, 1, -1, 2, 0, 1]  # -1: a base-model row


def problem(device):
    """Random bf16 inputs and weights; each adapter's A and B zero-padded to RANK in one stack per slice."""
    g = torch.Generator().manual_seed(0)
    tokens = sum(LENS)
    x = torch.randn(tokens, HIDDEN, generator=g)
    w0 = torch.randn(sum(SLICES), HIDDEN, generator=g) / 16
    lora_a, lora_b = [], []
    for cols in SLICES:
        a = torch.zeros(len(RANKS), RANK, HIDDEN)
        b = torch.zeros(len(RANKS), cols, RANK)
        for i, r in enumerate(RANKS):
            a[i, :r] = torch.randn(r, HIDDEN, generator=g) / 16
            b[i, :, :r] = torch.randn(cols, r, generator=g) / 4
        lora_a.append(a)
        lora_b.append(b)
    to = dict(device=device, dtype=torch.bfloat16)
    return x.to(**to), w0.to(**to), tuple(a.to(**to) for a in lora_a), tuple(b.to(**to) for b in lora_b)


def reference(x, lora_a, lora_b, scales):
    """The LoRA part of the layer for the adapter rows, gathered per row, in float64 on the CPU: the
    shrink output (rows, 3 * RANK), the delta (rows, sum(SLICES)) and the sums of the magnitudes of
    each element's terms (the scale its rounding error is measured against)."""
    row_lora = torch.repeat_interleave(torch.tensor(INDICES), torch.tensor(LENS))
    lora = row_lora[row_lora >= 0]
    x = x.cpu().double()[row_lora >= 0]
    scale = scales.cpu().double()[lora, None]
    shrunk, shrunk_mag, delta, delta_mag = [], [], [], []
    for a, b in zip(lora_a, lora_b):
        a, b = a.cpu().double()[lora], b.cpu().double()[lora]  # (rows, RANK, HIDDEN), (rows, cols, RANK)
        s = scale * torch.einsum("th,trh->tr", x, a)
        shrunk.append(s)
        shrunk_mag.append(scale.abs() * torch.einsum("th,trh->tr", x.abs(), a.abs()))
        delta.append(torch.einsum("tr,tnr->tn", s, b))
        delta_mag.append(torch.einsum("tr,tnr->tn", s.abs(), b.abs()))
    return row_lora, torch.cat(shrunk, 1), torch.cat(shrunk_mag, 1), torch.cat(delta, 1), torch.cat(delta_mag, 1)


def main(device="cuda"):
    x, w0, lora_a, lora_b = problem(device)
    tokens, batches, max_len = x.shape[0], len(LENS), max(LENS)
    starts = torch.tensor([sum(LENS[:i]) for i in range(batches)], dtype=torch.int32, device=device)
    lens = torch.tensor(LENS, dtype=torch.int32, device=device)
    idx = torch.tensor(INDICES, dtype=torch.int32, device=device)
    ranks = torch.tensor(RANKS, dtype=torch.int32, device=device)
    scales = torch.tensor([al / r for al, r in zip(ALPHAS, RANKS)], dtype=torch.float32, device=device)
    meta = (starts, lens, idx, batches, max_len)

    # Once per step, for every LoRA call of every layer: the rows grouped by adapter, on the device.
    plan = sgmv.batch_plan(starts, lens, idx, batches, tokens, len(RANKS))

    # --- the layer ---
    y = F.linear(x, w0)  # the base layer
    base = y.clone()  # kept for the check only
    # The shrink output stays fp32 until expand rounds it. A runtime would use torch.empty: the
    # columns past an adapter's rank are neither written nor read; NaN here shows it.
    shrunk = torch.full((tokens, len(SLICES) * RANK), float("nan"), device=device)
    # Split-K partial sums for few-row steps, sized once for the largest step (0: it never splits;
    # without workspace= the binding allocates one per call).
    ws_bytes = sgmv.shrink_workspace_bytes(tokens, len(SLICES) * RANK)
    workspace = torch.empty(ws_bytes // 4, dtype=torch.float32, device=device) if ws_bytes else None
    sgmv.sgmv_shrink(x, lora_a, shrunk, *meta, lora_ranks=ranks, lora_scales=scales, batch_plan=plan,
                     workspace=workspace)
    sgmv.sgmv_expand(shrunk, lora_b, y, *meta, add_inputs=True, batch_plan=plan, lora_ranks=ranks)
    torch.cuda.synchronize()

    # --- the check ---
    # Errors are measured against the sum of the magnitudes of each element's terms: the shrink
    # accumulates in fp32 (at most 256 * 2^-24 of that); expand rounds the shrink output and its
    # result to bf16 (2^-8 each). Each tolerance is twice its bound or more.
    row_lora, s_ref, s_mag, d_ref, d_mag = reference(x, lora_a, lora_b, scales)
    y, base, shrunk = y.cpu(), base.cpu(), shrunk.cpu()
    lora_rows = row_lora >= 0
    ok = True
    if not torch.equal(y[~lora_rows], base[~lora_rows]):
        print("lora_layer: FAILED: a base-model row differs from the base output", file=sys.stderr)
        ok = False
    written = torch.arange(RANK).repeat(len(SLICES))[None, :] < torch.tensor(RANKS)[row_lora[lora_rows], None]
    got = shrunk[lora_rows]
    if not (shrunk[~lora_rows].isnan().all() and got[~written].isnan().all()):
        print("lora_layer: FAILED: shrink wrote a base-model row or a column past an adapter's rank", file=sys.stderr)
        ok = False
    s_err = ((got.double() - s_ref).abs() / s_mag)[written].nan_to_num(float("inf")).max().item()
    ref = base[lora_rows].double() + d_ref
    y_err = ((y[lora_rows].double() - ref).abs() / (base[lora_rows].double().abs() + d_mag)).nan_to_num(
        float("inf")).max().item()
    print(f"lora_layer: {tokens} tokens ({int((~lora_rows).sum())} base-model rows), ranks 8/16/64, "
          f"q/k/v {'/'.join(map(str, SLICES))} columns; relative errors: shrink {s_err:.2g}, y {y_err:.2g}")
    if not (s_err <= 1e-4 and y_err <= 1 / 64):
        print("lora_layer: FAILED: an error above its tolerance (shrink 1e-4, y 1/64)", file=sys.stderr)
        ok = False
    if not ok:
        return 1
    print("lora_layer: ok")
    return 0


if __name__ == "__main__":
    if not torch.cuda.is_available():
        print("lora_layer: needs a CUDA GPU; torch sees none (nothing was run)", file=sys.stderr)
        sys.exit(2)
    sys.exit(main())
