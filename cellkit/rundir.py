"""The run directory: the one module that knows the file names of a training run and what they mean.

A run directory (detectron2's ``OUTPUT_DIR``) holds:

- ``config.yaml``: the resolved config (:data:`CONFIG`);
- ``metrics.json``: detectron2's JSON lines, one object per logged iteration (:data:`METRICS`, :func:`read_metrics`);
- ``model_XXXXXXX.pth``: periodic checkpoints with the full training state, for ``--resume``;
- ``last_checkpoint``: the name of the newest checkpoint (:data:`LAST`, :func:`last_checkpoint`);
- ``model_best.pth`` / ``model_final.pth``: the best-validation and the finished model (:data:`WEIGHT_NAMES`,
  :func:`run_weights`);
- ``FAILED``: written when training raised (:data:`FAILED`, :func:`failure_reason`, :func:`write_failed`).

A folder of runs (``cellkit chain``'s output) holds one ``fold<K>/`` run per fold (:func:`fold_runs`).
"""
import datetime
import json
import logging
import os
import shutil
import traceback
from pathlib import Path

from cellkit import atomic

__all__ = ["CONFIG", "METRICS", "LAST", "BEST", "FINAL", "WEIGHT_NAMES", "FAILED", "is_run", "fold_runs",
           "check_local_weights", "last_checkpoint", "run_weights", "failure_reason", "write_failed",
           "clear_failed", "remove_temporaries", "prune_periodic", "prune_checkpoints", "copy_for_resume",
           "metric_records", "best_metric"]

CONFIG = "config.yaml"
METRICS = "metrics.json"
LAST = "last_checkpoint"
BEST = "model_best.pth"
FINAL = "model_final.pth"
#: Checkpoints looked up in a run directory, in order, when no weights file is given.
WEIGHT_NAMES = (BEST, FINAL)
#: Marker file a run directory gets when training raised: the error, the iteration and the traceback. Removed when
#: the run is started (or resumed) again; a run with it has no ``model_final.pth`` from that attempt.
FAILED = "FAILED"
PERIODIC_GLOB = "model_[0-9][0-9][0-9][0-9][0-9][0-9][0-9].pth"


