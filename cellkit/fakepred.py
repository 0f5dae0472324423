"""Realistic instance predictions generated from truth, for developing post-processing before real models exist.

From each image's true masks this writes what a Mask R-CNN's test-time output looks like, as an
:mod:`cellkit.predictions` store (one ``.npz`` per image + ``meta.json``):

- detected cells: each true mask, shifted by a small random offset, with a soft probability edge: a logistic of the
  signed distance to the shifted mask's boundary, ``p = sigmoid(logit(edge_level) + (d + bias) / edge_width)``
  (``d`` >= +0.5 inside, <= -0.5 outside, in pixels; ``bias`` per instance ~ N(edge_bias, bias_std)). With
  ``bias = 0`` thresholding at ``edge_level`` gives back the shifted mask exactly; ``edge_bias > 0`` makes the
  model's masks too fat (the best pixel threshold then lies above ``edge_level``);
- missed cells (``miss_rate``);
- duplicate detections of a detected cell, shifted further, with a lower score (``dup_rate``, ``dup_score_factor``);
- false positives: soft elliptic blobs at random places (Poisson, mean ``fp_rate`` x number of cells), small
  (``fp_area``) and with low scores (``fp_score``);
- class confusion: a detection gets another cell type with probability ``class_confusion``.

Scores of true detections are ``lo + (hi - lo) * Beta(2, 1)`` over ``tp_score = (lo, hi)``; false positives use
``Beta(1, 2)`` over ``fp_score``. Because every random quantity lies in its stated range, tests can plant optimal
thresholds: e.g. ``fp_score`` and ``dup`` scores entirely under ``tp_score`` plant the best score threshold between
them, ``edge_level`` with ``edge_bias = bias_std = shift = 0`` plants the best pixel threshold, and ``fp_area`` under
the smallest cell plants the best minimum area.

Deterministic: image ``i`` uses ``numpy.random.default_rng([seed, crc32(image_id)])``, so an image's predictions do
not depend on which other images are generated (and an interrupted run resumes by skipping written files).
"""
import dataclasses
import json
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from scipy import ndimage

from cellkit import CELL_TYPES, predictions as P, rle

__all__ = ["FakeSpec", "PRESETS", "spec_for", "fake_image", "generate"]


@dataclasses.dataclass(frozen=True)
class FakeSpec:
    """Knobs of the generator (one spec per cell type; see the module docstring for the model).

    Attributes:
        miss_rate: probability that a true cell gets no detection.
        tp_score: ``(lo, hi)`` range of the scores of true detections.
        shift: std (pixels) of the integer offset of a detected mask.
        edge_level: probability at the boundary of the (shifted) true mask.
        edge_width: softness of the probability edge, pixels per logit unit (> 0).
        edge_bias: mean growth (pixels) of the predicted masks; negative shrinks them.
        bias_std: per-instance std of that growth.
        dup_rate: probability that a detected cell gets a second, lower-scored detection.
        dup_score_factor: ``(lo, hi)``: a duplicate's score is the original's times U(lo, hi).
        dup_shift: std (pixels) of a duplicate's extra offset.
        fp_rate: false positives per true cell of the image (Poisson mean).
        fp_score: ``(lo, hi)`` range of false positive scores.
        fp_area: ``(lo, hi)`` range of false positive areas (pixels, at ``edge_level``).
        class_confusion: probability that a detection is labelled with another cell type.
    """

    miss_rate: float = 0.05
    tp_score: tuple = (0.35, 0.99)
    shift: float = 0.7
    edge_level: float = 0.5
    edge_width: float = 1.2
    edge_bias: float = 0.0
    bias_std: float = 0.5
    dup_rate: float = 0.15
    dup_score_factor: tuple = (0.3, 0.85)
    dup_shift: float = 2.5
    fp_rate: float = 0.15
    fp_score: tuple = (0.05, 0.7)
    fp_area: tuple = (15, 300)
    class_confusion: float = 0.02

    def __post_init__(self):
        for names, bad, rule in ((("miss_rate", "dup_rate", "class_confusion"), lambda v: not 0.0 <= v <= 1.0,
                                  "is out of range [0, 1]"),
                                 (("shift", "bias_std", "dup_shift", "fp_rate"), lambda v: v < 0, "must be >= 0"),
                                 (("edge_level",), lambda v: not 0.0 < v < 1.0, "is out of range (0, 1)"),
                                 (("edge_width",), lambda v: v <= 0, "must be > 0")):
            for name in names:
                if bad(getattr(self, name)):
                    raise ValueError(f"FakeSpec.{name} = {getattr(self, name)} {rule}")
        for name, low, high in (("tp_score", 0.0, 1.0), ("fp_score", 0.0, 1.0), ("dup_score_factor", 0.0, 1.0),
                                ("fp_area", 1.0, float("inf"))):
            lo, hi = getattr(self, name)
            if not low <= lo <= hi <= high:
                raise ValueError(f"FakeSpec.{name} = {(lo, hi)} must satisfy {low} <= lo <= hi <= {high}")
            object.__setattr__(self, name, (float(lo), float(hi)))


