"""Ground-truth instance masks kept at their boxes, from the dataset dict to the mask loss.

detectron2's ``BitMasks`` hold one full-image bool plane per cell: the densest real shsy5y image (790 cells) takes
1.2 GiB at the paper's training size (1100, 1490), and the mask loss then converts every matched plane to float32.
:class:`CropMasks` keeps each cell as a bool crop of its (augmented) box plus a small zero margin, all crops in one
flat buffer, and implements what detectron2's mask head asks of ``gt_masks``: ``__len__``, indexing (by int, slice,
bool or index tensor), ``to(device)``, ``nonempty()``, ``get_bounding_boxes()`` and
``crop_and_resize(boxes, mask_size)`` (ROIAlign on the crops, the same sampling as ``BitMasks.crop_and_resize``).

:func:`transform_annotation_masks` builds one from a record's annotations (COCO RLE dicts or polygons) and a
detectron2 ``TransformList``: masks are decoded 32 at a time, bit-packed 8 per byte and transformed 4 bytes per
pixel at once (nearest-neighbour sampling moves whole bytes, so the bits stay exact), then unpacked into crops;
peak memory is one 4-channel image, never a full image per cell.

Conventions: images are ``(H, W)``; windows and boxes are XYXY in pixels with exclusive ends (``x1 = max x + 1``).
"""
from typing import Sequence

import numpy as np
import torch

__all__ = ["CropMasks", "transform_annotation_masks", "MARGIN"]

#: Pixels of zeros kept around each crop (within the image): covers nearest-neighbour rounding and rotation, and
#: makes :meth:`CropMasks.crop_and_resize` sample like ROIAlign on the full image (out-of-crop samples read 0).
MARGIN = 3

_CHUNK_ELEMENTS = 1 << 23  # upper bound of crops x height x width gathered at once in CropMasks.crop_and_resize


