"""Benchmark: the label audit (:mod:`cellkit.audit`) on the real train.csv and on planted defects.

(a) Labels-only audit of the whole real ``sartorius/train.csv``: wall time, flags, the top-10 images, and whether
    the images with near-duplicated annotations are flagged: the two the data README names (``a9fc5e872671``,
    ``ce5d0de993bd``) and every image in which an independent check (the full IoU matrix of every image's masks by
    :func:`cellkit.metric.iou_from_indices`, no boxes, no runs) finds a pair at IoU >= 0.9.

(b) Planted defects: ``--images`` real images (default 60, an equal number per cell type, seeded), half of them left
    clean and half given one defect each, the three kinds in turn per cell type:

    - ``dropped``: 25 % of the image's annotations removed (a partly annotated image);
    - ``duplicated``: 10 % of the annotations copied once more, each copy moved by (dy, dx) drawn from {-1, 0, 1}
      (so some copies are exact);
    - ``shifted``: 20 % of the annotations moved by 3 to 5 px in a random direction (clipped at the border).

    (at least one annotation per defective image). OOF-like predictions are generated from the *clean* truth with
    :mod:`cellkit.fakepred` (preset ``realistic``, seed 0): what a model of the real cells would say, so a dropped
    annotation shows up as a confident prediction without label, a shifted one as a misplaced label, and so on.
    The planted train.csv is audited with and without these predictions, and the image-level ROC AUC
    (``sklearn.metrics.roc_auc_score``) of the audit score for defective vs clean images is reported, overall and
    per defect kind (that kind's images vs every clean image), with cleanlab's ``1 - cleanlab_badloc`` for
    comparison.

(c) With ``--full-pred DIR``: the audit of the whole train.csv with fakepred predictions of all 392 images (generated
    into, or resumed from, DIR): its time.

(d) cleanlab's own overlooked / bad-location / swap scores on the planted shsy5y image with the most label x
    prediction box pairs, as cleanlab ships them (pairwise Python loops) and as
    :func:`cellkit.audit.cleanlab_image_scores` gets them (precomputed matrices through cleanlab's public
    ``auxiliary_inputs``): both times and the largest difference of the scores.

Everything runs in this one process; the planted data and predictions go to a temporary folder (``--keep DIR`` to
keep them). Skips cleanly (exit 0, with a message) when the real data is absent. Never writes into the data folder.

Usage::

    .venv/bin/python benchmarks/bench_audit.py [--data DIR] [--images 60] [--seed 0]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from _common import add_data_argument, real_train_csv

README_DUPLICATES = ("a9fc5e872671", "ce5d0de993bd")
DEFECTS = ("dropped", "duplicated", "shifted")
DROP_FRACTION, DUPLICATE_FRACTION, SHIFT_FRACTION = 0.25, 0.10, 0.20
SHIFT_PX = (3.0, 5.0)


# ------------------------------------------------------------------------------------------------ planting
def _shift_mask(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``mask`` moved by ``(dy, dx)`` pixels; what leaves the image is lost."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = mask[ys, xs]
    return out


def plant(table: pd.DataFrame, image_ids: list[str], defects: dict[str, str], seed: int) -> pd.DataFrame:
    """A copy of ``table`` restricted to ``image_ids`` with ``defects[id]`` planted (module docstring).

    Rows of one image stay together; kept rows keep their order, duplicates are appended after the image's rows.
    """
    from cellkit import rle

    rng = np.random.default_rng(seed)
    out = []
    for image_id in image_ids:
        rows = table[table["id"] == image_id]
        kind = defects.get(image_id)
        n = len(rows)
        shape = (int(rows["height"].iat[0]), int(rows["width"].iat[0]))
        if kind is None:
            out.append(rows)
        elif kind == "dropped":
            k = max(1, int(round(DROP_FRACTION * n)))
            drop = set(rng.choice(n, size=k, replace=False).tolist())
            out.append(rows.iloc[[i for i in range(n) if i not in drop]])
        elif kind == "duplicated":
            k = max(1, int(round(DUPLICATE_FRACTION * n)))
            copies = rows.iloc[np.sort(rng.choice(n, size=k, replace=False))].copy()
            moved = []
            for s in copies["annotation"]:
                dy, dx = (int(v) for v in rng.integers(-1, 2, size=2))
                moved.append(rle.encode(_shift_mask(rle.decode(s, shape), dy, dx)))
            copies["annotation"] = moved
            out.append(pd.concat([rows, copies]))
        elif kind == "shifted":
            k = max(1, int(round(SHIFT_FRACTION * n)))
            chosen = set(rng.choice(n, size=k, replace=False).tolist())
            rows = rows.copy()
            values = rows["annotation"].tolist()
            for i in sorted(chosen):
                length, angle = rng.uniform(*SHIFT_PX), rng.uniform(0, 2 * np.pi)
                dy, dx = int(round(length * np.sin(angle))), int(round(length * np.cos(angle)))
                values[i] = rle.encode(_shift_mask(rle.decode(values[i], shape), dy, dx))
            rows["annotation"] = values
            out.append(rows[rows["annotation"] != ""])  # a mask moved out of the image is gone
        else:
            raise ValueError(f"unknown defect {kind!r}")
    planted = pd.concat(out, ignore_index=True)
    planted.attrs["path"] = "planted"
    return planted


def choose(table: pd.DataFrame, n_images: int, seed: int) -> tuple[list[str], dict[str, str]]:
    """``n_images`` ids, equal per cell type (seeded); half of each type defective, the kinds in turn."""
    from cellkit import CELL_TYPES

    rng = np.random.default_rng(seed)
    per_type = n_images // len(CELL_TYPES)
    ids, defects, k = [], {}, 0
    for cell_type in CELL_TYPES:
        pool = sorted(table.loc[table["cell_type"] == cell_type, "id"].unique())
        chosen = [pool[i] for i in sorted(rng.choice(len(pool), size=per_type, replace=False))]
        order = rng.permutation(per_type)
        for rank, i in enumerate(order):
            if rank < per_type // 2:
                defects[chosen[i]] = DEFECTS[k % len(DEFECTS)]
                k += 1
        ids += chosen
    return ids, defects


# ------------------------------------------------------------------------------------------------ checks
def reference_duplicates(table: pd.DataFrame, image_id: str, threshold: float = 0.9) -> list[tuple[int, int, float]]:
    """Pairs (row, row, IoU) of the image's masks at IoU >= threshold, by another algorithm than the audit's:
    :func:`cellkit.metric.iou_from_indices` (the full IoU matrix from pixel-index label maps, no boxes, no runs)."""
    from cellkit import metric, rle

    rows = table[table["id"] == image_id]
    shape = (int(rows["height"].iat[0]), int(rows["width"].iat[0]))
    pixels = [rle.runs_to_indices(*rle.parse(s, shape)) for s in rows["annotation"]]
    iou = metric.iou_from_indices(pixels, pixels)
    i, j = np.nonzero(np.triu(iou >= threshold, k=1))
    return [(int(rows.index[a]), int(rows.index[b]), float(iou[a, b])) for a, b in zip(i, j)]


def auc_report(images: pd.DataFrame, defects: dict[str, str], column: str, sign: float = 1.0) -> dict[str, float]:
    """ROC AUC of ``sign * images[column]`` for defective vs clean, overall and per defect kind."""
    from sklearn.metrics import roc_auc_score

    kinds = images["id"].map(defects).fillna("clean")
    values = sign * images[column].astype(float).fillna(0.0 if sign > 0 else 1.0).to_numpy()
    out = {"all": float(roc_auc_score(kinds != "clean", values))}
    for kind in DEFECTS:
        sel = (kinds == kind) | (kinds == "clean")
        out[kind] = float(roc_auc_score(kinds[sel] != "clean", values[sel]))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_argument(parser)
    parser.add_argument("--images", type=int, default=60, help="planted images (equal per cell type; default 60)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the choice and of the defects (default 0)")
    parser.add_argument("--keep", metavar="DIR", help="keep the planted train.csv and predictions in DIR")
    parser.add_argument("--full-pred", metavar="DIR",
                        help="also time the audit of the whole train.csv with fakepred predictions of every image, "
                             "written to (or resumed in) DIR")
    args = parser.parse_args()
    csv_path = real_train_csv(args.data, "bench_audit")
    if csv_path is None:
        return 0

    from cellkit import audit, fakepred
    from cellkit import predictions as P
    from cellkit.data import read_train_csv

    # ---------------------------------------------------------------- (a) the real train.csv, labels only
    t0 = time.perf_counter()
    truth = read_train_csv(csv_path)
    t_read = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = audit.audit(truth, progress=False)
    t_audit = time.perf_counter() - t0
    images = result.images
    print(f"(a) labels-only audit of {csv_path}: {len(images)} images, {len(truth)} annotations in {t_audit:.2f} s "
          f"(+ {t_read:.2f} s reading the CSV), one process")
    print(f"    flags: {result.summary['flags']}; images with a flag: {result.summary['n_flagged_images']}")
    print("    top 10:")
    print(images.head(10)[["id", "cell_type", "score", "n_labels", "flags"]].to_string(index=False))
    rank = {i: k + 1 for k, i in enumerate(images["id"])}
    dup_images = sorted(set(result.instances.loc[result.instances["kind"] == "duplicate", "id"]))
    for image_id in README_DUPLICATES:
        if image_id not in rank:
            print(f"    README's near-duplicate image {image_id}: NOT in this train.csv (cannot be flagged)")
        else:
            flags = images.loc[images["id"] == image_id, "flags"].iat[0]
            print(f"    README's near-duplicate image {image_id}: rank {rank[image_id]}, flags {flags or '(none)'}")
    t0 = time.perf_counter()
    reference = {i: reference_duplicates(truth, i) for i in truth["id"].unique()}
    truth_dups = sorted(i for i, pairs in reference.items() if pairs)
    print(f"    reference check (full IoU matrices by cellkit.metric, {time.perf_counter() - t0:.1f} s): images with a "
          f"pair at IoU >= 0.9: {truth_dups}")
    for image_id in truth_dups:
        flagged_rows = set(result.instances.loc[(result.instances["kind"] == "duplicate")
                                                & (result.instances["id"] == image_id), "row"].astype(int))
        expected = {b for _, b, _ in reference[image_id]}
        flags = images.loc[images["id"] == image_id, "flags"].iat[0]
        values = [v for *_, v in reference[image_id]]
        print(f"      {image_id}: {len(values)} pair(s) (IoU {min(values):.3f}..{max(values):.3f}), flagged rows "
              f"match: {flagged_rows == expected}, "
              f"rank {rank[image_id]}, flags {flags}")
    print(f"    all near-duplicate images flagged: {set(truth_dups) == set(dup_images)}")

    # ---------------------------------------------------------------- (b) planted defects
    ids, defects = choose(truth, args.images, args.seed)
    planted = plant(truth, ids, defects, args.seed)
    clean = truth[truth["id"].isin(ids)].copy()
    clean.attrs["path"] = str(csv_path)
    counts = pd.Series(defects).value_counts().to_dict()
    print(f"\n(b) planted: {len(ids)} images ({len(ids) - len(defects)} clean, defective: {counts}); seed {args.seed}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        store = fakepred.generate(clean, work / "fakepred", seed=0, progress=False, resume=False)
        t_fake = time.perf_counter() - t0
        planted.to_csv(work / "planted_train.csv", index=False)
        t0 = time.perf_counter()
        labels_only = audit.audit(planted, progress=False)
        t_labels = time.perf_counter() - t0
        t0 = time.perf_counter()
        with_pred = audit.audit(planted, pred_dir=store, progress=False)
        t_pred = time.perf_counter() - t0
        if args.keep:
            audit.write_audit(with_pred, work / "audit")
        sizes = planted.groupby("id").size()
        shsy5y = [i for i in ids if planted.loc[planted["id"] == i, "cell_type"].iat[0] == "shsy5y"]
        pairs = {i: sizes[i] * len(P.load(Path(store) / f"{i}.npz")) for i in shsy5y}
        worst = max(pairs, key=pairs.get)  # for (d)
        worst_pred = P.load(Path(store) / f"{worst}.npz")
    print(f"    fakepred (preset realistic, seed 0) from the clean truth: {t_fake:.1f} s; audit labels-only "
          f"{t_labels:.2f} s, with predictions {t_pred:.2f} s")
    rows = [("labels only: score", auc_report(labels_only.images, defects, "score")),
            ("with fakepred predictions: score", auc_report(with_pred.images, defects, "score")),
            ("  of which label_score", auc_report(with_pred.images, defects, "label_score")),
            ("  of which pred_score", auc_report(with_pred.images, defects, "pred_score")),
            ("cleanlab: 1 - cleanlab_badloc", auc_report(with_pred.images, defects, "cleanlab_badloc", -1.0))]
    print(f"    {'image-level ROC AUC (defective vs clean)':44} {'all':>6} " + " ".join(f"{k:>10}" for k in DEFECTS))
    for name, r in rows:
        print(f"    {name:44} {r['all']:6.3f} " + " ".join(f"{r[k]:10.3f}" for k in DEFECTS))
    frame = with_pred.images.assign(planted=with_pred.images["id"].map(defects).fillna("clean"))
    print("    mean score by planted kind (with predictions):")
    print(frame.groupby("planted")[["score", "label_score", "pred_score", "n_missed", "n_spurious",
                                    "n_misplaced", "mean_best_iou", "cleanlab_badloc"]].mean().round(4).to_string())
    if args.full_pred:
        t0 = time.perf_counter()
        fakepred.generate(truth, args.full_pred, seed=0, progress=False)
        t_gen = time.perf_counter() - t0
        t0 = time.perf_counter()
        full = audit.audit(truth, pred_dir=args.full_pred, progress=False)
        print(f"\n(c) audit of the whole train.csv with fakepred predictions of all {len(full.images)} images "
              f"({t_gen:.1f} s to generate or resume them in {args.full_pred}): {time.perf_counter() - t0:.1f} s; "
              f"flags {full.summary['flags']}")
    # ---------------------------------------------------------------- (d) cleanlab as shipped vs precomputed matrices
    from cleanlab.object_detection import rank as cl_rank

    pred = worst_pred
    one = with_pred.images[with_pred.images["id"] == worst]
    mr = audit.MaskRuns.from_rles(planted.loc[planted["id"] == worst, "annotation"].tolist())
    keep = mr.areas > 0
    image = audit._CleanlabImage(mr.boxes[keep].astype(float), np.full(int(keep.sum()), 0), pred.boxes.astype(float),
                                 pred.classes, pred.scores.astype(float))
    labels, predictions = audit.cleanlab_format([image])
    t0 = time.perf_counter()
    shipped = np.stack([cl_rank.pool_box_scores_per_image(f(labels=labels, predictions=predictions, **kw)) for f, kw in
                        ((cl_rank.compute_overlooked_box_scores, {}), (cl_rank.compute_badloc_box_scores, {}),
                         (cl_rank.compute_swap_box_scores, {"overlapping_label_check": False}))], axis=1)
    t_shipped = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast = audit.cleanlab_image_scores([image])
    t_fast = time.perf_counter() - t0
    print(f"\n(d) cleanlab overlooked / badloc / swap scores on {worst} ({int(keep.sum())} labels x {len(pred)} "
          f"predictions): as shipped {t_shipped:.2f} s, precomputed matrices {t_fast:.3f} s "
          f"({t_shipped / t_fast:.0f}x); |difference| {float(np.abs(shipped - fast).max()):.1e}; the audit's "
          f"cleanlab_badloc (with the data set's min similarity) {float(one['cleanlab_badloc'].iat[0]):.4f}")

    must = rows[1][1]["all"]
    print(f"\nmust-reach: AUC with fakepred predictions {must:.3f} >= 0.9: {'yes' if must >= 0.9 else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
