"""Fusion of detections from several passes and models: box merging (NMS, WBF) and weighted mask fusion.

An inference run has ``K`` members (models) and ``P`` passes each (test-time augmentations, :mod:`cellkit.tta`).
Two families of fusion, chosen by :class:`FusionSettings`:

- **box-first** (``nms``, ``wbf``): every member's boxes of every pass, mapped back to the original image, are pooled
  and merged class-wise into one set of boxes; then every member's mask head runs on the merged boxes in every pass
  and the mask probabilities are averaged (:mod:`cellkit.predict`). This is detectron2's TTA scheme extended to
  models, as the 1st and 7th place Sartorius solutions did. :func:`merge_boxes` does the merging:

  * ``nms``: class-wise non-maximum suppression (IoU > ``iou`` suppresses; at most ``detections_per_image``), the
    boxes kept are the pooled boxes themselves (detectron2's TTA merge). Their score is ``score="max"``: the kept
    box's own score (detectron2's TTA: one pass's score), or ``score="mean"``: the fused score, the mean over the
    ``K x P`` groups of each group's best score among the same-class boxes overlapping the kept one by IoU > ``iou``
    (0 for a group that has none), so a box found by every pass and model keeps its score and a box found by one
    of them is scaled down by its share.
  * ``wbf``: weighted box fusion (the ``ensemble-boxes`` package, ``conf_type="avg"``): clusters of same-class boxes
    with IoU > ``iou`` are replaced by their score-weighted mean box, scored by the cluster's mean score times
    ``min(n, K x P) / (K x P)`` for ``n`` boxes in it.

- **mask-level** (``wmf``, weighted mask fusion, for members whose heads differ): each member predicts alone (its own
  boxes and masks, its passes merged box-first), then :func:`weighted_mask_fusion` clusters the members' instances
  class-wise by mask IoU (``>= iou``, at most one instance per member in a cluster, greedy by descending score), and
  gives each cluster the score-weighted mean of its probabilities (over the union of the crop windows; a member's
  probability outside its window is 0) and the score ``sum(scores) / K``: the mean score scaled by the share of
  members that agree.

Conventions: boxes are XYXY float32 in original-image pixels; ``groups`` number the ``K x P`` (member, pass) sources
of the pooled boxes ``0..n_groups-1``.
"""
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference_single_image
from detectron2.structures import Boxes, pairwise_iou

from cellkit.geometry import MaskRuns, box_pairs, pair_intersections
from cellkit.predictions import InstancePredictions, quantize

__all__ = ["MODES", "SCORE_MODES", "FusionSettings", "merge_boxes", "nms_merge", "wbf_merge",
           "weighted_mask_fusion"]

#: Fusion modes: box-first NMS, box-first weighted box fusion, weighted mask fusion.
MODES = ("nms", "wbf", "wmf")

#: Score of an NMS-merged box: fused over the groups (``mean``) or the kept box's own (``max``, detectron2's TTA).
SCORE_MODES = ("mean", "max")

#: Default IoU per mode; ``None`` = the model's ``MODEL.ROI_HEADS.NMS_THRESH_TEST`` (resolved when loading).
DEFAULT_IOU = {"nms": None, "wbf": 0.55, "wmf": 0.5}


@dataclass(frozen=True)
class FusionSettings:
    """How passes and members are fused.

    Attributes:
        mode: one of :data:`MODES`.
        iou: IoU of a match (box IoU for ``nms``/``wbf``, mask IoU for ``wmf``); ``None`` until resolved.
        score: NMS score mode (:data:`SCORE_MODES`); ignored by ``wbf``/``wmf`` (recorded as given).
    """

    mode: str = "nms"
    iou: float | None = None
    score: str = "mean"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"fusion mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if self.score not in SCORE_MODES:
            raise ValueError(f"fusion score {self.score!r}: expected one of {', '.join(SCORE_MODES)}")
        if self.iou is not None and not (0.0 < float(self.iou) < 1.0):
            raise ValueError(f"fusion iou {self.iou!r}: expected a number in (0, 1)")

    def resolved(self, nms_thresh_test: float) -> "FusionSettings":
        """A copy with ``iou`` set: the given one, else :data:`DEFAULT_IOU`, else ``nms_thresh_test``."""
        iou = self.iou if self.iou is not None else DEFAULT_IOU[self.mode]
        return FusionSettings(self.mode, float(nms_thresh_test if iou is None else iou), self.score)

    def as_dict(self) -> dict:
        """JSON-friendly form (for ``meta.json`` / ``thresholds.json``)."""
        return {"mode": self.mode, "iou": None if self.iou is None else round(float(self.iou), 6),
                "score": self.score}

    @classmethod
    def from_dict(cls, doc: Mapping, where: str = "fusion") -> "FusionSettings":
        """Inverse of :meth:`as_dict`; raises ValueError naming ``where`` for a malformed document."""
        if not isinstance(doc, Mapping):
            raise ValueError(f"{where}: expected an object with 'mode', 'iou', 'score', got {doc!r}")
        try:
            return cls(str(doc.get("mode", "nms")), doc.get("iou"), str(doc.get("score", "mean")))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None


