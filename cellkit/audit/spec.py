"""Constants and thresholds of the label audit: flag kinds, output columns, :class:`AuditSpec`."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from cellkit import CELL_TYPES

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
    "misplaced_baseline", "mean_best_iou", "cleanlab_overlooked", "cleanlab_badloc", "cleanlab_swap",
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
- ``cleanlab_*``: ObjectLab's overlooked / bad-location / swap subtype scores of the image (in [0, 1], lower worse;
  empty without predictions; :mod:`cellkit.audit.cleanlab`).
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

