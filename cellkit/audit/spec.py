"""What the label audit computes: flag kinds, output columns, thresholds and weights (:class:`AuditSpec`), and the
image score (flag fractions, the cell types' baselines, :func:`excess`; module docstring of :mod:`cellkit.audit`).

:data:`IMAGE_COLUMNS`, the columns of ``audit.csv`` (one row per image, highest ``score`` first):

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

:data:`INSTANCE_COLUMNS`, the columns of ``instances.csv`` (one row per flag):

- ``row``: the flagged annotation's 0-based data row (CSV line = row + 2); empty for ``missed``;
- ``partner_row``: the other annotation of a ``duplicate`` / ``overlap`` pair, the best-matching annotation of a
  ``missed`` prediction (empty when none touches it);
- ``pred_index``: the ``missed`` prediction, or the best confident prediction of a ``misplaced`` annotation;
- ``iou``: mask IoU with the partner (pair kinds) or the best IoU (prediction kinds); ``ios``: intersection over the
  smaller mask (pair kinds) or, for ``missed``, the fraction of the prediction's pixels on annotations;
- ``area`` / ``partner_area``: pixels of the flagged mask and of its partner; ``pred_score``: the prediction's score;
- ``x0, y0, x1, y1``: the flagged mask's box (pixels, end exclusive).
"""
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cellkit import CELL_TYPES

DEFAULT_MIN_AREA = {"shsy5y": 30, "astro": 80, "cort": 40}  # a non-empty annotation under this many pixels is tiny
DEFAULT_WEIGHTS = {"duplicate": 2.0, "overlap": 1.0, "empty": 1.0, "tiny": 1.0, "missed": 1.0, "spurious": 0.5,
                   "misplaced": 1.0}  # weights of the image score's terms, one per flag kind
RATE_KINDS = ("missed", "spurious", "misplaced")  # the fractions taken relative to their cell type's baseline
MIN_BASELINE_IMAGES = 5  # images of a cell type with predictions needed for its baselines (median fractions)
LABEL_KINDS = ("duplicate", "overlap", "empty", "tiny")
PREDICTION_KINDS = ("missed", "spurious", "misplaced")
KINDS = LABEL_KINDS + PREDICTION_KINDS  # every kind of instances.csv

IMAGE_COLUMNS = (
    "id", "cell_type", "score", "label_score", "pred_score", "flags", "n_rows", "n_labels", "n_duplicate", "n_overlap",
    "n_empty", "n_tiny", "has_pred", "n_pred", "n_confident", "n_missed", "n_spurious", "n_misplaced",
    "missed_fraction", "spurious_fraction", "misplaced_fraction", "missed_baseline", "spurious_baseline",
    "misplaced_baseline", "mean_best_iou", "cleanlab_overlooked", "cleanlab_badloc", "cleanlab_swap",
)

INSTANCE_COLUMNS = ("kind", "id", "cell_type", "row", "partner_row", "pred_index", "iou", "ios", "area",
                    "partner_area", "pred_score", "x0", "y0", "x1", "y1")


@dataclass(frozen=True)
class AuditSpec:
    """Thresholds and weights of the audit (see the module docstring for what each flag means).

    Attributes:
        duplicate_iou: mask IoU at or above which two annotations are duplicates.
        overlap_ios: intersection over the smaller mask at or above which two annotations overlap heavily.
        min_area: per cell type, a non-empty annotation with fewer pixels is tiny; the three Sartorius cell types
            must be given, another dataset's classes may be (a class without an entry takes the smallest value).
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
        missing = [c for c in CELL_TYPES if c not in self.min_area] + [None]
        unknown = [k for k in self.weights if k not in DEFAULT_WEIGHTS] + [None]
        problems = [f"AuditSpec.{name} = {getattr(self, name)} is out of range (0, 1]"
                    for name in ("duplicate_iou", "overlap_ios", "match_iou", "missed_coverage", "pred_nms_ios")
                    if not 0.0 < getattr(self, name) <= 1.0] + [message for bad, message in (
            (not 0.0 <= self.misplaced_iou <= self.match_iou,
             f"AuditSpec.misplaced_iou = {self.misplaced_iou} must be in [0, match_iou = {self.match_iou}]"),
            (not 0.0 <= self.noise_z < 10.0, f"AuditSpec.noise_z = {self.noise_z} is out of range [0, 10)"),
            (self.confident_score is not None and not 0.0 <= self.confident_score <= 1.0,
             f"AuditSpec.confident_score = {self.confident_score} is out of range [0, 1]"),
            (missing[0] is not None,
             f"AuditSpec.min_area: missing cell type {missing[0]!r} (needs {', '.join(CELL_TYPES)})"),
            (unknown[0] is not None,
             f"AuditSpec.weights: unknown key {unknown[0]!r} (expected {', '.join(DEFAULT_WEIGHTS)})")) if bad]
        if problems:
            raise ValueError(problems[0])
        object.__setattr__(self, "min_area", {c: int(self.min_area[c]) for c in (*CELL_TYPES, *self.min_area)})
        object.__setattr__(self, "weights", {**DEFAULT_WEIGHTS, **{k: float(v) for k, v in self.weights.items()}})

    def tiny_area(self, cell_type: str) -> int:
        """The ``min_area`` of a class (the smallest of :attr:`min_area` for a class without an entry)."""
        return self.min_area.get(cell_type, min(self.min_area.values()))


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
    if pd.isna(counts.get("n_missed", np.nan)):
        return float(label), np.nan
    pred = sum(w[k] * float(excess(f, float((baselines or {}).get(k, 0.0)), d, noise_z))
               for k, (f, d) in image_fractions(counts).items())
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

