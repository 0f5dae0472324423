"""The headless notebook chain: ``notebooks/01_eda`` .. ``06_submission`` run in order with papermill.

Every notebook gets the parameters it declares out of one shared dict (``DATA_DIR``, ``OUT_DIR``, ``PRESET`` ...;
parameters a notebook does not declare are not passed to it), its executed copy lands in ``<OUT_DIR>/notebooks/``
and artifacts pass between notebooks as files under ``OUT_DIR`` (folds.csv, fold runs, oof/, thresholds.json,
submission.csv). A failing cell stops the chain with an error naming the notebook, the cell and the exception.
"""
import json
import shlex
import time
from pathlib import Path
from typing import Mapping, Sequence

from cellkit import atomic
from cellkit.rundir import fold_runs  # noqa: F401  (the notebooks call chain.fold_runs)

#: The chain, in order (file stems in ``notebooks/``).
NOTEBOOKS = ("01_eda", "02_folds", "03_pretrain", "04_finetune", "05_threshold_search", "06_submission")

#: The project's notebooks (the chain runs from a checkout: notebooks are not part of the installed package).
NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"

class NotebookFailed(RuntimeError):
    """A notebook of the chain failed; the message names the notebook, the cell and the error."""


def command(*argv) -> None:
    """Run ``python -m cellkit ARGV`` inside this process (the notebooks' way to call a stage).

    The command line is echoed first, so a notebook reader sees the shell equivalent. Unlike
    :func:`cellkit.cli.main`, errors propagate as exceptions, so a notebook cell fails with the stage's own message.

    Returns nothing (a notebook cell ending with it shows no stray ``0``).

    Raises:
        RuntimeError: the command returned a non-zero exit code.
    """
    from cellkit.cli import build_parser

    words = [str(a) for a in argv]
    print("$ cellkit " + " ".join(shlex.quote(w) for w in words), flush=True)
    try:
        args = build_parser(words[0]).parse_args(words)
    except SystemExit:  # argparse printed the usage and the problem above
        raise ValueError(f"cellkit {words[0]}: invalid arguments {words[1:]} (see the message above)") from None
    code = int(args.handler.run(args) or 0)
    if code:
        raise RuntimeError(f"cellkit {words[0]} exited with code {code}")


def import_source(fmt: str, source: str, data_dir: str, images: str = "", test_images: str = "",
                  class_column: str = "cell_type", rle_order: str = "", group_pattern: str = "") -> Path:
    """Notebook 01's ``SOURCE_*`` parameters: ``cellkit import`` of a dataset in its own format into ``DATA_DIR``,
    skipped when ``DATA_DIR`` already holds an import's ``dataset.json`` (a re-run, or the next notebook).

    Raises:
        ValueError: naming ``DATA_DIR`` when it is empty (the import needs a folder to write).
    """
    from cellkit.schema import FILE_NAME

    if not data_dir:
        raise ValueError(f"SOURCE_FORMAT={fmt!r}: set DATA_DIR, the folder the import writes")
    out = Path(data_dir)
    if (out / FILE_NAME).is_file():
        print(f"{out} holds an imported dataset ({FILE_NAME}): not imported again")
        return out
    flags = [("--images", images), ("--test-images", test_images), ("--rle-order", rle_order),
             ("--group-pattern", group_pattern)] + ([("--class-column", class_column)] if fmt == "csv" else [])
    command("import", fmt, *source.split(","), "--out", out, *[w for flag, v in flags if v for w in (flag, v)])
    return out


#: ``KEY VALUE`` config overrides of a smoke run (CI): 4 iterations on 256-pixel images.
SMOKE_OVERRIDES = (
    "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVAL_PERIOD", "4",
    "INPUT.MIN_SIZE_TRAIN", "(256,)", "INPUT.MAX_SIZE_TRAIN", "352", "INPUT.MIN_SIZE_TEST", "256",
    "INPUT.MAX_SIZE_TEST", "352", "TEST.AUG.MIN_SIZES", "(256,)", "TEST.AUG.MAX_SIZE", "352",
    "TEST.DETECTIONS_PER_IMAGE", "100",
)


