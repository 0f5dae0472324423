#!/usr/bin/env bash
# LIVECell's shared subset as a target dataset (issue 18), at a CPU budget: `cellkit import coco` of the 20 images
# (one class "cell", groups = the cell line in the file name), then the notebook chain: K folds, every fold trained
# ITERATIONS iterations with the demo preset at native size, OOF, a threshold search per cell line, the CV tables per
# cell line, and a submission for TEST_IMAGES images of the set (LIVECell has no hidden test set here).
#
#   bash benchmarks/livecell_target.sh OUT [ITERATIONS] [K]
#
# Needs ../shared/data/livecell (or $CELLKIT_REAL_DATA/livecell). Prints the chain's log tail, the thresholds and the
# CV tables; the wall time of each notebook is in the chain's own lines.
set -euo pipefail
OUT=${1:?usage: livecell_target.sh OUT [ITERATIONS] [K]}
ITERS=${2:-60}
K=${3:-4}
PY=${PY:-.venv/bin/python}
REAL=${CELLKIT_REAL_DATA:-$(cd "$(dirname "$0")/.." && pwd)/../shared/data}
LC=$REAL/livecell
[ -d "$LC" ] || { echo "no LIVECell subset at $LC"; exit 1; }
mkdir -p "$OUT"
TEST=$OUT/test_images
mkdir -p "$TEST"
ls "$LC/images" | sort | awk 'NR % 7 == 1' | head -3 | while read -r f; do cp "$LC/images/$f" "$TEST/"; done
MPLBACKEND=Agg OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} $PY -m cellkit chain --data "$OUT/data" --out "$OUT/run" \
  -p SOURCE_FORMAT=coco -p "SOURCE=$LC/livecell_coco_val.json,$LC/livecell_coco_test.json" \
  -p "SOURCE_IMAGES=$LC/images" -p "SOURCE_TEST_IMAGES=$TEST" -p "GROUP_PATTERN=^([A-Za-z0-9]+)_" \
  -p K="$K" -p FOLDS=all -p ITERATIONS="$ITERS" -p N_OVERLAYS=1 2>&1 | grep -v -i "warn\|it/s" | tail -12
$PY - "$OUT/run" <<'EOF'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
thr = json.loads((run / "thresholds.json").read_text())
print("thresholds per cell line:", {g: t for g, t in thr["thresholds"].items()})
print("search mAP before/after:", round(thr["metric"]["before"]["mAP"], 4), round(thr["metric"]["after"]["mAP"], 4))
from cellkit.cv import format_tables
print(format_tables(json.loads((run / "cv.json").read_text())))
for k in sorted(p.name for p in run.glob("fold[0-9]*") if p.is_dir()):
    rows = [json.loads(l) for l in (run / k / "metrics.json").read_text().splitlines() if "cellkit/mAP" in l]
    print(k, "val mAP", rows[-1]["cellkit/mAP"] if rows else None)
EOF
