"""Full threshold search on generated out-of-fold predictions of the 392 real images, and its metric gain.

1. ``cellkit.fakepred`` (preset ``realistic``, seed 0) writes predictions for every image of
   ``../shared/data/sartorius/train.csv`` into ``runs/bench/fakepred_oof`` (kept between runs; resumes).
2. ``cellkit.search.search`` with the default grid, all four option sets, ``--workers`` processes: wall time, CPU
   time (this process + workers), peak memory (sum of each process's peak RSS).
3. Baseline in the same run: the naive search, i.e. ``postprocess.apply_predictions`` + ``metric.score_image`` for
   every grid point, timed on a sample of images and scaled to the same number of evaluations.
4. Check: the searched thresholds re-scored independently (``apply_predictions`` -> ``metric.score_frames``) give the
   search's mAP; metric before (seed defaults 0.5 / 0.5 / 0) and after, per class.

Skips cleanly (exit 0 with a message) when the real data is absent (``CELLKIT_REAL_DATA`` overrides the path).

    .venv/bin/python benchmarks/bench_search.py [--workers 2]
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("CELLKIT_REAL_DATA", ROOT.parent / "shared" / "data"))


def cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench" / "fakepred_oof"))
    parser.add_argument("--naive-images", type=int, default=12, help="images timed for the naive baseline")
    args = parser.parse_args()
    train = REAL / "sartorius" / "train.csv"
    if not train.is_file():
        print(f"SKIP: real data not found at {train}")
        return 0

    import pandas as pd

    from cellkit import CELL_TYPES, fakepred, metric
    from cellkit import postprocess as pp
    from cellkit import predictions as P
    from cellkit import search as S
    from cellkit.data import read_train_csv

    truth = read_train_csv(train)
    t0 = time.perf_counter()
    fakepred.generate(truth, args.out, seed=0, progress=False)
    print(f"fakepred: {truth['id'].nunique()} images in {args.out} ({time.perf_counter() - t0:.1f} s, "
          f"0 s when already written)")

    with open("/proc/loadavg") as fh:
        load_before = fh.read().split()[0]
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    doc = S.search(args.out, truth, workers=args.workers, progress=False)
    wall, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
    with open("/proc/loadavg") as fh:
        load_after = fh.read().split()[0]
    grid = doc["search"]["grid"]
    n_points = len(grid["score"]) * len(grid["mask"]) * len(grid["min_area"])
    print(f"search: {doc['search']['n_images']} images, grid {len(grid['score'])} score x {len(grid['mask'])} mask "
          f"x {len(grid['min_area'])} min_area = {n_points} points per class, 4 option sets, {args.workers} workers")
    print(f"  wall {wall:.1f} s, CPU {cpu:.1f} s (all processes), peak memory {doc['search']['peak_rss_mb']:.0f} MiB "
          f"(sum of process peaks); load average {load_before} -> {load_after} on {os.cpu_count()} cores")
    rounds = [r["rounds"] for r in doc["search"]["results"]]

    # naive baseline: postprocess + metric per grid point, on a sample, scaled
    groups = {k: g["annotation"].tolist() for k, g in truth.groupby("id")}
    ids = P.image_ids(args.out)[:: max(1, len(P.image_ids(args.out)) // args.naive_images)][:args.naive_images]
    thresholds = {c: dict(pp.SEED_THRESHOLDS[c]) for c in CELL_TYPES}
    c0 = time.process_time()
    n_eval = 0
    for pred in P.iter_dir(args.out, ids=ids):
        for s in (0.3, 0.5, 0.7):
            t = {c: {**v, "score": s} for c, v in thresholds.items()}
            metric.score_image(pp.apply_predictions(pred, t).rles(), groups[pred.image_id])
            n_eval += 1
    per_eval = (time.process_time() - c0) / n_eval
    evals = doc["search"]["n_images"] * n_points * sum(rounds)  # one class per image swept, per round and option set
    print(f"  naive (apply_predictions + score_image per point): {per_eval * 1000:.1f} ms CPU per evaluation x "
          f"{evals:,} evaluations = {per_eval * evals / 3600:.1f} CPU-hours; the search used {cpu:.0f} CPU-s "
          f"({per_eval * evals / cpu:.0f}x less)")

    # independent check of the chosen thresholds and the gain per class
    rows = []
    for pred in P.iter_dir(args.out):
        for s in pp.apply_predictions(pred, doc["thresholds"], **doc["options"]).rles():
            rows.append((pred.image_id, s))
    check = metric.score_frames(truth, pd.DataFrame(rows, columns=["id", "predicted"]))
    assert abs(check["mAP"] - doc["metric"]["after"]["mAP"]) < 1e-9, (check["mAP"], doc["metric"]["after"]["mAP"])
    before, after = doc["metric"]["before"], doc["metric"]["after"]
    print(f"  re-scored with postprocess + metric.score_frames: mAP {check['mAP']:.4f} (identical)")
    print(f"options chosen: image_class_vote={doc['options']['image_class_vote']} rescore={doc['options']['rescore']}"
          f"; rounds per option set {rounds}")
    print(f"{'class':8} {'score':>6} {'mask':>5} {'min_area':>8} {'before':>7} {'after':>7} {'gain':>7}")
    for name in CELL_TYPES:
        t = doc["thresholds"][name]
        b, a = before["per_class"][name], after["per_class"][name]
        print(f"{name:8} {t['score']:6.2f} {t['mask']:5.2f} {t['min_area']:8d} {b:7.4f} {a:7.4f} {a - b:+7.4f}")
    print(f"{'all':8} {'':6} {'':5} {'':8} {before['mAP']:7.4f} {after['mAP']:7.4f} "
          f"{after['mAP'] - before['mAP']:+7.4f}")
    for r in doc["search"]["results"]:
        print(f"  option set vote={r['options']['image_class_vote']!s:5} rescore={r['options']['rescore']!s:5} "
              f"mAP {r['mAP']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
