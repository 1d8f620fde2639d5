#!/usr/bin/env bash
# compute-sanitizer memcheck, racecheck, initcheck and synccheck over every kernel path, on a GPU:
# tests/gpu_sanitizer_cases.py (a fixed list of calls: expand and shrink on every path, with and
# without a plan, fused slices, per-adapter ranks and scales, split-K, the plan kernel, int32 and
# int64 metadata, corrupt metadata, plan buffers of arbitrary words; AOT and JIT) under each tool.
#
# usage: tests/gpu_sanitizers.sh OUT_DIR
#   env: SGMV_LIBRARY, PYTHONPATH  as for the tests (PYTHONPATH must reach python/ and cffi)
#        SGMV_PROOF_QUICK=1        smoke: the quick case list, memcheck only (about 1 minute)
#        SANITIZER_TOOLS="..."     the tools to run (default: all four)
#        TRITON_CACHE_DIR          Triton's cache, shared by every run (default /tmp/sgmv-triton-cache)
#        SANITIZER_TIMEOUT         seconds per tool (default 420)
#        SANITIZER_DRIVER_ARGS     appended to the driver's arguments (e.g. --dry, to try this script on a CPU
#                                  with a stand-in compute-sanitizer on PATH)
# Writes OUT_DIR/sanitizer-TOOL.log, OUT_DIR/sanitizer-TOOL.json (the driver's summary) and
# OUT_DIR/sanitizers.tsv (tool, exit, error summary, cases, calls, launches, failures, seconds).
# First a run without a sanitizer (checks the results, fills Triton's cache, so the tools do not
# compile under instrumentation), then the tools at once, in parallel background jobs (one GPU,
# 16 cores: each tool is one process). Exit status 0 only if every tool exited 0 with 0 errors
# and the driver reported no failure. Expected wall time on the H200: 3 to 5 minutes.
set -u
out=${1:?usage: tests/gpu_sanitizers.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTORCH_NO_CUDA_MEMORY_CACHING=1  # every tensor its own allocation: memcheck sees its real bounds
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/sgmv-triton-cache}
export PYTHONUNBUFFERED=1
mkdir -p "$TRITON_CACHE_DIR"
quick=${SGMV_PROOF_QUICK:-0}
if [ "$quick" = 1 ]; then
  tools=${SANITIZER_TOOLS:-memcheck}
else
  tools=${SANITIZER_TOOLS:-memcheck racecheck initcheck synccheck}
fi
limit=${SANITIZER_TIMEOUT:-420}
driver=tests/gpu_sanitizer_cases.py
py=${PYTHON:-python3}

# The case list and the JIT share of each tool: racecheck instruments every shared-memory access
# (slow), so it runs the short list that still takes every path, and the JIT on a few of them.
args_for() {
  local extra=${SANITIZER_DRIVER_ARGS:-}
  if [ "$quick" = 1 ]; then echo "--set quick --jit all $extra"; return; fi
  case $1 in
    none|memcheck|initcheck) echo "--set full --jit all $extra" ;;
    synccheck) echo "--set full --jit some $extra" ;;
    racecheck) echo "--set race --jit some $extra" ;;
  esac
}

# Options this compute-sanitizer knows (older ones lack some).
if ! command -v compute-sanitizer >/dev/null; then
  for d in /usr/local/cuda/bin /usr/local/cuda/compute-sanitizer /opt/nvidia/compute-sanitizer; do
    [ -x "$d/compute-sanitizer" ] && PATH="$d:$PATH" && break
  done
fi
command -v compute-sanitizer >/dev/null || { echo "gpu_sanitizers: compute-sanitizer is not on PATH" >&2; exit 2; }
help=$(compute-sanitizer --help 2>&1)
common=(--error-exitcode 99 --print-limit 50)
grep -q -- "--target-processes" <<<"$help" && common+=(--target-processes application-only)
memcheck_extra=()
grep -q -- "--padding" <<<"$help" && memcheck_extra+=(--padding 256)  # an overrun lands in padding, not a neighbour

echo "gpu_sanitizers: $(compute-sanitizer --version 2>&1 | tail -1); tools: $tools; cache $TRITON_CACHE_DIR"
t0=$(date +%s)
# 1. No sanitizer: the results checked, Triton's cache filled (every JIT variant any tool runs).
$py "$driver" $(args_for none) --json "$out/sanitizer-none.json" >"$out/sanitizer-none.log" 2>&1
rc_none=$?
echo "none: exit $rc_none; $(tail -1 "$out/sanitizer-none.log" | cut -c1-200); $(( $(date +%s) - t0 )) s"

# 2. The tools, in parallel.
declare -A pids starts
for tool in $tools; do
  extra=()
  [ "$tool" = memcheck ] && extra=("${memcheck_extra[@]}")
  [ "$tool" = racecheck ] && extra=(--racecheck-report hazard)
  grep -q -- "--racecheck-report" <<<"$help" || { [ "$tool" = racecheck ] && extra=(); }
  starts[$tool]=$(date +%s)
  timeout -k 10 "$limit" compute-sanitizer --tool "$tool" "${common[@]}" "${extra[@]}" \
    $py "$driver" $(args_for "$tool") --json "$out/sanitizer-$tool.json" >"$out/sanitizer-$tool.log" 2>&1 &
  pids[$tool]=$!
done

fail=$rc_none
printf "tool\texit\tsummary\tcases\tcalls\tlaunches\tfailures\tseconds\n" >"$out/sanitizers.tsv"
field() {  # field JSON KEY: a number from the driver's summary, or "?"
  [ -s "$1" ] && $py -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2" 2>/dev/null || echo "?"
}
row() {  # row TOOL EXIT SECONDS
  local tool=$1 rc=$2 secs=$3 log="$out/sanitizer-$1.log" js="$out/sanitizer-$1.json" summary
  summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$log" 2>/dev/null | tail -1 | sed 's/^=* *//')
  [ "$tool" = none ] && summary="(no sanitizer)"
  [ -n "$summary" ] || summary="no summary (see $log)"
  [ "$rc" = 124 ] && summary="TIMED OUT after ${limit} s; $summary"
  printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n" "$tool" "$rc" "$summary" "$(field "$js" cases)" "$(field "$js" calls)" \
    "$(field "$js" launches)" "$(field "$js" failures)" "$secs" >>"$out/sanitizers.tsv"
  echo "$tool: exit $rc; $summary; cases $(field "$js" cases), calls $(field "$js" calls), launches checked" \
    "$(field "$js" launches), failures $(field "$js" failures); $secs s"
}
row none "$rc_none" "$(( $(date +%s) - t0 ))" >/dev/null
for tool in $tools; do
  wait "${pids[$tool]}"
  rc=$?
  row "$tool" "$rc" "$(( $(date +%s) - ${starts[$tool]} ))"
  [ "$rc" = 0 ] || fail=1
  grep -qE "ERROR SUMMARY: 0 errors|RACECHECK SUMMARY: 0 hazards" "$out/sanitizer-$tool.log" || fail=1
  [ "$(field "$out/sanitizer-$tool.json" failures)" = 0 ] || fail=1
  grep -E "^FAILED|Error|error" "$out/sanitizer-$tool.log" | grep -v "SUMMARY" | head -5
done
echo "gpu_sanitizers: $([ "$fail" = 0 ] && echo ok || echo FAILED) in $(( $(date +%s) - t0 )) s ($out/sanitizers.tsv)"
exit "$fail"
