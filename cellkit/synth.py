"""Synthetic demo data in the competition's format: the project's default data, so the main job runs anywhere.

``synth_dataset(out, n_images, seed)`` writes::

    out/train.csv               id, annotation, width, height, cell_type, sample_id  (one row per cell, row-major RLE)
    out/train/<id>.png          704x520 8-bit grayscale
    out/test/<id>.png           test images (same generator, other seeds)
    out/test_truth.csv          their masks, in the train.csv format (the competition keeps these hidden; the demo
                                scores against them)
    out/sample_submission.csv   id, predicted  (empty ``predicted``, like the competition's)
    out/synth.json              the parameters used

Each image holds one cell type, like the real data, with a look that echoes it: **shsy5y** many (dozens to a few
hundred) small elongated cells in clusters, some with a neurite; **astro** large cells with branching processes;
**cort** few round cells. Cells may touch but the masks of one image never overlap (a cell keeps only the pixels no
earlier cell took, and only its largest connected piece). Rendering is a simple phase-contrast imitation: a grey
background with low-frequency illumination and fine texture, cell interiors offset per cell, a bright halo outside
and a dark rim inside each cell, faint lines where cells touch, unlabelled dark specks of debris, blur and Gaussian
noise.

Images are grouped in samples of 1-3 images of one type (``sample_id``), so fold grouping has something to group;
samples cycle through the types, so any set of 3 or more images has all three.
Everything is drawn from ``numpy.random.default_rng([seed, split, index])``: the same seed gives byte-identical files.

Other shapes of data, for trying the kit on datasets that are not Sartorius (``cellkit synth --classes --size
--channels --bit-depth --mask-folder``): any class names (class ``k`` is drawn with the ``k mod 3``-th look above),
any image size, 3-channel images (the grey image tinted per channel), 16-bit images (the grey levels x 257), and the
2018 Data Science Bowl's per-instance mask folder (``out/train/<id>/images/<id>.png``, ``out/train/<id>/masks/*.png``,
``out/test/<id>/images/<id>.png``; no ``train.csv``) for ``cellkit import masks``. A set other than the default also
gets a ``dataset.json`` (:mod:`cellkit.schema`); a 16-bit set is a source for ``cellkit import csv``, which converts
its images to the 8-bit ones the model reads.
"""
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import pandas as pd
from scipy import ndimage
from tqdm.auto import tqdm

from cellkit import CELL_TYPES, SHAPE, atomic, rle, schema as S

__all__ = ["SYNTH_VERSION", "Cell", "cells_for", "paint", "render", "generate_image", "label_rles",
           "synth_dataset"]

#: Bumped whenever the generator's output changes for a given seed.
SYNTH_VERSION = 1

_TRAIN, _TEST = 0, 1  # split codes mixed into the per-image seeds


@dataclass(frozen=True)
class Cell:
    """One drawn cell before placement: ``mask`` uint8 (h, w) in {0, 1}; ``y0, x0`` its top-left in the image
    (may be negative or run past the edge: the cell is clipped)."""

    y0: int
    x0: int
    mask: np.ndarray


# ------------------------------------------------------------------------------------------------- morphologies
def _canvas(radius: int) -> tuple[np.ndarray, int]:
    return np.zeros((2 * radius + 1, 2 * radius + 1), dtype=np.uint8), radius


def _polar(length: float, angle: float) -> np.ndarray:
    return np.array([length * np.cos(angle), length * np.sin(angle)])


def _pt(p: np.ndarray) -> tuple[int, int]:
    return int(round(p[0])), int(round(p[1]))


def _place(mask: np.ndarray, cx: float, cy: float) -> Cell:  # the cell whose canvas centre lands on (cx, cy)
    c = mask.shape[0] // 2
    return Cell(int(round(cy)) - c, int(round(cx)) - c, mask)


