"""Prediction-vs-truth checks of the audit: missed, spurious and misplaced annotations of one image.

:func:`prediction_flags` is the pure function on one image's label and predicted masks; :func:`audit_predictions`
loads an image's predictions (a :mod:`cellkit.predictions` store), binarises them at the class's thresholds and
records the flags into its :class:`cellkit.audit.labels.ImageLabels`.
"""
from typing import NamedTuple

import numpy as np

from cellkit import CELL_TYPES, postprocess
from cellkit import predictions as P
from cellkit.audit.cleanlab import _CleanlabImage
from cellkit.audit.labels import ImageLabels, _first_per_group
from cellkit.geometry import MaskRuns, overlapping_pairs
from cellkit.audit.spec import AuditSpec, image_fractions

class PredictionFlags(NamedTuple):
    """What :func:`prediction_flags` finds in one image (indices into its labels and predictions).

    Attributes:
        confident: int64 ``(K,)`` predictions considered (confident, not detector duplicates), descending score.
        label_best_iou: float64 ``(L,)`` best IoU of each label with a considered prediction (0 when none).
        label_best_pred: int64 ``(L,)`` that prediction (-1 when none touches the label).
        missed: int64 ``(Mi,)`` missed predictions; missed_iou: their best IoU with a label; missed_label: that label
            (-1 when none); missed_coverage: fraction of their pixels on annotations.
        spurious: int64 labels; misplaced: int64 labels.
    """

    confident: np.ndarray
    label_best_iou: np.ndarray
    label_best_pred: np.ndarray
    missed: np.ndarray
    missed_iou: np.ndarray
    missed_label: np.ndarray
    missed_coverage: np.ndarray
    spurious: np.ndarray
    misplaced: np.ndarray


def prediction_flags(labels: MaskRuns, preds: MaskRuns, scores: np.ndarray, confident_score: float,
                     min_pred_area: int = 1, match_iou: float = 0.5, misplaced_iou: float = 0.1,
                     missed_coverage: float = 0.5, pred_nms_ios: float = 0.5) -> PredictionFlags:
    """Missed, spurious and misplaced annotations of one image from its predictions (pure function).

    Args:
        labels: the image's annotations (empty masks are never flagged here).
        preds: the binarised predicted masks (any order).
        scores: float ``(len(preds),)`` detection scores.
        confident_score: predictions scoring at least this are considered.
        min_pred_area: considered predictions need at least this many pixels (and always at least 1).
        match_iou, misplaced_iou, missed_coverage, pred_nms_ios: see :class:`AuditSpec`.

    Returns:
        :class:`PredictionFlags`.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.size != len(preds):
        raise ValueError(f"prediction_flags: {scores.size} scores for {len(preds)} predicted masks")
    n_labels = len(labels)
    candidates = np.flatnonzero((scores >= confident_score) & (preds.areas >= max(int(min_pred_area), 1)))
    candidates = candidates[np.argsort(-scores[candidates], kind="stable")]
    kept = _suppress_duplicates(preds, candidates, pred_nms_ios)

    conf = preds.select(kept)
    li, pj, _, iou = overlapping_pairs(labels, conf)

    label_best_iou, label_best_pred = np.zeros(n_labels), np.full(n_labels, -1, dtype=np.int64)
    pred_best_iou, pred_best_label = np.zeros(len(conf)), np.full(len(conf), -1, dtype=np.int64)
    b = _first_per_group(li, pj, -iou)  # per label: best IoU (ties: the higher-scored prediction)
    label_best_iou[li[b]], label_best_pred[li[b]] = iou[b], kept[pj[b]]
    b = _first_per_group(pj, li, -iou)
    pred_best_iou[pj[b]], pred_best_label[pj[b]] = iou[b], li[b]

    coverage = _coverage(conf, labels)
    missed = (pred_best_iou < match_iou) & (coverage < missed_coverage)
    unmatched = (labels.areas > 0) & (label_best_iou < match_iou)
    return PredictionFlags(
        confident=kept, label_best_iou=label_best_iou, label_best_pred=label_best_pred,
        missed=kept[missed], missed_iou=pred_best_iou[missed], missed_label=pred_best_label[missed],
        missed_coverage=coverage[missed],
        spurious=np.flatnonzero(unmatched & (label_best_iou < misplaced_iou)),
        misplaced=np.flatnonzero(unmatched & (label_best_iou >= misplaced_iou)),
    )


def _suppress_duplicates(preds: MaskRuns, order: np.ndarray, ios: float) -> np.ndarray:
    """Greedy, in ``order`` (descending score): drop a prediction sharing >= ``ios`` of its pixels with a kept one."""
    cand = preds.select(order)
    i, j, inter, _ = overlapping_pairs(cand)  # i < j: i scores higher
    heavy = inter >= ios * cand.areas[j]
    i, j = i[heavy], j[heavy]
    by_lower = np.argsort(j, kind="stable")
    i, j = i[by_lower], j[by_lower]
    bounds = np.searchsorted(j, np.arange(len(cand) + 1))
    keep = np.ones(len(cand), dtype=bool)
    for k in np.unique(j):  # ascending: every higher-scored prediction is decided before k
        keep[k] = not keep[i[bounds[k]:bounds[k + 1]]].any()
    return order[keep].astype(np.int64)


def _coverage(preds: MaskRuns, labels: MaskRuns) -> np.ndarray:
    """float64 ``(len(preds),)``: fraction of each prediction's pixels covered by any label (0 for an empty one)."""
    if len(preds) == 0:
        return np.zeros(0)
    covered = np.concatenate(([0], np.cumsum(labels.union(), dtype=np.int64)))
    per_run = covered[preds.starts + preds.lengths] - covered[preds.starts]
    sums = np.concatenate(([0], np.cumsum(per_run)))
    on_labels = sums[preds.indptr[1:]] - sums[preds.indptr[:-1]]
    return np.divide(on_labels, preds.areas, out=np.zeros(len(preds)), where=preds.areas > 0)



