"""Benchmark: weighted mask fusion (:func:`cellkit.fusion.weighted_mask_fusion`) of fake members of real images.

Each member of an image is :func:`cellkit.fakepred.fake_image` of the real truth with its own seed (shifted soft
masks, misses, duplicates, false positives), so the members overlap as the folds of an ensemble do. Prints the
fusion's seconds per image and a digest of the fused output (equal digests = equal fusions, for comparing two
trees: ``PYTHONPATH=<old tree> python benchmarks/bench_fusion.py``).

Usage::

    .venv/bin/python benchmarks/bench_fusion.py [--images 12] [--members 5] [--repeat 3] [--data DIR]

Skips (exit 0, with a message) when the real data is absent.
"""
from __future__ import annotations

import argparse
import hashlib

import numpy as np
import pandas as pd

from _common import add_data_argument, best_of, real_train_csv
from cellkit import fakepred
from cellkit.fusion import weighted_mask_fusion


def digest(fused: list) -> str:
    h = hashlib.sha256()
    for f in fused:
        for part in (f.classes, f.scores, f.boxes, f.mask_boxes, *f.masks):
            h.update(np.ascontiguousarray(part).tobytes())
    return h.hexdigest()[:16]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=12, help="first N images of train.csv")
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    add_data_argument(ap)
    args = ap.parse_args()
    csv_path = real_train_csv(args.data, "bench_fusion")
    if csv_path is None:
        return 0
    table = pd.read_csv(csv_path)
    specs = fakepred.spec_for("realistic")
    images = []
    for n, (image_id, rows) in enumerate(table.groupby("id", sort=False)):
        if n >= args.images:
            break
        images.append([fakepred.fake_image(image_id, rows["annotation"].tolist(), rows["cell_type"].iat[0], specs,
                                           seed=m) for m in range(args.members)])
    n_inst = sum(len(p) for members in images for p in members)
    seconds, fused = best_of(lambda: [weighted_mask_fusion(members, iou=0.5) for members in images], args.repeat)
    print(f"{len(images)} images x {args.members} members, {n_inst} instances; best of {args.repeat}")
    print(f"weighted mask fusion: {seconds / len(images):.3f} s/image; {sum(len(f) for f in fused)} fused "
          f"instances; digest {digest(fused)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
