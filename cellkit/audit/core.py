"""The audit of a train CSV, image by image: :func:`audit` (see :mod:`cellkit.audit` for the flags and the score)."""
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from cellkit import data, postprocess
from cellkit import predictions as P
from cellkit.audit.cleanlab import add_cleanlab_columns
from cellkit.audit.labels import ImageLabels, audit_labels
from cellkit.audit.predictions import audit_predictions
from cellkit.audit.report import AuditResult
from cellkit.schema import SARTORIUS, DatasetSchema, schema_of
from cellkit.audit.spec import (IMAGE_COLUMNS, INSTANCE_COLUMNS, KINDS, RATE_KINDS, AuditSpec, apply_baselines,
                                image_score)

logger = logging.getLogger(__name__)


def has_predictions(path) -> bool:
    """Whether ``path`` is a predictions store holding at least one image (so that ``audit(pred_dir=path)`` can use
    it), e.g. ``OUT_DIR/oof`` once notebook 04 predicted a fold. Never raises for a missing or empty folder."""
    if path is None or not Path(path).is_dir():
        return False
    try:
        return bool(P.image_ids(path))
    except ValueError:
        return False


def _prediction_paths(pred_dir, groups: dict, ids: list[str], where: str) -> dict[str, Path]:
    """``{image id: .npz}`` of the store (empty without one); warns about audited images without predictions.

    Raises:
        ValueError: predictions of an image that is not in the truth.
    """
    if pred_dir is None:
        return {}
    listing = {i: Path(pred_dir) / f"{i}.npz" for i in P.image_ids(pred_dir)}
    foreign = sorted(set(listing) - set(groups))
    if foreign:
        raise ValueError(f"{pred_dir}: predictions of {len(foreign)} image(s) that are not in {where}, e.g. "
                         f"{foreign[0]!r}")
    without = [i for i in ids if i not in listing]
    if without:
        logger.warning("cellkit audit: %d of %d audited image(s) have no predictions in %s: labels only for "
                       "them", len(without), len(ids), pred_dir)
    return listing