class CropMasks:
    """Instance masks stored as bool crops of their windows in one flat buffer.

    Args:
        data: 1-D bool tensor, the crops' pixels row-major, one after another.
        windows: int64 ``(N, 4)`` XYXY exclusive-end window of each crop in the image (clipped to the image).
        offsets: int64 ``(N,)`` start of each crop in ``data``.
        image_size: ``(H, W)`` of the image the windows refer to.
        boxes: float32 ``(N, 4)`` tight XYXY exclusive-end boxes of the masks (zeros for an empty mask).

    Indexing returns a ``CropMasks`` over the same buffer (no pixel is copied), as ``Instances`` indexing and
    detectron2's proposal matching (``gt_masks[matched_idxs]``, with repeats) need.
    """

    def __init__(self, data: torch.Tensor, windows: torch.Tensor, offsets: torch.Tensor,
                 image_size: tuple[int, int], boxes: torch.Tensor):
        self.data = data
        self.windows = windows
        self.offsets = offsets
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.boxes = boxes

    # -------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_crops(cls, crops: Sequence[np.ndarray], windows, image_size: tuple[int, int]) -> "CropMasks":
        """Build from bool crops (``crops[i].shape == (y1 - y0, x1 - x0)`` of ``windows[i]``)."""
        windows = np.asarray(windows, dtype=np.int64).reshape(-1, 4)
        if len(crops) != len(windows):
            raise ValueError(f"CropMasks: {len(crops)} crops for {len(windows)} windows")
        boxes = np.zeros((len(crops), 4), dtype=np.float32)
        flat = []
        for i, (crop, (x0, y0, x1, y1)) in enumerate(zip(crops, windows)):
            crop = np.asarray(crop, dtype=bool)
            if crop.shape != (y1 - y0, x1 - x0):
                raise ValueError(f"CropMasks: crop {i} has shape {crop.shape}, its window {[x0, y0, x1, y1]} "
                                 f"needs {(y1 - y0, x1 - x0)}")
            rows, cols = np.flatnonzero(crop.any(axis=1)), np.flatnonzero(crop.any(axis=0))
            if rows.size:
                boxes[i] = (x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1, y0 + rows[-1] + 1)
            flat.append(crop.reshape(-1))
        sizes = np.array([f.size for f in flat], dtype=np.int64)
        data = np.concatenate(flat) if flat else np.zeros(0, dtype=bool)
        return cls(torch.from_numpy(data), torch.from_numpy(windows), torch.from_numpy(np.cumsum(sizes) - sizes),
                   image_size, torch.from_numpy(boxes))

    @classmethod
    def from_full_masks(cls, masks: np.ndarray, margin: int = MARGIN) -> "CropMasks":
        """Build from bool ``(N, H, W)`` full-image masks (tests, small images): each cropped to its box + margin."""
        masks = np.asarray(masks, dtype=bool)
        n, h, w = masks.shape
        crops, windows = [], []
        for m in masks:
            rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
            if rows.size:
                x0, y0 = max(cols[0] - margin, 0), max(rows[0] - margin, 0)
                x1, y1 = min(cols[-1] + 1 + margin, w), min(rows[-1] + 1 + margin, h)
            else:
                x0 = y0 = x1 = y1 = 0
            windows.append((x0, y0, x1, y1))
            crops.append(m[y0:y1, x0:x1])
        return cls.from_crops(crops, windows, (h, w))

    # ------------------------------------------------------------------------------------------ container API
    def __len__(self) -> int:
        return int(self.windows.shape[0])

    def __getitem__(self, item) -> "CropMasks":
        if isinstance(item, int):
            item = slice(item, item + 1 if item != -1 else None)
        return CropMasks(self.data, self.windows[item].reshape(-1, 4), self.offsets[item].reshape(-1),
                         self.image_size, self.boxes[item].reshape(-1, 4))

    def __repr__(self) -> str:
        return f"CropMasks(num_instances={len(self)}, image_size={self.image_size}, nbytes={self.nbytes})"

    @property
    def device(self) -> torch.device:
        return self.data.device

    def to(self, *args, **kwargs) -> "CropMasks":
        """Move to a device (the dtype of the crops stays bool)."""
        device = torch.empty(0).to(*args, **kwargs).device
        return CropMasks(self.data.to(device), self.windows.to(device), self.offsets.to(device), self.image_size,
                         self.boxes.to(device))

    @property
    def nbytes(self) -> int:
        """Bytes held by this object's tensors (the shared buffer counted whole)."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.windows, self.offsets, self.boxes))

    def nonempty(self) -> torch.Tensor:
        """bool ``(N,)``: the mask has at least one pixel."""
        b = self.boxes
        return (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])

    def get_bounding_boxes(self):
        """Tight boxes as detectron2 ``Boxes`` (XYXY, exclusive end, like ``BitMasks.get_bounding_boxes``)."""
        from detectron2.structures import Boxes

        return Boxes(self.boxes.clone())

    def area(self) -> torch.Tensor:
        """int64 ``(N,)`` pixel count of each mask."""
        return torch.stack([self._crop(i).sum() for i in range(len(self))]) if len(self) else torch.zeros(
            0, dtype=torch.int64)

    def _crop(self, i: int) -> torch.Tensor:
        x0, y0, x1, y1 = (int(v) for v in self.windows[i])
        start = int(self.offsets[i])
        return self.data[start:start + (y1 - y0) * (x1 - x0)].view(y1 - y0, x1 - x0)

    def to_full(self) -> torch.Tensor:
        """bool ``(N, H, W)`` full-image masks (tests and debugging only: this is what the class avoids)."""
        out = torch.zeros((len(self),) + self.image_size, dtype=torch.bool, device=self.device)
        for i in range(len(self)):
            x0, y0, x1, y1 = (int(v) for v in self.windows[i])
            out[i, y0:y1, x0:x1] = self._crop(i)
        return out

    # ------------------------------------------------------------------------------------------ mask targets
    def crop_and_resize(self, boxes: torch.Tensor, mask_size: int) -> torch.Tensor:
        """Each mask cropped by its box and resized to ``(mask_size, mask_size)``: the mask head's targets.

        The same ROIAlign (``aligned=True``, adaptive sampling) as ``BitMasks.crop_and_resize`` on the crops, the
        box shifted into each crop's frame; samples outside a crop read 0 like the full mask's zeros there, and at
        the image's right and bottom edges the last row/column is repeated as ROIAlign's clamping does.

        Args:
            boxes: float ``(N, 4)`` XYXY boxes in image pixels (one per mask).
            mask_size: side of the output.

        Returns:
            bool ``(N, mask_size, mask_size)`` (``>= 0.5`` of the sampled values), on ``boxes``' device.
        """
        from torchvision.ops import roi_align

        n = len(self)
        if len(boxes) != n:
            raise ValueError(f"crop_and_resize: {len(boxes)} boxes for {n} masks")
        out_device = boxes.device
        if n == 0:
            return torch.zeros((0, mask_size, mask_size), dtype=torch.bool, device=out_device)
        device = self.device
        boxes = boxes.to(device=device, dtype=torch.float32)
        # one padded crop per distinct instance (proposals matched to the same cell share it)
        uniq, inverse = torch.unique(self.offsets, return_inverse=True)
        first = torch.zeros(len(uniq), dtype=torch.long, device=device)
        first.scatter_(0, inverse, torch.arange(n, device=device))
        win = self.windows[first]
        out = torch.empty((n, mask_size, mask_size), dtype=torch.bool, device=device)
        heights, widths = (win[:, 3] - win[:, 1]), (win[:, 2] - win[:, 0])
        order = torch.argsort(heights * widths)
        start = 0
        while start < len(uniq):  # chunks of similar size bound the padded batch's memory
            # padded size of each prefix of the rest: it grows with the prefix, so the chunk is the longest that fits
            hh = torch.cummax(heights[order[start:]], 0).values + 1
            ww = torch.cummax(widths[order[start:]], 0).values + 1
            cost = torch.arange(1, len(hh) + 1, device=device) * hh * ww
            stop = start + max(1, int((cost <= _CHUNK_ELEMENTS).sum()))
            sel = order[start:stop]
            padded = self._padded(win[sel], heights[sel], widths[sel], first[sel], *self.image_size)
            members = torch.nonzero(torch.isin(inverse, sel), as_tuple=False).flatten()
            slot = torch.empty(len(uniq), dtype=torch.long, device=device)
            slot[sel] = torch.arange(len(sel), device=device)
            k = slot[inverse[members]]
            shift = win[inverse[members]][:, :2].to(torch.float32).repeat(1, 2)
            rois = torch.cat([k.to(torch.float32)[:, None], boxes[members] - shift], dim=1)
            res = roi_align(padded[:, None], rois, (mask_size, mask_size), 1.0, 0, aligned=True).squeeze(1)
            out[members] = res >= 0.5
            start = stop
        return out.to(out_device)

    def _padded(self, win, heights, widths, first, img_h: int, img_w: int) -> torch.Tensor:
        """float32 ``(K, hmax + 1, wmax + 1)`` of the selected crops, zero-padded; a crop ending at the image's
        right (bottom) edge gets its last column (row) repeated once, like ROIAlign's clamp at the image edge."""
        device = self.device
        hmax, wmax = int(heights.max()), int(widths.max())
        ys = torch.arange(hmax + 1, device=device)[None, :, None]
        xs = torch.arange(wmax + 1, device=device)[None, None, :]
        h, w = heights[:, None, None], widths[:, None, None]
        at_right = (win[:, 2] == img_w)[:, None, None]
        at_bottom = (win[:, 3] == img_h)[:, None, None]
        valid = ((xs < w) | (at_right & (xs == w))) & ((ys < h) | (at_bottom & (ys == h))) & (h > 0) & (w > 0)
        src = self.offsets[first][:, None, None] + torch.minimum(ys, h - 1).clamp(min=0) * w + \
            torch.minimum(xs, w - 1).clamp(min=0)
        src = torch.where(valid, src, torch.zeros_like(src))
        values = self.data[src] if self.data.numel() else torch.zeros_like(valid)
        return (values & valid).to(torch.float32)


