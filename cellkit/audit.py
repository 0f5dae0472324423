"""Label audit of a competition ``train.csv``: which annotations and which images look wrong.

Noisy labels cost everyone: the Sartorius train data has partly annotated images, duplicated annotations and broken
masks, and the 7th place removed the images a trained model found under-annotated. This module flags suspicious
annotations from the labels alone and, given out-of-fold predictions (a :mod:`cellkit.predictions` store, e.g.
``cellkit predict --fold``), from a model's view of them, and ranks the images by one score.

Flags (``kind``; one row of ``instances.csv`` each; masks are compared by pixel IoU, never by box):

from the labels alone

- ``duplicate``: an annotation with mask IoU >= ``duplicate_iou`` (0.9) with an earlier annotation of the same image
  (its ``partner_row``): the same cell annotated twice. The later row is flagged; the earlier one is not.
- ``overlap``: two annotations whose intersection covers >= ``overlap_ios`` (0.5) of the *smaller* mask (intersection
  over smaller, IoS) but that are not duplicates: one cell drawn inside another, or one cell annotated twice with
  different outlines. The smaller mask is flagged. Legitimate touching cells of this data overlap by a few pixels
  (median 0.4-2 % of the covered pixels), far below 0.5 of a mask.
- ``empty``: an annotation without any pixel.
- ``tiny``: an annotation of ``0 < area < min_area[cell type]`` pixels (:data:`DEFAULT_MIN_AREA`: shsy5y 30, astro 80,
  cort 40). The real train.csv's smallest masks are 30 / 37 / 33 px and its 1st percentiles 51 / 109 / 62 px
  (shsy5y / astro / cort), so these thresholds catch fragments (astro fragments are larger) and nothing typical.

with predictions (``match_iou`` 0.5; a prediction is *confident* when its score is >= ``AuditSpec.confident_score``,
by default the class's score threshold of ``--thresholds``, else the seed's 0.5; its mask is binarised at the
class's pixel threshold and must keep that file's ``min_area`` pixels, at least 1)

- ``missed``: a confident prediction that no annotation matches (best IoU < ``match_iou``) and that lies mostly off the
  annotations (less than ``missed_coverage`` = 0.5 of its pixels on any annotation): a cell the annotator left out.
  A lower-scored prediction covering >= ``pred_nms_ios`` (0.5) of its own pixels with a higher-scored confident one
  is a detector duplicate and is not considered.
- ``spurious``: an annotation that no confident prediction touches (best IoU < ``misplaced_iou`` = 0.1): nothing
  there in the model's view.
- ``misplaced``: an annotation whose best confident prediction overlaps it but does not match it
  (``misplaced_iou <= IoU < match_iou``): a shifted or badly outlined mask.

Image score (``audit.csv`` column ``score``; higher is worse; 0 for an image without any flag), with ``n`` the number
of non-empty annotations (at least 1) and ``m`` the number of ``missed`` predictions::

    label_score = (2 * n_duplicate + 1 * n_overlap + 1 * n_empty + 1 * n_tiny) / n
    pred_score  = 1.0 * excess(m / (n + m)) + 0.5 * excess(n_spurious / n) + 1.0 * excess(n_misplaced / n)
    score       = label_score + pred_score          (pred_score = 0 without predictions)

Each term is a fraction (of the image's annotations, or of its cells for ``missed``), so a score of 0.2 reads as
"about a fifth of this image's labels are suspect", comparable between an image of 15 cort cells and one of 700
shsy5y cells. A duplicate weighs double: it is certain (the same cell twice), where an overlap or a small mask may be
right. ``excess`` (:func:`excess`) removes the model's own error rates: even on perfect labels an imperfect model
misses some cells, finds some that are not there and outlines some badly, at rates that differ by cell type. So each
prediction-based fraction ``f`` of ``d`` items counts only as far as it exceeds its cell type's baseline ``b`` (the
median fraction over the audited images of that type with predictions, when there are at least
:data:`MIN_BASELINE_IMAGES`; else 0) by more than chance: ``excess(f) = max(f - b - z * sqrt(b (1 - b) / d), 0)``
with ``z = AuditSpec.noise_z`` = 2 standard errors, so that an image of 15 cells is not flagged for the one extra
miss chance gives it. Spurious labels weigh half: a label where the model sees no cell is as often a cell the model
misses. The weights are ``AuditSpec.weights`` (:data:`DEFAULT_WEIGHTS`). On planted defects
(``benchmarks/bench_audit.py``) this ranks defective images above clean ones with the ROC AUC of
``benchmarks/RESULTS.md``.

cleanlab. ``cleanlab.object_detection`` (ObjectLab) scores images from boxes and per-class prediction arrays; it
needs predictions. ``cleanlab_quality`` (in [0, 1], lower worse) is ``rank.get_label_quality_scores`` itself, with its
three subtype scores (``compute_overlooked_box_scores``, ``compute_badloc_box_scores``, ``compute_swap_box_scores``
pooled by ``pool_box_scores_per_image``); the only change is speed (:func:`vectorised_cleanlab`: its box matrices
come from numpy instead of two nested Python loops, ~9 s for one median shsy5y image of 312 labels x 453
predictions). cleanlab is optional: without it the four columns stay empty (with a warning) and nothing else changes.
Where it does not fit, and why it is a column and not part of ``score``:

- it works on boxes, not masks: crowded shsy5y boxes overlap their neighbours, so box IoU cannot tell a shifted mask
  from a neighbour's, and its overlooked subtype only considers predictions whose box touches no label box at all;
- its overlooked subtype only looks at predictions with probability >= 0.95 (not a parameter of the top-level
  function); many detectors, and the generated ``fakepred`` predictions, rarely score that high;
- it has no "label without any prediction" subtype: a label that no confident prediction touches gets the best
  bad-location score (1.0);
- its image score pools the box scores with a soft minimum (temperature 0.1): with hundreds of cells per image the
  worst box of every image is bad, so the image score saturates in crowded images;
- the swap subtype (a box with the wrong class) means nothing here: every image has one cell type, which is known;
- ``filter.find_label_issues`` is not used: it computes the pairwise box IoUs again for a per-class box AP at ten IoU
  thresholds (~15 s for the same image), starts a ``multiprocessing.Pool`` whenever it gets more than one image (even
  for one process), and decides with dataset-wide per-class box-AP thresholds.

Efficiency: masks stay run-length encoded (:class:`MaskRuns`, row-major runs); candidate pairs are the pairs whose
bounding boxes (from the runs) overlap (:func:`box_pairs`), and only their intersections are computed, from the runs
(:func:`pair_intersections`: the union of two sets of disjoint intervals, for all pairs in one sort). The labels-only
audit of the real train.csv (392 images, 32,105 masks) takes under a second on one core, with predictions of every
image about 20 s (``benchmarks/RESULTS.md``). Images are processed one at a time (tqdm bar); only their counts, flags
and boxes are kept.

Conventions: mask strings are the competition's RLE (row-major, 1-indexed starts, :mod:`cellkit.rle`); ``row`` and
``partner_row`` are 0-based data rows of the train CSV as :func:`cellkit.data.read_train_csv` indexes them (CSV line
= row + 2); ``pred_index`` indexes an image's predictions in the order of its ``.npz``; boxes are ``x0, y0, x1, y1``
pixels, end exclusive.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from cellkit import CELL_TYPES, SHAPE, atomic, rle

__all__ = [
    "DEFAULT_MIN_AREA", "DEFAULT_WEIGHTS", "MIN_BASELINE_IMAGES", "KINDS", "LABEL_KINDS", "PREDICTION_KINDS",
    "IMAGE_COLUMNS", "INSTANCE_COLUMNS", "AUDIT_NAME", "INSTANCES_NAME", "SUMMARY_NAME", "AuditSpec", "MaskRuns",
    "RATE_KINDS", "box_pairs", "pair_intersections", "label_flags", "prediction_flags", "image_fractions",
    "excess", "image_score", "apply_baselines",
    "cleanlab_matrices", "cleanlab_format", "vectorised_cleanlab", "cleanlab_image_scores", "AuditResult",
    "has_predictions", "audit", "write_audit", "read_audit",
    "exclusion_ids",
]

logger = logging.getLogger(__name__)

DEFAULT_MIN_AREA = {"shsy5y": 30, "astro": 80, "cort": 40}
"""A non-empty annotation under this many pixels is ``tiny`` (per cell type; see the module docstring)."""

DEFAULT_WEIGHTS = {"duplicate": 2.0, "overlap": 1.0, "empty": 1.0, "tiny": 1.0, "missed": 1.0, "spurious": 0.5,
                   "misplaced": 1.0}
"""Weights of the image score's terms, one per flag kind (module docstring)."""

