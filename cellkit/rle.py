"""The competition's run-length encoding, and the bridge to COCO RLE.

Conventions (checked on the real ``train.csv``): a mask string is space-separated ``start length`` pairs; starts are
**1-indexed**; pixels are numbered **row-major** (flat index = y * width + x). Runs are sorted and do not overlap.
Shapes are always ``(height, width)``, ``(520, 704)`` for Sartorius.

Everything in cellkit that reads or writes a mask string goes through this module.
"""
from __future__ import annotations

import numpy as np

from cellkit import SHAPE

__all__ = ["parse", "runs_to_string", "decode", "encode", "encode_runs", "to_coco", "from_coco", "area", "validate"]


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
    values = _fast_ints(rle, n_pixels)
    if values is None:  # something unusual: the slow path finds and names the problem
        values = _slow_ints(rle)
    if values.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy()
    starts, lengths = values[0::2], values[1::2]
    _check_runs(starts, lengths, shape)
    return starts - 1, lengths


def _fast_ints(rle: str, n_pixels: int) -> np.ndarray | None:
    """Tokens of ``rle`` as int64 through numpy's C text parser, or None when the slow path must decide.

    Returns None for anything outside the plain case (a token that is not an ASCII integer, an odd count, a value
    outside ``[1, n_pixels]``, which also catches int64 saturation), so that :func:`_slow_ints` and
    :func:`_check_runs` produce the exact error message.
    """
    if not rle or rle.isspace():
        return np.zeros(0, dtype=np.int64)
    try:
        values = np.fromstring(rle, dtype=np.int64, sep=" ")
    except (ValueError, AttributeError):  # AttributeError: a numpy without text-mode fromstring
        return None
    if values.size % 2 or values.min() < 1 or values.max() > n_pixels:
        return None
    return values


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


def _check_runs(starts: np.ndarray, lengths: np.ndarray, shape: tuple[int, int]) -> None:
    """Validate 1-indexed runs; raise ValueError naming the first offending pair (0-based pair index)."""
    n_pixels = int(shape[0]) * int(shape[1])
    if (starts.size and starts.min() >= 1 and lengths.min() >= 1 and starts.max() <= n_pixels
            and lengths.max() <= n_pixels):  # fast accept when sorted, disjoint and inside the image
        ends = starts + (lengths - 1)  # no overflow: every value is bounded by n_pixels
        if ends[-1] <= n_pixels and bool(np.all(starts[1:] > ends[:-1])):
            return
    bad = np.flatnonzero(starts < 1)
    if bad.size:
        i = bad[0]
        raise ValueError(f"RLE pair {i}: start {starts[i]} < 1 (starts are 1-indexed)")
    bad = np.flatnonzero(lengths < 1)
    if bad.size:
        i = bad[0]
        raise ValueError(f"RLE pair {i}: length {lengths[i]} < 1")
    # compare before adding, so that huge values cannot overflow int64 into a negative end
    bad = np.flatnonzero((starts > n_pixels) | (lengths > n_pixels - starts + 1))
    if bad.size:
        i = bad[0]
        raise ValueError(f"RLE pair {i}: run {starts[i]}+{lengths[i]} ends past the image end "
                         f"({n_pixels} pixels for shape {tuple(shape)})")
    ends = starts + lengths - 1  # last pixel of each run, 1-indexed
    bad = np.flatnonzero(starts[1:] <= ends[:-1])
    if bad.size:
        i = bad[0] + 1
        kind = "unsorted" if starts[i] < starts[i - 1] else "overlapping"
        raise ValueError(f"RLE pair {i}: {kind} runs (start {starts[i]} after run {starts[i - 1]}+{lengths[i - 1]})")


def validate(rle: str, shape: tuple[int, int] = SHAPE) -> None:
    """Raise ValueError when ``rle`` is not a valid mask string for ``shape`` (see :func:`parse`)."""
    parse(rle, shape)


def runs_to_string(starts: np.ndarray, lengths: np.ndarray) -> str:
    """Format 0-indexed ``starts`` and ``lengths`` as a competition string (1-indexed)."""
    pairs = np.empty(2 * len(starts), dtype=np.int64)
    pairs[0::2] = np.asarray(starts) + 1
    pairs[1::2] = lengths
    return " ".join(map(str, pairs.tolist()))


def runs_to_indices(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Flat 0-indexed row-major pixel indices covered by runs (sorted when the runs are), int64, shape ``(area,)``."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
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
    flat = np.asarray(mask, dtype=bool).ravel(order="C").view(np.int8)
    edges = np.flatnonzero(np.diff(flat, prepend=np.int8(0), append=np.int8(0)))
    return edges[0::2].astype(np.int64), (edges[1::2] - edges[0::2]).astype(np.int64)


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
    from pycocotools import mask as mask_util

    coco = mask_util.encode(np.asfortranarray(decode(rle, shape).astype(np.uint8)))
    return {"size": [int(shape[0]), int(shape[1])], "counts": coco["counts"].decode("ascii")}


def from_coco(coco_rle: dict) -> str:
    """Convert a COCO RLE (compressed or uncompressed counts) to a competition string."""
    from pycocotools import mask as mask_util

    h, w = coco_rle["size"]
    counts = coco_rle["counts"]
    if isinstance(counts, list):
        coco_rle = mask_util.frPyObjects(coco_rle, h, w)
    elif isinstance(counts, str):
        coco_rle = {"size": [h, w], "counts": counts.encode("ascii")}
    return encode(mask_util.decode(coco_rle))