def audit(truth, pred_dir=None, thresholds=None, spec: AuditSpec | None = None, image_ids=None,
          progress: bool = True) -> AuditResult:
    """Audit the annotations of a train CSV, image by image.

    Args:
        truth: a train CSV path or its frame from :func:`cellkit.data.read_train_csv` (index = 0-based data row).
        pred_dir: a predictions store (:mod:`cellkit.predictions`) for the prediction flags; None for labels only.
            Images of the truth without predictions are audited from their labels only (``has_pred`` False; a
            warning gives their count); predictions of an image absent from the truth are an error.
        thresholds: a ``thresholds.json`` (:func:`cellkit.postprocess.load_thresholds`) whose per-class ``score``,
            ``mask`` and ``min_area`` decide which predictions are confident and how their masks are binarised;
            None for the seed's 0.5 / 0.5 / 0. The thresholds of the image's cell type (from the truth) apply to all
            its predictions.
        spec: thresholds and weights (:class:`AuditSpec`; default ones when None).
        image_ids: audit only these images (each must be in the truth); None for all.
        progress: tqdm bar over the images.

    Returns:
        :class:`AuditResult`.

    Raises:
        FileNotFoundError: a missing CSV, store or thresholds file.
        ValueError: a malformed annotation (naming the CSV line and id), an unknown image id, predictions of an
            image absent from the truth or of another size (naming the store and the id), invalid thresholds.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    spec = spec or AuditSpec()
    table, source = ((truth, truth.attrs.get("path")) if isinstance(truth, pd.DataFrame)
                     else (data.read_train_csv(truth), str(truth)))
    where = source or "truth"
    groups = table.groupby("id", sort=False).indices
    # the ids to audit: all of the truth's (file order) or image_ids (each must be in it; repeats dropped)
    ids = list(groups) if image_ids is None else list(dict.fromkeys(str(i) for i in image_ids))
    unknown = [i for i in ids if i not in groups]
    if unknown:
        raise ValueError(f"{where}: {len(unknown)} image id(s) to audit are not in it, e.g. {unknown[0]!r}")
    listing = _prediction_paths(pred_dir, groups, ids, where)
    schema = schema_of(Path(source).parent) if source else SARTORIUS
    thr = (postprocess.seed_thresholds(schema.groups) if thresholds is None
           else postprocess.load_thresholds(thresholds)["thresholds"])
    columns = {c: table[c].to_numpy() for c in ("id", "annotation", "width", "height", "cell_type")}
    rows_index = table.index.to_numpy()
    done = [_audit_image(image_id, groups[image_id], columns, rows_index, listing.get(image_id), thr, spec, where,
                         schema)
            for image_id in tqdm(ids, desc="audit", unit="img", disable=not progress, leave=False)]
    images, instances = _tables([record for record, _, _ in done], [x for _, found, _ in done for x in found],
                                {k: cl for k, (_, _, cl) in enumerate(done) if cl is not None}, spec)
    return AuditResult(images, instances, {
        "truth": source, "pred_dir": None if pred_dir is None else str(pred_dir),
        "thresholds": None if thresholds is None else str(thresholds), "spec": asdict(spec),
        "n_images": int(len(images)), "n_with_pred": int(images["has_pred"].sum()),
        "n_flagged_images": int((images["score"] > 0).sum()),
        "flags": {k: int((instances["kind"] == k).sum()) for k in KINDS},
        "seconds": round(time.perf_counter() - t0, 2),
    })


def _audit_image(image_id: str, positions: np.ndarray, columns: dict, rows_index: np.ndarray, pred_path,
                 thresholds: dict, spec: AuditSpec, where: str, schema: DatasetSchema = SARTORIUS):
    """One image's record, its instance records and its cleanlab boxes (None without predictions)."""
    first = positions[0]
    cell_type = str(columns["cell_type"][first])
    shape = (int(columns["height"][first]), int(columns["width"][first]))
    image = ImageLabels.parse(image_id, cell_type, rows_index[positions], list(columns["annotation"][positions]),
                              shape, where)
    counts = audit_labels(image, spec.tiny_area(cell_type), spec.duplicate_iou, spec.overlap_ios)
    label_score, _ = image_score(counts, spec.weights)
    record = {"id": image_id, "cell_type": cell_type, "score": label_score, "label_score": label_score,
              "pred_score": np.nan, "flags": "", "n_rows": int(len(positions)), **counts, "has_pred": False,
              "n_pred": None, "n_confident": None, "n_missed": None, "n_spurious": None, "n_misplaced": None,
              **{f"{k}_{c}": np.nan for c in ("fraction", "baseline") for k in RATE_KINDS},
              "mean_best_iou": np.nan, "cleanlab_overlooked": np.nan, "cleanlab_badloc": np.nan,
              "cleanlab_swap": np.nan}
    if pred_path is None:
        return record, image.instances, None
    found, cl = audit_predictions(image, pred_path, thresholds[schema.image_group(image_id, cell_type)], spec, where,
                                  schema.class_id(cell_type, where))
    return {**record, **found}, image.instances, cl


def _tables(records: list[dict], instance_records: list[dict], boxes: dict, spec: AuditSpec
            ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``audit.csv`` and ``instances.csv`` from the per-image records: cleanlab columns, baselines and score, flags,
    the images by score and the instances in that order, then by kind."""
    images = pd.DataFrame.from_records(records, columns=list(IMAGE_COLUMNS))
    add_cleanlab_columns(images, boxes)
    images = apply_baselines(images, spec.weights, noise_z=spec.noise_z)
    images["flags"] = [" ".join(f"{k}:{int(r[f'n_{k}'])}" for k in KINDS if not pd.isna(r[f"n_{k}"])
                                and int(r[f"n_{k}"]) > 0) for _, r in images.iterrows()]
    frame = pd.DataFrame.from_records(instance_records, columns=list(INSTANCE_COLUMNS)).astype(
        {**dict.fromkeys(("row", "partner_row", "pred_index", "partner_area"), "Int64"),
         **dict.fromkeys(("area", "x0", "y0", "x1", "y1"), np.int64)})
    order = np.lexsort((np.arange(len(frame)), frame["kind"].map({k: n for n, k in enumerate(KINDS)}).to_numpy(),
                        frame["id"].map({i: k for k, i in enumerate(images["id"].astype(str))}).to_numpy()))
    images = images.astype(dict.fromkeys(("n_pred", "n_confident", "n_missed", "n_spurious", "n_misplaced"), "Int64"))
    return images, frame.iloc[order].reset_index(drop=True)