RATE_KINDS = ("missed", "spurious", "misplaced")
"""The prediction flags whose fractions are taken relative to their cell type's baseline."""

MIN_BASELINE_IMAGES = 5
"""Images of a cell type with predictions needed before its median fractions (baselines) are subtracted."""

LABEL_KINDS = ("duplicate", "overlap", "empty", "tiny")
PREDICTION_KINDS = ("missed", "spurious", "misplaced")
KINDS = LABEL_KINDS + PREDICTION_KINDS
"""Every ``kind`` of ``instances.csv``."""

IMAGE_COLUMNS = (
    "id", "cell_type", "score", "label_score", "pred_score", "flags", "n_rows", "n_labels", "n_duplicate", "n_overlap",
    "n_empty", "n_tiny", "has_pred", "n_pred", "n_confident", "n_missed", "n_spurious", "n_misplaced",
    "missed_fraction", "spurious_fraction", "misplaced_fraction", "missed_baseline", "spurious_baseline",
    "misplaced_baseline", "mean_best_iou", "cleanlab_quality", "cleanlab_overlooked", "cleanlab_badloc",
    "cleanlab_swap",
)
"""Columns of ``audit.csv`` (one row per image, highest ``score`` first):

- ``score``: the image score (module docstring) = ``label_score + pred_score``; ``flags``: ``kind:count`` of every
  flag of the image, e.g. ``"duplicate:9 overlap:1"`` (empty when none);
- ``n_rows``: rows of the image in the CSV; ``n_labels``: non-empty annotations; ``n_<kind>``: flagged annotations
  (``duplicate``, ``overlap``, ``empty``, ``tiny``, ``spurious``, ``misplaced``) or predictions (``missed``);
- ``has_pred``: the store has predictions of the image (else the prediction columns are empty); ``n_pred``: its
  stored predictions; ``n_confident``: confident ones left after dropping detector duplicates;
- ``missed_fraction`` = ``m / (n + m)``, ``spurious_fraction`` = ``n_spurious / n``, ``misplaced_fraction`` =
  ``n_misplaced / n``; ``<kind>_baseline``: what the score subtracted from them (the cell type's median);
  ``mean_best_iou``: mean over annotations of their best IoU with a confident prediction;
- ``cleanlab_*``: ObjectLab's image quality and its overlooked / bad-location / swap subtype scores (in [0, 1],
  lower worse; empty without predictions).
"""

INSTANCE_COLUMNS = ("kind", "id", "cell_type", "row", "partner_row", "pred_index", "iou", "ios", "area",
                    "partner_area", "pred_score", "x0", "y0", "x1", "y1")
"""Columns of ``instances.csv`` (one row per flag):

- ``row``: the flagged annotation's 0-based data row (CSV line = row + 2); empty for ``missed``;
- ``partner_row``: the other annotation of a ``duplicate`` / ``overlap`` pair, the best-matching annotation of a
  ``missed`` prediction (empty when none touches it);
- ``pred_index``: the ``missed`` prediction, or the best confident prediction of a ``misplaced`` annotation;
- ``iou``: mask IoU with the partner (pair kinds) or the best IoU (prediction kinds); ``ios``: intersection over the
  smaller mask (pair kinds) or, for ``missed``, the fraction of the prediction's pixels on annotations;
- ``area`` / ``partner_area``: pixels of the flagged mask and of its partner; ``pred_score``: the prediction's score;
- ``x0, y0, x1, y1``: the flagged mask's box (pixels, end exclusive).
"""

AUDIT_NAME = "audit.csv"
INSTANCES_NAME = "instances.csv"
SUMMARY_NAME = "audit.json"


