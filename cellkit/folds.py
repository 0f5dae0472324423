"""Cross-validation folds: scikit-learn ``StratifiedGroupKFold`` over the images of a train CSV.

Stratified by cell type (each fold gets its share of shsy5y, astro and cort images), grouped by ``sample_id`` (images
of one sample never straddle folds; when the column is absent, or empty for an image, the image is its own group),
seeded. ``folds.csv`` has one row per image: ``id, cell_type, fold`` (+ ``sample_id`` when the CSV has it), sorted by
id, so the same CSV, ``k`` and seed give the same file byte for byte.
"""
import os
from pathlib import Path

import numpy as np
import pandas as pd

from cellkit import atomic
from cellkit.schema import SARTORIUS, DatasetSchema, schema_of

__all__ = ["image_table", "make_folds", "write_folds", "read_folds", "fold_ids", "SPLITS"]

#: ``train`` = the images of every other fold, ``val`` = the images of the fold.
SPLITS = ("train", "val")


def image_table(train: pd.DataFrame, source: str = "train CSV") -> pd.DataFrame:
    """One row per image of a validated train table (see :func:`cellkit.data.read_train_csv`).

    Args:
        train: instance rows with ``id``, ``cell_type`` and optionally ``sample_id``.
        source: how to name the table in errors (its path).

    Returns:
        DataFrame ``id, cell_type[, sample_id], group`` sorted by id, where ``group`` is the sample id (or the image
        id where the sample id is absent or empty).

    Raises:
        ValueError: an image whose rows name several cell types or several sample ids.
    """
    columns = ["id", "cell_type"] + (["sample_id"] if "sample_id" in train.columns else [])
    rows = train[columns].copy()
    if "sample_id" in rows:
        rows["sample_id"] = rows["sample_id"].fillna("").astype(str).str.strip()
    for col in columns[1:]:
        n_values = rows.groupby("id", sort=False)[col].nunique()
        bad = n_values[n_values > 1]
        if len(bad):
            image_id = bad.index[0]
            values = sorted(rows.loc[rows["id"] == image_id, col].unique())
            raise ValueError(f"{source}: image {image_id} has rows with different {col} values {values}")
    images = rows.drop_duplicates("id").sort_values("id", kind="stable").reset_index(drop=True)
    samples = images.get("sample_id", images["id"])  # an image without a sample id is its own group
    images["group"] = samples.where(samples != "", images["id"])
    return images


def make_folds(train: pd.DataFrame, k: int = 5, seed: int = 0, source: str = "train CSV",
               schema: DatasetSchema | None = None) -> pd.DataFrame:
    """Assign every image of ``train`` to one of ``k`` folds, stratified by the images' groups.

    Args:
        train: instance rows (``id``, ``cell_type``, optional ``sample_id``), as from ``read_train_csv``.
        k: number of folds, >= 2.
        seed: ``random_state`` of the shuffled ``StratifiedGroupKFold``.
        source: how to name the table in errors.
        schema: the dataset (:mod:`cellkit.schema`; default the ``dataset.json`` beside the CSV ``train`` was read
            from, else Sartorius): the strata are its groups (Sartorius: the cell types; LIVECell: the cell lines).

    Returns:
        DataFrame ``id, cell_type, fold[, sample_id]`` sorted by id; ``fold`` int64 in ``0..k-1``, every fold
        non-empty.

    Raises:
        ValueError: ``k`` < 2, or more folds than groups (samples, or images without sample ids).
    """
    from sklearn.model_selection import StratifiedGroupKFold

    if int(k) != k or k < 2:
        raise ValueError(f"k must be an integer >= 2, got {k}")
    images = image_table(train, source)
    n_groups = images["group"].nunique()
    if k > n_groups:
        unit = "sample groups" if "sample_id" in images else "images"
        raise ValueError(f"{source}: cannot make k={k} folds from {n_groups} {unit}")
    splitter = StratifiedGroupKFold(n_splits=int(k), shuffle=True, random_state=int(seed))
    fold = np.full(len(images), -1, dtype=np.int64)
    path = train.attrs.get("path")
    schema = schema or (schema_of(Path(path).parent) if path else SARTORIUS)
    strata = [schema.image_group(i, c) for i, c in zip(images["id"].astype(str), images["cell_type"])]
    for i, (_, val) in enumerate(splitter.split(images["id"], strata, images["group"])):
        fold[val] = i
    sizes = np.bincount(fold, minlength=k)
    if (sizes == 0).any():
        raise ValueError(f"{source}: k={k} leaves fold {int(np.flatnonzero(sizes == 0)[0])} empty; use fewer folds")
    return images.assign(fold=fold)[["id", "cell_type", "fold"] + (["sample_id"] if "sample_id" in images else [])]