def audit_predictions(image: ImageLabels, pred_path, thresholds: dict, spec: AuditSpec, where: str,
                      label_class: int | None = None
                      ) -> tuple[dict, _CleanlabImage]:
    """Flag the image's missed, spurious and misplaced annotations (:func:`prediction_flags`) into
    ``image.instances``.

    Args:
        image: the image's annotations.
        pred_path: its ``.npz`` in a predictions store.
        thresholds: the cell type's ``score``, ``mask`` and ``min_area`` thresholds
            (:func:`cellkit.postprocess.load_thresholds`).
        spec: the audit's thresholds.
        label_class: the class id of the image's annotations (default: its cell type's index in the Sartorius
            classes).
        where: the train CSV, for the error message.

    Returns:
        ``(record, boxes)``: the image's prediction columns of ``audit.csv`` (``has_pred``, ``n_pred``,
        ``n_confident``, ``n_<kind>``, ``<kind>_fraction``, ``mean_best_iou``) and its boxes for cleanlab.

    Raises:
        ValueError: predictions of an image of another size.
    """
    labels = image.masks
    pred = P.load(pred_path)
    if pred.shape != labels.shape:
        raise ValueError(f"{pred_path}: predictions of a {pred.height}x{pred.width} (HxW) image, {where} says "
                         f"{labels.shape[0]}x{labels.shape[1]} for id {image.image_id}")
    table = postprocess.binarize_table(thresholds["mask"])
    preds = MaskRuns.from_crops([table[m] for m in pred.masks], pred.mask_boxes, labels.shape)
    confident = thresholds["score"] if spec.confident_score is None else spec.confident_score
    pf = prediction_flags(labels, preds, pred.scores, confident, thresholds["min_area"], spec.match_iou,
                          spec.misplaced_iou, spec.missed_coverage, spec.pred_nms_ios)
    for p, v, lab, cov in zip(pf.missed, pf.missed_iou, pf.missed_label, pf.missed_coverage):
        image.flag("missed", None, lab if v > 0 else -1, pred=p, iou=v, ios=cov, pred_score=pred.scores[p],
                   box=preds.boxes[p], area=preds.areas[p])
    for k in pf.spurious:
        image.flag("spurious", k, iou=pf.label_best_iou[k])
    for k in pf.misplaced:
        image.flag("misplaced", k, pred=pf.label_best_pred[k], iou=pf.label_best_iou[k],
                   pred_score=pred.scores[pf.label_best_pred[k]])
    nonempty = labels.areas > 0
    n_labels = int(np.count_nonzero(nonempty))
    counts = {"n_missed": len(pf.missed), "n_spurious": len(pf.spurious), "n_misplaced": len(pf.misplaced)}
    record = {"has_pred": True, "n_pred": len(pred), "n_confident": len(pf.confident), **counts,
              **{f"{k}_fraction": v[0] for k, v in image_fractions({"n_labels": n_labels, **counts}).items()},
              "mean_best_iou": float(pf.label_best_iou[nonempty].mean()) if nonempty.any() else np.nan}
    return record, _CleanlabImage(labels.boxes[nonempty].astype(np.float64),
                                  np.full(n_labels, CELL_TYPES.index(image.cell_type) if label_class is None
                                          else label_class, dtype=np.int64),
                                  pred.boxes.astype(np.float64), pred.classes.astype(np.int64),
                                  pred.scores.astype(np.float64))
