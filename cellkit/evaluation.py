"""Validation on the competition metric, as a detectron2 ``DatasetEvaluator`` (not COCOEvaluator's 100-detection cap).

Per image: the model's predictions as :class:`cellkit.predictions.InstancePredictions` (during training, the
single-pass predictions of ``cellkit predict``, see :class:`cellkit.train.ValidationPredictor`; a plain detectron2
``instances`` output with full-image masks is converted), the top ``TEST.DETECTIONS_PER_IMAGE`` by score,
post-processed and scored as :func:`cellkit.postprocess.score_predictions` does (the path of ``cellkit submit`` and
``cellkit score``) at the seed's defaults (score >= ``CELLKIT.EVAL.SCORE_THRESHOLD``, pixels >= 0.5, overlaps
removed by descending score) against the dataset dict's true masks (COCO RLE or polygons), encoded into the
competition's RLE once per dataset and image (:func:`cached_truth_rles`).

Results (``DefaultTrainer.test`` -> ``EvalHook`` -> event storage, flattened as ``cellkit/<key>``):
``mAP`` (mean over images of the mean precision over IoU 0.50:0.95), ``mAP_<class>`` per cell type of the images
(Sartorius dicts carry ``cell_type``), ``AP50``/``AP75`` (precision at IoU 0.5 / 0.75), ``n_images`` and
``n_masks`` (masks kept after post-processing, as many as the submission of the same predictions holds).
"""
import logging
from collections import OrderedDict, defaultdict
from pathlib import Path

import numpy as np
from detectron2.evaluation import DatasetEvaluator

from cellkit import CELL_TYPES, postprocess, rle
from cellkit.geometry import MaskRuns
from cellkit.schema import schema_of
from cellkit.predictions import InstancePredictions

logger = logging.getLogger(__name__)

__all__ = ["CellkitEvaluator", "truth_rles", "cached_truth_rles", "summarize"]

#: (dataset name, image id) -> (fingerprint of the record's annotations, their competition RLEs): the ground truth
#: is encoded once per process, not at every evaluation (each builds a new evaluator).
_TRUTH_CACHE: dict[tuple[str, str], tuple[tuple, list[str]]] = {}


def truth_rles(record: dict) -> list[str]:
    """Competition RLE strings of a dataset dict's annotations (COCO RLE dicts or polygon lists).

    Args:
        record: detectron2 dataset dict with ``height``, ``width`` and ``annotations[*]["segmentation"]``.

    Returns:
        One string per annotation, row-major as in the competition (empty annotations dropped).
    """
    h, w = int(record["height"]), int(record["width"])
    segms = [segm if isinstance(segm, dict) else [p for p in segm if len(p) >= 6]  # polygons: >= 3 points
             for segm in (ann["segmentation"] for ann in record.get("annotations", []))]
    rles = (rle.from_coco(rle.coco_segmentation(segm, h, w)) for segm in segms if isinstance(segm, dict) or segm)
    return [s for s in rles if s]


def _fingerprint(record: dict) -> tuple:
    """What the cached truth of a record depends on: file, size and every annotation's segmentation."""
    def segm_key(segm):
        if isinstance(segm, dict):
            counts = segm.get("counts")
            return (tuple(segm.get("size", ())), counts if isinstance(counts, (str, bytes)) else tuple(counts))
        return tuple(tuple(p) for p in segm)

    anns = record.get("annotations", [])
    return (record.get("file_name"), int(record["height"]), int(record["width"]), len(anns),
            hash(tuple(segm_key(a["segmentation"]) for a in anns)))


def cached_truth_rles(dataset_name: str, record: dict) -> list[str]:
    """:func:`truth_rles` of ``record``, encoded once per (dataset, image) while its annotations are unchanged."""
    key = (str(dataset_name), str(record["image_id"]))
    fingerprint = _fingerprint(record)
    hit = _TRUTH_CACHE.get(key)
    if hit is None or hit[0] != fingerprint:
        hit = _TRUTH_CACHE[key] = (fingerprint, truth_rles(record))
    return hit[1]


def summarize(rows: list[tuple]) -> dict:
    """Aggregate per-image rows ``[(image_id, cell_type, precision (10,), kept masks), ...]`` into the result dict."""
    if not rows:
        return {"mAP": float("nan"), "n_images": 0}
    prec = np.stack([r[2] for r in rows])
    res = {"mAP": float(prec.mean()), "AP50": float(prec[:, 0].mean()), "AP75": float(prec[:, 5].mean()),
           "n_images": len(rows), "n_masks": int(sum(r[3] for r in rows))}
    by_type = defaultdict(list)
    for _, cell_type, p, _ in rows:
        if cell_type:
            by_type[cell_type].append(p.mean())
    for cell_type in sorted(by_type, key=lambda c: (CELL_TYPES.index(c) if c in CELL_TYPES else 99, c)):
        res[f"mAP_{cell_type}"] = float(np.mean(by_type[cell_type]))
    return res


