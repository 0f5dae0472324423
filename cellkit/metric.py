"""The competition metric: mean average precision over IoU thresholds 0.50, 0.55, ..., 0.95.

Definition (exactly the Sartorius leaderboard metric): for one image and one threshold ``t``, a (prediction, truth)
pair matches when ``IoU > t`` (strictly). TP is the size of a maximum one-to-one matching of that match graph (truth
masks of this data overlap, so greedy matching is not always maximal), ``FP = n_pred - TP``, ``FN = n_truth - TP`` and
``precision(t) = TP / (TP + FP + FN)``, 1.0 for an image with neither predictions nor truths. The image score is the
mean over the ten thresholds; the dataset score is the mean over every image of the truth file, where an image without
predictions scores 0 unless it has no truth either.

Speed and memory: an image's masks are parsed in one batch (:func:`cellkit.rle.parse_many`) into runs
(:class:`cellkit.geometry.MaskRuns`); intersections come from the runs of the pairs whose boxes overlap
(:func:`cellkit.geometry.overlapping_pairs`), so the cost grows with the runs, never with
``n_pred x n_truth x H x W``; only the non-zero IoU pairs are kept, and TP comes from a maximum bipartite matching on
that sparse graph. :func:`score_frames` streams image by image, so peak memory is one image's masks.
"""
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.sparse.csgraph import maximum_bipartite_matching

from cellkit import CELL_TYPES, SHAPE, geometry, rle
from cellkit.geometry import MaskRuns
from cellkit.schema import DatasetSchema, schema_of

__all__ = ["THRESHOLDS", "iou_from_indices", "precision_per_threshold", "score_sets", "score_image",
           "score_masks", "score_frames", "read_csv", "score_csv", "column_to_row"]

#: The ten IoU thresholds 0.50, 0.55, ..., 0.95 (float64, each the nearest double to its decimal).
THRESHOLDS = np.round(np.linspace(0.5, 0.95, 10), 2)


# ---------------------------------------------------------------------------------------------------------- images
def iou_from_indices(pred: Sequence[np.ndarray], truth: Sequence[np.ndarray]) -> np.ndarray:
    """IoU matrix of predicted and true masks given as flat pixel indices.

    Args:
        pred: one flat int64 index array per predicted mask (as from :func:`cellkit.rle.runs_to_indices`; any
            flattening works if it is the same for both lists).
        truth: the same for the true masks.

    Returns:
        float64 array ``(len(pred), len(truth))`` (an empty mask has IoU 0 with everything), by
        :func:`cellkit.geometry.iou_matrix` (the indices are read as one image row).
    """
    width = 1 + max((int(np.max(m)) for m in (*pred, *truth) if np.size(m)), default=0)
    return geometry.iou_matrix(MaskRuns.from_indices(pred, (1, width)), MaskRuns.from_indices(truth, (1, width)))


def _precision_from_pairs(rows: np.ndarray, cols: np.ndarray, iou: np.ndarray, n_pred: int, n_truth: int,
                          shape: tuple[int, int]) -> np.ndarray:
    """Precision at each of :data:`THRESHOLDS` from the nonzero IoU pairs of one image; float64 ``(10,)``.

    ``n_pred``/``n_truth`` count the non-empty masks; ``shape`` is that of the pair matrix (empty masks included).
    """
    if n_pred == 0 and n_truth == 0:
        return np.ones(len(THRESHOLDS))
    tp = np.zeros(len(THRESHOLDS))
    for k, t in enumerate(THRESHOLDS):
        match = iou > t
        if not match.any():
            break  # higher thresholds match even fewer pairs
        r, c = rows[match], cols[match]
        if np.bincount(r).max() == 1 and np.bincount(c).max() == 1:
            tp[k] = r.size  # the match graph is already a matching
        else:
            graph = sparse.csr_matrix((np.ones(r.size, dtype=np.int8), (r, c)), shape=shape)
            tp[k] = np.count_nonzero(maximum_bipartite_matching(graph, perm_type="column") >= 0)
    return tp / (n_pred + n_truth - tp)


