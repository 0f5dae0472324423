"""Benchmark: ``cellkit.metric`` against a dense boolean-matrix reference on the real Sartorius train images.

Predictions are the truth perturbed (seeded): masks dropped, shifted, eroded or dilated, plus false-positive blobs.
Both implementations score the same images in the same run; the per-image, per-threshold precisions must be
identical (asserted). Peak memory of scoring all images is measured in a subprocess (``cellkit score`` CLI,
``ru_maxrss``) and with tracemalloc around :func:`cellkit.metric.score_frames`.

Usage::

    .venv/bin/python benchmarks/bench_metric.py [--limit N] [--data DIR] [--seed S]

Skips (exit 0, with a message) when the real data is absent. This module also provides the dense reference
(:func:`dense_score_image`) and the perturbation (:func:`perturb_image`) used by ``tests/test_metric.py``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from cellkit import SHAPE, rle
from cellkit.metric import THRESHOLDS, score_frames

REPO = Path(__file__).resolve().parents[1]
BLOCK = 256  # masks per dense block: bounds the reference's memory to ~2 x BLOCK x H x W float32


# ------------------------------------------------------------------------------------------- dense reference
def _dense_stack(rles, shape) -> np.ndarray:
    """bool ``(n, H*W)``: one full-image row per non-empty mask."""
    masks = [rle.decode(s, shape).ravel() for s in rles if isinstance(s, str) and s.strip()]
    return np.stack(masks) if masks else np.zeros((0, shape[0] * shape[1]), dtype=bool)


def dense_iou(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """IoU ``(n_pred, n_truth)`` from full-image boolean matrices via dense products ``P @ T.T`` (float32 BLAS,
    exact for counts below 2**24), in blocks of :data:`BLOCK` masks."""
    inter = np.zeros((len(pred), len(truth)))
    for i in range(0, len(pred), BLOCK):
        p = pred[i:i + BLOCK].astype(np.float32)
        for j in range(0, len(truth), BLOCK):
            inter[i:i + BLOCK, j:j + BLOCK] = p @ truth[j:j + BLOCK].astype(np.float32).T
    union = pred.sum(1)[:, None].astype(np.float64) + truth.sum(1)[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def dense_precision(iou: np.ndarray) -> np.ndarray:
    """Precision at each threshold with TP from an assignment solver (an independent maximum matching)."""
    n_pred, n_truth = iou.shape
    if n_pred == 0 and n_truth == 0:
        return np.ones(len(THRESHOLDS))
    tp = np.zeros(len(THRESHOLDS))
    for k, t in enumerate(THRESHOLDS):
        match = iou > t
        if match.any():
            r, c = linear_sum_assignment(match, maximize=True)
            tp[k] = match[r, c].sum()
    return tp / (n_pred + n_truth - tp)


def dense_score_image(pred_rles, truth_rles, shape=SHAPE) -> np.ndarray:
    """Reference precision ``(10,)`` of one image: full-image boolean matrices, dense products, assignment solver."""
    return dense_precision(dense_iou(_dense_stack(pred_rles, shape), _dense_stack(truth_rles, shape)))


# ------------------------------------------------------------------------------------------- perturbation
def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(mask)
    h, w = mask.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = mask[max(-dy, 0):h - max(dy, 0),
                                                                     max(-dx, 0):w - max(dx, 0)]
    return out


def perturb_mask(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """One predicted mask from a true one: dropped (None, 10%), shifted by up to 4 px (35%), eroded (20%) or
    dilated (15%); the rest unchanged."""
    u = rng.random()
    if u < 0.10:
        return None
    if u < 0.45:
        dy, dx = rng.integers(-4, 5, size=2)
        return _shift(mask, int(dy), int(dx))
    if u < 0.65:
        return ndimage.binary_erosion(mask, iterations=int(rng.integers(1, 3)))
    if u < 0.80:
        return ndimage.binary_dilation(mask, iterations=int(rng.integers(1, 3)))
    return mask


def _blob(shape, rng: np.random.Generator) -> np.ndarray:
    """A random filled ellipse (a false positive)."""
    h, w = shape
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    ry, rx = rng.uniform(3, 20, size=2)
    y, x = np.ogrid[:h, :w]
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1


def perturb_image(truth_rles, shape, rng: np.random.Generator, fp_rate: float = 0.1) -> list[str]:
    """Predicted mask strings for one image: each true mask perturbed (:func:`perturb_mask`), plus about
    ``fp_rate`` x n false-positive blobs. Predictions may overlap each other, like raw model output."""
    out = []
    margin = 6  # > the largest shift or dilation, so the crop holds the perturbed mask (except at image borders)
    for s in truth_rles:
        full = rle.decode(s, shape)
        rows, cols = np.flatnonzero(full.any(axis=1)), np.flatnonzero(full.any(axis=0))
        if not rows.size:
            continue
        y0, y1 = max(rows[0] - margin, 0), min(rows[-1] + margin + 1, shape[0])
        x0, x1 = max(cols[0] - margin, 0), min(cols[-1] + margin + 1, shape[1])
        crop = perturb_mask(full[y0:y1, x0:x1].copy(), rng)
        if crop is not None and crop.any():
            full[:] = False
            full[y0:y1, x0:x1] = crop
            out.append(rle.encode(full))
    for _ in range(rng.poisson(fp_rate * len(truth_rles))):
        out.append(rle.encode(_blob(shape, rng)))
    return out


def perturbed_predictions(truth: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Predictions DataFrame (id, predicted) for every image of ``truth`` (an image with no mask left gets one
    empty row)."""
    rng = np.random.default_rng(seed)
    rows = []
    for image_id, group in truth.groupby("id", sort=False):
        shape = (int(group["height"].iat[0]), int(group["width"].iat[0])) if "height" in group else SHAPE
        preds = perturb_image(group["annotation"].tolist(), shape, rng)
        rows += [(image_id, p) for p in preds] or [(image_id, "")]
    return pd.DataFrame(rows, columns=["id", "predicted"])


