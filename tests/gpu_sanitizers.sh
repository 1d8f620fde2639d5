#!/usr/bin/env bash
# compute-sanitizer over the randomized suite, through libsgmv.so (AOT) and the JIT path, on a GPU.
# usage: tests/gpu_sanitizers.sh OUT_DIR   (needs sgmv installed, compute-sanitizer on PATH)
set -u
out=${1:-.}
cd "$(dirname "$0")"
export PYTORCH_NO_CUDA_MEMORY_CACHING=1  # so that memcheck sees each tensor's real bounds
# memcheck: the whole randomized suite (AOT and JIT in each case) and the corrupt-metadata cases.
# racecheck, initcheck: the suite's AOT/JIT cases (shared memory races; reads of unwritten memory).
for tool in memcheck racecheck initcheck; do
  sel="aot_matches or corrupt"
  [ "$tool" = memcheck ] || sel="aot_matches"
  compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 20 \
    python3 -m pytest -q -p no:cacheprovider test_gpu.py -k "$sel" > "$out/sanitizer-$tool.log" 2>&1
  rc=$?
  echo "$tool: exit $rc; $(grep -E 'passed|failed' "$out/sanitizer-$tool.log" | tail -1); $(grep -E 'ERROR SUMMARY' "$out/sanitizer-$tool.log" | tail -1)"
done
