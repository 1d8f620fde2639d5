"""A fused QKV LoRA layer with libsgmv and torch, as a serving runtime runs it for one step.

The step (its rows, their batch plan and a scratch buffer) is described once per step, the q/k/v
adapters once at model load (sgmv.Layer), and each application is one call: y = F.linear(x, W0)
(the base layer), then qkv(x, y, step) adds the whole LoRA delta (shrink and expand, three slices).
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

    # At model load: the layer's adapters, described once.
    qkv = sgmv.Layer(lora_a, lora_b, lora_ranks=ranks, lora_scales=scales)
    # Once per step, for every layer call of the step: the rows grouped by adapter (built on the
    # device) in a scratch buffer that also holds each call's intermediate. (vLLM's per-token
    # mapping works as well: sgmv.Step(token_lora_mapping=..., num_loras=...).)
    step = sgmv.Step(starts, lens, idx, batches, max_len, total_tokens=tokens, num_loras=len(RANKS),
                     max_columns=len(SLICES) * RANK)

    # --- the layer ---
    y = F.linear(x, w0)  # the base layer
    base = y.clone()  # kept for the check only
    qkv(x, y, step)  # y += the LoRA delta of every slice
    torch.cuda.synchronize()

    # --- the check ---
    # Errors are measured against the sum of the magnitudes of each element's terms: the shrink
    # accumulates in fp32 and keeps its result in bf16 (2^-8), and the expand rounds its result to
    # bf16 (2^-8 again). The tolerance is twice the bound or more.
    row_lora, _, _, d_ref, d_mag = reference(x, lora_a, lora_b, scales)
    y, base = y.cpu(), base.cpu()
    lora_rows = row_lora >= 0
    ok = True
    if not torch.equal(y[~lora_rows], base[~lora_rows]):
        print("lora_layer: FAILED: a base-model row differs from the base output", file=sys.stderr)
        ok = False
    ref = base[lora_rows].double() + d_ref
    y_err = ((y[lora_rows].double() - ref).abs() / (base[lora_rows].double().abs() + d_mag)).nan_to_num(
        float("inf")).max().item()
    print(f"lora_layer: {tokens} tokens ({int((~lora_rows).sum())} base-model rows), ranks 8/16/64, "
          f"q/k/v {'/'.join(map(str, SLICES))} columns; relative error of y {y_err:.2g}")
    if not y_err <= 1 / 64:
        print("lora_layer: FAILED: an error above its tolerance (1/64)", file=sys.stderr)
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