# ------------------------------------------------------------------------------------------------------- spec
@dataclass(frozen=True)
class AuditSpec:
    """Thresholds and weights of the audit (see the module docstring for what each flag means).

    Attributes:
        duplicate_iou: mask IoU at or above which two annotations are duplicates.
        overlap_ios: intersection over the smaller mask at or above which two annotations overlap heavily.
        min_area: per cell type, a non-empty annotation with fewer pixels is tiny.
        match_iou: a prediction and an annotation match when their IoU is at least this.
        misplaced_iou: an unmatched annotation whose best IoU is at least this is ``misplaced``, else ``spurious``.
        missed_coverage: an unmatched confident prediction is ``missed`` when less than this fraction of its pixels
            lies on annotations.
        pred_nms_ios: a confident prediction sharing at least this fraction of its pixels with a higher-scored
            confident one is a detector duplicate, ignored.
        confident_score: score from which a prediction is confident; None = the class's ``score`` threshold of the
            thresholds file (the seed's 0.5 without one).
        noise_z: a prediction-based fraction counts only beyond this many standard errors above its cell type's
            baseline (:func:`excess`).
        weights: the image score's weights (:data:`DEFAULT_WEIGHTS` keys).
    """

    duplicate_iou: float = 0.9
    overlap_ios: float = 0.5
    min_area: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_MIN_AREA))
    match_iou: float = 0.5
    misplaced_iou: float = 0.1
    missed_coverage: float = 0.5
    pred_nms_ios: float = 0.5
    confident_score: float | None = None
    noise_z: float = 2.0
    weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))

    def __post_init__(self):
        for name in ("duplicate_iou", "overlap_ios", "match_iou", "missed_coverage", "pred_nms_ios"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ValueError(f"AuditSpec.{name} = {v} is out of range (0, 1]")
        if not 0.0 <= self.misplaced_iou <= self.match_iou:
            raise ValueError(f"AuditSpec.misplaced_iou = {self.misplaced_iou} must be in [0, match_iou "
                             f"= {self.match_iou}]")
        if not 0.0 <= self.noise_z < 10.0:
            raise ValueError(f"AuditSpec.noise_z = {self.noise_z} is out of range [0, 10)")
        if self.confident_score is not None and not 0.0 <= self.confident_score <= 1.0:
            raise ValueError(f"AuditSpec.confident_score = {self.confident_score} is out of range [0, 1]")
        missing = [c for c in CELL_TYPES if c not in self.min_area]
        if missing:
            raise ValueError(f"AuditSpec.min_area: missing cell type {missing[0]!r} (needs {', '.join(CELL_TYPES)})")
        bad = [k for k in self.weights if k not in DEFAULT_WEIGHTS]
        if bad:
            raise ValueError(f"AuditSpec.weights: unknown key {bad[0]!r} (expected {', '.join(DEFAULT_WEIGHTS)})")
        object.__setattr__(self, "min_area", {c: int(self.min_area[c]) for c in CELL_TYPES})
        object.__setattr__(self, "weights", {**DEFAULT_WEIGHTS, **{k: float(v) for k, v in self.weights.items()}})


# ------------------------------------------------------------------------------------------------------- masks
@dataclass(frozen=True)
class MaskRuns:
    """The masks of one image as row-major runs (CSR layout), with their areas and bounding boxes.

    Attributes:
        starts: int64 ``(R,)``, 0-indexed flat row-major start of each run (flat index = y * width + x).
        lengths: int64 ``(R,)``, run lengths (>= 1); the runs of one mask are sorted and disjoint.
        indptr: int64 ``(n + 1,)``: the runs of mask ``i`` are ``[indptr[i], indptr[i + 1])`` (none for an empty mask).
        shape: ``(height, width)`` of the image.
        areas: int64 ``(n,)`` pixels per mask (computed).
        boxes: int64 ``(n, 4)`` ``x0, y0, x1, y1`` (end exclusive) per mask; all 0 for an empty mask (computed).
    """

    starts: np.ndarray
    lengths: np.ndarray
    indptr: np.ndarray
    shape: tuple[int, int]
    areas: np.ndarray = field(init=False, repr=False)
    boxes: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        starts = np.asarray(self.starts, dtype=np.int64).reshape(-1)
        lengths = np.asarray(self.lengths, dtype=np.int64).reshape(-1)
        indptr = np.asarray(self.indptr, dtype=np.int64).reshape(-1)
        if starts.shape != lengths.shape or indptr.size < 1 or indptr[0] != 0 or indptr[-1] != starts.size:
            raise ValueError(f"MaskRuns: inconsistent runs ({starts.size} starts, {lengths.size} lengths, indptr "
                             f"ending at {int(indptr[-1]) if indptr.size else None})")
        object.__setattr__(self, "starts", starts)
        object.__setattr__(self, "lengths", lengths)
        object.__setattr__(self, "indptr", indptr)
        object.__setattr__(self, "shape", (int(self.shape[0]), int(self.shape[1])))
        sums = np.concatenate(([0], np.cumsum(lengths)))
        object.__setattr__(self, "areas", sums[indptr[1:]] - sums[indptr[:-1]])
        object.__setattr__(self, "boxes", _run_boxes(starts, lengths, indptr, self.shape[1]))

    def __len__(self) -> int:
        return self.indptr.size - 1

    @classmethod
    def from_rles(cls, rles: Sequence[str], shape: tuple[int, int] = SHAPE) -> "MaskRuns":
        """From competition mask strings (validated; an empty string is an empty mask and keeps its position).

        Raises:
            cellkit.rle.MaskError: (a ValueError) naming the position of the first malformed string.
        """
        starts, lengths, counts = rle.parse_many(rles, shape)
        return cls(starts, lengths, np.concatenate(([0], np.cumsum(counts))), shape)

    @classmethod
    def from_crops(cls, crops: Sequence[np.ndarray], windows: np.ndarray, shape: tuple[int, int]) -> "MaskRuns":
        """From bool crops ``crops[k]`` placed at ``windows[k] = (x0, y0, x1, y1)`` (as binarised predictions)."""
        from cellkit.postprocess import crops_runs

        starts, lengths, counts = crops_runs(list(crops), np.asarray(windows).reshape(-1, 4), int(shape[1]))
        return cls(starts, lengths, np.concatenate(([0], np.cumsum(counts))), shape)

    def select(self, idx) -> "MaskRuns":
        """The masks ``idx`` (int indices), in that order."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        runs, _ = _ragged(self.indptr, idx)
        counts = self.indptr[idx + 1] - self.indptr[idx]
        return MaskRuns(self.starts[runs], self.lengths[runs], np.concatenate(([0], np.cumsum(counts))), self.shape)

    def union(self) -> np.ndarray:
        """bool ``(height * width,)``: the pixels covered by any mask (flat, row-major)."""
        n_pixels = self.shape[0] * self.shape[1]
        diff = np.zeros(n_pixels + 1, dtype=np.int32)
        np.add.at(diff, self.starts, 1)
        np.add.at(diff, self.starts + self.lengths, -1)
        return np.cumsum(diff[:-1]) > 0


def _run_boxes(starts: np.ndarray, lengths: np.ndarray, indptr: np.ndarray, width: int) -> np.ndarray:
    """``(n, 4)`` int64 boxes ``x0, y0, x1, y1`` (end exclusive) of runs in CSR layout; zeros for empty masks.

    A run that wraps past the end of a row (possible in the competition's flat encoding) covers whole rows' width.
    """
    n = indptr.size - 1
    boxes = np.zeros((n, 4), dtype=np.int64)
    if starts.size == 0:
        return boxes
    last = starts + lengths - 1
    r0, c0 = np.divmod(starts, width)
    r1, c1 = np.divmod(last, width)
    wrap = r1 > r0
    x_lo = np.where(wrap, 0, c0)
    x_hi = np.where(wrap, width - 1, c1)
    nonempty = indptr[1:] > indptr[:-1]
    first = indptr[:-1][nonempty]
    final = indptr[1:][nonempty] - 1
    boxes[nonempty, 0] = np.minimum.reduceat(x_lo, first)
    boxes[nonempty, 1] = r0[first]  # the runs of a mask are sorted: its first run is on its top row
    boxes[nonempty, 2] = np.maximum.reduceat(x_hi, first) + 1
    boxes[nonempty, 3] = r1[final] + 1
    return boxes


def _ragged(indptr: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``[indptr[k], indptr[k + 1])`` of every ``k`` in ``items``, concatenated, and their owner (position in
    ``items``); int64 both."""
    items = np.asarray(items, dtype=np.int64)
    counts = indptr[items + 1] - indptr[items]
    total = int(counts.sum())
    owner = np.repeat(np.arange(items.size, dtype=np.int64), counts)
    block_start = np.cumsum(counts) - counts
    positions = np.arange(total, dtype=np.int64) - block_start[owner] + indptr[items][owner]
    return positions, owner


def box_pairs(boxes_a: np.ndarray, boxes_b: np.ndarray | None = None, chunk: int = 512
              ) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of boxes that overlap with positive area (the candidates for a mask intersection).

    Args:
        boxes_a: ``(N, 4)`` ``x0, y0, x1, y1`` (end exclusive); an all-zero (empty) box overlaps nothing.
        boxes_b: ``(M, 4)``, or None for the pairs ``i < j`` within ``boxes_a``.
        chunk: rows of ``boxes_a`` compared at once (bounds the temporary ``chunk x M`` arrays).

    Returns:
        ``(i, j)`` int64 arrays: ``boxes_a[i]`` overlaps ``boxes_b[j]``, sorted by ``i`` then ``j``.
    """
    a = np.asarray(boxes_a, dtype=np.int64).reshape(-1, 4)
    same = boxes_b is None
    b = a if same else np.asarray(boxes_b, dtype=np.int64).reshape(-1, 4)
    out_i, out_j = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    for s in range(0, len(a), chunk):
        blk = a[s:s + chunk]
        hit = ((blk[:, None, 0] < b[None, :, 2]) & (b[None, :, 0] < blk[:, None, 2])
               & (blk[:, None, 1] < b[None, :, 3]) & (b[None, :, 1] < blk[:, None, 3]))
        if same:
            hit &= np.arange(s, s + len(blk))[:, None] < np.arange(len(b))[None, :]
        i, j = np.nonzero(hit)
        out_i.append(i.astype(np.int64) + s)
        out_j.append(j.astype(np.int64))
    return np.concatenate(out_i), np.concatenate(out_j)


def pair_intersections(a: MaskRuns, b: MaskRuns, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Pixel counts ``|a[i[k]] ∩ b[j[k]]|`` for every pair ``k``, from the runs.

    ``|A ∩ B| = |A| + |B| - |A ∪ B|``, and the union of the two masks' runs (each mask's runs are disjoint) is
    measured for all pairs in one sort: every pair's runs are offset by ``k * height * width`` so that pairs never
    mix, sorted by start, and each run adds what reaches past the running maximum of the ends before it. Cost:
    O(R log R) for the R runs of the pairs' masks, independent of the pixel count.

    Returns:
        int64 ``(len(i),)``.
    """
    i = np.asarray(i, dtype=np.int64)
    j = np.asarray(j, dtype=np.int64)
    if i.size == 0:
        return np.zeros(0, dtype=np.int64)
    n_pixels = np.int64(a.shape[0] * a.shape[1])
    runs_a, own_a = _ragged(a.indptr, i)
    runs_b, own_b = _ragged(b.indptr, j)
    starts = np.concatenate((a.starts[runs_a] + own_a * n_pixels, b.starts[runs_b] + own_b * n_pixels))
    ends = starts + np.concatenate((a.lengths[runs_a], b.lengths[runs_b]))
    owner = np.concatenate((own_a, own_b))
    if starts.size == 0:
        return np.zeros(i.size, dtype=np.int64)
    order = np.argsort(starts, kind="stable")
    starts, ends, owner = starts[order], ends[order], owner[order]
    reach = np.maximum.accumulate(ends)
    before = np.concatenate((starts[:1], reach[:-1]))  # the furthest end of the runs sorted before each run
    added = np.maximum(ends - np.maximum(starts, before), 0)
    union = np.bincount(owner, weights=added, minlength=i.size)
    return a.areas[i] + b.areas[j] - np.rint(union).astype(np.int64)


# ------------------------------------------------------------------------------------------------ label flags
class LabelFlags(NamedTuple):
    """What :func:`label_flags` finds in one image's annotations (indices into the image's masks).

    Attributes:
        duplicate: int64 ``(D, 2)`` rows ``(flagged, partner)``, ``partner < flagged``.
        duplicate_iou: float64 ``(D,)``.
        overlap: int64 ``(O, 2)`` rows ``(flagged = smaller, partner)``.
        overlap_iou, overlap_ios: float64 ``(O,)``.
        empty: int64 ``(E,)``; tiny: int64 ``(T,)``.
    """

    duplicate: np.ndarray
    duplicate_iou: np.ndarray
    overlap: np.ndarray
    overlap_iou: np.ndarray
    overlap_ios: np.ndarray
    empty: np.ndarray
    tiny: np.ndarray


def label_flags(masks: MaskRuns, min_area: int, duplicate_iou: float = 0.9, overlap_ios: float = 0.5) -> LabelFlags:
    """Near-duplicate, heavily overlapping, empty and tiny annotations of one image (pure function).

    Args:
        masks: the image's annotations, in CSV order.
        min_area: a non-empty mask under this many pixels is tiny.
        duplicate_iou: pairs with mask IoU >= this are duplicates (the later mask flagged, the earliest such partner
            named).
        overlap_ios: non-duplicate pairs whose intersection is >= this fraction of the smaller mask overlap (the
            smaller mask flagged, ties: the later; partner = the one of largest IoS). A mask flagged ``duplicate`` is
            not flagged ``overlap`` as well.

    Returns:
        :class:`LabelFlags`.
    """
    areas = masks.areas
    i, j = box_pairs(masks.boxes)
    inter = pair_intersections(masks, masks, i, j)
    hit = inter > 0
    i, j, inter = i[hit], j[hit], inter[hit].astype(np.float64)
    union = areas[i] + areas[j] - inter
    iou = inter / union
    ios = inter / np.minimum(areas[i], areas[j])

    dup = iou >= duplicate_iou
    d_flag, d_partner, d_iou = _first_per_flagged(j[dup], i[dup], iou[dup], key=i[dup])
    over = (ios >= overlap_ios) & ~dup
    small_is_j = areas[j[over]] <= areas[i[over]]  # ties: the later mask (j > i) is flagged
    o_flag = np.where(small_is_j, j[over], i[over])
    o_partner = np.where(small_is_j, i[over], j[over])
    keep = ~np.isin(o_flag, d_flag)
    o_flag, o_partner, o_iou, o_ios = o_flag[keep], o_partner[keep], iou[over][keep], ios[over][keep]
    order = np.lexsort((o_partner, -o_ios, o_flag))  # per flagged mask, the largest IoS first
    o_flag, o_partner, o_iou, o_ios = o_flag[order], o_partner[order], o_iou[order], o_ios[order]
    first = np.concatenate(([True], o_flag[1:] != o_flag[:-1])) if o_flag.size else np.zeros(0, dtype=bool)
    return LabelFlags(
        duplicate=np.stack([d_flag, d_partner], axis=1).reshape(-1, 2), duplicate_iou=d_iou,
        overlap=np.stack([o_flag[first], o_partner[first]], axis=1).reshape(-1, 2), overlap_iou=o_iou[first],
        overlap_ios=o_ios[first],
        empty=np.flatnonzero(areas == 0), tiny=np.flatnonzero((areas > 0) & (areas < int(min_area))),
    )


def _first_per_flagged(flagged: np.ndarray, partner: np.ndarray, value: np.ndarray, key: np.ndarray):
    """One entry per distinct ``flagged`` value: the one of smallest ``key``; sorted by ``flagged``."""
    if flagged.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy(), np.zeros(0)
    order = np.lexsort((key, flagged))
    flagged, partner, value = flagged[order], partner[order], value[order]
    first = np.concatenate(([True], flagged[1:] != flagged[:-1]))
    return flagged[first], partner[first], value[first]


# ------------------------------------------------------------------------------------------- prediction flags
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
    li, pj = box_pairs(labels.boxes, conf.boxes)
    inter = pair_intersections(labels, conf, li, pj)
    hit = inter > 0
    li, pj, inter = li[hit], pj[hit], inter[hit].astype(np.float64)
    iou = inter / (labels.areas[li] + conf.areas[pj] - inter)

    label_best_iou = np.zeros(n_labels)
    label_best_pred = np.full(n_labels, -1, dtype=np.int64)
    pred_best_iou = np.zeros(len(conf))
    pred_best_label = np.full(len(conf), -1, dtype=np.int64)
    if iou.size:
        order = np.lexsort((pj, -iou, li))  # per label: best IoU first (ties: higher-scored prediction)
        first = np.concatenate(([True], li[order][1:] != li[order][:-1]))
        label_best_iou[li[order][first]] = iou[order][first]
        label_best_pred[li[order][first]] = kept[pj[order][first]]
        order = np.lexsort((li, -iou, pj))
        first = np.concatenate(([True], pj[order][1:] != pj[order][:-1]))
        pred_best_iou[pj[order][first]] = iou[order][first]
        pred_best_label[pj[order][first]] = li[order][first]

    coverage = _coverage(conf, labels)
    missed = (pred_best_iou < match_iou) & (coverage < missed_coverage)
    nonempty = labels.areas > 0
    unmatched = nonempty & (label_best_iou < match_iou)
    return PredictionFlags(
        confident=kept, label_best_iou=label_best_iou, label_best_pred=label_best_pred,
        missed=kept[missed], missed_iou=pred_best_iou[missed], missed_label=pred_best_label[missed],
        missed_coverage=coverage[missed],
        spurious=np.flatnonzero(unmatched & (label_best_iou < misplaced_iou)),
        misplaced=np.flatnonzero(unmatched & (label_best_iou >= misplaced_iou)),
    )


def _suppress_duplicates(preds: MaskRuns, order: np.ndarray, ios: float) -> np.ndarray:
    """Greedy, in ``order`` (descending score): drop a prediction sharing >= ``ios`` of its pixels with a kept one."""
    if order.size < 2:
        return order.astype(np.int64)
    cand = preds.select(order)
    i, j = box_pairs(cand.boxes)  # i < j: i scores higher
    inter = pair_intersections(cand, cand, i, j)
    heavy = inter >= ios * cand.areas[j]
    i, j = i[heavy], j[heavy]
    if i.size == 0:
        return order.astype(np.int64)
    by_lower = np.argsort(j, kind="stable")
    i, j = i[by_lower], j[by_lower]
    bounds = np.searchsorted(j, np.arange(len(cand) + 1))
    keep = np.ones(len(cand), dtype=bool)
    for k in np.unique(j):  # ascending: every higher-scored prediction is decided before k
        if keep[i[bounds[k]:bounds[k + 1]]].any():
            keep[k] = False
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


# ------------------------------------------------------------------------------------------------------- score
def image_fractions(counts: Mapping[str, float]) -> dict[str, tuple[float, float]]:
    """The prediction flags as fractions: ``missed`` of the image's cells, the others of its annotations.

    Args:
        counts: ``n_labels``, ``n_missed``, ``n_spurious``, ``n_misplaced``.

    Returns:
        ``{kind: (fraction, denominator)}``: ``missed`` ``m / (n + m)``, ``spurious`` ``n_spurious / n``,
        ``misplaced`` ``n_misplaced / n``, with ``n = max(n_labels, 1)``.
    """
    n = max(int(counts["n_labels"]), 1)
    m = float(counts["n_missed"])
    return {"missed": (m / (n + m), n + m), "spurious": (float(counts["n_spurious"]) / n, float(n)),
            "misplaced": (float(counts["n_misplaced"]) / n, float(n))}


def excess(fraction, baseline, denominator, noise_z: float = 2.0):
    """How far a fraction exceeds its baseline beyond chance: ``max(f - b - z * sqrt(b (1 - b) / d), 0)``.

    ``sqrt(b (1 - b) / d)`` is the standard error of a fraction of ``d`` items at the rate ``b``, so an image of 15
    cells is not flagged for the one or two extra misses that chance gives it. Works on floats and arrays alike.
    """
    b = np.clip(baseline, 0.0, 1.0)
    margin = noise_z * np.sqrt(b * (1.0 - b) / np.maximum(denominator, 1.0))
    return np.maximum(np.asarray(fraction, dtype=np.float64) - b - margin, 0.0)


def image_score(counts: Mapping[str, float], weights: Mapping[str, float] | None = None,
                baselines: Mapping[str, float] | None = None, noise_z: float = 2.0) -> tuple[float, float]:
    """The image score's two parts (module docstring), from an image's counts (pure function).

    Args:
        counts: ``n_labels``, ``n_duplicate``, ``n_overlap``, ``n_empty``, ``n_tiny`` and, with predictions,
            ``n_missed``, ``n_spurious``, ``n_misplaced`` (``n_missed`` absent or NaN = no predictions).
        weights: per kind (:data:`DEFAULT_WEIGHTS` keys; missing ones take the default).
        baselines: per kind of :data:`RATE_KINDS`, the model's own rate (default 0), see :func:`excess`.
        noise_z: standard errors of chance allowed above the baseline (:func:`excess`).

    Returns:
        ``(label_score, pred_score)``; ``pred_score`` is NaN without predictions. The image score is their sum
        (NaN counting as 0).
    """
    w = {**DEFAULT_WEIGHTS, **(weights or {})}
    n = max(int(counts.get("n_labels", 0)), 1)
    label = sum(w[k] * float(counts.get(f"n_{k}", 0)) for k in LABEL_KINDS) / n
    missed = counts.get("n_missed", math.nan)
    if missed is None or pd.isna(missed):
        return float(label), math.nan
    fractions = image_fractions(counts)
    base = baselines or {}
    pred = sum(w[k] * float(excess(f, float(base.get(k, 0.0)), d, noise_z)) for k, (f, d) in fractions.items())
    return float(label), float(pred)


def apply_baselines(images: pd.DataFrame, weights: Mapping[str, float] | None = None,
                    min_images: int = MIN_BASELINE_IMAGES, noise_z: float = 2.0) -> pd.DataFrame:
    """Fill the ``<kind>_baseline`` columns, ``pred_score`` and ``score`` of an image table (a copy, sorted).

    The baseline of a fraction (:data:`RATE_KINDS`) for a cell type is its median over the cell type's images with
    predictions, when there are at least ``min_images`` of them; else 0.

    Args:
        images: rows as :data:`IMAGE_COLUMNS`, with ``label_score``, the counts and the ``<kind>_fraction`` columns
            filled in.
        weights: per kind (:data:`DEFAULT_WEIGHTS`).
        min_images: images of a cell type with predictions needed for its baselines.
        noise_z: see :func:`excess`.

    Returns:
        The table, highest score first (ties keep the input order).
    """
    w = {**DEFAULT_WEIGHTS, **(weights or {})}
    out = images.copy()
    with_pred = out["has_pred"].astype(bool).to_numpy()
    pred_score = np.zeros(len(out))
    n = np.maximum(out["n_labels"].to_numpy(dtype=np.float64), 1.0)
    m = out["n_missed"].astype(float).fillna(0.0).to_numpy()
    denominators = {"missed": n + m, "spurious": n, "misplaced": n}
    for kind in RATE_KINDS:
        fraction = out[f"{kind}_fraction"].astype(float)
        baseline = pd.Series(0.0, index=out.index)
        for _, group in fraction[with_pred].groupby(out["cell_type"][with_pred]):
            if len(group) >= min_images:
                baseline[group.index] = float(group.median())
        out[f"{kind}_baseline"] = baseline.where(with_pred, np.nan)
        pred_score += w[kind] * np.nan_to_num(excess(fraction.to_numpy(), baseline.to_numpy(), denominators[kind],
                                                     noise_z))
    out["pred_score"] = np.where(with_pred, pred_score, np.nan)
    out["score"] = out["label_score"] + out["pred_score"].fillna(0.0)
    order = np.lexsort((np.arange(len(out)), -out["score"].to_numpy()))
    return out.iloc[order].reset_index(drop=True)


# ----------------------------------------------------------------------------------------------------- cleanlab
def cleanlab_matrices(label_boxes: np.ndarray, pred_boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Box IoU and ObjectLab similarity matrices, vectorised, as ``cleanlab.object_detection.rank`` defines them.

    ``iou`` is cleanlab's ``_get_overlap_matrix`` (intersection / max(union, 1e-6) of XYXY boxes); ``similarity`` is
    ``alpha * iou + (1 - alpha) * exp(-EUC_FACTOR * centre distance)`` (alpha 0.9, factor 0.1).

    Args:
        label_boxes: float ``(L, 4)`` XYXY; pred_boxes: float ``(M, 4)`` XYXY.

    Returns:
        ``(iou, similarity)``, float64 ``(L, M)`` each.
    """
    from cleanlab.internal.constants import ALPHA

    iou = _overlap_matrix(label_boxes, pred_boxes)
    return iou, iou * ALPHA + (1 - ALPHA) * _dist_matrix(label_boxes, pred_boxes)


def _overlap_matrix(bb1_list, bb2_list) -> np.ndarray:
    """cleanlab's ``rank._get_overlap_matrix`` (box IoU, float64 ``(len1, len2)``), vectorised; same values."""
    from cleanlab.internal.constants import EPSILON

    a = np.asarray(bb1_list, dtype=np.float64).reshape(-1, 4)[:, None, :]
    b = np.asarray(bb2_list, dtype=np.float64).reshape(-1, 4)[None, :, :]
    w = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0])
    h = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])
    inter = np.where((w < 0) | (h < 0), 0.0, w * h)
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / np.clip(area_a + area_b - inter, EPSILON, None)