def _shsy5y(rng: np.random.Generator, shape: tuple[int, int]) -> Iterator[Cell]:
    """Many small elongated cells (long axis 12-30 px) in loose clusters of similar orientation; some with a neurite."""
    height, width = shape
    for _ in range(int(rng.integers(8, 16))):  # clusters
        ccx, ccy = rng.uniform(0, width), rng.uniform(0, height)
        spread = rng.uniform(25, 70)
        direction = rng.uniform(0, np.pi)
        for _ in range(int(rng.integers(10, 30))):
            a, b = rng.uniform(6, 15), rng.uniform(2.5, 5.0)
            angle = direction + rng.normal(0, 0.5)
            neurite = rng.uniform(6, 18) if rng.random() < 0.35 else 0.0
            canvas, c = _canvas(int(np.ceil(a + neurite)) + 2)
            cv2.ellipse(canvas, (c, c), (int(round(a)), int(round(b))), float(np.degrees(angle)), 0, 360, 1, -1)
            if neurite:
                tip = np.array([c, c]) + _polar(a - 1, angle)
                cv2.line(canvas, _pt(tip), _pt(tip + _polar(neurite, angle + rng.normal(0, 0.4))), 1, 2)
            yield _place(canvas, ccx + rng.normal(0, spread), ccy + rng.normal(0, spread))


def _astro(rng: np.random.Generator, shape: tuple[int, int]) -> Iterator[Cell]:
    """Large cells: an irregular body (radius 9-18 px) with 3-6 tapering, bending, sometimes forking processes."""
    height, width = shape
    for _ in range(int(rng.integers(12, 30))):
        canvas, c = _canvas(95)
        centre = np.array([c, c], dtype=float)
        r1, r2 = rng.uniform(10, 18), rng.uniform(8, 14)
        cv2.ellipse(canvas, (c, c), (int(r1), int(r2)), float(rng.uniform(0, 180)), 0, 360, 1, -1)
        for angle in np.linspace(0, 2 * np.pi, int(rng.integers(3, 7)), endpoint=False) + rng.uniform(0, 2 * np.pi):
            _branch(rng, canvas, centre, angle + rng.normal(0, 0.3), thickness=int(rng.integers(5, 8)), depth=0)
        yield _place(canvas, rng.uniform(0, width), rng.uniform(0, height))


def _branch(rng: np.random.Generator, canvas: np.ndarray, start: np.ndarray, angle: float, thickness: int,
            depth: int) -> None:
    """Draw a process of 3 segments from ``start``, thinning and bending; at depth 0 it may fork once."""
    point = start
    for segment in range(3):
        length = rng.uniform(10, 24)
        nxt = point + _polar(length, angle)
        nxt = np.clip(nxt, 2, canvas.shape[0] - 3)
        cv2.line(canvas, _pt(point), _pt(nxt), 1, max(thickness, 2))
        if depth == 0 and segment == 1 and rng.random() < 0.5:
            _branch(rng, canvas, nxt, angle + rng.choice([-1, 1]) * rng.uniform(0.5, 1.0), thickness - 2, depth + 1)
        point, angle, thickness = nxt, angle + rng.normal(0, 0.35), thickness - 1


def _cort(rng: np.random.Generator, shape: tuple[int, int]) -> Iterator[Cell]:
    """Few round cells (radius 7-12 px, aspect 0.75-1), sometimes with one short process."""
    height, width = shape
    for _ in range(int(rng.integers(15, 45))):
        r = rng.uniform(7, 12)
        canvas, c = _canvas(int(r) + 18)
        angle = rng.uniform(0, 2 * np.pi)
        cv2.ellipse(canvas, (c, c), (int(round(r)), int(round(r * rng.uniform(0.75, 1.0)))),
                    float(np.degrees(angle)), 0, 360, 1, -1)
        if rng.random() < 0.3:
            tip = np.array([c, c]) + _polar(r, angle)
            cv2.line(canvas, _pt(tip), _pt(tip + _polar(rng.uniform(6, 15), angle)), 1, 2)
        yield _place(canvas, rng.uniform(0, width), rng.uniform(0, height))


_MORPHOLOGIES = {"shsy5y": _shsy5y, "astro": _astro, "cort": _cort}
_MIN_AREA = {"shsy5y": 25, "astro": 150, "cort": 40}  # smallest visible area (px) a kept cell may have


