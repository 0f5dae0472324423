"""Writing and validating the competition's ``submission.csv``.

Format: a header ``id,predicted``, then one row per predicted cell: the image id (file stem of the test image) and
its mask as a competition RLE string (see :mod:`cellkit.rle`: 1-indexed, row-major). An image without any cell is
listed once with an empty ``predicted``. Masks of one image must not overlap, and every test image must be listed.
Another dataset's submission (:mod:`cellkit.schema`) may name its two columns otherwise and number pixels
column-major (``rle_order="column"``); writing and checking take both as arguments.

:func:`write_coco_results` writes the same kept masks as a COCO results json, for scoring elsewhere.

Overlaps are found on runs, never on dense masks (:func:`overlapping_pairs`, by :mod:`cellkit.geometry`).

Problem lines of :func:`validate_submission` name the CSV **line number, 1-based, counting the header as line 1**
(the number an editor shows), then the image id, e.g. ``line 7: id 7ae19de7bc2a: bad RLE: ...``.
"""
import csv
import io
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cellkit import SHAPE, atomic, geometry, rle
from cellkit.metric import column_to_row

__all__ = [
    "HEADER", "IMAGE_SUFFIXES", "write_submission", "overlapping_pairs", "image_sizes", "check_store_ids",
    "SubmissionReport", "check_submission", "validate_submission", "write_coco_results", "read_submission",
]

#: The submission's columns.
HEADER = ("id", "predicted")

#: Files of an image directory that count as images (their stem is the image id).
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")

_UNBOUNDED = (1, 2 ** 62)  # shape for parsing an RLE's syntax without a bounds check


def overlapping_pairs(runs: list[tuple[np.ndarray, np.ndarray]], shape: tuple[int, int] | None = None
                      ) -> list[tuple[int, int, int]]:
    """Every pair of masks that share pixels, from their runs (:func:`cellkit.geometry.overlapping_pairs`).

    Args:
        runs: one ``(starts, lengths)`` per mask (int64, 0-indexed flat starts, as :func:`cellkit.rle.parse` and
            :func:`cellkit.rle.encode_runs` return); the runs of one mask must not overlap each other.
        shape: ``(height, width)`` of the image (its rows narrow the candidate pairs); None reads the flat indices
            as one row.

    Returns:
        ``(i, j, n_pixels)`` for each pair of masks ``i < j`` that overlap, with the number of shared pixels,
        sorted by ``(i, j)``. Empty when no two masks overlap.
    """
    if len(runs) < 2:
        return []
    if shape is None:
        shape = (1, max((int(s[-1] + n[-1]) for s, n in runs if len(s)), default=1))
    i, j, inter, _ = geometry.overlapping_pairs(geometry.MaskRuns.from_runs(runs, shape))
    return list(zip(i.tolist(), j.tolist(), inter.astype(np.int64).tolist()))


def _mask_runs(mask, shape: tuple[int, int], where: str) -> tuple[np.ndarray, np.ndarray]:
    """Runs of one submitted mask (RLE string or 2-D array); ValueError prefixed with ``where``."""
    if isinstance(mask, str):
        try:
            return rle.parse(mask, shape)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"{where}: expected an RLE string or a 2-D mask, got {type(mask).__name__} "
                         f"of shape {arr.shape}")
    if arr.shape != tuple(shape):
        raise ValueError(f"{where}: mask shape {arr.shape} != image shape {tuple(shape)} (out of bounds)")
    return rle.encode_runs(arr)


def _check_id(image_id) -> str:
    image_id = str(image_id)
    if not image_id or any(c in image_id for c in ",\r\n\"") or image_id != image_id.strip():
        raise ValueError(f"image id {image_id!r} is not a valid submission id")
    return image_id


def _as_mapping(rows_or_dict) -> dict[str, list]:
    """``{id: [mask, ...]}`` from a mapping or from ``(id, mask)`` rows (``None``/``""`` = no cell)."""
    if isinstance(rows_or_dict, Mapping):
        return {str(k): [] if v is None else list(v) for k, v in rows_or_dict.items()}
    grouped: dict[str, list] = {}
    for n, row in enumerate(rows_or_dict):
        try:
            image_id, mask = row
        except (TypeError, ValueError):
            raise ValueError(f"submission row {n}: expected an (image_id, mask) pair") from None
        masks = grouped.setdefault(str(image_id), [])
        if mask is not None:
            masks.append(mask)
    return grouped