# ----------------------------------------------------------------------------------------------------- box merging
def nms_merge(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, groups: torch.Tensor, n_groups: int,
              shape_hw, iou: float, max_dets: int, score: str = "mean"):
    """Class-wise NMS over pooled boxes (detectron2's ``fast_rcnn_inference_single_image``), optionally re-scored.

    Args:
        boxes: float ``(N, 4)`` XYXY in the original image; scores float ``(N,)``; classes int ``(N,)``.
        groups: int ``(N,)``, the (member, pass) each box came from, in ``0..n_groups-1``.
        n_groups: ``K x P``.
        shape_hw: image ``(H, W)`` (boxes are clipped to it).
        iou: NMS threshold (IoU > iou suppresses).
        max_dets: at most this many boxes kept (highest scores before re-scoring).
        score: ``"max"`` keeps each kept box's own score; ``"mean"`` fuses (module docstring).

    Returns:
        ``(boxes (n, 4) float32, scores (n,) float32, classes (n,) int64)``, highest raw score first.
    """
    device = boxes.device
    num_classes = int(classes.max()) + 1 if len(classes) else 1
    scores_2d = torch.zeros(len(boxes), num_classes + 1, device=device)
    scores_2d[torch.arange(len(boxes), device=device), classes.long()] = scores.float()
    merged, kept = fast_rcnn_inference_single_image(boxes.float(), scores_2d, tuple(shape_hw), 1e-8, float(iou),
                                                    int(max_dets))
    out_boxes, out_scores, out_classes = (merged.pred_boxes.tensor.float(), merged.scores.float(),
                                          merged.pred_classes.long())
    if score == "mean" and len(out_boxes):
        pooled = Boxes(boxes.float().clone())
        pooled.clip(tuple(shape_hw))
        match = ((pairwise_iou(Boxes(out_boxes), pooled) > float(iou))  # (n, N)
                 & (out_classes[:, None] == classes.long()[None, :].to(device)))
        match[torch.arange(len(kept), device=device), kept.to(device)] = True  # a kept box matches itself
        contrib = torch.where(match, scores.float()[None, :].to(device), torch.zeros((), device=device))
        best = torch.zeros(len(out_boxes), int(n_groups), device=device)
        best.scatter_reduce_(1, groups.long().to(device)[None, :].expand_as(contrib), contrib, reduce="amax")
        out_scores = best.sum(dim=1) / float(n_groups)
    return out_boxes, out_scores, out_classes


