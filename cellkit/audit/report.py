"""Audit outputs: :class:`AuditResult`, writing and reading an audit folder, and training exclusion lists from it."""
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from cellkit import atomic
from cellkit.audit.spec import IMAGE_COLUMNS, INSTANCE_COLUMNS

AUDIT_NAME = "audit.csv"
INSTANCES_NAME = "instances.csv"
SUMMARY_NAME = "audit.json"


class AuditResult(NamedTuple):
    """The audit of a train CSV.

    Attributes:
        images: :data:`IMAGE_COLUMNS`, one row per audited image, highest score first.
        instances: :data:`INSTANCE_COLUMNS`, one row per flag, in image order (as ``images``), then kind.
        summary: provenance and totals (JSON-serialisable): sources, spec, counts per kind, seconds.
    """

    images: pd.DataFrame
    instances: pd.DataFrame
    summary: dict


def _write_csv(frame: pd.DataFrame, path: Path) -> Path:
    with atomic.atomic_path(path, suffix=".csv") as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")
    return path


def write_audit(result: AuditResult, out_dir) -> dict[str, Path]:
    """Write ``audit.csv``, ``instances.csv`` and ``audit.json`` (the summary) into ``out_dir`` (created), each
    atomically (:mod:`cellkit.atomic`).

    Returns:
        ``{"audit": path, "instances": path, "summary": path}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return {"audit": _write_csv(result.images, out_dir / AUDIT_NAME),
            "instances": _write_csv(result.instances, out_dir / INSTANCES_NAME),
            "summary": atomic.write_json(out_dir / SUMMARY_NAME, result.summary)}


def read_audit(path) -> AuditResult:
    """Read an audit directory written by :func:`write_audit` (or the path of its ``audit.csv``).

    Raises:
        FileNotFoundError: a missing file. ValueError: a file without the documented columns (naming it).
    """
    path = Path(path)
    folder = path.parent if path.suffix == ".csv" else path
    frames = {}
    for name, cols in ((AUDIT_NAME, IMAGE_COLUMNS), (INSTANCES_NAME, INSTANCE_COLUMNS)):
        file = folder / name
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no such audit file (write it with `cellkit audit`)")
        frame = pd.read_csv(file, dtype={"id": str, "flags": str}, keep_default_na=True)
        missing = [c for c in cols if c not in frame.columns]
        if missing:
            raise ValueError(f"{file}: not a cellkit audit file (missing column(s) {', '.join(missing)})")
        frames[name] = frame
    frames[AUDIT_NAME]["flags"] = frames[AUDIT_NAME]["flags"].fillna("")
    summary_path = folder / SUMMARY_NAME
    summary = atomic.read_json(summary_path, "audit summary") if summary_path.is_file() else {}
    return AuditResult(frames[AUDIT_NAME], frames[INSTANCES_NAME], summary)


# ---------------------------------------------------------------------------------------------- training lists
def exclusion_ids(path, known_ids, top: int = 0) -> list[str]:
    """The image ids an exclusion file names, checked against the training data.

    Args:
        path: a text file with one image id per line (blank lines and ``#`` comments ignored), a CSV whose header
            has an ``id`` column (every row's id), or an ``audit.csv`` (columns ``id`` and ``score``), of which the
            ``top`` highest-scoring images are taken (ties: file order).
        known_ids: the ids of the train CSV.
        top: with an audit.csv, how many of its images; must be > 0 there and 0 for a plain list.

    Returns:
        The ids, in file (or score) order, without repeats.

    Raises:
        FileNotFoundError: no such file.
        ValueError: naming the file: ``top`` given for a plain list or missing for an audit.csv, ``top`` < 0, an
            empty list, or ids that are not in ``known_ids`` (their count and the first few).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such exclusion file")
    if top < 0:
        raise ValueError(f"{path}: --exclude-top must be >= 0, got {top}")
    text = path.read_text(encoding="utf-8")
    first = next((line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")),
                 "")
    header = [c.strip() for c in first.split(",")]
    frame = pd.read_csv(path, dtype={"id": str}, keep_default_na=False, comment="#") if "id" in header else None
    scored = frame is not None and "score" in header
    if scored and top <= 0:
        raise ValueError(f"{path}: an audit.csv lists every audited image: give --exclude-top N (the N "
                         f"highest-scoring images are excluded)")
    if top and not scored:
        raise ValueError(f"{path}: --exclude-top needs an audit.csv (with a score column); this file is a plain "
                         f"list of ids")
    if scored:
        ids = _top_scored(path, frame, top)
    elif frame is not None:
        ids = [str(i).strip() for i in frame["id"]]
    else:
        ids = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    ids = [i for i in dict.fromkeys(ids) if i]
    if not ids:
        raise ValueError(f"{path}: the exclusion file names no image id")
    known = set(map(str, known_ids))
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} excluded id(s) are not in the train CSV, e.g. "
                         f"{', '.join(repr(i) for i in unknown[:3])}")
    return ids


def _top_scored(path: Path, frame: pd.DataFrame, top: int) -> list[str]:
    """The ids of the ``top`` highest ``score`` rows of an audit.csv (ties: file order)."""
    scores = pd.to_numeric(frame["score"], errors="coerce")
    if scores.isna().any():
        bad = int(np.flatnonzero(scores.isna().to_numpy())[0])
        raise ValueError(f"{path} line {bad + 2}: score {frame['score'].iloc[bad]!r} is not a number")
    order = np.lexsort((np.arange(len(frame)), -scores.to_numpy()))
    return [str(i).strip() for i in frame["id"].to_numpy()[order][:top]]
