"""Inference with test-time augmentation: scales x horizontal flip, mask probabilities averaged, box-cropped output.

The flow is detectron2's :class:`~detectron2.modeling.GeneralizedRCNNWithTTA` (whose augmentation mapper, box
rescaling and head switching :class:`CellTTA` inherits); what it produces and what it costs differ:

1. every augmentation (each ``cfg.TEST.AUG.MIN_SIZES`` short-edge size, each also horizontally flipped when
   ``cfg.TEST.AUG.FLIP``; without TTA a single pass at ``INPUT.MIN_SIZE_TEST``/``MAX_SIZE_TEST``) runs the backbone
   once and the box heads (mask head off); boxes are mapped back to the original image (scale and flip undone,
   :func:`deaugment_boxes`);
2. the union of boxes is merged by class-wise NMS (``ROI_HEADS.NMS_THRESH_TEST``, at most
   ``TEST.DETECTIONS_PER_IMAGE``) as detectron2 does (vectorised: its per-box Python loop is slow at 1000s of boxes);
3. the mask head runs on the merged boxes under every augmentation, on the backbone features kept from step 1
   (detectron2 recomputes them: twice the backbone cost), and the ``M x M`` box-relative mask probabilities are
   averaged after undoing the flip (:func:`deaugment_masks`; a box-relative mask is scale-free);
4. instead of :func:`~detectron2.modeling.postprocessing.detector_postprocess`, which pastes every mask into a
   full-size image and binarises it at 0.5, each averaged probability is pasted only into its own crop window
   (:func:`paste_crops`, the same bilinear sampling as detectron2's ``paste_masks_in_image``) and kept as a
   probability, quantised to uint8 (``round(p * 255)``), in a :class:`cellkit.predictions.InstancePredictions`.

With ``batch_size=1`` in detectron2's class (its default of 3 pads images of different sizes into one batch, which
changes GroupNorm statistics), boxes, scores and 0.5-binarised masks are identical to detectron2's TTA
(``tests/test_tta.py``); Mask R-CNN and Cascade Mask R-CNN alike.

A single pass (no TTA) skips steps 2-3: the model's own boxes and masks from one forward pass, then step 4.

Conventions: images are ``(H, W, C)`` uint8 arrays in ``cfg.INPUT.FORMAT`` channel order (as
:func:`detectron2.data.detection_utils.read_image` returns them); boxes are XYXY absolute pixels in the original
image; a crop window ``x0, y0, x1, y1`` has an exclusive end.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.nn import functional as F

from detectron2.modeling import GeneralizedRCNN
from detectron2.modeling.test_time_augmentation import DatasetMapperTTA, GeneralizedRCNNWithTTA
from detectron2.structures import Boxes, Instances

from cellkit import CELL_TYPES
from cellkit.predictions import InstancePredictions, quantize

__all__ = ["TTASettings", "tta_settings", "CellTTA", "paste_crops", "crop_windows", "deaugment_boxes",
           "deaugment_masks", "check_num_classes", "check_held_out",
           "load_predictor", "predict_images", "predict_oof", "fold_images", "list_images", "run_weights",
           "read_image", "check_images"]


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


def tta_settings(cfg, tta: bool) -> TTASettings:
    """The passes for ``cfg``: ``TEST.AUG.{MIN_SIZES, MAX_SIZE, FLIP}`` with ``tta``, else one pass at the test size.

    Raises:
        ValueError: naming the config key, when the sizes are empty or not positive.
    """
    if tta:
        sizes, max_size, flip = tuple(cfg.TEST.AUG.MIN_SIZES), int(cfg.TEST.AUG.MAX_SIZE), bool(cfg.TEST.AUG.FLIP)
        where = "TEST.AUG.MIN_SIZES / TEST.AUG.MAX_SIZE"
    else:
        sizes, max_size, flip = (int(cfg.INPUT.MIN_SIZE_TEST),), int(cfg.INPUT.MAX_SIZE_TEST), False
        where = "INPUT.MIN_SIZE_TEST / INPUT.MAX_SIZE_TEST"
    if not sizes or any(int(s) <= 0 for s in sizes) or max_size <= 0:
        raise ValueError(f"config {where} must be positive sizes, got {list(sizes)} / {max_size}")
    return TTASettings(tuple(int(s) for s in sizes), max_size, flip)


# --------------------------------------------------------------------------------------------------------------
# De-augmentation and box-cropped pasting (pure tensor functions)
# --------------------------------------------------------------------------------------------------------------

def _is_hflip(tfm) -> bool:
    from fvcore.transforms import HFlipTransform

    return any(isinstance(t, HFlipTransform) for t in getattr(tfm, "transforms", [tfm]))


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
    return masks.flip(dims=[3]) if _is_hflip(tfm) else masks


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
    half_x = (boxes[:, 2] - boxes[:, 0]) / (2 * mask_size)
    half_y = (boxes[:, 3] - boxes[:, 1]) / (2 * mask_size)
    x0 = torch.floor(boxes[:, 0] - half_x).clamp(0, width)
    y0 = torch.floor(boxes[:, 1] - half_y).clamp(0, height)
    x1 = torch.ceil(boxes[:, 2] + half_x).clamp(0, width)
    y1 = torch.ceil(boxes[:, 3] + half_y).clamp(0, height)
    x1, y1 = torch.maximum(x1, x0), torch.maximum(y1, y0)
    return torch.stack([x0, y0, x1, y1], dim=1).to(torch.int64)


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
    if n == 0:
        return np.zeros((0, 4), np.int32), []
    wh = (windows[:, 2:] - windows[:, :2]).cpu()
    order = torch.argsort(wh[:, 0] * wh[:, 1]).tolist()
    start = 0
    while start < n:
        # grow the batch while (count x largest window) stays under the cap; windows are sorted by area
        stop = start + 1
        while stop < n:
            hmax = int(wh[order[start:stop + 1], 1].max())
            wmax = int(wh[order[start:stop + 1], 0].max())
            if (stop + 1 - start) * hmax * wmax > chunk_pixels:
                break
            stop += 1
        idx = order[start:stop]
        _paste_batch(masks, boxes, windows, wh, idx, crops)
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
    img_x = w[:, 0:1].float() + torch.arange(wmax, device=device, dtype=torch.float32) + 0.5
    img_y = w[:, 1:2].float() + torch.arange(hmax, device=device, dtype=torch.float32) + 0.5
    img_x = (img_x - x0) / (x1 - x0) * 2 - 1
    img_y = (img_y - y0) / (y1 - y0) * 2 - 1
    k = len(idx)
    grid = torch.stack([img_x[:, None, :].expand(k, hmax, wmax), img_y[:, :, None].expand(k, hmax, wmax)], dim=3)
    sampled = F.grid_sample(masks[sel][:, None].float(), grid, align_corners=False)[:, 0]
    q = quantize(sampled.cpu().numpy())
    for j, i in enumerate(idx):
        crops[i] = np.ascontiguousarray(q[j, : int(wh[i, 1]), : int(wh[i, 0])])


# --------------------------------------------------------------------------------------------------------------
# The model wrapper
# --------------------------------------------------------------------------------------------------------------

class CellTTA(GeneralizedRCNNWithTTA):
    """A GeneralizedRCNN (Mask R-CNN or Cascade Mask R-CNN) wrapped for (TTA) inference to box-cropped probabilities.

    Args:
        cfg: the model's config (``TEST.AUG.*``, ``INPUT.*_TEST``, ``ROI_HEADS.NMS_THRESH_TEST``,
            ``TEST.DETECTIONS_PER_IMAGE``, ``INPUT.FORMAT``).
        model: a built GeneralizedRCNN with its weights loaded; switched to eval mode.
        tta: every scale x flip pass of ``TEST.AUG``; False: one pass at the test size.
        cache_features: keep each pass's backbone features for the mask pass instead of recomputing them
            (holds every pass's FPN pyramid at once, ~0.15 GB per pass at 1490x1100 in float32; False keeps one
            at a time and runs the backbone twice per pass, as detectron2 does).
        amp: run under CUDA autocast (float16); default: ``SOLVER.AMP.ENABLED`` on a CUDA model, else off.
    """

    def __init__(self, cfg, model, tta: bool = True, cache_features: bool = True, amp: bool | None = None):
        if not isinstance(model, GeneralizedRCNN):
            raise ValueError(f"TTA needs a detectron2 GeneralizedRCNN, got {type(model).__name__}")
        if not cfg.MODEL.MASK_ON:
            raise ValueError("config MODEL.MASK_ON is False: predictions need a mask head")
        self.tta = bool(tta)
        self.settings = tta_settings(cfg, tta)
        mapper = DatasetMapperTTA(min_sizes=list(self.settings.min_sizes), max_size=self.settings.max_size,
                                  flip=self.settings.flip)
        super().__init__(cfg, model, tta_mapper=mapper, batch_size=1)
        self.model.eval()
        self.cache_features = cache_features
        device = next(model.parameters()).device
        self.amp = bool(cfg.SOLVER.AMP.ENABLED and device.type == "cuda") if amp is None else bool(amp)
        if self.amp and device.type != "cuda":
            raise ValueError("amp=True needs a CUDA model")
        self.passes_run = 0  # forward passes of the backbone since construction (for tests and benchmarks)

    @property
    def n_passes(self) -> int:
        """Forward passes per image (``len(MIN_SIZES) x (1 + FLIP)`` with TTA, else 1)."""
        return self.settings.n_passes

    # -- public --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, image: np.ndarray, image_id: str) -> InstancePredictions:
        """Predict one image.

        Args:
            image: uint8 ``(H, W, C)`` in ``cfg.INPUT.FORMAT`` channel order (or ``(H, W)`` grayscale, repeated
                to 3 channels).
            image_id: the id the predictions carry (file stem).

        Returns:
            InstancePredictions with classes, scores, boxes (original pixels), crop windows and uint8 probability
            crops; the instances are sorted by descending score.
        """
        image = np.asarray(image)
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3:
            raise ValueError(f"image {image_id!r}: expected (H, W, C) or (H, W), got shape {image.shape}")
        height, width = image.shape[:2]
        tensor = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        inp = {"image": tensor, "height": height, "width": width}
        with self._autocast():
            boxes, scores, classes, masks = self._boxes_and_masks(inp)
        mask_boxes, crops = paste_crops(masks.float(), boxes, height, width)
        order = np.argsort(-scores.cpu().numpy(), kind="stable")
        pred = InstancePredictions(image_id, height, width, classes.cpu().numpy(), scores.float().cpu().numpy(),
                                   boxes.cpu().numpy(), mask_boxes, crops)
        return pred.select(order)

    # -- internals -----------------------------------------------------------------------------------------------
    def _autocast(self):
        if self.amp:
            return torch.autocast(device_type="cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def _features(self, aug_input):
        images = self.model.preprocess_image([aug_input])
        self.passes_run += 1
        return images, self.model.backbone(images.tensor)

    def _detect(self, images, features, with_masks: bool) -> Instances:
        """Boxes (and, when ``with_masks``, ``M x M`` mask probabilities) of one augmented image."""
        model = self.model
        heads = contextlib.nullcontext() if with_masks else self._turn_off_roi_heads(["mask_on", "keypoint_on"])
        with heads:
            proposals, _ = model.proposal_generator(images, features, None)
            results, _ = model.roi_heads(images, features, proposals, None)
        return results[0]

    def _masks_for_boxes(self, images, features, instances: Instances) -> torch.Tensor:
        """``(N, 1, M, M)`` mask probabilities for given boxes/classes of one augmented image."""
        out = self.model.roi_heads.forward_with_given_boxes(features, [instances.to(self.model.device)])
        return out[0].pred_masks

    def _boxes_and_masks(self, inp):
        """Run every pass; return boxes (orig. XYXY float32), scores, classes and averaged (N, 1, M, M) masks."""
        shape_hw = (inp["height"], inp["width"])
        aug_inputs, tfms = self._get_augmented_inputs(inp)
        if len(aug_inputs) == 1:
            images, features = self._features(aug_inputs[0])
            res = self._detect(images, features, with_masks=True)
            boxes = deaugment_boxes(res.pred_boxes.tensor, tfms[0])
            keep = self._valid(boxes, shape_hw)
            masks = deaugment_masks(res.pred_masks, tfms[0])
            return boxes[keep], res.scores[keep], res.pred_classes[keep], masks[keep]

        # pass 1: boxes of every augmentation, mapped back to the original image
        cached, all_boxes, all_scores, all_classes = [], [], [], []
        for aug_input, tfm in zip(aug_inputs, tfms):
            images, features = self._features(aug_input)
            cached.append((images, features) if self.cache_features else None)
            res = self._detect(images, features, with_masks=False)
            all_boxes.append(deaugment_boxes(res.pred_boxes.tensor, tfm))
            all_scores.append(res.scores.float())
            all_classes.append(res.pred_classes)
        all_boxes = torch.cat(all_boxes)
        merged = self._merge_detections(all_boxes, torch.cat(all_scores), torch.cat(all_classes), shape_hw)
        keep = self._valid(merged.pred_boxes.tensor, shape_hw)
        merged = merged[keep]
        if len(merged) == 0:
            m = self.cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION * 2
            empty = torch.zeros((0, 1, m, m), device=all_boxes.device)
            return merged.pred_boxes.tensor, merged.scores, merged.pred_classes, empty

        # pass 2: the mask head on the merged boxes under every augmentation, probabilities averaged
        aug_instances = self._rescale_detected_boxes(aug_inputs, merged, tfms)
        masks = None
        for k, (aug_input, inst, tfm) in enumerate(zip(aug_inputs, aug_instances, tfms)):
            images, features = cached[k] if self.cache_features else self._features(aug_input)
            if self.cache_features:
                cached[k] = None  # free this pass's pyramid as soon as it is used
            # as detectron2's _reduce_pred_masks: box-relative masks are scale-free, only the flip is undone
            pass_masks = deaugment_masks(self._masks_for_boxes(images, features, inst).float(), tfm)
            masks = pass_masks if masks is None else masks + pass_masks
        masks = masks / len(aug_inputs)
        return merged.pred_boxes.tensor.float(), merged.scores, merged.pred_classes, masks

    def _merge_detections(self, all_boxes, all_scores, all_classes, shape_hw):
        """detectron2's class-wise NMS merge, on tensors (its loop over python scalars is slow at 1000s of boxes)."""
        from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference_single_image

        num_classes = self.cfg.MODEL.ROI_HEADS.NUM_CLASSES
        scores_2d = torch.zeros(len(all_boxes), num_classes + 1, device=all_boxes.device)
        if len(all_boxes):
            scores_2d[torch.arange(len(all_boxes), device=all_boxes.device), all_classes.long()] = all_scores
        merged, _ = fast_rcnn_inference_single_image(all_boxes.float(), scores_2d, shape_hw, 1e-8,
                                                     self.cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST,
                                                     self.cfg.TEST.DETECTIONS_PER_IMAGE)
        return merged

    @staticmethod
    def _valid(boxes: torch.Tensor, shape_hw) -> torch.Tensor:
        """Clip to the image in place and keep non-empty boxes (as detectron2's ``detector_postprocess`` does)."""
        b = Boxes(boxes)
        b.clip(shape_hw)
        return b.nonempty()