def cells_for(cell_type: str, rng: np.random.Generator, shape: tuple[int, int] = SHAPE) -> list[Cell]:
    """Draw (unplaced, possibly overlapping) cells of one type."""
    if cell_type not in _MORPHOLOGIES:
        raise ValueError(f"unknown cell type {cell_type!r} (expected one of {', '.join(CELL_TYPES)})")
    return list(_MORPHOLOGIES[cell_type](rng, shape))


# ------------------------------------------------------------------------------------------------- painting
def paint(cells: list[Cell], shape: tuple[int, int], min_area: int, min_visible: float = 0.6) -> np.ndarray:
    """Paint cells into a label map without overlap.

    Each cell takes the free pixels under its mask, keeps only their largest 8-connected piece, and is dropped when
    that piece is smaller than ``min_area`` pixels or than ``min_visible`` of the cell's drawn area. Kept cells are
    numbered 1, 2, ... in drawing order.

    Returns:
        int32 (H, W) label map, 0 = background.
    """
    height, width = shape
    labels = np.zeros(shape, dtype=np.int32)
    next_label = 1
    for cell in cells:
        h, w = cell.mask.shape
        ys, xs = max(cell.y0, 0), max(cell.x0, 0)
        ye, xe = min(cell.y0 + h, height), min(cell.x0 + w, width)
        if ye <= ys or xe <= xs:
            continue
        region = labels[ys:ye, xs:xe]
        crop = cell.mask[ys - cell.y0:ye - cell.y0, xs - cell.x0:xe - cell.x0]
        free = (crop > 0) & (region == 0)
        n, comp, stats, _ = cv2.connectedComponentsWithStats(free.view(np.uint8), connectivity=8)
        if n < 2:
            continue
        largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        area = int(stats[largest, cv2.CC_STAT_AREA])
        if area < min_area or area < min_visible * int(cell.mask.sum()):
            continue
        region[comp == largest] = next_label
        next_label += 1
    return labels


