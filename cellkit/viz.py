"""Pictures for the notebooks: mask overlays, per-type counts, cell-area distributions, training curves, label audits.

Pure helpers (:func:`overlay`, :func:`type_counts`, :func:`cell_areas`, :func:`read_metrics`) return arrays and
DataFrames; ``plot_*`` functions return a matplotlib ``Figure`` (shown inline by Jupyter, saved with
:func:`save_figure`). matplotlib is imported inside the plotting functions, so importing this module is cheap.
Masks travel as competition RLE strings (decoded with :mod:`cellkit.rle`) or boolean ``(H, W)`` arrays.
"""
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from cellkit import CELL_TYPES, SHAPE, atomic, rle

#: One matplotlib colour per cell type, the same in every plot.
TYPE_COLORS = {"shsy5y": "tab:blue", "astro": "tab:orange", "cort": "tab:green"}

#: RGB colour of each :mod:`cellkit.audit` flag kind in :func:`audit_overlay` / :func:`plot_audit`.
AUDIT_COLORS = {"duplicate": (230, 25, 75), "overlap": (245, 130, 48), "empty": (128, 128, 128),
                "tiny": (240, 50, 230), "spurious": (66, 212, 244), "misplaced": (255, 225, 25),
                "missed": (60, 220, 75)}

#: RGB colour of the outlines of unflagged annotations in :func:`audit_overlay`.
OUTLINE_COLOR = (170, 170, 170)


