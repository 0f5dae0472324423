"""``cellkit import``: a dataset in its own format -> the kit's layout, checked before anything is written.

Three formats:

- ``csv``: a competition CSV, one row per instance: an id column, a mask-string column (row- or column-major,
  1-indexed) and a class column, named by the caller; images ``<images>/<id>.<ext>``;
- ``coco``: a COCO json (polygons, compressed or uncompressed RLE); classes are its categories in id order;
- ``masks``: a per-instance mask folder (the 2018 Data Science Bowl): ``<root>/<id>/images/<id>.png`` and
  ``<root>/<id>/masks/*.png``, one PNG per object (nonzero = inside); one class.

The kit's layout, written into a new directory (built beside it and renamed into place, so nothing is half-written)::

    out/train.csv      id, annotation, width, height, cell_type   (row-major, 1-indexed; cell_type holds the class)
    out/train/<id>.*   the images, copied as they are (16-bit ones as the 8-bit PNG the model reads,
                       :func:`cellkit.data.to_8bit`)
    out/test/<id>.*    test images (optional), copied the same way
    out/dataset.json   the schema (:mod:`cellkit.schema`): classes, groups, RLE order, submission columns, image
                       channels, bit depth and size

Checked before any file is written, each error naming the file and the row (CSV line, COCO annotation id, mask
file): a missing image, an annotation outside its image, an image whose size differs from the one required, a
class listed with no annotation, an image id outside the group pattern.
"""

import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from cellkit import atomic, rle, schema as S
from cellkit.data import IMAGE_EXTENSIONS, SIXTEEN_BIT_MODES, to_8bit

__all__ = ["import_csv", "import_coco", "import_masks", "image_format"]


def image_format(path) -> tuple[tuple[int, int], int, int]:
    """``((height, width), channels, bit_depth)`` of an image file, read from its header.

    Raises:
        ValueError: naming the file, for a mode the kit does not read (float, CMYK, ...).
    """
    with Image.open(path) as img:
        mode, (width, height) = img.mode, img.size
    if mode in ("L", "P", "1"):
        return (height, width), 1, 8
    if mode in SIXTEEN_BIT_MODES:
        return (height, width), 1, 16
    if mode in ("RGB", "RGBA"):
        return (height, width), 3, 8
    raise ValueError(f"{path}: image mode {mode!r} is not read by cellkit (8/16-bit grayscale or 8-bit RGB)")


def _find_images(directory: Path) -> dict[str, Path]:
    """``{stem: path}`` of the images in ``directory``, or of ``<id>/images/<id>.*`` folders (a mask folder's test
    set)."""
    if not directory.is_dir():
        raise ValueError(f"{directory}: no such image directory")
    found = {}
    for path in sorted(directory.iterdir()):
        if path.is_dir() and (path / "images").is_dir():
            found.update({k: v for k, v in _find_images(path / "images").items() if k == path.name})
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.stem not in found:
            found[path.stem] = path
    return found


def _names(given, found: Sequence[str], what: str, where: str) -> tuple[str, ...]:
    """The class or group names: ``given`` (checked against what the data holds) or those found, sorted."""
    if given is None:
        return tuple(sorted(set(found)))
    given = tuple(given)
    unknown = sorted(set(found) - set(given))
    if unknown:
        raise ValueError(f"{where}: {what} {unknown[0]!r} is not one of those given ({', '.join(given)})")
    empty = [name for name in given if name not in set(found)]
    if empty:
        raise ValueError(f"{where}: {what} {empty[0]!r} has no " + ("annotation" if what == "class" else "image"))
    return given


def _write(out, records: list[tuple], shapes: dict[str, tuple[int, int]], images: dict[str, Path], test_images,
           classes, submission_columns, **fields) -> S.DatasetSchema:
    """The import's rows (:func:`_table`), test images and checked schema (:func:`_schema`, ``fields`` its keywords);
    the layout written into a temporary sibling of ``out``, then renamed into place. Returns the schema."""
    rows = _table(records, shapes)
    test = _find_images(Path(test_images)) if test_images else {}
    schema = _schema(classes, rows, list(images) + list(test), submission_columns=tuple(submission_columns), **fields)
    out = Path(out)
    rows = rows.assign(cell_type=rows["cell_type"].replace("", schema.classes[0]))  # an image without instances
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: exists and is not empty (import writes a new dataset directory)")
    with atomic.atomic_dir(out, "import") as tmp:  # an empty out is replaced
        for split, files in (("train", images), ("test", test)):
            if not files:
                continue
            (tmp / split).mkdir()
            for image_id, src in tqdm(sorted(files.items()), desc=f"import {split}", unit="img", leave=False):
                _copy_image(src, tmp / split, image_id)
        rows.to_csv(tmp / "train.csv", index=False)
        S.save_schema(schema, tmp)
    return schema


