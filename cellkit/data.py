"""The competition's ``train.csv`` and LIVECell's COCO json as detectron2 datasets.

``read_train_csv`` validates the table; ``load_sartorius_dicts`` turns it into detectron2 dataset dicts (one per
image: ``file_name, image_id, height, width, cell_type, annotations``; each annotation has an ``XYXY_ABS`` box from the
mask extent, a COCO compressed RLE ``segmentation`` and a ``category_id`` indexing the dataset's classes: those of
the ``dataset.json`` beside the CSV (:func:`cellkit.schema.schema_of`), else :data:`cellkit.CELL_TYPES`);
``register_sartorius`` and ``register_livecell`` put them into detectron2's ``DatasetCatalog``/``MetadataCatalog``,
idempotently, so that a re-run notebook cell does not crash.

Errors name the file and the line of the CSV (line 1 is the header, so data row ``i`` (0-based) is line ``i + 2``).

Decoding is done once per image and process: the per-image dicts are cached (keyed by the CSV's path, size and
modification time and by the image directory) and copies are handed out, so that registering five folds of the same
CSV decodes each mask once.
"""
import glob
import logging
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
from PIL import Image
from pycocotools import mask as mask_util
from tqdm.auto import tqdm

from cellkit import folds, rle
from cellkit.schema import schema_of

__all__ = [
    "REQUIRED_COLUMNS", "IMAGE_EXTENSIONS", "LIVECELL_CELL_LINES",
    "read_train_csv", "find_image", "load_sartorius_dicts", "register_sartorius", "register_livecell",
    "clear_cache", "IMAGE_MODES", "open_image", "read_image_array", "SIXTEEN_BIT_MODES", "to_8bit",
]

logger = logging.getLogger(__name__)

#: Columns every competition-format train CSV has.
REQUIRED_COLUMNS = ("id", "annotation", "width", "height", "cell_type")

#: Image file suffixes :func:`find_image` tries, in order.
IMAGE_EXTENSIONS = (".png", ".tif", ".tiff", ".jpg", ".jpeg")

#: PIL modes of 8-bit images cellkit reads (the competition's PNGs and LIVECell's TIFs are ``L``); any other mode
#: (16-bit ``I;16``, 32-bit ``I``/``F``, ``CMYK``, ...) is an error, not a silent conversion.
IMAGE_MODES = ("L", "P", "RGB", "RGBA", "LA")

#: LIVECell's eight cell lines (category-id order when registering with ``cell_line_classes=True``); a LIVECell image
#: file name starts with its cell line, e.g. ``A172_Phase_C7_1_00d20h00m_4.tif``.
LIVECELL_CELL_LINES = ("A172", "BT474", "BV2", "Huh7", "MCF7", "SHSY5Y", "SkBr3", "SKOV3")

# Caches: CSV key -> validated frame; (CSV key, image dir, image id) -> dataset dict.
_TABLES: dict[tuple, pd.DataFrame] = {}
_DICTS: dict[tuple, dict] = {}


def clear_cache() -> None:
    """Forget every cached table and dataset dict (e.g. after editing a CSV in place within the same second)."""
    _TABLES.clear()
    _DICTS.clear()


def _line(row: int) -> int:  # the CSV line (1-based, header = line 1) of 0-based data row ``row``
    return int(row) + 2


