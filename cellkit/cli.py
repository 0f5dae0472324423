"""``python -m cellkit COMMAND ...``: one thin driver per stage.

Each command lives in ``cellkit/commands/<name>.py`` and defines ``add_arguments(parser)`` and ``run(args) -> int``
(the exit code); its one-line help is in :data:`COMMANDS`. Commands are imported only when used, so ``cellkit score``
does not pay for importing torch.
"""
import argparse
import importlib
import sys

COMMANDS = {
    "synth": "generate the synthetic competition-format demo dataset",
    "import": "write a dataset (competition CSV, COCO json, per-instance mask folder) as the kit's layout + "
              "dataset.json",
    "folds": "write folds.csv (StratifiedGroupKFold by cell type, grouped by sample_id)",
    "score": "score a submission CSV against a truth CSV with the competition metric",
    "validate": "check a submission.csv against a folder of test images",
    "search": "search per-class score/mask/min-area thresholds on out-of-fold predictions -> thresholds.json",
    "cv": "score out-of-fold predictions naive vs post-processed, per fold and overall -> OUT/cv.json + cv.png",
    "submit": "post-process test predictions with thresholds.json and write a valid submission.csv",
    "fakepred": "generate realistic instance predictions from a train.csv (for developing post-processing)",
    "pseudo": "turn predictions of unlabeled images into pseudo-labels (competition layout) for cellkit train",
    "audit": "flag suspicious annotations of a train.csv (duplicates, overlaps, tiny; missed/spurious with OOF "
             "predictions) -> audit.csv, instances.csv",
    "train": "train a model (preset paper / r50 / demo or a YAML) on competition data or LIVECell",
    "predict": "predict instance probabilities (one model or an ensemble, optionally with TTA) for images or a held-out fold",
    "fuse": "fuse prediction stores of several models by weighted mask fusion into one store",
    "chain": "run notebooks 01..06 in order with papermill (make demo) and print the CV score",
    "kernels": "render kernels/<name>/ (Kaggle kernel metadata + notebook with Kaggle parameters) for your Kaggle user",
    "wheels": "build the offline wheels dataset (cellkit, detectron2 and the third-party wheels the kernels install)",
    "weights": "build the Kaggle weights dataset (fold models, thresholds.json, cv.json) from a finished run",
}

MODULES = {"import": "import_data"}  #: commands whose module is named otherwise (``import`` is a keyword)


class CellkitError(Exception):
    """A user-facing error: printed as one line, exit code 2, no traceback."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser; only ``command``'s module is imported (the others are listed with their help line)."""
    parser = argparse.ArgumentParser(prog="cellkit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(f"cellkit.commands.{MODULES.get(name, name)}")
            module.add_arguments(p)
            p.set_defaults(handler=module)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        return int(args.handler.run(args) or 0)
    except (CellkitError, ValueError, FileNotFoundError) as exc:
        print(f"cellkit {args.command}: error: {exc}", file=sys.stderr)
        return 2
