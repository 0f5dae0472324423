"""Benchmark: the data check ``cellkit train`` runs before any work (:mod:`cellkit.datacheck`) on the real data.

Each check runs in a fresh process (``python -c``: no in-process table cache), in this order, with the check's
cache in a temporary folder: (1) first run, nothing remembered: every image decoded completely, every annotation
parsed; (2) second run on unchanged files: only stats; (3) one image touched (mtime changed): that image read
again; (4) first runs with one worker (no parallelism) and the default workers (the CPU count), interleaved twice, for
the speed-up. LIVECell's subset is
checked the same way (first and second run). Wall times include the process start (Python, numpy, pandas, PIL).

Usage::

    .venv/bin/python benchmarks/bench_datacheck.py [--data DIR]

Skips (exit 0, with a message) when the real data is absent. Never writes into the data folder.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, add_data_argument, real_root

CHECK = """
import json, sys, time
from cellkit import datacheck
kind, a, b, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
fn = datacheck.check_sartorius if kind == "sartorius" else datacheck.check_livecell
stats = fn(a, b, workers=workers or None, progress=False)
print(json.dumps(stats))
"""


def _run(kind: str, a: Path, b: Path, cache: Path, workers: int = 0) -> tuple[float, dict]:
    env = dict(os.environ, CELLKIT_CACHE_DIR=str(cache),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHECK, kind, str(a), str(b), str(workers)], env=env, check=True,
                         capture_output=True, text=True)
    return time.perf_counter() - start, json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_argument(parser)
    args = parser.parse_args()
    root = real_root(args.data)
    csv_path, images = root / "sartorius" / "train.csv", root / "sartorius" / "train"
    if not csv_path.is_file():
        print(f"bench_datacheck: real data not found ({csv_path}); skipped")
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"
        rows.append(("sartorius, first run", *_run("sartorius", csv_path, images, cache)))
        rows.append(("sartorius, second run (unchanged)", *_run("sartorius", csv_path, images, cache)))
        # one changed image: a copy of the image folder (the data folder stays untouched), one file's mtime moved
        copy = tmp / "train"
        shutil.copytree(images, copy)
        rows.append(("copy of train/, first run", *_run("sartorius", csv_path, copy, cache)))
        first = sorted(copy.iterdir())[0]
        os.utime(first, (time.time(), time.time() + 5))
        rows.append(("copy of train/, one image touched", *_run("sartorius", csv_path, copy, cache)))
        for k in range(2):  # interleaved: on a shared machine the load changes between runs
            rows.append((f"sartorius, first run, 1 worker ({k + 1})",
                         *_run("sartorius", csv_path, images, tmp / f"c1-{k}", 1)))
            rows.append((f"sartorius, first run, default workers ({k + 1})",
                         *_run("sartorius", csv_path, images, tmp / f"c2-{k}")))
        live = root / "livecell"
        for name in ("livecell_coco_test.json", "livecell_coco_val.json"):
            if (live / name).is_file():
                rows.append((f"LIVECell {name}, first run", *_run("livecell", live / name, live / "images", cache)))
                rows.append((f"LIVECell {name}, second run", *_run("livecell", live / name, live / "images", cache)))
    print(f"{'check':46} {'wall s':>7} {'check s':>8} {'images':>7} {'read':>5} {'annotations':>11} {'parsed':>7}")
    for name, wall, s in rows:
        print(f"{name:46} {wall:7.2f} {s['seconds']:8.2f} {s['images']:7d} {s['images_read']:5d} "
              f"{s['annotations']:11d} {s['annotations_parsed']:7d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
