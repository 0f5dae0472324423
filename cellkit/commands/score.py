"""``python -m cellkit score --truth TRUTH.csv --pred SUB.csv [--json]``: the competition metric of a submission."""
import argparse
import json
import sys

HELP = "score a submission CSV against a truth CSV with the competition metric"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--truth", required=True, help="truth CSV: id, annotation[, width, height, cell_type]")
    parser.add_argument("--pred", required=True, help="submission CSV: id, predicted (empty = no cell)")
    parser.add_argument("--json", action="store_true",
                        help='print one JSON object {"mAP", "per_class", "per_threshold", "n_images"}')
    parser.add_argument("--dataset", metavar="DIR",
                        help="dataset or run directory whose dataset.json gives the submission's columns, RLE order "
                             "and groups (default: the truth CSV's directory; Sartorius without one)")
    parser.add_argument("--per-image", default=None, metavar="CSV",
                        help="also write per-image scores (id, cell_type, score, n_truth, n_pred) to this CSV")


def summary(result: dict) -> dict:
    """The ``--json`` object: the result of :func:`cellkit.metric.score_frames` without its per-image table."""
    return {key: result[key] for key in ("mAP", "per_class", "per_threshold", "n_images")}


def format_table(result: dict) -> str:
    """Human-readable table of a :func:`cellkit.metric.score_frames` result."""
    from cellkit.metric import THRESHOLDS

    per_image = result["per_image"]
    lines = [f"mAP {result['mAP']:.4f} over {result['n_images']} images", "", f"{'class':<8} {'images':>6} {'mAP':>7}"]
    for cell_type, score in result["per_class"].items():
        n = int((per_image["cell_type"] == cell_type).sum())
        lines.append(f"{cell_type:<8} {n:>6} {'-' if score is None else f'{score:.4f}':>7}")
    lines += ["", "IoU>t  " + " ".join(f"{t:.2f}" for t in THRESHOLDS),
              "prec.  " + " ".join(f"{p:.2f}" for p in result["per_threshold"])]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cellkit import atomic
    from cellkit.metric import score_csv
    from cellkit.schema import schema_of

    result = score_csv(args.truth, args.pred, progress=sys.stderr.isatty() and not args.json,
                       schema=schema_of(args.dataset) if args.dataset else None)
    if args.per_image:
        Path(args.per_image).parent.mkdir(parents=True, exist_ok=True)
        with atomic.atomic_path(args.per_image) as tmp:
            result["per_image"].to_csv(tmp, index=False)
    print(json.dumps(summary(result)) if args.json else format_table(result))
    return 0