def _copy_image(src: Path, folder: Path, image_id: str) -> None:
    """An image into the layout: as it is, or, 16-bit, as the 8-bit PNG the model reads (:func:`cellkit.data.to_8bit`;
    test images are read the same way at prediction)."""
    with Image.open(src) as img:
        sixteen = img.mode in SIXTEEN_BIT_MODES
        if sixteen:
            to_8bit(img).save(folder / f"{image_id}.png")
    if not sixteen:
        shutil.copyfile(src, folder / f"{image_id}{src.suffix}")


def _survey(images: dict[str, Path], size, where: str) -> dict:
    """Channels, bit depth and (checked) size of the images, as schema fields."""
    shapes, channels, depths = {}, set(), set()
    for image_id, path in images.items():
        shape, c, d = image_format(path)
        if size is not None and shape != tuple(size):
            raise ValueError(f"{path}: {shape[1]}x{shape[0]} image, but {where} requires every image to be "
                             f"{size[1]}x{size[0]} (width x height)")
        shapes[image_id] = shape
        channels.add(c)
        depths.add(d)
    if 16 in depths and 3 in channels:
        raise ValueError(f"{where}: 16-bit and RGB images mixed; cellkit reads 16-bit grayscale or 8-bit RGB")
    return {"shapes": shapes, "channels": max(channels, default=1), "bit_depth": max(depths, default=8)}


def _schema(classes, rows: pd.DataFrame, image_ids, *, group_pattern, groups, where: str, **fields) -> S.DatasetSchema:
    classes = _names(classes, rows.loc[rows["annotation"] != "", "cell_type"].tolist(), "class", where)
    if group_pattern is None:
        return S.DatasetSchema(classes=classes, **fields)
    probe = S.DatasetSchema(classes=classes, groups=groups or ("x",), group_by="pattern", group_pattern=group_pattern)
    found = []
    for image_id in image_ids:
        match = re.search(probe.group_pattern, image_id)
        if match is None:
            raise ValueError(f"{where}: image {image_id!r} does not match the group pattern {group_pattern!r}")
        found.append(match.group(1))
    return S.DatasetSchema(classes=classes, groups=_names(groups, found, "group", where), group_by="pattern",
                           group_pattern=group_pattern, **fields)


def _table(records: list[tuple], shapes: dict[str, tuple[int, int]]) -> pd.DataFrame:
    """The kit's train.csv rows (an image without any instance gets one row with an empty annotation and, when
    written, the first class)."""
    seen = {r[0] for r in records}
    records = records + [(i, "", "") for i in shapes if i not in seen]
    frame = pd.DataFrame(records, columns=["id", "annotation", "cell_type"])
    frame.insert(2, "width", [shapes[i][1] for i in frame["id"]])
    frame.insert(3, "height", [shapes[i][0] for i in frame["id"]])
    return frame