def precision_per_threshold(iou) -> np.ndarray:
    """Precision ``TP / (TP + FP + FN)`` at each of :data:`THRESHOLDS` for one image.

    Args:
        iou: ``(n_pred, n_truth)`` IoU matrix, dense ndarray or scipy sparse (absent entries = 0).

    Returns:
        float64 ``(10,)``. A pair matches when ``IoU > t``; TP is the size of a maximum one-to-one matching;
        all ones when ``n_pred == n_truth == 0``.
    """
    n_pred, n_truth = iou.shape
    coo = sparse.coo_matrix(iou if sparse.issparse(iou) else np.asarray(iou, dtype=np.float64))
    return _precision_from_pairs(coo.row.astype(np.int64), coo.col.astype(np.int64), coo.data.astype(np.float64),
                                 n_pred, n_truth, (n_pred, n_truth))


def score_sets(pred: MaskRuns, truth: MaskRuns) -> np.ndarray:
    """Precision at each threshold, float64 ``(10,)``, for one image's predicted and true masks (empty masks are no
    masks)."""
    i, j, _, iou = geometry.overlapping_pairs(pred, truth)
    return _precision_from_pairs(i, j, iou, pred.n_nonempty, truth.n_nonempty, (len(pred), len(truth)))


def score_image(pred_rles: Sequence[str], truth_rles: Sequence[str], shape: tuple[int, int] = SHAPE) -> np.ndarray:
    """Precision at each threshold for one image given competition mask strings.

    Args:
        pred_rles: predicted masks (competition RLE); empty strings mean "no cell" and are ignored.
        truth_rles: true masks, same format.
        shape: ``(height, width)`` of the image.

    Returns:
        float64 ``(10,)``; its mean is the image score.

    Raises:
        ValueError: a malformed string (:class:`cellkit.rle.MaskError`, naming its position in its list).
    """
    return score_sets(MaskRuns.from_rles(pred_rles, shape), MaskRuns.from_rles(truth_rles, shape))


