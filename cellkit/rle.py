"""The competition's run-length encoding, and the bridge to COCO RLE.

Conventions (checked on the real ``train.csv``): a mask string is space-separated ``start length`` pairs; starts are
**1-indexed**; pixels are numbered **row-major** (flat index = y * width + x). Runs are sorted and do not overlap.
Shapes are always ``(height, width)``, ``(520, 704)`` for Sartorius.

Everything in cellkit that reads or writes a mask string goes through this module.
"""
from collections.abc import Sequence

import numpy as np
from pycocotools import mask as mask_util

from cellkit import SHAPE

__all__ = ["parse", "parse_many", "MaskError", "runs_to_string", "runs_to_indices", "decode", "encode", "encode_runs",
           "to_coco", "to_coco_many", "from_coco", "coco_segmentation", "area", "validate", "convert_order",
           "transpose_runs"]


def parse(rle: str, shape: tuple[int, int] = SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """Parse and validate a mask string into runs.

    Args:
        rle: competition RLE, ``"start length start length ..."`` (1-indexed, row-major). Empty or whitespace-only
            means an empty mask.
        shape: ``(height, width)`` of the image.

    Returns:
        ``(starts, lengths)``: int64 arrays of equal length; ``starts`` are **0-indexed** flat row-major indices.

    Raises:
        ValueError: odd token count, a non-integer token, start < 1, length < 1, a run past the image end, or runs
            that are unsorted or overlap. The message names the problem and the offending pair.
    """
    if not isinstance(rle, str):
        if rle is None or (isinstance(rle, float) and np.isnan(rle)):
            rle = ""
        else:
            raise ValueError(f"RLE must be a string, got {type(rle).__name__}")
    n_pixels = int(shape[0]) * int(shape[1])
    try:  # numpy's C text parser (AttributeError: a numpy without text-mode fromstring)
        values = np.fromstring(rle, dtype=np.int64, sep=" ") if rle.strip() else np.zeros(0, dtype=np.int64)
    except (ValueError, AttributeError):
        values = None
    # anything outside the plain case (a token that is not an ASCII integer, an odd count, a value outside
    # [1, n_pixels], which also catches int64 saturation) takes the slow path, which names the problem
    if values is None or values.size % 2 or values.min(initial=1) < 1 or values.max(initial=1) > n_pixels:
        values = _slow_ints(rle)
    else:
        # every value is in [1, n_pixels]: bounds are [start, end) pairs, 0-indexed, that must not go backwards
        bounds = values - 1
        bounds[1::2] += values[0::2]
        if values.size and bounds[-1] <= n_pixels and bool(np.all(bounds[2::2] >= bounds[1:-1:2])):
            return bounds[0::2], values[1::2]
    starts, lengths = values[0::2], values[1::2]
    _check_runs(starts, lengths, shape)
    return starts - 1, lengths


def _slow_ints(rle: str) -> np.ndarray:
    """Tokens of ``rle`` as int64 via ``str.split``; ValueError naming an odd count or a non-integer token."""
    tokens = rle.split()
    if len(tokens) % 2:
        raise ValueError(f"RLE has an odd number of tokens ({len(tokens)}): expected 'start length' pairs")
    values = []
    for token in tokens:
        try:
            value = int(token)
        except ValueError:
            raise ValueError(f"RLE token {token!r} is not an integer") from None
        if not -(2 ** 63) <= value < 2 ** 63:
            raise ValueError(f"RLE token {token!r} is out of the int64 range")
        values.append(value)
    return np.array(values, dtype=np.int64)


def _first(flags: np.ndarray) -> int | None:
    return int(np.argmax(flags)) if flags.any() else None


def _check_runs(starts: np.ndarray, lengths: np.ndarray, shape: tuple[int, int]) -> None:
    """Validate 1-indexed runs; raise ValueError naming the first offending pair (0-based pair index)."""
    n_pixels = int(shape[0]) * int(shape[1])
    if (i := _first(starts < 1)) is not None:
        raise ValueError(f"RLE pair {i}: start {starts[i]} < 1 (starts are 1-indexed)")
    if (i := _first(lengths < 1)) is not None:
        raise ValueError(f"RLE pair {i}: length {lengths[i]} < 1")
    # compare before adding, so that huge values cannot overflow int64 into a negative end
    if (i := _first((starts > n_pixels) | (lengths > n_pixels - starts + 1))) is not None:
        raise ValueError(f"RLE pair {i}: run {starts[i]}+{lengths[i]} ends past the image end "
                         f"({n_pixels} pixels for shape {tuple(shape)})")
    # pair i + 1 starts before the last pixel (1-indexed) of pair i ends
    if (i := _first(starts[1:] <= starts[:-1] + lengths[:-1] - 1)) is not None:
        kind = "unsorted" if starts[i + 1] < starts[i] else "overlapping"
        raise ValueError(f"RLE pair {i + 1}: {kind} runs (start {starts[i + 1]} after run {starts[i]}+{lengths[i]})")


class MaskError(ValueError):
    """A malformed mask string in a list: ``index`` is its position in the list, ``problem`` what :func:`parse` said."""

    def __init__(self, index: int, problem: str):
        super().__init__(f"mask {index}: {problem}")
        self.index = index
        self.problem = problem


_CANONICAL_CHARS = str.maketrans("", "", "0123456789 \n")


def parse_many(rles, shape: tuple[int, int] = SHAPE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parse and validate many mask strings of one image at once (same rules and results as :func:`parse`).

    The common case (single spaces, ASCII digits) is parsed in one C call over the joined strings and validated with
    vectorised checks; anything else goes through :func:`parse` string by string, which names the problem.

    Args:
        rles: sequence of competition mask strings (empty, None or NaN = empty mask).
        shape: ``(height, width)``.

    Returns:
        ``(starts, lengths, counts)``: the runs of all masks concatenated (int64, 0-indexed starts, each mask's runs
        sorted) and ``counts`` int64 ``(len(rles),)``, the number of runs of each mask (0 for an empty mask).

    Raises:
        MaskError: (a ValueError) naming the position of the first malformed string and the problem.
    """
    rles = list(rles)
    fast = _parse_many_fast(rles, int(shape[0]) * int(shape[1]))
    if fast is not None:
        return fast
    runs = []
    for i, s in enumerate(rles):
        try:
            runs.append(parse(s, shape))
        except ValueError as exc:
            raise MaskError(i, str(exc)) from None
    empty = np.zeros(0, dtype=np.int64)
    return (np.concatenate([empty, *(st for st, _ in runs)]), np.concatenate([empty, *(ln for _, ln in runs)]),
            np.array([st.size for st, _ in runs], dtype=np.int64))


def _parse_many_fast(rles: list, n_pixels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """:func:`parse_many` for canonical, valid strings; None when any string needs the careful path."""
    if not all(type(s) is str for s in rles):
        return None
    joined = "\n".join(rles)
    # canonical: every non-empty string has exactly count(" ") + 1 tokens
    tokens = np.array([s.count(" ") + 1 if s else 0 for s in rles], dtype=np.int64)
    if (joined.translate(_CANONICAL_CHARS) or "  " in joined or " \n" in joined or "\n " in joined
            or joined.startswith(" ") or joined.endswith(" ") or (tokens % 2).any()):
        return None
    try:  # (fromstring reads a string of newlines as one 0)
        values = np.fromstring(joined, dtype=np.int64, sep=" ") if tokens.any() else np.zeros(0, dtype=np.int64)
    except (ValueError, AttributeError):
        return None
    if values.size != tokens.sum() or values.min(initial=1) < 1 or values.max(initial=1) > n_pixels:
        return None
    starts, lengths, counts = values[0::2] - 1, values[1::2], tokens // 2
    ends = starts + lengths  # exclusive, 0-indexed
    ordered = starts[1:] >= ends[:-1]
    first = np.cumsum(counts)[:-1]  # index of each mask's first run in the concatenation (after the first mask)
    ordered[first[(first > 0) & (first < starts.size)] - 1] = True  # runs of different masks are not compared
    return (starts, lengths, counts) if ends.max(initial=0) <= n_pixels and ordered.all() else None


def validate(rle: str, shape: tuple[int, int] = SHAPE) -> None:
    """Raise ValueError when ``rle`` is not a valid mask string for ``shape`` (see :func:`parse`)."""
    parse(rle, shape)


def runs_to_string(starts: np.ndarray, lengths: np.ndarray) -> str:
    """Format 0-indexed ``starts`` and ``lengths`` as a competition string (1-indexed)."""
    pairs = np.stack((np.asarray(starts) + 1, lengths), axis=1).astype(np.int64, copy=False)  # start, length, ...
    return " ".join(map(str, pairs.ravel().tolist()))


def runs_to_indices(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Flat 0-indexed row-major pixel indices covered by runs (sorted when the runs are), int64, shape ``(area,)``."""
    total = int(lengths.sum())
    offsets = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    return offsets + np.arange(total, dtype=np.int64)


def decode(rle: str, shape: tuple[int, int] = SHAPE) -> np.ndarray:
    """Decode a competition mask string.

    Args:
        rle: competition RLE (1-indexed, row-major); empty string for an empty mask.
        shape: ``(height, width)``.

    Returns:
        bool array of shape ``(height, width)``.
    """
    starts, lengths = parse(rle, shape)
    flat = np.zeros(int(shape[0]) * int(shape[1]), dtype=bool)
    flat[runs_to_indices(starts, lengths)] = True
    return flat.reshape(shape)


def encode_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of a 2-D mask, row-major: ``(starts, lengths)`` int64 with 0-indexed starts."""
    flat = np.asarray(mask, dtype=bool).ravel(order="C")
    if flat.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # first pixel after each value change
    if flat[0]:
        edges = np.concatenate(([0], edges))
    if flat[-1]:
        edges = np.concatenate((edges, [flat.size]))
    edges = edges.astype(np.int64, copy=False)
    return edges[0::2], edges[1::2] - edges[0::2]


def encode(mask: np.ndarray) -> str:
    """Encode a 2-D mask (any dtype, nonzero = inside) as a competition string (1-indexed, row-major).

    Returns ``""`` for an empty mask.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"encode expects a 2-D mask, got shape {mask.shape}")
    return runs_to_string(*encode_runs(mask))


def area(rle: str, shape: tuple[int, int] = SHAPE) -> int:
    """Number of pixels in a mask string (validated)."""
    return int(parse(rle, shape)[1].sum())


def to_coco(rle: str, shape: tuple[int, int] = SHAPE) -> dict:
    """Convert a competition string to a COCO compressed RLE (column-major, as pycocotools and detectron2 expect).

    Returns:
        ``{"size": [height, width], "counts": str}``: JSON-serialisable; ``pycocotools.mask.decode`` accepts it.
    """
    coco = mask_util.encode(np.asfortranarray(decode(rle, shape).astype(np.uint8)))
    return {"size": [int(shape[0]), int(shape[1])], "counts": coco["counts"].decode("ascii")}


def to_coco_many(runs: Sequence[tuple[np.ndarray, np.ndarray]], shape: tuple[int, int] = SHAPE) -> list[dict]:
    """Batch-convert the runs of several masks of one image to COCO compressed RLEs.

    Equal, string for string, to ``[to_coco(s, shape) for s in strings]`` (tested), but works on the
    runs' pixel indices instead of dense masks: the masks' pixels are transposed to column-major order in one
    vectorised sort, and pycocotools compresses the resulting counts. About 5-10x faster than the dense route.

    Args:
        runs: per mask ``(starts, lengths)`` as returned by :func:`parse` (0-indexed, row-major); each
            mask must be non-empty.
        shape: ``(height, width)``.

    Returns:
        One ``{"size": [height, width], "counts": str}`` per mask, in order.
    """
    if not runs:
        return []
    height, width = int(shape[0]), int(shape[1])
    n_pixels = height * width
    sizes = np.array([int(lengths.sum()) for _, lengths in runs], dtype=np.int64)
    if (sizes == 0).any():
        raise ValueError(f"to_coco_many: mask {int(np.flatnonzero(sizes == 0)[0])} is empty")
    flat = runs_to_indices(np.concatenate([r[0] for r in runs]), np.concatenate([r[1] for r in runs]))
    owner = np.repeat(np.arange(len(runs), dtype=np.int64), sizes)
    keys = np.sort(owner * n_pixels + (flat % width) * height + flat // width)  # column-major position, per mask
    breaks = np.flatnonzero((np.diff(keys) != 1) | (np.diff(keys // n_pixels) != 0)) + 1  # runs end at masks' ends
    run_owner, run_start = np.divmod(keys[np.concatenate(([0], breaks))], n_pixels)
    run_end = keys[np.concatenate((breaks - 1, [len(keys) - 1]))] % n_pixels + 1
    bounds = np.searchsorted(run_owner, np.arange(len(runs) + 1))
    uncompressed = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        edges = np.empty(2 * (b - a) + 2, dtype=np.int64)
        edges[0], edges[-1] = 0, n_pixels
        edges[1:-1:2], edges[2:-1:2] = run_start[a:b], run_end[a:b]
        counts = np.diff(edges)
        if counts[-1] == 0:  # mask reaches the last pixel: COCO ends on a foreground run
            counts = counts[:-1]
        uncompressed.append({"size": [height, width], "counts": counts.tolist()})
    compressed = mask_util.frPyObjects(uncompressed, height, width)
    return [{"size": [height, width], "counts": c["counts"].decode("ascii")} for c in compressed]


def coco_segmentation(segm, height: int, width: int) -> dict:
    """A detectron2 annotation's ``segmentation`` as a pycocotools RLE (what ``pycocotools.mask`` functions take).

    Args:
        segm: a COCO RLE dict (compressed ``str``/``bytes`` counts or uncompressed ``list`` counts) or a list of
            polygons (flat ``[x0, y0, x1, y1, ...]`` in pixels).
        height, width: the image size (used for uncompressed counts and polygons).

    Returns:
        ``{"size": [height, width], "counts": bytes}`` (column-major, as pycocotools encodes).
    """
    if isinstance(segm, dict):
        counts = segm["counts"]
        if isinstance(counts, list):
            return mask_util.frPyObjects(segm, height, width)
        return {"size": list(segm["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    polygons = [np.asarray(p, dtype=np.float64).ravel().tolist() for p in segm]
    return mask_util.merge(mask_util.frPyObjects(polygons, height, width))


def from_coco(coco_rle: dict) -> str:
    """Convert a COCO RLE (compressed or uncompressed counts) to a competition string."""
    h, w = coco_rle["size"]
    return encode(mask_util.decode(coco_segmentation(coco_rle, h, w)))


def transpose_runs(starts: np.ndarray, lengths: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The runs of a mask's transpose: runs numbered row-major in an ``(H, W)`` image become its column-major runs
    (and column-major runs, read with ``shape = (W, H)``, become row-major ones).

    Args:
        starts, lengths: 0-indexed sorted runs in an image of ``shape``.
        shape: ``(rows, columns)`` of the numbering the runs use.

    Returns:
        ``(starts, lengths)`` int64, sorted, in the transposed numbering (``x * rows + y``).
    """
    rows, cols = (int(v) for v in shape)
    y, x = np.divmod(runs_to_indices(np.asarray(starts, np.int64), np.asarray(lengths, np.int64)), cols)
    idx = np.sort(x * rows + y)
    if not idx.size:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    first = np.concatenate(([0], np.flatnonzero(np.diff(idx) != 1) + 1))
    return idx[first], np.diff(np.append(first, idx.size)).astype(np.int64)


def convert_order(rle: str, shape: tuple[int, int], source: str, target: str) -> str:
    """Re-number a mask string's pixels between ``"row"``-major (``y * W + x``) and ``"column"``-major (``x * H + y``).

    Args:
        rle: 1-indexed mask string in ``source`` order (validated against ``shape``).
        shape: ``(height, width)`` of the image.
        source, target: ``"row"`` or ``"column"``.

    Returns:
        The same mask as a 1-indexed string in ``target`` order (``rle`` itself, validated, when they are equal).
    """
    height, width = (int(v) for v in shape)
    numbering = (width, height) if source == "column" else (height, width)
    runs = parse(rle, numbering)
    return runs_to_string(*(runs if source == target else transpose_runs(*runs, numbering)))
