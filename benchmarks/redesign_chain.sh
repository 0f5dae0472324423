#!/usr/bin/env bash
# The small chain of the redesign check (issue 17): synthetic data, fold 0, a few iterations, fixed seed, OOF,
# threshold search, test predictions, submission, CV tables, all through the README's commands.
#
#   bash benchmarks/redesign_chain.sh OUT [ITERATIONS]
#   FROM_RUN=OTHER_OUT bash benchmarks/redesign_chain.sh OUT   # no training: OTHER_OUT's data, folds and fold0 model
#
# Runs the `cellkit` found on PYTHONPATH (PYTHONPATH=<old worktree> runs the pre-redesign code in the same venv)
# with one thread, and prints each step's wall time. Compare two OUTs with
#   python benchmarks/compare_runs.py OUT_A OUT_B
set -euo pipefail
OUT=${1:?usage: redesign_chain.sh OUT [ITERATIONS]}
ITERS=${2:-6}
PY=${PY:-python}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 CUBLAS_WORKSPACE_CONFIG=:4096:8 PYTHONHASHSEED=0
mkdir -p "$OUT"
step() { local name=$1; shift; local t0=$(date +%s.%N); "$@" > "$OUT/$name.log" 2>&1 || { echo "FAILED: $name"; tail -20 "$OUT/$name.log"; exit 1; }
         printf '%-10s %7.1f s\n' "$name" "$(echo "$(date +%s.%N) - $t0" | bc)"; }
if [ -n "${FROM_RUN:-}" ]; then
  cp -r "$FROM_RUN/data" "$OUT/data"; cp "$FROM_RUN/folds.csv" "$OUT/folds.csv"; cp -r "$FROM_RUN/fold0" "$OUT/fold0"
else
step synth   $PY -m cellkit synth "$OUT/data" --images 15 --seed 0
step folds   $PY -m cellkit folds "$OUT/data/train.csv" --k 5 --out "$OUT/folds.csv"
step train   $PY -m cellkit train --config demo --data "$OUT/data" --fold 0 --folds "$OUT/folds.csv" \
                 --out "$OUT/fold0" SOLVER.MAX_ITER "$ITERS" SEED 0 CELLKIT.EVAL.AT_END False
fi
step oof     $PY -m cellkit predict --run "$OUT/fold0" --fold 0 --data "$OUT/data" --out "$OUT/oof"
step search  $PY -m cellkit search --pred "$OUT/oof" --truth "$OUT/data/train.csv" --out "$OUT/thresholds.json"
step test    $PY -m cellkit predict --run "$OUT/fold0" --images "$OUT/data/test" --out "$OUT/test" \
                 --like "$OUT/thresholds.json"
step submit  $PY -m cellkit submit --pred "$OUT/test" --thresholds "$OUT/thresholds.json" \
                 --images "$OUT/data/test" --out "$OUT/submission.csv"
step cv      $PY -m cellkit cv "$OUT" --truth "$OUT/data/train.csv"
sha256sum "$OUT/submission.csv" "$OUT/thresholds.json" "$OUT/fold0/model_final.pth" | sed "s#$OUT/##"
