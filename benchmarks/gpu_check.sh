#!/usr/bin/env bash
# One GPU check of loraplex's CUDA path, in stages, each under its own timeout; a failing stage does not
# stop the next. Logs and JSON go into OUTDIR; OUTDIR/summary.json and summary.txt say what each stage did.
#
#   benchmarks/gpu_check.sh OUTDIR [--stages 2,5] [--cpu-fallback] [--block-imports]
#
# Stages (script, default timeout; the whole run stays inside BUDGET_S = 470 s, 8 minutes with margin):
#   1 env            benchmarks/gpu_env.py: versions, GPU, driver, which SDPA backends run our masked calls  45 s
#   2 kernel_smoke   benchmarks/kernel_smoke.py: shrink + expand bf16/fp16/fp32 in the model's layout vs
#                    float64, compile times                                                              60 s
#   3 gpu_tests      pytest over the test files that hold `gpu` tests: those first, then the files'
#                    other quick tests (on CUDA: the real kernels against the reference)              135 s
#   4 e2e            benchmarks/gpu_e2e.py: tiny Llama + mixed adapters, float32 greedy CUDA == CPU ==
#                    PEFT; bf16 logits vs transformers + PEFT at prefill and 8 decode steps            60 s
#   5 kernel_bench   benchmarks/kernel_bench.py --quick: 7-8B shapes, model layout, P6 rows first       60 s
#   6 runner_decode  benchmarks/runner_decode.py: random Llama-3-8B-shaped bf16 model, decode sweep,
#                    GPU and host time per step, P7 first                                              75 s
#   7 profile        benchmarks/step_profile.py: one decode step's top kernels, launches, peak memory  35 s
# GPU_CHECK_TIMEOUT_<N>=seconds overrides stage N's timeout, GPU_CHECK_BUDGET_S the whole run's budget (slow
# CPU fallbacks need more). --stages reruns only the named stages and
# keeps the other stages' earlier results in summary.json. Without CUDA, stages 2-7 report "skipped: no
# CUDA", unless --cpu-fallback runs their toy CPU versions (stage 2 under the Triton interpreter; stage 3
# then only collects the `gpu` tests, which skip). --block-imports makes starlette, uvicorn and gguf
# unimportable (as on the GPU host), proving the stages do not need them.
#
# Needs: python3 with torch, triton, transformers, peft, pytest (no network, no server packages, no
# gguf). loraplex need not be installed: without it the script puts a `loraplex` link to this checkout
# on PYTHONPATH. PYTHON=... picks the interpreter (default python3).
#
# On the lent H200 (the `run` tool; only 8 files come back from $OUT, so bundle them):
#   run(command="bash benchmarks/gpu_check.sh /tmp/gc; tar czf $OUT/gpu_check.tgz -C /tmp/gc .;
#                cp /tmp/gc/summary.txt /tmp/gc/summary.json $OUT/", timeout_s=540)
# The summary table is printed last, so output_tail shows it. To rerun failed stages in the same lease
# (the machine stays warm 30 s after a call; a fresh one is bare, so /tmp/gc would be gone):
#   run(command="bash benchmarks/gpu_check.sh /tmp/gc --stages 2,5; tar czf $OUT/gpu_check.tgz -C /tmp/gc .",
#       timeout_s=300)
set -u

usage() { echo "usage: $0 OUTDIR [--stages N,N,...] [--cpu-fallback] [--block-imports]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUTDIR=$1; shift
STAGES="1,2,3,4,5,6,7"; FALLBACK=0; BLOCK=0
while [ $# -gt 0 ]; do
  case $1 in
    --stages) [ $# -ge 2 ] || usage; STAGES=$2; shift 2 ;;
    --cpu-fallback) FALLBACK=1; shift ;;
    --block-imports) BLOCK=1; shift ;;
    *) usage ;;
  esac
done
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}
mkdir -p "$OUTDIR"; OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$REPO"
T0=$(date +%s)

SHIM=$(mktemp -d); trap 'rm -rf "$SHIM"' EXIT
if [ "$BLOCK" = 1 ]; then
  for mod in starlette uvicorn gguf; do
    mkdir -p "$SHIM/blocked/$mod"
    echo "raise ImportError('$mod is blocked by gpu_check.sh --block-imports (absent on the GPU host)')" >"$SHIM/blocked/$mod/__init__.py"
  done
  export PYTHONPATH="$SHIM/blocked${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import loraplex" 2>/dev/null; then
  ln -s "$REPO" "$SHIM/loraplex"
  export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO/benchmarks:$PYTHONPATH" PYTHONUNBUFFERED=1
"$PY" -c "import loraplex" || { echo "cannot import loraplex from $REPO" >&2; exit 1; }
HAS_CUDA=0; "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" && HAS_CUDA=1
TINY=""; [ "$HAS_CUDA" = 0 ] && TINY="--tiny"

