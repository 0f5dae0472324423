"""Inference with test-time augmentation: scales x horizontal flip, mask probabilities averaged, box-cropped output.

The flow is detectron2's :class:`~detectron2.modeling.GeneralizedRCNNWithTTA` (whose augmentation mapper, box
rescaling and head switching :class:`CellTTA` inherits); what it produces and what it costs differ:

1. every augmentation (each ``cfg.TEST.AUG.MIN_SIZES`` short-edge size, each also horizontally flipped when
   ``cfg.TEST.AUG.FLIP``; without TTA a single pass at ``INPUT.MIN_SIZE_TEST``/``MAX_SIZE_TEST``) runs the backbone
   once and the box heads (mask head off); boxes are mapped back to the original image (scale and flip undone,
   :func:`deaugment_boxes`);
2. the union of boxes is merged (:mod:`cellkit.fusion`): by default class-wise NMS (``ROI_HEADS.NMS_THRESH_TEST``,
   at most ``TEST.DETECTIONS_PER_IMAGE``) as detectron2 does (vectorised: its per-box Python loop is slow at 1000s
   of boxes), with the fused score (mean over passes) instead of the kept pass's (``score="max"``: detectron2's);
   or weighted box fusion. With several models (a fold ensemble, :func:`predict_members`) every model's boxes of
   every pass are pooled first;
3. the mask head (of every model) runs on the merged boxes under every augmentation, on the backbone features kept
   from step 1 (detectron2 recomputes them: twice the backbone cost), and the ``M x M`` box-relative mask
   probabilities are averaged after undoing the flip (:func:`deaugment_masks`; a box-relative mask is scale-free);
4. instead of :func:`~detectron2.modeling.postprocessing.detector_postprocess`, which pastes every mask into a
   full-size image and binarises it at 0.5, each averaged probability is pasted only into its own crop window
   (:func:`paste_crops`, the same bilinear sampling as detectron2's ``paste_masks_in_image``) and kept as a
   probability, quantised to uint8 (``round(p * 255)``), in a :class:`cellkit.predictions.InstancePredictions`.

With ``batch_size=1`` in detectron2's class (its default of 3 pads images of different sizes into one batch, which
changes GroupNorm statistics) and ``FusionSettings(score="max")``, boxes, scores and 0.5-binarised masks are
identical to detectron2's TTA (``tests/test_tta.py``); Mask R-CNN and Cascade Mask R-CNN alike.

Running models over image folders, folds and stores (weights lookup, resume, ``meta.json``) is :mod:`cellkit.predict`.

A single pass (no TTA) skips steps 2-3: the model's own boxes and masks from one forward pass, then step 4.

Conventions: images are ``(H, W, C)`` uint8 arrays in ``cfg.INPUT.FORMAT`` channel order (as
:func:`detectron2.data.detection_utils.read_image` returns them); boxes are XYXY absolute pixels in the original
image; a crop window ``x0, y0, x1, y1`` has an exclusive end.
"""
import contextlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch.nn import functional as F

from detectron2.modeling import GeneralizedRCNN
from detectron2.modeling.test_time_augmentation import DatasetMapperTTA
from detectron2.structures import Boxes, Instances
from fvcore.transforms import HFlipTransform

from cellkit import CELL_TYPES
from cellkit.compat import TTACompat
from cellkit.fusion import FusionSettings, merge_boxes, weighted_mask_fusion
from cellkit.predictions import InstancePredictions, quantize

__all__ = ["TTASettings", "tta_settings", "CellTTA", "predict_members", "fused_boxes_and_masks", "paste_crops",
           "crop_windows", "deaugment_boxes", "deaugment_masks", "check_num_classes"]


