"""``cellkit chain``: run the six notebooks in order with papermill (the main job, ``make demo``)."""
import argparse
import logging
import time
from pathlib import Path


def _parameter(text: str) -> tuple[str, object]:
    """``NAME=VALUE`` -> (NAME, VALUE parsed as YAML: numbers, booleans, strings)."""
    import yaml

    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, yaml.safe_load(value) if value else ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="competition-layout data dir (train.csv, train/, test/)")
    parser.add_argument("--out", required=True, type=Path, help="run directory receiving every artifact")
    parser.add_argument("--preset", default="demo", help="model preset (demo, r50, paper or a YAML path)")
    parser.add_argument("--folds", default="0", help="folds to train, comma-separated, or 'all'")
    parser.add_argument("--iterations", type=int, default=0, help="training iterations per fold (0 = preset's)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny everything (CI smoke run)")
    parser.add_argument("-p", "--param", action="append", type=_parameter, default=[], metavar="NAME=VALUE",
                        help="extra notebook parameter (repeatable), passed to every notebook declaring it")
    parser.add_argument("--only", default="", help="comma-separated notebook stems or numbers to run (default all)")
    parser.add_argument("--notebooks", type=Path, default=None,
                        help="folder of the notebooks (default: the checkout's)")
    parser.add_argument("--log-output", action="store_true", help="stream the notebooks' cell output")
    parser.add_argument("--cell-timeout", type=int, default=None, help="per-cell timeout in seconds")


def _select(only: str, names) -> list[str]:
    if not only:
        return list(names)
    chosen = []
    for token in (t.strip() for t in only.split(",") if t.strip()):
        match = [n for n in names if n == token or n.split("_", 1)[0] == token.zfill(2)]
        if not match:
            raise ValueError(f"--only: unknown notebook {token!r}; known: {', '.join(names)}")
        chosen += match
    return [n for n in names if n in chosen]


def run(args: argparse.Namespace) -> int:
    from cellkit import chain
    from cellkit.cli import CellkitError

    names = _select(args.only, chain.NOTEBOOKS)
    if args.log_output:  # papermill streams the cells' output through its logger
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = {"DATA_DIR": str(Path(args.data).resolve()) if args.data else "", "PRESET": args.preset,
              "FOLDS": args.folds, "ITERATIONS": args.iterations, "DEVICE": args.device, "SMOKE": args.smoke,
              **dict(args.param)}
    start = time.perf_counter()
    try:
        chain.run_chain(params, args.out, names, args.notebooks or chain.NOTEBOOK_DIR,
                        log_output=args.log_output, timeout=args.cell_timeout)
    except chain.NotebookFailed as exc:
        raise CellkitError(str(exc)) from None
    print(f"chain finished in {time.perf_counter() - start:.0f} s; artifacts in {Path(args.out).resolve()}")
    if (Path(args.out) / "thresholds.json").is_file():
        print(chain.format_cv(chain.cv_summary(args.out)))
    submission = Path(args.out) / "submission.csv"
    if "06_submission" in names and submission.is_file():
        print(f"submission: {submission.resolve()}")
    return 0