def _dist_matrix(bb1_list, bb2_list) -> np.ndarray:
    """cleanlab's ``rank._get_dist_matrix`` (``exp(-EUC_FACTOR * centre distance)``, float64 ``(len1, len2)``),
    vectorised; same values."""
    from cleanlab.internal.constants import EUC_FACTOR

    a = np.asarray(bb1_list, dtype=np.float64).reshape(-1, 4)[:, None, :]
    b = np.asarray(bb2_list, dtype=np.float64).reshape(-1, 4)[None, :, :]
    dx = (a[..., 0] + a[..., 2]) / 2 - (b[..., 0] + b[..., 2]) / 2
    dy = (a[..., 1] + a[..., 3]) / 2 - (b[..., 1] + b[..., 3]) / 2
    return np.exp(-np.sqrt(dx * dx + dy * dy) * EUC_FACTOR)


class _CleanlabImage(NamedTuple):
    """One image's boxes for ObjectLab: labels XYXY + class, predictions XYXY + class + probability."""

    label_boxes: np.ndarray
    label_classes: np.ndarray
    pred_boxes: np.ndarray
    pred_classes: np.ndarray
    pred_probs: np.ndarray


@contextmanager
def vectorised_cleanlab():
    """Within the block, ``cleanlab.object_detection.rank`` computes its box matrices with numpy.

    cleanlab builds every IoU and centre-distance matrix with two nested Python loops over label and prediction
    boxes (~60 us per pair: ~9 s for one median shsy5y image, 312 labels x 453 predictions). Its two matrix
    functions (``_get_overlap_matrix``, ``_get_dist_matrix``) are swapped for :func:`_overlap_matrix` and
    :func:`_dist_matrix`, which return the same values (tested), and restored on exit; everything else is
    cleanlab's own code. Not thread-safe (it patches a module).

    Yields:
        The ``cleanlab.object_detection.rank`` module.
    """
    from cleanlab.object_detection import rank

    saved = rank._get_overlap_matrix, rank._get_dist_matrix
    rank._get_overlap_matrix, rank._get_dist_matrix = _overlap_matrix, _dist_matrix
    try:
        yield rank
    finally:
        rank._get_overlap_matrix, rank._get_dist_matrix = saved