def wbf_merge(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, groups: torch.Tensor,
              n_groups: int, shape_hw, iou: float, max_dets: int):
    """Weighted box fusion (``ensemble_boxes.weighted_boxes_fusion``, every group weight 1, ``conf_type="avg"``).

    Args: as :func:`nms_merge` (boxes normalised to [0, 1] by the image size for the package and back).

    Returns:
        ``(boxes (n, 4) float32, scores (n,) float32, classes (n,) int64)``, highest fused score first, at most
        ``max_dets``.

    Raises:
        ImportError: naming the package when ``ensemble-boxes`` is not installed.
    """
    try:
        from ensemble_boxes import weighted_boxes_fusion
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"fusion mode 'wbf' needs the ensemble-boxes package (and numba): {exc}") from None
    device = boxes.device
    h, w = (float(s) for s in shape_hw)
    scale = np.array([w, h, w, h], dtype=np.float64)
    b = np.clip(boxes.detach().double().cpu().numpy() / scale, 0.0, 1.0)
    s = scores.detach().double().cpu().numpy()
    c = classes.detach().cpu().numpy()
    g = groups.detach().cpu().numpy()
    valid = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    selections = [(g == k) & valid for k in range(int(n_groups))]
    boxes_list, scores_list, labels_list = ([x[sel].tolist() for sel in selections] for x in (b, s, c))
    if not any(len(x) for x in scores_list):
        return (torch.zeros((0, 4), device=device), torch.zeros((0,), device=device),
                torch.zeros((0,), dtype=torch.int64, device=device))
    fb, fs, fl = weighted_boxes_fusion(boxes_list, scores_list, labels_list, iou_thr=float(iou), skip_box_thr=0.0,
                                       conf_type="avg")
    order = np.argsort(-np.asarray(fs), kind="stable")[: int(max_dets)]
    return (torch.as_tensor(np.asarray(fb, dtype=np.float64)[order] * scale, dtype=torch.float32, device=device),
            torch.as_tensor(np.asarray(fs)[order], dtype=torch.float32, device=device),
            torch.as_tensor(np.asarray(fl)[order], dtype=torch.int64, device=device))


def merge_boxes(settings: FusionSettings, boxes, scores, classes, groups, n_groups: int, shape_hw, max_dets: int):
    """Merge pooled boxes with ``settings`` (``nms`` or ``wbf``; ``iou`` must be resolved)."""
    if settings.iou is None:
        raise ValueError("merge_boxes: fusion iou is not resolved (FusionSettings.resolved)")
    if settings.mode == "nms":
        return nms_merge(boxes, scores, classes, groups, n_groups, shape_hw, settings.iou, max_dets, settings.score)
    if settings.mode == "wbf":
        return wbf_merge(boxes, scores, classes, groups, n_groups, shape_hw, settings.iou, max_dets)
    raise ValueError(f"merge_boxes: mode {settings.mode!r} is not a box merge (use weighted_mask_fusion)")


# ---------------------------------------------------------------------------------------------- weighted mask fusion
def weighted_mask_fusion(preds: Sequence, iou: float = 0.5, max_dets: int | None = None):
    """Fuse the instance predictions of ``K`` members of one image by weighted mask fusion (module docstring).

    Args:
        preds: ``K`` :class:`cellkit.predictions.InstancePredictions` of the same image (same id and size).
        iou: mask IoU (at probability >= 0.5) at which two instances of the same class are the same cell.
        max_dets: keep at most this many fused instances (highest fused score); None keeps all.

    Returns:
        InstancePredictions: one instance per cluster, sorted by descending fused score; the crop window of a
        cluster is the union of its members' windows, holding ``round(255 * sum_i s_i p_i / sum_i s_i)``; the box is
        the score-weighted mean box; the class is the cluster's (all members of a cluster share it).

    Raises:
        ValueError: no members, or members of different images.
    """
    preds = list(preds)
    if not preds:
        raise ValueError("weighted_mask_fusion: no member predictions")
    first = preds[0]
    for p in preds[1:]:
        if (p.image_id, p.height, p.width) != (first.image_id, first.height, first.width):
            raise ValueError(f"weighted_mask_fusion: members predict different images ({first.image_id!r} "
                             f"{first.height}x{first.width} vs {p.image_id!r} {p.height}x{p.width})")
    # all members' instances in one InstancePredictions, and the member index of each
    member = np.concatenate([np.full(len(p), m, np.int64) for m, p in enumerate(preds)])
    pooled = InstancePredictions(first.image_id, first.height, first.width,
                                 np.concatenate([p.classes for p in preds]),
                                 np.concatenate([p.scores for p in preds]),
                                 np.concatenate([p.boxes for p in preds]).reshape(-1, 4),
                                 np.concatenate([p.mask_boxes for p in preds]).reshape(-1, 4),
                                 [m for p in preds for m in p.masks])
    if len(pooled) == 0:
        return pooled
    wins = pooled.mask_boxes.astype(np.int64)
    fused = [_fuse_cluster(pooled, wins, cl, len(preds)) for cl in _clusters(pooled, member, wins, iou)]
    # the constructor coerces (classes, scores, boxes, windows, crops) to the stored dtypes
    fused = InstancePredictions(first.image_id, first.height, first.width, *zip(*fused))
    return fused.select(np.argsort(-fused.scores, kind="stable")[: None if max_dets is None else int(max_dets)])