def import_csv(csv_path, images, out, *, class_column: str = "cell_type", id_column: str = "id",
               annotation_column: str = "annotation", rle_order: str = "row", classes=None, group_pattern=None,
               groups=None, size=None, test_images=None, submission_columns=("id", "predicted"),
               name: str = "dataset") -> S.DatasetSchema:
    """A competition CSV (one row per instance) -> the kit's layout in ``out``; returns the schema written.

    Args:
        csv_path: the CSV; ``id_column`` names the image (file stem in ``images``), ``annotation_column`` holds the
            1-indexed mask string in ``rle_order`` (``"row"`` or ``"column"``), ``class_column`` the class (a
            constant class for every row when the column is absent and ``classes`` has one name).
        images: directory of ``<id>.<ext>`` images; test_images: optional directory of test images.
        classes / groups: the names in category-id / group order; default: those in the data, sorted. Each must
            have an annotation / an image.
        group_pattern: regex whose first capture group, searched in the image id, is the image's group (None: the
            group is the class).
        size: ``(height, width)`` every image must have (None: sizes may vary).

    Raises:
        ValueError: naming the file and CSV line (the header is line 1) of the first problem.
    """
    csv_path = Path(csv_path)
    frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    constant = class_column not in frame and classes is not None and len(classes) == 1
    for column in (id_column, annotation_column) + (() if constant else (class_column,)):
        if column not in frame:
            raise ValueError(f"{csv_path}: no column {column!r} (columns: {', '.join(frame.columns)})")
    found = _find_images(Path(images))
    missing = [i for i, image_id in enumerate(frame[id_column]) if image_id not in found]
    if missing:
        raise ValueError(f"{csv_path}: line {missing[0] + 2}: no image {frame[id_column].iloc[missing[0]]!r} "
                         f"in {images}")
    used = {i: found[i] for i in dict.fromkeys(frame[id_column])}
    survey = _survey(used, size, str(csv_path))
    records = []
    for i, (image_id, text, cls) in enumerate(tqdm(zip(frame[id_column], frame[annotation_column],
                                                       [classes[0]] * len(frame) if constant else frame[class_column]),
                                                   total=len(frame), desc="read masks", leave=False)):
        try:
            mask = rle.convert_order(text, survey["shapes"][image_id], rle_order, "row")
        except ValueError as exc:
            raise ValueError(f"{csv_path}: line {i + 2}: image {image_id!r}: {exc}") from None
        if mask and not cls:
            raise ValueError(f"{csv_path}: line {i + 2}: empty class")
        records.append((image_id, mask, cls))
    return _write(out, records, survey["shapes"], used, test_images, classes, submission_columns,
                  group_pattern=group_pattern, groups=groups, where=str(csv_path), rle_order=rle_order,
                  channels=survey["channels"], bit_depth=survey["bit_depth"], size=size, name=name)


def _coco_mask(ann: dict, shape: tuple[int, int], where: str) -> str:
    height, width = shape
    segm = ann.get("segmentation")
    if isinstance(segm, list):
        for poly in segm:
            xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
            outside = (xy[:, 0] < 0) | (xy[:, 0] > width) | (xy[:, 1] < 0) | (xy[:, 1] > height)
            if outside.any():
                x, y = xy[np.flatnonzero(outside)[0]]
                raise ValueError(f"{where}: polygon point ({x:g}, {y:g}) is outside the {width}x{height} image")
    elif isinstance(segm, dict):
        if [int(v) for v in segm.get("size", ())] != [height, width]:
            raise ValueError(f"{where}: RLE size {segm.get('size')} is not the image's [{height}, {width}]")
    else:
        raise ValueError(f"{where}: no polygon or RLE segmentation")
    return rle.from_coco(rle.coco_segmentation(segm, height, width))


def _read_coco(json_path: Path) -> dict:
    doc = S.load_json(json_path)
    for key in ("images", "annotations", "categories"):
        if key not in doc:
            raise ValueError(f"{json_path}: no {key!r} (a COCO json has images, annotations, categories)")
    if isinstance(doc["annotations"], dict):  # LIVECell's full files key annotations by id
        doc["annotations"] = list(doc["annotations"].values())
    return doc


def _coco_records(json_path: Path, doc: dict, found: dict[str, Path], size, images) -> tuple[dict, dict, list]:
    """One json's images (checked against their files) and ``(id, row-major mask, class)`` records."""
    category = {c["id"]: c["name"] for c in doc["categories"]}
    used, by_id = {}, {}
    for entry in doc["images"]:
        stem = Path(entry["file_name"]).stem
        if stem not in found:
            raise ValueError(f"{json_path}: image {entry['id']}: no file {entry['file_name']!r} in {images}")
        used[stem], by_id[entry["id"]] = found[stem], stem
    survey = _survey(used, size, str(json_path))
    for entry in doc["images"]:
        shape = survey["shapes"][by_id[entry["id"]]]
        if (int(entry.get("height", shape[0])), int(entry.get("width", shape[1]))) != shape:
            raise ValueError(f"{json_path}: image {entry['id']}: json says {entry.get('width')}x{entry.get('height')}, "
                             f"the file is {shape[1]}x{shape[0]}")
    records = []
    for ann in tqdm(doc["annotations"], desc="read masks", leave=False):
        where = f"{json_path}: annotation {ann.get('id')}"
        if ann.get("image_id") not in by_id or ann.get("category_id") not in category:
            raise ValueError(f"{where}: unknown image_id {ann.get('image_id')!r} or category_id "
                             f"{ann.get('category_id')!r}")
        image_id = by_id[ann["image_id"]]
        records.append((image_id, _coco_mask(ann, survey["shapes"][image_id], where), category[ann["category_id"]]))
    return used, survey, records