def score_masks(pred_masks, truth, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Precision at each threshold for one image with predicted masks as arrays (for evaluators).

    Args:
        pred_masks: sequence of ``(H, W)`` masks or an ``(N, H, W)`` array (nonzero = inside; empty masks ignored).
        truth: the true masks as the same kind of arrays, or as competition mask strings.
        shape: ``(H, W)`` used to decode string truths; defaults to the shape of the predicted masks, else SHAPE.

    Returns:
        float64 ``(10,)``.
    """
    if not isinstance(truth, np.ndarray):
        truth = list(truth)
    if len(truth) and isinstance(truth[0], str):
        if shape is None:
            shape = tuple(np.shape(pred_masks[0])) if len(pred_masks) else SHAPE
        truth_set = MaskRuns.from_rles(truth, shape)
    else:
        truth_set = MaskRuns.from_masks(truth)
    return score_sets(MaskRuns.from_masks(pred_masks), truth_set)


# ---------------------------------------------------------------------------------------------------------- frames
def _mask_column(frame: pd.DataFrame, preferred: str, other: str, role: str) -> str:
    for column in (preferred, other):
        if column in frame.columns:
            return column
    raise ValueError(f"{role} has no {preferred!r} (or {other!r}) column; columns: {list(frame.columns)}")


def _image_shape(truth: pd.DataFrame, positions: np.ndarray, image_id: str, where: str) -> tuple[int, int]:
    if "width" not in truth.columns or "height" not in truth.columns:
        return SHAPE
    heights = truth["height"].to_numpy()[positions]
    widths = truth["width"].to_numpy()[positions]
    try:
        h, w = int(heights[0]), int(widths[0])
    except (TypeError, ValueError):
        raise ValueError(f"{where} {truth.index[positions[0]]}, id {image_id}: width/height "
                         f"{widths[0]!r}/{heights[0]!r} are not integers") from None
    if (heights != heights[0]).any() or (widths != widths[0]).any() or h < 1 or w < 1:
        raise ValueError(f"{where}s of id {image_id}: inconsistent or invalid width/height "
                         f"(heights {sorted(set(heights.tolist()))}, widths {sorted(set(widths.tolist()))})")
    return h, w


def _mask_set(frame: pd.DataFrame, column: str, positions: np.ndarray, shape: tuple[int, int], image_id: str,
              where: str) -> MaskRuns:
    values = frame[column].to_numpy()[positions]
    try:
        return MaskRuns.from_rles(values, shape)
    except rle.MaskError as exc:
        raise ValueError(f"{where} {frame.index[positions[exc.index]]}, id {image_id}: {exc.problem}") from None


def score_frames(truth: pd.DataFrame, pred: pd.DataFrame, progress: bool = False, truth_name: str = "truth",
                 pred_name: str = "predictions", row_label: str = "row", groups=CELL_TYPES) -> dict:
    """Score predictions against truth, image by image.

    Args:
        truth: one row per true mask: ``id``, ``annotation`` (or ``predicted``), optional ``width``/``height``
            (else :data:`cellkit.SHAPE`) and ``cell_type``. An image with an empty annotation has no cell.
            The index labels rows in error messages (:func:`read_csv` sets it to the CSV line number).
        pred: one row per predicted mask: ``id``, ``predicted`` (or ``annotation``); empty = no cell.
        progress: show a tqdm bar on stderr.
        truth_name, pred_name, row_label: how error messages name the frames and their rows, e.g.
            ``"train.csv line 12, id 0a1b: RLE pair 3: ..."``.
        groups: the ``per_class`` keys (the values of the truth's ``cell_type``: its classes, or the dataset's groups
            written there, :func:`score_csv`).

    Returns:
        ``{"mAP": float, "per_class": {cell type: float or None}, "per_threshold": [10 floats], "n_images": int,
        "per_image": DataFrame(id, cell_type, score, n_truth, n_pred)}``, images in order of first appearance in
        ``truth``. ``per_class`` is None for a class without images (all None without a ``cell_type`` column).

    Raises:
        ValueError: a missing column, a prediction for an id absent from the truth, or a malformed mask (naming the
            frame, row and id).
    """
    truth_col = _mask_column(truth, "annotation", "predicted", truth_name)
    pred_col = _mask_column(pred, "predicted", "annotation", pred_name)
    truth_where, pred_where = f"{truth_name} {row_label}", f"{pred_name} {row_label}"
    for frame, role in ((truth, truth_name), (pred, pred_name)):
        if "id" not in frame.columns:
            raise ValueError(f"{role} has no 'id' column; columns: {list(frame.columns)}")
    truth_groups = truth.groupby(truth["id"].astype(str).to_numpy(), sort=False).indices
    pred_groups = pred.groupby(pred["id"].astype(str).to_numpy(), sort=False).indices
    unknown = [i for i in pred_groups if i not in truth_groups]
    if unknown:
        row = pred.index[pred_groups[unknown[0]][0]]
        raise ValueError(f"{pred_where} {row}: id {unknown[0]!r} is not in {truth_name}"
                         + (f" (and {len(unknown) - 1} more unknown ids)" if len(unknown) > 1 else ""))
    from tqdm import tqdm

    records, per_threshold = [], []
    for image_id in tqdm(truth_groups, desc="score", unit="image", disable=not progress):
        t_pos = truth_groups[image_id]
        shape = _image_shape(truth, t_pos, image_id, truth_where)
        t_set = _mask_set(truth, truth_col, t_pos, shape, image_id, truth_where)
        p_set = _mask_set(pred, pred_col, pred_groups.get(image_id, np.zeros(0, dtype=np.int64)), shape, image_id,
                          pred_where)
        precision = score_sets(p_set, t_set)
        per_threshold.append(precision)
        records.append((image_id, str(truth["cell_type"].iat[t_pos[0]]) if "cell_type" in truth.columns else None,
                        float(precision.mean()), t_set.n_nonempty, p_set.n_nonempty))
    per_image = pd.DataFrame.from_records(records, columns=["id", "cell_type", "score", "n_truth", "n_pred"])
    per_threshold = np.mean(per_threshold, axis=0) if per_threshold else np.full(len(THRESHOLDS), np.nan)
    by_class = {cell_type: per_image.loc[per_image["cell_type"] == cell_type, "score"] for cell_type in groups}
    return {
        "mAP": float(per_image["score"].mean()) if len(per_image) else float("nan"),
        "per_class": {cell_type: float(s.mean()) if len(s) else None for cell_type, s in by_class.items()},
        "per_threshold": [float(x) for x in per_threshold],
        "n_images": int(len(per_image)),
        "per_image": per_image,
    }


def read_csv(path, role: str, columns: tuple[str, str] = ("id", "predicted")) -> pd.DataFrame:
    """Read a truth or submission CSV for scoring: ids as str, empty masks as ``""``, index = CSV line number.

    Args:
        path: the CSV file.
        role: ``"truth"`` or ``"predictions"``, only for messages.
        columns: the file's id and mask-string columns when they are named otherwise (a dataset's submission,
            :mod:`cellkit.schema`): renamed to ``id`` and ``predicted``.

    Raises:
        FileNotFoundError: no such file. ValueError: unreadable CSV or no ``id`` column, naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{role} file not found: {path}")
    try:
        frame = pd.read_csv(path, dtype={columns[0]: str}, keep_default_na=False, na_values={"width": [""],
                                                                                              "height": [""]})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read as CSV: {exc}") from None
    if tuple(columns) != ("id", "predicted"):
        if columns[0] not in frame.columns or columns[1] not in frame.columns:
            raise ValueError(f"{path}: expected the columns {columns[0]}, {columns[1]}; columns: {list(frame.columns)}")
        frame = frame.rename(columns={columns[0]: "id", columns[1]: "predicted"})
    if "id" not in frame.columns:
        raise ValueError(f"{path}: no 'id' column; columns: {list(frame.columns)}")
    frame.index = pd.RangeIndex(2, len(frame) + 2, name="line")  # line 1 is the header
    return frame


