"""The label audit of ground truth: near-duplicate, heavily overlapping, empty and tiny annotations of one image.

:func:`label_flags` is the pure function on one image's masks; :class:`ImageLabels` holds an image's annotations and
collects its flags as rows of ``instances.csv`` (:func:`audit_labels` for the label kinds, and
:func:`cellkit.audit.predictions.audit_predictions` for the prediction kinds).
"""
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from cellkit import rle
from cellkit.geometry import MaskRuns, overlapping_pairs

class LabelFlags(NamedTuple):
    """What :func:`label_flags` finds in one image's annotations (indices into the image's masks).

    Attributes:
        duplicate: int64 ``(D, 2)`` rows ``(flagged, partner)``, ``partner < flagged``.
        duplicate_iou, duplicate_ios: float64 ``(D,)`` (IoS: intersection over the smaller mask).
        overlap: int64 ``(O, 2)`` rows ``(flagged = smaller, partner)``.
        overlap_iou, overlap_ios: float64 ``(O,)``.
        empty: int64 ``(E,)``; tiny: int64 ``(T,)``.
    """

    duplicate: np.ndarray
    duplicate_iou: np.ndarray
    duplicate_ios: np.ndarray
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
    i, j, inter, iou = overlapping_pairs(masks)
    ios = inter / np.minimum(areas[i], areas[j])
    dup = iou >= duplicate_iou
    d = _first_per_group(j[dup], i[dup])  # per flagged mask, the earliest partner
    d_flag, d_partner, d_iou = j[dup][d], i[dup][d], iou[dup][d]
    over = (ios >= overlap_ios) & ~dup
    small_is_j = areas[j[over]] <= areas[i[over]]  # ties: the later mask (j > i) is flagged
    o_flag = np.where(small_is_j, j[over], i[over])
    o_partner = np.where(small_is_j, i[over], j[over])
    keep = ~np.isin(o_flag, d_flag)
    o_flag, o_partner, o_iou, o_ios = o_flag[keep], o_partner[keep], iou[over][keep], ios[over][keep]
    o = _first_per_group(o_flag, o_partner, -o_ios)  # per flagged mask, the largest IoS (ties: earliest partner)
    return LabelFlags(
        duplicate=np.stack([d_flag, d_partner], axis=1).reshape(-1, 2), duplicate_iou=d_iou,
        duplicate_ios=ios[dup][d],
        overlap=np.stack([o_flag[o], o_partner[o]], axis=1).reshape(-1, 2), overlap_iou=o_iou[o],
        overlap_ios=o_ios[o],
        empty=np.flatnonzero(areas == 0), tiny=np.flatnonzero((areas > 0) & (areas < int(min_area))),
    )


def _first_per_group(group: np.ndarray, *keys: np.ndarray) -> np.ndarray:
    """int64 indices of one entry per distinct ``group`` value, ascending by group: the entry that sorts first by
    ``keys`` (the last key first, as :func:`numpy.lexsort`)."""
    order = np.lexsort((*keys, group))
    _, first = np.unique(group[order], return_index=True)
    return order[first]


@dataclass
class ImageLabels:
    """One image's annotations and the flags found in them, as rows of ``instances.csv``.

    Attributes:
        image_id: the image id; cell_type: its cell type (a :data:`cellkit.CELL_TYPES` name).
        rows: int64 ``(n,)`` 0-based data rows of the annotations in the train CSV (CSV line = row + 2).
        masks: the annotations, in CSV order.
        instances: one dict per flag (keys :data:`cellkit.audit.INSTANCE_COLUMNS`), appended by :meth:`flag`.
    """

    image_id: str
    cell_type: str
    rows: np.ndarray
    masks: MaskRuns
    instances: list[dict] = field(default_factory=list)

    @classmethod
    def parse(cls, image_id: str, cell_type: str, rows: np.ndarray, rles: list[str], shape: tuple[int, int],
              where: str) -> "ImageLabels":
        """From the image's competition mask strings.

        Raises:
            ValueError: a malformed mask string, naming ``where`` (the CSV), its line and the image id.
        """
        try:
            masks = MaskRuns.from_rles(rles, shape)
        except rle.MaskError as exc:
            raise ValueError(f"{where} line {int(rows[exc.index]) + 2} (id {image_id}): bad annotation: "
                             f"{exc.problem}") from None
        return cls(image_id, cell_type, rows, masks)

    def flag(self, kind: str, label=None, partner=-1, pred=-1, iou=np.nan, ios=np.nan, pred_score=np.nan,
             box=None, area=None) -> None:
        """Record one flag: of annotation ``label`` (None for a ``missed`` prediction, which gives its own ``box``
        and ``area``), with the annotation ``partner`` and the prediction ``pred`` (negative = none)."""
        box = self.masks.boxes[label] if box is None else box
        self.instances.append({
            "kind": kind, "id": self.image_id, "cell_type": self.cell_type,
            "row": None if label is None else int(self.rows[label]),
            "partner_row": None if partner < 0 else int(self.rows[partner]),
            "pred_index": None if pred < 0 else int(pred), "iou": float(iou), "ios": float(ios),
            "area": int(self.masks.areas[label] if area is None else area),
            "partner_area": None if partner < 0 else int(self.masks.areas[partner]),
            "pred_score": float(pred_score), "x0": int(box[0]), "y0": int(box[1]), "x1": int(box[2]),
            "y1": int(box[3])})


def audit_labels(image: ImageLabels, min_area: int, duplicate_iou: float, overlap_ios: float) -> dict[str, int]:
    """Flag the image's duplicate, overlapping, empty and tiny annotations (:func:`label_flags`) into
    ``image.instances``.

    Returns:
        The counts ``n_labels`` (non-empty annotations), ``n_duplicate``, ``n_overlap``, ``n_empty``, ``n_tiny``.
    """
    flags = label_flags(image.masks, min_area, duplicate_iou, overlap_ios)
    for kind in ("duplicate", "overlap"):
        for (k, p), v, s in zip(getattr(flags, kind), getattr(flags, f"{kind}_iou"), getattr(flags, f"{kind}_ios")):
            image.flag(kind, k, p, iou=v, ios=s)
    for kind in ("empty", "tiny"):
        for k in getattr(flags, kind):
            image.flag(kind, k)
    return {"n_labels": int(np.count_nonzero(image.masks.areas)), "n_duplicate": len(flags.duplicate),
            "n_overlap": len(flags.overlap), "n_empty": len(flags.empty), "n_tiny": len(flags.tiny)}
