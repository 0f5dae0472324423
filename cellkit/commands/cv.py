"""``python -m cellkit cv OUT_DIR [--pred OOF] [--truth TRAIN.csv | --data DIR] [--thresholds JSON] [--folds CSV]``.

Scores a run's out-of-fold predictions twice, with the seed's naive post-processing (score 0.5, mask 0.5, min area
0, the seed's options) and with the searched one (``thresholds.json``), in the columns all / shsy5y / astro / cort,
per fold and over all out-of-fold images (the seed paper's Tables 1 and 2; see :mod:`cellkit.cv`). Defaults follow
the chain's run directory: ``OUT_DIR/oof``, ``OUT_DIR/thresholds.json``, ``OUT_DIR/folds.csv``; the truth is
``--truth`` or ``--data DIR``'s ``train.csv``. Writes ``OUT_DIR/cv.json`` and ``OUT_DIR/cv.png`` (atomically) and
prints both tables as markdown.
"""
HELP = "score out-of-fold predictions naive vs post-processed, per fold and overall -> OUT/cv.json + cv.png"


def add_arguments(parser) -> None:
    parser.add_argument("out", metavar="OUT_DIR", help="run directory (receives cv.json and cv.png)")
    parser.add_argument("--pred", metavar="DIR", help="out-of-fold predictions store (default OUT_DIR/oof)")
    truth = parser.add_mutually_exclusive_group(required=True)
    truth.add_argument("--truth", metavar="CSV", help="competition train.csv with the true masks")
    truth.add_argument("--data", metavar="DIR", help="competition-layout data dir: its train.csv is the truth")
    parser.add_argument("--thresholds", metavar="JSON", help="thresholds.json (default OUT_DIR/thresholds.json)")
    parser.add_argument("--folds", metavar="CSV", help="folds.csv (default OUT_DIR/folds.csv)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from pathlib import Path

    from cellkit import cv

    out = Path(args.out)
    doc = cv.cv_report(args.pred or out / "oof", args.truth or Path(args.data) / "train.csv",  # cv_report: Paths
                       args.thresholds or out / "thresholds.json", args.folds or out / "folds.csv",
                       progress=not args.no_progress)
    json_path, png_path = cv.write_report(doc, out)
    print(cv.format_tables(doc))
    if note := cv.search_mismatch(doc):
        print(note)
    print(f"wrote {json_path} and {png_path}")
    return 0