def render(labels: np.ndarray, rng: np.random.Generator, style: dict) -> np.ndarray:
    """Phase-contrast-like grey image of a label map.

    Args:
        labels: int32 (H, W), 0 = background.
        rng: the image's generator.
        style: ``base`` (background grey level), ``contrast`` (mean interior offset, signed), ``halo`` (bright halo
            strength), ``noise`` (Gaussian noise sigma), ``debris`` (at most this many dark specks): per-sample
            settings.

    Returns:
        uint8 (H, W).
    """
    height, width = labels.shape
    coarse = rng.normal(0, 1, (5, 7)).astype(np.float32)
    image = style["base"] + 2.5 * cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    texture = rng.normal(0, 1, (height, width)).astype(np.float32)
    image += 5 * cv2.GaussianBlur(texture, (0, 0), 1.2)
    fg = (labels > 0).astype(np.uint8)
    offsets = rng.normal(style["contrast"], 6, int(labels.max()) + 1).astype(np.float32)
    offsets[0] = 0
    image += offsets[labels]
    inside = cv2.distanceTransform(fg, cv2.DIST_L2, 3)
    outside = cv2.distanceTransform(1 - fg, cv2.DIST_L2, 3)
    image += np.where(fg > 0, -0.4 * style["halo"] * np.exp(-inside / 1.5), style["halo"] * np.exp(-outside / 1.6))
    touching = np.zeros(labels.shape, dtype=bool)
    touching[:, 1:] |= (labels[:, 1:] != labels[:, :-1]) & (labels[:, 1:] > 0) & (labels[:, :-1] > 0)
    touching[1:, :] |= (labels[1:, :] != labels[:-1, :]) & (labels[1:, :] > 0) & (labels[:-1, :] > 0)
    image += 0.6 * style["halo"] * touching
    for _ in range(int(rng.integers(0, style["debris"] + 1))):  # unlabelled dark specks, as on real plates
        cv2.circle(image, (int(rng.integers(width)), int(rng.integers(height))), int(rng.integers(1, 4)),
                   float(style["base"] - rng.uniform(20, 50)), -1)
    image = cv2.GaussianBlur(image, (0, 0), 0.8)
    image += rng.normal(0, style["noise"], image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _style(rng: np.random.Generator) -> dict:
    """Per-sample look: background level, interior contrast (darker or brighter cells), halo, noise."""
    return {"base": float(rng.uniform(110, 150)), "contrast": float(rng.choice([-1, 1]) * rng.uniform(6, 16)),
            "halo": float(rng.uniform(40, 65)), "noise": float(rng.uniform(3, 6)),
            "debris": int(rng.integers(0, 120))}


def generate_image(cell_type: str, rng: np.random.Generator, style: dict | None = None,
                   shape: tuple[int, int] = SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image of ``cell_type``.

    Returns:
        ``(image, labels)``: uint8 (H, W) grey image and int32 (H, W) label map (0 = background, cells 1..n).
    """
    style = _style(rng) if style is None else style
    labels = paint(cells_for(cell_type, rng, shape), shape, _MIN_AREA[cell_type])
    return render(labels, rng, style), labels


def label_rles(labels: np.ndarray) -> list[str]:
    """Competition mask strings of cells 1..n of a label map (row-major, 1-indexed), in label order.

    Each cell is encoded on the strip of full rows it spans, then shifted, so the cost is per cell, not per image.
    """
    width = labels.shape[1]
    out = []
    for label, window in enumerate(ndimage.find_objects(labels), start=1):
        if window is None:
            continue
        y0, y1 = window[0].start, window[0].stop
        starts, lengths = rle.encode_runs(labels[y0:y1] == label)
        out.append(rle.runs_to_string(starts + y0 * width, lengths))
    return out


# ------------------------------------------------------------------------------------------------- dataset
def _image_ids(rng: np.random.Generator, n: int) -> list[str]:
    ids: dict[str, None] = {}  # insertion-ordered; a repeat is drawn again
    while len(ids) < n:
        ids[rng.bytes(6).hex()] = None
    return list(ids)


def _plan(seed: int, n_images: int, n_test: int, classes=CELL_TYPES) -> tuple[list[dict], list[dict]]:
    """Ids, cell types, samples and styles of every train and test image (one generator for the whole plan)."""
    rng = np.random.default_rng([seed, 2])
    ids = _image_ids(rng, n_images + n_test)
    first_type = int(rng.integers(len(classes)))
    train, sample = [], 0
    while len(train) < n_images:
        cell_type = classes[(first_type + sample) % len(classes)]
        style = _style(rng)
        unseen_after = max(len(classes) - 1 - sample, 0)  # keep an image for each type still to come
        for _ in range(max(1, min(int(rng.integers(1, 4)), n_images - len(train) - unseen_after))):
            train.append({"id": ids[len(train)], "cell_type": cell_type, "sample_id": f"sample_{sample:03d}",
                          "style": style})
        sample += 1
    test = [{"id": ids[n_images + i], "cell_type": classes[(first_type + i) % len(classes)],
             "style": _style(rng)} for i in range(n_test)]
    return train, test


def _looks(image: np.ndarray, channels: int, bit_depth: int) -> np.ndarray:
    """A grey uint8 image in the set's format: tinted per channel (BGR, as cv2 writes) and/or 16-bit (x 257)."""
    if channels == 3:
        grey = image.astype(np.float32)
        image = np.clip(np.rint(np.stack([grey * 1.1 - 12, grey, grey * 0.9 + 12], axis=2)), 0, 255).astype(np.uint8)
    return image.astype(np.uint16) * 257 if bit_depth == 16 else image


def _save(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):
        raise OSError(f"could not write {path}")


def _write_split(entries: list[dict], split: int, seed: int, image_dir: Path, desc: str, classes=CELL_TYPES,
                 shape=SHAPE, channels: int = 1, bit_depth: int = 8, mask_folder: bool = False) -> list[dict]:
    """Generate and save the images of one split; returns the CSV rows of their cells."""
    image_dir.mkdir(parents=True)
    height, width = shape
    rows = []
    for index, entry in enumerate(tqdm(entries, desc=desc, unit="img", disable=len(entries) < 2)):
        rng = np.random.default_rng([seed, split, index])
        look = CELL_TYPES[list(classes).index(entry["cell_type"]) % len(CELL_TYPES)]
        image, labels = generate_image(look, rng, entry["style"], shape)
        image = _looks(image, channels, bit_depth)
        if mask_folder:
            folder = image_dir / entry["id"]
            _save(folder / "images" / f"{entry['id']}.png", image)
            for label in range(1, int(labels.max()) + 1) if split == _TRAIN else ():
                _save(folder / "masks" / f"{label:04d}.png", (labels == label).astype(np.uint8) * 255)
        else:
            _save(image_dir / f"{entry['id']}.png", image)
        rows += [{"id": entry["id"], "annotation": s, "width": width, "height": height,
                  "cell_type": entry["cell_type"], "sample_id": entry.get("sample_id")}  # test rows drop sample_id
                 for s in label_rles(labels)]
    return rows


def synth_dataset(out: str | os.PathLike, n_images: int, seed: int = 0, n_test: int = 3,
                  force: bool = False, classes=None, shape=SHAPE, channels: int = 1, bit_depth: int = 8,
                  mask_folder: bool = False) -> Path:
    """Write a synthetic competition-format dataset to ``out`` (layout in the module docstring).

    Generated in a temporary sibling folder and renamed into place at the end, so ``out`` is never half-written.

    Args:
        out: destination folder; must be absent or empty unless ``force``.
        n_images: train images (>= 1); n_test: test images (>= 0).
        seed: any int >= 0; equal seeds give byte-identical files.
        force: replace a non-empty ``out``.
        classes: class names (default the three cell types); shape: ``(height, width)``; channels: 1 or 3;
            bit_depth: 8 or 16; mask_folder: the per-instance mask folder instead of ``train.csv`` + ``train/``.
            The defaults write the demo set, byte for byte as before these options.

    Returns:
        ``out`` as a Path.

    Raises:
        ValueError: bad counts, seed, classes, size, channels or bit depth; ``out`` is a file, or non-empty without
            ``force``.
    """
    out = Path(out)
    if n_images < 1 or n_test < 0 or seed < 0:
        raise ValueError(f"need --images >= 1, --test-images >= 0, --seed >= 0 (got {n_images}, {n_test}, {seed})")
    default = classes is None and tuple(shape) == SHAPE and channels == 1 and bit_depth == 8 and not mask_folder
    schema = S.DatasetSchema(classes=tuple(classes or CELL_TYPES), channels=channels, bit_depth=bit_depth,
                             rle_order="column" if mask_folder else "row", name="synthetic",
                             submission_columns=("ImageId", "EncodedPixels") if mask_folder else ("id", "predicted"))
    if len(shape) != 2 or min(shape) < 64:
        raise ValueError(f"--size {shape}: expected HEIGHTxWIDTH, each at least 64 pixels")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"{out}: folder is not empty; pass --force to replace it")
    with atomic.atomic_dir(out, "synth") as tmp:
        train, test = _plan(seed, n_images, n_test, schema.classes)
        columns = ["id", "annotation", "width", "height", "cell_type"]
        look = dict(classes=schema.classes, shape=tuple(shape), channels=channels, bit_depth=bit_depth,
                    mask_folder=mask_folder)
        train_rows = pd.DataFrame(_write_split(train, _TRAIN, seed, tmp / "train", "synth train", **look),
                                  columns=columns + ["sample_id"])
        if not mask_folder:
            train_rows.to_csv(tmp / "train.csv", index=False, lineterminator="\n")
        pd.DataFrame(_write_split(test, _TEST, seed, tmp / "test", "synth test", **look),
                     columns=columns).to_csv(tmp / "test_truth.csv", index=False, lineterminator="\n")
        pd.DataFrame({name: [e["id"] for e in test] if k == 0 else "" for k, name in
                      enumerate(schema.submission_columns)}).to_csv(tmp / "sample_submission.csv", index=False,
                                                                    lineterminator="\n")
        meta = {"generator": "cellkit.synth", "version": SYNTH_VERSION, "seed": seed, "images": n_images,
                "test_images": n_test, "shape": list(shape)}
        if not default:
            meta.update(classes=list(schema.classes), channels=channels, bit_depth=bit_depth, mask_folder=mask_folder)
            S.save_schema(schema, tmp)
        atomic.write_json(tmp / "synth.json", meta)
    return out

