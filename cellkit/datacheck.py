"""The data check before training: all of the data read the way training will read it, every problem reported at once.

``cellkit train`` calls :func:`check_sartorius` (fine-tune mode) or :func:`check_livecell` (pretrain mode) before
any work starts, so that a broken file ends the command with one message instead of a crash at some batch:

- competition ``train.csv``: the table's own checks (:func:`cellkit.data.read_train_csv`), then every annotation
  parses as an RLE of its row's image size, every image exists, decodes completely (a truncated PNG fails), has an
  8-bit mode (:data:`cellkit.data.IMAGE_MODES`) and the size its rows say;
- LIVECell COCO json: valid JSON with ``images`` and ``annotations``; every image entry names an existing file that
  decodes completely at its ``width`` x ``height`` (and, with cell-line classes, starts with a known cell line);
  every annotation refers to a listed image and has a polygon (even number of >= 6 finite coordinates) or RLE
  segmentation.

Images are decoded and annotations parsed in parallel (forked worker processes: both hold the GIL). Problems are
collected, sorted by file and row, and raised together as one :class:`DataCheckError` (up to ``max_problems`` listed,
then a count of the rest); each names the file and, for the CSV, the line (``line = 0-based row + 2``), for the json
the annotation's index.

What passed is remembered in a cache outside the data (the real data may be read-only): ``$CELLKIT_CACHE_DIR``, else
``$XDG_CACHE_HOME/cellkit``, else ``~/.cache/cellkit``, one JSON file per (annotation file, image folder), keyed by
each file's resolved path, size and modification time. A second check of unchanged data only stats the files; a
changed image (or CSV) is checked again. Failures are never remembered. An unwritable cache is skipped silently.
"""
import hashlib
import json
import logging
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

from tqdm.auto import tqdm

from cellkit import atomic, data, rle

__all__ = ["CACHE_ENV", "MAX_PROBLEMS", "DataCheckError", "cache_dir", "check_sartorius", "check_livecell"]

logger = logging.getLogger(__name__)

#: Environment variable naming the cache folder of the data check (tests point it at a temporary folder).
CACHE_ENV = "CELLKIT_CACHE_DIR"

#: Problems listed in one :class:`DataCheckError` message by default (the total is always given).
MAX_PROBLEMS = 30

_CACHE_VERSION = 1


class DataCheckError(ValueError):
    """Every problem the data check found, in one error.

    Attributes:
        problems: ``(sort key, message)`` pairs, every problem found (not only those in the message); each message
            names the file (and row).
    """

    def __init__(self, source: str, problems: list[tuple], max_problems: int = MAX_PROBLEMS,
                 consequence: str = "nothing was trained"):
        self.problems = sorted(problems, key=lambda p: p[0])
        shown = self.problems[:max_problems]
        lines = [f"the data check found {len(self.problems)} problem(s) in {source}; {consequence}:"]
        lines += [f"  {m}" for _, m in shown]
        if len(shown) < len(self.problems):
            lines.append(f"  ... and {len(self.problems) - len(shown)} more")
        super().__init__("\n".join(lines))