def score_csv(truth_path, pred_path, progress: bool = False, schema: DatasetSchema | None = None) -> dict:
    """:func:`score_frames` on two CSV files; errors name the file and the CSV line.

    ``schema`` (default: the ``dataset.json`` beside the truth, else Sartorius) names the submission's columns, its
    RLE order and the groups of ``per_class`` (with ``group_by="pattern"`` each image's from its id).
    """
    schema = schema or schema_of(Path(truth_path).parent)
    truth, pred = read_csv(truth_path, "truth"), read_csv(pred_path, "predictions", schema.submission_columns)
    if schema.rle_order == "column":
        first = truth.drop_duplicates("id")
        sizes = dict(zip(first["id"].astype(str), zip(first["height"].astype(int), first["width"].astype(int))))
        pred = pred.assign(predicted=column_to_row(pred, sizes, str(pred_path)))
    if schema.group_by == "pattern":
        truth = truth.assign(cell_type=[schema.image_group(i) for i in truth["id"].astype(str)])
    return score_frames(truth, pred, progress=progress, truth_name=str(truth_path), pred_name=str(pred_path),
                        row_label="line", groups=schema.groups)


def column_to_row(pred: pd.DataFrame, sizes, where: str) -> list[str]:
    """A column-major submission's mask strings (``pred``: ``id, predicted``, index = line labels), row-major.

    Args:
        sizes: image id -> ``(height, width)``; an id without a size (which scoring names) and an empty string are
            passed through.
        where: how errors name the file (``"<where> line <label>, id <id>: ..."``).
    """
    out = []
    for line, image_id, text in zip(pred.index, pred["id"].astype(str), pred["predicted"]):
        shape = sizes.get(image_id)
        if not str(text).strip() or shape is None:
            out.append(text)
            continue
        try:
            out.append(rle.convert_order(text, shape, "column", "row"))
        except ValueError as exc:
            raise ValueError(f"{where} line {line}, id {image_id}: {exc}") from None
    return out