def write_folds(folds: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a folds table atomically (temp file in the same folder, then ``os.replace``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(path) as tmp:
        folds.to_csv(tmp, index=False, lineterminator="\n")
    return path


def _read_table(path: Path, columns, dtype: dict, na_values: dict, empty: str, no_rows: str) -> pd.DataFrame:
    """``pd.read_csv`` (only ``na_values`` are NaN) of a table that must have ``columns`` and a data row; else a
    ValueError naming the file (``empty``, ``no_rows``: the message for no header, for no data row)."""
    try:
        df = pd.read_csv(path, dtype=dtype, keep_default_na=False, na_values=na_values)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: {empty}") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(map(str, df.columns))})")
    if df.empty:
        raise ValueError(f"{path}: {no_rows}")
    return df


def read_folds(path: str | os.PathLike) -> pd.DataFrame:
    """Read and validate a ``folds.csv``.

    Returns:
        DataFrame with at least ``id`` (str) and ``fold`` (int64); folds are ``0..k-1``, each non-empty; ids unique.
        ``df.attrs["k"]`` is the number of folds, ``df.attrs["path"]`` the file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: empty file, missing ``id``/``fold`` column, a non-integer or negative fold, a gap in the fold
            numbers, a duplicated id (naming the line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such folds file")
    df = _read_table(path, ("id", "fold"), {"id": str, "cell_type": str, "sample_id": str}, {"fold": [""]},
                     "empty folds file", "no data rows")
    fold = pd.to_numeric(df["fold"], errors="coerce")
    bad = np.flatnonzero(~(fold.notna() & (fold >= 0) & (fold == np.round(fold))).to_numpy())
    if bad.size:
        raise ValueError(f"{path} line {bad[0] + 2}: fold {str(df['fold'].iloc[bad[0]])!r} is not an integer >= 0")
    df["fold"] = fold.astype(np.int64)
    dup = np.flatnonzero(df["id"].duplicated().to_numpy())
    if dup.size:
        raise ValueError(f"{path} line {dup[0] + 2}: id {df['id'].iloc[dup[0]]} listed twice")
    k = int(df["fold"].max()) + 1
    absent = sorted(set(range(k)) - set(df["fold"]))
    if absent:
        raise ValueError(f"{path}: folds must be numbered 0..{k - 1}; fold(s) {absent} have no image")
    df.attrs.update(k=k, path=str(path))
    return df


def fold_ids(folds: pd.DataFrame, fold: int, split: str) -> list[str]:
    """Image ids of one side of a fold split, in the folds table's order.

    Args:
        folds: as from :func:`read_folds` or :func:`make_folds`.
        fold: fold number in ``0..k-1``.
        split: ``"train"`` (ids of every other fold) or ``"val"`` (ids of this fold).

    Raises:
        ValueError: an unknown split or a fold that is not in the table.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    present = sorted(int(f) for f in folds["fold"].unique())
    if fold not in present:
        raise ValueError(f"fold {fold!r} is not in the folds table (folds: {present})")
    mask = folds["fold"] == fold
    return folds.loc[mask if split == "val" else ~mask, "id"].astype(str).tolist()