def is_run(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a run directory (it holds ``config.yaml``)."""
    return (Path(path) / CONFIG).is_file()


def fold_runs(out_dir: str | os.PathLike) -> list[Path]:
    """The trained fold runs of a run directory (``fold<K>/`` holding ``config.yaml``), by fold number."""
    runs = [p for p in Path(out_dir).glob("fold*") if p.name[4:].isdigit() and is_run(p)]
    return sorted(runs, key=lambda p: int(p.name[4:]))


def check_local_weights(path: str | os.PathLike, hint: str = "") -> Path:
    """Check that a weights path is an existing local file (nothing is ever downloaded).

    Args:
        path: ``MODEL.WEIGHTS`` / ``--weights``.
        hint: where such a file comes from (``CELLKIT.WEIGHTS_SOURCE``), added to the error message.

    Raises:
        ValueError: a URL (``http(s)://``, ``detectron2://``, ``catalog://``, ...).
        FileNotFoundError: the file does not exist.
    """
    text = str(path)
    extra = f" (expected: {hint})" if hint else ""
    if "://" in text:
        raise ValueError(
            f"weights {text!r} is a URL: cellkit never downloads weights at run time; fetch the file once "
            f"(e.g. attach it as a Kaggle dataset) and pass its local path with --weights{extra}"
        )
    p = Path(text).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"weights file {text} does not exist{extra}")
    return p


def last_checkpoint(run_dir: str | os.PathLike) -> str | None:
    """The checkpoint name ``last_checkpoint`` holds, or None when the run has no such file."""
    path = Path(run_dir) / LAST
    return path.read_text(encoding="utf-8").strip() if path.is_file() else None


def run_weights(run_dir, weights=None) -> Path:
    """The checkpoint to predict with: ``weights`` when given, else ``model_best.pth``, else ``model_final.pth``.

    A periodic checkpoint alone (an interrupted or failed run) is not enough: it is for ``--resume``, and a model
    from it would look like a finished one; name it explicitly (``cellkit predict --weights``) to use it.

    Raises:
        FileNotFoundError: naming the run directory and the files tried (or the missing ``weights``), the run's
            last checkpoint and, when the run failed, why (its ``FAILED`` marker).
        ValueError: ``weights`` is a URL (nothing is downloaded).
    """
    if weights:
        return check_local_weights(weights)
    run_dir = Path(run_dir)
    reason = failure_reason(run_dir)
    for name in WEIGHT_NAMES:
        if (run_dir / name).is_file():
            if reason:  # a best checkpoint of a run whose last attempt failed: usable, but say so
                logging.getLogger("cellkit.predict").warning("%s: the run's last attempt failed (%s: %s); using its %s",
                                                             run_dir, FAILED, reason, name)
            return run_dir / name
    hints = [f"the run failed ({FAILED}: {reason})"] if reason else []
    last = last_checkpoint(run_dir)
    if last is not None and (run_dir / last).is_file():
        hints.append(f"its last checkpoint {last} is for `cellkit train --resume`")
    raise FileNotFoundError(f"{run_dir}: no finished or best checkpoint ({' or '.join(WEIGHT_NAMES)})"
                            f"{''.join(f'; {hint}' for hint in hints)}; pass --weights PATH to use another")


def failure_reason(run_dir: str | os.PathLike) -> str | None:
    """The first line of ``<run_dir>/FAILED`` (why the run's last attempt failed), or None when there is none."""
    path = Path(run_dir) / FAILED
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(FAILED marker unreadable)"
    return (text.splitlines() or ["(empty FAILED marker)"])[0]


def write_failed(run_dir: str | os.PathLike, exc: BaseException, iteration) -> None:
    """Write the ``FAILED`` marker: the error, where it happened, the time, how to go on and the traceback.

    An error while writing is logged, never raised (the training error is the one that matters).
    """
    run_dir = Path(run_dir)
    message = " ".join(str(exc).split()) or type(exc).__name__
    where = "before training started" if iteration is None else f"at iteration {iteration}"
    text = (f"training failed {where}: {type(exc).__name__}: {message}\n"
            f"time: {datetime.datetime.now().isoformat(timespec='seconds')}\n"
            f"{FINAL} was not written; fix the cause, then `cellkit train --resume --out {run_dir}` continues "
            f"from the last checkpoint (if any) or starts afresh.\n\n"
            + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    try:
        atomic.write_text(run_dir / FAILED, text)
    except OSError as write_exc:
        logging.getLogger("cellkit.train").error("cellkit: could not write %s: %s", run_dir / FAILED, write_exc)


def clear_failed(run_dir: str | os.PathLike) -> None:
    """Remove the ``FAILED`` marker (a new attempt starts)."""
    (Path(run_dir) / FAILED).unlink(missing_ok=True)


def remove_temporaries(run_dir: str | os.PathLike) -> None:
    """Delete the temporary files of a checkpoint save that was killed (:mod:`cellkit.atomic`'s hidden names)."""
    for pattern in (".model_*.pth.*.pth", f".{LAST}.*.tmp"):
        for path in Path(run_dir).glob(pattern):
            path.unlink(missing_ok=True)


def prune_periodic(run_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete periodic checkpoints beyond the newest ``keep``; what ``last_checkpoint`` names is never deleted.

    Args:
        run_dir: the run directory.
        keep: periodic checkpoints to keep; <= 0 keeps every one.

    Returns:
        The deleted paths.
    """
    if keep <= 0:
        return []
    run_dir = Path(run_dir)
    periodic = sorted(p for p in run_dir.glob(PERIODIC_GLOB) if p.is_file())
    protected = {last_checkpoint(run_dir)}
    deleted = [p for p in periodic[:-keep] if p.name not in protected]
    for path in deleted:
        path.unlink(missing_ok=True)
    return deleted


def prune_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Delete a run's periodic checkpoints except the one ``last_checkpoint`` names (``--resume`` needs it):
    ``model_best.pth`` and ``model_final.pth`` stay. Kaggle's ``/kaggle/working`` holds 20 GB, and a ``paper``
    checkpoint with its optimizer state is about 1 GB.

    Returns:
        The deleted files (none when the run has no ``last_checkpoint``).
    """
    run_dir = Path(run_dir)
    last = last_checkpoint(run_dir)
    if last is None:
        return []
    deleted = [p for p in sorted(run_dir.glob("model_*.pth")) if p.name not in (last, BEST, FINAL)]
    for path in deleted:
        path.unlink()
    return deleted


def copy_for_resume(source: Path, target: Path) -> str:
    """Copy what resuming a run needs from ``source`` into ``target``; returns the checkpoint it resumes from.

    Copied: ``config.yaml``, ``last_checkpoint`` and the checkpoint it names, ``model_best.pth`` and the small files
    (logs, metrics); older ``model_*.pth`` are not. A ``folds.csv`` beside the source run comes too, unless one is
    already beside the target, so that every session trains on the same split.
    """
    checkpoint = last_checkpoint(source)
    target.mkdir(parents=True, exist_ok=True)
    for item in sorted(source.iterdir()):
        if item.is_file() and (item.name in (checkpoint, BEST) or not item.name.endswith(".pth")):
            shutil.copy2(item, target / item.name)
    folds_csv = source.parent / "folds.csv"
    if folds_csv.is_file() and not (target.parent / "folds.csv").exists():
        shutil.copy2(folds_csv, target.parent / "folds.csv")
    return checkpoint


def metric_records(path: str | os.PathLike) -> list[dict]:
    """The objects of a ``metrics.json`` (JSON lines; a run directory or the file itself), in file order.

    Lines that fail to parse (a torn last line of a run killed mid-write) and non-objects are skipped.

    Raises:
        FileNotFoundError: when the file is missing.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS
    records = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                row = json.loads(line.strip())
            except json.JSONDecodeError:  # a torn or blank line
                continue
            if isinstance(row, dict):
                records.append(row)
    return records


def best_metric(path: str | os.PathLike, metric: str = "cellkit/mAP") -> tuple[float, int] | None:
    """The best ``metric`` in a run's ``metrics.json`` and its iteration, or None (no file, or never logged)."""
    path = Path(path)
    if not (path / METRICS if path.is_dir() else path).is_file():
        return None
    logged = [row for row in metric_records(path) if isinstance(row.get(metric), (int, float))]
    best = max(logged, key=lambda row: row[metric], default=None)  # the first of equal bests
    return None if best is None else (float(best[metric]), int(best.get("iteration", -1)))