# --------------------------------------------------------------------------------------------------------- table
def read_train_csv(path: str | os.PathLike) -> pd.DataFrame:
    """Read and validate a competition-format train CSV.

    Args:
        path: CSV with columns ``id, annotation, width, height, cell_type`` (and optionally ``plate_time,
            sample_date, sample_id, elapsed_timedelta``). One row per instance mask; an empty ``annotation`` is
            allowed (it is dropped when building dataset dicts).

    Returns:
        DataFrame with a RangeIndex (row ``i`` is line ``i + 2`` of the file); ``id``, ``annotation`` (``""`` when
        empty), ``cell_type`` (and ``sample_id`` when present) as str, ``width``/``height`` as int64.
        ``df.attrs["path"]`` holds the file's path. Masks strings are not parsed here (see
        :func:`load_sartorius_dicts`).

    Raises:
        FileNotFoundError: no such file.
        ValueError: empty CSV, no data rows, a missing column, an empty id, a non-integer or non-positive width or
            height, an image whose rows disagree on width/height, an unknown cell type. The message names the file
            and the line.
    """
    path = Path(path)
    key = _file_key(path)
    if key in _TABLES:
        return _TABLES[key].copy()
    df = folds._read_table(path, REQUIRED_COLUMNS, {"id": str, "annotation": str, "cell_type": str, "sample_id": str},
                           {"width": [""], "height": [""]}, "empty CSV (no header)", "no data rows (only a header)")
    df = df.reset_index(drop=True)
    df["id"] = df["id"].str.strip()
    _check_rows(path, df["id"] != "", lambda i: f"{path} line {_line(i)}: empty image id")
    for col in ("width", "height"):
        values = pd.to_numeric(df[col], errors="coerce")
        _check_rows(path, values.notna() & (values > 0) & (values == np.round(values)),
                    lambda i: f"{path} line {_line(i)}: {col} {str(df[col].iloc[i])!r} is not a positive integer")
        df[col] = values.astype(np.int64)
    df["cell_type"] = df["cell_type"].str.strip()
    schema = schema_of(path.parent)
    _check_rows(path, df["cell_type"].isin(schema.classes),
                lambda i: f"{path} line {_line(i)} (id {df['id'].iloc[i]}): unknown cell type "
                          f"{df['cell_type'].iloc[i]!r} (expected one of {', '.join(schema.classes)})")
    if schema.size is not None:
        _check_rows(path, (df["height"] == schema.size[0]) & (df["width"] == schema.size[1]),
                    lambda i: f"{path} line {_line(i)} (id {df['id'].iloc[i]}): size {df['width'].iloc[i]}x"
                              f"{df['height'].iloc[i]}, but {path.parent / 'dataset.json'} requires every image "
                              f"to be {schema.size[1]}x{schema.size[0]}")
    first = df.groupby("id", sort=False)[["width", "height"]].transform("first")
    _check_rows(path, (first["width"] == df["width"]) & (first["height"] == df["height"]),
                lambda i: f"{path} line {_line(i)} (id {df['id'].iloc[i]}): size {df['width'].iloc[i]}x"
                          f"{df['height'].iloc[i]} differs from the image's earlier rows "
                          f"({first['width'].iloc[i]}x{first['height'].iloc[i]})")
    df.attrs["path"] = str(path)
    _TABLES[key] = df
    return df.copy()


