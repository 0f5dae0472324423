"""The full-image form of cellkit's post-processing, the reference the tests and ``benchmarks/bench_postprocess.py``
check :func:`cellkit.postprocess.apply_predictions` against (float masks in, full-image bool masks out)."""
from __future__ import annotations

import numpy as np

from cellkit import postprocess as pp


def apply(classes, scores, prob_masks, thresholds, *, image_class_vote: bool = False, rescore: bool = False,
          vote_min_score: float = 0.5, free_dropped: bool = False) -> list[np.ndarray]:
    """Post-process one image given full-image probability masks: the reference form of
    :func:`cellkit.postprocess.apply_predictions` on the same core (``_pipeline``).

    Args:
        classes: ``(N,)`` cell-type names ('shsy5y', 'astro', 'cort') or their ids.
        scores: float ``(N,)`` detection scores.
        prob_masks: ``N`` float arrays ``(H, W)`` in [0, 1] (or one ``(N, H, W)`` array); a pixel is kept when its
            probability is ``>= thresholds[class]["mask"]`` (compared in the array's dtype, e.g. float32).
        thresholds: ``{name: {"score", "mask", "min_area"}}`` for every class (see :func:`validate_thresholds`).
        image_class_vote: use the image's class (majority vote of detections with score >= ``vote_min_score``)
            for every instance instead of its own.
        rescore: score = score x mean probability inside the binarised mask.
        vote_min_score: confidence of a voting detection.
        free_dropped: a mask dropped for its area leaves its pixels to the lower-scored masks.

    Returns:
        The kept masks, bool ``(H, W)`` each, disjoint, in descending (effective) score order.

    Raises:
        ValueError: unknown class names, mismatched lengths or shapes, invalid thresholds (naming class and key).
    """
    ids = pp.class_ids(list(classes))
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(prob_masks) != len(ids) or len(scores) != len(ids):
        raise ValueError(f"apply: {len(ids)} classes, {len(scores)} scores, {len(prob_masks)} masks: lengths differ")
    options = {"image_class_vote": image_class_vote, "rescore": rescore, "vote_min_score": vote_min_score,
               "free_dropped": free_dropped}
    if len(ids) == 0:
        pp.validate_thresholds(thresholds)
        pp.validate_options(options)
        return []
    masks = [np.asarray(m) for m in prob_masks]
    shape = masks[0].shape
    for i, m in enumerate(masks):
        if m.ndim != 2 or m.shape != shape:
            raise ValueError(f"apply: mask {i} has shape {m.shape}, expected 2-D {shape} like mask 0")
    windows = np.zeros((len(ids), 4), dtype=np.int64)

    def binarize(i, m):
        full = masks[i] >= m if masks[i].dtype != bool else masks[i].copy()
        rows, cols = np.flatnonzero(full.any(axis=1)), np.flatnonzero(full.any(axis=0))
        if not rows.size:
            return np.zeros((0, 0), dtype=bool)
        windows[i] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
        return full[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]

    def prob_mean(i, b):
        if not b.size:
            return 0.0
        x0, y0, x1, y1 = windows[i]
        return float(masks[i][y0:y1, x0:x1][b].mean(dtype=np.float64))

    kept, residuals, *_ = pp._pipeline(ids, scores, windows, binarize, prob_mean, shape, thresholds, options)
    out = []
    for i, r in zip(kept, residuals):
        full = np.zeros(shape, dtype=bool)
        x0, y0, x1, y1 = windows[i]
        full[y0:y1, x0:x1] = r
        out.append(full)
    return out