def cleanlab_format(images: Sequence[_CleanlabImage]) -> tuple[list[dict], list[list[np.ndarray]]]:
    """Images in the formats of ``cleanlab.object_detection``.

    Returns:
        ``(labels, predictions)``: ``labels[i] = {"bboxes": float (L, 4) XYXY, "labels": int (L,)}``;
        ``predictions[i][k]``: float ``(M_k, 5)`` rows ``[x1, y1, x2, y2, probability]`` of the predictions of class
        ``k`` (one array per class of :data:`cellkit.CELL_TYPES`).
    """
    labels = [{"bboxes": np.asarray(im.label_boxes, dtype=np.float64).reshape(-1, 4),
               "labels": np.asarray(im.label_classes, dtype=np.int64)} for im in images]
    predictions = []
    for im in images:
        boxes = np.asarray(im.pred_boxes, dtype=np.float64).reshape(-1, 4)
        probs = np.asarray(im.pred_probs, dtype=np.float64).reshape(-1, 1)
        classes = np.asarray(im.pred_classes, dtype=np.int64)
        predictions.append([np.concatenate([boxes[classes == k], probs[classes == k]], axis=1)
                            for k in range(len(CELL_TYPES))])
    return labels, predictions


def cleanlab_image_scores(images: Sequence[_CleanlabImage]) -> np.ndarray:
    """ObjectLab's image label quality and its three subtype scores, by cleanlab's public functions.

    ``rank.get_label_quality_scores`` for the quality; ``rank.compute_overlooked_box_scores``,
    ``compute_badloc_box_scores``, ``compute_swap_box_scores`` pooled by ``rank.pool_box_scores_per_image`` for the
    subtypes; all with cleanlab's defaults, inside :func:`vectorised_cleanlab`. ``overlapping_label_check`` is off:
    it only penalises a box labelled with two different classes, which cannot happen in an image of one cell type,
    so the scores are those of the default (tested) without its O(L^2) Python loop.

    Args:
        images: per image, boxes and classes (class ids index :data:`cellkit.CELL_TYPES`).

    Returns:
        float64 ``(N, 4)``: quality, overlooked, bad location, swap (each in [0, 1], lower worse).
    """
    if not images:
        return np.zeros((0, 4))
    labels, predictions = cleanlab_format(images)
    with vectorised_cleanlab() as rank:
        quality = rank.get_label_quality_scores(labels, predictions, overlapping_label_check=False, verbose=False)
        overlooked = rank.pool_box_scores_per_image(
            rank.compute_overlooked_box_scores(labels=labels, predictions=predictions))
        badloc = rank.pool_box_scores_per_image(rank.compute_badloc_box_scores(labels=labels, predictions=predictions))
        swap = rank.pool_box_scores_per_image(rank.compute_swap_box_scores(labels=labels, predictions=predictions,
                                                                           overlapping_label_check=False))
    return np.stack([quality, overlooked, badloc, swap], axis=1).astype(np.float64)