#: Named sets of per-class specs.
PRESETS = {
    # a detector of mixed quality, different per cell type, so that class-wise thresholds pay off: shsy5y cells are
    # small and crowded (fat masks, many false positives and duplicates), astro masks are soft and too thin,
    # cort is the easy class.
    "realistic": {
        "shsy5y": FakeSpec(miss_rate=0.12, tp_score=(0.3, 0.98), edge_bias=0.8, edge_width=1.0, fp_rate=0.3,
                           fp_score=(0.05, 0.75), fp_area=(10, 120), dup_rate=0.25, class_confusion=0.03),
        "astro": FakeSpec(miss_rate=0.1, tp_score=(0.3, 0.95), edge_bias=-1.0, edge_width=2.5, bias_std=1.0,
                          fp_rate=0.2, fp_score=(0.05, 0.65), fp_area=(50, 800), dup_rate=0.2, shift=1.2,
                          class_confusion=0.05),
        "cort": FakeSpec(miss_rate=0.03, tp_score=(0.5, 0.99), fp_rate=0.1, fp_area=(20, 200), dup_rate=0.1),
    },
    # what a perfect detector would give, with soft edges only: the seed's defaults are already optimal
    "clean": {c: FakeSpec(miss_rate=0.0, tp_score=(0.9, 1.0), shift=0.0, bias_std=0.0, dup_rate=0.0, fp_rate=0.0,
                          class_confusion=0.0) for c in CELL_TYPES},
}


