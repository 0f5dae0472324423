"""Class-wise post-processing of instance predictions, in the seed's order.

Per image, from instance predictions (class, score, probability mask) and per-class thresholds
``{cell type: {"score": s, "mask": m, "min_area": a}}``:

1. drop instances whose score is under their class's ``score`` threshold (kept when ``score >= s``);
2. binarise each probability mask at its class's ``mask`` threshold (a pixel is kept when ``prob >= m``);
3. remove overlaps: in descending score order (ties: lower input index first) each mask keeps only the pixels that
   higher-scoring masks have not taken (an occupancy map over the image);
4. drop masks whose remaining area is under their class's ``min_area`` (masks left with no pixel are always dropped:
   an empty ``predicted`` means "no cell" in a submission).

Steps 3 and 4 run together, one mask at a time in that order. Whether a mask dropped in step 4 has taken its pixels
is the option ``free_dropped`` below: by default (the seed's order, overlaps removed before the area filter) it has,
so a small high-scored fragment still cuts its pixels out of the lower-scored masks under it.

Three options, chosen by the threshold search (:mod:`cellkit.search`), not by hand; defaults follow the seed:

- ``image_class_vote``: every Sartorius image holds one cell type, so every instance takes the image's class, the
  majority vote of the image's confident detections (raw score ``>= vote_min_score``; all detections when none is
  confident; ties go to the larger score sum, then the lower class id). Default: each instance's own class.
- ``rescore``: the score of each instance becomes ``score x mean probability inside its binarised mask`` (step 2,
  before overlaps; 0 for an empty mask). Steps 1 and 3 then use that score. Default: off.
- ``free_dropped``: a mask dropped for its area does not take its pixels: they stay free for the lower-scored masks
  (the common approach; with it a mask's residual, and so whether it is kept, depends on which higher masks were
  kept). Default: off (the seed's order: dropped masks still took theirs). The search decides it by an exact
  evaluation of its chosen thresholds both ways. Thresholds files written before the option existed have no such
  key and load as off, so they keep the results they were searched for.

One path: :func:`apply_predictions` takes a :class:`cellkit.predictions.InstancePredictions` (uint8 crops +
windows) and returns a :class:`KeptMasks` (residual crops, global runs, competition RLE strings); a uint8 crop value
``q`` means probability ``float32(q) * float32(1/255)``, exactly as :meth:`InstancePredictions.prob` returns it.
:func:`score_predictions` scores it: validation, the threshold search's exact scores and ``submit`` + ``score`` all
go through it. (The full-image float form, the tests' reference, is ``tests/postprocess_reference.py``.)

Thresholds files (``thresholds.json``, written by ``python -m cellkit search``) are read and written by
:func:`load_thresholds` / :func:`save_thresholds`; they hold ``"thresholds"`` and ``"options"`` plus the search's
report (metrics before/after, grid, provenance), which is kept as is.
"""
import dataclasses
import functools
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellkit import CELL_TYPES, atomic, metric, rle
from cellkit.geometry import MaskRuns, crops_runs
from cellkit.schema import DatasetSchema, recorded_schema

__all__ = [
    "THRESHOLD_KEYS", "SEED_THRESHOLDS", "DEFAULT_OPTIONS", "BOOL_OPTIONS", "validate_thresholds", "validate_options",
    "class_ids", "vote_class", "effective_classes", "binarize_table", "KeptMasks", "apply_predictions",
    "crops_runs", "score_kept", "score_predictions", "load_thresholds", "save_thresholds", "group_view",
    "seed_thresholds",
]

#: Keys of each class's thresholds.
THRESHOLD_KEYS = ("score", "mask", "min_area")

#: The seed's defaults, the "before" of the threshold search (Sartorius; :func:`seed_thresholds` for any groups).
SEED_THRESHOLDS = {c: {"score": 0.5, "mask": 0.5, "min_area": 0} for c in CELL_TYPES}


def seed_thresholds(groups: Sequence[str] = CELL_TYPES) -> dict[str, dict]:
    """The seed's defaults (score 0.5, mask 0.5, min_area 0) for every group, in order."""
    return {g: {"score": 0.5, "mask": 0.5, "min_area": 0} for g in groups}

#: The seed's options: each instance's own class, no rescoring (``vote_min_score`` only matters with the vote), masks
#: dropped for their area still take their pixels.
DEFAULT_OPTIONS = {"image_class_vote": False, "rescore": False, "vote_min_score": 0.5, "free_dropped": False}

#: The options that are true or false.
BOOL_OPTIONS = ("image_class_vote", "rescore", "free_dropped")