# ------------------------------------------------------------------------------------------------------- audit
class AuditResult(NamedTuple):
    """The audit of a train CSV.

    Attributes:
        images: :data:`IMAGE_COLUMNS`, one row per audited image, highest score first.
        instances: :data:`INSTANCE_COLUMNS`, one row per flag, in image order (as ``images``), then kind.
        summary: provenance and totals (JSON-serialisable): sources, spec, counts per kind, seconds.
    """

    images: pd.DataFrame
    instances: pd.DataFrame
    summary: dict


def _cleanlab_available() -> bool:
    try:
        import cleanlab.object_detection.rank  # noqa: F401
    except ImportError:
        return False
    return True


def has_predictions(path) -> bool:
    """Whether ``path`` is a predictions store holding at least one image (so that ``audit(pred_dir=path)`` can use
    it), e.g. ``OUT_DIR/oof`` once notebook 04 predicted a fold. Never raises for a missing or empty folder."""
    from cellkit import predictions as P

    if path is None or not Path(path).is_dir():
        return False
    try:
        return bool(P.image_ids(path))
    except ValueError:
        return False


def _load_thresholds(path) -> dict:
    from cellkit import postprocess

    if path is None:
        return {c: dict(v) for c, v in postprocess.SEED_THRESHOLDS.items()}
    return postprocess.load_thresholds(path)["thresholds"]


