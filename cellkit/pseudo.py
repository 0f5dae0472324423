"""Pseudo-labels: predictions of unlabeled images turned into a competition-layout training folder.

From a predictions store (:mod:`cellkit.predictions`, typically an ensemble of fold models written by
``cellkit predict``) and a ``thresholds.json`` (``cellkit search``), :func:`write_pseudo_labels` writes:

- ``OUT/train.csv``: the competition's columns ``id, annotation, width, height, cell_type`` plus ``source``
  (``"pseudo:<store path>"``); one row per kept mask, RLE row-major and 1-indexed, exactly the strings ``cellkit
  submit`` writes for the same store and thresholds (:func:`cellkit.postprocess.apply_predictions`, then
  :meth:`~cellkit.postprocess.KeptMasks.rles`), in the same order (descending score); every row of an image carries
  the image's one cell type (:func:`class_vote`). It passes :func:`cellkit.data.read_train_csv` and is usable as
  ``cellkit train --data OUT`` or ``--extra-data OUT``.
- ``OUT/train/<id>.<ext>``: each kept image, a symlink to the source image (absolute), or a copy where symlinks
  cannot be made. Nothing is ever written into the source image folder or the store.
- ``OUT/pseudo.json``: the settings and one decision per image (:func:`summary_document`), written last.

Every file is written atomically (:mod:`cellkit.atomic`); an interrupted run leaves no ``pseudo.json``.

Screening (class-wise, on by default; :class:`ScreenSettings`), per image, after the thresholds.json
post-processing (the masks ``submit`` would write, their scores being the post-processing's, rescored when
``rescore`` is on, and their classes the model's own predicted classes):

1. no mask left -> dropped (``"no_mask"``; also without screening: a training image needs annotations);
2. the cell type is the score-weighted vote of the masks' predicted classes (ties: the lower class id); its vote
   share (the winner's score sum / all masks' score sum) must be ``>= min_share`` (else ``"mixed_classes"``);
3. the mean score of the masks must be ``>= min_mean_score[cell type]`` (else ``"low_confidence"``);
4. masks whose score is under ``min_mask_score[cell type]`` are removed (their pixels become background: a
   confident image with a few doubtful cells keeps its confident ones); none left -> ``"no_confident_mask"``.

Without screening (``settings=None``, ``--no-screen``) only step 1 applies and every mask is kept.
"""
import csv
import io
import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cellkit import CELL_TYPES, atomic
from cellkit.schema import SARTORIUS, DatasetSchema, save_schema, schema_of

__all__ = [
    "FORMAT", "SUMMARY_NAME", "CSV_COLUMNS", "REASONS", "ScreenSettings", "ImageDecision", "class_vote",
    "screen_image", "pseudo_label_image", "parse_class_values", "write_pseudo_labels", "summary_document",
]

#: Value of ``format`` in ``pseudo.json``.
FORMAT = "cellkit.pseudo/1"

#: File name of the settings and decisions beside ``train.csv``.
SUMMARY_NAME = "pseudo.json"

#: Columns of a pseudo-label ``train.csv`` (the competition's required ones, then ``source``).
CSV_COLUMNS = ("id", "annotation", "width", "height", "cell_type", "source")

#: Why an image is dropped (module docstring, steps 1-4).
REASONS = ("no_mask", "mixed_classes", "low_confidence", "no_confident_mask")


def _unit(value, where: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected a number in [0, 1], got {value!r}") from None
    if not math.isfinite(x) or not 0.0 <= x <= 1.0:
        raise ValueError(f"{where}: {value!r} is out of range [0, 1]")
    return x


def _per_class(value, where: str, classes=CELL_TYPES) -> dict[str, float]:
    """A number for every class, or a mapping with every class of ``classes``."""
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(classes))
        if unknown:
            raise ValueError(f"{where}: unknown class {unknown[0]!r} (expected {', '.join(classes)})")
        missing = [c for c in classes if c not in value]
        if missing:
            raise ValueError(f"{where}: missing class {missing[0]!r} (every class of {', '.join(classes)} "
                             f"is needed)")
        return {c: _unit(value[c], f"{where}: class {c!r}") for c in classes}
    return dict.fromkeys(classes, _unit(value, where))


