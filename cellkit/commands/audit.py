"""``python -m cellkit audit --truth train.csv [--pred OOF_STORE] [--thresholds thresholds.json] --out AUDIT_DIR``:
label audit of a train CSV (see :mod:`cellkit.audit`).

Writes ``AUDIT_DIR/audit.csv`` (one row per image, most suspicious first: ``id, cell_type, score`` and the counts
behind the score), ``AUDIT_DIR/instances.csv`` (one row per flagged annotation or prediction: ``kind``, ``id``,
``row`` in the train CSV, ``partner_row``, ``pred_index``, ``iou``, ...) and ``AUDIT_DIR/audit.json`` (the spec,
the sources and the totals), each atomically, and prints the top images. Without ``--pred`` only the labels are
checked (duplicates, heavy overlaps, empty and tiny masks); with an out-of-fold predictions store also missed cells
and spurious or misplaced labels. ``cellkit train --exclude AUDIT_DIR/audit.csv --exclude-top N`` then drops the N
worst images from training.
"""
import argparse

HELP = "flag suspicious annotations (duplicates, overlaps, tiny; missed/spurious with OOF predictions) -> audit.csv"


def _min_areas(text: str) -> dict[str, int]:
    """``"shsy5y=30,astro=80,cort=40"`` (any subset; another dataset's class names too) -> ``{cell type: int}``."""
    out = {}
    for part in (p for p in text.split(",") if p.strip()):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"expected CELL_TYPE=PIXELS pairs (e.g. shsy5y=30), got {part!r}")
        try:
            out[name] = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: {value!r} is not an integer number of pixels") from None
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--truth", required=True, metavar="CSV", help="competition-format train.csv to audit")
    parser.add_argument("--pred", metavar="DIR", help="out-of-fold predictions store (cellkit predict --fold); "
                                                      "without it only the labels are checked")
    parser.add_argument("--thresholds", metavar="JSON", help="thresholds.json (cellkit search): per-class score, "
                                                             "pixel and min-area thresholds for the predictions "
                                                             "(default: the seed's 0.5 / 0.5 / 0)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for audit.csv, instances.csv, audit.json")
    parser.add_argument("--duplicate-iou", type=float, default=0.9, help="mask IoU of near-duplicates (default 0.9)")
    parser.add_argument("--overlap-ios", type=float, default=0.5,
                        help="intersection over the smaller mask of heavy overlaps (default 0.5)")
    parser.add_argument("--min-area", type=_min_areas, default=None, metavar="TYPE=PX,...",
                        help="tiny-mask areas per cell type (default shsy5y=30,astro=80,cort=40)")
    parser.add_argument("--match-iou", type=float, default=0.5, help="IoU of a matching prediction (default 0.5)")
    parser.add_argument("--confident-score", type=float, default=None,
                        help="score of a confident prediction (default: the class's score threshold, else 0.5)")
    parser.add_argument("--top", type=int, default=10, help="images printed (default 10)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import logging

    from pathlib import Path

    from cellkit import CELL_TYPES, audit
    from cellkit.schema import schema_of

    classes = set(CELL_TYPES) | set(schema_of(Path(args.truth).parent).classes)
    if unknown := sorted(set(args.min_area or {}) - classes):
        raise ValueError(f"--min-area: unknown class {unknown[0]!r} (expected CELL_TYPE=PIXELS pairs of "
                         f"{', '.join(sorted(classes))})")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    spec = audit.AuditSpec(duplicate_iou=args.duplicate_iou, overlap_ios=args.overlap_ios,
                           min_area={**audit.DEFAULT_MIN_AREA, **(args.min_area or {})}, match_iou=args.match_iou,
                           confident_score=args.confident_score)
    result = audit.audit(args.truth, pred_dir=args.pred, thresholds=args.thresholds, spec=spec,
                         progress=not args.no_progress)
    paths = audit.write_audit(result, args.out)
    s = result.summary
    flags = ", ".join(f"{k} {v}" for k, v in s["flags"].items() if v) or "none"
    print(f"audited {s['n_images']} images ({s['n_with_pred']} with predictions) in {s['seconds']} s; flags: {flags}; "
          f"{s['n_flagged_images']} image(s) flagged")
    if args.top > 0:
        print(result.images.head(args.top)[["id", "cell_type", "score", "n_labels", "flags"]].to_string(index=False))
    print(f"wrote {paths['audit']}, {paths['instances']} and {paths['summary']}")
    return 0