# ------------------------------------------------------------------------------------------------ the mapper
def transform_annotation_masks(segmentations: Sequence, height: int, width: int, transforms,
                               margin: int = MARGIN) -> CropMasks:
    """Decode and transform the masks of one record into :class:`CropMasks` (exact, like one
    ``transforms.apply_segmentation`` per full mask, but never holding a full image per cell).

    Args:
        segmentations: per annotation a COCO RLE dict (compressed or not) or a polygon list, of an
            ``(height, width)`` image.
        height, width: the original image's size.
        transforms: a detectron2 ``TransformList`` (``apply_segmentation``, ``apply_box``) of the augmentations.
        margin: zero pixels kept around each transformed box.

    Returns:
        ``CropMasks`` in the transformed image's frame (empty masks included; drop them with ``nonempty()``).
    """
    from pycocotools import mask as mask_util

    from cellkit import rle

    n = len(segmentations)
    if n == 0:
        shape = transforms.apply_segmentation(np.zeros((height, width), np.uint8)).shape[:2]
        return CropMasks.from_crops([], np.zeros((0, 4)), shape)
    crops, windows = [], []
    for first in range(0, n, 32):
        rles = [rle.coco_segmentation(s, height, width) for s in segmentations[first:first + 32]]
        xywh = np.asarray(mask_util.toBbox(rles), dtype=np.float64).reshape(-1, 4)
        src = np.round(np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)).astype(np.int64)
        decoded = mask_util.decode(rles)  # (H, W, k) uint8: one chunk of at most 32 planes at the original size
        chunk = np.zeros((height, width, 4), dtype=np.uint8)
        for j in range(decoded.shape[2]):
            b, k = divmod(j, 8)
            x0, y0, x1, y1 = src[j]
            chunk[y0:y1, x0:x1, b] |= (decoded[y0:y1, x0:x1, j] & 1) << (7 - k)
        del decoded
        moved = np.ascontiguousarray(transforms.apply_segmentation(chunk))  # the same shape for every chunk
        # each crop's window: its transformed box plus ``margin``, clipped to the transformed image
        boxes = np.asarray(transforms.apply_box(src.astype(np.float64)), dtype=np.float64).reshape(-1, 4)
        win = np.concatenate([np.floor(boxes[:, :2]) - margin, np.ceil(boxes[:, 2:]) + margin], axis=1)
        win = np.clip(win, 0, [moved.shape[1], moved.shape[0]] * 2).astype(np.int64)
        win[:, 2:] = np.maximum(win[:, 2:], win[:, :2])
        windows.append(win)
        for j, (x0, y0, x1, y1) in enumerate(win):
            b, k = divmod(j, 8)
            crops.append((moved[y0:y1, x0:x1, b] & (1 << (7 - k))) != 0)
    return CropMasks.from_crops(crops, np.concatenate(windows), moved.shape[:2])
