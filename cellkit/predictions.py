"""On-disk store of instance predictions: one compressed ``.npz`` per image, plus ``meta.json``, in one directory.

Written by test-time augmentation / prediction (issue 3), read by post-processing, the threshold search and
``submit`` (issue 4). Reading streams: :func:`iter_dir` holds one image's predictions in memory at a time.

In memory (:class:`InstancePredictions`), for an image of ``height`` x ``width`` pixels and ``N`` instances:

===============  =========================  ====================================================================
field            dtype, shape               meaning
===============  =========================  ====================================================================
``image_id``     str                        the image's id (file stem); also the ``.npz`` file stem
``height``       int                        image height H (rows, y)
``width``        int                        image width W (columns, x)
``classes``      int64 ``(N,)``             index into the dataset's classes (Sartorius: 0 shsy5y, 1 astro, 2 cort)
``scores``       float32 ``(N,)``           detection confidence in [0, 1]
``boxes``        float32 ``(N, 4)``         predicted box, XYXY absolute, original-image pixels (x along W)
``mask_boxes``   int32 ``(N, 4)``           integer crop window ``x0, y0, x1, y1`` of the mask, end exclusive,
                                            ``0 <= x0 <= x1 <= W``, ``0 <= y0 <= y1 <= H``
``masks``        list of N uint8            ``masks[i]`` has shape ``(y1 - y0, x1 - x0)`` and holds
                 ``(h_i, w_i)``             ``round(probability * 255)`` of the crop ``full[y0:y1, x0:x1]``;
                                            every pixel outside the window has probability 0
===============  =========================  ====================================================================

On disk, ``<directory>/<image_id>.npz`` (``np.savez_compressed``, loadable with ``allow_pickle=False``) holds:

- ``format``: str scalar, ``"cellkit.predictions/1"`` (marks the file as ours; anything else is a foreign file);
- ``image_id``: str scalar; ``shape``: int64 ``(2,)`` = ``(H, W)``;
- ``classes``, ``scores``, ``boxes``, ``mask_boxes``: as above;
- ``mask_data``: uint8 ``(sum_i h_i * w_i,)``, every crop flattened row-major and concatenated in instance order.
  Crop ``i`` starts at ``sum_{j<i} h_j * w_j``; the sizes come from ``mask_boxes``, so no offsets are stored.

``<directory>/meta.json`` holds provenance (config, weights, fold, TTA settings, ``cellkit_version``). Files whose
name starts with ``.`` (temporary files of an interrupted write) are ignored; any other file in the directory is
a foreign file and an error. Every write is atomic (:mod:`cellkit.atomic`: temporary file + ``os.replace``), so an
interrupted run leaves whole files only and can resume by skipping ids that :func:`image_ids` already lists.

Size: an image with 500 instances whose crops are 20x20 to 60x60 (0.82 M crop pixels) takes about 0.32 MB with
smooth sigmoid-edged probabilities and 0.76 MB in the worst case of per-pixel noise in every crop (measured with
``tests/test_predictions.py::test_size_realistic``, which asserts the smooth case stays under 0.5 MB).
"""
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np

from cellkit import atomic

__all__ = [
    "FORMAT", "META_NAME", "InstancePredictions", "quantize",
    "save", "load", "iter_dir", "image_ids", "write_meta", "read_meta",
    "store_signature", "read_signature", "signature_difference", "describe_signature",
]

#: Value of the ``format`` key of every predictions ``.npz``.
FORMAT = "cellkit.predictions/1"

#: Name of the provenance file inside a predictions directory.
META_NAME = "meta.json"

_KEYS = ("format", "image_id", "shape", "classes", "scores", "boxes", "mask_boxes", "mask_data")


def quantize(prob: np.ndarray) -> np.ndarray:
    """Probabilities (float in [0, 1], or bool) -> uint8 ``round(p * 255)``; values outside [0, 1] are clipped."""
    prob = np.asarray(prob)
    if prob.dtype == bool:
        return prob.astype(np.uint8) * np.uint8(255)
    return np.rint(np.clip(prob.astype(np.float32, copy=False), 0.0, 1.0) * 255.0).astype(np.uint8)