_PROB_TABLE = np.arange(256, dtype=np.float32) * np.float32(1.0 / 255.0)  # uint8 q -> float32 probability
_Q = np.arange(256, dtype=np.int64)


# ----------------------------------------------------------------------------------------------- validation
def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def validate_thresholds(thresholds, where: str = "thresholds", groups: Sequence[str] = CELL_TYPES
                        ) -> dict[str, dict]:
    """Check per-class thresholds and return a normalised copy.

    Args:
        thresholds: ``{group: {"score": float in [0, 1], "mask": float in (0, 1], "min_area": int >= 0}}``
            with exactly the ``groups``. ``mask`` must be > 0 (a 0 threshold would keep every pixel of the image).
            ``min_area`` may be a float with an integral value (JSON).
        where: prefix of error messages (e.g. the file's path).
        groups: the dataset's post-processing groups (:attr:`cellkit.schema.DatasetSchema.groups`); default the
            Sartorius cell types.

    Returns:
        ``{group: {"score": float, "mask": float, "min_area": int}}`` in ``groups`` order.

    Raises:
        ValueError: naming the class and key: not a mapping, a missing or unknown class or key, a value that is not
            a number or out of range.
    """
    if not isinstance(thresholds, Mapping):
        raise ValueError(f"{where}: expected a mapping of cell type -> thresholds, got {type(thresholds).__name__}")
    unknown = [str(k) for k in thresholds if k not in groups]
    if unknown:
        raise ValueError(f"{where}: unknown class {unknown[0]!r} (expected {', '.join(groups)})")
    out = {}
    for name in groups:
        if name not in thresholds:
            raise ValueError(f"{where}: missing class {name!r} (every class of {', '.join(groups)} is needed)")
        entry = thresholds[name]
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}: class {name!r}: expected a mapping with keys {', '.join(THRESHOLD_KEYS)}, "
                             f"got {type(entry).__name__}")
        extra = [str(k) for k in entry if k not in THRESHOLD_KEYS]
        if extra:
            raise ValueError(f"{where}: class {name!r}: unknown key {extra[0]!r} (expected {', '.join(THRESHOLD_KEYS)})")
        for key in THRESHOLD_KEYS:
            if key not in entry:
                raise ValueError(f"{where}: class {name!r}: missing key {key!r}")
        score = _number(entry["score"], f"{where}: class {name!r}: key 'score'")
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"{where}: class {name!r}: key 'score' = {score} is out of range [0, 1]")
        mask = _number(entry["mask"], f"{where}: class {name!r}: key 'mask'")
        if not 0.0 < mask <= 1.0:
            raise ValueError(f"{where}: class {name!r}: key 'mask' = {mask} is out of range (0, 1] "
                             f"(0 would keep every pixel of the image)")
        area = _number(entry["min_area"], f"{where}: class {name!r}: key 'min_area'")
        if area != int(area) or area < 0:
            raise ValueError(f"{where}: class {name!r}: key 'min_area' = {entry['min_area']!r} must be an "
                             f"integer >= 0")
        out[name] = {"score": score, "mask": mask, "min_area": int(area)}
    return out


def validate_options(options, where: str = "options") -> dict:
    """Check the post-processing options and return them completed with :data:`DEFAULT_OPTIONS`.

    Raises:
        ValueError: an unknown key, a non-bool ``image_class_vote``/``rescore``/``free_dropped``, ``vote_min_score``
            outside [0, 1].
    """
    options = {} if options is None else options
    if not isinstance(options, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(options).__name__}")
    extra = [str(k) for k in options if k not in DEFAULT_OPTIONS]
    if extra:
        raise ValueError(f"{where}: unknown option {extra[0]!r} (expected {', '.join(DEFAULT_OPTIONS)})")
    out = {**DEFAULT_OPTIONS, **options}
    for key in BOOL_OPTIONS:
        if not isinstance(out[key], (bool, np.bool_)):
            raise ValueError(f"{where}: option {key!r} must be true or false, got {out[key]!r}")
        out[key] = bool(out[key])
    vote = _number(out["vote_min_score"], f"{where}: option 'vote_min_score'")
    if not 0.0 <= vote <= 1.0:
        raise ValueError(f"{where}: option 'vote_min_score' = {vote} is out of range [0, 1]")
    out["vote_min_score"] = vote
    return out