def audit(truth, pred_dir=None, thresholds=None, spec: AuditSpec | None = None, image_ids=None,
          progress: bool = True) -> AuditResult:
    """Audit the annotations of a train CSV, image by image.

    Args:
        truth: a train CSV path or its frame from :func:`cellkit.data.read_train_csv` (index = 0-based data row).
        pred_dir: a predictions store (:mod:`cellkit.predictions`) for the prediction flags; None for labels only.
            Images of the truth without predictions are audited from their labels only (``has_pred`` False; a
            warning gives their count); predictions of an image absent from the truth are an error.
        thresholds: a ``thresholds.json`` (:func:`cellkit.postprocess.load_thresholds`) whose per-class ``score``,
            ``mask`` and ``min_area`` decide which predictions are confident and how their masks are binarised;
            None for the seed's 0.5 / 0.5 / 0. The thresholds of the image's cell type (from the truth) apply to all
            its predictions.
        spec: thresholds and weights (:class:`AuditSpec`; default ones when None).
        image_ids: audit only these images (each must be in the truth); None for all.
        progress: tqdm bar over the images.

    Returns:
        :class:`AuditResult`.

    Raises:
        FileNotFoundError: a missing CSV, store or thresholds file.
        ValueError: a malformed annotation (naming the CSV line and id), an unknown image id, predictions of an
            image absent from the truth or of another size (naming the store and the id), invalid thresholds.
    """
    from tqdm.auto import tqdm

    from cellkit import data
    from cellkit import predictions as P

    t0 = time.perf_counter()
    spec = spec or AuditSpec()
    if isinstance(truth, pd.DataFrame):
        table, source = truth, truth.attrs.get("path")
    else:
        table, source = data.read_train_csv(truth), str(truth)
    where = source or "truth"
    groups = table.groupby("id", sort=False).indices
    if image_ids is None:
        ids = list(groups)
    else:
        ids = list(dict.fromkeys(str(i) for i in image_ids))
        unknown = [i for i in ids if i not in groups]
        if unknown:
            raise ValueError(f"{where}: {len(unknown)} image id(s) to audit are not in it, e.g. {unknown[0]!r}")
    listing = {}
    if pred_dir is not None:
        listing = {i: Path(pred_dir) / f"{i}.npz" for i in P.image_ids(pred_dir)}
        foreign = sorted(set(listing) - set(groups))
        if foreign:
            raise ValueError(f"{pred_dir}: predictions of {len(foreign)} image(s) that are not in {where}, e.g. "
                             f"{foreign[0]!r}")
        without = [i for i in ids if i not in listing]
        if without:
            logger.warning("cellkit audit: %d of %d audited image(s) have no predictions in %s: labels only for "
                           "them", len(without), len(ids), pred_dir)
    thr = _load_thresholds(thresholds)
    columns = {c: table[c].to_numpy() for c in ("id", "annotation", "width", "height", "cell_type")}
    rows_index = table.index.to_numpy()

    image_records, instance_records, cl_images, cl_rows = [], [], [], []
    for image_id in tqdm(ids, desc="audit", unit="img", disable=not progress, leave=False):
        positions = groups[image_id]
        record, instances, cl = _audit_image(image_id, positions, columns, rows_index, listing.get(image_id),
                                             thr, spec, where)
        image_records.append(record)
        instance_records.extend(instances)
        if cl is not None:
            cl_images.append(cl)
            cl_rows.append(len(image_records) - 1)
    images = pd.DataFrame.from_records(image_records, columns=list(IMAGE_COLUMNS))
    if cl_images and not _cleanlab_available():
        logger.warning("cellkit audit: cleanlab is not installed: the cleanlab_* columns stay empty (pip install "
                       "'cleanlab>=2.9'); every flag and the score are computed without it")
    elif cl_images:
        scores = cleanlab_image_scores(cl_images)
        for col, k in (("cleanlab_quality", 0), ("cleanlab_overlooked", 1), ("cleanlab_badloc", 2),
                       ("cleanlab_swap", 3)):
            images.loc[cl_rows, col] = scores[:, k]
    images = apply_baselines(images, spec.weights, noise_z=spec.noise_z)
    images["flags"] = [_flag_text(r) for _, r in images.iterrows()]
    instances = _instance_frame(instance_records, [str(i) for i in images["id"]])
    for col in ("n_pred", "n_confident", "n_missed", "n_spurious", "n_misplaced"):
        images[col] = images[col].astype("Int64")
    summary = {
        "truth": source, "pred_dir": None if pred_dir is None else str(pred_dir),
        "thresholds": None if thresholds is None else str(thresholds), "spec": asdict(spec),
        "n_images": int(len(images)), "n_with_pred": int(images["has_pred"].sum()),
        "n_flagged_images": int((images["score"] > 0).sum()),
        "flags": {k: int((instances["kind"] == k).sum()) for k in KINDS},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return AuditResult(images, instances, summary)


def _audit_image(image_id: str, positions: np.ndarray, columns: dict, rows_index: np.ndarray, pred_path,
                 thresholds: dict, spec: AuditSpec, where: str):
    """One image's record, its instance records and its cleanlab boxes (None without predictions)."""
    from cellkit import predictions as P
    from cellkit.postprocess import binarize_table

    first = positions[0]
    cell_type = str(columns["cell_type"][first])
    shape = (int(columns["height"][first]), int(columns["width"][first]))
    rows = rows_index[positions]
    try:
        labels = MaskRuns.from_rles(list(columns["annotation"][positions]), shape)
    except rle.MaskError as exc:
        raise ValueError(f"{where} line {int(rows[exc.index]) + 2} (id {image_id}): bad annotation: "
                         f"{exc.problem}") from None
    flags = label_flags(labels, spec.min_area[cell_type], spec.duplicate_iou, spec.overlap_ios)
    n_labels = int(np.count_nonzero(labels.areas))
    instances = []

    def add(kind, label=None, partner=None, pred=None, iou=math.nan, ios=math.nan, pred_score=math.nan,
            box=None, area=None):
        if box is None:
            box = labels.boxes[label]
        instances.append({
            "kind": kind, "id": image_id, "cell_type": cell_type,
            "row": None if label is None else int(rows[label]),
            "partner_row": None if partner is None or partner < 0 else int(rows[partner]),
            "pred_index": None if pred is None or pred < 0 else int(pred), "iou": float(iou), "ios": float(ios),
            "area": int(labels.areas[label]) if area is None else int(area),
            "partner_area": None if partner is None or partner < 0 else int(labels.areas[partner]),
            "pred_score": float(pred_score), "x0": int(box[0]), "y0": int(box[1]), "x1": int(box[2]),
            "y1": int(box[3])})

    for (k, p), v in zip(flags.duplicate, flags.duplicate_iou):
        add("duplicate", k, p, iou=v, ios=_ios(labels, k, p))
    for (k, p), v, s in zip(flags.overlap, flags.overlap_iou, flags.overlap_ios):
        add("overlap", k, p, iou=v, ios=s)
    for k in flags.empty:
        add("empty", k)
    for k in flags.tiny:
        add("tiny", k)
    counts = {"n_labels": n_labels, "n_duplicate": len(flags.duplicate), "n_overlap": len(flags.overlap),
              "n_empty": len(flags.empty), "n_tiny": len(flags.tiny)}
    label_score, _ = image_score(counts, spec.weights)
    record = {"id": image_id, "cell_type": cell_type, "score": label_score, "label_score": label_score,
              "pred_score": math.nan, "flags": "", "n_rows": int(len(positions)), **counts, "has_pred": False,
              "n_pred": None, "n_confident": None, "n_missed": None, "n_spurious": None, "n_misplaced": None,
              **{f"{k}_{c}": math.nan for c in ("fraction", "baseline") for k in RATE_KINDS},
              "mean_best_iou": math.nan,
              "cleanlab_quality": math.nan, "cleanlab_overlooked": math.nan, "cleanlab_badloc": math.nan,
              "cleanlab_swap": math.nan}
    if pred_path is None:
        return record, instances, None

    pred = P.load(pred_path)
    if pred.shape != shape:
        raise ValueError(f"{pred_path}: predictions of a {pred.height}x{pred.width} (HxW) image, {where} says "
                         f"{shape[0]}x{shape[1]} for id {image_id}")
    t = thresholds[cell_type]
    table = binarize_table(t["mask"])
    crops = [table[m] for m in pred.masks]
    preds = MaskRuns.from_crops(crops, pred.mask_boxes, shape)
    confident = t["score"] if spec.confident_score is None else spec.confident_score
    pf = prediction_flags(labels, preds, pred.scores, confident, t["min_area"], spec.match_iou, spec.misplaced_iou,
                          spec.missed_coverage, spec.pred_nms_ios)
    for p, v, lab, cov in zip(pf.missed, pf.missed_iou, pf.missed_label, pf.missed_coverage):
        add("missed", None, lab if v > 0 else -1, pred=p, iou=v, ios=cov, pred_score=pred.scores[p],
            box=preds.boxes[p], area=preds.areas[p])
    for k in pf.spurious:
        add("spurious", k, iou=pf.label_best_iou[k])
    for k in pf.misplaced:
        b = pf.label_best_pred[k]
        add("misplaced", k, pred=b, iou=pf.label_best_iou[k], pred_score=pred.scores[b])
    nonempty = labels.areas > 0
    record.update({
        "has_pred": True, "n_pred": len(pred), "n_confident": len(pf.confident), "n_missed": len(pf.missed),
        "n_spurious": len(pf.spurious), "n_misplaced": len(pf.misplaced),
        **{f"{k}_fraction": v[0] for k, v in image_fractions({"n_labels": n_labels, "n_missed": len(pf.missed),
                                                          "n_spurious": len(pf.spurious),
                                                          "n_misplaced": len(pf.misplaced)}).items()},
        "mean_best_iou": float(pf.label_best_iou[nonempty].mean()) if nonempty.any() else math.nan,
    })
    class_id = CELL_TYPES.index(cell_type)
    cl = _CleanlabImage(labels.boxes[nonempty].astype(np.float64), np.full(n_labels, class_id, dtype=np.int64),
                        pred.boxes.astype(np.float64), pred.classes.astype(np.int64),
                        pred.scores.astype(np.float64))
    return record, instances, cl


def _ios(masks: MaskRuns, a: int, b: int) -> float:
    inter = pair_intersections(masks, masks, np.array([a]), np.array([b]))[0]
    return float(inter / max(min(masks.areas[a], masks.areas[b]), 1))


def _flag_text(r) -> str:
    parts = []
    for kind in KINDS:
        v = r[f"n_{kind}"]
        if v is not None and not pd.isna(v) and int(v) > 0:
            parts.append(f"{kind}:{int(v)}")
    return " ".join(parts)


def _instance_frame(records: list[dict], image_order: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame.from_records(records, columns=list(INSTANCE_COLUMNS))
    for col in ("row", "partner_row", "pred_index", "partner_area"):
        frame[col] = frame[col].astype("Int64")
    for col in ("area", "x0", "y0", "x1", "y1"):
        frame[col] = frame[col].astype(np.int64)
    if len(frame):
        rank_of = {i: k for k, i in enumerate(image_order)}
        kind_of = {k: n for n, k in enumerate(KINDS)}
        order = np.lexsort((np.arange(len(frame)), frame["kind"].map(kind_of).to_numpy(),
                            frame["id"].map(rank_of).to_numpy()))
        frame = frame.iloc[order].reset_index(drop=True)
    return frame


# ------------------------------------------------------------------------------------------------------- files
def _write_csv(frame: pd.DataFrame, path: Path) -> Path:
    with atomic.atomic_path(path, suffix=".csv") as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")
    return path


def write_audit(result: AuditResult, out_dir) -> dict[str, Path]:
    """Write ``audit.csv``, ``instances.csv`` and ``audit.json`` (the summary) into ``out_dir`` (created), each
    atomically (:mod:`cellkit.atomic`).

    Returns:
        ``{"audit": path, "instances": path, "summary": path}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"audit": _write_csv(result.images, out_dir / AUDIT_NAME),
             "instances": _write_csv(result.instances, out_dir / INSTANCES_NAME)}
    paths["summary"] = atomic.write_json(out_dir / SUMMARY_NAME, result.summary)
    return paths


def read_audit(path) -> AuditResult:
    """Read an audit directory written by :func:`write_audit` (or the path of its ``audit.csv``).

    Raises:
        FileNotFoundError: a missing file. ValueError: a file without the documented columns (naming it).
    """
    path = Path(path)
    folder = path.parent if path.suffix == ".csv" else path
    frames = {}
    for name, cols in ((AUDIT_NAME, IMAGE_COLUMNS), (INSTANCES_NAME, INSTANCE_COLUMNS)):
        file = folder / name
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no such audit file (write it with `cellkit audit`)")
        frame = pd.read_csv(file, dtype={"id": str, "flags": str}, keep_default_na=True)
        missing = [c for c in cols if c not in frame.columns]
        if missing:
            raise ValueError(f"{file}: not a cellkit audit file (missing column(s) {', '.join(missing)})")
        frames[name] = frame
    frames[AUDIT_NAME]["flags"] = frames[AUDIT_NAME]["flags"].fillna("")
    summary_path = folder / SUMMARY_NAME
    summary = atomic.read_json(summary_path, "audit summary") if summary_path.is_file() else {}
    return AuditResult(frames[AUDIT_NAME], frames[INSTANCES_NAME], summary)


# ---------------------------------------------------------------------------------------------- training lists
def exclusion_ids(path, known_ids, top: int = 0) -> list[str]:
    """The image ids an exclusion file names, checked against the training data.

    Args:
        path: a text file with one image id per line (blank lines and ``#`` comments ignored), a CSV whose header
            has an ``id`` column (every row's id), or an ``audit.csv`` (columns ``id`` and ``score``), of which the
            ``top`` highest-scoring images are taken (ties: file order).
        known_ids: the ids of the train CSV.
        top: with an audit.csv, how many of its images; must be > 0 there and 0 for a plain list.

    Returns:
        The ids, in file (or score) order, without repeats.

    Raises:
        FileNotFoundError: no such file.
        ValueError: naming the file: ``top`` given for a plain list or missing for an audit.csv, ``top`` < 0, an
            empty list, or ids that are not in ``known_ids`` (their count and the first few).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such exclusion file")
    if top < 0:
        raise ValueError(f"{path}: --exclude-top must be >= 0, got {top}")
    text = path.read_text(encoding="utf-8")
    first = next((line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")),
                 "")
    header = [c.strip() for c in first.split(",")]
    if "id" in header:
        frame = pd.read_csv(path, dtype={"id": str}, keep_default_na=False, comment="#")
        if "score" in header:
            if top <= 0:
                raise ValueError(f"{path}: an audit.csv lists every audited image: give --exclude-top N (the N "
                                 f"highest-scoring images are excluded)")
            scores = pd.to_numeric(frame["score"], errors="coerce")
            if scores.isna().any():
                bad = int(np.flatnonzero(scores.isna().to_numpy())[0])
                raise ValueError(f"{path} line {bad + 2}: score {frame['score'].iloc[bad]!r} is not a number")
            order = np.lexsort((np.arange(len(frame)), -scores.to_numpy()))
            ids = [str(i).strip() for i in frame["id"].to_numpy()[order][:top]]
        else:
            if top:
                raise ValueError(f"{path}: --exclude-top needs an audit.csv (with a score column); this file is a "
                                 f"plain list of ids")
            ids = [str(i).strip() for i in frame["id"]]
    else:
        if top:
            raise ValueError(f"{path}: --exclude-top needs an audit.csv (with a score column); this file is a plain "
                             f"list of ids")
        ids = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    ids = [i for i in dict.fromkeys(ids) if i]
    if not ids:
        raise ValueError(f"{path}: the exclusion file names no image id")
    known = set(map(str, known_ids))
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} excluded id(s) are not in the train CSV, e.g. "
                         f"{', '.join(repr(i) for i in unknown[:3])}")
    return ids
