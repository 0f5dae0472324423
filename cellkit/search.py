"""Class-wise threshold search on out-of-fold predictions -> ``thresholds.json``.

For each of the four option sets (own class / image-class vote x rescoring off / on), the per-class thresholds
``score``, ``mask`` and ``min_area`` are chosen on a grid to maximise the competition metric (mean over the images that
have predictions), by coordinate ascent over the classes: one class's three thresholds are searched exhaustively with
the other classes fixed, then the next class, until a round changes nothing (one round is exact when no image mixes
classes, e.g. always with the vote). The option set with the best mAP wins (ties keep the seed's options).

The third option, ``free_dropped`` (a mask dropped for its area leaves its pixels to lower-scored masks, see
:mod:`cellkit.postprocess`), is not swept: with it, whether a mask is kept depends on which higher-scored masks were
kept, so the area filter no longer separates from the overlap removal (the sweep below relies on that). Instead the
winner's thresholds are re-evaluated exactly, through :func:`cellkit.postprocess.apply_predictions` and
:func:`cellkit.metric.score_sets` on every image, once with dropped masks claiming their pixels and once freeing
them; the better mAP wins, a tie keeps the default (claiming), and both figures go to ``search.free_dropped`` of
``thresholds.json``. ``metric.after`` is the exact figure of the chosen setting. The thresholds themselves are
those optimal under claiming, so this can only under-rate ``free_dropped`` (never choose it where it scores worse).

Exactness: the sweep evaluates exactly what :func:`cellkit.postprocess.apply_predictions` (``free_dropped`` off)
followed by :func:`cellkit.metric.score_image` gives (tested). Speed comes from sweeping the score threshold and the
minimum area without re-running post-processing:

- per image, once: the pixels of every probability crop at or above the smallest pixel threshold of the grid, as
  flat entries ``(instance, pixel, uint8 probability, truth label)``; the per-instance sums for rescoring;
- per image, class ``c`` and pixel threshold ``m`` (one *call*): which instance owns each pixel after overlap removal
  depends on the score threshold ``s`` of ``c`` only through one switch per pixel: instances of the other classes
  are fixed, instances of ``c`` that pass form a prefix of the score order, so a pixel belongs to its first covering
  instance of ``c`` while that one passes (``s <= its score``), else to its first covering fixed instance. That turns
  residual areas and intersections with the truth into step functions of ``s``, built with one difference array per
  call (``bincount`` + ``cumsum``) for all grid values of ``s`` at once;
- the minimum-area filter is then a comparison of residual areas, and the metric for every ``(s, min_area)`` is
  counted from the pairs with IoU > 0.5: residual masks are disjoint, so no truth has two such partners and the
  maximum matching of :mod:`cellkit.metric` counts the kept predictions whose best IoU exceeds ``t``.

Work is sharded over processes by image (each holds its own images), so the peak memory is the entries of all images
once (a few hundred MiB for the 392 real images with realistic generated predictions; see benchmarks/RESULTS.md).
"""
import functools
import logging
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellkit import CELL_TYPES, __version__, metric, postprocess as pp, predictions as P, rle
from cellkit.schema import SARTORIUS, schema_of
from cellkit.geometry import MaskRuns

__all__ = ["DEFAULT_GRID", "OPTION_SETS", "make_grid", "ImageData", "prepare_image", "image_scores",
           "exact_image_scores", "truth_mask_set", "ThresholdSearch", "search", "plot_search"]

logger = logging.getLogger(__name__)

#: The default search grid (the seed's defaults 0.5 / 0.5 / 0 are always added).
DEFAULT_GRID = {
    "score": [round(0.1 + 0.05 * i, 2) for i in range(17)],             # 0.10, 0.15, ..., 0.90
    "mask": [round(0.3 + 0.05 * i, 2) for i in range(9)],               # 0.30, 0.35, ..., 0.70
    "min_area": [0, 10, 20, 30, 40, 50, 60, 80, 100, 120, 150, 200, 250, 300],
}

#: The option sets tried, the seed's first (it wins ties).
OPTION_SETS = [
    {"image_class_vote": False, "rescore": False},
    {"image_class_vote": False, "rescore": True},
    {"image_class_vote": True, "rescore": False},
    {"image_class_vote": True, "rescore": True},
]


def make_grid(score=None, mask=None, min_area=None) -> dict[str, list]:
    """A validated, sorted search grid that contains the seed's defaults (score 0.5, mask 0.5, min_area 0).

    Raises:
        ValueError: an empty axis or a value out of range (score in [0, 1], mask in (0, 1], min_area integer >= 0).
    """
    out = {}
    for key, values, seed in (("score", score, 0.5), ("mask", mask, 0.5), ("min_area", min_area, 0)):
        values = [float(v) for v in (DEFAULT_GRID[key] if values is None else values)]
        if not values:
            raise ValueError(f"search grid {key!r} is empty")
        for v in values:  # same rules as a thresholds file
            pp.validate_thresholds({c: {**pp.SEED_THRESHOLDS[c], key: v} for c in CELL_TYPES},
                                   f"search grid {key!r}")
        out[key] = [int(v) if key == "min_area" else v for v in sorted(set(values) | {float(seed)})]
    return out


# ------------------------------------------------------------------------------------------------ per-image data
@dataclass
class ImageData:
    """What the search needs of one image, computed once (see the module docstring).

    Instances are those whose raw score reaches the smallest grid score threshold (rescoring only lowers scores).
    Entries are the pixels of their crops with a probability at or above the smallest grid pixel threshold, sorted
    by the instance's own class (``block`` offsets) and, within a class, by descending probability, so that the
    entries kept at a pixel threshold are a prefix of each class block (``prefix[class, mask index]`` long).

    Attributes:
        image_id, cell_type: the image and its true cell type.
        n_truth: number of true masks M; ``truth_area`` int64 ``(M,)``.
        classes: int64 ``(N,)`` own class; ``scores``: float64 ``(N,)`` raw score.
        vote: the image's voted class id from all its raw detections (-1 without detections).
        inst, pix: int32 ``(L,)`` entry instance and flat row-major pixel; ``q``: uint8 ``(L,)`` probability x 255.
        tlab: int32 ``(L,)`` first true mask covering the entry's pixel (-1 none); ``extra_entry``/``extra_truth``:
            further true masks at entries whose pixel lies in several (true masks may overlap).
        block: int64 ``(n_groups + 1,)`` entry offsets of the class blocks; ``prefix``: int64 ``(n_groups, n_mask)``.
        qsum, qcount: float64 / int64 ``(n_mask, N)`` sum of q and count over the pixels kept at each grid pixel
            threshold (for rescoring; exactly as :func:`cellkit.postprocess.apply_predictions` computes them).
        n_pixels: H x W.
    """

    image_id: str
    cell_type: str
    n_truth: int
    truth_area: np.ndarray
    classes: np.ndarray
    scores: np.ndarray
    vote: int
    inst: np.ndarray
    pix: np.ndarray
    q: np.ndarray
    tlab: np.ndarray
    extra_entry: np.ndarray
    extra_truth: np.ndarray
    block: np.ndarray
    prefix: np.ndarray
    qsum: np.ndarray
    qcount: np.ndarray
    n_pixels: int