def class_ids(classes, names: Sequence[str] = CELL_TYPES) -> np.ndarray:
    """Class names (or ids) -> int64 ids into ``names``; ValueError naming the first unknown one."""
    out = np.empty(len(classes), dtype=np.int64)
    for i, c in enumerate(classes):
        if isinstance(c, str) and c in names:
            out[i] = list(names).index(c)
        elif isinstance(c, numbers.Integral) and 0 <= int(c) < len(names):
            out[i] = int(c)
        else:
            raise ValueError(f"instance {i}: unknown class {c!r} (expected {', '.join(names)})")
    return out


def _per_class(thresholds: dict[str, dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(score, mask, min_area)`` arrays indexed by group id (``thresholds`` validated: in group order)."""
    return tuple(np.array([t[key] for t in thresholds.values()], dtype=dtype)
                 for key, dtype in (("score", np.float64), ("mask", np.float64), ("min_area", np.int64)))


def group_view(pred, schema: DatasetSchema):
    """``pred`` with its ``classes`` turned into group ids, the ids that thresholds are indexed by.

    ``group_by="class"``: the classes as they are (checked against the schema's); ``"pattern"``: every instance takes
    the group of the image, found in its id.

    Raises:
        ValueError: naming the image, for a class id outside the schema's classes or an id outside the pattern.
    """
    if len(pred.classes) and pred.classes.max() >= len(schema.classes):
        raise ValueError(f"image {pred.image_id!r}: classes must be in 0..{len(schema.classes) - 1} "
                         f"({', '.join(schema.classes)}), got {pred.classes.min()}..{pred.classes.max()}")
    if schema.group_by == "class":
        return pred
    group = schema.groups.index(schema.image_group(pred.image_id))
    return dataclasses.replace(pred, classes=np.full(len(pred.classes), group, dtype=np.int64))


# ------------------------------------------------------------------------------------------------ building blocks
def vote_class(classes: np.ndarray, scores: np.ndarray, min_score: float = 0.5) -> int | None:
    """The image's class by majority vote of its confident detections.

    Args:
        classes: int ``(N,)`` class ids.
        scores: float ``(N,)`` raw detection scores.
        min_score: a detection is confident when ``score >= min_score``; when none is, all detections vote.

    Returns:
        The winning class id (ties: larger sum of scores, then lower id), or None when ``N == 0``.
    """
    classes = np.asarray(classes, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    if classes.size == 0:
        return None
    voters = scores >= min_score
    if not voters.any():
        voters[:] = True
    counts = np.bincount(classes[voters])
    sums = np.bincount(classes[voters], weights=scores[voters])
    return int(max(range(len(counts)), key=lambda c: (counts[c], sums[c], -c)))


def effective_classes(classes: np.ndarray, scores: np.ndarray, image_class_vote: bool,
                      vote_min_score: float = 0.5) -> np.ndarray:
    """Class id whose thresholds each instance uses: its own, or the image's vote; int64 ``(N,)``."""
    classes = np.asarray(classes, dtype=np.int64)
    if not image_class_vote or classes.size == 0:
        return classes.copy()
    return np.full(classes.shape, vote_class(classes, scores, vote_min_score), dtype=np.int64)


def binarize_table(mask_threshold: float) -> np.ndarray:
    """bool ``(256,)``: ``table[q]`` is True when the uint8 probability ``q`` is kept at ``mask_threshold``.

    ``q`` means ``float32(q) * float32(1/255)`` (as :meth:`InstancePredictions.prob`), compared with ``>=``.
    """
    return _PROB_TABLE >= np.float32(mask_threshold)


def _resolve(order: np.ndarray, windows: np.ndarray, binary: Sequence[np.ndarray], shape: tuple[int, int],
             min_areas: np.ndarray, free_dropped: bool = False) -> tuple[list[int], list[np.ndarray]]:
    """Steps 3 and 4 on binarised crops.

    Args:
        order: instance indices that passed the score filter, in descending (effective) score order.
        windows: int ``(N, 4)`` crop windows ``x0, y0, x1, y1``.
        binary: bool crops, ``binary[i]`` of window ``windows[i]``.
        shape: ``(H, W)``.
        min_areas: int ``(N,)`` minimum area of each instance (its class's).
        free_dropped: a mask dropped for its area leaves its pixels unoccupied (else it occupies them too).

    Returns:
        ``(kept, residuals)``: kept instance indices (in ``order``'s order) and their residual bool crops.
    """
    occupied = np.zeros(shape, dtype=bool)
    kept, residuals = [], []
    for i in order:
        x0, y0, x1, y1 = windows[i]
        b = binary[i]
        if not b.size:
            continue
        view = occupied[y0:y1, x0:x1]
        residual = b & ~view
        keep = int(np.count_nonzero(residual)) >= max(int(min_areas[i]), 1)
        if keep or not free_dropped:
            view |= residual  # the rest of b is occupied already
        if keep:
            kept.append(int(i))
            residuals.append(residual)
    return kept, residuals


@dataclass
class KeptMasks:
    """The masks kept by post-processing of one image, as residual crops (disjoint, in descending score order).

    Attributes:
        image_id: the image's id.
        height, width: image size.
        indices: int64 ``(K,)`` index of each kept mask in the input instances.
        classes: int64 ``(K,)`` class id whose thresholds applied (own class or the image's vote).
        scores: float64 ``(K,)`` score used for filtering and ordering (rescored when ``rescore``).
        mask_boxes: int32 ``(K, 4)`` window ``x0, y0, x1, y1`` of each crop.
        crops: K bool arrays, ``crops[k]`` of shape ``(y1 - y0, x1 - x0)``; no pixel is set in two crops.
    """

    image_id: str
    height: int
    width: int
    indices: np.ndarray
    classes: np.ndarray
    scores: np.ndarray
    mask_boxes: np.ndarray
    crops: list

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def areas(self) -> np.ndarray:
        """int64 ``(K,)`` pixel count of each kept mask."""
        return np.array([np.count_nonzero(c) for c in self.crops], dtype=np.int64)

    def runs(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Global row-major runs ``(starts 0-indexed, lengths)`` of each kept mask."""
        starts, lengths, counts = crops_runs(self.crops, self.mask_boxes, self.width)
        bounds = np.concatenate(([0], np.cumsum(counts)))
        return [(starts[a:b], lengths[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

    def rles(self) -> list[str]:
        """Competition RLE string (1-indexed, row-major) of each kept mask (one batched conversion)."""
        starts, lengths, counts = crops_runs(self.crops, self.mask_boxes, self.width)
        tokens = list(map(str, np.stack((starts + 1, lengths), axis=1).ravel().tolist()))  # start, length, ...
        bounds = 2 * np.concatenate(([0], np.cumsum(counts)))
        return [" ".join(tokens[a:b]) for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())]

    def indices_flat(self) -> list[np.ndarray]:
        """Sorted flat pixel indices of each kept mask (the form :func:`cellkit.metric.iou_from_indices` takes)."""
        return [rle.runs_to_indices(s, n) for s, n in self.runs()]

    def full_masks(self) -> list[np.ndarray]:
        """Each kept mask as a bool ``(H, W)`` array."""
        out = []
        for c, (x0, y0, x1, y1) in zip(self.crops, self.mask_boxes):
            full = np.zeros((self.height, self.width), dtype=bool)
            full[y0:y1, x0:x1] = c
            out.append(full)
        return out


def _pipeline(class_ids_: np.ndarray, scores: np.ndarray, windows: np.ndarray, binarize, prob_mean,
              shape: tuple[int, int], thresholds, options, groups=CELL_TYPES
              ) -> tuple[list[int], list[np.ndarray], np.ndarray, np.ndarray, list[np.ndarray]]:
    """The four steps; ``binarize(i, m) -> bool crop`` and ``prob_mean(i, bool crop) -> float`` abstract the input."""
    thresholds = validate_thresholds(thresholds, groups=groups)
    options = validate_options(options)
    score_thr, mask_thr, min_area = _per_class(thresholds)
    scores = np.asarray(scores, dtype=np.float64)
    eff = effective_classes(class_ids_, scores, options["image_class_vote"], options["vote_min_score"])
    binary = [binarize(i, mask_thr[eff[i]]) for i in range(len(eff))]
    eff_scores = (np.array([scores[i] * prob_mean(i, binary[i]) for i in range(len(eff))], dtype=np.float64)
                  if options["rescore"] else scores)
    passed = np.flatnonzero(eff_scores >= score_thr[eff])
    order = passed[np.argsort(-eff_scores[passed], kind="stable")]
    kept, residuals = _resolve(order, windows, binary, shape, min_area[eff], options["free_dropped"])
    return kept, residuals, eff, eff_scores, binary


# -------------------------------------------------------------------------------------------------- public forms
def apply_predictions(pred, thresholds, *, image_class_vote: bool = False, rescore: bool = False,
                      vote_min_score: float = 0.5, free_dropped: bool = False, groups=CELL_TYPES) -> KeptMasks:
    """Post-process one image's :class:`~cellkit.predictions.InstancePredictions` (the fast, box-cropped form).

    Args:
        pred: the image's predictions (uint8 probability crops in integer windows), classes as group ids
            (:func:`group_view`).
        thresholds: per-group thresholds (see :func:`validate_thresholds`); groups: their names, in id order.
        image_class_vote, rescore, vote_min_score, free_dropped: options (module docstring); the keywords of
            :data:`DEFAULT_OPTIONS`, so ``apply_predictions(pred, doc["thresholds"], **doc["options"])`` works.

    Returns:
        :class:`KeptMasks` (``.rles()`` for the submission, ``.runs()``, ``.full_masks()``).

    Raises:
        ValueError: invalid thresholds or options (naming class and key).
    """
    options = {"image_class_vote": image_class_vote, "rescore": rescore, "vote_min_score": vote_min_score,
               "free_dropped": free_dropped}
    table = functools.cache(binarize_table)  # one table per distinct mask threshold
    mask_of = {}

    def binarize(i, m):
        mask_of[i] = m
        return table(m)[pred.masks[i]]

    def prob_mean(i, b):  # exact: integer sum of the kept uint8 values via a histogram
        hist = np.bincount(pred.masks[i].ravel(), minlength=256)
        first = int(np.argmax(table(mask_of[i])))
        n = int(hist[first:].sum())
        return float(hist[first:] @ _Q[first:]) / (255.0 * n) if n else 0.0

    windows = np.asarray(pred.mask_boxes, dtype=np.int64)
    kept, residuals, eff, eff_scores, _ = _pipeline(pred.classes, pred.scores, windows, binarize, prob_mean,
                                                    (pred.height, pred.width), thresholds, options, groups)
    kept = np.asarray(kept, dtype=np.int64)
    return KeptMasks(pred.image_id, pred.height, pred.width, kept, eff[kept], eff_scores[kept],
                     windows[kept].astype(np.int32).reshape(-1, 4), residuals)


def score_kept(kept: KeptMasks, truth: MaskRuns) -> np.ndarray:
    """Precision at IoU 0.50..0.95 (float64 ``(10,)``) of one image's kept masks against its true masks
    (:class:`cellkit.geometry.MaskRuns`, the image's shape)."""
    return metric.score_sets(MaskRuns.from_crops(kept.crops, kept.mask_boxes, (kept.height, kept.width)), truth)


def score_predictions(pred, truth: MaskRuns, thresholds, groups=CELL_TYPES, **options) -> np.ndarray:
    """The competition metric of one image's predictions after post-processing: :func:`apply_predictions` then
    :func:`score_kept`, the one path that validation (:class:`cellkit.evaluation.CellkitEvaluator`), the threshold
    search's exact scores and ``cellkit submit`` + ``cellkit score`` share.

    Args:
        pred: :class:`cellkit.predictions.InstancePredictions` of the image.
        truth: its true masks (:class:`cellkit.geometry.MaskRuns`).
        thresholds: ``{group: {"score", "mask", "min_area"}}`` (:func:`validate_thresholds`); groups: their names.
        **options: keywords of :data:`DEFAULT_OPTIONS`.

    Returns:
        float64 ``(10,)``.
    """
    return score_kept(apply_predictions(pred, thresholds, groups=groups, **options), truth)


# ---------------------------------------------------------------------------------------------- thresholds.json
def _check_document(doc, where: str) -> dict:
    if not isinstance(doc, Mapping):
        raise ValueError(f"{where}: expected a JSON object with 'thresholds' (and 'options'), got "
                         f"{type(doc).__name__}")
    if "thresholds" not in doc:
        raise ValueError(f"{where}: missing key 'thresholds' (per-class score/mask/min_area)")
    groups = recorded_schema(doc, where).groups
    return {**doc, "thresholds": validate_thresholds(doc["thresholds"], f"{where}: thresholds", groups),
            "options": validate_options(doc.get("options"), f"{where}: options")}



def load_thresholds(path) -> dict:
    """Read and validate a ``thresholds.json``.

    Returns:
        The document with ``"thresholds"`` normalised (:func:`validate_thresholds`) and ``"options"`` completed
        with :data:`DEFAULT_OPTIONS` (absent options = the seed's); other keys (metrics, grid, provenance) as read.
        Use as ``apply_predictions(pred, doc["thresholds"], **doc["options"])``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: invalid JSON, a missing class or key, values out of range; the message names the file.
    """
    return _check_document(atomic.read_json(path, "thresholds file"), str(path))


def save_thresholds(path, doc: Mapping) -> Path:
    """Validate ``doc`` (``{"thresholds": ..., "options": ..., ...}``) and write it atomically as JSON.

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    doc = _check_document(doc, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic.write_json(path, doc)