@dataclass(frozen=True)
class ScreenSettings:
    """Confidence screening of pseudo-labels (module docstring for the steps).

    Attributes:
        min_share: minimal score-weighted vote share of the image's cell type among its masks, in [0, 1].
        min_mean_score: ``{cell type: s}``, minimal mean mask score of an image of that type.
        min_mask_score: ``{cell type: s}``, minimal score of a kept mask in an image of that type (on top of the
            thresholds.json score threshold).

    A number for ``min_mean_score`` / ``min_mask_score`` applies to every class of ``classes`` (the dataset's,
    default the Sartorius cell types). Values are validated on construction (ValueError naming the setting and
    class).
    """

    min_share: float = 0.8
    min_mean_score: Mapping | float = 0.6
    min_mask_score: Mapping | float = 0.5
    classes: tuple = CELL_TYPES

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "min_share", _unit(self.min_share, "screen: min_share"))
        for name in ("min_mean_score", "min_mask_score"):
            object.__setattr__(self, name, _per_class(getattr(self, name), f"screen: {name}", self.classes))

    def to_dict(self) -> dict:
        """JSON form: ``{"min_share": float, "min_mean_score": {class: float}, "min_mask_score": {class: float}}``."""
        return {"min_share": self.min_share, "min_mean_score": dict(self.min_mean_score),
                "min_mask_score": dict(self.min_mask_score)}


@dataclass
class ImageDecision:
    """What happened to one image.

    Attributes:
        image_id: the image's id.
        kept: whether the image is in the output.
        reason: one of :data:`REASONS` when dropped, else None.
        cell_type: the voted cell type (None when no mask was left by post-processing).
        share: vote share of ``cell_type`` (score-weighted), 0.0 without masks.
        mean_score: mean score of the post-processed masks, 0.0 without masks.
        n_detections: instances in the store for the image.
        n_postprocessed: masks left by the thresholds.json post-processing (what ``submit`` writes).
        n_masks: masks written to ``train.csv`` (0 when dropped).
        keep: int64 ``(n_masks,)`` indices of the written masks among the post-processed ones (not saved).
    """

    image_id: str
    kept: bool
    reason: str | None
    cell_type: str | None
    share: float
    mean_score: float
    n_detections: int
    n_postprocessed: int
    n_masks: int
    keep: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, dtype=np.int64))

    def to_dict(self) -> dict:
        """JSON form (every attribute but ``image_id`` and ``keep``)."""
        return {"kept": self.kept, "reason": self.reason, "cell_type": self.cell_type,
                "share": round(self.share, 6), "mean_score": round(self.mean_score, 6),
                "n_detections": self.n_detections, "n_postprocessed": self.n_postprocessed, "n_masks": self.n_masks}


def class_vote(classes, scores, n_classes: int = len(CELL_TYPES)) -> tuple[int | None, float]:
    """The score-weighted class vote of an image's masks.

    Args:
        classes: int ``(N,)`` class ids (indices into :data:`cellkit.CELL_TYPES`).
        scores: float ``(N,)`` scores, >= 0.

    Returns:
        ``(class id, share)``: the class with the largest score sum (ties: the lower id) and that sum divided by the
        sum over all classes (1.0 when every score is 0 and all masks agree); ``(None, 0.0)`` when ``N == 0``.
    """
    classes = np.asarray(classes, dtype=np.int64).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if classes.size != scores.size:
        raise ValueError(f"class_vote: {classes.size} classes but {scores.size} scores")
    if classes.size == 0:
        return None, 0.0
    sums = np.bincount(classes, weights=scores, minlength=n_classes)
    total = float(sums.sum())
    if total <= 0.0:  # every score 0: a plain count vote
        sums = np.bincount(classes, minlength=n_classes).astype(np.float64)
        total = float(sums.sum())
    winner = int(np.argmax(sums))  # first maximum: the lower id on ties
    return winner, float(sums[winner]) / total