def import_coco(json_paths, images, out, *, group_pattern=None, groups=None, size=None, test_images=None,
                rle_order: str = "row", submission_columns=("id", "predicted"), name: str = "dataset"
                ) -> S.DatasetSchema:
    """COCO json files (polygons or RLE) -> the kit's layout in ``out``; classes are the categories in id order.

    Args:
        json_paths: one json or several (e.g. LIVECell's val and test files); they must list the same categories.
        images: the directory holding every json's images; image ids are the file stems of ``file_name``.
        Other arguments as :func:`import_csv`.

    Raises:
        ValueError: naming the json and the annotation id of the first problem (a point outside its image, an
            unknown image or category, a category without annotation, jsons with other categories).
    """
    paths = [Path(json_paths)] if isinstance(json_paths, (str, os.PathLike)) else [Path(p) for p in json_paths]
    found = _find_images(Path(images))
    used, shapes, records, categories, channels, depths = {}, {}, [], None, set(), set()
    for path in paths:
        doc = _read_coco(path)
        names = [c["name"] for c in sorted(doc["categories"], key=lambda c: c["id"])]
        if categories is not None and names != categories:
            raise ValueError(f"{path}: categories {names} differ from {paths[0]}'s {categories}")
        categories = names
        part, survey, part_records = _coco_records(path, doc, found, size, images)
        used.update(part)
        shapes.update(survey["shapes"])
        channels.add(survey["channels"])
        depths.add(survey["bit_depth"])
        records += part_records
    return _write(out, records, shapes, used, test_images, categories, submission_columns, group_pattern=group_pattern,
                  groups=groups, where=str(paths[0]), rle_order=rle_order, channels=max(channels),
                  bit_depth=max(depths), size=size, name=name)


def import_masks(root, out, *, class_name: str = "cell", rle_order: str = "column", size=None, test_images=None,
                 submission_columns=("ImageId", "EncodedPixels"), name: str = "dataset") -> S.DatasetSchema:
    """A per-instance mask folder (``<root>/<id>/images/<id>.png``, ``<root>/<id>/masks/*.png``) -> ``out``.

    One class (``class_name``), one group; the submission is written in ``rle_order`` (column-major by default, as the
    2018 Data Science Bowl's) with ``submission_columns``. Other arguments as :func:`import_csv`.

    Raises:
        ValueError: naming the file: an image folder without its image, a mask of another size than its image, a
            mask with no pixel.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: no such directory")
    used = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        image = _find_images(folder / "images").get(folder.name) if (folder / "images").is_dir() else None
        if image is None:
            raise ValueError(f"{folder / 'images'}: no image {folder.name}.<png|tif|jpg>")
        used[folder.name] = image
    if not used:
        raise ValueError(f"{root}: no <id>/images/<id>.png folders")
    survey = _survey(used, size, str(root))
    records = []
    for image_id in tqdm(used, desc="read masks", leave=False):
        shape = survey["shapes"][image_id]
        for path in sorted((root / image_id / "masks").glob("*")):
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            mask = np.asarray(Image.open(path))
            mask = mask.any(axis=2) if mask.ndim == 3 else mask != 0
            if mask.shape != shape:
                raise ValueError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]}, its image "
                                 f"{shape[1]}x{shape[0]}")
            if not mask.any():
                raise ValueError(f"{path}: the mask holds no pixel")
            records.append((image_id, rle.encode(mask), class_name))
    return _write(out, records, survey["shapes"], used, test_images, (class_name,), submission_columns,
                  group_pattern=None, groups=None, where=str(root), rle_order=rle_order, channels=survey["channels"],
                  bit_depth=survey["bit_depth"], size=size, name=name)