@dataclass(frozen=True)
class TTASettings:
    """The augmentations of one inference run.

    Attributes:
        min_sizes: short-edge sizes, one pass (or two with ``flip``) each.
        max_size: cap on the long edge after resizing.
        flip: add a horizontally flipped pass for each size.
    """

    min_sizes: tuple
    max_size: int
    flip: bool

    @property
    def n_passes(self) -> int:
        """Number of forward passes per image: ``len(min_sizes) * (2 if flip else 1)``."""
        return len(self.min_sizes) * (2 if self.flip else 1)

    def as_dict(self) -> dict:
        """JSON-friendly form (for ``meta.json``)."""
        return {"min_sizes": [int(s) for s in self.min_sizes], "max_size": int(self.max_size),
                "flip": bool(self.flip), "n_passes": self.n_passes}

    @classmethod
    def from_dict(cls, doc, where: str = "passes") -> "TTASettings":
        """Inverse of :meth:`as_dict` (``n_passes`` is recomputed); ValueError naming ``where`` when malformed."""
        try:
            sizes = tuple(int(s) for s in doc["min_sizes"])
            settings = cls(sizes, int(doc["max_size"]), bool(doc["flip"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: expected {{'min_sizes': [...], 'max_size': int, 'flip': bool}}, got "
                             f"{doc!r} ({exc})") from None
        if not sizes or min(sizes) <= 0 or settings.max_size <= 0:
            raise ValueError(f"{where}: sizes must be positive, got {doc!r}")
        return settings


def tta_settings(cfg, tta: bool) -> TTASettings:
    """The passes for ``cfg``: ``TEST.AUG.{MIN_SIZES, MAX_SIZE, FLIP}`` with ``tta``, else one pass at the test size.

    Raises:
        ValueError: naming the config key, when the sizes are empty or not positive.
    """
    if tta:
        sizes, max_size, flip = tuple(cfg.TEST.AUG.MIN_SIZES), int(cfg.TEST.AUG.MAX_SIZE), bool(cfg.TEST.AUG.FLIP)
    else:
        sizes, max_size, flip = (int(cfg.INPUT.MIN_SIZE_TEST),), int(cfg.INPUT.MAX_SIZE_TEST), False
    if not sizes or any(int(s) <= 0 for s in sizes) or max_size <= 0:
        where = "TEST.AUG.MIN_SIZES / TEST.AUG.MAX_SIZE" if tta else "INPUT.MIN_SIZE_TEST / INPUT.MAX_SIZE_TEST"
        raise ValueError(f"config {where} must be positive sizes, got {list(sizes)} / {max_size}")
    return TTASettings(tuple(int(s) for s in sizes), max_size, flip)


# --------------------------------------------------------------------------------------------------------------
# De-augmentation and box-cropped pasting (pure tensor functions)
# --------------------------------------------------------------------------------------------------------------

def deaugment_boxes(boxes: torch.Tensor, tfm) -> torch.Tensor:
    """Map boxes predicted on an augmented image back to the original image.

    Args:
        boxes: float ``(N, 4)`` XYXY in the augmented image.
        tfm: the detectron2 ``TransformList`` that produced the augmented image from the original.

    Returns:
        float32 ``(N, 4)`` XYXY in the original image (flip and resize undone), on ``boxes``' device.
    """
    out = tfm.inverse().apply_box(boxes.detach().float().cpu().numpy())
    return torch.as_tensor(np.asarray(out, dtype=np.float32), device=boxes.device).reshape(-1, 4)


def deaugment_masks(masks: torch.Tensor, tfm) -> torch.Tensor:
    """Bring ``(N, 1, M, M)`` box-relative mask probabilities of an augmented pass to original orientation.

    A box-relative mask is scale-invariant, so only a horizontal flip has to be undone (mirror along x).
    """
    flipped = any(isinstance(t, HFlipTransform) for t in getattr(tfm, "transforms", [tfm]))
    return masks.flip(dims=[3]) if flipped else masks


def crop_windows(boxes: torch.Tensor, mask_size: int, height: int, width: int) -> torch.Tensor:
    """Integer crop windows holding every pixel a box's ``M x M`` mask can reach when pasted.

    detectron2's paste (bilinear ``grid_sample``, ``align_corners=False``, zero padding) gives a pixel a nonzero
    value only when its centre lies within half a mask cell (``box_size / (2 M)``) of the box, so the window is
    the box grown by that margin, rounded out to whole pixels and clipped to the image. Pasting into the window
    therefore equals pasting into the full image and cropping.

    Args:
        boxes: float ``(N, 4)`` XYXY in the image.
        mask_size: ``M``.
        height, width: image size.

    Returns:
        int64 ``(N, 4)`` windows ``x0, y0, x1, y1`` (end exclusive), ``0 <= x0 <= x1 <= width`` (same for y).
    """
    boxes = boxes.float()
    half = (boxes[:, 2:] - boxes[:, :2]) / (2 * mask_size)  # (N, 2): half a mask cell along x and y
    size = boxes.new_tensor([width, height])
    start = torch.minimum(torch.floor(boxes[:, :2] - half).clamp(min=0), size)
    end = torch.minimum(torch.ceil(boxes[:, 2:] + half).clamp(min=0), size)
    return torch.cat([start, torch.maximum(end, start)], dim=1).to(torch.int64)


def paste_crops(masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int,
                chunk_pixels: int = 1 << 22) -> tuple[np.ndarray, list[np.ndarray]]:
    """Paste box-relative mask probabilities into their own crop windows, kept as uint8 probabilities.

    The sampling is detectron2's ``_do_paste_mask`` (pixel centres ``+ 0.5``, normalised to the box, bilinear
    ``grid_sample`` with ``align_corners=False``) evaluated only over each instance's :func:`crop_windows` window,
    instances batched by similar window size; no full-image mask is ever allocated.

    Args:
        masks: float ``(N, M, M)`` or ``(N, 1, M, M)`` probabilities in [0, 1].
        boxes: float ``(N, 4)`` XYXY in the image.
        height, width: image size.
        chunk_pixels: cap on ``instances x window pixels`` sampled per batch (memory bound).

    Returns:
        ``(mask_boxes, crops)``: int32 ``(N, 4)`` windows and N uint8 arrays ``(y1 - y0, x1 - x0)`` holding
        ``round(p * 255)`` (see :func:`cellkit.predictions.quantize`).
    """
    if masks.dim() == 4:
        masks = masks[:, 0]
    n, m = masks.shape[0], masks.shape[-1]
    if masks.shape[-2] != m:
        raise ValueError(f"paste_crops: masks must be square M x M, got {tuple(masks.shape)}")
    if boxes.shape != (n, 4):
        raise ValueError(f"paste_crops: boxes must be ({n}, 4), got {tuple(boxes.shape)}")
    boxes = boxes.float()
    windows = crop_windows(boxes, m, height, width)
    crops: list = [None] * n
    wh = (windows[:, 2:] - windows[:, :2]).cpu()
    order = torch.argsort(wh[:, 0] * wh[:, 1]).tolist()
    start = 0
    while start < n:
        # the batch from ``start``: the longest run (at least one) whose count x largest window (height x width,
        # running maxima over the windows in area order) stays under the cap; that product never decreases
        rest = wh[order[start:]]
        fits = (torch.arange(1, n - start + 1) * rest[:, 1].cummax(0).values * rest[:, 0].cummax(0).values
                <= chunk_pixels)
        stop = start + max(1, int(fits.sum()))
        _paste_batch(masks, boxes, windows, wh, order[start:stop], crops)
        start = stop
    return windows.cpu().numpy().astype(np.int32), crops


def _paste_batch(masks, boxes, windows, wh, idx, crops) -> None:
    """Sample instances ``idx`` over a common ``(hmax, wmax)`` grid anchored at each window; crop each result."""
    device = masks.device
    sel = torch.as_tensor(idx, device=device)
    hmax, wmax = int(wh[idx, 1].max()), int(wh[idx, 0].max())
    if hmax == 0 or wmax == 0:
        for i in idx:
            crops[i] = np.zeros((int(wh[i, 1]), int(wh[i, 0])), np.uint8)
        return
    b, w = boxes[sel], windows[sel].to(device)
    x0, y0, x1, y1 = (b[:, k:k + 1] for k in range(4))
    img_x = (w[:, 0:1].float() + torch.arange(wmax, device=device, dtype=torch.float32) + 0.5 - x0) / (x1 - x0) * 2 - 1
    img_y = (w[:, 1:2].float() + torch.arange(hmax, device=device, dtype=torch.float32) + 0.5 - y0) / (y1 - y0) * 2 - 1
    grid = torch.stack([img_x[:, None, :].expand(-1, hmax, wmax), img_y[:, :, None].expand(-1, hmax, wmax)], dim=3)
    q = quantize(F.grid_sample(masks[sel][:, None].float(), grid, align_corners=False)[:, 0].cpu().numpy())
    for j, i in enumerate(idx):
        crops[i] = np.ascontiguousarray(q[j, : int(wh[i, 1]), : int(wh[i, 0])])


# --------------------------------------------------------------------------------------------------------------
# The model wrapper
# --------------------------------------------------------------------------------------------------------------

class CellTTA(TTACompat):
    """A GeneralizedRCNN (Mask R-CNN or Cascade Mask R-CNN) wrapped for (TTA) inference to box-cropped probabilities.

    One member of an inference run: :func:`predict_members` fuses several (a fold ensemble, :mod:`cellkit.predict`);
    :meth:`predict` is the one-member case of the same code.

    Args:
        cfg: the model's config (``TEST.AUG.*``, ``INPUT.*_TEST``, ``ROI_HEADS.NMS_THRESH_TEST``,
            ``TEST.DETECTIONS_PER_IMAGE``, ``INPUT.FORMAT``).
        model: a built GeneralizedRCNN with its weights loaded; switched to eval mode.
        tta: every scale x flip pass of ``TEST.AUG``; False: one pass at the test size.
        cache_features: keep each pass's backbone features for the mask pass instead of recomputing them
            (holds every pass's FPN pyramid at once, ~0.15 GB per pass at 1490x1100 in float32; False keeps one
            at a time and runs the backbone twice per pass, as detectron2 does).
        amp: run under CUDA autocast (float16); default: ``SOLVER.AMP.ENABLED`` on a CUDA model, else off.
        settings: the passes, overriding ``tta`` and the config (an inference signature's, :mod:`cellkit.predict`).
        fusion: how the passes' boxes are merged (:class:`cellkit.fusion.FusionSettings`; default NMS at
            ``ROI_HEADS.NMS_THRESH_TEST`` with the fused ``mean`` score).
    """

    def __init__(self, cfg, model, tta: bool = True, cache_features: bool = True, amp: bool | None = None,
                 settings: TTASettings | None = None, fusion: FusionSettings | None = None):
        if not isinstance(model, GeneralizedRCNN):
            raise ValueError(f"TTA needs a detectron2 GeneralizedRCNN, got {type(model).__name__}")
        if not cfg.MODEL.MASK_ON:
            raise ValueError("config MODEL.MASK_ON is False: predictions need a mask head")
        self.settings = settings if settings is not None else tta_settings(cfg, tta)
        super().__init__(cfg, model, batch_size=1, tta_mapper=DatasetMapperTTA(
            min_sizes=list(self.settings.min_sizes), max_size=self.settings.max_size, flip=self.settings.flip))
        self.model.eval()
        self.cache_features = cache_features
        self.fusion = (fusion or FusionSettings()).resolved(cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST)
        if self.fusion.mode == "wmf":
            raise ValueError("fusion 'wmf' fuses members' predictions (cellkit.predict); a member's passes are "
                             "merged box-first ('nms' or 'wbf')")
        device = next(model.parameters()).device
        self.amp = bool(cfg.SOLVER.AMP.ENABLED and device.type == "cuda") if amp is None else bool(amp)
        if self.amp and device.type != "cuda":
            raise ValueError("amp=True needs a CUDA model")
        self.passes_run = 0  # forward passes of the backbone since construction (for tests and benchmarks)

    @property
    def n_passes(self) -> int:
        """Forward passes per image (``len(MIN_SIZES) x (1 + FLIP)`` with TTA, else 1)."""
        return self.settings.n_passes

    @property
    def mask_size(self) -> int:
        """``M`` of the ``M x M`` box-relative masks of the mask head."""
        return int(self.cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION) * 2

    # -- public --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, image: np.ndarray, image_id: str) -> InstancePredictions:
        """Predict one image (this model alone: :func:`predict_members` with one member).

        Args:
            image: uint8 ``(H, W, C)`` in ``cfg.INPUT.FORMAT`` channel order (or ``(H, W)`` grayscale, repeated
                to 3 channels).
            image_id: the id the predictions carry (file stem).

        Returns:
            InstancePredictions with classes, scores, boxes (original pixels), crop windows and uint8 probability
            crops; the instances are sorted by descending score.
        """
        return predict_members([self], image, image_id, self.fusion)

    # -- internals -----------------------------------------------------------------------------------------------
    def _features(self, aug_input):
        images = self.model.preprocess_image([aug_input])
        self.passes_run += 1
        return images, self.model.backbone(images.tensor)

    def _detect(self, images, features, with_masks: bool) -> Instances:
        """Boxes (and, when ``with_masks``, ``M x M`` mask probabilities) of one augmented image."""
        with contextlib.nullcontext() if with_masks else self.heads_off(["mask_on", "keypoint_on"]):
            proposals, _ = self.model.proposal_generator(images, features, None)
            results, _ = self.model.roi_heads(images, features, proposals, None)
        return results[0]

    def _masks_for_boxes(self, images, features, instances: Instances) -> torch.Tensor:
        """``(N, 1, M, M)`` mask probabilities for given boxes/classes of one augmented image."""
        return self.model.roi_heads.forward_with_given_boxes(features, [instances.to(self.model.device)])[0].pred_masks

    def _single_pass(self, inp):
        """The model's own boxes and masks from one forward pass (no merge)."""
        aug_inputs, tfms = self.augmented_inputs(inp)
        res = self._detect(*self._features(aug_inputs[0]), with_masks=True)
        boxes = deaugment_boxes(res.pred_boxes.tensor, tfms[0])
        keep = _valid(boxes, (inp["height"], inp["width"]))
        return boxes[keep], res.scores[keep], res.pred_classes[keep], deaugment_masks(res.pred_masks, tfms[0])[keep]

    def _pass_boxes(self, inp):
        """Pass 1 of every augmentation: ``(aug_inputs, tfms, cached, [(boxes, scores, classes)] per pass)``."""
        aug_inputs, tfms = self.augmented_inputs(inp)
        cached, found = [], []
        for aug_input, tfm in zip(aug_inputs, tfms):
            images, features = self._features(aug_input)
            cached.append((images, features) if self.cache_features else None)
            res = self._detect(images, features, with_masks=False)
            found.append((deaugment_boxes(res.pred_boxes.tensor, tfm), res.scores.float(), res.pred_classes))
        return aug_inputs, tfms, cached, found

    def _pass_masks(self, aug_inputs, tfms, cached, merged: Instances) -> torch.Tensor:
        """Pass 2: the sum over this model's passes of ``(N, 1, M, M)`` mask probabilities on ``merged`` boxes."""
        aug_instances = self.rescale_boxes(aug_inputs, merged, tfms)
        total = 0
        for k, (aug_input, inst, tfm) in enumerate(zip(aug_inputs, aug_instances, tfms)):
            images, features = cached[k] or self._features(aug_input)  # None: not cached
            cached[k] = None  # free this pass's pyramid as soon as it is used
            # as detectron2's _reduce_pred_masks: box-relative masks are scale-free, only the flip is undone
            total = total + deaugment_masks(self._masks_for_boxes(images, features, inst).float(), tfm)
        return total


def _valid(boxes: torch.Tensor, shape_hw) -> torch.Tensor:
    """Clip to the image in place and keep non-empty boxes (as detectron2's ``detector_postprocess`` does)."""
    b = Boxes(boxes)
    b.clip(shape_hw)
    return b.nonempty()


def fused_boxes_and_masks(members: Sequence[CellTTA], inp: dict, fusion: FusionSettings):
    """Box-first fusion of ``members`` x their passes on one image (see :mod:`cellkit.fusion`).

    One member with one pass: its own boxes and masks. Otherwise every member's boxes of every pass are pooled and
    merged (``fusion``: ``nms`` or ``wbf``), then every member's mask head runs on the merged boxes in every pass
    (each member's backbone once per pass when it caches features) and the probabilities are averaged.

    Returns:
        ``(boxes (N, 4) float32 XYXY original pixels, scores (N,), classes (N,) int64, masks (N, 1, M, M))``.

    Raises:
        ValueError: members whose passes or mask sizes differ (their masks cannot be averaged box-first).
    """
    shape_hw = (inp["height"], inp["width"])
    lead = members[0]
    for m in members[1:]:
        if m.settings != lead.settings:
            raise ValueError(f"ensemble members' passes differ ({lead.settings.as_dict()} vs {m.settings.as_dict()})")
        if m.mask_size != lead.mask_size:
            raise ValueError(f"ensemble members' mask heads differ ({lead.mask_size} vs {m.mask_size} px masks): "
                             f"use fusion 'wmf'")
    if len(members) == 1 and lead.n_passes == 1:
        return lead._single_pass(inp)
    runs = [member._pass_boxes(inp) for member in members]
    found = [f for *_, passes in runs for f in passes]  # (boxes, scores, classes) of group g = member x passes + pass
    groups = [torch.full((len(b),), g, dtype=torch.int64, device=b.device) for g, (b, _, _) in enumerate(found)]
    boxes, scores, classes = (torch.cat(t) for t in zip(*found))
    merged_boxes, merged_scores, merged_classes = merge_boxes(
        fusion, boxes, scores, classes, torch.cat(groups), len(found), shape_hw,
        int(lead.cfg.TEST.DETECTIONS_PER_IMAGE))
    keep = _valid(merged_boxes, shape_hw)
    merged = Instances(shape_hw, pred_boxes=Boxes(merged_boxes[keep]), scores=merged_scores[keep],
                       pred_classes=merged_classes[keep])
    if len(merged) == 0:
        return (merged.pred_boxes.tensor, merged.scores, merged.pred_classes,
                torch.zeros((0, 1, lead.mask_size, lead.mask_size), device=merged_boxes.device))
    # the members' boxes were concatenated above, so every member's masks are on the same device
    masks = sum(member._pass_masks(*run[:3], merged) for member, run in zip(members, runs)) / len(found)
    return merged.pred_boxes.tensor.float(), merged.scores, merged.pred_classes, masks


@torch.no_grad()
def predict_members(members: Sequence[CellTTA], image: np.ndarray, image_id: str,
                    fusion: FusionSettings) -> InstancePredictions:
    """Predict one image with the fusion of ``members`` (a one-member list: that model alone).

    ``fusion.mode`` ``nms``/``wbf``: :func:`fused_boxes_and_masks`; ``wmf``: each member predicts alone (its passes
    merged by NMS with the fused score), then :func:`cellkit.fusion.weighted_mask_fusion`.

    Returns:
        InstancePredictions sorted by descending score (see :meth:`CellTTA.predict`).
    """
    if not members:
        raise ValueError("predict_members: no members")
    if fusion.mode == "wmf":
        return weighted_mask_fusion([m.predict(image, image_id) for m in members], fusion.iou,
                                    int(members[0].cfg.TEST.DETECTIONS_PER_IMAGE))
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3:
        raise ValueError(f"image {image_id!r}: expected (H, W, C) or (H, W), got shape {image.shape}")
    height, width = image.shape[:2]
    inp = {"image": torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))), "height": height, "width": width}
    with torch.autocast(device_type="cuda", dtype=torch.float16) if members[0].amp else contextlib.nullcontext():
        boxes, scores, classes, masks = fused_boxes_and_masks(members, inp, fusion)
    mask_boxes, crops = paste_crops(masks.float(), boxes, height, width)
    scores = scores.float().cpu().numpy()
    return InstancePredictions(image_id, height, width, classes.cpu().numpy(), scores, boxes.cpu().numpy(), mask_boxes,
                               crops).select(np.argsort(-scores, kind="stable"))


def check_num_classes(cfg, classes=CELL_TYPES) -> None:
    """Raise ValueError unless the model predicts exactly the dataset's ``classes`` (the store's; default the
    competition's cell types)."""
    n = int(cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    if n != len(classes):
        raise ValueError(f"config MODEL.ROI_HEADS.NUM_CLASSES is {n}; predictions are stored for the "
                         f"{len(classes)} classes {list(classes)}")
