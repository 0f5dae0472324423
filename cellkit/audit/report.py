"""Audit outputs: :class:`AuditResult`, writing and reading an audit folder, and training exclusion lists from it."""
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from cellkit import atomic
from cellkit.data import exclusion_ids  # noqa: F401  (moved: training reads exclusion lists)
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