def _truth_labels(truth_indices: list[np.ndarray], pix: np.ndarray, n_pixels: int):
    """Primary truth label of each entry pixel and the (entry, truth) pairs of overlapping truths."""
    tmap = np.full(n_pixels, -1, dtype=np.int32)
    extra_pix, extra_lab = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int32)]
    for k, idx in enumerate(truth_indices):
        taken = tmap[idx] >= 0
        extra_pix.append(idx[taken])
        extra_lab.append(np.full(int(taken.sum()), k, dtype=np.int32))
        tmap[idx[~taken]] = k
    xp, xl = np.concatenate(extra_pix), np.concatenate(extra_lab)
    order = np.argsort(xp, kind="stable")
    xp, xl = xp[order], xl[order]
    cand = np.flatnonzero(np.isin(pix, xp, kind="table"))
    lo = np.searchsorted(xp, pix[cand], side="left")
    n = np.searchsorted(xp, pix[cand], side="right") - lo
    extra_truth = xl[np.repeat(lo, n) + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))]
    return tmap[pix], np.repeat(cand, n).astype(np.int64), extra_truth.astype(np.int32)


def prepare_image(pred: P.InstancePredictions, truth_indices: list[np.ndarray], cell_type: str, grid: dict,
                  vote_min_score: float = 0.5, n_groups: int = len(CELL_TYPES)) -> ImageData:
    """Per-image precomputation for the search.

    Args:
        pred: the image's predictions, classes as group ids (:func:`cellkit.postprocess.group_view`).
        n_groups: the number of groups (thresholds).
        truth_indices: sorted flat pixel indices of each true mask (empty masks excluded).
        cell_type: the image's true cell type.
        grid: the search grid (:func:`make_grid`).
        vote_min_score: confidence of a voting detection.
    """
    # smallest uint8 probability kept at each pixel threshold (256 when none is)
    qthr = np.array([np.argmax(np.append(pp.binarize_table(m), True)) for m in grid["mask"]], dtype=np.int64)
    scores = pred.scores.astype(np.float64)
    vote = pp.vote_class(pred.classes, scores, vote_min_score)
    alive = np.flatnonzero(scores >= min(grid["score"]))
    n = alive.size
    boxes = pred.mask_boxes[alive].astype(np.int64).reshape(-1, 4)
    w = boxes[:, 2] - boxes[:, 0]
    sizes = (boxes[:, 3] - boxes[:, 1]) * w
    data = (np.concatenate([pred.masks[i].reshape(-1) for i in alive]) if n else np.zeros(0, dtype=np.uint8))
    owner = np.repeat(np.arange(n), sizes)
    # per-instance histograms of q -> sums and counts over q >= each threshold (for rescoring); column 256 (no
    # value) stays empty, for the thresholds that keep nothing
    hist = np.bincount(owner * 257 + data, minlength=n * 257).reshape(n, 257)
    qcount = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, qthr].T
    qsum = np.cumsum((hist * np.arange(257))[:, ::-1], axis=1)[:, ::-1][:, qthr].T.astype(np.float64)
    # entries: crop pixels at or above the smallest pixel threshold
    sel = np.flatnonzero(data >= qthr.min())
    inst = owner[sel]
    r, c = np.divmod(sel - (np.cumsum(sizes) - sizes)[inst], np.maximum(w[inst], 1))  # position in the crop
    pix = (boxes[inst, 1] + r) * pred.width + boxes[inst, 0] + c
    q = data[sel]
    cls = pred.classes[alive].astype(np.int64)
    order = np.lexsort((-q.astype(np.int64), cls[inst]))  # by class, then descending probability
    inst, pix, q = inst[order].astype(np.int32), pix[order].astype(np.int32), q[order]
    block = np.searchsorted(cls[inst], np.arange(n_groups + 1), side="left").astype(np.int64)
    prefix = np.array([np.searchsorted(-q[block[b]:block[b + 1]].astype(np.int64), -qthr, side="right")
                       for b in range(n_groups)], dtype=np.int64)  # -q is ascending in a block
    return ImageData(pred.image_id, cell_type, len(truth_indices),
                     np.array([t.size for t in truth_indices], dtype=np.int64), cls, scores[alive],
                     -1 if vote is None else vote, inst, pix, q,
                     *_truth_labels(truth_indices, pix, pred.height * pred.width),  # tlab, extra_entry, extra_truth
                     block, prefix, qsum, qcount, pred.height * pred.width)


def effective(img: ImageData, vote: bool) -> np.ndarray:
    """Class id whose thresholds each instance uses (own class or the image's vote)."""
    return np.full(img.classes.shape, img.vote, dtype=np.int64) if vote and img.vote >= 0 else img.classes


def _effective_scores(img: ImageData, rescore: bool, mask_of_instance: np.ndarray) -> np.ndarray:
    """Score used for filtering and ordering: raw, or raw x mean kept probability (as postprocess computes it)."""
    if not rescore:
        return img.scores
    cols = np.arange(img.scores.size)
    cnt = img.qcount[mask_of_instance, cols]
    return img.scores * np.divide(img.qsum[mask_of_instance, cols], 255.0 * cnt, out=np.zeros(cnt.size), where=cnt > 0)


