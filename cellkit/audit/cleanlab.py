"""Optional cleanlab columns of ``audit.csv``: ObjectLab's subtype scores, through cleanlab's public API only.

``cleanlab.object_detection`` (ObjectLab) scores images from boxes and per-class prediction arrays; it needs
predictions. ``cleanlab_overlooked``, ``cleanlab_badloc`` and ``cleanlab_swap`` (each in [0, 1], lower worse) are
``rank.compute_overlooked_box_scores``, ``rank.compute_badloc_box_scores`` and ``rank.compute_swap_box_scores``
(``overlapping_label_check`` off: it only penalises a box labelled with two different classes, which cannot happen
in an image of one cell type) pooled per image by ``rank.pool_box_scores_per_image``, all with cleanlab's defaults.

Speed, by public parameters only: cleanlab builds every box IoU and centre-distance matrix with two nested Python
loops (~60 us per label x prediction pair: ~9 s for one median shsy5y image of 312 labels x 453 predictions). Its
box-score functions take the matrices precomputed (``auxiliary_inputs``), so :func:`cleanlab_matrices` computes them
with numpy (the same values as cleanlab's loops, tested) together with the data set's smallest similarity. The
overlooked and swap functions still compute the IoU matrix again themselves, so they get only the predictions that
they can score: overlooked, those of probability >= :data:`HIGH_PROBABILITY` whose box touches no label box; swap,
those of probability > :data:`HIGH_PROBABILITY` of a class another than a label's. The others get no score there
(overlooked) or are never compared (swap), so the pooled scores are unchanged.

cleanlab is optional: without it the three columns stay empty (with a warning) and nothing else changes. Where it
does not fit, and why the columns are not part of ``score``:

- it works on boxes, not masks: crowded shsy5y boxes overlap their neighbours, so box IoU cannot tell a shifted mask
  from a neighbour's, and its overlooked subtype only considers predictions whose box touches no label box at all;
- its overlooked subtype only looks at predictions with probability >= 0.95; many detectors, and the generated
  ``fakepred`` predictions, rarely score that high;
- it has no "label without any prediction" subtype: a label that no confident prediction touches gets the best
  bad-location score (1.0);
- it pools the box scores with a soft minimum (temperature 0.1): with hundreds of cells per image the worst box of
  every image is bad, so the image scores saturate in crowded images;
- the swap subtype (a box with the wrong class) means little here: every image has one cell type, which is known;
- ObjectLab's overall image quality (``rank.get_label_quality_scores``) is not a column: that public function takes
  no precomputed matrices, so it would run cleanlab's pairwise loops (seconds per crowded image);
- ``filter.find_label_issues`` is not used: it computes the pairwise box IoUs again for a per-class box AP at ten IoU
  thresholds (~15 s for the same image), starts a ``multiprocessing.Pool`` whenever it gets more than one image (even
  for one process), and decides with dataset-wide per-class box-AP thresholds.
"""
import logging
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from cellkit import CELL_TYPES

logger = logging.getLogger(__name__)

CLEANLAB_COLUMNS = ("cleanlab_overlooked", "cleanlab_badloc", "cleanlab_swap")  # cleanlab_image_scores' order
ALPHA = 0.9  # ObjectLab's weight of box IoU against centre distance in its similarity (cleanlab's default alpha)
EUC_FACTOR = 0.1  # ObjectLab's centre-distance decay: the distance term is exp(-EUC_FACTOR * distance in pixels)
EPSILON = 1e-6  # the smallest box union of ObjectLab's IoU (no division by 0)
HIGH_PROBABILITY = 0.95  # ObjectLab's high_probability_threshold (its default), given to the overlooked/swap scores