def _file_key(path: Path) -> tuple:
    """Cache key of a file: resolved path, size, mtime (FileNotFoundError naming the file when it is missing)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    if not path.is_file():
        raise ValueError(f"{path}: not a file")
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


_MAX_LINES = 20  # further bad lines listed after the first one in a table error


def _check_rows(path: Path, ok: pd.Series, message) -> None:
    """One ValueError for every row where ``ok`` is False: ``message(first bad row)``, then the lines of the others
    (up to a cap)."""
    bad = np.flatnonzero(~ok.to_numpy())
    if bad.size:
        text = message(bad[0])
        if bad.size > 1:
            others = ", ".join(str(_line(i)) for i in bad[1:1 + _MAX_LINES])
            more = f" and {bad.size - 1 - _MAX_LINES} more" if bad.size - 1 > _MAX_LINES else ""
            text += f"; the same problem on {bad.size - 1} more line(s) of {path}: {others}{more}"
        raise ValueError(text)


# --------------------------------------------------------------------------------------------------------- images
def find_image(image_dir: str | os.PathLike, image_id: str) -> Path:
    """Path of the image ``<image_dir>/<image_id>.<ext>`` for the first ext of :data:`IMAGE_EXTENSIONS` that exists
    (the extension in any case: ``a.PNG`` is found like ``a.png``, as :func:`cellkit.predict.list_images` lists it).

    Raises:
        FileNotFoundError: ``image_dir`` is missing, or no file with a known extension exists; names both.
    """
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir}: image directory does not exist")
    for ext in IMAGE_EXTENSIONS:
        candidate = image_dir / f"{image_id}{ext}"
        if candidate.is_file():
            return candidate
    for candidate in sorted(image_dir.glob(f"{glob.escape(image_id)}.*")):
        if candidate.suffix.lower() in IMAGE_EXTENSIONS and candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{image_dir}: no image for id {image_id!r} (tried {', '.join(IMAGE_EXTENSIONS)})")


#: 16-bit grayscale PIL modes: read where test images are read (through :func:`to_8bit`); a training layout holds
#: 8-bit images (``cellkit import`` converts 16-bit ones the same way)
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")


def to_8bit(image):
    """A PIL image as the model sees it: 8-bit images as they are; a 16-bit grayscale image stretched linearly so
    that its 0.5th..99.5th percentiles span 0..255 (per image; the same for train images at import and test images
    at prediction). Returns a PIL image."""
    if image.mode not in SIXTEEN_BIT_MODES:
        return image
    array = np.asarray(image).astype(np.float64)
    lo, hi = np.percentile(array, (0.5, 99.5))
    scaled = (array - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(array)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def open_image(path: str | os.PathLike, size: tuple[int, int] | None = None, sixteen_bit: bool = False):
    """Open and decode an image completely, so that a broken file fails here, naming it, not later.

    Args:
        path: the image file.
        size: expected ``(width, height)``; ``None`` accepts any size.
        sixteen_bit: also accept :data:`SIXTEEN_BIT_MODES` (images to predict; :func:`to_8bit` reads them).

    Returns:
        A loaded ``PIL.Image.Image`` of a mode in :data:`IMAGE_MODES` (pixel data read; the file is closed).

    Raises:
        FileNotFoundError: no such file (naming it).
        ValueError: ``"<path>: ..."`` for an unreadable (not an image, truncated, corrupt) file, a mode outside
            :data:`IMAGE_MODES`, or a size other than ``size``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        with Image.open(path) as image:
            image.load()  # decodes every pixel: a truncated file raises OSError here
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{path}: cannot read image ({exc})") from None
    if image.mode not in IMAGE_MODES + (SIXTEEN_BIT_MODES if sixteen_bit else ()):
        hint = "; `cellkit import` converts 16-bit images to 8-bit" if image.mode in SIXTEEN_BIT_MODES else ""
        raise ValueError(f"{path}: image mode {image.mode!r} is not an 8-bit mode ({', '.join(IMAGE_MODES)}){hint}")
    if size is not None and tuple(image.size) != tuple(size):
        raise ValueError(f"{path}: image is {image.size[0]}x{image.size[1]} (WxH), expected {size[0]}x{size[1]}")
    return image


def read_image_array(path: str | os.PathLike) -> np.ndarray:
    """An image file as a uint8 array: ``(H, W)`` for grayscale, ``(H, W, C)`` otherwise (palette images expanded
    to RGB). Errors as :func:`open_image`."""
    image = open_image(path)
    if image.mode == "P":
        image = image.convert("RGB")
    return np.asarray(image)


# --------------------------------------------------------------------------------------------------------- dicts
def load_sartorius_dicts(csv_path: str | os.PathLike, image_dir: str | os.PathLike,
                         image_ids: Iterable[str] | None = None) -> list[dict]:
    """detectron2 dataset dicts of a competition-format train CSV.

    Args:
        csv_path: the train CSV (see :func:`read_train_csv`).
        image_dir: folder holding ``<id>.png`` (or another of :data:`IMAGE_EXTENSIONS`).
        image_ids: images to load, in this order; ``None`` = every image of the CSV, in order of first appearance.

    Returns:
        One dict per image: ``file_name`` (str), ``image_id`` (str), ``height``, ``width`` (int), ``cell_type``
        (str), ``annotations``: list of ``{"bbox": [x0, y0, x1, y1] (float, XYXY_ABS, exclusive end), "bbox_mode":
        BoxMode.XYXY_ABS, "segmentation": {"size": [H, W], "counts": str} (COCO compressed RLE, column-major),
        "category_id": int (index into the dataset's classes), "iscrowd": 0}``, in CSV order. Rows with an empty
        annotation are dropped (their count is logged). Fresh copies each call: callers may mutate them.

    Raises:
        FileNotFoundError: missing CSV, image directory or image (naming the CSV line that needs it).
        ValueError: any :func:`read_train_csv` error; an image whose size (read from its header) differs from the
            CSV's width/height; a malformed mask string (line, id and the parser's message); an id not in the CSV.
    """
    csv_path = Path(csv_path)
    table = read_train_csv(csv_path)
    key = (_file_key(csv_path), str(Path(image_dir).resolve()))
    rows_by_id = table.groupby("id", sort=False).indices
    image_ids = list(rows_by_id) if image_ids is None else [str(i) for i in image_ids]
    unknown = [i for i in image_ids if i not in rows_by_id]
    if unknown:
        raise ValueError(f"{csv_path}: {len(unknown)} image id(s) not in the CSV, e.g. {unknown[0]!r}")
    todo = [i for i in image_ids if (key, i) not in _DICTS]
    dropped = 0
    columns = {c: table[c].to_numpy() for c in ("id", "annotation", "width", "height", "cell_type")}
    columns["category_id"] = table["cell_type"].map(schema_of(csv_path.parent).classes.index).to_numpy()
    # a tqdm bar when there are many (decoding every real image takes seconds)
    for image_id in tqdm(todo, desc=f"decoding {csv_path.name}", unit="img", leave=False, disable=len(todo) < 50):
        _DICTS[(key, image_id)], n_empty = _image_dict(columns, rows_by_id[image_id], csv_path, Path(image_dir))
        dropped += n_empty
    if dropped:
        logger.warning("%s: dropped %d empty annotation(s)", csv_path, dropped)
    records = [_DICTS[(key, i)] for i in image_ids]
    # copies deep enough that mutating them (as mappers and filters do) cannot reach the cache
    return [{**r, "annotations": [{**a, "bbox": list(a["bbox"]), "segmentation": dict(a["segmentation"])}
                                  for a in r["annotations"]]} for r in records]