def screen_image(image_id: str, classes, scores, settings: ScreenSettings | None,
                 n_detections: int | None = None, names=CELL_TYPES) -> ImageDecision:
    """Decide about one image from its post-processed masks (pure: numbers in, a decision out).

    Args:
        image_id: the image's id.
        classes: int ``(K,)`` predicted class ids of the post-processed masks.
        scores: float ``(K,)`` their scores (as post-processing used them).
        settings: the screening, or None for none (only images without masks are dropped).
        n_detections: instances before post-processing (recorded only; default ``K``).
        names: the class names the ids index (the dataset's; ``settings.classes`` when screening).

    Returns:
        The :class:`ImageDecision` (``keep`` indexes ``classes``/``scores``).
    """
    classes = np.asarray(classes, dtype=np.int64).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    k = int(classes.size)
    n_det = k if n_detections is None else int(n_detections)
    names = settings.classes if settings is not None else tuple(names)
    winner, share = class_vote(classes, scores, len(names))
    if winner is None:
        return ImageDecision(image_id, False, "no_mask", None, 0.0, 0.0, n_det, 0, 0)
    cell_type = names[winner]
    mean = float(scores.mean())

    def drop(reason):
        return ImageDecision(image_id, False, reason, cell_type, share, mean, n_det, k, 0)

    if settings is None:
        return ImageDecision(image_id, True, None, cell_type, share, mean, n_det, k, k, np.arange(k, dtype=np.int64))
    if share < settings.min_share:
        return drop("mixed_classes")
    if mean < settings.min_mean_score[cell_type]:
        return drop("low_confidence")
    keep = np.flatnonzero(scores >= settings.min_mask_score[cell_type]).astype(np.int64)
    if keep.size == 0:
        return drop("no_confident_mask")
    return ImageDecision(image_id, True, None, cell_type, share, mean, n_det, k, int(keep.size), keep)


def pseudo_label_image(pred, thresholds: Mapping, options: Mapping,
                       settings: ScreenSettings | None, schema: DatasetSchema = SARTORIUS
                       ) -> tuple[ImageDecision, list[str]]:
    """Post-process one image's predictions as ``submit`` does, then screen them.

    Args:
        pred: :class:`cellkit.predictions.InstancePredictions` of the image.
        thresholds: per-class thresholds of thresholds.json (:func:`cellkit.postprocess.validate_thresholds`).
        options: post-processing options of thresholds.json.
        settings: screening, or None.
        schema: the dataset (:mod:`cellkit.schema`): its groups key ``thresholds``, its classes name the vote.

    Returns:
        ``(decision, rles)``: the RLE strings (row-major, 1-indexed, descending score) of the kept masks, a subset
        in order of ``apply_predictions(pred, thresholds, **options).rles()`` (all of it without screening).
    """
    from cellkit import postprocess as pp

    kept = pp.apply_predictions(pp.group_view(pred, schema), thresholds, groups=schema.groups, **options)
    own_classes = np.asarray(pred.classes, dtype=np.int64)[kept.indices]
    decision = screen_image(pred.image_id, own_classes, kept.scores, settings, n_detections=len(pred),
                            names=schema.classes)
    if not decision.kept:
        return decision, []
    rles = kept.rles()
    return decision, [rles[i] for i in decision.keep.tolist()]


def parse_class_values(text: str, where: str, classes=CELL_TYPES) -> float | dict[str, float]:
    """Parse a class-wise CLI value: ``"0.6"`` (every class) or ``"shsy5y=0.5,astro=0.7,cort=0.6"`` (every class).

    Raises:
        ValueError: naming ``where`` (the option), a malformed item, an unknown or missing class, a value out of
            [0, 1].
    """
    text = str(text).strip()
    if "=" not in text:
        return _unit(text, where)
    values = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"{where}: malformed item {item!r} (expected CLASS=VALUE, e.g. astro=0.7)")
        values[name.strip()] = value.strip()
    return _per_class(values, where, classes)


