"""Mask geometry: the one overlap engine of cellkit (areas, boxes, intersections, IoUs, overlapping pairs).

Masks are run-length encoded (:class:`MaskRuns`: the row-major runs of every mask of one image in CSR layout, with
their areas and bounding boxes). Candidate pairs are the pairs whose bounding boxes overlap (:func:`box_pairs`), and
only their intersections are computed, from the runs (:func:`pair_intersections`: the union of two sets of disjoint
intervals, for all pairs in one sort). The metric, the audit, weighted mask fusion, the submission check and the
search's exact evaluation all use it.

Why runs: ``benchmarks/bench_geometry.py`` scores the same (prediction, truth) pairs of real images with this engine,
with the label maps the metric used before, and with pycocotools' C RLE ``iou`` (column-major RLEs of the transposed
image); the runs are the fastest of the three, IoUs identical (RESULTS.md "Mask geometry").

Conventions: flat pixel index = ``y * width + x`` (row-major); boxes are ``x0, y0, x1, y1`` pixels, end exclusive,
all 0 for an empty mask. Numpy and :mod:`cellkit.rle` only.
"""
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from cellkit import SHAPE, rle

__all__ = ["MaskRuns", "crops_runs", "box_pairs", "pair_intersections", "overlapping_pairs", "iou_matrix"]


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
        sums = np.concatenate(([0], np.cumsum(lengths)))
        shape = (int(self.shape[0]), int(self.shape[1]))
        for name, value in (("starts", starts), ("lengths", lengths), ("indptr", indptr), ("shape", shape),
                            ("areas", sums[indptr[1:]] - sums[indptr[:-1]]),
                            ("boxes", _run_boxes(starts, lengths, indptr, shape[1]))):
            object.__setattr__(self, name, value)

    def __len__(self) -> int:
        return self.indptr.size - 1

    @classmethod
    def _from_counts(cls, starts, lengths, counts, shape: tuple[int, int]) -> "MaskRuns":
        return cls(starts, lengths, np.concatenate(([0], np.cumsum(counts))), shape)

    @classmethod
    def from_rles(cls, rles: Sequence[str], shape: tuple[int, int] = SHAPE) -> "MaskRuns":
        """From competition mask strings (validated; an empty string is an empty mask and keeps its position).

        Raises:
            cellkit.rle.MaskError: (a ValueError) naming the position of the first malformed string.
        """
        return cls._from_counts(*rle.parse_many(rles, shape), shape)

    @classmethod
    def from_crops(cls, crops: Sequence[np.ndarray], windows: np.ndarray, shape: tuple[int, int]) -> "MaskRuns":
        """From bool crops ``crops[k]`` placed at ``windows[k] = (x0, y0, x1, y1)`` (as binarised predictions)."""
        return cls._from_counts(*crops_runs(list(crops), np.asarray(windows).reshape(-1, 4), int(shape[1])), shape)

    @classmethod
    def from_runs(cls, runs: Sequence[tuple[np.ndarray, np.ndarray]], shape: tuple[int, int]) -> "MaskRuns":
        """From one ``(starts, lengths)`` per mask (0-indexed flat row-major starts, as :func:`cellkit.rle.parse`
        gives; the runs of one mask sorted and disjoint)."""
        empty = np.zeros(0, np.int64)
        return cls._from_counts(np.concatenate([empty, *(np.asarray(s, np.int64) for s, _ in runs)]),
                                np.concatenate([empty, *(np.asarray(n, np.int64) for _, n in runs)]),
                                [len(s) for s, _ in runs], shape)

    @classmethod
    def from_indices(cls, masks: Sequence[np.ndarray], shape: tuple[int, int]) -> "MaskRuns":
        """From one array of flat row-major pixel indices per mask (unique within a mask, any order)."""
        sizes = np.array([np.size(m) for m in masks], dtype=np.int64)
        owner = np.repeat(np.arange(sizes.size, dtype=np.int64), sizes)
        pix = np.concatenate([np.asarray(m, np.int64).reshape(-1) for m in masks]) if sizes.sum() else owner
        order = np.lexsort((pix, owner))
        pix, owner = pix[order], owner[order]
        first = np.ones(pix.size, dtype=bool)
        first[1:] = (pix[1:] != pix[:-1] + 1) | (owner[1:] != owner[:-1])
        starts = np.flatnonzero(first)
        lengths = np.diff(np.append(starts, pix.size))
        return cls._from_counts(pix[starts], lengths, np.bincount(owner[starts], minlength=sizes.size), shape)

    @classmethod
    def from_masks(cls, masks) -> "MaskRuns":
        """From 2-D masks (a sequence of ``(H, W)`` arrays or one ``(N, H, W)`` array; nonzero = inside); an
        empty sequence has the shape :data:`cellkit.SHAPE`."""
        shape = tuple(np.shape(masks)[1:]) if isinstance(masks, np.ndarray) and masks.ndim == 3 else \
            (tuple(np.shape(masks[0])) if len(masks) else SHAPE)
        return cls.from_runs([rle.encode_runs(m) for m in masks], shape)

    @property
    def n_nonempty(self) -> int:
        """Number of masks with at least one pixel."""
        return int(np.count_nonzero(self.areas))

    def select(self, idx) -> "MaskRuns":
        """The masks ``idx`` (int indices), in that order."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        runs, _ = _ragged(self.indptr, idx)
        return self._from_counts(self.starts[runs], self.lengths[runs], self.indptr[idx + 1] - self.indptr[idx],
                                 self.shape)

    def union(self) -> np.ndarray:
        """bool ``(height * width,)``: the pixels covered by any mask (flat, row-major)."""
        n_pixels = self.shape[0] * self.shape[1]
        diff = np.bincount(self.starts, minlength=n_pixels + 1) - np.bincount(self.starts + self.lengths,
                                                                              minlength=n_pixels + 1)
        return np.cumsum(diff[:-1]) > 0


def _run_boxes(starts: np.ndarray, lengths: np.ndarray, indptr: np.ndarray, width: int) -> np.ndarray:
    """``(n, 4)`` int64 boxes ``x0, y0, x1, y1`` (end exclusive) of runs in CSR layout; zeros for empty masks.

    A run that wraps past the end of a row (possible in the competition's flat encoding) covers whole rows' width.
    """
    n = indptr.size - 1
    boxes = np.zeros((n, 4), dtype=np.int64)
    r0, c0 = np.divmod(starts, width)
    r1, c1 = np.divmod(starts + lengths - 1, width)
    wrap = r1 > r0
    nonempty = indptr[1:] > indptr[:-1]
    first = indptr[:-1][nonempty]
    # the runs of a mask are sorted: its first run is on its top row, its last on its bottom row
    boxes[nonempty] = np.stack([np.minimum.reduceat(np.where(wrap, 0, c0), first), r0[first],
                                np.maximum.reduceat(np.where(wrap, width - 1, c1), first) + 1,
                                r1[indptr[1:][nonempty] - 1] + 1], axis=1)
    return boxes


def _ragged(indptr: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``[indptr[k], indptr[k + 1])`` of every ``k`` in ``items``, concatenated, and their owner (position in
    ``items``); int64 both."""
    items = np.asarray(items, dtype=np.int64)
    counts = indptr[items + 1] - indptr[items]
    owner = np.repeat(np.arange(items.size, dtype=np.int64), counts)
    block_start = np.cumsum(counts) - counts
    return np.arange(int(counts.sum()), dtype=np.int64) - block_start[owner] + indptr[items][owner], owner


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
    n_pixels = np.int64(a.shape[0] * a.shape[1])
    runs_a, own_a = _ragged(a.indptr, i)
    runs_b, own_b = _ragged(b.indptr, j)
    starts = np.concatenate((a.starts[runs_a] + own_a * n_pixels, b.starts[runs_b] + own_b * n_pixels))
    ends = starts + np.concatenate((a.lengths[runs_a], b.lengths[runs_b]))
    owner = np.concatenate((own_a, own_b))
    order = np.argsort(starts, kind="stable")
    starts, ends, owner = starts[order], ends[order], owner[order]
    before = np.concatenate((starts[:1], np.maximum.accumulate(ends)[:-1]))  # furthest end of the runs before each
    added = np.maximum(ends - np.maximum(starts, before), 0)
    union = np.bincount(owner, weights=added, minlength=i.size)
    return a.areas[i] + b.areas[j] - np.rint(union).astype(np.int64)


def overlapping_pairs(a: MaskRuns, b: MaskRuns | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The pairs of masks that share at least one pixel, with their intersections and IoUs.

    Args:
        a: masks; b: other masks of the same image, or None for the pairs ``i < j`` within ``a``.

    Returns:
        ``(i, j, inter, iou)``: int64 indices into ``a`` and ``b`` (sorted by ``i``, then ``j``), float64 pixel
        counts ``|a[i] ∩ b[j]|`` (all > 0) and float64 mask IoUs.
    """
    other = a if b is None else b
    i, j = box_pairs(a.boxes, None if b is None else b.boxes)
    inter = pair_intersections(a, other, i, j)
    hit = inter > 0
    i, j, inter = i[hit], j[hit], inter[hit].astype(np.float64)
    return i, j, inter, inter / (a.areas[i] + other.areas[j] - inter)


def crops_runs(crops: Sequence[np.ndarray], windows: np.ndarray, width: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of many bool crops at once (one encoding pass over all of them, each as :func:`cellkit.rle.encode_runs`
    gives it for the full mask).

    Args:
        crops: bool crops, ``crops[k]`` of window ``windows[k] = (x0, y0, x1, y1)``.
        windows: int ``(K, 4)``.
        width: image width W.

    Returns:
        ``(starts, lengths, counts)``: int64 runs of every crop concatenated in crop order (global 0-indexed
        row-major starts), and int64 ``(K,)`` number of runs of each crop.
    """
    windows = np.asarray(windows, dtype=np.int64).reshape(-1, 4)
    h = windows[:, 3] - windows[:, 1]
    w1 = windows[:, 2] - windows[:, 0] + 1  # padded width: a False column ends every row's last run
    offsets = np.concatenate(([0], np.cumsum(h * w1)))
    buf = np.zeros(int(offsets[-1]) + 1, dtype=np.int8)  # +1: a final 0 closes the last run
    for j, c in enumerate(crops):
        if c.size:
            buf[offsets[j]:offsets[j + 1]].reshape(int(h[j]), int(w1[j]))[:, :-1] = c
    edges = np.flatnonzero(np.diff(buf, prepend=np.int8(0)))
    starts, ends = edges[0::2], edges[1::2]
    owner = np.searchsorted(offsets, starts, side="right") - 1
    row, col = np.divmod(starts - offsets[owner], w1[owner])
    global_starts = (windows[owner, 1] + row) * int(width) + windows[owner, 0] + col
    return (global_starts.astype(np.int64), (ends - starts).astype(np.int64),
            np.bincount(owner, minlength=len(crops)).astype(np.int64))


def iou_matrix(a: MaskRuns, b: MaskRuns) -> np.ndarray:
    """Dense mask IoUs, float64 ``(len(a), len(b))`` (0 where masks share no pixel, or for an empty mask)."""
    i, j, _, iou = overlapping_pairs(a, b)
    out = np.zeros((len(a), len(b)))
    out[i, j] = iou
    return out