def _image_dict(columns: dict[str, np.ndarray], rows: np.ndarray, csv_path: Path,
                image_dir: Path) -> tuple[dict, int]:
    """Dataset dict of one image and the number of empty annotations dropped.

    ``columns``: the CSV's columns as arrays; ``rows``: the image's 0-based rows.
    """
    from detectron2.structures import BoxMode

    first = int(rows[0])
    image_id = str(columns["id"][first])
    width, height = int(columns["width"][first]), int(columns["height"][first])
    where = f"{csv_path} line {_line(first)} (id {image_id})"
    try:
        file_name = find_image(image_dir, image_id)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{where}: {exc}") from None
    try:
        with Image.open(file_name) as im:  # the header only: PIL opens lazily
            actual = im.size
    except (OSError, SyntaxError, ValueError) as exc:  # PIL.UnidentifiedImageError is an OSError
        raise ValueError(f"{file_name}: cannot read image ({exc})") from None
    if actual != (width, height):
        raise ValueError(f"{where}: image {file_name} is {actual[0]}x{actual[1]} (WxH), the CSV says {width}x{height}")
    runs, kept = [], []
    for row in rows:
        try:
            starts, lengths = rle.parse(columns["annotation"][row], (height, width))
        except ValueError as exc:
            raise ValueError(f"{csv_path} line {_line(row)} (id {image_id}): bad annotation: {exc}") from None
        if len(starts):
            runs.append((starts, lengths))
            kept.append(int(row))
    segmentations = rle.to_coco_many(runs, (height, width))
    # XYXY_ABS boxes: the masks' pixel extent, exclusive end (x1 = max x + 1)
    coco = [{"size": s["size"], "counts": s["counts"].encode("ascii")} for s in segmentations]
    xywh = np.asarray(mask_util.toBbox(coco), dtype=np.float64).reshape(-1, 4)
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    annotations = [
        {"bbox": box.tolist(), "bbox_mode": BoxMode.XYXY_ABS, "segmentation": seg,
         "category_id": int(columns["category_id"][row]), "iscrowd": 0}
        for box, seg, row in zip(boxes, segmentations, kept)
    ]
    return {"file_name": str(file_name), "image_id": image_id, "height": height, "width": width,
            "cell_type": str(columns["cell_type"][first]), "annotations": annotations}, len(rows) - len(kept)