# ------------------------------------------------------------------------------------------------------ writing
def _check_out(out: Path, image_dir: Path, pred_dir: Path, overwrite: bool) -> None:
    out_r, images_r, pred_r = out.resolve(), image_dir.resolve(), pred_dir.resolve()
    for name, src in (("--images", images_r), ("--pred", pred_r)):
        if out_r.is_relative_to(src) or (out_r / "train") == src:
            raise ValueError(f"{out}: output folder would write into the source {name} folder {src}; choose "
                             f"another output folder")
    existing = [p for p in (out / "train.csv", out / SUMMARY_NAME, out / "train") if p.exists()]
    if existing and not overwrite:
        raise ValueError(f"{out}: already holds pseudo-labels ({existing[0].name}); choose another output folder "
                         f"or pass --overwrite")


def _place_image(src: Path, folder: Path, link: bool) -> str:
    """Symlink ``folder / src.name`` -> ``src`` (absolute), atomically; a copy where symlinks fail. Returns "link" or
    "copy"."""
    dst = folder / src.name
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    if link:
        try:
            os.symlink(src.resolve(), tmp)
            os.replace(tmp, dst)
            return "link"
        except OSError:
            tmp.unlink(missing_ok=True)
    with atomic.atomic_path(dst) as part:
        shutil.copyfile(src, part)
    return "copy"


def summary_document(*, source: str, pred_dir, image_dir, thresholds_path, doc: Mapping, settings, classes=CELL_TYPES,
                     decisions: list[ImageDecision], placed: Mapping[str, str]) -> dict:
    """The ``pseudo.json`` document.

    Layout: ``format`` (:data:`FORMAT`), ``source``, ``pred``, ``images``, ``thresholds`` (paths as given),
    ``inference`` (the thresholds' inference signature or None), ``postprocess`` (``{"thresholds", "options"}``
    applied), ``screen`` (:meth:`ScreenSettings.to_dict` or None for ``--no-screen``), ``counts`` (``images``,
    ``kept``, ``dropped`` (total), ``dropped_by_reason`` (every reason of :data:`REASONS`), ``masks`` (written),
    ``masks_postprocessed``, ``by_cell_type`` (kept images per type), ``linked``, ``copied``), ``images_detail``
    (``{image id: ImageDecision.to_dict()}``, sorted by id), ``cellkit_version``.
    """
    from cellkit import __version__

    kept = [d for d in decisions if d.kept]
    by_reason = {r: sum(1 for d in decisions if d.reason == r) for r in REASONS}
    return {
        "format": FORMAT, "source": source, "pred": str(pred_dir), "images": str(image_dir),
        "thresholds": str(thresholds_path), "inference": doc.get("inference"),
        "postprocess": {"thresholds": doc["thresholds"], "options": doc["options"]},
        "screen": None if settings is None else settings.to_dict(),
        "counts": {"images": len(decisions), "kept": len(kept), "dropped": len(decisions) - len(kept),
                   "dropped_by_reason": by_reason, "masks": sum(d.n_masks for d in kept),
                   "masks_postprocessed": sum(d.n_postprocessed for d in decisions),
                   "by_cell_type": {c: sum(1 for d in kept if d.cell_type == c) for c in classes},
                   "linked": sum(1 for v in placed.values() if v == "link"),
                   "copied": sum(1 for v in placed.values() if v == "copy")},
        "images_detail": {d.image_id: d.to_dict() for d in sorted(decisions, key=lambda d: d.image_id)},
        "cellkit_version": __version__,
    }