def cache_dir() -> Path:
    """The data check's cache folder: ``$CELLKIT_CACHE_DIR``, ``$XDG_CACHE_HOME/cellkit`` or ``~/.cache/cellkit``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cellkit"


# --------------------------------------------------------------------------------------------------------- cache
def _stat_key(path: Path) -> list | None:  # [size, mtime_ns], None when the file cannot be stat'ed
    try:
        st = path.stat()
    except OSError:
        return None
    return [int(st.st_size), int(st.st_mtime_ns)]


def _load_cache(kind: str, source: Path, folder: Path, use_cache: bool) -> tuple[Path, list, dict]:
    """The cache file of (annotation file ``source``, image ``folder``), ``source``'s key, and the cache's content
    when ``use_cache`` and it belongs to this version and key, else an empty cache."""
    source_key = [str(source.resolve())] + (_stat_key(source) or [])
    digest = hashlib.sha1("\0".join([kind, str(source.resolve()), str(folder.resolve())]).encode()).hexdigest()[:20]
    path = cache_dir() / "datacheck" / f"{kind}-{digest}.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8")) if use_cache else None
    except (OSError, ValueError):
        doc = None
    if not isinstance(doc, dict) or doc.get("version") != _CACHE_VERSION or not isinstance(doc.get("images"), dict):
        doc = {"images": {}}
    doc["annotations_ok"] = bool(doc.get("annotations_ok")) and doc.get("source") == source_key
    return path, source_key, doc


def _save_cache(path: Path, source_key: list | None, annotations_ok: bool, images: dict) -> None:
    doc = {"version": _CACHE_VERSION, "source": source_key, "annotations_ok": bool(annotations_ok),
           "images": images}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(path, doc)
    except OSError as exc:  # read-only home, full disk: the check still ran, it is only not remembered
        logger.info("cellkit: data check cache %s not written (%s)", path, exc)


def _workers(workers: int | None) -> int:
    return max(1, int(workers) if workers else min(8, os.cpu_count() or 1))


_MIN_FOR_PROCESSES = 32  # fewer items are checked in this process: starting workers would cost more


_SHARED: dict = {}  # read-only data for worker tasks, set before forking (inherited, never pickled per task)


def run_parallel(fn, items: list, workers: int, desc: str, progress: bool, shared: dict | None = None) -> list:
    """``[fn(item) for item in items]``, in order, on ``workers`` forked processes (PNG decoding and RLE parsing
    hold the GIL, so threads do not help), in this process for few items or one worker or where ``fork`` is not
    available; a tqdm bar for 50+ items. ``fn`` must be a module-level function (pickled by reference); workers only
    decode images and parse strings (no torch), so forking a process that has imported torch is safe. ``shared``
    is available to ``fn`` as the module's ``_SHARED`` (inherited by the forked workers, not pickled per item)."""
    if not items:
        return []
    _SHARED.clear()
    _SHARED.update(shared or {})
    bar = partial(tqdm, total=len(items), desc=desc, unit="img", leave=False, disable=not progress or len(items) < 50)
    try:
        if workers < 2 or len(items) < _MIN_FOR_PROCESSES or "fork" not in multiprocessing.get_all_start_methods():
            return list(bar(map(fn, items)))
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork")) as pool:
            return list(bar(pool.map(fn, items, chunksize=max(1, len(items) // (workers * 8)))))
    finally:
        _SHARED.clear()


def image_problem(task: tuple) -> str | None:
    """None when the image ``task[0]`` decodes completely (at ``task[1]`` = ``(width, height)`` unless None) with an
    8-bit mode (or 16-bit grayscale when ``task[2]``), else the problem (naming the file); module level: runs in
    worker processes."""
    try:
        data.open_image(task[0], size=task[1], sixteen_bit=task[2] if len(task) > 2 else False)
    except (ValueError, FileNotFoundError) as exc:
        return str(exc)
    return None


def _sartorius_task(task: tuple) -> tuple[list, bool, bool]:
    """Check one image of a train CSV in a worker: ``task`` = ``(csv_path, image_id, path or None, size, read,
    rows, parse)``, the annotation strings in ``_SHARED["annotations"]``; returns ``(problems, image ok, some row
    bad)``."""
    csv_path, image_id, path, size, read, rows, parse = task
    problems, bad_rows = [], False
    problem = image_problem((path, size)) if path is not None and read else None
    if problem:
        problems.append(((csv_path, int(rows[0])), f"{csv_path} line {data._line(rows[0])} (id {image_id}): {problem}"))
    if parse:
        annotations = [_SHARED["annotations"][r] for r in rows]
        shape = (size[1], size[0])
        try:
            rle.parse_many(annotations, shape)
        except ValueError:
            for r, text in zip(rows, annotations):  # every bad row of this image, each with its own message
                try:
                    rle.parse(text, shape)
                except ValueError as exc:
                    bad_rows = True
                    problems.append(((csv_path, int(r)), f"{csv_path} line {data._line(r)} (id {image_id}): "
                                                         f"bad annotation: {exc}"))
    return problems, not problem, bad_rows


# ----------------------------------------------------------------------------------------------- competition csv
def check_sartorius(csv_path, image_dir, *, workers: int | None = None, max_problems: int = MAX_PROBLEMS,
                    use_cache: bool = True, progress: bool = True) -> dict:
    """Check a competition-format ``train.csv`` and its image folder as training will read them.

    Args:
        csv_path: the train CSV.
        image_dir: the folder of its images (``<id>.png`` or another of :data:`cellkit.data.IMAGE_EXTENSIONS`).
        workers: worker processes (default: the CPU count, at most 8).
        max_problems: problems listed in the error message.
        use_cache: skip files that passed before unchanged (see the module docstring); False checks everything.
        progress: tqdm bar for 50+ images.

    Returns:
        ``{"images", "annotations", "images_read", "annotations_parsed", "seconds"}``: counts of the data, of what
        was actually read this time (the rest came from the cache), and the wall time.

    Raises:
        FileNotFoundError: no CSV or no image folder.
        ValueError: the first table-level problem of :func:`cellkit.data.read_train_csv` (naming the line), or a
            :class:`DataCheckError` listing every missing, unreadable, truncated, wrong-mode or wrong-size image
            and every malformed annotation, each with the CSV line and the file.
    """
    start = time.perf_counter()
    csv_path, image_dir = Path(csv_path), Path(image_dir)
    table = data.read_train_csv(csv_path)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir}: image directory does not exist")
    cache_path, source_key, cache = _load_cache("sartorius", csv_path, image_dir, use_cache)
    parse_rows = not cache["annotations_ok"]
    widths, heights = table["width"].to_numpy(), table["height"].to_numpy()
    rows_by_id = table.groupby("id", sort=False).indices

    problems, tasks, ok_images, keys = [], [], {}, {}
    for image_id, rows in rows_by_id.items():
        first = int(rows[0])
        size = (int(widths[first]), int(heights[first]))
        try:
            path = data.find_image(image_dir, image_id)
        except FileNotFoundError as exc:
            problems.append(((str(csv_path), first), f"{csv_path} line {data._line(first)} (id {image_id}): {exc}"))
            path, read = None, False
        else:
            keys[image_id] = [path.name] + (_stat_key(path) or []) + list(size)
            read = cache["images"].get(image_id) != keys[image_id]
            if not read:
                ok_images[image_id] = keys[image_id]
        if read or parse_rows:
            tasks.append((str(csv_path), image_id, None if path is None else str(path), size, read,
                          [int(r) for r in rows], parse_rows))
    results = run_parallel(_sartorius_task, tasks, _workers(workers), f"checking {csv_path.name}", progress,
                            shared={"annotations": table["annotation"].to_numpy()})
    for task, (task_problems, image_ok, _) in zip(tasks, results):
        problems += task_problems
        if task[4] and image_ok:  # read (so found) and readable
            ok_images[task[1]] = keys[task[1]]
    if use_cache:
        _save_cache(cache_path, source_key, not any(r[2] for r in results), ok_images)
    if problems:
        raise DataCheckError(str(csv_path), problems, max_problems)
    stats = {"images": len(rows_by_id), "annotations": len(table), "images_read": sum(1 for t in tasks if t[4]),
             "annotations_parsed": len(table) if parse_rows else 0, "seconds": time.perf_counter() - start}
    logger.info("cellkit: data check of %s: %d images, %d annotations OK (%d images read, %d annotations parsed, "
                "%.1f s)", csv_path, stats["images"], stats["annotations"], stats["images_read"],
                stats["annotations_parsed"], stats["seconds"])
    return stats


# --------------------------------------------------------------------------------------------------------- livecell
def _polygon_problem(seg) -> str | None:
    """Why a COCO segmentation cannot be decoded (None when it can)."""
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
            return f"RLE segmentation has no valid 'size' [H, W] (got {size!r})"
        if not isinstance(counts, (str, list)):
            return f"RLE segmentation 'counts' must be a string or a list, got {type(counts).__name__}"
        return None
    if not isinstance(seg, list) or not seg:
        return f"segmentation must be a non-empty polygon list or an RLE dict, got {type(seg).__name__}"
    for k, poly in enumerate(seg):
        if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
            n = len(poly) if isinstance(poly, list) else type(poly).__name__
            return f"polygon {k} must be a list of an even number (>= 6) of coordinates, got {n}"
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in poly):
            return f"polygon {k} holds a non-numeric or non-finite coordinate"
    return None


def check_livecell(json_path, image_root, *, cell_line_classes: bool = True, workers: int | None = None,
                   max_problems: int = MAX_PROBLEMS, use_cache: bool = True, progress: bool = True) -> dict:
    """Check a LIVECell COCO json and its image folder as pretraining will read them.

    Args:
        json_path: the COCO annotation file.
        image_root: the folder its ``file_name`` entries are relative to.
        cell_line_classes: also require each file name to start with a cell line of
            :data:`cellkit.data.LIVECELL_CELL_LINES` (the classes cellkit's pretraining uses).
        workers, max_problems, use_cache, progress: as in :func:`check_sartorius`.

    Returns:
        ``{"images", "annotations", "images_read", "annotations_parsed", "seconds"}``.

    Raises:
        FileNotFoundError: no json or no image folder.
        ValueError: invalid JSON or no ``images``/``annotations`` lists (naming the file), or a
            :class:`DataCheckError` naming each bad image entry (file and index in ``images``) and each bad
            annotation (index in ``annotations`` and its id).
    """
    start = time.perf_counter()
    json_path, image_root = Path(json_path), Path(image_root)
    if not image_root.is_dir():
        raise FileNotFoundError(f"{image_root}: LIVECell image folder does not exist")
    doc = atomic.read_json(json_path, "LIVECell json")
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) or not isinstance(
            doc.get("annotations"), list):
        raise ValueError(f"{json_path}: not a COCO annotation file (needs 'images' and 'annotations' lists)")
    cache_path, source_key, cache = _load_cache("livecell", json_path, image_root, use_cache)
    problems: list[tuple] = []
    images = _livecell_images(doc, json_path, image_root, cell_line_classes, problems)
    parse = not cache["annotations_ok"]
    if parse:
        _livecell_annotation_problems(doc, json_path, images, problems)
    annotations_ok = not any(p[0][1] == 1 for p in problems)

    todo, ok_images = [], {}
    for image_id, (k, where, path, size) in images.items():
        key = [str(path.name)] + (_stat_key(path) or []) + list(size)
        if cache["images"].get(str(image_id)) == key:
            ok_images[str(image_id)] = key
        else:
            todo.append((image_id, k, where, key, (str(path), tuple(size))))
    results = run_parallel(image_problem, [t[4] for t in todo], _workers(workers), f"checking {json_path.name}",
                            progress)
    for (image_id, k, where, key, _), problem in zip(todo, results):
        if problem:
            problems.append(((str(json_path), 0, k), f"{where}: {problem}"))
        else:
            ok_images[str(image_id)] = key
    if use_cache:
        _save_cache(cache_path, source_key, annotations_ok, ok_images)
    if problems:
        raise DataCheckError(str(json_path), problems, max_problems)
    n_ann = len(doc["annotations"])
    return {"images": len(images), "annotations": n_ann, "images_read": len(todo),
            "annotations_parsed": n_ann if parse else 0, "seconds": time.perf_counter() - start}


def _livecell_images(doc: dict, json_path: Path, image_root: Path, cell_line_classes: bool, problems: list) -> dict:
    """``{image id: (index, where, path, (width, height))}`` of a LIVECell json's ``images``; a bad entry is
    appended to ``problems`` (``((file, 0, index), message)``)."""
    images: dict = {}
    lowered = [c.lower() for c in data.LIVECELL_CELL_LINES]
    for k, im in enumerate(doc["images"]):
        where = f"{json_path} images[{k}]"
        if not isinstance(im, dict) or not {"id", "file_name", "width", "height"} <= set(im):
            problems.append(((str(json_path), 0, k), f"{where}: needs id, file_name, width and height"))
            continue
        where = f"{where} (id {im['id']}, {im['file_name']})"
        if im["id"] in images:
            problems.append(((str(json_path), 0, k), f"{where}: duplicate image id"))
            continue
        if cell_line_classes and Path(str(im["file_name"])).name.split("_", 1)[0].lower() not in lowered:
            problems.append(((str(json_path), 0, k), f"{where}: file name does not start with a LIVECell cell line "
                                                     f"({', '.join(data.LIVECELL_CELL_LINES)})"))
        images[im["id"]] = (k, where, image_root / str(im["file_name"]), (im["width"], im["height"]))
    return images


def _livecell_annotation_problems(doc: dict, json_path: Path, images: dict, problems: list) -> None:
    """Append each bad entry of a LIVECell json's ``annotations`` to ``problems`` (``((file, 1, index),
    message)``): not an object, an unknown ``image_id``, a bad polygon or bbox."""
    for k, ann in enumerate(doc["annotations"]):
        if not isinstance(ann, dict):
            problem = "not an object"
        elif ann.get("image_id") not in images:
            problem = f"image_id {ann.get('image_id')!r} is not in 'images'"
        else:
            bbox = ann.get("bbox")
            problem = _polygon_problem(ann.get("segmentation"))
            if problem is None and not (isinstance(bbox, list) and len(bbox) == 4 and all(
                    isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
                problem = f"bbox must be 4 finite numbers, got {bbox!r}"
        if problem:
            ident = f" (id {ann.get('id')})" if isinstance(ann, dict) else ""
            problems.append(((str(json_path), 1, k), f"{json_path} annotations[{k}]{ident}: {problem}"))
