"""The image score of the audit: flag fractions, the cell types' baselines, :func:`excess` (module docstring of
:mod:`cellkit.audit`)."""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from cellkit.audit.spec import DEFAULT_WEIGHTS, LABEL_KINDS, MIN_BASELINE_IMAGES, RATE_KINDS

__all__ = ["image_fractions", "excess", "image_score", "apply_baselines"]


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