def check_num_classes(cfg) -> None:
    """Raise ValueError unless the model predicts exactly the competition's cell types (the store's classes)."""
    n = int(cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    if n != len(CELL_TYPES):
        raise ValueError(f"config MODEL.ROI_HEADS.NUM_CLASSES is {n}; predictions are stored for the "
                         f"{len(CELL_TYPES)} cell types {list(CELL_TYPES)}")


# --------------------------------------------------------------------------------------------------------------
# Prediction runs: a run directory's model over a folder of images (or a fold's held-out images) -> a store
# --------------------------------------------------------------------------------------------------------------

WEIGHT_NAMES = ("model_best.pth", "model_final.pth")
"""Checkpoints looked up in a run directory, in order, when no weights file is given."""


def run_weights(run_dir, weights=None) -> Path:
    """The checkpoint to predict with: ``weights`` when given, else ``model_best.pth``, else ``model_final.pth``.

    Raises:
        FileNotFoundError: naming the run directory and the files tried (or the missing ``weights``).
        ValueError: ``weights`` is a URL (nothing is downloaded).
    """
    from cellkit.modeling import check_local_weights

    if weights:
        return check_local_weights(weights)
    from cellkit.train import FAILED_NAME, failure_reason

    run_dir = Path(run_dir)
    for name in WEIGHT_NAMES:
        if (run_dir / name).is_file():
            reason = failure_reason(run_dir)
            if reason:  # a best checkpoint of a run whose last attempt failed: usable, but say so
                import logging

                logging.getLogger(__name__).warning("%s: the run's last attempt failed (%s: %s); using its %s",
                                                    run_dir, FAILED_NAME, reason, name)
            return run_dir / name

    hints = []
    reason = failure_reason(run_dir)
    if reason:
        hints.append(f"the run failed ({FAILED_NAME}: {reason})")
    last = run_dir / "last_checkpoint"
    if last.is_file() and (run_dir / last.read_text().strip()).is_file():
        hints.append(f"its last checkpoint {last.read_text().strip()} is for `cellkit train --resume`")
    hint = f"; {'; '.join(hints)}" if hints else ""
    raise FileNotFoundError(f"{run_dir}: no finished or best checkpoint ({' or '.join(WEIGHT_NAMES)}){hint}; "
                            f"pass --weights PATH to use another")


def list_images(image_dir) -> list[tuple[str, Path]]:
    """``(image_id, path)`` of every image (:data:`cellkit.data.IMAGE_EXTENSIONS`) in ``image_dir``, sorted by id.

    Raises:
        FileNotFoundError: the directory does not exist.
        ValueError: it holds no image, or two files share an id (``a.png`` and ``a.tif``).
    """
    from cellkit.data import IMAGE_EXTENSIONS

    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir}: image directory does not exist")
    found: dict[str, Path] = {}
    for p in sorted(image_dir.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."):
            if p.stem in found:
                raise ValueError(f"{image_dir}: two images with id {p.stem!r} ({found[p.stem].name}, {p.name})")
            found[p.stem] = p
    if not found:
        raise ValueError(f"{image_dir}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    return sorted(found.items())


def fold_images(data_dir, fold: int, folds_csv=None) -> list[tuple[str, Path]]:
    """``(image_id, path)`` of the held-out images of ``fold`` in a competition-layout data directory.

    Args:
        data_dir: holds ``train/<id>.png`` (and usually ``train.csv``, ``folds.csv``).
        fold: the held-out fold.
        folds_csv: the folds file; default ``<data_dir>/folds.csv``.

    Raises:
        FileNotFoundError: no folds file, no ``train/`` folder, an image of the fold missing (naming it).
        ValueError: a fold that is not in the folds file (see :func:`cellkit.folds.fold_ids`).
    """
    from cellkit.data import find_image
    from cellkit.folds import fold_ids, read_folds

    data_dir = Path(data_dir)
    folds_csv = Path(folds_csv) if folds_csv else data_dir / "folds.csv"
    if not folds_csv.is_file():
        raise FileNotFoundError(f"{folds_csv}: no folds file (write one with `python -m cellkit folds`, or train "
                                f"first: the run directory keeps its folds.csv)")
    ids = fold_ids(read_folds(folds_csv), int(fold), "val")
    if not ids:
        raise ValueError(f"{folds_csv}: fold {fold} has no images")
    image_dir = data_dir / "train"
    return sorted((i, find_image(image_dir, i)) for i in ids)


def check_held_out(cfg, fold: int, run_dir) -> None:
    """Refuse predictions on ``fold`` by a run that trained on it (they would not be out-of-fold).

    Raises:
        ValueError: the run's ``CELLKIT.DATA.FOLD`` is not ``fold`` (``-1``: it trained on every image).
    """
    held_out = int(cfg.CELLKIT.DATA.FOLD)
    if held_out != int(fold):
        what = "trained on every image (CELLKIT.DATA.FOLD -1)" if held_out < 0 else f"held out fold {held_out}"
        raise ValueError(f"{run_dir}: the run {what}, so its predictions on fold {fold} would not be out-of-fold; "
                         f"use the run that held out fold {fold}")


def run_folds_csv(run_dir, cfg, data_dir) -> Path | None:
    """The folds file a run was trained with: ``CELLKIT.DATA.FOLDS_CSV``, ``<run>/folds.csv``, ``<data>/folds.csv``."""
    candidates = []
    if "CELLKIT" in cfg and cfg.CELLKIT.DATA.FOLDS_CSV:
        candidates.append(Path(cfg.CELLKIT.DATA.FOLDS_CSV))
    candidates += [Path(run_dir) / "folds.csv", Path(data_dir) / "folds.csv"]
    return next((c for c in candidates if c.is_file()), candidates[-1])


def load_predictor(run_dir, weights=None, tta: bool = False, device: str | None = None):
    """Load a run directory's ``config.yaml`` and checkpoint into a :class:`CellTTA`.

    Args:
        run_dir: a ``cellkit train`` output directory.
        weights: checkpoint path; default :func:`run_weights`.
        tta: every ``TEST.AUG`` pass, else one pass at the test size.
        device: ``cpu``/``cuda``; default the config's ``MODEL.DEVICE``, falling back to ``cpu`` without CUDA.

    Returns:
        ``(predictor, info)`` where ``info`` holds ``run``, ``config``, ``weights`` (str) for ``meta.json``.

    Raises:
        FileNotFoundError / ValueError: missing run directory, config or weights, or a model whose class count is
            not the competition's, before the model is built.
    """
    from cellkit.config import CONFIG_FILE_NAME, load_run_config
    from cellkit.modeling import load_model

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: run directory does not exist")
    cfg = load_run_config(run_dir)
    weights = run_weights(run_dir, weights)
    check_num_classes(cfg)
    if device:
        cfg.MODEL.DEVICE = device
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    if not cfg.MODEL.DEVICE.startswith("cuda"):
        cfg.SOLVER.AMP.ENABLED = False
    tta_settings(cfg, tta)  # validate the sizes before building the model
    model = load_model(cfg, weights)
    info = {"run": str(run_dir.resolve()), "config": str((run_dir / CONFIG_FILE_NAME).resolve()),
            "weights": str(Path(weights).resolve())}
    return CellTTA(cfg, model, tta=tta), info


def _existing_ids(out: Path) -> set:
    """Ids already stored in ``out`` (resume); an error for a foreign file there."""
    from cellkit import predictions

    if not out.exists():
        return set()
    if not out.is_dir():
        raise ValueError(f"{out}: output path exists and is not a directory")
    if any(not p.name.startswith(".") for p in out.glob("*.npz")):  # a killed first write leaves only a hidden temp
        return set(predictions.image_ids(out))
    foreign = [p for p in out.iterdir() if not p.name.startswith(".") and p.name != predictions.META_NAME]
    if foreign:
        raise ValueError(f"{foreign[0]}: foreign file in predictions directory {out}")
    return set()


def _merge_meta(out: Path, tta: dict, source: dict) -> dict:
    """``meta.json`` content after adding ``source``; refuses to mix TTA settings or weights in one directory.

    ``meta = {"tta": {...}, "sources": [{"run", "config", "weights", "fold", "images", "n_images"}, ...]}``; a
    source with the same ``fold`` (or, without folds, the same ``images``) is replaced.
    """
    from cellkit import predictions

    meta = {"tta": tta, "sources": []}
    meta_path = out / predictions.META_NAME
    if meta_path.is_file():
        old = predictions.read_meta(out)
        if old.get("tta") != tta:
            raise ValueError(f"{meta_path}: the store holds predictions made with TTA settings {old.get('tta')}, "
                             f"not {tta}; use another --out")
        sources = old.get("sources", [])
        if not isinstance(sources, list) or not all(isinstance(s, dict) for s in sources):
            raise ValueError(f"{meta_path}: 'sources' must be a list of objects (not written by cellkit predict?)")
        meta["sources"] = list(sources)
    elif out.is_dir() and any(not p.name.startswith(".") for p in out.glob("*.npz")):
        raise ValueError(f"{out}: holds predictions without {predictions.META_NAME} (not written by cellkit "
                         f"predict); use another --out")
    key = ("fold", source["fold"]) if source["fold"] is not None else ("images", source["images"])
    for old_src in meta["sources"]:
        if old_src.get(key[0]) == key[1] and old_src.get("weights") != source["weights"]:
            raise ValueError(f"{meta_path}: the store holds predictions of {key[0]} {key[1]} made by another model "
                             f"({old_src.get('weights')}), not {source['weights']}; use another --out")
    meta["sources"] = [s for s in meta["sources"] if s.get(key[0]) != key[1]] + [source]
    return meta


def read_image(path, fmt: str) -> np.ndarray:
    """An image as the model reads it: uint8 ``(H, W, 3)`` in ``fmt`` (``cfg.INPUT.FORMAT``), like detectron2's
    ``read_image`` (EXIF orientation applied), after a complete decode (:func:`cellkit.data.open_image`).

    Raises:
        FileNotFoundError: no such file.
        ValueError: naming the file, when it is not an image, truncated or corrupt, or not 8-bit.
    """
    from detectron2.data.detection_utils import _apply_exif_orientation, convert_PIL_to_numpy

    from cellkit.data import open_image

    image = open_image(path)
    try:
        array = convert_PIL_to_numpy(_apply_exif_orientation(image), fmt)
    except Exception as exc:  # a mode detectron2 cannot convert to fmt
        raise ValueError(f"{path}: cannot convert the image to {fmt} ({exc})") from None
    if array.dtype != np.uint8:
        raise ValueError(f"{path}: expected an 8-bit image, got {array.dtype}")
    return array


def check_images(paths: Sequence[Path], workers: int | None = None, progress: bool = True,
                 max_problems: int = 30) -> None:
    """Decode every image completely (:func:`cellkit.data.open_image`, in parallel processes) before any work.

    Raises:
        ValueError: one :class:`cellkit.datacheck.DataCheckError` naming every unreadable, truncated or non-8-bit
            image (up to ``max_problems`` listed).
    """
    from cellkit import datacheck

    results = datacheck._run_parallel(datacheck.image_problem, [(str(p), None) for p in paths],
                                      datacheck._workers(workers), "checking images", progress)
    problems = [((str(p),), msg) for p, msg in zip(paths, results) if msg]
    if problems:
        raise datacheck.DataCheckError(f"the {len(paths)} image(s) to predict", problems, max_problems,
                                       consequence="nothing was predicted")


def _remove_stale_temporaries(out: Path, image_ids: Sequence[str]) -> None:
    """Delete temporary files a killed run left in a store (:mod:`cellkit.atomic`'s hidden names): those of the
    images this run is about to write (``.<id>.npz.<random>.npz``) and ``meta.json`` temporaries older than a
    minute. Readers skip them anyway, but a resumed store should equal an uninterrupted one; a concurrent run
    writing other images (another fold) into the same store is left alone."""
    import glob
    import time

    if not out.is_dir():
        return
    for image_id in image_ids:
        for path in out.glob(f".{glob.escape(image_id)}.npz.*.npz"):
            path.unlink(missing_ok=True)
    for path in out.glob(".meta.json.*.tmp"):
        try:
            if time.time() - path.stat().st_mtime > 60:
                path.unlink(missing_ok=True)
        except FileNotFoundError:
            pass


def predict_images(predictor: CellTTA, images: Sequence[tuple[str, Path]], out, source: dict,
                   progress: bool = True) -> dict:
    """Predict images into a store directory, skipping ids already there (resume).

    Args:
        predictor: from :func:`load_predictor`.
        images: ``(image_id, path)`` pairs.
        out: predictions directory (created); gets one ``<id>.npz`` per image and ``meta.json``.
        source: provenance of this call (``run``, ``config``, ``weights``, ``fold``, ``images``).
        progress: show a tqdm bar.

    Returns:
        ``{"written": n, "skipped": n, "seconds": s}``.
    """
    import time

    from tqdm import tqdm

    from cellkit import predictions

    out = Path(out)
    done = _existing_ids(out)
    tta = {"enabled": predictor.tta, **predictor.settings.as_dict()}
    meta = _merge_meta(out, tta, {**source, "n_images": len(images)})
    todo = [(i, p) for i, p in images if i not in done]
    check_images([p for _, p in todo], progress=progress)  # before anything is written
    _remove_stale_temporaries(out, [i for i, _ in todo])
    predictions.write_meta(out, meta)
    fmt = predictor.cfg.INPUT.FORMAT
    start = time.perf_counter()
    for image_id, path in tqdm(todo, desc=f"predict -> {out.name}", unit="img", disable=not progress):
        pred = predictor.predict(read_image(path, fmt), image_id)
        predictions.save(pred, out)
    return {"written": len(todo), "skipped": len(images) - len(todo), "seconds": time.perf_counter() - start}


def predict_oof(run_dirs_by_fold: dict, data_dir, out, tta: bool = False, weights_by_fold: dict | None = None,
                device: str | None = None, progress: bool = True) -> dict:
    """Out-of-fold predictions: each fold's held-out images by that fold's model, all into one directory.

    Every fold's inputs (run directory, config, weights, folds file, images) are checked before any prediction.

    Args:
        run_dirs_by_fold: ``{fold: run_dir}``.
        data_dir: competition-layout data directory (``train/<id>.png``, ``folds.csv``).
        out: the predictions directory (resumable).
        tta: TTA passes for every fold.
        weights_by_fold: optional ``{fold: checkpoint}`` overriding each run's best/final checkpoint.
        device: see :func:`load_predictor`.

    Returns:
        ``{fold: {"written", "skipped", "seconds"}}``.
    """
    from cellkit.config import load_run_config

    if not run_dirs_by_fold:
        raise ValueError("predict_oof: no fold run directories given")
    weights_by_fold = weights_by_fold or {}
    plans = {}
    for fold, run_dir in sorted(run_dirs_by_fold.items()):
        if not Path(run_dir).is_dir():
            raise FileNotFoundError(f"{run_dir}: run directory of fold {fold} does not exist")
        cfg = load_run_config(run_dir)
        check_num_classes(cfg)
        check_held_out(cfg, fold, run_dir)
        run_weights(run_dir, weights_by_fold.get(fold))
        images = fold_images(data_dir, fold, run_folds_csv(run_dir, cfg, data_dir))
        plans[fold] = (run_dir, images)
    ids = [i for _, images in plans.values() for i, _ in images]
    if len(ids) != len(set(ids)):
        raise ValueError("predict_oof: an image is held out by more than one fold (folds files differ between runs)")
    results = {}
    for fold, (run_dir, images) in plans.items():
        predictor, info = load_predictor(run_dir, weights_by_fold.get(fold), tta=tta, device=device)
        source = {**info, "fold": int(fold), "images": str(Path(data_dir).resolve() / "train")}
        results[fold] = predict_images(predictor, images, out, source, progress=progress)
        del predictor
    return results