def _block_entries(img: ImageData, blocks, mask_index: np.ndarray, alive: np.ndarray, vote: bool) -> np.ndarray:
    """Indices of the entries of the given class blocks (own classes) kept at the pixel threshold of their
    effective class, of alive instances."""
    block_mask = np.full(len(img.block) - 1, mask_index[img.vote]) if (vote and img.vote >= 0) else mask_index
    parts = [np.arange(img.block[b], img.block[b] + img.prefix[b, block_mask[b]]) for b in blocks]
    idx = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return idx if alive[np.isin(img.classes, blocks)].all() else idx[alive[img.inst[idx]]]


def _below(keys: np.ndarray, hi: np.ndarray, n_keys: int, ns: int, weights=None) -> np.ndarray:
    """Sum of the weights (default 1) of the items ``(key, hi)`` meaning "weight for every score index k < hi":
    ``(n_keys, ns)``, the value at ``[key, k]`` summing the items of that key with ``hi > k``."""
    acc = np.bincount(keys * (ns + 1) + hi, weights=weights, minlength=n_keys * (ns + 1)).reshape(n_keys, ns + 1)
    return np.cumsum(acc[:, ::-1], axis=1)[:, ::-1][:, 1:]


def _dense_counts(keys: np.ndarray, n_keys: int) -> tuple[np.ndarray, np.ndarray]:
    """``(distinct keys, counts)`` of int keys in ``[0, n_keys)``."""
    if n_keys <= 8 * keys.size or n_keys <= 4096:
        counts = np.bincount(keys, minlength=n_keys)
        nz = np.flatnonzero(counts)
        return nz, counts[nz]
    return np.unique(keys, return_counts=True)


@dataclass
class _Fixed:
    """Ownership by the fixed (other-class) instances alone, shared by every pixel threshold of the swept class."""

    order: np.ndarray      # fixed instance indices by descending score
    first: np.ndarray      # int32 (H*W,) rank in ``order`` of the first fixed instance at each pixel (none: order.size)
    area: np.ndarray       # int64 (N,) residual area without the swept class (0 for the swept class)
    pair_keys: np.ndarray  # inst * M + truth
    pair_counts: np.ndarray


_SCRATCH: dict[int, np.ndarray] = {}  # a reused int32 pixel buffer per image size, all _NONE between uses
_NONE = np.iinfo(np.int32).max


def _owners(img: ImageData, alive: np.ndarray, eff_score: np.ndarray, blocks, mask_index: np.ndarray, vote: bool):
    """``(order, rank, owned)``: the alive instances by descending score, each instance's rank in ``order`` (int32
    ``(N,)``, ``order.size`` when not alive) and the entries of the given class blocks whose instance is the first
    of ``order`` at their pixel (the smallest rank at each pixel is found in a reused pixel buffer)."""
    idx = np.flatnonzero(alive)
    order = idx[np.argsort(-eff_score[idx], kind="stable")]
    rank = np.full(alive.size, order.size, dtype=np.int32)
    rank[order] = np.arange(order.size)
    e = _block_entries(img, blocks, mask_index, alive, vote)
    pix, e_rank = img.pix[e], rank[img.inst[e]]
    buf = _SCRATCH.get(img.n_pixels)
    if buf is None:
        buf = _SCRATCH[img.n_pixels] = np.full(img.n_pixels, _NONE, dtype=np.int32)
    np.minimum.at(buf, pix, e_rank)
    owned = e[e_rank == buf[pix]]
    buf[pix] = _NONE
    return order, rank, owned


def _truth_keys(img: ImageData, entries: np.ndarray, inst: np.ndarray, carry: np.ndarray | None = None):
    """``inst * M + truth`` for every (entry, covering truth) of the given owned entries (sorted entry indices);
    with ``carry``, also ``(keys, carry)``: those per-entry values repeated in the same order."""
    t = img.tlab[entries]
    has = t >= 0
    pos, truth = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if img.extra_entry.size and entries.size:  # the further true masks at the entries' pixels
        pos = np.minimum(np.searchsorted(entries, img.extra_entry), entries.size - 1)
        hit = entries[pos] == img.extra_entry
        pos, truth = pos[hit], img.extra_truth[hit].astype(np.int64)
    keys = np.concatenate([inst[has] * img.n_truth + t[has], inst[pos] * img.n_truth + truth])
    return keys if carry is None else (keys, np.concatenate([carry[has], carry[pos]]))


def sweep_image(img: ImageData, vote: bool, rescore: bool, c: int, mask_index: np.ndarray,
                fixed_score: np.ndarray, fixed_area: np.ndarray, masks: list[int], score_grid: np.ndarray,
                area_grid: np.ndarray) -> np.ndarray:
    """Image score (mean precision over the IoU thresholds) for every pixel threshold, score threshold and minimum
    area of class ``c``, the other classes fixed.

    Args:
        img: the image's data.
        vote: image-class vote (else each instance's own class).
        rescore: score = score x mean kept probability.
        mask_index: int ``(n_groups,)`` index into the pixel-threshold grid of each class (class c's is ignored).
        fixed_score, fixed_area: ``(n_groups,)`` score threshold and minimum area of each class (class c's are
            ignored).
        c: the swept class id.
        masks: indices into the pixel-threshold grid to evaluate for class c.
        score_grid: float64 ``(ns,)`` ascending score thresholds; area_grid: int64 ``(na,)`` minimum areas.

    Returns:
        float64 ``(len(masks), ns, na)``; exactly the mean of :func:`cellkit.metric.score_image` over the masks
        that :func:`cellkit.postprocess.apply_predictions` keeps.
    """
    eff_class = effective(img, vote)
    blocks_c = (list(range(len(img.block) - 1)) if img.vote == c else []) if (vote and img.vote >= 0) else [c]
    mask_index = np.array(mask_index, dtype=np.int64)
    eff_fixed = _effective_scores(img, rescore, mask_index[eff_class])
    # ownership by the fixed instances alone, shared by every pixel threshold of class c
    n = img.classes.size
    order, rank, owned = _owners(img, (eff_class != c) & (eff_fixed >= fixed_score[eff_class]), eff_fixed,
                                 [b for b in range(len(img.block) - 1) if b not in blocks_c], mask_index, vote)
    first = np.full(img.n_pixels, order.size, dtype=np.int32)
    first[img.pix[owned]] = rank[img.inst[owned]]
    o_inst = img.inst[owned].astype(np.int64)
    fixed = _Fixed(order, first, np.bincount(o_inst, minlength=n).astype(np.int64),
                   *_dense_counts(_truth_keys(img, owned, o_inst), n * max(img.n_truth, 1)))
    out = np.empty((len(masks), len(score_grid), len(area_grid)))
    for j, m in enumerate(masks):
        mask_index[c] = m
        out[j] = _scores_at(img, eff_class, vote, rescore, c, mask_index, fixed, eff_fixed, fixed_area, score_grid,
                            area_grid, blocks_c)
    return out


