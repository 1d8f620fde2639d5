#!/usr/bin/env bash
# The whole GPU suite (pytest -m gpu) in the shards of tests/README.md, within a time budget, on a GPU.
#
# usage: tests/gpu_suite.sh OUT_DIR [SHARD ...]      (default: every shard but 5, in this order:
#                                                    4 6 7 1a 1b 2a 2b 3a 3b)
#   env: SGMV_LIBRARY, PYTHONPATH  as for the tests (PYTHONPATH must reach python/ and cffi)
#        SGMV_SUITE_SECONDS        the budget for all shards (default 560): a shard gets what is left
#                                  (pytest is interrupted with SIGINT at its end and still prints its
#                                  summary); a shard with under 20 s left is skipped, and says so
#        TRITON_CACHE_DIR          Triton's cache, shared by every shard (default /tmp/sgmv-triton-cache)
#        SGMV_WORKERS              pytest-xdist workers for the large shards (default: the core count)
# Shard 5 (test_packaging.py) needs an installed wheel, not the source tree: tests/README.md says how.
# Writes OUT_DIR/SHARD.log and OUT_DIR/suite.tsv (shard, exit, pytest's summary line, seconds), and
# prints the table. Exit status 0 only if every shard ran to its end with no failure or error.
set -u
out=${1:?usage: tests/gpu_suite.sh OUT_DIR [SHARD ...]}
shift
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/sgmv-triton-cache} PYTHONUNBUFFERED=1
mkdir -p "$TRITON_CACHE_DIR"
py=${PYTHON:-python3}
n=${SGMV_WORKERS:-$(nproc)}
budget=${SGMV_SUITE_SECONDS:-560}
shards=("$@")
[ ${#shards[@]} -eq 0 ] && shards=(4 6 7 1a 1b 2a 2b 3a 3b)
t0=$(date +%s)

command_of() {
  local p="$py -m pytest -m gpu -q -p no:cacheprovider -rfE"
  case $1 in
    1a) echo "$p -n $n tests/test_gpu.py -k 'aot_matches and fp16 and no-plan'" ;;
    1b) echo "$p -n $n tests/test_gpu.py -k 'aot_matches and fp16 and not no-plan'" ;;
    2a) echo "$p -n $n tests/test_gpu.py -k 'aot_matches and bf16 and no-plan'" ;;
    2b) echo "$p -n $n tests/test_gpu.py -k 'aot_matches and bf16 and not no-plan'" ;;
    3a) echo "$p -n $n tests/test_shrink.py" ;;
    3b) echo "$p -n $n tests/test_slices.py" ;;
    4) echo "$p -n 8 tests/test_gpu.py -k 'not aot_matches' tests/test_torch_op.py tests/test_bench.py" \
            "tests/test_cli.py tests/test_gpu_pointers.py" ;;
    6) echo "$p -n $n tests/test_layer.py" ;;
    7) echo "$p -n $n tests/test_fp8.py" ;;
    *) return 1 ;;
  esac
}

printf "shard\texit\tsummary\tseconds\n" >"$out/suite.tsv"
ok=1
for s in "${shards[@]}"; do
  cmd=$(command_of "$s") || { echo "gpu_suite: no shard '$s'" >&2; ok=0; continue; }
  left=$(( budget - ($(date +%s) - t0) ))
  if [ "$left" -lt 20 ]; then
    printf "%s\tskipped\tonly %s s of the budget left\t0\n" "$s" "$left" >>"$out/suite.tsv"
    ok=0
    continue
  fi
  start=$(date +%s)
  timeout -s INT -k 15 "$left" bash -c "$cmd" >"$out/$s.log" 2>&1
  rc=$?
  summary=$(grep -E '[0-9]+ (passed|failed|errors?|skipped|deselected).* in [0-9.]+s' "$out/$s.log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')
  printf "%s\t%s\t%s\t%s\n" "$s" "$rc" "${summary:-no summary: see $s.log}" "$(( $(date +%s) - start ))" \
    >>"$out/suite.tsv"
  [ "$rc" -eq 0 ] || ok=0
done
column -t -s "$(printf '\t')" "$out/suite.tsv" 2>/dev/null || cat "$out/suite.tsv"
[ "$ok" -eq 1 ]