def write_pseudo_labels(pred_dir, thresholds_path, image_dir, out_dir, settings: ScreenSettings | None, *,
                        doc: Mapping | None = None, link: bool = True, overwrite: bool = False,
                        progress: bool = True) -> dict:
    """Write a pseudo-label folder (module docstring): ``OUT/train.csv``, ``OUT/train/``, ``OUT/pseudo.json``.

    Args:
        pred_dir: predictions store of the images (one ``.npz`` per image of ``image_dir``, same sizes).
        thresholds_path: thresholds.json (post-processing thresholds and options).
        image_dir: folder of the (unlabeled) images; never written into.
        out_dir: output folder (created); must not lie inside ``image_dir`` or ``pred_dir``.
        settings: the screening, or None (``--no-screen``).
        doc: thresholds.json already loaded (:func:`cellkit.postprocess.load_thresholds`); default: loaded here.
        link: symlink the images (else, or where a symlink fails, copy them).
        overwrite: replace an earlier output in ``out_dir`` (its train.csv, pseudo.json and train/ entries).
        progress: tqdm bar.

    Returns:
        The ``pseudo.json`` document (:func:`summary_document`).

    Raises:
        FileNotFoundError: missing store, thresholds or image folder.
        ValueError: predictions for images not in ``image_dir`` or images without predictions (naming some), an
            image whose size differs from its predictions', no image kept, an output folder inside a source or
            holding an earlier output without ``overwrite``.
    """
    from tqdm import tqdm

    from cellkit import postprocess as pp
    from cellkit import predictions as P
    from cellkit.data import find_image
    from cellkit.submission import check_store_ids, image_sizes

    pred_dir, image_dir, out_dir = Path(pred_dir), Path(image_dir), Path(out_dir)
    doc = pp.load_thresholds(thresholds_path) if doc is None else doc
    schema = schema_of(pred_dir)
    thresholds = pp.validate_thresholds(doc["thresholds"], str(thresholds_path), schema.groups)
    if settings is not None and settings.classes != schema.classes:
        raise ValueError(f"screen: settings for the classes {list(settings.classes)}, the store's dataset has "
                         f"{list(schema.classes)}")
    ids = P.image_ids(pred_dir)
    sizes = image_sizes(image_dir)
    check_store_ids(ids, sizes, pred_dir, image_dir)
    _check_out(out_dir, image_dir, pred_dir, overwrite)
    source = f"pseudo:{pred_dir}"
    decisions, rows = [], []
    for pred in tqdm(P.iter_dir(pred_dir), total=len(ids), desc="pseudo", unit="image", disable=not progress):
        h, w = sizes[pred.image_id]
        if (pred.height, pred.width) != (h, w):
            raise ValueError(f"{pred_dir}/{pred.image_id}.npz: size {pred.height}x{pred.width} differs from the "
                             f"image's {h}x{w}")
        decision, rles = pseudo_label_image(pred, thresholds, doc["options"], settings, schema)
        decisions.append(decision)
        rows += [(pred.image_id, r, w, h, decision.cell_type, source) for r in rles]
    kept_ids = [d.image_id for d in decisions if d.kept]
    if not kept_ids:
        reasons = {r: n for r in REASONS if (n := sum(1 for d in decisions if d.reason == r))}
        raise ValueError(f"{pred_dir}: no image kept out of {len(decisions)} (dropped: {reasons}); nothing written "
                         f"(lower the screening thresholds or use --no-screen)")
    train_dir = out_dir / "train"
    (out_dir / SUMMARY_NAME).unlink(missing_ok=True)  # no pseudo.json until this output is complete
    train_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:  # an earlier output's images (links or copies made here) that this run does not keep
        for stale in train_dir.iterdir():
            if stale.is_symlink() or stale.is_file():
                stale.unlink()
    placed = {image_id: _place_image(find_image(image_dir, image_id), train_dir, link) for image_id in kept_ids}
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([CSV_COLUMNS, *rows])
    atomic.write_text(out_dir / "train.csv", buf.getvalue())
    if schema != SARTORIUS:  # the folder is a dataset of the same classes (cellkit train --extra-data)
        save_schema(schema, out_dir)
    summary = summary_document(source=source, pred_dir=pred_dir, image_dir=image_dir, thresholds_path=thresholds_path,
                               doc=doc, settings=settings, classes=schema.classes, decisions=decisions, placed=placed)
    atomic.write_json(out_dir / SUMMARY_NAME, summary)
    return summary
