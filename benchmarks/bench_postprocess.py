"""Post-processing + RLE encoding of one real-size image (520 x 704) with 1,000 candidates, on one core.

Fast path: ``cellkit.postprocess.apply_predictions`` (uint8 crops, occupancy map) + ``KeptMasks.rles()`` (one batched
run encoding). Baseline in the same run: the full-image reference form ``apply`` of ``tests/postprocess_reference.py`` (float masks
of the whole image) + ``cellkit.rle.encode`` per kept mask, on the first 100 candidates (1,000 full-image float
masks would need 1.4 GB), scaled per candidate.

    .venv/bin/python benchmarks/bench_postprocess.py
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import timeit  # noqa: E402

import numpy as np  # noqa: E402

from cellkit import CELL_TYPES, SHAPE, rle  # noqa: E402
from cellkit import postprocess as pp  # noqa: E402
from cellkit.predictions import InstancePredictions, quantize  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import postprocess_reference as ref  # noqa: E402


def candidates(n=1000, seed=0) -> InstancePredictions:
    """n soft-edged elliptic candidates of 12..70 px boxes over a real-size image, scores U(0, 1), mixed classes."""
    rng = np.random.default_rng(seed)
    h_img, w_img = SHAPE
    boxes, masks = [], []
    for _ in range(n):
        h, w = rng.integers(12, 70, 2)
        y0, x0 = rng.integers(0, h_img - h), rng.integers(0, w_img - w)
        yy, xx = np.mgrid[0:h, 0:w]
        r = np.sqrt(((yy - h / 2) / (h / 2.4)) ** 2 + ((xx - w / 2) / (w / 2.4)) ** 2)
        masks.append(quantize(1.0 / (1.0 + np.exp((r - 1.0) * rng.uniform(3, 10)))))
        boxes.append((x0, y0, x0 + w, y0 + h))
    return InstancePredictions("bench", h_img, w_img, rng.choice(3, n, p=[0.9, 0.05, 0.05]), rng.random(n),
                               np.array(boxes, dtype=np.float32), np.array(boxes), masks)


def best(fn, repeat=7) -> float:
    return min(timeit.repeat(fn, number=1, repeat=repeat))


def main() -> None:
    pred = candidates()
    thresholds = {c: {"score": 0.05, "mask": 0.5, "min_area": 10} for c in CELL_TYPES}  # keep nearly everything
    print(f"image {SHAPE[0]}x{SHAPE[1]}, {len(pred)} candidates; best of 7 runs, one core")
    print(f"{'variant':44} {'kept':>5} {'seconds':>8}")
    fast = {}
    for name, opts in (("own class", {}), ("vote + rescore", {"image_class_vote": True, "rescore": True})):
        kept = pp.apply_predictions(pred, thresholds, **opts)
        t_all = best(lambda: pp.apply_predictions(pred, thresholds, **opts).rles())
        t_pp = best(lambda: pp.apply_predictions(pred, thresholds, **opts))
        fast[name] = t_all
        print(f"{'apply_predictions + rles, ' + name:44} {len(kept):5d} {t_all:8.4f}")
        print(f"{'  of which apply_predictions, ' + name:44} {'':5} {t_pp:8.4f}")
    sub = pred.select(np.arange(100))
    full = [sub.full_prob(i) for i in range(len(sub))]
    names = [CELL_TYPES[c] for c in sub.classes]
    t_ref = best(lambda: [rle.encode(m) for m in ref.apply(names, sub.scores, full, thresholds)], repeat=3)
    t_fast100 = best(lambda: pp.apply_predictions(sub, thresholds).rles())
    assert pp.apply_predictions(sub, thresholds).rles() == [rle.encode(m) for m in
                                                           ref.apply(names, sub.scores, full, thresholds)]
    print(f"{'reference apply (full masks) + encode, 100':44} {'':5} {t_ref:8.4f}")
    print(f"{'apply_predictions + rles, same 100':44} {'':5} {t_fast100:8.4f}")
    print(f"speed-up on the same 100 candidates: {t_ref / t_fast100:.0f}x; "
          f"1,000 candidates: {fast['own class']:.3f} s (target <= 0.1 s)")


if __name__ == "__main__":
    main()