def train_args(device: str, iterations: int = 0, smoke: bool = False, weights: Path | None = None) -> list[str]:
    """The ``cellkit train`` arguments a notebook's parameters add: ``--weights`` and ``KEY VALUE`` overrides.

    Args:
        device: ``"cpu"`` / ``"cuda"`` (``MODEL.DEVICE``).
        iterations: ``SOLVER.MAX_ITER`` when > 0 (applied after the smoke overrides, so it wins).
        smoke: add :data:`SMOKE_OVERRIDES`.
        weights: initial checkpoint, or None for the preset's (random init for the demo).
    """
    return [*(["--weights", str(weights)] if weights else []), "MODEL.DEVICE", device,
            *(SMOKE_OVERRIDES if smoke else ()),
            *(["SOLVER.MAX_ITER", str(int(iterations))] if iterations and int(iterations) > 0 else [])]


def parse_folds(value: str, folds_table) -> list[int]:
    """``FOLDS`` parameter -> sorted fold numbers: ``"all"`` or comma-separated ints, checked against folds.csv.

    Raises:
        ValueError: naming ``FOLDS`` when a fold is not in the table or the text is malformed.
    """
    known = sorted(int(f) for f in folds_table["fold"].unique())
    if str(value).strip().lower() == "all":
        return known
    try:
        chosen = sorted({int(t) for t in str(value).split(",") if t.strip()})
    except ValueError:
        raise ValueError(f"FOLDS={value!r}: expected 'all' or comma-separated fold numbers") from None
    if not chosen or not set(chosen) <= set(known):
        raise ValueError(f"FOLDS={value!r}: folds.csv has folds {known}")
    return chosen


def notebook_parameters(path: Path) -> dict[str, dict]:
    """The parameters a notebook declares in its ``parameters`` cell (papermill's inference: name -> info)."""
    import papermill as pm
    return pm.inspect_notebook(str(path))


def select_parameters(declared: Mapping[str, dict], params: Mapping[str, object]) -> dict:
    """The subset of ``params`` a notebook declares (the chain shares one dict across notebooks)."""
    return {k: v for k, v in params.items() if k in declared}


def failure_message(name: str, exc: Exception, executed: Path) -> str:
    """One-paragraph description of a papermill execution error: notebook, cell, exception, executed copy."""
    cell = getattr(exc, "exec_count", None)
    index = getattr(exc, "cell_index", None)
    where = (f"cell In [{cell}]" if cell is not None else "a cell") + (
        f" (cell {index + 1} of the executed copy)" if index is not None else "")
    source = (getattr(exc, "source", "") or "").strip().splitlines()
    first = f"; cell starts: {source[0][:100]!r}" if source else ""
    return (f"notebook {name}.ipynb failed at {where}: {getattr(exc, 'ename', type(exc).__name__)}: "
            f"{getattr(exc, 'evalue', str(exc))}{first} (executed copy: {executed})")


def run_notebook(name: str, params: Mapping[str, object], out_dir: Path, notebooks_dir: Path = NOTEBOOK_DIR,
                 kernel_name: str = "python3", log_output: bool = False, timeout: int | None = None) -> Path:
    """Execute one notebook of the chain with papermill.

    Args:
        name: file stem in ``notebooks_dir`` (e.g. ``"04_finetune"``).
        params: shared parameters; only those the notebook declares are injected.
        out_dir: the run directory; the executed copy goes to ``out_dir/notebooks/<name>.ipynb``.
        notebooks_dir: folder of the source notebooks.
        kernel_name: Jupyter kernel.
        log_output: stream the cells' output to the log as they run.
        timeout: per-cell timeout in seconds (None = no limit).

    Returns:
        The executed copy.

    Raises:
        FileNotFoundError: the notebook does not exist.
        NotebookFailed: a cell raised; the message names the notebook and cell.
    """
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    source = Path(notebooks_dir) / f"{name}.ipynb"
    if not source.is_file():
        raise FileNotFoundError(f"notebook {source} not found")
    executed = Path(out_dir) / "notebooks" / f"{name}.ipynb"
    executed.parent.mkdir(parents=True, exist_ok=True)
    try:
        pm.execute_notebook(str(source), str(executed), kernel_name=kernel_name, progress_bar=False,
                            parameters=select_parameters(notebook_parameters(source), params),
                            log_output=log_output, execution_timeout=timeout)
    except PapermillExecutionError as exc:
        raise NotebookFailed(failure_message(name, exc, executed)) from None
    return executed


