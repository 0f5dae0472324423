"""Prediction runs: one model or an ensemble of models over a folder of images (or a fold's held-out images) -> a store.

A stage of its own between training and post-processing: it finds a run's weights (:func:`run_weights`), lists the
images (:func:`list_images`, :func:`fold_images`), loads the members (:func:`load_ensemble`), predicts every image
with :func:`cellkit.tta.predict_members` (passes and fusion: :mod:`cellkit.tta`, :mod:`cellkit.fusion`) into a
:mod:`cellkit.predictions` store, resumes an interrupted store, and collects out-of-fold predictions
(:func:`predict_oof`).

**The inference signature.** Every store's ``meta.json`` records how its predictions were made::

    {"format": "cellkit.predict/2",
     "signature": {"passes": {"min_sizes": [...], "max_size": int, "flip": bool, "n_passes": int},
                   "fusion": {"mode": "nms" | "wbf" | "wmf", "iou": float, "score": "mean" | "max"},
                   "detections_per_image": int},
     "sources": [{"fold": int | null, "images": dir, "n_images": int,
                  "members": [{"run", "config", "weights", "sha256"}, ...]}, ...],
     "cellkit_version": str}

The signature is what the thresholds fitted on a store depend on; ``cellkit search`` copies it into
``thresholds.json`` (``"inference"``) and ``cellkit submit`` refuses a store whose signature differs
(:func:`signature_difference`). The members are provenance, not part of the comparison: out-of-fold predictions
come from one fold model per image, the test store from the K-fold ensemble (standard practice; its scores are the
ensemble's fused scores, which the thresholds were not fitted on: see the README). A store takes more images (more
folds) only with the same signature. ``cellkit predict --like thresholds.json`` predicts with a file's signature.
Stores of cellkit before the signature (``meta.json`` with ``"tta"``) read as NMS with the ``max`` score.
"""
import contextlib
import glob
import hashlib
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from detectron2.data.detection_utils import convert_PIL_to_numpy
from PIL import ImageOps
from tqdm import tqdm

from cellkit import __version__, datacheck, predictions
from cellkit.config import CONFIG_FILE_NAME, load_run_config
from cellkit.data import IMAGE_EXTENSIONS, find_image, open_image, to_8bit
from cellkit.folds import fold_ids, read_folds
from cellkit.fusion import FusionSettings, weighted_mask_fusion
from cellkit.modeling import load_model
from cellkit.rundir import WEIGHT_NAMES, is_run, run_weights
from cellkit.predictions import read_signature, signature_difference, store_signature
from cellkit.schema import SARTORIUS, DatasetSchema, recorded_schema, schema_of
from cellkit.tta import CellTTA, TTASettings, check_num_classes, predict_members, tta_settings

__all__ = ["META_FORMAT", "WEIGHT_NAMES", "run_weights", "list_images", "fold_images", "check_held_out", "check_run",
           "run_folds_csv", "expand_runs", "sha256_file", "Ensemble", "load_ensemble", "store_signature",
           "read_signature", "signature_difference", "predict_images", "predict_oof", "fuse_stores", "read_image",
           "check_images"]

#: ``format`` of a store's ``meta.json`` written with an inference signature.
META_FORMAT = "cellkit.predict/2"

