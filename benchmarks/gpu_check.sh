#!/usr/bin/env bash
# One prepared GPU check, for one call on an H200 (about 6-8 minutes):
#   1. the CUDA tests (kernels in bf16/fp16/fp32, batched solver, engine; test_pipeline.py where it
#      is still the engine's test file),
#   2. the kernel benchmarks (symmetric accumulation and fused gradient statistics vs cuBLAS and the
#      reference path, d_in in {576, 2048, 4096, 11008}, 16k tokens, bf16),
#   3. the solver benchmark on a 7B-shaped set of statistics (224 modules, 128 input groups),
#   4. end to end (plain fwd+bwd vs our statistics + solve) on randomly initialised Llama 1B and 7B
#      shapes, bf16, 256 examples x 1024 tokens (the 7B solve's DEBUG log: phases, iterations),
#   5. the solver's inner product alone ([b, n, n] @ [b, n, k], fp64/fp32: bandwidth reached),
#   6. the solver on flat spectra (statistics of a random-weight 1B-wide, 4-layer Llama) with the
#      default block (Rayleigh-Ritz basis of 32 columns: one batched eigh on the GPU per iteration) and
#      wider ones (--extra 8,24: 48 and 96 columns, fewer iterations; torch's CUDA eigh would loop over the stack
#      above 32 columns, so that eigh runs on the host, over its cores), with the solver's per-phase times
#      and iteration counts (--phases): which block is faster on a GPU is still to be measured.
# No downloads: models come from configs. Runs from the source tree (PYTHONPATH=.), no install.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default benchmarks/out/)
#
# OUT_DIR receives summary.md (the table) and gpu_check.tar.gz (every log and JSON result).
# Each step has its own time limit and the script stops starting steps past a global deadline, so a
# slow or failing step never costs the others.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
W=$(mktemp -d /tmp/gpu_check.XXXXXX)
DEADLINE=$(( $(date +%s) + ${GPU_CHECK_BUDGET_S:-480} ))
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

SUMMARY="$W/summary.md"
{
  echo "# GPU check $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" 2>&1
  echo '```'
  echo
  echo "| step | exit | seconds |"
  echo "|---|---|---|"
} > "$SUMMARY"

step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local left=$(( DEADLINE - $(date +%s) ))
  if [ "$left" -lt 20 ]; then
    echo "| $name | skipped (deadline) | 0 |" >> "$SUMMARY"; echo "== $name: skipped (deadline)"; return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s)"
  local t0=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$W/$name.log" 2>&1
  local rc=$?
  echo "| $name | $rc | $(( $(date +%s) - t0 )) |" >> "$SUMMARY"
  tail -n 30 "$W/$name.log"
}

if [ -n "${GPU_CHECK_DRY:-}" ]; then  # CPU dry run of the script itself, tiny shapes (CI-sized)
  step tests 300 $PY -m pytest -q -x -p no:cacheprovider $(ls tests/test_engine.py 2>/dev/null || echo tests/test_pipeline.py)
  step bench_kernels 300 $PY benchmarks/bench_kernels.py --out "$W"
  step bench_solver 300 $PY benchmarks/bench_solver.py --shape smollm2 --layers 2 --repeat 1 --device cpu --out "$W"
  step e2e_tiny 300 $PY benchmarks/end_to_end.py --model tiny-llama --device cpu --dtype float32 \
    --num-examples 8 --seq-len 32 --batch-size 4 --json "$W/e2e.jsonl" --solver-log "$W/solver_tiny.log"
  step bench_apply 120 $PY benchmarks/bench_apply.py --device cpu --sizes 256 --stack 1,2 --cols 8,16 --reps 3 --out "$W"
  step random_stats 300 $PY benchmarks/random_llama_stats.py --hidden 256 --intermediate 512 --layers 1 \
    --examples 8 --seq-len 64 --out "$W/random_tiny.safetensors"
  step bench_solver_flat 300 $PY benchmarks/bench_solver.py --stats "$W/random_tiny.safetensors" --device cpu \
    --extra 24 --ref-modules 2 --repeat 1 --out "$W/flat"
else
  TESTS=$(ls tests/test_kernels.py tests/test_batched_solver.py tests/test_engine.py tests/test_pipeline.py \
    tests/test_checkpoint.py 2>/dev/null)
  N=${GPU_CHECK_EXAMPLES:-256}
  step tests 90 $PY -m pytest -q -x -p no:cacheprovider $TESTS
  step bench_kernels 90 $PY benchmarks/bench_kernels.py --out "$W"
  step e2e_7b 150 $PY benchmarks/end_to_end.py --model llama-7b --device cuda --dtype bfloat16 \
    --num-examples "$N" --seq-len 1024 --batch-size 4 --json "$W/e2e.jsonl" --solver-log "$W/solver_7b.log"
  step bench_solver 80 $PY benchmarks/bench_solver.py --shape llama7b --device cuda --out "$W" --phases
  step bench_apply 45 $PY benchmarks/bench_apply.py --device cuda --out "$W"
  step e2e_1b 70 $PY benchmarks/end_to_end.py --model llama-1b --device cuda --dtype bfloat16 \
    --num-examples "$N" --seq-len 1024 --batch-size 8 --json "$W/e2e.jsonl"
  # flat spectra (random weights, 1B widths, 4 layers): does a wider block (fewer iterations, measured
  # on CPU: median 30 -> 18 with extra 24) pay on the GPU?
  step random_stats 60 $PY benchmarks/random_llama_stats.py --hidden 2048 --intermediate 5632 --layers 4 \
    --examples 64 --seq-len 512 --device cuda --out "$W/random_1b4.safetensors"
  step bench_solver_flat 90 $PY benchmarks/bench_solver.py --stats "$W/random_1b4.safetensors" --device cuda \
    --extra 8,24 --ref-modules 4 --repeat 1 --phases --out "$W/flat"
fi

{
  echo
  for f in "$W"/*.md "$W"/*/*.md; do
    [ -f "$f" ] && [ "$f" != "$SUMMARY" ] && { echo "## ${f#$W/}"; cat "$f"; echo; }
  done
  if [ -s "$W/e2e.jsonl" ]; then
    echo "## end to end"
    $PY - "$W/e2e.jsonl" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| model | tokens | plain s | stats s | solve s | total s | total/plain | peak GB plain / ours |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['model']} | {r['tokens']} | {r['plain_s']:.2f} | {r['stats_s']:.2f} | {r['solve_s']:.2f} | "
          f"{r['total_s']:.2f} | {r['total_over_plain']:.2f} | {r['plain_peak_gb']:.1f} / {r['ours_peak_gb']:.1f} |")
EOF
  fi
} >> "$SUMMARY" 2>&1
cp "$SUMMARY" "$OUT/summary.md"
rm -f "$W"/*.safetensors  # statistics: large, rebuilt by the command above
tar -C "$W" -czf "$OUT/gpu_check.tar.gz" .
echo
cat "$OUT/summary.md"
