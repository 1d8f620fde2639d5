#!/usr/bin/env bash
# The GPU proof of issue 18 in one command: sanitizers (tests/gpu_sanitizers.sh) beside the whole GPU
# suite (tests/gpu_suite.sh, its shards within SGMV_SUITE_SECONDS, default 330, on SGMV_WORKERS, default
# 12, xdist workers), the pointer checks
# (tests/test_gpu_pointers.py), then the soak alone (tests/gpu_soak.py: it measures the device's
# memory in use); writes OUT_DIR/gpu-proof.md (copy it to benchmarks/results/gpu-proof.md) and
# OUT_DIR/gpu-proof-logs.tar.gz (every log: 2 files, so that a device call's 8-file limit on what
# comes back holds).
# usage: tests/gpu_proof.sh OUT_DIR      env: SGMV_LIBRARY, PYTHONPATH (python/ and cffi), as for the tests
#   SGMV_SHARDS="6 7 ...": the suite's shards, in this order (default: gpu_suite.sh's)
#   SGMV_PROOF_QUICK=1: smoke (quick cases under memcheck only, 2000 soak calls, no suite)
#   full: not yet timed on the H200 together; apart, the sanitizers took 46 s to 5 min there, the suite
#   (before 0.4's one-compile-per-variant JIT) several 10-minute calls, the soak 6.5 s
set -u
out=${1:?usage: tests/gpu_proof.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
quick=${SGMV_PROOF_QUICK:-0}
logs=$(mktemp -d /tmp/sgmv-proof.XXXXXX)
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/sgmv-triton-cache}
t0=$(date +%s)
calls=100000
[ "$quick" = 1 ] && calls=2000

# The pointer checks run beside the sanitizer jobs; the soak after them (it reads the device's memory
# in use, which the sanitizer processes would move). SOAK_ARGS: more soak arguments (e.g. --dry).
tests/gpu_sanitizers.sh "$logs" >"$logs/sanitizers.out" 2>&1 &
san=$!
$py -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu_pointers.py >"$logs/pointers.log" 2>&1
rc_ptr=$?
rc_suite=0
if [ "$quick" != 1 ]; then
  SGMV_WORKERS=${SGMV_WORKERS:-12} SGMV_SUITE_SECONDS=${SGMV_SUITE_SECONDS:-330} tests/gpu_suite.sh "$logs/suite" \
    ${SGMV_SHARDS:-} >"$logs/suite.out" 2>&1
  rc_suite=$?
fi
wait $san
rc_san=$?
$py tests/gpu_soak.py --calls "$calls" ${SOAK_ARGS:-} --json "$logs/soak.json" >"$logs/soak.log" 2>&1
rc_soak=$?
cat "$logs/sanitizers.out"

$py - "$logs" "$out/gpu-proof.md" "$rc_san" "$rc_ptr" "$rc_soak" "$quick" "$(( $(date +%s) - t0 ))" "$rc_suite" <<'PY'
import json, os, platform, re, subprocess, sys
logs, md, rc_san, rc_ptr, rc_soak, quick, wall, rc_suite = sys.argv[1:]
def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception:
        return "?"
gpu = sh("nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1")
cs = sh("compute-sanitizer --version | tail -1")
lines = ["# GPU proof (issue 18): sanitizers, refused pointers, soak", "",
         f"Made by `tests/gpu_proof.sh` on {gpu} (compute-sanitizer {cs}), library `{os.environ.get('SGMV_LIBRARY', '?')}`,"
         f" commit {os.environ.get('SGMV_COMMIT') or sh('git rev-parse --short HEAD')}{' (QUICK smoke mode)' if quick == '1' else ''}; {wall} s in all.", "",
         "## compute-sanitizer over tests/gpu_sanitizer_cases.py (AOT and JIT)", "",
         "| tool | exit | summary | cases | calls | kernel launches checked | failures | s |", "|---|---|---|---|---|---|---|---|"]
tsv = os.path.join(logs, "sanitizers.tsv")
if os.path.exists(tsv):
    for row in open(tsv).read().splitlines()[1:]:
        lines.append("| " + " | ".join(row.split("\t")) + " |")
else:
    lines.append("| (no result: see sanitizers.out in the logs) | | | | | | | |")
paths = ""
j = os.path.join(logs, "sanitizer-none.json")
if os.path.exists(j):
    d = json.load(open(j))
    paths = f"Paths run: {', '.join(d['paths'])}; {d['variants']} AOT variants."
lines += ["", paths, f"Exit status of gpu_sanitizers.sh: {rc_san}.", "", "## Pointers refused before any launch (tests/test_gpu_pointers.py)", ""]
p = open(os.path.join(logs, "pointers.log")).read() if os.path.exists(os.path.join(logs, "pointers.log")) else ""
m = re.findall(r"^=*\s*(.*(?:passed|failed|error|skipped).*?)\s*=*$", p, re.M)
lines += [f"pytest exit {rc_ptr}: {m[-1] if m else 'no summary'}", ""]
if quick != "1":
    lines += ["## The GPU suite (tests/gpu_suite.sh, beside the sanitizers)", "",
              "| shard | exit | summary | s |", "|---|---|---|---|"]
    tsv = os.path.join(logs, "suite", "suite.tsv")
    rows = open(tsv).read().splitlines()[1:] if os.path.exists(tsv) else ["(no result: see suite.out)\t\t\t"]
    lines += ["| " + " | ".join(r.split("\t")) + " |" for r in rows]
    lines += ["", f"Exit status of gpu_suite.sh: {rc_suite}.", ""]
lines += ["## Soak (tests/gpu_soak.py)", ""]
sj = os.path.join(logs, "soak.json")
if os.path.exists(sj):
    s = json.load(open(sj))
    lines += [f"exit {rc_soak}: {s['calls']} calls ({s['threads']} threads, {s['streams']} streams), {s['checked']} checked "
              f"against float64, {s['refusals']} bad-argument calls refused, {s['plans']} plans built, "
              f"{s['graph_replays']} CUDA-graph replays ({s['graph_checked']} checked), failures {s['failures']}, "
              f"{s['wall_s']} s.", "", "| memory (MiB) | " + " | ".join(s["memory"]["start"]) + " |",
              "|---|" + "---|" * len(s["memory"]["start"])]
    for k, v in s["memory"].items():
        lines.append(f"| {k} | " + " | ".join(str(x) for x in v.values()) + " |")
    lines.append("| growth (end - after warm-up) | " + " | ".join(str(x) for x in s["growth"].values()) + " |")
    if s["leaks"]:
        lines.append("\nLeaks: " + "; ".join(s["leaks"]))
else:
    lines.append(f"exit {rc_soak}: no summary (see soak.log in the logs)")
ok = rc_san == "0" and rc_ptr == "0" and rc_soak == "0" and rc_suite == "0"
lines += ["", f"**{'All passed' if ok else 'FAILED'}.**", ""]
open(md, "w").write("\n".join(lines))
print("\n".join(lines))
PY
tar -czf "$out/gpu-proof-logs.tar.gz" -C "$logs" .
echo "gpu_proof: $out/gpu-proof.md, logs $out/gpu-proof-logs.tar.gz ($(( $(date +%s) - t0 )) s)"
[ "$rc_san" = 0 ] && [ "$rc_ptr" = 0 ] && [ "$rc_soak" = 0 ] && [ "$rc_suite" = 0 ]