IDENTITY_KEYS = ("DATA_DIR", "PRESET")


def check_run_identity(out_dir: Path, params: Mapping[str, object]) -> None:
    """Record ``DATA_DIR`` and ``PRESET`` in ``out_dir/chain.json``; refuse a run dir made from other ones.

    A rerun on the same run directory resumes (training continues from checkpoints, predictions already written are
    skipped), which is only right for the same data and preset.

    Raises:
        ValueError: naming both values, when ``out_dir`` holds a run of another data dir or preset.
    """
    path = Path(out_dir) / "chain.json"
    identity = {k: str(params.get(k, "")) for k in IDENTITY_KEYS}
    if path.is_file():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        diff = [f"{k} {recorded.get(k)!r} (now {identity[k]!r})"
                for k in IDENTITY_KEYS if recorded.get(k) != identity[k]]
        if diff:
            raise ValueError(f"{out_dir} holds a run made with {', '.join(diff)}: choose another output dir "
                             f"(make demo OUT=...) or delete it")
        return
    atomic.write_json(path, identity)


def run_chain(params: Mapping[str, object], out_dir: Path, names: Sequence[str] = NOTEBOOKS,
              notebooks_dir: Path = NOTEBOOK_DIR, log_output: bool = False, timeout: int | None = None,
              echo=print) -> None:
    """Run ``names`` in order; ``OUT_DIR`` is set to ``out_dir`` in every notebook.

    Raises:
        NotebookFailed: at the first failing notebook (later ones are not run).
    """
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    check_run_identity(out_dir, params)
    shared = {**params, "OUT_DIR": str(out_dir)}
    for i, name in enumerate(names, 1):
        echo(f"[{i}/{len(names)}] {name}.ipynb ...", flush=True)
        start = time.perf_counter()
        executed = run_notebook(name, shared, out_dir, notebooks_dir, log_output=log_output, timeout=timeout)
        echo(f"[{i}/{len(names)}] {name}.ipynb done in {time.perf_counter() - start:.0f} s -> {executed}", flush=True)


def cv_summary(out_dir: Path) -> dict:
    """The run's ``thresholds.json`` (validated; the threshold search's output), which carries the CV score of the
    out-of-fold predictions (``metric.before`` / ``metric.after``).

    Raises:
        FileNotFoundError: the chain did not get as far as the threshold search.
    """
    from cellkit.postprocess import load_thresholds

    path = Path(out_dir) / "thresholds.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the threshold-search notebook did not run")
    return load_thresholds(path)


def format_cv(doc: Mapping) -> str:
    """One line: the CV mAP after the searched post-processing, per class, and with the seed's thresholds.

    Args:
        doc: a ``thresholds.json`` document (``metric.before`` / ``metric.after`` each ``{"mAP", "per_class"}``).
    """
    after, before = doc["metric"]["after"], doc["metric"]["before"]
    n = doc.get("search", {}).get("n_images")
    per_class = " ".join(f"{k} {v:.4f}" for k, v in after.get("per_class", {}).items() if v is not None)
    where = f" on {n} out-of-fold images" if n else ""
    return (f"CV score{where}: mAP {after['mAP']:.4f} ({per_class}); "
            f"with the seed's thresholds {before['mAP']:.4f}")