# ------------------------------------------------------------------------------------------- benchmark
def _peak_rss_cli(truth_csv: Path, pred_csv: Path) -> tuple[float, dict]:
    """Peak RSS (MiB) of a child process running ``cellkit score --json`` on the two files, and its output."""
    code = ("import resource, subprocess, sys, json\n"
            "p = subprocess.run([sys.executable, '-m', 'cellkit', 'score', '--truth', sys.argv[1], '--pred', "
            "sys.argv[2], '--json'], capture_output=True, text=True, check=True)\n"
            "print(json.dumps({'out': json.loads(p.stdout), "
            "'maxrss_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))\n")
    done = subprocess.run([sys.executable, "-c", code, str(truth_csv), str(pred_csv)], capture_output=True,
                          text=True, check=True, cwd=REPO)
    result = json.loads(done.stdout)
    return result["maxrss_kib"] / 1024, result["out"]


def main(argv=None) -> int:
    # sibling module (benchmarks/ is sys.path[0] for the script); imported here because tests load this file by path
    from _common import add_data_argument, best_of, real_train_csv

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=0, help="score only the first N images (0 = all)")
    add_data_argument(parser)
    parser.add_argument("--seed", type=int, default=0, help="perturbation and sampling seed")
    parser.add_argument("--dense-images", type=int, default=48,
                        help="images (seeded random sample) on which the dense reference is compared (0 = all)")
    args = parser.parse_args(argv)

    csv_path = real_train_csv(args.data, "bench_metric")
    if csv_path is None:
        return 0
    truth = pd.read_csv(csv_path, dtype={"id": str})
    if args.limit:
        keep = truth["id"].drop_duplicates().iloc[:args.limit]
        truth = truth[truth["id"].isin(keep)].reset_index(drop=True)
    n_images = truth["id"].nunique()
    t0 = time.perf_counter()
    pred = perturbed_predictions(truth, seed=args.seed)
    print(f"{n_images} images, {len(truth)} true masks, {len(pred)} predicted masks "
          f"(perturbed, seed {args.seed}; made in {time.perf_counter() - t0:.1f} s)")

    # ours on every image, best of 3 (it is short)
    sparse_all_t, result = best_of(lambda: score_frames(truth, pred), 3)

    # the dense reference is slow (minutes per hundred images): compare on a seeded random sample of images,
    # timing both implementations on exactly those images
    ids = truth["id"].drop_duplicates()
    if args.dense_images and args.dense_images < len(ids):
        chosen = set(np.random.default_rng(args.seed).choice(ids.to_numpy(), args.dense_images, replace=False))
        ids = ids[ids.isin(chosen)]
    sub_truth = truth[truth["id"].isin(ids)]
    sub_pred = pred[pred["id"].isin(ids)]
    n_sub = len(ids)
    sparse_t, sub_result = best_of(lambda: score_frames(sub_truth, sub_pred), 3)
    ours = np.stack(list(_per_image_precisions(sub_truth, sub_pred)))

    t0 = time.perf_counter()
    dense = []
    pred_groups = sub_pred.groupby("id", sort=False)["predicted"]
    for image_id, group in sub_truth.groupby("id", sort=False):
        shape = (int(group["height"].iat[0]), int(group["width"].iat[0]))
        p = pred_groups.get_group(image_id).tolist() if image_id in pred_groups.groups else []
        dense.append(dense_score_image(p, group["annotation"].tolist(), shape))
    dense_t = time.perf_counter() - t0
    dense = np.stack(dense)
    if not np.array_equal(ours, dense):
        bad = np.flatnonzero((ours != dense).any(axis=1))
        raise AssertionError(f"sparse and dense scores differ on {bad.size} images, e.g. row {bad[0]}: "
                             f"{ours[bad[0]]} vs {dense[bad[0]]}")
    if not np.array_equal(sub_result["per_image"]["score"].to_numpy(), dense.mean(axis=1)):
        raise AssertionError("score_frames per-image scores differ from the dense reference")
    full_ours = result["per_image"].set_index("id")["score"]
    if not np.array_equal(full_ours.loc[sub_result["per_image"]["id"]].to_numpy(), dense.mean(axis=1)):
        raise AssertionError("scores of the full run differ from the dense reference on the sample")

    tracemalloc.start()
    score_frames(truth, pred)
    traced_peak = tracemalloc.get_traced_memory()[1] / 2 ** 20
    tracemalloc.stop()
    with tempfile.TemporaryDirectory() as tmp:
        truth_csv, pred_csv = Path(tmp) / "truth.csv", Path(tmp) / "pred.csv"
        truth.to_csv(truth_csv, index=False)
        pred.to_csv(pred_csv, index=False)
        rss, cli_out = _peak_rss_cli(truth_csv, pred_csv)
    assert np.isclose(cli_out["mAP"], result["mAP"]) and cli_out["n_images"] == n_images

    n_types = sub_truth.drop_duplicates("id")["cell_type"].value_counts().to_dict()
    print(f"\nmAP of the perturbed predictions over {n_images} images: {result['mAP']:.4f} "
          f"(per class: {', '.join(f'{k} {v:.4f}' for k, v in result['per_class'].items() if v is not None)})")
    print(f"\nsame {n_sub} images ({', '.join(f'{v} {k}' for k, v in sorted(n_types.items()))}; "
          f"{len(sub_truth)} true, {len(sub_pred)} predicted masks); sparse == dense on every image and threshold: yes")
    print(f"{'implementation':<34} {'seconds':>9} {'images/s':>10} {'speed-up':>9}")
    print(f"{'dense boolean matrices (reference)':<34} {dense_t:>9.2f} {n_sub / dense_t:>10.2f} {1:>8.1f}x")
    print(f"{'cellkit.metric.score_frames':<34} {sparse_t:>9.3f} {n_sub / sparse_t:>10.1f} "
          f"{dense_t / sparse_t:>8.1f}x")
    print(f"\nall {n_images} images: cellkit.metric.score_frames {sparse_all_t:.2f} s = "
          f"{n_images / sparse_all_t:.1f} images/s")
    print(f"peak memory scoring {n_images} images: tracemalloc {traced_peak:.1f} MiB (score_frames only); "
          f"`cellkit score` process max RSS {rss:.0f} MiB")
    if dense_t / sparse_t < 30:
        print("WARNING: below the 30x target")
    return 0


def _per_image_precisions(truth: pd.DataFrame, pred: pd.DataFrame):
    """Per-image precision vectors of cellkit.metric, in truth order (through the public score_image)."""
    from cellkit.metric import score_image

    pred_groups = pred.groupby("id", sort=False)["predicted"]
    for image_id, group in truth.groupby("id", sort=False):
        shape = (int(group["height"].iat[0]), int(group["width"].iat[0]))
        p = pred_groups.get_group(image_id).tolist() if image_id in pred_groups.groups else []
        yield score_image(p, group["annotation"].tolist(), shape)


if __name__ == "__main__":
    sys.exit(main())