def spec_for(preset: str = "realistic", **overrides) -> dict[str, FakeSpec]:
    """Per-class specs of a preset, with the given fields replaced in every class's spec.

    Raises:
        ValueError: an unknown preset or field, or an out-of-range value.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown fakepred preset {preset!r} (expected {', '.join(PRESETS)})")
    fields = {f.name for f in dataclasses.fields(FakeSpec)}
    bad = [k for k in overrides if k not in fields]
    if bad:
        raise ValueError(f"unknown fakepred knob {bad[0]!r} (expected one of {', '.join(sorted(fields))})")
    return {c: dataclasses.replace(s, **overrides) for c, s in PRESETS[preset].items()}


def _soft_instance(mask_rows: np.ndarray, mask_cols: np.ndarray, shape: tuple[int, int], dy: int, dx: int,
                   bias: float, spec: FakeSpec) -> tuple[np.ndarray, np.ndarray] | None:
    """Probability crop of a mask given by its pixel coordinates, shifted by ``(dy, dx)``.

    Returns:
        ``(window x0,y0,x1,y1 int32 (4,), uint8 crop)`` or None when the shifted mask leaves the image.
    """
    height, width = shape
    rows, cols = mask_rows + dy, mask_cols + dx
    if not ((rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)).any():
        return None  # no pixel inside the image
    logit = float(np.log(spec.edge_level / (1.0 - spec.edge_level)))  # of the probability at the boundary
    margin = int(np.ceil(spec.edge_width * (6.5 + abs(logit)) + max(bias, 0.0))) + 1
    r0, r1 = int(rows.min()) - margin, int(rows.max()) + margin + 1
    c0, c1 = int(cols.min()) - margin, int(cols.max()) + margin + 1
    local = np.zeros((r1 - r0, c1 - c0), dtype=bool)
    local[rows - r0, cols - c0] = True
    signed = np.where(local, ndimage.distance_transform_edt(local) - 0.5,
                      0.5 - ndimage.distance_transform_edt(~local))
    prob = 1.0 / (1.0 + np.exp(-(logit + (signed + bias) / spec.edge_width)))  # sigmoid
    y0, y1, x0, x1 = max(r0, 0), min(r1, height), max(c0, 0), min(c1, width)
    crop = P.quantize(prob[y0 - r0:y1 - r0, x0 - c0:x1 - c0])
    nz_r, nz_c = np.flatnonzero(crop.any(axis=1)), np.flatnonzero(crop.any(axis=0))
    if not nz_r.size:
        return None
    crop = np.ascontiguousarray(crop[nz_r[0]:nz_r[-1] + 1, nz_c[0]:nz_c[-1] + 1])
    return np.array([x0 + nz_c[0], y0 + nz_r[0], x0 + nz_c[-1] + 1, y0 + nz_r[0] + crop.shape[0]], dtype=np.int32), crop


def _ellipse(rng: np.random.Generator, area: float, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates of a random ellipse of about ``area`` pixels centred somewhere in the image."""
    a = np.sqrt(area * rng.uniform(1.0, 3.0) / np.pi)  # the axes' ratio is uniform in [1, 3]
    b = area / (np.pi * a)
    theta = rng.uniform(0, np.pi)
    cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
    ext = int(np.ceil(a)) + 1
    yy, xx = np.mgrid[-ext:ext + 1, -ext:ext + 1]
    u = xx * np.cos(theta) + yy * np.sin(theta)
    v = -xx * np.sin(theta) + yy * np.cos(theta)
    inside = (u / a) ** 2 + (v / max(b, 0.5)) ** 2 <= 1.0
    if not inside.any():
        inside[ext, ext] = True
    return (yy[inside] + int(cy)), (xx[inside] + int(cx))


def fake_image(image_id: str, truth_rles, cell_type: str, specs: Mapping[str, FakeSpec], seed: int = 0,
               shape: tuple[int, int] = (520, 704)) -> P.InstancePredictions:
    """Generated predictions of one image.

    Args:
        image_id: the image's id (also seeds its random stream with ``seed``).
        truth_rles: the image's true masks as competition RLE strings (empty strings are skipped).
        cell_type: the image's cell type (a name of CELL_TYPES); picks the spec and the detections' class.
        specs: ``{cell type: FakeSpec}`` (e.g. :func:`spec_for`).
        seed: the run's seed.
        shape: ``(H, W)`` of the image.

    Returns:
        InstancePredictions sorted by descending score.
    """
    if cell_type not in CELL_TYPES:
        raise ValueError(f"image {image_id}: unknown cell type {cell_type!r}")
    spec = specs[cell_type]
    cls = CELL_TYPES.index(cell_type)
    others = [c for c in range(len(CELL_TYPES)) if c != cls]
    rng = np.random.default_rng([int(seed), zlib.crc32(str(image_id).encode())])
    detections = []  # (window, crop, score, class)

    def add(rows, cols, dy, dx, bias, score):
        made = _soft_instance(rows, cols, shape, dy, dx, bias, spec)
        if made is not None:
            detections.append((*made, score, int(rng.choice(others)) if rng.random() < spec.class_confusion else cls))

    areas = []
    for s in truth_rles:
        starts, lengths = rle.parse(s, shape)
        if not lengths.size:
            continue
        rows, cols = np.divmod(rle.runs_to_indices(starts, lengths), shape[1])
        areas.append(rows.size)
        if rng.random() < spec.miss_rate:
            continue
        dy, dx = np.rint(rng.normal(0.0, spec.shift, 2)).astype(int) if spec.shift else (0, 0)
        bias = spec.edge_bias + (rng.normal(0.0, spec.bias_std) if spec.bias_std else 0.0)
        lo, hi = spec.tp_score
        score = lo + (hi - lo) * rng.beta(2.0, 1.0)
        add(rows, cols, dy, dx, bias, score)
        if rng.random() < spec.dup_rate:
            ddy, ddx = np.rint(rng.normal(0.0, spec.dup_shift, 2)).astype(int) if spec.dup_shift else (0, 0)
            add(rows, cols, dy + ddy, dx + ddx, bias, score * rng.uniform(*spec.dup_score_factor))
    for _ in range(rng.poisson(spec.fp_rate * len(areas))):
        rows, cols = _ellipse(rng, rng.uniform(*spec.fp_area), shape)
        lo, hi = spec.fp_score
        add(rows, cols, 0, 0, 0.0, lo + (hi - lo) * rng.beta(1.0, 2.0))
    detections.sort(key=lambda d: -d[2])  # by descending score, stable
    windows = np.asarray([d[0] for d in detections], dtype=np.int32).reshape(-1, 4)
    boxes = windows.astype(np.float32) + rng.normal(0.0, 0.5, (len(detections), 4)).astype(np.float32)
    boxes = np.clip(boxes, 0, [shape[1], shape[0], shape[1], shape[0]]).astype(np.float32)
    return P.InstancePredictions(image_id, shape[0], shape[1], np.asarray([d[3] for d in detections], dtype=np.int64),
                                 np.asarray([d[2] for d in detections], dtype=np.float32), boxes, windows,
                                 [d[1] for d in detections])


