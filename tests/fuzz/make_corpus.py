"""Writes the seed corpus of fuzz_expand.c (tests/fuzz/corpus/): arguments that pass validation,
in the harness's input format (see fuzz_expand.c). Run it again if that format changes."""
import struct
from pathlib import Path

FP16, BF16, FP32, I32, I64 = range(5)


def value(v):
    # tag 0: int16 when it fits, else tag 2: int64
    return b"\0" + struct.pack("<h", v) if -2**15 <= v < 2**15 else b"\2" + struct.pack("<q", v)


def seed(flags=0, size_delta=0, x=FP16, w=FP16, o=FP16, meta=I32, xs=16, wl=64 * 16, wn=16, os_=64,
         tokens=10, hidden=64, rank=16, loras=2, batches=2, max_seq=5, add=1, ptrs=(16, 32, 48, 64, 80, 96),
         stream=0, probe=0):
    inputs, weights, output, start, length, idx = (bytes([p]) for p in ptrs)
    return (bytes([flags]) + value(size_delta) + inputs + value(x) + value(xs) + weights + value(w) + value(wl) +
            value(wn) + output + value(o) + value(os_) + value(tokens) + value(hidden) + value(rank) +
            value(loras) + start + length + idx + value(meta) + value(batches) + value(max_seq) + value(add) +
            bytes([stream]) + value(probe))


SEEDS = {
    "fp16_prefill": seed(),
    "bf16_fp32_int64": seed(x=FP32, w=BF16, o=FP32, meta=I64, xs=64, wl=4096 * 64, wn=64, os_=4096, tokens=1000,
                            hidden=4096, rank=64, loras=8, batches=4, max_seq=500, add=0, stream=7),
    "decode_unaligned": seed(w=BF16, x=BF16, o=BF16, tokens=3, hidden=100, rank=8, xs=9, wn=8, wl=800, os_=100,
                             batches=3, max_seq=1, ptrs=(17, 33, 49, 64, 80, 96)),
    "noop_batches": seed(batches=0, ptrs=(0, 0, 0, 0, 0, 0)),
    "noop_tokens": seed(tokens=0, xs=0, os_=0, ptrs=(16, 32, 48, 0, 0, 0)),
    "one_row": seed(tokens=1, hidden=1, xs=0, os_=0, wn=0, loras=1, wl=0, batches=1, max_seq=1),
    "device_calls": seed(flags=6, size_delta=8, probe=7),
}

if __name__ == "__main__":
    out = Path(__file__).resolve().parent / "corpus"
    out.mkdir(exist_ok=True)
    for name, data in SEEDS.items():
        (out / name).write_bytes(data)
    print(f"wrote {len(SEEDS)} seeds to {out}")
