"""Benchmark: which mask-overlap engine :mod:`cellkit.geometry` wraps (issue 17), on real Sartorius images.

The same (prediction, truth) IoU pairs of every image, three ways, in one run:

* ``runs``: :func:`cellkit.geometry.overlapping_pairs` on :class:`~cellkit.geometry.MaskRuns` (box prefilter, then
  intersections of the candidate pairs from their runs) — what cellkit uses;
* ``label maps``: the metric's engine before the redesign, kept here as the baseline: every prediction's flat pixel
  indices written into a label map, read at every truth pixel (layered where predictions overlap);
* ``pycocotools``: ``pycocotools.mask.iou`` on compressed RLEs (C; column-major RLE of the transposed image, which
  is the row-major RLE of the image). Timed with and without building its RLE objects from the runs.

Predictions are the truth perturbed (seeded, :func:`bench_metric.perturb_image`). Each engine starts from the parsed
runs; the IoUs of all three must agree (asserted: runs and label maps exactly, pycocotools to 1e-12).

Usage::

    .venv/bin/python benchmarks/bench_geometry.py [--limit N] [--repeat R] [--data DIR]

Skips (exit 0, with a message) when the real data is absent.
"""
from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
from pycocotools import mask as mask_utils

from _common import add_data_argument, best_of, real_train_csv
from bench_metric import perturb_image
from cellkit import SHAPE, rle
from cellkit.geometry import MaskRuns, overlapping_pairs


def label_map_pairs(pred: MaskRuns, truth: MaskRuns) -> dict:
    """``{(i, j): IoU}`` of the pairs sharing pixels, by layered label maps (the pre-redesign metric's engine)."""
    p_pix = rle.runs_to_indices(pred.starts, pred.lengths)
    p_own = np.repeat(np.arange(len(pred)), pred.areas)
    t_pix = rle.runs_to_indices(truth.starts, truth.lengths)
    t_own = np.repeat(np.arange(len(truth)), truth.areas)
    label = np.full(pred.shape[0] * pred.shape[1], -1, dtype=np.int64)
    codes = []
    while p_pix.size:
        label[p_pix] = p_own
        hits = label[t_pix]
        found = hits >= 0
        codes.append(hits[found] * len(truth) + t_own[found])
        landed = label[p_pix] == p_own
        label[p_pix] = -1
        p_pix, p_own = p_pix[~landed], p_own[~landed]
    codes, inter = np.unique(np.concatenate(codes), return_counts=True)
    i, j = codes // len(truth), codes % len(truth)
    return dict(zip(zip(i.tolist(), j.tolist()), (inter / (pred.areas[i] + truth.areas[j] - inter)).tolist()))


def runs_pairs(pred: MaskRuns, truth: MaskRuns) -> dict:
    i, j, _, iou = overlapping_pairs(pred, truth)
    return dict(zip(zip(i.tolist(), j.tolist()), iou.tolist()))


def coco_rles(masks: MaskRuns) -> list:
    """pycocotools RLE objects of the masks: row-major runs are column-major runs of the transposed image."""
    h, w = masks.shape
    out = []
    for k in range(len(masks)):
        s = masks.starts[masks.indptr[k]:masks.indptr[k + 1]]
        n = masks.lengths[masks.indptr[k]:masks.indptr[k + 1]]
        counts = np.empty(2 * s.size + 1, dtype=np.int64)
        counts[0:-1:2] = s - np.concatenate(([0], (s + n)[:-1]))
        counts[1::2] = n
        counts[-1] = h * w - (s[-1] + n[-1] if s.size else 0)
        out.append(mask_utils.frPyObjects({"counts": counts.tolist(), "size": [w, h]}, w, h))
    return out


def coco_pairs(p_rles: list, t_rles: list) -> dict:
    if not p_rles or not t_rles:
        return {}
    iou = np.asarray(mask_utils.iou(p_rles, t_rles, [0] * len(t_rles))).reshape(len(p_rles), len(t_rles))
    i, j = np.nonzero(iou)
    return dict(zip(zip(i.tolist(), j.tolist()), iou[i, j].tolist()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=0, help="first N images (0 = all)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    add_data_argument(ap)
    args = ap.parse_args()
    csv_path = real_train_csv(args.data, "bench_geometry")
    if csv_path is None:
        return 0
    table = pd.read_csv(csv_path)
    rng = np.random.default_rng(args.seed)
    images = []
    for n, (_, rows) in enumerate(table.groupby("id", sort=False)):
        if args.limit and n >= args.limit:
            break
        truth = rows["annotation"].tolist()
        pred = perturb_image(truth, SHAPE, rng)
        images.append((MaskRuns.from_rles(pred, SHAPE), MaskRuns.from_rles(truth, SHAPE)))
    n_masks = sum(len(p) + len(t) for p, t in images)
    print(f"{len(images)} images, {n_masks} masks (predictions + truths), best of {args.repeat}")
    t_runs, by_runs = best_of(lambda: [runs_pairs(p, t) for p, t in images], args.repeat)
    t_label, by_label = best_of(lambda: [label_map_pairs(p, t) for p, t in images], args.repeat)
    t_enc, encoded = best_of(lambda: [(coco_rles(p), coco_rles(t)) for p, t in images], args.repeat)
    t_coco, by_coco = best_of(lambda: [coco_pairs(p, t) for p, t in encoded], args.repeat)
    assert by_runs == by_label, "runs and label maps disagree"
    for a, b in zip(by_runs, by_coco):
        assert a.keys() == b.keys() and np.allclose([a[k] for k in a], [b[k] for k in a], rtol=0, atol=1e-12)
    print(f"{'engine':<34}{'s':>8}{'x runs':>8}")
    for name, t in (("runs (cellkit.geometry)", t_runs), ("label maps (metric before)", t_label),
                    ("pycocotools iou (RLEs built)", t_coco), ("pycocotools iou + building RLEs", t_coco + t_enc)):
        print(f"{name:<34}{t:8.3f}{t / t_runs:8.2f}")
    print(f"pairs agree: {sum(len(d) for d in by_runs)} overlapping pairs, identical IoUs (pycocotools within 1e-12)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