def generate(truth, out_dir, specs: Mapping[str, FakeSpec] | None = None, seed: int = 0, image_ids=None,
             resume: bool = True, progress: bool = True) -> Path:
    """Write generated predictions for the images of a truth table as a predictions store.

    Args:
        truth: DataFrame of a competition train CSV (``id, annotation, width, height, cell_type``), e.g. from
            :func:`cellkit.data.read_train_csv`.
        out_dir: the store directory (created).
        specs: per-class specs (default: the ``realistic`` preset).
        seed: the run's seed.
        image_ids: only these images (default: all of the table), each must be in the table.
        resume: skip images whose ``.npz`` already exists (the directory's meta.json must then agree on the seed
            and specs, else ValueError).
        progress: tqdm bar.

    Returns:
        ``out_dir`` as a Path (with ``meta.json``: ``config = "fakepred"``, the seed, specs and the truth path).
    """
    from tqdm import tqdm

    specs = dict(specs or PRESETS["realistic"])
    out_dir = Path(out_dir)
    meta = {"config": "fakepred", "weights": None, "folds": None, "source": "cellkit.fakepred",
            "fakepred": {"seed": int(seed), "truth": truth.attrs.get("path"),
                         "specs": {c: dataclasses.asdict(s) for c, s in specs.items()}}}
    if resume and (out_dir / P.META_NAME).is_file():
        old = P.read_meta(out_dir).get("fakepred", {})
        new = json.loads(json.dumps(meta["fakepred"]))  # as it reads back from JSON (tuples become lists)
        if {k: old.get(k) for k in ("seed", "specs")} != {k: new[k] for k in ("seed", "specs")}:
            raise ValueError(f"{out_dir}: holds fakepred predictions of another seed or spec; use a new directory "
                             f"or resume=False")
    groups = truth.groupby("id", sort=True)
    ids = sorted(groups.groups) if image_ids is None else sorted(set(map(str, image_ids)))
    unknown = [i for i in ids if i not in groups.groups]
    if unknown:
        raise ValueError(f"fakepred: {len(unknown)} image id(s) not in the truth, e.g. {unknown[:5]}")
    P.write_meta(out_dir, meta)  # creates the directory
    for image_id in tqdm(ids, desc="fakepred", unit="image", disable=not progress):
        if resume and (out_dir / f"{image_id}.npz").is_file():
            continue
        rows = groups.get_group(image_id)
        shape = (int(rows["height"].iat[0]), int(rows["width"].iat[0]))
        P.save(fake_image(image_id, rows["annotation"].tolist(), str(rows["cell_type"].iat[0]), specs, seed, shape),
               out_dir)
    return out_dir