# ----------------------------------------------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------------------------------------------
def instance_colors(n: int, seed: int = 0) -> np.ndarray:
    """Return ``n`` bright random RGB colours, uint8 ``(n, 3)``, deterministic per seed."""
    rng = np.random.default_rng(seed)
    hsv_h = rng.random(n)
    # HSV (h, 1, 1) -> RGB, vectorised.
    k = (np.array([5.0, 3.0, 1.0])[None, :] + hsv_h[:, None] * 6.0) % 6.0
    rgb = 1.0 - np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return (rgb * 255).astype(np.uint8)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """Grayscale ``(H, W)`` or RGB ``(H, W, 3)`` image of any numeric dtype -> uint8 ``(H, W, 3)`` (min-max scaled)."""
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.dtype != np.uint8:
        lo, hi = float(img.min()), float(img.max())
        img = ((img - lo) / (hi - lo + 1e-12) * 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected a (H, W) or (H, W, 3) image, got shape {np.asarray(image).shape}")
    return img


def overlay(image: np.ndarray, masks: Sequence[np.ndarray], alpha: float = 0.45, seed: int = 0) -> np.ndarray:
    """Blend instance masks over an image, one random colour per instance, boundaries drawn opaque.

    Args:
        image: ``(H, W)`` grayscale or ``(H, W, 3)`` image.
        masks: boolean ``(H, W)`` masks (later masks are drawn over earlier ones).
        alpha: opacity of the mask fill in [0, 1].
        seed: colour seed.

    Returns:
        uint8 ``(H, W, 3)`` image.
    """
    out = to_rgb(image).astype(np.float32)
    colors = instance_colors(len(masks), seed).astype(np.float32)
    for mask, color in zip(masks, colors):
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != out.shape[:2]:
            raise ValueError(f"mask shape {mask.shape} != image shape {out.shape[:2]}")
        out[mask] = (1.0 - alpha) * out[mask] + alpha * color
        out[_boundary(mask)] = color
    return out.astype(np.uint8)


def _boundary(mask: np.ndarray) -> np.ndarray:
    """The pixels of a bool mask with a 4-neighbour outside it (or on the image border)."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def audit_overlay(image: np.ndarray, masks: Sequence[np.ndarray], kinds: dict[int, str], alpha: float = 0.55,
                  boxes: Sequence[tuple[str, Sequence[int]]] = ()) -> np.ndarray:
    """One image's annotations with the flagged ones highlighted (pure function).

    Args:
        image: ``(H, W)`` grayscale or ``(H, W, 3)`` image.
        masks: the image's annotations, bool ``(H, W)`` each, in CSV order.
        kinds: ``{mask index: kind}`` of the flagged annotations (:data:`AUDIT_COLORS` keys); an unflagged mask is
            outlined in :data:`OUTLINE_COLOR`, a flagged one filled (opacity ``alpha``) and outlined in its kind's
            colour, drawn after the others.
        boxes: ``(kind, (x0, y0, x1, y1))`` rectangles (end exclusive) drawn in the kind's colour, e.g. the boxes of
            missed predictions, which have no annotation.

    Returns:
        uint8 ``(H, W, 3)``.

    Raises:
        ValueError: a mask of another shape than the image, or an unknown kind.
    """
    out = to_rgb(image).astype(np.float32)
    for k, kind in kinds.items():
        if kind not in AUDIT_COLORS:
            raise ValueError(f"unknown audit kind {kind!r} for mask {k} (expected one of {', '.join(AUDIT_COLORS)})")
    for k, mask in enumerate(masks):
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != out.shape[:2]:
            raise ValueError(f"mask {k} has shape {mask.shape}, the image {out.shape[:2]}")
        if k not in kinds:
            out[_boundary(mask)] = OUTLINE_COLOR
    for k, kind in kinds.items():
        mask = np.asarray(masks[k], dtype=bool)
        color = np.asarray(AUDIT_COLORS[kind], dtype=np.float32)
        out[mask] = (1.0 - alpha) * out[mask] + alpha * color
        out[_boundary(mask)] = color
    h, w = out.shape[:2]
    for kind, (x0, y0, x1, y1) in boxes:
        if kind not in AUDIT_COLORS:
            raise ValueError(f"unknown audit kind {kind!r} for a box (expected one of {', '.join(AUDIT_COLORS)})")
        color = np.asarray(AUDIT_COLORS[kind], dtype=np.float32)
        x0, y0 = max(int(x0), 0), max(int(y0), 0)
        x1, y1 = min(int(x1), w), min(int(y1), h)
        if x1 <= x0 or y1 <= y0:
            continue
        out[y0, x0:x1] = out[y1 - 1, x0:x1] = color
        out[y0:y1, x0] = out[y0:y1, x1 - 1] = color
    return out.astype(np.uint8)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as a uint8 array (grayscale ``(H, W)`` stays 2-D); ValueError naming the file when it is
    unreadable, truncated or not 8-bit (:func:`cellkit.data.read_image_array`)."""
    from cellkit.data import read_image_array

    return read_image_array(path)


def type_counts(df: pd.DataFrame) -> pd.DataFrame:
    """Images and cells per cell type of a train.csv frame.

    Args:
        df: rows ``id, cell_type`` (one per annotation).

    Returns:
        Index cell type (in :data:`CELL_TYPES` order, types present only), columns ``images``, ``cells``,
        ``cells_per_image``.
    """
    grouped = df.groupby("cell_type")
    table = pd.DataFrame({"images": grouped["id"].nunique(), "cells": grouped.size()})
    table["cells_per_image"] = table["cells"] / table["images"]
    order = [t for t in CELL_TYPES if t in table.index] + [t for t in table.index if t not in CELL_TYPES]
    return table.loc[order]


def sample_images(df: pd.DataFrame, per_type: int = 2, seed: int = 0) -> list[str]:
    """Pick up to ``per_type`` image ids of each cell type (deterministic per seed), in :data:`CELL_TYPES` order."""
    rng = np.random.default_rng(seed)
    images = df.drop_duplicates("id")[["id", "cell_type"]]
    chosen: list[str] = []
    for cell_type in [t for t in CELL_TYPES if t in set(images["cell_type"])]:
        ids = sorted(images.loc[images["cell_type"] == cell_type, "id"])
        chosen += [ids[i] for i in sorted(rng.choice(len(ids), size=min(per_type, len(ids)), replace=False))]
    return chosen


def fold_composition(folds: pd.DataFrame) -> pd.DataFrame:
    """Images per fold (rows) and cell type (columns) of a folds table (``id, cell_type, fold``), with totals."""
    table = pd.crosstab(folds["fold"], folds["cell_type"], margins=True, margins_name="all")
    order = [t for t in CELL_TYPES if t in table.columns] + ["all"]
    return table[order]


def cell_areas(df: pd.DataFrame, column: str = "annotation") -> pd.DataFrame:
    """Pixel area of every mask: columns ``id, cell_type, area`` (int64), from the RLE run lengths."""
    heights = df["height"].astype(int) if "height" in df else [SHAPE[0]] * len(df)
    widths = df["width"].astype(int) if "width" in df else [SHAPE[1]] * len(df)
    areas = [rle.area(s, (h, w)) for s, h, w in zip(df[column], heights, widths)]
    return pd.DataFrame({"id": df["id"].to_numpy(), "cell_type": df["cell_type"].to_numpy(),
                         "area": np.asarray(areas, dtype=np.int64)})


def image_masks(df: pd.DataFrame, image_id: str, column: str = "annotation",
                shape: tuple[int, int] | None = None) -> list[np.ndarray]:
    """Decode the masks of one image from a train.csv / submission frame (empty strings skipped)."""
    rows = df[df["id"] == image_id]
    if shape is None:
        shape = (int(rows["height"].iloc[0]), int(rows["width"].iloc[0])) if "height" in rows and len(rows) else SHAPE
    return [rle.decode(s, shape) for s in rows[column].fillna("") if isinstance(s, str) and s.strip()]


def masks_per_image(submission: pd.DataFrame) -> pd.Series:
    """Number of predicted masks per image of a submission frame (``id, predicted``; empty = no cell)."""
    filled = submission["predicted"].fillna("").astype(str).str.strip() != ""
    return filled.groupby(submission["id"]).sum().astype(int).rename("masks")


def read_metrics(path: str | os.PathLike) -> pd.DataFrame:
    """Read detectron2's ``metrics.json`` (one JSON object per line) into a frame sorted by ``iteration``.

    Lines that fail to parse (a run killed mid-write) are skipped; a restarted run's repeated iterations keep the
    last value.

    Raises:
        FileNotFoundError: when the file is missing.
    """
    from cellkit.rundir import metric_records

    frame = pd.DataFrame.from_records(metric_records(path))
    if frame.empty or "iteration" not in frame:
        raise ValueError(f"{path}: no iterations recorded")
    return frame.groupby("iteration", as_index=False).last().sort_values("iteration").reset_index(drop=True)


def loss_columns(metrics: pd.DataFrame) -> list[str]:
    """The loss columns of a metrics frame: ``total_loss`` first, then every ``loss_*``."""
    cols = [c for c in metrics.columns if c == "total_loss" or c.startswith("loss_")]
    return sorted(cols, key=lambda c: (c != "total_loss", c))


def metric_columns(metrics: pd.DataFrame) -> list[str]:
    """The validation-metric columns of a metrics frame (names containing ``mAP``), the overall one first."""
    cols = [c for c in metrics.columns if "mAP" in c]
    return sorted(cols, key=lambda c: (any(t in c for t in CELL_TYPES), c))


# ----------------------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib
    ipython = sys.modules.get("IPython")  # a running IPython shell (a notebook) has imported it
    if "MPLBACKEND" not in os.environ and (ipython is None or ipython.get_ipython() is None):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _grid(panels: Sequence[tuple[str, np.ndarray]], ncols: int, size: float, pad: float, fontsize: float):
    """A figure of ``(title, picture)`` panels, ``ncols`` per row (fewer for fewer panels), every axis off.

    Returns:
        ``(figure, axes)``, axes a 2-D array.
    """
    n = max(len(panels), 1)
    ncols = min(ncols, n)
    nrows = (n + ncols - 1) // ncols
    fig, axes = _plt().subplots(nrows, ncols, figsize=(size * ncols * 1.35, size * nrows + pad), squeeze=False,
                                layout="constrained")
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (title, picture) in zip(axes.ravel(), panels):
        ax.imshow(picture)
        ax.set_title(title, fontsize=fontsize)
    return fig, axes


def plot_overlays(panels: Sequence[tuple[str, np.ndarray, Sequence[np.ndarray]]], ncols: int = 3,
                  size: float = 4.5):
    """Show ``(title, image, masks)`` panels in a grid, masks overlaid (see :func:`overlay`)."""
    pictures = [(f"{title} ({len(masks)} masks)", overlay(image, masks)) for title, image, masks in panels]
    return _grid(pictures, ncols, size, 0.3, 9)[0]


def plot_rle_overlays(df: pd.DataFrame, image_dir: str | os.PathLike, image_ids: Sequence[str],
                      column: str = "annotation", ncols: int = 3):
    """Overlay the masks of ``image_ids`` (rows of a train.csv or submission frame) on their images."""
    from cellkit.data import find_image

    panels = []
    for image_id in image_ids:
        image = read_image(find_image(image_dir, image_id))
        rows = df[df["id"] == image_id]
        label = f"{image_id} {rows['cell_type'].iloc[0]}" if "cell_type" in rows and len(rows) else image_id
        panels.append((label, image, image_masks(df, image_id, column, shape=image.shape[:2])))
    return plot_overlays(panels, ncols=ncols)


def plot_audit(df: pd.DataFrame, image_dir: str | os.PathLike, result, n: int = 6,
               image_ids: Sequence[str] | None = None, ncols: int = 3, size: float = 4.5):
    """The most suspicious images of a label audit, their flagged annotations highlighted (:func:`audit_overlay`).

    Args:
        df: the audited train.csv frame (:func:`cellkit.data.read_train_csv`: index = the data rows the audit's
            ``row`` column names).
        image_dir: folder of its images.
        result: a :class:`cellkit.audit.AuditResult` (from :func:`cellkit.audit.audit` or
            :func:`cellkit.audit.read_audit`).
        n: how many images, the highest scores first (only images with a flag); ignored with ``image_ids``.
        image_ids: draw these images instead.
        ncols, size: grid columns and panel size (inches).

    Returns:
        matplotlib Figure: one panel per image titled with its id, cell type, score and flags; a legend of the kinds
        drawn. Missed predictions (no annotation) are drawn as boxes.
    """
    from matplotlib.patches import Patch

    from cellkit.data import find_image

    images = result.images
    if image_ids is None:
        image_ids = images.loc[images["score"] > 0, "id"].astype(str).head(int(n)).tolist()
    by_id = images.set_index(images["id"].astype(str))
    instances = result.instances
    panels, seen = [], set()
    for image_id in image_ids:
        rows = df[df["id"] == image_id]
        image = read_image(find_image(image_dir, image_id))
        shape = image.shape[:2]
        position = {int(r): k for k, r in enumerate(rows.index)}
        masks = [rle.decode(s, shape) if isinstance(s, str) else np.zeros(shape, bool) for s in rows["annotation"]]
        kinds, boxes = {}, []
        for r in instances[instances["id"].astype(str) == image_id].itertuples():
            if r.kind == "missed" or pd.isna(r.row):
                boxes.append((r.kind, (r.x0, r.y0, r.x1, r.y1)))
            elif int(r.row) in position and r.kind != "empty":
                kinds.setdefault(position[int(r.row)], r.kind)
            seen.add(r.kind)
        if image_id in by_id.index:
            info = by_id.loc[image_id]
            title = f"{image_id} {info['cell_type']} score {float(info['score']):.3f}\n{info['flags'] or 'no flag'}"
        else:
            title = f"{image_id} (not audited)"
        panels.append((title, audit_overlay(image, masks, kinds, boxes=boxes)))
    fig, axes = _grid(panels, ncols, size, 0.8, 8)
    if not panels:
        axes[0, 0].set_title("no flagged image")
    handles = [Patch(color=np.asarray(AUDIT_COLORS[k]) / 255.0, label=k) for k in AUDIT_COLORS if k in seen]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    return fig


def plot_type_counts(df: pd.DataFrame):
    """Bar charts of images per cell type and cells per cell type (from a train.csv frame)."""
    plt = _plt()
    table = type_counts(df)
    colors = [TYPE_COLORS.get(t, "gray") for t in table.index]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for ax, col, title in zip(axes, ("images", "cells", "cells_per_image"),
                              ("images per type", "cells per type", "cells per image")):
        ax.bar(table.index, table[col], color=colors)
        ax.set_title(title)
        for x, v in enumerate(table[col]):
            ax.annotate(f"{v:.0f}" if col != "cells_per_image" else f"{v:.1f}", (x, v), ha="center", va="bottom")
    fig.tight_layout()
    return fig


def plot_area_distributions(areas: pd.DataFrame, bins: int = 40):
    """Histogram of cell areas (pixels, log scale) per cell type, from :func:`cell_areas`."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    positive = areas[areas["area"] > 0]
    if positive.empty:
        ax.set_title("no masks")
        return fig
    edges = np.logspace(np.log10(positive["area"].min()), np.log10(positive["area"].max() + 1), bins)
    for cell_type, group in positive.groupby("cell_type"):
        ax.hist(group["area"], bins=edges, alpha=0.55, label=f"{cell_type} (median {group['area'].median():.0f})",
                color=TYPE_COLORS.get(cell_type))
    ax.set(xscale="log", xlabel="cell area (pixels)", ylabel="cells", title="cell-area distribution per type")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_training_curves(metrics: pd.DataFrame | str | os.PathLike):
    """Loss curves (left) and validation-metric curves (right) from a detectron2 ``metrics.json`` (or its frame)."""
    plt = _plt()
    frame = metrics if isinstance(metrics, pd.DataFrame) else read_metrics(metrics)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4))
    metric_cols = metric_columns(frame)
    right_title = "validation metric" if metric_cols else "validation metric (none recorded)"
    for ax, cols, title in ((left, loss_columns(frame), "training losses"), (right, metric_cols, right_title)):
        for col in cols:
            series = frame[["iteration", col]].dropna()
            style = ({"lw": 2.0 if col == "total_loss" else 1.0, "marker": "o" if len(series) < 20 else None, "ms": 3}
                     if ax is left else {"marker": "o"})
            ax.plot(series["iteration"], series[col], label=col, **style)
        ax.set(xlabel="iteration", title=title)
        if cols:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Save a figure atomically (temporary file in the same folder, then rename); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(path, suffix=path.suffix) as tmp:  # savefig picks the format from the suffix
        fig.savefig(tmp, dpi=dpi)
    return path