def _scores_at(img, eff_class, vote, rescore, c, mask_index, fixed: _Fixed, eff_fixed, fixed_area, score_grid,
               area_grid, blocks_c) -> np.ndarray:
    """One pixel threshold of :func:`sweep_image`: float64 ``(ns, na)``."""
    n, ns, m_truth = img.classes.size, len(score_grid), img.n_truth
    swept = eff_class == c
    eff = np.where(swept, _effective_scores(img, rescore, mask_index[eff_class]), eff_fixed)
    alive_c = swept & (eff >= score_grid[0])
    jpass = np.where(swept, np.searchsorted(score_grid, eff, side="right"), ns)  # c passes s_k for k < jpass
    area = np.repeat(fixed.area[:, None], ns, axis=1)  # residual areas (those of the swept class are set below)
    items = [(fixed.pair_keys, np.full(fixed.pair_keys.size, ns), fixed.pair_counts)]  # (keys, hi, weights)
    if alive_c.any():
        e = _owners(img, alive_c, eff, blocks_c, mask_index, vote)[2]
        e_inst = img.inst[e].astype(np.int64)
        own_e, own_inst = e, e_inst
        if fixed.order.size:  # the entries' pixels that a fixed instance covers go to whichever comes first
            fo = fixed.first[img.pix[e]]
            has_o = fo < fixed.order.size
            o_inst = np.append(fixed.order, -1)[fo]  # the first fixed instance at the entry's pixel (-1: none)
            se, so = eff[e_inst], eff[o_inst]
            before = ~has_o | (se > so) | ((se == so) & (e_inst < o_inst))
            own_e, own_inst = e[before], e_inst[before]
            lost = before & has_o  # pixels the fixed instance loses while the swept one passes
            if lost.any():
                lo_inst, lo_hi = o_inst[lost], jpass[e_inst[lost]]
                area -= _below(lo_inst, lo_hi, n, ns)
                lost_keys, lost_hi = _truth_keys(img, e[lost], lo_inst, lo_hi)
                items.append((lost_keys, lost_hi, np.full(lost_keys.size, -1)))
        cnt = np.bincount(own_inst, minlength=n)
        area[swept] = np.where(np.arange(ns)[None, :] < jpass[swept][:, None], cnt[swept][:, None], 0)
        if m_truth:
            ck, cc = _dense_counts(_truth_keys(img, own_e, own_inst), n * m_truth)
            items.append((ck, jpass[ck // m_truth], cc))
    return _precision_grid(img, area, swept, eff_class, fixed_area, area_grid, items)


def _precision_grid(img, area: np.ndarray, swept: np.ndarray, eff_class: np.ndarray, fixed_area: np.ndarray,
                    area_grid: np.ndarray, items) -> np.ndarray:
    """:func:`_scores_at`'s image score at every (score, min area) grid point, float64 ``(ns, na)``, from the
    ``(n, ns)`` residual areas and the (instance x truth) intersection items ``(keys, hi, weights)``."""
    ns, na, nt, m_truth = area.shape[1], len(area_grid), len(metric.THRESHOLDS), img.n_truth
    rows = np.flatnonzero(area.any(axis=1))
    min_area = np.maximum(np.where(swept[rows, None], area_grid[None, :], fixed_area[eff_class[rows]][:, None]), 1)
    kept_rows = area[rows, :, None] >= min_area[:, None, :]  # (R, ns, na)
    n_pred = kept_rows.sum(axis=0)
    tp = np.zeros((ns, na, nt))
    keys, hi, weights = (np.concatenate(x) for x in zip(*items))
    if keys.size:  # (none without true masks)
        uniq, inv = np.unique(keys, return_inverse=True)
        inter = _below(inv, hi.astype(np.int64), uniq.size, ns, weights.astype(np.float64))
        pi, pt = uniq // m_truth, uniq % m_truth  # sorted by instance
        iou = np.divide(inter, area[pi] + img.truth_area[pt][:, None] - inter, out=np.zeros(inter.shape),
                        where=inter > 0)
        cand = (iou > metric.THRESHOLDS[0]).any(axis=1)
        pi, iou = pi[cand], iou[cand]
        if pi.size:
            # Residual masks are disjoint, so no truth has two predictions with IoU > 0.5 (two disjoint masks
            # cannot both cover more than half of it): every component of the match graph is one prediction
            # with its truths, and a maximum matching counts the kept predictions whose best IoU exceeds t.
            starts = np.flatnonzero(np.r_[True, pi[1:] != pi[:-1]])
            best = np.maximum.reduceat(iou, starts, axis=0)  # (G, ns)
            # (G, ns, na); IoU > 0 implies area > 0, so each prediction has a row
            kp = kept_rows[np.searchsorted(rows, pi[starts])].astype(np.float32)
            hit = (best[:, :, None] > metric.THRESHOLDS[None, None, :]).astype(np.float32)  # (G, ns, nt)
            tp = np.matmul(kp.transpose(1, 2, 0), hit.transpose(1, 0, 2)).astype(np.float64)
    denom = n_pred[:, :, None] + m_truth - tp
    return np.divide(tp, denom, out=np.ones_like(tp), where=denom > 0).mean(axis=2)  # precision, averaged over t


def image_scores(img: ImageData, vote: bool, rescore: bool, thresholds: dict, grid: dict, c: int = 0,
                 groups=CELL_TYPES) -> np.ndarray:
    """Image score at on-grid thresholds for every (score, min_area) of class ``c`` on the grid (tests, notebooks).

    Returns:
        float64 ``(len(grid["score"]), len(grid["min_area"]))``.
    """
    mask_index, fixed_score, fixed_area = _threshold_arrays(thresholds, grid["mask"], groups)
    return sweep_image(img, vote, rescore, c, mask_index, fixed_score, fixed_area, [int(mask_index[c])],
                       np.asarray(grid["score"], dtype=np.float64), np.asarray(grid["min_area"], dtype=np.int64))[0]


def _threshold_arrays(thr: dict, mask_grid: list, groups) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group: the index of its pixel threshold in ``mask_grid`` (int64), its score threshold (float64) and
    minimum area (int64), each ``(n_groups,)``."""
    return (np.array([mask_grid.index(thr[name]["mask"]) for name in groups], dtype=np.int64),
            np.array([thr[name]["score"] for name in groups], dtype=np.float64),
            np.array([thr[name]["min_area"] for name in groups], dtype=np.int64))


# ------------------------------------------------------------------------------------------------ exact evaluation
def truth_mask_set(annotations, shape: tuple[int, int], where: str = "truth") -> MaskRuns:
    """The true masks of one image (competition RLE strings; an empty one is no mask) as
    :class:`cellkit.geometry.MaskRuns`.

    Raises:
        ValueError: a malformed string, naming ``where`` and its position in ``annotations``.
    """
    try:
        return MaskRuns.from_rles(list(annotations), shape)
    except rle.MaskError as exc:
        raise ValueError(f"{where}: annotation {exc.index}: {exc.problem}") from None


def exact_image_scores(pred: P.InstancePredictions, truth: MaskRuns, candidates, groups=CELL_TYPES) -> np.ndarray:
    """Image score of one image under each post-processing candidate, exactly as a submission would score.

    Each candidate ``(thresholds, options)`` goes through :func:`cellkit.postprocess.score_predictions` (the path of
    ``cellkit submit`` and validation); the image score is
    the mean precision over the IoU thresholds 0.50..0.95 (1.0 with neither kept masks nor true masks).

    Args:
        pred: the image's predictions, classes as group ids (:func:`cellkit.postprocess.group_view`).
        truth: its true masks (:func:`truth_mask_set`).
        candidates: sequence of ``(thresholds, options)``; ``options`` are keywords of
            :data:`cellkit.postprocess.DEFAULT_OPTIONS` (absent ones take their defaults).
        groups: the thresholds' groups, in id order.

    Returns:
        float64 ``(len(candidates),)``; equal candidates are computed once.
    """
    validated = [(pp.validate_thresholds(t, groups=groups), pp.validate_options(o)) for t, o in candidates]
    unique = {repr(c): c for c in validated}  # validated: keys in a fixed order
    done = {key: float(pp.score_predictions(pred, truth, t, groups, **o).mean()) for key, (t, o) in unique.items()}
    return np.array([done[repr(c)] for c in validated], dtype=np.float64)


# ------------------------------------------------------------------------------------------------ workers
class _Shard:
    """A set of images held by one process, answering sweep and evaluation requests.

    ``truth_by_id``: ``{image id: (annotations, group, (H, W))}``; ``schema``: the dataset's
    (:class:`cellkit.schema.DatasetSchema`: predicted classes become group ids).
    """

    def __init__(self, pred_dir, ids, truth_by_id: dict, grid: dict, vote_min_score: float, schema):
        self.source = (pred_dir, ids, truth_by_id)  # to re-read the predictions for exact()
        self.schema, self.images = schema, []
        for pred in map(functools.partial(pp.group_view, schema=schema), P.iter_dir(pred_dir, ids=ids)):
            annotations, cell_type, shape = truth_by_id[pred.image_id]
            if (pred.height, pred.width) != shape:
                raise ValueError(f"{pred_dir}/{pred.image_id}.npz: image size {pred.height}x{pred.width} differs from "
                                 f"the truth's {shape[0]}x{shape[1]}")
            runs = [rle.parse(s, shape) for s in annotations]
            truth = [rle.runs_to_indices(starts, lengths) for starts, lengths in runs if lengths.size]
            self.images.append(prepare_image(pred, truth, cell_type, grid, vote_min_score, len(schema.groups)))
        self.grid = grid
        self.score_grid = np.asarray(grid["score"], dtype=np.float64)
        self.area_grid = np.asarray(grid["min_area"], dtype=np.int64)
        self.cache: dict = {}

    def info(self):
        return [(img.image_id, img.cell_type, img.n_truth, int(img.inst.size), bool(np.unique(img.classes).size > 1))
                for img in self.images]

    @staticmethod
    def peak_rss_mb() -> float:
        """Peak resident memory of this process, MiB (Linux ``ru_maxrss``)."""
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    def sweep(self, c: int, thr: dict, options: dict) -> dict[int, np.ndarray]:
        """``{local image index: (n_mask, ns, na) scores}`` for the images with an instance of effective class c."""
        vote, rescore = options["image_class_vote"], options["rescore"]
        mask_index, fixed_score, fixed_area = _threshold_arrays(thr, self.grid["mask"], self.schema.groups)
        masks = list(range(len(self.grid["mask"])))
        out = {}
        for j, img in enumerate(self.images):
            eff = effective(img, vote)
            if not (eff == c).any():
                continue
            # the result depends on the thresholds of the other classes present in the image only (none when the
            # image is pure), so it is reused while those stay the same
            deps = tuple((b, tuple(sorted(thr[self.schema.groups[b]].items()))) for b in np.unique(eff) if b != c)
            key = (j, c, rescore) if not deps else (j, c, rescore, vote)  # a pure image: own class == vote
            if key not in self.cache or self.cache[key][0] != deps:
                self.cache[key] = (deps, sweep_image(img, vote, rescore, c, mask_index, fixed_score, fixed_area, masks,
                                                     self.score_grid, self.area_grid))
            out[j] = self.cache[key][1]
        return out

    def evaluate(self, thr: dict, options: dict) -> np.ndarray:
        """Image score of every image at the given on-grid thresholds, float64 ``(n_images,)``."""
        mask_index, fixed_score, fixed_area = _threshold_arrays(thr, self.grid["mask"], self.schema.groups)
        return np.array([sweep_image(img, options["image_class_vote"], options["rescore"], 0, mask_index, fixed_score,
                                     fixed_area, [int(mask_index[0])], fixed_score[:1], fixed_area[:1])[0, 0, 0]
                         for img in self.images], dtype=np.float64)

    def exact(self, candidates) -> np.ndarray:
        """Exact image scores of every image under each candidate (:func:`exact_image_scores`), float64
        ``(n_images, len(candidates))`` in :attr:`images` order; the predictions are re-read one image at a time."""
        pred_dir, ids, truth_by_id = self.source
        out = np.empty((len(self.images), len(candidates)))
        for j, pred in enumerate(P.iter_dir(pred_dir, ids=ids)):  # sorted by id, as __init__ read them
            if pred.image_id != self.images[j].image_id:
                raise ValueError(f"{pred_dir}: image {pred.image_id} read where {self.images[j].image_id} was "
                                 f"expected (the store changed during the search)")
            annotations, _, shape = truth_by_id[pred.image_id]
            out[j] = exact_image_scores(pp.group_view(pred, self.schema),
                                        truth_mask_set(annotations, shape, f"truth of image {pred.image_id}"),
                                        candidates, self.schema.groups)
        return out


# The shard a worker process holds (set by _start_shard, the first task of its executor).
_SHARD: _Shard | None = None


def _start_shard(args) -> list:
    global _SHARD
    _SHARD = _Shard(*args)
    return _SHARD.info()


def _shard_call(name: str, payload: tuple):
    return getattr(_SHARD, name)(*payload)


class _Pool:
    """Shards in worker processes (one single-process ``ProcessPoolExecutor`` each, so a shard stays resident in
    its process between requests), or in-process when ``workers <= 1``; queried in parallel."""

    def __init__(self, workers: int, pred_dir, ids, *shard_args):
        self.local, self.executors = None, []
        if workers <= 1:
            self.local = _Shard(pred_dir, ids, *shard_args)
            self.infos = [self.local.info()]
            return
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        parts = [ids[w::workers] for w in range(min(workers, len(ids)))]
        self.executors = [ProcessPoolExecutor(max_workers=1, mp_context=ctx) for _ in parts]
        self.infos = self._gather([ex.submit(_start_shard, (pred_dir, part, *shard_args))
                                   for ex, part in zip(self.executors, parts)])

    @staticmethod
    def _gather(futures) -> list:
        try:
            return [f.result() for f in futures]
        except Exception as exc:
            raise ValueError(f"search worker failed: {type(exc).__name__}: {exc}") from None

    def call(self, name: str, *payload) -> list:
        if self.local is not None:
            return [getattr(self.local, name)(*payload)]
        return self._gather([ex.submit(_shard_call, name, payload) for ex in self.executors])

    def close(self):
        for ex in self.executors:
            ex.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------------------ driver
class ThresholdSearch:
    """The search over one predictions directory and truth table; see :func:`search` for the usual entry point.

    Args:
        pred_dir: predictions store (out-of-fold predictions).
        truth: DataFrame of the train CSV (:func:`cellkit.data.read_train_csv`).
        grid: :func:`make_grid` output.
        workers: processes (images are sharded over them).
        vote_min_score: confidence of a voting detection.
        schema: the dataset (:mod:`cellkit.schema`); default the one the store's ``meta.json`` records.

    Raises:
        FileNotFoundError / ValueError: a missing, empty or foreign predictions directory, predictions for images
            the truth does not know, image sizes that disagree.
    """

    def __init__(self, pred_dir, truth, grid: dict | None = None, workers: int = 2, vote_min_score: float = 0.5,
                 schema=None):
        self.pred_dir = Path(pred_dir)
        self.schema = schema or schema_of(self.pred_dir)
        self.groups = self.schema.groups
        self.grid = make_grid(**(grid or {}))
        self.vote_min_score = float(vote_min_score)
        ids = P.image_ids(self.pred_dir)  # raises on a missing, empty or foreign directory
        truth_ids = set(truth["id"].astype(str))
        if unknown := [i for i in ids if i not in truth_ids]:
            raise ValueError(f"{self.pred_dir}: predictions for {len(unknown)} image(s) the truth does not know, "
                             f"e.g. {unknown[:5]}")
        self.missing = sorted(truth_ids - set(ids))
        if self.missing:
            logger.warning("%d truth image(s) have no predictions in %s and are left out of the search",
                           len(self.missing), self.pred_dir)
        truth_by_id = {k: (g["annotation"].tolist(), self.schema.image_group(k, str(g["cell_type"].iat[0])),
                           (int(g["height"].iat[0]), int(g["width"].iat[0])))
                       for k, g in truth[truth["id"].isin(set(ids))].groupby("id", sort=False)}
        self.pool = _Pool(max(1, min(int(workers), len(ids))), self.pred_dir, ids, truth_by_id, self.grid,
                          self.vote_min_score, self.schema)
        self.info = [x for part in self.pool.infos for x in part]
        self.n_images = len(self.info)
        self.cell_types = np.array([x[1] for x in self.info])
        self.any_mixed = any(x[4] for x in self.info)

    def close(self) -> None:
        self.pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def peak_rss_mb(self) -> float:
        """Peak resident memory of this process plus its workers, MiB (sum of each process's peak)."""
        return _Shard.peak_rss_mb() + (sum(self.pool.call("peak_rss_mb")) if self.pool.local is None else 0.0)

    def evaluate(self, thresholds: dict, options: dict) -> np.ndarray:
        """Image scores, float64 ``(n_images,)`` in :attr:`info` order, at on-grid thresholds (by the sweep).

        Raises:
            ValueError: off-grid thresholds, or ``free_dropped`` set in ``options`` (the sweep cannot evaluate it:
                use :meth:`exact`).
        """
        if options.get("free_dropped"):
            raise ValueError("the threshold sweep evaluates free_dropped=False only (with it the area filter does not "
                             "separate from the overlap removal); evaluate free_dropped=True with "
                             "ThresholdSearch.exact")
        thresholds = pp.validate_thresholds(thresholds, groups=self.groups)
        if off := [(name, key, t[key]) for name, t in thresholds.items() for key in pp.THRESHOLD_KEYS
                   if t[key] not in self.grid[key]]:
            raise ValueError("class {!r}: {} = {} is not on the search grid".format(*off[0]))
        return np.concatenate(self.pool.call("evaluate", thresholds, options))

    def exact(self, candidates) -> np.ndarray:
        """Exact image scores (:func:`exact_image_scores`, any thresholds and options), float64
        ``(n_images, len(candidates))`` in :attr:`info` order; one pass over the predictions store per worker."""
        return np.concatenate(self.pool.call("exact", [(pp.validate_thresholds(t, groups=self.groups),
                                                        pp.validate_options(o))
                                                       for t, o in candidates]), axis=0)

    def per_class(self, scores: np.ndarray) -> dict:
        """``{"mAP", "per_class"}`` from image scores (per class = mean over images of that true cell type)."""
        return {"mAP": float(scores.mean()),
                "per_class": {c: (float(scores[self.cell_types == c].mean()) if (self.cell_types == c).any() else None)
                              for c in self.groups}}

    def optimise(self, options: dict, max_rounds: int = 3, progress=None, init: dict | None = None) -> dict:
        """Coordinate ascent over classes for one option set, from ``init`` (default: the seed's thresholds).

        Returns:
            ``{"options", "thresholds", "mAP", "rounds", "curves", "image_scores"}``; ``curves[class]`` holds the
            mAP (over all images) against each threshold of that class with the others at their chosen values.
        """
        options = {**options, "vote_min_score": self.vote_min_score}
        thr = {c: dict((init or pp.seed_thresholds(self.groups))[c]) for c in self.groups}
        offsets = np.cumsum([0] + [len(p) for p in self.pool.infos])
        current = self.evaluate(thr, options)
        curves = {}
        rounds = 0
        for rounds in range(1, max_rounds + 1):
            changed = False
            for ci, name in enumerate(self.groups):
                # {image index: (n_mask, ns, na) scores} of the images with an instance of the class
                swept = {offsets[w] + j: res for w, part in enumerate(self.pool.call("sweep", ci, thr, options))
                         for j, res in part.items()}
                if progress is not None:
                    progress.update(1)
                if not swept:
                    continue
                total = (sum(swept.values()) + np.delete(current, list(swept)).sum()) / self.n_images
                best = np.unravel_index(int(np.argmax(total)), total.shape)
                cur = tuple(self.grid[key].index(thr[name][key]) for key in ("mask", "score", "min_area"))
                if total[best] > total[cur] + 1e-12:
                    thr[name] = {"mask": self.grid["mask"][best[0]], "score": self.grid["score"][best[1]],
                                 "min_area": self.grid["min_area"][best[2]]}
                    changed, cur = True, best
                m, k, a = cur
                curves[name] = {"score": total[m, :, a].tolist(), "mask": total[:, k, a].tolist(),
                                "min_area": total[m, k, :].tolist()}
                current[list(swept)] = [res[m, k, a] for res in swept.values()]
            if not changed or options["image_class_vote"] or not self.any_mixed:
                break  # without images that mix classes the classes are independent: one round is exact
        final = self.evaluate(thr, options)
        return {"options": {**options}, "thresholds": thr, "mAP": float(final.mean()), "rounds": rounds,
                "curves": curves, "image_scores": final}


def search(pred_dir, truth_csv, *, grid: dict | None = None, option_sets=None, workers: int = 2,
           max_rounds: int = 3, vote_min_score: float = 0.5, try_free_dropped: bool = True,
           progress: bool = True) -> dict:
    """Search per-class thresholds and options on out-of-fold predictions.

    Args:
        pred_dir: the predictions store (``meta.json`` provenance is copied into the result).
        truth_csv: the competition train CSV (path) or its DataFrame.
        grid: ``{"score": [...], "mask": [...], "min_area": [...]}`` (default :data:`DEFAULT_GRID`).
        option_sets: the option sets to try (default :data:`OPTION_SETS`).
        workers: processes.
        max_rounds: coordinate-ascent rounds at most per option set.
        vote_min_score: confidence of a voting detection.
        try_free_dropped: re-evaluate the winner's thresholds exactly with ``free_dropped`` off and on and keep the
            better (module docstring); False keeps it off (only the exact figure with it off is computed).
        progress: tqdm bar.

    Returns:
        The ``thresholds.json`` document: ``thresholds``, ``options``, ``metric`` (``before`` = seed defaults and
        options, ``after`` = the exact figure of the chosen thresholds and options; each ``{"mAP", "per_class"}``),
        ``search`` (grid, per option set results of the sweep, curves, image counts, ``free_dropped``: the exact
        figures with it off and on and the choice, seconds) and ``provenance`` (predictions dir, its meta.json:
        config, weights, folds).
    """
    from tqdm import tqdm

    from cellkit.data import read_train_csv

    start = time.perf_counter()
    truth_path = str(truth_csv) if isinstance(truth_csv, (str, os.PathLike)) else None
    truth = truth_csv if truth_path is None else read_train_csv(truth_csv)
    option_sets = [{k: bool(o[k]) for k in ("image_class_vote", "rescore")} for o in list(option_sets or OPTION_SETS)]
    pred_dir = Path(pred_dir)
    try:
        meta = P.read_meta(pred_dir)
    except FileNotFoundError:
        P.image_ids(pred_dir)  # a missing/empty/foreign directory is the better error
        logger.warning("%s has no meta.json: provenance unknown", pred_dir)
        meta = {}
    with ThresholdSearch(pred_dir, truth, grid, workers, vote_min_score) as s:
        before = s.per_class(s.evaluate(pp.seed_thresholds(s.groups), pp.DEFAULT_OPTIONS))
        bar = tqdm(total=len(option_sets) * len(s.groups), desc="search", unit="sweep", disable=not progress)
        results = _optimise_option_sets(s, option_sets, max_rounds, bar)
        best = functools.reduce(lambda b, r: r if r["mAP"] > b["mAP"] + 1e-12 else b, results)  # ties: the first
        chosen, free_report, after = _free_dropped(s, best, try_free_dropped, bar)
        bar.close()
        search_doc = {
            "grid": s.grid,
            "objective": "competition mAP over the images with predictions (cellkit.metric)",
            "results": [{"options": {k: r["options"][k] for k in ("image_class_vote", "rescore")},
                         "mAP": r["mAP"], "thresholds": r["thresholds"], "rounds": r["rounds"]} for r in results],
            "curves": best["curves"],
            "free_dropped": free_report,
            "n_images": s.n_images,
            "n_truth_images_without_predictions": len(s.missing),
            "seconds": None,  # set once the workers are closed
            "peak_rss_mb": round(s.peak_rss_mb(), 1),
        }
    search_doc["seconds"] = round(time.perf_counter() - start, 2)
    dataset = {} if s.schema == SARTORIUS else {"dataset": s.schema.to_dict()}
    return {**dataset,
        "thresholds": best["thresholds"],
        "options": pp.validate_options({**best["options"], "free_dropped": bool(chosen)}),
        "metric": {"before": before, "after": after},
        "search": search_doc,
        "inference": P.store_signature(meta),
        "provenance": {"predictions": str(pred_dir), "truth": truth_path or truth.attrs.get("path"),
                       **_source_provenance(meta), "predictions_meta": meta, "cellkit_version": __version__},
    }


def _optimise_option_sets(s: "ThresholdSearch", option_sets: list[dict], max_rounds: int, bar) -> list[dict]:
    """:meth:`ThresholdSearch.optimise` of every option set, results in ``option_sets`` order.

    The vote's classes never mix, so its search is one exact round; the own-class search then starts from the
    vote's optimum of the same rescoring, which usually converges in one round instead of two.
    """
    by_key = {}
    for options in sorted(option_sets, key=lambda o: not o["image_class_vote"]):
        init = by_key.get((True, options["rescore"]))
        init = init["thresholds"] if (init is not None and not options["image_class_vote"]) else None
        by_key[(options["image_class_vote"], options["rescore"])] = s.optimise(options, max_rounds, bar, init)
        bar.total = max(bar.total, bar.n)
    return [by_key[(o["image_class_vote"], o["rescore"])] for o in option_sets]


def _free_dropped(s: "ThresholdSearch", best: dict, try_free_dropped: bool, bar):
    """The winner's thresholds, exactly, with dropped masks claiming and freeing their pixels:
    ``(free_dropped chosen, report, per-class figures of the choice)``."""
    settings = [False, True] if try_free_dropped else [False]
    bar.total += 1
    bar.set_postfix_str("exact free_dropped")
    exact = s.exact([(best["thresholds"], {**best["options"], "free_dropped": f}) for f in settings])
    bar.update(1)
    gap = float(np.abs(exact[:, 0] - best["image_scores"]).max()) if s.n_images else 0.0
    if gap > 1e-9:
        logger.warning("the sweep and the exact evaluation of the chosen thresholds differ by up to %.3g on an "
                       "image (a bug: please report it); the exact figures are used", gap)
    means = exact.mean(axis=0)
    chosen = len(settings) > 1 and means[1] > means[0] + 1e-12  # a tie keeps the default
    report = {
        "method": "exact re-evaluation (postprocess.apply_predictions -> metric) of the thresholds the sweep "
                  "chose, with masks dropped for their area claiming (false) or freeing (true) their pixels; "
                  "the better mAP wins, a tie keeps false",
        "results": [{"free_dropped": f, **s.per_class(exact[:, k])} for k, f in enumerate(settings)],
        "chosen": bool(chosen),
        "sweep_mAP": best["mAP"],
    }
    return chosen, report, s.per_class(exact[:, int(chosen)])


def _source_provenance(meta: dict) -> dict:
    """``config``, ``weights`` and ``folds`` of a predictions ``meta.json``: its top-level keys, or those of its
    ``sources`` (one entry per fold, each with its ``members``, as ``cellkit predict`` writes); one value when all
    members agree, else the list of distinct values (``folds`` always a sorted list when taken from sources)."""
    sources = [src for src in meta.get("sources", []) if isinstance(src, dict)]
    if not sources:
        return {"config": meta.get("config"), "weights": meta.get("weights"),
                "folds": meta.get("folds", meta.get("fold"))}
    # a store with an inference signature lists each source's members (one per fold model, or an ensemble)
    sources = [{**m, "fold": src.get("fold")} for src in sources for m in (src.get("members") or [src])]

    def distinct(key):
        found = [src[key] for src in sources if src.get(key) is not None]
        values = [v for i, v in enumerate(found) if v not in found[:i]]  # first occurrences, in order
        return values[0] if len(values) == 1 else (values or None)

    return {"config": distinct("config"), "weights": distinct("weights"),
            "folds": sorted({src["fold"] for src in sources if src.get("fold") is not None}) or None}


def plot_search(doc: dict, path) -> Path:
    """Plot the metric against each threshold per class (others at their chosen values); PNG written atomically.

    Args:
        doc: a document from :func:`search` (needs ``search.curves`` and ``search.grid``).
        path: the PNG to write.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cellkit.viz import save_figure

    grid, curves = doc["search"]["grid"], doc["search"]["curves"]
    groups = list(doc["thresholds"])
    fig, axes = plt.subplots(len(groups), 3, figsize=(12, 3.2 * len(groups)), squeeze=False)
    for row, name in enumerate(groups):
        for col, key in enumerate(("score", "mask", "min_area")):
            ax = axes[row][col]
            if name in curves:
                ax.plot(grid[key], curves[name][key], marker="o", ms=3)
                ax.axvline(doc["thresholds"][name][key], color="tab:red", ls="--", lw=1, label="chosen")
                ax.axvline(pp.seed_thresholds(groups)[name][key], color="tab:gray", ls=":", lw=1, label="seed")
            else:
                ax.text(0.5, 0.5, "no detections of this class", ha="center", va="center", transform=ax.transAxes)
            ax.set(title=f"{name}: {key}", xlabel=key, ylabel="mAP")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    opts = doc["options"]
    fig.suptitle(f"threshold search (vote={opts['image_class_vote']}, rescore={opts['rescore']}, "
                 f"free_dropped={opts.get('free_dropped', False)}; curves with free_dropped=False): "
                 f"mAP {doc['metric']['before']['mAP']:.4f} -> {doc['metric']['after']['mAP']:.4f}")
    fig.tight_layout()
    try:
        return save_figure(fig, path, dpi=80)
    finally:
        plt.close(fig)