def write_submission(rows_or_dict, image_ids: Iterable[str], path, shape=SHAPE, header=HEADER,
                     rle_order: str = "row") -> Path:
    """Check and write a submission CSV atomically.

    Args:
        rows_or_dict: ``{image_id: [mask, ...]}`` or an iterable of ``(image_id, mask)`` rows. A mask is a
            competition RLE string or a 2-D array (nonzero = cell) of the image's shape. Masks without pixels are
            dropped (an empty ``predicted`` means "no cell", not an empty cell).
        image_ids: every test image, in output order. Each gets its rows; an image without masks gets one row
            with an empty ``predicted``.
        path: the CSV to write (its directory must exist).
        shape: ``(height, width)`` of every image, or a mapping ``image_id -> (height, width)``.
        header: the two column names; rle_order: ``"row"`` or ``"column"``, the written strings' pixel order (masks
            given as strings are row-major).

    Returns:
        ``path`` as a Path.

    Raises:
        ValueError: naming the image id and 0-based mask index: a bad RLE, a mask out of the image's bounds, two
            masks of one image that overlap; also an id not in ``image_ids``, or a duplicated image id. Nothing is
            written then; an error while writing leaves no file (and any previous file untouched).
    """
    ids = [_check_id(i) for i in image_ids]
    dup = sorted(i for i, n in Counter(ids).items() if n > 1)
    if dup:
        raise ValueError(f"write_submission: image ids listed more than once: {dup[:5]}")
    masks_by_id = _as_mapping(rows_or_dict)
    unknown = sorted(set(masks_by_id) - set(ids))
    if unknown:
        raise ValueError(f"write_submission: predictions for {len(unknown)} image(s) not in image_ids, e.g. "
                         f"{unknown[:5]}")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for image_id in ids:
        image_shape = tuple(shape[image_id]) if isinstance(shape, Mapping) else tuple(shape)
        runs = [_mask_runs(m, image_shape, f"image {image_id} mask {i}")
                for i, m in enumerate(masks_by_id.get(image_id, []))]
        index = [i for i, r in enumerate(runs) if len(r[0])]
        runs = [runs[i] for i in index]
        pairs = overlapping_pairs(runs, image_shape)
        if pairs:
            i, j, n = pairs[0]
            raise ValueError(f"image {image_id}: masks {index[i]} and {index[j]} overlap by {n} pixels "
                             f"({len(pairs)} overlapping pair(s) in this image)")
        # an image without masks gets one row with an empty predicted
        if rle_order == "column":
            runs = [rle.transpose_runs(starts, lengths, image_shape) for starts, lengths in runs]
        writer.writerows([(image_id, rle.runs_to_string(starts, lengths)) for starts, lengths in runs]
                         or [(image_id, "")])
    return atomic.write_text(path, buf.getvalue())