# --------------------------------------------------------------------------------------------------------- catalog
def register_sartorius(name: str, csv_path: str | os.PathLike, image_dir: str | os.PathLike,
                       folds_csv: str | os.PathLike | None = None, fold: int | None = None,
                       split: str = "train", exclude: Iterable[str] = ()) -> str:
    """Register a competition-format dataset (or one fold split of it) in detectron2's catalogs.

    The CSV (and folds file) are validated now, so mistakes surface at registration; masks are decoded lazily, when
    ``DatasetCatalog.get(name)`` is first called, and cached per image. Registering an existing name replaces it.

    Args:
        name: dataset name, e.g. ``"sartorius_fold0_train"``.
        csv_path: competition-format train CSV.
        image_dir: folder of its images.
        folds_csv: a ``folds.csv`` (see :mod:`cellkit.folds`); ``None`` registers every image of the CSV.
        fold: the fold to split on; required with ``folds_csv``.
        split: ``"train"`` (every image not in ``fold``) or ``"val"`` (the images of ``fold``).
        exclude: image ids left out of this dataset (e.g. the training split without the images a label audit
            flagged, :func:`cellkit.audit.exclusion_ids`); each must be in the CSV. Ids of other splits are ignored.

    Returns:
        ``name``. Its metadata: ``thing_classes`` = the dataset's classes, ``evaluator_type="sartorius"``, ``csv_file``,
        ``image_root``, ``folds_csv``, ``fold``, ``split``, ``image_ids`` (tuple, without the excluded ones),
        ``excluded`` (tuple: the ids of ``exclude`` that were in this split and are left out).

    Raises:
        ValueError: ``fold``/``split`` inconsistent with ``folds_csv``; folds ids missing from the CSV; excluded ids
            missing from the CSV; nothing left after the exclusion; any :func:`read_train_csv` or
            :func:`cellkit.folds.read_folds` error.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    csv_path, image_dir = Path(csv_path), Path(image_dir)
    table = read_train_csv(csv_path)
    if (fold is None) != (folds_csv is None):
        given = f"fold={fold} given without folds_csv" if folds_csv is None else "folds_csv given without fold"
        raise ValueError(f"register_sartorius({name!r}): {given}")
    if folds_csv is None:
        image_ids = list(dict.fromkeys(table["id"]))
    else:
        image_ids = folds.fold_ids(folds.read_folds(folds_csv), fold, split)
        missing = sorted(set(image_ids) - set(table["id"]))
        if missing:
            raise ValueError(f"{folds_csv}: {len(missing)} id(s) not in {csv_path}, e.g. {missing[0]!r}")
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir}: image directory does not exist")
    exclude = {str(i) for i in exclude}
    unknown = sorted(exclude - set(table["id"]))
    if unknown:
        raise ValueError(f"register_sartorius({name!r}): {len(unknown)} excluded id(s) not in {csv_path}, e.g. "
                         f"{unknown[0]!r}")
    excluded = tuple(i for i in image_ids if i in exclude)
    ids = tuple(i for i in image_ids if i not in exclude)
    if not ids:
        raise ValueError(f"register_sartorius({name!r}): excluding {len(excluded)} image(s) leaves none in the "
                         f"{split} split of {csv_path}")
    DatasetCatalog.pop(name, None)  # registering an existing name replaces it (re-run notebook cells)
    MetadataCatalog.pop(name, None)
    DatasetCatalog.register(name, lambda: load_sartorius_dicts(csv_path, image_dir, ids))
    MetadataCatalog.get(name).set(
        thing_classes=list(schema_of(Path(csv_path).parent).classes), evaluator_type="sartorius",
        csv_file=str(csv_path),
        image_root=str(image_dir), folds_csv=None if folds_csv is None else str(folds_csv), fold=fold,
        split=split if folds_csv is not None else "all", image_ids=ids, excluded=excluded,
    )
    return name


def register_livecell(name: str, json_path: str | os.PathLike, image_root: str | os.PathLike,
                      cell_line_classes: bool = False) -> str:
    """Register a LIVECell COCO json (polygon annotations) in detectron2's catalogs; replaces an existing ``name``.

    Args:
        name: dataset name, e.g. ``"livecell_train"``.
        json_path: LIVECell COCO annotation file.
        image_root: folder of its TIFs.
        cell_line_classes: ``False`` keeps the json's own categories (detectron2's ``register_coco_instances``; its
            ``thing_classes`` are filled in when the json is first loaded). ``True`` makes each image's cell line
            (the prefix of its file name) the class of all its cells, with ``thing_classes`` =
            :data:`LIVECELL_CELL_LINES` set now.

    Returns:
        ``name``.

    Raises:
        FileNotFoundError: the json or the image folder is missing.
        ValueError: (when loading, with ``cell_line_classes``) a file name without a known cell-line prefix.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import load_coco_json, register_coco_instances

    json_path, image_root = Path(json_path), Path(image_root)
    if not json_path.is_file():
        raise FileNotFoundError(f"{json_path}: no such LIVECell json")
    if not image_root.is_dir():
        raise FileNotFoundError(f"{image_root}: LIVECell image folder does not exist")
    DatasetCatalog.pop(name, None)
    MetadataCatalog.pop(name, None)
    if not cell_line_classes:
        register_coco_instances(name, {}, str(json_path), str(image_root))
        return name

    def load() -> list[dict]:
        records = load_coco_json(str(json_path), str(image_root))  # no dataset name: leaves our metadata alone
        for record in records:
            category = _cell_line(record["file_name"], json_path)
            for ann in record["annotations"]:
                ann["category_id"] = category
        return records

    DatasetCatalog.register(name, load)
    # no ``json_file``: the json's categories are not these, so a COCOEvaluator must convert the dicts instead
    MetadataCatalog.get(name).set(thing_classes=list(LIVECELL_CELL_LINES), livecell_json=str(json_path),
                                  image_root=str(image_root), evaluator_type="coco")
    return name