def list_images(image_dir) -> list[tuple[str, Path]]:
    """``(image_id, path)`` of every image (:data:`cellkit.data.IMAGE_EXTENSIONS`) in ``image_dir``, sorted by id.

    Raises:
        FileNotFoundError: the directory does not exist.
        ValueError: it holds no image, or two files share an id (``a.png`` and ``a.tif``).
    """
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir}: image directory does not exist")
    found: dict[str, Path] = {}
    for p in sorted(image_dir.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."):
            if p.stem in found:
                raise ValueError(f"{image_dir}: two images with id {p.stem!r} ({found[p.stem].name}, {p.name})")
            found[p.stem] = p
    if not found:
        raise ValueError(f"{image_dir}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    return sorted(found.items())


def fold_images(data_dir, fold: int, folds_csv=None) -> list[tuple[str, Path]]:
    """``(image_id, path)`` of the held-out images of ``fold`` in a competition-layout data directory.

    Args:
        data_dir: holds ``train/<id>.png`` (and usually ``train.csv``, ``folds.csv``).
        fold: the held-out fold.
        folds_csv: the folds file; default ``<data_dir>/folds.csv``.

    Raises:
        FileNotFoundError: no folds file, no ``train/`` folder, an image of the fold missing (naming it).
        ValueError: a fold that is not in the folds file (see :func:`cellkit.folds.fold_ids`).
    """
    data_dir = Path(data_dir)
    folds_csv = Path(folds_csv) if folds_csv else data_dir / "folds.csv"
    if not folds_csv.is_file():
        raise FileNotFoundError(f"{folds_csv}: no folds file (write one with `python -m cellkit folds`, or train "
                                f"first: the run directory keeps its folds.csv)")
    ids = fold_ids(read_folds(folds_csv), int(fold), "val")
    if not ids:
        raise ValueError(f"{folds_csv}: fold {fold} has no images")
    return sorted((i, find_image(data_dir / "train", i)) for i in ids)


def check_held_out(cfg, fold: int, run_dir) -> None:
    """Refuse predictions on ``fold`` by a run that trained on it (they would not be out-of-fold).

    Raises:
        ValueError: the run's ``CELLKIT.DATA.FOLD`` is not ``fold`` (``-1``: it trained on every image).
    """
    held_out = int(cfg.CELLKIT.DATA.FOLD)
    if held_out != int(fold):
        what = "trained on every image (CELLKIT.DATA.FOLD -1)" if held_out < 0 else f"held out fold {held_out}"
        raise ValueError(f"{run_dir}: the run {what}, so its predictions on fold {fold} would not be out-of-fold; "
                         f"use the run that held out fold {fold}")


def check_run(run_dir, weights=None, fold: int | None = None):
    """A run's config and checkpoint (:func:`run_weights`), its inputs checked before any model is built.

    Args:
        run_dir: a ``cellkit train`` output directory.
        weights: its checkpoint; None: the best/final one.
        fold: when given, the run must have held this fold out (:func:`check_held_out`).

    Returns:
        ``(cfg, checkpoint path)``.

    Raises:
        FileNotFoundError / ValueError: a missing run directory, config or checkpoint, a wrong class count, a run
            that trained on ``fold``.
    """
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"{run_dir}: run directory {'' if fold is None else f'of fold {fold} '}does not exist")
    cfg = load_run_config(run_dir)
    check_num_classes(cfg, schema_of(run_dir).classes)
    weights = run_weights(run_dir, weights)
    if fold is not None:
        check_held_out(cfg, fold, run_dir)
    return cfg, weights


def run_folds_csv(run_dir, cfg, data_dir) -> Path | None:
    """The folds file a run was trained with: ``CELLKIT.DATA.FOLDS_CSV``, ``<run>/folds.csv``, ``<data>/folds.csv``."""
    candidates = [Path(cfg.CELLKIT.DATA.FOLDS_CSV)] if "CELLKIT" in cfg and cfg.CELLKIT.DATA.FOLDS_CSV else []
    candidates += [Path(run_dir) / "folds.csv", Path(data_dir) / "folds.csv"]
    return next((c for c in candidates if c.is_file()), candidates[-1])



def expand_runs(patterns: Sequence[str]) -> list[Path]:
    """Run directories from ``--run`` values: paths, or globs (``'OUT/fold*'``) matching run directories.

    A glob keeps the matches holding ``config.yaml`` (sorted, fold10 after fold2); duplicates are dropped in order.

    Raises:
        FileNotFoundError: a glob matching no run directory (naming it).
    """
    out: list[Path] = []
    for pattern in map(str, patterns):
        found = (sorted((Path(p) for p in glob.glob(pattern) if is_run(p)), key=lambda p: (len(p.name), p.name, str(p)))
                 if glob.has_magic(pattern) else [Path(pattern)])
        if not found:
            raise FileNotFoundError(f"--run {pattern!r}: matches no run directory (a folder with config.yaml)")
        for p in found:
            if p.resolve() not in {q.resolve() for q in out}:
                out.append(p)
    if not out:
        raise ValueError("no run directories given (--run)")
    return out


def sha256_file(path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file (a member's checkpoint in the signature's provenance)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


class Ensemble:
    """The members of one inference run and how they are fused; ``predict`` gives one image's predictions.

    Args:
        members: loaded :class:`cellkit.tta.CellTTA` models with identical passes (one member: that model alone).
        fusion: :class:`cellkit.fusion.FusionSettings` (resolved).
        infos: per member ``{"run", "config", "weights", "sha256"}`` (provenance for ``meta.json``).
        schema: the dataset the members were trained on (:mod:`cellkit.schema`; recorded in ``meta.json``).
    """

    def __init__(self, members: Sequence[CellTTA], fusion: FusionSettings, infos: Sequence[dict],
                 schema: DatasetSchema = SARTORIUS):
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members, self.fusion, self.infos, self.schema = list(members), fusion, list(infos), schema
        self.cfg = self.members[0].cfg

    @property
    def n_passes(self) -> int:
        """Forward passes per image and member."""
        return self.members[0].n_passes

    @property
    def signature(self) -> dict:
        """The inference signature (module docstring), without the members."""
        return {"passes": self.members[0].settings.as_dict(), "fusion": self.fusion.as_dict(),
                "detections_per_image": int(self.cfg.TEST.DETECTIONS_PER_IMAGE)}

    def predict(self, image: np.ndarray, image_id: str):
        """One image's fused predictions (:func:`cellkit.tta.predict_members`)."""
        return predict_members(self.members, image, image_id, self.fusion)


def load_ensemble(run_dirs: Sequence, weights: Sequence | None = None, tta: bool = False, device: str | None = None,
                  fusion: FusionSettings | None = None, settings: TTASettings | None = None,
                  detections: int | None = None, cache_features: bool = True) -> Ensemble:
    """Load run directories (``config.yaml`` + checkpoint) as the members of an :class:`Ensemble`.

    Every member's inputs are checked before any model is built.

    Args:
        run_dirs: ``cellkit train`` output directories (one: a single model).
        weights: one checkpoint per run (None entries: :func:`run_weights`); default: every run's best/final.
        tta: every ``TEST.AUG`` pass, else one pass at the test size (ignored when ``settings`` is given).
        device: ``cpu``/``cuda``; default the config's ``MODEL.DEVICE``, ``cpu`` without CUDA.
        fusion: default NMS with the fused score at the first member's ``ROI_HEADS.NMS_THRESH_TEST``.
        settings: the passes (e.g. a signature's), overriding the members' ``TEST.AUG`` / test size.
        detections: ``TEST.DETECTIONS_PER_IMAGE`` for every member (e.g. a signature's); default the configs'.
        cache_features: keep backbone features between the box and mask passes (the backbone runs once per pass
            and member; the pyramids of all members' passes of one image are held at once); False recomputes them
            (one member's pass in memory at a time, twice the backbone cost).

    Raises:
        FileNotFoundError / ValueError: a missing run, config or checkpoint, a wrong class count, members whose
            passes, detections per image or input format differ (naming both runs).
    """
    run_dirs = [Path(r) for r in run_dirs]
    if not run_dirs:
        raise ValueError("load_ensemble: no run directories")
    weights = list(weights) if weights is not None else [None] * len(run_dirs)
    if len(weights) != len(run_dirs):
        raise ValueError(f"load_ensemble: {len(weights)} weights for {len(run_dirs)} runs")
    plans = []
    for run_dir, w in zip(run_dirs, weights):
        cfg, w = check_run(run_dir, w)
        cfg.MODEL.DEVICE = device or cfg.MODEL.DEVICE
        if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
            cfg.MODEL.DEVICE = "cpu"
        cfg.SOLVER.AMP.ENABLED = cfg.SOLVER.AMP.ENABLED and cfg.MODEL.DEVICE.startswith("cuda")
        if detections is not None:
            cfg.TEST.DETECTIONS_PER_IMAGE = int(detections)
        plans.append((run_dir, cfg, w, settings if settings is not None else tta_settings(cfg, tta)))
    lead_dir, lead, _, lead_settings = plans[0]
    lead_schema = schema_of(lead_dir)
    for run_dir, cfg, _, s in plans[1:]:
        if (other := schema_of(run_dir)) != lead_schema:
            raise ValueError(f"{run_dir}: trained on another dataset ({other.name}: classes {list(other.classes)}) "
                             f"than {lead_dir} ({list(lead_schema.classes)})")
        if s != lead_settings:
            raise ValueError(f"{run_dir}: its passes {s.as_dict()} differ from {lead_dir}'s {lead_settings.as_dict()} "
                             f"(TEST.AUG / INPUT.*_TEST); give the passes explicitly (--like)")
        for key, a, b in (("TEST.DETECTIONS_PER_IMAGE", cfg.TEST.DETECTIONS_PER_IMAGE,
                           lead.TEST.DETECTIONS_PER_IMAGE), ("INPUT.FORMAT", cfg.INPUT.FORMAT, lead.INPUT.FORMAT)):
            if a != b:
                raise ValueError(f"{run_dir}: {key} is {a!r}, {lead_dir} has {b!r}; ensemble members must agree")
    fusion = (fusion or FusionSettings()).resolved(lead.MODEL.ROI_HEADS.NMS_THRESH_TEST)
    pass_fusion = FusionSettings("nms", None, fusion.score) if fusion.mode == "wmf" else fusion
    members = [CellTTA(cfg, load_model(cfg, w), tta=tta, settings=s, fusion=pass_fusion, cache_features=cache_features)
               for _, cfg, w, s in plans]
    infos = [{"run": str(run_dir.resolve()), "config": str((run_dir / CONFIG_FILE_NAME).resolve()),
              "weights": str(Path(w).resolve()), "sha256": sha256_file(w)} for run_dir, _, w, _ in plans]
    return Ensemble(members, fusion, infos, lead_schema)


def _merge_meta(out: Path, signature: dict, source: dict, schema: DatasetSchema = SARTORIUS) -> dict:
    """``meta.json`` content after adding ``source``; refuses another signature or dataset, or another model set for
    a fold.

    A source with the same ``fold`` (or, without folds, the same ``images``) is replaced. A dataset other than
    Sartorius is recorded under ``"dataset"`` (:func:`cellkit.schema.recorded_schema` reads it).
    """
    meta = {"format": META_FORMAT, "signature": signature, "sources": [], "cellkit_version": __version__}
    if schema != SARTORIUS:
        meta["dataset"] = schema.to_dict()
    meta_path = out / predictions.META_NAME
    if meta_path.is_file():
        old = predictions.read_meta(out)
        if (held := recorded_schema(old, str(meta_path))) != schema:
            raise ValueError(f"{meta_path}: the store holds predictions for another dataset "
                             f"({held.name}, not {schema.name}); use another --out")
        if "signature" not in old:
            raise ValueError(f"{meta_path}: the store was written by an older cellkit (no inference signature); "
                             f"use another --out")
        if diff := signature_difference(old["signature"], signature):
            raise ValueError(f"{meta_path}: the store holds predictions made with other settings ({diff}: store vs "
                             f"this run); use another --out")
        sources = old.get("sources", [])
        if not isinstance(sources, list) or not all(isinstance(s, dict) for s in sources):
            raise ValueError(f"{meta_path}: 'sources' must be a list of objects (not written by cellkit predict?)")
        meta["sources"] = list(sources)
    elif out.is_dir() and any(not p.name.startswith(".") for p in out.glob("*.npz")):
        raise ValueError(f"{out}: holds predictions without {predictions.META_NAME} (not written by cellkit "
                         f"predict); use another --out")
    key = ("fold", source["fold"]) if source["fold"] is not None else ("images", source["images"])
    digest = sorted(m["sha256"] for m in source["members"])
    for old_src in meta["sources"]:
        if old_src.get(key[0]) == key[1] and sorted(m.get("sha256", "") for m in old_src.get("members", [])) != digest:
            raise ValueError(f"{meta_path}: the store holds predictions of {key[0]} {key[1]} made by other "
                             f"models ({[m.get('weights') for m in old_src.get('members', [])]}), not "
                             f"{[m['weights'] for m in source['members']]}; use another --out")
    meta["sources"] = [s for s in meta["sources"] if s.get(key[0]) != key[1]] + [source]
    return meta


def _existing_ids(out: Path) -> set:
    """Ids already stored in ``out`` (resume); an error for a foreign file there."""
    if not out.exists():
        return set()
    if not out.is_dir():
        raise ValueError(f"{out}: output path exists and is not a directory")
    if any(not p.name.startswith(".") for p in out.glob("*.npz")):  # a killed first write leaves only a hidden temp
        return set(predictions.image_ids(out))
    if foreign := [p for p in out.iterdir() if not p.name.startswith(".") and p.name != predictions.META_NAME]:
        raise ValueError(f"{foreign[0]}: foreign file in predictions directory {out}")
    return set()


def read_image(path, fmt: str) -> np.ndarray:
    """An image as the model reads it: uint8 ``(H, W, 3)`` in ``fmt`` (``cfg.INPUT.FORMAT``), like detectron2's
    ``read_image`` (EXIF orientation applied), after a complete decode (:func:`cellkit.data.open_image`).

    Raises:
        FileNotFoundError: no such file.
        ValueError: naming the file, when it is not an image, truncated or corrupt, or neither 8-bit nor 16-bit
            grayscale (which :func:`cellkit.data.to_8bit` reads).
    """
    image = to_8bit(open_image(path, sixteen_bit=True))
    try:
        array = convert_PIL_to_numpy(ImageOps.exif_transpose(image), fmt)
    except Exception as exc:  # a mode detectron2 cannot convert to fmt
        raise ValueError(f"{path}: cannot convert the image to {fmt} ({exc})") from None
    if array.dtype != np.uint8:
        raise ValueError(f"{path}: expected an 8-bit image, got {array.dtype}")
    return array


def check_images(paths: Sequence[Path], workers: int | None = None, progress: bool = True,
                 max_problems: int = 30) -> None:
    """Decode every image completely (:func:`cellkit.data.open_image`, in parallel processes) before any work.

    Raises:
        ValueError: one :class:`cellkit.datacheck.DataCheckError` naming every unreadable, truncated or non-8-bit
            image (up to ``max_problems`` listed).
    """
    results = datacheck.run_parallel(datacheck.image_problem, [(str(p), None, True) for p in paths],
                                      datacheck._workers(workers), "checking images", progress)
    if problems := [((str(p),), msg) for p, msg in zip(paths, results) if msg]:
        raise datacheck.DataCheckError(f"the {len(paths)} image(s) to predict", problems, max_problems,
                                       consequence="nothing was predicted")


def _remove_stale_temporaries(out: Path, image_ids: Sequence[str]) -> None:
    """Delete temporary files a killed run left in a store (:mod:`cellkit.atomic`'s hidden names): those of the
    images this run is about to write (``.<id>.npz.<random>.npz``) and ``meta.json`` temporaries older than a
    minute. Readers skip them anyway, but a resumed store should equal an uninterrupted one; a concurrent run
    writing other images (another fold) into the same store is left alone."""
    for image_id in image_ids:
        for path in out.glob(f".{glob.escape(image_id)}.npz.*.npz"):
            path.unlink(missing_ok=True)
    for path in out.glob(".meta.json.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            if time.time() - path.stat().st_mtime > 60:
                path.unlink(missing_ok=True)



def predict_images(predictor: Ensemble, images: Sequence[tuple[str, Path]], out, source: dict,
                   progress: bool = True) -> dict:
    """Predict images into a store directory, skipping ids already there (resume).

    Args:
        predictor: from :func:`load_ensemble` (one member or several).
        images: ``(image_id, path)`` pairs.
        out: predictions directory (created); gets one ``<id>.npz`` per image and ``meta.json``.
        source: ``fold`` (or None) and ``images`` (the folder) of this call; the members come from ``predictor``.
        progress: show a tqdm bar.

    Returns:
        ``{"written": n, "skipped": n, "seconds": s}``.
    """
    out = Path(out)
    done = _existing_ids(out)
    meta = _merge_meta(out, predictor.signature, {"fold": source.get("fold"), "images": source.get("images"),
                                                  "n_images": len(images), "members": predictor.infos},
                       predictor.schema)
    todo = [(i, p) for i, p in images if i not in done]
    check_images([p for _, p in todo], progress=progress)  # before anything is written
    _remove_stale_temporaries(out, [i for i, _ in todo])
    predictions.write_meta(out, meta)
    start = time.perf_counter()
    for image_id, path in tqdm(todo, desc=f"predict -> {out.name}", unit="img", disable=not progress):
        predictions.save(predictor.predict(read_image(path, predictor.cfg.INPUT.FORMAT), image_id), out)
    return {"written": len(todo), "skipped": len(images) - len(todo), "seconds": time.perf_counter() - start}


def predict_oof(run_dirs_by_fold: Mapping, data_dir, out, tta: bool = False, weights_by_fold: Mapping | None = None,
                device: str | None = None, progress: bool = True, fusion: FusionSettings | None = None,
                settings: TTASettings | None = None) -> dict:
    """Out-of-fold predictions: each fold's held-out images by that fold's model(s), all into one directory.

    Every fold's inputs (run directories, configs, weights, folds file, images) are checked before any prediction.

    Args:
        run_dirs_by_fold: ``{fold: run_dir}`` or ``{fold: [run_dir, ...]}`` (an ensemble of that fold's models).
        data_dir: competition-layout data directory (``train/<id>.png``, ``folds.csv``).
        out: the predictions directory (resumable).
        tta: TTA passes for every fold.
        weights_by_fold: optional ``{fold: checkpoint}`` overriding a one-run fold's best/final checkpoint.
        device: see :func:`load_ensemble`.
        fusion, settings: see :func:`load_ensemble` (one signature for the whole store).

    Returns:
        ``{fold: {"written", "skipped", "seconds"}}``.
    """
    if not run_dirs_by_fold:
        raise ValueError("predict_oof: no fold run directories given")
    weights_by_fold = weights_by_fold or {}
    plans = {}
    for fold, runs in sorted(run_dirs_by_fold.items()):
        runs = [runs] if isinstance(runs, (str, Path)) else list(runs)
        cfgs = [check_run(run_dir, weights_by_fold.get(fold) if len(runs) == 1 else None, fold)[0] for run_dir in runs]
        plans[fold] = (runs, fold_images(data_dir, fold, run_folds_csv(runs[0], cfgs[0], data_dir)))
    ids = [i for _, images in plans.values() for i, _ in images]
    if len(ids) != len(set(ids)):
        raise ValueError("predict_oof: an image is held out by more than one fold (folds files differ between runs)")
    results = {}
    for fold, (runs, images) in plans.items():
        predictor = load_ensemble(runs, [weights_by_fold.get(fold)] if len(runs) == 1 else None, tta=tta,
                                  device=device, fusion=fusion, settings=settings)
        results[fold] = predict_images(predictor, images, out,
                                       {"fold": int(fold), "images": str(Path(data_dir).resolve() / "train")},
                                       progress=progress)
        del predictor
    return results


def fuse_stores(stores: Sequence, out, iou: float = 0.5, progress: bool = True) -> dict:
    """Weighted mask fusion of stores predicted by different models over the same images into one store.

    The same result as predicting with ``--fusion wmf`` (each member alone, its passes merged by NMS, then
    :func:`cellkit.fusion.weighted_mask_fusion` with at most ``detections_per_image`` instances), from stores made
    separately (other sessions, other machines, members whose heads differ). Resumes: ids already in ``out`` are
    skipped.

    Args:
        stores: ``K`` predictions directories with the same images, passes and detections per image, each made by
            NMS fusion (one model, or box-first ensembles).
        out: the fused store (``meta.json``: fusion ``wmf`` with ``iou``, the members of every store).
        iou: mask IoU of a match.

    Returns:
        ``{"written": n, "skipped": n, "seconds": s}``.

    Raises:
        ValueError: fewer than two stores, other image sets, passes or detections per image (naming the stores), a
            store not made by NMS fusion.
    """
    stores = [Path(s) for s in stores]
    if len(stores) < 2:
        raise ValueError("fuse: give at least two stores (--pred)")
    metas = [predictions.read_meta(s) for s in stores]
    sigs = [store_signature(m) for m in metas]
    ids = [predictions.image_ids(s) for s in stores]
    for store, meta, sig, these in zip(stores, metas, sigs, ids):
        if sig is None or "signature" not in meta:
            raise ValueError(f"{store}: no inference signature in meta.json (made by an older cellkit?)")
        if sig["fusion"]["mode"] != "nms":
            raise ValueError(f"{store}: made with fusion {sig['fusion']['mode']!r}; fuse stores made with 'nms'")
        if diff := signature_difference({**sigs[0], "fusion": sig["fusion"]}, sig):
            raise ValueError(f"{store}: predicted otherwise than {stores[0]} ({diff}: {stores[0].name} vs "
                             f"{store.name})")
        if these != ids[0]:
            raise ValueError(f"{store}: holds other images than {stores[0]} "
                             f"(e.g. {sorted(set(ids[0]) ^ set(these))[:3]})")
        if recorded_schema(meta, str(store)) != recorded_schema(metas[0], str(stores[0])):
            raise ValueError(f"{store}: predicted for another dataset than {stores[0]}")
    signature = {**sigs[0],
                 "fusion": FusionSettings("wmf", float(iou), sigs[0]["fusion"].get("score") or "mean").as_dict()}
    by_key: dict = {}
    for meta in metas:
        for src in meta.get("sources", []):
            key = (src.get("fold"), src.get("images") if src.get("fold") is None else None)
            entry = {"fold": src.get("fold"), "images": src.get("images"), "n_images": src.get("n_images"),
                     "members": []}
            by_key.setdefault(key, entry)["members"] += src.get("members", [])
    out = Path(out)
    done = _existing_ids(out)
    for src in by_key.values():
        predictions.write_meta(out, _merge_meta(out, signature, src, recorded_schema(metas[0], str(stores[0]))))
    todo = [i for i in ids[0] if i not in done]
    _remove_stale_temporaries(out, todo)
    start = time.perf_counter()
    for image_id in tqdm(todo, desc=f"fuse -> {out.name}", unit="img", disable=not progress):
        preds = [predictions.load(s / f"{image_id}.npz") for s in stores]
        predictions.save(weighted_mask_fusion(preds, float(iou), sigs[0].get("detections_per_image")), out)
    return {"written": len(todo), "skipped": len(ids[0]) - len(todo), "seconds": time.perf_counter() - start}

