"""Cross-validation tables of out-of-fold predictions: naive vs post-processed, per fold and over all OOF images.

The layout of the seed paper's Table 1 (per fold) and Table 2 (overall): the competition metric
(:mod:`cellkit.metric`: per image the mean precision over the IoU thresholds 0.50, 0.55, ..., 0.95; a table cell is
the mean over its images) in the columns ``all`` (every image of the row) and one per cell type (the images of that
true cell type), for two post-processings of the same out-of-fold predictions:

- ``naive``: the seed's defaults, score 0.5, mask 0.5, min area 0 (:data:`cellkit.postprocess.SEED_THRESHOLDS`) with
  the seed's options (:data:`cellkit.postprocess.DEFAULT_OPTIONS`); the threshold search's ``metric.before``;
- ``post-processed``: the searched thresholds and options of a ``thresholds.json`` (``cellkit search``); over the
  images the search saw, the ``all`` figure is its ``metric.after``.

Rows: one per fold (an image's fold from ``folds.csv``) with out-of-fold predictions, then one over all of them.

Scoring is the submission's path, image by image (:func:`cellkit.search.exact_image_scores`:
:func:`cellkit.postprocess.apply_predictions` -> kept masks -> :func:`cellkit.metric.score_sets`), streaming the
predictions store (:func:`cellkit.predictions.iter_dir`, one image in memory at a time).

Images of the truth without predictions are **left out** of every table cell, not scored 0 as the competition would
score a missing image: an out-of-fold store normally covers only the folds trained so far (``FOLDS=0`` predicts one
fold of five), and the threshold search leaves them out the same way, so the tables stay comparable with its
figures. They are counted instead, per fold (``n_truth_without_predictions``; a fold whose store is incomplete shows
it there) and overall, and folds of ``folds.csv`` without any prediction are listed. A prediction for an id that the
truth (or ``folds.csv``) does not know is an error naming the id.

Files: :func:`write_report` writes ``cv.json`` (atomic) and :func:`plot_cv` ``cv.png`` (grouped bars, atomic);
:func:`format_tables` gives the two tables as aligned, markdown-compatible text (paste into RESULTS.md).
"""
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cellkit import CELL_TYPES, atomic
from cellkit import postprocess as pp
from cellkit import predictions as P
from cellkit.schema import SARTORIUS, DatasetSchema, schema_of

__all__ = ["COLUMNS", "SETTINGS", "CV_JSON", "CV_PNG", "naive_setting", "score_images", "summarise", "cv_report",
           "search_mismatch", "format_tables", "plot_cv", "write_report"]

#: Table columns: every image of the row, then each true cell type.
COLUMNS = ("all",) + tuple(CELL_TYPES)

#: Table rows within a fold: the seed's post-processing, then the searched one.
SETTINGS = ("naive", "post-processed")

#: File names in the run directory.
CV_JSON = "cv.json"
CV_PNG = "cv.png"

MISSING_POLICY = ("left out of the tables (not scored 0): an out-of-fold store covers the folds predicted so far; "
                  "counted per fold and overall")


def naive_setting(groups=CELL_TYPES) -> dict:
    """The ``naive`` post-processing: ``{"thresholds": seed thresholds, "options": seed options, "source"}``."""
    return {"thresholds": pp.seed_thresholds(groups), "options": pp.validate_options({}),
            "source": "seed defaults (cellkit.postprocess.SEED_THRESHOLDS, DEFAULT_OPTIONS)"}


