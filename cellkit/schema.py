"""What a dataset is: its classes, the groups its post-processing is keyed by, its mask-string order and columns.

A dataset directory in the kit's layout (``train.csv``, ``train/``, ``test/``) may hold a ``dataset.json`` written by
``cellkit import`` or ``cellkit synth``; without one it is the Sartorius competition (:data:`SARTORIUS`), so the
competition's files work as they are.

- **classes**: the detector's classes, in category-id order (``category_id`` ``k`` is ``classes[k]``).
- **groups**: the keys of class-wise post-processing (``thresholds.json``), the CV table's columns and ``score``'s
  rows. ``group_by`` says where an image's group comes from:

  - ``"class"``: the group is the class (Sartorius: one cell type per image, class = group; a mask folder: one class,
    one group);
  - ``"pattern"``: the group is the first capture group of ``group_pattern`` searched in the image id (LIVECell: one
    detector class ``cell``, group = the cell line in the file name).

- **rle_order**: ``"row"`` (pixel ``y * W + x``, Sartorius) or ``"column"`` (pixel ``x * H + y``, the 2018 Data
  Science Bowl) of the dataset's own mask strings: its CSV and its submission. Inside the kit (the imported
  ``train.csv``, the stores) masks are row-major; only reading the dataset's CSV and writing its submission convert.
- **submission_columns**: the submission's column names (``id``, ``predicted`` for Sartorius). Inside the kit the
  train CSV always has the columns ``id, annotation, width, height, cell_type`` (``cell_type`` holds the class).
- **channels** (1 or 3) and **bit_depth** (8 or 16) of the images; **size** ``(H, W)`` when every image must have it
  (None when sizes may vary, as for Sartorius, whose CSV gives each image's size).

The schema is written once into a run (``dataset.json`` next to ``config.yaml``) and into ``thresholds.json`` and
``meta.json``; every later stage reads it there.
"""

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from cellkit import CELL_TYPES, atomic

__all__ = ["DatasetSchema", "SARTORIUS", "FILE_NAME", "load_schema", "save_schema", "schema_of", "from_dict",
           "recorded_schema"]

FILE_NAME = "dataset.json"  #: the schema's file in a dataset directory and in a run directory
GROUP_BY = ("class", "pattern")  #: where an image's group comes from
RLE_ORDERS = ("row", "column")  #: pixel numbering of a dataset's mask strings
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class DatasetSchema:
    """A dataset's classes, groups, mask-string order, columns and image format (see the module docstring).

    Construct through :func:`from_dict` (checked) or as below; ``__post_init__`` checks every field and raises
    ValueError naming it.
    """

    classes: tuple[str, ...]
    groups: tuple[str, ...] | None = None  # None: the classes (group_by "class")
    group_by: str = "class"
    group_pattern: str | None = None
    rle_order: str = "row"
    submission_columns: tuple[str, str] = ("id", "predicted")
    channels: int = 1
    bit_depth: int = 8
    size: tuple[int, int] | None = None
    name: str = "dataset"

    def __post_init__(self):
        put = lambda key, value: object.__setattr__(self, key, value)  # noqa: E731 (frozen dataclass)
        put("classes", _names(self.classes, "classes"))
        if self.group_by not in GROUP_BY:
            raise ValueError(f"{FILE_NAME}: group_by={self.group_by!r}: expected one of {', '.join(GROUP_BY)}")
        if self.group_by == "class":
            if self.groups is not None and tuple(self.groups) != self.classes:
                raise ValueError(f"{FILE_NAME}: group_by='class' needs groups equal to the classes "
                                 f"{list(self.classes)}, got {list(self.groups)}")
            put("groups", self.classes)
            if self.group_pattern is not None:
                raise ValueError(f"{FILE_NAME}: group_pattern is only read with group_by='pattern'")
        else:
            put("groups", _names(self.groups or (), "groups"))
            try:
                compiled = re.compile(self.group_pattern or "")
            except re.error as exc:
                raise ValueError(f"{FILE_NAME}: group_pattern={self.group_pattern!r} is not a regular expression: "
                                 f"{exc}") from None
            if compiled.groups < 1:
                raise ValueError(f"{FILE_NAME}: group_pattern={self.group_pattern!r} needs a capture group (the "
                                 f"group's name in the image id), e.g. '^([A-Za-z0-9]+)_'")
        if self.rle_order not in RLE_ORDERS:
            raise ValueError(f"{FILE_NAME}: rle_order={self.rle_order!r}: expected one of {', '.join(RLE_ORDERS)}")
        sub = tuple(self.submission_columns)
        if len(sub) != 2 or not all(isinstance(v, str) and v for v in sub):
            raise ValueError(f"{FILE_NAME}: submission_columns={list(sub)!r}: expected two names (id, mask string)")
        put("submission_columns", sub)
        if self.channels not in (1, 3):
            raise ValueError(f"{FILE_NAME}: channels={self.channels!r}: expected 1 (grayscale) or 3 (RGB)")
        if self.bit_depth not in (8, 16):
            raise ValueError(f"{FILE_NAME}: bit_depth={self.bit_depth!r}: expected 8 or 16")
        if self.size is not None:
            size = tuple(self.size)
            if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
                raise ValueError(f"{FILE_NAME}: size={self.size!r}: expected [height, width], positive integers")
            put("size", size)

    def class_id(self, name: str, where: str = "class") -> int:
        """Category id of class ``name``; ValueError naming ``where`` and the known classes."""
        if name not in self.classes:
            raise ValueError(f"{where}: unknown class {name!r} (expected one of {', '.join(self.classes)})")
        return self.classes.index(name)

    def image_group(self, image_id: str, class_name: str | None = None) -> str:
        """The group of an image (``group_by="pattern"``: from its id) or of an instance (``"class"``: its class).

        Raises:
            ValueError: the id does not match ``group_pattern``, or the group/class is not one of the schema's.
        """
        if self.group_by == "class":
            if class_name is None:
                raise ValueError(f"image {image_id!r}: its group is its class, and no class was given")
            self.class_id(class_name, f"image {image_id!r}")
            return class_name
        match = re.search(self.group_pattern, str(image_id))
        if match is None or match.group(1) not in self.groups:
            found = "no match" if match is None else f"{match.group(1)!r}"
            raise ValueError(f"image {image_id!r}: group_pattern {self.group_pattern!r} gives {found}, not one of "
                             f"the groups {', '.join(self.groups)}")
        return match.group(1)

    def group_frame(self, frame):
        """A table of rows ``id, ..., cell_type`` (pandas) with ``cell_type`` holding each row's group: the table
        itself for ``group_by="class"``, else a copy (the EDA's plots and counts per group)."""
        if self.group_by == "class":
            return frame
        return frame.assign(cell_type=[self.image_group(i) for i in frame["id"].astype(str)])

    def to_dict(self) -> dict:
        """The JSON form (:func:`from_dict` reads it back)."""
        return {**asdict(self), "classes": list(self.classes), "groups": list(self.groups),
                "submission_columns": list(self.submission_columns), "size": list(self.size) if self.size else None}