class _CleanlabImage(NamedTuple):
    """One image's boxes for ObjectLab: labels XYXY + class, predictions XYXY + class + probability.

    Attributes:
        label_boxes: float64 ``(L, 4)``; label_classes: int64 ``(L,)`` (indices into :data:`cellkit.CELL_TYPES`).
        pred_boxes: float64 ``(M, 4)``; pred_classes: int64 ``(M,)``; pred_probs: float64 ``(M,)``.
    """

    label_boxes: np.ndarray
    label_classes: np.ndarray
    pred_boxes: np.ndarray
    pred_classes: np.ndarray
    pred_probs: np.ndarray


def cleanlab_matrices(label_boxes: np.ndarray, pred_boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Box IoU and ObjectLab similarity matrices, vectorised, with the values cleanlab's own loops give.

    ``iou`` is ObjectLab's box IoU (intersection / max(union, :data:`EPSILON`)); ``similarity = ALPHA * iou +
    (1 - ALPHA) * d`` with the centre-distance term ``d = exp(-EUC_FACTOR * distance of the box centres)``, written
    ``1 - (1 - d)`` as cleanlab computes it (so the values are equal to the last bit).

    Args:
        label_boxes: float ``(L, 4)`` XYXY; pred_boxes: float ``(M, 4)`` XYXY.

    Returns:
        ``(iou, similarity)``, float64 ``(L, M)`` each.
    """
    a = np.asarray(label_boxes, dtype=np.float64).reshape(-1, 4)[:, None, :]
    b = np.asarray(pred_boxes, dtype=np.float64).reshape(-1, 4)[None, :, :]
    w = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0])
    h = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])
    inter = np.where((w < 0) | (h < 0), 0.0, w * h)
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    iou = inter / np.clip(area_a + area_b - inter, EPSILON, None)
    dx = (a[..., 0] + a[..., 2]) / 2 - (b[..., 0] + b[..., 2]) / 2
    dy = (a[..., 1] + a[..., 3]) / 2 - (b[..., 1] + b[..., 3]) / 2
    return iou, iou * ALPHA + (1 - ALPHA) * (1 - (1 - np.exp(-np.sqrt(dx * dx + dy * dy) * EUC_FACTOR)))


def cleanlab_format(images: Sequence[_CleanlabImage]) -> tuple[list[dict], list[list[np.ndarray]]]:
    """Images in the input formats of ``cleanlab.object_detection``.

    Returns:
        ``(labels, predictions)``: ``labels[i] = {"bboxes": float (L, 4) XYXY, "labels": int (L,)}``;
        ``predictions[i][k]``: float ``(M_k, 5)`` rows ``[x1, y1, x2, y2, probability]`` of the predictions of class
        ``k`` (one array per class: the dataset's, at least the three of :data:`cellkit.CELL_TYPES`).
    """
    labels = [{"bboxes": np.asarray(im.label_boxes, dtype=np.float64).reshape(-1, 4),
               "labels": np.asarray(im.label_classes, dtype=np.int64)} for im in images]
    # one array per class: at least the Sartorius three, more for a dataset with more classes
    n_classes = max([len(CELL_TYPES)] + [int(np.max(c, initial=-1)) + 1 for im in images
                                         for c in (im.label_classes, im.pred_classes)])
    predictions = []
    for im in images:
        boxes = np.asarray(im.pred_boxes, dtype=np.float64).reshape(-1, 4)
        probs = np.asarray(im.pred_probs, dtype=np.float64).reshape(-1, 1)
        classes = np.asarray(im.pred_classes, dtype=np.int64)
        predictions.append([np.concatenate([boxes[classes == k], probs[classes == k]], axis=1)
                            for k in range(n_classes)])
    return labels, predictions


def _auxiliary_inputs(images: Sequence[_CleanlabImage]) -> list[dict]:
    """cleanlab's ``auxiliary_inputs`` of the images: per image its boxes, classes, probabilities, IoU and similarity
    matrices, and the data set's smallest non-zero similarity; predictions in cleanlab's order (by class)."""
    out = []
    for im in images:
        order = np.argsort(np.asarray(im.pred_classes, dtype=np.int64), kind="stable")
        pred_bboxes = np.asarray(im.pred_boxes, dtype=np.float64).reshape(-1, 4)[order]
        lab_bboxes = np.asarray(im.label_boxes, dtype=np.float64).reshape(-1, 4)
        iou, similarity = cleanlab_matrices(lab_bboxes, pred_bboxes)
        out.append({"pred_labels": np.asarray(im.pred_classes, dtype=np.int64)[order],
                    "pred_label_probs": np.asarray(im.pred_probs, dtype=np.float64)[order], "pred_bboxes": pred_bboxes,
                    "lab_labels": np.asarray(im.label_classes, dtype=np.int64), "lab_bboxes": lab_bboxes,
                    "similarity_matrix": similarity, "iou_matrix": iou})
    smallest = min([1.0] + [float(a["similarity_matrix"][a["similarity_matrix"] != 0].min()) for a in out
                            if np.any(a["similarity_matrix"])])
    return [{**a, "min_possible_similarity": smallest} for a in out]


def _predictions_only(aux: dict, keep: np.ndarray) -> dict:
    """An auxiliary input with only the predictions ``keep`` (bool ``(M,)``)."""
    return {**aux, "pred_labels": aux["pred_labels"][keep], "pred_label_probs": aux["pred_label_probs"][keep],
            "pred_bboxes": aux["pred_bboxes"][keep], "similarity_matrix": aux["similarity_matrix"][:, keep],
            "iou_matrix": aux["iou_matrix"][:, keep]}


def cleanlab_image_scores(images: Sequence[_CleanlabImage]) -> np.ndarray:
    """ObjectLab's overlooked, bad-location and swap scores of each image, by cleanlab's public functions (module
    docstring).

    Args:
        images: per image, boxes and classes (class ids index :data:`cellkit.CELL_TYPES`).

    Returns:
        float64 ``(N, 3)``: overlooked, bad location, swap (each in [0, 1], lower worse; :data:`CLEANLAB_COLUMNS`).
    """
    if not images:
        return np.zeros((0, len(CLEANLAB_COLUMNS)))
    from cleanlab.object_detection import rank

    aux = _auxiliary_inputs(images)
    overlooked = [_predictions_only(a, (a["pred_label_probs"] >= HIGH_PROBABILITY) & ~(a["iou_matrix"] > 0).any(axis=0))
                  for a in aux]
    swap = [_predictions_only(a, (a["pred_label_probs"] > HIGH_PROBABILITY)
                              & (a["pred_labels"][:, None] != a["lab_labels"][None, :]).any(axis=1)) for a in aux]
    box_scores = (
        rank.compute_overlooked_box_scores(alpha=ALPHA, high_probability_threshold=HIGH_PROBABILITY,
                                           auxiliary_inputs=overlooked),
        rank.compute_badloc_box_scores(alpha=ALPHA, auxiliary_inputs=aux),
        rank.compute_swap_box_scores(alpha=ALPHA, high_probability_threshold=HIGH_PROBABILITY,
                                     overlapping_label_check=False, auxiliary_inputs=swap))
    return np.stack([rank.pool_box_scores_per_image(s) for s in box_scores], axis=1).astype(np.float64)


def add_cleanlab_columns(images: "pandas.DataFrame", boxes: dict[int, _CleanlabImage]) -> None:
    """Fill the :data:`CLEANLAB_COLUMNS` of ``images`` (in place) at the rows ``boxes`` names (index labels), from
    those images' boxes; with a warning and nothing filled when cleanlab is not installed."""
    if not boxes:
        return
    try:
        scores = cleanlab_image_scores(list(boxes.values()))
    except ImportError:  # cleanlab_image_scores imports cleanlab before any work
        logger.warning("cellkit audit: cleanlab is not installed: the cleanlab_* columns stay empty (pip install "
                       "'cleanlab>=2.9'); every flag and the score are computed without it")
        return
    images.loc[list(boxes), list(CLEANLAB_COLUMNS)] = scores