# ------------------------------------------------------------------------------------------------ scoring
def score_images(pred_dir, truth: pd.DataFrame, fold_of: Mapping[str, int], settings: Mapping[str, Mapping],
                 progress: bool = True, schema: DatasetSchema = SARTORIUS) -> tuple[pd.DataFrame, list[str]]:
    """Score every image of a predictions store under each post-processing setting.

    Args:
        pred_dir: the out-of-fold predictions store.
        truth: the train table (:func:`cellkit.data.read_train_csv`: ``id, annotation, width, height, cell_type``).
        fold_of: image id -> fold (from ``folds.csv``).
        settings: name -> ``{"thresholds", "options"}`` (e.g. ``{"naive": ..., "post-processed": ...}``).
        progress: tqdm bar on stderr.
        schema: the dataset (its groups key the thresholds and the ``cell_type`` column).

    Returns:
        ``(per_image, missing)``: a DataFrame with one row per predicted image, sorted by id, columns ``id``,
        ``cell_type`` (the image's group: Sartorius, its true cell type), ``fold`` (int64) and one float64 column
        per setting (the image score); and the sorted ids of the truth's images without predictions.

    Raises:
        FileNotFoundError / ValueError: a missing, empty or foreign store; a prediction for an id the truth or
            ``fold_of`` does not know (naming it); an image size that differs from the truth's; a malformed truth
            mask (naming the image).
    """
    from tqdm import tqdm

    from cellkit.search import exact_image_scores, truth_mask_set

    pred_dir = Path(pred_dir)
    ids = P.image_ids(pred_dir)  # raises on a missing, empty or foreign directory
    groups = truth.groupby(truth["id"].astype(str), sort=False)
    truth_ids = set(groups.groups)
    if unknown := [i for i in ids if i not in truth_ids]:
        raise ValueError(f"{pred_dir}: predictions for {len(unknown)} image(s) the truth does not know, e.g. "
                         f"{unknown[0]!r} ({pred_dir / (unknown[0] + '.npz')})")
    if no_fold := [i for i in ids if i not in fold_of]:
        raise ValueError(f"{pred_dir}: predictions for {len(no_fold)} image(s) without a fold in the folds file, "
                         f"e.g. {no_fold[0]!r}")
    names = list(settings)
    candidates = [(settings[n]["thresholds"], settings[n]["options"]) for n in names]
    records = []
    for pred in tqdm(P.iter_dir(pred_dir), total=len(ids), desc="cv", unit="image", disable=not progress):
        rows = groups.get_group(pred.image_id)
        shape = (int(rows["height"].iat[0]), int(rows["width"].iat[0]))
        if (pred.height, pred.width) != shape:
            raise ValueError(f"{pred_dir / (pred.image_id + '.npz')}: image size {pred.height}x{pred.width} differs "
                             f"from the truth's {shape[0]}x{shape[1]}")
        scores = exact_image_scores(pp.group_view(pred, schema), truth_mask_set(
            rows["annotation"].tolist(), shape, f"truth of image {pred.image_id}"), candidates, schema.groups)
        group = schema.image_group(pred.image_id, str(rows["cell_type"].iat[0]))
        records.append((pred.image_id, group, int(fold_of[pred.image_id]), *scores))
    per_image = pd.DataFrame.from_records(records, columns=["id", "cell_type", "fold", *names])
    per_image["fold"] = per_image["fold"].astype(np.int64)
    return per_image, sorted(truth_ids - set(ids))


def _cell(frame: pd.DataFrame, settings: Sequence[str], n_missing: int, columns: Sequence[str]) -> dict:
    """``{"n_images": {column: n}, "n_truth_without_predictions": n_missing, "scores": {setting: {column: mean or
    None}}}`` of a group of images."""
    parts = {column: frame if column == "all" else frame[frame["cell_type"] == column] for column in columns}
    return {"n_images": {column: int(len(part)) for column, part in parts.items()},
            "n_truth_without_predictions": n_missing,
            "scores": {s: {column: float(part[s].mean()) if len(part) else None for column, part in parts.items()}
                       for s in settings}}


def summarise(per_image: pd.DataFrame, missing_folds: Sequence[int | None], all_folds: Sequence[int],
              settings: Sequence[str] = SETTINGS, columns: Sequence[str] = COLUMNS) -> dict:
    """The tables from per-image scores (pure).

    Args:
        per_image: as from :func:`score_images` (``id, cell_type, fold`` and one score column per setting).
        missing_folds: the fold of each truth image without predictions (None when ``folds.csv`` lacks it).
        all_folds: every fold of ``folds.csv``.
        settings: the score columns, in table order.
        columns: ``"all"`` and the groups (the tables' columns).

    Returns:
        ``{"per_fold": [{"fold", "n_images", "n_truth_without_predictions", "scores"}...] (folds with predictions,
        ascending), "overall": {"n_images", "n_truth_without_predictions", "scores"},
        "folds_without_predictions": [...]}``; ``n_images`` is ``{column: count}``, ``scores`` is
        ``{setting: {column: mean image score or None for no image}}``.
    """
    missing_folds = list(missing_folds)
    per_fold = [{"fold": fold, **_cell(per_image[per_image["fold"] == fold], settings, missing_folds.count(fold),
                                       columns)} for fold in sorted(int(f) for f in per_image["fold"].unique())]
    return {"per_fold": per_fold, "overall": _cell(per_image, settings, len(missing_folds), columns),
            "folds_without_predictions": sorted(int(f) for f in set(all_folds) - {row["fold"] for row in per_fold})}