def _cell_line(file_name: str, json_path: Path) -> int:
    """Index in LIVECELL_CELL_LINES of the cell line prefixing ``file_name`` (``A172_Phase_...``)."""
    prefix = Path(file_name).name.split("_", 1)[0]
    lowered = [c.lower() for c in LIVECELL_CELL_LINES]
    if prefix.lower() not in lowered:
        raise ValueError(f"{json_path}: image {Path(file_name).name!r} does not start with a LIVECell cell line "
                         f"({', '.join(LIVECELL_CELL_LINES)})")
    return lowered.index(prefix.lower())


def exclusion_ids(path, known_ids, top: int = 0) -> list[str]:
    """The image ids an exclusion file names, checked against the training data.

    Args:
        path: a text file with one image id per line (blank lines and ``#`` comments ignored), a CSV whose header
            has an ``id`` column (every row's id), or an ``audit.csv`` (columns ``id`` and ``score``), of which the
            ``top`` highest-scoring images are taken (ties: file order).
        known_ids: the ids of the train CSV.
        top: with an audit.csv, how many of its images; must be > 0 there and 0 for a plain list.

    Returns:
        The ids, in file (or score) order, without repeats.

    Raises:
        FileNotFoundError: no such file.
        ValueError: naming the file: ``top`` given for a plain list or missing for an audit.csv, ``top`` < 0, an
            empty list, or ids that are not in ``known_ids`` (their count and the first few).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such exclusion file")
    if top < 0:
        raise ValueError(f"{path}: --exclude-top must be >= 0, got {top}")
    text = path.read_text(encoding="utf-8")
    first = next((line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")),
                 "")
    header = [c.strip() for c in first.split(",")]
    frame = pd.read_csv(path, dtype={"id": str}, keep_default_na=False, comment="#") if "id" in header else None
    scored = frame is not None and "score" in header
    if scored and top <= 0:
        raise ValueError(f"{path}: an audit.csv lists every audited image: give --exclude-top N (the N "
                         f"highest-scoring images are excluded)")
    if top and not scored:
        raise ValueError(f"{path}: --exclude-top needs an audit.csv (with a score column); this file is a plain "
                         f"list of ids")
    if scored:  # the ``top`` highest scores, ties in file order
        scores = pd.to_numeric(frame["score"], errors="coerce")
        if scores.isna().any():
            bad = int(np.flatnonzero(scores.isna().to_numpy())[0])
            raise ValueError(f"{path} line {bad + 2}: score {frame['score'].iloc[bad]!r} is not a number")
        frame = frame.iloc[np.argsort(-scores.to_numpy(), kind="stable")[:top]]
    ids = [str(i).strip() for i in frame["id"]] if frame is not None else [
        line.split("#", 1)[0].strip() for line in text.splitlines()]
    ids = [i for i in dict.fromkeys(ids) if i]
    if not ids:
        raise ValueError(f"{path}: the exclusion file names no image id")
    known = set(map(str, known_ids))
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} excluded id(s) are not in the train CSV, e.g. "
                         f"{', '.join(repr(i) for i in unknown[:3])}")
    return ids