@dataclass(eq=False)
class InstancePredictions:
    """The instance predictions of one image (see the module docstring for fields, dtypes and conventions).

    The constructor coerces ``classes``/``scores``/``boxes``/``mask_boxes`` to their dtypes and validates
    everything: equal lengths, class range, crop windows inside the image, each mask's shape equal to its window.

    Raises:
        ValueError: naming the image id and the offending field or instance.
    """

    image_id: str
    height: int
    width: int
    classes: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray
    mask_boxes: np.ndarray
    masks: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.image_id = str(self.image_id)
        where = f"predictions of image {self.image_id!r}"
        if not self.image_id or any(c in self.image_id for c in "/\\") or self.image_id.startswith("."):
            raise ValueError(f"{where}: image_id must be a non-empty file stem without '/', '\\' or a leading '.'")
        self.height, self.width = int(self.height), int(self.width)
        if self.height < 1 or self.width < 1:
            raise ValueError(f"{where}: image size {self.height}x{self.width} must be positive")
        for name, dtype, shape in (("classes", np.int64, -1), ("scores", np.float32, -1),
                                   ("boxes", np.float32, (-1, 4)), ("mask_boxes", np.int32, (-1, 4))):
            setattr(self, name, np.asarray(getattr(self, name), dtype=dtype).reshape(shape))
        self.masks = [np.asarray(m) for m in self.masks]
        lengths = {"classes": len(self.classes), "scores": len(self.scores), "boxes": len(self.boxes),
                   "mask_boxes": len(self.mask_boxes), "masks": len(self.masks)}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"{where}: mismatched lengths {lengths}")
        if len(self.classes) and self.classes.min() < 0:  # the upper bound is the dataset's (postprocess.group_view)
            raise ValueError(f"{where}: classes must be >= 0, got {self.classes.min()}..{self.classes.max()}")
        if len(self.scores) and not np.all(np.isfinite(self.scores)):
            raise ValueError(f"{where}: scores contain NaN or inf")
        x0, y0, x1, y1 = self.mask_boxes.T
        bad = np.flatnonzero((x0 < 0) | (y0 < 0) | (x1 > self.width) | (y1 > self.height) | (x1 < x0) | (y1 < y0))
        if bad.size:
            raise ValueError(f"{where}: instance {bad[0]}: mask_box {self.mask_boxes[bad[0]].tolist()} is not a window "
                             f"x0<=x1<={self.width}, y0<=y1<={self.height}")
        for i, m in enumerate(self.masks):
            if m.dtype != np.uint8:
                raise ValueError(f"{where}: instance {i}: mask dtype {m.dtype}, expected uint8 probability*255 "
                                 f"(use cellkit.predictions.quantize)")
            expected = (int(y1[i] - y0[i]), int(x1[i] - x0[i]))
            if m.shape != expected:
                raise ValueError(f"{where}: instance {i}: mask shape {m.shape} != crop window "
                                 f"{self.mask_boxes[i].tolist()} (h, w) = {expected}")

    def __len__(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` of the image."""
        return self.height, self.width

    def prob(self, i: int) -> np.ndarray:
        """Probability crop of instance ``i``: float32 ``(h_i, w_i)`` in [0, 1], window ``mask_boxes[i]``."""
        return self.masks[i].astype(np.float32) * np.float32(1.0 / 255.0)

    def full_prob(self, i: int) -> np.ndarray:
        """Probability of instance ``i`` over the whole image: float32 ``(height, width)``, 0 outside its window."""
        full = np.zeros((self.height, self.width), dtype=np.float32)
        x0, y0, x1, y1 = (int(v) for v in self.mask_boxes[i])
        full[y0:y1, x0:x1] = self.prob(i)
        return full

    def select(self, idx) -> "InstancePredictions":
        """A new InstancePredictions holding the instances ``idx`` (int indices or a bool array of length N), in
        that order; the mask arrays are shared, not copied."""
        idx = np.asarray(idx)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise ValueError(f"select: bool index of shape {idx.shape} for {len(self)} instances")
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise ValueError(f"select: index out of range for {len(self)} instances")
        return InstancePredictions(self.image_id, self.height, self.width, self.classes[idx], self.scores[idx],
                                   self.boxes[idx], self.mask_boxes[idx], [self.masks[i] for i in idx])

    @classmethod
    def from_full_masks(cls, image_id: str, classes, scores, boxes, probs) -> "InstancePredictions":
        """Build from full-image probability masks, cropping each to the bounding box of its nonzero pixels.

        Args:
            image_id: the image's id.
            classes: int ``(N,)`` indices into the dataset's classes.
            scores: float ``(N,)``.
            boxes: float ``(N, 4)`` XYXY absolute.
            probs: ``(N, H, W)`` float in [0, 1] or bool (anything indexable by instance that yields ``(H, W)``
                arrays, e.g. a torch tensor moved to numpy one mask at a time). Probabilities are quantised first
                (:func:`quantize`), so a pixel under 0.5/255 counts as 0; an all-zero mask gets an empty window
                ``(0, 0, 0, 0)``.
        """
        shape = getattr(probs, "shape", None)
        if shape is not None and len(shape) != 3:
            raise ValueError(f"from_full_masks({image_id!r}): probs must be (N, H, W), got shape {tuple(shape)}")
        n = len(probs)
        if n == 0:
            if shape is None:
                raise ValueError(f"from_full_masks({image_id!r}): cannot infer the image size from 0 masks; "
                                 f"pass an array of shape (0, H, W)")
            height, width = int(shape[1]), int(shape[2])
        mask_boxes = np.zeros((n, 4), dtype=np.int32)
        masks = []
        for i in range(n):
            q = quantize(np.asarray(probs[i]))
            if q.ndim != 2:
                raise ValueError(f"from_full_masks({image_id!r}): mask {i} has shape {q.shape}, expected (H, W)")
            if i and q.shape != (height, width):
                raise ValueError(f"from_full_masks({image_id!r}): mask {i} has shape {q.shape}, "
                                 f"mask 0 has {(height, width)}")
            height, width = q.shape
            rows, cols = np.flatnonzero(q.any(axis=1)), np.flatnonzero(q.any(axis=0))
            y0, y1, x0, x1 = (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1) if rows.size else (0, 0, 0, 0)
            mask_boxes[i] = (x0, y0, x1, y1)
            masks.append(np.ascontiguousarray(q[y0:y1, x0:x1]))
        return cls(image_id, height, width, classes, scores, boxes, mask_boxes, masks)


def save(pred: InstancePredictions, directory) -> Path:
    """Write ``pred`` atomically to ``<directory>/<image_id>.npz`` (creating the directory); return the path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{pred.image_id}.npz"
    mask_data = np.concatenate([np.zeros(0, dtype=np.uint8)] + [m.reshape(-1) for m in pred.masks])
    with atomic.atomic_path(path, suffix=".npz") as tmp:  # hidden name: skipped by readers while incomplete
        np.savez_compressed(tmp, format=np.array(FORMAT), image_id=np.array(pred.image_id),
                            shape=np.array([pred.height, pred.width], dtype=np.int64), classes=pred.classes,
                            scores=pred.scores, boxes=pred.boxes, mask_boxes=pred.mask_boxes,
                            mask_data=mask_data.astype(np.uint8, copy=False))
    return path


def load(path) -> InstancePredictions:
    """Read one ``.npz`` written by :func:`save`.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: naming the path, when it is not a cellkit predictions file (not an npz, missing keys, other
            ``format``), its arrays disagree in length, or its mask buffer does not match its crop windows.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such predictions file")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a cellkit predictions file (not an .npz archive)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if missing := [k for k in _KEYS if k not in npz.files]:
                raise ValueError(f"missing keys {missing}")
            data = {k: npz[k] for k in _KEYS}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise ValueError(f"{path}: not a cellkit predictions file ({exc})") from None
    if str(data["format"]) != FORMAT:
        raise ValueError(f"{path}: not a cellkit predictions file (format {str(data['format'])!r}, "
                         f"expected {FORMAT!r})")
    try:
        height, width = (int(v) for v in data["shape"])
        mask_boxes = np.asarray(data["mask_boxes"], dtype=np.int64).reshape(-1, 4)
        sizes = (mask_boxes[:, 3] - mask_boxes[:, 1]) * (mask_boxes[:, 2] - mask_boxes[:, 0])
        buf = data["mask_data"]
        if buf.dtype != np.uint8 or buf.ndim != 1:
            raise ValueError(f"mask_data must be 1-D uint8, got {buf.dtype} {buf.shape}")
        if (sizes < 0).any() or int(sizes.sum()) != buf.size:
            raise ValueError(f"mask_data holds {buf.size} values but the crop windows need {int(sizes.sum())}")
        masks = [part.reshape(int(b[3] - b[1]), int(b[2] - b[0]))
                 for part, b in zip(np.split(buf, np.cumsum(sizes)[:-1]), mask_boxes)]
        pred = InstancePredictions(str(data["image_id"]), height, width, data["classes"], data["scores"],
                                   data["boxes"], mask_boxes, masks)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    if pred.image_id != path.stem:
        raise ValueError(f"{path}: holds image_id {pred.image_id!r}, which does not match the file name")
    return pred


def _listing(directory: Path) -> dict[str, Path]:
    """Map image id -> .npz path for a predictions directory; raise on a missing dir, a foreign file, no .npz."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: predictions directory does not exist")
    found = {}
    for entry in directory.iterdir():
        if entry.name.startswith(".") or entry.name == META_NAME:
            continue
        if entry.suffix != ".npz" or not entry.is_file():
            raise ValueError(f"{entry}: foreign file in predictions directory {directory} "
                             f"(expected only <image_id>.npz and {META_NAME})")
        found[entry.stem] = entry
    if not found:
        raise ValueError(f"{directory}: predictions directory holds no .npz files")
    return dict(sorted(found.items()))


def image_ids(directory) -> list[str]:
    """Sorted image ids stored in ``directory`` (without loading them). Raises like :func:`iter_dir`."""
    return list(_listing(Path(directory)))


def iter_dir(directory, ids: Iterable[str] | None = None) -> Iterator[InstancePredictions]:
    """Yield the predictions stored in ``directory``, sorted by image id, loading one image at a time.

    Args:
        directory: a directory written by :func:`save`.
        ids: when given, only these image ids (still yielded sorted); an id without a file is an error.

    Raises:
        FileNotFoundError: the directory does not exist.
        ValueError: the directory holds no ``.npz`` or a foreign file, or a requested id has no file (all checked
            when called); a file that is not a valid predictions file (naming its path, when it is reached).
    """
    listing = _listing(Path(directory))
    if ids is not None:
        wanted = sorted(set(ids))
        if missing := [i for i in wanted if i not in listing]:
            raise ValueError(f"{directory}: no predictions for {len(missing)} requested image(s), e.g. "
                             f"{missing[:5]}")
        listing = {i: listing[i] for i in wanted}
    return (load(path) for path in listing.values())


def write_meta(directory, meta: dict) -> Path:
    """Write ``meta`` (JSON-serialisable provenance) atomically to ``<directory>/meta.json``; return its path.

    ``cellkit_version`` is added when absent.
    """
    from cellkit import __version__

    if not isinstance(meta, dict):
        raise ValueError(f"write_meta: meta must be a dict, got {type(meta).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return atomic.write_json(directory / META_NAME, {"cellkit_version": __version__, **meta}, sort_keys=True)


def read_meta(directory) -> dict:
    """Read ``<directory>/meta.json``.

    Raises:
        FileNotFoundError: no meta.json in ``directory``.
        ValueError: naming the path, when it is not a JSON object.
    """
    path = Path(directory) / META_NAME
    meta = atomic.read_json(path, "predictions meta.json")
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


# ------------------------------------------------------------------------------------------------ signatures
# The inference signature of a store (how its predictions were made: passes, fusion, detections per image) is
# written by cellkit.predict into meta.json; see that module's docstring.
def store_signature(meta: Mapping) -> dict | None:
    """The inference signature of a store's ``meta.json`` (a legacy ``"tta"`` store: NMS, ``max`` score)."""
    if isinstance(meta.get("signature"), Mapping):
        return dict(meta["signature"])
    if isinstance(meta.get("tta"), Mapping):  # cellkit before the signature: TTA merged by NMS, one pass's score
        return {"passes": {k: meta["tta"].get(k) for k in ("min_sizes", "max_size", "flip", "n_passes")},
                "fusion": {"mode": "nms", "iou": None, "score": "max"}, "detections_per_image": None}
    return None


def read_signature(path) -> tuple[dict | None, str]:
    """The inference signature of a ``thresholds.json`` (its ``"inference"``), or of a store (directory or its
    ``meta.json``); returns ``(signature or None, description of the source)``.

    Raises:
        FileNotFoundError: no such file or store.
    """
    import json

    path = Path(path)
    if path.is_dir():
        return store_signature(read_meta(path)), f"store {path}"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no thresholds.json or predictions store")
    doc = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(doc, Mapping):
        raise ValueError(f"{path}: expected a JSON object")
    if "thresholds" in doc:
        return (dict(doc["inference"]) if isinstance(doc.get("inference"), Mapping) else None), f"thresholds {path}"
    return store_signature(doc), f"store meta {path}"


def _describe(part: str, value) -> str:
    if not isinstance(value, Mapping):
        return f"{part}={value}"
    if part == "passes":
        return (f"passes min_sizes={list(value.get('min_sizes') or [])} max_size={value.get('max_size')} "
                f"flip={value.get('flip')}")
    return f"fusion mode={value.get('mode')} iou={value.get('iou')} score={value.get('score')}"


def _differ(x, y) -> bool:
    if x is None or y is None:  # a legacy signature's unknown value matches anything
        return False
    if isinstance(x, float) or isinstance(y, float):
        return abs(float(x) - float(y)) > 1e-9
    return (list(x) if isinstance(x, (list, tuple)) else x) != (list(y) if isinstance(y, (list, tuple)) else y)


def describe_signature(signature: Mapping) -> str:
    """One line: the passes, the fusion and the detections per image of a signature."""
    return (f"{_describe('passes', signature.get('passes'))}; {_describe('fusion', signature.get('fusion'))}; "
            f"detections_per_image={signature.get('detections_per_image')}")


def signature_difference(expected: Mapping | None, actual: Mapping | None) -> str | None:
    """What differs between two signatures (passes, fusion, detections per image), in one line; None if nothing.

    The members are not compared (module docstring). A legacy signature's unknown ``iou`` or detections match
    anything.
    """
    if expected is None or actual is None:
        return None
    diffs = []
    for part, keys in (("passes", ("min_sizes", "max_size", "flip")), ("fusion", ("mode", "iou", "score"))):
        a, b = expected.get(part) or {}, actual.get(part) or {}
        if any([_differ(a.get(k), b.get(k)) for k in keys]):  # every key compared
            diffs.append(f"{_describe(part, a)} vs {_describe(part, b)}")
    x, y = expected.get("detections_per_image"), actual.get("detections_per_image")
    if x is not None and y is not None and int(x) != int(y):
        diffs.append(f"detections_per_image={x} vs {y}")
    return "; ".join(diffs) or None