def image_sizes(image_dir) -> dict[str, tuple[int, int]]:
    """``{image id: (height, width)}`` for the images of a directory, each decoded completely
    (:func:`cellkit.data.open_image`), so that a broken test image is found here, naming it.

    Ids are file stems of files ending in :data:`IMAGE_SUFFIXES` (case-insensitive).

    Raises:
        FileNotFoundError: the directory does not exist.
        ValueError: it holds no image, two images share a stem, or an image is unreadable, truncated or not 8-bit
            (naming it).
    """
    from cellkit.data import open_image

    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir}: image directory does not exist")
    sizes: dict[str, tuple[int, int]] = {}
    seen: dict[str, Path] = {}
    for p in sorted(image_dir.iterdir()):
        if p.suffix.lower() not in IMAGE_SUFFIXES or not p.is_file():
            continue
        if p.stem in seen:
            raise ValueError(f"{image_dir}: two images with id {p.stem!r}: {seen[p.stem].name}, {p.name}")
        width, height = open_image(p, sixteen_bit=True).size  # decoded completely: a truncated image is an error
        seen[p.stem] = p
        sizes[p.stem] = (int(height), int(width))
    if not sizes:
        raise ValueError(f"{image_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return sizes


def check_store_ids(ids, sizes: Mapping, pred_dir, image_dir) -> None:
    """Check that a predictions store (``pred_dir``, its image ids ``ids``) holds exactly the images of ``image_dir``
    (``sizes``, from :func:`image_sizes`).

    Raises:
        ValueError: predictions of images not in ``image_dir``, or images without predictions (naming up to 5).
    """
    unknown = sorted(set(ids) - set(sizes))
    if unknown:
        raise ValueError(f"{pred_dir}: predictions for {len(unknown)} image(s) not in {image_dir}, e.g. {unknown[:5]}")
    missing = sorted(set(sizes) - set(ids))
    if missing:
        raise ValueError(f"{pred_dir}: no predictions for {len(missing)} image(s) of {image_dir}, e.g. {missing[:5]}")


@dataclass
class SubmissionReport:
    """Result of :func:`check_submission`: the problem lines and counts of what was read."""

    problems: list[str] = field(default_factory=list)
    n_rows: int = 0  # data rows (header excluded)
    n_masks: int = 0  # rows with a non-empty predicted
    n_images: int = 0  # images in the image directory
    n_empty_images: int = 0  # listed images whose rows are all empty

    @property
    def ok(self) -> bool:
        return not self.problems


def check_submission(csv_path, image_dir, header=HEADER, rle_order: str = "row") -> SubmissionReport:
    """Validate a submission CSV against a directory of test images.

    ``header`` and ``rle_order`` are the dataset's (:mod:`cellkit.schema`; default Sartorius': ``id,predicted``,
    row-major).

    Checks, each reported as one line naming the 1-based CSV line (header = line 1) and the id: bad header, a
    row without exactly 2 fields, unknown id (no image of that id), bad RLE (the message of
    :func:`cellkit.rle.parse`), out of bounds (a run past the end of that image), overlapping masks of one image
    (one line per pair, naming both lines), and missing ids (an image with no row; line 0 = not in the file).

    Raises:
        FileNotFoundError: the CSV or the image directory does not exist.
        ValueError: the image directory is unusable (see :func:`image_sizes`) or the CSV is not UTF-8 text.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: no such submission file")
    sizes = image_sizes(image_dir)
    if rle_order == "column":  # column-major runs of an (H, W) image are row-major runs of its (W, H) transpose
        sizes = {k: (w, h) for k, (h, w) in sizes.items()}
    report = SubmissionReport(n_images=len(sizes))
    runs_by_id: dict[str, list[tuple[int, tuple[np.ndarray, np.ndarray]]]] = {}
    listed: set[str] = set()
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            _check_rows(csv.reader(fh), sizes, report, runs_by_id, listed, tuple(header))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{csv_path}: not UTF-8 text ({exc})") from None
    for image_id, items in runs_by_id.items():
        for i, j, n in overlapping_pairs([r for _, r in items], sizes[image_id]):
            report.problems.append(f"line {items[i][0]}: id {image_id}: mask overlaps the mask of line "
                                   f"{items[j][0]} by {n} pixels")
    report.n_empty_images = len(listed - set(runs_by_id))
    report.problems.sort(key=lambda p: int(p.split(":", 1)[0].split()[1]))  # by line number (stable)
    for image_id in sorted(set(sizes) - listed):
        report.problems.append(f"line 0: id {image_id}: missing id: image in {image_dir} has no row "
                               f"(list it with an empty predicted when it has no cell)")
    return report


def _check_rows(reader, sizes, report: SubmissionReport, runs_by_id: dict, listed: set, expected=HEADER) -> None:
    """Check the header and every data row; fill ``report``, ``runs_by_id`` (line, runs) and ``listed``."""
    header = next(reader, None)
    if header is None:
        report.problems.append(f"line 1: bad header: the file is empty (expected '{','.join(expected)}')")
        return
    if [h.strip() for h in header] != list(expected):
        report.problems.append(f"line 1: bad header {','.join(header)!r} (expected '{','.join(expected)}')")
        if len(header) != 2:
            return  # columns unknown: the rows cannot be interpreted
    for row in reader:
        line = reader.line_num
        if not row:
            continue  # a blank line
        report.n_rows += 1
        if len(row) != 2:
            if row[0].strip() in sizes:
                listed.add(row[0].strip())  # listed, though unreadable: not also "missing"
            report.problems.append(f"line {line}: id {row[0]}: expected 2 fields ({','.join(expected)}), got "
                                   f"{len(row)}")
            continue
        image_id, predicted = row[0].strip(), row[1]
        if image_id not in sizes:
            report.problems.append(f"line {line}: id {image_id}: unknown id (no image of that id)")
            continue
        listed.add(image_id)
        if not predicted.strip():
            continue
        problem, runs = _check_rle(predicted, sizes[image_id])
        if problem:
            report.problems.append(f"line {line}: id {image_id}: {problem}")
            continue
        report.n_masks += 1
        runs_by_id.setdefault(image_id, []).append((line, runs))


def _check_rle(predicted: str, shape: tuple[int, int]) -> tuple[str | None, tuple | None]:
    """``(problem, None)`` for a bad or out-of-bounds mask string, else ``(None, runs)``."""
    try:
        starts, lengths = rle.parse(predicted, _UNBOUNDED)
    except ValueError as exc:
        return f"bad RLE: {exc}", None
    n_pixels = shape[0] * shape[1]
    ends = starts + lengths  # 0-indexed, exclusive
    if (ends > n_pixels).any():
        i = int(np.argmax(ends > n_pixels))
        return (f"out of bounds: RLE pair {i} (run {starts[i] + 1}+{lengths[i]}) ends at pixel {ends[i]} past the "
                f"image end ({n_pixels} pixels for height x width {shape[0]}x{shape[1]})"), None
    return None, (starts, lengths)


def validate_submission(csv_path, image_dir, header=HEADER, rle_order: str = "row") -> list[str]:
    """Problem lines of a submission CSV checked against a directory of test images; empty when valid.

    Each line names the 1-based CSV line number (the header is line 1; 0 for an image with no row) and the image
    id. See :func:`check_submission` for the checks and the errors raised.
    """
    return check_submission(csv_path, image_dir, header, rle_order).problems


def read_submission(csv_path, image_dir, header=HEADER, rle_order: str = "row"):
    """A submission as the kit's tools read it: a DataFrame ``id, predicted`` of row-major strings (a column-major
    one converted with each image's size from ``image_dir``), empty ``predicted`` kept as ``""``."""
    import pandas as pd

    frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False).rename(
        columns={header[0]: "id", header[1]: "predicted"})
    if rle_order == "column":  # errors name the CSV line (the header is line 1)
        frame["predicted"] = column_to_row(frame.set_axis(pd.RangeIndex(2, len(frame) + 2)), image_sizes(image_dir),
                                           str(csv_path))
    return frame


def write_coco_results(items: Iterable[tuple], path, image_ids: Mapping[str, int] | None = None) -> Path:
    """Write kept masks as a COCO results json (``COCO.loadRes`` input), atomically.

    Args:
        items: ``(image id, KeptMasks, class ids)`` per image: the masks kept by
            :func:`cellkit.postprocess.apply_predictions` and the detector's class id of each (written as
            ``category_id = class + 1``, COCO's 1-based ids in the dataset's class order).
        path: the json to write.
        image_ids: image id -> COCO image id (e.g. from the dataset's own json); default: the id itself.

    Returns:
        ``path`` as a Path; the file is a list of ``{"image_id", "category_id", "segmentation" (compressed RLE,
        ``counts`` as str), "score"}``.
    """
    import json

    results = []
    for image_id, kept, classes in items:
        segms = rle.to_coco_many(kept.runs(), (kept.height, kept.width))
        results += [{"image_id": image_ids[image_id] if image_ids else image_id, "category_id": int(c) + 1,
                     "segmentation": segm, "score": round(float(score), 6)}
                    for c, score, segm in zip(classes, kept.scores, segms)]
    return atomic.write_text(path, json.dumps(results))