NAMES=(_ env kernel_smoke gpu_tests e2e kernel_bench runner_decode profile)
TIMEOUTS=(_ 45 60 135 60 60 75 35)
stage_cmd() {  # the command line of stage $1, writing its JSON to $2
  local json=$2
  case $1 in
    1) echo "$PY benchmarks/gpu_env.py --out $json" ;;
    2) echo "$PY benchmarks/kernel_smoke.py --out $json $TINY" ;;
    3) local files pytest; files=$(grep -l 'pytest.mark.gpu' tests/test_*.py | tr '\n' ' ')
       pytest="$PY -m pytest -q -p no:cacheprovider"
       if [ "$HAS_CUDA" = 0 ]; then  # without CUDA: collect the gpu tests, they skip
         echo "$pytest -m gpu --junitxml=${json%.json}.xml $files"
       else  # the gpu tests first (their result is in even if the rest runs out of time), then the rest
         echo "$pytest -m gpu --junitxml=${json%.json}_gpu.xml $files; a=\$?;" \
              "$pytest -m 'not slow and not gpu' --junitxml=${json%.json}_rest.xml $files; b=\$?; exit \$((a > b ? a : b))"
       fi ;;
    4) echo "$PY benchmarks/gpu_e2e.py --out $json" ;;
    5) echo "$PY benchmarks/kernel_bench.py --quick --out $json $TINY" ;;
    6) echo "$PY benchmarks/runner_decode.py --out $json $TINY" ;;
    7) echo "$PY benchmarks/step_profile.py --out $json $TINY" ;;
  esac
}
record() {  # stage name status rc seconds timeout: merge one entry into summary.json
  "$PY" - "$OUTDIR/summary.json" "$@" <<'EOF'
import json, sys, time
path, stage, name, status, rc, seconds, timeout = sys.argv[1:]
try:
    summary = json.load(open(path))
except (OSError, ValueError):
    summary = {"stages": {}}
summary["stages"][stage] = dict(name=name, status=status, rc=int(rc), seconds=float(seconds), timeout_s=int(timeout),
                                log=f"stage{stage}_{name}.log", at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
json.dump(summary, open(path, "w"), indent=2)
EOF
}

for n in $(echo "$STAGES" | tr ',' ' '); do
  case $n in [1-7]) ;; *) echo "unknown stage $n (1-7)" >&2; continue ;; esac
  name=${NAMES[$n]}; log="$OUTDIR/stage${n}_${name}.log"; json="$OUTDIR/stage${n}_${name}.json"
  var="GPU_CHECK_TIMEOUT_$n"; limit=${!var:-${TIMEOUTS[$n]}}
  left=$((BUDGET_S - ($(date +%s) - T0) - 5))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$n" -ge 2 ] && [ "$HAS_CUDA" = 0 ] && [ "$FALLBACK" = 0 ]; then
    echo "skipped: no CUDA" >"$log"; record "$n" "$name" "skipped: no CUDA" 0 0 "$limit"
    echo "== stage $n $name: skipped: no CUDA"; continue
  fi
  if [ "$left" -lt 5 ]; then
    echo "skipped: out of time" >"$log"; record "$n" "$name" "skipped: out of time" 0 0 0
    echo "== stage $n $name: skipped: out of time"; continue
  fi
  cmd=$(stage_cmd "$n" "$json")
  echo "== stage $n $name (timeout ${limit}s): $cmd"
  s0=$(date +%s%N)
  { echo "\$ $cmd"; timeout -k 5 "$limit" bash -c "$cmd"; } >"$log" 2>&1
  rc=$?
  ms=$((($(date +%s%N) - s0) / 1000000)); secs=$((ms / 1000)).$(printf %03d $((ms % 1000)))
  case $rc in
    0) status=ok; [ "$HAS_CUDA" = 0 ] && [ "$n" -ge 2 ] && status="ok (cpu fallback)" ;;
    124|137) status="timeout after ${limit}s" ;;
    *) status="failed (rc $rc)" ;;
  esac
  record "$n" "$name" "$status" "$rc" "$secs" "$limit"
  tail -n 4 "$log" | sed 's/^/   | /'
  echo "== stage $n $name: $status in ${secs%.*}s"
done

"$PY" - "$OUTDIR/summary.json" "$OUTDIR/summary.txt" "$HAS_CUDA" "$(($(date +%s) - T0))" <<'EOF'
import json, sys
path, txt, has_cuda, total = sys.argv[1:]
summary = json.load(open(path))
summary.update(cuda=has_cuda == "1", last_run_seconds=int(total))
json.dump(summary, open(path, "w"), indent=2)
lines = [f"gpu_check: CUDA {'yes' if has_cuda == '1' else 'no'}; this run {total} s", "| stage | name | status | seconds |", "|---|---|---|---:|"]
for k in sorted(summary["stages"], key=int):
    s = summary["stages"][k]
    lines.append(f"| {k} | {s['name']} | {s['status']} | {s['seconds']:.0f} |")
open(txt, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