# ------------------------------------------------------------------------------------------------ the report
def cv_report(pred_dir, truth_csv, thresholds_path, folds_csv, progress: bool = True) -> dict:
    """Score out-of-fold predictions naive and post-processed, per fold and overall: the ``cv.json`` document.

    Args:
        pred_dir: the out-of-fold predictions store (``OUT/oof``).
        truth_csv: the competition train.csv.
        thresholds_path: ``thresholds.json`` of the threshold search (the ``post-processed`` setting).
        folds_csv: ``folds.csv`` (the fold of each image).
        progress: tqdm bar.

    Returns:
        ``{"metric", "columns", "settings", "per_fold", "overall", "folds_without_predictions",
        "truth_without_predictions": {"n", "ids" (first 20), "policy"}, "post_processing": {setting: {"thresholds",
        "options", "source"}}, "search_metric" (thresholds.json's ``metric``, when it has one), "inputs",
        "predictions_signature" (meta.json's ``signature``, None when absent), "per_image": [{"id", "cell_type",
        "fold", setting: score}...], "cellkit_version"}``.

    Raises:
        FileNotFoundError: a missing truth, thresholds or folds file (naming it), or predictions directory.
        ValueError: see :func:`score_images`; invalid thresholds or folds files (naming the file).
    """
    from cellkit import __version__
    from cellkit.data import read_train_csv
    from cellkit.folds import read_folds

    pred_dir, truth_csv, thresholds_path, folds_csv = map(Path, (pred_dir, truth_csv, thresholds_path, folds_csv))
    if not truth_csv.is_file():
        raise FileNotFoundError(f"{truth_csv}: no such truth file (the competition train.csv: --truth, or --data DIR "
                                f"holding it)")
    doc = pp.load_thresholds(thresholds_path)
    folds = read_folds(folds_csv)
    truth = read_train_csv(truth_csv)
    P.image_ids(pred_dir)  # a missing, empty or foreign store is the first error, before anything is scored
    schema = schema_of(pred_dir)
    doc = {**doc, "thresholds": pp.validate_thresholds(doc["thresholds"], str(thresholds_path), schema.groups)}
    columns = ("all",) + schema.groups
    try:
        signature = P.read_meta(pred_dir).get("signature")
    except FileNotFoundError:
        signature = None
    settings = {"naive": naive_setting(schema.groups),
                "post-processed": {"thresholds": doc["thresholds"], "options": doc["options"],
                                   "source": str(thresholds_path)}}
    fold_of = dict(zip(folds["id"].astype(str), folds["fold"].astype(int)))
    per_image, missing = score_images(pred_dir, truth, fold_of, settings, progress, schema)
    tables = summarise(per_image, [fold_of.get(i) for i in missing], sorted(set(fold_of.values())), SETTINGS, columns)
    out = {
        "metric": "competition mAP (cellkit.metric): per image the mean precision over IoU thresholds 0.50..0.95; "
                  "a cell is the mean over its images (a class column: the images of that true cell type)",
        "columns": list(columns),
        "settings": list(SETTINGS),
        **tables,
        "truth_without_predictions": {"n": len(missing), "ids": missing[:20], "policy": MISSING_POLICY},
        "post_processing": settings,
        "inputs": {"predictions": str(pred_dir), "truth": str(truth_csv), "thresholds": str(thresholds_path),
                   "folds": str(folds_csv)},
        "predictions_signature": signature,
        "per_image": per_image.to_dict(orient="records"),
        "cellkit_version": __version__,
    }
    if isinstance(doc.get("metric"), Mapping):
        out["search_metric"] = doc["metric"]
    return out


def search_mismatch(doc: Mapping) -> str | None:
    """A note when the report's overall figures differ from those its ``thresholds.json`` recorded (the store or the
    truth changed since the search), else None."""
    search = doc.get("search_metric") or {}
    notes = []
    for setting, key in (("naive", "before"), ("post-processed", "after")):
        recorded = (search.get(key) or {}).get("mAP")
        now = doc["overall"]["scores"][setting]["all"]
        if isinstance(recorded, (int, float)) and now is not None and abs(recorded - now) > 1e-9:
            notes.append(f"{setting} {now:.4f} vs metric.{key} {recorded:.4f}")
    return ("note: the overall figures differ from thresholds.json's (" + "; ".join(notes) + "): the predictions or "
            "the truth are not those the search saw") if notes else None