def _names(values, key: str) -> tuple[str, ...]:
    if isinstance(values, str) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"{FILE_NAME}: {key}={values!r}: expected a non-empty list of names")
    names = tuple(values)
    for name in names:
        if not isinstance(name, str) or not _NAME.match(name) or name == "all":
            raise ValueError(f"{FILE_NAME}: {key}: {name!r} is not a usable name (letters, digits and _.+- , not "
                             f"'all', which names the whole-set column of the CV tables)")
    if len(set(names)) != len(names):
        raise ValueError(f"{FILE_NAME}: {key}: {[n for n in names if names.count(n) > 1][0]!r} is listed twice")
    return names


SARTORIUS = DatasetSchema(classes=CELL_TYPES, name="sartorius")
"""The Kaggle Sartorius competition: three cell types, class = group, row-major RLE, 8-bit grayscale."""


def from_dict(doc, where: str = FILE_NAME) -> DatasetSchema:
    """A schema from its JSON form; ValueError naming ``where`` and the key for an unknown or bad key."""
    if not isinstance(doc, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    known = set(DatasetSchema.__dataclass_fields__)
    extra = sorted(set(doc) - known)
    if extra:
        raise ValueError(f"{where}: unknown key {extra[0]!r} (expected {', '.join(sorted(known))})")
    if "classes" not in doc:
        raise ValueError(f"{where}: missing key 'classes'")
    try:
        return DatasetSchema(**{k: tuple(v) if isinstance(v, list) else v for k, v in doc.items()})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {str(exc).removeprefix(FILE_NAME + ': ')}") from None


def load_schema(path) -> DatasetSchema:
    """Read a ``dataset.json`` (the file, or a directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE_NAME
    return from_dict(load_json(path), str(path))


def load_json(path: Path):
    """The content of a JSON file (a ``dataset.json``, a COCO json, a run's record), for this module and
    :mod:`cellkit.importers`; :func:`cellkit.atomic.read_json` words its error "invalid JSON", these files' errors
    keep their own wording.

    Raises:
        ValueError: ``"<path>: not valid JSON (...)"`` for unparsable text.
    """
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def save_schema(schema: DatasetSchema, directory) -> Path:
    """Write ``<directory>/dataset.json`` atomically; returns its path."""
    return atomic.write_json(Path(directory) / FILE_NAME, schema.to_dict())


def recorded_schema(doc, where: str) -> DatasetSchema:
    """The schema a ``thresholds.json`` or a store's ``meta.json`` (as a dict) records under ``"dataset"``;
    :data:`SARTORIUS` when it records none."""
    return from_dict(doc["dataset"], f"{where}: dataset") if isinstance(doc, dict) and "dataset" in doc else SARTORIUS


def schema_of(path) -> DatasetSchema:
    """The schema recorded at ``path``, else :data:`SARTORIUS`: a dataset or run directory's ``dataset.json``, a
    prediction store's ``meta.json`` (the store directory or the file), a ``thresholds.json`` (their ``"dataset"``
    key), or a ``dataset.json`` itself."""
    path = Path(path)
    if path.is_dir():
        path = next((p for p in (path / FILE_NAME, path / "meta.json") if p.is_file()), path / FILE_NAME)
    if not path.is_file():
        return SARTORIUS
    if path.name == FILE_NAME:
        return load_schema(path)
    return recorded_schema(load_json(path), str(path))
