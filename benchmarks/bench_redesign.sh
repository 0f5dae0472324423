#!/usr/bin/env bash
# Speed of the pre-redesign tree against this one, side by side in one run (issue 17): the threshold search, the
# metric, predict s/img and training s/iteration, each run OLD then NEW, ROUNDS times, one after the other.
#
#   bash benchmarks/bench_redesign.sh OLD_TREE [ROUNDS]
#
# OLD_TREE is a checkout of the old code (`git worktree add /tmp/old <commit>`); both run in this checkout's venv,
# the old one through PYTHONPATH. Needs ../shared/data (real images); prints each benchmark's own figure lines.
set -euo pipefail
OLD=${1:?usage: bench_redesign.sh OLD_TREE [ROUNDS]}
ROUNDS=${2:-2}
PY=${PY:-.venv/bin/python}
NEW=$(pwd)
run() {  # label tree command...
  local label=$1 tree=$2; shift 2
  echo "--- $label ($tree)"
  PYTHONPATH=$tree MPLBACKEND=Agg "$@" 2>&1 | grep -v -i "warn" | tail -${TAIL:-6}
}
for r in $(seq "$ROUNDS"); do
  echo "=== round $r"
  for t in "$OLD" "$NEW"; do TAIL=8 run search "$t" $PY benchmarks/bench_search.py --workers 2; done
  for t in "$OLD" "$NEW"; do run metric "$t" $PY benchmarks/bench_metric.py; done
  for t in "$OLD" "$NEW"; do run predict "$t" $PY benchmarks/bench_predict.py --preset demo --images 2 --modes single,tta; done
  for t in "$OLD" "$NEW"; do run train "$t" $PY benchmarks/bench_train.py iters --config demo --iters 6; done
done