def _clusters(pooled, member: np.ndarray, wins: np.ndarray, iou: float) -> list[list[int]]:
    """Greedy clusters, by descending score: an instance joins the cluster whose head (same class, no instance of
    the same member yet) it overlaps most (the first such cluster on ties), at mask IoU >= ``iou`` > 0; else it
    starts one."""
    if not 0.0 < float(iou) <= 1.0:
        raise ValueError(f"weighted_mask_fusion: iou {iou!r}: expected a number in (0, 1]")
    # the mask IoUs a cluster can ask for: pairs of instances of the same class and of other members whose binary
    # masks (probability >= 0.5) share pixels, both ways, as CSR: instance i's partners are
    # partner[indptr[i]:indptr[i + 1]] at IoUs pair_iou[...]
    binary = [m >= 128 for m in pooled.masks]  # uint8 q >= 128 <=> probability >= 0.5 (q / 255 >= 0.5)
    runs = MaskRuns.from_crops(binary, wins, (pooled.height, pooled.width))
    a, b = box_pairs(runs.boxes)
    same = (pooled.classes[a] == pooled.classes[b]) & (member[a] != member[b])
    inter = pair_intersections(runs, runs, a[same], b[same])
    hit = inter > 0
    a, b, inter = a[same][hit], b[same][hit], inter[hit]
    pair_iou = inter / (runs.areas[a] + runs.areas[b] - inter)
    src, partner, pair_iou = np.concatenate((a, b)), np.concatenate((b, a)), np.concatenate((pair_iou, pair_iou))
    order = np.argsort(src, kind="stable")
    indptr = np.searchsorted(src[order], np.arange(len(binary) + 1))
    partner, pair_iou = partner[order], pair_iou[order]
    cluster_of_head = np.full(len(pooled), -1, dtype=np.int64)
    clusters: list[dict[int, int]] = []  # per cluster: member -> its instance, in joining order
    for i in np.argsort(-pooled.scores, kind="stable").tolist():
        found = cluster_of_head[partner[indptr[i]:indptr[i + 1]]]
        best, best_iou = -1, float(iou)
        for c, v in sorted(zip(found[found >= 0].tolist(), pair_iou[indptr[i]:indptr[i + 1]][found >= 0].tolist())):
            if (v > best_iou or (v == best_iou and best < 0)) and int(member[i]) not in clusters[c]:
                best, best_iou = c, v
        if best < 0:
            best = cluster_of_head[i] = len(clusters)
            clusters.append({})
        clusters[best][int(member[i])] = i
    return [list(cluster.values()) for cluster in clusters]


def _fuse_cluster(pooled, wins: np.ndarray, cl: list[int], k: int):
    """``(class, score, box, window, crop)`` of one cluster of ``k`` members' instances (module docstring)."""
    s = pooled.scores[cl].astype(np.float64)
    if len(cl) == 1:
        i = cl[0]
        return pooled.classes[i], float(s[0]) / k, pooled.boxes[i], wins[i], pooled.masks[i]
    w = s / s.sum() if s.sum() > 0 else np.full(len(cl), 1.0 / len(cl))
    x0, y0 = wins[cl, 0].min(), wins[cl, 1].min()
    x1, y1 = wins[cl, 2].max(), wins[cl, 3].max()
    acc = np.zeros((y1 - y0, x1 - x0), np.float64)
    for weight, i in zip(w, cl):
        a0, b0, a1, b1 = wins[i]
        acc[b0 - y0:b1 - y0, a0 - x0:a1 - x0] += weight * pooled.masks[i].astype(np.float64) / 255.0
    return (pooled.classes[cl[0]], float(s.sum()) / k, (w[:, None] * pooled.boxes[cl].astype(np.float64)).sum(axis=0),
            np.array([x0, y0, x1, y1]), quantize(acc))