class CellkitEvaluator(DatasetEvaluator):
    """Competition-metric evaluator for one registered dataset (see module docstring).

    Args:
        dataset_name: a registered dataset whose dicts hold true masks (``annotations``).
        score_threshold: detections below it are dropped (the seed's 0.5).
        max_detections: keep at most this many detections per image (highest scores).
        distributed: gather per-image results from every process (multi-GPU).
    """

    def __init__(self, dataset_name: str, score_threshold: float = 0.5, max_detections: int = 1000,
                 distributed: bool = True):
        from detectron2.data import DatasetCatalog, MetadataCatalog

        records = DatasetCatalog.get(dataset_name)
        if not records:
            raise ValueError(f"dataset {dataset_name!r} has no images to evaluate")
        self._records = {r["image_id"]: r for r in records}
        meta = MetadataCatalog.get(dataset_name)
        # one threshold for every class (a class-agnostic score); rows carry the image's group
        self._classes = tuple(meta.get("thing_classes", None) or CELL_TYPES)
        self._schema = schema_of(Path(meta.csv_file).parent) if meta.get("csv_file", None) else None
        self._thresholds = postprocess.validate_thresholds(
            {c: {"score": float(score_threshold), "mask": 0.5, "min_area": 0} for c in self._classes},
            groups=self._classes)
        self._max_det, self._distributed, self._name = int(max_detections), distributed, dataset_name
        self.reset()

    def reset(self) -> None:
        self._rows: list[tuple[str, str, np.ndarray, int]] = []

    def predictions(self, record: dict, output: dict) -> InstancePredictions:
        """One model output as InstancePredictions: ``output["predictions"]``, or detectron2 ``instances`` (on
        CPU, full-image ``pred_masks``; boxes optional, only the masks are scored) converted, cut to the top detections by score."""
        if "predictions" in output:
            pred = output["predictions"]
        else:
            inst = output["instances"].to("cpu")
            boxes = inst.pred_boxes.tensor.numpy() if inst.has("pred_boxes") else np.zeros((len(inst), 4))
            pred = InstancePredictions.from_full_masks(
                str(record["image_id"]), inst.pred_classes.numpy(), inst.scores.numpy(), boxes,
                inst.pred_masks.numpy() if len(inst) else np.zeros((0, record["height"], record["width"]), bool))
        pred = pred.select(np.argsort(-pred.scores.astype(np.float64), kind="stable")[: self._max_det])
        pred.classes = np.zeros(len(pred), dtype=pred.classes.dtype)  # class-agnostic (LIVECell's lines included)
        return pred

    def image_result(self, record: dict, pred: InstancePredictions) -> tuple[np.ndarray, int]:
        """``(precision per IoU threshold, float64 (10,); masks kept)`` of one image's predictions, post-processed
        by :func:`cellkit.postprocess.apply_predictions` and scored by :func:`cellkit.postprocess.score_kept`."""
        kept = postprocess.apply_predictions(pred, self._thresholds, groups=self._classes)
        truth = MaskRuns.from_rles(cached_truth_rles(self._name, record), (int(record["height"]), int(record["width"])))
        return postprocess.score_kept(kept, truth), len(kept)

    def process(self, inputs, outputs) -> None:
        for inp, out in zip(inputs, outputs):
            record = self._records.get(inp["image_id"])
            if record is None:
                raise KeyError(f"image {inp['image_id']!r} is not in dataset {self._name!r}")
            precision, n_kept = self.image_result(record, self.predictions(record, out))
            group = str(record.get("cell_type", ""))
            if self._schema is not None and self._schema.group_by == "pattern":
                group = self._schema.image_group(str(inp["image_id"]))
            self._rows.append((str(inp["image_id"]), group, precision, n_kept))

    def evaluate(self):
        rows = self._rows
        if self._distributed:
            from detectron2.utils import comm

            rows = [r for part in comm.all_gather(rows) for r in part]
        res = summarize(rows)
        text = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items())
        logger.info("cellkit evaluation on %s: %s", self._name, text)
        return OrderedDict(cellkit=res)