# ------------------------------------------------------------------------------------------------ presentation
def _fmt(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _markdown(header: list[str], rows: list[list[str]], align: list[str]) -> str:
    """An aligned markdown table; ``align`` holds ``"l"`` or ``"r"`` per column."""
    widths = [max(3, len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, align)) + " |"

    rule = "|" + "|".join((":" + "-" * (w + 1)) if a == "l" else ("-" * (w + 1) + ":") for w, a in zip(widths, align))
    return "\n".join([line(header), rule + "|", *(line(r) for r in rows)])


def _rows(prefix: list[str], entry: Mapping, settings: Sequence[str], columns) -> list[list[str]]:
    return ([prefix + ["images"] + [str(entry["n_images"][c]) for c in columns]]
            + [prefix + [s] + [_fmt(entry["scores"][s][c]) for c in columns] for s in settings])


def format_tables(doc: Mapping) -> str:
    """The two tables of a :func:`cv_report` document as aligned markdown text, with the counts of left-out images.

    Table 1: per fold, an ``images`` row (count per column) then one row per setting; Table 2: the same over all
    out-of-fold images.
    """
    settings, columns = doc.get("settings", SETTINGS), doc.get("columns", COLUMNS)
    align = ["r", "l"] + ["r"] * len(columns)
    rows = [row for entry in doc["per_fold"] for row in _rows([str(entry["fold"])], entry, settings, columns)]
    per_fold = ", ".join(f"fold {e['fold']}: {e['n_truth_without_predictions']}" for e in doc["per_fold"]
                         if e["n_truth_without_predictions"])
    lines = ["Table 1: competition mAP per fold (out-of-fold images of each fold)", "",
             _markdown(["fold", ""] + list(columns), rows, align), "",
             "Table 2: competition mAP over all out-of-fold images", "",
             _markdown(["OOF images", ""] + list(columns), _rows(["all"], doc["overall"], settings, columns), align),
             "",
             f"truth images without predictions: {doc['overall']['n_truth_without_predictions']} (left out, not "
             f"scored 0)" + (f"; in predicted folds: {per_fold}" if per_fold else "")]
    if doc.get("folds_without_predictions"):
        lines.append(f"folds without predictions: {', '.join(map(str, doc['folds_without_predictions']))}")
    if post := doc.get("post_processing", {}).get("post-processed"):
        opts = post["options"]
        lines.append(f"post-processed: {post['source']} (image_class_vote={opts['image_class_vote']}, "
                     f"rescore={opts['rescore']}, free_dropped={opts['free_dropped']}); naive: score 0.5, mask 0.5, "
                     f"min area 0, the seed's options")
    return "\n".join(lines)


def plot_cv(doc: Mapping, path) -> Path:
    """Grouped bars, naive vs post-processed per column, one panel per fold and one over all OOF images; the PNG is
    written atomically.

    Args:
        doc: a :func:`cv_report` document.
        path: the PNG to write (its folder must exist or is created).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cellkit.viz import save_figure

    settings, columns = list(doc.get("settings", SETTINGS)), list(doc.get("columns", COLUMNS))
    panels = ([(f"fold {e['fold']} ({e['n_images']['all']} images)", e) for e in doc["per_fold"]]
              + [(f"all OOF images ({doc['overall']['n_images']['all']})", doc["overall"])])
    ncols = min(3, len(panels))
    nrows = int(math.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows), squeeze=False)
    x = np.arange(len(columns))
    width = 0.8 / len(settings)
    colors = ["tab:gray", "tab:blue", "tab:orange", "tab:green"]
    top = max([v for _, e in panels for s in settings for v in e["scores"][s].values() if v is not None] + [0.01])
    for ax, (title, entry) in zip(axes.flat, panels):
        for j, s in enumerate(settings):
            values = [entry["scores"][s][c] for c in columns]
            bars = ax.bar(x + (j - (len(settings) - 1) / 2) * width, [0.0 if v is None else v for v in values], width,
                          label=s, color=colors[j % len(colors)])
            ax.bar_label(bars, ["-" if v is None else f"{v:.3f}" for v in values], fontsize=7)
        ax.set_xticks(x, [f"{c}\n({entry['n_images'][c]})" for c in columns], fontsize=8)
        ax.set(ylim=(0, top * 1.18), ylabel="mAP")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes.flat[0].legend(fontsize=8, loc="upper left")
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    fig.suptitle("out-of-fold competition mAP: naive (seed 0.5 / 0.5 / 0) vs post-processed (thresholds.json)")
    fig.tight_layout()
    try:
        return save_figure(fig, path, dpi=80)
    finally:
        plt.close(fig)


def write_report(doc: Mapping, out_dir) -> tuple[Path, Path]:
    """Write ``OUT/cv.png`` then ``OUT/cv.json``, each atomically (the folder is created); return ``(json, png)``.

    The JSON comes last, so a failure while plotting leaves the previous ``cv.json`` (and ``cv.png``) untouched.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png_path = plot_cv(doc, out_dir / CV_PNG)
    return atomic.write_json(out_dir / CV_JSON, doc), png_path
